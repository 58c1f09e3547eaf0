//! Settlement: the latest cumulative charge of every permit with something unsettled goes to
//! `PaymentStream.settleBatch` in one transaction, every `interval` or as soon as `max_pending`
//! charged requests wait, whichever comes first.
//!
//! Idempotent by construction: the host always sends *cumulative* totals and the contract moves
//! only the difference to what it settled before, so a settlement that was mined but never seen
//! (a crash, a lost receipt) is never paid twice; the next round finds nothing to settle for it.
//! After every round the host reads each permit's settled totals back from the contract
//! (`permitState`) and records them, so its ledger follows the chain, not its own hopes. A round
//! is skipped while the gas price is above the configured bound, and retried on the next tick
//! if the transaction fails. The interval must sit well inside the withdraw delay.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{B256, U256};
use alloy::providers::Provider;
use alloy::sol_types::SolEvent;
use div_chain::Client;
use div_chain::bindings::{IPaymentStream, PaymentStream};

use crate::{Meter, MeterError};

/// How often and how cheaply to settle.
#[derive(Debug, Clone, Copy)]
pub struct SettleConfig {
    /// Longest between two settlements while charges wait.
    pub interval: Duration,
    /// Settle at once when this many charged requests wait.
    pub max_pending: u64,
    /// Skip a round while the gas price (wei) is above this.
    pub max_gas_price: Option<u128>,
}

/// What one round did.
#[derive(Debug, Clone, Default)]
pub struct SettleReport {
    /// The transaction, if one was sent.
    pub tx: Option<B256>,
    /// Permits settled.
    pub settled: usize,
    /// Permits skipped by the contract, with the reason code (`SkipReason`).
    pub skipped: Vec<(B256, u8)>,
    /// Gas the transaction used.
    pub gas_used: u64,
    /// Requests the round settled.
    pub requests: u64,
    /// Amount the round moved (base units).
    pub amount: U256,
}

/// The largest batch `PaymentStream` takes.
pub const MAX_BATCH: usize = 256;

/// Settles what is unsettled now, with `client` (the host's wallet).
pub async fn settle_now(
    meter: &Meter,
    client: &Client,
    max_gas_price: Option<u128>,
) -> Result<SettleReport, MeterError> {
    let chain = |e: String| MeterError::ChainUnavailable(e);
    let mut pending: Vec<_> =
        meter.ledger().accounts().into_iter().filter(|(_, a)| a.charged_amount > a.settled_amount).collect();
    if pending.is_empty() {
        return Ok(SettleReport::default());
    }
    pending.sort_by_key(|(_, a)| std::cmp::Reverse(a.unsettled()));
    pending.truncate(MAX_BATCH);
    if let Some(max) = max_gas_price
        && let Ok(price) = client.provider().get_gas_price().await
        && price > max
    {
        tracing::warn!(price, max, "gas price above the bound; settlement postponed");
        return Ok(SettleReport::default());
    }
    let entries: Vec<IPaymentStream::Settlement> = pending
        .iter()
        .map(|(_, a)| IPaymentStream::Settlement {
            permit: (&a.permit).into(),
            signature: a.signature.clone(),
            cumulativeAmount: a.charged_amount.saturating_to::<u128>(),
            cumulativeRequests: a.charged_requests,
        })
        .collect();
    let before: u64 = pending.iter().map(|(_, a)| a.settled_requests).sum();
    let ps = PaymentStream::new(meter.config().payment_stream, client.provider().clone());
    let sent = ps.settleBatch(entries).send().await.map_err(|e| chain(div_chain::revert_reason(&e)))?;
    let receipt = sent.get_receipt().await.map_err(|e| chain(e.to_string()))?;
    if !receipt.status() {
        return Err(chain(format!("settleBatch {} reverted", receipt.transaction_hash)));
    }
    let mut report =
        SettleReport { tx: Some(receipt.transaction_hash), gas_used: receipt.gas_used, ..Default::default() };
    for log in receipt.inner.logs() {
        if let Ok(e) = PaymentStream::Settled::decode_log(&log.inner) {
            report.settled += 1;
            report.amount += e.data.amount;
        } else if let Ok(e) = PaymentStream::SettlementSkipped::decode_log(&log.inner) {
            report.skipped.push((e.data.permitHash, e.data.reason));
        }
    }
    // the chain is the truth: read every permit's settled totals back
    let mut after = 0u64;
    for (hash, a) in &pending {
        let st = ps.permitState(*hash).call().await.map_err(|e| chain(e.to_string()))?;
        after += st.settledRequests;
        meter.ledger().mark_settled(*hash, U256::from(st.settledAmount), st.settledRequests).await?;
        meter.invalidate_user(a.permit.user);
    }
    report.requests = after.saturating_sub(before);
    for (hash, reason) in &report.skipped {
        tracing::warn!(permit = %hash, reason, "the contract skipped a settlement entry");
    }
    tracing::info!(
        tx = ?report.tx, settled = report.settled, requests = report.requests, gas = report.gas_used,
        "settled"
    );
    Ok(report)
}

/// Told of every settlement round.
pub type SettleObserver = Arc<dyn Fn(&SettleReport) + Send + Sync>;

/// Settles every `interval`, or sooner when `max_pending` charged requests wait, until the task
/// is dropped.
pub async fn run(meter: Arc<Meter>, client: Client, config: SettleConfig, observe: Option<SettleObserver>) {
    loop {
        let due = tokio::time::sleep(config.interval);
        tokio::pin!(due);
        loop {
            tokio::select! {
                _ = &mut due => break,
                _ = meter.charged.notified() => {
                    if meter.ledger().unsettled_requests() >= config.max_pending {
                        break;
                    }
                }
            }
        }
        match settle_now(&meter, &client, config.max_gas_price).await {
            Ok(report) => {
                if let Some(o) = &observe {
                    o(&report);
                }
            }
            Err(e) => tracing::error!("settlement failed, retrying next round: {e}"),
        }
    }
}
