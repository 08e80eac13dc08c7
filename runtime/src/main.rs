//! `lattice`: the runtime's command line.
//!
//! - `lattice serve --config FILE`: serve until SIGTERM/SIGINT, then drain.
//! - `lattice check-config --config FILE`: parse and validate only.
//! - `lattice compile --config FILE`: fill the AOT cache and exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use lattice_runtime::admin::{self, AdminState};
use lattice_runtime::config::Config;
use lattice_runtime::runtime::Shared;
use lattice_runtime::{engine, server, tls};

const USAGE: &str = "usage: lattice <serve|check-config|compile> --config FILE";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context(USAGE)?;
    let mut config_path: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config_path = Some(args.next().context("--config needs a file")?.into()),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let config_path = config_path.context(USAGE)?;
    let config = Config::load(&config_path)?;
    init_logging(&config.server.log_format);
    match command.as_str() {
        "check-config" => {
            println!("{}: ok", config_path.display());
            Ok(())
        }
        "compile" => {
            let e = engine::build_engine(&config.limits)?;
            let cache =
                config.component.cache_dir.clone().unwrap_or_else(|| config.server.data_dir.join("compiled"));
            engine::load_component(&e, &config.component.path, &cache)?;
            println!("compiled {}", config.component.path.display());
            Ok(())
        }
        "serve" => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config)),
        other => anyhow::bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATTICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let tls_acceptor = if config.tls.plain_http {
        None
    } else {
        let (Some(cert), Some(key)) = (config.tls.cert.clone(), config.tls.key.clone()) else {
            anyhow::bail!("tls.cert and tls.key are required unless tls.plain_http is set");
        };
        let certs = tls::CertReloader::new(cert, key)?;
        certs.clone().watch(std::time::Duration::from_millis(config.tls.reload_interval_ms));
        let sc = tls::server_config(config.tls.post_quantum, certs)?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc)))
    };
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let shared = Shared::build(config).await?;
    let _ticker = engine::EpochTicker::start(&shared.engine);
    shared.start_background();
    let listener = server::bind(listen).await?;
    let scheme = if tls_acceptor.is_some() { "https" } else { "http" };
    let local = listener.local_addr()?;
    let admin_state = Arc::new(AdminState { shared: shared.clone(), draining: AtomicBool::new(false) });
    if let Some(addr) = admin_listen {
        let l = server::bind(addr).await?;
        tracing::info!(addr = %l.local_addr()?, "admin listener");
        tokio::spawn(admin::serve(admin_state.clone(), l));
    }
    tracing::info!(url = %format!("{scheme}://{local}"), startup_ms = started.elapsed().as_millis() as u64, "serving");
    println!("lattice: serving on {scheme}://{local}");
    let drain_flag = admin_state.clone();
    let shutdown = async move {
        wait_for_signal().await;
        drain_flag.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    server::serve(shared, listener, tls_acceptor, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
}
