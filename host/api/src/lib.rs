//! The OpenAI-compatible HTTP API of a DIV host (axum on hyper).
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/embeddings`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events with
//! `stream: true`), `GET /healthz`, `GET /metrics`, and the payment routes (`/v1/keys`,
//! `/v1/siwe*`, `/v1/me`, `/v1/host*`). Errors are OpenAI's `{"error":{"message","type","param","code"}}` with one
//! status and one stable code per case ([`ApiError`]); every answer carries `x-request-id`.
//! Inference runs in the plugin runtime on blocking threads, never on the async workers.

mod body;
mod chat;
mod embeddings;
mod error;
mod metrics;
mod server;

pub use error::ApiError;
pub use metrics::Metrics;
pub use server::{ApiConfig, AppState, ModelLoader, router};
