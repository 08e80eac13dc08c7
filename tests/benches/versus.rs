//! Lattice against Synapse on this machine (`cargo xtask bench versus`; issue 7). One load
//! generator drives both servers through the client-server API with the same workloads, one
//! server at a time, each on a fresh database of the same PostgreSQL (`synchronous_commit`
//! on), plain HTTP on loopback, rate limits off:
//!
//! - registering (and logging in) users; creating rooms;
//! - send throughput: 1 sender into one room, 10 concurrent senders into one room, 10 senders
//!   spread over 100 rooms; after a warm-up, over a fixed window;
//! - sync wake-up latency: a client long-polls `/sync`, another user sends, the time from just
//!   before the send until the long-poll returns with that event (p50, p99);
//! - initial sync of a user in 200 rooms;
//! - resident memory of each server's own processes (Lattice: the runtime; Synapse: its Python
//!   process and any children), idle and peak under the send load; PostgreSQL, Redis and the S3
//!   server on lines of their own;
//! - start-up to the first answered request: Lattice with an empty and with a filled compiled-
//!   component cache, Synapse on its fresh database and restarted on it.
//!
//! Correctness is checked while measuring: every event sent comes back exactly once, in order
//! per sender (`/messages` after each throughput window, `/sync` for each wake-up sample), and
//! every request must succeed: a run with an error is reported as failed, never as a figure.
//! The servers are pinned to core 0 (`taskset`), and `cargo xtask bench versus` runs this
//! program on core 1.
//!
//! Inputs (environment; `cargo xtask bench versus` sets them): the services' `LATTICE_TEST_*`,
//! `LATTICE_BIN` (release runtime), `LATTICE_GUEST_DIR`, `LATTICE_SYNAPSE_SCRIPT`
//! (scripts/synapse.sh), `LATTICE_VERSUS_OUT` (the results folder), and the settings
//! `LATTICE_BENCH_RUNS` (3), `LATTICE_BENCH_SECS` (10), `LATTICE_BENCH_WARMUP_SECS` (2),
//! `LATTICE_BENCH_WAKE_SAMPLES` (100), `LATTICE_VERSUS_ROOMS` (200, the initial-sync user's rooms).
//! Output: `results.md` (the table), `results.json` (what `bench/synapse/chart.py` draws) and
//! the run's log in the results folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lattice_e2e::{Backend, Homeserver, Options, enc};
use serde_json::{Value, json};

#[path = "common/matrix.rs"]
mod matrix;
#[path = "common/procs.rs"]
mod procs;

use matrix::{Http, Sender, Sent, create_room, join, ms, percentile, send_path, verify_messages};
use procs::{ServicePids, children, mb, proc_status_kb, reset_hwm};

const SENDERS: usize = 10;
const SPREAD_ROOMS: usize = 100;
/// Users registered (and logged in), and rooms created, in each run for those two figures.
const REGISTER_PER_RUN: usize = 5;
const ROOMS_PER_RUN: usize = 10;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Settings {
    runs: usize,
    measure: Duration,
    warmup: Duration,
    wake_samples: usize,
    rooms: usize,
}

/// One server under test.
struct Server {
    name: &'static str,
    url: String,
    /// The main process; its children count too.
    pid: u32,
    server_name: String,
}

impl Server {
    fn user_id(&self, local: &str) -> String {
        format!("@{local}:{}", self.server_name)
    }

    fn pids(&self) -> Vec<u32> {
        std::iter::once(self.pid).chain(children(self.pid)).collect()
    }

    /// Resident set of the server's own processes, KiB.
    fn rss_kb(&self, field: &str) -> u64 {
        self.pids().into_iter().filter_map(|p| proc_status_kb(p, field)).sum()
    }
}

/// Pins every thread of `pid` (and its children) to core 0.
fn pin(pid: u32) {
    for p in std::iter::once(pid).chain(children(pid)) {
        let _ = Command::new("taskset").args(["-a", "-c", "-p", "0", &p.to_string()]).output();
    }
}

/// A figure per run (or why the run failed).
#[derive(Default, Clone)]
struct Figure(Vec<Result<f64, String>>);

impl Figure {
    fn push(&mut self, r: Result<f64, String>) {
        self.0.push(r);
    }
    fn values(&self) -> Result<Vec<f64>, String> {
        let mut v = vec![];
        for r in &self.0 {
            v.push(r.clone()?);
        }
        if v.is_empty() {
            return Err("not measured".into());
        }
        v.sort_by(f64::total_cmp);
        Ok(v)
    }
    fn median(&self) -> Result<f64, String> {
        let v = self.values()?;
        Ok(if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 })
    }
    fn spread(&self) -> Option<(f64, f64)> {
        let v = self.values().ok()?;
        Some((v[0], v[v.len() - 1]))
    }
}

/// The metrics in table order: name, unit, whether higher is better.
const METRICS: [(&str, &str, bool); 12] = [
    ("register + log in, per user", "ms", false),
    ("create a room", "ms", false),
    ("send, 1 sender, 1 room", "events/s", true),
    ("send, 10 senders, 1 room", "events/s", true),
    ("send, 10 senders, 100 rooms", "events/s", true),
    ("sync wake-up p50", "ms", false),
    ("sync wake-up p99", "ms", false),
    ("initial sync, user in N rooms", "ms", false),
    ("idle RSS", "MiB", false),
    ("peak RSS under send load", "MiB", false),
    ("start-up, cold", "ms", false),
    ("start-up, warm", "ms", false),
];

type Figures = Vec<Figure>;

fn empty() -> Figures {
    vec![Figure::default(); METRICS.len()]
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// Every (sender, room) pair is a virtual sender of its own; a sender sends to its rooms in
/// turn, one event after another, until the warm-up and the window are over.
async fn send_load(pairs: &[Sender], owners: &[usize], tag: &str, s: &Settings) -> Result<f64, String> {
    let start = Instant::now();
    let window_start = start + s.warmup;
    let stop = window_start + s.measure;
    let senders = owners.iter().copied().max().map_or(0, |m| m + 1);
    let tasks: Vec<_> = (0..senders)
        .map(|who| {
            let mine: Vec<(usize, Sender)> = pairs
                .iter()
                .enumerate()
                .filter(|(k, _)| owners[*k] == who)
                .map(|(k, p)| (k, p.clone()))
                .collect();
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let mut sent: Vec<(usize, Sent)> = Vec::new();
                let mut counts = vec![0usize; mine.len()];
                let mut turn = 0;
                while Instant::now() < stop {
                    let slot = turn % mine.len();
                    let (k, p) = &mine[slot];
                    sent.push((*k, p.send(&tag, *k, counts[slot]).await?));
                    counts[slot] += 1;
                    turn += 1;
                }
                Ok::<_, String>(sent)
            })
        })
        .collect();
    let mut per_pair: Vec<Vec<Sent>> = (0..pairs.len()).map(|_| Vec::new()).collect();
    for t in tasks {
        for (k, sent) in t.await.map_err(|e| e.to_string())?? {
            per_pair[k].push(sent);
        }
    }
    let in_window = per_pair.iter().flatten().filter(|x| x.done >= window_start && x.done <= stop).count();
    verify_messages(pairs, &per_pair, tag).await?;
    Ok(in_window as f64 / s.measure.as_secs_f64())
}

/// Sequential wake-up samples: long-poll, give it 50 ms to reach the server, send, wait for
/// the event to come back through that long-poll; p50 and p99 in ms.
/// `since` carries the sync position from one run to the next: a fresh initial sync could be
/// answered from Synapse's sync response cache (two minutes) with an old position.
async fn wake_latency(
    syncer: &Http,
    waker: &Http,
    room: &str,
    samples: usize,
    tag: &str,
    since: &mut String,
) -> Result<(f64, f64), String> {
    let warmup = 10;
    let mut latencies = vec![];
    for k in 0..warmup + samples {
        let path = format!("/_matrix/client/v3/sync?since={since}&timeout=30000");
        let poller = syncer.clone();
        let poll = tokio::spawn(async move {
            let r = poller.call(reqwest::Method::GET, &path, None).await;
            (Instant::now(), r)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = json!({"msgtype": "m.text", "body": format!("{tag} {k}")});
        let t0 = Instant::now();
        let sent =
            waker.ok(reqwest::Method::PUT, &send_path(room, &format!("{tag}-{k}")), Some(&body)).await?;
        // A long-poll may return without the event (Synapse wakes it for presence changes):
        // poll on from where it left off until the event comes, as a client does.
        let mut poll = poll;
        let mut polls = 0;
        let t1 = loop {
            let (t1, r) = poll.await.map_err(|e| e.to_string())?;
            let v = match r? {
                (200, v) => v,
                (st, v) => return Err(format!("sync: {st} {v}")),
            };
            let events: Vec<Value> = v["rooms"]["join"][room]["timeline"]["events"]
                .as_array()
                .map(|a| a.iter().filter(|e| e["type"] == "m.room.message").cloned().collect())
                .unwrap_or_default();
            *since = v["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
            match events.as_slice() {
                [] if polls < 20 => {}
                [e] if e["event_id"] == sent["event_id"] => break t1,
                _ => {
                    return Err(format!(
                        "wake sample {k}: sync should bring exactly the event sent ({}): {v}",
                        sent["event_id"]
                    ));
                }
            }
            polls += 1;
            let path = format!("/_matrix/client/v3/sync?since={since}&timeout=30000");
            let poller = syncer.clone();
            poll = tokio::spawn(async move {
                let r = poller.call(reqwest::Method::GET, &path, None).await;
                (Instant::now(), r)
            });
        };
        if k >= warmup {
            latencies.push(t1 - t0);
        }
    }
    latencies.sort();
    Ok((ms(percentile(&latencies, 0.5)), ms(percentile(&latencies, 0.99))))
}

/// The whole workload on one server; `start_cold` / `start_warm` are measured by the caller.
async fn measure(server: &Server, s: &Settings, figures: &mut Figures) -> Result<(), String> {
    let anon = Http::new(&server.url, None);
    let locals: Vec<String> = (0..SENDERS)
        .map(|i| format!("sender{i}"))
        .chain(["syncer".into(), "waker".into(), "many".into()])
        .collect();
    let users = register_and_log_in(&anon, &server.url, &locals).await?;
    let (senders, syncer, waker, many) =
        (&users[..SENDERS], &users[SENDERS], &users[SENDERS + 1], &users[SENDERS + 2]);

    // Rooms: one shared by the senders, 100 spread over them, one for the wake-up, and the
    // initial-sync user's rooms (timed: creating a room).
    let shared = create_room(&senders[0]).await?;
    for h in &senders[1..] {
        join(h, &shared).await?;
    }
    let mut spread = Vec::new();
    for r in 0..SPREAD_ROOMS {
        spread.push(create_room(&senders[r % SENDERS]).await?);
    }
    let wake_room = create_room(syncer).await?;
    join(waker, &wake_room).await?;
    for _ in 0..s.rooms {
        create_room(many).await?;
    }

    let sender = |i: usize, room: &str| Sender {
        http: senders[i].clone(),
        user: server.user_id(&format!("sender{i}")),
        room: room.to_owned(),
    };
    let one = vec![sender(0, &shared)];
    let ten: Vec<Sender> = (0..SENDERS).map(|i| sender(i, &shared)).collect();
    let over: Vec<Sender> = (0..SPREAD_ROOMS).map(|r| sender(r % SENDERS, &spread[r])).collect();
    let over_owners: Vec<usize> = (0..SPREAD_ROOMS).map(|r| r % SENDERS).collect();

    let first = syncer.ok(reqwest::Method::GET, "/_matrix/client/v3/sync?timeout=0", None).await?;
    let mut since = first["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    for run in 0..s.runs {
        // Registering and logging in users, and creating rooms, timed in each run.
        let fresh: Vec<String> = (0..REGISTER_PER_RUN).map(|i| format!("run{run}user{i}")).collect();
        let t = Instant::now();
        register_and_log_in(&anon, &server.url, &fresh).await?;
        figures[0].push(Ok(ms(t.elapsed()) / fresh.len() as f64));
        let t = Instant::now();
        for _ in 0..ROOMS_PER_RUN {
            create_room(&senders[0]).await?;
        }
        figures[1].push(Ok(ms(t.elapsed()) / ROOMS_PER_RUN as f64));
        for p in server.pids() {
            reset_hwm(p);
        }
        for (slot, pairs, owners) in [
            (2, &one, (0..1).collect::<Vec<_>>()),
            (3, &ten, (0..SENDERS).collect()),
            (4, &over, over_owners.clone()),
        ] {
            let tag = format!("r{run}s{slot}");
            let r = send_load(pairs, &owners, &tag, s).await;
            if let Err(e) = &r {
                eprintln!("  {} run {run} send scenario {slot} FAILED: {e}", server.name);
            }
            figures[slot].push(r);
        }
        figures[9].push(Ok(mb(server.rss_kb("VmHWM"))));
        match wake_latency(syncer, waker, &wake_room, s.wake_samples, &format!("w{run}"), &mut since).await {
            Ok((p50, p99)) => {
                figures[5].push(Ok(p50));
                figures[6].push(Ok(p99));
            }
            Err(e) => {
                eprintln!("  {} run {run} wake-up FAILED: {e}", server.name);
                figures[5].push(Err(e.clone()));
                figures[6].push(Err(e));
            }
        }
        // A filter of its own per run: Synapse answers a repeated initial sync from its response
        // cache, which would time the cache, not the sync.
        let filter = enc(&json!({"room": {"timeline": {"limit": 10 + run}}}).to_string());
        let t = Instant::now();
        let r = many
            .ok(reqwest::Method::GET, &format!("/_matrix/client/v3/sync?timeout=0&filter={filter}"), None)
            .await
            .and_then(|v| {
                let n = v["rooms"]["join"].as_object().map_or(0, |j| j.len());
                if n == s.rooms {
                    Ok(ms(t.elapsed()))
                } else {
                    Err(format!("initial sync has {n} rooms, not {}", s.rooms))
                }
            });
        figures[7].push(r);
        println!("  {} run {run} done", server.name);
    }
    Ok(())
}

/// Registers `locals` (the dummy stage) and logs each in with its password.
async fn register_and_log_in(anon: &Http, url: &str, locals: &[String]) -> Result<Vec<Http>, String> {
    let mut users = Vec::new();
    for l in locals {
        anon.register(l).await?;
        let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": l}, "password": "bench-password"});
        let v = anon.ok(reqwest::Method::POST, "/_matrix/client/v3/login", Some(&body)).await?;
        users.push(Http::new(url, Some(v["access_token"].as_str().ok_or("login: no token")?)));
    }
    Ok(users)
}

/// Idle: after start-up and a first answered request, settled.
async fn idle_rss(server: &Server) -> Result<f64, String> {
    Http::new(&server.url, None).ok(reqwest::Method::GET, "/_matrix/client/versions", None).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(mb(server.rss_kb("VmRSS")))
}

// ---------------------------------------------------------------------------------------------
// The servers

async fn time_to_versions(url: &str, since: Instant) -> f64 {
    loop {
        if reqwest::get(format!("{url}/_matrix/client/versions")).await.is_ok_and(|r| r.status().is_success())
        {
            return ms(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn lattice(s: &Settings, base_pg: &str) -> Figures {
    let mut figures = empty();
    let db = lattice_e2e::fresh_synchronous_postgres_database(base_pg).await;
    // Cold starts, each with an empty compiled-component cache; the last one is measured.
    let mut kept = None;
    for run in 0..s.runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = Options::new(Backend::Production)
            .database_url(&db)
            .cache_dir(dir.path())
            .server_name("lattice.bench");
        let t = Instant::now();
        let started = Homeserver::start(opts).await.expect("services configured");
        figures[10].push(Ok(time_to_versions(&started.url, t).await));
        pin(started.pid());
        let server = Server {
            name: "lattice",
            url: started.url.clone(),
            pid: started.pid(),
            server_name: started.server_name.clone(),
        };
        figures[8].push(idle_rss(&server).await);
        if run + 1 == s.runs {
            kept = Some((started, dir));
        }
    }
    let (hs, cache) = kept.expect("at least one run");
    let server =
        Server { name: "lattice", url: hs.url.clone(), pid: hs.pid(), server_name: hs.server_name.clone() };
    if let Err(e) = measure(&server, s, &mut figures).await {
        eprintln!("lattice FAILED: {e}");
        figures.iter_mut().for_each(|f| f.push(Err(e.clone())));
    }
    drop(hs);
    let options = || {
        Options::new(Backend::Production)
            .database_url(&db)
            .cache_dir(cache.path())
            .server_name("lattice.bench")
    };
    for _ in 0..s.runs {
        let t = Instant::now();
        let hs = Homeserver::start(options()).await.expect("restart");
        figures[11].push(Ok(time_to_versions(&hs.url, t).await));
    }
    if let Err(e) = lattice_e2e::drop_postgres_database(base_pg, &db).await {
        eprintln!("note: {e}");
    }
    figures
}

fn synapse_env(state: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_to_string(state.join("env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn synapse_cmd(script: &str, args: &[&str]) {
    let st = Command::new("bash").arg(script).args(args).status().expect("bash runs");
    assert!(st.success(), "scripts/synapse.sh {args:?} failed");
}

async fn synapse(s: &Settings, base_pg: &str, script: &str, state: &Path) -> Figures {
    let mut figures = empty();
    let state_s = state.to_str().expect("utf-8 path");
    // Cold starts, each on a fresh database; the last one is measured.
    let mut server = None;
    for run in 0..s.runs {
        if run > 0 {
            synapse_cmd(script, &["stop", state_s]);
        }
        synapse_cmd(script, &["start", state_s, base_pg]);
        let env = synapse_env(state);
        figures[10].push(
            env.get("SYNAPSE_STARTUP_MS")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| "no SYNAPSE_STARTUP_MS".into()),
        );
        let pid: u32 = env["SYNAPSE_PID"].parse().expect("pid");
        pin(pid);
        let started = Server {
            name: "synapse",
            url: env["SYNAPSE_URL"].clone(),
            pid,
            server_name: env["SYNAPSE_SERVER_NAME"].clone(),
        };
        figures[8].push(idle_rss(&started).await);
        server = Some(started);
    }
    let server = server.expect("at least one run");
    if let Err(e) = measure(&server, s, &mut figures).await {
        eprintln!("synapse FAILED: {e}");
        figures.iter_mut().for_each(|f| f.push(Err(e.clone())));
    }
    for _ in 0..s.runs {
        synapse_cmd(script, &["restart", state_s]);
        figures[11].push(
            synapse_env(state)
                .get("SYNAPSE_STARTUP_MS")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| "no SYNAPSE_STARTUP_MS".into()),
        );
    }
    synapse_cmd(script, &["stop", state_s]);
    figures
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

fn cell(f: &Figure) -> String {
    match (f.median(), f.spread()) {
        (Ok(m), Some((lo, hi))) => format!("{} ({}–{})", fmt(m), fmt(lo), fmt(hi)),
        (Ok(m), None) => fmt(m),
        (Err(e), _) => format!("FAILED: {e}"),
    }
}

fn main() {
    let code =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(bench());
    std::process::exit(code);
}

async fn bench() -> i32 {
    let Some(services) = lattice_e2e::services() else {
        eprintln!("versus: the services are not configured (run `cargo xtask bench versus`)");
        return 1;
    };
    let script = std::env::var("LATTICE_SYNAPSE_SCRIPT").expect("LATTICE_SYNAPSE_SCRIPT");
    let out = PathBuf::from(std::env::var("LATTICE_VERSUS_OUT").expect("LATTICE_VERSUS_OUT"));
    std::fs::create_dir_all(&out).expect("results folder");
    let s = Settings {
        runs: env_or("LATTICE_BENCH_RUNS", 3),
        measure: Duration::from_secs(env_or("LATTICE_BENCH_SECS", 10)),
        warmup: Duration::from_secs(env_or("LATTICE_BENCH_WARMUP_SECS", 2)),
        wake_samples: env_or("LATTICE_BENCH_WAKE_SAMPLES", 100),
        rooms: env_or("LATTICE_VERSUS_ROOMS", 200),
    };
    let base_pg = services["LATTICE_TEST_POSTGRES_URL"].clone();
    let pids = ServicePids::find();
    let idle_services = pids.memory_kb();
    println!(
        "lattice: {} runs, {} s windows after {} s warm-up",
        s.runs,
        s.measure.as_secs(),
        s.warmup.as_secs()
    );
    let l = lattice(&s, &base_pg).await;
    let lattice_services = pids.memory_kb();
    println!("synapse:");
    // Synapse's state (config, keys, log) stays out of the results folder.
    let syn_state = std::env::temp_dir().join(format!("lattice-versus-synapse-{}", std::process::id()));
    let y = synapse(&s, &base_pg, &script, &syn_state).await;
    let synapse_services = pids.memory_kb();

    let mut md = String::new();
    md.push_str("| metric | Lattice | Synapse | Lattice ÷ Synapse |\n|---|---|---|---|\n");
    let mut metrics = Vec::new();
    let mut failed = false;
    for (i, (name, unit, higher)) in METRICS.iter().enumerate() {
        let name = name.replace('N', &s.rooms.to_string());
        let ratio = match (l[i].median(), y[i].median()) {
            (Ok(a), Ok(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        failed |= l[i].median().is_err() || y[i].median().is_err();
        md.push_str(&format!(
            "| {name} ({unit}, {} better) | {} | {} | {ratio} |\n",
            if *higher { "higher" } else { "lower" },
            cell(&l[i]),
            cell(&y[i])
        ));
        metrics.push(json!({
            "name": format!("{name} ({unit})"),
            "lattice": l[i].median().ok(),
            "synapse": y[i].median().ok(),
            "higher_is_better": higher,
            "lattice_spread": l[i].spread().map(|(a, b)| vec![a, b]),
            "synapse_spread": y[i].spread().map(|(a, b)| vec![a, b]),
        }));
    }
    let svc = |m: [Option<u64>; 3]| {
        format!(
            "PostgreSQL PSS {:.0} MiB, Redis RSS {:.0} MiB, s3s-fs RSS {:.0} MiB",
            m[0].map_or(0.0, mb),
            m[1].map_or(0.0, mb),
            m[2].map_or(0.0, mb)
        )
    };
    md.push_str(&format!(
        "\nServices (not counted above): before the runs: {}; after Lattice's: {}; after Synapse's: {}.\n",
        svc(idle_services),
        svc(lattice_services),
        svc(synapse_services)
    ));
    md.push_str(&format!(
        "\nMedian of {} runs, (min–max) over the runs; windows of {} s after {} s of warm-up; {} wake-up samples a run; {} rooms for the initial sync.\n",
        s.runs,
        s.measure.as_secs(),
        s.warmup.as_secs(),
        s.wake_samples,
        s.rooms
    ));
    println!("\n{md}");
    std::fs::write(out.join("results.md"), &md).expect("results.md");
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let doc = json!({"machine": machine(), "commit": commit.trim(), "metrics": metrics});
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&doc).unwrap_or_default())
        .expect("results.json");
    if failed {
        eprintln!("versus: a run FAILED; its figures are not reported");
        return 1;
    }
    0
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    // Counted from /proc/cpuinfo: this process is pinned to one core.
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    format!("{cores} × {cpu}")
}
