//! `lattice-operator`: `run` (the default) reconciles MatrixHomeservers; `crdgen` writes the CRD
//! YAML into `crds/` and the chart.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("crdgen") => {
            let root = args.get(1).map_or_else(repo_root, PathBuf::from);
            lattice_operator::crdgen::write(&root)?;
            for (path, _) in lattice_operator::crdgen::generated()? {
                println!("wrote {}", root.join(path).display());
            }
            Ok(())
        }
        _ => anyhow::bail!("usage: lattice-operator [run | crdgen [REPO_ROOT]]"),
    }
}

/// The repository this binary was built from (crdgen is a development command).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
