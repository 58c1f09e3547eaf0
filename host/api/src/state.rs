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

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub(crate) store: Arc<ModelStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) meter: Option<Arc<Meter>>,
    pub(crate) settler: Option<(div_chain::Client, Arc<str>, div_meter::settle::SettleConfig)>,
    pub(crate) catalog: Option<Arc<dyn Catalog>>,
    /// What a browser needs to reach the chain: the address book (with a public RPC URL).
    pub(crate) deployment: Option<Arc<serde_json::Value>>,
    /// The built dApp served at `/`.
    pub(crate) web_dir: Option<Arc<std::path::Path>>,
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
            meter: None,
            settler: None,
            catalog: None,
            deployment: None,
            web_dir: None,
        }
    }

    /// Gates and meters every model from the vault with `meter` (models loaded from a local
    /// folder stay free: they are the operator's own).
    pub fn with_meter(mut self, meter: Arc<Meter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Knows the models the host serves but does not hold (see [`Catalog`]).
    pub fn with_catalog(mut self, catalog: Arc<dyn Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    /// Publishes the deployment's address book (as `div dev`/`div deploy` wrote it, with the RPC
    /// URL browsers should use) in `GET /v1/host`, so the dApp needs no build-time configuration.
    pub fn with_deployment(mut self, deployment: serde_json::Value) -> Self {
        self.deployment = Some(Arc::new(deployment));
        self
    }

    /// Serves the built web dApp from `dir` at every path outside `/v1/` (unknown paths get its
    /// `index.html`, so the app's own routes survive a reload).
    pub fn with_web_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.web_dir = Some(Arc::from(dir.into().as_path()));
        self
    }

    /// Lets `POST /v1/host/settle` (with `Authorization: Bearer <admin_token>`) settle at once
    /// with `client`, the host's wallet.
    pub fn with_settler(
        mut self,
        client: div_chain::Client,
        admin_token: &str,
        config: div_meter::settle::SettleConfig,
    ) -> Self {
        self.settler = Some((client, Arc::from(admin_token), config));
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

    /// The meter and the model's vault id, when requests on it are paid.
    pub(crate) fn paid(&self, model: &div_models::LoadedModel) -> Option<(Arc<Meter>, ModelRef)> {
        match (&self.meter, vault_ref(model)) {
            (Some(meter), Some(mref)) => Some((meter.clone(), mref)),
            _ => None,
        }
    }

    fn missing(&self, model: &str) -> ApiError {
        match self.catalog.as_ref().and_then(|c| c.wanted(model)) {
            Some(retry) => ApiError::model_loading(model, retry),
            None => ApiError::model_not_found(model),
        }
    }

    pub(crate) fn meter_or_404(&self, route: &str) -> Result<Arc<Meter>, ApiError> {
        self.meter.clone().ok_or_else(|| ApiError::route_not_found(route))
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
