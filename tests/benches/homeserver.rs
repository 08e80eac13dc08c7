//! The homeserver benchmark (`cargo xtask bench homeserver`; figures go to BENCHMARKS.md).
//!
//! On PostgreSQL/Redis/S3 (`scripts/services.sh`), a fresh database per run with
//! `synchronous_commit = on` set on it, the release `lattice` runtime (`LATTICE_BIN`) and the
//! homeserver component (`LATTICE_GUEST_DIR`). Each run starts its own homeserver and measures:
//!
//! 1. event send throughput (`PUT /rooms/{id}/send/m.room.message/{txn}`): 1 sender into one
//!    room, 10 concurrent senders into one room, 10 senders each into a room of its own; every
//!    sender is one HTTP/1.1 keep-alive connection sending one event after another; events/s
//!    counted over a fixed window after a warm-up;
//! 2. sync wake-up latency: a client long-polls `/sync` (since, timeout 30000) and is parked
//!    (`lattice_parked_requests` on the admin listener says so); another user sends; the
//!    latency runs from just before the send is issued until the long-poll has returned with
//!    that event; sequential samples after a warm-up;
//! 3. memory: `VmRSS`/`VmHWM` of the `lattice` process, idle (after start-up and a first request,
//!    settled) and peak under the send load (the high-water mark is reset with `clear_refs`
//!    before it); PostgreSQL (PSS summed over its processes), Redis and s3s-fs when the services
//!    state directory is known (`LATTICE_TEST_SERVICES_STATE`).
//!
//! Correctness while measuring: every event sent must come back exactly once, in per-sender
//! order, through `/messages` (throughput) or `/sync` (wake-up); any error response fails the
//! run, and a failed run gives no figure (the process then exits with 1). Every figure is
//! printed as min / median / max over the runs, next to its target.
//!
//! Diagnostics printed with each load, to say where the time goes: CPU of `lattice`,
//! PostgreSQL, this load generator and the machine; what PostgreSQL's sessions wait on
//! (sampled `pg_stat_activity`); and per event the runtime's binding calls and their mean time,
//! room object events and commits (`/metrics`), PostgreSQL transactions and WAL syncs
//! (`pg_stat_database`, `pg_stat_wal`). A first start before the runs fills the AOT cache, so
//! the measured runs never include compiling the component.
//!
//! Settings (environment): `LATTICE_BENCH_RUNS` (3), `LATTICE_BENCH_SECS` (10, the measured
//! window), `LATTICE_BENCH_WARMUP_SECS` (2), `LATTICE_BENCH_WAKE_SAMPLES` (200),
//! `LATTICE_BENCH_WAKE_WARMUP` (20).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lattice_e2e::{Backend, Homeserver, Options};
use serde_json::{Value, json};

#[path = "common/matrix.rs"]
mod matrix;
#[path = "common/procs.rs"]
mod procs;

use matrix::{Http, Sender, create_room, join, ms, percentile, send_path, verify_messages};
use procs::{ServicePids, fmt_mb, mb, proc_stat, proc_status_kb, reset_hwm};

const SENDERS: usize = 10;
/// Targets to compare against (the numbers), judged on the median.
const TARGET_SEND_10: Target = Target::AtLeast(2_500.0);
const TARGET_WAKE_P50_MS: Target = Target::Below(5.0);
const TARGET_IDLE_RSS_MB: Target = Target::Below(50.0);

#[derive(Debug, Clone, Copy)]
struct Settings {
    runs: usize,
    measure: Duration,
    warmup: Duration,
    wake_samples: usize,
    wake_warmup: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        Self {
            runs: env_or("LATTICE_BENCH_RUNS", 3),
            measure: Duration::from_secs(env_or("LATTICE_BENCH_SECS", 10)),
            warmup: Duration::from_secs(env_or("LATTICE_BENCH_WARMUP_SECS", 2)),
            wake_samples: env_or("LATTICE_BENCH_WAKE_SAMPLES", 200),
            wake_warmup: env_or("LATTICE_BENCH_WAKE_WARMUP", 20),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: one client (one keep-alive connection) per simulated user.

// ---------------------------------------------------------------------------------------------
// Processes: memory and CPU from /proc.

/// Context switches of all the process's threads.
fn context_switches(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            Some(
                task_status(pid, tid, "voluntary_ctxt_switches")
                    + task_status(pid, tid, "nonvoluntary_ctxt_switches"),
            )
        })
        .sum()
}

fn task_status(pid: u32, tid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Busy and total jiffies of the whole machine (/proc/stat `cpu` line).
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let nums: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|n| n.parse().ok())
        .collect();
    let total: u64 = nums.iter().sum();
    let idle = nums.get(3).copied().unwrap_or(0) + nums.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Samples memory while a load runs: the maxima of the services' memory every 250 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<[Option<u64>; 3]>,
}

impl Sampler {
    fn start(services: ServicePids) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = [None; 3];
            while !flag.load(Ordering::Relaxed) {
                for (m, v) in max.iter_mut().zip(services.memory_kb()) {
                    *m = (*m).max(v);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            max
        });
        Self { stop, thread }
    }

    fn finish(self) -> [Option<u64>; 3] {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// CPU use of the server, PostgreSQL, this load generator and the machine over a stretch.
struct CpuMeter {
    lattice: u32,
    services: ServicePids,
    started: Instant,
    at: [u64; 5],
    machine_total: u64,
}

impl CpuMeter {
    fn start(lattice: u32, services: ServicePids) -> Self {
        let (busy, total) = machine_jiffies();
        let at = [
            proc_stat(lattice).map_or(0, |s| s.1),
            services.postgres_ticks(),
            proc_stat(std::process::id()).map_or(0, |s| s.1),
            busy,
            context_switches(lattice),
        ];
        Self { lattice, services, started: Instant::now(), at, machine_total: total }
    }

    /// Percent of one core: lattice, postgres, load generator; and the machine's busy share
    /// of all its cores.
    fn finish(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let hz = clock_ticks();
        let (busy, total) = machine_jiffies();
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 / hz / secs * 100.0;
        let machine =
            busy.saturating_sub(self.at[3]) as f64 / (total - self.machine_total).max(1) as f64 * 100.0;
        format!(
            "CPU (% of one core) lattice {:.0}, postgres {:.0}, load generator {:.0}; machine busy {:.0}% of {} cores (the rest is other work); lattice context switches {:.0}/s",
            pct(proc_stat(self.lattice).map_or(0, |s| s.1), self.at[0]),
            pct(self.services.postgres_ticks(), self.at[1]),
            pct(proc_stat(std::process::id()).map_or(0, |s| s.1), self.at[2]),
            machine,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            context_switches(self.lattice).saturating_sub(self.at[4]) as f64 / secs,
        )
    }
}

/// Anonymous, file-backed and shared parts of the resident set.
fn rss_parts(pid: u32) -> String {
    format!(
        "anon {}, file {}, shmem {}",
        fmt_mb(proc_status_kb(pid, "RssAnon")),
        fmt_mb(proc_status_kb(pid, "RssFile")),
        fmt_mb(proc_status_kb(pid, "RssShmem"))
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Counters read before and after a load: the runtime's `/metrics` (binding calls and their
/// time, object commits, instances) and PostgreSQL's transaction and WAL sync counts.
struct Probe {
    admin: reqwest::Client,
    admin_url: String,
    db_url: String,
}

#[derive(Default)]
struct Counters {
    metrics: std::collections::BTreeMap<String, f64>,
    pg: [i64; 4],
}

impl Probe {
    async fn read(&self) -> Counters {
        use sqlx::Connection as _;
        let mut c = Counters::default();
        if let Ok(resp) = self.admin.get(format!("{}/metrics", self.admin_url)).send().await {
            for line in resp.text().await.unwrap_or_default().lines() {
                if line.starts_with('#') || line.contains("_bucket{") {
                    continue;
                }
                if let Some((k, v)) = line.rsplit_once(' ')
                    && let Ok(v) = v.parse()
                {
                    c.metrics.insert(k.to_owned(), v);
                }
            }
        }
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.db_url).await {
            let q = "SELECT d.xact_commit, d.tup_inserted + d.tup_updated + d.tup_deleted, w.wal_sync, w.wal_records \
                     FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()";
            if let Ok(row) = sqlx::query_as::<_, (i64, i64, i64, i64)>(q).fetch_one(&mut conn).await {
                c.pg = [row.0, row.1, row.2, row.3];
            }
            let _ = conn.close().await;
        }
        c
    }
}

impl Probe {
    /// Samples what PostgreSQL's sessions of this database are doing until `until`: the share
    /// of samples per state and wait event (`ClientRead` = waiting for the runtime, `WALSync`/
    /// `WALWrite` = the commit's flush, `Lock` = a row lock).
    async fn sample_waits(&self, until: Instant) -> String {
        use sqlx::Connection as _;
        let Ok(mut conn) = sqlx::PgConnection::connect(&self.db_url).await else {
            tokio::time::sleep_until(until.into()).await;
            return String::new();
        };
        let q = "SELECT coalesce(state, '?'), coalesce(wait_event_type, ''), coalesce(wait_event, '') \
                 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        let mut total = 0u64;
        while Instant::now() < until {
            if let Ok(rows) = sqlx::query_as::<_, (String, String, String)>(q).fetch_all(&mut conn).await {
                for (state, kind, event) in rows {
                    let key = match state.as_str() {
                        "idle" => "idle".to_owned(),
                        _ if kind.is_empty() => format!("{state} on CPU"),
                        _ => format!("{state} {kind}:{event}"),
                    };
                    *counts.entry(key).or_default() += 1;
                    total += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = conn.close().await;
        let mut v: Vec<(String, u64)> = counts.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let shares: Vec<String> = v
            .iter()
            .take(8)
            .map(|(k, n)| format!("{k} {:.0}%", *n as f64 / total.max(1) as f64 * 100.0))
            .collect();
        format!("PostgreSQL sessions (sampled every 50 ms): {}", shares.join(", "))
    }
}

/// What one event cost, from two counter readings `events` apart.
fn per_event(before: &Counters, after: &Counters, events: usize) -> String {
    let ev = events.max(1) as f64;
    let d = |k: &str| {
        after.metrics.get(k).copied().unwrap_or(0.0) - before.metrics.get(k).copied().unwrap_or(0.0)
    };
    let mut parts = Vec::new();
    for key in after.metrics.keys().filter(|k| k.starts_with("lattice_binding_calls_total{")) {
        let calls = d(key);
        if calls <= 0.0 {
            continue;
        }
        let labels = &key["lattice_binding_calls_total".len()..];
        let secs = d(&format!("lattice_binding_call_duration_seconds_sum{labels}"));
        let binding = labels.split('"').nth(1).unwrap_or(labels);
        parts.push(format!("{binding} {:.2}× {:.2} ms", calls / ev, secs / calls * 1e3));
    }
    let commits: f64 =
        after.metrics.keys().filter(|k| k.starts_with("lattice_object_commits_total")).map(|k| d(k)).sum();
    let object_events = d("lattice_object_event_duration_seconds_count{namespace=\"ROOMS\"}");
    let object_ms =
        d("lattice_object_event_duration_seconds_sum{namespace=\"ROOMS\"}") / object_events.max(1.0) * 1e3;
    let instances = d("lattice_instantiate_duration_seconds_count");
    let pg = |i: usize| (after.pg[i] - before.pg[i]) as f64 / ev;
    format!(
        "per event: instances {:.2}, room object events {:.2} ({:.2} ms each), object commits {:.2}; PostgreSQL transactions {:.2}, rows written {:.2}, WAL syncs {:.2}, WAL records {:.1}; binding calls (count, mean time): {}",
        instances / ev,
        object_events / ev,
        object_ms,
        commits / ev,
        pg(0),
        pg(1),
        pg(2),
        pg(3),
        parts.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Debug, Clone, Copy)]
enum Target {
    AtLeast(f64),
    Below(f64),
}

impl Target {
    fn describe(self, median: f64) -> String {
        let (text, met) = match self {
            Self::AtLeast(t) => (format!(">= {t}"), median >= t),
            Self::Below(t) => (format!("< {t}"), median < t),
        };
        format!("{text} {}", if met { "met" } else { "MISSED" })
    }
}

/// One figure over the runs: a value per run, or why that run failed.
struct Figure {
    name: &'static str,
    unit: &'static str,
    target: Option<Target>,
    runs: Vec<Result<f64, String>>,
}

impl Figure {
    fn new(name: &'static str, unit: &'static str, target: Option<Target>) -> Self {
        Self { name, unit, target, runs: Vec::new() }
    }

    fn line(&self) -> String {
        let failed: Vec<String> = self
            .runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("run {}: {e}", i + 1)))
            .collect();
        if !failed.is_empty() {
            return format!("{:<44} FAILED ({})", self.name, failed.join("; "));
        }
        let mut v: Vec<f64> = self.runs.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        if v.is_empty() {
            return format!("{:<44} no runs", self.name);
        }
        let all: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        v.sort_by(f64::total_cmp);
        let median =
            if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
        format!(
            "{:<44} {:>9.1} {:>9.1} {:>9.1}  {:<5} {:<14} runs: {}",
            self.name,
            v[0],
            median,
            v[v.len() - 1],
            self.unit,
            self.target.map(|t| t.describe(median)).unwrap_or_default(),
            all.join(" / ")
        )
    }

    fn failed(&self) -> bool {
        self.runs.iter().any(Result::is_err)
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

struct Throughput {
    events_per_s: f64,
    in_window: usize,
    total: usize,
    p50: Duration,
    p99: Duration,
    cpu: String,
    costs: String,
    waits: String,
    first_last: (f64, f64),
}

/// Every sender sends one event after another until the warm-up and the measured window are
/// over; then every event is checked through `/messages`.
async fn send_load(
    senders: &[Sender],
    tag: &str,
    settings: &Settings,
    lattice: u32,
    services: ServicePids,
    probe: &Probe,
) -> Result<Throughput, String> {
    let before = probe.read().await;
    let start = Instant::now();
    let window_start = start + settings.warmup;
    let stop = window_start + settings.measure;
    let tasks: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.clone();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                let mut n = 0usize;
                while Instant::now() < stop {
                    sent.push(s.send(&tag, i, n).await?);
                    n += 1;
                }
                Ok::<_, String>(sent)
            })
        })
        .collect();
    // The CPU meter covers the measured window.
    tokio::time::sleep_until(window_start.into()).await;
    let meter = CpuMeter::start(lattice, services);
    let waits = probe.sample_waits(stop).await;
    let cpu = meter.finish();
    let mut per_sender = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(sent)) => per_sender.push(sent),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("sender task: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    // PostgreSQL backends publish their statistics within a second of going idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = probe.read().await;
    let in_window: Vec<Duration> = per_sender
        .iter()
        .flatten()
        .filter(|s| s.done >= window_start && s.done <= stop)
        .map(|s| s.took)
        .collect();
    let mut lat = in_window.clone();
    lat.sort();
    let total = per_sender.iter().map(Vec::len).sum();
    // The rate in the first and the last fifth of the window: a drop shows cost growing with
    // the room's history.
    let fifth = settings.measure / 5;
    let rate = |from: Instant| {
        let n = per_sender.iter().flatten().filter(|s| s.done >= from && s.done < from + fifth).count();
        n as f64 / fifth.as_secs_f64().max(1e-3)
    };
    let first_last = (rate(window_start), rate(stop - fifth));
    let costs = per_event(&before, &after, total);
    verify_messages(senders, &per_sender, tag).await?;
    Ok(Throughput {
        events_per_s: in_window.len() as f64 / settings.measure.as_secs_f64(),
        in_window: in_window.len(),
        total,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        cpu,
        costs,
        waits,
        first_last,
    })
}

async fn parked(admin: &reqwest::Client, admin_url: &str) -> i64 {
    let Ok(resp) = admin.get(format!("{admin_url}/metrics")).send().await else { return -1 };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("lattice_parked_requests "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

struct Wake {
    p50: Duration,
    p99: Duration,
    max: Duration,
    send_p50: Duration,
    samples: usize,
    early: usize,
}

/// Sequential samples: long-poll, wait until it is parked, send, wait for delivery.
async fn wake_latency(
    syncer: &Http,
    waker: &Http,
    room: &str,
    admin_url: &str,
    settings: &Settings,
) -> Result<Wake, String> {
    let admin = reqwest::Client::builder().http1_only().build().map_err(|e| e.to_string())?;
    let first = syncer.ok(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await?;
    let mut since = first["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    let mut latencies = Vec::new();
    let mut sends = Vec::new();
    let mut early = 0;
    let mut k = 0;
    while k < settings.wake_warmup + settings.wake_samples {
        let path = format!("/_matrix/client/v3/sync?since={since}&timeout=30000");
        let poller = syncer.clone();
        let mut poll = tokio::spawn(async move {
            let r = poller.call(reqwest::Method::GET, &path, None).await;
            (Instant::now(), r)
        });
        // Wait until the long-poll is parked in the server.
        let waited = Instant::now();
        while parked(&admin, admin_url).await < 1 && !poll.is_finished() {
            if waited.elapsed() > Duration::from_secs(10) {
                return Err("the long-poll was never parked".into());
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if poll.is_finished() {
            // It answered before anything was sent: nothing may be in it.
            let (_, r) = (&mut poll).await.map_err(|e| e.to_string())?;
            let v = match r? {
                (200, v) => v,
                (s, v) => return Err(format!("sync: {s} {v}")),
            };
            if v["rooms"]["join"].as_object().is_some_and(|j| !j.is_empty()) {
                return Err(format!("sync returned events nobody sent: {v}"));
            }
            since = v["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
            early += 1;
            if early > 20 {
                return Err("the long-poll keeps returning at once".into());
            }
            continue;
        }
        let body = json!({"msgtype": "m.text", "body": format!("wake {k}")});
        let t0 = Instant::now();
        let sent = waker.ok(reqwest::Method::PUT, &send_path(room, &format!("wake-{k}")), Some(&body)).await;
        let send_took = t0.elapsed();
        let (t1, r) = poll.await.map_err(|e| e.to_string())?;
        let sent = sent?;
        let v = match r? {
            (200, v) => v,
            (s, v) => return Err(format!("sync: {s} {v}")),
        };
        let join = v["rooms"]["join"].as_object().cloned().unwrap_or_default();
        let events: Vec<&Value> = join
            .get(room)
            .and_then(|r| r["timeline"]["events"].as_array())
            .map(|a| a.iter().filter(|e| e["type"] == "m.room.message").collect())
            .unwrap_or_default();
        if join.len() != 1 || events.len() != 1 {
            return Err(format!("sample {k}: sync should bring exactly the one event sent: {v}"));
        }
        if events[0]["event_id"] != sent["event_id"] || events[0]["content"]["body"] != body["body"] {
            return Err(format!("sample {k}: sync brought {} instead of {}", events[0], sent["event_id"]));
        }
        since = v["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
        if k >= settings.wake_warmup {
            latencies.push(t1 - t0);
            sends.push(send_took);
        }
        k += 1;
    }
    latencies.sort();
    sends.sort();
    Ok(Wake {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        send_p50: percentile(&sends, 0.5),
        samples: latencies.len(),
        early,
    })
}

// ---------------------------------------------------------------------------------------------
// A run.

struct RunFigures {
    send: [Result<Throughput, String>; 3],
    wake: Result<Wake, String>,
    idle_rss_kb: Result<u64, String>,
    setup_rss_kb: Result<u64, String>,
    peak_rss_kb: Result<u64, String>,
    services_idle: [Option<u64>; 3],
    services_peak: [Option<u64>; 3],
}

/// A fresh database with `synchronous_commit = on` set on it, whatever the server's default.
async fn fresh_database(base: &str) -> (String, String) {
    use sqlx::Connection as _;
    let url = lattice_e2e::fresh_synchronous_postgres_database(base).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect to the fresh database");
    let mut show = Vec::new();
    for setting in ["synchronous_commit", "fsync", "wal_sync_method", "server_version"] {
        let v: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
            .fetch_one(&mut conn)
            .await
            .expect("SHOW");
        show.push(format!("{setting}={v}"));
    }
    (url, show.join(" "))
}

async fn setup_users(anon: &Http) -> Result<(Vec<Http>, Http, Http), String> {
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(anon.register(&format!("sender{i}")).await?);
    }
    Ok((senders, anon.register("syncer").await?, anon.register("waker").await?))
}

async fn run(n: usize, settings: &Settings, base_pg: &str) -> RunFigures {
    let (db_url, pg_settings) = fresh_database(base_pg).await;
    let hs = Homeserver::start(Options::new(Backend::Production).database_url(&db_url))
        .await
        .expect("the services are configured");
    let pid = hs.pid();
    let services = ServicePids::find();
    let probe = Probe {
        admin: reqwest::Client::builder().http1_only().build().expect("an HTTP client"),
        admin_url: hs.admin_url.clone(),
        db_url: db_url.clone(),
    };
    println!("run {n}: lattice pid {pid}; PostgreSQL {pg_settings}; load average {}", load_average());
    let anon = Http::new(&hs.url, None);
    let fail = |e: String| -> RunFigures {
        println!("  run {n} FAILED: {e}");
        RunFigures {
            send: [Err(e.clone()), Err(e.clone()), Err(e.clone())],
            wake: Err(e.clone()),
            idle_rss_kb: Err(e.clone()),
            setup_rss_kb: Err(e.clone()),
            peak_rss_kb: Err(e),
            services_idle: [None; 3],
            services_peak: [None; 3],
        }
    };

    // Idle: after start-up and a first request through the component, settled.
    let started_rss = proc_status_kb(pid, "VmRSS");
    let startup_hwm = proc_status_kb(pid, "VmHWM");
    if let Err(e) = anon.ok(reqwest::Method::GET, "/_matrix/client/versions", None).await {
        return fail(e);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = proc_status_kb(pid, "VmRSS");
    let services_idle = services.memory_kb();
    println!(
        "  idle: lattice VmRSS {} after start-up, {} after a first request ({}; VmHWM during start-up {}); postgres PSS {}, redis RSS {}, s3s-fs RSS {}",
        fmt_mb(started_rss),
        fmt_mb(idle_rss),
        rss_parts(pid),
        fmt_mb(startup_hwm),
        fmt_mb(services_idle[0]),
        fmt_mb(services_idle[1]),
        fmt_mb(services_idle[2]),
    );

    // Users and rooms: one room shared by every sender, one of its own per sender, one for the
    // wake-up.
    let setup = async {
        let (https, sync_http, wake_http) = setup_users(&anon).await?;
        let shared = create_room(&https[0]).await?;
        let mut own = Vec::new();
        for (i, h) in https.iter().enumerate() {
            if i > 0 {
                join(h, &shared).await?;
            }
            own.push(create_room(h).await?);
        }
        let wake_room = create_room(&sync_http).await?;
        join(&wake_http, &wake_room).await?;
        Ok::<_, String>((https, sync_http, wake_http, shared, own, wake_room))
    };
    let (https, sync_http, wake_http, shared, own, wake_room) = match setup.await {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let setup_rss = proc_status_kb(pid, "VmRSS");
    println!(
        "  after set-up ({} registrations with argon2id, {} rooms, settled): lattice VmRSS {} ({}), VmHWM {}",
        SENDERS + 2,
        SENDERS + 2,
        fmt_mb(setup_rss),
        rss_parts(pid),
        fmt_mb(proc_status_kb(pid, "VmHWM"))
    );

    let sender = |i: usize, room: &str| Sender {
        http: https[i].clone(),
        user: hs.user_id(&format!("sender{i}")),
        room: room.to_owned(),
    };
    let hwm_reset = reset_hwm(pid);
    let sampler = Sampler::start(services);
    let scenarios: [(&str, Vec<Sender>); 3] = [
        ("one", vec![sender(0, &shared)]),
        ("ten", (0..SENDERS).map(|i| sender(i, &shared)).collect()),
        ("spread", (0..SENDERS).map(|i| sender(i, &own[i])).collect()),
    ];
    let labels = ["1 sender, 1 room", "10 senders, 1 room", "10 senders, 10 rooms"];
    let mut send = Vec::new();
    for ((tag, senders), label) in scenarios.iter().zip(labels) {
        let r = send_load(senders, &format!("{tag}{n}"), settings, pid, services, &probe).await;
        match &r {
            Ok(t) => println!(
                "  send {label}: {:.1} events/s ({} in {} s; {} sent in all, each back once in order); send latency p50 {:.2} ms, p99 {:.2} ms; first/last fifth of the window {:.0}/{:.0} events/s\n    {}\n    {}\n    {}",
                t.events_per_s,
                t.in_window,
                settings.measure.as_secs(),
                t.total,
                ms(t.p50),
                ms(t.p99),
                t.first_last.0,
                t.first_last.1,
                t.cpu,
                t.waits,
                t.costs,
            ),
            Err(e) => println!("  send {label}: FAILED: {e}"),
        }
        send.push(r);
    }
    let peak = proc_status_kb(pid, "VmHWM");
    let services_peak = sampler.finish();
    let peak_rss_kb = match (hwm_reset, peak) {
        (true, Some(p)) => Ok(p),
        (false, _) => Err("could not reset VmHWM".to_owned()),
        (_, None) => Err("no VmHWM".to_owned()),
    };
    println!(
        "  peak under send load: lattice VmHWM {}; postgres PSS {}, redis RSS {}, s3s-fs RSS {} (sampled every 250 ms)",
        fmt_mb(peak),
        fmt_mb(services_peak[0]),
        fmt_mb(services_peak[1]),
        fmt_mb(services_peak[2]),
    );

    let before = probe.read().await;
    let wake = wake_latency(&sync_http, &wake_http, &wake_room, &hs.admin_url, settings).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = probe.read().await;
    match &wake {
        Ok(w) => println!(
            "  sync wake-up: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} samples (the send request itself: p50 {:.2} ms; long-polls answered before the send: {})\n    {} (a sample: one send, one long-poll parked and re-run)",
            ms(w.p50),
            ms(w.p99),
            ms(w.max),
            w.samples,
            ms(w.send_p50),
            w.early,
            per_event(&before, &after, settings.wake_samples + settings.wake_warmup + w.early).replacen(
                "per event",
                "per sample",
                1
            ),
        ),
        Err(e) => println!("  sync wake-up: FAILED: {e}"),
    }
    println!("  load average after the run: {}", load_average());
    let errors = hs.log().lines().filter(|l| l.contains("ERROR")).count();
    if errors > 0 {
        println!("  note: {errors} ERROR lines in the lattice log");
    }
    drop(hs);
    if let Err(e) = lattice_e2e::drop_postgres_database(base_pg, &db_url).await {
        println!("  note: {e}");
    }
    let mut it = send.into_iter();
    let mut next = || it.next().unwrap_or_else(|| Err("not run".into()));
    RunFigures {
        send: [next(), next(), next()],
        wake,
        idle_rss_kb: idle_rss.ok_or_else(|| "no VmRSS".to_owned()),
        setup_rss_kb: setup_rss.ok_or_else(|| "no VmRSS".to_owned()),
        peak_rss_kb,
        services_idle,
        services_peak,
    }
}

fn machine_state() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(String::new, |kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{} × {model}, {mem}, Linux {}; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        load_average()
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(bench());
    std::process::exit(code);
}

async fn bench() -> i32 {
    let Some(services) = lattice_e2e::services() else {
        println!(
            "homeserver benchmark skipped: the services are not configured (run `cargo xtask bench homeserver`)"
        );
        return 0;
    };
    let settings = Settings::from_env();
    let bin = lattice_e2e::lattice_bin();
    println!("homeserver benchmark: {}", machine_state());
    println!(
        "lattice {}{}; {} runs; send: {} s measured after {} s warm-up; wake-up: {} samples after {}",
        bin.display(),
        if bin.components().any(|c| c.as_os_str() == "release") { "" } else { " (NOT a release build)" },
        settings.runs,
        settings.measure.as_secs(),
        settings.warmup.as_secs(),
        settings.wake_samples,
        settings.wake_warmup,
    );
    let mut figures = [
        Figure::new("send, 1 sender, 1 room", "ev/s", None),
        Figure::new("send, 10 senders, 1 room", "ev/s", Some(TARGET_SEND_10)),
        Figure::new("send, 10 senders, 10 rooms", "ev/s", None),
        Figure::new("send latency p50, 10 senders, 1 room", "ms", None),
        Figure::new("sync wake-up p50", "ms", Some(TARGET_WAKE_P50_MS)),
        Figure::new("sync wake-up p99", "ms", None),
        Figure::new("lattice RSS idle", "MB", Some(TARGET_IDLE_RSS_MB)),
        Figure::new("lattice RSS after set-up", "MB", None),
        Figure::new("lattice RSS peak under send load (VmHWM)", "MB", None),
    ];
    let mut services_fig = [
        Figure::new("postgres PSS idle", "MB", None),
        Figure::new("postgres PSS peak under send load", "MB", None),
        Figure::new("redis RSS idle", "MB", None),
        Figure::new("redis RSS peak under send load", "MB", None),
        Figure::new("s3s-fs RSS idle", "MB", None),
        Figure::new("s3s-fs RSS peak under send load", "MB", None),
    ];
    // A first start fills the AOT cache, so every measured run loads the compiled component.
    {
        let (db_url, _) = fresh_database(&services["LATTICE_TEST_POSTGRES_URL"]).await;
        let hs = Homeserver::start(Options::new(Backend::Production).database_url(&db_url))
            .await
            .expect("the services are configured");
        let compiled = hs.log().contains("compiled component") && !hs.log().contains("from cache");
        println!(
            "first start ({}): lattice VmRSS {}, VmHWM {}",
            if compiled { "compiled the component into the AOT cache" } else { "AOT cache warm" },
            fmt_mb(proc_status_kb(hs.pid(), "VmRSS")),
            fmt_mb(proc_status_kb(hs.pid(), "VmHWM")),
        );
    }
    for n in 1..=settings.runs {
        let r = run(n, &settings, &services["LATTICE_TEST_POSTGRES_URL"]).await;
        for (i, s) in r.send.iter().enumerate() {
            figures[i].runs.push(s.as_ref().map(|t| t.events_per_s).map_err(Clone::clone));
        }
        figures[3].runs.push(r.send[1].as_ref().map(|t| ms(t.p50)).map_err(Clone::clone));
        figures[4].runs.push(r.wake.as_ref().map(|w| ms(w.p50)).map_err(Clone::clone));
        figures[5].runs.push(r.wake.as_ref().map(|w| ms(w.p99)).map_err(Clone::clone));
        figures[6].runs.push(r.idle_rss_kb.clone().map(mb));
        figures[7].runs.push(r.setup_rss_kb.clone().map(mb));
        figures[8].runs.push(r.peak_rss_kb.clone().map(mb));
        for k in 0..3 {
            if let Some(v) = r.services_idle[k] {
                services_fig[2 * k].runs.push(Ok(mb(v)));
            }
            if let Some(v) = r.services_peak[k] {
                services_fig[2 * k + 1].runs.push(Ok(mb(v)));
            }
        }
    }
    println!();
    println!("homeserver benchmark, {} runs ({})", settings.runs, machine_state());
    println!("{:<44} {:>9} {:>9} {:>9}  {:<5} {:<14}", "figure", "min", "median", "max", "unit", "target");
    for f in figures.iter().chain(services_fig.iter().filter(|f| !f.runs.is_empty())) {
        println!("{}", f.line());
    }
    if figures.iter().any(Figure::failed) { 1 } else { 0 }
}
