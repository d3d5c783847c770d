//! The project's binaries as child processes in tests: found in the target directory the test itself runs
//! from (built by `cargo test --workspace`), logging to a temp file, SIGKILLed when dropped or on `kill()`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Proc(Child, PathBuf);

impl Proc {
    /// Starts the workspace binary `name`; its output goes to `<tmp>/omega-test-<log>-<pid>.log`.
    pub fn start(name: &str, args: &[&str], log: &str) -> Proc {
        Self::start_with_env(name, args, log, &[])
    }

    /// [`start`](Self::start) with extra environment variables (failpoints, for instance).
    pub fn start_with_env(name: &str, args: &[&str], log: &str, env: &[(&str, &str)]) -> Proc {
        let path = std::env::temp_dir().join(format!("omega-test-{log}-{}.log", std::process::id()));
        let out = std::fs::File::create(&path).unwrap();
        let program = bin(name);
        let child = Command::new(&program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        Proc(child, path)
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends a signal by name (`-STOP`, `-CONT`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.0.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal} {}", self.0.id());
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A workspace binary of the build the running test belongs to (a test runs from `<target>/<profile>/deps/`;
/// the binaries are in `<target>/<profile>/`). Fails loudly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the test's own path");
    let profile_dir = me.parent().and_then(|deps| deps.parent()).expect("a test runs from <target>/<profile>/deps");
    let p = profile_dir.join(name);
    assert!(p.exists(), "{} not built: run the tests with `cargo test --workspace`", p.display());
    p
}
