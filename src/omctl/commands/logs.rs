//! `omctl logs TASK [-f]`: a task's log, streamed from the agent of its node.

use crate::cli::{Cli, LogsArgs};
use crate::exit::{user, Code};
use omega::model::{Node, Task, TaskState};
use omega::proto::logs::logs_client::LogsClient;
use omega::proto::logs::TailRequest;
use std::io::Write;

pub async fn run(cli: &Cli, args: &LogsArgs) -> anyhow::Result<Code> {
    let Some((job, index)) = args.task.split_once('/') else {
        return Err(user(format!("task {:?} must be <job>/<index>, e.g. web/0", args.task)));
    };
    crate::cell::check_job_id(job)?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return Err(user(format!("task {:?} must be <job>/<index>, e.g. web/0", args.task)));
    }
    let store = crate::connect::connect(cli).await?;
    let keys = store.keys();
    let Some((task, _)) = store.get_json::<Task>(&keys.task(&args.task)).await? else {
        return Err(user(format!("task {} not found; `omctl tasks --job {job}` lists its tasks", args.task)));
    };
    let Some(node) = task.node.clone() else {
        return Err(user(format!("task {} has not run on any node yet (it is {})", args.task, task.state)));
    };
    let address = store.get_json::<Node>(&keys.node(&node)).await?.and_then(|(n, _)| n.address);
    let Some(address) = address else {
        return Err(user(format!(
            "node {node} serves no logs (its agent runs without --listen, or the node is simulated)"
        )));
    };
    let mut client = match address.strip_prefix("https://") {
        None => LogsClient::connect(format!("http://{address}"))
            .await
            .map_err(|e| user(format!("cannot reach the agent of node {node} at {address}: {e}")))?,
        Some(host) => {
            let Some(tls) = cli.tls.files().map_err(|e| user(e.to_string()))? else {
                return Err(user(format!(
                    "the agent of node {node} serves logs over TLS ({address}): give --cacert, --cert and --key"
                )));
            };
            let config = tls.grpc_client().map_err(|e| user(e.to_string()))?;
            let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{host}"))
                .and_then(|e| e.tls_config(config))
                .map_err(|e| user(format!("the log service address {address} of node {node}: {e}")))?;
            let channel = endpoint.connect().await.map_err(|e| {
                user(format!(
                    "cannot reach the agent of node {node} at {address} over TLS: {}",
                    omega::tls::explain(Some(&tls), &format!("{e:?}")).unwrap_or_else(|| e.to_string())
                ))
            })?;
            LogsClient::new(channel)
        }
    };
    let request = TailRequest { task: args.task.clone(), follow: args.follow, offset: 0 };
    let mut stream = client
        .tail(request)
        .await
        .map_err(|e| user(format!("the agent of node {node} refused the log request: {}", e.message())))?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await.map_err(|e| user(format!("log stream broke: {}", e.message())))? {
        out.write_all(&chunk.data)?;
        if chunk.end {
            out.flush()?;
            let exit = chunk.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
            let oom = if chunk.oom_killed { ", OOM-killed" } else { "" };
            eprintln!("task {} {}{exit}{oom}", args.task, chunk.state);
            let succeeded = chunk.state == TaskState::Succeeded.to_string();
            return Ok(if succeeded { Code::Ok } else { Code::TaskFailed });
        }
    }
    out.flush()?;
    Ok(Code::Ok)
}
