//! Durable Object placement: which process owns each shard, under which epoch, and where the
//! owner of a shard this process does not own can be reached.
//!
//! Embedded mode is [`LocalPlacement`]: one process owns every shard. With `[placement]`,
//! [`LeasedPlacement`] owns shards through leases ([`LeaseBackend`]: PostgreSQL rows or
//! Kubernetes Leases):
//!
//! - Shard processes keep a *member* lease alive; the live members split each namespace's shards
//!   by rendezvous hashing, so a member joining or leaving moves only its share.
//! - A member takes a shard it should own once the shard's lease is free or expired, then bumps
//!   the shard's epoch in the object store (`acquire_shard`) before it serves: every write of a
//!   former owner carries the old epoch and is refused (fencing).
//! - Leases are renewed every `renew_ms` (at least three times per lease). Each renewal moves the
//!   shard's local deadline to *send time* + lease − margin, so a process that cannot renew stops
//!   serving before its lease can expire anywhere else.
//! - A shard that should move (rebalancing) or a process that shuts down hands its shards over:
//!   new events are refused (callers retry elsewhere), events in flight finish and commit, then
//!   the leases are released at once rather than left to expire.
//! - Everyone lists the leases every `renew_ms` (and at once when a call misses) to route calls
//!   for shards owned elsewhere.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lattice_backends::BackendError;
use lattice_backends::lease::{LeaseBackend, LeaseRecord};
use sha2::{Digest as _, Sha256};

use crate::config::PlacementConfig;
use crate::objects::ObjectNamespace;

/// Where a shard's objects run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Here, under this epoch.
    Local(u64),
    /// In the process at this peer address.
    Remote(String),
    /// Nobody we know of (moving, or no shard process is up).
    Unknown,
}

/// Which shards this process owns, and who owns the others.
#[async_trait::async_trait]
pub trait Placement: Send + Sync {
    /// `namespace` is [`ObjectNamespace::storage_id`].
    fn owner(&self, namespace: &str, shard: u32) -> Owner;
    /// The epoch this process owns `shard` under, if it serves it now.
    fn epoch(&self, namespace: &str, shard: u32) -> Option<u64> {
        match self.owner(namespace, shard) {
            Owner::Local(e) => Some(e),
            Owner::Remote(_) | Owner::Unknown => None,
        }
    }
    fn owned_shards(&self, namespace: &str) -> Vec<u32>;
    /// Re-reads ownership after a call found the owner gone.
    async fn refresh(&self) {}
    /// Hands every shard over (graceful shutdown).
    async fn shutdown(&self) {}
    /// Prometheus lines.
    fn render_metrics(&self, _out: &mut String) {}
}

/// Embedded mode: one process owns every shard; epochs are taken at start-up.
pub struct LocalPlacement {
    epochs: HashMap<String, Vec<u64>>,
}

impl LocalPlacement {
    pub async fn acquire_all(namespaces: &[Arc<ObjectNamespace>]) -> Result<Self, BackendError> {
        let mut epochs = HashMap::new();
        for ns in namespaces {
            let mut v = Vec::with_capacity(ns.shards() as usize);
            for shard in 0..ns.shards() {
                v.push(ns.storage().acquire_shard(ns.storage_id(), shard).await?);
            }
            epochs.insert(ns.storage_id().to_owned(), v);
        }
        Ok(Self { epochs })
    }
}

impl Placement for LocalPlacement {
    fn owner(&self, namespace: &str, shard: u32) -> Owner {
        match self.epochs.get(namespace).and_then(|v| v.get(shard as usize)) {
            Some(e) => Owner::Local(*e),
            None => Owner::Unknown,
        }
    }
    fn owned_shards(&self, namespace: &str) -> Vec<u32> {
        self.epochs.get(namespace).map(|v| (0..v.len() as u32).collect()).unwrap_or_default()
    }
}

/// A DNS-1123 label: what both lease backends accept as (part of) a name.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The host name as a DNS label (a pod's name), for the default identity.
pub fn host_identity() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let label: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    let label = label.trim_matches('-').to_owned();
    if label.is_empty() { format!("lattice-{}", hex::encode(rand::random::<[u8; 4]>())) } else { label }
}

/// A shard this process holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    /// Serve only before this instant: renewal send time + lease − margin.
    valid_until: Instant,
    /// Handing over: refuse new events.
    leaving: bool,
}

#[derive(Default)]
struct Slot {
    held: Option<Held>,
    /// The live holder's peer address, from the last listing.
    route: Option<String>,
}

#[derive(Default)]
struct Counters {
    renewals: AtomicU64,
    renewal_failures: AtomicU64,
    losses: AtomicU64,
    acquisitions: AtomicU64,
    handovers: AtomicU64,
}

/// Shards owned through leases; see the module docs.
pub struct LeasedPlacement {
    backend: Arc<dyn LeaseBackend>,
    identity: String,
    /// Our peer address; empty for a front.
    address: String,
    owns_shards: bool,
    lease: Duration,
    renew: Duration,
    set: String,
    namespaces: Vec<Arc<ObjectNamespace>>,
    slots: Mutex<HashMap<String, Vec<Slot>>>,
    stopping: AtomicBool,
    /// When the last lease listing started; held while one runs.
    last_listing: tokio::sync::Mutex<Option<Instant>>,
    counters: Counters,
}

/// How long a hand-over waits for events in flight before releasing anyway (their commits are
/// then fenced by the next owner's epoch).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

impl LeasedPlacement {
    pub fn new(
        config: &PlacementConfig,
        backend: Arc<dyn LeaseBackend>,
        namespaces: Vec<Arc<ObjectNamespace>>,
    ) -> Arc<Self> {
        let slots = namespaces
            .iter()
            .map(|ns| (ns.storage_id().to_owned(), (0..ns.shards()).map(|_| Slot::default()).collect()))
            .collect();
        let identity = config.identity.clone().unwrap_or_else(host_identity);
        // `{identity}` in the address: a StatefulSet pod's DNS name under its headless Service.
        let address = match config.advertised_address() {
            Some(a) if config.owns_shards() => a.replace("{identity}", &identity),
            _ => String::new(),
        };
        Arc::new(Self {
            backend,
            identity,
            address,
            owns_shards: config.owns_shards(),
            lease: Duration::from_millis(config.lease_ms),
            renew: Duration::from_millis(config.renew_ms()),
            set: config.lease_set.clone(),
            namespaces,
            slots: Mutex::new(slots),
            stopping: AtomicBool::new(false),
            last_listing: tokio::sync::Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_lease(&self, namespace: &str, shard: u32) -> String {
        format!("{}-{namespace}-{shard}", self.set)
    }

    fn member_lease(&self) -> String {
        let name = format!("{}-m-{}", self.set, self.identity);
        if name.len() <= 63 {
            return name;
        }
        // Too long for a label: a stable digest of the identity instead.
        format!("{}-m-{}", self.set, hex::encode(&Sha256::digest(self.identity.as_bytes())[..12]))
    }

    /// `(namespace storage id, shard)` of a shard lease name of this set.
    fn parse_shard_lease(&self, name: &str) -> Option<(String, u32)> {
        let rest = name.strip_prefix(&self.set)?.strip_prefix('-')?;
        let (ns, shard) = rest.rsplit_once('-')?;
        ns.starts_with("do-").then_some(())?;
        Some((ns.to_owned(), shard.parse().ok()?))
    }

    /// The safety margin between our deadline and the lease's expiry elsewhere: covers clock
    /// rate differences and the time between our deadline check and a write reaching storage
    /// (which the epoch fences anyway).
    fn margin(&self) -> Duration {
        (self.lease / 10).max(Duration::from_millis(200)).min(self.lease / 3)
    }

    /// Runs the lease loop until the process ends.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut next_renew = Instant::now();
            loop {
                if me.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if me.owns_shards && Instant::now() >= next_renew {
                    next_renew = Instant::now() + me.renew;
                    me.renew_all().await;
                }
                me.expire_overdue();
                let waiting = me.sync_routes_and_balance().await;
                // While waiting for a hand-over, look again soon: the stall is one poll.
                let pause = if waiting { me.renew / 4 } else { me.renew };
                let until_renew = next_renew.saturating_duration_since(Instant::now());
                tokio::time::sleep(if me.owns_shards { pause.min(until_renew) } else { pause }).await;
            }
        });
    }

    fn held_names(&self) -> Vec<(String, u32, String)> {
        let slots = self.lock();
        let mut out = vec![];
        for (ns, v) in slots.iter() {
            for (i, s) in v.iter().enumerate() {
                if s.held.is_some() {
                    let shard = u32::try_from(i).unwrap_or(u32::MAX);
                    out.push((ns.clone(), shard, self.shard_lease(ns, shard)));
                }
            }
        }
        out
    }

    /// Renews the member lease and every held shard in one call.
    async fn renew_all(&self) {
        let held = self.held_names();
        let member = self.member_lease();
        let mut names: Vec<String> = held.iter().map(|(_, _, n)| n.clone()).collect();
        names.push(member.clone());
        let sent = Instant::now();
        match self.backend.renew(&names, &self.identity, self.lease).await {
            Ok(renewed) => {
                self.counters.renewals.fetch_add(1, Ordering::Relaxed);
                let renewed: HashSet<String> = renewed.into_iter().collect();
                let valid_until = sent + self.lease - self.margin();
                let mut lost = vec![];
                {
                    let mut slots = self.lock();
                    for (ns, shard, name) in &held {
                        let Some(slot) = slots.get_mut(ns).and_then(|v| v.get_mut(*shard as usize)) else {
                            continue;
                        };
                        if renewed.contains(name) {
                            if let Some(h) = slot.held.as_mut() {
                                h.valid_until = valid_until;
                            }
                        } else {
                            slot.held = None;
                            lost.push((ns.clone(), *shard));
                        }
                    }
                }
                for (ns, shard) in lost {
                    self.counters.losses.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(namespace = %ns, shard, "shard lease lost; dropping its objects");
                    self.drop_objects(&ns, shard);
                }
                if !renewed.contains(&member)
                    && let Err(e) =
                        self.backend.acquire(&member, &self.identity, &self.address, self.lease).await
                {
                    tracing::warn!(error = %e, "cannot take the member lease");
                }
            }
            Err(e) => {
                self.counters.renewal_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot renew leases; shards stop serving at their deadline");
            }
        }
    }

    /// Drops the shards whose deadline passed without a renewal.
    fn expire_overdue(&self) {
        let now = Instant::now();
        let mut expired = vec![];
        {
            let mut slots = self.lock();
            for (ns, v) in slots.iter_mut() {
                for (i, s) in v.iter_mut().enumerate() {
                    if s.held.is_some_and(|h| h.valid_until <= now) {
                        s.held = None;
                        expired.push((ns.clone(), u32::try_from(i).unwrap_or(u32::MAX)));
                    }
                }
            }
        }
        for (ns, shard) in expired {
            self.counters.losses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(namespace = %ns, shard, "shard lease not renewed in time; stopped serving it");
            self.drop_objects(&ns, shard);
        }
    }

    fn namespace(&self, storage_id: &str) -> Option<&Arc<ObjectNamespace>> {
        self.namespaces.iter().find(|n| n.storage_id() == storage_id)
    }

    fn drop_objects(&self, storage_id: &str, shard: u32) {
        if let Some(ns) = self.namespace(storage_id) {
            ns.drop_shard(shard);
        }
    }

    /// Lists the leases and routes each shard to its live holder's address. With `not_before`,
    /// a listing that started at or after it has finished meanwhile: its routes serve, and
    /// `None` is returned (concurrent misses share one listing, and none uses one older than
    /// itself).
    async fn list_and_route(
        &self,
        not_before: Option<Instant>,
    ) -> Result<Option<Vec<LeaseRecord>>, BackendError> {
        let mut last = self.last_listing.lock().await;
        if let Some(t) = not_before
            && last.is_some_and(|l| l >= t)
        {
            return Ok(None);
        }
        let started = Instant::now();
        let leases = self.backend.list(&format!("{}-", self.set)).await?;
        *last = Some(started);
        let mut slots = self.lock();
        for s in slots.values_mut().flatten() {
            s.route = None;
        }
        for l in leases.iter().filter(|l| l.held()) {
            if let Some((ns, shard)) = self.parse_shard_lease(&l.name)
                && let Some(s) = slots.get_mut(&ns).and_then(|v| v.get_mut(shard as usize))
            {
                s.route = Some(l.address.clone());
            }
        }
        Ok(Some(leases))
    }

    /// Lists the leases, updates the routes and (as a shard member) takes and hands over
    /// shards. True when a shard we should own is still held by someone else.
    async fn sync_routes_and_balance(&self) -> bool {
        let leases = match self.list_and_route(None).await {
            Ok(l) => l.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list leases; routes unchanged");
                return false;
            }
        };
        let member_prefix = format!("{}-m-", self.set);
        let mut members: Vec<String> = leases
            .iter()
            .filter(|l| l.name.starts_with(&member_prefix) && l.held())
            .map(|l| l.holder.clone())
            .collect();
        let holders: HashMap<(String, u32), String> = leases
            .iter()
            .filter(|l| l.held())
            .filter_map(|l| Some((self.parse_shard_lease(&l.name)?, l.holder.clone())))
            .collect();
        if !self.owns_shards || self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        if !members.contains(&self.identity) {
            // Our member lease is not visible yet: count ourselves in.
            members.push(self.identity.clone());
        }
        let mut waiting = false;
        let mut take = vec![];
        let mut give = vec![];
        {
            let slots = self.lock();
            for (ns, v) in slots.iter() {
                for (i, s) in v.iter().enumerate() {
                    let shard = u32::try_from(i).unwrap_or(u32::MAX);
                    let mine = rendezvous(&members, ns, shard) == Some(self.identity.as_str());
                    let holder = holders.get(&(ns.clone(), shard)).map(String::as_str);
                    match (&s.held, mine) {
                        (None, true) => match holder {
                            Some(h) if h != self.identity => waiting = true,
                            _ => take.push((ns.clone(), shard)),
                        },
                        (Some(h), false) if !h.leaving => give.push((ns.clone(), shard)),
                        _ => {}
                    }
                }
            }
        }
        for (ns, shard) in take {
            self.take(&ns, shard).await;
        }
        if !give.is_empty() {
            self.hand_over(&give).await;
        }
        waiting
    }

    /// Takes a shard's lease, then bumps its epoch before serving it.
    async fn take(&self, storage_id: &str, shard: u32) {
        let Some(ns) = self.namespace(storage_id).cloned() else { return };
        let name = self.shard_lease(storage_id, shard);
        let sent = Instant::now();
        match self.backend.acquire(&name, &self.identity, &self.address, self.lease).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, shard, "cannot take a shard lease");
                return;
            }
        }
        match ns.storage().acquire_shard(storage_id, shard).await {
            Ok(epoch) => {
                // A shard we drop and take again gets fresh objects: the cached ones carry the
                // old epoch.
                ns.drop_shard(shard);
                let mut slots = self.lock();
                if let Some(slot) = slots.get_mut(storage_id).and_then(|v| v.get_mut(shard as usize)) {
                    slot.held =
                        Some(Held { epoch, valid_until: sent + self.lease - self.margin(), leaving: false });
                    slot.route = Some(self.address.clone());
                }
                self.counters.acquisitions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(namespace = %ns.binding, shard, epoch, "took shard");
            }
            Err(e) => {
                tracing::warn!(error = %e, shard, "cannot bump the shard epoch; giving the lease back");
                let _ = self.backend.release(&[name], &self.identity).await;
            }
        }
    }

    /// Stops taking events for `shards`, waits for those in flight, drops the objects and
    /// releases the leases in one call.
    async fn hand_over(&self, shards: &[(String, u32)]) {
        {
            let mut slots = self.lock();
            for (ns, shard) in shards {
                if let Some(h) =
                    slots.get_mut(ns).and_then(|v| v.get_mut(*shard as usize)).and_then(|s| s.held.as_mut())
                {
                    h.leaving = true;
                }
            }
        }
        let started = Instant::now();
        loop {
            let busy =
                shards.iter().any(|(ns, shard)| self.namespace(ns).is_some_and(|n| n.shard_busy(*shard)));
            if !busy || started.elapsed() > DRAIN_LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut names = vec![];
        {
            let mut slots = self.lock();
            for (ns, shard) in shards {
                if let Some(s) = slots.get_mut(ns).and_then(|v| v.get_mut(*shard as usize)) {
                    s.held = None;
                    s.route = None;
                }
                names.push(self.shard_lease(ns, *shard));
            }
        }
        for (ns, shard) in shards {
            self.drop_objects(ns, *shard);
        }
        match self.backend.release(&names, &self.identity).await {
            Ok(()) => {
                self.counters.handovers.fetch_add(names.len() as u64, Ordering::Relaxed);
                tracing::info!(shards = names.len(), "handed shards over");
            }
            Err(e) => tracing::warn!(error = %e, "cannot release leases; they expire instead"),
        }
    }
}

/// The member that should own `shard` of `namespace`: the highest hash of (member, shard).
fn rendezvous<'a>(members: &'a [String], namespace: &str, shard: u32) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let mut h = Sha256::new();
            h.update(m.as_bytes());
            h.update([0]);
            h.update(namespace.as_bytes());
            h.update(shard.to_be_bytes());
            let d = h.finalize();
            let mut b = [0u8; 8];
            b.copy_from_slice(&d[..8]);
            (u64::from_be_bytes(b), m.as_str())
        })
        .map(String::as_str)
}

#[async_trait::async_trait]
impl Placement for LeasedPlacement {
    fn owner(&self, namespace: &str, shard: u32) -> Owner {
        let slots = self.lock();
        let Some(slot) = slots.get(namespace).and_then(|v| v.get(shard as usize)) else {
            return Owner::Unknown;
        };
        if let Some(h) = slot.held {
            if !h.leaving && Instant::now() < h.valid_until {
                return Owner::Local(h.epoch);
            }
            return Owner::Unknown;
        }
        match &slot.route {
            Some(addr) if !addr.is_empty() && *addr != self.address => Owner::Remote(addr.clone()),
            _ => Owner::Unknown,
        }
    }

    fn owned_shards(&self, namespace: &str) -> Vec<u32> {
        let now = Instant::now();
        let slots = self.lock();
        slots
            .get(namespace)
            .map(|v| {
                v.iter()
                    .enumerate()
                    .filter(|(_, s)| s.held.is_some_and(|h| !h.leaving && now < h.valid_until))
                    .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn refresh(&self) {
        if let Err(e) = self.list_and_route(Some(Instant::now())).await {
            tracing::warn!(error = %e, "cannot list leases; routes unchanged");
        }
    }

    async fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let held: Vec<(String, u32)> = self.held_names().into_iter().map(|(ns, s, _)| (ns, s)).collect();
        if !held.is_empty() {
            self.hand_over(&held).await;
        }
        if self.owns_shards {
            let _ = self.backend.release(&[self.member_lease()], &self.identity).await;
        }
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# TYPE lattice_owned_shards gauge\n");
        for ns in &self.namespaces {
            let n = self.owned_shards(ns.storage_id()).len();
            let _ = writeln!(out, "lattice_owned_shards{{namespace=\"{}\"}} {n}", ns.binding);
        }
        let c = &self.counters;
        for (name, v) in [
            ("lattice_lease_renewals_total", &c.renewals),
            ("lattice_lease_renewal_failures_total", &c.renewal_failures),
            ("lattice_lease_losses_total", &c.losses),
            ("lattice_lease_acquisitions_total", &c.acquisitions),
            ("lattice_lease_handovers_total", &c.handovers),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_leavers_share() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let two: Vec<String> = ["a", "b"].iter().map(|s| (*s).to_owned()).collect();
        let mut moved = 0;
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for shard in 0..300 {
            let before = rendezvous(&three, "do-x", shard).unwrap_or_default();
            let after = rendezvous(&two, "do-x", shard).unwrap_or_default();
            *counts.entry(before).or_default() += 1;
            if before != after {
                assert_eq!(before, "c", "only c's shards move");
                moved += 1;
            }
        }
        assert_eq!(moved, counts["c"]);
        for n in counts.values() {
            assert!((60..=140).contains(n), "uneven split: {counts:?}");
        }
        assert_eq!(rendezvous(&[], "do-x", 1), None);
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("shard-0"));
        assert!(!is_dns_label("Shard"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_label(&host_identity()));
    }
}
