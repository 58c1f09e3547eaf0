//! # The DIV guest SDK
//!
//! A DIV plugin is a WebAssembly component (`wasm32-wasip2`) that does a model's pre- and
//! post-processing: it parses inputs, builds tensors, runs the model through `wasi:nn` on a graph
//! the host already holds (the plugin never sees the weights), and shapes the result. The host
//! creates a fresh instance for every request from a snapshot taken after [`Plugin::initialize`],
//! so heavy set-up (parsing a tokenizer) happens once per model, and nothing one caller did is
//! visible to the next.
//!
//! ```ignore
//! use div_plugin::{Plugin, Input, Embeddings, PluginError};
//!
//! struct Echo;
//! impl Plugin for Echo {
//!     fn embed(inputs: Vec<Input>) -> Result<Embeddings, PluginError> {
//!         let graph = div_plugin::nn::Graph::by_name(&div_plugin::model_config().name)?;
//!         // build tensors, graph.compute(...), pool ...
//!         # todo!()
//!     }
//! }
//! div_plugin::export!(Echo);
//! ```
//!
//! What an instance may carry between requests: nothing. What it may carry from `initialize`:
//! anything it computed from the model's assets (the snapshot is shared by every request).
//!
//! Since each instance lives for one request, a plugin may opt into [`request_arena!`], a bump
//! allocator for request-time allocations (see [`arena`]).

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "div:plugin/plugin-world",
        pub_export_macro: true,
        default_bindings_module: "div_plugin::bindings",
        export_macro_name: "__export_world",
        generate_all,
    });
}

pub mod arena;
pub mod llm;
pub mod nn;

pub use bindings::div::plugin::types::{
    Embeddings, Input, Level, ModelConfig, PluginError, Request, Response,
};

/// What a plugin implements. Every entry point has a default that refuses politely, so a plugin
/// implements only the tasks it serves.
pub trait Plugin {
    /// Once per model, before the host snapshots the instance: parse assets, build tables.
    fn initialize() {}

    /// Sentence embeddings (`POST /v1/embeddings`).
    fn embed(inputs: Vec<Input>) -> Result<Embeddings, PluginError> {
        let _ = inputs;
        Err(PluginError::Unsupported("this model does not serve embeddings".to_string()))
    }

    /// Any other route, JSON in and out.
    fn handle(request: Request) -> Result<Response, PluginError> {
        Err(PluginError::Unsupported(format!("no route {}", request.route)))
    }
}

/// The model this instance serves.
pub fn model_config() -> ModelConfig {
    bindings::div::plugin::host::config()
}

/// A read-only asset of the model package (e.g. `tokenizer.json`).
pub fn asset(name: &str) -> Option<Vec<u8>> {
    bindings::div::plugin::host::asset(name)
}

/// Token ids of `texts` under the model's own tokenizer, tokenized natively by the host
/// (special tokens added, each truncated to `max_len`).
pub fn host_tokenize(texts: &[String], max_len: u32) -> Result<Vec<Vec<u32>>, String> {
    bindings::div::plugin::host::tokenize(texts, max_len)
}

/// Hands `delta` to the caller at once (see [`llm`] for the whole generation loop). `Err` means
/// the caller has gone: stop and return; emitting again after that traps.
pub fn emit(delta: &str) -> Result<(), String> {
    bindings::div::plugin::streaming::emit(delta)
}

/// A log line through the host (tagged with the request id and model there).
pub fn log(level: Level, message: &str) {
    bindings::div::plugin::host::log(level, message)
}

impl From<nn::NnError> for PluginError {
    fn from(e: nn::NnError) -> Self {
        PluginError::Backend(e.to_string())
    }
}

/// Exports `$t` (which implements [`Plugin`]) as the component's entry points.
#[macro_export]
macro_rules! export {
    ($t:ty) => {
        const _: () = {
            struct __DivExport;
            impl $crate::bindings::exports::div::plugin::plugin::Guest for __DivExport {
                fn embed(
                    inputs: ::std::vec::Vec<$crate::Input>,
                ) -> ::core::result::Result<$crate::Embeddings, $crate::PluginError> {
                    <$t as $crate::Plugin>::embed(inputs)
                }
                fn handle(
                    request: $crate::Request,
                ) -> ::core::result::Result<$crate::Response, $crate::PluginError> {
                    <$t as $crate::Plugin>::handle(request)
                }
            }
            impl $crate::bindings::Guest for __DivExport {
                fn initialize() {
                    <$t as $crate::Plugin>::initialize();
                    $crate::arena::start_serving();
                }
            }
    $crate::bindings::__export_world!(__DivExport with_types_in $crate::bindings);
        };
    };
}
