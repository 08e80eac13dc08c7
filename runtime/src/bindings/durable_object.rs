//! `lattice:bindings/durable-object`: namespaces, ids and stub fetch.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::generated::lattice::bindings::durable_object::{Host, HostNamespace, Request, Response};
use super::{GuestError, UNAVAILABLE_RETRY_AFTER_SECS, Unavailable};
use crate::objects::{ObjectError, ObjectNamespace, Objects};
use crate::state::{Gate, WorkerState};

pub struct Namespace {
    ns: Arc<ObjectNamespace>,
}

fn object_error(e: ObjectError) -> GuestError {
    match e {
        ObjectError::InvalidId(m) => GuestError::Invalid(format!("Invalid Durable Object ID: {m}")),
        ObjectError::TooDeep(_) | ObjectError::Transaction(_) | ObjectError::PeerInvalid(_) => {
            GuestError::Invalid(e.to_string())
        }
        ObjectError::Storage(lattice_backends::BackendError::Fenced { .. }) => GuestError::Fenced,
        ObjectError::NotOwner(_)
        | ObjectError::Storage(_)
        | ObjectError::Broken
        | ObjectError::Deadline
        | ObjectError::Guest(_)
        | ObjectError::NoHandler
        | ObjectError::PeerUnreachable(_)
        | ObjectError::PeerFailed(_) => {
            tracing::warn!(error = %e, "Durable Object call failed");
            GuestError::Unavailable(Unavailable { retry_after_secs: UNAVAILABLE_RETRY_AFTER_SECS })
        }
    }
}

impl HostNamespace for WorkerState {
    async fn open(&mut self, binding: String) -> wasmtime::Result<Result<Resource<Namespace>, GuestError>> {
        let Some(ns) = self.shared.objects.namespaces.get(&binding).cloned() else {
            return Ok(Err(GuestError::UnknownBinding(binding)));
        };
        Ok(Ok(self.table.push(Namespace { ns })?))
    }

    async fn id_from_name(&mut self, ns: Resource<Namespace>, name: String) -> wasmtime::Result<String> {
        Ok(self.table.get(&ns)?.ns.id_from_name(&name))
    }

    async fn new_unique_id(&mut self, ns: Resource<Namespace>) -> wasmtime::Result<String> {
        Ok(self.table.get(&ns)?.ns.new_unique_id())
    }

    async fn id_from_string(
        &mut self,
        ns: Resource<Namespace>,
        id: String,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        Ok(self.table.get(&ns)?.ns.id_from_string(&id).map_err(object_error))
    }

    async fn fetch(
        &mut self,
        ns: Resource<Namespace>,
        id: String,
        request: Request,
    ) -> wasmtime::Result<Result<Response, GuestError>> {
        let ns = self.table.get(&ns)?.ns.clone();
        let id = match ns.id_from_string(&id) {
            Ok(id) => id,
            Err(e) => return Ok(Err(object_error(e))),
        };
        let shared = self.shared.clone();
        let depth = self.inv.call_depth;
        let out = self
            .waiting(Gate::Open, async move { Objects::fetch(&shared, &ns, &id, request, depth).await })
            .await?;
        Ok(out.map_err(object_error))
    }

    async fn drop(&mut self, rep: Resource<Namespace>) -> wasmtime::Result<()> {
        self.table.delete(rep)?;
        Ok(())
    }
}

impl Host for WorkerState {}
