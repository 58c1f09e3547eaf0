//! Rows of the ledger's tables as the in-memory records, and a row merged into a replica's view
//! (totals only grow).

use alloy::primitives::B256;
use tokio_postgres::Row;

use super::conn::{col, parse_num};
use crate::MeterError;
use crate::ledger::index::State;
use crate::ledger::records::{Charge, PermitAccount};

/// A permit row: (hash, account, keyed).
pub(super) fn account_of(r: &Row) -> Result<(B256, PermitAccount, bool), MeterError> {
    let hash: &[u8] = col(r, 0)?;
    let json: String = col(r, 1)?;
    let mut acc: PermitAccount =
        serde_json::from_str(&json).map_err(|e| MeterError::Ledger(format!("permit record: {e}")))?;
    let charged: String = col(r, 2)?;
    let settled: String = col(r, 4)?;
    acc.charged_amount = parse_num(&charged)?;
    acc.charged_requests = u64::try_from(col::<i64>(r, 3)?).unwrap_or_default();
    acc.settled_amount = parse_num(&settled)?;
    acc.settled_requests = u64::try_from(col::<i64>(r, 5)?).unwrap_or_default();
    acc.rejected = col::<Option<i16>>(r, 6)?.and_then(|v| u8::try_from(v).ok());
    let hash =
        B256::try_from(hash).map_err(|_| MeterError::Ledger("a permit hash is not 32 bytes".into()))?;
    Ok((hash, acc, col(r, 7)?))
}

/// Brings the database's row into the replica's view; totals only grow.
pub(super) fn merge(g: &mut State, hash: B256, acc: PermitAccount, keyed: bool) {
    if keyed {
        g.keyed.insert(hash);
    }
    if g.accounts.contains_key(&hash) {
        g.update(&hash, |a| {
            a.charged_amount = a.charged_amount.max(acc.charged_amount);
            a.charged_requests = a.charged_requests.max(acc.charged_requests);
            a.settled_amount = a.settled_amount.max(acc.settled_amount);
            a.settled_requests = a.settled_requests.max(acc.settled_requests);
            if acc.rejected.is_some() {
                a.rejected = acc.rejected;
            }
        });
    } else {
        g.insert(hash, acc);
    }
}

pub(super) fn charge_of(r: &Row) -> Result<Charge, MeterError> {
    let permit: &[u8] = col(r, 3)?;
    let amount: String = col(r, 4)?;
    let cumulative: String = col(r, 5)?;
    Ok(Charge {
        seq: u64::try_from(col::<i64>(r, 0)?).unwrap_or_default(),
        request_id: col(r, 1)?,
        client_request_id: col(r, 2)?,
        permit_hash: B256::try_from(permit)
            .map_err(|_| MeterError::Ledger("a permit hash is not 32 bytes".into()))?,
        amount: parse_num(&amount)?,
        cumulative_amount: parse_num(&cumulative)?,
        cumulative_requests: u64::try_from(col::<i64>(r, 6)?).unwrap_or_default(),
        at: u64::try_from(col::<i64>(r, 7)?).unwrap_or_default(),
    })
}
