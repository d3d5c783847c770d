//! A container's cgroup as the kernel keeps it. The agent reads the cgroup itself, rather than relying on
//! containerd's `/tasks/oom` events alone, because the kernel's count of OOM kills is exact and stays until
//! the task is deleted, even across an agent restart, while an event sent when no agent was subscribed is
//! lost; the events remain the answer when the cgroup cannot be read (containerd on another host).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::SubscribeRequest;
use prost::Message;
use tonic::transport::Channel;

use super::{lock, now_ms, Containerd};

impl Containerd {
    /// The `linux.cgroupsPath` given to container `id`: `<cgroup_parent>/<namespace>/<id>`.
    pub fn cgroup_path(&self, id: &str) -> String {
        format!("{}/{}/{}", self.inner.options.cgroup_parent.trim_end_matches('/'), self.inner.namespace, id)
    }

    /// The host directory of container `id`'s cgroup for a cgroup v1 `controller` (`cpu`, `memory`, ...),
    /// or of its unified (v2) cgroup when the host has no v1 hierarchy for that controller. `None` when
    /// neither is mounted. The directory exists from task create to task delete.
    pub fn cgroup_dir(&self, controller: &str, id: &str) -> Option<PathBuf> {
        let mount = cgroup_mount(controller)?;
        Some(mount.join(self.cgroup_path(id).trim_start_matches('/')))
    }

    /// How many OOM kills the kernel counted in container `id`'s memory cgroup, if it can be read (the task
    /// exists, and containerd runs on this host). This is what [`wait`](Self::wait) uses first.
    pub fn cgroup_oom_kills(&self, id: &str) -> Option<u64> {
        let dir = self.cgroup_dir("memory", id)?;
        let text = std::fs::read_to_string(dir.join("memory.oom_control"))
            .or_else(|_| std::fs::read_to_string(dir.join("memory.events")))
            .ok()?;
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok())
    }

    /// Whether a `/tasks/oom` event for container `id` arrived since it was last started by this client.
    pub fn oom_event_seen(&self, id: &str) -> bool {
        lock(&self.inner.oom_events).contains_key(id)
    }
}

/// Records `/tasks/oom` events of `namespace` until aborted, resubscribing when the stream breaks.
/// (containerd answers a subscription only when the first event arrives, so this runs as its own task.)
pub(super) async fn watch_oom_events(channel: Channel, namespace: String, seen: Arc<Mutex<HashMap<String, u64>>>) {
    let filter = format!("topic==\"/tasks/oom\",namespace==\"{namespace}\"");
    loop {
        let mut events = EventsClient::new(channel.clone());
        match events.subscribe(SubscribeRequest { filters: vec![filter.clone()] }).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(envelope)) => {
                            if envelope.topic != "/tasks/oom" || envelope.namespace != namespace {
                                continue;
                            }
                            let Some(event) = envelope.event else { continue };
                            match containerd_client::events::TaskOom::decode(event.value.as_slice()) {
                                Ok(oom) => {
                                    tracing::info!(container = %oom.container_id, "containerd reported an OOM kill");
                                    lock(&seen).insert(oom.container_id, now_ms());
                                }
                                Err(e) => tracing::warn!("cannot decode a /tasks/oom event: {e}"),
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!("containerd event stream broke: {status}");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!("cannot subscribe to containerd events: {status}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The mount point of cgroup v1 `controller`, or of the unified hierarchy on a cgroup v2 host.
fn cgroup_mount(controller: &str) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut unified = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mount_point = left.split(' ').nth(4)?;
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let super_options = right.nth(1).unwrap_or("");
        if fstype == "cgroup" && super_options.split(',').any(|o| o == controller) {
            return Some(PathBuf::from(mount_point));
        }
        if fstype == "cgroup2" && mount_point == "/sys/fs/cgroup" {
            unified = Some(PathBuf::from(mount_point));
        }
    }
    unified
}

/// Whether cgroup v1 swap accounting exists (`memory.memsw.*`), so a memory+swap limit can be set.
pub(super) fn swap_accounting() -> bool {
    match cgroup_mount("memory") {
        Some(m) if m != Path::new("/sys/fs/cgroup") => m.join("memory.memsw.limit_in_bytes").exists(),
        // cgroup v2: runc turns memory.swap = memory.limit into memory.swap.max = 0.
        Some(_) => true,
        None => false,
    }
}
