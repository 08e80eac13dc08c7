//! End-to-end test support: start the homeserver component on the real `lattice` runtime, on
//! embedded defaults or on PostgreSQL/Redis/S3, and talk to it.
//!
//! # Layout
//! - this file: [`Homeserver`] (a running `lattice serve` with the homeserver component) and
//!   [`Backend`];
//! - `openapi.rs`: validates responses against the Matrix OpenAPI definitions in
//!   `tests/matrix-spec/`; `proxy.rs`: a loopback proxy that validates every response the
//!   clients under test receive.
//!
//! Binaries: `cargo xtask ci` sets `LATTICE_BIN` (the runtime) and `LATTICE_GUEST_DIR` (the
//! components). Without them the tests look in the cargo target directory and say what to
//! build when something is missing.

pub mod openapi;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which bindings the homeserver runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite and local files, nothing installed.
    Embedded,
    /// PostgreSQL, Redis and S3 from `scripts/services.sh`.
    Production,
}

fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            let out = Command::new(env!("CARGO"))
                .args(["metadata", "--no-deps", "--format-version", "1"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v["target_directory"].as_str().map(PathBuf::from)
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The `lattice` runtime binary.
pub fn lattice_bin() -> PathBuf {
    let p = std::env::var("LATTICE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target_dir().join("debug/lattice"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p lattice-runtime` or `cargo xtask ci`",
        p.display()
    );
    p
}

/// The homeserver component.
pub fn homeserver_wasm() -> PathBuf {
    let dir = std::env::var("LATTICE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target_dir().join("wasm32-wasip2/guest"));
    let p = dir.join("lattice_homeserver.wasm");
    assert!(p.exists(), "{} is missing: run `cargo xtask guests` or `cargo xtask ci`", p.display());
    p
}

mod ports;
pub use ports::free_port;

/// A name part no earlier run used.
pub fn unique() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}")
}

/// Options for a test homeserver.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    /// `[vars]` beyond the defaults (`server_name`, open registration, no rate limits).
    pub vars: Vec<(String, String)>,
    /// PostgreSQL database to use instead of a fresh one ([`Backend::Production`]).
    pub database_url: Option<String>,
    /// The server name; a fresh one by default.
    pub server_name: Option<String>,
    /// The compiled-component cache; the tests' shared one by default.
    pub cache_dir: Option<PathBuf>,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self { backend, vars: Vec::new(), database_url: None, server_name: None, cache_dir: None }
    }
    pub fn cache_dir(mut self, dir: &std::path::Path) -> Self {
        self.cache_dir = Some(dir.to_owned());
        self
    }
    pub fn database_url(mut self, url: &str) -> Self {
        self.database_url = Some(url.to_owned());
        self
    }
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_owned());
        self
    }
    pub fn var(mut self, k: &str, v: &str) -> Self {
        self.vars.push((k.to_owned(), v.to_owned()));
        self
    }
}

/// A running homeserver; the process is killed on drop.
pub struct Homeserver {
    child: Child,
    /// The client API base URL (plain HTTP on loopback).
    pub url: String,
    pub admin_url: String,
    pub server_name: String,
    pub dir: tempfile::TempDir,
    pub backend: Backend,
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- lattice log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The production services' settings, or `None` (skip) when they are not configured.
pub fn services() -> Option<std::collections::HashMap<&'static str, String>> {
    let vars = [
        "LATTICE_TEST_POSTGRES_URL",
        "LATTICE_TEST_REDIS_URL",
        "LATTICE_TEST_S3_ENDPOINT",
        "LATTICE_TEST_S3_REGION",
        "LATTICE_TEST_S3_BUCKET",
        "LATTICE_TEST_S3_ACCESS_KEY",
        "LATTICE_TEST_S3_SECRET_KEY",
    ];
    let missing: Vec<&str> = vars.iter().copied().filter(|v| std::env::var(v).is_err()).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "LATTICE_REQUIRE_SERVICES=1 but {missing:?} are not set: start them with scripts/services.sh"
        );
        eprintln!("skipped: {missing:?} not set (run `cargo xtask ci`)");
        return None;
    }
    Some(vars.iter().map(|v| (*v, std::env::var(v).unwrap_or_default())).collect())
}

/// A fresh PostgreSQL database on the test server; returns its URL.
pub async fn fresh_postgres_database(base_url: &str) -> String {
    use sqlx::Connection as _;
    let name = format!("lattice_{}", unique());
    let mut conn = sqlx::PgConnection::connect(base_url).await.expect("connect to the test PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a database");
    let (head, _) = base_url.rsplit_once('/').expect("a PostgreSQL URL with a database name");
    let (_, query) = base_url.split_once('?').map_or((base_url, None), |(a, q)| (a, Some(q)));
    match query {
        Some(q) => format!("{head}/{name}?{q}").replacen(&format!("?{q}/"), "/", 1),
        None => format!("{head}/{name}"),
    }
}

/// [`fresh_postgres_database`] with `synchronous_commit = on` set on it whatever the server's
/// default, as the benchmarks compare servers with durable commits.
pub async fn fresh_synchronous_postgres_database(base_url: &str) -> String {
    use sqlx::Connection as _;
    let url = fresh_postgres_database(base_url).await;
    let name = postgres_database_name(&url);
    let mut conn = sqlx::PgConnection::connect(base_url).await.expect("connect to PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER DATABASE {name} SET synchronous_commit = on")))
        .execute(&mut conn)
        .await
        .expect("set synchronous_commit");
    url
}

/// The database name of a PostgreSQL URL (`postgres://host/name?options`).
pub fn postgres_database_name(url: &str) -> &str {
    let name = url.rsplit_once('/').map(|(_, n)| n).unwrap_or_default();
    name.split('?').next().unwrap_or_default()
}

/// Drops a database [`fresh_postgres_database`] made, once nothing uses it: benchmarks write
/// hundreds of megabytes per run, which would otherwise pile up on a long-lived test server.
pub async fn drop_postgres_database(base_url: &str, url: &str) -> Result<(), String> {
    use sqlx::Connection as _;
    let name = postgres_database_name(url);
    if !name.starts_with("lattice_") || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("not a database this crate made: {name:?}"));
    }
    let mut conn = sqlx::PgConnection::connect(base_url).await.map_err(|e| e.to_string())?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| format!("drop database {name}: {e}"))
}

impl Homeserver {
    /// Starts a homeserver, or returns `None` for [`Backend::Production`] when the services are
    /// not configured (and not required).
    pub async fn start(options: Options) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let d = data.display();
        let port = free_port();
        let admin_port = free_port();
        let server_name = options.server_name.clone().unwrap_or_else(|| format!("hs{}.test", unique()));
        let mut envs: Vec<(String, String)> = Vec::new();
        let bindings = match options.backend {
            Backend::Embedded => format!(
                r#"
[d1.DB]
backend = "sqlite"
path = "{d}/d1.sqlite"

[kv.KV]
backend = "sqlite"
path = "{d}/kv.sqlite"

[r2.MEDIA]
backend = "fs"
path = "{d}/media"

[durable_objects.ROOMS]
class = "Room"
unique_key_secret = "rooms_key"
shards = 8
storage = {{ backend = "sqlite", path = "{d}/objects.sqlite" }}

[durable_objects.USERS]
class = "User"
unique_key_secret = "users_key"
shards = 8
storage = {{ backend = "sqlite", path = "{d}/objects.sqlite" }}
"#
            ),
            Backend::Production => {
                let s = services()?;
                let pg = match &options.database_url {
                    Some(url) => url.clone(),
                    None => fresh_postgres_database(&s["LATTICE_TEST_POSTGRES_URL"]).await,
                };
                envs.push(("LATTICE_HS_POSTGRES_URL".into(), pg));
                envs.push(("LATTICE_HS_REDIS_URL".into(), s["LATTICE_TEST_REDIS_URL"].clone()));
                envs.push(("LATTICE_HS_S3_ACCESS_KEY".into(), s["LATTICE_TEST_S3_ACCESS_KEY"].clone()));
                envs.push(("LATTICE_HS_S3_SECRET_KEY".into(), s["LATTICE_TEST_S3_SECRET_KEY"].clone()));
                format!(
                    r#"
[d1.DB]
backend = "postgres"
url_env = "LATTICE_HS_POSTGRES_URL"

[kv.KV]
backend = "redis"
url_env = "LATTICE_HS_REDIS_URL"

[r2.MEDIA]
backend = "s3"
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key_env = "LATTICE_HS_S3_ACCESS_KEY"
secret_key_env = "LATTICE_HS_S3_SECRET_KEY"

[durable_objects.ROOMS]
class = "Room"
unique_key_secret = "rooms_key"
shards = 8
storage = {{ backend = "postgres", url_env = "LATTICE_HS_POSTGRES_URL" }}

[durable_objects.USERS]
class = "User"
unique_key_secret = "users_key"
shards = 8
storage = {{ backend = "postgres", url_env = "LATTICE_HS_POSTGRES_URL" }}

[signals]
backend = "redis"
url_env = "LATTICE_HS_REDIS_URL"
"#,
                    endpoint = s["LATTICE_TEST_S3_ENDPOINT"],
                    region = s["LATTICE_TEST_S3_REGION"],
                    bucket = s["LATTICE_TEST_S3_BUCKET"],
                )
            }
        };
        let mut vars = vec![
            ("server_name".to_owned(), server_name.clone()),
            ("registration".to_owned(), "open".to_owned()),
            ("login_per_minute".to_owned(), "0".to_owned()),
            ("register_per_minute".to_owned(), "0".to_owned()),
        ];
        for (k, v) in &options.vars {
            vars.retain(|(kk, _)| kk != k);
            vars.push((k.clone(), v.clone()));
        }
        let vars: String = vars.iter().map(|(k, v)| format!("{k} = {}\n", toml_str(v))).collect();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
data_dir = "{d}"

[tls]
plain_http = true

[component]
path = "{component}"
cache_dir = "{cache}"

[secrets]
dir = "{d}/secrets"
generate = ["rooms_key", "users_key", "signing_key", "admin_token"]

[vars]
{vars}
{bindings}
"#,
            component = homeserver_wasm().display(),
            cache = options
                .cache_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("lattice-test-aot-cache"))
                .display(),
        );
        let config_path = dir.path().join("lattice.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("lattice.log")).expect("log file");
        let child = Command::new(lattice_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .envs(envs)
            .env("LATTICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lattice");
        let mut hs = Homeserver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            server_name,
            dir,
            backend: options.backend,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = hs.child.try_wait() {
                panic!("lattice exited with {status} before serving:\n{}", hs.log());
            }
            if reqwest::get(format!("{}/readyz", hs.admin_url)).await.is_ok_and(|r| r.status().is_success()) {
                return Some(hs);
            }
            assert!(started.elapsed() < Duration::from_secs(60), "lattice did not start:\n{}", hs.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `lattice` process id (for RSS and profiling).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lattice.log")).unwrap_or_default()
    }

    /// The admin API's bearer token (the generated `admin_token` secret, URL-safe base64).
    pub fn admin_token(&self) -> String {
        use base64::Engine as _;
        let bytes =
            std::fs::read(self.dir.path().join("data/secrets/admin_token")).expect("admin token secret");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `@local:server`.
    pub fn user_id(&self, local: &str) -> String {
        format!("@{local}:{}", self.server_name)
    }
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A small JSON client for the client-server API.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

/// A response: status and JSON body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Response {
    pub fn errcode(&self) -> &str {
        self.body["errcode"].as_str().unwrap_or_default()
    }
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self { base: base.trim_end_matches('/').to_owned(), token: None, http: reqwest::Client::new() }
    }

    pub fn with_token(&self, token: &str) -> Self {
        Self { token: Some(token.to_owned()), ..self.clone() }
    }

    /// Sends raw bytes; `path` starts with `/`.
    pub async fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.expect("the homeserver answers");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        Response { status, body }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.raw("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Response {
        self.raw("POST", path, Some(body.to_string().into_bytes())).await
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> Response {
        self.raw("PUT", path, Some(body.to_string().into_bytes())).await
    }

    /// Registers `local` with a password through the dummy stage; returns a client signed in
    /// as that user.
    pub async fn register(&self, local: &str, password: &str) -> Client {
        let r = self
            .post(
                "/_matrix/client/v3/register",
                serde_json::json!({"username": local, "password": password, "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(r.status, 200, "register {local}: {:?}", r.body);
        self.with_token(r.body["access_token"].as_str().expect("access_token"))
    }
}

/// Percent-encodes a path segment (room ids, user ids, event ids).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// This package's directory: where `cargo test` says it is when it runs the test (a test binary
/// reused from a build in another checkout of the same target directory keeps that checkout's
/// path in `env!`), else where it was built.
pub fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
