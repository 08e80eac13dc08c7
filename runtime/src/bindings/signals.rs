//! `lattice:bindings/signals`: park a request until a key is signalled.

use std::time::Duration;

use super::generated::lattice::bindings::signals::Host;
use crate::state::{ParkRequest, WorkerState};

/// Keys one park may wait on.
pub const MAX_PARK_KEYS: usize = 1024;

impl Host for WorkerState {
    async fn signal(&mut self, key: String) -> wasmtime::Result<()> {
        self.shared.signals.signal(&key);
        if let Some(bus) = &self.shared.signal_bus {
            // In the background: the guest does not wait for the bus (see `SignalPublisher`).
            bus.publish(format!("{} {key}", self.shared.process_id));
        }
        Ok(())
    }

    async fn park(&mut self, keys: Vec<String>, timeout_ms: u32) -> wasmtime::Result<()> {
        if keys.len() > MAX_PARK_KEYS {
            wasmtime::bail!("park: more than {MAX_PARK_KEYS} keys");
        }
        if self.inv.object.is_some() {
            wasmtime::bail!("park: only HTTP requests can park, not Durable Object events");
        }
        let max = self.shared.config.limits.max_park_ms;
        let timeout = Duration::from_millis(u64::from(timeout_ms).min(max));
        let mut park = self.inv.park.lock().unwrap_or_else(|p| p.into_inner());
        *park = Some(ParkRequest { keys, timeout });
        Ok(())
    }
}
