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
//! **Two stores.** sled, embedded, is the default: one process, no set-up. With `--ledger
//! postgres://…` the same records live in PostgreSQL (`postgres/`), shared by any number of
//! replicas of one host; the in-memory view below is then each replica's copy, refreshed from
//! the database, and the database decides each charge.
//!
//! **Indexes.** Everything a paid request asks of the ledger is O(1) in the number of permits:
//! unsettled amounts per (user, token), the host's totals, and per-model usage are kept up to
//! date as charges and settlements land, never recomputed by scanning.

mod index;
mod postgres;
mod records;
mod store;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use alloy::primitives::{Address, B256, U256};

use crate::MeterError;
use index::State;
pub use records::{Charge, ModelUsage, PermitAccount, PermitFields, Totals};
use store::{Commit, SledStore, ckey, db_err, jkey, json, kkey, kpkey, now, pkey, rkey, tkey, totals_bytes};

/// Called with a charge's journal position just before its writes go to the committer (tests
/// use it to hold one charge back while others run).
#[cfg(test)]
pub(crate) type CommitHook = Arc<dyn Fn(u64) + Send + Sync>;

/// The durable ledger.
pub struct Ledger {
    store: Store,
    state: Arc<Mutex<State>>,
    #[cfg(test)]
    hook: Mutex<Option<CommitHook>>,
}

/// Where the records live.
enum Store {
    Sled(SledStore),
    Postgres(PgStore),
}

struct PgStore {
    pg: Arc<postgres::Pg>,
    charges: tokio::sync::mpsc::UnboundedSender<postgres::PgCharge>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, reads its totals back and checks them against the
    /// journal (the larger wins: a total never goes backwards).
    pub fn open(dir: &Path) -> Result<Self, MeterError> {
        let (store, state) = SledStore::open(dir)?;
        Ok(Self {
            store: Store::Sled(store),
            state: Arc::new(Mutex::new(state)),
            #[cfg(test)]
            hook: Mutex::new(None),
        })
    }

    /// Opens the ledger in PostgreSQL (`url`, a `postgres://` URL) under `schema`, creating or
    /// migrating it, and reads every permit into this replica's view. Must run inside a tokio
    /// runtime: the committer and the task that keeps the view fresh run on it.
    pub async fn open_postgres(url: &str, schema: &str) -> Result<Self, MeterError> {
        let pg = Arc::new(postgres::Pg::open(url, schema).await?);
        let state = Arc::new(Mutex::new(State::default()));
        pg.refresh(&state).await?;
        let (charges, rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(postgres::committer(pg.clone(), state.clone(), rx)),
            tokio::spawn(postgres::refresher(
                Arc::downgrade(&pg),
                Arc::downgrade(&state),
                std::time::Duration::from_millis(250),
            )),
        ];
        Ok(Self {
            store: Store::Postgres(PgStore { pg, charges, tasks }),
            state,
            #[cfg(test)]
            hook: Mutex::new(None),
        })
    }

    /// Which store holds the records: `sled` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Sled(_) => "sled",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Brings this replica's view up to the database (PostgreSQL; the sled ledger's view is
    /// always current).
    pub async fn refresh(&self) -> Result<(), MeterError> {
        if let Store::Postgres(p) = &self.store {
            p.pg.refresh(&self.state).await?;
        }
        Ok(())
    }

    /// Brings every permit with something to settle into this replica's view, however it
    /// changed (the settler's list must not miss a charge another replica made).
    pub async fn refresh_settleable(&self) -> Result<(), MeterError> {
        if let Store::Postgres(p) = &self.store {
            p.pg.refresh_unsettled(&self.state).await?;
        }
        Ok(())
    }

    /// Whether this process may settle now: always with sled (one process owns the ledger);
    /// with PostgreSQL, while it holds the settlement lease (one replica at a time).
    pub async fn may_settle(&self) -> bool {
        match &self.store {
            Store::Sled(_) => true,
            Store::Postgres(p) => p.pg.lease().await,
        }
    }

    /// Whether this replica holds the settlement lease right now (`None` with sled, which has
    /// no lease).
    pub fn holds_settlement(&self) -> Option<bool> {
        match &self.store {
            Store::Sled(_) => None,
            Store::Postgres(p) => Some(p.pg.holds_lease()),
        }
    }

    /// Gives up the settlement lease, if held (a replica that is shutting down).
    pub async fn release_settlement(&self) {
        if let Store::Postgres(p) = &self.store {
            p.pg.release_lease().await;
        }
    }

    /// Ties this ledger to one chain's `PaymentStream`, or checks that it is tied to it: a
    /// ledger holds one chain's charges, and a host that takes payment on several chains keeps a
    /// ledger for each (its cumulative totals are what that chain's contract settles). A ledger
    /// opened for another chain (a configuration that swapped two address books) is refused
    /// before anything is charged or settled.
    pub async fn bind(&self, chain_id: u64, payment_stream: Address) -> Result<(), MeterError> {
        let want = [chain_id.to_be_bytes().as_slice(), payment_stream.as_slice()].concat();
        let have = match &self.store {
            Store::Sled(s) => match s.db.get(b"meta/chain").map_err(db_err)? {
                Some(have) => Some(have.to_vec()),
                None => {
                    s.db.insert(b"meta/chain", want.as_slice()).map_err(db_err)?;
                    s.db.flush().map_err(db_err)?;
                    None
                }
            },
            Store::Postgres(p) => p.pg.bind(&want).await?,
        };
        match have {
            None => Ok(()),
            Some(have) if have == want => Ok(()),
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
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `ops` to the committer; call it while holding the state lock, so writes reach the
    /// committer in the order their totals were assigned. Returns what to wait on.
    fn send(
        s: &SledStore,
        ops: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, MeterError> {
        if s.poisoned.load(Ordering::Acquire) {
            return Err(MeterError::Ledger("the ledger failed to write earlier; refusing to charge".into()));
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        s.tx.lock()
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
        let s = match &self.store {
            Store::Sled(s) => s,
            Store::Postgres(p) => {
                if !p.pg.register(hash, &account, key_hash(api_key)).await? {
                    return Ok(false);
                }
                let mut g = self.state();
                g.keyed.insert(hash);
                if !g.accounts.contains_key(&hash) {
                    g.insert(hash, account);
                }
                return Ok(true);
            }
        };
        let wait = {
            let mut g = self.state();
            if g.keyed.contains(&hash) {
                return Ok(false);
            }
            let mut ops = vec![(kkey(api_key), hash.to_vec()), (kpkey(&hash), b"1".to_vec())];
            if !g.accounts.contains_key(&hash) {
                ops.push((pkey(&hash), json(&account)?));
            }
            let wait = Self::send(s, ops)?;
            g.keyed.insert(hash);
            if !g.accounts.contains_key(&hash) {
                g.insert(hash, account);
            }
            wait
        };
        Self::wait(wait).await?;
        Ok(true)
    }

    /// The permit an API key spends (with PostgreSQL, also a key another replica issued: the
    /// permit then joins this replica's view).
    pub async fn permit_of_key(&self, api_key: &str) -> Result<Option<B256>, MeterError> {
        match &self.store {
            Store::Sled(s) => Ok(s
                .db
                .get(kkey(api_key))
                .map_err(db_err)?
                .filter(|v| v.len() == 32)
                .map(|v| B256::from_slice(&v))),
            Store::Postgres(p) => p.pg.find_key(key_hash(api_key), &self.state).await,
        }
    }

    /// Charges `amount` to the permit and returns the journal entry once it is on disk.
    /// `request_id` is the host's (unique) id; `client_request_id` what the client sent, if any;
    /// `limit` the most the user's unsettled total in the permit's stablecoin may reach (the
    /// deposit as read from the chain, less what is being withdrawn). The sled ledger's caller
    /// has checked both against this process's view, which is the whole truth there; the
    /// PostgreSQL ledger checks them again in the database, against every replica's charges.
    pub async fn charge(
        &self,
        hash: B256,
        amount: U256,
        request_id: &str,
        client_request_id: Option<&str>,
        limit: U256,
    ) -> Result<Charge, MeterError> {
        let s = match &self.store {
            Store::Sled(s) => s,
            Store::Postgres(p) => {
                let (done, wait) = tokio::sync::oneshot::channel();
                p.charges
                    .send(postgres::PgCharge {
                        hash,
                        amount,
                        request_id: request_id.to_string(),
                        client_request_id: client_request_id.map(str::to_string),
                        limit,
                        done,
                    })
                    .map_err(|_| MeterError::Ledger("the ledger is closed".into()))?;
                return wait.await.map_err(|_| MeterError::Ledger("the committer stopped".into()))?;
            }
        };
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
            let wait = match Self::send(s, ops) {
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
        let s = match &self.store {
            Store::Sled(s) => s,
            Store::Postgres(p) => {
                p.pg.settled(hash, amount, requests).await?;
                self.state().update(&hash, |acc| {
                    acc.settled_amount = acc.settled_amount.max(amount);
                    acc.settled_requests = acc.settled_requests.max(requests);
                });
                return Ok(());
            }
        };
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
            Self::send(s, vec![(pkey(&hash), json(&acc)?)])?
        };
        Self::wait(wait).await
    }

    /// Marks a permit the contract refused for good (`reason` is its `SkipReason`): its key stops
    /// working and settlement stops sending it.
    pub async fn mark_rejected(&self, hash: B256, reason: u8) -> Result<(), MeterError> {
        let s = match &self.store {
            Store::Sled(s) => s,
            Store::Postgres(p) => {
                p.pg.rejected(hash, reason).await?;
                self.state().update(&hash, |acc| acc.rejected = Some(reason));
                return Ok(());
            }
        };
        let wait = {
            let mut g = self.state();
            let Some((_, acc)) = g.update(&hash, |acc| acc.rejected = Some(reason)) else { return Ok(()) };
            Self::send(s, vec![(pkey(&hash), json(&acc)?)])?
        };
        Self::wait(wait).await
    }

    /// The journal entry of a request, by the host's id.
    pub async fn charge_by_request(&self, request_id: &str) -> Result<Option<Charge>, MeterError> {
        match &self.store {
            Store::Sled(s) => match s.hot.get(rkey(request_id)).map_err(db_err)? {
                Some(seq) => Self::entry(s, &seq),
                None => Ok(None),
            },
            Store::Postgres(p) => p.pg.by_request(request_id).await,
        }
    }

    /// The latest journal entry of `permit` whose client sent `client_request_id`.
    pub async fn charge_by_client_id(
        &self,
        permit: &B256,
        client_request_id: &str,
    ) -> Result<Option<Charge>, MeterError> {
        match &self.store {
            Store::Sled(s) => match s.hot.get(ckey(permit, client_request_id)).map_err(db_err)? {
                Some(seq) => Self::entry(s, &seq),
                None => Ok(None),
            },
            Store::Postgres(p) => p.pg.by_client_id(permit, client_request_id).await,
        }
    }

    fn entry(s: &SledStore, seq: &[u8]) -> Result<Option<Charge>, MeterError> {
        let Ok(seq) = <[u8; 8]>::try_from(seq) else { return Ok(None) };
        match s.hot.get(jkey(u64::from_be_bytes(seq))).map_err(db_err)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| MeterError::Ledger(format!("journal entry: {e}"))),
            None => Ok(None),
        }
    }

    /// Every journal entry, in order.
    pub async fn journal(&self) -> Result<Vec<Charge>, MeterError> {
        match &self.store {
            Store::Sled(s) => s
                .hot
                .scan_prefix(b"j/")
                .map(|kv| {
                    let (_, v) = kv.map_err(db_err)?;
                    serde_json::from_slice(&v).map_err(|e| MeterError::Ledger(format!("journal entry: {e}")))
                })
                .collect(),
            Store::Postgres(p) => p.pg.journal().await,
        }
    }

    #[cfg(test)]
    pub(crate) fn set_hook(&self, hook: Option<CommitHook>) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The permit's charged totals as they are on disk (tests compare them with what was issued).
    #[cfg(test)]
    pub(crate) fn totals_on_disk(&self, hash: &B256) -> Option<(U256, u64)> {
        let Store::Sled(s) = &self.store else { return None };
        s.hot.get(tkey(hash)).ok().flatten().and_then(|v| store::totals_of(&v))
    }
}

impl Drop for Ledger {
    /// Lets the committer finish what is queued and stop, so the database is closed (and its
    /// lock released) when the ledger is.
    fn drop(&mut self) {
        match &self.store {
            Store::Sled(s) => {
                s.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(h) = s.committer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = h.join();
                }
            }
            Store::Postgres(p) => p.tasks.iter().for_each(tokio::task::JoinHandle::abort),
        }
    }
}

/// The SHA-256 of an API key: only that is stored.
fn key_hash(api_key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(api_key.as_bytes()).into()
}
