//! JSON-RPC connections with deadlines.
//!
//! alloy's default HTTP client waits for an answer forever, so a chain node that stops
//! answering (paused, overloaded, a half-open connection) hangs whatever asked it. Every
//! connection DIV makes goes through here instead: each call gives up after a deadline, which
//! callers then treat exactly like a refused connection.

use std::time::Duration;

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;

use crate::error::ChainError;

/// How long one JSON-RPC call may take unless a caller says otherwise.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP client whose requests give up after `timeout` (connecting: at most 2 s of it).
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .build()
        .unwrap_or_default()
}

/// The RPC client for `url` with a deadline on every call.
pub fn rpc_client(url: &str, timeout: Duration) -> Result<RpcClient, ChainError> {
    let parsed = url.parse().map_err(|_| ChainError::Contract {
        what: "parsing the RPC URL",
        reason: format!("not a URL: {url}"),
    })?;
    Ok(RpcClient::new_http_with_client(http_client(timeout), parsed))
}

/// A read-only provider for `url` whose calls give up after `timeout`.
pub fn read_provider(url: &str, timeout: Duration) -> Result<DynProvider, ChainError> {
    Ok(ProviderBuilder::new().connect_client(rpc_client(url, timeout)?).erased())
}
