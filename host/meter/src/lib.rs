//! The gate and the meter: outside the sandbox, before and after every paid inference.
//!
//! - **Who is calling** ([`caller`]): an API key the host issued for a spending permit to a
//!   caller who proved control of the permit's user; or a Sign-In with Ethereum session
//!   ([`siwe`]). A permit alone is never enough: permits are public once settled.
//! - **What the chain says** ([`chain_view`](crate::chain_view)): cached reads kept fresh by
//!   events, every call under a deadline; a silent RPC is an outage, and during one the host
//!   serves callers it knows within their bounds and refuses strangers at once.
//! - **May they, can they pay** ([`admit`]): the access matrix (the owner free, `accessThreshold`
//!   to use, `premiumThreshold` for large batches), rate limits for everyone, and funds: the
//!   price is reserved before the plugin runs and charged only if it succeeds.
//! - **What it cost** ([`ledger`], [`receipt`]): every charge durable before its answer leaves,
//!   with a receipt the host signs; [`settle`] pays the owner on chain.
//!
//! A user cannot lose more than they signed for, and the host extends no credit to strangers.

pub mod admit;
pub mod caller;
mod chain_view;
mod error;
pub mod ledger;
pub mod receipt;
pub mod settle;
pub mod siwe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::providers::DynProvider;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::Eip712Domain;
use div_chain::permit_domain;

pub use admit::{Admitted, PRICE_DECIMALS, Ticket, in_token_units, price_with_tokens};
pub use caller::{Credential, Proof, ecdsa_exact, key_proof_message};
pub use error::{MeterError, skip_reason};
pub use ledger::{Charge, Ledger, ModelUsage, PermitAccount, PermitFields, Totals};
pub use receipt::Receipt;

/// How the meter works.
#[derive(Clone)]
pub struct MeterConfig {
    /// The host's key: the `host` in permits, the signer of receipts and settlements.
    pub host: PrivateKeySigner,
    /// Chain id.
    pub chain_id: u64,
    /// `PaymentStream`'s address.
    pub payment_stream: Address,
    /// `ModelVault`'s address.
    pub model_vault: Address,
    /// The chain.
    pub provider: DynProvider,
    /// Longest a chain read is trusted (balances, thresholds, revocations).
    pub cache_ttl: Duration,
    /// Longest any chain call may take; past it the RPC counts as down.
    pub rpc_timeout: Duration,
    /// Largest batch (inputs) without the premium tier.
    pub premium_batch: usize,
    /// Requests per second per permit (access tier).
    pub rate_per_sec: u32,
    /// Requests per second per permit (premium tier, and owners).
    pub premium_rate_per_sec: u32,
    /// Unexpired API keys one user may hold on this host.
    pub max_keys_per_user: usize,
}

/// A model as the meter sees it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// Its name on this host.
    pub name: String,
    /// Its `ModelVault` id.
    pub model_id: B256,
}

/// The gate and meter of one host.
pub struct Meter {
    config: MeterConfig,
    domain: Eip712Domain,
    ledger: Arc<Ledger>,
    caches: Mutex<chain_view::Caches>,
    health: chain_view::Health,
    reserved: Mutex<admit::Reservations>,
    buckets: Mutex<HashMap<B256, admit::Bucket>>,
    /// Rate limits counted with the other replicas of this host, when they share one.
    shared_rate: std::sync::OnceLock<Arc<dyn SharedRate>>,
    challenges: Arc<siwe::Nonces>,
    /// One settlement round at a time.
    settling: tokio::sync::Mutex<()>,
    /// Woken when charges pile up (the settlement loop listens).
    pub charged: tokio::sync::Notify,
    /// Sign-In with Ethereum sessions.
    pub sessions: siwe::Sessions,
}

/// A per-permit rate limit shared by the replicas of a host (Redis, in `div-api`). `take`
/// counts one request of `key` against `per_sec`: `Some(allowed)`, or `None` when the shared
/// store did not answer (the replica's own bucket decides then).
pub trait SharedRate: Send + Sync {
    /// Counts one request.
    fn take(
        &self,
        key: B256,
        per_sec: u32,
    ) -> std::pin::Pin<Box<dyn Future<Output = Option<bool>> + Send + '_>>;
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Meter {
    /// A meter keeping its ledger in `ledger`.
    pub fn new(config: MeterConfig, ledger: Arc<Ledger>) -> Self {
        // key challenges, sign-in nonces and sessions any replica of this host accepts (they
        // share the host key)
        let secret = config.host.credential().to_bytes();
        let challenges = Arc::new(siwe::Nonces::keyed(&secret));
        let sign_in = Arc::new(siwe::Nonces::keyed(&[b"sign-in".as_slice(), &secret[..]].concat()));
        Self::with_nonces(config, ledger, challenges, sign_in)
    }

    /// The meter of another chain beside `first`: it keeps its own ledger, chain view, sessions
    /// and settlement, and shares `first`'s single-use challenges and sign-in nonces, so a client
    /// asks for one without naming a chain (what it then signs names the chain) and a nonce is
    /// used once across every chain.
    pub fn beside(first: &Meter, config: MeterConfig, ledger: Arc<Ledger>) -> Self {
        Self::with_nonces(config, ledger, first.challenges.clone(), first.sessions.nonces().clone())
    }

    fn with_nonces(
        config: MeterConfig,
        ledger: Arc<Ledger>,
        challenges: Arc<siwe::Nonces>,
        sign_in: Arc<siwe::Nonces>,
    ) -> Self {
        let (secret, chain_id) = (config.host.credential().to_bytes(), config.chain_id);
        let domain = permit_domain(config.chain_id, config.payment_stream);
        Self {
            config,
            domain,
            ledger,
            caches: Mutex::default(),
            health: chain_view::Health::default(),
            reserved: Mutex::default(),
            buckets: Mutex::default(),
            shared_rate: std::sync::OnceLock::new(),
            challenges,
            settling: tokio::sync::Mutex::new(()),
            charged: tokio::sync::Notify::new(),
            sessions: siwe::Sessions::keyed(sign_in, &secret, chain_id),
        }
    }

    /// Counts rate limits with the other replicas through `shared` from now on (set once).
    pub fn share_rate_limits(&self, shared: Arc<dyn SharedRate>) {
        let _ = self.shared_rate.set(shared);
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The configuration.
    pub fn config(&self) -> &MeterConfig {
        &self.config
    }

    /// The receipt of a charged request, for the holder of the permit it was charged to (by its
    /// API key or a session as its user). `id` is the host's request id or, within the caller's
    /// own permit, the `x-request-id` the client sent. `None`: no such charge for this caller
    /// (the request was not charged: it failed, or never arrived).
    pub async fn receipt(&self, credential: Credential<'_>, id: &str) -> Result<Option<Receipt>, MeterError> {
        let api_key = match credential {
            Credential::ApiKey(k) => Some(k),
            _ => None,
        };
        let allowed: Box<dyn Fn(&B256) -> bool + Send + Sync> = match credential {
            Credential::None => return Err(MeterError::MissingCredential),
            Credential::ApiKey(key) => {
                let mine = self.ledger.permit_of_key(key).await?.ok_or(MeterError::InvalidKey)?;
                Box::new(move |h| *h == mine)
            }
            Credential::Session(token) => {
                let who = self.sessions.address(token).ok_or(MeterError::InvalidKey)?;
                let ledger = self.ledger.clone();
                Box::new(move |h| ledger.account(h).is_some_and(|a| a.permit.user == who))
            }
        };
        let mut found = self.ledger.charge_by_request(id).await?.filter(|c| allowed(&c.permit_hash));
        if found.is_none()
            && let Some(key) = api_key
            && let Some(mine) = self.ledger.permit_of_key(key).await?
        {
            found = self.ledger.charge_by_client_id(&mine, id).await?;
        }
        let Some(charge) = found else { return Ok(None) };
        let model_id =
            self.ledger.account(&charge.permit_hash).map(|a| a.permit.model_id).unwrap_or_default();
        Receipt::sign(&charge, model_id, &self.config.host).map(Some).map_err(MeterError::Ledger)
    }
}
