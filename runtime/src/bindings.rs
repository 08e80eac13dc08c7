//! The interface layer: WIT linking and validation, one module per `lattice:bindings`
//! interface. Each implements its generated host trait on [`WorkerState`] over the backends in
//! [`lattice_backends`]; workerd's limits and error cases live here, so every backend behaves
//! the same.

pub mod config;
pub mod crypto;
pub mod d1;
pub mod durable_object;
pub mod kv;
pub mod log;
pub mod r2;
pub mod signals;
pub mod storage;

use lattice_backends::BackendError;

use crate::state::WorkerState;

/// Generated bindings; private to the runtime apart from the few types re-exported here.
pub(crate) mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "lattice:bindings/worker",
        imports: { default: async | trappable },
        exports: { default: async },
        require_store_data_send: true,
        with: {
            "lattice:bindings/d1.database": super::d1::Database,
            "lattice:bindings/kv.namespace": super::kv::Namespace,
            "lattice:bindings/r2.bucket": super::r2::Bucket,
            "lattice:bindings/durable-object.namespace": super::durable_object::Namespace,
        },
    });
}

pub use generated::lattice::bindings::durable_object::{
    Request as ObjectRequest, Response as ObjectResponse,
};
pub(crate) use generated::lattice::bindings::types::{Error as GuestError, Unavailable};

/// Seconds a guest is told to wait after a backend outage.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u32 = 2;

/// A list cursor: the last key returned, opaque to the guest (KV and R2).
pub(crate) fn encode_cursor(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<String, GuestError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| GuestError::Invalid("Invalid cursor".into()))
}

/// Maps a backend failure to what the guest may see; details go to the log.
pub(crate) fn guest_error(binding: &str, e: BackendError) -> GuestError {
    match e {
        BackendError::Unavailable { .. } => {
            tracing::warn!(binding, error = %e, "backend unavailable");
            GuestError::Unavailable(Unavailable { retry_after_secs: UNAVAILABLE_RETRY_AFTER_SECS })
        }
        BackendError::Fenced { .. } => {
            tracing::warn!(binding, error = %e, "write fenced");
            GuestError::Fenced
        }
    }
}

impl generated::lattice::bindings::types::Host for WorkerState {}

/// Why a binding call did not succeed: the guest's error, or a host fault that traps.
pub(crate) enum Fail {
    Guest(GuestError),
    Trap(wasmtime::Error),
}

impl From<GuestError> for Fail {
    fn from(e: GuestError) -> Self {
        Self::Guest(e)
    }
}

impl From<wasmtime::Error> for Fail {
    fn from(e: wasmtime::Error) -> Self {
        Self::Trap(e)
    }
}

impl From<wasmtime::component::ResourceTableError> for Fail {
    fn from(e: wasmtime::component::ResourceTableError) -> Self {
        Self::Trap(e.into())
    }
}

impl From<serde_json::Error> for Fail {
    fn from(e: serde_json::Error) -> Self {
        Self::Trap(e.into())
    }
}

/// Splits a binding call's outcome into the trap and the guest-visible result.
pub(crate) fn finish<T>(r: Result<T, Fail>) -> wasmtime::Result<Result<T, GuestError>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(Fail::Guest(e)) => Ok(Err(e)),
        Err(Fail::Trap(e)) => Err(e),
    }
}
