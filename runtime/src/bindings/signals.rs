//! `lattice:bindings/signals`: park a request until a key is signalled.

use std::time::Duration;

use super::generated::lattice::bindings::signals::Host;
use crate::state::{ParkRequest, WorkerState};

/// Keys one park may wait on.
pub const MAX_PARK_KEYS: usize = 1024;
/// Bytes a parked request may keep for its next invocation (`park-with-note`).
pub const MAX_PARK_NOTE_BYTES: usize = 64 * 1024;

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
        self.park_request(keys, timeout_ms, None)
    }

    async fn park_with_note(
        &mut self,
        keys: Vec<String>,
        timeout_ms: u32,
        note: Vec<u8>,
    ) -> wasmtime::Result<()> {
        if note.len() > MAX_PARK_NOTE_BYTES {
            wasmtime::bail!("park: a note of more than {MAX_PARK_NOTE_BYTES} bytes");
        }
        self.park_request(keys, timeout_ms, Some(note))
    }

    async fn note(&mut self) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self.inv.note.clone())
    }
}

impl WorkerState {
    fn park_request(
        &mut self,
        keys: Vec<String>,
        timeout_ms: u32,
        note: Option<Vec<u8>>,
    ) -> wasmtime::Result<()> {
        if keys.len() > MAX_PARK_KEYS {
            wasmtime::bail!("park: more than {MAX_PARK_KEYS} keys");
        }
        if self.inv.object.is_some() {
            wasmtime::bail!("park: only HTTP requests can park, not Durable Object events");
        }
        let max = self.shared.config.limits.max_park_ms;
        let timeout = Duration::from_millis(u64::from(timeout_ms).min(max));
        let mut park = self.inv.park.lock().unwrap_or_else(|p| p.into_inner());
        *park = Some(ParkRequest { keys, timeout, note });
        Ok(())
    }
}
