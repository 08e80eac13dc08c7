//! DESIGN.md invariant 3: the operator knows the runtime only through its config file format
//! and command line. It links no other Lattice crate, and names none in its sources.

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

#[test]
fn the_operator_depends_on_no_other_lattice_crate() {
    let manifest: toml::Table = std::fs::read_to_string(manifest_dir().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("toml");
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        for name in manifest
            .get(section)
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            assert!(
                !name.starts_with("lattice"),
                "operator/Cargo.toml [{section}] names {name}: talk to the runtime through its config file and CLI"
            );
        }
    }
    for entry in std::fs::read_dir(manifest_dir().join("src")).expect("src") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("source");
        for forbidden in
            ["lattice_runtime::", "lattice_homeserver::", "lattice_backends::", "lattice_worker::"]
        {
            assert!(!text.contains(forbidden), "{} uses {forbidden}", path.display());
        }
    }
}
