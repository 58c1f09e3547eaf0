//! One wasmtime engine for every plugin, and a fresh sandbox per request.
//!
//! Set-up, once per model: the plugin component is pre-initialised with wizer (its `initialize`
//! export runs with the model's assets and the instance is snapshotted, so a tokenizer is parsed
//! once, not per request), compiled by an engine with the pooling allocator and epoch
//! interruption (compiled artifacts are cached on disk by wasmtime, keyed by the engine's
//! settings), linked against `wasi:nn`, the `div:plugin/host` interface and a locked-down WASI, and
//! kept as an `InstancePre`.
//!
//! Per request: a new `Store` with fresh [`RequestState`], the plugin's memory limit and a
//! deadline; instantiate from the `InstancePre` (a copy-on-write image of the snapshot in a pooled
//! slot); call the export; drop it all. A trap, a timeout or a refused memory growth ends only
//! that store; the engine and every other request go on. At every epoch tick the sandbox checks
//! its deadline and passes a yield point of the host's [fair share](crate::fair) of cores, so a
//! model that spins cannot take the cores from the others.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use crate::bindings::{Embeddings, Input, PluginError, PluginWorld, PluginWorldPre, Request, Response};
use crate::error::{InvokeError, LoadError};
use crate::fair::FairShare;
use crate::state::{Limits, ModelContext, RequestState, StreamSink};

/// How the engine is set up. Defaults fit one machine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Sandboxes that may exist at once (pooling allocator slots).
    pub max_instances: u32,
    /// Largest linear memory any plugin may have; per-plugin limits sit below it.
    pub max_memory_bytes: usize,
    /// Memory a pooled slot keeps resident between instances, at most. Where the kernel has
    /// `PAGEMAP_SCAN` (Linux 6.7+), wasmtime resets a slot by copying back just the pages the
    /// last request wrote, if they fit in this budget; otherwise it drops them with `madvise`,
    /// which flushes the TLB of every core (an interrupt to each) and makes the next request
    /// fault every page in again. Measured here: with 16 MiB a MiniLM request takes no page
    /// faults (75 without) and no `madvise`. The cost:
    /// each slot in use may hold up to this much resident (slots are reused per plugin, so it
    /// scales with concurrency, not with requests). Without `PAGEMAP_SCAN` the first this-many
    /// bytes of a slot are reset by `memset` on every reuse, so the default then keeps none.
    pub keep_resident_bytes: usize,
    /// Where wasmtime caches compiled code and DIV caches wizer snapshots (`None`: no disk cache).
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick: the granularity of deadlines and of fair-share yield points.
    pub epoch_tick: Duration,
    /// Cores the fair share divides between models (default: the machine's).
    pub cores: Option<usize>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 256,
            max_memory_bytes: 1 << 30,
            keep_resident_bytes: if PoolingAllocationConfig::is_pagemap_scan_available() {
                16 << 20
            } else {
                0
            },
            cache_dir: None,
            epoch_tick: Duration::from_millis(5),
            cores: None,
        }
    }
}

/// The engine, its linker, and the thread that advances epochs.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<RequestState>>,
    /// An engine without a disk cache, made on first use, for plugins whose snapshot holds an
    /// encrypted package's assets: nothing derived from them may reach the disk.
    private: Arc<std::sync::OnceLock<(Engine, Arc<Linker<RequestState>>)>>,
    config: RuntimeConfig,
    ticker: Arc<Ticker>,
    fair: Arc<FairShare>,
}

/// Advances the epoch of every engine it holds until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    engines: Arc<std::sync::RwLock<Vec<Engine>>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn start_ticker(engines: Vec<Engine>, tick: Duration) -> Ticker {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let engines = Arc::new(std::sync::RwLock::new(engines));
    let ticked = engines.clone();
    std::thread::Builder::new()
        .name("div-epoch".into())
        .spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                for e in ticked.read().unwrap_or_else(|p| p.into_inner()).iter() {
                    e.increment_epoch();
                }
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| {
            tracing::error!("could not start the epoch thread: {e}; deadlines will not fire")
        });
    Ticker { stop, engines }
}

fn base_config(cache_dir: Option<&PathBuf>) -> Result<Config, LoadError> {
    let mut c = Config::new();
    c.wasm_component_model(true).epoch_interruption(true);
    if let Some(dir) = cache_dir {
        // wasmtime wants an absolute cache path
        let dir =
            std::path::absolute(dir).map_err(|e| LoadError::Engine(format!("{}: {e}", dir.display())))?;
        let mut cc = wasmtime::CacheConfig::new();
        cc.with_directory(dir.join("wasmtime"));
        let cache = wasmtime::Cache::new(cc).map_err(|e| LoadError::Engine(e.to_string()))?;
        c.cache(Some(cache));
    }
    Ok(c)
}

impl Runtime {
    /// Builds the engine (pooling allocator, epoch interruption) and its linker.
    pub fn new(config: RuntimeConfig) -> Result<Self, LoadError> {
        let (engine, linker) = Self::engine_and_linker(&config, config.cache_dir.as_ref())?;
        let ticker = Arc::new(start_ticker(vec![engine.clone()], config.epoch_tick));
        let fair = config.cores.map_or_else(FairShare::for_this_machine, FairShare::new);
        Ok(Self { engine, linker, private: Arc::default(), config, ticker, fair })
    }

    fn engine_and_linker(
        config: &RuntimeConfig,
        cache_dir: Option<&PathBuf>,
    ) -> Result<(Engine, Arc<Linker<RequestState>>), LoadError> {
        let mut c = base_config(cache_dir)?;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(config.max_instances)
            .total_core_instances(config.max_instances.saturating_mul(4))
            .total_memories(config.max_instances.saturating_mul(2))
            .total_tables(config.max_instances.saturating_mul(4))
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(16)
            .max_memory_size(config.max_memory_bytes)
            // with PAGEMAP_SCAN (Linux 6.7+) a slot is reset by copying back only the pages the
            // last request wrote, up to `keep_resident_bytes`; without it, or past that, by madvise
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(config.keep_resident_bytes)
            .table_keep_resident(64 << 10);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&c).map_err(|e| LoadError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| LoadError::Engine(e.to_string()))?;
        link_div(&mut linker)?;
        Ok((engine, Arc::new(linker)))
    }

    /// The engine and linker that never write to disk, made on first use.
    fn private_engine(&self) -> Result<(Engine, Arc<Linker<RequestState>>), LoadError> {
        if self.config.cache_dir.is_none() {
            return Ok((self.engine.clone(), self.linker.clone()));
        }
        if let Some((e, l)) = self.private.get() {
            return Ok((e.clone(), l.clone()));
        }
        let made = Self::engine_and_linker(&self.config, None)?;
        if self.private.set(made.clone()).is_ok() {
            self.ticker.engines.write().unwrap_or_else(|p| p.into_inner()).push(made.0.clone());
        }
        self.private.get().cloned().ok_or_else(|| LoadError::Engine("private engine".into()))
    }

    /// The engine (for tools that compile components themselves).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The fair share of cores every plugin's sandboxes run under.
    pub fn fair_share(&self) -> &Arc<FairShare> {
        &self.fair
    }

    /// Prepares `wasm` (a `div:plugin` component) for `model`: pre-initialise and snapshot it
    /// when `snapshot` is set, compile, link. Runs the plugin's `initialize` once.
    pub async fn load_plugin(
        &self,
        wasm: &[u8],
        model: Arc<ModelContext>,
        limits: Limits,
        snapshot: bool,
    ) -> Result<Plugin, LoadError> {
        self.load_plugin_with(wasm, model, limits, snapshot, true).await
    }

    /// [`Runtime::load_plugin`], choosing whether the snapshot and its compiled code may be
    /// cached on disk (`persist`); encrypted packages load with `persist = false`, so nothing
    /// derived from their plaintext assets is written anywhere.
    pub async fn load_plugin_with(
        &self,
        wasm: &[u8],
        model: Arc<ModelContext>,
        limits: Limits,
        snapshot: bool,
        persist: bool,
    ) -> Result<Plugin, LoadError> {
        let started = Instant::now();
        let (engine, linker) = if persist || !snapshot {
            (self.engine.clone(), self.linker.clone())
        } else {
            self.private_engine()?
        };
        let component = if snapshot {
            let (bytes, from_cache) = self.snapshot(wasm, &model, limits, persist, persist).await?;
            match (Component::new(&engine, &bytes), from_cache) {
                (Ok(c), _) => c,
                (Err(e), Some(path)) => {
                    // a damaged cache file: drop it and take the snapshot again
                    tracing::warn!(path = %path.display(), "cached snapshot does not compile ({e}); retaking it");
                    let _ = std::fs::remove_file(&path);
                    let (bytes, _) = self.snapshot(wasm, &model, limits, false, true).await?;
                    Component::new(&engine, &bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?
                }
                (Err(e), None) => return Err(LoadError::Compile(format!("{e:#}"))),
            }
        } else {
            Component::new(&self.engine, wasm).map_err(|e| LoadError::Compile(format!("{e:#}")))?
        };
        let instance_pre =
            linker.instantiate_pre(&component).map_err(|e| LoadError::World(format!("{e:#}")))?;
        let pre = PluginWorldPre::new(instance_pre).map_err(|e| LoadError::World(format!("{e:#}")))?;
        // without a snapshot, `initialize` runs in every request's instance instead (see `call`)
        let key: Arc<str> = Arc::from(model.config.name.as_str());
        Ok(Plugin {
            pre,
            engine,
            model,
            limits,
            fair: self.fair.clone(),
            key,
            snapshotted: snapshot,
            load_time: started.elapsed(),
            active: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            _ticker: self.ticker.clone(),
        })
    }

    /// Runs `initialize` under wizer and returns the snapshot, from the disk cache when the
    /// same plugin, config and assets were snapshotted before.
    async fn snapshot(
        &self,
        wasm: &[u8],
        model: &Arc<ModelContext>,
        limits: Limits,
        read_cache: bool,
        write_cache: bool,
    ) -> Result<(Vec<u8>, Option<PathBuf>), LoadError> {
        let cached = if write_cache || read_cache { self.snapshot_path(wasm, model) } else { None };
        if read_cache
            && let Some(path) = &cached
            && let Ok(bytes) = std::fs::read(path)
        {
            tracing::debug!(model = %model.config.name, "wizer snapshot from cache");
            return Ok((bytes, cached));
        }
        let c = base_config(None)?;
        let engine = Engine::new(&c).map_err(|e| LoadError::Engine(e.to_string()))?;
        let mut linker: Linker<RequestState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| LoadError::Engine(e.to_string()))?;
        link_div(&mut linker)?;
        let _ticker = start_ticker(vec![engine.clone()], self.config.epoch_tick);
        let mut store =
            Store::new(&engine, RequestState::new(model.clone(), limits, Arc::from("initialize")));
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(ticks(limits.deadline.max(Duration::from_secs(60)), self.config.epoch_tick));
        store.epoch_deadline_trap();
        let mut wizer = wasmtime_wizer::Wizer::new();
        wizer.init_func("initialize").keep_init_func(true);
        let (bytes, _) = wizer
            .run_component(&mut store, wasm, async |store, component| {
                linker.instantiate_async(store, component).await
            })
            .await
            .map_err(|e| LoadError::Snapshot(format!("{e:#}")))?;
        if write_cache
            && let Some(path) = &cached
            && let Err(e) = write_atomically(path, &bytes)
        {
            // a cache is an optimisation: a full or read-only disk must not stop the model
            tracing::warn!(model = %model.config.name, "not caching the snapshot: {e}");
        }
        Ok((bytes, None))
    }

    fn snapshot_path(&self, wasm: &[u8], model: &ModelContext) -> Option<PathBuf> {
        let key = snapshot_key(wasm, model);
        self.config.cache_dir.as_ref().map(|d| d.join("snapshots").join(format!("{key}.wasm")))
    }
}

/// Writes `bytes` to `path` through a temporary file unique to this writer (loads of the same
/// plugin may race; the rename settles it), synced before the rename.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<(), LoadError> {
    use std::io::Write as _;
    let io = |source| LoadError::Cache { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Links `div:plugin/host` and `wasi:nn` into `linker`.
fn link_div(linker: &mut Linker<RequestState>) -> Result<(), LoadError> {
    let err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
    crate::bindings::div::plugin::host::add_to_linker::<_, HasSelf<RequestState>>(linker, |s| s)
        .map_err(err)?;
    crate::bindings::div::plugin::types::add_to_linker::<_, HasSelf<RequestState>>(linker, |s| s)
        .map_err(err)?;
    crate::bindings::div::plugin::streaming::add_to_linker::<_, HasSelf<RequestState>>(linker, |s| s)
        .map_err(err)?;
    wasmtime_wasi_nn::wit::add_to_linker(linker, RequestState::nn_view).map_err(err)?;
    Ok(())
}

fn ticks(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos() / tick.as_nanos().max(1)).max(1) as u64
}

fn snapshot_key(wasm: &[u8], model: &ModelContext) -> String {
    let mut h = Sha256::new();
    h.update(b"div-snapshot-v1\0");
    h.update(Sha256::digest(wasm));
    let c = &model.config;
    for part in [c.name.as_bytes(), c.task.as_bytes(), &c.max_seq_len.to_le_bytes(), c.extra.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let mut names: Vec<&String> = model.assets.keys().collect();
    names.sort();
    for n in names {
        h.update((n.len() as u64).to_le_bytes());
        h.update(n.as_bytes());
        if let Some(a) = model.assets.get(n) {
            h.update(Sha256::digest(a));
        }
    }
    hex::encode(h.finalize())
}

/// A plugin ready to serve its model, one fresh instance per call.
pub struct Plugin {
    pre: PluginWorldPre<RequestState>,
    engine: Engine,
    model: Arc<ModelContext>,
    limits: Limits,
    fair: Arc<FairShare>,
    /// Which model's share this plugin's sandboxes count in.
    key: Arc<str>,
    snapshotted: bool,
    load_time: Duration,
    active: Arc<std::sync::atomic::AtomicU32>,
    _ticker: Arc<Ticker>,
}

/// Holds one of a plugin's instance slots; frees it on drop.
struct Slot(Arc<std::sync::atomic::AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one call cost: how long its parts took, and what the backend measured.
#[derive(Debug, Clone, Default)]
pub struct CallReport {
    /// Store + instance creation.
    pub instantiate: Duration,
    /// The export call (plugin work and backend inference), parked time included.
    pub call: Duration,
    /// Time the sandbox spent parked for other models' fair share.
    pub parked: Duration,
    /// Tokens and refused inputs, as the backend measured them (not as the plugin says).
    pub usage: Arc<div_nn::RequestUsage>,
}

impl Plugin {
    /// The model this plugin serves.
    pub fn model(&self) -> &Arc<ModelContext> {
        &self.model
    }

    /// The limits each call runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether instances start from a wizer snapshot.
    pub fn snapshotted(&self) -> bool {
        self.snapshotted
    }

    /// How long loading (snapshot + compile + link) took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Embeddings for `inputs` in a fresh sandbox.
    pub fn embed(
        &self,
        inputs: &[Input],
        request_id: Arc<str>,
    ) -> (Result<Embeddings, InvokeError>, CallReport) {
        self.call(request_id, None, |store, world| world.div_plugin_plugin().call_embed(store, inputs))
    }

    /// The general entry point in a fresh sandbox.
    pub fn handle(
        &self,
        request: &Request,
        request_id: Arc<str>,
    ) -> (Result<Response, InvokeError>, CallReport) {
        self.call(request_id, None, |store, world| world.div_plugin_plugin().call_handle(store, request))
    }

    /// The general entry point in a fresh sandbox, with what the plugin emits (`streaming.emit`)
    /// passed to `sink` as it comes.
    pub fn handle_streaming(
        &self,
        request: &Request,
        request_id: Arc<str>,
        sink: StreamSink,
    ) -> (Result<Response, InvokeError>, CallReport) {
        self.call(request_id, Some(sink), |store, world| {
            world.div_plugin_plugin().call_handle(store, request)
        })
    }

    /// Creates a sandbox and drops it: the per-request fixed cost, for benchmarks.
    pub fn instantiate_only(&self, request_id: Arc<str>) -> Result<Duration, InvokeError> {
        let started = Instant::now();
        let mut store = self.store(request_id, None);
        self.pre.instantiate(&mut store).map_err(|e| InvokeError::Instantiate(format!("{e:#}")))?;
        Ok(started.elapsed())
    }

    fn store(&self, request_id: Arc<str>, sink: Option<StreamSink>) -> Store<RequestState> {
        let mut state = RequestState::new(self.model.clone(), self.limits, request_id);
        if let Some(sink) = sink {
            state = state.with_stream(sink);
        }
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // every tick: the deadline (time running, not parked), then the fair share's yield point
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut cx| {
            let st = cx.data_mut();
            if st.clock.expired() {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            if let Some(running) = &st.running {
                let parked = running.yield_point(st.clock.wall_end());
                st.clock.parked(parked);
            }
            Ok(wasmtime::UpdateDeadline::Continue(1))
        });
        store
    }

    /// Takes one of the plugin's `limits.instances` slots, or says none is free.
    fn slot(&self) -> Result<Slot, InvokeError> {
        let limit = self.limits.instances.max(1);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .map(|_| Slot(self.active.clone()))
            .map_err(|_| InvokeError::Instantiate(format!("all {limit} sandboxes of this model are busy")))
    }

    fn call<R>(
        &self,
        request_id: Arc<str>,
        sink: Option<StreamSink>,
        f: impl FnOnce(&mut Store<RequestState>, &PluginWorld) -> wasmtime::Result<Result<R, PluginError>>,
    ) -> (Result<R, InvokeError>, CallReport) {
        let started = Instant::now();
        let _slot = match self.slot() {
            Ok(s) => s,
            Err(e) => return (Err(e), CallReport::default()),
        };
        let mut store = self.store(request_id, sink);
        let report = |store: &Store<RequestState>, instantiate: Duration, call: Duration| CallReport {
            instantiate,
            call,
            parked: store.data().clock.parked_total(),
            usage: store.data().usage.clone(),
        };
        let world = match self.pre.instantiate(&mut store) {
            Ok(w) => w,
            Err(e) => {
                let t = report(&store, started.elapsed(), Duration::ZERO);
                return (Err(self.classify(&store, e, InvokeError::Instantiate)), t);
            }
        };
        let instantiated = Instant::now();
        store.data_mut().running = Some(self.fair.enter(self.key.clone()));
        store
            .data()
            .usage
            .set_waiting(Box::new(crate::fair::Waiter::new(self.fair.clone(), self.key.clone())));
        if !self.snapshotted
            && let Err(e) = world.call_initialize(&mut store)
        {
            store.data_mut().running = None;
            let t = report(&store, instantiated - started, instantiated.elapsed());
            return (Err(self.classify(&store, e, InvokeError::Trap)), t);
        }
        let result = match f(&mut store, &world) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(plugin_error)) => Err(InvokeError::Plugin(plugin_error)),
            Err(e) => Err(self.classify(&store, e, InvokeError::Trap)),
        };
        store.data_mut().running = None;
        (result, report(&store, instantiated - started, instantiated.elapsed()))
    }

    /// Names the cause of a trap: deadline, memory limit, or the trap itself.
    fn classify(
        &self,
        store: &Store<RequestState>,
        e: wasmtime::Error,
        otherwise: fn(String) -> InvokeError,
    ) -> InvokeError {
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return InvokeError::Timeout(self.limits.deadline);
        }
        if store.data().limiter.refused_memory {
            return InvokeError::MemoryLimit { limit: self.limits.memory_bytes };
        }
        // the whole chain (with the Wasm backtrace) goes to the host's log; the caller gets the
        // cause only: a backtrace shows the owner's code, and can be long
        tracing::debug!(model = %self.model.config.name, "plugin failed: {}", crate::error::clip(&format!("{e:?}"), 8192));
        let cause = match e.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => e.root_cause().to_string(),
        };
        otherwise(crate::error::clip(&cause, 512))
    }
}
