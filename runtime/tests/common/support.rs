//! Test support: build guest components, start the real `lattice` binary with a config, and
//! talk to it over real HTTP(S).
#![allow(dead_code, reason = "each test binary uses a different part of the support module")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Builds a guest crate to `wasm32-wasip2` once per test process and returns its `.wasm`.
///
/// `cargo xtask ci` builds the guests first and sets `LATTICE_GUEST_DIR`; otherwise they are
/// built here, into a target directory of their own (the outer `cargo test` holds the lock of
/// its own).
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _lock = BUILT.get_or_init(|| Mutex::new(())).lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(dir) = std::env::var("LATTICE_GUEST_DIR") {
        let p = Path::new(&dir).join(format!("{name}.wasm"));
        assert!(p.exists(), "LATTICE_GUEST_DIR has no {name}.wasm");
        return p;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("guests");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", name, "--target", "wasm32-wasip2", "--profile", "guest"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building guest {name} failed");
    target.join("wasm32-wasip2/guest").join(format!("{name}.wasm"))
}

/// A name part no earlier run used.
pub fn unique() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}")
}

#[path = "../../../tests/src/ports.rs"]
mod ports;
pub use ports::free_port;

/// A running `lattice serve`; killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Embedded backends (SQLite, files) rather than PostgreSQL, Redis and S3.
    pub embedded: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- lattice log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options that differ between tests; everything else is a small embedded setup.
pub struct Setup {
    pub component: PathBuf,
    /// Extra TOML appended to the config (limits, outbound, tls ...).
    pub extra: String,
    /// Replaces the default `[tls] plain_http = true`.
    pub tls: Option<String>,
    /// Replaces the default embedded bindings section.
    pub bindings: Option<String>,
    pub envs: Vec<(String, String)>,
    /// Shares a secrets directory (and so the Durable Object namespace keys) with another server.
    pub secrets_dir: Option<PathBuf>,
}

impl Setup {
    pub fn new(component: PathBuf) -> Self {
        Self { component, extra: String::new(), tls: None, bindings: None, envs: vec![], secrets_dir: None }
    }
}

pub fn embedded_bindings(data: &Path) -> String {
    let d = data.display();
    format!(
        r#"
[d1.DB]
backend = "sqlite"
path = "{d}/d1.sqlite"

[kv.KV]
backend = "sqlite"
path = "{d}/kv.sqlite"

[r2.BUCKET]
backend = "fs"
path = "{d}/r2"

[durable_objects.COUNTERS]
class = "Counter"
unique_key_secret = "counters_key"
shards = 8
storage = {{ backend = "sqlite", path = "{d}/objects.sqlite" }}
"#
    )
}

pub fn write_config(dir: &Path, setup: &Setup, port: u16, admin_port: u16) -> PathBuf {
    let data = dir.join("data");
    let tls = setup.tls.clone().unwrap_or_else(|| "[tls]\nplain_http = true\n".into());
    let bindings = setup.bindings.clone().unwrap_or_else(|| embedded_bindings(&data));
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
data_dir = "{data}"

{tls}

[component]
path = "{component}"
cache_dir = "{cache}"

[secrets]
dir = "{secrets}"
generate = ["counters_key"]

[vars]
greeting = "hello"

[testing]
manual_clock_start_ms = 1700000000000

{bindings}

{extra}
"#,
        data = data.display(),
        component = setup.component.display(),
        cache = std::env::temp_dir().join("lattice-test-aot-cache").display(),
        extra = setup.extra,
        secrets = setup.secrets_dir.clone().unwrap_or_else(|| data.join("secrets")).display(),
    );
    let path = dir.join("lattice.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

pub fn lattice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lattice")
}

/// Starts `lattice serve` and waits until it accepts connections.
pub fn start(setup: Setup) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(dir, setup)
}

pub fn start_in(dir: tempfile::TempDir, setup: Setup) -> Server {
    let port = free_port();
    let admin_port = free_port();
    let config = write_config(dir.path(), &setup, port, admin_port);
    let log = std::fs::File::create(dir.path().join("lattice.log")).expect("log file");
    let child = Command::new(lattice_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .envs(setup.envs.iter().cloned())
        .env("LATTICE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start lattice");
    let scheme = if setup.tls.is_some() { "https" } else { "http" };
    let mut server = Server {
        child,
        url: format!("{scheme}://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        dir,
        port,
        embedded: setup.bindings.is_none(),
    };
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("lattice exited with {status} before serving:\n{}", server.log());
        }
        let up = std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if up {
            return server;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "lattice did not start:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lattice.log")).unwrap_or_default()
    }
}

/// Polls `cond` until it holds; panics with `context()` after `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "condition not met within {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `probe` until it yields a value; panics after 30 s (machines under load are slow, a
/// correct runtime gets there long before).
pub async fn eventually<T>(what: &str, probe: impl AsyncFn() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).expect("request");
    let resp = client().request(req).await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Reply { status, headers, body }
}

pub async fn get(url: &str) -> Reply {
    send("GET", url, &[], Bytes::new()).await
}

pub async fn post(url: &str, body: impl Into<Bytes>) -> Reply {
    send("POST", url, &[], body).await
}
