//! The helm binary `scripts/services.sh` builds, shared by the chart and API-server tests.

/// `LATTICE_HELM`, or `None` (skip) when it is unset; fails instead under
/// `LATTICE_REQUIRE_SERVICES`.
pub fn helm() -> Option<String> {
    let helm = std::env::var("LATTICE_HELM").ok();
    if helm.is_none() {
        assert!(
            std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(),
            "LATTICE_HELM is not set under LATTICE_REQUIRE_SERVICES"
        );
        eprintln!("skipped: LATTICE_HELM is not set (scripts/services.sh writes it)");
    }
    helm
}
