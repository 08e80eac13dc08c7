//! Runtime benchmarks (`cargo xtask bench`; figures go to BENCHMARKS.md):
//!
//! - instantiate-and-call: a fresh instance of the hello component from the pool, its
//!   `wasi:http` handler called with a request, the response read; no network;
//! - TLS handshakes against the runtime's own listener: X25519MLKEM768 vs X25519.
//!
//! Needs `LATTICE_GUEST_DIR` (set by `cargo xtask bench`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use lattice_runtime::config::Config;
use lattice_runtime::runtime::Shared;
use lattice_runtime::{engine, server, tls};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name}: n={} p50={:.1}µs p99={:.1}µs mean={:.1}µs",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
    );
}

fn config(dir: &std::path::Path, component: &std::path::Path, tls: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{d}\"\n{tls}\n[component]\npath = \"{c}\"\n",
        d = dir.display(),
        c = component.display()
    );
    Config::parse(std::path::Path::new("bench.toml"), &text).expect("config")
}

async fn instantiate_and_call(component: &std::path::Path, label: &str, keep_resident: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!("[tls]\nplain_http = true\n[limits]\nmemory_keep_resident_bytes = {keep_resident}\n");
    let shared = Shared::build(config(dir.path(), component, &extra)).await.expect("build");
    let _ticker = engine::EpochTicker::start(&shared.engine);
    let (parts, ()) = http::Request::builder()
        .uri("http://localhost/")
        .header("host", "localhost")
        .body(())
        .expect("request")
        .into_parts();
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..22_000 {
        let started = Instant::now();
        let resp = server::respond(&shared, Scheme::Http, &parts, Bytes::new()).await;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let took = started.elapsed();
        assert_eq!(&body[..], b"Hello from Lattice\n");
        if i >= 2_000 {
            samples.push(took);
        }
    }
    report(
        &format!("instantiate+call hello (in process, no network, {label}, keep-resident {keep_resident} B)"),
        samples,
    );
}

async fn handshakes(component: &std::path::Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("key");
    let tls_cfg = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let config = config(dir.path(), component, &tls_cfg);
    let certs =
        tls::CertReloader::new(dir.path().join("cert.pem"), dir.path().join("key.pem")).expect("certs");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        tls::server_config(config.tls.post_quantum, certs).expect("tls"),
    ));
    let shared = Shared::build(config).await.expect("build");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(server::serve(shared, listener, Some(acceptor), std::future::pending()));

    for (name, groups) in [
        ("TLS 1.3 handshake X25519MLKEM768", vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768]),
        ("TLS 1.3 handshake X25519", vec![rustls::crypto::aws_lc_rs::kx_group::X25519]),
    ] {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = groups;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // No resumption: every handshake is a full one.
        let mut client = client;
        client.resumption = rustls::client::Resumption::disabled();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let mut samples = Vec::new();
        for i in 0..1_100 {
            let started = Instant::now();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let stream = connector
                .connect(rustls_pki_types::ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("handshake");
            let took = started.elapsed();
            drop(stream);
            if i >= 100 {
                samples.push(took);
            }
        }
        report(name, samples);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let Some(dir) = std::env::var_os("LATTICE_GUEST_DIR") else {
        eprintln!("set LATTICE_GUEST_DIR (cargo xtask bench does)");
        return;
    };
    let hello = PathBuf::from(dir).join("hello.wasm");
    // One thread: what a pod pinned to one core does per request. Then the default
    // multi-threaded runtime, where the guest task and the caller may sit on different threads.
    let one = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for keep in [0, 64 << 10, 1 << 20] {
        one.block_on(instantiate_and_call(&hello, "current-thread runtime", keep));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        instantiate_and_call(&hello, "multi-thread runtime", 0).await;
        handshakes(&hello).await;
    });
}
