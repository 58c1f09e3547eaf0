//! What every handler shares: the models, the meter, the limits, what the host knows of models
//! it serves but does not hold right now, and the small helpers every route uses to find a model
//! and its caller.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode, header};
use div_meter::{Credential, Meter, ModelRef};
use div_models::ModelStore;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Inference requests served at once, across models; more are answered 503 with
    /// `Retry-After`. Each model is also bounded by its own sandbox limit (its manifest's
    /// `limits.max_instances`), so one model cannot hold them all.
    pub max_concurrency: usize,
    /// Largest answer a plugin may give, in bytes (a whole JSON body; streamed text in total).
    pub max_response_bytes: usize,
    /// How long a streamed answer waits for a caller who stopped reading before it stops the
    /// generation.
    pub stream_stall: std::time::Duration,
    /// This host's public origin (`https://host.example`): the domain Sign-In with Ethereum
    /// messages must name. Never taken from a request's `Host` header.
    pub public_url: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_concurrency: 256,
            max_response_bytes: 16 << 20,
            stream_stall: std::time::Duration::from_secs(30),
            public_url: None,
        }
    }
}

/// The domain of a public URL as EIP-4361 writes it: `host[:port]`.
pub fn siwe_domain(public_url: &str) -> String {
    let rest = public_url.split_once("://").map_or(public_url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Models this host serves but does not hold right now (loading, failed, evicted by the cache),
/// and where each stands. The vault sync is the one implementation.
pub trait Catalog: Send + Sync {
    /// The host serves `name` but does not hold it: start loading it if it is not on its way;
    /// `Some(seconds)` to tell the caller to retry after. `None`: this host does not serve it.
    fn wanted(&self, name: &str) -> Option<u32>;

    /// Every model this host should serve: (name or id, state, error) for the readiness
    /// endpoint; `state` is `ready`, `loading`, `failed` or `evicted`.
    fn readiness(&self) -> Vec<serde_json::Value>;

    /// Whether the first pass over the chain has finished.
    fn initial_sync_done(&self) -> bool;
}

/// What `POST /v1/host/settle` settles with: the host's wallet on each chain (by chain id), the
/// operator's token, and how a round runs.
pub(crate) type Settler = (Arc<[(u64, div_chain::Client)]>, Arc<str>, div_meter::settle::SettleConfig);

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: Arc<ModelStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) permits: Arc<Semaphore>,
    /// One meter per chain the host takes payment on, the first (`--addresses`) first; empty:
    /// nothing is metered.
    pub(crate) meters: Arc<[Arc<Meter>]>,
    /// The host's wallet on each chain of `meters` (by chain id), for `POST /v1/host/settle`.
    pub(crate) settler: Option<Settler>,
    pub(crate) catalog: Option<Arc<dyn Catalog>>,
    /// What a browser needs to reach each chain: the address books (with public RPC URLs), the
    /// first chain's first.
    pub(crate) deployments: Arc<[Arc<serde_json::Value>]>,
    /// The built dApp served at `/`.
    pub(crate) web_dir: Option<Arc<std::path::Path>>,
    /// Set when the host is told to stop: `/readyz` answers 503 `draining` so a load balancer
    /// sends nothing new, while requests keep being served until the listener closes.
    pub(crate) draining: Arc<std::sync::atomic::AtomicBool>,
    /// What the replicas of this host share in Redis: the result cache and rate limits.
    pub(crate) shared: Option<crate::shared::Shared>,
}

impl AppState {
    /// State over a model store and metrics; every model is free.
    pub fn new(store: Arc<ModelStore>, metrics: Arc<Metrics>, config: ApiConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
        Self {
            store,
            metrics,
            config: Arc::new(config),
            permits,
            meters: Arc::new([]),
            settler: None,
            catalog: None,
            deployments: Arc::new([]),
            web_dir: None,
            draining: Arc::default(),
            shared: None,
        }
    }

    /// Shares the result cache and the per-permit rate limits with the other replicas of this
    /// host through `shared` (every meter, added before or after).
    pub fn with_shared(mut self, shared: crate::shared::Shared) -> Self {
        for m in self.meters.iter() {
            m.share_rate_limits(Arc::new(shared.clone()));
        }
        self.shared = Some(shared);
        self
    }

    /// Gates and meters every model from the vault with `meter` (models loaded from a local
    /// folder stay free: they are the operator's own). Called again with another chain's meter,
    /// the host also takes payment on that chain: each request is charged on the chain of the
    /// caller's API key or session, the first meter's chain when the caller names none.
    pub fn with_meter(mut self, meter: Arc<Meter>) -> Self {
        if let Some(shared) = &self.shared {
            meter.share_rate_limits(Arc::new(shared.clone()));
        }
        let mut meters = self.meters.to_vec();
        meters.push(meter);
        self.meters = meters.into();
        self
    }

    /// The meters, one per payment chain (none: a free host).
    pub fn meters(&self) -> Arc<[Arc<Meter>]> {
        self.meters.clone()
    }

    /// Knows the models the host serves but does not hold (see [`Catalog`]).
    pub fn with_catalog(mut self, catalog: Arc<dyn Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Publishes the deployment's address book (as `div dev`/`div deploy` wrote it, with the RPC
    /// URL browsers should use) in `GET /v1/host`, so the dApp needs no build-time configuration.
    /// Called again, another chain's: the dApp offers to switch between them.
    pub fn with_deployment(mut self, deployment: serde_json::Value) -> Self {
        let mut all = self.deployments.to_vec();
        all.push(Arc::new(deployment));
        self.deployments = all.into();
        self
    }

    /// The flag that turns `/readyz` to 503 `draining` (set it when the host starts to stop).
    pub fn draining(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.draining.clone()
    }

    /// Serves the built web dApp from `dir` at every path outside `/v1/` (unknown paths get its
    /// `index.html`, so the app's own routes survive a reload).
    pub fn with_web_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.web_dir = Some(Arc::from(dir.into().as_path()));
        self
    }

    /// Lets `POST /v1/host/settle` (with `Authorization: Bearer <admin_token>`) settle at once
    /// with `clients`, the host's wallet on each chain (by chain id).
    pub fn with_settler(
        mut self,
        clients: Vec<(u64, div_chain::Client)>,
        admin_token: &str,
        config: div_meter::settle::SettleConfig,
    ) -> Self {
        self.settler = Some((clients.into(), Arc::from(admin_token), config));
        self
    }

    /// The model `name` if it serves `task` (`what`, in words, for the error).
    pub(crate) fn model_for(
        &self,
        name: &str,
        task: &str,
        what: &str,
        label: &mut String,
    ) -> Result<Arc<div_models::LoadedModel>, ApiError> {
        let model = self.store.get(name).ok_or_else(|| self.missing(name))?;
        label.clone_from(&model.manifest.name);
        if model.manifest.task != task {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                ..ApiError::invalid(
                    "model",
                    "unsupported_task",
                    format!("the model '{name}' serves {}, not {what}", model.manifest.task),
                )
            });
        }
        Ok(model)
    }

    /// The meter of the caller's chain and the model's vault id, when requests on it are paid.
    pub(crate) async fn paid(
        &self,
        model: &div_models::LoadedModel,
        headers: &HeaderMap,
    ) -> Option<(Arc<Meter>, ModelRef)> {
        let mref = vault_ref(model)?;
        match (self.meter_of(credential(headers)).await, Some(mref)) {
            (Some(meter), Some(mref)) => Some((meter, mref)),
            _ => None,
        }
    }

    /// The meter that knows this credential: the chain whose ledger issued the API key, or where
    /// the session signed in; the first chain's for anything else (which then refuses it).
    pub(crate) async fn meter_of(&self, credential: Credential<'_>) -> Option<Arc<Meter>> {
        let all = self.meters.as_ref();
        // one chain: no lookup here (the meter resolves the credential itself, once)
        if let [only] = all {
            return Some(only.clone());
        }
        for m in all {
            let knows = match credential {
                Credential::ApiKey(key) => m.ledger().permit_of_key(key).await.ok().flatten().is_some(),
                Credential::Session(token) => m.sessions.address(token).is_some(),
                Credential::None => false,
            };
            if knows {
                return Some(m.clone());
            }
        }
        all.first().cloned()
    }

    /// The meter of `chain_id` (the first chain's when `None`); a chain this host takes no
    /// payment on is refused with the list of those it does.
    pub(crate) fn meter_on(&self, chain_id: Option<u64>, route: &str) -> Result<Arc<Meter>, ApiError> {
        let first = self.meter_or_404(route)?;
        let Some(id) = chain_id else { return Ok(first) };
        self.meters.iter().find(|m| m.config().chain_id == id).cloned().ok_or_else(|| {
            let ours: Vec<String> = self.meters.iter().map(|m| m.config().chain_id.to_string()).collect();
            ApiError {
                status: StatusCode::FORBIDDEN,
                ..ApiError::invalid(
                    "chain_id",
                    "permit_wrong_chain",
                    format!("this host takes no payment on chain {id}; it does on chain {}", ours.join(", ")),
                )
            }
        })
    }

    /// The first meter, when requests are metered.
    pub(crate) fn meter(&self) -> Option<&Arc<Meter>> {
        self.meters.first()
    }

    fn missing(&self, model: &str) -> ApiError {
        match self.catalog.as_ref().and_then(|c| c.wanted(model)) {
            Some(retry) => ApiError::model_loading(model, retry),
            None => ApiError::model_not_found(model),
        }
    }

    pub(crate) fn meter_or_404(&self, route: &str) -> Result<Arc<Meter>, ApiError> {
        self.meters.first().cloned().ok_or_else(|| ApiError::route_not_found(route))
    }
}

/// The `ModelVault` id of a model loaded from the vault.
pub(crate) fn vault_ref(m: &div_models::LoadedModel) -> Option<ModelRef> {
    m.origin.model_id().map(|id| ModelRef { name: m.manifest.name.clone(), model_id: id.into() })
}

/// The caller's credential: a bearer API key or session. A permit is never a credential.
pub(crate) fn credential(headers: &HeaderMap) -> Credential<'_> {
    match bearer(headers) {
        Some(key) if key.starts_with("div-session-") => Credential::Session(key),
        Some(key) => Credential::ApiKey(key),
        None => Credential::None,
    }
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The host's and the client's ids for one request (see [`crate::server`]).
#[derive(Clone, Debug)]
pub struct RequestIds {
    /// The host's id: unique, what receipts sign.
    pub host: Arc<str>,
    /// What the client sent in `x-request-id`, if anything usable.
    pub client: Option<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_siwe_domain_comes_from_the_public_url() {
        assert_eq!(siwe_domain("https://host.example"), "host.example");
        assert_eq!(siwe_domain("http://127.0.0.1:8080/"), "127.0.0.1:8080");
        assert_eq!(siwe_domain("host.example:443"), "host.example:443");
    }
}
