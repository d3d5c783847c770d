use anyhow::Context;
use clap::Parser;
use omega::keys::Keys;
use omega::store::Store;
use omega_ui::cache::UiCache;
use omega_ui::config::Config;
use omega_ui::server::{serve, App};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = Config::parse();
    let keys = Keys::new(&config.prefix).context("--prefix")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen there (in use? another omega-ui?)", config.listen))?;
    let options = omega::store::StoreOptions::with_tls(config.tls.files()?);
    let store = Store::connect_with(&config.etcd, keys, options, config.connect_timeout).await?;
    let cache = UiCache::start(store.clone()).await?;
    let addr = listener.local_addr()?;
    let view = cache.view();
    tracing::info!(
        url = %format!("http://{addr}/"),
        revision = view.snapshot.revision,
        nodes = view.snapshot.nodes.len(),
        jobs = view.jobs.rows.len(),
        actions = config.allow_actions,
        "omega-ui serving"
    );
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond loopback: anyone who reaches this address sees the whole cell");
    }
    let app = App::new(cache, Some(store), config.allow_actions);
    serve(listener, app, omega::shutdown::signal()).await.context("serving the UI")?;
    tracing::info!("omega-ui stopped");
    Ok(())
}
