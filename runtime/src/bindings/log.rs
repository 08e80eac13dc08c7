//! `lattice:bindings/log`: guest log lines, written with the runtime's structured logger.

use super::generated::lattice::bindings::log::{Host, Level};
use crate::state::WorkerState;

/// Longest guest log line kept; the rest is cut (a guest must not flood the log).
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

impl Host for WorkerState {
    async fn write(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        match level {
            Level::Trace => tracing::trace!(target: "guest", "{message}"),
            Level::Debug => tracing::debug!(target: "guest", "{message}"),
            Level::Info => tracing::info!(target: "guest", "{message}"),
            Level::Warn => tracing::warn!(target: "guest", "{message}"),
            Level::Error => tracing::error!(target: "guest", "{message}"),
        }
        Ok(())
    }
}
