//! Lattice runtime: a wasmtime host that serves one worker component over HTTP(S) and gives it
//! Workers-style bindings (D1, KV, R2, Durable Objects, signals, config).
//!
//! # Layout
//! - [`config`]: the TOML config file, parsed then validated; every limit's default.
//! - [`engine`]: the wasmtime engine (pooling allocator, epoch interruption), the on-disk AOT
//!   cache and pre-instantiation.
//! - [`state`]: the per-instance store data (WASI, HTTP, binding contexts, time accounting).
//! - [`bindings`]: the interface layer: one module per WIT interface implementing its host
//!   trait over [`lattice_backends`], with workerd's validation and limits.
//! - [`objects`]: Durable Objects: ids, live objects with input/output gates, group commit,
//!   alarms; [`placement`] decides which process runs a shard (leases, epochs, hand-over) and
//!   [`peer`] forwards calls to the owner over HTTP/2.
//! - [`signals`]: park and wake for long polls.
//! - [`server`]: listeners, TLS ([`tls`]), request path, parking, graceful shutdown;
//!   [`admin`] and [`metrics`] for the admin listener; [`outbound`] for guest HTTP requests.
//! - [`runtime`]: the composition root that builds every binding from the config.

pub mod admin;
pub mod bindings;
pub mod clock;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod objects;
pub mod outbound;
pub mod peer;
pub mod placement;
pub mod runtime;
pub mod server;
pub mod signals;
pub mod state;
pub mod tls;
