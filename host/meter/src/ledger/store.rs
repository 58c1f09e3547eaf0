//! The ledger on disk: the key layout of its two sled trees (see the module above) and the group
//! committer, the one thread that writes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use alloy::primitives::{B256, U256};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::records::PermitAccount;
use crate::MeterError;

pub(super) struct Commit {
    pub(super) ops: Vec<(Vec<u8>, Vec<u8>)>,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

pub(super) fn pkey(hash: &B256) -> Vec<u8> {
    [b"p/".as_slice(), hash.as_slice()].concat()
}

pub(super) fn tkey(hash: &B256) -> Vec<u8> {
    [b"t/".as_slice(), hash.as_slice()].concat()
}

/// A permit's charged totals as `t/` stores them: amount (32 bytes) then requests (8), big-endian.
pub(super) fn totals_bytes(a: &PermitAccount) -> Vec<u8> {
    [a.charged_amount.to_be_bytes::<32>().as_slice(), &a.charged_requests.to_be_bytes()].concat()
}

pub(super) fn totals_of(v: &[u8]) -> Option<(U256, u64)> {
    if v.len() != 40 {
        return None;
    }
    let mut r = [0u8; 8];
    r.copy_from_slice(&v[32..]);
    Some((U256::from_be_slice(&v[..32]), u64::from_be_bytes(r)))
}

pub(super) fn jkey(seq: u64) -> Vec<u8> {
    [b"j/".as_slice(), &seq.to_be_bytes()].concat()
}

pub(super) fn kkey(api_key: &str) -> Vec<u8> {
    let digest: [u8; 32] = Sha256::digest(api_key.as_bytes()).into();
    [b"k/".as_slice(), &digest].concat()
}

/// Marks a permit that already has its API key (one key per permit).
pub(super) fn kpkey(hash: &B256) -> Vec<u8> {
    [b"kp/".as_slice(), hash.as_slice()].concat()
}

pub(super) fn rkey(request_id: &str) -> Vec<u8> {
    [b"r/".as_slice(), request_id.as_bytes()].concat()
}

pub(super) fn ckey(hash: &B256, client_id: &str) -> Vec<u8> {
    [b"c/".as_slice(), hash.as_slice(), client_id.as_bytes()].concat()
}

pub(super) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(super) fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, MeterError> {
    serde_json::to_vec(v).map_err(|e| MeterError::Ledger(e.to_string()))
}

/// Whether `key` belongs in the charges' own tree.
pub(super) fn hot(key: &[u8]) -> bool {
    [b"t/".as_slice(), b"j/", b"r/", b"c/"].iter().any(|p| key.starts_with(p))
}

pub(super) fn db_err(e: sled::Error) -> MeterError {
    MeterError::Ledger(e.to_string())
}

/// The group committer: takes everything queued, applies it as one batch, flushes once. Writes
/// to the same key within a group land in arrival order (a batch keeps the last).
pub(super) fn committer(
    db: sled::Db,
    hot_tree: sled::Tree,
    rx: mpsc::Receiver<Commit>,
    poisoned: Arc<AtomicBool>,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let (mut directory, mut charges) = (sled::Batch::default(), sled::Batch::default());
        for c in &group {
            for (k, v) in &c.ops {
                if hot(k) {
                    charges.insert(k.as_slice(), v.as_slice());
                } else {
                    directory.insert(k.as_slice(), v.as_slice());
                }
            }
        }
        let result = db
            .apply_batch(directory)
            .and_then(|()| hot_tree.apply_batch(charges))
            .and_then(|()| db.flush().map(|_| ()))
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!("ledger write failed: {e}; refusing further charges");
            poisoned.store(true, Ordering::Release);
        }
        for c in group {
            let _ = c.done.send(result.clone());
        }
    }
}
