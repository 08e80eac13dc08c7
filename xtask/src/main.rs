//! Project chores, one binary (`cargo xtask <command>`):
//!
//! - `dev [--port N] [--plain]`: build the runtime and the homeserver, write a config on
//!   embedded defaults (SQLite, local files) with a self-signed certificate, serve, create an
//!   `admin` user on first start and print how to log in.
//! - `ci`: everything CI runs: format and lint checks, invariant checks, guests built to
//!   `wasm32-wasip2`, the real services started (PostgreSQL, Redis, S3), the whole test suite,
//!   and the services stopped again whatever happened.
//! - `guests`: build the guest components and print where they are.
//! - `bench`: the runtime's benchmarks (see BENCHMARKS.md).
//! - `check-invariants`: the architecture invariants that a grep can check.
//! - `crdgen`: regenerate the CRD YAML (`crds/` and the chart's copy) from the operator's types;
//!   `operator/tests/crdgen.rs` fails when they are stale.
//!
//! Slow builds are cached outside the clone: `CARGO_TARGET_DIR` defaults to
//! `/var/cache/lattice/target` (set in `.cargo/config.toml`), tools to `/var/cache/lattice/tools`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("dev") => dev(&root, &args[1..]),
        Some("ci") => ci(&root),
        Some("guests") => {
            let dir = build_guests(&root)?;
            println!("{}", dir.display());
            Ok(())
        }
        Some("bench") => bench(&root, &args[1..]),
        Some("check-invariants") => check_invariants(&root),
        Some("crdgen") => run(cargo()
            .current_dir(&root)
            .args(["run", "--quiet", "-p", "lattice-operator", "--", "crdgen"])
            .arg(&root)),
        _ => bail!("usage: cargo xtask <dev|ci|guests|bench|check-invariants|crdgen>"),
    }
}

/// The checkout this command was run in: the nearest directory up from the current one with
/// `xtask/Cargo.toml`. Not the build-time path: several checkouts share one target directory,
/// so the binary may have been built from another one.
fn root() -> PathBuf {
    let start = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    start
        .ancestors()
        .find(|d| d.join("xtask/Cargo.toml").exists() && d.join("Cargo.toml").exists())
        .map(Path::to_path_buf)
        .unwrap_or(start)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("LATTICE_CACHE").map_or_else(|| PathBuf::from("/var/cache/lattice"), PathBuf::from)
}

/// Cargo's target directory, as cargo resolves it (`CARGO_TARGET_DIR`, then `.cargo/config.toml`).
fn target_dir(root: &Path) -> PathBuf {
    let out = cargo().current_dir(root).args(["metadata", "--no-deps", "--format-version", "1"]).output();
    out.ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["target_directory"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| root.join("target"))
}

/// The native crates: the workspace without the guests, which only build for wasm32-wasip2.
const HOST_CRATES: [&str; 7] =
    ["--workspace", "--exclude", "hello", "--exclude", "conformance", "--exclude", "lattice-worker"];

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds every guest component to `wasm32-wasip2` with the `guest` profile.
fn build_guests(root: &Path) -> anyhow::Result<PathBuf> {
    run(cargo()
        .current_dir(root)
        .args(["build", "--target", "wasm32-wasip2", "--profile", "guest"])
        .args(["-p", "hello", "-p", "conformance", "-p", "lattice-homeserver"]))?;
    Ok(target_dir(root).join("wasm32-wasip2/guest"))
}

fn dev(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut port = 8448u16;
    let mut plain = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => port = it.next().context("--port needs a number")?.parse()?,
            "--plain" => plain = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let guests = build_guests(root)?;
    run(cargo().current_dir(root).args(["build", "-p", "lattice-runtime", "--bin", "lattice"]))?;
    let data = root.join(".lattice-dev");
    std::fs::create_dir_all(&data)?;
    let tls = if plain {
        "[tls]\nplain_http = true\n".to_owned()
    } else {
        let (cert, key) = (data.join("cert.pem"), data.join("key.pem"));
        if !cert.exists() || !key.exists() {
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            params.is_ca = rcgen::IsCa::ExplicitNoCa;
            let k = rcgen::KeyPair::generate()?;
            let c = params.self_signed(&k)?;
            std::fs::write(&cert, c.pem())?;
            std::fs::write(&key, k.serialize_pem())?;
        }
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\npost_quantum = \"preferred\"\n",
            cert.display(),
            key.display()
        )
    };
    let d = data.display();
    let config = format!(
        r#"# Written by `cargo xtask dev`: the homeserver on embedded defaults, nothing to install.
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
data_dir = "{d}/data"

{tls}
[component]
path = "{component}"

[secrets]
dir = "{d}/data/secrets"
generate = ["rooms_key", "users_key", "signing_key", "admin_token"]

[vars]
server_name = "localhost"
# Registration needs a token: create one with the admin command printed at start-up.
registration = "token"

[d1.DB]
backend = "sqlite"
path = "{d}/data/homeserver.sqlite"

[kv.KV]
backend = "sqlite"
path = "{d}/data/kv.sqlite"

[r2.MEDIA]
backend = "fs"
path = "{d}/data/media"

[durable_objects.ROOMS]
class = "Room"
unique_key_secret = "rooms_key"
shards = 8
storage = {{ backend = "sqlite", path = "{d}/data/objects.sqlite" }}

[durable_objects.USERS]
class = "User"
unique_key_secret = "users_key"
shards = 8
storage = {{ backend = "sqlite", path = "{d}/data/objects.sqlite" }}
"#,
        admin = port + 1,
        component = guests.join("lattice_homeserver.wasm").display(),
    );
    let config_path = data.join("lattice.toml");
    std::fs::write(&config_path, config)?;
    let bin = target_dir(root).join("debug/lattice");
    let mut server = Command::new(&bin).args(["serve", "--config"]).arg(&config_path).spawn()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_err() {
        if let Some(status) = server.try_wait()? {
            bail!("the homeserver exited: {status}");
        }
        if started.elapsed().as_secs() > 120 {
            let _ = server.kill();
            bail!("the homeserver did not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let admin_call = |method: &str, path: &str, body: &str| {
        Command::new(&bin)
            .args(["call", "--config"])
            .arg(&config_path)
            .args(["--bearer-secret", "admin_token", method, path, body])
            .output()
    };
    let password_file = data.join("admin-password");
    if !password_file.exists() {
        let password: String = {
            let mut b = [0u8; 18];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
            b.iter().map(|x| format!("{x:02x}")).collect()
        };
        let body = serde_json::json!({"username": "admin", "password": password}).to_string();
        let out = admin_call("POST", "/_lattice/admin/v1/users", &body)?;
        if out.status.success() {
            std::fs::write(&password_file, &password)?;
        } else {
            eprintln!("xtask: creating the admin user failed: {}", String::from_utf8_lossy(&out.stdout));
        }
    }
    let scheme = if plain { "http" } else { "https" };
    let password = std::fs::read_to_string(&password_file).unwrap_or_else(|_| "(unknown)".into());
    let call =
        format!("{} call --config {} --bearer-secret admin_token", bin.display(), config_path.display());
    println!(
        "\nLattice homeserver on {scheme}://127.0.0.1:{port} (server name localhost)\n\
         Log in with any Matrix client: homeserver {scheme}://127.0.0.1:{port}, user @admin:localhost, password {password}\n\
         {cert}More users:          {call} POST /_lattice/admin/v1/users '{{\"username\":\"bob\",\"password\":\"...\"}}'\n\
         Registration tokens: {call} POST /_lattice/admin/v1/registration_tokens '{{\"uses_allowed\":1}}'\n",
        cert = if plain {
            String::new()
        } else {
            "(self-signed certificate: tell your client to trust .lattice-dev/cert.pem)\n".to_owned()
        },
    );
    let status = server.wait()?;
    if !status.success() {
        bail!("the homeserver exited: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and counts the tests of every test binary.
fn run_tests(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::BufRead as _;
    eprintln!("xtask: running {cmd:?}");
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                passed += count_in(rest, "passed");
                failed += count_in(rest, "failed");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!("{passed} passed, {failed} failed");
        bail!("{cmd:?} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok((passed, failed))
}

/// The number before `word` in a `test result:` line (`ok. 16 passed; 0 failed; ...`).
fn count_in(result: &str, word: &str) -> u64 {
    result
        .split(';')
        .filter_map(|part| part.trim().rsplit_once(' '))
        .find(|(_, w)| *w == word)
        .and_then(|(n, _)| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Removes a stopped services state directory, and the PostgreSQL cluster if it lives elsewhere.
fn remove_services_state(state: &Path) {
    if let Ok(home) = std::fs::read_to_string(state.join("postgres/home")) {
        let _ = std::fs::remove_dir_all(home.trim());
    }
    let _ = std::fs::remove_dir_all(state);
}

/// Reads `export K=V` lines written by scripts/services.sh.
fn read_env(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches(|c| c == '"' || c == '\'').to_owned()))
        .collect())
}

fn ci(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    run(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    check_invariants(root)?;
    let guests = build_guests(root)?;
    run(cargo().current_dir(root).arg("clippy").args(HOST_CRATES).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().current_dir(root).args([
        "clippy",
        "--target",
        "wasm32-wasip2",
        "-p",
        "lattice-worker",
        "-p",
        "lattice-homeserver",
        "-p",
        "hello",
        "-p",
        "conformance",
        "--",
        "-D",
        "warnings",
    ]))?;
    // `cargo test` builds the runtime's binary (the runtime has integration tests) with the same
    // features as the tests; building it separately would resolve features differently and
    // rebuild wasmtime once more.
    let lattice_bin = target_dir(root).join("debug/lattice");
    // A state directory of this run's own: ports are picked afresh, nothing stale is reused.
    let state = cache_dir().join("services").join(format!("ci-{}", std::process::id()));
    let services = root.join("scripts/services.sh");
    let start = Command::new("bash").arg(&services).arg("start").arg(&state).status();
    let result = (|| {
        if !start.as_ref().is_ok_and(|s| s.success()) {
            bail!("starting the test services failed: {start:?}");
        }
        let env = read_env(&state.join("env"))?;
        run_tests(
            cargo()
                .current_dir(root)
                .arg("test")
                .args(HOST_CRATES)
                .envs(env)
                .env("LATTICE_GUEST_DIR", &guests)
                .env("LATTICE_BIN", &lattice_bin)
                .env("LATTICE_SERVICES_SCRIPT", &services)
                .env("LATTICE_SERVICES_STATE", &state)
                .env("LATTICE_REQUIRE_SERVICES", "1"),
        )
    })();
    let stop = Command::new("bash").arg(&services).arg("stop").arg(&state).status();
    if stop.as_ref().is_ok_and(|s| s.success()) {
        remove_services_state(&state);
    } else {
        eprintln!("xtask: stopping the services failed: {stop:?}");
    }
    let (passed, failed) = result?;
    eprintln!("xtask: ci passed in {:.0} s", started.elapsed().as_secs_f64());
    // The last line speaks for the whole suite.
    println!("{passed} passed, {failed} failed");
    Ok(())
}

/// Invariant 2: the runtime knows nothing of Matrix. Invariant 1 (the homeserver does I/O only
/// through `lattice:bindings`) is enforced by the runtime's linker, which links no filesystem
/// or sockets; `runtime/tests/host.rs` builds guests against it.
fn check_invariants(root: &Path) -> anyhow::Result<()> {
    let mut offenders = Vec::new();
    for dir in ["runtime", "wit"] {
        walk(&root.join(dir), &mut |p| {
            let is_source = p.extension().is_some_and(|e| e == "rs" || e == "wit" || e == "toml");
            if is_source
                && std::fs::read_to_string(p).is_ok_and(|t| {
                    let t = t.to_ascii_lowercase();
                    t.contains("matrix") || t.contains("ruma")
                })
            {
                offenders.push(p.to_path_buf());
            }
        })?;
    }
    if !offenders.is_empty() {
        bail!(
            "the runtime must know nothing of Matrix (invariant 2), but these files mention it: {offenders:?}"
        );
    }
    eprintln!("xtask: invariants hold");
    Ok(())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// Benchmarks, with the services started for them (see BENCHMARKS.md):
///
/// - `runtime` (in-process instantiate-and-call and TLS handshakes, backend call latency on
///   every backend, HTTP(S) throughput with wrk, the server pinned to core 0 and wrk to core 1);
/// - `homeserver` (`tests/benches/homeserver.rs`: event send throughput, sync wake-up latency
///   and memory of the release runtime with the homeserver on PostgreSQL/Redis/S3).
///
/// `cargo xtask bench` runs both; `cargo xtask bench runtime|homeserver [args]` one of them.
/// The homeserver benchmark's settings are environment variables (`LATTICE_BENCH_RUNS`, ...;
/// see its file).
fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("versus") {
        return versus(root);
    }
    // Extra arguments go to the one benchmark named, else (as before) to the runtime's.
    let (runtime, homeserver, args) = match args.first().map(String::as_str) {
        Some("homeserver") => (false, true, &args[1..]),
        Some("runtime") => (true, false, &args[1..]),
        _ => (true, true, args),
    };
    let homeserver_args = if runtime { &[][..] } else { args };
    let guests = build_guests(root)?;
    let state = cache_dir().join("services").join(format!("bench-{}", std::process::id()));
    let services = root.join("scripts/services.sh");
    // The benchmarks need no Kubernetes API.
    run(Command::new("bash").arg(&services).arg("start").arg(&state).env("LATTICE_SERVICES_KUBE", "0"))?;
    let result = (|| {
        let env = read_env(&state.join("env"))?;
        if runtime {
            run(cargo()
                .current_dir(root)
                .args(["bench", "-p", "lattice-runtime", "-p", "lattice-backends"])
                .args(args)
                .envs(env.clone())
                .env("LATTICE_GUEST_DIR", &guests))?;
            http_throughput(root, &guests)?;
        }
        if homeserver {
            homeserver_bench(root, &guests, &env, &state, homeserver_args)?;
        }
        Ok(())
    })();
    if Command::new("bash").arg(&services).arg("stop").arg(&state).status().is_ok_and(|s| s.success()) {
        remove_services_state(&state);
    }
    result
}

/// Lattice against Synapse (`tests/benches/versus.rs`, issue 7): the services without the
/// Kubernetes API, the release runtime, Synapse from `scripts/synapse.sh`; the load generator
/// is built first and then run on core 1 (the servers are pinned to core 0). Results go to
/// `bench/results/versus/`: `results.md`, `results.json` and `chart.png`.
fn versus(root: &Path) -> anyhow::Result<()> {
    let guests = build_guests(root)?;
    run(cargo().current_dir(root).args(["build", "--release", "-p", "lattice-runtime", "--bin", "lattice"]))?;
    run(cargo().current_dir(root).args([
        "bench",
        "--profile",
        "dev",
        "-p",
        "lattice-e2e",
        "--bench",
        "versus",
        "--no-run",
    ]))?;
    let synapse = root.join("scripts/synapse.sh");
    let venv = Command::new("bash").arg(&synapse).arg("install").output()?;
    if !venv.status.success() {
        bail!("scripts/synapse.sh install failed:\n{}", String::from_utf8_lossy(&venv.stderr));
    }
    let venv = String::from_utf8(venv.stdout)?.lines().last().unwrap_or_default().trim().to_owned();
    let out = root.join("bench/results/versus");
    std::fs::create_dir_all(&out)?;
    let state = cache_dir().join("services").join(format!("versus-{}", std::process::id()));
    let services = root.join("scripts/services.sh");
    run(Command::new("bash").arg(&services).arg("start").arg(&state).env("LATTICE_SERVICES_KUBE", "0"))?;
    let result = (|| {
        let env = read_env(&state.join("env"))?;
        run(Command::new("taskset")
            .args(["-c", "1"])
            .arg(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args(["bench", "--profile", "dev", "-p", "lattice-e2e", "--bench", "versus"])
            .envs(env)
            .env("LATTICE_BIN", target_dir(root).join("release/lattice"))
            .env("LATTICE_GUEST_DIR", &guests)
            .env("LATTICE_TEST_SERVICES_STATE", &state)
            .env("LATTICE_REQUIRE_SERVICES", "1")
            .env("LATTICE_SYNAPSE_SCRIPT", &synapse)
            .env("LATTICE_VERSUS_OUT", &out))?;
        run(Command::new(Path::new(&venv).join("bin/python"))
            .arg(root.join("bench/synapse/chart.py"))
            .arg(out.join("results.json"))
            .arg(out.join("chart.png")))
    })();
    if Command::new("bash").arg(&services).arg("stop").arg(&state).status().is_ok_and(|s| s.success()) {
        remove_services_state(&state);
    }
    result
}

/// The homeserver benchmark on the release runtime. The load generator is built with the dev
/// profile (its dependencies are optimised, `[profile.dev.package."*"]`), which reuses the test
/// build instead of compiling matrix-sdk and the rest of the test dependencies in release; the
/// benchmark prints the load generator's own CPU share.
fn homeserver_bench(
    root: &Path,
    guests: &Path,
    env: &[(String, String)],
    state: &Path,
    args: &[String],
) -> anyhow::Result<()> {
    run(cargo().current_dir(root).args(["build", "--release", "-p", "lattice-runtime", "--bin", "lattice"]))?;
    run(cargo()
        .current_dir(root)
        .args(["bench", "--profile", "dev", "-p", "lattice-e2e", "--bench", "homeserver"])
        .args(args)
        .envs(env.iter().cloned())
        .env("LATTICE_BIN", target_dir(root).join("release/lattice"))
        .env("LATTICE_GUEST_DIR", guests)
        .env("LATTICE_TEST_SERVICES_STATE", state)
        .env("LATTICE_REQUIRE_SERVICES", "1"))
}

fn http_throughput(root: &Path, guests: &Path) -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_err() {
        run(Command::new("apt-get").args(["install", "-y", "-qq", "wrk"]))?;
    }
    run(cargo().current_dir(root).args(["build", "--release", "-p", "lattice-runtime", "--bin", "lattice"]))?;
    let bin = target_dir(root).join("release/lattice");
    let dir = std::env::temp_dir().join(format!("lattice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let k = rcgen::KeyPair::generate()?;
    let c = params.self_signed(&k)?;
    std::fs::write(dir.join("cert.pem"), c.pem())?;
    std::fs::write(dir.join("key.pem"), k.serialize_pem())?;
    for (label, tls) in [
        ("http", "[tls]\nplain_http = true\n".to_owned()),
        (
            "https",
            format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            ),
        ),
    ] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{d}\"\n{tls}\n[component]\npath = \"{c}\"\n",
            d = dir.join("data").display(),
            c = guests.join("hello.wasm").display()
        );
        let path = dir.join(format!("{label}.toml"));
        std::fs::write(&path, config)?;
        let mut server = Command::new("taskset")
            .args(["-c", "0"])
            .arg(&bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env("LATTICE_LOG", "warn")
            .spawn()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed().as_secs() > 60 {
                let _ = server.kill();
                bail!("the benchmark server did not start");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let url = format!("{label}://127.0.0.1:{port}/");
        // Warm-up, then three measured runs.
        let _ = Command::new("taskset").args(["-c", "1", "wrk", "-t1", "-c32", "-d3s", &url]).output();
        for run_no in 1..=3 {
            let out = Command::new("taskset")
                .args(["-c", "1", "wrk", "-t1", "-c64", "-d10s", "--latency", &url])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let rps = text.lines().find(|l| l.starts_with("Requests/sec")).unwrap_or("Requests/sec: ?");
            let p50 =
                text.lines().find(|l| l.trim_start().starts_with("50%")).unwrap_or("50% ?").trim().to_owned();
            let errors = text.lines().find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
            println!("wrk {label} run {run_no}: {rps} | p50 {p50} | errors: {}", errors.unwrap_or("none"));
        }
        let _ = server.kill();
        let _ = server.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_come_from_test_result_lines() {
        let line = "ok. 16 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.40s";
        assert_eq!(super::count_in(line, "passed"), 16);
        assert_eq!(super::count_in(line, "failed"), 2);
        assert_eq!(super::count_in("FAILED. 3 passed; 1 failed; 0 ignored", "passed"), 3);
    }
}
