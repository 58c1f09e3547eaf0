//! A per-model view of the loaded graphs for `wasi:nn` `load-by-name`.
//!
//! Each request's sandbox gets a registry that holds only its own model's graphs, so a plugin can
//! never name, and so never run, another owner's model. Building one is a map lookup and an
//! `Arc` clone: cheap enough for every request.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime_wasi_nn::{Graph, GraphRegistry};

/// The graphs one model exposes to its plugin, by name.
#[derive(Clone, Default)]
pub struct ModelGraphs(Arc<HashMap<String, Graph>>);

impl ModelGraphs {
    /// A registry with one graph under `name`.
    pub fn single(name: impl Into<String>, graph: Graph) -> Self {
        let mut map = HashMap::new();
        map.insert(name.into(), graph);
        Self(Arc::new(map))
    }
}

impl GraphRegistry for ModelGraphs {
    fn get(&self, name: &str) -> Option<&Graph> {
        self.0.get(name)
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Graph> {
        // graphs are shared between requests and never mutated through the registry
        Arc::get_mut(&mut self.0).and_then(|m| m.get_mut(name))
    }
}
