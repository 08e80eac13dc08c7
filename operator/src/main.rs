//! `lattice-operator`:
//! - `run` (the default): reconcile MatrixHomeservers in every namespace, after winning the
//!   leader election Lease; serve `/metrics`, `/healthz` and `/readyz`.
//! - `crdgen [REPO_ROOT]`: write the CRD YAML into `crds/` and the chart.
//!
//! Environment: `RUST_LOG` (default `info`), `LATTICE_OPERATOR_LOG_FORMAT` (`json`, the
//! default, or `text`), `LATTICE_OPERATOR_METRICS_ADDR` (default `0.0.0.0:8080`),
//! `LATTICE_OPERATOR_NAMESPACE` (where the leader Lease lives; default: the service account's
//! namespace), `LATTICE_OPERATOR_WATCH_NAMESPACE` (reconcile only there; default: every
//! namespace), `LATTICE_OPERATOR_LEADER_ELECTION` (`false` to run without), `POD_NAME` (the
//! identity in the Lease and in Events).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use lattice_operator::controller::{self, Context};
use lattice_operator::leader::LeaderElection;
use lattice_operator::metrics::Metrics;

const LEASE_NAME: &str = "lattice-operator-leader";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("crdgen") => {
            let root = args.get(1).map_or_else(repo_root, PathBuf::from);
            lattice_operator::crdgen::write(&root)?;
            for (path, _) in lattice_operator::crdgen::generated()? {
                println!("wrote {}", root.join(path).display());
            }
            Ok(())
        }
        None | Some("run") => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
        }
        _ => anyhow::bail!("usage: lattice-operator [run | crdgen [REPO_ROOT]]"),
    }
}

/// The repository this binary was built from (crdgen is a development command).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("LATTICE_OPERATOR_LOG_FORMAT").as_deref() == Ok("text") {
        builder.init();
    } else {
        builder.json().init();
    }
}

async fn run() -> anyhow::Result<()> {
    init_logs();
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let leading = Arc::new(AtomicBool::new(false));
    let addr: SocketAddr = std::env::var("LATTICE_OPERATOR_METRICS_ADDR")
        .unwrap_or_else(|_| "0.0.0.0:8080".into())
        .parse()
        .context("LATTICE_OPERATOR_METRICS_ADDR")?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    tokio::spawn(serve_metrics(listener, metrics.clone(), leading.clone()));

    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("lattice-operator-{}", std::process::id()));
    let ctx = Arc::new(Context::new(client.clone(), metrics, Some(identity.clone())));

    if std::env::var("LATTICE_OPERATOR_LEADER_ELECTION").as_deref() == Ok("false") {
        leading.store(true, Ordering::Relaxed);
        controller::run(ctx, watch_namespace(), shutdown_signal()).await;
        return Ok(());
    }
    let ns = std::env::var("LATTICE_OPERATOR_NAMESPACE")
        .ok()
        .or_else(|| std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let election = LeaderElection::new(Api::<Lease>::namespaced(client, ns.trim()), LEASE_NAME, identity);
    tokio::select! {
        r = election.acquire() => r?,
        () = shutdown_signal() => return Ok(()),
    }
    leading.store(true, Ordering::Relaxed);
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let holder = election.clone();
    tokio::spawn(async move {
        let _ = lost_tx.send(holder.hold().await);
    });
    let lost = Arc::new(tokio::sync::Mutex::new(None));
    let lost_out = lost.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            e = lost_rx => { *lost_out.lock().await = e.ok(); }
        }
    };
    controller::run(ctx, watch_namespace(), stop).await;
    if let Some(e) = lost.lock().await.take() {
        // Exit so the pod restarts as a follower; another replica leads meanwhile.
        anyhow::bail!("stopped reconciling: {e}");
    }
    Ok(())
}

/// `LATTICE_OPERATOR_WATCH_NAMESPACE`: reconcile only there (default: every namespace).
fn watch_namespace() -> Option<String> {
    std::env::var("LATTICE_OPERATOR_WATCH_NAMESPACE").ok().filter(|s| !s.is_empty())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// `/metrics`, `/healthz` (the process is up) and `/readyz` (this replica leads).
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, leading: Arc<AtomicBool>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (metrics, leading) = (metrics.clone(), leading.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => (200, metrics.render()),
                    "/healthz" => (200, "ok\n".to_owned()),
                    "/readyz" if leading.load(Ordering::Relaxed) => (200, "leading\n".to_owned()),
                    "/readyz" => (503, "waiting for the leader Lease\n".to_owned()),
                    _ => (404, "not found\n".to_owned()),
                };
                let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
