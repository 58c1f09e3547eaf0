//! The ledger in PostgreSQL, shared by every replica of one host (`div serve --ledger
//! postgres://…`).
//!
//! The database is the authority; each replica keeps the same in-memory view as the sled ledger
//! (the admission checks read it without a round trip) and refreshes it from the rows that
//! changed since it last looked. What must be exact across replicas is decided in the database,
//! under row locks, when a charge is recorded (`charge` in the migration): the cumulative
//! numbers (so no number is issued twice, whichever replica serves), the permit's cap and the
//! user's unsettled total against the deposit the replica read from the chain. A replica whose
//! view was stale served one request it then cannot charge: the caller gets the same refusal as
//! at admission and pays nothing.
//!
//! **Group commit.** Charges queue for one committer task, which sends everything waiting as one
//! call (one transaction, one WAL flush) and answers each request from its row.
//!
//! **Faults.** A lost connection is re-opened on the next use. A batch whose outcome is unknown
//! (the connection died while it ran) is answered as a ledger error, never retried: the charge
//! may have been recorded, and the client finds out by its request id (`GET /v1/receipts/{id}`),
//! as after a host crash. Only a batch the database certainly rolled back (a deadlock or
//! serialisation failure) is sent again.
//!
//! **Settlement lease.** One replica settles at a time: it holds a session-level advisory lock on
//! a connection of its own; when that replica dies (or PostgreSQL restarts) the lock goes with
//! its connection and another replica takes it at its next round.

mod charge;
mod conn;
mod rows;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use alloy::primitives::{B256, U256};
use tokio_postgres::Client;

use super::index::State;
use super::records::{Charge, PermitAccount};
use crate::MeterError;
pub(crate) use charge::{PgCharge, committer};
use conn::{Conn, col, connect, num, pg_err, timed};
use rows::{account_of, charge_of, merge};

/// The migrations, in order; `{schema}` is replaced by the ledger's schema.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../../migrations/postgres/0001_ledger.sql"))];

/// The ledger's store in PostgreSQL.
pub(super) struct Pg {
    schema: String,
    conn: Conn,
    lease: tokio::sync::Mutex<Option<Client>>,
    lease_url: String,
    held: std::sync::atomic::AtomicBool,
    /// The highest permit version each of the last few refreshes read, oldest first: a refresh
    /// reads from the oldest, because versions are drawn when a transaction writes but become
    /// visible when it commits, so a lower version can appear after a higher one was read.
    marks: Mutex<std::collections::VecDeque<i64>>,
    /// API key hash → permit, for keys this replica has seen.
    keys: Mutex<HashMap<[u8; 32], B256>>,
}

impl Pg {
    /// Connects, creates the schema and applies the migrations it lacks (under a lock, so
    /// replicas starting together do it once).
    pub(super) async fn open(url: &str, schema: &str) -> Result<Self, MeterError> {
        if schema.is_empty()
            || schema.len() > 40
            || !schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(MeterError::Ledger(format!("{schema:?} is not a schema name this ledger uses")));
        }
        let pg = Self {
            schema: schema.to_string(),
            conn: Conn::new(url),
            lease: tokio::sync::Mutex::new(None),
            lease_url: url.to_string(),
            held: std::sync::atomic::AtomicBool::new(false),
            marks: Mutex::new(std::collections::VecDeque::new()),
            keys: Mutex::new(HashMap::new()),
        };
        let mut c = connect(url).await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('div-ledger-migrations'))", &[])
            .await
            .map_err(pg_err)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(pg_err)?;
        for (version, sql) in MIGRATIONS {
            let done = tx
                .query_opt(&format!("SELECT 1 FROM {schema}.migrations WHERE version = $1"), &[version])
                .await
                .map_err(pg_err)?
                .is_some();
            if !done {
                tx.batch_execute(&sql.replace("{schema}", schema)).await.map_err(pg_err)?;
                tx.execute(&format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"), &[version])
                    .await
                    .map_err(pg_err)?;
                tracing::info!(schema, version, "ledger database migrated");
            }
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(pg)
    }

    fn t(&self, table: &str) -> String {
        format!("{}.{table}", self.schema)
    }

    /// Ties the schema to one chain's `PaymentStream` (see `Ledger::bind`).
    pub(super) async fn bind(&self, want: &[u8]) -> Result<Option<Vec<u8>>, MeterError> {
        let c = self.conn.get().await?;
        timed(c.execute(
            &format!("INSERT INTO {} (k, v) VALUES ('chain', $1) ON CONFLICT DO NOTHING", self.t("meta")),
            &[&want],
        ))
        .await?;
        let row =
            timed(c.query_one(&format!("SELECT v FROM {} WHERE k = 'chain'", self.t("meta")), &[])).await?;
        let have: Vec<u8> = col(&row, 0)?;
        Ok((have != want).then_some(have))
    }

    /// Reads the permits changed lately into `state` (rows already read are read again for a
    /// few rounds, see `marks`).
    pub(super) async fn refresh(&self, state: &Mutex<State>) -> Result<(), MeterError> {
        let since = self.marks.lock().unwrap_or_else(|p| p.into_inner()).front().copied().unwrap_or(0);
        let rows = self.read_permits("version > $1 ORDER BY version LIMIT 20000", &[&since]).await?;
        let max = rows.iter().map(|(_, _, _, v)| *v).max().unwrap_or(since);
        self.merge_rows(rows, state);
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let newest = max.max(marks.back().copied().unwrap_or(0));
        marks.push_back(newest);
        while marks.len() > 4 {
            marks.pop_front();
        }
        Ok(())
    }

    /// Reads every permit with something to settle into `state`, however it changed: what the
    /// settler sends must not depend on which rows a refresh happened to see.
    pub(super) async fn refresh_unsettled(&self, state: &Mutex<State>) -> Result<(), MeterError> {
        let rows = self.read_permits("rejected IS NULL AND charged_amount > settled_amount", &[]).await?;
        self.merge_rows(rows, state);
        Ok(())
    }

    async fn read_permits(
        &self,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<(B256, PermitAccount, bool, i64)>, MeterError> {
        let sql = format!(
            "SELECT hash, account::text, charged_amount::text, charged_requests, settled_amount::text,
                    settled_requests, rejected, keyed, version
             FROM {} WHERE {filter}",
            self.t("permits")
        );
        let (c, st) = self.conn.prepared(&sql).await?;
        let rows = timed(c.query(&st, params)).await?;
        rows.iter().map(|r| account_of(r).and_then(|(h, a, k)| Ok((h, a, k, col::<i64>(r, 8)?)))).collect()
    }

    fn merge_rows(&self, rows: Vec<(B256, PermitAccount, bool, i64)>, state: &Mutex<State>) {
        let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
        for (hash, acc, keyed, _) in rows {
            merge(&mut g, hash, acc, keyed);
        }
    }

    /// Records a permit and its key; false if the permit already has a key.
    pub(super) async fn register(
        &self,
        hash: B256,
        account: &PermitAccount,
        key_hash: [u8; 32],
    ) -> Result<bool, MeterError> {
        let c = self.conn.get().await?;
        let json = serde_json::to_string(account).map_err(|e| MeterError::Ledger(e.to_string()))?;
        let p = &account.permit;
        // one statement, so one transaction: the permit, its user's unsettled row, the key
        let sql = format!(
            "WITH permit AS (
                 INSERT INTO {permits} (hash, user_addr, token, model_id, max_amount, account, keyed)
                 VALUES ($1, $2, $3, $4, $5::text::numeric, $6::text::jsonb, true)
                 ON CONFLICT (hash) DO NOTHING
                 RETURNING hash),
             funds AS (
                 INSERT INTO {unsettled} (user_addr, token) VALUES ($2, $3) ON CONFLICT DO NOTHING)
             INSERT INTO {keys} (key_hash, permit) SELECT $7, hash FROM permit RETURNING permit",
            permits = self.t("permits"),
            unsettled = self.t("unsettled"),
            keys = self.t("keys"),
        );
        let rows = timed(c.query(
            &sql,
            &[
                &hash.as_slice(),
                &p.user.as_slice(),
                &p.token.as_slice(),
                &p.model_id.as_slice(),
                &num(p.max_amount),
                &json,
                &key_hash.as_slice(),
            ],
        ))
        .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key_hash, hash);
        Ok(true)
    }

    /// The permit a key spends, from this replica's memory or the database (which then also
    /// brings the permit into `state`).
    pub(super) async fn find_key(
        &self,
        key_hash: [u8; 32],
        state: &Mutex<State>,
    ) -> Result<Option<B256>, MeterError> {
        if let Some(h) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).get(&key_hash) {
            return Ok(Some(*h));
        }
        let c = self.conn.get().await?;
        let row = timed(c.query_opt(
            &format!(
                "SELECT p.hash, p.account::text, p.charged_amount::text, p.charged_requests, p.settled_amount::text,
                        p.settled_requests, p.rejected, p.keyed, p.version
                 FROM {} k JOIN {} p ON p.hash = k.permit WHERE k.key_hash = $1",
                self.t("keys"),
                self.t("permits")
            ),
            &[&key_hash.as_slice()],
        ))
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (hash, acc, keyed) = account_of(&row)?;
        merge(&mut state.lock().unwrap_or_else(|p| p.into_inner()), hash, acc, keyed);
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key_hash, hash);
        Ok(Some(hash))
    }

    /// Records a settlement read back from the chain (settled totals only grow).
    pub(super) async fn settled(&self, hash: B256, amount: U256, requests: u64) -> Result<(), MeterError> {
        let c = self.conn.get().await?;
        let reqs = i64::try_from(requests).unwrap_or(i64::MAX);
        timed(c.execute(
            &format!("SELECT {}.settled($1, $2::text::numeric, $3)", self.schema),
            &[&hash.as_slice(), &num(amount), &reqs],
        ))
        .await?;
        Ok(())
    }

    /// Marks a permit the contract refused for good.
    pub(super) async fn rejected(&self, hash: B256, reason: u8) -> Result<(), MeterError> {
        let c = self.conn.get().await?;
        timed(c.execute(
            &format!("SELECT {}.rejected($1, $2)", self.schema),
            &[&hash.as_slice(), &i16::from(reason)],
        ))
        .await?;
        Ok(())
    }

    /// The journal entry of a request, by the host's id.
    pub(super) async fn by_request(&self, request_id: &str) -> Result<Option<Charge>, MeterError> {
        let c = self.conn.get().await?;
        let row =
            timed(c.query_opt(&format!("{} WHERE request_id = $1", self.journal_select()), &[&request_id]))
                .await?;
        row.as_ref().map(charge_of).transpose()
    }

    /// The latest journal entry of `permit` whose client sent `client_request_id`.
    pub(super) async fn by_client_id(
        &self,
        permit: &B256,
        client_request_id: &str,
    ) -> Result<Option<Charge>, MeterError> {
        let c = self.conn.get().await?;
        let row = timed(c.query_opt(
            &format!(
                "{} WHERE permit = $1 AND client_request_id = $2 ORDER BY seq DESC LIMIT 1",
                self.journal_select()
            ),
            &[&permit.as_slice(), &client_request_id],
        ))
        .await?;
        row.as_ref().map(charge_of).transpose()
    }

    /// Every journal entry, in order.
    pub(super) async fn journal(&self) -> Result<Vec<Charge>, MeterError> {
        let c = self.conn.get().await?;
        let rows = timed(c.query(&format!("{} ORDER BY seq", self.journal_select()), &[])).await?;
        rows.iter().map(charge_of).collect()
    }

    fn journal_select(&self) -> String {
        format!(
            "SELECT seq, request_id, client_request_id, permit, amount::text, cumulative_amount::text,
                    cumulative_requests, at FROM {}",
            self.t("journal")
        )
    }

    /// Whether this replica holds the settlement lease (taking it if nobody does).
    pub(super) async fn lease(&self) -> bool {
        let mut g = self.lease.lock().await;
        if let Some(c) = g.as_ref() {
            // a connection PostgreSQL dropped (a restart) took the lock with it
            if !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
                return true;
            }
            *g = None;
            self.held.store(false, Ordering::Release);
            tracing::warn!(schema = %self.schema, "lost the settlement lease (its connection closed)");
        }
        let Ok(c) = connect(&self.lease_url).await else { return false };
        let key = format!("div-settler/{}", self.schema);
        match c.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key]).await {
            Ok(r) if r.try_get::<_, bool>(0).unwrap_or(false) => {
                tracing::info!(schema = %self.schema, "took the settlement lease");
                *g = Some(c);
                self.held.store(true, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// Whether this replica holds the lease now (its lease connection is open).
    pub(super) fn holds_lease(&self) -> bool {
        match self.lease.try_lock() {
            Ok(g) => g.as_ref().is_some_and(|c| !c.is_closed()),
            // being checked or taken right now: as it was
            Err(_) => self.held.load(Ordering::Acquire),
        }
    }

    /// Lets the lease go (a draining replica).
    pub(super) async fn release_lease(&self) {
        self.held.store(false, Ordering::Release);
        if self.lease.lock().await.take().is_some() {
            tracing::info!(schema = %self.schema, "released the settlement lease");
        }
    }
}

/// Keeps the replica's view in step with what other replicas charge and settle.
pub(super) async fn refresher(
    pg: std::sync::Weak<Pg>,
    state: std::sync::Weak<Mutex<State>>,
    every: Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        let (Some(pg), Some(state)) = (pg.upgrade(), state.upgrade()) else { return };
        if let Err(e) = pg.refresh(&state).await {
            tracing::debug!("refreshing the ledger view: {e}");
        }
    }
}
