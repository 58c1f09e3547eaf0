//! Keeps a host's models in step with `ModelVault`, and says truthfully where each one stands.
//!
//! **What a host serves** is its operator's choice, not the chain's: the operator names the
//! owners (and/or model ids) it serves ([`Allow`]); a model is served when its owner authorised
//! this host on-chain, the model is active, *and* the operator allows it. Anyone can register a
//! model and authorise any host; without the allow-list that would let a stranger put models
//! (and names) on a host that never agreed.
//!
//! **Following the chain.** At start the host lists every registered model and reconciles each
//! (in the background: the API listens at once and answers `503 model_loading` for a model that
//! is still on its way); then it follows the vault's events (host authorised or revoked, model
//! activated or paused, content or custodians changed) and reconciles each model they touch. All
//! bookkeeping is by `ModelVault` id; names are unique per host, and a model whose name another
//! model already holds is refused and logged, never swapped in.
//!
//! **Faults heal by themselves.** A load that fails (custodians down, storage unreachable, a
//! damaged ciphertext) is retried with a backoff that doubles up to [`MAX_BACKOFF`]; callers of
//! the model get `503 model_loading` with `Retry-After` meanwhile, and [`VaultSync::readiness`]
//! reports each model's state and last error for the readiness endpoint.
//!
//! **Loading** an encrypted model is the vault's serve path, in order, each step checked before
//! the next: fetch the ciphertext by content id (the store verifies the id) → read its header and
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

/// Longest wait between two attempts to load a model that failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

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

/// Which models this host's operator chose to serve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    /// Every model of these owners.
    pub owners: Vec<Address>,
    /// These models, whoever owns them.
    pub models: Vec<B256>,
    /// Every model authorised for this host (an operator who trusts every owner).
    pub any: bool,
}

impl Allow {
    /// Whether model `id` of `owner` may be served.
    pub fn allows(&self, id: B256, owner: Address) -> bool {
        self.any || self.owners.contains(&owner) || self.models.contains(&id)
    }

    /// Whether anything at all is allowed.
    pub fn is_empty(&self) -> bool {
        !self.any && self.owners.is_empty() && self.models.is_empty()
    }
}

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
    /// The models the operator serves.
    pub allow: Allow,
    /// First wait before retrying a failed load (doubles each time up to [`MAX_BACKOFF`]).
    pub retry_base: Duration,
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

/// Where a model this host should serve stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Being fetched, decrypted and loaded.
    Loading,
    /// Serving.
    Ready,
    /// The last attempt failed; the next one is at `retry_at`.
    Failed {
        /// Why.
        error: String,
        /// Attempts so far.
        attempts: u32,
        /// When the next attempt starts.
        retry_at: Instant,
    },
    /// Loaded before, unloaded by the byte-bounded cache; loads again on demand.
    Evicted,
}

struct Entry {
    name: Option<String>,
    cid: String,
    state: State,
}

/// One model's readiness, for the readiness endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Its `ModelVault` id.
    pub model_id: B256,
    /// Its name, once known.
    pub name: Option<String>,
    /// `ready`, `loading`, `failed` or `evicted`.
    pub state: &'static str,
    /// The last error, when it failed.
    pub error: Option<String>,
    /// Seconds to the next attempt, when it failed.
    pub retry_in_secs: Option<u64>,
}

/// A host's view of the vault.
pub struct VaultSync {
    config: SyncConfig,
    vault: ModelVault::ModelVaultInstance<DynProvider>,
    http: reqwest::Client,
    models: Arc<ModelStore>,
    directory: tokio::sync::Mutex<HashMap<Address, String>>,
    entries: Mutex<HashMap<B256, Entry>>,
    /// Models a reconcile is working on (a second one for the same model waits its turn out).
    in_progress: Mutex<std::collections::HashSet<B256>>,
    /// Loads run one at a time (each takes every core to decrypt and compile).
    load_lock: tokio::sync::Mutex<()>,
    initial_done: std::sync::atomic::AtomicBool,
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
            entries: Mutex::new(HashMap::new()),
            in_progress: Mutex::new(std::collections::HashSet::new()),
            load_lock: tokio::sync::Mutex::new(()),
            initial_done: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<B256, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This host's address.
    pub fn host(&self) -> Address {
        self.config.signer.address()
    }

    /// Whether the first pass over the vault has finished (every model it found has been
    /// tried once).
    pub fn initial_sync_done(&self) -> bool {
        self.initial_done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A model this host serves under `name` that the store does not hold now: starts loading
    /// it when it is not already on its way, and says how many seconds to tell the caller to
    /// wait. `None`: this host does not serve that name.
    pub fn wanted(self: &Arc<Self>, name: &str) -> Option<u32> {
        let (id, state) = {
            let g = self.entries();
            let (id, e) = g.iter().find(|(_, e)| e.name.as_deref() == Some(name))?;
            (*id, e.state.clone())
        };
        match state {
            State::Loading => Some(5),
            State::Failed { retry_at, .. } => Some(
                u32::try_from(retry_at.saturating_duration_since(Instant::now()).as_secs())
                    .unwrap_or(300)
                    .max(1),
            ),
            State::Ready | State::Evicted => {
                // the cache unloaded it: load it again
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.reconcile(id).await {
                        tracing::error!(id = %id, "reloading the model failed: {e}");
                    }
                });
                Some(5)
            }
        }
    }

    /// Every model this host should serve and where it stands.
    pub fn readiness(&self) -> Vec<Readiness> {
        let g = self.entries();
        let mut v: Vec<Readiness> = g
            .iter()
            .map(|(id, e)| {
                let (state, error, retry_in_secs) = match &e.state {
                    State::Loading => ("loading", None, None),
                    State::Ready
                        if e.name.as_deref().is_some_and(|n| self.models.get_untouched(n).is_some()) =>
                    {
                        ("ready", None, None)
                    }
                    State::Ready | State::Evicted => ("evicted", None, None),
                    State::Failed { error, retry_at, .. } => (
                        "failed",
                        Some(error.clone()),
                        Some(retry_at.saturating_duration_since(Instant::now()).as_secs()),
                    ),
                };
                Readiness { model_id: *id, name: e.name.clone(), state, error, retry_in_secs }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.model_id.cmp(&b.model_id)));
        v
    }

    fn set_state(&self, id: B256, state: State) {
        if let Some(e) = self.entries().get_mut(&id) {
            e.state = state;
        }
    }

    /// Maps the model's custodian addresses to endpoints, asking custodians not yet known who
    /// they are. An address with no reachable URL fails like a down custodian, and says so.
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
        self.fetch_owned(id).await.map(|(f, p, t, c, _)| (f, p, t, c))
    }

    async fn fetch_owned(
        &self,
        id: B256,
    ) -> Result<(ModelFiles, Vec<u8>, LoadTimings, String, Address), SyncError> {
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
        // a header that does not parse is the ciphertext's fault, found before any custodian is
        // asked (so no custodian is blamed for it)
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
        Ok((files, plugin, t, m.cid, m.owner))
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
        let _one_at_a_time = self.load_lock.lock().await;
        let (files, plugin, mut t, cid, owner) = self.fetch_owned(id).await?;
        let started = Instant::now();
        let origin = Origin::Vault { model_id: id.0, cid: cid.clone(), owner: owner.0.0 };
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
        Ok((model, t))
    }

    /// Loads or unloads model `id` to match the chain and the operator's choice. A failed load
    /// is recorded with its retry time; [`VaultSync::retry_failed`] tries it again then.
    pub async fn reconcile(&self, id: B256) -> Result<(), SyncError> {
        struct Working<'a>(&'a Mutex<std::collections::HashSet<B256>>, B256);
        impl Drop for Working<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
            }
        }
        if !self.in_progress.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return Ok(());
        }
        let _working = Working(&self.in_progress, id);
        let chain = |e: alloy::contract::Error| SyncError::Chain(div_chain::revert_reason(&e));
        let m = self.vault.getModel(id).call().await.map_err(chain)?;
        let authorised =
            m.active && self.vault.isHostAuthorized(id, self.host()).call().await.map_err(chain)?;
        let allowed = self.config.allow.allows(id, m.owner);
        if authorised && !allowed {
            tracing::info!(
                id = %id, owner = %m.owner, name = %m.name,
                "authorised on-chain for this host, but its owner and id are not in this host's allow-list; not served"
            );
        }
        let wanted = authorised && allowed;
        let current = self.entries().get(&id).map(|e| (e.cid.clone(), e.state.clone()));
        if !wanted {
            self.entries().remove(&id);
            if self.models.unload_id(id.0) {
                tracing::info!(model = %m.name, id = %id, "unloaded: no longer authorised, active or allowed");
            }
            return Ok(());
        }
        if let Some((cid, State::Ready)) = &current
            && *cid == m.cid
            && self.models.by_id(id.0).is_some()
        {
            return Ok(());
        }
        let attempts = match &current {
            Some((_, State::Failed { attempts, .. })) => *attempts,
            _ => 0,
        };
        self.entries()
            .insert(id, Entry { name: Some(m.name.clone()), cid: m.cid.clone(), state: State::Loading });
        match self.load(id).await {
            Ok(_) => {
                self.set_state(id, State::Ready);
                Ok(())
            }
            Err(e) => {
                let backoff = self.config.retry_base.saturating_mul(1 << attempts.min(16)).min(MAX_BACKOFF);
                let error = e.to_string();
                tracing::error!(
                    model = %m.name, id = %id, attempt = attempts + 1, retry_in_secs = backoff.as_secs(),
                    "loading the model failed: {error}"
                );
                self.set_state(
                    id,
                    State::Failed { error, attempts: attempts + 1, retry_at: Instant::now() + backoff },
                );
                Err(e)
            }
        }
    }

    /// Tries again every failed model whose retry time has come.
    pub async fn retry_failed(&self) {
        let due: Vec<B256> = self
            .entries()
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Failed { retry_at, .. } if retry_at <= Instant::now()))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let _ = self.reconcile(id).await;
        }
    }

    /// Reconciles every registered model; returns the block it read up to. A chain that does
    /// not answer is retried (with a backoff) until it does.
    pub async fn initial_sync(&self) -> u64 {
        let mut wait = self.config.retry_base;
        let (block, ids) = loop {
            match self.list_models().await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(retry_in_secs = wait.as_secs(), "reading ModelVault failed: {e}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        };
        // first say which models are on their way (callers get 503 model_loading, not 404, while
        // they load), then load them one by one
        for id in &ids {
            if let Ok(m) = self.vault.getModel(*id).call().await
                && m.active
                && self.config.allow.allows(*id, m.owner)
                && self.vault.isHostAuthorized(*id, self.host()).call().await.unwrap_or(false)
            {
                self.entries().entry(*id).or_insert(Entry {
                    name: Some(m.name),
                    cid: m.cid,
                    state: State::Loading,
                });
            }
        }
        for id in ids {
            let _ = self.reconcile(id).await;
        }
        self.initial_done.store(true, std::sync::atomic::Ordering::Release);
        block
    }

    async fn list_models(&self) -> Result<(u64, Vec<B256>), SyncError> {
        let chain = |e: alloy::contract::Error| SyncError::Chain(div_chain::revert_reason(&e));
        let block =
            self.config.provider.get_block_number().await.map_err(|e| SyncError::Chain(e.to_string()))?;
        let count = self.vault.modelCount().call().await.map_err(chain)?;
        let mut ids = Vec::new();
        for i in 0..count.saturating_to::<u64>() {
            ids.push(self.vault.modelIdAt(alloy::primitives::U256::from(i)).call().await.map_err(chain)?);
        }
        Ok((block, ids))
    }

    /// The initial sync, then follows vault events and retries failed loads, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let from = self.initial_sync().await;
        self.follow(from, shutdown).await;
    }

    /// Follows vault events from block `from` until `shutdown` resolves, retrying failed loads
    /// when their time comes.
    pub async fn follow(&self, mut from: u64, shutdown: impl std::future::Future<Output = ()>) {
        let events = [
            ModelVault::HostAuthorized::SIGNATURE_HASH,
            ModelVault::HostRevoked::SIGNATURE_HASH,
            ModelVault::ModelActiveSet::SIGNATURE_HASH,
            ModelVault::ModelContentUpdated::SIGNATURE_HASH,
            ModelVault::ModelCustodiansUpdated::SIGNATURE_HASH,
        ];
        tokio::pin!(shutdown);
        let mut chain_down = false;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.config.poll) => {}
            }
            self.retry_failed().await;
            let latest = match self.config.provider.get_block_number().await {
                Ok(b) => {
                    if chain_down {
                        tracing::info!("the chain answers again; following ModelVault");
                        chain_down = false;
                    }
                    b
                }
                Err(e) => {
                    if !chain_down {
                        tracing::warn!("chain not reachable: {e}; keeping the models loaded");
                        chain_down = true;
                    }
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
                // a failure is recorded with its retry time; nothing more to do here
                let _ = self.reconcile(id).await;
            }
            from = latest;
        }
    }
}
