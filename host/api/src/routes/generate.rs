//! `POST /v1/chat/completions` and `POST /v1/completions`, streamed or not (the request and
//! answer shapes are in [`crate::chat`]).
//!
//! The generation and its charge run in a task of their own, so they end (and are charged) the
//! same way whether the caller stays or leaves. Usage is what the **backend** counted (prompt
//! and generated tokens), never what the owner's plugin says: the owner is the one paid.
//!
//! Output is bounded outside the sandbox too: streamed text goes through a small bounded channel,
//! so a caller who stops reading makes the plugin's next `emit` wait (backpressure), and one who
//! does not read for [`ApiConfig::stream_stall`](crate::ApiConfig) is treated as gone (the
//! generation stops; only what was generated is charged); the text a request produces, streamed
//! or not, is capped at [`ApiConfig::max_response_bytes`](crate::ApiConfig).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::body::read_json;
use crate::chat::{
    GenerateRequest, HangUp, Kind, Outcome, Shaper, Usage, Waiting, done, event, sse_response,
};
use crate::error::ApiError;
use crate::routes::infer::{InFlight, answered, ids_of, with_receipt_header};
use crate::shared::cache_key;
use crate::state::{AppState, RequestIds, credential};

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(s): State<AppState>,
    ids: Option<axum::Extension<RequestIds>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_route(s, ids, headers, body, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(s): State<AppState>,
    ids: Option<axum::Extension<RequestIds>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_route(s, ids, headers, body, Kind::Completion).await
}

async fn generate_route(
    s: AppState,
    ids: Option<axum::Extension<RequestIds>>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Response {
    let started = Instant::now();
    let ids = ids_of(ids);
    let mut model_label = "unknown".to_string();
    let result = generate(&s, ids, &headers, body, kind, &mut model_label).await;
    answered(&s, kind.route(), &model_label, started, result)
}

/// Reads the plugin's answer: its text and finish reason. Its token counts are not read: the
/// backend's are.
fn outcome_of(resp: div_runtime::Response, usage: Usage, max_bytes: usize) -> Result<Outcome, ApiError> {
    if resp.body.len() > max_bytes {
        return Err(ApiError::plugin_answer(format!(
            "the model's plugin answered {} bytes; at most {max_bytes}",
            resp.body.len()
        )));
    }
    if resp.status != 200 {
        return Err(ApiError::plugin_answer(format!(
            "the model's plugin answered {}: {}",
            resp.status,
            div_runtime::clip(&resp.body, 1024)
        )));
    }
    #[derive(serde::Deserialize)]
    struct PluginAnswer {
        text: String,
        finish_reason: String,
    }
    let a: PluginAnswer = serde_json::from_str(&resp.body).map_err(|e| {
        ApiError::plugin_answer(format!("the model's plugin answered a body this host cannot read: {e}"))
    })?;
    let finish_reason = match a.finish_reason.as_str() {
        "stop" | "length" | "cancelled" => a.finish_reason,
        _ => "stop".to_string(),
    };
    Ok(Outcome { text: a.text, finish_reason, usage })
}

/// Charges an admitted paid generation for the tokens its answer took (durable before this
/// returns) and gives its receipt; a free one gives none.
async fn charge_outcome(
    o: &Outcome,
    ticket: Option<div_meter::Ticket>,
    paid: &Option<(Arc<div_meter::Meter>, div_meter::ModelRef)>,
    ids: &RequestIds,
) -> Result<Option<div_meter::Receipt>, ApiError> {
    let tokens = u64::from(o.usage.prompt_tokens) + u64::from(o.usage.completion_tokens);
    match (ticket, paid) {
        (Some(t), Some((meter, mref))) => Ok(Some(
            meter
                .charge_tokens(t, &ids.host, ids.client.as_deref(), mref, tokens)
                .instrument(tracing::info_span!("ledger"))
                .await?,
        )),
        _ => Ok(None),
    }
}

async fn generate(
    s: &AppState,
    ids: RequestIds,
    headers: &HeaderMap,
    body: Body,
    kind: Kind,
    model_label: &mut String,
) -> Result<Response, ApiError> {
    let req: GenerateRequest = read_json(body, s.config.max_body_bytes).await?;
    let model = s.model_for(&req.model, "chat", "text generation", model_label)?;
    let context = model.manifest.max_seq_length;
    let default_max =
        model.manifest.extra.get("max_tokens").and_then(serde_json::Value::as_u64).unwrap_or(256);
    let plugin_body = req.plugin_body(kind, context, u32::try_from(default_max).unwrap_or(256))?;
    // a prompt that cannot fit the context is refused before any work (the backend refuses the
    // rest, counted exactly, as the caller's fault too)
    req.check_size(kind, context)?;
    let max_tokens = plugin_body["max_tokens"].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(1);
    // gate, and reserve the price of a full context; charged only for the tokens used
    let paid = s.paid(&model, headers).await;
    let ticket = match &paid {
        Some((meter, mref)) => meter
            .admit_tokens(credential(headers), mref, 1, u64::from(context))
            .instrument(tracing::info_span!("gate", model = %mref.name))
            .await?
            .ticket(),
        None => None,
    };
    let shaper = Arc::new(Shaper::new(kind, &ids.host, &model.manifest.name));
    // greedy generation (temperature 0, the chat plugin's default) of a model whose owner allows
    // it is cached whole, after the gate; a stream is never served from the cache
    let greedy = plugin_body.get("temperature").and_then(serde_json::Value::as_f64).unwrap_or(0.0) == 0.0;
    let cache = match (&s.shared, model.manifest.result_cache) {
        (Some(shared), Some(rc)) if greedy && !req.stream => {
            // what a greedy answer depends on: not the sampling settings
            let mut keyed = plugin_body.clone();
            if let Some(o) = keyed.as_object_mut() {
                for k in ["temperature", "top_p", "seed"] {
                    o.remove(k);
                }
            }
            Some((
                shared.clone(),
                cache_key(&model.fingerprint, kind.route(), keyed.to_string().as_bytes()),
                std::time::Duration::from_secs(rc.ttl_secs),
            ))
        }
        _ => None,
    };
    if let Some((shared, key, _)) = &cache {
        let name = &model.manifest.name;
        let found = shared.get(key).instrument(tracing::info_span!("cache")).await;
        match found.as_ref().map(|v| v.as_deref().and_then(|b| serde_json::from_slice::<Outcome>(b).ok())) {
            Ok(Some(o)) => {
                s.metrics.result_cache(name, "hit");
                // a hit is charged like a miss: the tokens the answer took
                let receipt = charge_outcome(&o, ticket, &paid, &ids).await?;
                let mut resp = with_receipt_header(
                    axum::Json(shaper.answer(&o, receipt.as_ref())).into_response(),
                    receipt.as_ref(),
                );
                resp.headers_mut().insert("x-div-cache", axum::http::HeaderValue::from_static("hit"));
                return Ok(resp);
            }
            Err(()) => s.metrics.result_cache(name, "error"),
            _ => s.metrics.result_cache(name, "miss"),
        }
    }
    let permit = s.permits.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    s.metrics.in_flight().inc();
    let in_flight = InFlight(s.metrics.clone());
    let request = div_runtime::Request { route: kind.route().into(), body: plugin_body.to_string() };
    let (delta_tx, mut delta_rx) = tokio::sync::mpsc::channel::<String>(16);
    let waiting = Waiting::new();
    let max_bytes = s.config.max_response_bytes;
    let sent = Arc::new(AtomicUsize::new(0));
    let sink: div_runtime::StreamSink = if req.stream {
        let (stall, handle) = (s.config.stream_stall, tokio::runtime::Handle::current());
        let sent = sent.clone();
        Box::new(move |d: &str| {
            if sent.fetch_add(d.len(), Ordering::Relaxed) + d.len() > max_bytes {
                return false;
            }
            // runs on the sandbox's blocking thread: wait for room, but not for ever
            matches!(handle.block_on(tokio::time::timeout(stall, delta_tx.send(d.to_string()))), Ok(Ok(())))
        })
    } else {
        drop(delta_tx);
        let (w, sent) = (waiting.clone(), sent.clone());
        Box::new(move |d: &str| {
            w.still() && sent.fetch_add(d.len(), Ordering::Relaxed) + d.len() <= max_bytes
        })
    };
    // the generation and its charge run to their end in a task of their own, caller or not
    let (m, metrics, sandbox_rid) = (model.clone(), s.metrics.clone(), ids.host.clone());
    let (cached, put) = (cache.is_some(), cache);
    let span = tracing::info_span!("sandbox", model = %model.manifest.name);
    let work = tokio::spawn(
        async move {
            let name = m.manifest.name.clone();
            let (result, report) = tokio::task::spawn_blocking(move || {
                let _held = (permit, in_flight);
                let _span = span.entered();
                m.plugin.handle_streaming(&request, sandbox_rid, sink)
            })
            .await
            .map_err(|e| ApiError::internal(format!("the sandbox thread failed: {e}")))?;
            metrics.sandbox(&name, report.instantiate, report.call);
            metrics.parked(&name, report.parked);
            // what the backend counted: the host's own numbers, whatever the plugin reports
            let (prompt_tokens, generated) = report.usage.tokens();
            let usage = Usage { prompt_tokens, completion_tokens: generated.min(max_tokens) };
            let resp = result.map_err(|e| match report.usage.refusal() {
                Some(r) => ApiError::refused(&r),
                None => ApiError::from(e),
            })?;
            let outcome = outcome_of(resp, usage, max_bytes)?;
            if let Some((shared, key, ttl)) = &put
                && outcome.finish_reason != "cancelled"
                && let Ok(bytes) = serde_json::to_vec(&outcome)
            {
                shared.put(key, &bytes, *ttl).await;
            }
            metrics.generation(
                &name,
                outcome.usage.prompt_tokens,
                outcome.usage.completion_tokens,
                outcome.finish_reason == "cancelled",
            );
            // durable before the answer (or the stream's last chunk) leaves
            let receipt = charge_outcome(&outcome, ticket, &paid, &ids).await?;
            Ok::<_, ApiError>((outcome, receipt))
        }
        .instrument(tracing::Span::current()),
    );
    let joined = |r: Result<
        Result<(Outcome, Option<div_meter::Receipt>), ApiError>,
        tokio::task::JoinError,
    >| { r.map_err(|e| ApiError::internal(format!("the generation task failed: {e}")))? };
    if !req.stream {
        let _hang_up = HangUp(waiting);
        let (o, receipt) = joined(work.await)?;
        let mut resp = with_receipt_header(
            axum::Json(shaper.answer(&o, receipt.as_ref())).into_response(),
            receipt.as_ref(),
        );
        if cached {
            resp.headers_mut().insert("x-div-cache", axum::http::HeaderValue::from_static("miss"));
        }
        return Ok(resp);
    }
    // wait for the first piece before answering 200, so a request the plugin refuses at once
    // gets its real status instead of an error event
    let first = delta_rx.recv().await;
    let work = match first {
        Some(_) => Err(work),
        None => Ok(joined(work.await)?),
    };
    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let include_usage = req.include_usage();
    let stall = s.config.stream_stall;
    tokio::spawn(async move {
        // a caller who stops reading holds nothing for long: past the stall bound the answer
        // ends (the body closes, the connection goes)
        let send = |b| {
            let ev_tx = &ev_tx;
            async move {
                match tokio::time::timeout(stall, ev_tx.send(b)).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(()),
                }
            }
        };
        if let Some(open) = shaper.opening()
            && send(event(&open)).await.is_err()
        {
            return;
        }
        let finished = match work {
            Ok(done) => Ok(done),
            Err(work) => {
                let mut next = first;
                while let Some(d) = next {
                    // a caller who left is told to the plugin by dropping `delta_rx` on return
                    if send(event(&shaper.delta(&d))).await.is_err() {
                        return;
                    }
                    next = delta_rx.recv().await;
                }
                joined(work.await)
            }
        };
        match finished {
            Ok((o, receipt)) => {
                if send(event(&shaper.closing(&o, receipt.as_ref()))).await.is_err() {
                    return;
                }
                if include_usage {
                    let mut u = shaper.usage(&o);
                    if let Some(r) = &receipt {
                        u["receipt"] = serde_json::to_value(r).unwrap_or_default();
                    }
                    let _ = send(event(&u)).await;
                }
                let _ = send(done()).await;
            }
            Err(e) => {
                let _ = send(event(&e.to_json())).await;
            }
        }
    });
    Ok(sse_response(ev_rx))
}
