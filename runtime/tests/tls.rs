//! TLS: the hybrid post-quantum group is negotiated by default, `required` refuses classical
//! clients, HTTP/2 is offered, and certificates are reloaded when their files change.

#[path = "common/support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rustls::crypto::aws_lc_rs;
use rustls_pki_types::{CertificateDer, ServerName};
use support::{Setup, guest, start};

/// A self-signed end-entity certificate for `localhost` (CA:FALSE, as webpki wants).
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    // Write to temporary names and rename, so a reload never sees half a pair.
    std::fs::write(dir.join("cert.pem.tmp"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem.tmp"), key.serialize_pem()).expect("write key");
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).expect("rename");
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).expect("rename");
    cert.der().clone()
}

fn tls_setup(dir: &Path, pq: &str) -> Setup {
    let mut s = Setup::new(guest("hello"));
    s.bindings = Some(String::new());
    s.tls = Some(format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\npost_quantum = \"{pq}\"\nreload_interval_ms = 50\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    ));
    s
}

fn client(
    root: &CertificateDer<'static>,
    groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut provider = aws_lc_rs::default_provider();
    if let Some(g) = groups {
        provider.kx_groups = g;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn connect(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await
}

async fn get_over(stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, h2: bool) -> (u16, Bytes) {
    let io = hyper_util::rt::TokioIo::new(stream);
    let req = http::Request::builder().uri("https://localhost/").body(Full::new(Bytes::new())).expect("req");
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .expect("h2");
        tokio::spawn(conn);
        send.send_request(req).await.expect("send")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("req");
        send.send_request(req).await.expect("send")
    };
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.expect("body").to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_quantum_group_is_negotiated_by_default_and_classical_clients_still_served() {
    let certs = tempfile::tempdir().expect("tempdir");
    let root = write_cert(certs.path());
    let server = start(tls_setup(certs.path(), "preferred"));

    let pq = client(&root, None, &[b"http/1.1"]);
    let stream = connect(&pq, server.port).await.expect("handshake");
    let group = stream.get_ref().1.negotiated_key_exchange_group().map(|g| g.name());
    assert_eq!(group, Some(rustls::NamedGroup::X25519MLKEM768));
    assert_eq!(stream.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let (status, body) = get_over(stream, false).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"Hello from Lattice\n");

    let classical = client(&root, Some(vec![aws_lc_rs::kx_group::X25519]), &[b"http/1.1"]);
    let stream = connect(&classical, server.port).await.expect("classical handshake");
    assert_eq!(
        stream.get_ref().1.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
    assert_eq!(get_over(stream, false).await.0, 200);

    // HTTP/2 by ALPN.
    let h2 = client(&root, None, &[b"h2"]);
    let stream = connect(&h2, server.port).await.expect("h2 handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(get_over(stream, true).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_post_quantum_refuses_classical_clients() {
    let certs = tempfile::tempdir().expect("tempdir");
    let root = write_cert(certs.path());
    let server = start(tls_setup(certs.path(), "required"));
    let classical =
        client(&root, Some(vec![aws_lc_rs::kx_group::X25519, aws_lc_rs::kx_group::SECP256R1]), &[]);
    assert!(connect(&classical, server.port).await.is_err(), "a classical-only client was served");
    let pq = client(&root, None, &[]);
    let stream = connect(&pq, server.port).await.expect("PQ handshake");
    assert_eq!(
        stream.get_ref().1.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_files_change() {
    let certs = tempfile::tempdir().expect("tempdir");
    let first = write_cert(certs.path());
    let server = start(tls_setup(certs.path(), "preferred"));
    let stream = connect(&client(&first, None, &[]), server.port).await.expect("handshake");
    assert_eq!(stream.get_ref().1.peer_certificates().map(|c| c[0].clone()), Some(first.clone()));
    // Make sure the new files get a later modification time.
    std::thread::sleep(Duration::from_millis(20));
    let second = write_cert(certs.path());
    let mut served = None;
    for _ in 0..200 {
        let conn = connect(&client(&second, None, &[]), server.port).await;
        if let Ok(s) = conn {
            served = s.get_ref().1.peer_certificates().map(|c| c[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(served, Some(second), "the new certificate was never served");
}

/// Outbound requests use the same PQ-preferring TLS, trust `outbound.extra_ca`, and follow
/// `outbound.overrides`: a worker calls another runtime over HTTPS, which counts the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_https_is_post_quantum_and_trusts_extra_ca() {
    let certs = tempfile::tempdir().expect("tempdir");
    write_cert(certs.path());
    let target = start(tls_setup(certs.path(), "preferred"));
    let mut caller = Setup::new(guest("conformance"));
    caller.extra = format!(
        "[outbound]\nextra_ca = [\"{}\"]\noverrides = {{ \"localhost\" = \"127.0.0.1:{}\" }}\n",
        certs.path().join("cert.pem").display(),
        target.port
    );
    let caller = start(caller);
    let r = support::get(&format!("{}/outbound?url=https://localhost/", caller.url)).await;
    assert_eq!(r.json()["status"], 200, "{}", String::from_utf8_lossy(&r.body));
    let m = support::get(&format!("{}/metrics", target.admin)).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("lattice_tls_handshakes_total{group=\"X25519MLKEM768\"} 1"), "{text}");
}
