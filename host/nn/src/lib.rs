//! wasi-nn backends for DIV hosts.
//!
//! wasmtime-wasi-nn keeps each ML framework behind the `BackendInner` / `BackendGraph` /
//! `BackendExecutionContext` traits. Its built-in ONNX backend takes FP32 inputs only, panics the
//! host on an I64 tensor and serialises every graph behind one mutex, so DIV brings its own:
//! [`onnx`], on ONNX Runtime through `ort` (loaded dynamically from the `libonnxruntime.so` the
//! bootstrap installs). It takes I64/I32/F32/F16/BF16/F64/U8 tensors, answers a wrong type, shape or
//! name with a precise error instead of a panic, and runs concurrent requests on one loaded graph
//! through a pool of sessions rather than a global lock.
//!
//! [`ggml`] runs GGUF models on llama.cpp for text generation, one token per `compute`, each
//! request in a context of its own.
//!
//! Graphs are loaded by the host (never by a guest) and handed to plugins by name through a
//! [`registry::ModelGraphs`] registry that shows each plugin only its own model.

pub mod ggml;
pub mod onnx;
pub mod registry;
pub mod template;
mod usage;

pub use ggml::{
    BatchStats, GenOptions, Generation, GgmlBackend, GgmlConfig, GgmlGraph, Step, batch_stats, llama_backend,
};
pub use onnx::{
    BatchConfig, OnnxBackend, OnnxConfig, OnnxGraph, RunObserver, RunReport, init_onnx_runtime,
    locate_onnx_runtime,
};
pub use registry::ModelGraphs;
pub use template::{ChatMessage, ChatTemplate, Segment};
pub use usage::{Refusal, RequestUsage, Waiting};
pub use wasmtime_wasi_nn::backend::NamedTensor;
pub use wasmtime_wasi_nn::wit::TensorType;
pub use wasmtime_wasi_nn::{Graph, Tensor};

/// Errors loading or running a graph.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// ONNX Runtime could not be loaded or initialised.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// The model bytes are not a graph ONNX Runtime accepts.
    #[error("loading the graph: {0}")]
    Load(String),
    /// An input that does not fit the graph (name, type, shape, byte length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The graph failed while running.
    #[error("inference failed: {0}")]
    Inference(String),
    /// An output of a type wasi-nn cannot carry.
    #[error("unsupported output: {0}")]
    UnsupportedOutput(String),
}

impl From<NnError> for wasmtime_wasi_nn::backend::BackendError {
    fn from(e: NnError) -> Self {
        use wasmtime_wasi_nn::backend::BackendError;
        match e {
            // wasi-nn hands a guest only the top-level message of an error; this is the variant
            // whose message carries ours, so a plugin learns which input was wrong and how
            NnError::InvalidInput(_) | NnError::UnsupportedOutput(_) => {
                BackendError::UnsupportedTensorType(e.to_string())
            }
            other => BackendError::BackendAccess(wasmtime::Error::msg(other.to_string())),
        }
    }
}

/// The WITX-style half of a wasi-nn context (inputs set one by one, `compute` without arguments,
/// outputs read by name or index) on top of a backend's one-shot `run`, shared by the backends.
pub(crate) struct Staged {
    pub(crate) inputs: Vec<NamedTensor>,
    pub(crate) outputs: Vec<NamedTensor>,
}

impl Staged {
    pub(crate) fn new() -> Self {
        Self { inputs: Vec::new(), outputs: Vec::new() }
    }

    /// Keeps `tensor` as the input `name` (replacing an earlier one).
    pub(crate) fn set(&mut self, name: String, tensor: &Tensor) {
        self.inputs.retain(|t| t.name != name);
        self.inputs.push(NamedTensor { name, tensor: tensor.clone() });
    }

    /// The output `id` of the last `compute`.
    pub(crate) fn output(&self, id: &wasmtime_wasi_nn::backend::Id) -> Result<Tensor, NnError> {
        use wasmtime_wasi_nn::backend::Id;
        let found = match id {
            Id::Name(n) => self.outputs.iter().find(|t| &t.name == n),
            Id::Index(i) => self.outputs.get(*i as usize),
        };
        found
            .map(|t| t.tensor.clone())
            .ok_or_else(|| NnError::InvalidInput(format!("no output {id:?}; run compute first")))
    }

    /// `compute` either way: with `inputs` (answering the outputs) or with the staged inputs
    /// (keeping the outputs for `get_output`).
    pub(crate) fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
        run: impl FnOnce(Vec<NamedTensor>) -> Result<Vec<NamedTensor>, NnError>,
    ) -> Result<Option<Vec<NamedTensor>>, NnError> {
        // inside the sandbox's span: the request's trace shows the backend's share of it
        let _span = tracing::info_span!("backend").entered();
        match inputs {
            Some(inputs) => Ok(Some(run(inputs)?)),
            None => {
                let inputs = std::mem::take(&mut self.inputs);
                self.outputs = run(inputs)?;
                Ok(None)
            }
        }
    }
}
