//! Listeners and the request path.
//!
//! client → TLS 1.3 (or plain HTTP behind an ingress) → hyper (HTTP/1.1, HTTP/2) → body read
//! up to the host hard limit (413 before any guest runs) → a fresh instance from the pool →
//! `wasi:http/incoming-handler` → response. A guest that asked to park is dropped (freeing its
//! slot) and called again with the same request when a key is signalled or the park times out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{Error as HttpError, WasiHttpView as _};

use crate::runtime::Shared;
use crate::signals::Wake;
use crate::state::{ParkRequest, WorkerState, arm_deadline};

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, HttpError>;

/// How long a request waits for a free instance slot before it gets 503.
pub const POOL_WAIT: Duration = Duration::from_secs(5);

/// The header a re-run parked request carries.
pub const WAKE_HEADER: &str = "lattice-wake";

pub fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into()).map_err(|e: Infallible| -> HttpError { match e {} }).boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(status: StatusCode, message: &str, retry_after: Option<u32>) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = full(status, body);
    if let Some(s) = retry_after {
        r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// The outcome of one invocation of the guest's HTTP handler.
enum Invocation {
    Respond(Response<Body>),
    Park(ParkRequest, u64),
}

async fn invoke(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: &Bytes,
    scheme: &Scheme,
    wake: Option<Wake>,
    note: Option<Vec<u8>>,
) -> Invocation {
    let mut state = WorkerState::new(shared.clone(), None, 0);
    state.inv.note = note;
    let park = state.inv.park.clone();
    let since = state.inv.signal_seq_at_start;
    let mut store = wasmtime::Store::new(&shared.engine, state);
    store.limiter(|s| &mut s.limits);
    arm_deadline(&mut store);

    let mut req =
        Request::builder().method(parts.method.clone()).uri(parts.uri.clone()).version(parts.version);
    if let Some(h) = req.headers_mut() {
        *h = parts.headers.clone();
        h.remove(WAKE_HEADER);
        if let Some(w) = wake {
            h.insert(WAKE_HEADER, HeaderValue::from_static(w.as_str()));
        }
    }
    let req = match req.body(Full::new(body.clone()).map_err(|e: Infallible| -> HttpError { match e {} })) {
        Ok(r) => r,
        Err(_) => {
            return Invocation::Respond(error_response(StatusCode::BAD_REQUEST, "malformed request", None));
        }
    };
    let (incoming, outparam, rx) = {
        let mut http = store.data_mut().http();
        let incoming = match http.new_incoming_request(scheme.clone(), req) {
            Ok(r) => r,
            Err(_) => {
                return Invocation::Respond(error_response(
                    StatusCode::BAD_REQUEST,
                    "request without a host",
                    None,
                ));
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let outparam = match http.new_response_outparam(tx) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "resource table");
                return Invocation::Respond(error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                    None,
                ));
            }
        };
        (incoming, outparam, rx)
    };
    // Wait for a slot rather than failing a burst outright.
    let permit = match tokio::time::timeout(POOL_WAIT, shared.http_slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return Invocation::Respond(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "server busy",
                Some(1),
            ));
        }
    };
    let pre = shared.prepared.proxy.clone();
    let metrics = shared.metrics.clone();
    let task = tokio::spawn(async move {
        let result = async {
            let t0 = Instant::now();
            let proxy = pre.instantiate_async(&mut store).await?;
            metrics.instantiated(t0.elapsed());
            proxy.wasi_http_incoming_handler().call_handle(&mut store, incoming, outparam).await
        }
        .await;
        // The slot is free once the instance is gone.
        drop(store);
        drop(permit);
        result
    });
    let parked = || park.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match rx.await {
        Ok(Ok(resp)) => {
            if let Some(p) = parked() {
                drop(resp);
                let _ = task.await;
                return Invocation::Park(p, since);
            }
            Invocation::Respond(resp)
        }
        Ok(Err(code)) => {
            tracing::warn!(?code, "guest answered with an error code");
            Invocation::Respond(error_response(StatusCode::INTERNAL_SERVER_ERROR, "the worker failed", None))
        }
        Err(_) => match task.await {
            Ok(Ok(())) => match parked() {
                Some(p) => Invocation::Park(p, since),
                None => Invocation::Respond(error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the worker did not respond",
                    None,
                )),
            },
            Ok(Err(e)) => Invocation::Respond(trap_response(shared, &e)),
            Err(e) => {
                tracing::error!(error = %e, "guest task panicked");
                Invocation::Respond(error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error", None))
            }
        },
    }
}

fn trap_response(shared: &Shared, e: &wasmtime::Error) -> Response<Body> {
    if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        shared.metrics.guest_deadline.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("guest stopped at its execution deadline");
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "the worker ran out of time", Some(1));
    }
    let text = format!("{e:#}");
    if e.is::<wasmtime::PoolConcurrencyLimitError>() {
        tracing::warn!(error = %text, "instance pool exhausted");
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "server busy", Some(1));
    }
    shared.metrics.guest_traps.fetch_add(1, Ordering::Relaxed);
    tracing::error!(error = %text, "guest trapped");
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "the worker failed", None)
}

/// Serves one request end to end, parking it as often as the guest asks.
pub async fn handle(shared: Arc<Shared>, scheme: Scheme, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let resp = handle_inner(&shared, scheme, req).await;
    shared.metrics.request(resp.status().as_u16(), started.elapsed());
    resp
}

async fn handle_inner(shared: &Arc<Shared>, scheme: Scheme, req: Request<Incoming>) -> Response<Body> {
    let limits = &shared.config.limits;
    let max = limits.max_request_body_bytes;
    let too_large = || {
        shared.metrics.rejected_body_too_large.fetch_add(1, Ordering::Relaxed);
        error_response(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {max} bytes"), None)
    };
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let limited = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
    let body =
        match tokio::time::timeout(Duration::from_millis(limits.body_timeout_ms), limited.collect()).await {
            Err(_) => return error_response(StatusCode::REQUEST_TIMEOUT, "request body too slow", None),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Ok(Err(_)) => return error_response(StatusCode::BAD_REQUEST, "request body broken", None),
            Ok(Ok(c)) => c.to_bytes(),
        };
    respond(shared, scheme, &parts, body).await
}

/// Serves a request whose body is already read: instantiate, call, park as often as asked.
pub async fn respond(
    shared: &Arc<Shared>,
    scheme: Scheme,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response<Body> {
    let limits = &shared.config.limits;
    let mut wake = None;
    let mut note = None;
    loop {
        match invoke(shared, parts, &body, &scheme, wake, note.take()).await {
            Invocation::Respond(r) => return r,
            Invocation::Park(p, since) => {
                if wake == Some(Wake::Shutdown) {
                    return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down", Some(1));
                }
                let parked = shared.metrics.parked.fetch_add(1, Ordering::SeqCst);
                if parked >= i64::from(limits.max_parked) {
                    shared.metrics.parked.fetch_sub(1, Ordering::SeqCst);
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many waiting requests",
                        Some(1),
                    );
                }
                shared.metrics.parked_total.fetch_add(1, Ordering::Relaxed);
                let w = shared.signals.wait(&p.keys, since, p.timeout).await;
                shared.metrics.parked.fetch_sub(1, Ordering::SeqCst);
                wake = Some(w);
                note = p.note;
            }
        }
    }
}

/// Runs the public listener until `shutdown` resolves, then drains.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = shared.config.limits.clone();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let scheme = if tls.is_some() { Scheme::Https } else { Scheme::Http };
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        let scheme = scheme.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = Duration::from_millis(limits.header_timeout_ms);
        tokio::spawn(async move {
            let metrics = shared.metrics.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let scheme = scheme.clone();
                async move { Ok::<_, Infallible>(handle(shared, scheme, req).await) }
            });
            match tls {
                Some(acceptor) => {
                    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            metrics.tls_handshake("failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let group = stream.get_ref().1.negotiated_key_exchange_group().map(|g| g.name());
                    metrics.tls_handshake(&group.map_or_else(|| "none".to_owned(), |g| format!("{g:?}")));
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    tracing::info!("draining: answering parked requests and finishing in-flight ones");
    shared.signals.shutdown();
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over; dropping remaining connections");
    }
    Ok(())
}

/// Binds a listener, logging its address.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
