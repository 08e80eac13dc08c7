//! `lattice:bindings/storage`: the running Durable Object's own storage.
//!
//! Calls keep the object's input gate closed while they wait; writes land in the object's
//! view at once and are committed by its flusher (see [`crate::objects`]).

use std::sync::Arc;

use lattice_backends::ObjectListRange;

use super::generated::lattice::bindings::storage::{Host, ListOptions};
use super::{Fail, GuestError, finish};
use crate::objects::{LiveObject, MAX_ENTRY_BYTES, MAX_KEYS_PER_CALL, ObjectError};
use crate::state::{Gate, WorkerState};

fn storage_error(e: ObjectError) -> Fail {
    match e {
        ObjectError::Storage(b) => Fail::Guest(super::guest_error("storage", b)),
        ObjectError::Transaction(m) => Fail::Guest(GuestError::Invalid(m.to_owned())),
        // The object was reset after a failed write: this event must not go on.
        other => Fail::Trap(wasmtime::Error::msg(other.to_string())),
    }
}

fn check_keys(keys: &[String]) -> Result<(), Fail> {
    if keys.len() > MAX_KEYS_PER_CALL {
        return Err(GuestError::Invalid(format!("at most {MAX_KEYS_PER_CALL} keys per call")).into());
    }
    Ok(())
}

impl WorkerState {
    fn object(&self) -> Result<Arc<LiveObject>, Fail> {
        match &self.inv.object {
            Some(e) => Ok(e.obj.clone()),
            None => {
                Err(GuestError::Invalid("storage is only available in Durable Object events".into()).into())
            }
        }
    }
}

impl Host for WorkerState {
    async fn get(
        &mut self,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<(String, Vec<u8>)>, GuestError>> {
        finish(
            async {
                check_keys(&keys)?;
                let obj = self.object()?;
                self.waiting(Gate::Closed, obj.get(&keys)).await?.map_err(storage_error)
            }
            .await,
        )
    }

    async fn put(&mut self, entries: Vec<(String, Vec<u8>)>) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.put_entries(entries, true))
    }

    async fn delete(&mut self, keys: Vec<String>) -> wasmtime::Result<Result<u32, GuestError>> {
        finish(self.delete_keys(keys, true).await)
    }

    async fn put_unconfirmed(
        &mut self,
        entries: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.put_entries(entries, false))
    }

    async fn delete_unconfirmed(&mut self, keys: Vec<String>) -> wasmtime::Result<Result<u32, GuestError>> {
        finish(self.delete_keys(keys, false).await)
    }

    async fn delete_all(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.delete_all().map_err(storage_error)))
    }

    async fn list(
        &mut self,
        options: ListOptions,
    ) -> wasmtime::Result<Result<Vec<(String, Vec<u8>)>, GuestError>> {
        finish(
            async {
                let obj = self.object()?;
                let range = ObjectListRange {
                    start: options.start,
                    start_after: options.start_after,
                    end: options.end,
                    prefix: options.prefix,
                    reverse: options.reverse,
                    limit: options.limit.map(|l| l as usize),
                };
                self.waiting(Gate::Closed, obj.list(&range)).await?.map_err(storage_error)
            }
            .await,
        )
    }

    async fn get_alarm(&mut self) -> wasmtime::Result<Result<Option<u64>, GuestError>> {
        finish(
            async {
                let obj = self.object()?;
                self.waiting(Gate::Closed, obj.get_alarm()).await?.map_err(storage_error)
            }
            .await,
        )
    }

    async fn set_alarm(&mut self, scheduled_ms: u64) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.set_alarm(Some(scheduled_ms)).map_err(storage_error)))
    }

    async fn delete_alarm(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.set_alarm(None).map_err(storage_error)))
    }

    async fn transaction_begin(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.transaction_begin().map_err(storage_error)))
    }

    async fn transaction_commit(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.transaction_commit().map_err(storage_error)))
    }

    async fn transaction_rollback(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.object().and_then(|o| o.transaction_rollback().map_err(storage_error)))
    }

    async fn sync(&mut self) -> wasmtime::Result<Result<(), GuestError>> {
        finish(
            async {
                let obj = self.object()?;
                self.waiting(Gate::Closed, obj.sync()).await?.map_err(storage_error)
            }
            .await,
        )
    }
}

impl WorkerState {
    fn put_entries(&mut self, entries: Vec<(String, Vec<u8>)>, confirm: bool) -> Result<(), Fail> {
        if entries.len() > MAX_KEYS_PER_CALL {
            return Err(GuestError::Invalid(format!("at most {MAX_KEYS_PER_CALL} entries per call")).into());
        }
        for (k, v) in &entries {
            if k.len() + v.len() > MAX_ENTRY_BYTES {
                return Err(GuestError::TooLarge(format!(
                    "key and value of {k:?} are over {MAX_ENTRY_BYTES} bytes"
                ))
                .into());
            }
        }
        self.object()?.put(entries, confirm).map_err(storage_error)
    }

    async fn delete_keys(&mut self, keys: Vec<String>, confirm: bool) -> Result<u32, Fail> {
        check_keys(&keys)?;
        let obj = self.object()?;
        self.waiting(Gate::Closed, obj.delete(&keys, confirm)).await?.map_err(storage_error)
    }
}
