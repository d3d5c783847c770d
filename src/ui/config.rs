//! The command line of `omega-ui`: the same etcd flags as every other component, where to listen, and whether
//! people may change the cell from the pages.

use clap::Parser;
use omega::units::parse_duration;
use std::net::SocketAddr;
use std::time::Duration;

/// Where the UI listens unless told otherwise: loopback only, since pages show the whole cell.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9190";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "omega-ui",
    version,
    about = "The web UI of an Omega cell: nodes by zone, schedulers and their conflicts, jobs and why they wait",
    long_about = "omega-ui keeps its own copy of the cell, fed by an etcd watch as a scheduler's is, and serves \
pages from it that update themselves (server-sent events): the cell's nodes as a heat-map by zone, every \
scheduler instance with its conflict fraction and rates over time, the jobs (filtered and paginated on the \
server) with the pending work of the whole cell grouped by reason, and a page per job and per node. It is \
read-only unless started with --allow-actions, which adds cancel and drain buttons doing what `omctl cancel` \
and `omctl drain` do."
)]
pub struct Config {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "OMEGA_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd: Vec<String>,
    /// Key prefix of the cell in etcd.
    #[arg(long, env = "OMEGA_PREFIX", default_value = omega::keys::DEFAULT_PREFIX)]
    pub prefix: String,
    #[command(flatten)]
    pub tls: omega::tls::TlsArgs,
    /// The address to serve the pages on (loopback by default; anyone who reaches it sees the whole cell).
    #[arg(long, env = "OMEGA_UI_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Show cancel and drain buttons, and accept them (they change the cell as omctl does).
    #[arg(long)]
    pub allow_actions: bool,
    /// How long to keep trying to reach etcd at start before giving up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}
