//! Typed helpers over `wasi:nn`: tensors from Rust slices, a graph by name, and a compute that
//! returns named outputs. Errors carry the backend's message so a plugin can pass it on.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

pub use tensor::TensorType;

/// An error from the host's ML backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnError {
    /// The wasi-nn error code, as text (`invalid-argument`, `not-found`, …).
    pub code: String,
    /// The backend's message.
    pub message: String,
}

impl core::fmt::Display for NnError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<errors::Error> for NnError {
    fn from(e: errors::Error) -> Self {
        NnError { code: format!("{:?}", e.code()), message: e.data() }
    }
}

/// A tensor to send to the backend.
pub struct Tensor(tensor::Tensor);

impl Tensor {
    /// An `i64` tensor of `dims` (row-major).
    pub fn i64(dims: &[u32], values: &[i64]) -> Self {
        Self::raw(dims, TensorType::I64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An `f32` tensor of `dims` (row-major).
    pub fn f32(dims: &[u32], values: &[f32]) -> Self {
        Self::raw(dims, TensorType::Fp32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// A tensor from little-endian bytes of any type.
    pub fn raw(dims: &[u32], ty: TensorType, data: Vec<u8>) -> Self {
        Tensor(tensor::Tensor::new(dims, ty, &data))
    }
}

/// An output tensor copied out of the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Its name in the graph.
    pub name: String,
    /// Its dimensions.
    pub dims: Vec<u32>,
    /// Its element type.
    pub ty: TensorType,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl Output {
    /// The data as `f32`s, if that is the type.
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        if self.ty != TensorType::Fp32 {
            return None;
        }
        Some(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// A graph the host loaded and registered under a name.
pub struct Graph(graph::Graph);

impl Graph {
    /// The graph registered as `name` (for a plugin: its model's name).
    pub fn by_name(name: &str) -> Result<Self, NnError> {
        Ok(Graph(graph::load_by_name(name)?))
    }

    /// Runs the graph on named inputs and returns every output.
    pub fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Output>, NnError> {
        let ctx = self.0.init_execution_context()?;
        let inputs: Vec<inference::NamedTensor> = inputs.into_iter().map(|(n, t)| (n, t.0)).collect();
        let outputs = ctx.compute(inputs)?;
        Ok(outputs
            .into_iter()
            .map(|(name, t)| Output { name, dims: t.dimensions(), ty: t.ty(), data: t.data() })
            .collect())
    }
}

impl Graph {
    /// A stateful execution context: each `compute` continues where the last one left off (a
    /// generation, one token per call).
    pub fn context(&self) -> Result<Context, NnError> {
        Ok(Context(self.0.init_execution_context()?))
    }
}

/// An execution context that keeps its state across `compute` calls.
pub struct Context(inference::GraphExecutionContext);

impl Context {
    /// One `compute` with `inputs` (often none after the first), returning every output.
    pub fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Output>, NnError> {
        let inputs: Vec<inference::NamedTensor> = inputs.into_iter().map(|(n, t)| (n, t.0)).collect();
        let outputs = self.0.compute(inputs)?;
        Ok(outputs
            .into_iter()
            .map(|(name, t)| Output { name, dims: t.dimensions(), ty: t.ty(), data: t.data() })
            .collect())
    }
}
