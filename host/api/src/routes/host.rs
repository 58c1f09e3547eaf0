//! `GET /v1/host` (what a user needs to sign for this host) and `POST /v1/host/settle` (the
//! operator settles now).

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::state::{AppState, bearer, siwe_domain};

/// `GET /v1/host`.
pub async fn host_info(State(s): State<AppState>) -> Response {
    axum::Json(info_of(&s)).into_response()
}

/// What `GET /v1/host` answers (also written into the dApp's page, so its first load need not ask).
pub(crate) fn info_of(s: &AppState) -> serde_json::Value {
    let mut info = match &s.meter {
        Some(m) => json!({
            "host": m.config().host.address(),
            "chain_id": m.config().chain_id,
            "payment_stream": m.config().payment_stream,
            "model_vault": m.config().model_vault,
            "metered": true,
            "chain_up": m.chain_up(),
        }),
        None => json!({"metered": false}),
    };
    if let Some(url) = &s.config.public_url {
        info["public_url"] = url.clone().into();
        info["siwe_domain"] = siwe_domain(url).into();
    }
    if let Some(d) = &s.deployment {
        info["deployment"] = (**d).clone();
    }
    info
}

/// `POST /v1/host/settle`: the operator settles now instead of waiting for the next round. A
/// round that takes longer than its own bound keeps going in the background (202).
pub async fn settle_now(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let (Some(meter), Some((client, token, config))) = (&s.meter, &s.settler) else {
        return ApiError::route_not_found("/v1/host/settle").into_response();
    };
    if bearer(&headers) != Some(&**token) {
        return ApiError::from(div_meter::MeterError::InvalidKey).into_response();
    }
    let (meter, client, config, metrics) = (meter.clone(), client.clone(), *config, s.metrics.clone());
    let round = tokio::spawn(async move {
        let r = div_meter::settle::settle_now(&meter, &client, &config).await;
        metrics.settle_round(r.as_ref());
        r
    });
    let bound = config.receipt_timeout.saturating_mul(config.attempts.max(1)) + Duration::from_secs(30);
    match tokio::time::timeout(bound, round).await {
        Ok(Ok(Ok(r))) => axum::Json(json!({
            "tx": r.tx.map(|t| format!("{t:#x}")),
            "sent": r.sent,
            "settled": r.settled,
            "skipped": r.skipped.len(),
            "requests": r.requests,
            "amount": r.amount.to_string(),
            "gas_used": r.gas_used,
            "already_settled": r.already_settled,
        }))
        .into_response(),
        Ok(Ok(Err(e))) => ApiError::from(e).into_response(),
        Ok(Err(e)) => ApiError::internal(format!("the settlement task failed: {e}")).into_response(),
        Err(_) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"status": "pending", "message": "the round is still waiting for the chain; it goes on in the background"})),
        )
            .into_response(),
    }
}
