//! Sign-In with Ethereum (`GET /v1/siwe/nonce`, `POST /v1/siwe`, `DELETE /v1/siwe`) and
//! `GET /v1/me`. The domain a sign-in message must name is this host's configured public URL's,
//! never the `Host` header a caller sends.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::body::read_json;
use crate::error::ApiError;
use crate::state::{AppState, bearer, siwe_domain};

/// `GET /v1/siwe/nonce`: a single-use nonce for an EIP-4361 message, and the domain to name.
pub async fn siwe_nonce(State(s): State<AppState>) -> Response {
    match s.meter_or_404("/v1/siwe/nonce") {
        Ok(m) => axum::Json(json!({
            "nonce": m.sessions.nonce(),
            // the first chain; a message may name any of `chain_ids` (sessions are per chain)
            "chain_id": m.config().chain_id,
            "chain_ids": s.meters.iter().map(|m| m.config().chain_id).collect::<Vec<_>>(),
            "domain": s.config.public_url.as_deref().map(siwe_domain),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct SignIn {
    message: String,
    signature: String,
}

/// `POST /v1/siwe`: a signed EIP-4361 message for this host in, a session token out.
pub async fn siwe_sign_in(State(s): State<AppState>, body: Body) -> Response {
    let result =
        async {
            s.meter_or_404("/v1/siwe")?;
            let req: SignIn = read_json(body, 16 * 1024).await?;
            // the chain the message names picks the meter the session pays on
            let chain = div_meter::siwe::SiweMessage::parse(&req.message)?.chain_id;
            let m = s.meter_on(Some(chain), "/v1/siwe")?;
            let domain =
                s.config.public_url.as_deref().map(siwe_domain).ok_or_else(|| {
                    ApiError::internal("this host has no public URL configured (--public-url)")
                })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (token, address) =
                m.sessions.sign_in(&req.message, &req.signature, &domain, m.config().chain_id, now as i64)?;
            Ok::<_, ApiError>(axum::Json(json!({"token": token, "address": address})).into_response())
        }
        .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/siwe`: signs the session out.
pub async fn siwe_sign_out(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let result = async {
        // a host without a meter has no such route, whatever the caller sends
        s.meter_or_404("/v1/siwe")?;
        let token =
            bearer(&headers).ok_or_else(|| ApiError::from(div_meter::MeterError::MissingCredential))?;
        let m = s
            .meter_of(div_meter::Credential::Session(token))
            .await
            .ok_or_else(|| ApiError::route_not_found("/v1/siwe"))?;
        let was = m.sessions.sign_out(token);
        Ok::<_, ApiError>(axum::Json(json!({"signed_out": was})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/me`: the signed-in address and its permits on this host.
pub async fn me(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let result = async {
        let token = bearer(&headers).unwrap_or_default();
        let m = s
            .meter_of(div_meter::Credential::Session(token))
            .await
            .ok_or_else(|| ApiError::route_not_found("/v1/me"))?;
        let who = m
            .sessions
            .address(token)
            .ok_or_else(|| ApiError::from(div_meter::MeterError::MissingCredential))?;
        // replicas sharing a ledger: what the others charged, too
        m.ledger().refresh().await.map_err(ApiError::from)?;
        let permits: Vec<_> = m
            .ledger()
            .accounts_of(who)
            .into_iter()
            .map(|(h, a)| {
                json!({
                    "permit_hash": format!("{h:#x}"),
                    "model": a.model,
                    "model_id": format!("{:#x}", a.permit.model_id),
                    "token": a.permit.token,
                    "max_amount": a.permit.max_amount.to_string(),
                    "expiry": a.permit.expiry,
                    "charged_amount": a.charged_amount.to_string(),
                    "charged_requests": a.charged_requests,
                    "settled_amount": a.settled_amount.to_string(),
                    "settled_requests": a.settled_requests,
                    "rejected": a.rejected.map(div_meter::skip_reason),
                })
            })
            .collect();
        Ok::<_, ApiError>(
            axum::Json(json!({"address": who, "chain_id": m.config().chain_id, "permits": permits}))
                .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
