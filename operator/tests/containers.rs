//! The Containerfiles (no container engine here): what they copy and run matches what the
//! operator and the chart expect, the packages and binaries they build exist, and the runtime
//! image's build step (`lattice compile`) succeeds on the real component.

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

use std::path::PathBuf;

use lattice_operator::config::{COMPONENT_PATH, CONFIG_DIR, CONFIG_FILE, render};
use lattice_operator::crd::MatrixHomeserver;
use lattice_operator::resources::desired_deployment;

fn read(path: &str) -> String {
    std::fs::read_to_string(manifest_dir().join("..").join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The instructions of the last stage (after the last `FROM`).
fn final_stage(file: &str) -> Vec<String> {
    let text = read(file);
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).expect("FROM");
    lines[last_from..].to_vec()
}

fn json_array(stage: &[String], instruction: &str) -> Vec<String> {
    let line =
        stage.iter().find_map(|l| l.strip_prefix(instruction)).unwrap_or_else(|| panic!("no {instruction}"));
    serde_json::from_str(line.trim()).expect("exec form")
}

fn sample() -> MatrixHomeserver {
    let mut hs: MatrixHomeserver = serde_yaml::from_str(
        "apiVersion: lattice.dev/v1alpha1\nkind: MatrixHomeserver\nmetadata: {name: m, namespace: n}\nspec: {serverName: a.example, image: i, database: {embedded: {}}, kv: {embedded: {}}, media: {volume: {}}}",
    )
    .expect("sample");
    hs.metadata.uid = Some("u".into());
    hs
}

#[test]
fn runtime_image_matches_the_pods_the_operator_builds() {
    let stage = final_stage("operator/containers/runtime.Containerfile");
    let hs = sample();
    let d = desired_deployment(&hs, &render(&hs).expect("render"));
    let pod = d.spec.and_then(|s| s.template.spec).expect("pod");
    let c = &pod.containers[0];
    // The pod runs the image's own entry point with the image's default arguments.
    assert_eq!(c.command.clone().unwrap_or_default(), json_array(&stage, "ENTRYPOINT "));
    assert_eq!(c.args.clone().unwrap_or_default(), json_array(&stage, "CMD "));
    assert_eq!(json_array(&stage, "CMD ")[2], format!("{CONFIG_DIR}/{CONFIG_FILE}"));
    assert!(
        stage.iter().any(|l| l.starts_with("COPY ") && l.ends_with(&format!(" {COMPONENT_PATH}"))),
        "{stage:?}"
    );
    assert!(
        stage.iter().any(|l| l.starts_with("COPY ") && l.ends_with(" /usr/local/bin/lattice")),
        "{stage:?}"
    );
    let user = pod.security_context.and_then(|s| s.run_as_user).expect("runAsUser");
    assert!(
        stage.contains(&format!("USER {user}:{user}")),
        "the image's user is the pod's ({user}): {stage:?}"
    );
}

#[test]
fn operator_image_matches_the_chart() {
    let stage = final_stage("operator/containers/operator.Containerfile");
    assert_eq!(json_array(&stage, "ENTRYPOINT "), ["lattice-operator"]);
    assert_eq!(json_array(&stage, "CMD "), ["run"]);
    assert!(read("charts/lattice-operator/templates/deployment.yaml").contains("args: [\"run\"]"));
    assert!(stage.contains(&"USER 65532:65532".to_owned()));
    assert!(read("charts/lattice-operator/templates/deployment.yaml").contains("runAsUser: 65532"));
}

#[test]
fn the_packages_and_binaries_the_images_build_exist() {
    let runtime: toml::Table = read("runtime/Cargo.toml").parse().expect("toml");
    assert_eq!(runtime["package"]["name"].as_str(), Some("lattice-runtime"));
    let bins = runtime.get("bin").and_then(|b| b.as_array()).cloned().unwrap_or_default();
    assert!(
        bins.iter().any(|b| b["name"].as_str() == Some("lattice")),
        "lattice-runtime has no `lattice` binary"
    );
    let homeserver: toml::Table = read("homeserver/Cargo.toml").parse().expect("toml");
    assert_eq!(homeserver["package"]["name"].as_str(), Some("lattice-homeserver"));
    let operator: toml::Table = read("operator/Cargo.toml").parse().expect("toml");
    let bins = operator["bin"].as_array().cloned().unwrap_or_default();
    assert!(bins.iter().any(|b| b["name"].as_str() == Some("lattice-operator")));
    let build = read("operator/containers/runtime.Containerfile");
    assert!(build.contains("cargo build --release -p lattice-runtime --bin lattice"));
    assert!(build.contains("cargo build --target wasm32-wasip2 --profile guest -p lattice-homeserver"));
    assert!(
        read("operator/containers/operator.Containerfile")
            .contains("cargo build --release -p lattice-operator --bin lattice-operator")
    );
}

/// The runtime image's build step, `lattice compile --config runtime-build.toml`, on the real
/// runtime and component (`LATTICE_BIN`, `LATTICE_GUEST_DIR`), with the image's paths mapped
/// to a temporary directory.
#[test]
fn the_runtime_images_compile_step_succeeds() {
    let bin = std::env::var_os("LATTICE_BIN").map(PathBuf::from).filter(|p| p.exists());
    let guests = std::env::var_os("LATTICE_GUEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("lattice_homeserver.wasm").exists());
    let (Some(bin), Some(guests)) = (bin, guests) else {
        assert!(
            std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(),
            "LATTICE_BIN and LATTICE_GUEST_DIR (with lattice_homeserver.wasm) are needed under LATTICE_REQUIRE_SERVICES"
        );
        eprintln!("skipped: LATTICE_BIN and LATTICE_GUEST_DIR are not set");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let compiled = dir.path().join("compiled");
    let config = read("operator/containers/runtime-build.toml")
        .replace("/opt/lattice/compiled", &compiled.display().to_string())
        .replace("/opt/lattice", &guests.display().to_string())
        .replace("/tmp/lattice-build", &dir.path().join("data").display().to_string());
    let path = dir.path().join("build.toml");
    std::fs::write(&path, config).expect("write");
    let out = std::process::Command::new(bin)
        .args(["compile", "--config"])
        .arg(&path)
        .output()
        .expect("lattice compile");
    assert!(out.status.success(), "lattice compile: {}", String::from_utf8_lossy(&out.stderr));
    // The image ships what it compiled as the pods' seed cache.
    let entries = std::fs::read_dir(&compiled).map(|r| r.count()).unwrap_or(0);
    assert_eq!(entries, 1, "the compile step fills the seed cache the operator points pods at");
    assert!(
        read("operator/containers/runtime.Containerfile")
            .contains("COPY --from=build /opt/lattice/compiled /opt/lattice/compiled")
    );
}
