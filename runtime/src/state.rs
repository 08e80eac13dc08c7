//! Per-instance store data: what one invocation of the guest may reach.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::engine::EPOCH_TICK;
use crate::objects::ObjectEvent;
use crate::outbound::OutboundHooks;
use crate::runtime::Shared;

/// What a guest asked for with `signals.park`.
#[derive(Debug, Clone)]
pub struct ParkRequest {
    pub keys: Vec<String>,
    pub timeout: Duration,
    /// Kept for the next invocation (`park-with-note`).
    pub note: Option<Vec<u8>>,
}

/// Bookkeeping for one call into the guest.
pub struct Invocation {
    pub started: Instant,
    /// Time spent waiting on bindings (not counted against the execution limit).
    pub host_wait: Duration,
    pub execution_limit: Duration,
    /// Shared with the request path, which reads it after the guest returns.
    pub park: Arc<Mutex<Option<ParkRequest>>>,
    /// The signal sequence when this invocation began: later signals wake a park at once.
    pub signal_seq_at_start: u64,
    /// On a re-run of a parked request, the note the previous invocation parked with.
    pub note: Option<Vec<u8>>,
    /// Set while a Durable Object event runs.
    pub object: Option<ObjectEvent>,
    /// How many Durable Object calls deep this invocation is.
    pub call_depth: u32,
}

pub struct WorkerState {
    pub table: ResourceTable,
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub hooks: OutboundHooks,
    pub limits: StoreLimits,
    pub shared: Arc<Shared>,
    pub inv: Invocation,
}

/// Whether a binding call lets other events of the running Durable Object in while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The object's own storage: the input gate stays closed.
    Closed,
    /// Any other I/O: pending writes are made durable first (output gate) and other events may
    /// run meanwhile (input gate open).
    Open,
}

impl WorkerState {
    pub fn new(shared: Arc<Shared>, object: Option<ObjectEvent>, call_depth: u32) -> Self {
        let limits = &shared.config.limits;
        let mut wasi = WasiCtx::builder();
        // No environment, arguments, preopened directories or sockets: the guest reaches the
        // world only through `lattice:bindings` and outbound `wasi:http` (invariant 1).
        wasi.inherit_stderr();
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        let inv = Invocation {
            started: Instant::now(),
            host_wait: Duration::ZERO,
            execution_limit: Duration::from_millis(limits.execution_ms),
            park: Arc::new(Mutex::new(None)),
            signal_seq_at_start: shared.signals.current_seq(),
            note: None,
            object,
            call_depth,
        };
        Self {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            hooks: OutboundHooks::new(shared.outbound.clone()),
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(limits.instance_memory_bytes).unwrap_or(usize::MAX))
                .trap_on_grow_failure(false)
                .build(),
            shared,
            inv,
        }
    }

    /// Runs a binding's backend call: its time does not count as guest time, and for a
    /// Durable Object event with [`Gate::Open`] the object's gates open around it.
    /// A write of the object that cannot be made durable ends the event (it traps): nothing
    /// may leave the object after a lost write.
    pub async fn waiting<T>(&mut self, gate: Gate, fut: impl Future<Output = T>) -> wasmtime::Result<T> {
        let start = Instant::now();
        if gate == Gate::Open
            && let Some(event) = self.inv.object.as_mut()
            && let Err(e) = event.open_gates().await
        {
            self.inv.host_wait += start.elapsed();
            return Err(wasmtime::Error::msg(format!("Durable Object: {e}")));
        }
        let out = fut.await;
        if gate == Gate::Open
            && let Some(event) = self.inv.object.as_mut()
        {
            event.close_input_gate().await;
        }
        self.inv.host_wait += start.elapsed();
        Ok(out)
    }

    /// Guest time used so far.
    pub fn guest_time(&self) -> Duration {
        self.inv.started.elapsed().saturating_sub(self.inv.host_wait)
    }
}

/// Sets up the execution limit: the epoch deadline is checked every tick, and only time the
/// guest spent running counts.
pub fn arm_deadline(store: &mut wasmtime::Store<WorkerState>) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        let state = ctx.data();
        let used = state.guest_time();
        if used >= state.inv.execution_limit {
            return Ok(UpdateDeadline::Interrupt);
        }
        let left = state.inv.execution_limit - used;
        let ticks = (left.as_millis() / EPOCH_TICK.as_millis()).max(1);
        Ok(UpdateDeadline::Yield(u64::try_from(ticks).unwrap_or(u64::MAX)))
    });
}

impl WasiView for WorkerState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for WorkerState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}
