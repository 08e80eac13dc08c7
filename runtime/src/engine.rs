//! The wasmtime engine, the on-disk AOT cache and pre-instantiation.
//!
//! Components are compiled once and cached as `.cwasm` files keyed by the component's bytes
//! and [`Engine::precompile_compatibility_hash`] (wasmtime version, engine settings, CPU
//! features), so a restart deserializes in about a millisecond instead of compiling.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use sha2::Digest as _;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::bindings::generated::{Worker, WorkerPre};
use crate::config::Limits;
use crate::state::WorkerState;

/// One epoch tick; the execution limit is checked at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Core instances, memories and tables one component may use (a wit-bindgen component has a
/// main module plus a few adapter shims).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 24;
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
const MAX_TABLES_PER_COMPONENT: u32 = 24;
/// Table bytes reset with `memset` rather than `madvise` when a slot is freed.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;
/// Freed slots are decommitted in batches (fewer system calls under load).
const DECOMMIT_BATCH: usize = 16;

pub fn build_engine(limits: &Limits) -> anyhow::Result<Engine> {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    // Profiling aid: `LATTICE_PERFMAP=1` writes /tmp/perf-<pid>.map so `perf report` names
    // guest functions. Off by default; it changes nothing else.
    if std::env::var("LATTICE_PERFMAP").as_deref() == Ok("1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let mut pool = PoolingAllocationConfig::new();
    let n = limits.pool_instances;
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(MAX_CORE_INSTANCES_PER_COMPONENT))
        .total_memories(n.saturating_mul(MAX_MEMORIES_PER_COMPONENT))
        .total_tables(n.saturating_mul(MAX_TABLES_PER_COMPONENT))
        .total_stacks(n)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .max_memory_size(usize::try_from(limits.instance_memory_bytes).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(usize::try_from(limits.memory_keep_resident_bytes).unwrap_or(0))
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .decommit_batch_size(DECOMMIT_BATCH);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(Engine::new(&config)?)
}

/// Ticks the engine's epoch until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start the epoch ticker"));
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The cache file for `bytes` under this engine's settings.
pub fn cache_path(engine: &Engine, cache_dir: &Path, bytes: &[u8]) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let mut digest = sha2::Sha256::new();
    digest.update(bytes);
    digest.update(h.finish().to_le_bytes());
    digest.update(env!("CARGO_PKG_VERSION").as_bytes());
    cache_dir.join(format!("{}.cwasm", hex::encode(&digest.finalize()[..16])))
}

/// The component's bytes and where its compiled form may be: in `cache_dir` (first, and where
/// a compilation is written), then in the read-only `seed` cache.
fn cache_candidates(
    engine: &Engine,
    path: &Path,
    cache_dir: &Path,
    seed: Option<&Path>,
) -> anyhow::Result<(Vec<u8>, Vec<PathBuf>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading component {}", path.display()))?;
    let candidates =
        std::iter::once(cache_dir).chain(seed).map(|dir| cache_path(engine, dir, &bytes)).collect();
    Ok((bytes, candidates))
}

/// Whether [`load_component`] would find `path` compiled already (in `cache_dir` or `seed`).
pub fn is_compiled(
    engine: &Engine,
    path: &Path,
    cache_dir: &Path,
    seed: Option<&Path>,
) -> anyhow::Result<bool> {
    Ok(cache_candidates(engine, path, cache_dir, seed)?.1.iter().any(|p| p.exists()))
}

/// Loads a component: from `cache_dir`, else from the read-only `seed` cache, else compiles it
/// into `cache_dir`.
pub fn load_component(
    engine: &Engine,
    path: &Path,
    cache_dir: &Path,
    seed: Option<&Path>,
) -> anyhow::Result<Component> {
    let (bytes, candidates) = cache_candidates(engine, path, cache_dir, seed)?;
    for candidate in candidates.iter().filter(|c| c.exists()) {
        match deserialize_cached(engine, candidate) {
            Ok(c) => {
                tracing::info!(path = %candidate.display(), "loaded compiled component from cache");
                return Ok(c);
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %candidate.display(), "ignoring unusable compiled-component cache entry")
            }
        }
    }
    let cached = &candidates[0];
    let started = std::time::Instant::now();
    let compiled = engine
        .precompile_component(&bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling component {}", path.display()))?;
    tracing::info!(ms = started.elapsed().as_millis() as u64, "compiled component");
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating cache dir {}", cache_dir.display()))?;
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &compiled)?;
    std::fs::rename(&tmp, cached)?;
    deserialize_cached(engine, cached)
}

#[expect(
    unsafe_code,
    reason = "wasmtime trusts precompiled code; the file is one this process family wrote into its own cache directory, keyed by the engine's compatibility hash"
)]
fn deserialize_cached(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: see the reason above: only our own compiler output is ever read back.
    Ok(unsafe { Component::deserialize_file(engine, path) }?)
}

/// The linker with every import a worker may use: the `wasi:http/proxy` interfaces, an empty
/// `wasi:cli/environment`, `wasi:cli/exit`, `wasi:random`'s insecure interfaces, and `lattice:bindings`. No filesystem, no sockets.
pub fn linker(engine: &Engine) -> anyhow::Result<Linker<WorkerState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_proxy_interfaces_async(&mut linker)?;
    // Rust's std reads the environment, asks about terminals and may exit: these are linked,
    // and the environment is always empty (the WASI context gets no variables). Filesystem and sockets are not linked
    // at all, so a component that imports them is refused at start-up (invariant 1).
    {
        use wasmtime_wasi::cli::{WasiCli, WasiCliView as _};
        wasmtime_wasi::p2::bindings::cli::environment::add_to_linker::<_, WasiCli>(
            &mut linker,
            WorkerState::cli,
        )?;
        wasmtime_wasi::p2::bindings::cli::exit::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
        use wasmtime_wasi::p2::bindings::cli::{
            terminal_input, terminal_output, terminal_stderr, terminal_stdin, terminal_stdout,
        };
        terminal_input::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
        terminal_output::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
        terminal_stdin::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
        terminal_stdout::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
        terminal_stderr::add_to_linker::<_, WasiCli>(&mut linker, WorkerState::cli)?;
    }
    // Rust's std seeds `HashMap` keys from `wasi:random/insecure-seed`.
    {
        use wasmtime_wasi::WasiView as _;
        use wasmtime_wasi::p2::bindings::random::{insecure, insecure_seed};
        use wasmtime_wasi::random::WasiRandom;
        insecure::add_to_linker::<_, WasiRandom>(&mut linker, |t| t.ctx().ctx.random())?;
        insecure_seed::add_to_linker::<_, WasiRandom>(&mut linker, |t| t.ctx().ctx.random())?;
    }
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    Worker::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// A component ready to instantiate: its HTTP handler and, when it has Durable Object
/// classes, its object handler.
#[derive(Clone)]
pub struct Prepared {
    pub proxy: ProxyPre<WorkerState>,
    pub objects: Option<WorkerPre<WorkerState>>,
}

pub fn prepare(engine: &Engine, component: &Component) -> anyhow::Result<Prepared> {
    let pre: InstancePre<WorkerState> = linker(engine)?
        .instantiate_pre(component)
        .map_err(anyhow::Error::from)
        .context("the component imports something the runtime does not provide")?;
    let proxy = ProxyPre::new(pre.clone())
        .map_err(anyhow::Error::from)
        .context("the component does not export wasi:http/incoming-handler")?;
    let objects = WorkerPre::new(pre).ok();
    Ok(Prepared { proxy, objects })
}
