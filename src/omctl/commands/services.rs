//! `omctl services` and `omctl service NAME`: what discovery hands out, read from the same keys clients
//! resolve ([`omega::discovery`]): the healthy endpoints the agents published, one per running instance.
//!
//! `service NAME --watch` follows one service through [`omega::discovery::Resolver`], printing each change
//! as it happens (`+` published, `-` withdrawn; NDJSON with `-o json`), the way a client sees it.

use crate::cli::{Cli, ServiceArgs};
use crate::exit::Code;
use crate::output::{emit, write_out, Format, Table};
use omega::discovery::{self, Endpoint, EndpointChange, Resolver};
use serde::Serialize;

/// `omctl services -o json`.
#[derive(Serialize)]
pub struct ServicesOutput {
    pub services: Vec<ServiceRow>,
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub endpoints: usize,
    /// Jobs serving it, sorted.
    pub jobs: Vec<String>,
    /// Versions its endpoints run, sorted.
    pub versions: Vec<u32>,
}

/// `omctl service NAME -o json`.
#[derive(Serialize)]
pub struct ServiceOutput {
    pub service: String,
    pub endpoints: Vec<Endpoint>,
}

/// One line of `service NAME --watch -o json`.
#[derive(Serialize)]
struct ChangeRow<'a> {
    change: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a Endpoint>,
}

pub async fn list(cli: &Cli) -> anyhow::Result<Code> {
    let store = crate::connect::connect(cli).await?;
    let all = discovery::list(&store, None).await?;
    let services = all
        .into_iter()
        .map(|(service, eps)| {
            let mut jobs: Vec<String> = eps.iter().map(|e| e.job.clone()).collect();
            jobs.sort();
            jobs.dedup();
            let mut versions: Vec<u32> = eps.iter().map(|e| e.version).collect();
            versions.sort();
            versions.dedup();
            ServiceRow { service, endpoints: eps.len(), jobs, versions }
        })
        .collect();
    let out = ServicesOutput { services };
    emit(cli.output, &out, || {
        if out.services.is_empty() {
            return "no service has a healthy endpoint\n".to_string();
        }
        let mut t = Table::new(&["SERVICE", "ENDPOINTS", "JOBS", "VERSIONS"]);
        for s in &out.services {
            let versions: Vec<String> = s.versions.iter().map(u32::to_string).collect();
            t.row(vec![s.service.clone(), s.endpoints.to_string(), s.jobs.join(","), versions.join(",")]);
        }
        t.render()
    })?;
    Ok(Code::Ok)
}

pub async fn show(cli: &Cli, args: &ServiceArgs) -> anyhow::Result<Code> {
    omega::keys::validate_name("service", &args.name)?;
    let store = crate::connect::connect(cli).await?;
    if args.watch {
        return follow(cli, store, &args.name).await;
    }
    let mut all = discovery::list(&store, Some(&args.name)).await?;
    let mut endpoints = all.remove(&args.name).unwrap_or_default();
    endpoints.sort_by(|a, b| a.node.cmp(&b.node).then(a.task.cmp(&b.task)));
    let out = ServiceOutput { service: args.name.clone(), endpoints };
    emit(cli.output, &out, || {
        if out.endpoints.is_empty() {
            return format!("service {} has no healthy endpoint\n", out.service);
        }
        let mut t = Table::new(&["ADDRESS", "NODE", "TASK", "VERSION", "TAGS"]);
        for e in &out.endpoints {
            t.row(row(e));
        }
        t.render()
    })?;
    Ok(Code::Ok)
}

fn row(e: &Endpoint) -> Vec<String> {
    vec![format!("{}:{}", e.address, e.port), e.node.clone(), e.task.clone(), e.version.to_string(), e.tags.join(",")]
}

/// Prints the endpoints now, then each change, until Ctrl-C or until nobody reads the output.
async fn follow(cli: &Cli, store: omega::store::Store, name: &str) -> anyhow::Result<Code> {
    let mut resolver = Resolver::new(store, name).await?;
    eprintln!("following service {name} from revision {}; Ctrl-C to stop", resolver.revision() + 1);
    let now: Vec<EndpointChange> =
        resolver.endpoints().iter().map(|(k, e)| EndpointChange::Insert(k.clone(), e.clone())).collect();
    let mut batch = now;
    loop {
        for change in &batch {
            if !print_change(cli.output, change)? {
                return Ok(Code::Ok);
            }
        }
        batch = resolver.changed().await;
    }
}

fn print_change(format: Format, change: &EndpointChange) -> anyhow::Result<bool> {
    let (sign, key, endpoint) = match change {
        EndpointChange::Insert(k, e) => ("insert", k.as_str(), Some(e)),
        EndpointChange::Remove(k) => ("remove", k.as_str(), None),
    };
    let text = match format {
        Format::Table => match endpoint {
            Some(e) => format!("+ {}\n", row(e).join("  ")),
            None => format!("- {key}\n"),
        },
        Format::Json => serde_json::to_string(&ChangeRow { change: sign, key, endpoint })? + "\n",
        Format::Yaml => format!("---\n{}", serde_norway::to_string(&ChangeRow { change: sign, key, endpoint })?),
    };
    Ok(write_out(&text)?)
}
