//! The ledger in sled: opening it (its records read back into a view), the key layout of its two
//! trees (see the module above) and the group committer, the one thread that writes them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use alloy::primitives::{B256, U256};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::index::State;
use super::records::{Charge, PermitAccount};
use crate::MeterError;

/// The ledger in sled: the database, its charges' tree and the group committer.
pub(super) struct SledStore {
    pub(super) db: sled::Db,
    /// What charges write: totals, journal, request ids.
    pub(super) hot: sled::Tree,
    pub(super) tx: Mutex<Option<mpsc::Sender<Commit>>>,
    pub(super) committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(super) poisoned: Arc<AtomicBool>,
}

impl SledStore {
    /// Opens (or creates) the database in `dir` and reads its records into a view; each
    /// permit's totals are checked against the journal (the larger wins).
    pub(super) fn open(dir: &Path) -> Result<(Self, State), MeterError> {
        // the database's file lock outlives a dropped handle by a moment (sled's flusher thread
        // lets go of it last), so a ledger reopened at once by the same process waits for it;
        // another live process holding it is still refused, after two seconds
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match sled::Config::new().path(dir).mode(sled::Mode::HighThroughput).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(MeterError::Ledger(format!("opening {}: {e}", dir.display()))),
            }
        };
        let hot_tree = db.open_tree(b"charges").map_err(db_err)?;
        let mut accounts: HashMap<B256, PermitAccount> = HashMap::new();
        for kv in db.scan_prefix(b"p/") {
            let (k, v) = kv.map_err(db_err)?;
            let acc: PermitAccount =
                serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("permit record: {e}")))?;
            accounts.insert(B256::from_slice(&k[2..]), acc);
        }
        for kv in hot_tree.scan_prefix(b"t/") {
            let (k, v) = kv.map_err(db_err)?;
            if let (Some(a), Some((amount, requests))) =
                (accounts.get_mut(&B256::from_slice(&k[2..])), totals_of(&v))
            {
                a.charged_amount = a.charged_amount.max(amount);
                a.charged_requests = a.charged_requests.max(requests);
            }
        }
        let mut next_seq = 0;
        for kv in hot_tree.scan_prefix(b"j/") {
            let (_, v) = kv.map_err(db_err)?;
            let c: Charge =
                serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("journal entry: {e}")))?;
            next_seq = next_seq.max(c.seq + 1);
            if let Some(a) = accounts.get_mut(&c.permit_hash)
                && (c.cumulative_requests > a.charged_requests || c.cumulative_amount > a.charged_amount)
            {
                tracing::warn!(
                    permit = %c.permit_hash, record = a.charged_requests, journal = c.cumulative_requests,
                    "a permit's record was behind its journal; rebuilt from the journal"
                );
                a.charged_requests = a.charged_requests.max(c.cumulative_requests);
                a.charged_amount = a.charged_amount.max(c.cumulative_amount);
            }
        }
        let mut state = State { next_seq, ..State::default() };
        for kv in db.scan_prefix(b"kp/") {
            let (k, _) = kv.map_err(db_err)?;
            state.keyed.insert(B256::from_slice(&k[3..]));
        }
        for (h, a) in accounts {
            state.insert(h, a);
        }
        let (tx, rx) = mpsc::channel::<Commit>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let (cdb, chot, cpoison) = (db.clone(), hot_tree.clone(), poisoned.clone());
        let handle = std::thread::Builder::new()
            .name("div-ledger-commit".into())
            .spawn(move || committer(cdb, chot, rx, cpoison))
            .map_err(|e| MeterError::Ledger(format!("starting the committer: {e}")))?;
        Ok((
            Self {
                db,
                hot: hot_tree,
                tx: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(handle)),
                poisoned,
            },
            state,
        ))
    }
}

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

pub(crate) fn now() -> u64 {
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
