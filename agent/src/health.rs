//! Probing a running task's health checks, and turning the probes into its health.
//!
//! While a run is `running`, its runner ([`crate::runner`]) asks a [`Monitor`] for the next verdict: the
//! monitor probes each of the job's checks every `interval` (the first probe at once), each probe bounded by
//! the check's `timeout`, and answers only when something must be done, so the runner writes the task record
//! on a transition and never per probe:
//!
//! - a check passes after `healthy_threshold` consecutive passes, fails after `unhealthy_threshold`
//!   consecutive failures; failures within `grace` of the run's start do not count (a slow start is not a
//!   failure);
//! - the task is `unhealthy` while any check is, `healthy` once every check is, and `starting` until then
//!   (written with `running`, never again);
//! - a check with `restart: true` turning unhealthy asks for a restart, whether or not the task's health
//!   changed with it (another check may have made it unhealthy already).
//!
//! Probes, from the node (tasks share its network namespace, so a task's port is the node's):
//! - `http`: `GET <path>` on `127.0.0.1:<port>` as plain HTTP/1.1 over a TCP connection, reading only the
//!   status line; `expect_status`, or any 2xx/3xx, passes. No HTTP library: a status line is all a check needs.
//! - `tcp`: a connection to `127.0.0.1:<port>` is accepted.
//! - `exec`: the command, run in the task's container through containerd ([`Containerd::exec`]), exits 0.

use crate::containerd::Containerd;
use omega::health::{Health, HealthCheck, HealthStatus, Probe};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// Failed, and why in words (`GET /health returned 500`).
    Fail(String),
}

/// What the runner must do after a probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The task's health changed: write it, with an event of its kind saying `event`.
    pub health: Option<Health>,
    pub event: String,
    /// A check that restarts its task turned unhealthy; its message (`http check: GET / returned 500`).
    pub restart: Option<String>,
}

impl Verdict {
    fn is_empty(&self) -> bool {
        self.health.is_none() && self.restart.is_none()
    }
}

/// One check's progress.
#[derive(Clone, Debug)]
struct CheckState {
    check: HealthCheck,
    status: HealthStatus,
    passes: u32,
    failures: u32,
    /// The last failure's message.
    error: String,
    /// When it is probed next.
    due: Instant,
}

impl CheckState {
    fn message(&self) -> String {
        format!("{} check: {}", self.check.name, self.error)
    }
}

/// The checks of one run and what they have shown so far.
#[derive(Clone, Debug)]
pub struct Monitor {
    checks: Vec<CheckState>,
    /// When the run started (ms since the epoch): each check's grace counts from here.
    started_at_ms: u64,
    /// The health the task record holds.
    recorded: HealthStatus,
}

impl Monitor {
    /// A monitor for a run started at `started_at_ms` whose record says `recorded` (`None`: nothing yet,
    /// which is `starting`). Every check is due at once. A run adopted after an agent restart resumes from its
    /// recorded health: each check starts there, so a healthy run needs `unhealthy_threshold` failures, and
    /// an unhealthy one `healthy_threshold` passes, to change.
    pub fn new(checks: &[HealthCheck], started_at_ms: u64, recorded: Option<HealthStatus>) -> Monitor {
        let recorded = recorded.unwrap_or(HealthStatus::Starting);
        let now = Instant::now();
        let checks = checks
            .iter()
            .map(|check| CheckState {
                check: check.clone(),
                // An unhealthy record does not say which check failed: they start over, and the task stays
                // unhealthy until all pass (a restart is asked for only by a check failing anew).
                status: if recorded == HealthStatus::Healthy { HealthStatus::Healthy } else { HealthStatus::Starting },
                passes: 0,
                failures: 0,
                error: String::new(),
                due: now,
            })
            .collect();
        Monitor { checks, started_at_ms, recorded }
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// The health the record holds now (after a verdict's health was written).
    pub fn recorded(&mut self, status: HealthStatus) {
        self.recorded = status;
    }

    /// Takes one probe result of check `index`, made at `now_ms`, and says what follows from it.
    pub fn observe(&mut self, index: usize, outcome: Outcome, now_ms: u64) -> Verdict {
        let Some(state) = self.checks.get_mut(index) else { return Verdict::default() };
        let mut turned_unhealthy = false;
        match outcome {
            Outcome::Pass => {
                state.passes = state.passes.saturating_add(1);
                state.failures = 0;
                if state.status != HealthStatus::Healthy && state.passes >= state.check.healthy_threshold {
                    state.status = HealthStatus::Healthy;
                    state.error.clear();
                }
            }
            Outcome::Fail(why) => {
                state.passes = 0;
                if now_ms < self.started_at_ms.saturating_add(state.check.grace_ms) {
                    tracing::debug!(check = state.check.name, why, "failure within the grace; not counted");
                } else {
                    state.failures = state.failures.saturating_add(1);
                    state.error = why;
                    if state.status != HealthStatus::Unhealthy && state.failures >= state.check.unhealthy_threshold {
                        state.status = HealthStatus::Unhealthy;
                        turned_unhealthy = true;
                    }
                }
            }
        }
        let mut verdict = Verdict::default();
        if turned_unhealthy && state.check.restart {
            verdict.restart = Some(state.message());
        }
        let (status, message, event) = self.overall();
        if status != HealthStatus::Starting && status != self.recorded {
            verdict.health = Some(Health { status, since_ms: now_ms, message });
            verdict.event = event;
        }
        verdict
    }

    /// The task's health from its checks': unhealthy if any is, healthy if all are, else no verdict yet
    /// (`starting`, which keeps what the record says). With the message for the record and for the event.
    fn overall(&self) -> (HealthStatus, String, String) {
        if let Some(failing) = self.checks.iter().find(|c| c.status == HealthStatus::Unhealthy) {
            let message = failing.message();
            return (HealthStatus::Unhealthy, message.clone(), message);
        }
        if self.checks.iter().all(|c| c.status == HealthStatus::Healthy) {
            let names: Vec<&str> = self.checks.iter().map(|c| c.check.name.as_str()).collect();
            return (HealthStatus::Healthy, String::new(), format!("passing: {}", names.join(", ")));
        }
        (HealthStatus::Starting, String::new(), String::new())
    }

    /// Probes the checks as they come due until one of them calls for something. Cancel-safe: dropped while
    /// probing, it probes that check again at the next call.
    pub async fn next(&mut self, probes: &Probes<'_>) -> Verdict {
        loop {
            let Some(index) = (0..self.checks.len()).min_by_key(|&i| self.checks[i].due) else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(self.checks[index].due).await;
            let check = self.checks[index].check.clone();
            let outcome = probes.probe(&check).await;
            let interval = Duration::from_millis(check.interval_ms.max(1));
            let state = &mut self.checks[index];
            // Every interval from the last due time; a probe that overran starts the next one a whole interval on.
            state.due = (state.due + interval).max(Instant::now());
            if let Outcome::Fail(why) = &outcome {
                tracing::debug!(container = probes.container, check = check.name, why, "probe failed");
            }
            let verdict = self.observe(index, outcome, omega::model::now_ms());
            if !verdict.is_empty() {
                return verdict;
            }
        }
    }
}

/// What probes a run: the node's loopback for http and tcp, the run's container for exec.
pub struct Probes<'a> {
    pub containerd: &'a Containerd,
    pub container: &'a str,
    /// Where an exec check's output goes while it runs (read, then removed).
    pub output: &'a Path,
}

impl Probes<'_> {
    /// Runs one probe of `check`, bounded by its timeout.
    pub async fn probe(&self, check: &HealthCheck) -> Outcome {
        let timeout = Duration::from_millis(check.timeout_ms.max(1));
        match &check.probe {
            Probe::Http { port, path, expect_status } => {
                bounded(timeout, &format!("GET {path}"), http(*port, path, *expect_status)).await
            }
            Probe::Tcp { port } => bounded(timeout, &format!("connecting to 127.0.0.1:{port}"), tcp(*port)).await,
            // Bounded inside: a command past its timeout is killed, and its exec process deleted either way.
            Probe::Exec { command } => self.exec(command, timeout).await,
        }
    }

    async fn exec(&self, command: &[String], timeout: Duration) -> Outcome {
        let shown = command.join(" ");
        match self.containerd.exec(self.container, command, timeout, self.output).await {
            Ok(done) => match done.code {
                Some(0) => Outcome::Pass,
                Some(code) if done.output.is_empty() => Outcome::Fail(format!("`{shown}` exited with {code}")),
                Some(code) => Outcome::Fail(format!("`{shown}` exited with {code}: {}", done.output)),
                None => Outcome::Fail(format!("`{shown}` did not exit within {timeout:?} and was killed")),
            },
            Err(e) => Outcome::Fail(format!("`{shown}` could not run: {e}")),
        }
    }
}

async fn bounded(timeout: Duration, what: &str, probe: impl std::future::Future<Output = Outcome>) -> Outcome {
    match tokio::time::timeout(timeout, probe).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Fail(format!("{what}: no answer within {timeout:?}")),
    }
}

/// The most of an answer read for its status line.
const MAX_STATUS_LINE: usize = 4096;

/// `GET path` on the node's loopback: passes on `expect` (or any 2xx/3xx without one).
pub async fn http(port: u16, path: &str, expect: Option<u16>) -> Outcome {
    let what = format!("GET {path}");
    let mut stream = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(format!("{what}: connecting to 127.0.0.1:{port}: {e}")),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: omega-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Outcome::Fail(format!("{what}: sending the request: {e}"));
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < MAX_STATUS_LINE {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Fail(format!("{what}: reading the answer: {e}")),
        }
    }
    let code = match status_code(&answer) {
        Ok(code) => code,
        Err(why) => return Outcome::Fail(format!("{what}: {why}")),
    };
    let passes = match expect {
        Some(want) => code == want,
        None => (200..400).contains(&code),
    };
    match (passes, expect) {
        (true, _) => Outcome::Pass,
        (false, Some(want)) => Outcome::Fail(format!("{what} returned {code}, not {want}")),
        (false, None) => Outcome::Fail(format!("{what} returned {code}")),
    }
}

/// The status code of an HTTP/1.x answer's status line (`HTTP/1.1 200 OK`).
fn status_code(answer: &[u8]) -> Result<u16, String> {
    if answer.is_empty() {
        return Err("the connection closed without an answer".into());
    }
    let line_end = answer.windows(2).position(|w| w == b"\r\n").unwrap_or(answer.len());
    let line = String::from_utf8_lossy(&answer[..line_end.min(200)]).into_owned();
    let mut words = line.split(' ');
    let (Some(version), Some(code)) = (words.next(), words.next()) else {
        return Err(format!("not an HTTP answer: {line:?}"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("not an HTTP/1 answer: {line:?}"));
    }
    code.parse::<u16>().map_err(|_| format!("not an HTTP status: {line:?}"))
}

/// A connection to the node's loopback at `port` is accepted.
pub async fn tcp(port: u16) -> Outcome {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => Outcome::Pass,
        Err(e) => Outcome::Fail(format!("connecting to 127.0.0.1:{port}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega::health::Probe;
    use tokio::net::TcpListener;

    fn check(name: &str, healthy: u32, unhealthy: u32, grace_ms: u64, restart: bool) -> HealthCheck {
        HealthCheck {
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            grace_ms,
            restart,
            ..HealthCheck::new(name, Probe::Tcp { port: 1 })
        }
    }

    fn fail(why: &str) -> Outcome {
        Outcome::Fail(why.to_string())
    }

    #[test]
    fn thresholds_decide_the_transitions_and_only_transitions_are_written() {
        let mut m = Monitor::new(&[check("tcp", 2, 3, 0, true)], 1000, None);
        assert_eq!(m.observe(0, Outcome::Pass, 2000), Verdict::default(), "one pass of two");
        let v = m.observe(0, Outcome::Pass, 3000);
        let health = v.health.expect("healthy after two passes");
        assert_eq!((health.status, health.since_ms, health.message.as_str()), (HealthStatus::Healthy, 3000, ""));
        assert_eq!((v.event.as_str(), v.restart), ("passing: tcp", None));
        m.recorded(HealthStatus::Healthy);
        assert_eq!(m.observe(0, Outcome::Pass, 4000), Verdict::default(), "no write per probe");
        assert_eq!(m.observe(0, fail("refused"), 5000), Verdict::default());
        assert_eq!(m.observe(0, fail("refused"), 6000), Verdict::default());
        assert_eq!(m.observe(0, Outcome::Pass, 7000), Verdict::default(), "a pass resets the failures");
        m.observe(0, fail("refused"), 8000);
        m.observe(0, fail("refused"), 9000);
        let v = m.observe(0, fail("connection refused"), 10_000);
        let health = v.health.expect("unhealthy after three failures in a row");
        assert_eq!(
            (health.status, health.message.as_str()),
            (HealthStatus::Unhealthy, "tcp check: connection refused")
        );
        assert_eq!(v.event, "tcp check: connection refused");
        assert_eq!(v.restart.as_deref(), Some("tcp check: connection refused"));
        m.recorded(HealthStatus::Unhealthy);
        assert_eq!(m.observe(0, fail("refused"), 11_000), Verdict::default(), "asked once, not per failure");
        m.observe(0, Outcome::Pass, 12_000);
        let v = m.observe(0, Outcome::Pass, 13_000);
        assert_eq!(v.health.map(|h| h.status), Some(HealthStatus::Healthy), "back after healthy_threshold passes");
    }

    #[test]
    fn failures_within_the_grace_do_not_count() {
        let mut m = Monitor::new(&[check("slow", 1, 1, 5000, true)], 1000, None);
        assert_eq!(m.observe(0, fail("refused"), 2000), Verdict::default());
        assert_eq!(m.observe(0, fail("refused"), 5999), Verdict::default());
        let v = m.observe(0, fail("refused"), 6000);
        assert_eq!(v.health.map(|h| h.status), Some(HealthStatus::Unhealthy), "the grace is over");
    }

    #[test]
    fn every_check_must_pass_and_one_failing_is_enough() {
        let checks = [check("a", 1, 1, 0, false), check("b", 1, 1, 0, true)];
        let mut m = Monitor::new(&checks, 0, None);
        assert_eq!(m.observe(0, Outcome::Pass, 1), Verdict::default(), "b has not passed yet");
        let v = m.observe(1, Outcome::Pass, 2);
        assert_eq!((v.health.map(|h| h.status), v.event.as_str()), (Some(HealthStatus::Healthy), "passing: a, b"));
        m.recorded(HealthStatus::Healthy);
        let v = m.observe(0, fail("down"), 3);
        assert_eq!(v.health.map(|h| h.message), Some("a check: down".to_string()));
        assert_eq!(v.restart, None, "a only reports");
        m.recorded(HealthStatus::Unhealthy);
        // b failing too changes nothing in the record (the task is unhealthy already), but b restarts it.
        let v = m.observe(1, fail("gone"), 4);
        assert_eq!((v.health, v.restart.as_deref()), (None, Some("b check: gone")));
    }

    #[test]
    fn an_adopted_run_resumes_from_its_record() {
        let mut m = Monitor::new(&[check("tcp", 1, 2, 0, true)], 0, Some(HealthStatus::Healthy));
        assert_eq!(m.observe(0, Outcome::Pass, 1), Verdict::default(), "healthy already: nothing to write");
        assert_eq!(m.observe(0, fail("x"), 2), Verdict::default());
        assert!(m.observe(0, fail("x"), 3).restart.is_some());
        // Recorded unhealthy: no write of `starting`, and a restart once a check fails anew.
        let mut m = Monitor::new(&[check("tcp", 1, 1, 0, true)], 0, Some(HealthStatus::Unhealthy));
        let v = m.observe(0, fail("x"), 1);
        assert_eq!((v.health, v.restart.is_some()), (None, true));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Ok(204));
        assert_eq!(status_code(b"HTTP/1.0 500 Internal Server Error\r\nServer: x\r\n"), Ok(500));
        assert!(status_code(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_code(b"").unwrap_err().contains("closed without an answer"));
        assert!(status_code(b"HTTP/1.1 2000 OK\r\n").is_err());
    }

    /// Serves one connection with `answer`, returning the request it read.
    async fn serve_once(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let port = listener.local_addr().expect("its address").port();
        let served = tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else { return String::new() };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(answer.as_bytes()).await;
            String::from_utf8_lossy(&request).into_owned()
        });
        (port, served)
    }

    #[tokio::test]
    async fn http_probes_read_the_status_line() {
        let (port, served) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        assert_eq!(http(port, "/health", None).await, Outcome::Pass);
        let request = served.await.expect("served");
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(request.contains(&format!("Host: 127.0.0.1:{port}\r\n")), "{request}");

        let (port, _served) = serve_once("HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(http(port, "/health", None).await, fail("GET /health returned 500"));
        let (port, _served) = serve_once("HTTP/1.1 301 Moved Permanently\r\n\r\n").await;
        assert_eq!(http(port, "/", None).await, Outcome::Pass, "3xx passes without expect_status");
        let (port, _served) = serve_once("HTTP/1.1 200 OK\r\n\r\n").await;
        assert_eq!(http(port, "/", Some(204)).await, fail("GET / returned 200, not 204"));
    }

    #[tokio::test]
    async fn tcp_probes_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let port = listener.local_addr().expect("its address").port();
        assert_eq!(tcp(port).await, Outcome::Pass);
        drop(listener);
        match tcp(port).await {
            Outcome::Fail(why) => assert!(why.starts_with(&format!("connecting to 127.0.0.1:{port}: ")), "{why}"),
            Outcome::Pass => panic!("nothing listens on {port} any more"),
        }
        match http(port, "/", None).await {
            Outcome::Fail(why) => assert!(why.starts_with("GET /: connecting to"), "{why}"),
            Outcome::Pass => panic!("nothing listens on {port} any more"),
        }
    }
}
