//! Python virtualenvs for the client tests that drive a Python client library.
//!
//! A venv lives outside the repository, under [`TOOLS_DIR`], named after the requirements file's
//! content: `venv-<name>-<first 12 hex digits of its sha256>`. Editing the pins therefore builds
//! a new venv and never reuses a stale one. A venv is built in a temporary sibling directory and
//! renamed into place only once `pip install` succeeded, so a killed run never leaves a
//! half-built venv under the final name. Scripts must be run as `<venv>/bin/python script.py`
//! (console-script shebangs still name the temporary directory).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the venvs are kept.
pub const TOOLS_DIR: &str = "/var/cache/lattice/tools";

/// The base interpreter the venvs are made from.
const PYTHON: &str = "python3";

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The sha256 of a file as hex, computed by the interpreter every venv needs anyway.
fn sha256_hex(path: &Path) -> String {
    let out = run(Command::new(PYTHON)
        .args(["-c", "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())"])
        .arg(path));
    assert!(out.status.success(), "hashing {} failed: {}", path.display(), describe(&out));
    let hex = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "not a sha256: {hex:?}");
    hex
}

/// Whether the venv at `dir` runs and imports `check_import`.
fn healthy(dir: &Path, check_import: &str) -> bool {
    let python = dir.join("bin/python");
    python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {check_import}")])
            .output()
            .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `python3 -m venv dir`; when the interpreter lacks ensurepip (Debian's python3 without the
/// python3-venv package) and we are root, installs python3-venv once and tries again.
fn create_venv(dir: &Path) {
    let out = run(Command::new(PYTHON).args(["-m", "venv"]).arg(dir));
    if out.status.success() {
        return;
    }
    let text = describe(&out);
    assert!(text.contains("ensurepip"), "`{PYTHON} -m venv {}` failed: {text}", dir.display());
    assert!(
        is_root(),
        "`{PYTHON} -m venv` needs ensurepip: install python3-venv (`apt-get install -y python3-venv`); {text}"
    );
    let _ = std::fs::remove_dir_all(dir);
    eprintln!("python3 lacks ensurepip: installing python3-venv");
    let mut install = run(Command::new("apt-get")
        .args(["install", "-y", "python3-venv"])
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if !install.status.success() {
        // A machine whose package lists were never fetched.
        let update = run(Command::new("apt-get").arg("update"));
        assert!(update.status.success(), "apt-get update failed: {}", describe(&update));
        install = run(Command::new("apt-get")
            .args(["install", "-y", "python3-venv"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    assert!(install.status.success(), "apt-get install -y python3-venv failed: {}", describe(&install));
    let out = run(Command::new(PYTHON).args(["-m", "venv"]).arg(dir));
    assert!(out.status.success(), "`{PYTHON} -m venv {}` failed again: {}", dir.display(), describe(&out));
}

/// Removes temporary build directories of `final_name` left by runs that were killed (their
/// process is gone).
fn remove_stale_builds(tools: &Path, final_name: &str) {
    let prefix = format!(".{final_name}.tmp-");
    let Ok(entries) = std::fs::read_dir(tools) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The venv for `requirements` (built if missing or broken); `check_import` is a module the
/// requirements provide, imported to check an existing venv still works.
pub fn venv(name: &str, requirements: &Path, check_import: &str) -> PathBuf {
    let hash = sha256_hex(requirements);
    let tools = Path::new(TOOLS_DIR);
    let final_name = format!("venv-{name}-{}", &hash[..12]);
    let dir = tools.join(&final_name);
    if healthy(&dir, check_import) {
        return dir;
    }
    std::fs::create_dir_all(tools).unwrap_or_else(|e| panic!("create {}: {e}", tools.display()));
    remove_stale_builds(tools, &final_name);
    if dir.exists() {
        // Made by another interpreter that is gone, or damaged by hand: start again.
        eprintln!("{} does not work: rebuilding it", dir.display());
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
    let tmp = tools.join(format!(".{final_name}.tmp-{}-{}", std::process::id(), lattice_e2e::unique()));
    let started = std::time::Instant::now();
    eprintln!("building {} from {}", dir.display(), requirements.display());
    create_venv(&tmp);
    let pip = run(Command::new(tmp.join("bin/python"))
        .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r"])
        .arg(requirements));
    if !pip.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!("pip install -r {} failed: {}", requirements.display(), describe(&pip));
    }
    assert!(healthy(&tmp, check_import), "the new venv {} cannot import {check_import}", tmp.display());
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process renamed its own build into place first: use that one.
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(healthy(&dir, check_import), "rename {} -> {}: {e}", tmp.display(), dir.display());
    }
    eprintln!("built {} in {:.1?}", dir.display(), started.elapsed());
    dir
}
