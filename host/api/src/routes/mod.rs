//! The routes, one file per family (as Spin splits its HTTP trigger): a trust boundary has one
//! file to read and one to test.
//!
//! - [`models`]: the catalogue, liveness, readiness, metrics;
//! - [`infer`]: `POST /v1/embeddings`, and what every inference route shares (admission, the
//!   answer counted in the metrics);
//! - [`generate`]: `POST /v1/chat/completions` and `/v1/completions`, streamed or not;
//! - [`keys`]: API keys for permits (with proof of the permit's user), receipts;
//! - [`session`]: Sign-In with Ethereum, `GET /v1/me`;
//! - [`host`]: what to sign for this host, settle now;
//! - [`web`]: the dApp's files and JSON 404s.

pub mod generate;
pub mod host;
pub mod infer;
pub mod keys;
pub mod models;
pub mod session;
pub mod web;
