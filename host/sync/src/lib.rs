//! Keeps a host's models in step with `ModelVault`.
//!
//! At start the host reads every registered model and loads those it is authorised for; then it
//! follows the vault's events (host authorised or revoked, model activated or paused, content or
//! custodians changed) and reconciles each model they touch: load it when this host is authorised
//! and the model is active, unload it otherwise.
//!
//! Loading an encrypted model is the vault's serve path, in order, each step checked before the
//! next: fetch the ciphertext by content id (the store verifies the id) → read its header and
//! check it names this model and the on-chain threshold → collect `t` shares from the model's
//! custodians in parallel, each verified against the header's commitments → decrypt across all
//! cores → unpack → verify every file's SHA-256 → load into the backend and the sandbox. The key
//! and the plaintext buffers are zeroised when dropped; nothing plaintext touches the disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use div_chain::bindings::ModelVault;
use div_custodian::{Endpoint, collect_key, fetch_info};
use div_models::{LoadedModel, Manifest, ModelFiles, ModelStore, Origin};
use div_vault::{ContentId, Header, Store};

/// Why a model could not be loaded from the vault.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reading the chain failed.
    #[error("reading ModelVault: {0}")]
    Chain(String),
    /// Fetching or decrypting failed.
    #[error(transparent)]
    Vault(#[from] div_vault::VaultError),
    /// Too few custodians gave valid shares.
    #[error(transparent)]
    Keys(#[from] div_custodian::CustodianError),
    /// The package does not match what the chain says.
    #[error("model {model}: {what}")]
    Mismatch {
        /// The model id.
        model: B256,
        /// What did not match.
        what: String,
    },
    /// The decrypted package did not load.
    #[error(transparent)]
    Load(#[from] div_models::ModelError),
}

/// Told of each custodian failure while collecting a key (custodian, reason).
pub type CustodianObserver = Arc<dyn Fn(Address, &str) + Send + Sync>;

/// How the host reaches the vault.
pub struct SyncConfig {
    /// The chain.
    pub provider: DynProvider,
    /// `ModelVault`'s address.
    pub model_vault: Address,
    /// Where ciphertexts and plugins are stored.
    pub store: Store,
    /// Custodian base URLs (their addresses are read from `/v1/info`).
    pub custodians: Vec<String>,
    /// The host's Ethereum key (what the owner authorised).
    pub signer: PrivateKeySigner,
    /// How long to wait for one custodian.
    pub share_timeout: Duration,
    /// How often to read new vault events.
    pub poll: Duration,
    /// Told of custodian failures (metrics).
    pub on_custodian_failure: Option<CustodianObserver>,
}

/// How long each step of a load took (also logged).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    /// Fetching and verifying the ciphertext.
    pub fetch: Duration,
    /// Collecting and combining shares.
    pub keys: Duration,
    /// Decrypting and unpacking.
    pub decrypt: Duration,
    /// Loading into the backend and the sandbox (hashes, graph, plugin).
    pub load: Duration,
}

impl LoadTimings {
    /// The whole cold start.
    pub fn total(&self) -> Duration {
        self.fetch + self.keys + self.decrypt + self.load
    }
}

/// A host's view of the vault.
pub struct VaultSync {
    config: SyncConfig,
    vault: ModelVault::ModelVaultInstance<DynProvider>,
    http: reqwest::Client,
    models: Arc<ModelStore>,
    directory: tokio::sync::Mutex<HashMap<Address, String>>,
    loaded: Mutex<HashMap<B256, (String, String)>>,
    loading: Mutex<std::collections::HashSet<B256>>,
}

impl VaultSync {
    /// A sync for `models`; custodian addresses are resolved lazily.
    pub fn new(config: SyncConfig, models: Arc<ModelStore>) -> Self {
        let vault = ModelVault::new(config.model_vault, config.provider.clone());
        let http = reqwest::Client::builder().timeout(config.share_timeout).build().unwrap_or_default();
        Self {
            config,
            vault,
            http,
            models,
            directory: tokio::sync::Mutex::new(HashMap::new()),
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Starts loading the authorised model served as `name` if the store no longer holds it
    /// (the byte-bounded cache unloaded it); true if this host knows the name. Loads at most once
    /// at a time per model; the caller answers "loading, retry".
    pub fn request_load(self: &Arc<Self>, name: &str) -> bool {
        let id = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find_map(|(id, (n, _))| (n == name).then_some(*id));
        let Some(id) = id else { return false };
        if !self.loading.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return true;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.reconcile(id).await {
                tracing::error!(id = %id, "reloading the model failed: {e}");
            }
            this.loading.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
        true
    }

    /// This host's address.
    pub fn host(&self) -> Address {
        self.config.signer.address()
    }

    /// Maps the model's custodian addresses to endpoints, asking custodians not yet known who
    /// they are. An address with no reachable URL keeps an empty URL and fails like a down
    /// custodian.
    async fn endpoints(&self, addresses: &[Address]) -> Vec<Endpoint> {
        let mut dir = self.directory.lock().await;
        if addresses.iter().any(|a| !dir.contains_key(a)) {
            let known: Vec<String> = dir.values().cloned().collect();
            for url in self.config.custodians.iter().filter(|u| !known.contains(u)) {
                match fetch_info(&self.http, url).await {
                    Ok((address, _)) => {
                        dir.insert(address, url.clone());
                    }
                    Err(e) => tracing::warn!(custodian = %url, "custodian not reachable: {e}"),
                }
            }
        }
        addresses
            .iter()
            .map(|a| Endpoint { address: *a, url: dir.get(a).cloned().unwrap_or_default() })
            .collect()
    }

    /// Fetches, decrypts and checks model `id`; returns its files and its plugin.
    pub async fn fetch(&self, id: B256) -> Result<(ModelFiles, Vec<u8>, LoadTimings, String), SyncError> {
        let mut t = LoadTimings::default();
        let started = Instant::now();
        let m = self
            .vault
            .getModel(id)
            .call()
            .await
            .map_err(|e| SyncError::Chain(div_chain::revert_reason(&e)))?;
        let mismatch = |what: String| SyncError::Mismatch { model: id, what };
        let cid: ContentId = m.cid.parse()?;
        let ciphertext = self.config.store.get(&cid).await?;
        let (header, _) = Header::decode(&ciphertext)?;
        if B256::from(header.model_id) != id {
            return Err(mismatch(format!("the ciphertext is for {:#x}", B256::from(header.model_id))));
        }
        if header.threshold != m.threshold {
            return Err(mismatch(format!(
                "the ciphertext needs {} shares, ModelVault says {}",
                header.threshold, m.threshold
            )));
        }
        let plugin = if m.pluginCid.is_empty() {
            return Err(mismatch("no plugin registered".into()));
        } else {
            self.config.store.get(&m.pluginCid.parse()?).await?
        };
        t.fetch = started.elapsed();

        let started = Instant::now();
        let endpoints = self.endpoints(&m.custodians).await;
        let collected =
            collect_key(&self.http, &endpoints, &header, &self.config.signer, self.config.share_timeout)
                .await;
        let collected = match collected {
            Ok(c) => c,
            Err(e) => {
                if let div_custodian::CustodianError::NotEnoughShares { failures, .. } = &e {
                    self.report(failures);
                }
                return Err(e.into());
            }
        };
        self.report(&collected.failures);
        t.keys = started.elapsed();

        let started = Instant::now();
        let key = collected.key;
        let files = tokio::task::spawn_blocking(move || -> Result<ModelFiles, SyncError> {
            let plain = div_vault::format::decrypt_owned(&key, &header.model_id, ciphertext)?;
            let (manifest, files) = div_vault::package::unpack(&plain)?;
            let manifest: Manifest = serde_json::from_slice(manifest)
                .map_err(|e| SyncError::Mismatch { model: id, what: format!("manifest.json: {e}") })?;
            let files = files.into_iter().map(|(f, bytes)| (f.name, bytes.to_vec())).collect();
            Ok(ModelFiles { manifest, files })
        })
        .await
        .map_err(|e| mismatch(format!("decrypt task: {e}")))??;
        t.decrypt = started.elapsed();
        if files.manifest.name != m.name {
            return Err(mismatch(format!(
                "the package is {:?}, ModelVault says {:?}",
                files.manifest.name, m.name
            )));
        }
        Ok((files, plugin, t, m.cid))
    }

    fn report(&self, failures: &[(Address, String)]) {
        for (custodian, why) in failures {
            tracing::warn!(custodian = %custodian, "custodian failed: {why}");
            if let Some(observe) = &self.config.on_custodian_failure {
                observe(*custodian, why);
            }
        }
    }

    /// Fetches model `id` and serves it.
    pub async fn load(&self, id: B256) -> Result<(Arc<LoadedModel>, LoadTimings), SyncError> {
        let (files, plugin, mut t, cid) = self.fetch(id).await?;
        let started = Instant::now();
        let origin = Origin::Vault { model_id: id.0, cid: cid.clone() };
        // snapshotting runs the plugin's `initialize` and compiling takes seconds of CPU: both
        // run on a blocking thread so the host's request workers are never held up by a load
        let models = self.models.clone();
        let handle = tokio::runtime::Handle::current();
        let model =
            tokio::task::spawn_blocking(move || handle.block_on(models.load_from(files, &plugin, origin)))
                .await
                .map_err(|e| SyncError::Mismatch { model: id, what: format!("load task: {e}") })??;
        t.load = started.elapsed();
        tracing::info!(
            model = %model.manifest.name, id = %id, cid,
            fetch_ms = t.fetch.as_millis() as u64, keys_ms = t.keys.as_millis() as u64,
            decrypt_ms = t.decrypt.as_millis() as u64, load_ms = t.load.as_millis() as u64,
            "encrypted model loaded"
        );
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (model.manifest.name.clone(), cid));
        Ok((model, t))
    }

    /// Loads or unloads model `id` to match the chain.
    pub async fn reconcile(&self, id: B256) -> Result<(), SyncError> {
        let chain = |e: alloy::contract::Error| SyncError::Chain(div_chain::revert_reason(&e));
        let m = self.vault.getModel(id).call().await.map_err(chain)?;
        let wanted = m.active && self.vault.isHostAuthorized(id, self.host()).call().await.map_err(chain)?;
        let current = self.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
        match (wanted, current) {
            (true, Some((name, cid))) if cid == m.cid && self.models.get(&name).is_some() => Ok(()),
            (true, _) => self.load(id).await.map(|_| ()),
            (false, Some((name, _))) => {
                self.models.unload(&name);
                self.loaded.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                tracing::info!(model = %name, id = %id, "unloaded: no longer authorised or not active");
                Ok(())
            }
            (false, None) => Ok(()),
        }
    }

    /// Reconciles every registered model; returns the block it read up to.
    pub async fn initial_sync(&self) -> Result<u64, SyncError> {
        let chain = |e: alloy::contract::Error| SyncError::Chain(div_chain::revert_reason(&e));
        let block =
            self.config.provider.get_block_number().await.map_err(|e| SyncError::Chain(e.to_string()))?;
        let count = self.vault.modelCount().call().await.map_err(chain)?;
        for i in 0..count.saturating_to::<u64>() {
            let id = self.vault.modelIdAt(alloy::primitives::U256::from(i)).call().await.map_err(chain)?;
            if let Err(e) = self.reconcile(id).await {
                tracing::error!(id = %id, "model not loaded: {e}");
            }
        }
        Ok(block)
    }

    /// Follows vault events from block `from` until `shutdown` resolves.
    pub async fn follow(&self, mut from: u64, shutdown: impl std::future::Future<Output = ()>) {
        let events = [
            ModelVault::HostAuthorized::SIGNATURE_HASH,
            ModelVault::HostRevoked::SIGNATURE_HASH,
            ModelVault::ModelActiveSet::SIGNATURE_HASH,
            ModelVault::ModelContentUpdated::SIGNATURE_HASH,
            ModelVault::ModelCustodiansUpdated::SIGNATURE_HASH,
        ];
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
            let latest = match self.config.provider.get_block_number().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("chain not reachable: {e}; keeping the models loaded");
                    continue;
                }
            };
            if latest <= from {
                continue;
            }
            let filter = Filter::new()
                .address(self.config.model_vault)
                .event_signature(events.to_vec())
                .from_block(from + 1)
                .to_block(latest);
            let logs = match self.config.provider.get_logs(&filter).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("reading vault events: {e}");
                    continue;
                }
            };
            let mut touched: Vec<B256> = Vec::new();
            for log in &logs {
                if let Some(id) = log.topics().get(1)
                    && !touched.contains(id)
                {
                    touched.push(*id);
                }
            }
            for id in touched {
                if let Err(e) = self.reconcile(id).await {
                    tracing::error!(id = %id, "reconciling the model failed: {e}");
                }
            }
            from = latest;
        }
    }
}
