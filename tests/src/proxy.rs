//! A loopback HTTP proxy that checks every response of the server under test against the Matrix
//! OpenAPI definitions ([`crate::openapi::Validator`]) and passes it on unchanged.
//!
//! Clients under test are pointed at [`ValidatingProxy::url`]; the test asserts
//! [`ValidatingProxy::assert_clean`] at the end. Requests are forwarded as they come (method,
//! path and query, headers including `Host`, body); redirects are not followed and bodies are
//! not decompressed, so the client sees exactly what the server sent. There is no timeout, so
//! long-polling `/sync` works, and every connection is served on its own task.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::openapi::Validator;

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A running proxy; stops (with its connections) when dropped.
pub struct ValidatingProxy {
    /// `http://127.0.0.1:<port>`, without trailing slash.
    pub url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    violations: Mutex<Vec<String>>,
    validated: AtomicUsize,
}

impl ValidatingProxy {
    /// Listens on 127.0.0.1:<free port>, forwards every request to `upstream` (e.g.
    /// `http://127.0.0.1:1234`) and returns the upstream response unchanged, after validating
    /// JSON responses with [`Validator::get`]. Runs on a task of the current tokio runtime.
    pub async fn start(upstream: &str) -> ValidatingProxy {
        // Load the definitions before the first request, and off the runtime's threads.
        tokio::task::spawn_blocking(Validator::get).await.expect("loading the Matrix OpenAPI definitions");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the validating proxy");
        let addr = listener.local_addr().expect("the validating proxy's address");
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .build()
            .expect("building the validating proxy's client");
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client,
            violations: Mutex::new(Vec::new()),
            validated: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        ValidatingProxy { url: format!("http://{addr}"), shared, task }
    }

    /// Violations seen so far, one string each: method, path, status, the validator's message.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().expect("the violations lock").clone()
    }

    /// How many responses were validated against a matching operation (conforming or not).
    pub fn validated(&self) -> usize {
        self.shared.validated.load(Ordering::SeqCst)
    }

    /// Panics listing all violations if there are any.
    pub fn assert_clean(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "{} response(s) do not match the Matrix OpenAPI definitions ({} validated):\n\n{}",
            violations.len(),
            self.validated(),
            violations.join("\n\n")
        );
    }
}

impl Drop for ValidatingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (when the proxy is dropped and this task aborted) ends every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("validating proxy: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| shared.clone().forward(request));
                    let served =
                        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                    if let Err(e) = served {
                        eprintln!("validating proxy: connection: {e}");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

impl Shared {
    async fn forward(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let (parts, body) = request.into_parts();
        let method = parts.method.clone();
        let path = parts.uri.path().to_owned();
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return Ok(proxy_error(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}")));
            }
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        // HTTP/2 requests carry the host in the URI only.
        if !headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, host);
        }

        let sent = self
            .client
            .request(method.clone(), format!("{}{path_and_query}", self.upstream))
            .headers(headers)
            .body(body)
            .send()
            .await;
        let upstream = match sent {
            Ok(upstream) => upstream,
            Err(e) => {
                return Ok(proxy_error(StatusCode::BAD_GATEWAY, &format!("forwarding to the server: {e}")));
            }
        };
        let status = upstream.status();
        let mut headers = upstream.headers().clone();
        let body = match upstream.bytes().await {
            Ok(body) => body,
            Err(e) => {
                return Ok(proxy_error(
                    StatusCode::BAD_GATEWAY,
                    &format!("reading the server's response: {e}"),
                ));
            }
        };
        strip_hop_by_hop(&mut headers);

        let checked = {
            let (headers, body, method_name) = (headers.clone(), body.clone(), method.to_string());
            tokio::task::spawn_blocking(move || check(&method_name, &path, status.as_u16(), &headers, &body))
                .await
                .unwrap_or_else(|e| {
                    Err(format!("{method} {}: the validator panicked: {e}", parts.uri.path()))
                })
        };
        match checked {
            Ok(true) => {
                self.validated.fetch_add(1, Ordering::SeqCst);
            }
            Ok(false) => {}
            Err(message) => {
                self.validated.fetch_add(1, Ordering::SeqCst);
                let violation = format!("{method} {} -> {}: {message}", parts.uri.path(), status.as_u16());
                self.violations.lock().expect("the violations lock").push(violation);
            }
        }

        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// `Ok(true)`: validated and conforming; `Ok(false)`: not validated (no matching operation, a
/// `HEAD` request, a compressed body, or a non-JSON body where none is documented).
fn check(method: &str, path: &str, status: u16, headers: &HeaderMap, body: &[u8]) -> Result<bool, String> {
    if method.eq_ignore_ascii_case("HEAD") {
        return Ok(false);
    }
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.to_str().is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity")));
    if encoded {
        return Ok(false);
    }
    let validator = Validator::get();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|ct| ct.to_str().ok());
    let is_json = content_type.is_some_and(|ct| {
        let media_type = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        media_type == "application/json" || media_type.ends_with("+json")
    });
    if is_json {
        return match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(value) => validator.validate(method, path, status, &value),
            Err(e) => match validator.operation(method, path) {
                Some(op) => Err(format!("{op}, status {status}: the body is not valid JSON: {e}")),
                None => Ok(false),
            },
        };
    }
    match validator.documents_json(method, path, status) {
        Some(true) => Err(format!(
            "{}, status {status}: documented as application/json, but the response's content type is {}",
            validator.operation(method, path).unwrap_or_default(),
            content_type.map_or_else(|| "missing".to_owned(), |ct| format!("{ct:?}"))
        )),
        _ => Ok(false),
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn proxy_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    eprintln!("validating proxy: {message}");
    let body =
        serde_json::json!({ "errcode": "M_UNKNOWN", "error": format!("lattice-e2e proxy: {message}") });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
