//! The group committer: charges queue here, and each batch goes to the database's `charge`
//! function in one call (one transaction, one WAL flush); each request is answered from its row.

use std::sync::{Arc, Mutex};

use alloy::primitives::{B256, U256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;

use super::Pg;
use super::conn::{CALL_TIMEOUT, col, num, parse_num, pg_err, unavailable};
use crate::MeterError;
use crate::ledger::index::State;
use crate::ledger::records::Charge;

/// At most this many charges go in one batch.
const MAX_BATCH: usize = 512;

/// One charge waiting for the committer.
pub(crate) struct PgCharge {
    pub(crate) hash: B256,
    pub(crate) amount: U256,
    pub(crate) request_id: String,
    pub(crate) client_request_id: Option<String>,
    /// The most the user's unsettled total in the permit's stablecoin may reach.
    pub(crate) limit: U256,
    pub(crate) done: oneshot::Sender<Result<Charge, MeterError>>,
}

impl Pg {
    /// Charges one batch; answers each charge from its row.
    async fn charge_batch(&self, batch: Vec<PgCharge>, state: &Mutex<State>) {
        let result = self.try_charge_batch(&batch).await;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                let why = e.to_string();
                for c in batch {
                    let _ = c.done.send(Err(MeterError::Ledger(why.clone())));
                }
                return;
            }
        };
        let mut answers: Vec<Option<Result<Charge, MeterError>>> = (0..batch.len()).map(|_| None).collect();
        for r in rows {
            let Ok(i) = col::<i32>(&r, 0) else { continue };
            let i = slot_index(i);
            if let (Some(c), Some(slot)) = (batch.get(i), answers.get_mut(i)) {
                *slot = Some(answer_of(&r, c, state));
            }
        }
        for (c, a) in batch.into_iter().zip(answers) {
            let a =
                a.unwrap_or_else(|| Err(MeterError::Ledger("the ledger database skipped a charge".into())));
            let _ = c.done.send(a);
        }
    }

    async fn try_charge_batch(&self, batch: &[PgCharge]) -> Result<Vec<Row>, MeterError> {
        let hashes: Vec<&[u8]> = batch.iter().map(|c| c.hash.as_slice()).collect();
        let amounts: Vec<String> = batch.iter().map(|c| num(c.amount)).collect();
        let ids: Vec<&str> = batch.iter().map(|c| c.request_id.as_str()).collect();
        let client_ids: Vec<Option<&str>> = batch.iter().map(|c| c.client_request_id.as_deref()).collect();
        let limits: Vec<String> = batch.iter().map(|c| num(c.limit)).collect();
        let at = i64::try_from(crate::ledger::store::now()).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT o_i, o_seq, o_amount, o_requests, o_refused
             FROM {}.charge($1, $2::text[]::numeric[], $3, $4, $5::text[]::numeric[], $6)",
            self.schema
        );
        let mut tries = 0;
        loop {
            let (c, st) = self.conn.prepared(&sql).await?;
            match tokio::time::timeout(
                CALL_TIMEOUT,
                c.query(&st, &[&hashes, &amounts, &ids, &client_ids, &limits, &at]),
            )
            .await
            {
                Err(_) => return Err(unavailable("a charge timed out; its outcome is unknown")),
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(e)) => {
                    let rolled_back = e.code().is_some_and(|c| {
                        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                            || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                    });
                    tries += 1;
                    if rolled_back && tries < 5 {
                        continue;
                    }
                    return Err(pg_err(e));
                }
            }
        }
    }
}

fn slot_index(i: i32) -> usize {
    usize::try_from(i - 1).unwrap_or(usize::MAX)
}

/// The answer to one charge from its row, and the replica's view brought up to it.
fn answer_of(r: &Row, c: &PgCharge, state: &Mutex<State>) -> Result<Charge, MeterError> {
    let refused: Option<String> = col(r, 4)?;
    if let Some(why) = refused {
        let g = state.lock().unwrap_or_else(|p| p.into_inner());
        let acc = g.accounts.get(&c.hash);
        return Err(match why.as_str() {
            "cap" => MeterError::OverCap {
                cap: acc.map(|a| a.permit.max_amount).unwrap_or_default(),
                charged: acc.map(|a| a.charged_amount).unwrap_or_default(),
                price: c.amount,
            },
            "funds" => MeterError::InsufficientFunds {
                available: c.limit.saturating_sub(
                    acc.map(|a| {
                        g.unsettled_by_user.get(&(a.permit.user, a.permit.token)).copied().unwrap_or_default()
                    })
                    .unwrap_or_default(),
                ),
                price: c.amount,
            },
            "rejected" => MeterError::Revoked,
            other => MeterError::Ledger(format!("the ledger database refused the charge: {other}")),
        });
    }
    let seq: i64 = col(r, 1)?;
    let amount: String = col(r, 2)?;
    let requests: i64 = col(r, 3)?;
    let charge = Charge {
        seq: u64::try_from(seq).unwrap_or_default(),
        request_id: c.request_id.clone(),
        client_request_id: c.client_request_id.clone(),
        permit_hash: c.hash,
        amount: c.amount,
        cumulative_amount: parse_num(&amount)?,
        cumulative_requests: u64::try_from(requests).unwrap_or_default(),
        at: crate::ledger::store::now(),
    };
    state.lock().unwrap_or_else(|p| p.into_inner()).update(&c.hash, |a| {
        a.charged_amount = a.charged_amount.max(charge.cumulative_amount);
        a.charged_requests = a.charged_requests.max(charge.cumulative_requests);
    });
    Ok(charge)
}

/// The committer: takes everything queued (up to [`MAX_BATCH`]) and charges it as one batch.
pub(crate) async fn committer(
    pg: Arc<Pg>,
    state: Arc<Mutex<State>>,
    mut rx: mpsc::UnboundedReceiver<PgCharge>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        pg.charge_batch(batch, &state).await;
    }
}
