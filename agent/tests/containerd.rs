//! The containerd runtime against a real containerd (a private daemon per test, see
//! `support/containerd_daemon.rs`), running real containers from the busybox test image. Needs root.

#[path = "support/containerd_daemon.rs"]
mod daemon;

use daemon::{TestDaemon, IMAGE};
use omega_agent::containerd::{ContainerSpec, Containerd, Error};
use omega_agent::image::Unpack;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// Every step of a test is bounded: a hung containerd fails the test instead of hanging it.
async fn bounded<F: Future>(what: &str, secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} took more than {secs} s"),
    }
}

fn spec(d: &TestDaemon, id: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        id: id.to_string(),
        image: IMAGE.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        args: vec![],
        env: BTreeMap::new(),
        cpu_millis: 0,
        memory_bytes: 0,
        log_path: d.log_path(id),
        labels: BTreeMap::new(),
    }
}

fn read_log(d: &TestDaemon, id: &str) -> String {
    std::fs::read_to_string(d.log_path(id)).unwrap_or_default()
}

fn read_cgroup(c: &Containerd, controller: &str, id: &str, file: &str) -> String {
    let dir = c.cgroup_dir(controller, id).unwrap_or_else(|| panic!("no {controller} cgroup hierarchy on this host"));
    let path = dir.join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_hello_exits_zero_and_logs_stdout_and_stderr() {
    let d = bounded("starting containerd", 60, TestDaemon::start("echo")).await;
    let c = d.client().await;
    eprintln!("containerd answered {:?} after spawn (snapshotter {})", d.startup, d.snapshotter);

    let s = spec(&d, "echo-0-p0", &["echo", "hello"]);
    let t0 = Instant::now();
    let pid = bounded("run", 30, c.run(&s)).await.expect("run echo");
    let started = t0.elapsed();
    let exit = bounded("wait", 30, c.wait(&s.id)).await.expect("wait");
    eprintln!("echo: run() {started:?} (pid {pid}), run to exit {:?}", t0.elapsed());
    assert!(pid > 0);
    assert_eq!(exit.code, 0, "log: {}", read_log(&d, &s.id));
    assert!(!exit.oom_killed);
    assert!(exit.finished_at_ms > 1_700_000_000_000, "finished_at_ms {}", exit.finished_at_ms);
    // A second wait answers the same (the exit is kept until the task is deleted).
    assert_eq!(bounded("wait again", 10, c.wait(&s.id)).await.expect("wait again"), exit);
    let t0 = Instant::now();
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    eprintln!("echo: remove() {:?}", t0.elapsed());
    // Read after remove: the shim may still be copying output when the exit is reported, and finishes
    // (waiting up to 2 s) when the task is deleted (measured: the last line was missing in 2 of 10 runs that
    // read right after wait, native snapshotter).
    assert_eq!(read_log(&d, &s.id), "hello\n");

    // stderr goes to the same file; the spec's env is added to the image's; the image's workdir is used.
    let mut s = spec(&d, "echo-1-p0", &["sh", "-c"]);
    s.args = vec!["echo \"out $FOO $PATH $(pwd) $(hostname)\"; echo err >&2; exit 3".into()];
    s.env.insert("FOO".into(), "bar".into());
    bounded("run", 30, c.run(&s)).await.expect("run sh");
    let exit = bounded("wait", 30, c.wait(&s.id)).await.expect("wait");
    assert_eq!(exit.code, 3);
    // The shim copies stdout and stderr through separate pipes into the one file: each line arrives whole,
    // but the order between the two streams is not kept (measured: "err" first in about half the runs).
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    let mut lines: Vec<String> = read_log(&d, &s.id).lines().map(str::to_string).collect();
    lines.sort();
    // KNOWN DEFECT (open): with containerd 1.6's file:// log URI the last stderr line of a process that exits
    // at once is sometimes lost (seen once in ~25 runs, even after remove()). stdout must be there; stderr, when
    // it arrived, must be whole. Fixing it means reading the task's FIFOs in the agent instead of file://.
    assert!(lines.contains(&"out bar /bin / echo-1-p0".to_string()), "{lines:?}");
    assert!(lines.iter().all(|l| l == "err" || l == "out bar /bin / echo-1-p0"), "{lines:?}");
    if !lines.contains(&"err".to_string()) {
        eprintln!("echo-1: the stderr line was lost (known defect)");
    }

    // No command: the image's Cmd (["sh"]) runs; with no stdin it ends at once.
    let s = spec(&d, "echo-2-p0", &[]);
    bounded("run", 30, c.run(&s)).await.expect("run image cmd");
    assert_eq!(bounded("wait", 30, c.wait(&s.id)).await.expect("wait").code, 0);
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");

    // A command that does not exist fails at start, and leaves nothing behind.
    let s = spec(&d, "echo-3-p0", &["/no/such/program"]);
    let err = bounded("run", 30, c.run(&s)).await.expect_err("a missing program cannot start");
    eprintln!("missing program: {err}");
    assert!(bounded("list", 10, c.list()).await.expect("list").is_empty());
    assert!(!d.snapshot_keys().contains(&s.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kill_is_reported() {
    let d = bounded("starting containerd", 60, TestDaemon::start("oom")).await;
    let c = d.client().await;

    // The shell keeps the 100 MB command substitution in memory; 32 MiB cannot hold it.
    let mut s = spec(&d, "oom-0-p0", &["sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo done"]);
    s.memory_bytes = 32 << 20;
    bounded("run", 30, c.run(&s)).await.expect("run");
    assert_eq!(read_cgroup(&c, "memory", &s.id, "memory.limit_in_bytes"), (32u64 << 20).to_string());

    // Wait through a second client that did not start the container (an agent after a restart): the
    // verdict must not depend on having watched the container from the start.
    let other = d.client().await;
    let exit = bounded("wait", 60, other.wait(&s.id)).await.expect("wait");
    eprintln!("oom: exit {exit:?}, cgroup oom_kill {:?}", c.cgroup_oom_kills(&s.id));
    assert!(exit.oom_killed, "exit {exit:?}, log {:?}", read_log(&d, &s.id));
    assert_eq!(exit.code, 137, "the OOM killer SIGKILLs");
    // Both sources agree: the kernel's count in the container's memory cgroup (read before the task is
    // deleted), and containerd's /tasks/oom event, seen by the client subscribed before the run.
    assert!(c.cgroup_oom_kills(&s.id).is_some_and(|n| n >= 1), "memory.oom_control oom_kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.oom_event_seen(&s.id) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.oom_event_seen(&s.id), "a /tasks/oom event for {}", s.id);
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert!(!read_log(&d, &s.id).contains("done"));

    // The same limit with a small allocation: no OOM, no false report.
    let mut s = spec(&d, "oom-1-p0", &["sh", "-c", "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo done"]);
    s.memory_bytes = 32 << 20;
    bounded("run", 30, c.run(&s)).await.expect("run");
    let exit = bounded("wait", 60, c.wait(&s.id)).await.expect("wait");
    assert_eq!((exit.code, exit.oom_killed), (0, false), "log {:?}", read_log(&d, &s.id));
    assert_eq!(c.cgroup_oom_kills(&s.id), Some(0));
    assert!(!c.oom_event_seen(&s.id));
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert_eq!(read_log(&d, &s.id), "done\n");

    // A SIGKILL that is not the OOM killer's is not an OOM kill.
    let mut s = spec(&d, "oom-2-p0", &["sleep", "1000"]);
    s.memory_bytes = 32 << 20;
    bounded("run", 30, c.run(&s)).await.expect("run");
    let exit = bounded("stop", 30, c.stop(&s.id, Duration::ZERO)).await.expect("stop").expect("was running");
    assert_eq!((exit.code, exit.oom_killed), (137, false));
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_limits_are_in_the_host_cgroup() {
    let d = bounded("starting containerd", 60, TestDaemon::start("cgroup")).await;
    let c = d.client().await;
    let mut s = spec(&d, "cpu-0-p0", &["sleep", "1000"]);
    s.cpu_millis = 500;
    s.memory_bytes = 64 << 20;
    let pid = bounded("run", 30, c.run(&s)).await.expect("run");

    assert_eq!(c.cgroup_path(&s.id), format!("/omega/{}/{}", d.namespace, s.id));
    let cpu_dir = c.cgroup_dir("cpu", &s.id).expect("cpu cgroup");
    eprintln!("cpu cgroup: {}", cpu_dir.display());
    if std::path::Path::new("/sys/fs/cgroup/cpu").is_dir() {
        // This host (cgroup v1): the path the spec set, under the cpu hierarchy.
        assert_eq!(cpu_dir, std::path::Path::new("/sys/fs/cgroup/cpu/omega").join(&d.namespace).join(&s.id));
    }
    assert_eq!(read_cgroup(&c, "cpu", &s.id, "cpu.cfs_quota_us"), "50000");
    assert_eq!(read_cgroup(&c, "cpu", &s.id, "cpu.cfs_period_us"), "100000");
    assert_eq!(read_cgroup(&c, "cpu", &s.id, "cpu.shares"), "512");
    assert_eq!(read_cgroup(&c, "memory", &s.id, "memory.limit_in_bytes"), (64u64 << 20).to_string());
    if c.cgroup_dir("memory", &s.id).is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists()) {
        // Swap accounting is on (it is here): memory+swap is held to the same limit.
        assert_eq!(read_cgroup(&c, "memory", &s.id, "memory.memsw.limit_in_bytes"), (64u64 << 20).to_string());
    }
    let procs = read_cgroup(&c, "cpu", &s.id, "cgroup.procs");
    assert!(procs.lines().any(|p| p.trim() == pid.to_string()), "pid {pid} not in cgroup.procs {procs:?}");

    bounded("stop", 30, c.stop(&s.id, Duration::ZERO)).await.expect("stop");
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert!(!cpu_dir.exists(), "the cgroup goes with the task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_grace_then_remove_leaves_nothing() {
    let d = bounded("starting containerd", 60, TestDaemon::start("stop")).await;
    let c = d.client().await;
    let grace = Duration::from_secs(2);

    // `sleep` as the container's pid 1 ignores SIGTERM (no handler): SIGKILL after the grace period.
    let s = spec(&d, "stop-0-p0", &["sleep", "1000"]);
    bounded("run", 30, c.run(&s)).await.expect("run");
    let t0 = Instant::now();
    let exit = bounded("stop", 30, c.stop(&s.id, grace)).await.expect("stop").expect("it was running");
    let took = t0.elapsed();
    eprintln!("stop of a SIGTERM-ignoring container with grace {grace:?}: {took:?}, {exit:?}");
    assert!(took >= grace && took < grace + Duration::from_secs(5), "took {took:?}");
    assert_eq!((exit.code, exit.oom_killed), (137, false));
    // The exit stays readable until remove.
    assert_eq!(bounded("wait", 10, c.wait(&s.id)).await.expect("wait").code, 137);

    // A process that handles SIGTERM exits within the grace period with its own status.
    let s2 = spec(&d, "stop-1-p0", &["sh", "-c", "trap 'echo term; exit 3' TERM; while :; do sleep 0.1; done"]);
    bounded("run", 30, c.run(&s2)).await.expect("run");
    tokio::time::sleep(Duration::from_millis(300)).await; // let sh install its trap
    let t0 = Instant::now();
    let exit = bounded("stop", 30, c.stop(&s2.id, Duration::from_secs(10))).await.expect("stop").expect("running");
    eprintln!("stop of a SIGTERM-handling container: {:?}, {exit:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(exit.code, 3);

    // Stopping what is not running is None; removing is idempotent and leaves nothing.
    assert_eq!(bounded("stop", 10, c.stop(&s.id, grace)).await.expect("stop stopped"), None);
    for id in [&s.id, &s2.id] {
        bounded("remove", 30, c.remove(id)).await.expect("remove");
        bounded("remove", 30, c.remove(id)).await.expect("remove again");
        assert_eq!(bounded("stop", 10, c.stop(id, grace)).await.expect("stop removed"), None);
        assert!(matches!(bounded("wait", 10, c.wait(id)).await, Err(Error::NotFound { .. })));
    }
    assert_eq!(read_log(&d, &s2.id), "term\n");
    assert!(bounded("list", 10, c.list()).await.expect("list").is_empty());
    assert_eq!(d.ctr(&["tasks", "ls", "-q"]).trim(), "");
    assert_eq!(d.ctr(&["containers", "ls", "-q"]).trim(), "");
    let keys = d.snapshot_keys();
    assert!(!keys.contains(&s.id) && !keys.contains(&s2.id), "snapshots left: {keys:?}");
    assert_eq!(d.ctr(&["leases", "ls", "-q"]).trim(), "", "no lease left");
    bounded("remove", 10, c.remove("never-existed")).await.expect("removing nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_containers_with_labels_and_run_is_idempotent() {
    let d = bounded("starting containerd", 60, TestDaemon::start("list")).await;
    let c = d.client().await;
    let mut ids = vec![];
    for i in 0..2 {
        let mut s = spec(&d, &format!("web-{i}-p0"), &["sleep", "1000"]);
        s.labels = BTreeMap::from([
            ("omega.job".to_string(), "web".to_string()),
            ("omega.index".to_string(), i.to_string()),
            ("omega.placement".to_string(), "0".to_string()),
        ]);
        let pid = bounded("run", 30, c.run(&s)).await.expect("run");
        ids.push((s, pid));
    }

    // A client made after an "agent restart" sees both, running, with their pids and labels.
    let fresh = d.client().await;
    let listed = bounded("list", 10, fresh.list()).await.expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    for ((s, pid), info) in ids.iter().zip(&listed) {
        assert_eq!(info.id, s.id);
        assert!(info.running, "{listed:?}");
        assert_eq!(info.pid, Some(*pid));
        assert_eq!(info.labels, s.labels);
    }

    // run() leaves a running container alone...
    match bounded("run", 30, fresh.run(&ids[0].0)).await {
        Err(Error::AlreadyRunning { id, pid }) => assert_eq!((id, pid), (ids[0].0.id.clone(), ids[0].1)),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    // ...and replaces one that has exited.
    bounded("stop", 30, fresh.stop(&ids[1].0.id, Duration::ZERO)).await.expect("stop");
    let listed = bounded("list", 10, fresh.list()).await.expect("list");
    assert!(listed[0].running && !listed[1].running, "{listed:?}");
    let new_pid = bounded("run", 30, fresh.run(&ids[1].0)).await.expect("re-run an exited container");
    assert_ne!(new_pid, ids[1].1);
    let listed = bounded("list", 10, c.list()).await.expect("list");
    assert!(listed.iter().all(|i| i.running), "{listed:?}");
    assert_eq!(listed[1].pid, Some(new_pid));

    for (s, _) in &ids {
        bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    }
    assert!(bounded("list", 10, c.list()).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_missing_and_imported_without_unpacking() {
    let d = bounded("starting containerd", 60, TestDaemon::start_empty("images")).await;
    let c = d.client().await;

    let err = bounded("ensure_image", 10, c.ensure_image(IMAGE)).await.expect_err("no image yet");
    let message = err.to_string();
    eprintln!("missing image: {message}");
    assert!(matches!(err, Error::ImageNotFound { .. }));
    assert!(message.contains("images import") && message.contains(&d.namespace), "{message}");
    let err = bounded("run", 10, c.run(&spec(&d, "img-0-p0", &["true"]))).await.expect_err("no image");
    assert!(matches!(err, Error::ImageNotFound { .. }), "{err}");

    // Imported without unpacking: ensure_image unpacks it into the client's snapshotter itself, and labels it
    // so containerd's garbage collector keeps the layers once the unpack lease is gone.
    d.import(IMAGE, Unpack::No);
    assert!(d.snapshot_keys().is_empty());
    bounded("ensure_image", 30, c.ensure_image(IMAGE)).await.expect("unpack");
    assert_eq!(d.snapshot_keys().len(), 1, "one layer, one committed snapshot");
    d.ctr(&["leases", "create", "--id", "gc-trigger"]);
    d.ctr(&["leases", "rm", "--sync", "gc-trigger"]); // a synchronous garbage collection
    assert_eq!(d.snapshot_keys().len(), 1, "the unpacked layer survives garbage collection");
    bounded("ensure_image", 10, c.ensure_image(IMAGE)).await.expect("already unpacked");

    let s = spec(&d, "img-1-p0", &["echo", "unpacked"]);
    bounded("run", 30, c.run(&s)).await.expect("run");
    assert_eq!(bounded("wait", 30, c.wait(&s.id)).await.expect("wait").code, 0);
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert_eq!(read_log(&d, &s.id), "unpacked\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_survives_a_containerd_restart() {
    let mut d = bounded("starting containerd", 60, TestDaemon::start("restart")).await;
    let c = d.client().await;
    let s = spec(&d, "restart-0-p0", &["sh", "-c", "sleep 2; echo slept; exit 7"]);
    bounded("run", 30, c.run(&s)).await.expect("run");
    // Two callers waiting at once share one tasks.wait; both must get the exit across the restart.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            let id = s.id.clone();
            tokio::spawn(async move { c.wait(&id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    bounded("restarting containerd", 60, d.restart()).await;
    eprintln!("containerd restarted in {:?}", t0.elapsed());

    // The shim kept the container running; the client's channel reconnects and the wait is retried.
    let listed = bounded("list", 10, c.list()).await.expect("list after restart");
    assert!(listed.len() == 1 && listed[0].running, "{listed:?}");
    for waiter in waiting {
        let exit = bounded("wait", 30, waiter).await.expect("join").expect("wait across the restart");
        assert_eq!((exit.code, exit.oom_killed), (7, false));
    }
    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert_eq!(read_log(&d, &s.id), "slept\n");
    assert!(bounded("list", 10, c.list()).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_in_the_container_and_the_container_shares_the_nodes_network() {
    let d = bounded("starting containerd", 60, TestDaemon::start("exec")).await;
    let c = d.client().await;
    let s = spec(&d, "exec-0-p0", &["sh", "-c", "echo inside > /tmp/mark && exec sleep 3600"]);
    bounded("run", 30, c.run(&s)).await.expect("run");
    let out = d.dir.path().join("exec.out");
    let cmd = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let exec = |args: Vec<String>, timeout: Duration| {
        let (c, id, out) = (c.clone(), s.id.clone(), out.clone());
        async move { bounded("exec", 30, c.exec(&id, &args, timeout, &out)).await }
    };
    // Its file system, and its output read back (the end of it), with its exit status.
    let mark = exec(
        cmd(&["sh", "-c", "until [ -s /tmp/mark ]; do sleep 0.05; done; cat /tmp/mark; exit 3"]),
        Duration::from_secs(20),
    );
    let done = mark.await.expect("exec");
    assert_eq!((done.code, done.output.as_str()), (Some(3), "inside"));
    assert!(!out.exists(), "the output file is removed once read");
    assert_eq!(exec(cmd(&["true"]), Duration::from_secs(20)).await.expect("exec").code, Some(0));
    // Past its timeout it is killed.
    let slow = exec(cmd(&["sleep", "60"]), Duration::from_millis(300)).await.expect("exec");
    assert_eq!(slow.code, None);
    // A command that cannot start is an error.
    let err = exec(cmd(&["/no/such/program"]), Duration::from_secs(20)).await.expect_err("no such program");
    eprintln!("exec of a missing program: {err}");

    // The node's network: a listener on the node's loopback is reachable from inside, and names resolve with
    // the node's resolver configuration.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("its address").port();
    let accepted = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = listener.accept().expect("a connection from the container");
        let mut got = String::new();
        let _ = conn.read_to_string(&mut got);
        got
    });
    let sent = exec(cmd(&["sh", "-c", &format!("echo hello | nc 127.0.0.1 {port}")]), Duration::from_secs(20));
    assert_eq!(sent.await.expect("exec").code, Some(0));
    assert_eq!(accepted.join().expect("the accepting thread").trim(), "hello");
    let resolv = exec(cmd(&["cat", "/etc/resolv.conf"]), Duration::from_secs(20)).await.expect("exec");
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!resolv.output.is_empty() && host.trim().ends_with(&resolv.output), "the node's resolv.conf: {resolv:?}");
    let write = exec(cmd(&["sh", "-c", "echo x >> /etc/hosts"]), Duration::from_secs(20)).await.expect("exec");
    assert_ne!(write.code, Some(0), "the node's files are bound read-only: {write:?}");

    bounded("remove", 30, c.remove(&s.id)).await.expect("remove");
    assert!(bounded("list", 10, c.list()).await.expect("list").is_empty());
}
