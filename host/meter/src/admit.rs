//! May they, can they pay, what did it cost: admission, reservations and charges.
//!
//! A request is admitted when its key's permit is in force, the caller holds enough of the
//! model's access token (premium for large batches), is within its rate, and its funds cover the
//! price after everything already committed: the deposit, minus a withdrawal asked for, minus
//! this host's unsettled charges, minus what requests in flight have reserved. The price is
//! reserved then and charged (durably) only if the request succeeds. A model's owner uses it
//! free, but under the same rate limit as everyone else.

use std::sync::Arc;
use std::time::Instant;

use alloy::primitives::{Address, B256, U256};

use crate::caller::Credential;
use crate::receipt::Receipt;
use crate::{Meter, MeterError, ModelRef};

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
    /// The most the user's unsettled total may reach: the deposit as read at admission, less
    /// what is being withdrawn (a shared ledger checks the charge against it again).
    limit: U256,
    done: bool,
}

impl Ticket {
    /// What `tokens` cost on top of the request price: `ceil(price_per_1k × tokens / 1000)`.
    pub fn price_of(&self, tokens: u64) -> U256 {
        price_with_tokens(self.price, self.price_per_1k, tokens)
    }

    /// The permit this request is charged to.
    pub fn permit_hash(&self) -> B256 {
        self.permit_hash
    }
}

/// A model price (micro-dollars, 6 decimals: the unit the vault stores) in the base units of a
/// stablecoin with `decimals`: the same dollars, rounded up. Without it a user paying with an
/// 18-decimal stablecoin (USDFC) would pay a trillionth of the price.
pub fn in_token_units(micro_usd: U256, decimals: u8) -> U256 {
    let ten = U256::from(10u64);
    match decimals.cmp(&PRICE_DECIMALS) {
        std::cmp::Ordering::Greater => {
            micro_usd.saturating_mul(ten.pow(U256::from(decimals - PRICE_DECIMALS)))
        }
        std::cmp::Ordering::Less => micro_usd.div_ceil(ten.pow(U256::from(PRICE_DECIMALS - decimals))),
        std::cmp::Ordering::Equal => micro_usd,
    }
}

/// The decimals of the prices `ModelVault` stores (micro-dollars).
pub const PRICE_DECIMALS: u8 = 6;

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

#[derive(Default)]
pub(crate) struct Reservations {
    by_user: std::collections::HashMap<(Address, Address), U256>,
    by_permit: std::collections::HashMap<B256, U256>,
}

pub(crate) struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Who a request is admitted as: a paying permit, or the model's owner (free).
pub enum Admitted {
    /// Charged to a permit.
    Paid(Ticket),
    /// The owner, free.
    Owner(Address),
}

impl Admitted {
    /// The ticket, when the request is paid.
    pub fn ticket(self) -> Option<Ticket> {
        match self {
            Self::Paid(t) => Some(t),
            Self::Owner(_) => None,
        }
    }
}

impl Meter {
    /// Admits a request of `inputs` inputs on `model` for the holder of `credential`.
    pub async fn admit(
        self: &Arc<Self>,
        credential: Credential<'_>,
        model: &ModelRef,
        inputs: usize,
    ) -> Result<Admitted, MeterError> {
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
    ) -> Result<Admitted, MeterError> {
        if let Credential::Session(token) = &credential
            && let Some(who) = self.sessions.address(token)
            && self.model_info(model.model_id).await?.owner == who
        {
            // the owner, signed in, uses their own model free, at the premium rate
            self.take_rate(B256::left_padding_from(who.as_slice()), true).await?;
            return Ok(Admitted::Owner(who));
        }
        let (hash, account) = self.resolve(credential).await?;
        let permit = &account.permit;
        self.check_terms(permit, model)?;
        if self.revoked(hash).await? {
            return Err(MeterError::Revoked);
        }
        let info = self.model_info(model.model_id).await?;
        if permit.user == info.owner {
            self.take_rate(hash, true).await?;
            return Ok(Admitted::Owner(permit.user));
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
        self.take_rate(hash, premium).await?;
        let funds = self.funds_info(permit.user, permit.token).await?;
        let (unit_price, unit_price_per_1k) = self.prices_in(&info, permit.token).await?;
        let price = price_with_tokens(unit_price, unit_price_per_1k, max_tokens);
        let (user, token) = (permit.user, permit.token);
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let in_flight_permit = r.by_permit.get(&hash).copied().unwrap_or_default();
        // read again: requests charged on this permit during the chain reads above count too
        let charged = self.ledger.charged(&hash).map_or(account.charged_amount, |(a, _)| a);
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
        Ok(Admitted::Paid(Ticket {
            meter: self.clone(),
            permit_hash: hash,
            user,
            token,
            amount: price,
            price: unit_price,
            price_per_1k: unit_price_per_1k,
            limit: funds.balance.saturating_sub(funds.pending_withdrawal),
            done: false,
        }))
    }

    fn release(&self, hash: B256, user: Address, token: Address, amount: U256) {
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = r.by_permit.entry(hash) {
            *e.get_mut() = e.get().saturating_sub(amount);
            if e.get().is_zero() {
                e.remove();
            }
        }
        if let std::collections::hash_map::Entry::Occupied(mut e) = r.by_user.entry((user, token)) {
            *e.get_mut() = e.get().saturating_sub(amount);
            if e.get().is_zero() {
                e.remove();
            }
        }
    }

    /// Charges an admitted request that succeeded: durable before this returns; then the
    /// receipt. `request_id` is the host's id, `client_request_id` what the client sent.
    pub async fn charge(
        &self,
        ticket: Ticket,
        request_id: &str,
        client_request_id: Option<&str>,
        model: &ModelRef,
    ) -> Result<Receipt, MeterError> {
        let amount = ticket.amount;
        self.charge_amount(ticket, request_id, client_request_id, model, amount).await
    }

    /// Charges a request admitted with [`Meter::admit_tokens`] for the `tokens` it used (never
    /// more than was reserved).
    pub async fn charge_tokens(
        &self,
        ticket: Ticket,
        request_id: &str,
        client_request_id: Option<&str>,
        model: &ModelRef,
        tokens: u64,
    ) -> Result<Receipt, MeterError> {
        let amount = ticket.price_of(tokens).min(ticket.amount);
        self.charge_amount(ticket, request_id, client_request_id, model, amount).await
    }

    async fn charge_amount(
        &self,
        mut ticket: Ticket,
        request_id: &str,
        client_request_id: Option<&str>,
        model: &ModelRef,
        amount: U256,
    ) -> Result<Receipt, MeterError> {
        let charge =
            self.ledger.charge(ticket.permit_hash, amount, request_id, client_request_id, ticket.limit).await;
        // charged or not, the reservation ends here
        ticket.done = true;
        self.release(ticket.permit_hash, ticket.user, ticket.token, ticket.amount);
        let charge = charge?;
        self.charged.notify_one();
        Receipt::sign(&charge, model.model_id, &self.config.host).map_err(MeterError::Ledger)
    }

    async fn take_rate(&self, key: B256, premium: bool) -> Result<(), MeterError> {
        let per_sec = if premium { self.config.premium_rate_per_sec } else { self.config.rate_per_sec };
        // replicas sharing a count: that count decides while it answers
        if let Some(shared) = self.shared_rate.get()
            && let Some(allowed) = shared.take(key, per_sec).await
        {
            return if allowed { Ok(()) } else { Err(MeterError::RateLimited { per_sec }) };
        }
        let burst = f64::from(per_sec) * 2.0;
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let bucket = b.entry(key).or_insert(Bucket { tokens: burst, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * f64::from(per_sec)).min(burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(MeterError::RateLimited { per_sec });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_costs_the_same_dollars_in_every_stablecoin() {
        let price = U256::from(1_000u64); // 0.001 USD
        assert_eq!(in_token_units(price, 6), price, "USDC counts in micro-dollars");
        assert_eq!(in_token_units(price, 18), U256::from(1_000_000_000_000_000u64), "0.001 USDFC");
        // fewer decimals: rounded up, never free
        assert_eq!(in_token_units(U256::from(1u64), 2), U256::from(1u64));
        assert_eq!(in_token_units(U256::from(10_001u64), 2), U256::from(2u64));
        assert_eq!(in_token_units(U256::ZERO, 18), U256::ZERO);
        assert_eq!(in_token_units(U256::MAX, 77), U256::MAX, "saturates instead of wrapping");
    }
}
