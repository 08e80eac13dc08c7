//! The admin listener: `/healthz`, `/readyz`, `/metrics` (and the test clock when enabled), and
//! `/component/...`: the component's own HTTP handler for operator tools on the pod (`lattice
//! call`). The admin listener binds loopback or a pod-internal address and is never routed from
//! outside, so a component can put administrative routes behind it (it still authenticates
//! them: the runtime passes requests through unchanged).
//!
//! Readiness means "this pod can serve": the component is loaded, the listener is up and the
//! pod is not draining. A backend outage does not make a pod unready — every pod shares the
//! same backends, so failing readiness would empty the Service at once; instead requests that
//! need the backend get 503 with Retry-After, and `/readyz` lists backend status in its body.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use crate::runtime::Shared;
use crate::server::{Body, full};

pub struct AdminState {
    pub shared: Arc<Shared>,
    pub draining: AtomicBool,
}

/// The admin listener's prefix for requests passed to the component.
pub const COMPONENT_PREFIX: &str = "/component";

async fn route(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    if let Some(rest) = req.uri().path().strip_prefix(COMPONENT_PREFIX)
        && rest.starts_with('/')
    {
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        };
        let (mut parts, body) = req.into_parts();
        match http::Uri::builder().path_and_query(path_and_query).build() {
            Ok(uri) => parts.uri = uri,
            Err(_) => return full(StatusCode::BAD_REQUEST, r#"{"error":"bad path"}"#),
        }
        return crate::server::handle(state.shared.clone(), Scheme::Http, Request::from_parts(parts, body))
            .await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => full(StatusCode::OK, r#"{"status":"ok"}"#),
        (&Method::GET, "/readyz") => {
            let draining = state.draining.load(Ordering::SeqCst);
            let backends = state.shared.backend_status();
            let body = serde_json::json!({ "ready": !draining, "draining": draining, "backends": backends });
            let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
            full(status, body.to_string())
        }
        (&Method::GET, "/metrics") => {
            let mut text = state.shared.metrics.render();
            text.push_str("# TYPE lattice_backend_up gauge\n");
            for b in state.shared.backend_status() {
                text.push_str(&format!(
                    "lattice_backend_up{{binding=\"{}\",backend=\"{}\"}} {}\n",
                    b.binding,
                    b.backend,
                    u8::from(b.up)
                ));
            }
            text.push_str("# TYPE lattice_live_objects gauge\n# TYPE lattice_object_commits_total counter\n# TYPE lattice_fenced_writes_total counter\n# TYPE lattice_object_joined_batches_total counter\n");
            for (name, ns) in &state.shared.objects.namespaces {
                text.push_str(&format!("lattice_live_objects{{namespace=\"{name}\"}} {}\n", ns.live_count()));
                text.push_str(&format!(
                    "lattice_object_commits_total{{namespace=\"{name}\"}} {}\n",
                    ns.commit_count()
                ));
                text.push_str(&format!(
                    "lattice_fenced_writes_total{{store=\"objects\",namespace=\"{name}\"}} {}\n",
                    ns.fenced_count()
                ));
                text.push_str(&format!(
                    "lattice_object_joined_batches_total{{namespace=\"{name}\"}} {}\n",
                    ns.joined_count()
                ));
            }
            text.push_str(&format!(
                "lattice_fenced_writes_total{{store=\"d1\"}} {}\n",
                state.shared.metrics.fenced_d1_writes.load(std::sync::atomic::Ordering::Relaxed)
            ));
            state.shared.objects.placement.render_metrics(&mut text);
            state.shared.peers.render_metrics(&mut text);
            let mut r = full(StatusCode::OK, text);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::POST, "/testing/clock/advance") => {
            let ms = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
                .and_then(|v| v.parse::<u64>().ok());
            match ms {
                Some(ms) if state.shared.clock.advance(ms) => {
                    full(StatusCode::OK, format!("{{\"now_ms\":{}}}", state.shared.clock.now_ms()))
                }
                Some(_) => full(StatusCode::NOT_FOUND, r#"{"error":"no manual clock"}"#),
                None => full(StatusCode::BAD_REQUEST, r#"{"error":"ms=N required"}"#),
            }
        }
        _ => full(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
    }
}

pub async fn serve(state: Arc<AdminState>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
