//! Loading packages into a host and finding them again by name.
//!
//! Names are unique per host: a model from the vault is refused (never swapped in) when another
//! model already serves under its name, so an owner who registers a model with a popular name
//! cannot take over the original's callers; unloading a vault model acts on its `ModelVault` id,
//! so revoking a look-alike never unloads the original.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use div_nn::{BatchConfig, GgmlConfig, GgmlGraph, ModelGraphs, OnnxConfig, OnnxGraph, RunReport};
use div_runtime::{Limits, ModelConfig, ModelContext, Plugin, Runtime};
use sha2::{Digest, Sha256};

use crate::manifest::Manifest;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a package file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// `manifest.json` is not valid.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A file's bytes do not match the manifest.
    #[error("file {name}: {what}")]
    Integrity {
        /// The file.
        name: String,
        /// What did not match.
        what: String,
    },
    /// The manifest names an encoding this host has no backend for.
    #[error("encoding {0:?} is not supported by this host")]
    Encoding(String),
    /// The graph did not load.
    #[error("graph: {0}")]
    Graph(#[from] div_nn::NnError),
    /// The plugin did not load.
    #[error("plugin: {0}")]
    Plugin(#[from] div_runtime::LoadError),
    /// A background task failed.
    #[error("loading task failed: {0}")]
    Task(String),
    /// Another model already serves under this name on this host.
    #[error("the name {name:?} is already served by {holder}; refused (names are unique per host)")]
    NameTaken {
        /// The name.
        name: String,
        /// Who holds it (its origin).
        holder: String,
    },
}

/// A package's manifest and plaintext files, in memory.
pub struct ModelFiles {
    /// The manifest.
    pub manifest: Manifest,
    /// Every file the manifest lists, by name.
    pub files: HashMap<String, Vec<u8>>,
}

fn safe_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

impl ModelFiles {
    /// Reads a package folder: `manifest.json` and every file it lists.
    pub fn read_dir(dir: &Path) -> Result<Self, ModelError> {
        let io = |path: PathBuf| move |source| ModelError::Io { path, source };
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath).map_err(io(mpath.clone()))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| ModelError::Manifest(e.to_string()))?;
        let mut files = HashMap::new();
        for f in &manifest.files {
            if !safe_name(&f.name) {
                return Err(ModelError::Manifest(format!("file name {:?} is not a plain name", f.name)));
            }
            let p = dir.join(&f.name);
            files.insert(f.name.clone(), std::fs::read(&p).map_err(io(p.clone()))?);
        }
        Ok(Self { manifest, files })
    }

    /// Checks every file against the manifest's size and SHA-256, and that the graph is listed.
    pub fn verify(&self) -> Result<(), ModelError> {
        let m = &self.manifest;
        if m.name.is_empty() || !m.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
            return Err(ModelError::Manifest(format!("model name {:?} must be [A-Za-z0-9-_.:]+", m.name)));
        }
        if !m.files.iter().any(|f| f.name == m.graph) {
            return Err(ModelError::Manifest(format!("the graph file {:?} is not listed in files", m.graph)));
        }
        for f in &m.files {
            let bytes = self
                .files
                .get(&f.name)
                .ok_or_else(|| ModelError::Integrity { name: f.name.clone(), what: "missing".into() })?;
            if bytes.len() as u64 != f.size {
                return Err(ModelError::Integrity {
                    name: f.name.clone(),
                    what: format!("{} bytes, manifest says {}", bytes.len(), f.size),
                });
            }
            let got = hex::encode(Sha256::digest(bytes));
            if !got.eq_ignore_ascii_case(&f.sha256) {
                return Err(ModelError::Integrity {
                    name: f.name.clone(),
                    what: format!("SHA-256 {got}, manifest says {}", f.sha256),
                });
            }
        }
        Ok(())
    }
}

/// Where a package came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A plaintext folder on disk.
    Folder(String),
    /// Decrypted from the vault: `ModelVault` id, ciphertext content id and owner.
    Vault {
        /// The `ModelVault` id.
        model_id: [u8; 32],
        /// The ciphertext's content id.
        cid: String,
        /// The model's owner (who registered it).
        owner: [u8; 20],
    },
}

impl Origin {
    /// The `ModelVault` id, for a model from the vault.
    pub fn model_id(&self) -> Option<[u8; 32]> {
        match self {
            Self::Vault { model_id, .. } => Some(*model_id),
            Self::Folder(_) => None,
        }
    }

    /// The owner, for a model from the vault.
    pub fn owner(&self) -> Option<[u8; 20]> {
        match self {
            Self::Vault { owner, .. } => Some(*owner),
            Self::Folder(_) => None,
        }
    }

    /// Whether two origins are the same model (the same vault id, or the same folder).
    fn same_model(&self, other: &Origin) -> bool {
        match (self.model_id(), other.model_id()) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self == other,
            _ => false,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Folder(dir) => write!(f, "folder:{dir}"),
            Self::Vault { model_id, cid, .. } => write!(f, "vault:0x{}@{cid}", hex::encode(model_id)),
        }
    }
}

/// Told of each backend run: the model, and the run's time, requests and queue waits (metrics).
pub type BackendObserver = Arc<dyn Fn(&str, &RunReport) + Send + Sync>;

/// How models are loaded.
#[derive(Clone)]
pub struct LoadOptions {
    /// Told of every backend inference (model name, duration).
    pub backend_observer: Option<BackendObserver>,
    /// Sessions and threads for ONNX graphs.
    pub onnx: OnnxConfig,
    /// Dynamic batching for the ONNX models whose manifest asks for it, with each window capped
    /// at this; `None` runs every request alone.
    pub batch_window_cap: Option<Duration>,
    /// How `ggml` (llama.cpp) graphs make their generation contexts.
    pub ggml: GgmlConfig,
    /// Pre-initialise plugins and snapshot them (wizer).
    pub snapshot: bool,
    /// Limits where a manifest sets none.
    pub default_limits: Limits,
    /// The most any manifest may ask for.
    pub max_limits: Limits,
    /// Plaintext bytes of loaded packages kept at most; past it the least recently used model
    /// is unloaded (`None`: no bound).
    pub capacity_bytes: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            backend_observer: None,
            onnx: OnnxConfig::default(),
            batch_window_cap: Some(Duration::from_millis(20)),
            ggml: GgmlConfig::default(),
            snapshot: true,
            default_limits: Limits::default(),
            max_limits: Limits {
                memory_bytes: 1 << 30,
                deadline: Duration::from_secs(120),
                table_elements: 1_000_000,
                instances: 256,
            },
            capacity_bytes: None,
        }
    }
}

/// A model's graph in the backend its encoding names.
#[derive(Clone)]
pub enum ModelGraph {
    /// ONNX on ONNX Runtime (embeddings and other tensor models).
    Onnx(OnnxGraph),
    /// GGUF on llama.cpp (text generation).
    Ggml(GgmlGraph),
}

impl ModelGraph {
    /// The ONNX graph, if that is the encoding.
    pub fn onnx(&self) -> Option<&OnnxGraph> {
        match self {
            Self::Onnx(g) => Some(g),
            Self::Ggml(_) => None,
        }
    }

    /// The llama.cpp model, if that is the encoding.
    pub fn ggml(&self) -> Option<&GgmlGraph> {
        match self {
            Self::Ggml(g) => Some(g),
            Self::Onnx(_) => None,
        }
    }

    /// The registry a plugin sees: ggml graphs are metered per request (the host bills from
    /// what the backend counts, not from what the plugin says).
    fn registry(&self, name: String) -> ModelGraphs {
        match self {
            Self::Onnx(g) => ModelGraphs::single_onnx(name, g.clone()),
            Self::Ggml(g) => ModelGraphs::single_ggml(name, g.clone()),
        }
    }
}

/// A model a host serves: its manifest, its plugin, and its graph (for direct use by benchmarks).
pub struct LoadedModel {
    /// The manifest it was loaded from.
    pub manifest: Manifest,
    /// The prepared plugin.
    pub plugin: Plugin,
    /// The graph in its backend.
    pub graph: ModelGraph,
    /// Unix time it was loaded (OpenAI's `created`).
    pub created: u64,
    /// Plaintext bytes of its package (what the LRU bound counts).
    pub bytes: u64,
    /// Where it came from.
    pub origin: Origin,
    /// Token ids it takes are below this (from its `tokenizer.json`, or its GGUF vocabulary).
    pub vocab_size: Option<u32>,
    /// SHA-256 over its manifest (which names every file's SHA-256) and its plugin: what a
    /// cached answer is tied to, so new weights or a new plugin never meet an old answer.
    pub fingerprint: [u8; 32],
    last_used: std::sync::atomic::AtomicU64,
}

impl LoadedModel {
    fn touch(&self) {
        static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let t = CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.last_used.store(t, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The models loaded in this host, by name.
pub struct ModelStore {
    runtime: Runtime,
    options: LoadOptions,
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
}

impl ModelStore {
    /// An empty store over `runtime`.
    pub fn new(runtime: Runtime, options: LoadOptions) -> Self {
        Self { runtime, options, models: RwLock::new(HashMap::new()) }
    }

    /// Verifies `files`, loads the graph and the plugin, and serves the model under its name
    /// (replacing an earlier version). Nothing is registered unless every step succeeds.
    pub async fn load(&self, files: ModelFiles, plugin_wasm: &[u8]) -> Result<Arc<LoadedModel>, ModelError> {
        self.load_from(files, plugin_wasm, Origin::Folder(String::new())).await
    }

    /// [`ModelStore::load`] with the package's origin. A package from the vault is private:
    /// nothing derived from its plaintext (the plugin's snapshot and its compiled code) is
    /// cached on disk, and the weights buffer is zeroised once the backend holds the graph.
    pub async fn load_from(
        &self,
        files: ModelFiles,
        plugin_wasm: &[u8],
        origin: Origin,
    ) -> Result<Arc<LoadedModel>, ModelError> {
        files.verify()?;
        let ModelFiles { manifest, mut files } = files;
        if !matches!(manifest.encoding.as_str(), "onnx" | "ggml") {
            return Err(ModelError::Encoding(manifest.encoding.clone()));
        }
        let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
        let weights = zeroize::Zeroizing::new(files.remove(&manifest.graph).unwrap_or_default());
        if let Some(holder) = self.holder_of(&manifest.name)
            && !holder.origin.same_model(&origin)
        {
            return Err(ModelError::NameTaken {
                name: manifest.name.clone(),
                holder: holder.origin.to_string(),
            });
        }
        let graph = if manifest.encoding == "ggml" {
            let ggml = self.options.ggml;
            // the owner may set the chat template; else the GGUF's own is used
            let template = manifest.extra.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
            ModelGraph::Ggml(
                tokio::task::spawn_blocking(move || GgmlGraph::load(&weights, ggml, template))
                    .await
                    .map_err(|e| ModelError::Task(e.to_string()))??,
            )
        } else {
            let onnx = self.options.onnx;
            let batching = self.batching_for(&manifest);
            let mut graph =
                tokio::task::spawn_blocking(move || OnnxGraph::load_batched(&weights, onnx, batching))
                    .await
                    .map_err(|e| ModelError::Task(e.to_string()))??;
            if let Some(observe) = self.options.backend_observer.clone() {
                let name = manifest.name.clone();
                graph = graph.with_observer(Arc::new(move |r| observe(&name, r)));
            }
            ModelGraph::Onnx(graph)
        };
        let limits = self.limits_for(&manifest);
        let tokenizer = match files.get("tokenizer.json") {
            Some(bytes) => {
                let bytes = bytes.clone();
                let max = manifest.max_seq_length as usize;
                let tok = tokio::task::spawn_blocking(move || {
                    let mut t = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())?;
                    // as the plugin does: no padding (every id is a real token), and truncation to
                    // the model's length that keeps the special tokens
                    t.with_padding(None);
                    t.with_truncation(Some(tokenizers::TruncationParams {
                        max_length: max,
                        ..Default::default()
                    }))
                    .map_err(|e| e.to_string())?;
                    Ok::<_, String>(t)
                })
                .await
                .map_err(|e| ModelError::Task(e.to_string()))?
                .map_err(|e| ModelError::Manifest(format!("tokenizer.json: {e}")))?;
                Some(Arc::new(tok))
            }
            None => None,
        };
        let context = Arc::new(ModelContext {
            config: ModelConfig {
                name: manifest.name.clone(),
                task: manifest.task.clone(),
                max_seq_len: manifest.max_seq_length,
                extra: serde_json::Value::Object(manifest.extra.clone()).to_string(),
            },
            assets: files.into_iter().map(|(k, v)| (k, Arc::<[u8]>::from(v))).collect(),
            graphs: graph.registry(manifest.name.clone()),
            tokenizer,
        });
        let vocab_size = match &graph {
            ModelGraph::Ggml(g) => Some(g.vocab_size()),
            ModelGraph::Onnx(_) => {
                context.tokenizer.as_ref().map(|t| u32::try_from(t.get_vocab_size(true)).unwrap_or(u32::MAX))
            }
        };
        let fingerprint: [u8; 32] = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(serde_json::to_vec(&manifest).unwrap_or_default());
            h.update(plugin_wasm);
            h.finalize().into()
        };
        let persist = matches!(origin, Origin::Folder(_));
        let plugin = self
            .runtime
            .load_plugin_with(plugin_wasm, context, limits, self.options.snapshot, persist)
            .await?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        tracing::info!(
            model = %manifest.name,
            snapshot = plugin.snapshotted(),
            load_ms = plugin.load_time().as_millis() as u64,
            "model loaded"
        );
        let model = Arc::new(LoadedModel {
            manifest,
            plugin,
            graph,
            created,
            bytes,
            origin,
            vocab_size,
            fingerprint,
            last_used: Default::default(),
        });
        model.touch();
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        // checked again under the lock: another load of the same name may have won meanwhile
        if let Some(holder) = models.get(&model.manifest.name)
            && !holder.origin.same_model(&model.origin)
        {
            return Err(ModelError::NameTaken {
                name: model.manifest.name.clone(),
                holder: holder.origin.to_string(),
            });
        }
        models.insert(model.manifest.name.clone(), model.clone());
        if let Some(cap) = self.options.capacity_bytes {
            // least recently used first; the model just loaded stays even if it alone is larger
            while models.values().map(|m| m.bytes).sum::<u64>() > cap {
                let victim = models
                    .values()
                    .filter(|m| !Arc::ptr_eq(m, &model))
                    .min_by_key(|m| m.last_used.load(std::sync::atomic::Ordering::Relaxed))
                    .map(|m| m.manifest.name.clone());
                let Some(victim) = victim else { break };
                tracing::info!(model = %victim, "unloaded: least recently used past the byte bound");
                models.remove(&victim);
            }
        }
        Ok(model)
    }

    /// The manifest's batching within the host's bounds (at most 256 rows a run).
    fn batching_for(&self, m: &Manifest) -> BatchConfig {
        match (m.batching, self.options.batch_window_cap) {
            (Some(b), Some(cap)) if b.max_batch > 1 => BatchConfig {
                max_batch: (b.max_batch as usize).min(256),
                window: Duration::from_micros(b.window_us).min(cap),
            },
            _ => BatchConfig::OFF,
        }
    }

    fn limits_for(&self, m: &Manifest) -> Limits {
        let d = self.options.default_limits;
        let max = self.options.max_limits;
        Limits {
            memory_bytes: m
                .limits
                .memory_mib
                .map(|mib| (mib as usize) << 20)
                .unwrap_or(d.memory_bytes)
                .min(max.memory_bytes),
            deadline: m.limits.deadline_ms.map(Duration::from_millis).unwrap_or(d.deadline).min(max.deadline),
            table_elements: d.table_elements,
            instances: m.limits.max_instances.unwrap_or(d.instances).min(max.instances),
        }
    }

    /// The model holding `name`, without touching its LRU position.
    pub fn get_untouched(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.holder_of(name)
    }

    fn holder_of(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The model from the vault with `ModelVault` id `model_id`, if loaded.
    pub fn by_id(&self, model_id: [u8; 32]) -> Option<Arc<LoadedModel>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|m| m.origin.model_id() == Some(model_id))
            .cloned()
    }

    /// The model served under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let m = self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned();
        if let Some(m) = &m {
            m.touch();
        }
        m
    }

    /// Every model served, by name.
    pub fn list(&self) -> Vec<Arc<LoadedModel>> {
        let mut v: Vec<_> = self.models.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        v
    }

    /// Stops serving `name`; in-flight requests finish on their own reference.
    pub fn unload(&self, name: &str) -> bool {
        self.models.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some()
    }

    /// Stops serving the vault model `model_id` (and nothing else, whatever its name).
    pub fn unload_id(&self, model_id: [u8; 32]) -> bool {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let name = models.iter().find(|(_, m)| m.origin.model_id() == Some(model_id)).map(|(n, _)| n.clone());
        name.is_some_and(|n| models.remove(&n).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{FileEntry, ManifestLimits};

    fn files(graph_bytes: &[u8], listed_sha: Option<&str>) -> ModelFiles {
        let sha = listed_sha.map(str::to_string).unwrap_or_else(|| hex::encode(Sha256::digest(graph_bytes)));
        ModelFiles {
            manifest: Manifest {
                name: "m-1".into(),
                task: "embeddings".into(),
                encoding: "onnx".into(),
                graph: "model.onnx".into(),
                dimensions: None,
                max_seq_length: 8,
                files: vec![FileEntry {
                    name: "model.onnx".into(),
                    size: graph_bytes.len() as u64,
                    sha256: sha,
                }],
                plugin: None,
                limits: ManifestLimits::default(),
                batching: None,
                result_cache: None,
                extra: Default::default(),
            },
            files: [("model.onnx".to_string(), graph_bytes.to_vec())].into_iter().collect(),
        }
    }

    #[test]
    fn intact_files_verify() {
        assert!(files(b"graph", None).verify().is_ok());
    }

    #[test]
    fn a_changed_byte_or_size_is_refused_before_loading() {
        let mut f = files(b"graph", None);
        if let Some(b) = f.files.get_mut("model.onnx") {
            b[0] ^= 1;
        }
        assert!(matches!(f.verify(), Err(ModelError::Integrity { .. })));
        let mut f = files(b"graph", None);
        f.files.insert("model.onnx".into(), b"graph!".to_vec());
        let e = f.verify().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("6 bytes, manifest says 5"), "{e}");
    }

    #[test]
    fn bad_names_and_a_missing_graph_are_manifest_errors() {
        let mut f = files(b"g", None);
        f.manifest.name = "../etc".into();
        assert!(matches!(f.verify(), Err(ModelError::Manifest(_))));
        let mut f = files(b"g", None);
        f.manifest.graph = "weights.bin".into();
        assert!(matches!(f.verify(), Err(ModelError::Manifest(_))));
        assert!(!safe_name("../x") && !safe_name("a/b") && safe_name("tokenizer.json"));
    }
}
