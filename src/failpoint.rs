//! Failpoints: named places where a test can stop a real process, to kill it (or let it go on) at exactly
//! that step.
//!
//! Crash-safety claims ("a task never runs twice", "a frozen scheduler commits nothing") are about what
//! happens when a process dies or stalls between two particular writes. Timing a `SIGKILL` from outside hits
//! such a window only now and then; a failpoint hits it every time. Like etcd's gofail, they cost nothing
//! unless switched on, and they are switched on only through the environment of the process under test:
//!
//! ```text
//! OMEGA_FAILPOINTS=agent.before_remove=pause,controller.before_lost_release=pause
//! OMEGA_FAILPOINT_DIR=/tmp/omega-fp-1234
//! ```
//!
//! `pause`: the first time the process reaches the point it creates the file `<dir>/<name>` and waits until
//! that file is deleted. The test waits for the file to appear, then does what it came for (`SIGKILL`,
//! `SIGSTOP`, re-registering a node, ...) and deletes the file to let the process go on. Later hits of the
//! same point pass straight through.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable naming the active failpoints (`name=action`, comma-separated).
pub const ENV_POINTS: &str = "OMEGA_FAILPOINTS";
/// The directory a paused failpoint signals in.
pub const ENV_DIR: &str = "OMEGA_FAILPOINT_DIR";

struct Point {
    /// Set once the point has fired (each point fires once per process).
    fired: AtomicBool,
}

struct Config {
    dir: PathBuf,
    points: HashMap<String, Point>,
}

fn config() -> Option<&'static Config> {
    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let spec = std::env::var(ENV_POINTS).ok()?;
            let dir = std::env::var_os(ENV_DIR).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            let mut points = HashMap::new();
            for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match item.split_once('=') {
                    Some((name, "pause")) => {
                        points.insert(name.to_string(), Point { fired: AtomicBool::new(false) });
                    }
                    _ => tracing::error!(item, "unknown failpoint setting (expected name=pause); ignored"),
                }
            }
            tracing::warn!(points = ?points.keys().collect::<Vec<_>>(), dir = %dir.display(), "failpoints are active");
            Some(Config { dir, points })
        })
        .as_ref()
}

/// Reaches the failpoint `name`: returns at once unless the environment activated it (see the module docs).
pub async fn hit(name: &str) {
    let Some(config) = config() else { return };
    let Some(point) = config.points.get(name) else { return };
    if point.fired.swap(true, Ordering::SeqCst) {
        return;
    }
    let marker = config.dir.join(name);
    if let Err(e) = std::fs::write(&marker, std::process::id().to_string()) {
        tracing::error!(name, error = %e, "cannot write the failpoint's marker; not pausing");
        return;
    }
    tracing::warn!(name, marker = %marker.display(), "paused at a failpoint until the marker is removed");
    while marker.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::warn!(name, "failpoint released");
}

/// The marker file a paused failpoint creates, for tests that drive a process through one.
pub fn marker(dir: &std::path::Path, name: &str) -> PathBuf {
    dir.join(name)
}
