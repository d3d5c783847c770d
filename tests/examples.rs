//! What `deploy/` hands to people works as its comments say: the example job files parse, round-trip and place
//! as described; `deploy/etcd/three-member-local.sh` forms a healthy three-member etcd on loopback that speaks
//! TLS only (and the gRPC proxy script serves in front of it over TLS, and refuses to once etcd's
//! authentication is on) and leaves nothing behind; the systemd units and etcd configuration files only use
//! flags the programs have, and TLS.

use etcd_client::{Txn, TxnOp};
use omega::cell_state::{CellSnapshot, Versioned};
use omega::job_spec::{parse_job, to_yaml};
use omega::keys::Keys;
use omega::model::{Allocation, Job, JobKind, Liveness, Node, RestartMode, Task, TaskState};
use omega::placement::{place, Placement, PlacementOptions};
use omega::resources::Resources;
use omega::store::{Store, StoreOptions};
use omega::tls::TlsFiles;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MI: u64 = 1 << 20;
const GI: u64 = 1 << 30;

/// The repository's root (this test belongs to the crate in `tests/`).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---------------------------------------------------------------------------------------------------------
// deploy/examples

/// Every `deploy/examples/*.yaml`, parsed, by file stem.
fn examples() -> BTreeMap<String, (String, Job)> {
    let dir = repo().join("deploy/examples");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = format!("deploy/examples/{}", path.file_name().unwrap().to_string_lossy());
        let text = std::fs::read_to_string(&path).unwrap();
        let job = parse_job(&name, &text).unwrap_or_else(|e| panic!("{e}"));
        out.insert(path.file_stem().unwrap().to_string_lossy().into_owned(), (text, job));
    }
    out
}

#[test]
fn example_jobs_parse_and_round_trip() {
    let all = examples();
    let names: Vec<&str> = all.keys().map(String::as_str).collect();
    for expected in ["api", "filler", "gang", "hello", "oom", "urgent", "web", "web-ha"] {
        assert!(names.contains(&expected), "deploy/examples/{expected}.yaml is missing; found {names:?}");
    }
    for (stem, (text, job)) in &all {
        assert_eq!(&job.id, stem, "{stem}.yaml: the job is named like its file");
        assert!(
            text.starts_with("# ") && text.contains("omctl "),
            "{stem}.yaml starts with a comment saying what it shows and which omctl commands to try"
        );
        assert_eq!(job.image, "omega.local/busybox:latest", "{stem}.yaml: the local cell's busybox image");
        assert!(
            job.resources.cpu_millis <= 500 && job.resources.memory_bytes <= 64 * MI,
            "{stem}.yaml: small enough for a laptop-sized node: {:?}",
            job.resources
        );
        let yaml = to_yaml(job);
        let mut back = parse_job("rendered.yaml", &yaml).unwrap_or_else(|e| panic!("{stem}: {e}\n{yaml}"));
        back.submitted_at_ms = job.submitted_at_ms;
        assert_eq!(&back, job, "{stem}.yaml does not round-trip through to_yaml:\n{yaml}");
    }

    let job = |name: &str| &all[name].1;
    let hello = job("hello");
    assert_eq!((hello.kind, hello.tasks, hello.duration_ms), (JobKind::Batch, 3, Some(3000)));
    assert_eq!(hello.restart.mode, RestartMode::Never, "hello's tasks exit 0 and stay succeeded");
    assert_eq!(hello.env.get("GREETING").map(String::as_str), Some("hello"));
    assert!(hello.command.join(" ").contains("$GREETING"), "{:?}", hello.command);

    let gang = job("gang");
    assert_eq!((gang.kind, gang.tasks, gang.gang, gang.duration_ms), (JobKind::Batch, 4, true, Some(10_000)));

    let web = job("web");
    assert_eq!((web.kind, web.tasks, web.anti_affinity), (JobKind::Service, 3, false));
    assert_eq!(web.spread.as_deref(), Some("zone"));
    assert_eq!(web.restart.mode, RestartMode::Always);
    assert_eq!(web.command, ["sh", "-c", "while true; do date; sleep 5; done"]);

    let ha = job("web-ha");
    assert_eq!((ha.kind, ha.tasks, ha.anti_affinity), (JobKind::Service, 3, true));
    assert!(all["web-ha"].0.contains("only one replica fits"), "web-ha.yaml says what happens on one real node");

    let (urgent, filler) = (job("urgent"), job("filler"));
    assert_eq!((urgent.kind, urgent.priority), (JobKind::Service, 100));
    assert_eq!(filler.kind, JobKind::Batch);
    assert!(filler.priority < urgent.priority);
    assert!(all["urgent"].0.contains("omctl job urgent") && all["urgent"].0.contains("omctl job filler"));

    let oom = job("oom");
    assert_eq!(oom.kind, JobKind::Batch);
    assert_eq!(oom.resources.memory_bytes, 32 * MI);
    assert_eq!(oom.restart.mode, RestartMode::Never);
    // YAML's "\\0" is the two characters `\0`, which tr reads as the NUL byte.
    assert_eq!(oom.command, ["sh", "-c", r"x=$(head -c 100000000 /dev/zero | tr '\0' a); echo done"]);
}

/// A cell built by hand, as a scheduler's cache would hold it.
struct Cell {
    keys: Keys,
    snap: CellSnapshot,
    rev: i64,
}

impl Cell {
    fn new() -> Self {
        Cell { keys: Keys::default(), snap: CellSnapshot::default(), rev: 1 }
    }

    fn put<T: serde::Serialize>(&mut self, key: String, value: &T) {
        self.rev += 1;
        self.snap.apply_put_bytes(&self.keys, key.as_bytes(), &serde_json::to_vec(value).unwrap(), self.rev);
    }

    fn node(&mut self, name: &str, capacity: Resources, zone: Option<&str>) {
        let labels: BTreeMap<String, String> = zone.map(|z| ("zone".to_string(), z.to_string())).into_iter().collect();
        let node = Node { name: name.into(), capacity, labels, address: None, registered_at_ms: 0 };
        self.put(self.keys.node(name), &node);
        self.put(self.keys.alloc(name), &Allocation::empty(name, capacity));
        self.put(self.keys.live(name), &Liveness { node: name.into(), lease: "1".into(), since_ms: 0 });
    }

    /// Submits `job` and places it as its scheduler would (one decision); the claims start running.
    fn submit(&mut self, job: &Job) -> Placement {
        self.put(self.keys.job(&job.id), job);
        for i in 0..job.tasks {
            self.put(self.keys.task(&omega::keys::task_id(&job.id, i)), &Task::pending(job, i));
        }
        let pending: Vec<Versioned<Task>> = self.snap.tasks_of(job).cloned().collect();
        let options = match job.kind {
            JobKind::Batch => PlacementOptions::batch(),
            JobKind::Service => PlacementOptions::service(),
        };
        let placement = place(&self.snap, job, &pending, &options, &mut StdRng::seed_from_u64(7));
        for claim in &placement.claims {
            for victim in &claim.preempts {
                let mut t = (*victim.value).clone();
                let node = t.node.take().expect("a victim is placed");
                t.state = TaskState::Pending;
                self.put(self.keys.task(&t.id), &t);
                let mut ledger = (*self.snap.allocations.get(node.as_str()).unwrap().value).clone();
                ledger.used = Resources::new(
                    ledger.used.cpu_millis - t.resources.cpu_millis,
                    ledger.used.memory_bytes - t.resources.memory_bytes,
                );
                ledger.tasks -= 1;
                self.put(self.keys.alloc(&node), &ledger);
            }
            let mut t = (*claim.task.value).clone();
            t.state = TaskState::Running;
            t.node = Some(claim.node.clone());
            self.put(self.keys.task(&t.id), &t);
            let mut ledger = (*self.snap.allocations.get(claim.node.as_str()).unwrap().value).clone();
            ledger.add(t.resources);
            self.put(self.keys.alloc(&claim.node), &ledger);
        }
        placement
    }
}

/// A laptop-sized local cell: one node of 2 cores and 8 GiB, without a zone of its own.
fn laptop() -> Cell {
    let mut cell = Cell::new();
    cell.node("laptop", Resources::new(2000, 8 * GI), None);
    cell
}

/// `omega-agent --simulate 3` with its defaults: 16 cores and 64 GiB each, zones zone-0..2.
fn simulated() -> Cell {
    let mut cell = Cell::new();
    for i in 0..3 {
        cell.node(&format!("sim-{i}"), Resources::new(16_000, 64 * GI), Some(&format!("zone-{i}")));
    }
    cell
}

#[test]
fn example_jobs_place_as_their_comments_say() {
    let all = examples();
    let job = |name: &str| all[name].1.clone();

    // hello, gang, web and oom each fit the laptop whole.
    for name in ["hello", "gang", "web", "oom"] {
        let p = laptop().submit(&job(name));
        assert!(p.unplaced.is_empty(), "{name} fits a 2-core node: {:?}", p.explanation.map(|e| e.to_string()));
    }

    // web-ha: anti-affinity lets one replica onto the laptop; the simulated nodes take one each, one per zone.
    let p = laptop().submit(&job("web-ha"));
    assert_eq!((p.claims.len(), p.unplaced.len()), (1, 2));
    let why = p.explanation.unwrap();
    assert_eq!(why.codes().get("anti_affinity"), Some(&1));
    assert!(all["web-ha"].0.contains(&format!("`{why}`")), "web-ha.yaml quotes the reason: {why}");
    let p = simulated().submit(&job("web-ha"));
    let nodes: BTreeSet<&str> = p.claims.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "web-ha on simulated nodes: three different nodes");
    // web: spread over the simulated zones too.
    let p = simulated().submit(&job("web"));
    let nodes: BTreeSet<&str> = p.claims.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "web spreads over the three zones");

    // urgent alone fits without preempting anything.
    let p = laptop().submit(&job("urgent"));
    assert_eq!(p.claims.len(), 2);
    assert!(p.claims.iter().all(|c| c.preempts.is_empty()));

    // filler takes all of the laptop's CPU (the rest of its tasks wait), then urgent can only preempt.
    let mut cell = laptop();
    let filler = cell.submit(&job("filler"));
    assert_eq!(filler.claims.len(), 20, "2 cores / 100m");
    let why = filler.explanation.unwrap();
    assert_eq!(why.codes().get("insufficient_cpu"), Some(&1));
    assert!(all["filler"].0.contains(&format!("`{why}`")), "filler.yaml quotes the reason: {why}");
    let urgent = cell.submit(&job("urgent"));
    assert_eq!(urgent.claims.len(), 2, "urgent is placed: {:?}", urgent.explanation.map(|e| e.to_string()));
    let victims: BTreeSet<String> =
        urgent.claims.iter().flat_map(|c| c.preempts.iter().map(|v| v.value.id.clone())).collect();
    assert_eq!(victims.len(), 10, "5 filler tasks of 100m make room for each 500m replica: {victims:?}");
    assert!(victims.iter().all(|v| v.starts_with("filler/")));
}

// ---------------------------------------------------------------------------------------------------------
// deploy/etcd

/// `count` consecutive loopback ports that are free now, below the ephemeral range (where etcd's own client
/// connections would otherwise take them).
fn free_port_run(count: u16) -> u16 {
    let seed = u32::from(std::process::id() as u16);
    for attempt in 0..200u32 {
        let base = 20_000 + (((seed * 37 + attempt * 101) % 1_200) * 10) as u16;
        if (base..base + count).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no {count} consecutive free loopback ports between 20000 and 32000");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("bash").arg("-c").arg(format!("kill -s {signal} -- -{pgid}")).stderr(Stdio::null()).status();
}

/// A process that is running (not gone, not a zombie), with the command line it runs.
fn running_cmdline(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&cmdline).replace('\0', " "))
}

/// Running processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Some(cmdline) = running_cmdline(pid) {
            if cmdline.contains(needle) {
                out.push((pid, cmdline));
            }
        }
    }
    out
}

/// A child started in a process group of its own, killed with its whole group on drop (whatever the test did).
struct Group {
    child: Child,
    /// On drop, processes naming this directory are killed too, and it is removed.
    dir: Option<PathBuf>,
}

impl Group {
    fn spawn(mut cmd: Command) -> Group {
        cmd.process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Group { child, dir: None }
    }

    fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the group leader to exit; its exit status if it did.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // While the leader is unreaped its pid, and so the group id, cannot belong to anyone else.
        if self.child.try_wait().ok().flatten().is_none() {
            signal_group(self.pgid(), "KILL");
            let _ = self.child.wait();
        }
        // Members that outlived the script: only processes that still name its directory, never a reused pid.
        if let Some(dir) = &self.dir {
            for (pid, _) in processes_mentioning(&dir.to_string_lossy()) {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).stderr(Stdio::null()).status();
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What three-member-local.sh printed.
#[derive(Default, Debug)]
struct Printed {
    data_dir: Option<PathBuf>,
    certs: Option<PathBuf>,
    pids: Vec<u32>,
    endpoints: Vec<String>,
}

impl Printed {
    /// The TLS files of one identity in the script's certificate directory.
    fn tls(&self, name: &str) -> TlsFiles {
        let dir = self.certs.as_ref().expect("CERTS printed before ENDPOINTS");
        TlsFiles {
            ca: dir.join("ca.pem"),
            identity: Some((dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))),
        }
    }

    /// etcdctl's flags for that identity.
    fn etcdctl_tls(&self, name: &str) -> Vec<String> {
        let f = self.tls(name);
        let (cert, key) = f.identity.unwrap();
        vec![
            format!("--cacert={}", f.ca.display()),
            format!("--cert={}", cert.display()),
            format!("--key={}", key.display()),
        ]
    }
}

async fn connect_tls(endpoints: &[String], tls: TlsFiles) -> omega::Result<Store> {
    Store::connect_with(endpoints, Keys::default(), StoreOptions::with_tls(Some(tls)), Duration::from_secs(15)).await
}

/// Reads the script's `KEY=value` lines until ENDPOINTS (bounded by `limit`).
fn read_until_endpoints(lines: &mpsc::Receiver<String>, group: &mut Group, stderr: &Path, limit: Duration) -> Printed {
    let deadline = Instant::now() + limit;
    let mut printed = Printed::default();
    while printed.endpoints.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => continue,
            Err(e) => panic!(
                "three-member-local.sh printed no endpoints within {limit:?} ({e:?}); so far {printed:?}; its \
                 stderr:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            ),
        };
        if let Some(dir) = line.strip_prefix("DATA_DIR=") {
            printed.data_dir = Some(PathBuf::from(dir));
            group.dir = printed.data_dir.clone();
        } else if let Some(dir) = line.strip_prefix("CERTS=") {
            printed.certs = Some(PathBuf::from(dir));
        } else if let Some(pids) = line.strip_prefix("PIDS=") {
            printed.pids = pids.split_whitespace().map(|p| p.parse().unwrap()).collect();
        } else if let Some(endpoints) = line.strip_prefix("ENDPOINTS=") {
            printed.endpoints = endpoints.split(',').map(str::to_string).collect();
        }
    }
    printed
}

fn etcdctl(endpoints: &[String], tls: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["--dial-timeout=2s", "--command-timeout=5s"])
        .args(tls)
        .args(args)
        .output()
        .expect("run etcdctl (Debian: etcd-client)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn three_member_local_forms_a_healthy_cluster_and_cleans_up() {
    let scratch = tempfile::tempdir().unwrap();
    let stderr_path = scratch.path().join("three-member-local.stderr");
    let base = free_port_run(6);
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/etcd/three-member-local.sh"))
        .env("BASE_PORT", base.to_string())
        .env("WAIT_SECS", "45")
        .env("TMPDIR", scratch.path())
        // etcd's authentication off at first, so that the proxy can be shown passing requests through; the
        // test turns it on itself later with grant-roles.sh, as the script does without NO_AUTH.
        .env("NO_AUTH", "1")
        .env_remove("KEEP_DATA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut script = Group::spawn(cmd);
    let stdout = script.child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let printed = read_until_endpoints(&lines, &mut script, &stderr_path, Duration::from_secs(60));
    let data_dir = printed.data_dir.clone().expect("DATA_DIR printed before ENDPOINTS");
    assert!(data_dir.starts_with(scratch.path()), "{data_dir:?} is under TMPDIR");
    assert_eq!(printed.pids.len(), 3, "{printed:?}");
    let expected: Vec<String> = (0..3).map(|i| format!("https://127.0.0.1:{}", base + 2 * i)).collect();
    assert_eq!(printed.endpoints, expected, "three loopback https client URLs from BASE_PORT");
    let certs = printed.certs.clone().expect("CERTS printed");
    assert!(certs.starts_with(&data_dir), "{certs:?} is under the data directory");
    for pid in &printed.pids {
        let cmdline = running_cmdline(*pid).unwrap_or_else(|| panic!("member pid {pid} is not running"));
        assert!(cmdline.contains("--config-file"), "{cmdline}");
    }

    // etcdctl agrees: three healthy endpoints, over TLS with a certificate of the cell; without one, or in
    // plain text, etcd answers nobody.
    let (ok, out) = etcdctl(&printed.endpoints, &printed.etcdctl_tls("root"), &["endpoint", "health"]);
    assert!(ok && out.matches("is healthy").count() == 3, "etcdctl endpoint health:\n{out}");
    let ca_only = [format!("--cacert={}", certs.join("ca.pem").display())];
    let (ok, out) = etcdctl(&printed.endpoints[..1], &ca_only, &["get", "/x"]);
    assert!(!ok, "a client without a certificate was served: {out}");
    let plain = vec![printed.endpoints[0].replacen("https://", "http://", 1)];
    let (ok, out) = etcdctl(&plain, &[], &["get", "/x"]);
    assert!(!ok, "a plain-text client was served: {out}");
    // The peers too: each member's peer URL is https.
    for n in 1..=3 {
        let config = std::fs::read_to_string(data_dir.join(format!("etcd-{n}.yaml"))).unwrap();
        assert!(config.contains("client-cert-auth: true") && !config.contains("http://"), "{config}");
    }

    let proxy_port = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut proxy = None;
    rt.block_on(async {
        let limit = Duration::from_secs(10);
        // One client over all three members, and one per member (as etcd's root user).
        let all = tokio::time::timeout(limit, connect_tls(&printed.endpoints, printed.tls("root")))
            .await
            .expect("connect in time")
            .expect("connect to the three members");
        let members = all.client().cluster_client().member_list().await.unwrap();
        let names: BTreeSet<&str> = members.members().iter().map(|m| m.name()).collect();
        assert_eq!(names, BTreeSet::from(["omega-1", "omega-2", "omega-3"]));
        let urls: BTreeSet<String> = members.members().iter().flat_map(|m| m.client_urls().to_vec()).collect();
        assert_eq!(urls, expected.iter().cloned().collect::<BTreeSet<_>>(), "members advertise loopback only");

        let mut kv = all.client().kv_client();
        kv.put("/omega-test/three", "members", None).await.unwrap();
        for endpoint in &printed.endpoints {
            let one = tokio::time::timeout(limit, connect_tls(std::slice::from_ref(endpoint), printed.tls("root")))
                .await
                .expect("connect in time")
                .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
            let got = one.client().kv_client().get("/omega-test/three", None).await.unwrap();
            assert_eq!(got.kvs()[0].value_str().unwrap(), "members", "read through {endpoint}");
        }

        // The configuration files' max-txn-ops: 1024 is in force (etcd's default, 128, would refuse this).
        let puts: Vec<TxnOp> = (0..600).map(|i| TxnOp::put(format!("/omega-test/txn/{i:03}"), "x", None)).collect();
        let txn = kv.txn(Txn::new().and_then(puts)).await.expect("a 600-operation transaction");
        assert!(txn.succeeded());

        // grpc-proxy.sh in front of the members, TLS on both sides: writes, reads and watches pass through.
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("deploy/etcd/grpc-proxy.sh"))
            .env("ENDPOINTS", printed.endpoints.join(","))
            .env("PORT", proxy_port.to_string())
            .env("TLS_DIR", &certs)
            .env("PROXY_NAME", "local")
            .env_remove("METRICS_PORT")
            .env_remove("PLAIN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("grpc-proxy.stderr")).unwrap());
        proxy = Some(Group::spawn(cmd));
        let via = vec![format!("https://127.0.0.1:{proxy_port}")];
        let proxied = connect_tls(&via, printed.tls("omega-scheduler")).await.unwrap_or_else(|e| {
            panic!(
                "connect through the proxy: {e}; its stderr:\n{}",
                std::fs::read_to_string(scratch.path().join("grpc-proxy.stderr")).unwrap_or_default()
            )
        });
        let got = proxied.client().kv_client().get("/omega-test/three", None).await.unwrap();
        assert_eq!(got.kvs()[0].value_str().unwrap(), "members");
        let mut watch = proxied.client().watch_client().watch("/omega-test/watched", None).await.unwrap();
        kv.put("/omega-test/watched", "seen", None).await.unwrap();
        let event = tokio::time::timeout(limit, async {
            loop {
                let message = watch.message().await.unwrap().expect("the watch stays open");
                if let Some(event) = message.events().first() {
                    return event.kv().unwrap().value_str().unwrap().to_string();
                }
            }
        })
        .await
        .expect("the write is seen through the proxy's watch in time");
        assert_eq!(event, "seen");
    });
    drop(rt);
    let mut proxy = proxy.unwrap();
    signal_group(proxy.pgid(), "TERM");
    assert!(proxy.wait_exit(Duration::from_secs(10)).is_some(), "the proxy stops on SIGTERM");
    drop(proxy);

    // Authentication on, as the script does without NO_AUTH: each identity is held to its role, and the proxy
    // script refuses to start (etcd 3.4's proxy cannot act as an etcd user; everything through it would fail).
    let out = Command::new("bash")
        .arg(repo().join("deploy/tls/grant-roles.sh"))
        .arg(&certs)
        .arg(printed.endpoints.join(","))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grant-roles.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let scheduler = printed.etcdctl_tls("omega-scheduler");
    let (ok, out) = etcdctl(&printed.endpoints, &scheduler, &["get", "/omega/", "--prefix", "--keys-only"]);
    assert!(ok, "the scheduler reads the cell: {out}");
    let (ok, out) = etcdctl(&printed.endpoints, &scheduler, &["put", "/omega/cell/nodes/x", "{}"]);
    assert!(!ok && out.contains("permission denied"), "the scheduler registered a node: {out}");
    let (ok, out) =
        etcdctl(&printed.endpoints, &printed.etcdctl_tls("viewer-ui"), &["put", "/omega/cell/jobs/x", "{}"]);
    assert!(!ok && out.contains("permission denied"), "a viewer wrote a job: {out}");
    let out = Command::new("bash")
        .arg(repo().join("deploy/etcd/grpc-proxy.sh"))
        .env("ENDPOINTS", printed.endpoints.join(","))
        .env("PORT", free_port().to_string())
        .env("TLS_DIR", &certs)
        .env("PROXY_NAME", "local")
        .env_remove("PLAIN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("authentication on"), "grpc-proxy.sh with auth on: {text}");

    // Ctrl-C: SIGINT to the script's whole process group. It stops all three members and removes its directory.
    signal_group(script.pgid(), "INT");
    let status = script.wait_exit(Duration::from_secs(30));
    assert!(status.is_some(), "the script exits within 30 s of Ctrl-C");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u32> = printed.pids.iter().copied().filter(|p| running_cmdline(*p).is_some()).collect();
        let mentioning = processes_mentioning(&data_dir.to_string_lossy());
        if left.is_empty() && mentioning.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running after the script exited: {left:?} {mentioning:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!data_dir.exists(), "the script removes {}", data_dir.display());
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(stderr.contains("stopped; removed"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------------------
// deploy/systemd and the etcd configuration files

/// The `ExecStart=` command of a unit file, continuation lines joined.
fn exec_start(unit: &str) -> String {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
    let mut lines = text.lines().skip_while(|l| !l.starts_with("ExecStart="));
    let mut command = String::new();
    for line in lines.by_ref() {
        let (body, more) = match line.trim_end().strip_suffix('\\') {
            Some(body) => (body, true),
            None => (line, false),
        };
        command.push_str(body.trim_start_matches("ExecStart="));
        command.push(' ');
        if !more {
            break;
        }
    }
    assert!(!command.trim().is_empty(), "{unit} has an ExecStart=");
    command
}

/// The `--flags` a command line uses (`--flag=value` and `--flag value` alike).
fn flags(command: &str) -> BTreeSet<String> {
    command
        .split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split('=').next().unwrap().to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn units_use_only_flags_the_programs_have() {
    // The scheduler's and the agent's flags are their clap fields (`max_txn_ops` is `--max-txn-ops`).
    let scheduler_src = std::fs::read_to_string(repo().join("schedulers/src/config.rs")).unwrap();
    let agent_src = std::fs::read_to_string(repo().join("agent/src/main.rs")).unwrap();
    let scheduler = flags(&exec_start("omega-scheduler@.service"));
    for flag in ["kind", "instance", "metrics-addr", "max-txn-ops"] {
        assert!(scheduler.contains(flag), "omega-scheduler@.service passes --{flag}: {scheduler:?}");
    }
    for flag in &scheduler {
        let field = format!("pub {}:", flag.replace('-', "_"));
        assert!(scheduler_src.contains(&field), "omega-scheduler has no --{flag} (no `{field}` in config.rs)");
    }
    let controller_src = std::fs::read_to_string(repo().join("schedulers/src/bin/omega-controller.rs")).unwrap();
    let controller = flags(&exec_start("omega-controller.service"));
    assert!(controller.contains("instance"), "omega-controller.service passes --instance: {controller:?}");
    for flag in &controller {
        let field = format!("    {}:", flag.replace('-', "_"));
        assert!(controller_src.contains(&field), "omega-controller has no --{flag} (no `{field}`)");
    }
    let agent = flags(&exec_start("omega-agent.service"));
    for flag in ["containerd-socket", "namespace", "log-dir", "listen"] {
        assert!(agent.contains(flag), "omega-agent.service passes --{flag}: {agent:?}");
    }
    for flag in &agent {
        let field = format!("    {}:", flag.replace('-', "_"));
        assert!(agent_src.contains(&field), "omega-agent has no --{flag} (no `{field}` in agent/src/main.rs)");
    }

    // etcd's flags, and the configuration files' keys (which are its flags' names), against `etcd --help`.
    let help = Command::new("etcd").arg("--help").output().expect("run etcd --help (Debian: etcd-server)");
    let help = format!("{}{}", String::from_utf8_lossy(&help.stdout), String::from_utf8_lossy(&help.stderr));
    let etcd = flags(&exec_start("omega-etcd.service"));
    for flag in ["data-dir", "auto-compaction-mode", "auto-compaction-retention", "quota-backend-bytes", "max-txn-ops"]
    {
        assert!(etcd.contains(flag), "omega-etcd.service passes --{flag}: {etcd:?}");
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/omega-etcd.service")).unwrap();
    let env_flags = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment=ETCD_"))
        .map(|l| l.split('=').next().unwrap().to_lowercase().replace('_', "-"));
    for flag in etcd.iter().cloned().chain(env_flags) {
        assert!(help.contains(&format!("--{flag} ")), "etcd has no --{flag}");
    }
    for n in 1..=3 {
        let path = repo().join(format!("deploy/etcd/three-member/etcd-{n}.yaml"));
        let config: BTreeMap<String, serde_json::Value> =
            serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (key, value) in &config {
            // The config file's two nested sections hold the TLS flags, without and with `peer-`.
            let flag_prefix = match key.as_str() {
                "client-transport-security" => "",
                "peer-transport-security" => "peer-",
                _ => {
                    assert!(help.contains(&format!("--{key} ")), "{}: etcd has no --{key}", path.display());
                    continue;
                }
            };
            let section = value.as_object().unwrap_or_else(|| panic!("{}: {key} is a mapping", path.display()));
            for sub in section.keys() {
                assert!(
                    help.contains(&format!("--{flag_prefix}{sub} ")),
                    "{}: etcd has no --{flag_prefix}{sub}",
                    path.display()
                );
            }
            assert_eq!(section["client-cert-auth"], true, "{}: {key}", path.display());
            assert_eq!(section["cert-file"], "/etc/omega/tls/etcd.pem", "{}: {key}", path.display());
            assert_eq!(section["key-file"], "/etc/omega/tls/etcd-key.pem", "{}: {key}", path.display());
            assert_eq!(section["trusted-ca-file"], "/etc/omega/tls/ca.pem", "{}: {key}", path.display());
        }
        assert!(config.contains_key("client-transport-security") && config.contains_key("peer-transport-security"));
        for key in [
            "listen-client-urls",
            "advertise-client-urls",
            "listen-peer-urls",
            "initial-advertise-peer-urls",
            "initial-cluster",
        ] {
            let urls = config[key].as_str().unwrap();
            assert!(
                urls.contains("https://") && !urls.contains("http://"),
                "{}: {key} is https only: {urls}",
                path.display()
            );
        }
        assert_eq!(config["name"], format!("omega-{n}"));
        assert_eq!(config["listen-metrics-urls"], format!("http://10.0.0.{n}:2381"));
        assert_eq!(config["max-txn-ops"], 1024);
        assert_eq!(config["quota-backend-bytes"], 8u64 << 30);
        assert_eq!(config["auto-compaction-mode"], "revision");
        assert_eq!(config["initial-cluster-state"], "new");
    }

    // The systemd unit serves https with client certificates, between members too.
    for (var, value) in [
        ("ETCD_LISTEN_CLIENT_URLS", "https://127.0.0.1:2379"),
        ("ETCD_ADVERTISE_CLIENT_URLS", "https://127.0.0.1:2379"),
        ("ETCD_LISTEN_PEER_URLS", "https://127.0.0.1:2380"),
        ("ETCD_CERT_FILE", "/etc/omega/tls/etcd.pem"),
        ("ETCD_KEY_FILE", "/etc/omega/tls/etcd-key.pem"),
        ("ETCD_TRUSTED_CA_FILE", "/etc/omega/tls/ca.pem"),
        ("ETCD_CLIENT_CERT_AUTH", "true"),
        ("ETCD_PEER_CLIENT_CERT_AUTH", "true"),
        ("ETCD_PEER_CERT_ALLOWED_CN", "etcd"),
        // Metrics (and /health) for Prometheus, plain, on a port of their own.
        ("ETCD_LISTEN_METRICS_URLS", "http://127.0.0.1:2381"),
    ] {
        assert!(
            unit.lines().any(|l| l == format!("Environment={var}={value}")),
            "omega-etcd.service sets {var}={value}"
        );
    }

    // Each Omega unit is its own etcd user; the shared omega.env names etcd and its CA, and no identity (it
    // would override the units').
    let file = |name: &str| std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap();
    for (unit, cert, key) in [
        ("omega-scheduler@.service", "omega-scheduler.pem", "%d/etcd-key.pem"),
        ("omega-controller.service", "omega-controller.pem", "%d/etcd-key.pem"),
        ("omega-agent.service", "agent-%H.pem", "/etc/omega/tls/agent-%H-key.pem"),
    ] {
        let text = file(unit);
        let has = |line: String| text.lines().any(|l| l == line);
        assert!(has(format!("Environment=OMEGA_ETCD_CERT=/etc/omega/tls/{cert}")), "{unit} names its certificate");
        assert!(has(format!("Environment=OMEGA_ETCD_KEY={key}")), "{unit} names its key");
        if key.starts_with("%d/") {
            let component = cert.trim_end_matches(".pem");
            assert!(
                has(format!("LoadCredential=etcd-key.pem:/etc/omega/tls/{component}-key.pem")),
                "{unit} loads its key"
            );
        }
    }
    let env = file("omega.env");
    assert!(env.lines().any(|l| l == "OMEGA_ETCD=https://127.0.0.1:2379"), "omega.env: https");
    assert!(env.lines().any(|l| l == "OMEGA_ETCD_CACERT=/etc/omega/tls/ca.pem"), "omega.env: the CA");
    assert!(
        !env.lines().any(|l| l.starts_with("OMEGA_ETCD_CERT=") || l.starts_with("OMEGA_ETCD_KEY=")),
        "omega.env: no identity"
    );
}

/// deploy/examples/api-update/*.yaml are later versions of api.yaml: the same job, a change that replaces the
/// replicas (the command), and an update policy that reverts by itself.
#[test]
fn update_examples_are_versions_of_api() {
    let dir = repo().join("deploy/examples");
    let api = parse_job("api.yaml", &std::fs::read_to_string(dir.join("api.yaml")).unwrap()).unwrap();
    assert_eq!((api.kind, api.tasks, api.checks.len()), (JobKind::Service, 2, 1));
    assert!(api.update.is_some_and(|u| u.auto_revert && u.max_parallel == 1));
    for file in ["v1.yaml", "broken.yaml"] {
        let path = dir.join("api-update").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let next = parse_job(file, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(next.id, "api", "{file} is a version of api");
        let changes = omega::deployment::diff(&api, &next);
        assert_eq!(changes.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(), ["command"], "{file}: {changes:?}");
        assert!(!omega::deployment::runs_same(&api, &next), "{file} replaces the replicas");
        assert!(text.contains("What to watch"), "{file} says what to watch");
    }
}
