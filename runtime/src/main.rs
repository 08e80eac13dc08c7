//! `lattice`: the runtime's command line.
//!
//! - `lattice serve --config FILE`: serve until SIGTERM/SIGINT, then drain.
//! - `lattice check-config --config FILE`: parse and validate only.
//! - `lattice compile --config FILE`: fill the AOT cache and exit.
//! - `lattice call --config FILE [--bearer-secret NAME] METHOD PATH [BODY]`: send one request to
//!   the running server's component through its admin listener (`/component/PATH`), with the
//!   named secret (base64url, unpadded) as the bearer token; prints the response body and fails
//!   on a non-2xx status. Components use it for their admin routes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use lattice_runtime::admin::{self, AdminState};
use lattice_runtime::config::Config;
use lattice_runtime::runtime::Shared;
use lattice_runtime::{engine, server, tls};

const USAGE: &str = "usage: lattice <serve|check-config|compile> --config FILE\n       lattice call --config FILE [--bearer-secret NAME] METHOD PATH [BODY]";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context(USAGE)?;
    let mut config_path: Option<PathBuf> = None;
    let mut bearer_secret: Option<String> = None;
    let mut positional = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config_path = Some(args.next().context("--config needs a file")?.into()),
            "--bearer-secret" => bearer_secret = Some(args.next().context("--bearer-secret needs a name")?),
            other if command == "call" && !other.starts_with("--") => positional.push(other.to_owned()),
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
            let cache = config.component_cache_dir();
            engine::load_component(
                &e,
                &config.component.path,
                &cache,
                config.component.seed_cache_dir.as_deref(),
            )?;
            println!("compiled {}", config.component.path.display());
            Ok(())
        }
        "serve" => {
            compile_in_child(&config, &config_path)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))
        }
        "call" => {
            let [method, path, rest @ ..] = positional.as_slice() else { anyhow::bail!(USAGE) };
            let body = rest.first().cloned().unwrap_or_default();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (status, text) = rt.block_on(call(&config, bearer_secret.as_deref(), method, path, body))?;
            println!("{text}");
            if !(200..300).contains(&status) {
                anyhow::bail!("the server answered {status}");
            }
            Ok(())
        }
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

/// Compiles the component in a child process (`lattice compile`) when the cache has no entry
/// for it: Cranelift's memory then goes back to the system with the child, instead of staying
/// in the serving process's resident set (~60 MB more, measured in BENCHMARKS.md). The serving
/// process loads the entry the child wrote. Compiling in-process remains the fallback.
fn compile_in_child(config: &Config, config_path: &std::path::Path) -> anyhow::Result<()> {
    let cache = config.component_cache_dir();
    let e = engine::build_engine(&config.limits)?;
    if engine::is_compiled(&e, &config.component.path, &cache, config.component.seed_cache_dir.as_deref())? {
        return Ok(());
    }
    drop(e);
    let exe = std::env::current_exe().context("locating the lattice binary")?;
    let status = std::process::Command::new(exe)
        .arg("compile")
        .arg("--config")
        .arg(config_path)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!(status = %s, "compiling in a child process failed; compiling here"),
        Err(e) => tracing::warn!(error = %e, "cannot start the compiler process; compiling here"),
    }
    Ok(())
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
    if let (Some(p), Some(secret)) = (&shared.config.placement, &shared.peer_secret)
        && let Some(addr) = p.peer_listen.filter(|_| p.owns_shards())
    {
        let l = server::bind(addr).await?;
        tracing::info!(addr = %l.local_addr()?, identity = ?shared.leased.as_ref().map(|l| l.identity().to_owned()), "peer listener");
        tokio::spawn(lattice_runtime::peer::serve(shared.clone(), secret.clone(), l));
    }
    tracing::info!(url = %format!("{scheme}://{local}"), startup_ms = started.elapsed().as_millis() as u64, "serving");
    println!("lattice: serving on {scheme}://{local}");
    let drain_flag = admin_state.clone();
    let placement = shared.objects.placement.clone();
    let (handed_over_tx, handed_over) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        wait_for_signal().await;
        drain_flag.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        // Hand the shards over at once, while in-flight HTTP requests drain: a rolling update
        // then stalls a shard for one hand-over, not for a lease's expiry.
        tokio::spawn(async move {
            placement.shutdown().await;
            let _ = handed_over_tx.send(());
        });
    };
    let result = server::serve(shared, listener, tls_acceptor, shutdown).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), handed_over).await;
    result
}

/// `lattice call`: one request to the component through the admin listener.
async fn call(
    config: &Config,
    bearer_secret: Option<&str>,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, String)> {
    use base64::Engine as _;
    use http_body_util::BodyExt as _;
    let addr = config.server.admin_listen.context("server.admin_listen is not set: nothing to call")?;
    anyhow::ensure!(path.starts_with('/'), "the path must start with /");
    let mut req = http::Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(format!("http://{addr}{}{path}", admin::COMPONENT_PREFIX))
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(name) = bearer_secret {
        let dir = config.secrets.dir.as_ref().context("secrets.dir is not set")?;
        let bytes = std::fs::read(dir.join(name)).with_context(|| format!("reading secret {name}"))?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("calling the server's admin listener on {addr}"))?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.context("reading the answer")?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
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
