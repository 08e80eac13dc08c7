//! The Helm chart without an API server: `helm lint --strict`, and what `helm template`
//! renders for the options (`LATTICE_HELM` names helm; `scripts/services.sh` writes it). The
//! server-side dry run of the rendered output is in `kube.rs`.

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

use std::process::Command;

#[path = "common/helm.rs"]
mod helm_bin;
use helm_bin::helm;

fn chart() -> std::path::PathBuf {
    manifest_dir().join("../charts/lattice-operator")
}

fn template(helm: &str, sets: &[&str]) -> String {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "lattice"]).arg(chart()).args(["--namespace", "lattice"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm template");
    assert!(out.status.success(), "helm template {sets:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn chart_lints() {
    let Some(helm) = helm() else { return };
    for sets in [&[][..], &["sample.enabled=true", "watchNamespace=chat"][..]] {
        let mut cmd = Command::new(&helm);
        cmd.args(["lint", "--strict"]).arg(chart());
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().expect("running helm lint");
        assert!(out.status.success(), "helm lint {sets:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn every_image_comes_from_the_configured_registry() {
    let Some(helm) = helm() else { return };
    let text = template(&helm, &["image.registry=mirror.internal", "sample.enabled=true"]);
    let images: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("image: ")).collect();
    assert!(!images.is_empty());
    for image in images {
        let image = image.trim_matches('"');
        assert!(image.starts_with("mirror.internal/"), "{image} bypasses the registry override");
    }
}

#[test]
fn one_namespace_gets_a_role_not_a_cluster_role() {
    let Some(helm) = helm() else { return };
    let text = template(&helm, &["watchNamespace=chat"]);
    assert!(!text.contains("kind: ClusterRole"), "{text}");
    assert!(text.contains("kind: Role\n") && text.contains("kind: RoleBinding\n"));
    assert!(text.contains("name: LATTICE_OPERATOR_WATCH_NAMESPACE\n              value: \"chat\""));
    let all = template(&helm, &[]);
    assert!(all.contains("kind: ClusterRole\n") && all.contains("kind: ClusterRoleBinding\n"));
}

#[test]
fn crds_can_be_left_out() {
    let Some(helm) = helm() else { return };
    assert!(template(&helm, &[]).contains("kind: CustomResourceDefinition"));
    assert!(!template(&helm, &["crds.install=false"]).contains("kind: CustomResourceDefinition"));
}
