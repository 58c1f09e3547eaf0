//! The model store: what a model package is and how a host turns one into something it serves.
//!
//! A package is a folder (or, once the vault decrypts it, the same files in memory) with a
//! `manifest.json` naming the model, its task, its wasi-nn encoding, its graph file, its limits and
//! every file's size and plaintext SHA-256. Loading checks every hash before anything reaches the
//! backend, loads the graph into the backend under the model's name, hands the other files to the
//! plugin as read-only assets, and prepares the plugin (snapshot, compile, link). The weights
//! never become an asset: a plugin reaches them only through `wasi:nn`.

mod manifest;
mod store;

pub use manifest::{FileEntry, Manifest, ManifestBatching, ManifestCache, ManifestLimits};
pub use store::{
    BackendObserver, LoadOptions, LoadedModel, ModelError, ModelFiles, ModelGraph, ModelStore, Origin,
};
