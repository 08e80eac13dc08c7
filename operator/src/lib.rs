//! The Lattice operator: turns a `MatrixHomeserver` into a running homeserver.
//!
//! Layout (the shape of kube-rs/controller-rs):
//! - `crd` the `MatrixHomeserver` resource (`lattice.dev/v1alpha1`), the source of `crds/`.
//! - `crdgen` writes the CRD YAML into `crds/` and the chart; `stale` tells when they differ.
//! - `config` renders the runtime's config files (front, and shard pods' with placement) and
//!   checks the pass-through `runtimeConfig`.
//! - `secrets` the keys Secret: generated once, kept, never rotated.
//! - `resources` pure builders, `desired_<object>(&MatrixHomeserver) -> <Object>`.
//! - `controller` the `Context`, `reconcile`, `error_policy` and `run`.
//! - `leader` leader election on a Lease.
//! - `metrics` reconcile counters and durations for `/metrics`.

pub mod config;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod secrets;
