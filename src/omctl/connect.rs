//! Connecting to the cell's etcd from the global options, failing fast with a message that says what to do.

use crate::cli::{Cli, Command};
use crate::exit::{user, NoSpace, Unreachable};
use etcd_client::{AlarmAction, AlarmType};
use omega::keys::Keys;
use omega::store::{Store, StoreOptions};

/// The key layout the global `--prefix` names.
pub fn keys(cli: &Cli) -> anyhow::Result<Keys> {
    Keys::new(&cli.prefix).map_err(|e| user(format!("--prefix: {e}")))
}

/// Connects, retrying for at most `--connect-timeout` (3 s by default), so that an absent etcd fails in
/// seconds with exit code 3 rather than hanging.
pub async fn connect(cli: &Cli) -> anyhow::Result<Store> {
    let keys = keys(cli)?;
    let endpoints: Vec<String> = cli.etcd.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    if endpoints.is_empty() {
        return Err(user("--etcd: no endpoint given; e.g. --etcd http://127.0.0.1:2379"));
    }
    let tls = cli.tls.files().map_err(|e| user(e.to_string()))?;
    let options = StoreOptions { max_txn_ops: cli.max_txn_ops, tls, ..StoreOptions::default() };
    match Store::connect_with(&endpoints, keys, options, cli.connect_timeout).await {
        Ok(store) => {
            // A submission says it itself, as its error.
            if !matches!(cli.command, Command::Submit(_)) {
                warn_if_full(&store).await;
            }
            Ok(store)
        }
        Err(omega::Error::Unreachable { endpoints, waited, last_error }) => {
            Err(anyhow::Error::new(Unreachable { endpoints, waited, last_error: plain(&last_error) }))
        }
        Err(omega::Error::InvalidArgument(m)) => Err(user(format!("--etcd: {m}"))),
        Err(e @ omega::Error::Tls(_)) => Err(user(e.to_string())),
        Err(e) => Err(anyhow::Error::new(Unreachable {
            endpoints: endpoints.join(","),
            waited: cli.connect_timeout,
            last_error: e.to_string(),
        })),
    }
}

/// Says on stderr, before the command's own output, when etcd's NOSPACE alarm is raised: the cell reads
/// fine but cannot change (nothing is placed, no task records its end) until an operator frees space. One
/// request; a failure to ask is not this command's concern.
async fn warn_if_full(store: &Store) {
    let Ok(alarms) = store.client().alarm(AlarmAction::Get, AlarmType::None, None).await else { return };
    if !alarms.alarms().iter().any(|a| a.alarm() == AlarmType::Nospace) {
        return;
    }
    let full = NoSpace {
        what: "the cell reads fine but nothing in it can change: no job is placed or submitted and no task \
               records its end until then"
            .into(),
        endpoints: store.endpoints().join(","),
        revision: store.revision().await.ok(),
    };
    eprintln!("warning: {full}");
}

/// The gist of a connection error: gRPC transport errors nest several layers of debug output.
fn plain(error: &str) -> String {
    let known = [
        ("Connection refused", "connection refused"),
        ("dns error", "cannot resolve the host name"),
        ("timed out", "timed out"),
        ("Timeout", "timed out"),
        ("invalid uri", "not a valid URL (e.g. http://127.0.0.1:2379)"),
        ("InvalidUri", "not a valid URL (e.g. http://127.0.0.1:2379)"),
    ];
    known.iter().find(|(needle, _)| error.contains(needle)).map(|(_, said)| said.to_string()).unwrap_or(error.into())
}
