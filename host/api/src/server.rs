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
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use div_meter::{Credential, Meter, ModelRef, PermitFields};
use div_models::ModelStore;
use serde_json::json;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::body::read_json;
use crate::chat::{GenerateRequest, HangUp, Kind, Outcome, Shaper, Waiting, done, event, sse_response};
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
    meter: Option<Arc<Meter>>,
    settler: Option<(div_chain::Client, Arc<str>)>,
    loader: Option<ModelLoader>,
    /// What a browser needs to reach the chain: the address book (with a public RPC URL).
    deployment: Option<Arc<serde_json::Value>>,
    /// The built dApp served at `/`.
    web_dir: Option<Arc<std::path::Path>>,
}

/// Asked for a model the store does not hold; starts loading it and returns true if it knows it
/// (e.g. a vault model the byte-bounded cache unloaded).
pub type ModelLoader = Arc<dyn Fn(&str) -> bool + Send + Sync>;

impl AppState {
    /// State over a model store and metrics; every model is free.
    pub fn new(store: Arc<ModelStore>, metrics: Arc<Metrics>, config: ApiConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrency.max(1)));
        Self {
            store,
            metrics,
            config,
            permits,
            meter: None,
            settler: None,
            loader: None,
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

    /// Loads models on demand that the store does not hold (see [`ModelLoader`]).
    pub fn with_loader(mut self, loader: ModelLoader) -> Self {
        self.loader = Some(loader);
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

    /// The model `name` if it serves `task` (`what`, in words, for the error).
    fn model_for(
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
    fn paid(&self, model: &div_models::LoadedModel) -> Option<(Arc<Meter>, ModelRef)> {
        match (&self.meter, vault_ref(model)) {
            (Some(meter), Some(mref)) => Some((meter.clone(), mref)),
            _ => None,
        }
    }

    fn missing(&self, model: &str) -> ApiError {
        match &self.loader {
            Some(load) if load(model) => ApiError::model_loading(model),
            _ => ApiError::model_not_found(model),
        }
    }

    /// Lets `POST /v1/host/settle` (with `Authorization: Bearer <admin_token>`) settle at once
    /// with `client`, the host's wallet.
    pub fn with_settler(mut self, client: div_chain::Client, admin_token: &str) -> Self {
        self.settler = Some((client, Arc::from(admin_token)));
        self
    }
}

/// The `ModelVault` id of a model loaded from the vault.
fn vault_ref(m: &div_models::LoadedModel) -> Option<ModelRef> {
    match &m.origin {
        div_models::Origin::Vault { model_id, .. } => {
            Some(ModelRef { name: m.manifest.name.clone(), model_id: (*model_id).into() })
        }
        div_models::Origin::Folder(_) => None,
    }
}

/// The request's id (from `x-request-id`), or "-".
fn request_id_of(request_id: Option<axum::Extension<RequestId>>) -> Arc<str> {
    request_id.and_then(|r| r.0.header_value().to_str().ok().map(Arc::from)).unwrap_or_else(|| Arc::from("-"))
}

/// The caller's credential: a bearer key, else a permit in `X-DIV-Permit`.
fn credential(headers: &HeaderMap) -> Result<Credential<'_>, ApiError> {
    if let Some(key) = bearer(headers) {
        return Ok(if key.starts_with("div-session-") {
            Credential::Session(key)
        } else {
            Credential::ApiKey(key)
        });
    }
    let Some(v) = headers.get("x-div-permit") else { return Ok(Credential::None) };
    let bad = |m: &str| ApiError::from(div_meter::MeterError::Invalid(format!("X-DIV-Permit: {m}")));
    let raw = v.to_str().map_err(|_| bad("not ASCII"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim().trim_end_matches('='))
        .map_err(|_| bad("not base64url"))?;
    let sp: div_meter::SignedPermit =
        serde_json::from_slice(&json).map_err(|e| bad(&format!("not a signed permit: {e}")))?;
    Ok(Credential::Permit { permit: sp.permit, signature: sp.signature })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// The routes of a DIV host.
pub fn router(state: AppState) -> Router {
    let web = state.web_dir.clone();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/keys", post(issue_key))
        .route("/v1/host", get(host_info))
        .route("/v1/siwe/nonce", get(siwe_nonce))
        .route("/v1/siwe", post(siwe_sign_in))
        .route("/v1/me", get(me))
        .route("/v1/host/settle", post(settle_now))
        .fallback_service(tower::service_fn(move |req: Request<Body>| {
            let web = web.clone();
            async move { Ok::<_, std::convert::Infallible>(fallback(web, req).await) }
        }))
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

/// Unknown API routes get a JSON 404; anything else is the dApp's, when one is served.
async fn fallback(web: Option<Arc<std::path::Path>>, req: Request<Body>) -> Response {
    let path = req.uri().path();
    let api = path == "/v1" || path.starts_with("/v1/") || path == "/metrics" || path == "/healthz";
    match web {
        Some(dir) if !api && matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) => {
            let index = tower_http::services::ServeFile::new(dir.join("index.html"));
            let serve = tower_http::services::ServeDir::new(&*dir).fallback(index);
            match tower::ServiceExt::oneshot(serve, req).await {
                Ok(r) => r.map(Body::new),
                Err(e) => ApiError::internal(format!("serving the web app: {e}")).into_response(),
            }
        }
        _ => ApiError::route_not_found(req.uri().path()).into_response(),
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

async fn healthz(State(s): State<AppState>) -> Response {
    axum::Json(json!({"status": "ok", "models": s.store.list().len()})).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    if let Some(m) = &s.meter {
        s.metrics.set_unsettled(m.ledger().unsettled_total());
    }
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
        "model_id": vault_ref(m).map(|r| format!("{:#x}", r.model_id)),
    })
}

fn meter_of(s: &AppState, route: &str) -> Result<Arc<Meter>, ApiError> {
    s.meter.clone().ok_or_else(|| ApiError::route_not_found(route))
}

/// `GET /v1/siwe/nonce`: a single-use nonce for an EIP-4361 message.
async fn siwe_nonce(State(s): State<AppState>) -> Response {
    match meter_of(&s, "/v1/siwe/nonce") {
        Ok(m) => {
            axum::Json(json!({"nonce": m.sessions.nonce(), "chain_id": m.config().chain_id})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct SignIn {
    message: String,
    signature: String,
}

/// `POST /v1/siwe`: a signed EIP-4361 message for this host in, a session token out.
async fn siwe_sign_in(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let m = meter_of(&s, "/v1/siwe")?;
        let req: SignIn = read_json(body, 16 * 1024).await?;
        let domain = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (token, address) =
            m.sessions.sign_in(&req.message, &req.signature, domain, m.config().chain_id, now as i64)?;
        Ok::<_, ApiError>(axum::Json(json!({"token": token, "address": address})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/me`: the signed-in address and its permits on this host.
async fn me(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let result = (|| {
        let m = meter_of(&s, "/v1/me")?;
        let who = bearer(&headers)
            .and_then(|t| m.sessions.address(t))
            .ok_or_else(|| ApiError::from(div_meter::MeterError::MissingCredential))?;
        let permits: Vec<_> = m
            .ledger()
            .accounts()
            .into_iter()
            .filter(|(_, a)| a.permit.user == who)
            .map(|(h, a)| {
                json!({
                    "permit_hash": format!("{h:#x}"),
                    "model": a.model,
                    "max_amount": a.permit.max_amount.to_string(),
                    "expiry": a.permit.expiry,
                    "charged_amount": a.charged_amount.to_string(),
                    "charged_requests": a.charged_requests,
                    "settled_amount": a.settled_amount.to_string(),
                    "settled_requests": a.settled_requests,
                })
            })
            .collect();
        Ok::<_, ApiError>(axum::Json(json!({"address": who, "permits": permits})).into_response())
    })();
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/host`: what a user needs to sign a permit for this host.
async fn host_info(State(s): State<AppState>) -> Response {
    let mut info = match &s.meter {
        Some(m) => json!({
            "host": m.config().host.address(),
            "chain_id": m.config().chain_id,
            "payment_stream": m.config().payment_stream,
            "model_vault": m.config().model_vault,
            "metered": true,
        }),
        None => json!({"metered": false}),
    };
    if let Some(d) = &s.deployment {
        info["deployment"] = (**d).clone();
    }
    axum::Json(info).into_response()
}

async fn list_models(State(s): State<AppState>) -> Response {
    let data: Vec<_> = s.store.list().iter().map(|m| model_json(m)).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.store.get(&id) {
        Some(m) => {
            let mut body = model_json(&m);
            if let (Some(meter), Some(r)) = (&s.meter, vault_ref(&m)) {
                let u = meter.ledger().usage_of(r.model_id);
                body["usage"] = json!({
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
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let rid = request_id_of(request_id);
    let mut model_label = "unknown".to_string();
    let result = embed(&s, rid, &headers, body, &mut model_label).await.map(|r| {
        let receipt = r.receipt.clone();
        with_receipt_header(axum::Json(r).into_response(), receipt.as_ref())
    });
    answered(&s, "/v1/embeddings", &model_label, started, result)
}

/// An inference route's answer: the error (logged when it is the host's fault) or the response,
/// counted in the metrics either way.
fn answered(
    s: &AppState,
    route: &str,
    model_label: &str,
    started: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let response = result.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            tracing::warn!(model = %model_label, code = e.code, "{}", e.message);
        }
        e.into_response()
    });
    s.metrics.request(route, model_label, response.status().as_u16(), started.elapsed());
    response
}

async fn embed(
    s: &AppState,
    rid: Arc<str>,
    headers: &HeaderMap,
    body: Body,
    model_label: &mut String,
) -> Result<EmbeddingsResponse, ApiError> {
    let req: EmbeddingsRequest = read_json(body, s.config.max_body_bytes).await?;
    let model = s.model_for(&req.model, "embeddings", "embeddings", model_label)?;
    let encoding = req.encoding()?;
    req.check_dimensions(model.manifest.dimensions)?;
    let inputs = req.inputs()?;
    // gate and reserve the price before any work; charged only if the plugin succeeds
    let paid = s.paid(&model);
    let ticket = match &paid {
        Some((meter, mref)) => meter.admit(credential(headers)?, mref, inputs.len()).await?,
        None => None,
    };
    let permit = s.permits.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    s.metrics.in_flight().inc();
    let in_flight = InFlight(s.metrics.clone());
    let m = model.clone();
    let count = inputs.len();
    let sandbox_rid = rid.clone();
    // the permit and the gauge travel with the work: a caller who disconnects drops this future,
    // but the sandbox runs to its end and holds its slot until then
    let (result, timings) = tokio::task::spawn_blocking(move || {
        let _held = (permit, in_flight);
        m.plugin.embed(&inputs, sandbox_rid)
    })
    .await
    .map_err(|e| ApiError::internal(format!("the sandbox thread failed: {e}")))?;
    s.metrics.sandbox(&model.manifest.name, timings.instantiate, timings.call);
    let out = result?;
    check_vectors(&out.vectors, count, model.manifest.dimensions)?;
    let mut response =
        EmbeddingsResponse::new(&model.manifest.name, out.vectors, out.prompt_tokens, encoding);
    if let (Some(ticket), Some((meter, mref))) = (ticket, &paid) {
        // durable before the answer leaves
        response.receipt = Some(meter.charge(ticket, &rid, mref).await?);
    }
    Ok(response)
}

async fn chat_completions(
    State(s): State<AppState>,
    request_id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_route(s, request_id, headers, body, Kind::Chat).await
}

async fn completions(
    State(s): State<AppState>,
    request_id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_route(s, request_id, headers, body, Kind::Completion).await
}

async fn generate_route(
    s: AppState,
    request_id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Response {
    let started = Instant::now();
    let rid = request_id_of(request_id);
    let mut model_label = "unknown".to_string();
    let result = generate(&s, rid, &headers, body, kind, &mut model_label).await;
    answered(&s, kind.route(), &model_label, started, result)
}

fn with_receipt_header(mut resp: Response, receipt: Option<&div_meter::Receipt>) -> Response {
    if let Some(json) = receipt.and_then(|rc| serde_json::to_vec(rc).ok())
        && let Ok(v) = HeaderValue::from_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    {
        resp.headers_mut().insert("x-div-receipt", v);
    }
    resp
}

/// Reads the plugin's answer, trusting its token counts only within the request's bounds.
fn outcome_of(resp: div_runtime::Response, max_tokens: u32, context: u32) -> Result<Outcome, ApiError> {
    if resp.status != 200 {
        return Err(ApiError::internal(format!(
            "the model's plugin answered {}: {}",
            resp.status, resp.body
        )));
    }
    let mut o: Outcome = serde_json::from_str(&resp.body).map_err(|e| {
        ApiError::internal(format!("the model's plugin answered a body this host cannot read: {e}"))
    })?;
    o.usage.completion_tokens = o.usage.completion_tokens.min(max_tokens);
    o.usage.prompt_tokens = o.usage.prompt_tokens.min(context);
    Ok(o)
}

async fn generate(
    s: &AppState,
    rid: Arc<str>,
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
    let max_tokens = plugin_body["max_tokens"].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(1);
    // gate, and reserve the price of a full context; charged only for the tokens used
    let paid = s.paid(&model);
    let ticket = match &paid {
        Some((meter, mref)) => meter.admit_tokens(credential(headers)?, mref, 1, u64::from(context)).await?,
        None => None,
    };
    let permit = s.permits.clone().try_acquire_owned().map_err(|_| ApiError::overloaded())?;
    s.metrics.in_flight().inc();
    let in_flight = InFlight(s.metrics.clone());
    let shaper = Arc::new(Shaper::new(kind, &rid, &model.manifest.name));
    let request = div_runtime::Request { route: kind.route().into(), body: plugin_body.to_string() };
    let (delta_tx, mut delta_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let waiting = Waiting::new();
    let sink: div_runtime::StreamSink = if req.stream {
        Box::new(move |d: &str| delta_tx.send(d.to_string()).is_ok())
    } else {
        drop(delta_tx);
        let w = waiting.clone();
        Box::new(move |_: &str| w.still())
    };
    // the generation and its charge run to their end in a task of their own, caller or not
    let (m, metrics, sandbox_rid) = (model.clone(), s.metrics.clone(), rid.clone());
    let work = tokio::spawn(async move {
        let name = m.manifest.name.clone();
        let (result, timings) = tokio::task::spawn_blocking(move || {
            let _held = (permit, in_flight);
            m.plugin.handle_streaming(&request, sandbox_rid, sink)
        })
        .await
        .map_err(|e| ApiError::internal(format!("the sandbox thread failed: {e}")))?;
        metrics.sandbox(&name, timings.instantiate, timings.call);
        let outcome = outcome_of(result?, max_tokens, context)?;
        metrics.generation(
            &name,
            outcome.usage.prompt_tokens,
            outcome.usage.completion_tokens,
            outcome.finish_reason == "cancelled",
        );
        let tokens = u64::from(outcome.usage.prompt_tokens) + u64::from(outcome.usage.completion_tokens);
        let receipt = match (ticket, &paid) {
            // durable before the answer (or the stream's last chunk) leaves
            (Some(t), Some((meter, mref))) => Some(meter.charge_tokens(t, &rid, mref, tokens).await?),
            _ => None,
        };
        Ok::<_, ApiError>((outcome, receipt))
    });
    let joined = |r: Result<
        Result<(Outcome, Option<div_meter::Receipt>), ApiError>,
        tokio::task::JoinError,
    >| { r.map_err(|e| ApiError::internal(format!("the generation task failed: {e}")))? };
    if !req.stream {
        let _hang_up = HangUp(waiting);
        let (o, receipt) = joined(work.await)?;
        return Ok(with_receipt_header(
            axum::Json(shaper.answer(&o, receipt.as_ref())).into_response(),
            receipt.as_ref(),
        ));
    }
    // wait for the first piece before answering 200, so a request the plugin refuses at once
    // gets its real status instead of an error event
    let first = delta_rx.recv().await;
    let work = match first {
        Some(_) => Err(work),
        None => Ok(joined(work.await)?),
    };
    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    let include_usage = req.include_usage();
    tokio::spawn(async move {
        let send = |b| ev_tx.send(b);
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

/// `POST /v1/host/settle`: the operator settles now instead of waiting for the next round.
async fn settle_now(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let (Some(meter), Some((client, token))) = (&s.meter, &s.settler) else {
        return ApiError::route_not_found("/v1/host/settle").into_response();
    };
    if bearer(&headers) != Some(&**token) {
        return ApiError::from(div_meter::MeterError::InvalidKey).into_response();
    }
    match div_meter::settle::settle_now(meter, client, None).await {
        Ok(r) => {
            s.metrics.settlement(&r);
            axum::Json(json!({
                "tx": r.tx.map(|t| format!("{t:#x}")),
                "settled": r.settled,
                "skipped": r.skipped.len(),
                "requests": r.requests,
                "amount": r.amount.to_string(),
                "gas_used": r.gas_used,
            }))
            .into_response()
        }
        Err(e) => {
            s.metrics.settlement_failed();
            ApiError::from(e).into_response()
        }
    }
}

/// `POST /v1/keys`: a signed spending permit in, the one API key it gets out.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyRequest {
    permit: PermitFields,
    signature: alloy::primitives::Bytes,
    #[serde(default, alias = "chain_id")]
    chain_id: Option<u64>,
    #[serde(default, alias = "verifying_contract")]
    verifying_contract: Option<alloy::primitives::Address>,
}

async fn issue_key(State(s): State<AppState>, body: Body) -> Response {
    let result = async {
        let meter = s.meter.as_ref().ok_or_else(|| ApiError::route_not_found("/v1/keys"))?;
        let req: KeyRequest = read_json(body, 64 * 1024).await?;
        let model = s
            .store
            .list()
            .into_iter()
            .find_map(|m| vault_ref(&m).filter(|r| r.model_id == req.permit.model_id))
            .ok_or_else(|| ApiError::model_not_found(&format!("{:#x}", req.permit.model_id)))?;
        let claimed = match (req.chain_id, req.verifying_contract) {
            (None, None) => None,
            (c, v) => {
                Some((c.unwrap_or(meter.config().chain_id), v.unwrap_or(meter.config().payment_stream)))
            }
        };
        let expires = req.permit.expiry;
        let (key, hash) = meter.issue_key(req.permit, req.signature, claimed, &model).await?;
        Ok::<_, ApiError>(
            (
                StatusCode::CREATED,
                axum::Json(json!({
                    "object": "api_key",
                    "key": key,
                    "model": model.name,
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
