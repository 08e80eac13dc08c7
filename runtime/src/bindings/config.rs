//! `lattice:bindings/config`: settings from `[vars]`, secrets from the secret store.

use super::GuestError;
use super::generated::lattice::bindings::config::Host;
use crate::state::{Gate, WorkerState};

impl Host for WorkerState {
    async fn get(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self.shared.config.vars.get(&name).cloned())
    }

    async fn secret(&mut self, name: String) -> wasmtime::Result<Result<Option<Vec<u8>>, GuestError>> {
        let secrets = self.shared.secrets.clone();
        let out = self.waiting(Gate::Open, async move { secrets.get(&name) }).await?;
        Ok(out.map_err(|e| {
            tracing::error!(error = %e, "secret store failed");
            GuestError::Unavailable(super::Unavailable {
                retry_after_secs: super::UNAVAILABLE_RETRY_AFTER_SECS,
            })
        }))
    }
}
