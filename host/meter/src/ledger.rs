//! The charge ledger: every charge is on disk before the response that carries its receipt
//! leaves the host, and a permit's recorded total can only grow.
//!
//! One sled tree holds every kind of record, so one atomic batch can write several:
//! `p/<permit hash>` (the permit, its signature, its settled totals; written when the permit is
//! recorded and when a settlement is read back), `t/<permit hash>` (its charged totals, 40 bytes,
//! the one record a charge rewrites),
//! `j/<seq>` (the journal: one entry per charged request), `k/<sha256(api key)>` (which permit a
//! key spends; only the key's hash is stored), `r/<request id>` (the journal entry of a
//! host-issued request id) and `c/<permit hash><client request id>` (the same, by the id the
//! client sent). What a charge writes (`t/`, `j/`, `r/`, `c/`) lives in a tree of its own,
//! apart from the permit directory (`p/`, `k/`): a charge's write costs the same whether the
//! host has recorded ten permits or a hundred thousand. No write spans both trees. Durability is a **group commit**: requests hand their writes to one committer
//! thread, which applies everything waiting as one batch and `fsync`s once for all of them, then
//! wakes each request. No request is answered before its charge is durable. A failed commit
//! poisons the ledger: the host refuses further paid requests rather than serve what it cannot
//! record.
//!
//! **Order.** A permit's totals are assigned under one lock, and the writes that carry them are
//! handed to the committer *under that same lock*, so the committer receives them in the order
//! the totals were assigned: an older record can never overwrite a newer one (it once could,
//! when the hand-over happened after the lock was released, and a crash then left a permit's
//! record behind receipts already issued). As a second guard, [`Ledger::open`] rebuilds each
//! permit's totals from the journal and keeps whichever is larger, so even a damaged `p/` record
//! cannot make the host issue a cumulative number twice.
//!
//! **Indexes.** Everything a paid request asks of the ledger is O(1) in the number of permits:
//! unsettled amounts per (user, token), the host's totals, and per-model usage are kept up to
//! date as charges and settlements land, never recomputed by scanning.

use std::collections::{HashMap, HashSet};
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
    /// The contract refused this permit for good (its `SkipReason`): its key is disabled and it
    /// is not sent again.
    #[serde(default)]
    pub rejected: Option<u8>,
}

impl PermitAccount {
    /// A permit with nothing charged yet.
    pub fn new(permit: PermitFields, signature: Bytes, model: String) -> Self {
        Self {
            permit,
            signature,
            model,
            charged_amount: U256::ZERO,
            charged_requests: 0,
            settled_amount: U256::ZERO,
            settled_requests: 0,
            rejected: None,
        }
    }

    /// Charged but not yet settled.
    pub fn unsettled(&self) -> U256 {
        self.charged_amount.saturating_sub(self.settled_amount)
    }

    /// Requests charged but not yet settled.
    pub fn unsettled_requests(&self) -> u64 {
        self.charged_requests.saturating_sub(self.settled_requests)
    }

    /// The signature a settlement sends: none once the chain has settled the permit before (the
    /// contract checks it only at the first settlement, and leaving its ~100 bytes of calldata
    /// out saves ~1.5k gas per permit and round).
    pub fn settlement_signature(&self) -> Bytes {
        if self.settled_before() { Bytes::new() } else { self.signature.clone() }
    }

    /// Whether the chain had settled this permit (as last read back): its stored state then
    /// proves the signature.
    pub fn settled_before(&self) -> bool {
        !self.settled_amount.is_zero() || self.settled_requests != 0
    }

    /// Whether settlement has something to send for it.
    pub fn settleable(&self) -> bool {
        self.rejected.is_none() && self.charged_amount > self.settled_amount
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
    /// The host's id for the request (unique; what the receipt signs).
    pub request_id: String,
    /// The id the client sent in `x-request-id`, if any (not unique: the client chooses it).
    #[serde(default)]
    pub client_request_id: Option<String>,
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

/// The host's totals, kept as charges and settlements land.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Charged and not settled, across every permit.
    pub unsettled_amount: U256,
    /// Requests charged and not settled.
    pub unsettled_requests: u64,
    /// Permits recorded.
    pub permits: u64,
}

/// What the ledger keeps in memory: the accounts, the next journal position, the permits that
/// already have their API key, and the indexes over them.
#[derive(Default)]
struct State {
    accounts: HashMap<B256, PermitAccount>,
    next_seq: u64,
    keyed: HashSet<B256>,
    unsettled_by_user: HashMap<(Address, Address), U256>,
    permits_by_user: HashMap<Address, Vec<B256>>,
    usage_by_model: HashMap<B256, ModelUsage>,
    settleable: HashSet<B256>,
    totals: Totals,
}

impl State {
    /// Adds (`add` = true) or removes an account's share of every index.
    fn index(&mut self, hash: B256, a: &PermitAccount, add: bool) {
        // a permit the contract refused will never be paid: it holds none of the user's funds
        let (unsettled, requests) =
            if a.rejected.is_some() { (U256::ZERO, 0) } else { (a.unsettled(), a.unsettled_requests()) };
        let key = (a.permit.user, a.permit.token);
        let u = self.unsettled_by_user.entry(key).or_default();
        let m = self.usage_by_model.entry(a.permit.model_id).or_default();
        if add {
            *u += unsettled;
            m.charged_amount += a.charged_amount;
            m.charged_requests += a.charged_requests;
            m.settled_amount += a.settled_amount;
            m.settled_requests += a.settled_requests;
            self.totals.unsettled_amount += unsettled;
            self.totals.unsettled_requests += requests;
            if a.settleable() {
                self.settleable.insert(hash);
            }
        } else {
            *u = u.saturating_sub(unsettled);
            m.charged_amount = m.charged_amount.saturating_sub(a.charged_amount);
            m.charged_requests = m.charged_requests.saturating_sub(a.charged_requests);
            m.settled_amount = m.settled_amount.saturating_sub(a.settled_amount);
            m.settled_requests = m.settled_requests.saturating_sub(a.settled_requests);
            self.totals.unsettled_amount = self.totals.unsettled_amount.saturating_sub(unsettled);
            self.totals.unsettled_requests = self.totals.unsettled_requests.saturating_sub(requests);
            self.settleable.remove(&hash);
        }
    }

    fn insert(&mut self, hash: B256, a: PermitAccount) {
        self.permits_by_user.entry(a.permit.user).or_default().push(hash);
        self.usage_by_model.entry(a.permit.model_id).or_default().permits += 1;
        self.totals.permits += 1;
        self.index(hash, &a, true);
        self.accounts.insert(hash, a);
    }

    /// Changes an account through `f`, keeping the indexes in step; returns the account after.
    fn update<R>(
        &mut self,
        hash: &B256,
        f: impl FnOnce(&mut PermitAccount) -> R,
    ) -> Option<(R, PermitAccount)> {
        let mut a = self.accounts.remove(hash)?;
        self.index(*hash, &a, false);
        let r = f(&mut a);
        self.index(*hash, &a, true);
        self.accounts.insert(*hash, a.clone());
        Some((r, a))
    }
}

struct Commit {
    ops: Vec<(Vec<u8>, Vec<u8>)>,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Called with a charge's journal position just before its writes go to the committer (tests
/// use it to hold one charge back while others run).
#[cfg(test)]
pub(crate) type CommitHook = Arc<dyn Fn(u64) + Send + Sync>;

/// The durable ledger.
pub struct Ledger {
    db: sled::Db,
    /// What charges write: totals, journal, request ids.
    hot: sled::Tree,
    tx: Mutex<Option<mpsc::Sender<Commit>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    state: Mutex<State>,
    poisoned: Arc<AtomicBool>,
    #[cfg(test)]
    hook: Mutex<Option<CommitHook>>,
}

fn pkey(hash: &B256) -> Vec<u8> {
    [b"p/".as_slice(), hash.as_slice()].concat()
}

fn tkey(hash: &B256) -> Vec<u8> {
    [b"t/".as_slice(), hash.as_slice()].concat()
}

/// A permit's charged totals as `t/` stores them: amount (32 bytes) then requests (8), big-endian.
fn totals_bytes(a: &PermitAccount) -> Vec<u8> {
    [a.charged_amount.to_be_bytes::<32>().as_slice(), &a.charged_requests.to_be_bytes()].concat()
}

fn totals_of(v: &[u8]) -> Option<(U256, u64)> {
    if v.len() != 40 {
        return None;
    }
    let mut r = [0u8; 8];
    r.copy_from_slice(&v[32..]);
    Some((U256::from_be_slice(&v[..32]), u64::from_be_bytes(r)))
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

fn rkey(request_id: &str) -> Vec<u8> {
    [b"r/".as_slice(), request_id.as_bytes()].concat()
}

fn ckey(hash: &B256, client_id: &str) -> Vec<u8> {
    [b"c/".as_slice(), hash.as_slice(), client_id.as_bytes()].concat()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, MeterError> {
    serde_json::to_vec(v).map_err(|e| MeterError::Ledger(e.to_string()))
}

/// Whether `key` belongs in the charges' own tree.
fn hot(key: &[u8]) -> bool {
    [b"t/".as_slice(), b"j/", b"r/", b"c/"].iter().any(|p| key.starts_with(p))
}

fn db_err(e: sled::Error) -> MeterError {
    MeterError::Ledger(e.to_string())
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, reads its totals back and checks them against the
    /// journal (the larger wins: a total never goes backwards).
    pub fn open(dir: &Path) -> Result<Self, MeterError> {
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
        Ok(Self {
            db,
            hot: hot_tree,
            tx: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(handle)),
            state: Mutex::new(state),
            poisoned,
            #[cfg(test)]
            hook: Mutex::new(None),
        })
    }

    /// Ties this ledger to one chain's `PaymentStream`, or checks that it is tied to it: a
    /// ledger holds one chain's charges, and a host that takes payment on several chains keeps a
    /// ledger for each (its cumulative totals are what that chain's contract settles). A ledger
    /// opened for another chain (a configuration that swapped two address books) is refused
    /// before anything is charged or settled.
    pub fn bind(&self, chain_id: u64, payment_stream: Address) -> Result<(), MeterError> {
        let want = [chain_id.to_be_bytes().as_slice(), payment_stream.as_slice()].concat();
        match self.db.get(b"meta/chain").map_err(db_err)? {
            Some(have) if have.as_ref() == want.as_slice() => Ok(()),
            Some(have) if have.len() == 28 => {
                let mut id = [0u8; 8];
                id.copy_from_slice(&have[..8]);
                Err(MeterError::Ledger(format!(
                    "this ledger holds the charges of chain {} / {}, not chain {chain_id} / {payment_stream}",
                    u64::from_be_bytes(id),
                    Address::from_slice(&have[8..])
                )))
            }
            Some(_) => Err(MeterError::Ledger("this ledger's chain record is unreadable".into())),
            None => {
                self.db.insert(b"meta/chain", want).map_err(db_err)?;
                self.db.flush().map_err(db_err)?;
                Ok(())
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `ops` to the committer; call it while holding the state lock, so writes reach the
    /// committer in the order their totals were assigned. Returns what to wait on.
    fn send(
        &self,
        ops: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, MeterError> {
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
        Ok(wait)
    }

    async fn wait(wait: tokio::sync::oneshot::Receiver<Result<(), String>>) -> Result<(), MeterError> {
        wait.await
            .map_err(|_| MeterError::Ledger("the committer stopped".into()))?
            .map_err(MeterError::Ledger)
    }

    /// The account of a permit.
    pub fn account(&self, hash: &B256) -> Option<PermitAccount> {
        self.state().accounts.get(hash).cloned()
    }

    /// The permit's charged total (amount, requests), if it is recorded.
    pub fn charged(&self, hash: &B256) -> Option<(U256, u64)> {
        self.state().accounts.get(hash).map(|a| (a.charged_amount, a.charged_requests))
    }

    /// The permits with something to settle, most unsettled first, at most `max`.
    pub fn settleable(&self, max: usize) -> Vec<(B256, PermitAccount)> {
        let g = self.state();
        let mut v: Vec<(B256, PermitAccount)> =
            g.settleable.iter().filter_map(|h| g.accounts.get(h).map(|a| (*h, a.clone()))).collect();
        drop(g);
        v.sort_by_key(|(_, a)| std::cmp::Reverse(a.unsettled()));
        v.truncate(max);
        v
    }

    /// The permits of `user` (for `GET /v1/me`).
    pub fn accounts_of(&self, user: Address) -> Vec<(B256, PermitAccount)> {
        let g = self.state();
        g.permits_by_user
            .get(&user)
            .map(|hs| hs.iter().filter_map(|h| g.accounts.get(h).map(|a| (*h, a.clone()))).collect())
            .unwrap_or_default()
    }

    /// Permits of `user` with an API key that have not expired at `now`.
    pub fn live_keys_of(&self, user: Address, now: u64) -> usize {
        let g = self.state();
        g.permits_by_user.get(&user).map_or(0, |hs| {
            hs.iter()
                .filter(|h| g.keyed.contains(*h))
                .filter(|h| g.accounts.get(*h).is_some_and(|a| a.permit.expiry > now && a.rejected.is_none()))
                .count()
        })
    }

    /// Unsettled charges of `user` in `token` across this ledger's permits.
    pub fn unsettled_of(&self, user: Address, token: Address) -> U256 {
        self.state().unsettled_by_user.get(&(user, token)).copied().unwrap_or_default()
    }

    /// The host's totals.
    pub fn totals(&self) -> Totals {
        self.state().totals
    }

    /// Charged requests not yet settled, across every permit.
    pub fn unsettled_requests(&self) -> u64 {
        self.totals().unsettled_requests
    }

    /// Charged amount not yet settled, across every permit.
    pub fn unsettled_total(&self) -> U256 {
        self.totals().unsettled_amount
    }

    /// Charged and settled amounts of `model_id` on this host (the owner dashboard's numbers).
    pub fn usage_of(&self, model_id: B256) -> ModelUsage {
        self.state().usage_by_model.get(&model_id).cloned().unwrap_or_default()
    }

    /// Records a permit with the API key that spends it (only the key's hash is stored). Returns
    /// false if the permit already has a key (a replayed permit); nothing is written then.
    pub async fn register(
        &self,
        hash: B256,
        account: PermitAccount,
        api_key: &str,
    ) -> Result<bool, MeterError> {
        let wait = {
            let mut g = self.state();
            if g.keyed.contains(&hash) {
                return Ok(false);
            }
            let mut ops = vec![(kkey(api_key), hash.to_vec()), (kpkey(&hash), b"1".to_vec())];
            if !g.accounts.contains_key(&hash) {
                ops.push((pkey(&hash), json(&account)?));
            }
            let wait = self.send(ops)?;
            g.keyed.insert(hash);
            if !g.accounts.contains_key(&hash) {
                g.insert(hash, account);
            }
            wait
        };
        Self::wait(wait).await?;
        Ok(true)
    }

    /// The permit an API key spends.
    pub fn permit_of_key(&self, api_key: &str) -> Option<B256> {
        self.db.get(kkey(api_key)).ok().flatten().filter(|v| v.len() == 32).map(|v| B256::from_slice(&v))
    }

    /// Charges `amount` to the permit and returns the journal entry once it is on disk.
    /// `request_id` is the host's (unique) id; `client_request_id` what the client sent, if any.
    pub async fn charge(
        &self,
        hash: B256,
        amount: U256,
        request_id: &str,
        client_request_id: Option<&str>,
    ) -> Result<Charge, MeterError> {
        let (charge, wait) = {
            let mut g = self.state();
            let seq = g.next_seq;
            let (charge, acc) = g
                .update(&hash, |acc| {
                    acc.charged_amount += amount;
                    acc.charged_requests += 1;
                    Charge {
                        seq,
                        request_id: request_id.to_string(),
                        client_request_id: client_request_id.map(str::to_string),
                        permit_hash: hash,
                        amount,
                        cumulative_amount: acc.charged_amount,
                        cumulative_requests: acc.charged_requests,
                        at: now(),
                    }
                })
                .ok_or_else(|| MeterError::Ledger(format!("unknown permit {hash}")))?;
            let mut ops = vec![
                (tkey(&hash), totals_bytes(&acc)),
                (jkey(seq), json(&charge)?),
                (rkey(request_id), seq.to_be_bytes().to_vec()),
            ];
            if let Some(c) = client_request_id {
                ops.push((ckey(&hash, c), seq.to_be_bytes().to_vec()));
            }
            g.next_seq += 1;
            #[cfg(test)]
            if let Some(hook) = self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                hook(seq);
            }
            let wait = match self.send(ops) {
                Ok(w) => w,
                Err(e) => {
                    // not recorded: take the charge back out of memory too
                    g.update(&hash, |acc| {
                        acc.charged_amount -= amount;
                        acc.charged_requests -= 1;
                    });
                    g.next_seq -= 1;
                    return Err(e);
                }
            };
            (charge, wait)
        };
        Self::wait(wait).await?;
        Ok(charge)
    }

    /// Records what `PaymentStream` says is settled on a permit (read back after a settlement).
    /// Settled totals only grow: an older read that arrives late changes nothing.
    pub async fn mark_settled(&self, hash: B256, amount: U256, requests: u64) -> Result<(), MeterError> {
        let wait = {
            let mut g = self.state();
            let Some((changed, acc)) = g.update(&hash, |acc| {
                let changed = amount > acc.settled_amount || requests > acc.settled_requests;
                acc.settled_amount = acc.settled_amount.max(amount);
                acc.settled_requests = acc.settled_requests.max(requests);
                changed
            }) else {
                return Ok(());
            };
            if !changed {
                return Ok(());
            }
            self.send(vec![(pkey(&hash), json(&acc)?)])?
        };
        Self::wait(wait).await
    }

    /// Marks a permit the contract refused for good (`reason` is its `SkipReason`): its key stops
    /// working and settlement stops sending it.
    pub async fn mark_rejected(&self, hash: B256, reason: u8) -> Result<(), MeterError> {
        let wait = {
            let mut g = self.state();
            let Some((_, acc)) = g.update(&hash, |acc| acc.rejected = Some(reason)) else { return Ok(()) };
            self.send(vec![(pkey(&hash), json(&acc)?)])?
        };
        Self::wait(wait).await
    }

    /// The journal entry of a request, by the host's id.
    pub fn charge_by_request(&self, request_id: &str) -> Result<Option<Charge>, MeterError> {
        match self.hot.get(rkey(request_id)).map_err(db_err)? {
            Some(seq) => self.entry(&seq),
            None => Ok(None),
        }
    }

    /// The latest journal entry of `permit` whose client sent `client_request_id`.
    pub fn charge_by_client_id(
        &self,
        permit: &B256,
        client_request_id: &str,
    ) -> Result<Option<Charge>, MeterError> {
        match self.hot.get(ckey(permit, client_request_id)).map_err(db_err)? {
            Some(seq) => self.entry(&seq),
            None => Ok(None),
        }
    }

    fn entry(&self, seq: &[u8]) -> Result<Option<Charge>, MeterError> {
        let Ok(seq) = <[u8; 8]>::try_from(seq) else { return Ok(None) };
        match self.hot.get(jkey(u64::from_be_bytes(seq))).map_err(db_err)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| MeterError::Ledger(format!("journal entry: {e}"))),
            None => Ok(None),
        }
    }

    /// Every journal entry, in order.
    pub fn journal(&self) -> Result<Vec<Charge>, MeterError> {
        self.hot
            .scan_prefix(b"j/")
            .map(|kv| {
                let (_, v) = kv.map_err(db_err)?;
                serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("journal entry: {e}")))
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn set_hook(&self, hook: Option<CommitHook>) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The permit's charged totals as they are on disk (tests compare them with what was issued).
    #[cfg(test)]
    pub(crate) fn totals_on_disk(&self, hash: &B256) -> Option<(U256, u64)> {
        self.hot.get(tkey(hash)).ok().flatten().and_then(|v| totals_of(&v))
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

/// The group committer: takes everything queued, applies it as one batch, flushes once. Writes
/// to the same key within a group land in arrival order (a batch keeps the last).
fn committer(db: sled::Db, hot_tree: sled::Tree, rx: mpsc::Receiver<Commit>, poisoned: Arc<AtomicBool>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn account(user: u8) -> PermitAccount {
        PermitAccount::new(
            PermitFields {
                user: Address::repeat_byte(user),
                model_id: B256::repeat_byte(1),
                host: Address::repeat_byte(2),
                token: Address::repeat_byte(3),
                max_amount: U256::from(1000u64),
                expiry: 2_000_000_000,
                nonce: U256::from(1u64),
            },
            Bytes::from(vec![1u8; 65]),
            "m".into(),
        )
    }

    fn err(e: impl std::fmt::Display) -> MeterError {
        MeterError::Ledger(e.to_string())
    }

    #[test]
    fn the_signature_is_sent_until_the_chain_has_settled_the_permit() {
        let mut a = account(4);
        a.charged_amount = U256::from(5u64);
        a.charged_requests = 5;
        assert_eq!(a.settlement_signature(), a.signature, "charged but never settled");
        a.settled_requests = 1; // a request-only settlement also proves the signature
        assert!(a.settlement_signature().is_empty());
        (a.settled_amount, a.settled_requests) = (U256::from(1u64), 0);
        assert!(a.settlement_signature().is_empty());
    }

    #[test]
    fn a_ledger_keeps_one_chains_charges_and_refuses_another_chain() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let stream = Address::repeat_byte(7);
        {
            let l = Ledger::open(dir.path())?;
            l.bind(31337, stream)?;
            l.bind(31337, stream)?;
        }
        let l = Ledger::open(dir.path())?;
        l.bind(31337, stream)?; // after a reopen
        let other_chain = l.bind(314159, stream).map(|_| ()).map_err(|e| e.to_string());
        assert!(
            other_chain.as_ref().is_err_and(|e| e.contains("chain 31337") && e.contains("not chain 314159")),
            "{other_chain:?}"
        );
        assert!(l.bind(31337, Address::repeat_byte(8)).is_err(), "another contract on the same chain");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn charges_are_durable_in_order_and_survive_a_reopen() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let hash = B256::repeat_byte(9);
        {
            let l = Arc::new(Ledger::open(dir.path())?);
            assert!(l.register(hash, account(4), "key-1").await?);
            assert!(!l.register(hash, account(4), "key-2").await?, "a second key for one permit");
            let mut tasks = Vec::new();
            for i in 0..50 {
                let l = l.clone();
                tasks.push(tokio::spawn(async move {
                    l.charge(hash, U256::from(3u64), &format!("r{i}"), Some(&format!("c{i}"))).await
                }));
            }
            let mut cum: Vec<U256> = Vec::new();
            for t in tasks {
                cum.push(t.await.map_err(err)??.cumulative_amount);
            }
            cum.sort();
            assert_eq!(cum, (1..=50u64).map(|i| U256::from(3 * i)).collect::<Vec<_>>());
            l.mark_settled(hash, U256::from(30u64), 10).await?;
            // a late, older read of the chain does not move settled totals back
            l.mark_settled(hash, U256::from(3u64), 1).await?;
        }
        let l = Ledger::open(dir.path())?;
        let acc = l.account(&hash).ok_or_else(|| err("lost"))?;
        assert_eq!((acc.charged_amount, acc.charged_requests), (U256::from(150u64), 50));
        assert_eq!(acc.unsettled(), U256::from(120u64));
        assert_eq!(l.unsettled_of(Address::repeat_byte(4), Address::repeat_byte(3)), U256::from(120u64));
        assert_eq!(
            l.totals(),
            Totals { unsettled_amount: U256::from(120u64), unsettled_requests: 40, permits: 1 }
        );
        assert_eq!(l.usage_of(B256::repeat_byte(1)).charged_requests, 50);
        assert_eq!(l.permit_of_key("key-1"), Some(hash));
        assert_eq!(l.permit_of_key("key-2"), None);
        let journal = l.journal()?;
        assert_eq!(journal.len(), 50);
        assert!(
            journal
                .windows(2)
                .all(|w| w[0].seq + 1 == w[1].seq && w[0].cumulative_amount < w[1].cumulative_amount)
        );
        // receipts can be found again by either id
        let by_host = l.charge_by_request("r7")?.ok_or_else(|| err("no r7"))?;
        let by_client = l.charge_by_client_id(&hash, "c7")?.ok_or_else(|| err("no c7"))?;
        assert_eq!(by_host, by_client);
        assert_eq!(
            l.charge_by_client_id(&B256::ZERO, "c7")?,
            None,
            "another permit's client ids are not ours"
        );
        // the next charge continues the journal
        let c = l.charge(hash, U256::from(1u64), "after", None).await?;
        assert_eq!((c.seq, c.cumulative_amount), (50, U256::from(151u64)));
        Ok(())
    }

    /// The interleaving that once lost a receipted charge: charge 1's totals are assigned, then it
    /// is held back while charge 2 is assigned and committed. Its older record must not overwrite
    /// the newer one, on disk or after a reopen.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_older_record_never_overwrites_a_newer_one() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let hash = B256::repeat_byte(5);
        {
            let l = Arc::new(Ledger::open(dir.path())?);
            assert!(l.register(hash, account(6), "k").await?);
            // hold back the second-to-last charge between assigning its totals and handing them
            // over, long enough for the last one to be assigned and committed first
            l.set_hook(Some(Arc::new(|seq: u64| {
                if seq == 18 {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
            })));
            let mut tasks = Vec::new();
            for i in 0..20 {
                let l = l.clone();
                tasks.push(tokio::spawn(async move {
                    l.charge(hash, U256::from(1u64), &format!("r{i}"), None).await
                }));
                tokio::task::yield_now().await;
            }
            let mut issued: Vec<u64> = Vec::new();
            for t in tasks {
                issued.push(t.await.map_err(err)??.cumulative_requests);
            }
            issued.sort_unstable();
            assert_eq!(issued, (1..=20).collect::<Vec<_>>(), "every cumulative number issued once");
            let disk = l.totals_on_disk(&hash).ok_or_else(|| err("no record"))?;
            assert_eq!(disk.1, 20, "the record on disk is the newest");
        }
        let l = Ledger::open(dir.path())?;
        assert_eq!(l.charged(&hash), Some((U256::from(20u64), 20)));
        let c = l.charge(hash, U256::from(1u64), "next", None).await?;
        assert_eq!(c.cumulative_requests, 21, "no cumulative number is issued twice after a reopen");
        Ok(())
    }

    /// A record that fell behind its journal (written by an older host) is rebuilt on open.
    #[tokio::test(flavor = "multi_thread")]
    async fn open_rebuilds_totals_from_the_journal() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let hash = B256::repeat_byte(7);
        {
            let l = Ledger::open(dir.path())?;
            assert!(l.register(hash, account(8), "k").await?);
            for i in 0..5 {
                l.charge(hash, U256::from(2u64), &format!("r{i}"), None).await?;
            }
            // write stale totals behind the ledger's back, as the old write order could
            let mut stale = l.account(&hash).ok_or_else(|| err("lost"))?;
            stale.charged_amount = U256::from(4u64);
            stale.charged_requests = 2;
            l.hot.insert(tkey(&hash), totals_bytes(&stale)).map_err(db_err)?;
            l.db.insert(pkey(&hash), json(&stale)?).map_err(db_err)?;
            l.db.flush().map_err(db_err)?;
        }
        let l = Ledger::open(dir.path())?;
        assert_eq!(l.charged(&hash), Some((U256::from(10u64), 5)));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn rejected_permits_leave_settlement_and_indexes_stay_exact() -> Result<(), MeterError> {
        let dir = tempfile::tempdir().map_err(err)?;
        let l = Ledger::open(dir.path())?;
        let (a, b) = (B256::repeat_byte(1), B256::repeat_byte(2));
        l.register(a, account(1), "ka").await?;
        l.register(b, account(1), "kb").await?;
        l.charge(a, U256::from(5u64), "1", None).await?;
        l.charge(b, U256::from(7u64), "2", None).await?;
        assert_eq!(l.settleable(10).iter().map(|(h, _)| *h).collect::<Vec<_>>(), vec![b, a]);
        assert_eq!(l.unsettled_of(Address::repeat_byte(1), Address::repeat_byte(3)), U256::from(12u64));
        l.mark_rejected(b, 4).await?;
        assert_eq!(l.settleable(10).len(), 1);
        assert_eq!(l.live_keys_of(Address::repeat_byte(1), 0), 1, "a rejected permit's key is not live");
        l.mark_settled(a, U256::from(5u64), 1).await?;
        assert!(l.settleable(10).is_empty());
        assert_eq!(l.accounts_of(Address::repeat_byte(1)).len(), 2);
        Ok(())
    }
}
