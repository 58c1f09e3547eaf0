//! The router and its state: which routes exist, what runs around every request (request id,
//! tracing span, panic guard), and how an inference request travels: parse → find the model →
//! validate → take a concurrency permit (or answer 503 at once) → run the plugin in a fresh
//! sandbox on a blocking thread → shape the answer. Every answer, error or not, carries
//! `x-request-id` and is counted in the metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use div_models::ModelStore;
use serde_json::json;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::body::read_json;
use crate::embeddings::{EmbeddingsRequest, EmbeddingsResponse};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct ApiConfig {
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Inference requests served at once; more are answered 503 with `Retry-After`.
    pub max_concurrency: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { max_body_bytes: 4 << 20, max_concurrency: 64 }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    store: Arc<ModelStore>,
    metrics: Arc<Metrics>,
    config: ApiConfig,
    permits: Arc<Semaphore>,
}

impl AppState {
    /// State over a model store and metrics.
    pub fn new(store: Arc<ModelStore>, metrics: Arc<Metrics>, config: ApiConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
        Self { store, metrics, config, permits }
    }
}

/// The routes of a DIV host.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                }))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(CatchPanicLayer::custom(|_| ApiError::internal("the host failed on this request").into_response())),
        )
}

async fn not_found(req: Request<Body>) -> ApiError {
    ApiError::route_not_found(req.uri().path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

async fn healthz(State(s): State<AppState>) -> Response {
    axum::Json(json!({"status": "ok", "models": s.store.list().len()})).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
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

fn model_json(m: &div_models::LoadedModel) -> serde_json::Value {
    json!({
        "id": m.manifest.name,
        "object": "model",
        "created": m.created,
        "owned_by": "div",
        "task": m.manifest.task,
        "dimensions": m.manifest.dimensions,
        "max_input_tokens": m.manifest.max_seq_length,
    })
}

async fn list_models(State(s): State<AppState>) -> Response {
    let data: Vec<_> = s.store.list().iter().map(|m| model_json(m)).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.store.get(&id) {
        Some(m) => axum::Json(model_json(&m)).into_response(),
        None => ApiError::model_not_found(&id).into_response(),
    }
}

/// Decrements the in-flight gauge when the sandbox work ends, however it ends.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight().dec();
    }
}

async fn embeddings(
    State(s): State<AppState>,
    request_id: Option<axum::Extension<RequestId>>,
    body: Body,
) -> Response {
    let started = Instant::now();
    let rid: Arc<str> = request_id
        .and_then(|r| r.0.header_value().to_str().ok().map(Arc::from))
        .unwrap_or_else(|| Arc::from("-"));
    let mut model_label = "unknown".to_string();
    let result = embed(&s, rid, body, &mut model_label).await;
    let response = match result {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(model = %model_label, code = e.code, "{}", e.message);
            }
            e.into_response()
        }
    };
    s.metrics.request("/v1/embeddings", &model_label, response.status().as_u16(), started.elapsed());
    response
}

async fn embed(
    s: &AppState,
    rid: Arc<str>,
    body: Body,
    model_label: &mut String,
) -> Result<EmbeddingsResponse, ApiError> {
    let req: EmbeddingsRequest = read_json(body, s.config.max_body_bytes).await?;
    let model = s.store.get(&req.model).ok_or_else(|| ApiError::model_not_found(&req.model))?;
    model_label.clone_from(&model.manifest.name);
    if model.manifest.task != "embeddings" {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            ..ApiError::invalid(
                "model",
                "unsupported_task",
                format!("the model '{}' serves {}, not embeddings", req.model, model.manifest.task),
            )
        });
    }
    let encoding = req.encoding()?;
    req.check_dimensions(model.manifest.dimensions)?;
    let inputs = req.inputs()?;
    let permit = s.permits.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    s.metrics.in_flight().inc();
    let in_flight = InFlight(s.metrics.clone());
    let m = model.clone();
    let count = inputs.len();
    // the permit and the gauge travel with the work: a caller who disconnects drops this future,
    // but the sandbox runs to its end and holds its slot until then
    let (result, timings) = tokio::task::spawn_blocking(move || {
        let _held = (permit, in_flight);
        m.plugin.embed(&inputs, rid)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the sandbox thread failed: {e}")))?;
    s.metrics.sandbox(&model.manifest.name, timings.instantiate, timings.call);
    let out = result?;
    check_vectors(&out.vectors, count, model.manifest.dimensions)?;
    Ok(EmbeddingsResponse::new(&model.manifest.name, out.vectors, out.prompt_tokens, encoding))
}

/// A plugin is untrusted: its answer must have one finite vector per input, of the model's size.
fn check_vectors(vectors: &[Vec<f32>], inputs: usize, dims: Option<u32>) -> Result<(), ApiError> {
    let bad = |m: String| ApiError {
        code: "plugin_error",
        ..ApiError::internal(format!("the model's plugin returned an invalid answer: {m}"))
    };
    if vectors.len() != inputs {
        return Err(bad(format!("{} vectors for {inputs} inputs", vectors.len())));
    }
    for (i, v) in vectors.iter().enumerate() {
        if let Some(d) = dims
            && v.len() != d as usize
        {
            return Err(bad(format!("vector {i} has {} dimensions, the model has {d}", v.len())));
        }
        if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("vector {i} is empty or not finite")));
        }
    }
    Ok(())
}
