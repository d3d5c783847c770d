//! A private containerd for one test (`omega_agent::daemon::PrivateContainerd`), failing the test loudly with
//! the reason when one cannot be had: there is no skipping.
//!
//! Each test starts its own daemon rather than sharing one per test binary: `#[tokio::test]` gives every
//! test its own runtime, a static daemon would never be dropped (Rust runs no destructors for statics, so
//! its shims would leak), and a daemon starts in well under a second here.

#![allow(dead_code)]

use omega_agent::containerd::Containerd;
use omega_agent::daemon::PrivateContainerd;
pub use omega_agent::daemon::IMAGE;
use omega_agent::image::Unpack;
use std::ops::{Deref, DerefMut};

pub struct TestDaemon(PrivateContainerd);

fn or_fail<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Namespaces are per test process and test, so parallel tests never see each other's containers.
fn namespace(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

impl TestDaemon {
    /// Starts containerd and imports the busybox image as [`IMAGE`].
    pub async fn start(name: &str) -> TestDaemon {
        TestDaemon(or_fail(PrivateContainerd::start(&namespace(name)).await))
    }

    /// Starts containerd with no image in it.
    pub async fn start_empty(name: &str) -> TestDaemon {
        TestDaemon(or_fail(PrivateContainerd::start_empty(&namespace(name)).await))
    }

    pub async fn restart(&mut self) {
        or_fail(self.0.restart().await)
    }

    pub fn import(&self, name: &str, unpack: Unpack) {
        or_fail(self.0.import(name, unpack))
    }

    pub async fn client(&self) -> Containerd {
        or_fail(self.0.client().await)
    }

    pub fn ctr(&self, args: &[&str]) -> String {
        or_fail(self.0.ctr(args))
    }

    pub fn snapshot_keys(&self) -> Vec<String> {
        or_fail(self.0.snapshot_keys())
    }
}

impl Deref for TestDaemon {
    type Target = PrivateContainerd;
    fn deref(&self) -> &PrivateContainerd {
        &self.0
    }
}

impl DerefMut for TestDaemon {
    fn deref_mut(&mut self) -> &mut PrivateContainerd {
        &mut self.0
    }
}
