//! The router: which routes exist, and what runs around every request.
//!
//! Around every request, outermost first: a panic guard (a bug answers 500, never a dropped
//! connection); the request ids (the host makes its own unique id, `x-request-id` of the answer
//! and what receipts sign, and keeps the one the client sent, if any, as `x-client-request-id`);
//! a tracing span with both; a bound on the headers' size (431 with a JSON body); and a deadline
//! on each piece of the request body (a caller who stops sending mid-body gets 408, not a
//! connection held open). Every answer, error or not, carries `x-request-id`.
//!
//! The routes live in [`crate::routes`], one file per family.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tracing::Instrument;

use crate::error::ApiError;
use crate::routes;
use crate::state::{AppState, RequestIds};

/// Largest request head (request line and headers) answered with more than a bare status.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// Longest wait for the next piece of a request body.
pub const BODY_STALL: Duration = Duration::from_secs(10);
/// Longest client request id kept.
const MAX_CLIENT_ID: usize = 128;

/// The routes of a DIV host.
pub fn router(state: AppState) -> Router {
    let web = state.web_dir.clone();
    Router::new()
        .route("/healthz", get(routes::models::healthz))
        .route("/readyz", get(routes::models::readyz))
        .route("/metrics", get(routes::models::metrics))
        .route("/v1/models", get(routes::models::list_models))
        .route("/v1/models/{id}", get(routes::models::get_model))
        .route("/v1/embeddings", post(routes::infer::embeddings))
        .route("/v1/chat/completions", post(routes::generate::chat_completions))
        .route("/v1/completions", post(routes::generate::completions))
        .route("/v1/keys", post(routes::keys::issue_key))
        .route("/v1/keys/challenge", get(routes::keys::challenge))
        .route("/v1/receipts/{id}", get(routes::keys::receipt))
        .route("/v1/host", get(routes::host::host_info))
        .route("/v1/siwe/nonce", get(routes::session::siwe_nonce))
        .route("/v1/siwe", post(routes::session::siwe_sign_in).delete(routes::session::siwe_sign_out))
        .route("/v1/me", get(routes::session::me))
        .route("/v1/host/settle", post(routes::host::settle_now))
        .fallback_service(tower::service_fn({
            let state = state.clone();
            move |req: Request<Body>| {
                let (web, state) = (web.clone(), state.clone());
                async move { Ok::<_, std::convert::Infallible>(routes::web::fallback(web, &state, req).await) }
            }
        }))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::internal("the host failed on this request").into_response()
                }))
                .layer(axum::middleware::from_fn(request_ids))
                .layer(axum::middleware::from_fn(public_cors))
                .layer(axum::middleware::from_fn(header_bound))
                .layer(RequestBodyTimeoutLayer::new(BODY_STALL)),
        )
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Gives the request the host's id and keeps the client's, and runs it in a span with both.
async fn request_ids(mut req: Request, next: Next) -> Response {
    let client: Option<Arc<str>> = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= MAX_CLIENT_ID && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from);
    let host: Arc<str> = Arc::from(format!("req_{}", uuid::Uuid::new_v4().simple()));
    req.extensions_mut().insert(RequestIds { host: host.clone(), client: client.clone() });
    let span = tracing::info_span!(
        "request",
        request_id = %host,
        client_request_id = client.as_deref().unwrap_or("-"),
        method = %req.method(),
        path = %req.uri().path(),
    );
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&host) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(c) = client
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        resp.headers_mut().insert("x-client-request-id", v);
    }
    resp
}

/// Paths any web page may read (CORS): the dApp served by one host lists the other hosts a model
/// is served on, checks each is up, answers as the address it registered, and how fast.
/// Nothing else is opened to other origins (no credentials, no writes).
const CROSS_ORIGIN_READABLE: [&str; 2] = ["/healthz", "/v1/host"];

async fn public_cors(req: Request, next: Next) -> Response {
    let open = req.method() == Method::GET && CROSS_ORIGIN_READABLE.contains(&req.uri().path());
    let mut resp = next.run(req).await;
    if open {
        resp.headers_mut().insert("access-control-allow-origin", HeaderValue::from_static("*"));
    }
    resp
}

/// Refuses requests whose headers pass [`MAX_HEADER_BYTES`] with a JSON 431.
async fn header_bound(req: Request, next: Next) -> Response {
    let size: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
        + req.uri().to_string().len();
    if size > MAX_HEADER_BYTES {
        return ApiError::headers_too_large(size, MAX_HEADER_BYTES).into_response();
    }
    next.run(req).await
}

/// Whether a path belongs to the API (JSON 404s) rather than the dApp.
pub(crate) fn is_api_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/metrics" || path == "/healthz" || path == "/readyz"
}

/// Methods the dApp's files are served for.
pub(crate) fn is_read(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD)
}
