//! The agent's log service: streams a task's log file to `omctl logs`.
//!
//! Logs are files the agent owns (`<log_dir>/<job>/<index>.log`, written by containerd's shim directly, so
//! they survive agent restarts and outlive the container). Following a log polls the file for appends and
//! ends once the task has ended in etcd and everything written has been sent; the last chunk carries the
//! task's final state and exit code, so `omctl logs -f` can exit with it.

use crate::agent::log_path;
use omega::keys::validate_name;
use omega::model::Task;
use omega::store::Store;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use omega::proto::logs as pb;
use pb::logs_server::{Logs, LogsServer};
use pb::{LogChunk, TailRequest};

const CHUNK: usize = 64 * 1024;
const POLL: Duration = Duration::from_millis(200);

pub struct LogService {
    store: Store,
    log_dir: PathBuf,
}

impl LogService {
    pub fn new(store: Store, log_dir: PathBuf) -> LogsServer<LogService> {
        LogsServer::new(LogService { store, log_dir })
    }
}

/// Checks that `task` is `<job>/<index>`, so a request cannot name a path outside the log directory.
fn check_task_id(task: &str) -> Result<(), Status> {
    let (job, index) = task.split_once('/').ok_or_else(|| Status::invalid_argument("task must be <job>/<index>"))?;
    validate_name("job", job).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::invalid_argument("task must be <job>/<index>"));
    }
    Ok(())
}

#[tonic::async_trait]
impl Logs for LogService {
    type TailStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

    async fn tail(&self, request: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let req = request.into_inner();
        check_task_id(&req.task)?;
        let path = log_path(&self.log_dir, &req.task);
        let task_key = self.store.keys().task(&req.task);
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut offset = req.offset;
            let mut buf = vec![0u8; CHUNK];
            loop {
                // Send whatever the file holds past `offset`.
                let mut sent_any = false;
                if let Ok(mut file) = tokio::fs::File::open(&path).await {
                    if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                        loop {
                            match file.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    let chunk = LogChunk { data: buf[..n].to_vec(), offset, ..Default::default() };
                                    offset += n as u64;
                                    sent_any = true;
                                    if tx.send(Ok(chunk)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                }
                if !req.follow {
                    return;
                }
                if sent_any {
                    continue;
                }
                // At the end of the file: has the task ended?
                let task = match store.get_json::<Task>(&task_key).await {
                    Ok(t) => t.map(|(t, _)| t),
                    Err(e) => {
                        tracing::debug!(error = %e, "reading task state for a followed log failed; retrying");
                        tokio::time::sleep(POLL).await;
                        continue;
                    }
                };
                let ended = task
                    .as_ref()
                    .is_none_or(|t| !t.state.holds_resources() && t.state != omega::model::TaskState::Pending);
                if ended {
                    // One more read: the last bytes may have landed since.
                    if tokio::fs::metadata(&path).await.map(|m| m.len() > offset).unwrap_or(false) {
                        continue;
                    }
                    let run = task.as_ref().and_then(|t| t.run.clone()).unwrap_or_default();
                    let end = LogChunk {
                        offset,
                        end: true,
                        state: task.map(|t| t.state.to_string()).unwrap_or_else(|| "gone".into()),
                        exit_code: run.exit_code,
                        oom_killed: run.oom_killed,
                        ..Default::default()
                    };
                    let _ = tx.send(Ok(end)).await;
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the log service on `addr` until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    service: LogsServer<LogService>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_tls(addr, service, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given: the agent's own certificate, and only clients with a certificate
/// the cell's CA signed (omctl's) are let in. A log can hold what a task printed, secrets included.
pub async fn serve_tls(
    addr: std::net::SocketAddr,
    service: LogsServer<LogService>,
    tls: Option<&omega::tls::TlsFiles>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.grpc_server()?)?;
    }
    server.add_service(service).serve_with_shutdown(addr, shutdown).await?;
    Ok(())
}

/// How the node record advertises the log service: `host:port`, or `https://host:port` when it takes TLS.
pub fn advertised(address: &str, tls: bool) -> String {
    if tls {
        format!("https://{address}")
    } else {
        address.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_cannot_escape_the_log_directory() {
        assert!(check_task_id("web/0").is_ok());
        assert!(check_task_id("../etc/passwd").is_err());
        assert!(check_task_id("web/../../x").is_err());
        assert!(check_task_id("web/1a").is_err());
        assert!(check_task_id("web").is_err());
    }
}
