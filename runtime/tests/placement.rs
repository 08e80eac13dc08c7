//! Durable Objects on leased shard processes: several `lattice` processes on loopback share one
//! PostgreSQL (object storage, D1 and the lease rows) or one Kubernetes API server (Leases).
//! Clients call objects through front processes, which forward each call to the shard's owner.
//!
//! Every client operation carries an operation id the object remembers, and a client retries an
//! unanswered operation with the same id until it is answered; so the checks are exact: each
//! counter's answers are 1..=N with no gap and no repeat, and no pooled item is handed out twice
//! or lost, whatever process was killed, paused or restarted meanwhile.

#[path = "common/production.rs"]
mod production;
#[path = "common/support.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use production::production_setup;
use support::{Server, get, post, start};

/// Lease length in these tests; renewals every third of it.
const LEASE_MS: u64 = 3_000;
const RENEW_MS: u64 = 1_000;
/// Shards of the `COUNTERS` namespace in `production_setup`.
const SHARDS: f64 = 8.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Front,
    Shard,
}

/// One deployment: processes sharing secrets (the namespace key, the peer secret) and a lease set.
struct Cluster {
    secrets: tempfile::TempDir,
    set: String,
    leases: String,
}

impl Cluster {
    fn new(leases: &str) -> Self {
        let secrets = tempfile::tempdir().expect("tempdir");
        std::fs::write(secrets.path().join("peer_secret"), rand::random::<[u8; 32]>()).expect("peer secret");
        Self {
            secrets,
            set: format!("t{}", hex::encode(rand::random::<[u8; 4]>())),
            leases: leases.to_owned(),
        }
    }

    fn postgres() -> Option<Self> {
        production_setup("")?;
        Some(Self::new(r#"{ backend = "postgres", url_env = "LATTICE_TEST_POSTGRES_URL" }"#))
    }

    fn start(&self, role: Role, identity: &str) -> Server {
        self.start_with_peer_port(role, identity).0
    }

    /// Starts a process; returns it with its peer listener's port.
    fn start_with_peer_port(&self, role: Role, identity: &str) -> (Server, u16) {
        let peer = support::free_port();
        let role_line = match role {
            Role::Front => "role = \"front\"".to_owned(),
            Role::Shard => format!("role = \"shard\"\npeer_listen = \"127.0.0.1:{peer}\""),
        };
        let extra = format!(
            "[placement]\n{role_line}\nidentity = \"{identity}\"\nlease_set = \"{}\"\nlease_ms = {LEASE_MS}\nrenew_ms = {RENEW_MS}\npeer_secret = \"peer_secret\"\nleases = {}\n",
            self.set, self.leases
        );
        let mut setup = production_setup(&extra).expect("services configured");
        setup.secrets_dir = Some(self.secrets.path().to_owned());
        (start(setup), peer)
    }
}

/// The sum of a metric's samples whose line starts with `series`.
async fn metric(s: &Server, series: &str) -> f64 {
    let m = get(&format!("{}/metrics", s.admin)).await;
    String::from_utf8_lossy(&m.body)
        .lines()
        .filter_map(|l| l.strip_prefix(series).and_then(|v| v.rsplit(' ').next()?.trim().parse::<f64>().ok()))
        .sum()
}

async fn owned(servers: &[&Server]) -> f64 {
    let mut n = 0.0;
    for s in servers {
        n += metric(s, "lattice_owned_shards{").await;
    }
    n
}

/// Waits until `servers` together own every shard; returns how long that took.
async fn until_all_owned(servers: &[&Server], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if owned(servers).await == SHARDS {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "shards not all owned within {limit:?}: {}", owned(servers).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Kills (SIGKILL) the shard process owning the most shards once placement has settled (a
/// joining member takes its share from the first owner within a renewal round); returns it,
/// dead, and the survivors.
async fn kill_busiest(mut shards: Vec<Server>) -> (Server, Vec<Server>) {
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(RENEW_MS * 5 / 2)).await;
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let mut owned = vec![];
    for s in &shards {
        owned.push(metric(s, "lattice_owned_shards{").await);
    }
    let busiest = (0..shards.len()).max_by(|a, b| owned[*a].total_cmp(&owned[*b])).expect("shard processes");
    let mut victim = shards.remove(busiest);
    assert!(owned[busiest] > 0.0, "the victim owns shards");
    victim.child.kill().expect("SIGKILL");
    let _ = victim.child.wait();
    (victim, shards)
}

fn signal(s: &Server, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &s.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig}");
}

/// What the clients were answered.
#[derive(Default)]
struct Answers {
    counts: BTreeMap<String, Vec<u64>>,
    claims: Vec<(String, String)>,
    /// Longest time from an operation's first try to its answer.
    longest: Duration,
    retries: u64,
}

/// Calls `path` (an idempotent object operation) on the fronts until one answers 200.
async fn until_answered(fronts: &[String], path: &str, answers: &Mutex<Answers>) -> serde_json::Value {
    let started = Instant::now();
    let mut attempt = 0usize;
    loop {
        let url = format!("{}{path}", fronts[attempt % fronts.len()]);
        let r = post(&url, "").await;
        if r.status == 200 {
            let took = started.elapsed();
            let mut a = answers.lock().unwrap_or_else(|p| p.into_inner());
            a.longest = a.longest.max(took);
            return r.json();
        }
        assert!(
            r.status == 503 && r.headers.contains_key("retry-after"),
            "a refused call answers 503 with Retry-After, got {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{path} unanswered for a minute");
        answers.lock().unwrap_or_else(|p| p.into_inner()).retries += 1;
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counter and pool objects of one run.
struct Load {
    run: String,
    counters: Vec<String>,
    pools: Vec<String>,
    pool_size: u32,
}

impl Load {
    fn new(counters: usize, pools: usize, pool_size: u32) -> Self {
        let run = format!("r{}", support::unique());
        Self {
            counters: (0..counters).map(|i| format!("{run}-c{i}")).collect(),
            pools: (0..pools).map(|i| format!("{run}-p{i}")).collect(),
            run,
            pool_size,
        }
    }

    async fn fill(&self, fronts: &[String], answers: &Mutex<Answers>) {
        for p in &self.pools {
            until_answered(fronts, &format!("/do/fill?name={p}&n={}", self.pool_size), answers).await;
        }
    }

    /// `clients` concurrent clients issue operations until `stop` is set.
    async fn drive(
        self: &Arc<Self>,
        fronts: Vec<String>,
        clients: usize,
        stop: Arc<std::sync::atomic::AtomicBool>,
        answers: Arc<Mutex<Answers>>,
    ) {
        let mut tasks = vec![];
        for c in 0..clients {
            let (load, fronts, stop, answers) = (self.clone(), fronts.clone(), stop.clone(), answers.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let op = format!("{}-{c}-{i}", load.run);
                    if i % 3 == 2 {
                        let pool = &load.pools[(c + i) % load.pools.len()];
                        let r = until_answered(&fronts, &format!("/do/claim?name={pool}&op={op}"), &answers)
                            .await;
                        if let Some(item) = r["item"].as_str() {
                            answers
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .claims
                                .push((pool.clone(), item.to_owned()));
                        }
                    } else {
                        let counter = &load.counters[(c * 7 + i) % load.counters.len()];
                        let r = until_answered(
                            &fronts,
                            &format!("/do/increment?name={counter}&op={op}"),
                            &answers,
                        )
                        .await;
                        let n = r["count"].as_u64().expect("count");
                        answers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .counts
                            .entry(counter.clone())
                            .or_default()
                            .push(n);
                    }
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await.expect("client task");
        }
    }

    /// Exactly-once: every counter answered 1..=N and holds N; every claimed item was claimed
    /// once, and claimed plus remaining items are the whole pool.
    async fn verify(&self, fronts: &[String], answers: &Answers) {
        let probe = Mutex::new(Answers::default());
        let mut total = 0;
        for counter in &self.counters {
            let mut got = answers.counts.get(counter).cloned().unwrap_or_default();
            got.sort_unstable();
            let n = got.len() as u64;
            total += n;
            assert_eq!(got, (1..=n).collect::<Vec<_>>(), "counter {counter}: answers skip or repeat");
            let state = until_answered(fronts, &format!("/do/state?name={counter}"), &probe).await;
            let want = (n > 0).then(|| n.to_string());
            assert_eq!(
                state["entries"]["count"].as_str(),
                want.as_deref(),
                "counter {counter} holds what was answered"
            );
        }
        assert!(total > 0, "the load made progress");
        let mut seen = HashSet::new();
        for (pool, item) in &answers.claims {
            assert!(seen.insert((pool.clone(), item.clone())), "{item} of {pool} was handed out twice");
        }
        for pool in &self.pools {
            let state = until_answered(fronts, &format!("/do/state?name={pool}"), &probe).await;
            let left: HashSet<String> = state["entries"]
                .as_object()
                .expect("entries")
                .iter()
                .filter(|(k, _)| k.starts_with("pool/"))
                .map(|(_, v)| v.as_str().unwrap_or_default().to_owned())
                .collect();
            let claimed: HashSet<String> =
                answers.claims.iter().filter(|(p, _)| p == pool).map(|(_, i)| i.clone()).collect();
            assert!(left.is_disjoint(&claimed), "{pool}: a claimed item is still in the pool");
            assert_eq!(left.len() + claimed.len(), self.pool_size as usize, "{pool}: items lost");
        }
    }
}

fn urls(fronts: &[&Server]) -> Vec<String> {
    fronts.iter().map(|f| f.url.clone()).collect()
}

/// Three shard processes, two fronts; one owner is killed with SIGKILL under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_owner_loses_nothing() {
    let Some(cluster) = Cluster::postgres() else { return };
    let shards = [
        cluster.start(Role::Shard, "s0"),
        cluster.start(Role::Shard, "s1"),
        cluster.start(Role::Shard, "s2"),
    ];
    let fronts = [cluster.start(Role::Front, "f0"), cluster.start(Role::Front, "f1")];
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let front_urls = urls(&fronts.iter().collect::<Vec<_>>());
    let answers = Arc::new(Mutex::new(Answers::default()));
    let load = Arc::new(Load::new(12, 3, 60));
    load.fill(&front_urls, &answers).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (load, fronts, stop, answers) = (load.clone(), front_urls.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move { load.drive(fronts, 6, stop, answers).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (victim, survivors) = kill_busiest(shards.into()).await;
    let failover = until_all_owned(&survivors.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    eprintln!("failover after SIGKILL: {failover:?} (lease {LEASE_MS} ms)");
    assert!(
        failover < Duration::from_millis(LEASE_MS + 3 * RENEW_MS),
        "the killed owner's shards move within the lease (+ a renewal round): {failover:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    driver.await.expect("driver");
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!(
        "answered {} increments and {} claims; {} retries",
        answers.counts.values().map(Vec::len).sum::<usize>(),
        answers.claims.len(),
        answers.retries
    );
    load.verify(&front_urls, &answers).await;
    // The fronts forwarded every call.
    assert!(metric(&fronts[0], "lattice_forwarded_calls_total{outcome=\"ok\"}").await > 0.0);
    drop(victim);
}

/// A paused owner whose leases were taken over cannot write when it resumes: its pending D1
/// insert and its object write are refused, and the new owner's state stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_is_fenced() {
    let Some(cluster) = Cluster::postgres() else { return };
    let s0 = cluster.start(Role::Shard, "s0");
    let front = cluster.start(Role::Front, "f0");
    until_all_owned(&[&s0], Duration::from_secs(30)).await;
    let f = front.url.clone();
    let run = format!("r{}", support::unique());
    let setup = post(
        &format!("{f}/d1/exec"),
        r#"{"sql":"CREATE TABLE IF NOT EXISTS fence_log (object TEXT NOT NULL, n BIGINT NOT NULL)"}"#,
    )
    .await;
    assert_eq!(setup.status, 200, "{}", String::from_utf8_lossy(&setup.body));
    let (a, b) = (format!("{run}-a"), format!("{run}-b"));
    for name in [&a, &b] {
        let r = post(&format!("{f}/do/increment?name={name}"), "").await;
        assert_eq!(r.json()["count"], 1);
    }
    // Two events that wait 2 s inside D1 on s0, then write: D1 first, or object storage first.
    let pending: Vec<_> = [(&a, "d1-first"), (&b, "storage-first")]
        .into_iter()
        .map(|(name, order)| {
            let url = format!("{f}/do/d1-increment?name={name}&object={name}&sleep=2&order={order}");
            tokio::spawn(async move { post(&url, "").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&s0, "-STOP");
    let s1 = cluster.start(Role::Shard, "s1");
    let took = until_all_owned(&[&s1], Duration::from_secs(30)).await;
    eprintln!("takeover from the paused owner: {took:?}");
    // The front follows the move within a renewal round.
    tokio::time::sleep(Duration::from_millis(RENEW_MS * 2)).await;
    let r = post(&format!("{f}/do/increment?name={a}"), "").await;
    assert_eq!(r.json()["count"], 2, "the new owner serves from the last durable state");
    signal(&s0, "-CONT");
    for p in pending {
        let r = p.await.expect("request task");
        assert_eq!(r.status, 503, "a fenced event fails: {}", String::from_utf8_lossy(&r.body));
    }
    let rows = post(
        &format!("{f}/d1/query"),
        serde_json::json!({"sql": "SELECT COUNT(*) AS n FROM fence_log WHERE object IN (?, ?)", "params": [a, b]})
            .to_string(),
    )
    .await;
    assert_eq!(rows.json()["rows"][0][0], 0, "no fenced D1 insert landed: {}", rows.json());
    for (name, want) in [(&a, "2"), (&b, "1")] {
        let st = post(&format!("{f}/do/state?name={name}"), "").await;
        assert_eq!(st.json()["entries"]["count"], want, "{name}: the paused owner's write did not land");
    }
    assert!(metric(&s0, "lattice_fenced_writes_total{store=\"d1\"}").await >= 1.0);
    assert!(metric(&s0, "lattice_fenced_writes_total{store=\"objects\"").await >= 1.0);
    assert!(metric(&s0, "lattice_lease_losses_total").await >= 1.0, "the paused owner noticed its loss");
}

/// Every shard process is restarted in turn (SIGTERM, then a new process) under load: each
/// hands its shards over at once, so no operation waits as long as a lease's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_hands_shards_over() {
    let Some(cluster) = Cluster::postgres() else { return };
    let mut shards: Vec<Server> = (0..3).map(|i| cluster.start(Role::Shard, &format!("s{i}"))).collect();
    let front = cluster.start(Role::Front, "f0");
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let front_urls = vec![front.url.clone()];
    let answers = Arc::new(Mutex::new(Answers::default()));
    let load = Arc::new(Load::new(8, 2, 60));
    load.fill(&front_urls, &answers).await;
    answers.lock().unwrap_or_else(|p| p.into_inner()).longest = Duration::ZERO;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (load, fronts, stop, answers) = (load.clone(), front_urls.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move { load.drive(fronts, 4, stop, answers).await })
    };
    for (i, slot) in shards.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let had = metric(slot, "lattice_owned_shards{").await;
        let old = &mut *slot;
        signal(old, "-TERM");
        let exited = tokio::task::block_in_place(|| old.child.wait()).expect("wait");
        assert!(exited.success(), "SIGTERM exits cleanly: {exited}\n{}", old.log());
        assert!(
            had == 0.0 || old.log().contains("handed shards over"),
            "SIGTERM hands the shards over:\n{}",
            old.log()
        );
        *slot = cluster.start(Role::Shard, &format!("s{i}"));
    }
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    driver.await.expect("driver");
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!("longest wait for an answer during the rolling restart: {:?}", answers.longest);
    assert!(
        answers.longest < Duration::from_millis(LEASE_MS),
        "no operation waited as long as a lease expiry: {:?}",
        answers.longest
    );
    load.verify(&front_urls, &answers).await;
}

/// A front that reaches no owner answers 503 with Retry-After, never a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_without_owners_answers_503() {
    let Some(cluster) = Cluster::postgres() else { return };
    let front = cluster.start(Role::Front, "f0");
    let r = post(&format!("{}/do/increment?name=x", front.url), "").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.headers.contains_key("retry-after"));
    // A bad peer secret is refused by a shard's peer listener, and the call fails cleanly.
    let (s0, peer_port) = cluster.start_with_peer_port(Role::Shard, "s0");
    until_all_owned(&[&s0], Duration::from_secs(30)).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let bad = h2
        .request(
            http::Request::post(format!(
                "http://127.0.0.1:{peer_port}/_lattice/peer/v1/objects/COUNTERS/{}",
                "0".repeat(64)
            ))
            .header("authorization", "Lattice-Peer 00")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request"),
        )
        .await
        .expect("the peer listener speaks HTTP/2");
    assert_eq!(bad.status(), 401, "a wrong peer secret is refused");
    tokio::time::sleep(Duration::from_millis(RENEW_MS * 2)).await;
    let ok = post(&format!("{}/do/increment?name=x", front.url), "").await;
    assert_eq!(ok.json()["count"], 1);
}

/// The Kubernetes Lease backend against the real API server: two shard processes and a front;
/// one owner is killed under load and the other takes its shards within the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_leases_fail_over() {
    let Some(_) = production_setup("") else { return };
    let Ok(kubeconfig) = std::env::var("LATTICE_TEST_KUBECONFIG") else {
        assert!(
            std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "LATTICE_REQUIRE_SERVICES=1 but LATTICE_TEST_KUBECONFIG is unset"
        );
        return;
    };
    let cluster = Cluster::new(&format!(
        r#"{{ backend = "kubernetes", namespace = "default", kubeconfig = "{kubeconfig}" }}"#
    ));
    let shards = [cluster.start(Role::Shard, "s0"), cluster.start(Role::Shard, "s1")];
    let front = cluster.start(Role::Front, "f0");
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let front_urls = vec![front.url.clone()];
    let answers = Arc::new(Mutex::new(Answers::default()));
    let load = Arc::new(Load::new(6, 2, 40));
    load.fill(&front_urls, &answers).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (load, fronts, stop, answers) = (load.clone(), front_urls.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move { load.drive(fronts, 4, stop, answers).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_victim, survivors) = kill_busiest(shards.into()).await;
    let failover = until_all_owned(&survivors.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    eprintln!("Kubernetes Lease failover after SIGKILL: {failover:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    driver.await.expect("driver");
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
    load.verify(&front_urls, &answers).await;
}

/// Alarms fire on the shard's owner, at least once: alarms set on both shard processes' objects,
/// one process killed before they are due; the survivor takes its shards and fires every alarm
/// exactly once (nothing ran them before the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alarms_fire_on_the_owner_after_failover() {
    let Some(cluster) = Cluster::postgres() else { return };
    let shards = [cluster.start(Role::Shard, "s0"), cluster.start(Role::Shard, "s1")];
    let front = cluster.start(Role::Front, "f0");
    until_all_owned(&shards.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await;
    let run = format!("r{}", support::unique());
    // The manual clock every process starts with (support::write_config).
    let due = 1_700_000_000_000u64 + 10_000;
    let names: Vec<String> = (0..10).map(|i| format!("{run}-a{i}")).collect();
    for name in &names {
        let r = post(&format!("{}/do/alarm?name={name}&at={due}", front.url), "").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let (_victim, survivors) = kill_busiest(shards.into()).await;
    let s0 = &survivors[0];
    for s in [s0, &front] {
        let r = post(&format!("{}/testing/clock/advance?ms=10000", s.admin), "").await;
        assert_eq!(r.status, 200);
    }
    let started = Instant::now();
    for name in &names {
        loop {
            let st = post(&format!("{}/do/state?name={name}", front.url), "").await;
            if st.status == 200 && st.json()["entries"]["alarm_fired"] == "yes" {
                assert_eq!(st.json()["entries"]["alarm_runs"], "1", "{name} fired once");
                assert_eq!(st.json()["alarm"], serde_json::Value::Null, "a fired alarm is cleared");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{name}: alarm not fired: {}", st.json());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
