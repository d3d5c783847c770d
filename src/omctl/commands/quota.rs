//! `omctl quota`: each namespace's use against its quota; `quota set` and `quota rm` change one.

use crate::cli::{Cli, QuotaAction, QuotaArgs, QuotaSetArgs};
use crate::exit::{user, Code};
use crate::output::{emit, Table};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use omega::model::{NamespaceUse, Quota, TaskState};
use omega::store::{encode, Store};
use omega::units::{parse, show};
use serde::Serialize;
use std::collections::BTreeMap;

/// `omctl quota -o json`.
#[derive(Serialize)]
pub struct QuotasOutput {
    pub revision: i64,
    pub namespaces: Vec<NamespaceRow>,
}

#[derive(Serialize)]
pub struct NamespaceRow {
    pub namespace: String,
    /// The limits (`null`: no quota; a limit absent: not limited in that dimension).
    pub quota: Option<Quota>,
    /// What its tasks hold now (assigned or running).
    pub used: NamespaceUse,
    /// Its tasks waiting to be placed (some perhaps for the quota).
    pub pending_tasks: u64,
}

pub async fn run(cli: &Cli, args: &QuotaArgs) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    match &args.action {
        None => show_all(cli, &store).await,
        Some(QuotaAction::Set(set)) => set_quota(&store, set).await,
        Some(QuotaAction::Rm { namespace }) => remove(&store, namespace).await,
    }
}

async fn show_all(cli: &Cli, store: &Store) -> anyhow::Result<Code> {
    let keys = store.keys();
    let read = crate::cell::read(store, &[keys.quotas_prefix(), keys.tasks_prefix()]).await?;
    let s = &read.snapshot;
    let mut rows: BTreeMap<String, NamespaceRow> = BTreeMap::new();
    fn row<'a>(
        rows: &'a mut BTreeMap<String, NamespaceRow>,
        s: &omega::cell_state::CellSnapshot,
        ns: &str,
    ) -> &'a mut NamespaceRow {
        rows.entry(ns.to_string()).or_insert_with(|| NamespaceRow {
            namespace: ns.to_string(),
            quota: None,
            used: s.use_of(ns),
            pending_tasks: 0,
        })
    }
    for (ns, q) in s.quotas.iter() {
        row(&mut rows, s, ns).quota = Some((*q.value).clone());
    }
    for ns in s.namespace_use.keys() {
        row(&mut rows, s, ns);
    }
    for t in s.tasks.values().filter(|t| t.value.state == TaskState::Pending) {
        row(&mut rows, s, &t.value.namespace).pending_tasks += 1;
    }
    let out = QuotasOutput { revision: read.revision, namespaces: rows.into_values().collect() };
    emit(cli.output, &out, || render(&out))?;
    Ok(Code::Ok)
}

fn render(out: &QuotasOutput) -> String {
    if out.namespaces.is_empty() {
        return "No quotas and no work. Set one with `omctl quota set NAMESPACE --cpu 8 --memory 16Gi`.\n".into();
    }
    let mut t = Table::new(&["NAMESPACE", "CPU", "MEMORY", "TASKS", "PENDING"]);
    for r in &out.namespaces {
        let q = r.quota.as_ref();
        let of = |used: String, limit: Option<String>| match limit {
            Some(l) => format!("{used} / {l}"),
            None => format!("{used} / -"),
        };
        t.row(vec![
            r.namespace.clone(),
            of(show::cpu(r.used.resources.cpu_millis), q.and_then(|q| q.cpu_millis).map(show::cpu)),
            of(show::memory(r.used.resources.memory_bytes), q.and_then(|q| q.memory_bytes).map(show::memory)),
            of(r.used.tasks.to_string(), q.and_then(|q| q.tasks).map(|n| n.to_string())),
            r.pending_tasks.to_string(),
        ]);
    }
    t.render()
}

/// `none` clears a limit; anything else is parsed with `parse`.
fn limit(
    flag: &str,
    given: &Option<String>,
    current: Option<u64>,
    parse: fn(&str) -> Result<u64, String>,
) -> anyhow::Result<Option<u64>> {
    match given.as_deref() {
        None => Ok(current),
        Some("none") => Ok(None),
        Some(v) => parse(v).map(Some).map_err(|e| user(format!("--{flag} {v}: {e}"))),
    }
}

fn count(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|_| "expected a whole number of tasks, e.g. 20".to_string())
}

/// Compare-and-swap on the quota record: a concurrent change (or a claim rewriting it) makes us read again.
async fn set_quota(store: &Store, args: &QuotaSetArgs) -> anyhow::Result<Code> {
    omega::keys::validate_name("namespace", &args.namespace).map_err(|e| user(e.to_string()))?;
    let key = store.keys().quota(&args.namespace);
    for _ in 0..10 {
        let current = store.get_json::<Quota>(&key).await?;
        let (mut quota, compare) = match current {
            Some((q, rev)) => (q, Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)),
            None => (Quota::new(&args.namespace), Compare::create_revision(key.as_str(), CompareOp::Equal, 0)),
        };
        quota.cpu_millis = limit("cpu", &args.cpu, quota.cpu_millis, parse::parse_cpu)?;
        quota.memory_bytes = limit("memory", &args.memory, quota.memory_bytes, parse::parse_memory)?;
        quota.tasks = limit("tasks", &args.tasks, quota.tasks, count)?;
        quota.guaranteed_cpu_millis =
            limit("guaranteed-cpu", &args.guaranteed_cpu, quota.guaranteed_cpu_millis, parse::parse_cpu)?;
        quota.guaranteed_memory_bytes =
            limit("guaranteed-memory", &args.guaranteed_memory, quota.guaranteed_memory_bytes, parse::parse_memory)?;
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(key.as_str(), encode(&key, &quota)?, None)]);
        if store.client().kv_client().txn(txn).await?.succeeded() {
            println!("namespace {}: {}", args.namespace, quota.describe_limits());
            return Ok(Code::Ok);
        }
    }
    Err(anyhow::anyhow!("the quota of {} kept changing under us (a busy namespace); try again", args.namespace))
}

async fn remove(store: &Store, namespace: &str) -> anyhow::Result<Code> {
    let key = store.keys().quota(namespace);
    let deleted = store.client().kv_client().delete(key.as_str(), None).await?.deleted();
    if deleted == 0 {
        return Err(user(format!("namespace {namespace} has no quota")));
    }
    println!("namespace {namespace}: no quota");
    Ok(Code::Ok)
}
