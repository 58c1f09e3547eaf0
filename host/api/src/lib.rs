//! The OpenAI-compatible HTTP API of a DIV host (axum on hyper).
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/embeddings`,
//! `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events with
//! `stream: true`), `GET /healthz` (liveness), `GET /readyz` (readiness, per model),
//! `GET /metrics`, and the payment routes (`/v1/keys`, `/v1/keys/challenge`,
//! `/v1/receipts/{id}`, `/v1/siwe*`, `/v1/me`, `/v1/host*`). Errors are OpenAI's
//! `{"error":{"message","type","param","code"}}` with one status and one stable code per case
//! ([`ApiError`]); every answer carries `x-request-id`. Inference runs in the plugin runtime on
//! blocking threads, never on the async workers. [`serve`] runs the router with the connection
//! limits a public server needs.

mod body;
mod chat;
mod embeddings;
mod error;
mod grammar;
mod metrics;
mod routes;
mod serve;
mod server;
pub mod shared;
mod state;

pub use error::ApiError;
pub use metrics::Metrics;
pub use serve::{ServeConfig, serve};
pub use server::{BODY_STALL, MAX_HEADER_BYTES, router};
pub use state::{ApiConfig, AppState, Catalog, RequestIds, siwe_domain};
