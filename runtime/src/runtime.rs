//! The composition root: builds every binding's backend from the config, loads the component
//! and holds what all requests share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use lattice_backends::{KvBackend, ObjectBackend, ObjectStorageBackend, SignalBus, SqlBackend};
use wasmtime::Engine;

use crate::clock::Clock;
use crate::config::{
    self, Config, D1Binding, KvBinding, LeaseBackendConfig, ObjectStorage, R2Binding, SignalsBinding,
};
use crate::engine::{self, Prepared};
use crate::metrics::Metrics;
use crate::objects::{ObjectNamespace, Objects};
use crate::outbound::OutboundPolicy;
use crate::peer::Peers;
use crate::placement::{LeasedPlacement, LocalPlacement, Placement};
use crate::signals::Signals;

/// Bytes of a generated secret.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// Secrets by name: files in a directory (a mounted Kubernetes Secret, or generated once in
/// embedded mode). A file's bytes are kept with its identity (inode, size, modification time),
/// so a read of an unchanged secret is one `stat`; a Kubernetes Secret update swaps the files
/// (new inodes), which the next read sees.
#[derive(Debug)]
pub struct Secrets {
    dir: Option<PathBuf>,
    kept: std::sync::Mutex<HashMap<String, (FileIdentity, Vec<u8>)>>,
}

/// What tells one version of a file from another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    /// A file changed this recently is read again whatever its identity: file times have the
    /// kernel clock's tick as granularity, so a rewrite in place within one tick (same inode,
    /// same length) would keep the time.
    const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self { inode: m.ino(), len: m.len(), modified: m.modified().ok() }
    }

    fn settled(&self) -> bool {
        self.modified.and_then(|t| t.elapsed().ok()).is_some_and(|age| age >= Self::SETTLED)
    }
}

impl Secrets {
    pub fn open(c: &config::SecretsConfig) -> anyhow::Result<Self> {
        if let Some(dir) = &c.dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating secrets dir {}", dir.display()))?;
            for name in &c.generate {
                let path = secret_path(dir, name)?;
                if !path.exists() {
                    write_private(&path, &rand::random::<[u8; GENERATED_SECRET_BYTES]>())
                        .with_context(|| format!("writing generated secret {}", path.display()))?;
                    tracing::info!(name, "generated secret");
                }
            }
        } else if !c.generate.is_empty() {
            anyhow::bail!("secrets.generate needs secrets.dir");
        }
        Ok(Self { dir: c.dir.clone(), kept: Default::default() })
    }

    /// The secrets in `dir`, none generated (unit tests).
    #[cfg(test)]
    pub(crate) fn in_dir(dir: &Path) -> Self {
        Self { dir: Some(dir.to_owned()), kept: Default::default() }
    }

    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, std::io::Error> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let Ok(path) = secret_path(dir, name) else { return Ok(None) };
        let identity = match std::fs::metadata(&path) {
            Ok(m) => FileIdentity::of(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.kept.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if identity.settled()
            && let Some((kept, bytes)) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).get(name)
            && *kept == identity
        {
            return Ok(Some(bytes.clone()));
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Kept only when the file did not change while it was read.
        if std::fs::metadata(&path).map(|m| FileIdentity::of(&m)).ok().as_ref() == Some(&identity) {
            self.kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_owned(), (identity, bytes.clone()));
        }
        Ok(Some(bytes))
    }
}

fn secret_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        || name.starts_with('.')
    {
        anyhow::bail!("invalid secret name {name:?}");
    }
    Ok(dir.join(name))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Slots for HTTP requests out of `pool`: three quarters, at least one.
pub fn http_slots(pool: u32) -> usize {
    (pool as usize - pool as usize / 4).max(1)
}

/// What every request shares.
pub struct Shared {
    pub config: Config,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub signals: Arc<Signals>,
    /// Carries signals to the other runtime processes, published in the background (see
    /// [`SignalPublisher`]); `None` in embedded mode.
    pub signal_bus: Option<SignalPublisher>,
    /// Tags this process's own messages on the bus, so it does not wake its waiters twice.
    pub process_id: String,
    pub outbound: Arc<OutboundPolicy>,
    pub secrets: Arc<Secrets>,
    /// Ed25519 key pairs derived from secrets (`lattice:bindings/crypto`).
    pub signing_keys: crate::bindings::crypto::SigningKeys,
    pub d1: HashMap<String, Arc<dyn SqlBackend>>,
    pub kv: HashMap<String, Arc<dyn KvBackend>>,
    pub r2: HashMap<String, Arc<dyn ObjectBackend>>,
    pub objects: Objects,
    /// Shard placement through leases (`[placement]`); `None` in embedded mode.
    pub leased: Option<Arc<LeasedPlacement>>,
    /// Forwards object calls to the shards' owners.
    pub peers: Peers,
    /// The peer secret, when placement is on.
    pub peer_secret: Option<Vec<u8>>,
    /// The last backend check; see [`Shared::backend_status`].
    pub backend_health: std::sync::Mutex<Vec<BackendStatus>>,
    /// Instance slots HTTP requests may take; the rest of the pool is kept for Durable Object
    /// events, which run while their caller still holds a slot (so callers cannot starve them).
    pub http_slots: Arc<tokio::sync::Semaphore>,
    pub engine: Engine,
    pub prepared: Prepared,
}

fn url(url: &Option<String>, url_env: &Option<String>, key: &str) -> anyhow::Result<String> {
    config::resolve_url(url, url_env).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

impl Shared {
    /// Builds everything from a validated config.
    pub async fn build(config: Config) -> anyhow::Result<Arc<Self>> {
        let clock = match config.testing.manual_clock_start_ms {
            Some(ms) => Clock::manual(ms),
            None => Clock::System,
        };
        std::fs::create_dir_all(&config.server.data_dir)
            .with_context(|| format!("creating data dir {}", config.server.data_dir.display()))?;
        let secrets = Arc::new(Secrets::open(&config.secrets)?);

        let mut d1: HashMap<String, Arc<dyn SqlBackend>> = HashMap::new();
        for (name, b) in &config.d1 {
            let backend: Arc<dyn SqlBackend> = match b {
                D1Binding::Sqlite { path } => {
                    Arc::new(lattice_backends::sqlite::SqliteSql::open(path).await?)
                }
                D1Binding::Postgres { url: u, url_env } => Arc::new(
                    lattice_backends::postgres::PostgresSql::new(&url(u, url_env, &format!("d1.{name}"))?)?,
                ),
            };
            d1.insert(name.clone(), backend);
        }
        let mut kv: HashMap<String, Arc<dyn KvBackend>> = HashMap::new();
        for (name, b) in &config.kv {
            let backend: Arc<dyn KvBackend> = match b {
                KvBinding::Sqlite { path } => Arc::new(lattice_backends::sqlite::SqliteKv::open(path).await?),
                KvBinding::Redis { url: u, url_env } => {
                    Arc::new(lattice_backends::redis::RedisKv::new(&url(u, url_env, &format!("kv.{name}"))?)?)
                }
            };
            kv.insert(name.clone(), backend);
        }
        let mut r2: HashMap<String, Arc<dyn ObjectBackend>> = HashMap::new();
        for (name, b) in &config.r2 {
            let backend: Arc<dyn ObjectBackend> = match b {
                R2Binding::Fs { path } => Arc::new(lattice_backends::fs::FsObjects::open(path).await?),
                R2Binding::S3 {
                    endpoint,
                    region,
                    bucket,
                    access_key_env,
                    secret_key_env,
                    path_style,
                    extra_ca,
                } => {
                    let key = std::env::var(access_key_env).with_context(|| {
                        format!("r2.{name}: environment variable {access_key_env} is not set")
                    })?;
                    let secret = std::env::var(secret_key_env).with_context(|| {
                        format!("r2.{name}: environment variable {secret_key_env} is not set")
                    })?;
                    Arc::new(lattice_backends::s3::S3Objects::new(&lattice_backends::s3::S3Config {
                        endpoint: endpoint.clone(),
                        region: region.clone(),
                        bucket: bucket.clone(),
                        access_key: key,
                        secret_key: secret,
                        path_style: *path_style,
                        tls: Some(Arc::new(
                            crate::tls::client_config(crate::config::PostQuantum::Preferred, extra_ca)
                                .with_context(|| format!("r2.{name}: TLS client configuration"))?,
                        )),
                    })?)
                }
            };
            r2.insert(name.clone(), backend);
        }

        let mut namespaces = HashMap::new();
        for (name, b) in &config.durable_objects {
            let storage: Arc<dyn ObjectStorageBackend> = match &b.storage {
                ObjectStorage::Sqlite { path } => {
                    Arc::new(lattice_backends::sqlite::SqliteObjectStorage::open(path).await?)
                }
                ObjectStorage::Postgres { url: u, url_env } => {
                    Arc::new(lattice_backends::postgres::PostgresObjectStorage::new(&url(
                        u,
                        url_env,
                        &format!("durable_objects.{name}"),
                    )?)?)
                }
            };
            let key = secrets.get(&b.unique_key_secret)?.with_context(|| {
                format!("durable_objects.{name}: secret {} is missing", b.unique_key_secret)
            })?;
            let mut ns = ObjectNamespace::new(name.clone(), b.class.clone(), &key, b.shards, storage);
            let paired = ns.pair_sql(d1.values());
            if paired > 0 {
                tracing::info!(namespace = %name, d1_bindings = paired, "objects' D1 batches join their storage commits");
            }
            namespaces.insert(name.clone(), Arc::new(ns));
        }
        let all: Vec<Arc<ObjectNamespace>> = namespaces.values().cloned().collect();
        let (placement, leased, peer_secret): (Arc<dyn Placement>, _, _) = match &config.placement {
            None => (Arc::new(LocalPlacement::acquire_all(&all).await?), None, None),
            Some(p) => {
                let backend: Arc<dyn lattice_backends::lease::LeaseBackend> = match &p.leases {
                    LeaseBackendConfig::Postgres { url: u, url_env } => Arc::new(
                        lattice_backends::lease::PostgresLeases::new(&url(u, url_env, "placement.leases")?)?,
                    ),
                    LeaseBackendConfig::Kubernetes { namespace, kubeconfig } => Arc::new(
                        lattice_backends::kube_lease::KubeLeases::new(namespace, kubeconfig.as_deref())
                            .await
                            .context("placement.leases: Kubernetes client")?,
                    ),
                };
                let secret = secrets
                    .get(&p.peer_secret)?
                    .with_context(|| format!("placement.peer_secret: secret {} is missing", p.peer_secret))?;
                let leased = LeasedPlacement::new(p, backend, all.clone());
                (leased.clone(), Some(leased), Some(secret))
            }
        };

        let engine = engine::build_engine(&config.limits)?;
        let cache_dir = config.component_cache_dir();
        let component = engine::load_component(
            &engine,
            &config.component.path,
            &cache_dir,
            config.component.seed_cache_dir.as_deref(),
        )?;
        let prepared = engine::prepare(&engine, &component)?;
        if prepared.objects.is_none() && !namespaces.is_empty() {
            anyhow::bail!(
                "durable_objects are configured but the component exports no lattice:bindings/object-handler"
            );
        }
        let outbound = Arc::new(OutboundPolicy::new(&config.outbound)?);
        let signals = Arc::new(Signals::new());
        let process_id = hex::encode(rand::random::<[u8; 8]>());
        let metrics = Arc::new(Metrics::default());
        let signal_bus: Option<SignalPublisher> = match &config.signals {
            None => None,
            Some(SignalsBinding::Redis { url: u, url_env }) => {
                let bus = Arc::new(lattice_backends::redis::RedisSignals::new(&url(u, url_env, "signals")?)?);
                let local = signals.clone();
                let me = process_id.clone();
                bus.subscribe(Arc::new(move |message: &str| {
                    // "<process id> <key>"; our own were signalled locally already.
                    if let Some((from, key)) = message.split_once(' ')
                        && from != me
                    {
                        local.signal(key);
                    }
                }));
                Some(SignalPublisher::start(bus, metrics.clone()))
            }
        };
        Ok(Arc::new(Self {
            clock,
            metrics,
            signals,
            signal_bus,
            process_id,
            outbound,
            secrets,
            signing_keys: Default::default(),
            d1,
            kv,
            r2,
            objects: Objects { namespaces, placement },
            peers: Peers::new(peer_secret.as_deref()),
            leased,
            peer_secret,
            backend_health: std::sync::Mutex::new(Vec::new()),
            http_slots: Arc::new(tokio::sync::Semaphore::new(http_slots(config.limits.pool_instances))),
            engine,
            prepared,
            config,
        }))
    }

    /// Background work: backend checks, alarms, eviction of idle objects, forgetting old
    /// signal keys.
    pub fn start_background(self: &Arc<Self>) {
        if let Some(leased) = &self.leased {
            leased.start();
        }
        let shared = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BACKEND_CHECK_INTERVAL);
            loop {
                tick.tick().await;
                shared.check_backends().await;
            }
        });
        let shared = self.clone();
        tokio::spawn(async move {
            let every = std::time::Duration::from_millis(shared.config.limits.alarm_poll_ms);
            let idle = std::time::Duration::from_millis(shared.config.limits.object_idle_ms);
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                Objects::poll_alarms(&shared).await;
                for ns in shared.objects.namespaces.values() {
                    ns.evict_idle(idle);
                }
                let seq = shared.signals.current_seq();
                shared.signals.sweep(seq.saturating_sub(100_000));
            }
        });
    }
}

/// How often, and how long at most, the backends are pinged for `/readyz` and metrics.
pub const BACKEND_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
pub const BACKEND_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(serde::Serialize, Clone, Debug)]
pub struct BackendStatus {
    pub binding: String,
    pub backend: &'static str,
    pub up: bool,
}

impl Shared {
    /// The last backend check (for `/readyz`'s body and metrics). Served from memory, so a
    /// probe never waits on a backend: readiness must not follow a shared backend's outage
    /// (see ARCHITECTURE.md), not even through a probe timeout.
    pub fn backend_status(&self) -> Vec<BackendStatus> {
        self.backend_health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Pings every backend at once, each bounded by [`BACKEND_CHECK_TIMEOUT`].
    async fn check_backends(&self) {
        type Ping<'a> = std::pin::Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
        let mut checks: Vec<(String, &'static str, Ping<'_>)> = Vec::new();
        for (name, b) in &self.d1 {
            checks.push((format!("d1.{name}"), b.name(), Box::pin(async { b.ping().await.is_ok() })));
        }
        for (name, b) in &self.kv {
            checks.push((format!("kv.{name}"), b.name(), Box::pin(async { b.ping().await.is_ok() })));
        }
        for (name, b) in &self.r2 {
            checks.push((format!("r2.{name}"), b.name(), Box::pin(async { b.ping().await.is_ok() })));
        }
        for (name, ns) in &self.objects.namespaces {
            let s = ns.storage();
            checks.push((
                format!("durable_objects.{name}"),
                s.name(),
                Box::pin(async { s.ping().await.is_ok() }),
            ));
        }
        let (labels, pings): (Vec<_>, Vec<_>) = checks
            .into_iter()
            .map(|(binding, backend, ping)| {
                ((binding, backend), tokio::time::timeout(BACKEND_CHECK_TIMEOUT, ping))
            })
            .unzip();
        let ups = futures::future::join_all(pings).await.into_iter().map(|r| r.unwrap_or(false));
        let status = labels
            .into_iter()
            .zip(ups)
            .map(|((binding, backend), up)| BackendStatus { binding, backend, up })
            .collect();
        if let Ok(mut h) = self.backend_health.lock() {
            *h = status;
        }
    }
}

/// Publishes signals to the other processes from one background task, so a guest that signals
/// never waits on the bus: an object event keeps its input gate, and a request does not pay a
/// round trip to Redis. A signal is a hint to re-check data that is already committed when it
/// is sent (the guest signals after its write returned), so sending it a moment later changes
/// no outcome. When the queue is full (the bus is down or far behind) a signal is dropped with
/// a warning; parked requests elsewhere then wake at their timeout, as after a bus outage.
#[derive(Clone)]
pub struct SignalPublisher {
    queue: tokio::sync::mpsc::Sender<String>,
    metrics: Arc<Metrics>,
}

impl SignalPublisher {
    /// Signals waiting to be published, at most.
    const QUEUE: usize = 8192;
    /// Publishes in flight at once (the Redis connection pipelines them).
    const CONCURRENT: usize = 64;

    fn start(bus: Arc<dyn SignalBus>, metrics: Arc<Metrics>) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<String>(Self::QUEUE);
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::CONCURRENT);
            while rx.recv_many(&mut batch, Self::CONCURRENT).await > 0 {
                let sends = batch.drain(..).map(|message| {
                    let (bus, metrics) = (bus.clone(), task_metrics.clone());
                    async move {
                        let started = std::time::Instant::now();
                        let out = bus.publish(&message).await;
                        metrics.binding_call("signals", bus.name(), started.elapsed(), out.is_err());
                        if let Err(e) = out {
                            tracing::warn!(error = %e, "cannot publish a signal to other processes");
                        }
                    }
                });
                futures::future::join_all(sends).await;
            }
        });
        Self { queue, metrics }
    }

    /// Queues `message` for publishing; never waits.
    pub fn publish(&self, message: String) {
        if self.queue.try_send(message).is_err() {
            self.metrics.binding_call("signals", "queue", std::time::Duration::ZERO, true);
            tracing::warn!("the signal queue is full; a signal to other processes was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_reread_when_their_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = Secrets::in_dir(dir.path());
        let path = dir.path().join("s");
        assert_eq!(secrets.get("s").expect("get"), None);
        // Rewritten in place at once (same inode, same length, maybe the same file time): read again.
        std::fs::write(&path, b"one").expect("write");
        assert_eq!(secrets.get("s").expect("get").as_deref(), Some(&b"one"[..]));
        std::fs::write(&path, b"two").expect("write");
        assert_eq!(secrets.get("s").expect("get").as_deref(), Some(&b"two"[..]));
        // A settled file is kept: bytes changed behind its unchanged identity are not seen, which
        // shows the read came from memory.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options().write(true).open(&path).expect("open").set_modified(old).expect("mtime");
        assert_eq!(secrets.get("s").expect("get").as_deref(), Some(&b"two"[..]));
        std::fs::write(&path, b"xyz").expect("write");
        std::fs::File::options().write(true).open(&path).expect("open").set_modified(old).expect("mtime");
        assert_eq!(secrets.get("s").expect("get").as_deref(), Some(&b"two"[..]), "kept");
        // A Kubernetes Secret update swaps in new files (new inodes): seen at once.
        let next = dir.path().join("s.next");
        std::fs::write(&next, b"new").expect("write");
        std::fs::File::options().write(true).open(&next).expect("open").set_modified(old).expect("mtime");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(secrets.get("s").expect("get").as_deref(), Some(&b"new"[..]));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(secrets.get("s").expect("get"), None);
    }
}
