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
        // A secret is part of the environment, as `env.SECRET` is in workerd: a local read that
        // neither lets a Durable Object's other events in nor waits for its writes to be
        // durable. Opening the gates here made every room event wait for the previous event's
        // commit before it could decide, which serialized a room on commit latency.
        let out = self.waiting(Gate::Closed, async move { secrets.get(&name) }).await?;
        Ok(out.map_err(|e| {
            tracing::error!(error = %e, "secret store failed");
            GuestError::Unavailable(super::Unavailable {
                retry_after_secs: super::UNAVAILABLE_RETRY_AFTER_SECS,
            })
        }))
    }
}
