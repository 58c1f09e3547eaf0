//! The charge ledger: every charge is on disk before the response that carries its receipt
//! leaves the host.
//!
//! One sled tree holds three kinds of record, so one atomic batch can write several:
//! `p/<permit hash>` (the permit, its signature and its running totals: charged and settled),
//! `j/<seq>` (the journal: one entry per charged request) and `k/<sha256(api key)>` (which permit
//! a key spends). Durability is a **group commit**: requests hand their writes to one committer
//! thread, which applies everything waiting as one batch and `fsync`s once for all of them, then
//! wakes each request. Throughput holds under concurrency (one flush serves many requests) and
//! no request is answered before its charge is durable. A failed commit poisons the ledger: the
//! host refuses further paid requests rather than serve what it cannot record.
//!
//! Running totals live in memory too, guarded per ledger, so the cumulative amount of each
//! charge is assigned in journal order; after a crash they are read back from the `p/` records,
//! which are written in the same batch as the journal entries that produced them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use alloy::primitives::{Address, B256, Bytes, U256};
use div_chain::SpendingPermit;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::MeterError;

/// A permit as the ledger keeps it, with what has been charged and settled on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermitAccount {
    /// The signed permit.
    pub permit: PermitFields,
    /// The user's signature (hex).
    pub signature: Bytes,
    /// The model's name on this host.
    pub model: String,
    /// Total charged so far (base units).
    pub charged_amount: U256,
    /// Requests charged so far.
    pub charged_requests: u64,
    /// What `PaymentStream` has settled (as last read back).
    pub settled_amount: U256,
    /// Requests settled.
    pub settled_requests: u64,
}

impl PermitAccount {
    /// Charged but not yet settled.
    pub fn unsettled(&self) -> U256 {
        self.charged_amount.saturating_sub(self.settled_amount)
    }
}

/// What one host's ledger holds for one model, summed over its permits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelUsage {
    /// Permits seen for the model.
    pub permits: u64,
    /// Charged in total.
    pub charged_amount: U256,
    /// Requests charged.
    pub charged_requests: u64,
    /// Settled on chain (as last read back).
    pub settled_amount: U256,
    /// Requests settled.
    pub settled_requests: u64,
}

/// `SpendingPermit`'s fields in a serialisable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermitFields {
    /// Who pays.
    pub user: Address,
    /// For which model.
    pub model_id: B256,
    /// Which host may charge.
    pub host: Address,
    /// In which stablecoin.
    pub token: Address,
    /// The most the host may ever charge.
    pub max_amount: U256,
    /// Unix time after which it cannot be used.
    pub expiry: u64,
    /// Distinguishes permits with equal fields.
    pub nonce: U256,
}

impl From<&PermitFields> for SpendingPermit {
    fn from(p: &PermitFields) -> Self {
        SpendingPermit {
            user: p.user,
            modelId: p.model_id,
            host: p.host,
            token: p.token,
            maxAmount: p.max_amount,
            expiry: p.expiry,
            nonce: p.nonce,
        }
    }
}

/// One charged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Journal position.
    pub seq: u64,
    /// The request's `x-request-id`.
    pub request_id: String,
    /// The permit charged.
    pub permit_hash: B256,
    /// This request's price.
    pub amount: U256,
    /// The permit's total after this charge.
    pub cumulative_amount: U256,
    /// The permit's request count after this charge.
    pub cumulative_requests: u64,
    /// Unix seconds.
    pub at: u64,
}

/// What the ledger keeps in memory: the accounts, the next journal position, and the permits
/// that already have their API key.
struct State {
    accounts: HashMap<B256, PermitAccount>,
    next_seq: u64,
    keyed: std::collections::HashSet<B256>,
}

struct Commit {
    ops: Vec<(Vec<u8>, Vec<u8>)>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The durable ledger.
pub struct Ledger {
    db: sled::Db,
    tx: Mutex<Option<mpsc::Sender<Commit>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    accounts: Mutex<State>,
    poisoned: Arc<AtomicBool>,
}

fn pkey(hash: &B256) -> Vec<u8> {
    [b"p/".as_slice(), hash.as_slice()].concat()
}

fn jkey(seq: u64) -> Vec<u8> {
    [b"j/".as_slice(), &seq.to_be_bytes()].concat()
}

fn kkey(api_key: &str) -> Vec<u8> {
    let digest: [u8; 32] = Sha256::digest(api_key.as_bytes()).into();
    [b"k/".as_slice(), &digest].concat()
}

/// Marks a permit that already has its API key (one key per permit).
fn kpkey(hash: &B256) -> Vec<u8> {
    [b"kp/".as_slice(), hash.as_slice()].concat()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, MeterError> {
    serde_json::to_vec(v).map_err(|e| MeterError::Ledger(e.to_string()))
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir` and reads its totals back.
    pub fn open(dir: &Path) -> Result<Self, MeterError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| MeterError::Ledger(format!("opening {}: {e}", dir.display())))?;
        let mut accounts = HashMap::new();
        for kv in db.scan_prefix(b"p/") {
            let (k, v) = kv.map_err(|e| MeterError::Ledger(e.to_string()))?;
            let acc: PermitAccount =
                serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("permit record: {e}")))?;
            accounts.insert(B256::from_slice(&k[2..]), acc);
        }
        let next_seq = match db.scan_prefix(b"j/").next_back() {
            Some(kv) => {
                let (k, _) = kv.map_err(|e| MeterError::Ledger(e.to_string()))?;
                let mut b = [0u8; 8];
                b.copy_from_slice(&k[2..10]);
                u64::from_be_bytes(b) + 1
            }
            None => 0,
        };
        let mut keyed = std::collections::HashSet::new();
        for kv in db.scan_prefix(b"kp/") {
            let (k, _) = kv.map_err(|e| MeterError::Ledger(e.to_string()))?;
            keyed.insert(B256::from_slice(&k[3..]));
        }
        let (tx, rx) = mpsc::channel::<Commit>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let (cdb, cpoison) = (db.clone(), poisoned.clone());
        let handle = std::thread::Builder::new()
            .name("div-ledger-commit".into())
            .spawn(move || committer(cdb, rx, cpoison))
            .map_err(|e| MeterError::Ledger(format!("starting the committer: {e}")))?;
        Ok(Self {
            db,
            tx: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(handle)),
            accounts: Mutex::new(State { accounts, next_seq, keyed }),
            poisoned,
        })
    }

    async fn commit(&self, ops: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), MeterError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(MeterError::Ledger("the ledger failed to write earlier; refusing to charge".into()));
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .ok_or_else(|| MeterError::Ledger("the ledger is closed".into()))?
            .send(Commit { ops, done })
            .map_err(|_| MeterError::Ledger("the committer stopped".into()))?;
        wait.await
            .map_err(|_| MeterError::Ledger("the committer stopped".into()))?
            .map_err(MeterError::Ledger)
    }

    /// The account of a permit.
    pub fn account(&self, hash: &B256) -> Option<PermitAccount> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner()).accounts.get(hash).cloned()
    }

    /// Every account (for settlement and balances).
    pub fn accounts(&self) -> Vec<(B256, PermitAccount)> {
        let g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        g.accounts.iter().map(|(h, a)| (*h, a.clone())).collect()
    }

    /// Unsettled charges of `user` in `token` across this ledger's permits.
    pub fn unsettled_of(&self, user: Address, token: Address) -> U256 {
        let guard = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .accounts
            .values()
            .filter(|a| a.permit.user == user && a.permit.token == token)
            .fold(U256::ZERO, |s, a| s + a.unsettled())
    }

    /// Charged requests not yet settled, across every permit.
    pub fn unsettled_requests(&self) -> u64 {
        let g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        g.accounts.values().map(|a| a.charged_requests.saturating_sub(a.settled_requests)).sum()
    }

    /// Charged amount not yet settled, across every permit.
    /// Charged and settled amounts of `model_id` on this host (the owner dashboard's numbers).
    pub fn usage_of(&self, model_id: B256) -> ModelUsage {
        let g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        g.accounts.values().filter(|a| a.permit.model_id == model_id).fold(
            ModelUsage::default(),
            |mut u, a| {
                u.permits += 1;
                u.charged_amount += a.charged_amount;
                u.charged_requests += a.charged_requests;
                u.settled_amount += a.settled_amount;
                u.settled_requests += a.settled_requests;
                u
            },
        )
    }

    /// Charged amount not yet settled, across every permit.
    pub fn unsettled_total(&self) -> U256 {
        let g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        g.accounts.values().fold(U256::ZERO, |s, a| s + a.unsettled())
    }

    /// Records a permit (first sight) and, when given, an API key that spends it. Returns false
    /// if the key's permit was already registered with a key (a replayed permit).
    pub async fn register(
        &self,
        hash: B256,
        account: PermitAccount,
        api_key: Option<&str>,
    ) -> Result<bool, MeterError> {
        let mut ops = Vec::new();
        {
            let mut g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
            if api_key.is_some() && !g.keyed.insert(hash) {
                return Ok(false);
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = g.accounts.entry(hash) {
                ops.push((pkey(&hash), json(&account)?));
                slot.insert(account);
            }
        }
        if let Some(key) = api_key {
            ops.push((kkey(key), hash.to_vec()));
            ops.push((kpkey(&hash), b"1".to_vec()));
        }
        if !ops.is_empty() {
            self.commit(ops).await?;
        }
        Ok(true)
    }

    /// The permit an API key spends.
    pub fn permit_of_key(&self, api_key: &str) -> Option<B256> {
        self.db.get(kkey(api_key)).ok().flatten().filter(|v| v.len() == 32).map(|v| B256::from_slice(&v))
    }

    /// Charges `amount` to the permit and returns the journal entry once it is on disk.
    pub async fn charge(&self, hash: B256, amount: U256, request_id: &str) -> Result<Charge, MeterError> {
        let (charge, ops) = {
            let mut g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
            let seq = g.next_seq;
            let acc = g
                .accounts
                .get_mut(&hash)
                .ok_or_else(|| MeterError::Ledger(format!("unknown permit {hash}")))?;
            acc.charged_amount += amount;
            acc.charged_requests += 1;
            let charge = Charge {
                seq,
                request_id: request_id.to_string(),
                permit_hash: hash,
                amount,
                cumulative_amount: acc.charged_amount,
                cumulative_requests: acc.charged_requests,
                at: now(),
            };
            let ops = vec![(pkey(&hash), json(&*acc)?), (jkey(seq), json(&charge)?)];
            g.next_seq += 1;
            (charge, ops)
        };
        self.commit(ops).await?;
        Ok(charge)
    }

    /// Records what `PaymentStream` says is settled on a permit (read back after a settlement).
    pub async fn mark_settled(&self, hash: B256, amount: U256, requests: u64) -> Result<(), MeterError> {
        let ops = {
            let mut g = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
            let Some(acc) = g.accounts.get_mut(&hash) else { return Ok(()) };
            acc.settled_amount = amount;
            acc.settled_requests = requests;
            vec![(pkey(&hash), json(&*acc)?)]
        };
        self.commit(ops).await
    }

    /// Every journal entry, in order.
    pub fn journal(&self) -> Result<Vec<Charge>, MeterError> {
        self.db
            .scan_prefix(b"j/")
            .map(|kv| {
                let (_, v) = kv.map_err(|e| MeterError::Ledger(e.to_string()))?;
                serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("journal entry: {e}")))
            })
            .collect()
    }
}

impl Drop for Ledger {
    /// Lets the committer finish what is queued and stop, so the database is closed (and its
    /// lock released) when the ledger is.
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.committer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// The group committer: takes everything queued, applies it as one batch, flushes once.
fn committer(db: sled::Db, rx: mpsc::Receiver<Commit>, poisoned: Arc<AtomicBool>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let mut batch = sled::Batch::default();
        for c in &group {
            for (k, v) in &c.ops {
                batch.insert(k.as_slice(), v.as_slice());
            }
        }
        let result = db.apply_batch(batch).and_then(|()| db.flush().map(|_| ())).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!("ledger write failed: {e}; refusing further charges");
            poisoned.store(true, Ordering::Release);
        }
        for c in group {
            let _ = c.done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(user: u8) -> PermitAccount {
        PermitAccount {
            permit: PermitFields {
                user: Address::repeat_byte(user),
                model_id: B256::repeat_byte(1),
                host: Address::repeat_byte(2),
                token: Address::repeat_byte(3),
                max_amount: U256::from(1000u64),
                expiry: 2_000_000_000,
                nonce: U256::from(1u64),
            },
            signature: Bytes::from(vec![1u8; 65]),
            model: "m".into(),
            charged_amount: U256::ZERO,
            charged_requests: 0,
            settled_amount: U256::ZERO,
            settled_requests: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn charges_are_durable_in_order_and_survive_a_reopen() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(|e| MeterError::Ledger(e.to_string()))?;
        let hash = B256::repeat_byte(9);
        {
            let l = Arc::new(Ledger::open(dir.path())?);
            assert!(l.register(hash, account(4), Some("key-1")).await?);
            assert!(!l.register(hash, account(4), Some("key-2")).await?, "a second key for one permit");
            let mut tasks = Vec::new();
            for i in 0..50 {
                let l = l.clone();
                tasks.push(tokio::spawn(
                    async move { l.charge(hash, U256::from(3u64), &format!("r{i}")).await },
                ));
            }
            let mut cum: Vec<U256> = Vec::new();
            for t in tasks {
                cum.push(t.await.map_err(|e| MeterError::Ledger(e.to_string()))??.cumulative_amount);
            }
            cum.sort();
            assert_eq!(cum, (1..=50u64).map(|i| U256::from(3 * i)).collect::<Vec<_>>());
            l.mark_settled(hash, U256::from(30u64), 10).await?;
        }
        let l = Ledger::open(dir.path())?;
        let acc = l.account(&hash).ok_or_else(|| MeterError::Ledger("lost".into()))?;
        assert_eq!((acc.charged_amount, acc.charged_requests), (U256::from(150u64), 50));
        assert_eq!(acc.unsettled(), U256::from(120u64));
        assert_eq!(l.unsettled_of(Address::repeat_byte(4), Address::repeat_byte(3)), U256::from(120u64));
        assert_eq!(l.permit_of_key("key-1"), Some(hash));
        assert_eq!(l.permit_of_key("key-2"), None);
        let journal = l.journal()?;
        assert_eq!(journal.len(), 50);
        assert!(
            journal
                .windows(2)
                .all(|w| w[0].seq + 1 == w[1].seq && w[0].cumulative_amount < w[1].cumulative_amount)
        );
        // the next charge continues the journal
        let c = l.charge(hash, U256::from(1u64), "after").await?;
        assert_eq!((c.seq, c.cumulative_amount), (50, U256::from(151u64)));
        Ok(())
    }
}
