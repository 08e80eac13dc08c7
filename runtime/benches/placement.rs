//! Placement benchmark (`cargo xtask bench runtime`; figures go to BENCHMARKS.md):
//!
//! - the added latency of a forwarded Durable Object call: the same calls sent to the shard
//!   process that owns every shard (local) and to a front process (forwarded over HTTP/2);
//! - the failover time after `kill -9` of a shard's owner: from the kill to the first answered
//!   call for an object of that shard, through a front.
//!
//! Runs the `lattice` binary with PostgreSQL object storage and PostgreSQL leases; needs
//! `LATTICE_TEST_POSTGRES_URL` (and the other `LATTICE_TEST_*` variables `cargo xtask bench`
//! sets) and `LATTICE_GUEST_DIR`; skipped without them.

#![allow(dead_code, reason = "shares the test support module")]

#[path = "../tests/common/production.rs"]
mod production;
#[path = "../tests/common/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Server, get, post, start};

const LEASE_MS: u64 = 3_000;
const RENEW_MS: u64 = 1_000;
const CALLS: usize = 1_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "placement {name}: n={} p50={:.0}µs p99={:.0}µs",
        samples.len(),
        p50.as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
    );
    p50
}

struct Cluster {
    secrets: tempfile::TempDir,
    set: String,
}

impl Cluster {
    fn start(&self, role: &str, identity: &str) -> Option<Server> {
        let peer = support::free_port();
        let peer_line =
            if role == "shard" { format!("peer_listen = \"127.0.0.1:{peer}\"\n") } else { String::new() };
        let extra = format!(
            "[placement]\nrole = \"{role}\"\n{peer_line}identity = \"{identity}\"\nlease_set = \"{}\"\nlease_ms = {LEASE_MS}\nrenew_ms = {RENEW_MS}\npeer_secret = \"peer_secret\"\nleases = {{ backend = \"postgres\", url_env = \"LATTICE_TEST_POSTGRES_URL\" }}\n",
            self.set
        );
        let mut setup = production::production_setup(&extra)?;
        setup.secrets_dir = Some(self.secrets.path().to_owned());
        Some(start(setup))
    }
}

async fn owned(s: &Server) -> f64 {
    let m = get(&format!("{}/metrics", s.admin)).await;
    String::from_utf8_lossy(&m.body)
        .lines()
        .filter_map(|l| {
            l.strip_prefix("lattice_owned_shards{").and_then(|v| v.rsplit(' ').next()?.parse::<f64>().ok())
        })
        .sum()
}

async fn until_owned(servers: &[&Server], shards: f64) {
    let started = Instant::now();
    loop {
        let mut n = 0.0;
        for s in servers {
            n += owned(s).await;
        }
        if n == shards {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "shards not owned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn timed_calls(base: &str, path: &str) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(CALLS);
    for i in 0..CALLS + 100 {
        let t = Instant::now();
        let r = post(&format!("{base}{path}"), "").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    samples
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("LATTICE_GUEST_DIR").is_err() {
        eprintln!("placement bench skipped: LATTICE_GUEST_DIR unset (run `cargo xtask bench runtime`)");
        return;
    }
    let secrets = tempfile::tempdir().expect("tempdir");
    std::fs::write(secrets.path().join("peer_secret"), rand::random::<[u8; 32]>()).expect("secret");
    let cluster = Cluster { secrets, set: format!("b{}", hex::encode(rand::random::<[u8; 4]>())) };
    let Some(owner) = cluster.start("shard", "s0") else {
        eprintln!("placement bench skipped: services not configured");
        return;
    };
    let front = cluster.start("front", "f0").expect("front");
    until_owned(&[&owner], 8.0).await;
    tokio::time::sleep(Duration::from_millis(RENEW_MS * 2)).await;
    let name = format!("bench-{}", support::unique());
    for (label, path) in
        [("read", format!("/do/state?name={name}")), ("write", format!("/do/increment?name={name}"))]
    {
        let local = report(&format!("{label} local"), timed_calls(&owner.url, &path).await);
        let forwarded = report(&format!("{label} forwarded"), timed_calls(&front.url, &path).await);
        println!(
            "placement {label}: forwarding adds {:.0}µs at p50",
            (forwarded.as_secs_f64() - local.as_secs_f64()) * 1e6
        );
    }

    // Failover: two shard processes; kill -9 the one owning the object, time until it answers.
    let mut standby = cluster.start("shard", "s1").expect("second shard");
    let mut owner = owner;
    let mut failovers = vec![];
    for round in 0..3 {
        until_owned(&[&owner, &standby], 8.0).await;
        tokio::time::sleep(Duration::from_millis(RENEW_MS * 2)).await;
        // Find which process runs the object: the owner runs it without forwarding.
        let r = post(&format!("{}/do/state?name={name}", owner.url), "").await;
        assert_eq!(r.status, 200);
        let forwarded_before = forwarded_ok(&owner).await;
        let _ = post(&format!("{}/do/state?name={name}", owner.url), "").await;
        if forwarded_ok(&owner).await > forwarded_before {
            std::mem::swap(&mut owner, &mut standby);
        }
        owner.child.kill().expect("SIGKILL");
        let _ = owner.child.wait();
        let killed = Instant::now();
        loop {
            let r = post(&format!("{}/do/increment?name={name}", front.url), "").await;
            if r.status == 200 {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no failover");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = killed.elapsed();
        println!(
            "placement failover round {round}: {:.0} ms (lease {LEASE_MS} ms, renew {RENEW_MS} ms)",
            took.as_secs_f64() * 1e3
        );
        failovers.push(took);
        owner = cluster.start("shard", &format!("s{}", round + 2)).expect("replacement shard");
        std::mem::swap(&mut owner, &mut standby);
    }
    let mean = failovers.iter().sum::<Duration>() / failovers.len() as u32;
    println!("placement failover mean: {:.0} ms", mean.as_secs_f64() * 1e3);
}

async fn forwarded_ok(s: &Server) -> f64 {
    let m = get(&format!("{}/metrics", s.admin)).await;
    String::from_utf8_lossy(&m.body)
        .lines()
        .find_map(|l| {
            l.strip_prefix("lattice_forwarded_calls_total{outcome=\"ok\"} ").and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}
