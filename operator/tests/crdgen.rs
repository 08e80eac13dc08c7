//! `crds/` and the chart's CRD are what `lattice-operator crdgen` writes from the Rust types.

use std::path::Path;

#[test]
fn generated_crds_are_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stale = lattice_operator::crdgen::stale(&root).expect("generating the CRD");
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo run -p lattice-operator -- crdgen`"
    );
}
