//! The gate and the meter: outside the sandbox, before and after every paid inference.
//!
//! **Who is calling.** A caller presents an API key the host issued against a spending permit it
//! signed (`POST /v1/keys`; one key per permit, so a captured permit cannot mint a second key), so
//! stock OpenAI clients work with `Authorization: Bearer <key>`.
//!
//! **May they** (the access matrix): the model's owner always; anyone else needs
//! `accessThreshold` of the model's access token to run inference and `premiumThreshold` to send
//! batches larger than [`MeterConfig::premium_batch`], with a higher rate limit.
//!
//! **Can they pay.** The permit must be for this model and this host, unexpired and not revoked,
//! with room under its cap; the user's deposit in the permit's token, minus a withdrawal they
//! asked for, minus what this host charged and has not settled, minus what requests in flight
//! have reserved, must cover the price. The price is reserved before the plugin runs and charged
//! (durably, see [`ledger`]) only if it succeeds; a failed request releases it.
//!
//! **Chain reads** are cached with a bounded staleness ([`MeterConfig::cache_ttl`]). When the
//! RPC cannot be reached a user the host has seen keeps being served from the last values read,
//! still bounded by their permit's cap and the charges recorded since; a user never seen is
//! refused with 503. A user cannot lose more than they signed for, and the host does not
//! extend credit to strangers on a guess.

pub mod ledger;
pub mod settle;
pub mod siwe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, Signature, U256};
use alloy::providers::DynProvider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::Eip712Domain;
use div_chain::bindings::{ModelAccessToken, ModelVault, PaymentStream};
use div_chain::{SpendingPermit, permit_domain};
use serde::{Deserialize, Serialize};

pub use ledger::{Charge, Ledger, ModelUsage, PermitAccount, PermitFields};

/// Why a request was refused or could not be metered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    /// No credential.
    #[error("this model is paid: send `Authorization: Bearer <key>` (get a key with POST /v1/keys)")]
    MissingCredential,
    /// An API key this host did not issue.
    #[error("unknown API key")]
    InvalidKey,
    /// A signed-in session, but paid inference needs a permit.
    #[error("signed in as {0}, but this model is paid: sign a spending permit (POST /v1/keys)")]
    PermitRequired(Address),
    /// The permit's signature is not the user's.
    #[error("the permit signature does not recover to the permit's user")]
    BadSignature,
    /// The permit was signed for another chain or contract.
    #[error(
        "the permit is for chain {chain_id} / {contract}; this host settles on chain {expected_chain} / {expected_contract}"
    )]
    WrongChain {
        /// The chain the caller says they signed for.
        chain_id: u64,
        /// The contract they say they signed for.
        contract: Address,
        /// Ours.
        expected_chain: u64,
        /// Ours.
        expected_contract: Address,
    },
    /// The permit names another host.
    #[error("the permit is for host {permit_host}; this host is {host}")]
    WrongHost {
        /// In the permit.
        permit_host: Address,
        /// This host.
        host: Address,
    },
    /// The permit is for another model.
    #[error("the permit is for model {permit_model}, not {model}")]
    WrongModel {
        /// In the permit.
        permit_model: B256,
        /// Asked for.
        model: B256,
    },
    /// Past its expiry.
    #[error("the permit expired at {0}")]
    Expired(u64),
    /// Revoked by its user.
    #[error("the permit was revoked by its user")]
    Revoked,
    /// A permit that already has its key.
    #[error("this permit already has an API key; sign a new permit (another nonce) for another key")]
    Replayed,
    /// Not enough of the access token.
    #[error("holding {} of the model's access token; {} needed", tokens(*have), tokens(*need))]
    InsufficientTokens {
        /// Balance.
        have: U256,
        /// Threshold.
        need: U256,
    },
    /// Batches need the premium tier.
    #[error("batches of more than {max} inputs need {} access tokens (premium); holding {}", tokens(*need), tokens(*have))]
    PremiumRequired {
        /// Largest batch without premium.
        max: usize,
        /// Balance.
        have: U256,
        /// Premium threshold.
        need: U256,
    },
    /// The permit's cap would be passed.
    #[error("the permit's cap of {cap} is reached ({charged} charged, {price} more needed)")]
    OverCap {
        /// The cap.
        cap: U256,
        /// Charged and reserved so far.
        charged: U256,
        /// This request's price.
        price: U256,
    },
    /// The deposit does not cover the price.
    #[error("deposit {available} available after unsettled charges; {price} needed")]
    InsufficientFunds {
        /// What is left.
        available: U256,
        /// Price.
        price: U256,
    },
    /// Too many requests.
    #[error("rate limit of {per_sec} requests/s reached")]
    RateLimited {
        /// The limit.
        per_sec: u32,
    },
    /// The chain cannot be read and nothing is known about this caller.
    #[error("the chain cannot be read: {0}")]
    ChainUnavailable(String),
    /// The ledger cannot record charges.
    #[error("the charge ledger: {0}")]
    Ledger(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

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
    /// Largest batch (inputs) without the premium tier.
    pub premium_batch: usize,
    /// Requests per second per permit (access tier).
    pub rate_per_sec: u32,
    /// Requests per second per permit (premium tier).
    pub premium_rate_per_sec: u32,
}

/// A model as the meter sees it.
#[derive(Debug, Clone)]
pub struct ModelRef {
    /// Its name on this host.
    pub name: String,
    /// Its `ModelVault` id.
    pub model_id: B256,
}

#[derive(Clone)]
struct ModelInfo {
    owner: Address,
    access_token: Address,
    price: U256,
    price_per_1k: U256,
}

#[derive(Clone, Copy)]
struct TokenInfo {
    balance: U256,
    access: U256,
    premium: U256,
}

#[derive(Clone, Copy)]
struct FundsInfo {
    balance: U256,
    pending_withdrawal: U256,
}

/// A cache entry: the value and when it was read.
struct Cached<T> {
    value: T,
    at: Instant,
}

#[derive(Default)]
struct Caches {
    models: HashMap<B256, Cached<ModelInfo>>,
    tokens: HashMap<(Address, Address), Cached<TokenInfo>>,
    funds: HashMap<(Address, Address), Cached<FundsInfo>>,
    revoked: HashMap<B256, Cached<bool>>,
}

#[derive(Default)]
struct Reservations {
    by_user: HashMap<(Address, Address), U256>,
    by_permit: HashMap<B256, U256>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The gate and meter of one host.
pub struct Meter {
    config: MeterConfig,
    domain: Eip712Domain,
    ledger: Arc<Ledger>,
    caches: Mutex<Caches>,
    reserved: Mutex<Reservations>,
    buckets: Mutex<HashMap<B256, Bucket>>,
    /// Woken when charges pile up (the settlement loop listens).
    pub charged: tokio::sync::Notify,
    /// Sign-In with Ethereum sessions.
    pub sessions: siwe::Sessions,
}

/// How a caller proves what it may spend.
pub enum Credential<'a> {
    /// Nothing was sent.
    None,
    /// `Authorization: Bearer <key>` from `POST /v1/keys`.
    ApiKey(&'a str),
    /// `Authorization: Bearer <session>` from `POST /v1/siwe`.
    Session(&'a str),
    /// A signed permit sent with the request (`X-DIV-Permit`).
    Permit {
        /// The permit.
        permit: PermitFields,
        /// Its signature.
        signature: Bytes,
    },
}

/// A permit and its signature as `X-DIV-Permit` carries them (base64url of this JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedPermit {
    /// The permit.
    pub permit: PermitFields,
    /// Its signature.
    pub signature: Bytes,
}

/// A request admitted to run: its price is reserved until charged or dropped.
pub struct Ticket {
    meter: Arc<Meter>,
    permit_hash: B256,
    user: Address,
    token: Address,
    /// What is reserved: the most this request may be charged.
    amount: U256,
    /// The model's price per request and per 1000 tokens, as read at admission.
    price: U256,
    price_per_1k: U256,
    done: bool,
}

impl Ticket {
    /// What `tokens` cost on top of the request price: `ceil(price_per_1k × tokens / 1000)`.
    pub fn price_of(&self, tokens: u64) -> U256 {
        price_with_tokens(self.price, self.price_per_1k, tokens)
    }
}

/// A request's price: per request plus per 1000 tokens, rounded up to the base unit.
pub fn price_with_tokens(price: U256, price_per_1k: U256, tokens: u64) -> U256 {
    let per_tokens = (price_per_1k * U256::from(tokens)).div_ceil(U256::from(1000u64));
    price + per_tokens
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.meter.release(self.permit_hash, self.user, self.token, self.amount);
        }
    }
}

/// What the host signs for each charged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The request's id (`x-request-id`).
    pub request_id: String,
    /// The model's `ModelVault` id.
    pub model_id: B256,
    /// The permit charged.
    pub permit_hash: B256,
    /// This request's price (base units, decimal in JSON).
    #[serde(with = "decimal")]
    pub amount: U256,
    /// The permit's total after this request.
    #[serde(with = "decimal")]
    pub cumulative_amount: U256,
    /// The permit's request count after this request.
    pub cumulative_requests: u64,
    /// The host.
    pub host: Address,
    /// The host's EIP-191 signature over [`Receipt::message`] (hex).
    pub signature: String,
}

impl Receipt {
    /// The text the host signs.
    pub fn message(&self) -> String {
        format!(
            "DIV receipt\nrequest: {}\nmodel: {:#x}\npermit: {:#x}\namount: {}\ncumulative: {}\nrequests: {}\nhost: {:#x}",
            self.request_id,
            self.model_id,
            self.permit_hash,
            self.amount,
            self.cumulative_amount,
            self.cumulative_requests,
            self.host
        )
    }

    /// Whether the signature is the host's.
    pub fn verify(&self) -> bool {
        let Ok(bytes) = alloy::hex::decode(self.signature.trim_start_matches("0x")) else { return false };
        let Ok(sig) = Signature::from_raw(&bytes) else { return false };
        sig.recover_address_from_msg(self.message().as_bytes()).is_ok_and(|a| a == self.host)
    }
}

/// Amounts as decimal strings in JSON (what people and wallets read), not alloy's hex.
mod decimal {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<U256>().map_err(serde::de::Error::custom)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn chain_err(e: impl std::fmt::Display) -> MeterError {
    MeterError::ChainUnavailable(e.to_string())
}

impl Meter {
    /// A meter keeping its ledger in `ledger`.
    pub fn new(config: MeterConfig, ledger: Arc<Ledger>) -> Self {
        let domain = permit_domain(config.chain_id, config.payment_stream);
        Self {
            config,
            domain,
            ledger,
            caches: Mutex::default(),
            reserved: Mutex::default(),
            buckets: Mutex::default(),
            charged: tokio::sync::Notify::new(),
            sessions: siwe::Sessions::default(),
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The configuration.
    pub fn config(&self) -> &MeterConfig {
        &self.config
    }

    /// The EIP-712 hash `PaymentStream` gives this permit.
    pub fn permit_hash(&self, permit: &PermitFields) -> B256 {
        SpendingPermit::from(permit).signing_hash(&self.domain)
    }

    /// Checks a permit and its signature and issues the one API key it gets. `claimed` is the
    /// (chain id, contract) the caller says it signed for, when it says so.
    pub async fn issue_key(
        &self,
        permit: PermitFields,
        signature: Bytes,
        claimed: Option<(u64, Address)>,
        model: &ModelRef,
    ) -> Result<(String, B256), MeterError> {
        if let Some((chain_id, contract)) = claimed
            && (chain_id != self.config.chain_id || contract != self.config.payment_stream)
        {
            return Err(MeterError::WrongChain {
                chain_id,
                contract,
                expected_chain: self.config.chain_id,
                expected_contract: self.config.payment_stream,
            });
        }
        let (hash, account) = self.verified_account(permit, signature, model).await?;
        let key = format!("div-{}", alloy::hex::encode(rand::random::<[u8; 24]>()));
        if !self.ledger.register(hash, account, Some(&key)).await? {
            return Err(MeterError::Replayed);
        }
        Ok((key, hash))
    }

    /// Checks a permit's signature and terms; returns its hash and a fresh account for it.
    async fn verified_account(
        &self,
        permit: PermitFields,
        signature: Bytes,
        model: &ModelRef,
    ) -> Result<(B256, PermitAccount), MeterError> {
        let hash = self.permit_hash(&permit);
        let sig = Signature::from_raw(&signature).map_err(|_| MeterError::BadSignature)?;
        if sig.recover_address_from_prehash(&hash).ok() != Some(permit.user) {
            return Err(MeterError::BadSignature);
        }
        self.check_permit(&permit, hash, model).await?;
        let account = PermitAccount {
            permit,
            signature,
            model: model.name.clone(),
            charged_amount: U256::ZERO,
            charged_requests: 0,
            settled_amount: U256::ZERO,
            settled_requests: 0,
        };
        Ok((hash, account))
    }

    async fn check_permit(
        &self,
        permit: &PermitFields,
        hash: B256,
        model: &ModelRef,
    ) -> Result<(), MeterError> {
        let host = self.config.host.address();
        if permit.host != host {
            return Err(MeterError::WrongHost { permit_host: permit.host, host });
        }
        if permit.model_id != model.model_id {
            return Err(MeterError::WrongModel { permit_model: permit.model_id, model: model.model_id });
        }
        if permit.expiry <= now() {
            return Err(MeterError::Expired(permit.expiry));
        }
        if self.revoked(hash).await? {
            return Err(MeterError::Revoked);
        }
        Ok(())
    }

    /// The permit a credential spends: an API key's, or a permit sent with the request (checked
    /// and recorded on first sight, its signature compared on every later one).
    async fn resolve(&self, credential: Credential<'_>, model: &ModelRef) -> Result<B256, MeterError> {
        match credential {
            Credential::None => Err(MeterError::MissingCredential),
            Credential::ApiKey(key) => self.ledger.permit_of_key(key).ok_or(MeterError::InvalidKey),
            Credential::Session(token) => {
                Err(self.sessions.address(token).map_or(MeterError::InvalidKey, MeterError::PermitRequired))
            }
            Credential::Permit { permit, signature } => {
                let hash = self.permit_hash(&permit);
                if let Some(acc) = self.ledger.account(&hash) {
                    return if acc.signature == signature { Ok(hash) } else { Err(MeterError::BadSignature) };
                }
                let (hash, account) = self.verified_account(permit, signature, model).await?;
                self.ledger.register(hash, account, None).await?;
                Ok(hash)
            }
        }
    }

    /// Admits a request of `inputs` inputs on `model` for the holder of `credential`. `None`
    /// means it runs free (the model's owner).
    pub async fn admit(
        self: &Arc<Self>,
        credential: Credential<'_>,
        model: &ModelRef,
        inputs: usize,
    ) -> Result<Option<Ticket>, MeterError> {
        self.admit_tokens(credential, model, inputs, 0).await
    }

    /// [`Meter::admit`] for a request priced per token too: it reserves the price of up to
    /// `max_tokens` tokens (prompt and generated), and [`Meter::charge_tokens`] charges what was
    /// used.
    pub async fn admit_tokens(
        self: &Arc<Self>,
        credential: Credential<'_>,
        model: &ModelRef,
        inputs: usize,
        max_tokens: u64,
    ) -> Result<Option<Ticket>, MeterError> {
        if let Credential::Session(token) = &credential
            && let Some(who) = self.sessions.address(token)
            && self.model_info(model.model_id).await?.owner == who
        {
            // the owner, signed in, uses their own model free
            return Ok(None);
        }
        let hash = self.resolve(credential, model).await?;
        let account = self.ledger.account(&hash).ok_or(MeterError::InvalidKey)?;
        let permit = &account.permit;
        self.check_permit(permit, hash, model).await?;
        let info = self.model_info(model.model_id).await?;
        if permit.user == info.owner {
            return Ok(None);
        }
        let tokens = self.token_info(info.access_token, permit.user).await?;
        if tokens.balance < tokens.access {
            return Err(MeterError::InsufficientTokens { have: tokens.balance, need: tokens.access });
        }
        let premium = tokens.balance >= tokens.premium;
        if inputs > self.config.premium_batch && !premium {
            return Err(MeterError::PremiumRequired {
                max: self.config.premium_batch,
                have: tokens.balance,
                need: tokens.premium,
            });
        }
        self.take_rate(hash, premium)?;
        let funds = self.funds_info(permit.user, permit.token).await?;
        let price = price_with_tokens(info.price, info.price_per_1k, max_tokens);
        let (user, token) = (permit.user, permit.token);
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight_permit = r.by_permit.get(&hash).copied().unwrap_or_default();
        // read again: requests charged on this permit during the chain reads above count too
        let charged = self.ledger.account(&hash).map_or(account.charged_amount, |a| a.charged_amount);
        if charged + in_flight_permit + price > permit.max_amount {
            return Err(MeterError::OverCap {
                cap: permit.max_amount,
                charged: charged + in_flight_permit,
                price,
            });
        }
        let in_flight_user = r.by_user.get(&(user, token)).copied().unwrap_or_default();
        let committed = self.ledger.unsettled_of(user, token) + in_flight_user + funds.pending_withdrawal;
        let available = funds.balance.saturating_sub(committed);
        if available < price {
            return Err(MeterError::InsufficientFunds { available, price });
        }
        *r.by_permit.entry(hash).or_default() += price;
        *r.by_user.entry((user, token)).or_default() += price;
        drop(r);
        Ok(Some(Ticket {
            meter: self.clone(),
            permit_hash: hash,
            user,
            token,
            amount: price,
            price: info.price,
            price_per_1k: info.price_per_1k,
            done: false,
        }))
    }

    fn release(&self, hash: B256, user: Address, token: Address, amount: U256) {
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = r.by_permit.get_mut(&hash) {
            *v = v.saturating_sub(amount);
        }
        if let Some(v) = r.by_user.get_mut(&(user, token)) {
            *v = v.saturating_sub(amount);
        }
    }

    /// Charges an admitted request that succeeded: durable before this returns; then the receipt.
    pub async fn charge(
        &self,
        ticket: Ticket,
        request_id: &str,
        model: &ModelRef,
    ) -> Result<Receipt, MeterError> {
        let amount = ticket.amount;
        self.charge_amount(ticket, request_id, model, amount).await
    }

    /// Charges a request admitted with [`Meter::admit_tokens`] for the `tokens` it used (never
    /// more than was reserved).
    pub async fn charge_tokens(
        &self,
        ticket: Ticket,
        request_id: &str,
        model: &ModelRef,
        tokens: u64,
    ) -> Result<Receipt, MeterError> {
        let amount = ticket.price_of(tokens).min(ticket.amount);
        self.charge_amount(ticket, request_id, model, amount).await
    }

    async fn charge_amount(
        &self,
        mut ticket: Ticket,
        request_id: &str,
        model: &ModelRef,
        amount: U256,
    ) -> Result<Receipt, MeterError> {
        let charge = self.ledger.charge(ticket.permit_hash, amount, request_id).await;
        // charged or not, the reservation ends here
        ticket.done = true;
        self.release(ticket.permit_hash, ticket.user, ticket.token, ticket.amount);
        let charge = charge?;
        self.charged.notify_one();
        let mut receipt = Receipt {
            request_id: request_id.to_string(),
            model_id: model.model_id,
            permit_hash: charge.permit_hash,
            amount: charge.amount,
            cumulative_amount: charge.cumulative_amount,
            cumulative_requests: charge.cumulative_requests,
            host: self.config.host.address(),
            signature: String::new(),
        };
        let sig = self
            .config
            .host
            .sign_message_sync(receipt.message().as_bytes())
            .map_err(|e| MeterError::Ledger(format!("signing the receipt: {e}")))?;
        receipt.signature = format!("0x{}", alloy::hex::encode(sig.as_bytes()));
        Ok(receipt)
    }

    fn take_rate(&self, hash: B256, premium: bool) -> Result<(), MeterError> {
        let per_sec = if premium { self.config.premium_rate_per_sec } else { self.config.rate_per_sec };
        let burst = f64::from(per_sec) * 2.0;
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let bucket = b.entry(hash).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * f64::from(per_sec)).min(burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(MeterError::RateLimited { per_sec });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// A cached read: fresh within the TTL; on a failed refresh the last value (a known caller),
    /// else the error (an unknown one).
    async fn cached<K, T, F>(
        &self,
        pick: impl Fn(&mut Caches) -> &mut HashMap<K, Cached<T>>,
        key: K,
        read: F,
    ) -> Result<T, MeterError>
    where
        K: std::hash::Hash + Eq + Clone,
        T: Clone,
        F: std::future::Future<Output = Result<T, MeterError>>,
    {
        let stale = {
            let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            match pick(&mut c).get(&key) {
                Some(e) if e.at.elapsed() < self.config.cache_ttl => return Ok(e.value.clone()),
                Some(e) => Some(e.value.clone()),
                None => None,
            }
        };
        match read.await {
            Ok(v) => {
                let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
                pick(&mut c).insert(key, Cached { value: v.clone(), at: Instant::now() });
                Ok(v)
            }
            Err(MeterError::ChainUnavailable(e)) => match stale {
                Some(v) => {
                    tracing::warn!("chain read failed ({e}); serving a known caller from the last value");
                    Ok(v)
                }
                None => Err(MeterError::ChainUnavailable(e)),
            },
            Err(e) => Err(e),
        }
    }

    async fn model_info(&self, id: B256) -> Result<ModelInfo, MeterError> {
        let vault = ModelVault::new(self.config.model_vault, self.config.provider.clone());
        self.cached(|c| &mut c.models, id, async move {
            let m = vault.getModel(id).call().await.map_err(chain_err)?;
            Ok(ModelInfo {
                owner: m.owner,
                access_token: m.accessToken,
                price: m.pricePerRequest,
                price_per_1k: m.pricePer1kTokens,
            })
        })
        .await
    }

    async fn token_info(&self, token: Address, user: Address) -> Result<TokenInfo, MeterError> {
        let t = ModelAccessToken::new(token, self.config.provider.clone());
        self.cached(|c| &mut c.tokens, (token, user), async move {
            let (balance, access, premium) = tokio::try_join!(
                async { t.balanceOf(user).call().await.map_err(chain_err) },
                async { t.accessThreshold().call().await.map_err(chain_err) },
                async { t.premiumThreshold().call().await.map_err(chain_err) },
            )?;
            Ok(TokenInfo { balance, access, premium })
        })
        .await
    }

    async fn funds_info(&self, user: Address, token: Address) -> Result<FundsInfo, MeterError> {
        let ps = PaymentStream::new(self.config.payment_stream, self.config.provider.clone());
        self.cached(|c| &mut c.funds, (user, token), async move {
            let (balance, pending) = tokio::try_join!(
                async { ps.getBalance(user, token).call().await.map_err(chain_err) },
                async { ps.pendingWithdrawal(user, token).call().await.map_err(chain_err) },
            )?;
            Ok(FundsInfo { balance, pending_withdrawal: pending.amount })
        })
        .await
    }

    async fn revoked(&self, hash: B256) -> Result<bool, MeterError> {
        let ps = PaymentStream::new(self.config.payment_stream, self.config.provider.clone());
        self.cached(|c| &mut c.revoked, hash, async move {
            Ok(ps.permitState(hash).call().await.map_err(chain_err)?.revokedAt != 0)
        })
        .await
    }

    /// Follows the chain's events so cached reads change when the chain does, not only when they
    /// expire: deposits, withdrawals and settlements (`PaymentStream`) drop the user's funds;
    /// a revocation marks the permit revoked at once; `Transfer`s of an access token drop both
    /// parties' balances and a threshold change drops the token's entries. The TTL stays the
    /// bound when an event is missed (RPC down). Runs until the task is dropped.
    pub async fn follow_chain(self: Arc<Self>, poll: Duration) {
        use alloy::providers::Provider;
        use alloy::sol_types::SolEvent;
        let p = self.config.provider.clone();
        let mut from = loop {
            match p.get_block_number().await {
                Ok(b) => break b,
                Err(_) => tokio::time::sleep(poll).await,
            }
        };
        let address_topic =
            |t: &B256| (t[..12].iter().all(|b| *b == 0)).then(|| Address::from_slice(&t[12..]));
        loop {
            tokio::time::sleep(poll).await;
            let Ok(latest) = p.get_block_number().await else { continue };
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
            let Ok(logs) = p.get_logs(&filter).await else { continue };
            let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
            for log in &logs {
                let topics = log.topics();
                let Some(sig) = topics.first() else { continue };
                if log.address() == self.config.payment_stream {
                    if *sig == PaymentStream::PermitRevokedByUser::SIGNATURE_HASH
                        && let Some(hash) = topics.get(1)
                    {
                        c.revoked.insert(*hash, Cached { value: true, at: Instant::now() });
                    }
                    for user in topics[1..].iter().filter_map(address_topic) {
                        c.funds.retain(|(u, _), _| *u != user);
                    }
                } else if *sig == ModelAccessToken::Transfer::SIGNATURE_HASH {
                    let token = log.address();
                    for who in topics[1..].iter().filter_map(address_topic) {
                        c.tokens.remove(&(token, who));
                    }
                } else if *sig == ModelAccessToken::AccessThresholdSet::SIGNATURE_HASH
                    || *sig == ModelAccessToken::PremiumThresholdSet::SIGNATURE_HASH
                {
                    let token = log.address();
                    c.tokens.retain(|(t, _), _| *t != token);
                }
            }
            from = latest;
        }
    }

    /// Forgets cached chain reads about `user` (after a settlement or a known change).
    pub fn invalidate_user(&self, user: Address) {
        let mut c = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        c.funds.retain(|(u, _), _| *u != user);
        c.tokens.retain(|(_, u), _| *u != user);
    }
}

/// An access-token amount (18 decimals) as people write it: `1`, `0.5`, `1000`.
fn tokens(v: U256) -> String {
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let (whole, frac) = (v / unit, v % unit);
    if frac.is_zero() {
        return whole.to_string();
    }
    let f = format!("{frac:0>18}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

#[cfg(test)]
mod token_amount_tests {
    use super::*;

    #[test]
    fn access_token_amounts_read_as_whole_tokens() {
        let e18 = U256::from(10u64).pow(U256::from(18u64));
        assert_eq!(tokens(U256::ZERO), "0");
        assert_eq!(tokens(e18), "1");
        assert_eq!(tokens(e18 * U256::from(1000u64)), "1000");
        assert_eq!(tokens(e18 / U256::from(2u64)), "0.5");
        assert_eq!(tokens(U256::from(1u64)), "0.000000000000000001");
        let e = MeterError::InsufficientTokens { have: U256::ZERO, need: e18 };
        assert_eq!(e.to_string(), "holding 0 of the model's access token; 1 needed");
    }
}
