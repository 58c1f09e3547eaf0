//! API keys for permits, and receipts.
//!
//! `GET /v1/keys/challenge` hands out a single-use challenge; `POST /v1/keys` takes a signed
//! spending permit *and* proof that the caller controls the permit's user: the user's EIP-191
//! signature over [`div_meter::key_proof_message`] with that challenge (field `proof`), or a
//! Sign-In with Ethereum session of the user (`Authorization: Bearer div-session-…`). The key
//! is shown once; the host keeps only its hash.
//!
//! `GET /v1/receipts/{id}` gives the holder of a permit (its key, or a session as its user) the
//! receipt of any request charged to it, by the host's request id or by the `x-request-id` the
//! client sent: a client that lost an answer (a dropped connection, a crash) can reconcile.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use div_meter::{PermitFields, Proof};
use serde_json::json;

use crate::body::read_json;
use crate::error::ApiError;
use crate::state::{AppState, bearer, credential, vault_ref};

#[derive(serde::Deserialize)]
struct KeyProof {
    challenge: String,
    signature: alloy::primitives::Bytes,
}

/// `POST /v1/keys`: a signed spending permit and proof of its user in, the one API key it gets
/// out.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyRequest {
    permit: PermitFields,
    signature: alloy::primitives::Bytes,
    #[serde(default, alias = "chain_id")]
    chain_id: Option<u64>,
    #[serde(default, alias = "verifying_contract")]
    verifying_contract: Option<alloy::primitives::Address>,
    #[serde(default)]
    proof: Option<KeyProof>,
}

/// `GET /v1/keys/challenge`.
pub async fn challenge(State(s): State<AppState>) -> Response {
    match s.meter_or_404("/v1/keys/challenge") {
        Ok(m) => axum::Json(json!({
            "challenge": m.key_challenge(),
            "host": m.config().host.address(),
            "expires_in": div_meter::siwe::NONCE_TTL.as_secs(),
            "sign": "the text of div_meter::key_proof_message(host, permit hash, challenge), EIP-191",
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/keys`.
pub async fn issue_key(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        s.meter_or_404("/v1/keys")?;
        let req: KeyRequest = read_json(body, 64 * 1024).await?;
        // the chain the permit was signed for picks the meter that keeps it
        let meter = s.meter_on(req.chain_id, "/v1/keys")?;
        let model = match s.store.by_id(req.permit.model_id.0) {
            Some(m) => vault_ref(&m)
                .ok_or_else(|| ApiError::model_not_found(&format!("{:#x}", req.permit.model_id)))?,
            None => return Err(ApiError::model_not_found(&format!("{:#x}", req.permit.model_id))),
        };
        let claimed = match (req.chain_id, req.verifying_contract) {
            (None, None) => None,
            (c, v) => {
                Some((c.unwrap_or(meter.config().chain_id), v.unwrap_or(meter.config().payment_stream)))
            }
        };
        let proof = match (&req.proof, bearer(&headers)) {
            (Some(p), _) => Proof::Challenge { nonce: &p.challenge, signature: &p.signature },
            (None, Some(t)) if t.starts_with("div-session-") => Proof::Session(t),
            _ => Proof::None,
        };
        let expires = req.permit.expiry;
        let owner = meter.model_owner(model.model_id).await?;
        let (key, hash) = meter.issue_key(req.permit, req.signature, claimed, proof, &model).await?;
        Ok::<_, ApiError>(
            (
                StatusCode::CREATED,
                axum::Json(json!({
                    "object": "api_key",
                    "key": key,
                    "model": model.name,
                    "model_id": format!("{:#x}", model.model_id),
                    "owner": owner,
                    "permit_hash": format!("{hash:#x}"),
                    "expires_at": expires,
                })),
            )
                .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/receipts/{id}`.
pub async fn receipt(State(s): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let result = async {
        let meter = s
            .meter_of(credential(&headers))
            .await
            .ok_or_else(|| ApiError::route_not_found("/v1/receipts"))?;
        match meter.receipt(credential(&headers), &id).await? {
            Some(r) => Ok::<_, ApiError>(axum::Json(r).into_response()),
            None => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(
                    "id",
                    "receipt_not_found",
                    format!(
                        "no charge {id:?} on your permit: that request was not charged (it failed, was \
                         refused, or never reached this host)"
                    ),
                )
            }),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
