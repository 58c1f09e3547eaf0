//! A per-model view of the loaded graphs for `wasi:nn` `load-by-name`.
//!
//! Each request's sandbox gets a registry that holds only its own model's graphs, so a plugin can
//! never name, and so never run, another owner's model. A graph whose backend measures usage for
//! billing (text generation) is bound to the request's [`RequestUsage`] when the registry is
//! made; the others are shared as they are. Building one is a map lookup and an `Arc` clone, or
//! a small map for a metered graph: cheap enough for every request.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime_wasi_nn::{Graph, GraphRegistry};

use crate::{GgmlGraph, OnnxGraph, RequestUsage};

#[derive(Clone)]
enum Entry {
    Shared(Graph),
    Ggml(GgmlGraph),
    /// A batched ONNX graph: each request's copy tells the batch queue a sandbox is on its way.
    Onnx(OnnxGraph),
}

/// The graphs one model exposes to its plugin, by name.
#[derive(Clone, Default)]
pub struct ModelGraphs {
    entries: Arc<HashMap<String, Entry>>,
    shared: Arc<HashMap<String, Graph>>,
}

impl ModelGraphs {
    /// A registry with one graph under `name`.
    pub fn single(name: impl Into<String>, graph: Graph) -> Self {
        let name = name.into();
        let mut entries = HashMap::new();
        entries.insert(name.clone(), Entry::Shared(graph.clone()));
        let mut shared = HashMap::new();
        shared.insert(name, graph);
        Self { entries: Arc::new(entries), shared: Arc::new(shared) }
    }

    /// A registry with one ONNX graph under `name`; a batched one is bound to each request, so
    /// its batch queue knows which sandboxes are still to compute.
    pub fn single_onnx(name: impl Into<String>, graph: OnnxGraph) -> Self {
        if !graph.batching().is_on() {
            return Self::single(name, graph.into_wasi_nn());
        }
        let mut entries = HashMap::new();
        entries.insert(name.into(), Entry::Onnx(graph));
        Self { entries: Arc::new(entries), shared: Arc::default() }
    }

    /// A registry with one text-generation graph under `name`, metered per request.
    pub fn single_ggml(name: impl Into<String>, graph: GgmlGraph) -> Self {
        let mut entries = HashMap::new();
        entries.insert(name.into(), Entry::Ggml(graph));
        Self { entries: Arc::new(entries), shared: Arc::default() }
    }

    /// The registry one request's sandbox sees, with metered graphs bound to `usage`.
    pub fn for_request(&self, usage: &Arc<RequestUsage>) -> Self {
        if self.entries.values().all(|e| matches!(e, Entry::Shared(_))) {
            return self.clone();
        }
        let shared = self
            .entries
            .iter()
            .map(|(name, e)| {
                let g = match e {
                    Entry::Shared(g) => g.clone(),
                    Entry::Ggml(g) => g.clone().into_wasi_nn_metered(usage.clone()),
                    Entry::Onnx(g) => g.for_request().into_wasi_nn(),
                };
                (name.clone(), g)
            })
            .collect();
        Self { entries: self.entries.clone(), shared: Arc::new(shared) }
    }
}

impl GraphRegistry for ModelGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.shared.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        // graphs are shared between requests and never mutated through the registry
        Arc::get_mut(&mut self.shared).and_then(|m| m.get_mut(name))
    }
}
