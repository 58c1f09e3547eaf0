//! The OpenAI-compatible HTTP API of a DIV host (axum on hyper).
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/embeddings`, `GET /healthz`,
//! `GET /metrics`. Errors are OpenAI's `{"error":{"message","type","param","code"}}` with one
//! status and one stable code per case ([`ApiError`]); every answer carries `x-request-id`.
//! Inference runs in the plugin runtime on blocking threads, never on the async workers.

mod body;
mod embeddings;
mod error;
mod metrics;
mod server;

pub use error::ApiError;
pub use metrics::Metrics;
pub use server::{ApiConfig, AppState, ModelLoader, router};
