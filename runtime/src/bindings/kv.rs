//! `lattice:bindings/kv`: workerd KV semantics, with miniflare's validation constants.

use std::sync::Arc;

use lattice_backends::{KvBackend, KvEntry};
use wasmtime::component::Resource;

use super::generated::lattice::bindings::kv::{
    Host, HostNamespace, KeyInfo, ListOptions, ListResult, PutOptions, ValueWithMetadata,
};
use super::{GuestError, decode_cursor, encode_cursor, guest_error};
use crate::state::{Gate, WorkerState};

/// workerd/miniflare: shortest allowed expiration TTL, and distance of an absolute expiration.
pub const MIN_EXPIRATION_TTL_SECONDS: u64 = 60;
/// Most keys one list call returns (also the default).
pub const MAX_LIST_KEYS: u32 = 1000;
/// Longest key, in bytes.
pub const MAX_KEY_SIZE_BYTES: usize = 512;
/// Largest value (workerd: 25 MiB); the config may lower it.
pub const MAX_VALUE_SIZE_BYTES: usize = 25 * 1024 * 1024;
/// Largest metadata JSON.
pub const MAX_METADATA_SIZE_BYTES: usize = 1024;

pub struct Namespace {
    name: String,
    backend: Arc<dyn KvBackend>,
}

/// Checks a key the way miniflare's validator does.
pub fn validate_key(key: &str) -> Result<(), GuestError> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(GuestError::Invalid(format!("Illegal key name \"{key}\". Please use a different name.")));
    }
    if key.len() > MAX_KEY_SIZE_BYTES {
        return Err(GuestError::Invalid(format!(
            "UTF-8 encoded length of {} exceeds key length limit of {MAX_KEY_SIZE_BYTES}.",
            key.len()
        )));
    }
    Ok(())
}

/// Turns put options into an absolute expiration (seconds), checking workerd's minimums.
pub fn expiration(options: &PutOptions, now_secs: u64) -> Result<Option<u64>, GuestError> {
    match (options.expiration, options.expiration_ttl) {
        (_, Some(ttl)) => {
            if ttl < MIN_EXPIRATION_TTL_SECONDS {
                return Err(GuestError::Invalid(format!(
                    "Invalid expiration_ttl of {ttl}. Expiration TTL must be at least {MIN_EXPIRATION_TTL_SECONDS}."
                )));
            }
            Ok(Some(now_secs.saturating_add(ttl)))
        }
        (Some(at), None) => {
            if at < now_secs.saturating_add(MIN_EXPIRATION_TTL_SECONDS) {
                return Err(GuestError::Invalid(format!(
                    "Invalid expiration of {at}. Please specify integer greater than the current number of seconds since the UNIX epoch plus {MIN_EXPIRATION_TTL_SECONDS}."
                )));
            }
            Ok(Some(at))
        }
        (None, None) => Ok(None),
    }
}

impl WorkerState {
    fn kv(&self, ns: &Resource<Namespace>) -> wasmtime::Result<(String, Arc<dyn KvBackend>)> {
        let n = self.table.get(ns)?;
        Ok((n.name.clone(), n.backend.clone()))
    }
}

impl HostNamespace for WorkerState {
    async fn open(&mut self, binding: String) -> wasmtime::Result<Result<Resource<Namespace>, GuestError>> {
        let Some(backend) = self.shared.kv.get(&binding).cloned() else {
            return Ok(Err(GuestError::UnknownBinding(binding)));
        };
        Ok(Ok(self.table.push(Namespace { name: binding, backend })?))
    }

    async fn get(
        &mut self,
        ns: Resource<Namespace>,
        key: String,
    ) -> wasmtime::Result<Result<Option<ValueWithMetadata>, GuestError>> {
        if let Err(e) = validate_key(&key) {
            return Ok(Err(e));
        }
        let (name, backend) = self.kv(&ns)?;
        let now = self.shared.clock.now_secs();
        let started = std::time::Instant::now();
        let out = self.waiting(Gate::Open, backend.get(&name, &key, now)).await?;
        self.shared.metrics.binding_call("kv", backend.name(), started.elapsed(), out.is_err());
        Ok(match out {
            Ok(v) => Ok(v.map(|e| ValueWithMetadata { value: e.value, metadata: e.metadata })),
            Err(e) => Err(guest_error(&name, e)),
        })
    }

    async fn put(
        &mut self,
        ns: Resource<Namespace>,
        key: String,
        value: Vec<u8>,
        options: PutOptions,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        if let Err(e) = validate_key(&key) {
            return Ok(Err(e));
        }
        let max_value = usize::try_from(self.shared.config.limits.kv_max_value_bytes).unwrap_or(usize::MAX);
        if value.len() > max_value {
            return Ok(Err(GuestError::TooLarge(format!(
                "Value length of {} exceeds limit of {max_value}.",
                value.len()
            ))));
        }
        if let Some(m) = &options.metadata {
            if m.len() > MAX_METADATA_SIZE_BYTES {
                return Ok(Err(GuestError::TooLarge(format!(
                    "Metadata length of {} exceeds limit of {MAX_METADATA_SIZE_BYTES}.",
                    m.len()
                ))));
            }
            if serde_json::from_str::<serde_json::Value>(m).is_err() {
                return Ok(Err(GuestError::Invalid("Metadata must be JSON".into())));
            }
        }
        let now = self.shared.clock.now_secs();
        let expiration = match expiration(&options, now) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        let (name, backend) = self.kv(&ns)?;
        let entry = KvEntry { value, metadata: options.metadata, expiration };
        let started = std::time::Instant::now();
        let out = self.waiting(Gate::Open, backend.put(&name, &key, entry, now)).await?;
        self.shared.metrics.binding_call("kv", backend.name(), started.elapsed(), out.is_err());
        Ok(out.map_err(|e| guest_error(&name, e)))
    }

    async fn delete(
        &mut self,
        ns: Resource<Namespace>,
        key: String,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        if let Err(e) = validate_key(&key) {
            return Ok(Err(e));
        }
        let (name, backend) = self.kv(&ns)?;
        let started = std::time::Instant::now();
        let out = self.waiting(Gate::Open, backend.delete(&name, &key)).await?;
        self.shared.metrics.binding_call("kv", backend.name(), started.elapsed(), out.is_err());
        Ok(out.map_err(|e| guest_error(&name, e)))
    }

    async fn list(
        &mut self,
        ns: Resource<Namespace>,
        options: ListOptions,
    ) -> wasmtime::Result<Result<ListResult, GuestError>> {
        let limit = options.limit.unwrap_or(MAX_LIST_KEYS);
        if limit == 0 || limit > MAX_LIST_KEYS {
            return Ok(Err(GuestError::Invalid(format!(
                "Invalid key_count_limit of {limit}. Please specify an integer between 1 and {MAX_LIST_KEYS}."
            ))));
        }
        let start_after = match options.cursor.as_deref().map(decode_cursor).transpose() {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let (name, backend) = self.kv(&ns)?;
        let now = self.shared.clock.now_secs();
        let prefix = options.prefix.unwrap_or_default();
        let want = limit as usize;
        let started = std::time::Instant::now();
        let out = self
            .waiting(Gate::Open, backend.list(&name, &prefix, start_after.as_deref(), want + 1, now))
            .await?;
        self.shared.metrics.binding_call("kv", backend.name(), started.elapsed(), out.is_err());
        Ok(match out {
            Ok(mut keys) => {
                let complete = keys.len() <= want;
                keys.truncate(want);
                let cursor = if complete { None } else { keys.last().map(|k| encode_cursor(&k.name)) };
                Ok(ListResult {
                    keys: keys
                        .into_iter()
                        .map(|k| KeyInfo { name: k.name, expiration: k.expiration, metadata: k.metadata })
                        .collect(),
                    list_complete: complete,
                    cursor,
                })
            }
            Err(e) => Err(guest_error(&name, e)),
        })
    }

    async fn drop(&mut self, rep: Resource<Namespace>) -> wasmtime::Result<()> {
        self.table.delete(rep)?;
        Ok(())
    }
}

impl Host for WorkerState {}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(expiration: Option<u64>, ttl: Option<u64>) -> PutOptions {
        PutOptions { expiration, expiration_ttl: ttl, metadata: None }
    }

    #[test]
    fn expiration_rules_follow_miniflare() {
        let now = 1_000_000;
        assert_eq!(expiration(&opts(None, Some(60)), now).ok(), Some(Some(now + 60)));
        assert!(expiration(&opts(None, Some(59)), now).is_err());
        assert!(expiration(&opts(Some(now + 59), None), now).is_err());
        assert_eq!(expiration(&opts(Some(now + 60), None), now).ok(), Some(Some(now + 60)));
        assert_eq!(expiration(&opts(None, None), now).ok(), Some(None));
    }

    #[test]
    fn key_rules_follow_miniflare() {
        for bad in ["", ".", ".."] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_key(&"k".repeat(512)).is_ok());
        assert!(validate_key(&"k".repeat(513)).is_err());
        assert!(validate_key("...").is_ok());
    }

    #[test]
    fn cursor_round_trips() {
        let c = encode_cursor("a/b\u{e9}");
        assert_eq!(decode_cursor(&c).ok().as_deref(), Some("a/b\u{e9}"));
        assert!(decode_cursor("!!!").is_err());
    }
}
