//! The connection to the ledger's database: re-opened when lost, every call under a deadline,
//! and amounts (`numeric(78, 0)`) passed as text.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::U256;
use tokio_postgres::{Client, NoTls};

use crate::MeterError;

/// How long one database call may take before the caller gets a ledger error.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the ledger's database, re-opened when it is lost.
pub(super) struct Conn {
    url: String,
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl Conn {
    pub(super) fn new(url: &str) -> Self {
        Self { url: url.to_string(), client: tokio::sync::Mutex::new(None) }
    }

    pub(super) async fn get(&self) -> Result<Arc<Client>, MeterError> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(connect(&self.url).await?);
        *g = Some(c.clone());
        Ok(c)
    }
}

pub(super) async fn connect(url: &str) -> Result<Client, MeterError> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| unavailable("connecting timed out"))?
            .map_err(|e| unavailable(&e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("ledger database connection closed: {e}");
        }
    });
    Ok(client)
}

pub(super) fn unavailable(why: &str) -> MeterError {
    MeterError::Ledger(format!("the ledger database is unavailable: {why}"))
}

pub(super) fn pg_err(e: tokio_postgres::Error) -> MeterError {
    match e.as_db_error() {
        Some(db) => MeterError::Ledger(format!("the ledger database: {}", db.message())),
        None => unavailable(&e.to_string()),
    }
}

pub(super) async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, MeterError> {
    tokio::time::timeout(CALL_TIMEOUT, f).await.map_err(|_| unavailable("a call timed out"))?.map_err(pg_err)
}

pub(super) fn num(v: U256) -> String {
    v.to_string()
}

pub(super) fn parse_num(s: &str) -> Result<U256, MeterError> {
    s.parse().map_err(|_| MeterError::Ledger(format!("the ledger database returned a bad amount {s:?}")))
}
