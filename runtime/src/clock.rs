//! An injectable clock: KV expiry, alarms and leases read time from here, so tests move time
//! instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub enum Clock {
    System,
    /// Milliseconds since the Unix epoch, moved by hand.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn manual(start_ms: u64) -> Self {
        Self::Manual(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn now_ms(&self) -> u64 {
        match self {
            Self::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            Self::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Moves a manual clock forward; returns false for the system clock.
    pub fn advance(&self, ms: u64) -> bool {
        match self {
            Self::System => false,
            Self::Manual(now) => {
                now.fetch_add(ms, Ordering::SeqCst);
                true
            }
        }
    }
}
