//! `GET /v1/host` (what a user needs to sign for this host) and `POST /v1/host/settle` (the
//! operator settles now).

use std::time::Duration;

use axum::extract::{Query, State};
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
    let mut info = match s.meter() {
        Some(m) => json!({
            "host": m.config().host.address(),
            "chain_id": m.config().chain_id,
            "payment_stream": m.config().payment_stream,
            "model_vault": m.config().model_vault,
            "metered": true,
            "chain_up": m.chain_up(),
            // every chain this host takes payment on, the first as above
            "chains": s.meters.iter().map(|m| json!({
                "chain_id": m.config().chain_id,
                "payment_stream": m.config().payment_stream,
                "model_vault": m.config().model_vault,
                "chain_up": m.chain_up(),
            })).collect::<Vec<_>>(),
        }),
        None => json!({"metered": false}),
    };
    if let Some(url) = &s.config.public_url {
        info["public_url"] = url.clone().into();
        info["siwe_domain"] = siwe_domain(url).into();
    }
    if let Some(d) = s.deployments.first() {
        info["deployment"] = (**d).clone();
        info["deployments"] = s.deployments.iter().map(|d| (**d).clone()).collect();
    }
    info
}

/// `POST /v1/host/settle`: the operator settles now instead of waiting for the next round, on
/// every chain the host takes payment on at once (or only `?chain_id=N`). A round that takes
/// longer than its own bound keeps going in the background (202). With one chain the answer is
/// that chain's report; with several, `chains` holds one report or error per chain, and a chain
/// that is down does not hold the others' back.
pub async fn settle_now(
    State(s): State<AppState>,
    Query(q): Query<SettleQuery>,
    headers: HeaderMap,
) -> Response {
    let Some((clients, token, config)) = &s.settler else {
        return ApiError::route_not_found("/v1/host/settle").into_response();
    };
    if bearer(&headers) != Some(&**token) {
        return ApiError::from(div_meter::MeterError::InvalidKey).into_response();
    }
    let chosen = match s.meter_on(q.chain_id, "/v1/host/settle") {
        Ok(m) => q.chain_id.map(|_| m.config().chain_id),
        Err(e) => return e.into_response(),
    };
    let config = *config;
    let mut rounds = Vec::new();
    for meter in s.meters.iter().filter(|m| chosen.is_none_or(|c| c == m.config().chain_id)) {
        let chain_id = meter.config().chain_id;
        let Some((_, client)) = clients.iter().find(|(c, _)| *c == chain_id) else { continue };
        let (meter, client, metrics) = (meter.clone(), client.clone(), s.metrics.clone());
        let round = tokio::spawn(async move {
            let r = div_meter::settle::settle_now(&meter, &client, &config).await;
            metrics.settle_round(chain_id, r.as_ref());
            r
        });
        rounds.push((chain_id, round));
    }
    let bound = config.receipt_timeout.saturating_mul(config.attempts.max(1)) + Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + bound;
    let mut reports = Vec::new();
    for (chain_id, round) in rounds {
        let answer = match tokio::time::timeout_at(deadline, round).await {
            Ok(Ok(Ok(r))) => Ok(json!({
                "chain_id": chain_id,
                "tx": r.tx.map(|t| format!("{t:#x}")),
                "sent": r.sent,
                "settled": r.settled,
                "skipped": r.skipped.len(),
                "requests": r.requests,
                "amount": r.amount.to_string(),
                "gas_used": r.gas_used,
                "already_settled": r.already_settled,
                "not_settler": r.not_settler,
            })),
            Ok(Ok(Err(e))) => Err(ApiError::from(e)),
            Ok(Err(e)) => Err(ApiError::internal(format!("the settlement task failed: {e}"))),
            Err(_) => Ok(json!({"chain_id": chain_id, "status": "pending"})),
        };
        reports.push((chain_id, answer));
    }
    if reports.len() == 1
        && let Some((_, only)) = reports.pop()
    {
        return match only {
            Ok(r) if r["status"] == "pending" => (
                StatusCode::ACCEPTED,
                axum::Json(json!({"status": "pending", "message": "the round is still waiting for the chain; it goes on in the background"})),
            )
                .into_response(),
            Ok(r) => axum::Json(r).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let chains: Vec<_> = reports
        .into_iter()
        .map(|(chain_id, r)| {
            r.unwrap_or_else(
                |e| json!({"chain_id": chain_id, "error": {"code": e.code, "message": e.message}}),
            )
        })
        .collect();
    axum::Json(json!({"chains": chains})).into_response()
}

/// The query of `POST /v1/host/settle`.
#[derive(serde::Deserialize)]
pub struct SettleQuery {
    chain_id: Option<u64>,
}
