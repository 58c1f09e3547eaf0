//! The DIV plugin runtime: where a plugin gets its instance.
//!
//! A model owner's plugin is untrusted code. It runs in a wasmtime sandbox with no filesystem,
//! no network, no environment and a wall clock stopped at the epoch; it reaches the model only
//! through `wasi:nn` on a graph the host loaded and registered under the model's name, and it
//! reaches the host only through the small `div:plugin/host` interface (log, config, assets).
//! Every request gets a fresh instance from a snapshot taken after the plugin's `initialize`,
//! bounded in memory and time, and dropped afterwards: nothing one caller did is visible to the
//! next. See [`Runtime`] for how, and [`state`] for what a sandbox holds.

pub mod bindings;
mod error;
pub mod fair;
mod runtime;
pub mod state;

pub use bindings::{Embeddings, Input, Level, ModelConfig, PluginError, Request, Response};
pub use error::{InvokeError, LoadError, clip};
pub use runtime::{CallReport, Plugin, Runtime, RuntimeConfig};
pub use state::{Limits, ModelContext, StreamSink};
