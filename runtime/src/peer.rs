//! Calls between runtime processes: a Durable Object call for a shard another process owns is
//! forwarded to the owner's internal listener over HTTP/2 (cleartext, prior knowledge; one
//! multiplexed connection per peer), authenticated with a shared secret.
//!
//! The peer listener is never the public one: bind it to the pod network and let a
//! NetworkPolicy admit only the deployment's own pods (the operator renders both). The secret
//! travels in a header, so the pod network must be trusted not to be sniffed; mTLS between pods
//! is not implemented yet.
//!
//! Wire format: `POST /_lattice/peer/v1/objects/<binding>/<id>?depth=N` with
//! `authorization: Lattice-Peer <hex secret>`; the body is the object request framed by
//! [`encode_request`]. A `200` carries the object's response framed by [`encode_response`]; any
//! other status is a refusal named by `lattice-peer-error`: `not-owner` (421: the call did not
//! run; the caller re-reads the routes and retries), `fenced`, `too-deep`, `invalid` (400) or
//! `unavailable` (503).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::bindings::{ObjectRequest, ObjectResponse};
use crate::metrics::Histogram;
use crate::objects::{ObjectError, ObjectNamespace, Objects};
use crate::runtime::Shared;

pub const PATH_PREFIX: &str = "/_lattice/peer/v1/objects/";
const ERROR_HEADER: &str = "lattice-peer-error";
/// Connecting to a peer: a dead pod's address answers nothing, so this bounds a failover's
/// first call.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);
/// A whole forwarded call (the owner's event has its own execution limit).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest framed request or response accepted from a peer.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Frames `fields` then `body`: each field as a big-endian u32 length and its bytes.
fn frame(fields: &[&[u8]], headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut put = |b: &[u8]| {
        out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(b);
    };
    for f in fields {
        put(f);
    }
    put(&u32::try_from(headers.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (k, v) in headers {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn field(&mut self) -> Result<&'a [u8], String> {
        let (len, rest) = self.0.split_first_chunk::<4>().ok_or("truncated frame")?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err("truncated frame".into());
        }
        let (f, rest) = rest.split_at(len);
        self.0 = rest;
        Ok(f)
    }

    fn text(&mut self) -> Result<String, String> {
        String::from_utf8(self.field()?.to_vec()).map_err(|_| "frame text is not UTF-8".to_owned())
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>, String> {
        let n = self.field()?;
        let n = u32::from_be_bytes(n.try_into().map_err(|_| "bad header count")?) as usize;
        let mut out = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            out.push((self.text()?, self.text()?));
        }
        Ok(out)
    }
}

pub fn encode_request(r: &ObjectRequest) -> Vec<u8> {
    frame(&[r.method.as_bytes(), r.path.as_bytes()], &r.headers, &r.body)
}

pub fn decode_request(b: &[u8]) -> Result<ObjectRequest, String> {
    let mut r = Reader(b);
    let method = r.text()?;
    let path = r.text()?;
    let headers = r.headers()?;
    Ok(ObjectRequest { method, path, headers, body: r.0.to_vec() })
}

pub fn encode_response(r: &ObjectResponse) -> Vec<u8> {
    frame(&[&r.status.to_be_bytes()], &r.headers, &r.body)
}

pub fn decode_response(b: &[u8]) -> Result<ObjectResponse, String> {
    let mut r = Reader(b);
    let status = u16::from_be_bytes(r.field()?.try_into().map_err(|_| "bad status")?);
    let headers = r.headers()?;
    Ok(ObjectResponse { status, headers, body: r.0.to_vec() })
}

/// Forwarded calls' outcomes and latency.
#[derive(Default)]
struct PeerMetrics {
    outcomes: std::collections::BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// The forwarding client.
pub struct Peers {
    client: Client<HttpConnector, Full<Bytes>>,
    authorization: Option<String>,
    metrics: Mutex<PeerMetrics>,
}

impl Peers {
    /// `secret`: the shared peer secret (none without placement: nothing is forwarded).
    pub fn new(secret: Option<&[u8]>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
        Self {
            client,
            authorization: secret.map(|s| format!("Lattice-Peer {}", hex::encode(s))),
            metrics: Mutex::new(PeerMetrics::default()),
        }
    }

    fn record(&self, outcome: &'static str, started: Instant) {
        if let Ok(mut m) = self.metrics.lock() {
            *m.outcomes.entry(outcome).or_default() += 1;
            m.latency.observe(started.elapsed());
        }
    }

    /// Sends one object call to the process at `address`.
    pub async fn forward(
        &self,
        address: &str,
        ns: &ObjectNamespace,
        id: &str,
        request: &ObjectRequest,
        depth: u32,
        shard: u32,
    ) -> Result<ObjectResponse, ObjectError> {
        let started = Instant::now();
        let result = self.call(address, &ns.binding, id, request, depth, shard).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ObjectError::NotOwner(_)) => "not_owner",
            Err(ObjectError::PeerUnreachable(_)) => "unreachable",
            Err(_) => "failed",
        };
        self.record(outcome, started);
        result
    }

    /// One forwarded call; `forward` counts its outcome.
    async fn call(
        &self,
        address: &str,
        binding: &str,
        id: &str,
        request: &ObjectRequest,
        depth: u32,
        shard: u32,
    ) -> Result<ObjectResponse, ObjectError> {
        let Some(auth) = &self.authorization else {
            return Err(ObjectError::PeerFailed("no peer secret configured".into()));
        };
        let uri = format!("{}{PATH_PREFIX}{binding}/{id}?depth={depth}", address.trim_end_matches('/'));
        let req = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header(http::header::AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(encode_request(request))))
            .map_err(|e| ObjectError::PeerFailed(format!("bad peer address {address}: {e}")))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ObjectError::PeerUnreachable(format!("{address}: {e}"))
                } else {
                    ObjectError::PeerFailed(format!("{address}: {e}"))
                }
            })?;
            let status = resp.status();
            let kind =
                resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_FRAME_BYTES)
                .collect()
                .await
                .map_err(|e| ObjectError::PeerFailed(format!("{address}: reading the answer: {e}")))?
                .to_bytes();
            if status == StatusCode::OK {
                return decode_response(&body).map_err(ObjectError::PeerFailed);
            }
            let message = String::from_utf8_lossy(&body).into_owned();
            Err(match kind.as_str() {
                "not-owner" => ObjectError::NotOwner(shard),
                "fenced" => ObjectError::Storage(lattice_backends::BackendError::Fenced { shard, epoch: 0 }),
                "too-deep" | "invalid" => ObjectError::PeerInvalid(message),
                _ => ObjectError::PeerFailed(format!("{address} answered {status}: {message}")),
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ObjectError::PeerFailed(format!("{address}: no answer in {CALL_TIMEOUT:?}"))),
        }
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# TYPE lattice_forwarded_calls_total counter\n");
        if let Ok(m) = self.metrics.lock() {
            for (outcome, n) in &m.outcomes {
                let _ = writeln!(out, "lattice_forwarded_calls_total{{outcome=\"{outcome}\"}} {n}");
            }
            out.push_str("# TYPE lattice_forwarded_call_duration_seconds histogram\n");
            m.latency.render(out, "lattice_forwarded_call_duration_seconds", "");
        }
    }
}

fn refuse(status: StatusCode, kind: &'static str, message: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(message)));
    *r.status_mut() = status;
    r.headers_mut().insert(ERROR_HEADER, http::HeaderValue::from_static(kind));
    r
}

/// Constant-time comparison of the presented credentials with ours.
fn authorized(presented: Option<&http::HeaderValue>, expected: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    let Some(p) = presented else { return false };
    // Comparing digests keeps the comparison's time independent of where the strings differ.
    Sha256::digest(p.as_bytes()) == Sha256::digest(expected.as_bytes())
}

async fn handle(shared: Arc<Shared>, expected: Arc<String>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(req.headers().get(http::header::AUTHORIZATION), &expected) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", "bad peer credentials".into());
    }
    let Some(rest) = req.uri().path().strip_prefix(PATH_PREFIX) else {
        return refuse(StatusCode::NOT_FOUND, "invalid", "no such peer route".into());
    };
    let Some((binding, id)) = rest.split_once('/') else {
        return refuse(StatusCode::NOT_FOUND, "invalid", "no such peer route".into());
    };
    let depth = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("depth=")))
        .and_then(|d| d.parse::<u32>().ok())
        .unwrap_or(0);
    let Some(ns) = shared.objects.namespaces.get(binding).cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "invalid", format!("no Durable Object binding {binding}"));
    };
    let id = match ns.id_from_string(id) {
        Ok(id) => id,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
    };
    let body = match http_body_util::Limited::new(req.into_body(), MAX_FRAME_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid", format!("reading the call: {e}")),
    };
    let request = match decode_request(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid", e),
    };
    match Objects::fetch_local(&shared, &ns, &id, request, depth).await {
        Ok(r) => Response::new(Full::new(Bytes::from(encode_response(&r)))),
        Err(e @ ObjectError::NotOwner(_)) => {
            refuse(StatusCode::MISDIRECTED_REQUEST, "not-owner", e.to_string())
        }
        Err(e @ ObjectError::Storage(lattice_backends::BackendError::Fenced { .. })) => {
            refuse(StatusCode::CONFLICT, "fenced", e.to_string())
        }
        Err(e @ ObjectError::TooDeep(_)) => refuse(StatusCode::BAD_REQUEST, "too-deep", e.to_string()),
        Err(e @ (ObjectError::Transaction(_) | ObjectError::PeerInvalid(_))) => {
            refuse(StatusCode::BAD_REQUEST, "invalid", e.to_string())
        }
        Err(e) => {
            tracing::warn!(error = %e, "forwarded Durable Object call failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the object is unavailable".into())
        }
    }
}

/// Serves forwarded calls on the internal listener until the process ends.
pub async fn serve(shared: Arc<Shared>, secret: Vec<u8>, listener: TcpListener) {
    let expected = Arc::new(format!("Lattice-Peer {}", hex::encode(&secret)));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let (shared, expected) = (shared.clone(), expected.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (shared, expected) = (shared.clone(), expected.clone());
                async move { Ok::<_, Infallible>(handle(shared, expected, req).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_truncation() {
        let req = ObjectRequest {
            method: "POST".into(),
            path: "/claim?op=é".into(),
            headers: vec![("a".into(), "1".into()), ("b".into(), String::new())],
            body: b"\x00\x01body".to_vec(),
        };
        let enc = encode_request(&req);
        let dec = decode_request(&enc).expect("decodes");
        assert_eq!(
            (dec.method, dec.path, dec.headers, dec.body),
            (req.method, req.path, req.headers, req.body)
        );
        for cut in [1, 5, 12] {
            assert!(decode_request(&enc[..cut]).is_err(), "truncated at {cut}");
        }
        let resp =
            ObjectResponse { status: 201, headers: vec![("x".into(), "y".into())], body: b"ok".to_vec() };
        let dec = decode_response(&encode_response(&resp)).expect("decodes");
        assert_eq!((dec.status, dec.headers, dec.body), (201, resp.headers, resp.body));
        assert!(decode_response(b"\x00\x00").is_err());
    }

    #[test]
    fn credentials_must_match() {
        let v = http::HeaderValue::from_static("Lattice-Peer 00ff");
        assert!(authorized(Some(&v), "Lattice-Peer 00ff"));
        assert!(!authorized(Some(&v), "Lattice-Peer 00fe"));
        assert!(!authorized(None, "Lattice-Peer 00ff"));
    }
}
