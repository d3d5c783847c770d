//! The OCI runtime spec runc is given: the image's process settings with the caller's overrides, and the
//! limits the scheduler placed the task with (CPU quota and shares, memory with no swap beyond it), so a
//! container cannot take more of the node than it was given.
//!
//! Containers share the node's network namespace (Nomad's host networking; there is no CNI here): a task's
//! ports are its node's ports, so what it serves is reachable at the node's address, and the agent probes
//! its health checks at `127.0.0.1:<port>`. Every other namespace (pid, ipc, uts, mount, cgroup) is the
//! container's own. The node's `/etc/resolv.conf` and `/etc/hosts` are bound in read-only, so names resolve
//! inside as they do on the node.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount, MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::cgroup::swap_accounting;
use super::unpack::ResolvedImage;
use super::{check_id, ContainerSpec, Containerd, Error, Result};

/// `type_url` containerd expects for an OCI runtime spec carried as JSON.
pub(super) const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// CFS period for the CPU quota, microseconds (the kernel's and Docker's default).
const CPU_PERIOD_US: u64 = 100_000;
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The node's files a container reads them from, bound in read-only (they are the network's, which it shares).
const HOST_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/hosts"];

impl Containerd {
    pub(super) fn build_spec(&self, spec: &ContainerSpec, image: &ResolvedImage) -> Result<Spec> {
        let id = spec.id.as_str();
        let spec_err = |e: oci_spec::OciSpecError| Error::Spec { id: id.to_string(), reason: e.to_string() };
        let config = &image.config;

        let args: Vec<String> = if !spec.command.is_empty() {
            spec.command.iter().chain(&spec.args).cloned().collect()
        } else {
            let entrypoint = config.entrypoint.clone().unwrap_or_default();
            let cmd = if spec.args.is_empty() { config.cmd.clone().unwrap_or_default() } else { spec.args.clone() };
            entrypoint.into_iter().chain(cmd).collect()
        };
        if args.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "container {id:?}: no command given and image {:?} has no entrypoint or cmd",
                spec.image
            )));
        }

        // The image's environment in its order, then the spec's, a later value replacing an earlier one.
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |key: &str, value: &str| match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        };
        for entry in config.env.iter().flatten() {
            let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            set(k, v);
        }
        for (k, v) in &spec.env {
            set(k, v);
        }
        let mut env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, DEFAULT_PATH.to_string());
        }

        let cwd = match config.working_dir.as_deref() {
            Some(dir) if dir.starts_with('/') => dir.to_string(),
            _ => "/".to_string(),
        };
        let (uid, gid) = parse_user(config.user.as_deref().unwrap_or(""))
            .map_err(|reason| Error::BadImage { image: spec.image.clone(), reason })?;

        let mut oci = Spec::default();
        let user = UserBuilder::default().uid(uid).gid(gid).build().map_err(spec_err)?;
        let defaults = oci.process().clone().unwrap_or_default();
        let mut process = ProcessBuilder::default().args(args).env(env).cwd(cwd).user(user).terminal(false);
        if let Some(capabilities) = defaults.capabilities() {
            process = process.capabilities(capabilities.clone());
        }
        if let Some(rlimits) = defaults.rlimits() {
            process = process.rlimits(rlimits.clone());
        }
        oci.set_process(Some(process.no_new_privileges(true).build().map_err(spec_err)?));
        oci.set_root(Some(RootBuilder::default().path("rootfs").readonly(false).build().map_err(spec_err)?));
        oci.set_hostname(Some(id.chars().take(63).collect()));

        let mut resources = LinuxResourcesBuilder::default().devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(spec_err)?]);
        if spec.cpu_millis > 0 {
            let quota = (spec.cpu_millis * CPU_PERIOD_US / 1000).max(1000);
            let shares = (spec.cpu_millis * 1024 / 1000).max(2);
            resources = resources.cpu(
                LinuxCpuBuilder::default()
                    .period(CPU_PERIOD_US)
                    .quota(quota as i64)
                    .shares(shares)
                    .build()
                    .map_err(spec_err)?,
            );
        }
        if spec.memory_bytes > 0 {
            let limit = i64::try_from(spec.memory_bytes)
                .map_err(|_| Error::InvalidSpec(format!("memory_bytes {} is too large", spec.memory_bytes)))?;
            let mut memory = LinuxMemoryBuilder::default().limit(limit);
            if swap_accounting() {
                // memory+swap = memory: the limit cannot be dodged by swapping.
                memory = memory.swap(limit);
            }
            resources = resources.memory(memory.build().map_err(spec_err)?);
        }
        let default_linux = oci.linux().clone().unwrap_or_default();
        let mut linux = LinuxBuilder::default()
            .cgroups_path(PathBuf::from(self.cgroup_path(id)))
            .resources(resources.build().map_err(spec_err)?);
        if let Some(namespaces) = default_linux.namespaces() {
            linux = linux.namespaces(host_network(namespaces));
        }
        if let Some(masked) = default_linux.masked_paths() {
            linux = linux.masked_paths(masked.clone());
        }
        if let Some(readonly) = default_linux.readonly_paths() {
            linux = linux.readonly_paths(readonly.clone());
        }
        oci.set_linux(Some(linux.build().map_err(spec_err)?));
        let mut mounts = oci.mounts().clone().unwrap_or_default();
        for file in HOST_FILES.iter().filter(|f| Path::new(f).exists()) {
            mounts.push(read_only_bind(file).map_err(spec_err)?);
        }
        oci.set_mounts(Some(mounts));
        Ok(oci)
    }
}

/// The namespaces a container gets: every default one but the network's, which it shares with the node.
fn host_network(defaults: &[LinuxNamespace]) -> Vec<LinuxNamespace> {
    defaults.iter().filter(|ns| ns.typ() != LinuxNamespaceType::Network).cloned().collect()
}

/// `path` of the node at the same place in the container, read-only.
fn read_only_bind(path: &str) -> std::result::Result<Mount, oci_spec::OciSpecError> {
    MountBuilder::default()
        .destination(path)
        .typ("bind")
        .source(path)
        .options(["rbind", "ro", "nosuid", "nodev", "noexec"].map(String::from).to_vec())
        .build()
}

pub(super) fn check_spec(spec: &ContainerSpec) -> Result<()> {
    check_id(&spec.id)?;
    if spec.image.is_empty() {
        return Err(Error::InvalidSpec(format!("container {:?}: empty image", spec.id)));
    }
    if !spec.log_path.is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "container {:?}: log_path {} must be absolute (the shim, not the agent, opens it)",
            spec.id,
            spec.log_path.display()
        )));
    }
    Ok(())
}

/// `file://` URI of an absolute path, percent-encoding what a URI path may not hold.
pub(super) fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file://");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

/// `uid[:gid]` with numbers; an empty user is root. Names would need the image's /etc/passwd.
fn parse_user(user: &str) -> std::result::Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 =
        u.parse().map_err(|_| format!("user {user:?} is not numeric (uid[:gid]); user names are not supported"))?;
    let gid: u32 = if g.is_empty() {
        uid
    } else {
        g.parse().map_err(|_| format!("group in user {user:?} is not numeric; group names are not supported"))?
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_are_escaped() {
        assert_eq!(file_uri(Path::new("/var/log/omega/a-1.log")), "file:///var/log/omega/a-1.log");
        assert_eq!(file_uri(Path::new("/tmp/a b%.log")), "file:///tmp/a%20b%25.log");
    }

    #[test]
    fn containers_share_the_nodes_network_and_nothing_else() {
        let defaults = Spec::default().linux().clone().unwrap_or_default().namespaces().clone().unwrap_or_default();
        assert!(defaults.iter().any(|ns| ns.typ() == LinuxNamespaceType::Network), "the default has its own");
        let kept: Vec<LinuxNamespaceType> = host_network(&defaults).iter().map(|ns| ns.typ()).collect();
        assert_eq!(kept.len(), defaults.len() - 1, "{kept:?}");
        assert!(!kept.contains(&LinuxNamespaceType::Network));
        for own in [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount, LinuxNamespaceType::Ipc] {
            assert!(kept.contains(&own), "{own:?} stays the container's own: {kept:?}");
        }
        let bind = read_only_bind("/etc/hosts").unwrap();
        assert_eq!(bind.destination(), Path::new("/etc/hosts"));
        assert!(bind.options().as_ref().is_some_and(|o| o.iter().any(|o| o == "ro")), "{bind:?}");
    }

    #[test]
    fn users() {
        assert_eq!(parse_user(""), Ok((0, 0)));
        assert_eq!(parse_user("1000"), Ok((1000, 1000)));
        assert_eq!(parse_user("1000:50"), Ok((1000, 50)));
        assert!(parse_user("nobody").is_err());
    }
}
