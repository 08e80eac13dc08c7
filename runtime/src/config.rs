//! The runtime's one config file (TOML): parsed, then validated into typed settings.
//!
//! Unknown keys are an error, reported with the key and the line. Every limit has a named
//! default here that the file can override.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Host hard limit on request bodies; set above any application limit so the guest can answer
/// its own protocol's error for its own limits.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 64 * 1024 * 1024;
/// Time to receive a request's headers after the connection is ready (slowloris guard).
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Time to receive a whole request body once headers are in.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 60_000;
/// Linear memory one instance may grow to.
pub const DEFAULT_INSTANCE_MEMORY: u64 = 128 * 1024 * 1024;
/// Guest CPU time per invocation (time parked or waiting on bindings does not count).
pub const DEFAULT_EXECUTION_MS: u64 = 10_000;
/// Instances that may exist at once (pooling allocator slots).
pub const DEFAULT_POOL_INSTANCES: u32 = 128;
/// Requests that may be parked at once.
pub const DEFAULT_MAX_PARKED: u32 = 10_000;
/// Longest park a guest may ask for.
pub const DEFAULT_MAX_PARK_MS: u64 = 120_000;
/// Time graceful shutdown waits for in-flight requests before giving up.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;
/// Durable Objects without events for this long are evicted from memory.
pub const DEFAULT_OBJECT_IDLE_MS: u64 = 30_000;
/// How often alarms are looked for.
pub const DEFAULT_ALARM_POLL_MS: u64 = 1_000;
/// Nesting of Durable Object calls (object calls object calls ...).
pub const DEFAULT_MAX_CALL_DEPTH: u32 = 16;
/// Bytes at the start of a freed instance's linear memory zeroed with `memset` instead of
/// released with `madvise` (see BENCHMARKS.md for the trade-off measured).
pub const DEFAULT_MEMORY_KEEP_RESIDENT: u64 = 64 * 1024;
/// Shards per Durable Object namespace (fixed for the namespace's lifetime).
pub const DEFAULT_SHARDS: u32 = 64;
/// How long a shard lease lasts unless renewed.
pub const DEFAULT_LEASE_MS: u64 = 10_000;
/// Shortest lease: Kubernetes Leases count whole seconds.
pub const MIN_LEASE_MS: u64 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}, line {line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("config file {path}: {key}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: Limits,
    pub component: ComponentConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: SecretsConfig,
    #[serde(default)]
    pub d1: BTreeMap<String, D1Binding>,
    #[serde(default)]
    pub kv: BTreeMap<String, KvBinding>,
    #[serde(default)]
    pub r2: BTreeMap<String, R2Binding>,
    #[serde(default)]
    pub durable_objects: BTreeMap<String, DurableObjectBinding>,
    /// Where `signals.signal` travels besides this process; none: in-process only.
    pub signals: Option<SignalsBinding>,
    /// Durable Objects on leased shard pods; none: this process owns every shard (embedded).
    pub placement: Option<PlacementConfig>,
    #[serde(default)]
    pub testing: Testing,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The public listener (clients and federation).
    pub listen: SocketAddr,
    /// /healthz, /readyz and /metrics; never exposed publicly.
    pub admin_listen: Option<SocketAddr>,
    /// Directory for the runtime's own state in embedded mode (SQLite files, generated secrets).
    pub data_dir: PathBuf,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

fn default_log_format() -> String {
    "text".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PostQuantum {
    /// Offer and prefer X25519MLKEM768, accept classical groups too.
    #[default]
    Preferred,
    /// Only X25519MLKEM768: classical-only clients fail the handshake.
    Required,
    /// Classical groups only.
    Off,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// No TLS: plain HTTP, for serving behind an ingress that terminates TLS.
    #[serde(default)]
    pub plain_http: bool,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub post_quantum: PostQuantum,
    /// How often the certificate files are checked for changes.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_request_body_bytes: u64,
    pub header_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub instance_memory_bytes: u64,
    pub execution_ms: u64,
    pub pool_instances: u32,
    pub max_parked: u32,
    pub max_park_ms: u64,
    pub shutdown_grace_ms: u64,
    pub object_idle_ms: u64,
    pub alarm_poll_ms: u64,
    pub max_call_depth: u32,
    pub memory_keep_resident_bytes: u64,
    /// KV value limit (workerd: 25 MiB).
    pub kv_max_value_bytes: u64,
    /// R2 object limit for a single put held in memory.
    pub r2_max_object_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY,
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            body_timeout_ms: DEFAULT_BODY_TIMEOUT_MS,
            instance_memory_bytes: DEFAULT_INSTANCE_MEMORY,
            execution_ms: DEFAULT_EXECUTION_MS,
            pool_instances: DEFAULT_POOL_INSTANCES,
            max_parked: DEFAULT_MAX_PARKED,
            max_park_ms: DEFAULT_MAX_PARK_MS,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            object_idle_ms: DEFAULT_OBJECT_IDLE_MS,
            alarm_poll_ms: DEFAULT_ALARM_POLL_MS,
            max_call_depth: DEFAULT_MAX_CALL_DEPTH,
            memory_keep_resident_bytes: DEFAULT_MEMORY_KEEP_RESIDENT,
            kv_max_value_bytes: crate::bindings::kv::MAX_VALUE_SIZE_BYTES as u64,
            r2_max_object_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The worker component (`.wasm`).
    pub path: PathBuf,
    /// Where AOT-compiled components are cached; defaults to `<data_dir>/compiled`.
    pub cache_dir: Option<PathBuf>,
    /// A read-only cache shipped with the component (a container image's build step fills it
    /// with `lattice compile`), consulted when `cache_dir` has no entry. Its entries are keyed
    /// like the cache's, by engine settings and CPU features, so a host that differs from the
    /// build machine simply compiles into `cache_dir`.
    pub seed_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Allow loopback, private, link-local and unique-local destinations (off: SSRF guard).
    #[serde(default)]
    pub allow_private: bool,
    /// When non-empty, only these host names may be reached (air-gapped installs).
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Host name -> `ip:port` to connect to instead of resolving (private DNS, tests). An
    /// override is an explicit decision, so it bypasses the private-range guard.
    #[serde(default)]
    pub overrides: BTreeMap<String, SocketAddr>,
    /// Extra PEM CA certificates trusted for outbound TLS.
    #[serde(default)]
    pub extra_ca: Vec<PathBuf>,
    #[serde(default)]
    pub post_quantum: PostQuantum,
    #[serde(default = "default_outbound_timeout")]
    pub timeout_ms: u64,
}

fn default_outbound_timeout() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Directory of secret files, one per name (a mounted Kubernetes Secret).
    pub dir: Option<PathBuf>,
    /// Secrets generated once (32 random bytes) into `dir` when absent. For embedded mode.
    #[serde(default)]
    pub generate: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum D1Binding {
    Sqlite { path: PathBuf },
    Postgres { url: Option<String>, url_env: Option<String> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum KvBinding {
    Sqlite { path: PathBuf },
    Redis { url: Option<String>, url_env: Option<String> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum R2Binding {
    Fs {
        path: PathBuf,
    },
    S3 {
        endpoint: String,
        region: String,
        bucket: String,
        access_key_env: String,
        secret_key_env: String,
        /// Path-style addressing (`endpoint/bucket/key`); most self-hosted stores need it.
        #[serde(default = "default_true")]
        path_style: bool,
        /// Extra PEM CA certificates trusted for an `https://` endpoint, besides the system's.
        #[serde(default)]
        extra_ca: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurableObjectBinding {
    /// The class name passed to the guest's `object-handler`.
    pub class: String,
    /// Name of the secret holding the namespace's unique key. Losing it orphans every object.
    pub unique_key_secret: String,
    #[serde(default = "default_shards")]
    pub shards: u32,
    pub storage: ObjectStorage,
}

fn default_true() -> bool {
    true
}

fn default_shards() -> u32 {
    DEFAULT_SHARDS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum ObjectStorage {
    Sqlite { path: PathBuf },
    Postgres { url: Option<String>, url_env: Option<String> },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum SignalsBinding {
    Redis { url: Option<String>, url_env: Option<String> },
}

/// What a runtime process does for Durable Objects when placement is on.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlacementRole {
    /// Stateless: forwards every object call to the shard's owner.
    Front,
    /// Owns shards through leases and serves calls for them; forwards the rest.
    Shard,
    /// Both (the default): owns shards and takes client traffic.
    #[default]
    Both,
}

/// Where shard leases live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "backend", rename_all = "lowercase")]
pub enum LeaseBackendConfig {
    /// Rows of `lattice_leases`, expiry judged by the database's clock.
    Postgres { url: Option<String>, url_env: Option<String> },
    /// `coordination.k8s.io/v1` Leases in `namespace`; in-cluster credentials unless
    /// `kubeconfig` names a file.
    Kubernetes { namespace: String, kubeconfig: Option<PathBuf> },
}

/// Leased shard placement (see ARCHITECTURE.md, "Durable Object placement").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    #[serde(default)]
    pub role: PlacementRole,
    pub leases: LeaseBackendConfig,
    /// This process's name in leases (a DNS label); defaults to the host name (the pod name).
    pub identity: Option<String>,
    /// Prefix of every lease name: one set per deployment sharing a lease store.
    #[serde(default = "default_lease_set")]
    pub lease_set: String,
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// How often leases are renewed; at most a third of `lease_ms` (default: a third).
    pub renew_ms: Option<u64>,
    /// The internal HTTP/2 listener other pods forward object calls to (shard roles).
    pub peer_listen: Option<SocketAddr>,
    /// The URL other pods reach `peer_listen` at, e.g. `http://{identity}.<headless service>:8448`
    /// (`{identity}` is replaced by the identity); defaults to `http://<peer_listen>` when that
    /// is not an unspecified address.
    pub peer_address: Option<String>,
    /// Name of the secret that authenticates calls between pods.
    pub peer_secret: String,
}

fn default_lease_set() -> String {
    "lattice".into()
}

fn default_lease_ms() -> u64 {
    DEFAULT_LEASE_MS
}

impl PlacementConfig {
    pub fn renew_ms(&self) -> u64 {
        self.renew_ms.unwrap_or(self.lease_ms / 3)
    }

    pub fn owns_shards(&self) -> bool {
        self.role != PlacementRole::Front
    }

    /// The address other pods forward to, if this process serves shards.
    pub fn advertised_address(&self) -> Option<String> {
        self.peer_address
            .clone()
            .or_else(|| self.peer_listen.filter(|a| !a.ip().is_unspecified()).map(|a| format!("http://{a}")))
    }
}

/// Settings for tests only.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Testing {
    /// Use a manual clock starting at this Unix time (ms), advanced through the admin
    /// listener's `POST /testing/clock/advance?ms=N`. Never set in production.
    pub manual_clock_start_ms: Option<u64>,
}

impl Config {
    /// Where compiled components are cached: `component.cache_dir`, by default
    /// `<data_dir>/compiled`.
    pub fn component_cache_dir(&self) -> PathBuf {
        self.component.cache_dir.clone().unwrap_or_else(|| self.server.data_dir.join("compiled"))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: path.to_owned(),
                line: line.unwrap_or(0),
                message: e.message().to_owned(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        if !self.tls.plain_http && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(invalid(
                "tls",
                "set both `cert` and `key`, or `plain_http = true` to serve behind an ingress",
            ));
        }
        if self.tls.plain_http && self.tls.post_quantum == PostQuantum::Required {
            return Err(invalid("tls.post_quantum", "`required` needs TLS, but `plain_http` is set"));
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_request_body_bytes", l.max_request_body_bytes),
            ("limits.instance_memory_bytes", l.instance_memory_bytes),
            ("limits.execution_ms", l.execution_ms),
            ("limits.pool_instances", u64::from(l.pool_instances)),
            ("limits.max_park_ms", l.max_park_ms),
            ("limits.alarm_poll_ms", l.alarm_poll_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        for (name, b) in &self.durable_objects {
            if b.shards == 0 || b.shards > 65_536 {
                return Err(invalid(
                    &format!("durable_objects.{name}.shards"),
                    "must be between 1 and 65536",
                ));
            }
            if b.class.is_empty() {
                return Err(invalid(&format!("durable_objects.{name}.class"), "must not be empty"));
            }
        }
        for (section, key, url, url_env) in self
            .d1
            .iter()
            .filter_map(|(k, b)| match b {
                D1Binding::Postgres { url, url_env } => Some(("d1", k, url, url_env)),
                D1Binding::Sqlite { .. } => None,
            })
            .chain(self.kv.iter().filter_map(|(k, b)| match b {
                KvBinding::Redis { url, url_env } => Some(("kv", k, url, url_env)),
                KvBinding::Sqlite { .. } => None,
            }))
            .chain(self.durable_objects.iter().filter_map(|(k, b)| match &b.storage {
                ObjectStorage::Postgres { url, url_env } => Some(("durable_objects", k, url, url_env)),
                ObjectStorage::Sqlite { .. } => None,
            }))
        {
            if url.is_some() == url_env.is_some() {
                return Err(invalid(
                    &format!("{section}.{key}"),
                    "set exactly one of `url` or `url_env` (the name of an environment variable holding the URL with its password)",
                ));
            }
        }
        if let Some(SignalsBinding::Redis { url, url_env }) = &self.signals
            && url.is_some() == url_env.is_some()
        {
            return Err(invalid("signals", "set exactly one of `url` or `url_env`"));
        }
        if let Some(p) = &self.placement {
            self.validate_placement(p).map_err(|(key, message)| invalid(&key, &message))?;
        }
        Ok(())
    }

    fn validate_placement(&self, p: &PlacementConfig) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((format!("placement.{k}"), m.to_owned()));
        if let LeaseBackendConfig::Postgres { url, url_env } = &p.leases
            && url.is_some() == url_env.is_some()
        {
            return err("leases", "set exactly one of `url` or `url_env`");
        }
        if p.lease_ms < MIN_LEASE_MS {
            return err("lease_ms", "must be at least 1000 (Kubernetes Leases count whole seconds)");
        }
        let renew = p.renew_ms();
        if renew == 0 || renew * 3 > p.lease_ms {
            return err("renew_ms", "must be greater than zero and at most a third of `lease_ms`");
        }
        if !crate::placement::is_dns_label(&p.lease_set) || p.lease_set.len() > 20 {
            return err("lease_set", "must be a DNS label (a-z, 0-9, '-') of at most 20 characters");
        }
        if let Some(id) = &p.identity
            && !crate::placement::is_dns_label(id)
        {
            return err("identity", "must be a DNS label (a-z, 0-9, '-')");
        }
        if p.owns_shards() {
            let Some(peer) = p.peer_listen else {
                return err("peer_listen", "a shard process needs an internal listener for forwarded calls");
            };
            let clash = |other: SocketAddr| {
                other.port() == peer.port()
                    && (other.ip() == peer.ip() || other.ip().is_unspecified() || peer.ip().is_unspecified())
            };
            if clash(self.server.listen) || self.server.admin_listen.is_some_and(clash) {
                return err("peer_listen", "must not share a port with server.listen or server.admin_listen");
            }
            match p.advertised_address() {
                None => return err("peer_address", "set it when `peer_listen` is an unspecified address"),
                Some(a) if !a.starts_with("http://") => {
                    return err(
                        "peer_address",
                        "must be an http:// URL (calls between pods are HTTP/2 cleartext)",
                    );
                }
                Some(_) => {}
            }
        }
        for (name, b) in &self.durable_objects {
            if !matches!(b.storage, ObjectStorage::Postgres { .. }) {
                return Err((
                    format!("durable_objects.{name}.storage"),
                    "placement needs object storage every pod shares: use the postgres backend".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Resolves a `url` / `url_env` pair (validated: exactly one is set).
pub fn resolve_url(url: &Option<String>, url_env: &Option<String>) -> Result<String, String> {
    match (url, url_env) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(var)) => std::env::var(var).map_err(|_| format!("environment variable {var} is not set")),
        (None, None) => Err("no url".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_error: Option<&str>) {
        let result = Config::parse(Path::new("t.toml"), text);
        match (result, expected_error) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => {
                let got = e.to_string();
                assert!(got.contains(want), "error {got:?} does not contain {want:?}");
            }
            (Ok(_), Some(want)) => panic!("expected an error containing {want:?}"),
            (Err(e), None) => panic!("unexpected error: {e}"),
        }
    }

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
data_dir = "/tmp/x"
[tls]
plain_http = true
[component]
path = "w.wasm"
"#;

    #[test]
    fn minimal_config_parses() {
        check(MINIMAL, None);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MINIMAL}\n[limits]\nexecution_ms = 5\nbogus_limit = 3\n");
        check(&text, Some("line 12"));
        check(&text, Some("unknown field `bogus_limit`"));
    }

    #[test]
    fn tls_requires_cert_or_plain() {
        let text = MINIMAL.replace("plain_http = true", "post_quantum = \"required\"");
        check(&text, Some("tls: set both `cert` and `key`"));
    }

    #[test]
    fn zero_limit_is_rejected() {
        check(&format!("{MINIMAL}\n[limits]\nexecution_ms = 0\n"), Some("limits.execution_ms"));
    }

    #[test]
    fn placement_rules() {
        let pg_objects = "[durable_objects.C]\nclass = \"C\"\nunique_key_secret = \"k\"\nstorage = { backend = \"postgres\", url = \"postgres://x\" }\n";
        let placement = |body: &str| {
            format!(
                "{MINIMAL}\n{pg_objects}\n[placement]\npeer_secret = \"p\"\nleases = {{ backend = \"postgres\", url = \"postgres://x\" }}\n{body}"
            )
        };
        check(&placement("peer_listen = \"127.0.0.1:9000\""), None);
        check(&placement("role = \"front\""), None);
        check(&placement(""), Some("placement.peer_listen"));
        check(&placement("peer_listen = \"0.0.0.0:9000\""), Some("placement.peer_address"));
        check(&placement("peer_listen = \"0.0.0.0:8080\""), Some("must not share a port"));
        check(
            &placement("peer_listen = \"0.0.0.0:9000\"\npeer_address = \"http://{identity}.shards:9000\""),
            None,
        );
        check(&placement("role = \"front\"\nlease_ms = 3000\nrenew_ms = 1001"), Some("placement.renew_ms"));
        check(&placement("role = \"front\"\nlease_ms = 500"), Some("placement.lease_ms"));
        check(&placement("role = \"front\"\nidentity = \"Pod_1\""), Some("placement.identity"));
        check(&placement("role = \"leader\""), Some("unknown variant `leader`"));
        let embedded = format!(
            "{MINIMAL}\n[durable_objects.C]\nclass = \"C\"\nunique_key_secret = \"k\"\nstorage = {{ backend = \"sqlite\", path = \"o.db\" }}\n[placement]\nrole = \"front\"\npeer_secret = \"p\"\nleases = {{ backend = \"kubernetes\", namespace = \"n\" }}\n"
        );
        check(&embedded, Some("durable_objects.C.storage"));
    }

    #[test]
    fn postgres_url_exactly_once() {
        check(
            &format!("{MINIMAL}\n[d1.DB]\nbackend = \"postgres\"\n"),
            Some("d1.DB: set exactly one of `url` or `url_env`"),
        );
        check(&format!("{MINIMAL}\n[d1.DB]\nbackend = \"postgres\"\nurl = \"postgres://x\"\n"), None);
        check(&format!("{MINIMAL}\n[d1.DB]\nbackend = \"mysql\"\n"), Some("unknown variant `mysql`"));
    }
}
