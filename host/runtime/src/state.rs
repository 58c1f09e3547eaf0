//! What one request's sandbox holds: a locked-down WASI context, the resource table, a `wasi:nn`
//! context that sees only this model's graphs, the model's config and assets, and the memory
//! limiter. Built fresh for every request and dropped with it, so nothing crosses requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use div_nn::{ModelGraphs, RequestUsage};
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_nn::Registry;
use wasmtime_wasi_nn::wit::{WasiNnCtx, WasiNnView};

use crate::bindings::{Level, ModelConfig, div::plugin::host, div::plugin::streaming};

/// Where a request's streamed text goes: called with each piece a plugin emits; returns false
/// once the caller has gone.
pub type StreamSink = Box<dyn FnMut(&str) -> bool + Send>;

/// Most log lines one request may write through `host.log`; the rest are counted, not logged.
const MAX_LOG_LINES: u32 = 64;
/// Longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 2048;
/// Most texts one `host.tokenize` call takes.
const MAX_TOKENIZE_TEXTS: usize = 2048;
/// Most bytes one `host.tokenize` call takes, all texts together: the host does this work
/// outside the plugin's memory limit, and tokenizing is linear in the bytes, truncated or not.
const MAX_TOKENIZE_BYTES: usize = 4 << 20;
/// Longest piece of text one `streaming.emit` may hand over.
const MAX_EMIT_BYTES: usize = 64 << 10;

/// A model as its plugin sees it: config, read-only assets, and its graphs for `load-by-name`.
pub struct ModelContext {
    /// What `host.config` returns.
    pub config: ModelConfig,
    /// What `host.asset` serves (e.g. `tokenizer.json`); never weights.
    pub assets: HashMap<String, Arc<[u8]>>,
    /// The graphs the plugin may load by name.
    pub graphs: ModelGraphs,
    /// The package's `tokenizer.json`, parsed natively, for `host.tokenize`.
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
}

/// Per-plugin limits, from the model's manifest or the host's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory (bytes) the plugin may grow to.
    pub memory_bytes: usize,
    /// Longest a single request may run inside the plugin.
    pub deadline: Duration,
    /// Largest table (elements).
    pub table_elements: usize,
    /// Sandboxes of this plugin that may exist at once; more calls are refused, not queued.
    pub instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            deadline: Duration::from_secs(10),
            table_elements: 100_000,
            instances: 64,
        }
    }
}

/// Enforces [`Limits`] on growth and remembers whether it refused any, so a trap that follows a
/// refused `memory.grow` is reported as "out of memory", not as a bare `unreachable`.
pub(crate) struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    /// Bytes of every linear memory of the instance together: the limit is for the plugin, not
    /// for each of its memories.
    total_memory: usize,
    pub(crate) refused_memory: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.total_memory.saturating_sub(current).saturating_add(desired);
        let ok = total <= self.memory_bytes;
        if ok {
            self.total_memory = total;
        } else {
            self.refused_memory = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }
}

/// The store data of one sandbox.
pub struct RequestState {
    wasi: WasiCtx,
    table: ResourceTable,
    nn: WasiNnCtx,
    model: Arc<ModelContext>,
    pub(crate) limiter: Limiter,
    request_id: Arc<str>,
    log_lines: u32,
    stream: Option<StreamSink>,
    /// The sink said the caller has gone; the next emit traps.
    stream_gone: bool,
    /// What the backend measured of this request (tokens, refused inputs).
    pub(crate) usage: Arc<RequestUsage>,
    /// The request's time, parked time excluded.
    pub(crate) clock: crate::fair::Clock,
    /// Its place in the host's fair share of cores while it runs.
    pub(crate) running: Option<crate::fair::Running>,
}

/// A wall clock stopped at the epoch: plugins get no real time (monotonic time stays available).
struct EpochClock;

impl wasmtime_wasi::HostWallClock for EpochClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl RequestState {
    /// A fresh sandbox state for `model`.
    pub fn new(model: Arc<ModelContext>, limits: Limits, request_id: Arc<str>) -> Self {
        // no preopens, no environment, no arguments, no sockets, stdio closed
        let wasi = WasiCtx::builder().wall_clock(EpochClock).allow_tcp(false).allow_udp(false).build();
        let usage = Arc::new(RequestUsage::default());
        let nn = WasiNnCtx::new([], Registry::from(model.graphs.for_request(&usage)));
        Self {
            wasi,
            table: ResourceTable::new(),
            nn,
            model,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                total_memory: 0,
                refused_memory: false,
            },
            request_id,
            log_lines: 0,
            stream: None,
            stream_gone: false,
            usage,
            clock: crate::fair::Clock::start(limits.deadline),
            running: None,
        }
    }

    /// Past the request's deadline (host imports check this, so none outlives it).
    fn past_deadline(&self) -> bool {
        self.clock.expired()
    }

    /// Sends what the plugin emits to `sink`.
    pub fn with_stream(mut self, sink: StreamSink) -> Self {
        self.stream = Some(sink);
        self
    }

    pub(crate) fn nn_view(&mut self) -> WasiNnView<'_> {
        WasiNnView::new(&mut self.table, &mut self.nn)
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl crate::bindings::div::plugin::types::Host for RequestState {}

impl streaming::Host for RequestState {
    fn emit(&mut self, delta: String) -> wasmtime::Result<Result<(), String>> {
        if self.stream_gone {
            // the plugin was told the caller left and went on generating: stop it here
            return Err(wasmtime::Error::msg("the plugin kept emitting after the caller had gone"));
        }
        if delta.len() > MAX_EMIT_BYTES {
            return Err(wasmtime::Error::msg(format!(
                "the plugin emitted {} bytes at once (at most {MAX_EMIT_BYTES})",
                delta.len()
            )));
        }
        // without a sink (a request that is not streamed) the text arrives in the result; time
        // spent waiting for a slow reader is not the plugin's running time
        let waited = std::time::Instant::now();
        let delivered = self.stream.as_mut().is_none_or(|sink| sink(&delta));
        self.clock.parked(waited.elapsed());
        if delivered {
            Ok(Ok(()))
        } else {
            self.stream_gone = true;
            Ok(Err("the caller has gone".to_string()))
        }
    }
}

impl host::Host for RequestState {
    fn log(&mut self, level: Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                tracing::warn!(request_id = %self.request_id, model = %self.model.config.name, "plugin log limit reached");
            }
            return;
        }
        let mut end = message.len().min(MAX_LOG_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &message[..end];
        let (rid, model) = (&*self.request_id, self.model.config.name.as_str());
        match level {
            Level::Trace => tracing::trace!(target: "plugin", request_id = rid, model, "{msg}"),
            Level::Debug => tracing::debug!(target: "plugin", request_id = rid, model, "{msg}"),
            Level::Info => tracing::info!(target: "plugin", request_id = rid, model, "{msg}"),
            Level::Warn => tracing::warn!(target: "plugin", request_id = rid, model, "{msg}"),
            Level::Error => tracing::error!(target: "plugin", request_id = rid, model, "{msg}"),
        }
    }

    fn config(&mut self) -> ModelConfig {
        self.model.config.clone()
    }

    fn asset(&mut self, name: String) -> Option<Vec<u8>> {
        self.model.assets.get(&name).map(|a| a.to_vec())
    }

    fn tokenize(&mut self, texts: Vec<String>, max_len: u32) -> Result<Vec<Vec<u32>>, String> {
        let tok = self.model.tokenizer.as_ref().ok_or("this model's package has no tokenizer.json")?;
        // the host does this work outside the plugin's memory limit: bound it, and never past
        // the request's deadline
        let budget = (self.model.config.max_seq_len as usize).saturating_mul(64).max(4096);
        if let Some(i) = texts.iter().position(|t| t.len() > budget) {
            return Err(format!("text {i} is longer than {budget} bytes"));
        }
        if texts.len() > MAX_TOKENIZE_TEXTS {
            return Err(format!("at most {MAX_TOKENIZE_TEXTS} texts per call"));
        }
        let total: usize = texts.iter().map(String::len).sum();
        if total > MAX_TOKENIZE_BYTES {
            return Err(format!("{total} bytes of text in one call; at most {MAX_TOKENIZE_BYTES}"));
        }
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            if self.past_deadline() {
                return Err("the request's deadline passed".into());
            }
            // the host's tokenizer truncates to the model's length keeping [SEP] and never pads
            // (set at load); `max_len` can only shorten further
            let enc = tok.encode_fast(text, true).map_err(|e| format!("tokenize: {e}"))?;
            let ids = enc.get_ids();
            out.push(ids[..ids.len().min(max_len as usize)].to_vec());
        }
        Ok(out)
    }
}
