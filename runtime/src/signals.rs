//! Park and wake, in process.
//!
//! Every `signal(key)` takes the next value of one global sequence and records it as the key's
//! last signal. A parked request remembers the sequence at which its invocation started; it
//! wakes at once if any of its keys was signalled after that, so a guest that reads its data
//! and then parks cannot miss a signal sent in between. Waiting uses [`tokio::sync::Notify`]
//! and holds no instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Signal,
    Timeout,
    Shutdown,
}

impl Wake {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

struct KeyState {
    last_seq: u64,
    notify: Arc<Notify>,
}

pub struct Signals {
    seq: AtomicU64,
    keys: Mutex<HashMap<String, KeyState>>,
    shutdown: Notify,
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

impl Signals {
    pub fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            keys: Mutex::new(HashMap::new()),
            shutdown: Notify::new(),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn current_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    pub fn signal(&self, key: &str) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = keys
            .entry(key.to_owned())
            .or_insert_with(|| KeyState { last_seq: 0, notify: Arc::new(Notify::new()) });
        state.last_seq = seq;
        state.notify.notify_waiters();
    }

    /// Waits until one of `keys` is signalled after `since_seq`, `timeout` passes, or the
    /// runtime shuts down.
    pub async fn wait(&self, keys: &[String], since_seq: u64, timeout: Duration) -> Wake {
        let notifies: Vec<Arc<Notify>> = {
            let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let state = map
                    .entry(key.clone())
                    .or_insert_with(|| KeyState { last_seq: 0, notify: Arc::new(Notify::new()) });
                if state.last_seq > since_seq {
                    return Wake::Signal;
                }
                out.push(state.notify.clone());
            }
            out
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return Wake::Shutdown;
        }
        // Register interest before re-checking, so a signal between the check above and the
        // await below is not lost.
        let mut waits: Vec<_> = notifies.iter().map(|n| Box::pin(n.notified())).collect();
        for w in &mut waits {
            w.as_mut().enable();
        }
        let shutdown = self.shutdown.notified();
        tokio::pin!(shutdown);
        shutdown.as_mut().enable();
        if self.any_after(keys, since_seq) {
            return Wake::Signal;
        }
        let any = futures::future::select_all(waits);
        tokio::select! {
            _ = any => Wake::Signal,
            () = tokio::time::sleep(timeout) => Wake::Timeout,
            () = &mut shutdown => Wake::Shutdown,
        }
    }

    fn any_after(&self, keys: &[String], since_seq: u64) -> bool {
        let map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().any(|k| map.get(k).is_some_and(|s| s.last_seq > since_seq))
    }

    /// Wakes every parked request with [`Wake::Shutdown`].
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown.notify_waiters();
    }

    /// Forgets keys nobody waits on whose last signal is older than `older_than_seq`.
    pub fn sweep(&self, older_than_seq: u64) {
        let mut map = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| Arc::strong_count(&s.notify) > 1 || s.last_seq >= older_than_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signal_after_start_wakes_at_once() {
        let s = Signals::new();
        let start = s.current_seq();
        s.signal("room:a");
        let wake = s.wait(&["room:a".into()], start, Duration::from_secs(60)).await;
        assert_eq!(wake, Wake::Signal);
    }

    #[tokio::test]
    async fn signal_before_start_does_not_count() {
        let s = Signals::new();
        s.signal("room:a");
        let start = s.current_seq();
        let wake = s.wait(&["room:a".into()], start, Duration::from_millis(20)).await;
        assert_eq!(wake, Wake::Timeout);
    }

    #[tokio::test]
    async fn waiter_is_woken_by_later_signal() {
        let s = Arc::new(Signals::new());
        let start = s.current_seq();
        let waiter = {
            let s = s.clone();
            tokio::spawn(
                async move { s.wait(&["x".into(), "y".into()], start, Duration::from_secs(60)).await },
            )
        };
        // Wait until the waiter has registered (its Notify is shared), then signal.
        while s.keys.lock().map(|m| m.get("y").map_or(0, |k| Arc::strong_count(&k.notify))).unwrap_or(0) < 2 {
            tokio::task::yield_now().await;
        }
        s.signal("y");
        assert_eq!(waiter.await.ok(), Some(Wake::Signal));
    }

    #[tokio::test]
    async fn shutdown_wakes_waiters() {
        let s = Arc::new(Signals::new());
        let start = s.current_seq();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.wait(&["x".into()], start, Duration::from_secs(60)).await })
        };
        while s.keys.lock().map(|m| m.get("x").map_or(0, |k| Arc::strong_count(&k.notify))).unwrap_or(0) < 2 {
            tokio::task::yield_now().await;
        }
        s.shutdown();
        assert_eq!(waiter.await.ok(), Some(Wake::Shutdown));
    }
}
