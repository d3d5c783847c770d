//! Images without a registry: load an OCI image tarball into containerd, and build a tiny busybox image.
//!
//! Omega's cells may have no registry to pull from, so an image gets into a node's containerd from a file:
//!
//! 1. make an OCI image layout and tar it (any tool: `umoci`, `skopeo copy ... oci-archive:img.tar`,
//!    `docker save` gives the Docker format, which `ctr` also imports), or [`build_busybox_image`];
//! 2. [`import_oci_tar`] it into the node's containerd namespace, which runs
//!    `ctr -a <socket> -n <namespace> images import --base-name <name without tag> <tar>`.
//!
//! containerd 1.6 has no Transfer service, so importing over gRPC would mean re-implementing `ctr`'s
//! content-store writes and diff application; `ctr` ships with containerd, so it is used instead.
//! [`crate::containerd::Containerd::ensure_image`] then checks the image is present (and unpacks it into
//! the agent's snapshotter if it is not unpacked there yet).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of the image helpers: a missing tool, or a tool that failed (with its output).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {source} ({hint})")]
    Tool { program: String, hint: &'static str, source: std::io::Error },

    #[error("`{command}` failed ({status}): {output}")]
    Failed { command: String, status: String, output: String },

    #[error("{0}")]
    Invalid(String),

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Splits `name[:tag]` into (name, tag); the tag defaults to `latest`. A `:` before the last `/` belongs
/// to a registry host's port, not to a tag. Digest references (`@sha256:...`) are refused: an imported
/// tarball names its images by tag.
pub fn split_reference(reference: &str) -> Result<(&str, &str)> {
    if reference.is_empty() || reference.contains('@') || reference.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!("image reference {reference:?} must be name[:tag], without a digest")));
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => {
            let (name, tag) = (&reference[..last_slash + i], &reference[last_slash + i + 1..]);
            if name.is_empty() || tag.is_empty() {
                return Err(Error::Invalid(format!("image reference {reference:?} has an empty name or tag")));
            }
            Ok((name, tag))
        }
        None => Ok((reference, "latest")),
    }
}

/// Runs a command, returning its stdout, or an error with its stderr and stdout.
fn run(program: &str, args: &[&str], hint: &'static str) -> Result<String> {
    let output = Command::new(program).args(args).output().map_err(|source| Error::Tool {
        program: program.to_string(),
        hint,
        source,
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(Error::Failed {
        command: std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" "),
        status: output.status.to_string(),
        output: format!("{}{}", stderr.trim(), if stdout.trim().is_empty() { "" } else { stdout.trim() }),
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::Invalid(format!("path {} is not UTF-8", p.display())))
}

/// Imports the OCI image tarball `tar` into containerd (socket `ctr_socket`, namespace `namespace`) as
/// `name` (`repository[:tag]`, tag `latest` if omitted): runs
/// `ctr -a SOCK -n NS images import --base-name <repository> TAR`, which names each image in the tarball
/// `<repository>:<its ref.name tag>` and unpacks it into ctr's default snapshotter (`overlayfs`, or
/// `$CONTAINERD_SNAPSHOTTER`), then checks that `name` now exists. The tarball must hold `name`'s tag
/// (its `index.json` annotation `org.opencontainers.image.ref.name`), as [`build_busybox_image`]'s does.
pub fn import_oci_tar(ctr_socket: &Path, namespace: &str, tar: &Path, name: &str) -> Result<()> {
    import_oci_tar_with(ctr_socket, namespace, tar, name, Unpack::Default)
}

/// Where [`import_oci_tar_with`] unpacks the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpack<'a> {
    /// ctr's default snapshotter (`overlayfs` unless `$CONTAINERD_SNAPSHOTTER` says otherwise).
    Default,
    /// This snapshotter (`--snapshotter`).
    Into(&'a str),
    /// Not at all (`--no-unpack`): the agent unpacks on first use.
    No,
}

/// [`import_oci_tar`] with a choice of where (or whether) the layers are unpacked.
pub fn import_oci_tar_with(ctr_socket: &Path, namespace: &str, tar: &Path, name: &str, unpack: Unpack) -> Result<()> {
    let (repository, tag) = split_reference(name)?;
    if !tar.is_file() {
        return Err(Error::Invalid(format!("image tarball {} does not exist", tar.display())));
    }
    let socket = path_str(ctr_socket)?;
    let tar_path = path_str(tar)?;
    let mut args = vec!["-a", socket, "-n", namespace, "images", "import", "--base-name", repository];
    match unpack {
        Unpack::Default => {}
        Unpack::Into(snapshotter) => args.extend(["--snapshotter", snapshotter]),
        Unpack::No => args.push("--no-unpack"),
    }
    args.push(tar_path);
    const HINT: &str = "ctr comes with containerd: install Debian's containerd (deploy/install-deps.sh)";
    run("ctr", &args, HINT)?;
    let full = format!("{repository}:{tag}");
    let listed = run("ctr", &["-a", socket, "-n", namespace, "images", "ls", "-q"], HINT)?;
    if listed.lines().any(|l| l.trim() == full) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "imported {} but containerd has no image {full:?} (the tarball's tags became: {}); tag the image \
             {tag:?} when building it",
            tar.display(),
            listed.lines().filter(|l| l.starts_with(repository)).collect::<Vec<_>>().join(", ")
        )))
    }
}

/// Whether an ELF executable asks for a dynamic loader (has a `PT_INTERP` program header). A dynamic
/// busybox would not run in an image holding nothing but itself.
fn is_dynamic_elf(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None; // only 64-bit little-endian is checked
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at =
        |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    Some((0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(3)))
}

/// The busybox binary to put in the image: `$OMEGA_BUSYBOX`, else Debian busybox-static's `/bin/busybox`.
fn busybox_binary() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("OMEGA_BUSYBOX") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![PathBuf::from("/bin/busybox"), PathBuf::from("/usr/bin/busybox")],
    };
    for candidate in &candidates {
        let Ok(bytes) = std::fs::read(candidate) else { continue };
        return match is_dynamic_elf(&bytes) {
            Some(false) => Ok(candidate.clone()),
            Some(true) => Err(Error::Invalid(format!(
                "{} is dynamically linked and would not run in an image of its own: install Debian's \
                 busybox-static (deploy/install-deps.sh) or set OMEGA_BUSYBOX to a static busybox",
                candidate.display()
            ))),
            None => Err(Error::Invalid(format!("{} is not a 64-bit little-endian ELF binary", candidate.display()))),
        };
    }
    Err(Error::Invalid(format!(
        "no busybox at {}: install Debian's busybox-static (deploy/install-deps.sh) or set OMEGA_BUSYBOX",
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
    )))
}

/// Builds a tiny image holding a static busybox and links for all its applets (`sh`, `echo`, `sleep`,
/// `cat`, `dd`, `head`, `tr`, `awk`, ...) in `/bin`, and `Cmd ["sh"]` with `PATH=/bin`, as an OCI layout in
/// `dir/oci`, and tars it to `dir/<repository basename>-<tag>.oci.tar`, which it returns. `name` is the
/// reference the image is meant to be imported as (`repository[:tag]`); the layout is tagged with its tag.
///
/// Uses `umoci` (`init`, `new`, `insert`, `config`) and `tar`; runs as root or, otherwise, with umoci's
/// `--rootless`. Rebuilds from scratch if `dir` already holds a layout.
pub fn build_busybox_image(dir: &Path, name: &str) -> Result<PathBuf> {
    let (repository, tag) = split_reference(name)?;
    let busybox = busybox_binary()?;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let dir = dir.canonicalize().map_err(io(format!("resolving {}", dir.display())))?;
    let rootfs = dir.join("rootfs");
    let layout = dir.join("oci");
    for old in [&rootfs, &layout] {
        if old.exists() {
            std::fs::remove_dir_all(old).map_err(io(format!("removing {}", old.display())))?;
        }
    }

    // The root filesystem: /bin/busybox, /bin/<applet> -> busybox, and the directories a program expects.
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(format!("creating {}", bin.display())))?;
    std::fs::copy(&busybox, bin.join("busybox")).map_err(io(format!("copying {}", busybox.display())))?;
    let busybox_str = path_str(&busybox)?;
    let applets = run(busybox_str, &["--list"], "busybox-static provides it")?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/')) {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .map_err(io(format!("linking {applet} in {}", bin.display())))?;
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "root", "var/tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(io(format!("creating {d} in the rootfs")))?;
    }
    use std::os::unix::fs::PermissionsExt;
    for d in ["tmp", "var/tmp"] {
        std::fs::set_permissions(rootfs.join(d), std::fs::Permissions::from_mode(0o1777))
            .map_err(io(format!("chmod {d}")))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .map_err(io("writing etc/passwd"))?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").map_err(io("writing etc/group"))?;

    // The OCI layout: one layer with the rootfs, then the config.
    const HINT: &str = "install Debian's umoci (deploy/install-deps.sh)";
    let layout_str = path_str(&layout)?;
    let image = format!("{layout_str}:{tag}");
    let rootless = !running_as_root();
    let with_rootless = |mut args: Vec<&'static str>| {
        if rootless {
            args.push("--rootless");
        }
        args
    };
    run("umoci", &["init", "--layout", layout_str], HINT)?;
    run("umoci", &["new", "--image", &image], HINT)?;
    let mut insert: Vec<&str> = with_rootless(vec!["insert"]);
    insert.extend(["--image", &image, path_str(&rootfs)?, "/"]);
    run("umoci", &insert, HINT)?;
    let mut config: Vec<&str> = with_rootless(vec!["config"]);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    config.extend([
        "--image",
        &image,
        "--config.cmd",
        "sh",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/",
        "--os",
        "linux",
        "--architecture",
        arch,
        "--author",
        "omega build_busybox_image",
    ]);
    run("umoci", &config, HINT)?;

    // The tarball: the layout's oci-layout, index.json and blobs/ at its root, as `ctr images import` wants.
    let base = repository.rsplit('/').next().unwrap_or(repository);
    let tar = dir.join(format!("{base}-{tag}.oci.tar"));
    run("tar", &["-C", layout_str, "-cf", path_str(&tar)?, "."], "tar is part of every Debian system")?;
    Ok(tar)
}

/// Root can store real owners in image layers; anyone else needs umoci's `--rootless`. (`/proc/self` is
/// owned by the calling process's effective uid.)
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert_eq!(split_reference("busybox").ok(), Some(("busybox", "latest")));
        assert_eq!(split_reference("omega.local/busybox:1").ok(), Some(("omega.local/busybox", "1")));
        assert_eq!(split_reference("host:5000/a/b").ok(), Some(("host:5000/a/b", "latest")));
        assert_eq!(split_reference("host:5000/a/b:v2").ok(), Some(("host:5000/a/b", "v2")));
        assert!(split_reference("a@sha256:00").is_err());
        assert!(split_reference("a:").is_err());
    }

    #[test]
    fn this_machines_busybox_is_static() {
        // Debian's busybox-static is a dependency of the project (deploy/install-deps.sh).
        let bytes = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static) is installed");
        assert_eq!(is_dynamic_elf(&bytes), Some(false));
        let ls = std::fs::read("/bin/ls").expect("/bin/ls");
        assert_eq!(is_dynamic_elf(&ls), Some(true));
    }
}
