//! `POST /v1/embeddings`, and what every inference route shares.
//!
//! How a request travels: parse (body bounded in size and time) → find the model → validate
//! everything the caller sent against the model *before any work* (sizes, token ids) → gate and
//! reserve the price → take a concurrency permit (or answer 503 at once) → run the plugin in a
//! fresh sandbox on a blocking thread → check the plugin's answer against the manifest before
//! anything is serialised → charge (durable) → answer with the receipt.
//!
//! The plugin is the model owner's code: its answer is untrusted. One finite vector per input,
//! of the manifest's dimensions (or a bound when the manifest names none), or the caller gets a
//! 502 and is not charged.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use div_runtime::Input;
use tracing::Instrument;

use crate::body::read_json;
use crate::embeddings::{EmbeddingsRequest, EmbeddingsResponse};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::shared::{cache_key, decode_vectors, encode_vectors};
use crate::state::{AppState, RequestIds, credential};

/// Bytes of text per token of a model's input length above which an input is refused rather
/// than truncated: a text this long could never fit, and tokenizing it is work done for free.
pub const BYTES_PER_TOKEN_BOUND: usize = 64;
/// Largest vector a plugin may return when the manifest names no dimensions.
pub const MAX_UNDECLARED_DIMS: usize = 65_536;

/// Decrements the in-flight gauge when the sandbox work ends, however it ends.
pub(crate) struct InFlight(pub(crate) Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight().dec();
    }
}

/// An inference route's answer: the error (logged when it is the host's fault) or the response,
/// counted in the metrics either way.
pub(crate) fn answered(
    s: &AppState,
    route: &str,
    model_label: &str,
    started: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            tracing::warn!(model = %model_label, code = e.code, "{}", div_runtime::clip(&e.message, 2048));
        }
        e.into_response()
    });
    s.metrics.request(route, model_label, response.status().as_u16(), started.elapsed());
    response
}

pub(crate) fn with_receipt_header(mut resp: Response, receipt: Option<&div_meter::Receipt>) -> Response {
    if let Some(json) = receipt.and_then(|rc| serde_json::to_vec(rc).ok())
        && let Ok(v) = HeaderValue::from_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    {
        resp.headers_mut().insert("x-div-receipt", v);
    }
    resp
}

/// The request's ids (from the middleware), or fresh ones.
pub(crate) fn ids_of(ids: Option<axum::Extension<RequestIds>>) -> RequestIds {
    ids.map(|e| e.0).unwrap_or_else(|| RequestIds { host: Arc::from("-"), client: None })
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(s): State<AppState>,
    ids: Option<axum::Extension<RequestIds>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let ids = ids_of(ids);
    let mut model_label = "unknown".to_string();
    let result = embed(&s, ids, &headers, body, &mut model_label).await.map(|r| {
        let (receipt, cached) = (r.receipt.clone(), r.cached);
        let mut resp = with_receipt_header(axum::Json(r).into_response(), receipt.as_ref());
        if let Some(hit) = cached {
            resp.headers_mut()
                .insert("x-div-cache", HeaderValue::from_static(if hit { "hit" } else { "miss" }));
        }
        resp
    });
    answered(&s, "/v1/embeddings", &model_label, started, result)
}

/// Refuses inputs that could not fit the model, or name tokens it does not have, before any
/// work is done for them.
fn check_inputs(inputs: &[Input], model: &div_models::LoadedModel) -> Result<(), ApiError> {
    let max_tokens = model.manifest.max_seq_length as usize;
    let max_bytes = max_tokens.saturating_mul(BYTES_PER_TOKEN_BOUND).max(4096);
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Input::Text(t) if t.len() > max_bytes => {
                return Err(ApiError::invalid(
                    "input",
                    "input_too_long",
                    format!(
                        "input[{i}] is {} bytes; this model reads at most {max_tokens} tokens, so texts over \
                         {max_bytes} bytes are refused (split it)",
                        t.len()
                    ),
                ));
            }
            Input::Tokens(ids) if ids.len() > max_tokens => {
                return Err(ApiError::invalid(
                    "input",
                    "input_too_long",
                    format!("input[{i}] has {} tokens; this model reads at most {max_tokens}", ids.len()),
                ));
            }
            Input::Tokens(ids) => {
                if let Some(vocab) = model.vocab_size
                    && let Some(bad) = ids.iter().find(|&&t| t >= vocab)
                {
                    return Err(ApiError::invalid(
                        "input",
                        "invalid_token",
                        format!("input[{i}] has token id {bad}; this model's vocabulary has {vocab} tokens"),
                    ));
                }
            }
            Input::Text(_) => {}
        }
    }
    Ok(())
}

async fn embed(
    s: &AppState,
    ids: RequestIds,
    headers: &HeaderMap,
    body: Body,
    model_label: &mut String,
) -> Result<EmbeddingsResponse, ApiError> {
    let req: EmbeddingsRequest = read_json(body, s.config.max_body_bytes).await?;
    let model = s.model_for(&req.model, "embeddings", "embeddings", model_label)?;
    let encoding = req.encoding()?;
    req.check_dimensions(model.manifest.dimensions)?;
    let inputs = req.inputs()?;
    check_inputs(&inputs, &model)?;
    // gate and reserve the price before any work; charged only if the plugin succeeds
    let paid = s.paid(&model, headers).await;
    let ticket = match &paid {
        Some((meter, mref)) => meter
            .admit(credential(headers), mref, inputs.len())
            .instrument(tracing::info_span!("gate", model = %mref.name))
            .await?
            .ticket(),
        None => None,
    };
    // the owner allows a shared result cache: read only now, after the gate admitted the caller
    let cache = match (&s.shared, model.manifest.result_cache) {
        (Some(shared), Some(rc)) => Some((
            shared.clone(),
            cache_key(&model.fingerprint, "embeddings", &input_bytes(&inputs)),
            std::time::Duration::from_secs(rc.ttl_secs),
        )),
        _ => None,
    };
    if let Some((shared, key, _)) = &cache {
        let name = &model.manifest.name;
        let found = shared.get(key).instrument(tracing::info_span!("cache")).await;
        match found.as_ref().map(|v| v.as_deref().and_then(decode_vectors)) {
            Ok(Some((vectors, tokens)))
                if check_vectors(&vectors, inputs.len(), model.manifest.dimensions).is_ok() =>
            {
                s.metrics.result_cache(name, "hit");
                let mut response = EmbeddingsResponse::new(name, vectors, tokens, encoding);
                response.cached = Some(true);
                // a hit is charged like a miss: the price buys the answer
                return charged(response, ticket, &paid, &ids).await;
            }
            Err(()) => s.metrics.result_cache(name, "error"),
            _ => s.metrics.result_cache(name, "miss"),
        }
    }
    let permit = s.permits.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    s.metrics.in_flight().inc();
    let in_flight = InFlight(s.metrics.clone());
    let m = model.clone();
    let count = inputs.len();
    let sandbox_rid = ids.host.clone();
    // the sandbox's thread continues the request's trace (the backend's span nests inside)
    let span = tracing::info_span!("sandbox", model = %model.manifest.name, inputs = count);
    // the permit and the gauge travel with the work: a caller who disconnects drops this future,
    // but the sandbox runs to its end and holds its slot until then
    let (result, report) = tokio::task::spawn_blocking(move || {
        let _held = (permit, in_flight);
        let _span = span.entered();
        m.plugin.embed(&inputs, sandbox_rid)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the sandbox thread failed: {e}")))?;
    s.metrics.sandbox(&model.manifest.name, report.instantiate, report.call);
    s.metrics.parked(&model.manifest.name, report.parked);
    let out = result.map_err(|e| match report.usage.refusal() {
        Some(r) => ApiError::refused(&r),
        None => ApiError::from(e),
    })?;
    check_vectors(&out.vectors, count, model.manifest.dimensions)?;
    if let Some((shared, key, ttl)) = &cache {
        shared.put(key, &encode_vectors(&out.vectors, out.prompt_tokens), *ttl).await;
    }
    let mut response =
        EmbeddingsResponse::new(&model.manifest.name, out.vectors, out.prompt_tokens, encoding);
    response.cached = cache.as_ref().map(|_| false);
    charged(response, ticket, &paid, &ids).await
}

/// Charges an admitted paid request, durable before the answer leaves, and puts the receipt in
/// `response`; a free request goes as it is.
async fn charged(
    mut response: EmbeddingsResponse,
    ticket: Option<div_meter::Ticket>,
    paid: &Option<(Arc<div_meter::Meter>, div_meter::ModelRef)>,
    ids: &RequestIds,
) -> Result<EmbeddingsResponse, ApiError> {
    if let (Some(ticket), Some((meter, mref))) = (ticket, paid) {
        response.receipt = Some(
            meter
                .charge(ticket, &ids.host, ids.client.as_deref(), mref)
                .instrument(tracing::info_span!("ledger"))
                .await?,
        );
    }
    Ok(response)
}

/// The inputs as the cache keys them: each tagged text or token list with its length.
fn input_bytes(inputs: &[div_runtime::Input]) -> Vec<u8> {
    let mut out = Vec::new();
    for input in inputs {
        match input {
            div_runtime::Input::Text(t) => {
                out.push(b'T');
                out.extend_from_slice(&(t.len() as u64).to_le_bytes());
                out.extend_from_slice(t.as_bytes());
            }
            div_runtime::Input::Tokens(ids) => {
                out.push(b'K');
                out.extend_from_slice(&(ids.len() as u64).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(&id.to_le_bytes());
                }
            }
        }
    }
    out
}

/// A plugin is untrusted: its answer must have one finite vector per input, of the model's size
/// (or at most [`MAX_UNDECLARED_DIMS`] when the manifest names none). Checked before anything is
/// serialised, so a huge answer costs the host nothing more.
pub(crate) fn check_vectors(vectors: &[Vec<f32>], inputs: usize, dims: Option<u32>) -> Result<(), ApiError> {
    let bad =
        |m: String| ApiError::plugin_answer(format!("the model's plugin returned an invalid answer: {m}"));
    if vectors.len() != inputs {
        return Err(bad(format!("{} vectors for {inputs} inputs", vectors.len())));
    }
    for (i, v) in vectors.iter().enumerate() {
        match dims {
            Some(d) if v.len() != d as usize => {
                return Err(bad(format!("vector {i} has {} dimensions, the model has {d}", v.len())));
            }
            None if v.len() > MAX_UNDECLARED_DIMS => {
                return Err(bad(format!(
                    "vector {i} has {} dimensions (the manifest declares none; at most {MAX_UNDECLARED_DIMS})",
                    v.len()
                )));
            }
            _ => {}
        }
        if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("vector {i} is empty or not finite")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_vectors_are_checked_against_the_manifest() {
        assert!(check_vectors(&[vec![1.0; 4]], 1, Some(4)).is_ok());
        let e = check_vectors(&[vec![1.0; 5]], 1, Some(4)).err().map(|e| (e.status.as_u16(), e.code));
        assert_eq!(e, Some((502, "plugin_error")));
        assert!(check_vectors(&[vec![1.0; 4], vec![1.0; 4]], 1, Some(4)).is_err());
        assert!(check_vectors(&[vec![f32::NAN]], 1, None).is_err());
        assert!(check_vectors(&[vec![1.0; MAX_UNDECLARED_DIMS + 1]], 1, None).is_err());
    }
}
