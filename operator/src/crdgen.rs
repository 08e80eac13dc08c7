//! The generated CRD files: `crds/matrixhomeservers.yaml` (plain, for `kubectl apply`) and the
//! chart's copy, a template kept on uninstall (see `charts/lattice-operator/README.md`).

use std::path::{Path, PathBuf};

use crate::crd::crd_yaml;

/// The plain CRD, relative to the repository root.
pub const CRD_PATH: &str = "crds/matrixhomeservers.yaml";
/// The chart's copy, relative to the repository root.
pub const CHART_CRD_PATH: &str = "charts/lattice-operator/templates/crd-matrixhomeservers.yaml";

/// Every generated file: its path relative to the repository root and its contents.
pub fn generated() -> Result<Vec<(PathBuf, String)>, serde_yaml::Error> {
    let plain = crd_yaml()?;
    // Helm never upgrades files in a chart's crds/ folder, so the chart carries the CRD as a
    // template: `helm upgrade` applies new versions, and `keep` leaves it (and so every
    // MatrixHomeserver) in place on `helm uninstall`.
    let chart = format!(
        "{{{{- if .Values.crds.install }}}}\n{}{{{{- end }}}}\n",
        plain.replacen("metadata:\n", "metadata:\n  annotations:\n    helm.sh/resource-policy: keep\n", 1)
    );
    Ok(vec![(PathBuf::from(CRD_PATH), plain), (PathBuf::from(CHART_CRD_PATH), chart)])
}

/// Writes every generated file under `root`.
pub fn write(root: &Path) -> anyhow::Result<()> {
    for (path, text) in generated()? {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, text)?;
    }
    Ok(())
}

/// The generated files under `root` that differ from what `write` would write.
pub fn stale(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (path, text) in generated()? {
        if std::fs::read_to_string(root.join(&path)).ok().as_deref() != Some(text.as_str()) {
            out.push(path);
        }
    }
    Ok(out)
}
