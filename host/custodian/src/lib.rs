//! Key custodians: independent services that each hold one share of a model's content key and
//! release it, sealed, only to hosts the model's owner authorised on-chain.
//!
//! - [`protocol`]: the messages and the exact texts each party signs;
//! - [`server`]: the custodian service behind `div custodian`;
//! - [`client`]: depositing shares (owners) and collecting a key from a threshold of custodians
//!   (hosts), verifying every share against the commitments before combining.

pub mod client;
pub mod metrics;
pub mod protocol;
pub mod server;

pub use client::{
    Collected, CustodianError, Endpoint, collect_key, deposit, deposit_sealed, fetch_info, request_share,
    seal_share,
};
pub use server::{Custodian, router};
