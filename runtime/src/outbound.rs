//! Outbound `wasi:http` requests under a policy: loopback and private ranges are denied unless
//! allowed (server-side request forgery), an optional host allow-list, explicit name overrides,
//! and the same PQ-preferring TLS as inbound (with extra trusted CAs).
//!
//! The destination address is vetted after resolution and the connection goes to that vetted
//! address, so DNS rebinding cannot slip a private address past the check.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::config::OutboundConfig;

pub struct OutboundPolicy {
    allow_private: bool,
    allow_hosts: Vec<String>,
    overrides: BTreeMap<String, SocketAddr>,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl OutboundPolicy {
    pub fn new(c: &OutboundConfig) -> anyhow::Result<Self> {
        let tls = crate::tls::client_config(c.post_quantum, &c.extra_ca)?;
        Ok(Self {
            allow_private: c.allow_private,
            allow_hosts: c.allow_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            overrides: c.overrides.iter().map(|(k, v)| (k.to_ascii_lowercase(), *v)).collect(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout: Duration::from_millis(c.timeout_ms),
        })
    }

    /// Where to connect for `host:port`, or why not.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, HttpError> {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if !self.allow_hosts.is_empty() && !self.allow_hosts.contains(&host) {
            return Err(HttpError::HttpRequestDenied);
        }
        if let Some(addr) = self.overrides.get(&host) {
            return Ok(*addr);
        }
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(self.timeout, tokio::net::lookup_host((host.as_str(), port)))
                .await
                .map_err(|_| HttpError::DnsTimeout)?
                .map_err(|_| HttpError::DestinationNotFound)?
                .collect(),
        };
        let allowed = addrs.into_iter().find(|a| self.allow_private || is_public(a.ip()));
        allowed.ok_or(HttpError::DestinationIpProhibited)
    }
}

/// Whether an address is publicly routable (not loopback, private, link-local, unique-local,
/// carrier-grade NAT, documentation, multicast or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 198 && (o[1] & 0xfe) == 18))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// The `wasi:http` hooks of one store.
pub struct OutboundHooks {
    policy: Arc<OutboundPolicy>,
}

impl OutboundHooks {
    pub fn new(policy: Arc<OutboundPolicy>) -> Self {
        Self { policy }
    }
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let policy = self.policy.clone();
        Box::new(async move { send(policy, request, options).await })
    }
}

async fn send(
    policy: Arc<OutboundPolicy>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)> {
    let uri = request.uri().clone();
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(HttpError::HttpRequestUriInvalid),
    };
    let host = uri.host().ok_or(HttpError::HttpRequestUriInvalid)?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(policy.timeout);
    let first_byte = options.and_then(|o| o.first_byte_timeout).unwrap_or(policy.timeout);
    let addr = policy.resolve(&host, port).await?;
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(|_| HttpError::ConnectionRefused)?;
    let _ = tcp.set_nodelay(true);
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(uri.path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let io: Box<dyn Io> = if tls {
        let name = ServerName::try_from(host.clone()).map_err(|_| HttpError::HttpRequestUriInvalid)?;
        let stream = tokio::time::timeout(connect_timeout, policy.tls.connect(name, tcp))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(|_| HttpError::TlsCertificateError)?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(io)).await?;
    let conn_task = tokio::spawn(conn);
    let response = tokio::time::timeout(first_byte, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??;
    let response = response.map(|b| b.map_err(HttpError::from).boxed_unsync());
    let worker: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> = Box::new(async move {
        match conn_task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(HttpError::from(e)),
            Err(_) => Err(HttpError::ConnectionTerminated),
        }
    });
    Ok((response, worker))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "198.18.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))), "{ip} counted as public");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))), "{ip} counted as private");
        }
    }

    fn policy(allow_private: bool, hosts: &[&str], overrides: &[(&str, &str)]) -> OutboundPolicy {
        let c = OutboundConfig {
            allow_private,
            allow_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            overrides: overrides.iter().filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?))).collect(),
            timeout_ms: 1000,
            ..Default::default()
        };
        match OutboundPolicy::new(&c) {
            Ok(p) => p,
            Err(e) => panic!("policy: {e}"),
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed() {
        let deny = policy(false, &[], &[]);
        assert!(matches!(deny.resolve("127.0.0.1", 80).await, Err(HttpError::DestinationIpProhibited)));
        assert!(matches!(deny.resolve("localhost", 80).await, Err(HttpError::DestinationIpProhibited)));
        let allow = policy(true, &[], &[]);
        assert!(allow.resolve("127.0.0.1", 80).await.is_ok());
    }

    #[tokio::test]
    async fn allow_list_and_overrides() {
        let p = policy(false, &["peer.example.org"], &[("peer.example.org", "127.0.0.1:8448")]);
        assert_eq!(p.resolve("peer.example.org", 443).await.ok(), "127.0.0.1:8448".parse().ok());
        assert!(matches!(p.resolve("other.example.org", 443).await, Err(HttpError::HttpRequestDenied)));
    }
}
