//! `manifest.json`, the description every model package carries.

use serde::{Deserialize, Serialize};

/// A model package's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model's name: its id on the API and the name its graph is registered under.
    pub name: String,
    /// What it does (`embeddings`, `chat`, …).
    pub task: String,
    /// The wasi-nn graph encoding (`onnx`, later `ggml`).
    pub encoding: String,
    /// The file holding the graph (weights); never handed to the plugin.
    #[serde(default = "default_graph")]
    pub graph: String,
    /// Output dimensions (embeddings).
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Longest input in tokens.
    #[serde(default = "default_max_seq")]
    pub max_seq_length: u32,
    /// Every file of the package with its plaintext size and SHA-256.
    pub files: Vec<FileEntry>,
    /// The plugin's content id or file name, if the package names one.
    #[serde(default)]
    pub plugin: Option<String>,
    /// Sandbox limits for the plugin (host defaults where absent).
    #[serde(default)]
    pub limits: ManifestLimits,
    /// Dynamic batching below the sandbox (ONNX graphs with attention masks), if the owner turns
    /// it on; the host caps the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<ManifestBatching>,
    /// The owner lets hosts keep this model's answers in a shared result cache (a deterministic
    /// model only: the same input always gives the same answer). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_cache: Option<ManifestCache>,
    /// Settings for the plugin, passed through as `model-config.extra`.
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_graph() -> String {
    "model.onnx".into()
}

fn default_max_seq() -> u32 {
    512
}

/// One file of a package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the package (no directories).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the plaintext.
    pub sha256: String,
}

/// How concurrent requests may share a backend run (see `div_nn::BatchConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBatching {
    /// Most rows one run stacks (the requests' batch entries, summed).
    pub max_batch: u32,
    /// Longest a run waits for sandboxes of the model that are about to compute, in microseconds.
    #[serde(default)]
    pub window_us: u64,
}

/// How long a host may keep an answer of this model in its result cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCache {
    /// Seconds an answer may be served from the cache.
    pub ttl_secs: u64,
}

/// Per-plugin sandbox limits a manifest may set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLimits {
    /// Largest linear memory in MiB.
    pub memory_mib: Option<u32>,
    /// Longest one request may run inside the plugin, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Sandboxes of the plugin that may run at once.
    pub max_instances: Option<u32>,
}
