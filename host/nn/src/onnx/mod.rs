//! ONNX graphs on ONNX Runtime, as a wasmtime-wasi-nn backend.
//!
//! How a request runs: the guest's tensors arrive as [`NamedTensor`]s (dimensions, wasi-nn type,
//! little-endian bytes); [`OnnxGraph::run`] checks every one against the graph's declared inputs
//! (name, element type, rank, fixed dimensions, byte length) and turns a mismatch into
//! [`NnError::InvalidInput`]; it then borrows a session from the graph's pool, runs it and copies
//! the outputs back as tensors. ONNX Runtime's `Run` is thread-safe, but `ort`'s binding takes
//! `&mut Session`, so a graph keeps one session per worker (default: one per core, one thread each,
//! spinning off) and concurrent requests never wait on a single global lock.
//!
//! Concurrent requests on one graph may share a run ([`batch`], opt-in per model): their
//! sandboxes stay apart, only the backend's matrix work is done once for all of them.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, ValueType};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id, NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor};

use crate::NnError;

mod batch;
mod tensor;

pub use batch::{BatchConfig, RunReport};
use batch::{Coalescer, Job, OutputSpec, Plan};
use tensor::{InputSpec, check_shape, from_ort, to_ort};

static ORT: OnceLock<Result<(), String>> = OnceLock::new();

/// Loads ONNX Runtime from `dylib` (the `libonnxruntime.so` of the pinned `onnxruntime` wheel)
/// once per process. Later calls return the first call's outcome.
pub fn init_onnx_runtime(dylib: &Path) -> Result<(), NnError> {
    ORT.get_or_init(|| {
        if !dylib.is_file() {
            return Err(format!("{} does not exist (run `make bootstrap`)", dylib.display()));
        }
        ort::init_from(dylib.display().to_string())
            .with_name("div")
            .commit()
            .map(|_| ())
            .map_err(|e| format!("loading {}: {e}", dylib.display()))
    })
    .clone()
    .map_err(NnError::Runtime)
}

/// Finds `libonnxruntime.so.*` in the Python venv under `root` (where the bootstrap installs the
/// pinned `onnxruntime` wheel): `root/.venv/lib/python3*/site-packages/onnxruntime/capi/`.
pub fn locate_onnx_runtime(root: &Path) -> Option<std::path::PathBuf> {
    let lib = root.join(".venv/lib");
    let mut found: Vec<_> = std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .filter_map(|py| std::fs::read_dir(py.path().join("site-packages/onnxruntime/capi")).ok())
        .flat_map(|d| d.flatten().map(|f| f.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
        .collect();
    found.sort();
    found.pop()
}

/// How graphs are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnnxConfig {
    /// Threads one inference may use inside ONNX Runtime.
    pub intra_threads: usize,
    /// Sessions per graph: how many inferences on one graph run at once.
    pub sessions: usize,
    /// Most elements one input tensor may have. Inference runs outside the plugin's deadline and
    /// memory limit, so the host bounds its size here (plugins split larger batches).
    pub max_input_elements: usize,
}

impl Default for OnnxConfig {
    /// One session per core, one thread each: measured here (2 cores, MiniLM at batch 32), two
    /// single-threaded runs side by side do 734 sentences/s against 546 for one run on two
    /// threads (612 for two runs of two threads each); int8, 977 against 902. With batching,
    /// concurrent requests fill both sessions, so throughput is what counts.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self { intra_threads: 1, sessions: cores, max_input_elements: 64 * 512 }
    }
}

/// The wasi-nn backend for `GraphEncoding::Onnx`.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnnxBackend {
    config: OnnxConfig,
}

impl OnnxBackend {
    /// A backend that loads graphs with `config`.
    pub fn new(config: OnnxConfig) -> Self {
        Self { config }
    }
}

impl BackendInner for OnnxBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(&mut self, builders: &[&[u8]], _target: ExecutionTarget) -> Result<Graph, BackendError> {
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        let graph = OnnxGraph::load(bytes, self.config)?;
        Ok(graph.into_wasi_nn())
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

/// Told of every run (for metrics): how long ONNX Runtime took, how many requests it served and
/// how long each waited.
pub type RunObserver = Arc<dyn Fn(&RunReport) + Send + Sync>;

struct Shared {
    queue: Coalescer<Session>,
    inputs: Vec<InputSpec>,
    max_elements: usize,
    observer: OnceLock<RunObserver>,
}

/// A loaded ONNX graph, shareable across threads and requests.
#[derive(Clone)]
pub struct OnnxGraph {
    shared: Arc<Shared>,
    /// In a request's copy ([`OnnxGraph::for_request`]): the sandbox has not computed yet.
    expected: Option<Arc<Expected>>,
}

/// A sandbox the batch queue counts on (see [`batch`]): it stops being expected once, when its
/// job is queued or, failing that, when it ends.
struct Expected {
    shared: Arc<Shared>,
    pending: std::sync::atomic::AtomicBool,
}

impl Expected {
    /// Whether this sandbox was still expected (and is not from now on).
    fn take(&self) -> bool {
        self.pending.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if self.take() {
            self.shared.queue.arrived();
        }
    }
}

impl OnnxGraph {
    /// Loads `bytes` (an ONNX model) into `config.sessions` sessions, unbatched. ONNX Runtime
    /// copies the weights, so the caller may wipe `bytes` afterwards.
    pub fn load(bytes: &[u8], config: OnnxConfig) -> Result<Self, NnError> {
        Self::load_batched(bytes, config, BatchConfig::OFF)
    }

    /// [`OnnxGraph::load`], coalescing concurrent requests as `batching` says. A graph whose
    /// declared shapes do not show its batch and sequence axes cannot be batched: asking for it
    /// is an error that names the input or output at fault.
    pub fn load_batched(bytes: &[u8], config: OnnxConfig, batching: BatchConfig) -> Result<Self, NnError> {
        let load = |e: ort::Error| NnError::Load(e.to_string());
        let mut sessions = Vec::with_capacity(config.sessions.max(1));
        for _ in 0..config.sessions.max(1) {
            let session = Session::builder()
                .map_err(load)?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(load)?
                .with_intra_threads(config.intra_threads.max(1))
                .map_err(load)?
                .with_inter_threads(1)
                .map_err(load)?
                .with_intra_op_spinning(false)
                .map_err(load)?
                .commit_from_memory(bytes)
                .map_err(load)?;
            sessions.push(session);
        }
        let (inputs, outputs) = sessions.first().map(declared).unwrap_or_default();
        let plan = if batching.is_on() {
            Some(Plan::new(&inputs, &outputs).map_err(|e| NnError::Load(format!("batching: {e}")))?)
        } else {
            None
        };
        let max_elements = config.max_input_elements;
        Ok(Self {
            shared: Arc::new(Shared {
                queue: Coalescer::new(sessions, batching, plan, max_elements),
                inputs,
                max_elements,
                observer: OnceLock::new(),
            }),
            expected: None,
        })
    }

    /// Reports every run to `observer`.
    pub fn with_observer(self, observer: RunObserver) -> Self {
        let _ = self.shared.observer.set(observer);
        self
    }

    /// How this graph batches.
    pub fn batching(&self) -> BatchConfig {
        self.shared.queue.config()
    }

    /// This graph as one request's sandbox sees it: until that sandbox computes (or ends), a run
    /// that could take its input waits for it, within the batch window.
    pub fn for_request(&self) -> Self {
        if !self.batching().is_on() {
            return self.clone();
        }
        self.shared.queue.expect();
        Self {
            shared: self.shared.clone(),
            expected: Some(Arc::new(Expected {
                shared: self.shared.clone(),
                pending: std::sync::atomic::AtomicBool::new(true),
            })),
        }
    }

    /// This graph as a wasi-nn [`Graph`] for a registry.
    pub fn into_wasi_nn(self) -> Graph {
        Graph::from(Box::new(self) as Box<dyn BackendGraph>)
    }

    /// The names of the graph's inputs.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.shared.inputs.iter().map(|i| i.name.as_str())
    }

    /// Checks `inputs` against the graph: every declared input exactly once, each of the right
    /// type and shape, none too large. Answers them in the graph's input order.
    fn checked(&self, mut inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, NnError> {
        let specs = &self.shared.inputs;
        for t in &inputs {
            if !specs.iter().any(|s| s.name == t.name) {
                return Err(NnError::InvalidInput(format!(
                    "unknown input '{}'; the graph takes {}",
                    t.name,
                    specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let mut ordered = Vec::with_capacity(specs.len());
        for spec in specs {
            let mut same = inputs.iter().filter(|t| t.name == spec.name);
            match (same.next(), same.next()) {
                (None, _) => return Err(NnError::InvalidInput(format!("missing input '{}'", spec.name))),
                (Some(_), Some(_)) => {
                    return Err(NnError::InvalidInput(format!("input '{}' given twice", spec.name)));
                }
                (Some(_), None) => {}
            }
            let at = inputs.iter().position(|t| t.name == spec.name).unwrap_or_default();
            let t = inputs.swap_remove(at);
            check_shape(spec, &t.tensor)?;
            let elements = t.tensor.dimensions.iter().map(|&d| d as usize).product::<usize>();
            if elements > self.shared.max_elements {
                return Err(NnError::InvalidInput(format!(
                    "input '{}' has {elements} elements; this host takes at most {} per inference \
                     (split the batch)",
                    spec.name, self.shared.max_elements
                )));
            }
            ordered.push(t);
        }
        // a batched graph declares every input [batch, sequence]: they must agree
        if self.batching().is_on()
            && let Some(first) = ordered.first()
            && let Some(other) = ordered.iter().find(|t| t.tensor.dimensions != first.tensor.dimensions)
        {
            return Err(NnError::InvalidInput(format!(
                "input '{}' is {:?} but '{}' is {:?}; every input is [batch, sequence]",
                other.name, other.tensor.dimensions, first.name, first.tensor.dimensions
            )));
        }
        Ok(ordered)
    }

    /// Runs the graph on `inputs` (every declared input exactly once) and returns every output.
    /// A malformed input is refused here, before it is queued beside anyone else's.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, NnError> {
        let announced = self.expected.as_ref().is_some_and(|e| e.take());
        let job = match self.checked(inputs) {
            Ok(inputs) => Job::new(inputs),
            Err(e) => {
                if announced {
                    self.shared.queue.arrived();
                }
                return Err(e);
            }
        };
        let specs = &self.shared.inputs;
        let execute = |session: &mut Session, jobs: &[Job], plan: &Option<Plan>| {
            let started = Instant::now();
            let answers = match (jobs, plan) {
                ([one], _) => vec![infer(session, specs, &one.inputs)],
                (many, Some(plan)) => {
                    let ran = batch::stack(specs, many)
                        .and_then(|(stacked, seq)| Ok((infer(session, specs, &stacked)?, seq)));
                    match ran {
                        Ok((outputs, seq)) => batch::split(plan, &outputs, many, seq),
                        Err(e) => many.iter().map(|_| Err(NnError::Inference(e.to_string()))).collect(),
                    }
                }
                (many, None) => many.iter().map(|j| infer(session, specs, &j.inputs)).collect(),
            };
            (answers, started.elapsed())
        };
        let observe = |report: RunReport| {
            if let Some(o) = self.shared.observer.get() {
                o(&report);
            }
        };
        self.shared.queue.run(job, announced, &execute, &observe)
    }
}

/// The graph's declared inputs and outputs (tensors only).
fn declared(session: &Session) -> (Vec<InputSpec>, Vec<OutputSpec>) {
    let inputs = session
        .inputs
        .iter()
        .filter_map(|i| match &i.input_type {
            ValueType::Tensor { ty, shape, dimension_symbols } => Some(InputSpec {
                name: i.name.clone(),
                ty: *ty,
                shape: shape.to_vec(),
                symbols: dimension_symbols.to_vec(),
            }),
            _ => None,
        })
        .collect();
    let outputs = session
        .outputs
        .iter()
        .filter_map(|o| match &o.output_type {
            ValueType::Tensor { shape, dimension_symbols, .. } => Some(OutputSpec {
                name: o.name.clone(),
                shape: shape.to_vec(),
                symbols: dimension_symbols.to_vec(),
            }),
            _ => None,
        })
        .collect();
    (inputs, outputs)
}

/// One ONNX Runtime run of checked `inputs` (in the graph's order).
fn infer(
    session: &mut Session,
    specs: &[InputSpec],
    inputs: &[NamedTensor],
) -> Result<Vec<NamedTensor>, NnError> {
    let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
    for (spec, t) in specs.iter().zip(inputs) {
        values.push((t.name.clone(), to_ort(spec, &t.tensor)?));
    }
    let outputs = session.run(values).map_err(|e| NnError::Inference(e.to_string()))?;
    let mut out = Vec::with_capacity(outputs.len());
    for (name, value) in outputs.iter() {
        out.push(NamedTensor { name: name.to_string(), tensor: from_ort(name, &value)? });
    }
    Ok(out)
}

impl BackendGraph for OnnxGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        Ok(ExecutionContext::from(
            Box::new(OnnxContext { graph: self.clone(), staged: crate::Staged::new() })
                as Box<dyn BackendExecutionContext>,
        ))
    }
}

/// One guest's execution context: inputs set one by one (WITX style) or passed to `compute`.
struct OnnxContext {
    graph: OnnxGraph,
    staged: crate::Staged,
}

impl OnnxContext {
    fn input_name(&self, id: Id) -> Result<String, NnError> {
        match id {
            Id::Name(n) => Ok(n),
            Id::Index(i) => self
                .graph
                .shared
                .inputs
                .get(i as usize)
                .map(|s| s.name.clone())
                .ok_or_else(|| NnError::InvalidInput(format!("the graph has no input #{i}"))),
        }
    }
}

impl BackendExecutionContext for OnnxContext {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let name = self.input_name(id)?;
        self.staged.set(name, tensor);
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        Ok(self.staged.output(&id)?)
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let graph = &self.graph;
        Ok(self.staged.compute(inputs, |i| graph.run(i))?)
    }
}
