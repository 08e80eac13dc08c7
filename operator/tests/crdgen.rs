//! `crds/` and the chart's CRD are what `lattice-operator crdgen` writes from the Rust types.

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

#[test]
fn generated_crds_are_fresh() {
    let root = manifest_dir().join("..");
    let stale = lattice_operator::crdgen::stale(&root).expect("generating the CRD");
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo run -p lattice-operator -- crdgen`"
    );
}
