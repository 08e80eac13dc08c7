//! The runtime's config files, rendered from a `MatrixHomeserver`: `lattice.toml` for the front
//! pods and, when `spec.shards > 0`, `lattice-shard.toml` for the shard pods. The two differ
//! only in `[placement]`: fronts forward every Durable Object call, shard pods own the shards
//! through Leases in the MatrixHomeserver's namespace. Without shard pods there is no
//! `[placement]`, and each runtime process owns every shard itself.
//!
//! The operator knows the runtime only through this file and its command line (DESIGN.md
//! invariant 3): the format is the one `runtime/src/config.rs` parses, with unknown keys an
//! error. The spec's pass-through `runtimeConfig` is checked here against the keys the runtime
//! knows before anything is rendered, so a typo becomes a `Degraded` condition naming the key
//! instead of pods that crash-loop on start.

use kube::ResourceExt as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use toml::Table;

use crate::crd::{MatrixHomeserver, PostQuantum, Registration};

/// Where the pods mount things; the container image provides the component.
pub const CONFIG_DIR: &str = "/etc/lattice/config";
/// The front pods' file (the runtime image's default `--config`); with no shard pods, the only
/// one.
pub const CONFIG_FILE: &str = "lattice.toml";
/// The shard pods' file, rendered when `spec.shards > 0`.
pub const SHARD_CONFIG_FILE: &str = "lattice-shard.toml";
pub const SECRETS_DIR: &str = "/etc/lattice/secrets";
pub const TLS_DIR: &str = "/etc/lattice/tls";
pub const DATA_DIR: &str = "/var/lib/lattice";
pub const COMPONENT_PATH: &str = "/opt/lattice/lattice_homeserver.wasm";
/// The runtime image's AOT-compiled component (its build step's `lattice compile`), read-only.
pub const SEED_CACHE_DIR: &str = "/opt/lattice/compiled";
/// The public listener (clients and federation).
pub const PORT: u16 = 8448;
/// `/healthz`, `/readyz`, `/metrics`; reached by the kubelet's probes, not exposed.
pub const ADMIN_PORT: u16 = 9090;
/// The shard pods' internal listener for object calls forwarded by other pods (`[placement]
/// peer_listen`): reached only from this server's own pods (the NetworkPolicy). Not `PORT`:
/// the public listener holds that one, and the two cannot share it.
pub const PEER_PORT: u16 = 8449;
/// Longest `[placement] lease_set` the runtime accepts.
const MAX_LEASE_SET: usize = 20;
/// Characters of the name kept in the lease set, before `-` and the hash.
const LEASE_SET_PREFIX: usize = 11;

/// Environment variables the pods get from the referenced Secrets (the config names them).
pub const DATABASE_URL_ENV: &str = "DATABASE_URL";
pub const REDIS_URL_ENV: &str = "REDIS_URL";
pub const S3_ACCESS_KEY_ENV: &str = "S3_ACCESS_KEY";
pub const S3_SECRET_KEY_ENV: &str = "S3_SECRET_KEY";

/// The homeserver's longest `/sync` long-poll when the spec does not set
/// `vars.max_sync_timeout_ms` (homeserver `DEFAULT_MAX_SYNC_TIMEOUT_MS`).
pub const DEFAULT_LONG_POLL_MS: u64 = 60_000;
/// Time past the longest long-poll that a stopping pod keeps draining.
pub const DRAIN_MARGIN_MS: u64 = 5_000;
/// Time past the runtime's own drain before the kubelet kills the container.
pub const KILL_MARGIN_SECONDS: i64 = 10;

/// Settings that the operator renders itself; `runtimeConfig` may not set them.
const MANAGED_VARS: [(&str, &str); 2] =
    [("server_name", "spec.serverName"), ("registration", "spec.registration")];

/// The runtime's `[limits]` keys (`runtime/src/config.rs`, `Limits`), all positive integers.
const LIMIT_KEYS: [&str; 15] = [
    "max_request_body_bytes",
    "header_timeout_ms",
    "body_timeout_ms",
    "instance_memory_bytes",
    "execution_ms",
    "pool_instances",
    "max_parked",
    "max_park_ms",
    "shutdown_grace_ms",
    "object_idle_ms",
    "alarm_poll_ms",
    "max_call_depth",
    "memory_keep_resident_bytes",
    "kv_max_value_bytes",
    "r2_max_object_bytes",
];

/// A spec the operator cannot render: `field` is the path in the resource, `message` says what
/// to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn spec_error(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// The rendered config files and what the pod specs derive from them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// `CONFIG_FILE`, the front pods' config: `[placement] role = "front"` when there are shard
    /// pods; without them no `[placement]`, and each process owns every shard itself.
    pub front: String,
    /// `SHARD_CONFIG_FILE`, the shard pods' config (`role = "shard"`), when `spec.shards > 0`.
    pub shard: Option<String>,
    /// The runtime's drain on SIGTERM (`limits.shutdown_grace_ms`).
    pub shutdown_grace_ms: u64,
}

impl Rendered {
    /// The ConfigMap's files: name and text.
    pub fn files(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![(CONFIG_FILE, self.front.as_str())];
        if let Some(shard) = &self.shard {
            out.push((SHARD_CONFIG_FILE, shard.as_str()));
        }
        out
    }

    /// The file the pods of `component` run with (`resources::COMPONENT_SHARD` or the front),
    /// and its text.
    pub fn for_component(&self, component: &str) -> (&'static str, &str) {
        match &self.shard {
            Some(shard) if component == crate::resources::COMPONENT_SHARD => (SHARD_CONFIG_FILE, shard),
            _ => (CONFIG_FILE, &self.front),
        }
    }

    /// Longer than the runtime's drain, which is longer than the longest client long-poll.
    pub fn termination_grace_period_seconds(&self) -> i64 {
        i64::try_from(self.shutdown_grace_ms.div_ceil(1000)).unwrap_or(i64::MAX / 2) + KILL_MARGIN_SECONDS
    }
}

/// Renders the config files, after checking the pass-through `runtimeConfig`.
pub fn render(hs: &MatrixHomeserver) -> Result<Rendered, SpecError> {
    let spec = &hs.spec;
    let extra = PassThrough::parse(spec.runtime_config.as_ref())?;
    let mut root = Table::new();

    let mut server = Table::new();
    server.insert("listen".into(), format!("0.0.0.0:{PORT}").into());
    server.insert("admin_listen".into(), format!("0.0.0.0:{ADMIN_PORT}").into());
    server.insert("data_dir".into(), DATA_DIR.into());
    server.insert("log_format".into(), extra.log_format.clone().unwrap_or_else(|| "json".into()).into());
    root.insert("server".into(), server.into());

    let mut tls = Table::new();
    if spec.tls.is_some() {
        tls.insert("cert".into(), format!("{TLS_DIR}/tls.crt").into());
        tls.insert("key".into(), format!("{TLS_DIR}/tls.key").into());
        tls.insert("post_quantum".into(), post_quantum(spec.post_quantum).into());
    } else {
        if spec.post_quantum == PostQuantum::Required {
            return Err(spec_error(
                "spec.postQuantum",
                "`required` needs TLS on the pods: set spec.tls, or use `preferred` when TLS ends at the ingress",
            ));
        }
        tls.insert("plain_http".into(), true.into());
    }
    root.insert("tls".into(), tls.into());

    let mut component = Table::new();
    component.insert("path".into(), COMPONENT_PATH.into());
    component.insert("seed_cache_dir".into(), SEED_CACHE_DIR.into());
    root.insert("component".into(), component.into());

    let mut secrets = Table::new();
    secrets.insert("dir".into(), SECRETS_DIR.into());
    root.insert("secrets".into(), secrets.into());

    let mut vars = Table::new();
    vars.insert("server_name".into(), spec.server_name.clone().into());
    vars.insert("registration".into(), registration(spec.registration).into());
    if let Some(url) = spec.well_known.as_ref().and_then(|w| w.client_base_url.clone()) {
        vars.insert("public_base_url".into(), url.into());
    }
    if let Some(server) = spec.well_known.as_ref().and_then(|w| w.server.clone()) {
        vars.insert("well_known_server".into(), server.into());
    }
    vars.insert("federation_enabled".into(), spec.federation.enabled.to_string().into());
    if !spec.federation.allow.is_empty() {
        vars.insert("federation_allow".into(), spec.federation.allow.join(",").into());
    }
    if !spec.federation.deny.is_empty() {
        vars.insert("federation_deny".into(), spec.federation.deny.join(",").into());
    }
    for (k, v) in &extra.vars {
        vars.insert(k.clone(), v.clone().into());
    }
    root.insert("vars".into(), vars.into());

    let postgres = spec.database.postgres.is_some();
    root.insert(
        "d1".into(),
        one("DB", if postgres { env_url("postgres", DATABASE_URL_ENV) } else { sqlite("d1.sqlite") }),
    );
    let redis = spec.kv.redis.is_some();
    root.insert(
        "kv".into(),
        one("KV", if redis { env_url("redis", REDIS_URL_ENV) } else { sqlite("kv.sqlite") }),
    );
    let media = match &spec.media.s3 {
        Some(s3) => {
            let mut t = Table::new();
            t.insert("backend".into(), "s3".into());
            t.insert("endpoint".into(), s3.endpoint.clone().into());
            t.insert("region".into(), s3.region.clone().into());
            t.insert("bucket".into(), s3.bucket.clone().into());
            t.insert("access_key_env".into(), S3_ACCESS_KEY_ENV.into());
            t.insert("secret_key_env".into(), S3_SECRET_KEY_ENV.into());
            t.insert("path_style".into(), s3.path_style.into());
            t
        }
        None => {
            let mut t = Table::new();
            t.insert("backend".into(), "fs".into());
            t.insert("path".into(), format!("{DATA_DIR}/media").into());
            t
        }
    };
    root.insert("r2".into(), one("MEDIA", media));

    // The homeserver's Durable Object namespaces, each with its own unique key: rooms (the single
    // writer of each room) and users (one-time keys, claimed exactly once).
    let mut namespaces = Table::new();
    for (name, class, key) in
        [("ROOMS", "Room", crate::secrets::ROOMS_KEY), ("USERS", "User", crate::secrets::USERS_KEY)]
    {
        let mut ns = Table::new();
        ns.insert("class".into(), class.into());
        ns.insert("unique_key_secret".into(), key.into());
        ns.insert(
            "storage".into(),
            (if postgres { env_url("postgres", DATABASE_URL_ENV) } else { sqlite("objects.sqlite") }).into(),
        );
        namespaces.insert(name.into(), ns.into());
    }
    root.insert("durable_objects".into(), namespaces.into());
    if redis {
        root.insert("signals".into(), env_url("redis", REDIS_URL_ENV).into());
    }

    let long_poll = extra
        .vars
        .get("max_sync_timeout_ms")
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                spec_error("spec.runtimeConfig.vars.max_sync_timeout_ms", "must be a whole number of ms")
            })
        })
        .transpose()?
        .unwrap_or(DEFAULT_LONG_POLL_MS);
    let mut limits = Table::new();
    limits.insert("shutdown_grace_ms".into(), to_toml_int(long_poll + DRAIN_MARGIN_MS).into());
    for (k, v) in &extra.limits {
        limits.insert(k.clone(), to_toml_int(*v).into());
    }
    let shutdown_grace_ms =
        extra.limits.get("shutdown_grace_ms").copied().unwrap_or(long_poll + DRAIN_MARGIN_MS);
    if shutdown_grace_ms < long_poll {
        return Err(spec_error(
            "spec.runtimeConfig.limits.shutdown_grace_ms",
            format!(
                "must be at least the longest long-poll ({long_poll} ms), or stopping pods cut /sync requests short"
            ),
        ));
    }
    root.insert("limits".into(), limits.into());
    if !extra.outbound.is_empty() {
        root.insert("outbound".into(), extra.outbound.clone().into());
    }

    if spec.shards == 0 {
        return Ok(Rendered { front: to_file(&root)?, shard: None, shutdown_grace_ms });
    }
    if !postgres {
        // The CRD's CEL rule refuses shard pods on embedded storage already.
        return Err(spec_error(
            "spec.shards",
            "shard pods need storage every pod shares: use spec.database.postgres, or set shards: 0",
        ));
    }
    let namespace = hs
        .namespace()
        .ok_or_else(|| spec_error("metadata.namespace", "shard pods keep their Leases in the namespace"))?;
    let mut front = root.clone();
    front.insert("placement".into(), placement(hs, &namespace, "front").into());
    let mut shard = root;
    shard.insert("placement".into(), placement(hs, &namespace, "shard").into());
    Ok(Rendered { front: to_file(&front)?, shard: Some(to_file(&shard)?), shutdown_grace_ms })
}

fn to_file(root: &Table) -> Result<String, SpecError> {
    let body =
        toml::to_string(root).map_err(|e| spec_error("spec", format!("cannot render the config: {e}")))?;
    Ok(format!("# Rendered by lattice-operator from a MatrixHomeserver; edits are overwritten.\n{body}"))
}

/// `[placement]` for the pods of `role` (`front` or `shard`): Leases in the MatrixHomeserver's
/// namespace (the pods' service account may use them, `resources::desired_role`), the lease set
/// of `lease_set`, the pod name as identity (the runtime's default: the host name), and for
/// shard pods the internal listener at their stable name under the headless Service. Lease
/// timings are the runtime's defaults.
fn placement(hs: &MatrixHomeserver, namespace: &str, role: &str) -> Table {
    let mut leases = Table::new();
    leases.insert("backend".into(), "kubernetes".into());
    leases.insert("namespace".into(), namespace.into());
    let mut p = Table::new();
    p.insert("role".into(), role.into());
    p.insert("leases".into(), leases.into());
    p.insert("lease_set".into(), lease_set(&hs.name_any()).into());
    p.insert("peer_secret".into(), crate::secrets::PEER_SECRET.into());
    if role == "shard" {
        p.insert("peer_listen".into(), format!("0.0.0.0:{PEER_PORT}").into());
        p.insert(
            "peer_address".into(),
            format!("http://{{identity}}.{}.{namespace}.svc:{PEER_PORT}", crate::resources::shards_name(hs))
                .into(),
        );
    }
    p
}

/// The `[placement] lease_set` of the MatrixHomeserver `name`: the first 11 characters of the
/// name (any character outside `a-z0-9-` as `-`, leading and trailing `-` dropped), `-`, and the
/// first 8 hex digits of SHA-256 of the whole name; e.g. `matrix` → `matrix-6e00cd56`.
///
/// A DNS label of at most 20 characters (the runtime's limit; its lease names append the
/// Durable Object namespace's storage id and the shard). The hash is there even for short names:
/// the runtime lists its leases by the prefix `<lease_set>-`, so a set equal to the name would
/// make the servers `matrix` and `matrix-m` in one namespace read each other's member leases;
/// with the hash, distinct names get distinct sets, none a prefix of another's lease names
/// (barring a 32-bit hash collision). Never change the rule: pods rendered under an old and a
/// new one would not see each other's leases and would both own the shards until the old ones
/// are gone (the epochs keep that safe, not available).
pub fn lease_set(name: &str) -> String {
    let prefix: String = name
        .chars()
        .take(LEASE_SET_PREFIX)
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    let prefix = prefix.trim_matches('-');
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    let set = if prefix.is_empty() { format!("hs-{hash}") } else { format!("{prefix}-{hash}") };
    debug_assert!(set.len() <= MAX_LEASE_SET);
    set
}

fn to_toml_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn one(name: &str, t: Table) -> toml::Value {
    let mut outer = Table::new();
    outer.insert(name.into(), t.into());
    outer.into()
}

fn env_url(backend: &str, env: &str) -> Table {
    let mut t = Table::new();
    t.insert("backend".into(), backend.into());
    t.insert("url_env".into(), env.into());
    t
}

fn sqlite(file: &str) -> Table {
    let mut t = Table::new();
    t.insert("backend".into(), "sqlite".into());
    t.insert("path".into(), format!("{DATA_DIR}/{file}").into());
    t
}

fn post_quantum(p: PostQuantum) -> &'static str {
    match p {
        PostQuantum::Preferred => "preferred",
        PostQuantum::Required => "required",
        PostQuantum::Off => "off",
    }
}

fn registration(r: Registration) -> &'static str {
    match r {
        Registration::Disabled => "disabled",
        Registration::Token => "token",
        Registration::Open => "open",
    }
}

/// The checked `runtimeConfig`.
#[derive(Debug, Default)]
struct PassThrough {
    limits: std::collections::BTreeMap<String, u64>,
    outbound: Table,
    log_format: Option<String>,
    vars: std::collections::BTreeMap<String, String>,
}

impl PassThrough {
    fn parse(value: Option<&Value>) -> Result<Self, SpecError> {
        const AT: &str = "spec.runtimeConfig";
        let mut out = Self::default();
        let Some(value) = value else { return Ok(out) };
        let Value::Object(sections) = value else {
            return Err(spec_error(AT, "must be an object of sections (limits, outbound, server, vars)"));
        };
        for (section, body) in sections {
            let at = format!("{AT}.{section}");
            let Value::Object(body) = body else { return Err(spec_error(at, "must be an object")) };
            match section.as_str() {
                "limits" => {
                    for (k, v) in body {
                        let at = format!("{at}.{k}");
                        if !LIMIT_KEYS.contains(&k.as_str()) {
                            return Err(spec_error(at, unknown_key(k, &LIMIT_KEYS)));
                        }
                        match v.as_u64() {
                            Some(n) if n > 0 => out.limits.insert(k.clone(), n),
                            _ => return Err(spec_error(at, "must be a whole number greater than zero")),
                        };
                    }
                }
                "outbound" => {
                    for (k, v) in body {
                        out.outbound.insert(k.clone(), outbound_value(&format!("{at}.{k}"), k, v)?);
                    }
                }
                "server" => {
                    for (k, v) in body {
                        let at = format!("{at}.{k}");
                        match (k.as_str(), v.as_str()) {
                            ("log_format", Some(f @ ("text" | "json"))) => {
                                out.log_format = Some(f.to_owned())
                            }
                            ("log_format", _) => return Err(spec_error(at, "must be \"text\" or \"json\"")),
                            _ => {
                                return Err(spec_error(
                                    at,
                                    "only `log_format` may be set here; listeners and paths are managed by the operator",
                                ));
                            }
                        }
                    }
                }
                "vars" => {
                    for (k, v) in body {
                        let at = format!("{AT}.vars.{k}");
                        if let Some((_, field)) = MANAGED_VARS.iter().find(|(name, _)| name == k) {
                            return Err(spec_error(
                                at,
                                format!("managed by the operator: set {field} instead"),
                            ));
                        }
                        let text = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            Value::Bool(b) => b.to_string(),
                            _ => return Err(spec_error(at, "must be a string, number or boolean")),
                        };
                        out.vars.insert(k.clone(), text);
                    }
                }
                other => {
                    return Err(spec_error(
                        at,
                        format!(
                            "unknown section `{other}`: runtimeConfig may set limits, outbound, server.log_format and vars; bindings, TLS and secrets follow from the spec"
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }
}

const OUTBOUND_KEYS: [&str; 6] =
    ["allow_private", "allow_hosts", "overrides", "extra_ca", "post_quantum", "timeout_ms"];

fn outbound_value(at: &str, key: &str, v: &Value) -> Result<toml::Value, SpecError> {
    let strings = |v: &Value| -> Option<Vec<toml::Value>> {
        v.as_array()?.iter().map(|s| s.as_str().map(|s| toml::Value::from(s.to_owned()))).collect()
    };
    let bad = |what: &str| spec_error(at, format!("must be {what}"));
    match key {
        "allow_private" => v.as_bool().map(toml::Value::from).ok_or_else(|| bad("true or false")),
        "allow_hosts" | "extra_ca" => {
            strings(v).map(toml::Value::from).ok_or_else(|| bad("a list of strings"))
        }
        "overrides" => {
            let map = v.as_object().ok_or_else(|| bad("a map of host name to ip:port"))?;
            let mut t = Table::new();
            for (host, addr) in map {
                let addr = addr
                    .as_str()
                    .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
                    .ok_or_else(|| spec_error(format!("{at}.{host}"), "must be ip:port"))?;
                t.insert(host.clone(), addr.into());
            }
            Ok(t.into())
        }
        "post_quantum" => match v.as_str() {
            Some(p @ ("preferred" | "required" | "off")) => Ok(p.into()),
            _ => Err(bad("\"preferred\", \"required\" or \"off\"")),
        },
        "timeout_ms" => v
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| to_toml_int(n).into())
            .ok_or_else(|| bad("a whole number greater than zero")),
        other => Err(spec_error(at, unknown_key(other, &OUTBOUND_KEYS))),
    }
}

fn unknown_key(key: &str, known: &[&str]) -> String {
    let close = known.iter().find(|k| edit_distance(k, key) <= 2);
    match close {
        Some(k) => format!("unknown key `{key}`; did you mean `{k}`?"),
        None => format!("unknown key `{key}`; known keys: {}", known.join(", ")),
    }
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
