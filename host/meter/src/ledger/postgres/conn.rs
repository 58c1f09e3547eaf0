//! The connection to the ledger's database: re-opened when lost, every call under a deadline,
//! and amounts (`numeric(78, 0)`) passed as text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::U256;
use tokio_postgres::{Client, NoTls, Statement};

use crate::MeterError;

/// How long one database call may take before the caller gets a ledger error.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the ledger's database, re-opened when it is lost, with the statements it
/// has prepared (a statement sent as text is parsed and planned again on every call: the
/// charge and the refresh, which run all the time, are prepared once per connection).
pub(super) struct Conn {
    url: String,
    client: tokio::sync::Mutex<Option<(Arc<Client>, Prepared)>>,
}

type Prepared = Arc<std::sync::Mutex<HashMap<String, Statement>>>;

impl Conn {
    pub(super) fn new(url: &str) -> Self {
        Self { url: url.to_string(), client: tokio::sync::Mutex::new(None) }
    }

    async fn current(&self) -> Result<(Arc<Client>, Prepared), MeterError> {
        let mut g = self.client.lock().await;
        if let Some((c, p)) = g.as_ref().filter(|(c, _)| !c.is_closed()) {
            return Ok((c.clone(), p.clone()));
        }
        let c = Arc::new(connect(&self.url).await?);
        let p = Prepared::default();
        *g = Some((c.clone(), p.clone()));
        Ok((c, p))
    }

    pub(super) async fn get(&self) -> Result<Arc<Client>, MeterError> {
        Ok(self.current().await?.0)
    }

    /// The client and `sql` prepared on it (once per connection).
    pub(super) async fn prepared(&self, sql: &str) -> Result<(Arc<Client>, Statement), MeterError> {
        let (c, p) = self.current().await?;
        if let Some(st) = p.lock().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return Ok((c, st.clone()));
        }
        let st = timed(c.prepare(sql)).await?;
        p.lock().unwrap_or_else(|e| e.into_inner()).insert(sql.to_string(), st.clone());
        Ok((c, st))
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

/// Column `i` of a row as `T`: a column of another type is a ledger error, never a panic.
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, MeterError> {
    r.try_get(i)
        .map_err(|e| MeterError::Ledger(format!("the ledger database returned an unexpected row: {e}")))
}

pub(super) fn num(v: U256) -> String {
    v.to_string()
}

pub(super) fn parse_num(s: &str) -> Result<U256, MeterError> {
    s.parse().map_err(|_| MeterError::Ledger(format!("the ledger database returned a bad amount {s:?}")))
}
