//! The Lattice operator: turns a `MatrixHomeserver` into a running homeserver.
//!
//! Layout (the shape of kube-rs/controller-rs):
//! - `crd` the `MatrixHomeserver` resource (`lattice.dev/v1alpha1`), the source of `crds/`.
//! - `crdgen` writes the CRD YAML into `crds/` and the chart; `check` tells when they are stale.

pub mod crd;
pub mod crdgen;
