//! Host bindings for the `div:plugin` world, generated from `wit/`. `wasi:nn` is linked from
//! wasmtime-wasi-nn (our world only re-declares its imports), so only the `div:plugin/host`
//! interface is implemented here, in [`crate::state`].

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    world: "div:plugin/plugin-world",
    path: "../../wit",
    // emitting after the caller has gone traps the plugin (see `state.rs`)
    imports: { "div:plugin/streaming.emit": trappable },
});

pub use div::plugin::types::{Embeddings, Input, Level, ModelConfig, PluginError, Request, Response};
