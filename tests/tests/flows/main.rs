//! Whole flows against real parts. Each module is one area; all share this one binary.

mod api;
mod batching;
mod chain;
mod chat;
mod result_cache;
mod runtime;
mod shared_ledger;
