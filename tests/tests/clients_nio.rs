//! matrix-nio (the Python client library) against the homeserver, through the validating proxy:
//! `tests/clients/nio_flow.py` registers two users, logs in again with a password (checked with
//! whoami), creates a room, invites, joins, sends messages both ways received through `/sync`
//! long-polls, paginates back and forward with `/messages`, leaves, and checks error paths
//! (wrong password, sending to a room one is not in, a logged-out token); then two nio clients
//! with encryption on (vodozemac) exchange messages in an encrypted room, each decrypting the
//! other's, and verify each other's devices interactively (SAS: start, accept, keys, MACs, all
//! as to-device messages).
//!
//! The script runs in a venv with `tests/clients/requirements-nio.txt`, kept under
//! `/var/cache/lattice/tools` (see `common/python.rs`).

#[path = "common/python.rs"]
mod python;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lattice_e2e::proxy::ValidatingProxy;
use lattice_e2e::{Backend, Homeserver, Options};

/// The script's own deadline for the whole flow; the test kills it a little after that.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

fn clients_dir() -> PathBuf {
    lattice_e2e::manifest_dir().join("clients")
}

/// The nio venv, built at most once per test process.
fn nio_python() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| python::venv("nio", &clients_dir().join("requirements-nio.txt"), "nio"))
        .join("bin/python")
}

async fn nio_flow(backend: Backend) {
    let Some(hs) = Homeserver::start(Options::new(backend)).await else { return };
    let started = Instant::now();
    let python = tokio::task::spawn_blocking(nio_python).await.expect("the venv is built");
    eprintln!("venv ready in {:.1?}", started.elapsed());

    let proxy = ValidatingProxy::start(&hs.url).await;
    let script = clients_dir().join("nio_flow.py");
    let stores = tempfile::tempdir().expect("a directory for the clients' crypto stores");
    let started = Instant::now();
    let child = Command::new(&python)
        .arg(&script)
        .args(["--homeserver", &proxy.url, "--server-name", &hs.server_name])
        .args(["--suffix", &lattice_e2e::unique(), "--deadline", &SCRIPT_DEADLINE.as_secs().to_string()])
        .arg("--e2ee-store")
        .arg(stores.path())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} {}: {e}", python.display(), script.display()));
    let pid = child.id();
    let output = match tokio::time::timeout(
        SCRIPT_DEADLINE + Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    {
        Ok(joined) => joined.expect("the wait for the script").expect("the script's output"),
        Err(_) => {
            // Only the child this test started, by its pid.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{} did not finish within {:?}: killed", script.display(), SCRIPT_DEADLINE);
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "nio_flow.py ({backend:?}) exited with {} after {:.1?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        output.status,
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "the matrix-nio flow failed on {backend:?} ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    assert!(stdout.contains("nio flow: OK"), "the script exited 0 without its OK line:\n{stdout}");
    eprintln!("the proxy validated {} responses", proxy.validated());
    assert!(proxy.validated() > 0, "the proxy validated no response: did the script go through it?");
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn nio_flow_embedded() {
    nio_flow(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nio_flow_production() {
    nio_flow(Backend::Production).await;
}
