//! The catalogue (`GET /v1/models`, `GET /v1/models/{id}`), liveness (`GET /healthz`: the process
//! answers), readiness (`GET /readyz`: 200 only when every model the host should serve is
//! loaded, with each model's state either way) and `GET /metrics`.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::state::{AppState, vault_ref};

pub(crate) fn model_json(m: &div_models::LoadedModel) -> serde_json::Value {
    json!({
        "id": m.manifest.name,
        "object": "model",
        "created": m.created,
        "owned_by": m.origin.owner().map_or_else(|| "div".to_string(), |o| format!("0x{}", hex_of(&o))),
        "task": m.manifest.task,
        "dimensions": m.manifest.dimensions,
        "max_input_tokens": m.manifest.max_seq_length,
        "model_id": vault_ref(m).map(|r| format!("{:#x}", r.model_id)),
        "owner": m.origin.owner().map(|o| format!("0x{}", hex_of(&o))),
    })
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `GET /healthz`: the process is alive (it answers); how many models are ready is information,
/// not a condition.
pub async fn healthz(State(s): State<AppState>) -> Response {
    let ready = s.store.list().len();
    axum::Json(json!({"status": "ok", "models": ready})).into_response()
}

/// `GET /readyz`: 200 when the host has read the chain once and every model it should serve is
/// loaded (or was evicted by the cache and loads on demand), else 503; each model's state, last
/// error and next retry either way. 503 `draining` once the host has been told to stop.
pub async fn readyz(State(s): State<AppState>) -> Response {
    let (models, synced) = match &s.catalog {
        Some(c) => (c.readiness(), c.initial_sync_done()),
        None => (
            s.store.list().iter().map(|m| json!({"name": m.manifest.name, "state": "ready"})).collect(),
            true,
        ),
    };
    let chains: Vec<_> =
        s.meters.iter().map(|m| json!({"chain_id": m.config().chain_id, "up": m.chain_up()})).collect();
    let chain_up = s.meters.iter().all(|m| m.chain_up());
    for m in s.meters.iter() {
        s.metrics.set_chain_up(m.config().chain_id, m.chain_up());
    }
    for m in &models {
        if let Some(name) = m["name"].as_str() {
            s.metrics.set_model_ready(name, m["state"] == "ready");
        }
    }
    let draining = s.draining.load(std::sync::atomic::Ordering::Acquire);
    let ready =
        !draining && synced && models.iter().all(|m| m["state"] == "ready" || m["state"] == "evicted");
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if draining { "draining" } else if ready { "ready" } else { "not_ready" },
        "initial_sync_done": synced,
        "chain_up": chain_up,
        "chains": chains,
        "models": models,
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(s): State<AppState>) -> Response {
    for m in s.meters.iter() {
        let chain_id = m.config().chain_id;
        s.metrics.set_unsettled(chain_id, m.ledger().unsettled_total(), m.ledger().unsettled_requests());
        s.metrics.set_chain_up(chain_id, m.chain_up());
        if let Some(held) = m.ledger().holds_settlement() {
            s.metrics.set_settlement_lease(chain_id, held);
        }
    }
    s.metrics.refresh_llm();
    match s.metrics.encode() {
        Ok(text) => {
            let mut r = text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        Err(e) => ApiError::internal(format!("encoding metrics: {e}")).into_response(),
    }
}

/// `GET /v1/models`.
pub async fn list_models(State(s): State<AppState>) -> Response {
    let data: Vec<_> = s.store.list().iter().map(|m| model_json(m)).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The query of `GET /v1/models/{id}`.
#[derive(serde::Deserialize)]
pub struct ModelQuery {
    chain_id: Option<u64>,
}

/// `GET /v1/models/{id}`: the model, with what this host charged and settled on it on the first
/// chain, or on `?chain_id=N` (each chain's amounts are in its own stablecoins).
pub async fn get_model(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ModelQuery>,
) -> Response {
    let meter = match (s.meters.is_empty(), q.chain_id) {
        (false, chain) => match s.meter_on(chain, "/v1/models") {
            Ok(m) => Some(m),
            Err(e) => return e.into_response(),
        },
        (true, _) => None,
    };
    match s.store.get(&id) {
        Some(m) => {
            let mut body = model_json(&m);
            if let (Some(meter), Some(r)) = (meter, vault_ref(&m)) {
                let u = meter.ledger().usage_of(r.model_id);
                body["usage"] = json!({
                    "chain_id": meter.config().chain_id,
                    "permits": u.permits,
                    "charged_amount": u.charged_amount.to_string(),
                    "charged_requests": u.charged_requests,
                    "settled_amount": u.settled_amount.to_string(),
                    "settled_requests": u.settled_requests,
                    "unsettled_amount": u.charged_amount.saturating_sub(u.settled_amount).to_string(),
                });
            }
            axum::Json(body).into_response()
        }
        None => ApiError::model_not_found(&id).into_response(),
    }
}
