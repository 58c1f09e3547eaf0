//! ONNX graphs on ONNX Runtime, as a wasmtime-wasi-nn backend.
//!
//! How a request runs: the guest's tensors arrive as [`NamedTensor`]s (dimensions, wasi-nn type,
//! little-endian bytes); [`OnnxGraph::run`] checks every one against the graph's declared inputs
//! (name, element type, rank, fixed dimensions, byte length) and turns a mismatch into
//! [`NnError::InvalidInput`]; it then borrows a session from the graph's pool, runs it and copies
//! the outputs back as tensors. ONNX Runtime's `Run` is thread-safe, but `ort`'s binding takes
//! `&mut Session`, so a graph keeps one session per worker (default: one per core, each free to use
//! every core, spinning off) and concurrent requests never wait on a single global lock.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::tensor::TensorElementType;
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id, NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor};

use crate::NnError;

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
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Self { intra_threads: cores, sessions: cores, max_input_elements: 64 * 512 }
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

/// One declared input of a graph.
#[derive(Debug, Clone)]
struct InputSpec {
    name: String,
    ty: TensorElementType,
    /// -1 where the dimension is dynamic.
    shape: Vec<i64>,
}

struct Pool {
    sessions: Mutex<Vec<Session>>,
    returned: Condvar,
}

/// Told how long each inference took (for metrics).
pub type RunObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// A loaded ONNX graph, shareable across threads and requests.
#[derive(Clone)]
pub struct OnnxGraph {
    pool: Arc<Pool>,
    inputs: Arc<[InputSpec]>,
    max_elements: usize,
    observer: Option<RunObserver>,
}

/// A session borrowed from the pool; given back on drop, even when inference fails.
struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Session>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let mut sessions = self.pool.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.push(s);
            self.pool.returned.notify_one();
        }
    }
}

impl OnnxGraph {
    /// Loads `bytes` (an ONNX model) into `config.sessions` sessions. ONNX Runtime copies the
    /// weights, so the caller may wipe `bytes` afterwards.
    pub fn load(bytes: &[u8], config: OnnxConfig) -> Result<Self, NnError> {
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
        let inputs = sessions
            .first()
            .map(|s| {
                s.inputs
                    .iter()
                    .filter_map(|i| match &i.input_type {
                        ValueType::Tensor { ty, shape, .. } => {
                            Some(InputSpec { name: i.name.clone(), ty: *ty, shape: shape.to_vec() })
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Ok(Self {
            pool: Arc::new(Pool { sessions: Mutex::new(sessions), returned: Condvar::new() }),
            inputs: inputs.into(),
            max_elements: config.max_input_elements,
            observer: None,
        })
    }

    /// Reports every inference's duration to `observer`.
    pub fn with_observer(mut self, observer: RunObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// This graph as a wasi-nn [`Graph`] for a registry.
    pub fn into_wasi_nn(self) -> Graph {
        Graph::from(Box::new(self) as Box<dyn BackendGraph>)
    }

    /// The names of the graph's inputs.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|i| i.name.as_str())
    }

    fn lease(&self) -> Lease<'_> {
        let mut sessions = self.pool.sessions.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = sessions.pop() {
                return Lease { pool: &self.pool, session: Some(s) };
            }
            sessions = self.pool.returned.wait(sessions).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Runs the graph on `inputs` (every declared input exactly once) and returns every output.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, NnError> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for spec in self.inputs.iter() {
            if !inputs.iter().any(|t| t.name == spec.name) {
                return Err(NnError::InvalidInput(format!("missing input '{}'", spec.name)));
            }
        }
        for NamedTensor { name, tensor } in inputs {
            let spec = self.inputs.iter().find(|s| s.name == name).ok_or_else(|| {
                NnError::InvalidInput(format!(
                    "unknown input '{name}'; the graph takes {}",
                    self.inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            if values.iter().any(|(n, _)| *n == name) {
                return Err(NnError::InvalidInput(format!("input '{name}' given twice")));
            }
            check_shape(spec, &tensor)?;
            let elements = tensor.dimensions.iter().map(|&d| d as usize).product::<usize>();
            if elements > self.max_elements {
                return Err(NnError::InvalidInput(format!(
                    "input '{name}' has {elements} elements; this host takes at most {} per inference \
                     (split the batch)",
                    self.max_elements
                )));
            }
            values.push((name, to_ort(spec, tensor)?));
        }
        let mut lease = self.lease();
        let session = lease.session.as_mut().ok_or_else(|| NnError::Inference("no session".into()))?;
        let started = std::time::Instant::now();
        let outputs = session.run(values).map_err(|e| NnError::Inference(e.to_string()))?;
        if let Some(observe) = &self.observer {
            observe(started.elapsed());
        }
        let mut out = Vec::with_capacity(outputs.len());
        for (name, value) in outputs.iter() {
            out.push(NamedTensor { name: name.to_string(), tensor: from_ort(name, &value)? });
        }
        Ok(out)
    }
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

fn wasi_type_name(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp16 => "FP16",
        TensorType::Fp32 => "FP32",
        TensorType::Fp64 => "FP64",
        TensorType::Bf16 => "BF16",
        TensorType::U8 => "U8",
        TensorType::I32 => "I32",
        TensorType::I64 => "I64",
    }
}

fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

fn wasi_to_ort(ty: TensorType) -> TensorElementType {
    match ty {
        TensorType::Fp16 => TensorElementType::Float16,
        TensorType::Fp32 => TensorElementType::Float32,
        TensorType::Fp64 => TensorElementType::Float64,
        TensorType::Bf16 => TensorElementType::Bfloat16,
        TensorType::U8 => TensorElementType::Uint8,
        TensorType::I32 => TensorElementType::Int32,
        TensorType::I64 => TensorElementType::Int64,
    }
}

fn check_shape(spec: &InputSpec, t: &Tensor) -> Result<(), NnError> {
    let name = &spec.name;
    if wasi_to_ort(t.ty) != spec.ty {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' is {}; the graph expects {:?}",
            wasi_type_name(t.ty),
            spec.ty
        )));
    }
    if !spec.shape.is_empty() && t.dimensions.len() != spec.shape.len() {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' has rank {}; the graph expects rank {} {:?}",
            t.dimensions.len(),
            spec.shape.len(),
            spec.shape
        )));
    }
    for (i, (&got, &want)) in t.dimensions.iter().zip(spec.shape.iter()).enumerate() {
        if want >= 0 && i64::from(got) != want {
            return Err(NnError::InvalidInput(format!(
                "input '{name}' dimension {i} is {got}; the graph expects {want}"
            )));
        }
    }
    let elements = t.dimensions.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    let expected = elements.and_then(|n| n.checked_mul(element_size(t.ty)));
    if expected != Some(t.data.len()) {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' has {} bytes; dimensions {:?} of {} need {}",
            t.data.len(),
            t.dimensions,
            wasi_type_name(t.ty),
            expected.map_or_else(|| "too many".to_string(), |n| n.to_string())
        )));
    }
    Ok(())
}

macro_rules! le_vec {
    ($data:expr, $t:ty, $n:expr) => {
        $data
            .chunks_exact($n)
            .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])))
            .collect::<Vec<$t>>()
    };
}

fn to_ort(spec: &InputSpec, t: Tensor) -> Result<DynValue, NnError> {
    let shape: Vec<i64> = t.dimensions.iter().map(|&d| i64::from(d)).collect();
    let err = |e: ort::Error| NnError::InvalidInput(format!("input '{}': {e}", spec.name));
    let data = &t.data;
    Ok(match t.ty {
        TensorType::I64 => OrtTensor::from_array((shape, le_vec!(data, i64, 8))).map_err(err)?.into_dyn(),
        TensorType::I32 => OrtTensor::from_array((shape, le_vec!(data, i32, 4))).map_err(err)?.into_dyn(),
        TensorType::Fp32 => OrtTensor::from_array((shape, le_vec!(data, f32, 4))).map_err(err)?.into_dyn(),
        TensorType::Fp64 => OrtTensor::from_array((shape, le_vec!(data, f64, 8))).map_err(err)?.into_dyn(),
        TensorType::U8 => OrtTensor::from_array((shape, data.clone())).map_err(err)?.into_dyn(),
        TensorType::Fp16 => {
            OrtTensor::from_array((shape, le_vec!(data, half::f16, 2))).map_err(err)?.into_dyn()
        }
        TensorType::Bf16 => {
            OrtTensor::from_array((shape, le_vec!(data, half::bf16, 2))).map_err(err)?.into_dyn()
        }
    })
}

fn from_ort(name: &str, value: &ort::value::ValueRef<'_>) -> Result<Tensor, NnError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(NnError::UnsupportedOutput(format!("output '{name}' is not a tensor")));
    };
    let fail = |e: ort::Error| NnError::Inference(format!("reading output '{name}': {e}"));
    macro_rules! take {
        ($t:ty, $wasi:expr) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(fail)?;
            let dims = shape.iter().map(|&d| u32::try_from(d).unwrap_or(0)).collect();
            Tensor::new(dims, $wasi, data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }};
    }
    Ok(match ty {
        TensorElementType::Float32 => take!(f32, TensorType::Fp32),
        TensorElementType::Float64 => take!(f64, TensorType::Fp64),
        TensorElementType::Float16 => take!(half::f16, TensorType::Fp16),
        TensorElementType::Bfloat16 => take!(half::bf16, TensorType::Bf16),
        TensorElementType::Int64 => take!(i64, TensorType::I64),
        TensorElementType::Int32 => take!(i32, TensorType::I32),
        TensorElementType::Uint8 => take!(u8, TensorType::U8),
        other => {
            return Err(NnError::UnsupportedOutput(format!(
                "output '{name}' has element type {other:?}, which wasi-nn cannot carry"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec { name: "input_ids".into(), ty: TensorElementType::Int64, shape: vec![-1, -1] }
    }

    fn tensor(dims: &[u32], ty: TensorType, bytes: usize) -> Tensor {
        Tensor::new(dims.to_vec(), ty, vec![0; bytes])
    }

    #[test]
    fn a_well_formed_tensor_passes() {
        assert!(check_shape(&spec(), &tensor(&[2, 3], TensorType::I64, 48)).is_ok());
    }

    #[test]
    fn wrong_type_rank_dims_and_length_are_named() {
        let e = |t: Tensor| check_shape(&spec(), &t).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e(tensor(&[1, 2], TensorType::Fp32, 8)).contains("'input_ids' is FP32; the graph expects Int64")
        );
        assert!(e(tensor(&[2], TensorType::I64, 16)).contains("rank 1; the graph expects rank 2"));
        assert!(
            e(tensor(&[2, 3], TensorType::I64, 40))
                .contains("has 40 bytes; dimensions [2, 3] of I64 need 48")
        );
        let fixed = InputSpec { shape: vec![1, 4], ..spec() };
        let msg = check_shape(&fixed, &tensor(&[1, 5], TensorType::I64, 40)).err().map(|e| e.to_string());
        assert!(msg.unwrap_or_default().contains("dimension 1 is 5; the graph expects 4"));
        // a product that overflows is refused, not wrapped
        assert!(e(tensor(&[u32::MAX, u32::MAX], TensorType::I64, 8)).contains("too many"));
    }

    #[test]
    fn little_endian_bytes_become_values() {
        let bytes: Vec<u8> = [1i64, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(le_vec!(bytes, i64, 8), vec![1, -2]);
    }
}
