//! `omctl`: the command line people use to run jobs on an Omega cell.
//!
//! It reads and writes the cell's etcd directly through the `omega` library: `submit` parses a job file
//! (`omega::job_spec`) and writes the job with its pending tasks; read commands take one consistent cut of
//! the cell; `cancel` releases tasks through `omega::release`; `audit` runs `omega::audit`; `watch` follows
//! changes through `omega::watcher`, and `events` the tasks' timelines the same way. See `omctl --help` for the commands and exit codes.

mod cell;
mod cli;
mod commands;
mod connect;
mod exit;
mod output;
mod summary;
mod timeline;
mod units;

use clap::Parser;
use cli::{Cli, Command};
use exit::Code;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage mistakes are user errors (1), not clap's usual 2,
            // which omctl reserves for audit violations.
            let code = if e.use_stderr() { Code::User } else { Code::Ok };
            let _ = e.print();
            return code.into();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Code::User.into();
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(code) => code.into(),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = exit::classify(&e);
            if exit::is_permission_denied(&format!("{e:#}")) {
                eprintln!(
                    "hint: etcd's access control refused this identity (the common name of --cert is its etcd user; \
                     deploy/tls/grant-roles.sh says what each role may do)"
                );
            } else if code == Code::Etcd && !e.chain().any(|c| c.is::<exit::Unreachable>()) {
                eprintln!("hint: etcd stopped answering; check that it is up at {}", cli.etcd.join(","));
            }
            code.into()
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<Code> {
    match &cli.command {
        Command::Submit(args) => commands::submit::run(cli, args).await,
        Command::Jobs(args) => commands::jobs::run(cli, args).await,
        Command::Quota(args) => commands::quota::run(cli, args).await,
        Command::Job(args) => match (args.id.as_str(), &args.job) {
            ("history", Some(id)) => commands::versions::history(cli, id).await,
            _ => commands::job::run(cli, args).await,
        },
        Command::Tasks(args) => commands::tasks::run(cli, args).await,
        Command::Nodes => commands::nodes::run(cli).await,
        Command::Cancel(args) => commands::cancel::run(cli, args).await,
        Command::Audit => commands::audit::run(cli).await,
        Command::Watch(args) => commands::watch::run(cli, args).await,
        Command::Schedulers => commands::schedulers::run(cli).await,
        Command::Services => commands::services::list(cli).await,
        Command::Service(args) => commands::services::show(cli, args).await,
        Command::Logs(args) => commands::logs::run(cli, args).await,
        Command::Drain(args) => commands::drain::run(cli, args).await,
        Command::Promote(args) => commands::versions::promote(cli, &args.id).await,
        Command::Revert(args) => commands::versions::revert(cli, &args.id, args.version).await,
        Command::Events(args) => commands::events::run(cli, args).await,
    }
}
