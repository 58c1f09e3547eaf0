//! What the chain says, and how fresh: the meter's cached reads of `ModelVault`, the access
//! tokens and `PaymentStream`, kept current by the chain's events, and what the meter does when
//! the RPC stops answering.
//!
//! **Freshness.** Every read is cached for [`MeterConfig::cache_ttl`](crate::MeterConfig) and
//! dropped early when an event says it changed ([`Meter::follow_chain`]).
//!
//! **Outages.** Every chain call has a deadline ([`MeterConfig::rpc_timeout`](crate::MeterConfig)):
//! a silent RPC is treated exactly like one that refuses connections. The first failure marks
//! the chain *down* (logged once); while it is down no request waits on the RPC at all: callers
//! the host has read before are served from their last values (still bounded by their permit's
//! cap and every charge recorded since), callers never seen get an immediate 503. The event
//! follower keeps probing and marks the chain up again (logged) as soon as it answers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::providers::Provider;
use div_chain::bindings::{DevStablecoin, ModelAccessToken, ModelVault, PaymentStream};

use crate::{Meter, MeterError};

#[derive(Clone)]
pub(crate) struct ModelInfo {
    pub owner: Address,
    pub access_token: Address,
    pub price: U256,
    pub price_per_1k: U256,
}

#[derive(Clone, Copy)]
pub(crate) struct TokenInfo {
    pub balance: U256,
    pub access: U256,
    pub premium: U256,
}

#[derive(Clone, Copy)]
pub(crate) struct FundsInfo {
    pub balance: U256,
    pub pending_withdrawal: U256,
}

/// A cache entry: the value and when it was read. An event that says the value changed marks
/// it expired rather than dropping it: the next read refreshes it, and while the chain is down it
/// is still the last value known for that caller.
pub(crate) struct Cached<T> {
    value: T,
    at: Instant,
    expired: bool,
}

impl<T> Cached<T> {
    fn new(value: T) -> Self {
        Self { value, at: Instant::now(), expired: false }
    }
}

/// Marks every entry of `map` that `hit` selects expired.
fn expire<K, T>(map: &mut HashMap<K, Cached<T>>, hit: impl Fn(&K) -> bool) {
    for (k, e) in map.iter_mut() {
        if hit(k) {
            e.expired = true;
        }
    }
}

#[derive(Default)]
pub(crate) struct Caches {
    models: HashMap<B256, Cached<ModelInfo>>,
    tokens: HashMap<(Address, Address), Cached<TokenInfo>>,
    funds: HashMap<(Address, Address), Cached<FundsInfo>>,
    revoked: HashMap<B256, Cached<bool>>,
    code: HashMap<Address, Cached<bool>>,
    decimals: HashMap<Address, Cached<u8>>,
}

/// Whether the RPC answers, and since when it does not.
#[derive(Default)]
pub(crate) struct Health {
    down: Mutex<Option<(Instant, String)>>,
}

impl Health {
    fn mark_down(&self, why: &str) {
        let mut g = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            tracing::warn!(
                "the chain RPC is not answering ({why}); serving callers already known from their last \
                 values, refusing new ones with 503 until it answers again"
            );
            *g = Some((Instant::now(), why.to_string()));
        }
    }

    fn mark_up(&self) {
        let mut g = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, _)) = g.take() {
            tracing::info!(down_secs = since.elapsed().as_secs(), "the chain RPC answers again");
        }
    }

    /// Since when and why the chain has not answered, if it has not.
    fn down(&self) -> Option<(Duration, String)> {
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(at, why)| (at.elapsed(), why.clone()))
    }
}

/// A chain read that failed: the RPC did not answer (an outage), or it answered with an error
/// (a revert, a bad request: the chain is up).
pub(crate) enum ReadError {
    Down(String),
    Refused(String),
}

pub(crate) fn read_err(e: alloy::contract::Error) -> ReadError {
    match &e {
        alloy::contract::Error::TransportError(t) if t.is_error_resp() => {
            ReadError::Refused(div_chain::revert_reason(&e))
        }
        alloy::contract::Error::TransportError(_) => ReadError::Down(e.to_string()),
        _ => ReadError::Refused(div_chain::revert_reason(&e)),
    }
}

impl Meter {
    /// Whether the chain answered the last time it was asked.
    pub fn chain_up(&self) -> bool {
        self.health.down().is_none()
    }

    /// A cached read: fresh within the TTL; while the chain is down (or when this read fails
    /// for want of an answer) the last value for a known caller, else a fast error.
    async fn cached<K, T, F>(
        &self,
        pick: impl Fn(&mut Caches) -> &mut HashMap<K, Cached<T>>,
        key: K,
        read: F,
    ) -> Result<T, MeterError>
    where
        K: std::hash::Hash + Eq + Clone,
        T: Clone,
        F: Future<Output = Result<T, ReadError>>,
    {
        let stale = {
            let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            match pick(&mut c).get(&key) {
                Some(e) if !e.expired && e.at.elapsed() < self.config.cache_ttl => {
                    return Ok(e.value.clone());
                }
                Some(e) => Some(e.value.clone()),
                None => None,
            }
        };
        if let Some((for_how_long, why)) = self.health.down() {
            return stale.ok_or_else(|| {
                MeterError::ChainUnavailable(format!(
                    "the chain RPC has not answered for {} s ({why}); this caller is not known to the host yet",
                    for_how_long.as_secs()
                ))
            });
        }
        let result = match tokio::time::timeout(self.config.rpc_timeout, read).await {
            Ok(r) => r,
            Err(_) => {
                Err(ReadError::Down(format!("no answer within {} ms", self.config.rpc_timeout.as_millis())))
            }
        };
        match result {
            Ok(v) => {
                self.health.mark_up();
                let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
                pick(&mut c).insert(key, Cached::new(v.clone()));
                Ok(v)
            }
            Err(ReadError::Down(e)) => {
                self.health.mark_down(&e);
                stale.ok_or(MeterError::ChainUnavailable(e))
            }
            Err(ReadError::Refused(e)) => Err(MeterError::ChainUnavailable(e)),
        }
    }

    pub(crate) async fn model_info(&self, id: B256) -> Result<ModelInfo, MeterError> {
        let vault = ModelVault::new(self.config.model_vault, self.config.provider.clone());
        self.cached(|c| &mut c.models, id, async move {
            let m = vault.getModel(id).call().await.map_err(read_err)?;
            Ok(ModelInfo {
                owner: m.owner,
                access_token: m.accessToken,
                price: m.pricePerRequest,
                price_per_1k: m.pricePer1kTokens,
            })
        })
        .await
    }

    /// The model's owner (who uses it free, rate-limited like anyone).
    pub async fn model_owner(&self, id: B256) -> Result<Address, MeterError> {
        Ok(self.model_info(id).await?.owner)
    }

    pub(crate) async fn token_info(&self, token: Address, user: Address) -> Result<TokenInfo, MeterError> {
        let t = ModelAccessToken::new(token, self.config.provider.clone());
        self.cached(|c| &mut c.tokens, (token, user), async move {
            let (balance, access, premium) = tokio::try_join!(
                async { t.balanceOf(user).call().await.map_err(read_err) },
                async { t.accessThreshold().call().await.map_err(read_err) },
                async { t.premiumThreshold().call().await.map_err(read_err) },
            )?;
            Ok(TokenInfo { balance, access, premium })
        })
        .await
    }

    /// A payment token's decimals (`ERC20.decimals`; only whitelisted tokens have deposits).
    pub(crate) async fn token_decimals(&self, token: Address) -> Result<u8, MeterError> {
        let t = DevStablecoin::new(token, self.config.provider.clone());
        self.cached(|c| &mut c.decimals, token, async move { t.decimals().call().await.map_err(read_err) })
            .await
    }

    /// The model's prices (per request, per 1000 tokens) in `token`'s base units: the vault holds
    /// them in micro-dollars (6 decimals, as USDC counts) whatever stablecoin pays.
    pub(crate) async fn prices_in(
        &self,
        info: &ModelInfo,
        token: Address,
    ) -> Result<(U256, U256), MeterError> {
        let decimals = self.token_decimals(token).await?;
        Ok((
            crate::admit::in_token_units(info.price, decimals),
            crate::admit::in_token_units(info.price_per_1k, decimals),
        ))
    }

    pub(crate) async fn funds_info(&self, user: Address, token: Address) -> Result<FundsInfo, MeterError> {
        let ps = PaymentStream::new(self.config.payment_stream, self.config.provider.clone());
        self.cached(|c| &mut c.funds, (user, token), async move {
            let (balance, pending) = tokio::try_join!(
                async { ps.getBalance(user, token).call().await.map_err(read_err) },
                async { ps.pendingWithdrawal(user, token).call().await.map_err(read_err) },
            )?;
            Ok(FundsInfo { balance, pending_withdrawal: pending.amount })
        })
        .await
    }

    pub(crate) async fn revoked(&self, hash: B256) -> Result<bool, MeterError> {
        let ps = PaymentStream::new(self.config.payment_stream, self.config.provider.clone());
        self.cached(|c| &mut c.revoked, hash, async move {
            Ok(ps.permitState(hash).call().await.map_err(read_err)?.revokedAt != 0)
        })
        .await
    }

    /// Whether `who` has code (a smart account: its signatures are checked by ERC-1271).
    pub(crate) async fn has_code(&self, who: Address) -> Result<bool, MeterError> {
        let p = self.config.provider.clone();
        self.cached(|c| &mut c.code, who, async move {
            p.get_code_at(who).await.map(|c| !c.is_empty()).map_err(|e| ReadError::Down(e.to_string()))
        })
        .await
    }

    /// An `eth_call` with the meter's deadline; an outage marks the chain down.
    pub(crate) async fn call_raw(
        &self,
        to: Address,
        data: Vec<u8>,
    ) -> Result<alloy::primitives::Bytes, MeterError> {
        if let Some((_, why)) = self.health.down() {
            return Err(MeterError::ChainUnavailable(why));
        }
        let tx = alloy::rpc::types::TransactionRequest::default().to(to).input(data.into());
        match tokio::time::timeout(self.config.rpc_timeout, self.config.provider.call(tx)).await {
            Ok(Ok(out)) => {
                self.health.mark_up();
                Ok(out)
            }
            // a revert is an answer: the chain is up, the call said no
            Ok(Err(e)) if e.is_error_resp() => Ok(alloy::primitives::Bytes::new()),
            Ok(Err(e)) => {
                self.health.mark_down(&e.to_string());
                Err(MeterError::ChainUnavailable(e.to_string()))
            }
            Err(_) => {
                let why = format!("no answer within {} ms", self.config.rpc_timeout.as_millis());
                self.health.mark_down(&why);
                Err(MeterError::ChainUnavailable(why))
            }
        }
    }

    /// Follows the chain's events so cached reads change when the chain does, not only when they
    /// expire: deposits, withdrawals and settlements (`PaymentStream`) drop the user's funds;
    /// a revocation marks the permit revoked at once; `Transfer`s of an access token drop both
    /// parties' balances and a threshold change drops the token's entries. Each poll is also the
    /// probe that marks the chain up or down. The TTL stays the bound when an event is missed.
    /// Runs until the task is dropped.
    pub async fn follow_chain(self: Arc<Self>, poll: Duration) {
        use alloy::sol_types::SolEvent;
        let p = self.config.provider.clone();
        let deadline = self.config.rpc_timeout;
        let probe = |e: String| {
            self.health.mark_down(&e);
        };
        let mut from = loop {
            match tokio::time::timeout(deadline, p.get_block_number()).await {
                Ok(Ok(b)) => {
                    self.health.mark_up();
                    break b;
                }
                Ok(Err(e)) => probe(e.to_string()),
                Err(_) => probe(format!("no answer within {} ms", deadline.as_millis())),
            }
            tokio::time::sleep(poll).await;
        };
        let address_topic =
            |t: &B256| (t[..12].iter().all(|b| *b == 0)).then(|| Address::from_slice(&t[12..]));
        loop {
            tokio::time::sleep(poll).await;
            let latest = match tokio::time::timeout(deadline, p.get_block_number()).await {
                Ok(Ok(b)) => {
                    self.health.mark_up();
                    b
                }
                Ok(Err(e)) => {
                    probe(e.to_string());
                    continue;
                }
                Err(_) => {
                    probe(format!("no answer within {} ms", deadline.as_millis()));
                    continue;
                }
            };
            if latest <= from {
                continue;
            }
            let tokens: Vec<Address> = {
                let c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
                let mut t: Vec<Address> = c.tokens.keys().map(|(token, _)| *token).collect();
                t.sort();
                t.dedup();
                t
            };
            let mut watched = tokens.clone();
            watched.push(self.config.payment_stream);
            let filter =
                alloy::rpc::types::Filter::new().address(watched).from_block(from + 1).to_block(latest);
            let Ok(Ok(logs)) = tokio::time::timeout(deadline, p.get_logs(&filter)).await else { continue };
            let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            for log in &logs {
                let topics = log.topics();
                let Some(sig) = topics.first() else { continue };
                if log.address() == self.config.payment_stream {
                    if *sig == PaymentStream::PermitRevokedByUser::SIGNATURE_HASH
                        && let Some(hash) = topics.get(1)
                    {
                        c.revoked.insert(*hash, Cached::new(true));
                    }
                    for user in topics[1..].iter().filter_map(address_topic) {
                        expire(&mut c.funds, |(u, _)| *u == user);
                    }
                } else if *sig == ModelAccessToken::Transfer::SIGNATURE_HASH {
                    let token = log.address();
                    for who in topics[1..].iter().filter_map(address_topic) {
                        expire(&mut c.tokens, |k| *k == (token, who));
                    }
                } else if *sig == ModelAccessToken::AccessThresholdSet::SIGNATURE_HASH
                    || *sig == ModelAccessToken::PremiumThresholdSet::SIGNATURE_HASH
                {
                    let token = log.address();
                    expire(&mut c.tokens, |(t, _)| *t == token);
                }
            }
            from = latest;
        }
    }

    /// Forgets cached chain reads about `user` (after a settlement or a known change).
    pub fn invalidate_user(&self, user: Address) {
        let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        expire(&mut c.funds, |(u, _)| *u == user);
        expire(&mut c.tokens, |(_, u)| *u == user);
    }
}
