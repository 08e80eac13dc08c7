//! Durable Objects: ids, placement, live objects with workerd's gates, group commit, alarms.
//!
//! # Gates
//! Each live object has an execution token (a `tokio` mutex). An event holds it while guest
//! code runs and while it waits on the object's own storage (input gate closed); it gives it up
//! while it waits on any other I/O and when it finishes (input gate open), so another event can
//! run meanwhile. That is not a per-object mutex around whole events: the wait for durability
//! happens without the token.
//!
//! Writes go to the object's in-memory view at once. When an event opens its gates its writes
//! are *sealed*; a flusher per object commits every sealed write in one backend transaction,
//! carrying the shard's epoch (fencing). An event's response, and any I/O it starts, waits
//! until everything written before it is durable (output gate). Writes sealed while a commit
//! is in flight go out together in the next commit: group commit.
//!
//! A D1 batch an event sends after writing is I/O like any other, so it waits for those writes
//! to be durable. When the D1 database also holds the namespace's storage (the runtime pairs
//! them by URL), it does not wait for a commit of its own: it joins the object's next commit,
//! after the writes, in the same transaction ([`SqlBackend::commit_with_object`]). Nobody can
//! see the batch before the writes are durable, as the output gate requires, and the writes
//! and the batches of every event sealed meanwhile take one commit instead of two.
//!
//! # Placement
//! [`Placement`] says which shards this process owns and under which epoch, and where the others
//! run (`crate::placement`). [`Objects::fetch`] runs an event here when this process owns the
//! object's shard and forwards it to the owner otherwise (`crate::peer`), with one transparent
//! retry when the call provably did not reach guest code (the owner moved, or could not be
//! connected to).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use lattice_backends::{
    BackendError, Fence, ObjectAddr, ObjectListRange, ObjectStorageBackend, ObjectWrite, QueryOutput,
    SqlBackend, SqlError, SqlStatement,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedMutexGuard, oneshot, watch};

use crate::bindings::{ObjectRequest, ObjectResponse};
use crate::placement::{Owner, Placement};
use crate::runtime::Shared;
use crate::state::{WorkerState, arm_deadline};

type HmacSha256 = Hmac<Sha256>;

/// SQLite-backed Durable Object limit: key plus value.
pub const MAX_ENTRY_BYTES: usize = 2 * 1024 * 1024;
/// Keys one get/put/delete call may name.
pub const MAX_KEYS_PER_CALL: usize = 1024;
/// How long unconfirmed writes wait for a confirmed write to commit with, at most.
pub const UNCONFIRMED_DELAY: Duration = Duration::from_millis(50);
/// workerd alarm retries: first retry after 2 s, doubling, at most 6 retries.
pub const ALARM_RETRY_START: Duration = Duration::from_secs(2);
pub const ALARM_RETRY_MAX_TRIES: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid Durable Object id: {0}")]
    InvalidId(&'static str),
    #[error("shard {0} is not owned by this process")]
    NotOwner(u32),
    #[error("the object's storage failed: {0}")]
    Storage(#[from] BackendError),
    #[error("the object was reset after a failed write")]
    Broken,
    #[error("Durable Object call depth over {0}")]
    TooDeep(u32),
    #[error("the component has no Durable Object handler")]
    NoHandler,
    #[error("the guest failed: {0}")]
    Guest(String),
    #[error("the event ran past its execution limit")]
    Deadline,
    #[error("transaction: {0}")]
    Transaction(&'static str),
    /// The owner could not be connected to: the call did not reach it.
    #[error("the shard's owner is unreachable: {0}")]
    PeerUnreachable(String),
    /// The forwarded call failed after it may have reached the owner.
    #[error("the forwarded call failed: {0}")]
    PeerFailed(String),
    /// The owner refused the call as invalid (depth, transaction misuse).
    #[error("{0}")]
    PeerInvalid(String),
}

/// One namespace (a Durable Object class bound under a name).
pub struct ObjectNamespace {
    pub binding: String,
    pub class: String,
    key: [u8; 32],
    /// The namespace's name in storage and leases, derived from its unique key (as workerd keeps
    /// objects under the unique key): two deployments with different keys never share objects,
    /// and renaming the binding keeps the data.
    storage_id: String,
    shards: u32,
    storage: Arc<dyn ObjectStorageBackend>,
    /// D1 backends whose database holds this namespace's storage (see the module docs).
    paired: Vec<Arc<dyn SqlBackend>>,
    live: Mutex<HashMap<String, Arc<LiveObject>>>,
    alarm_retries: Mutex<HashMap<String, u32>>,
    counters: Counters,
}

impl ObjectNamespace {
    pub fn new(
        binding: String,
        class: String,
        unique_key: &[u8],
        shards: u32,
        storage: Arc<dyn ObjectStorageBackend>,
    ) -> Self {
        let key: [u8; 32] = Sha256::digest(unique_key).into();
        let mut id = Sha256::new();
        id.update(b"lattice durable object storage id\0");
        id.update(key);
        let storage_id = format!("do-{}", hex::encode(&id.finalize()[..12]));
        Self {
            binding,
            class,
            key,
            storage_id,
            shards,
            storage,
            paired: Vec::new(),
            live: Mutex::new(HashMap::new()),
            alarm_retries: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Pairs each D1 backend in `d1` that keeps its data in this namespace's storage database:
    /// objects' batches to it join their commits. Returns how many were paired.
    pub fn pair_sql<'a>(&mut self, d1: impl IntoIterator<Item = &'a Arc<dyn SqlBackend>>) -> usize {
        let Some(db) = self.storage.database().map(str::to_owned) else { return 0 };
        self.paired = d1.into_iter().filter(|b| b.database() == Some(db.as_str())).cloned().collect();
        self.paired.len()
    }

    /// Forgets the live objects of `shard` (lost or handed over). Events still running on them
    /// keep their copy; its commits carry the old epoch and are refused once another owner
    /// took the shard.
    pub fn drop_shard(&self, shard: u32) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, o| o.addr.shard != shard);
    }

    /// Whether an event runs, or writes wait to commit, on an object of `shard`.
    pub fn shard_busy(&self, shard: u32) -> bool {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().any(|o| {
            o.addr.shard == shard && (o.holds.load(std::sync::atomic::Ordering::SeqCst) > 0 || !o.is_quiet())
        })
    }

    pub fn fenced_count(&self) -> u64 {
        self.counters.fenced.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn storage_id(&self) -> &str {
        &self.storage_id
    }

    pub fn storage(&self) -> &Arc<dyn ObjectStorageBackend> {
        &self.storage
    }

    fn mac16(&self, data: &[u8]) -> [u8; 16] {
        // HMAC pads keys shorter than the hash's block to the block with zeros (RFC 2104), so
        // padding here gives the same MAC through the infallible constructor.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.key);
        let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
        mac.update(data);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    fn id_from_first(&self, first: [u8; 16]) -> String {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&first);
        id[16..].copy_from_slice(&self.mac16(&first));
        hex::encode(id)
    }

    /// workerd: first 16 bytes HMAC(key, name), last 16 bytes HMAC(key, first 16).
    pub fn id_from_name(&self, name: &str) -> String {
        self.id_from_first(self.mac16(name.as_bytes()))
    }

    pub fn new_unique_id(&self) -> String {
        self.id_from_first(rand::random())
    }

    pub fn id_from_string(&self, id: &str) -> Result<String, ObjectError> {
        if id.len() != 64 {
            return Err(ObjectError::InvalidId("must be 64 hex digits"));
        }
        let bytes = hex::decode(id).map_err(|_| ObjectError::InvalidId("must be 64 hex digits"))?;
        let mut first = [0u8; 16];
        first.copy_from_slice(&bytes[..16]);
        if self.mac16(&first)[..] != bytes[16..] {
            return Err(ObjectError::InvalidId("not valid for this namespace"));
        }
        Ok(id.to_ascii_lowercase())
    }

    /// The shard of an id: its first 8 bytes (uniform: they are an HMAC or random) modulo the
    /// namespace's fixed shard count.
    pub fn shard_of(&self, id: &str) -> u32 {
        let prefix = hex::decode(id.get(..16).unwrap_or("0")).unwrap_or_default();
        let mut b = [0u8; 8];
        for (i, v) in prefix.iter().take(8).enumerate() {
            b[i] = *v;
        }
        u32::try_from(u64::from_be_bytes(b) % u64::from(self.shards)).unwrap_or(0)
    }

    /// The live object for `id`, created when absent. The returned [`Hold`] keeps it from being
    /// evicted until dropped, so two live copies of one object never exist in this process.
    fn live_object(&self, placement: &dyn Placement, id: &str) -> Result<Hold, ObjectError> {
        let shard = self.shard_of(id);
        let epoch = placement.epoch(&self.storage_id, shard).ok_or(ObjectError::NotOwner(shard))?;
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(obj) = live.get(id)
            && obj.epoch == epoch
            && !obj.is_broken()
        {
            obj.touch();
            return Ok(Hold::new(obj.clone()));
        }
        let obj = Arc::new(LiveObject::new(
            ObjectAddr { namespace: self.storage_id.clone(), id: id.to_owned(), shard },
            epoch,
            self.storage.clone(),
            self.paired.clone(),
            self.counters.clone(),
        ));
        live.insert(id.to_owned(), obj.clone());
        Ok(Hold::new(obj))
    }

    /// Drops idle objects that have nothing left to flush.
    pub fn evict_idle(&self, idle: Duration) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, o| {
            let held = o.holds.load(std::sync::atomic::Ordering::SeqCst) > 0;
            held || !(o.is_broken() || (o.idle_for() >= idle && o.is_quiet()))
        });
    }

    pub fn joined_count(&self) -> u64 {
        self.counters.joined.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn commit_count(&self) -> u64 {
        self.counters.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }
}

/// The object's view of its storage, with what is not durable yet.
#[derive(Default, Clone)]
struct Pending {
    delete_all: bool,
    entries: BTreeMap<String, Option<Vec<u8>>>,
    alarm: Option<Option<u64>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.delete_all && self.entries.is_empty() && self.alarm.is_none()
    }

    fn absorb(&mut self, later: Pending) {
        if later.delete_all {
            *self = later;
            return;
        }
        self.entries.extend(later.entries);
        if later.alarm.is_some() {
            self.alarm = later.alarm;
        }
    }

    fn into_write(self) -> ObjectWrite {
        ObjectWrite {
            delete_all: self.delete_all,
            entries: self.entries.into_iter().collect(),
            alarm: self.alarm,
        }
    }
}

/// What an attached batch gets: its own outcome once the commit carrying it is over, or the
/// object's failure (nothing of the commit happened).
pub type AttachedOutcome = Result<Result<Vec<QueryOutput>, SqlError>, ObjectError>;

/// A D1 batch waiting for its object's next commit (see [`LiveObject::attach`]).
struct Attached {
    statements: Vec<SqlStatement>,
    reply: oneshot::Sender<AttachedOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    UpTo(u64),
    Broken,
}

struct Inner {
    /// Known values; `None` = known to be absent.
    cache: BTreeMap<String, Option<Vec<u8>>>,
    /// The cache holds every key (after delete-all).
    complete: bool,
    alarm: Option<Option<u64>>,
    /// Writes of the event holding the token, not sealed yet.
    open: Pending,
    open_seq: u64,
    /// Sealed writes waiting for the flusher.
    sealed: Pending,
    sealed_seq: u64,
    /// D1 batches to commit after `sealed`, in the order their events sealed.
    attached: Vec<Attached>,
    write_seq: u64,
    /// The newest write a response must wait for (unconfirmed writes do not raise it).
    confirmed_seq: u64,
    flushing: bool,
    /// A delayed flush of unconfirmed writes is pending (see [`LiveObject::seal`]).
    flush_scheduled: bool,
    broken: bool,
    txn: Option<Txn>,
}

/// An object's known entries; `None` = known to be absent.
type View = BTreeMap<String, Option<Vec<u8>>>;

/// An open transaction: what rollback restores.
struct Txn {
    /// Each key's cache entry before its first write in the transaction (`None`: not cached).
    undo: BTreeMap<String, Option<Option<Vec<u8>>>>,
    /// After a delete-all inside the transaction: the whole view just before it.
    before_delete_all: Option<(View, bool)>,
    open: Pending,
    open_seq: u64,
    /// Rolled-back writes never reach a flush, so nothing may wait for their sequence numbers.
    write_seq: u64,
    confirmed_seq: u64,
    alarm: Option<Option<u64>>,
}

impl Inner {
    /// Records `key`'s entry before its first write inside a transaction.
    fn remember(&mut self, key: &str) {
        let prior = self.cache.get(key).cloned();
        if let Some(t) = self.txn.as_mut()
            && t.before_delete_all.is_none()
        {
            t.undo.entry(key.to_owned()).or_insert(prior);
        }
    }

    /// Seals the writes of the event holding the token: the flusher commits them next.
    fn seal_open(&mut self) {
        let open = std::mem::take(&mut self.open);
        if !open.is_empty() {
            self.sealed.absorb(open);
            self.sealed_seq = self.open_seq;
        }
    }

    /// Counts a write; a confirmed one (and any inside a transaction) holds responses until
    /// it is durable.
    fn wrote(&mut self, confirm: bool) {
        self.write_seq += 1;
        self.open_seq = self.write_seq;
        if confirm || self.txn.is_some() {
            self.confirmed_seq = self.write_seq;
        }
    }

    fn rollback(&mut self) -> bool {
        let Some(t) = self.txn.take() else { return false };
        if let Some((cache, complete)) = t.before_delete_all {
            self.cache = cache;
            self.complete = complete;
        }
        for (k, prior) in t.undo {
            match prior {
                None => {
                    self.cache.remove(&k);
                }
                Some(v) => {
                    self.cache.insert(k, v);
                }
            }
        }
        self.open = t.open;
        self.open_seq = t.open_seq;
        self.write_seq = t.write_seq;
        self.confirmed_seq = t.confirmed_seq;
        self.alarm = t.alarm;
        true
    }
}

/// A namespace's counters, shared by its live objects.
#[derive(Clone, Default)]
struct Counters {
    /// Storage commits made; fewer than events when writes were grouped.
    commits: Arc<std::sync::atomic::AtomicU64>,
    /// Commits refused because the shard's epoch moved on (another owner took it).
    fenced: Arc<std::sync::atomic::AtomicU64>,
    /// D1 batches that committed in their object's storage commit.
    joined: Arc<std::sync::atomic::AtomicU64>,
}

pub struct LiveObject {
    pub addr: ObjectAddr,
    pub epoch: u64,
    storage: Arc<dyn ObjectStorageBackend>,
    /// D1 backends that hold this object's storage (see [`LiveObject::attach`]).
    paired: Vec<Arc<dyn SqlBackend>>,
    exec: Arc<tokio::sync::Mutex<()>>,
    inner: Mutex<Inner>,
    durable: watch::Sender<Durability>,
    last_used: Mutex<Instant>,
    counters: Counters,
    /// Events and alarms that hold this object (see [`Hold`]).
    holds: std::sync::atomic::AtomicUsize,
}

/// A use of a live object; while any exists the object is not evicted.
pub struct Hold(Arc<LiveObject>);

impl Hold {
    fn new(obj: Arc<LiveObject>) -> Self {
        obj.holds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(obj)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::ops::Deref for Hold {
    type Target = Arc<LiveObject>;
    fn deref(&self) -> &Arc<LiveObject> {
        &self.0
    }
}

impl LiveObject {
    fn new(
        addr: ObjectAddr,
        epoch: u64,
        storage: Arc<dyn ObjectStorageBackend>,
        paired: Vec<Arc<dyn SqlBackend>>,
        counters: Counters,
    ) -> Self {
        Self {
            addr,
            epoch,
            storage,
            paired,
            exec: Arc::new(tokio::sync::Mutex::new(())),
            inner: Mutex::new(Inner {
                cache: BTreeMap::new(),
                complete: false,
                alarm: None,
                open: Pending::default(),
                open_seq: 0,
                sealed: Pending::default(),
                sealed_seq: 0,
                attached: Vec::new(),
                write_seq: 0,
                confirmed_seq: 0,
                flush_scheduled: false,
                flushing: false,
                broken: false,
                txn: None,
            }),
            durable: watch::channel(Durability::UpTo(0)).0,
            last_used: Mutex::new(Instant::now()),
            counters,
            holds: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    fn is_broken(&self) -> bool {
        self.lock().broken
    }

    fn is_quiet(&self) -> bool {
        let i = self.lock();
        !i.flushing && i.open.is_empty() && i.sealed.is_empty() && self.exec.try_lock().is_ok()
    }

    pub fn fence(&self) -> Fence {
        Fence { namespace: self.addr.namespace.clone(), shard: self.addr.shard, epoch: self.epoch }
    }

    fn check(&self) -> Result<(), ObjectError> {
        if self.lock().broken { Err(ObjectError::Broken) } else { Ok(()) }
    }

    pub async fn get(&self, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, ObjectError> {
        self.check()?;
        let missing: Vec<String> = {
            let i = self.lock();
            if i.complete {
                vec![]
            } else {
                keys.iter().filter(|k| !i.cache.contains_key(*k)).cloned().collect()
            }
        };
        if !missing.is_empty() {
            let loaded = self.storage.get(&self.addr, &missing).await?;
            let mut i = self.lock();
            let mut found: HashMap<String, Vec<u8>> = loaded.into_iter().collect();
            for k in missing {
                let v = found.remove(&k);
                i.cache.entry(k).or_insert(v);
            }
        }
        let i = self.lock();
        Ok(keys
            .iter()
            .filter_map(|k| i.cache.get(k).and_then(|v| v.clone()).map(|v| (k.clone(), v)))
            .collect())
    }

    /// Writes `entries`. `confirm`: the event's response waits until they are durable (the
    /// output gate); without it (workerd's `allowUnconfirmed`) they commit with the next batch
    /// and only a later confirmed write, `sync` or other I/O waits for them.
    pub fn put(&self, entries: Vec<(String, Vec<u8>)>, confirm: bool) -> Result<(), ObjectError> {
        self.check()?;
        let mut i = self.lock();
        for (k, v) in entries {
            i.remember(&k);
            i.cache.insert(k.clone(), Some(v.clone()));
            i.open.entries.insert(k, Some(v));
        }
        i.wrote(confirm);
        Ok(())
    }

    /// Deletes `keys`; `confirm` as for [`LiveObject::put`].
    pub async fn delete(&self, keys: &[String], confirm: bool) -> Result<u32, ObjectError> {
        let existing = self.get(keys).await?.len();
        let mut i = self.lock();
        for k in keys {
            i.remember(k);
            i.cache.insert(k.clone(), None);
            i.open.entries.insert(k.clone(), None);
        }
        i.wrote(confirm);
        Ok(u32::try_from(existing).unwrap_or(u32::MAX))
    }

    pub fn delete_all(&self) -> Result<(), ObjectError> {
        self.check()?;
        let mut i = self.lock();
        if let Some(t) = i.txn.as_ref()
            && t.before_delete_all.is_none()
        {
            let snapshot = (i.cache.clone(), i.complete);
            if let Some(t) = i.txn.as_mut() {
                t.before_delete_all = Some(snapshot);
            }
        }
        i.cache.clear();
        i.complete = true;
        i.alarm = Some(None);
        i.open = Pending { delete_all: true, entries: BTreeMap::new(), alarm: Some(None) };
        i.wrote(true);
        Ok(())
    }

    pub async fn list(&self, range: &ObjectListRange) -> Result<Vec<(String, Vec<u8>)>, ObjectError> {
        self.check()?;
        let complete = self.lock().complete;
        let mut merged: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        if !complete {
            // Pending writes may hide or add keys, so read the whole range, then overlay.
            let unlimited = ObjectListRange { limit: None, ..range.clone() };
            for (k, v) in self.storage.list(&self.addr, &unlimited).await? {
                merged.insert(k, Some(v));
            }
        }
        {
            let mut i = self.lock();
            for (k, v) in &merged {
                i.cache.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (k, v) in i.cache.iter() {
                if in_range(k, range) {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        let mut out: Vec<(String, Vec<u8>)> = merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .filter(|(k, _)| in_range(k, range))
            .collect();
        if range.reverse {
            out.reverse();
        }
        if let Some(limit) = range.limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    pub async fn get_alarm(&self) -> Result<Option<u64>, ObjectError> {
        self.check()?;
        if let Some(a) = self.lock().alarm {
            return Ok(a);
        }
        let a = self.storage.get_alarm(&self.addr).await?;
        let mut i = self.lock();
        Ok(*i.alarm.get_or_insert(a))
    }

    pub fn set_alarm(&self, at: Option<u64>) -> Result<(), ObjectError> {
        self.check()?;
        let mut i = self.lock();
        i.alarm = Some(at);
        i.open.alarm = Some(at);
        i.wrote(true);
        Ok(())
    }

    pub fn transaction_begin(&self) -> Result<(), ObjectError> {
        self.check()?;
        let mut i = self.lock();
        if i.txn.is_some() {
            return Err(ObjectError::Transaction("a transaction is already open"));
        }
        i.txn = Some(Txn {
            undo: BTreeMap::new(),
            before_delete_all: None,
            open: i.open.clone(),
            open_seq: i.open_seq,
            write_seq: i.write_seq,
            confirmed_seq: i.confirmed_seq,
            alarm: i.alarm,
        });
        Ok(())
    }

    pub fn transaction_commit(&self) -> Result<(), ObjectError> {
        self.check()?;
        match self.lock().txn.take() {
            Some(_) => Ok(()),
            None => Err(ObjectError::Transaction("no transaction is open")),
        }
    }

    pub fn transaction_rollback(&self) -> Result<(), ObjectError> {
        self.check()?;
        if self.lock().rollback() { Ok(()) } else { Err(ObjectError::Transaction("no transaction is open")) }
    }

    fn in_transaction(&self) -> bool {
        self.lock().txn.is_some()
    }

    /// Rolls back a transaction the event left open (it ended or trapped inside it).
    fn abandon_transaction(&self) {
        if self.lock().rollback() {
            tracing::warn!(namespace = %self.addr.namespace, id = %self.addr.id, "an event ended inside a transaction; rolled back");
        }
    }

    /// Seals the open writes and makes sure a flusher runs; returns the sequence number a
    /// response sent now must wait for (the newest confirmed write).
    ///
    /// When everything not yet durable is unconfirmed, the flush waits up to
    /// [`UNCONFIRMED_DELAY`]: the object's next confirmed write, usually the next event's,
    /// carries them in its commit, so clean-up writes cost no commit of their own.
    fn seal(self: &Arc<Self>) -> u64 {
        self.seal_with(false)
    }

    fn seal_with(self: &Arc<Self>, now: bool) -> u64 {
        let mut i = self.lock();
        i.seal_open();
        let seq = i.confirmed_seq;
        if !i.sealed.is_empty() && !i.flushing && !i.broken {
            if now || seq > self.durable_up_to() {
                self.start_flush(&mut i);
            } else if !i.flush_scheduled {
                i.flush_scheduled = true;
                let obj = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(UNCONFIRMED_DELAY).await;
                    obj.lock().flush_scheduled = false;
                    obj.seal_with(true);
                });
            }
        }
        seq
    }

    /// Everything up to this write sequence number is durable (all of it once broken: nothing
    /// more will be).
    fn durable_up_to(&self) -> u64 {
        match *self.durable.borrow() {
            Durability::UpTo(d) => d,
            Durability::Broken => u64::MAX,
        }
    }

    /// Starts the flusher; the caller checked that none runs.
    fn start_flush(self: &Arc<Self>, i: &mut Inner) {
        i.flushing = true;
        let obj = self.clone();
        tokio::spawn(async move { obj.flush_loop().await });
    }

    async fn flush_loop(self: Arc<Self>) {
        loop {
            let (batch, upto, attached) = {
                let mut i = self.lock();
                if i.sealed.is_empty() && i.attached.is_empty() {
                    i.flushing = false;
                    return;
                }
                (std::mem::take(&mut i.sealed), i.sealed_seq, std::mem::take(&mut i.attached))
            };
            let write = batch.into_write();
            let (statements, replies): (Vec<_>, Vec<_>) =
                attached.into_iter().map(|a| (a.statements, a.reply)).unzip();
            match self.commit(write, statements).await {
                Ok(outcomes) => {
                    self.counters.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.durable.send_replace(Durability::UpTo(upto));
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    if matches!(e, BackendError::Fenced { .. }) {
                        self.counters.fenced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::error!(namespace = %self.addr.namespace, id = %self.addr.id, error = %e, "object write failed; resetting the object");
                    let mut i = self.lock();
                    i.broken = true;
                    i.flushing = false;
                    let later = std::mem::take(&mut i.attached);
                    drop(i);
                    self.durable.send_replace(Durability::Broken);
                    for reply in replies.into_iter().chain(later.into_iter().map(|a| a.reply)) {
                        let _ = reply.send(Err(ObjectError::Broken));
                    }
                    return;
                }
            }
        }
    }

    /// One commit of the flusher: the write alone, or the write and the attached batches in one
    /// transaction of the paired D1 backend. A `deleteAll` cannot share that transaction: it
    /// commits first, and the batches run after it, each in its own.
    async fn commit(
        &self,
        write: ObjectWrite,
        batches: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<Vec<QueryOutput>, SqlError>>, BackendError> {
        let Some(sql) = self.paired.first().filter(|_| !batches.is_empty()) else {
            return self.storage.commit(&self.addr, self.epoch, &write).await.map(|()| Vec::new());
        };
        if !write.delete_all {
            let n = batches.len() as u64;
            let outcomes = sql.commit_with_object(&self.addr, self.epoch, write, batches).await?;
            self.counters.joined.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            return Ok(outcomes);
        }
        self.storage.commit(&self.addr, self.epoch, &write).await?;
        let mut outcomes = Vec::with_capacity(batches.len());
        for statements in batches {
            outcomes.push(sql.batch(statements, Some(self.fence())).await);
        }
        Ok(outcomes)
    }

    /// Attaches a D1 batch to the object's next commit, after the writes sealed now (see the
    /// module docs); the caller then gives up the execution token and waits for the answer.
    /// Gives the statements back when the batch must run as other I/O does: `backend` is not
    /// paired with this object's storage, a transaction is open, the object is broken, or
    /// nothing is left to commit.
    fn attach(
        self: &Arc<Self>,
        backend: &Arc<dyn SqlBackend>,
        statements: Vec<SqlStatement>,
    ) -> Result<oneshot::Receiver<AttachedOutcome>, Vec<SqlStatement>> {
        if !self.paired.iter().any(|p| Arc::ptr_eq(p, backend)) {
            return Err(statements);
        }
        let mut i = self.lock();
        if i.txn.is_some() || i.broken {
            return Err(statements);
        }
        i.seal_open();
        if i.sealed.is_empty() && !i.flushing && self.durable_up_to() >= i.confirmed_seq {
            return Err(statements);
        }
        let (reply, answer) = oneshot::channel();
        i.attached.push(Attached { statements, reply });
        if !i.flushing {
            self.start_flush(&mut i);
        }
        Ok(answer)
    }

    /// The output gate: waits until every write up to `seq` is durable.
    async fn wait_durable(&self, seq: u64) -> Result<(), ObjectError> {
        let mut rx = self.durable.subscribe();
        loop {
            match *rx.borrow_and_update() {
                Durability::Broken => return Err(ObjectError::Broken),
                Durability::UpTo(d) if d >= seq => return Ok(()),
                Durability::UpTo(_) => {}
            }
            if rx.changed().await.is_err() {
                return Err(ObjectError::Broken);
            }
        }
    }

    /// `storage.sync()`: seal what this event wrote and wait until it is durable.
    pub async fn sync(self: &Arc<Self>) -> Result<(), ObjectError> {
        if self.in_transaction() {
            return Err(ObjectError::Transaction("sync inside a transaction"));
        }
        self.seal_with(true);
        let seq = self.lock().write_seq;
        self.wait_durable(seq).await
    }
}

fn in_range(k: &str, r: &ObjectListRange) -> bool {
    r.prefix.as_deref().is_none_or(|p| k.starts_with(p))
        && r.start.as_deref().is_none_or(|s| k >= s)
        && r.start_after.as_deref().is_none_or(|s| k > s)
        && r.end.as_deref().is_none_or(|e| k < e)
}

/// Tickets for the D1 batches of object events, in the order the events seal their writes.
static SEAL_TICKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The next seal ticket (see `SqlBackend::batch_ordered`). An event draws it while it holds
/// its object's execution token, right before it seals, so one object's tickets follow the
/// order of its events.
pub fn next_seal_ticket() -> u64 {
    SEAL_TICKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A running event's hold on its object: the execution token while guest code runs.
pub struct ObjectEvent {
    pub obj: Arc<LiveObject>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ObjectEvent {
    pub fn fence(&self) -> Fence {
        self.obj.fence()
    }

    /// Before other I/O: seal this event's writes, let other events in, and wait until the
    /// writes are durable (the output gate holds outgoing messages too).
    pub async fn open_gates(&mut self) -> Result<(), ObjectError> {
        if self.obj.in_transaction() {
            return Err(ObjectError::Transaction("a transaction cannot wait on other I/O"));
        }
        let seq = self.obj.seal();
        self.guard = None;
        self.obj.wait_durable(seq).await
    }

    /// A D1 batch that joins the object's next commit (see [`LiveObject::attach`]): this event
    /// lets others in until the commit is over. The statements come back when the batch has to
    /// run as other I/O does ([`Self::open_gates`]).
    pub fn attach(
        &mut self,
        backend: &Arc<dyn SqlBackend>,
        statements: Vec<SqlStatement>,
    ) -> Result<oneshot::Receiver<AttachedOutcome>, Vec<SqlStatement>> {
        let answer = self.obj.attach(backend, statements)?;
        self.guard = None;
        Ok(answer)
    }

    pub async fn close_input_gate(&mut self) {
        if self.guard.is_none() {
            self.guard = Some(self.obj.exec.clone().lock_owned().await);
        }
    }
}

/// Every namespace, and the placement that decides which objects run here.
pub struct Objects {
    pub namespaces: HashMap<String, Arc<ObjectNamespace>>,
    pub placement: Arc<dyn Placement>,
}

enum EventKind {
    Fetch(ObjectRequest),
    Alarm(u32),
}

enum EventOutcome {
    Response(ObjectResponse),
    Alarm(Result<(), String>),
}

impl Objects {
    /// Delivers a request to an object, here or at its shard's owner, and returns its response
    /// once its writes are durable. A call that provably did not reach guest code (the shard
    /// moved, the owner could not be connected to) is retried once after re-reading the routes.
    pub async fn fetch(
        shared: &Arc<Shared>,
        ns: &Arc<ObjectNamespace>,
        id: &str,
        request: ObjectRequest,
        depth: u32,
    ) -> Result<ObjectResponse, ObjectError> {
        let shard = ns.shard_of(id);
        let placement = &shared.objects.placement;
        let mut attempt = 0;
        loop {
            let result = match placement.owner(&ns.storage_id, shard) {
                Owner::Local(_) => Self::fetch_local(shared, ns, id, request.clone(), depth).await,
                Owner::Remote(addr) => shared.peers.forward(&addr, ns, id, &request, depth, shard).await,
                Owner::Unknown => Err(ObjectError::NotOwner(shard)),
            };
            match result {
                Err(ObjectError::NotOwner(_) | ObjectError::PeerUnreachable(_)) if attempt == 0 => {
                    attempt += 1;
                    placement.refresh().await;
                }
                other => return other,
            }
        }
    }

    /// Runs an event on an object of a shard this process owns (`NotOwner` otherwise).
    pub async fn fetch_local(
        shared: &Arc<Shared>,
        ns: &Arc<ObjectNamespace>,
        id: &str,
        request: ObjectRequest,
        depth: u32,
    ) -> Result<ObjectResponse, ObjectError> {
        match Self::run_event(shared, ns, id, EventKind::Fetch(request), depth).await? {
            EventOutcome::Response(r) => Ok(r),
            EventOutcome::Alarm(_) => Err(ObjectError::Guest("unexpected alarm outcome".into())),
        }
    }

    async fn run_event(
        shared: &Arc<Shared>,
        ns: &Arc<ObjectNamespace>,
        id: &str,
        kind: EventKind,
        depth: u32,
    ) -> Result<EventOutcome, ObjectError> {
        let max_depth = shared.config.limits.max_call_depth;
        if depth >= max_depth {
            return Err(ObjectError::TooDeep(max_depth));
        }
        let Some(pre) = shared.prepared.objects.clone() else {
            return Err(ObjectError::NoHandler);
        };
        let obj = ns.live_object(shared.objects.placement.as_ref(), id)?;
        let guard = obj.exec.clone().lock_owned().await;
        obj.check()?;
        let started = Instant::now();
        let event = ObjectEvent { obj: obj.clone(), guard: Some(guard) };
        let mut store =
            wasmtime::Store::new(&shared.engine, WorkerState::new(shared.clone(), Some(event), depth + 1));
        store.limiter(|s| &mut s.limits);
        arm_deadline(&mut store);
        let outcome = async {
            let worker = pre.instantiate_async(&mut store).await?;
            let handler = worker.lattice_bindings_object_handler();
            Ok::<_, wasmtime::Error>(match kind {
                EventKind::Fetch(req) => {
                    EventOutcome::Response(handler.call_fetch(&mut store, &ns.class, id, &req).await?)
                }
                EventKind::Alarm(retry) => {
                    EventOutcome::Alarm(handler.call_alarm(&mut store, &ns.class, id, retry).await?)
                }
            })
        }
        .await;
        // Free the instance before waiting on the output gate.
        let event = store.data_mut().inv.object.take();
        drop(store);
        obj.abandon_transaction();
        let seq = obj.seal();
        drop(event);
        shared.metrics.object_event(&ns.binding, started.elapsed(), outcome.is_err());
        let outcome = outcome.map_err(|e| {
            if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
                ObjectError::Deadline
            } else {
                ObjectError::Guest(format!("{e:#}"))
            }
        })?;
        obj.wait_durable(seq).await?;
        Ok(outcome)
    }

    /// Fires due alarms of the shards this process owns. Called periodically.
    pub async fn poll_alarms(shared: &Arc<Shared>) {
        let now = shared.clock.now_ms();
        for ns in shared.objects.namespaces.values() {
            let shards = shared.objects.placement.owned_shards(&ns.storage_id);
            let due = match ns.storage.due_alarms(&ns.storage_id, &shards, now).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(namespace = %ns.binding, error = %e, "cannot read due alarms");
                    continue;
                }
            };
            for (addr, scheduled) in due {
                let retries =
                    ns.alarm_retries.lock().map(|r| r.get(&addr.id).copied().unwrap_or(0)).unwrap_or(0);
                Self::fire_alarm(shared, ns, &addr.id, scheduled, retries).await;
            }
        }
    }

    async fn fire_alarm(
        shared: &Arc<Shared>,
        ns: &Arc<ObjectNamespace>,
        id: &str,
        scheduled: u64,
        retry: u32,
    ) {
        // While the alarm runs, get-alarm answers none unless the handler sets a new one.
        if let Ok(obj) = ns.live_object(shared.objects.placement.as_ref(), id) {
            let _token = obj.exec.lock().await;
            let mut i = obj.lock();
            if i.alarm == Some(Some(scheduled)) || i.alarm.is_none() {
                i.alarm = Some(None);
            }
        }
        let result = Self::run_event(shared, ns, id, EventKind::Alarm(retry), 0).await;
        let failed = match &result {
            Ok(EventOutcome::Alarm(Ok(()))) => None,
            Ok(EventOutcome::Alarm(Err(e))) => Some(e.clone()),
            Ok(EventOutcome::Response(_)) => Some("unexpected response".into()),
            Err(e) => Some(e.to_string()),
        };
        let Ok(obj) = ns.live_object(shared.objects.placement.as_ref(), id) else { return };
        let _token = obj.exec.lock().await;
        match failed {
            None => {
                if let Ok(mut r) = ns.alarm_retries.lock() {
                    r.remove(id);
                }
                let reset = {
                    let i = obj.lock();
                    // Clear the fired alarm unless the handler set another one.
                    i.alarm == Some(None) && i.open.alarm.is_none() && i.sealed.alarm.is_none()
                };
                if reset {
                    let _ = obj.set_alarm(None);
                }
            }
            Some(e) if retry + 1 < ALARM_RETRY_MAX_TRIES => {
                let delay = ALARM_RETRY_START.as_millis() as u64 * (1u64 << retry.min(9));
                let jitter = (delay as f64 * 0.25 * rand::random::<f64>()) as u64;
                tracing::warn!(namespace = %ns.binding, id, retry, error = %e, "alarm failed; retrying");
                if let Ok(mut r) = ns.alarm_retries.lock() {
                    r.insert(id.to_owned(), retry + 1);
                }
                let _ = obj.set_alarm(Some(shared.clock.now_ms() + delay + jitter));
            }
            Some(e) => {
                tracing::error!(namespace = %ns.binding, id, error = %e, "alarm failed for the last time; dropping it");
                if let Ok(mut r) = ns.alarm_retries.lock() {
                    r.remove(id);
                }
                let _ = obj.set_alarm(None);
            }
        }
        let seq = obj.seal();
        drop(_token);
        if let Err(e) = obj.wait_durable(seq).await {
            tracing::error!(namespace = %ns.binding, id, error = %e, "cannot persist the alarm state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> ObjectNamespace {
        struct NoStorage;
        #[async_trait::async_trait]
        impl ObjectStorageBackend for NoStorage {
            fn name(&self) -> &'static str {
                "none"
            }
            async fn acquire_shard(&self, _: &str, _: u32) -> Result<u64, BackendError> {
                Ok(1)
            }
            async fn get(
                &self,
                _: &ObjectAddr,
                _: &[String],
            ) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
                Ok(vec![])
            }
            async fn list(
                &self,
                _: &ObjectAddr,
                _: &ObjectListRange,
            ) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
                Ok(vec![])
            }
            async fn get_alarm(&self, _: &ObjectAddr) -> Result<Option<u64>, BackendError> {
                Ok(None)
            }
            async fn commit(&self, _: &ObjectAddr, _: u64, _: &ObjectWrite) -> Result<(), BackendError> {
                Ok(())
            }
            async fn due_alarms(
                &self,
                _: &str,
                _: &[u32],
                _: u64,
            ) -> Result<Vec<(ObjectAddr, u64)>, BackendError> {
                Ok(vec![])
            }
            async fn ping(&self) -> Result<(), BackendError> {
                Ok(())
            }
        }
        ObjectNamespace::new("ROOMS".into(), "Room".into(), b"unique-key", 16, Arc::new(NoStorage))
    }

    #[test]
    fn ids_are_stable_and_verified() {
        let n = ns();
        let a = n.id_from_name("object-a");
        assert_eq!(a.len(), 64);
        assert_eq!(a, n.id_from_name("object-a"));
        assert_ne!(a, n.id_from_name("object-b"));
        assert_eq!(n.id_from_string(&a).ok(), Some(a.clone()));
        let u = n.new_unique_id();
        assert!(n.id_from_string(&u).is_ok());
        // Flip one bit of the MAC half.
        let mut bad = a.clone().into_bytes();
        bad[63] = if bad[63] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(bad).unwrap_or_default();
        assert!(matches!(
            n.id_from_string(&bad),
            Err(ObjectError::InvalidId("not valid for this namespace"))
        ));
        assert!(matches!(n.id_from_string("abc"), Err(ObjectError::InvalidId(_))));
        // Another namespace key does not accept it.
        let other = ObjectNamespace::new("X".into(), "Room".into(), b"other", 16, n.storage.clone());
        assert!(other.id_from_string(&a).is_err());
    }

    #[test]
    fn id_mac_matches_plain_hmac() {
        // The padded-key construction equals HMAC-SHA256 with the 32-byte key.
        let n = ns();
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&n.key).expect("any key length");
        mac.update(b"name");
        assert_eq!(n.mac16(b"name")[..], mac.finalize().into_bytes()[..16]);
    }

    #[test]
    fn shards_are_in_range_and_stable() {
        let n = ns();
        for i in 0..200 {
            let id = n.id_from_name(&format!("obj{i}"));
            let s = n.shard_of(&id);
            assert!(s < 16);
            assert_eq!(s, n.shard_of(&id));
        }
    }

    #[test]
    fn list_range_rules() {
        let r = ObjectListRange { start: Some("b".into()), end: Some("d".into()), ..Default::default() };
        assert!(!in_range("a", &r));
        assert!(in_range("b", &r));
        assert!(in_range("c", &r));
        assert!(!in_range("d", &r));
        let r =
            ObjectListRange { start_after: Some("b".into()), prefix: Some("b".into()), ..Default::default() };
        assert!(!in_range("b", &r));
        assert!(in_range("bb", &r));
        assert!(!in_range("c", &r));
    }
}
