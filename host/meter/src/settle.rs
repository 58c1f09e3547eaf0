//! Settlement: the latest cumulative charge of every permit with something unsettled goes to
//! `PaymentStream.settleBatch` in one transaction, every `interval` or as soon as `max_pending`
//! charged requests wait, whichever comes first.
//!
//! **Idempotent** by construction: the host always sends *cumulative* totals and the contract
//! moves only the difference to what it settled before, so a settlement that was mined but never
//! seen (a crash, a lost receipt) is never paid twice. Before sending, the host reads each
//! permit's settled totals back (`permitState`) and drops what is already settled, then asks the
//! chain with a call what the batch would settle: a batch that would move nothing is not sent.
//!
//! **Faults.** The host owns its nonce: each round reads the account's *mined* nonce and sends
//! with it, so a send that failed (the RPC refused it, or it timed out) never leaves a gap that
//! strands later transactions. A transaction that is not mined within `receipt_timeout` is
//! replaced: same nonce, fees raised by a quarter each time; whichever version is mined settles
//! the same cumulative totals. A failed round is logged once and retried after a backoff that
//! doubles up to `max_backoff`, not on every new charge.
//!
//! **Refusals.** An entry the contract skips for good (bad signature, wrong host, over the cap,
//! expired or revoked past the grace period, a request count that went down) is marked in the
//! ledger: its API key stops working and it is never sent again.
//!
//! After every round the host reads the settled totals back again and records them, so its
//! ledger follows the chain, not its own hopes. A round is skipped while the gas price is above
//! the configured bound. The interval must sit well inside the withdraw delay.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{B256, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::SolEvent;
use div_chain::Client;
use div_chain::bindings::{IPaymentStream, PaymentStream};

use crate::{Meter, MeterError, PermitAccount};

/// How often and how cheaply to settle, and how patiently.
#[derive(Debug, Clone, Copy)]
pub struct SettleConfig {
    /// Longest between two settlements while charges wait.
    pub interval: Duration,
    /// Settle at once when this many charged requests wait.
    pub max_pending: u64,
    /// Skip a round while the gas price (wei) is above this.
    pub max_gas_price: Option<u128>,
    /// How long to wait for a sent transaction to be mined before replacing it.
    pub receipt_timeout: Duration,
    /// Transactions sent per round at most (the first and its replacements).
    pub attempts: u32,
    /// Longest wait before retrying a failed round.
    pub max_backoff: Duration,
}

impl Default for SettleConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            max_pending: 1000,
            max_gas_price: None,
            receipt_timeout: Duration::from_secs(30),
            attempts: 4,
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Default)]
pub struct SettleReport {
    /// The transaction, if one was mined.
    pub tx: Option<B256>,
    /// Transactions sent (1 normally; more when one had to be replaced).
    pub sent: u32,
    /// Permits settled.
    pub settled: usize,
    /// Permits skipped by the contract, with the reason code (`SkipReason`).
    pub skipped: Vec<(B256, u8)>,
    /// Gas the transaction used.
    pub gas_used: u64,
    /// Requests the round settled (from the contract's `Settled` events).
    pub requests: u64,
    /// Amount the round moved (base units).
    pub amount: U256,
    /// Requests found already settled on chain before sending (a round mined but never seen).
    pub already_settled: u64,
    /// Another replica sharing this ledger holds the settlement lease: this one sent nothing.
    pub not_settler: bool,
}

/// The largest batch `PaymentStream` takes.
pub const MAX_BATCH: usize = 256;

/// `SkipReason.BadSignature`.
const BAD_SIGNATURE: u8 = 4;

/// `SkipReason`s that will never change for a permit: it is not sent again.
fn permanent(reason: u8) -> bool {
    // HostMismatch, Expired, Revoked, BadSignature, OverCap, RequestCountDecreased
    matches!(reason, 1 | 2 | 3 | 4 | 5 | 8)
}

fn chain(e: impl std::fmt::Display) -> MeterError {
    MeterError::ChainUnavailable(e.to_string())
}

/// Runs `f` under `d`; a timeout is a chain error that says what was waited for.
async fn within<T, E: std::fmt::Display>(
    d: Duration,
    what: &str,
    f: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Result<T, MeterError> {
    match tokio::time::timeout(d, f.into_future()).await {
        Ok(r) => r.map_err(|e| chain(format!("{what}: {e}"))),
        Err(_) => Err(chain(format!("{what}: no answer within {} s", d.as_secs()))),
    }
}

/// Settles what is unsettled now, with `client` (the host's wallet). One round at a time per
/// meter: a manual settle waits for a running one.
pub async fn settle_now(
    meter: &Meter,
    client: &Client,
    config: &SettleConfig,
) -> Result<SettleReport, MeterError> {
    let _one_round = meter.settling.lock().await;
    let rpc = meter.config().rpc_timeout;
    let mut report = SettleReport::default();
    // replicas sharing a PostgreSQL ledger: one settles (two would race the host key's nonces)
    if !meter.ledger().may_settle().await {
        report.not_settler = true;
        return Ok(report);
    }
    meter.ledger().refresh_settleable().await?;
    let pending = meter.ledger().settleable(MAX_BATCH);
    if pending.is_empty() {
        return Ok(report);
    }
    let ps = PaymentStream::new(meter.config().payment_stream, client.provider().clone());
    // the chain first: what was mined but never seen needs no transaction
    let mut entries: Vec<(B256, PermitAccount)> = Vec::with_capacity(pending.len());
    for (hash, mut a) in pending {
        let st = within(rpc, "reading permitState", ps.permitState(hash).call()).await?;
        let (settled_amount, settled_requests) = (U256::from(st.settledAmount), st.settledRequests);
        if settled_requests > a.settled_requests {
            report.already_settled += settled_requests - a.settled_requests;
        }
        meter.ledger().mark_settled(hash, settled_amount, settled_requests).await?;
        (a.settled_amount, a.settled_requests) = (settled_amount, settled_requests);
        if a.charged_amount > settled_amount || a.charged_requests > settled_requests {
            entries.push((hash, a));
        }
    }
    if entries.is_empty() {
        return Ok(report);
    }
    if let Some(max) = config.max_gas_price
        && let Ok(Ok(price)) =
            tokio::time::timeout(rpc, client.provider().get_gas_price().into_future()).await
        && price > max
    {
        tracing::warn!(price, max, "gas price above the bound; settlement postponed");
        return Ok(report);
    }
    let batch: Vec<IPaymentStream::Settlement> = entries
        .iter()
        .map(|(_, a)| IPaymentStream::Settlement {
            permit: (&a.permit).into(),
            signature: a.settlement_signature(),
            cumulativeAmount: a.charged_amount.saturating_to::<u128>(),
            cumulativeRequests: a.charged_requests,
        })
        .collect();
    // ask first: a batch that would settle nothing costs no gas
    let would =
        within(rpc, "simulating settleBatch", ps.settleBatch(batch.clone()).from(client.address()).call())
            .await?;
    if would.is_zero() {
        classify_refusals(meter, client, &entries, &mut report).await?;
        return Ok(report);
    }
    let receipt = send_replacing(client, &ps, batch, config, &mut report).await?;
    if !receipt.status() {
        return Err(chain(format!("settleBatch {} reverted", receipt.transaction_hash)));
    }
    report.tx = Some(receipt.transaction_hash);
    report.gas_used = receipt.gas_used;
    for log in receipt.inner.logs() {
        if let Ok(e) = PaymentStream::Settled::decode_log(&log.inner) {
            report.settled += 1;
            report.amount += e.data.amount;
            report.requests += e.data.requests;
        } else if let Ok(e) = PaymentStream::SettlementSkipped::decode_log(&log.inner) {
            report.skipped.push((e.data.permitHash, e.data.reason));
        }
    }
    // the chain is the truth: read every permit's settled totals back
    for (hash, a) in &entries {
        let st = within(rpc, "reading permitState", ps.permitState(*hash).call()).await?;
        meter.ledger().mark_settled(*hash, U256::from(st.settledAmount), st.settledRequests).await?;
        meter.invalidate_user(a.permit.user);
    }
    // A permit sent without its signature (the chain had settled it before) can only be refused
    // for its signature if a reorganisation undid that settlement: next round reads the chain
    // again and sends the signature, so that refusal is not for good.
    let refusals: Vec<(B256, u8)> = report
        .skipped
        .iter()
        .filter(|(hash, reason)| {
            !(*reason == BAD_SIGNATURE && entries.iter().any(|(h, a)| h == hash && a.settled_before()))
        })
        .copied()
        .collect();
    mark_refusals(meter, &refusals).await?;
    tracing::info!(
        tx = ?report.tx, sent = report.sent, settled = report.settled, requests = report.requests,
        amount = %report.amount, gas = report.gas_used, "settled"
    );
    Ok(report)
}

/// Records permanent refusals: the permit's key stops working and it is not sent again.
async fn mark_refusals(meter: &Meter, skipped: &[(B256, u8)]) -> Result<(), MeterError> {
    for (hash, reason) in skipped {
        if permanent(*reason) {
            tracing::warn!(
                permit = %hash, reason = crate::skip_reason(*reason),
                "PaymentStream refused a permit for good; its key is disabled and it is not sent again"
            );
            meter.ledger().mark_rejected(*hash, *reason).await?;
        } else {
            tracing::warn!(permit = %hash, reason = crate::skip_reason(*reason), "PaymentStream skipped a permit this round");
        }
    }
    Ok(())
}

/// Nothing in the batch would settle: asks the contract about each entry alone (a `settle`
/// call reverts with the reason) so permanent refusals are marked and not sent again.
async fn classify_refusals(
    meter: &Meter,
    client: &Client,
    entries: &[(B256, PermitAccount)],
    report: &mut SettleReport,
) -> Result<(), MeterError> {
    let rpc = meter.config().rpc_timeout;
    let ps = PaymentStream::new(meter.config().payment_stream, client.provider().clone());
    for (hash, a) in entries {
        let call = ps
            .settle(
                (&a.permit).into(),
                a.signature.clone(),
                a.charged_amount.saturating_to::<u128>(),
                a.charged_requests,
            )
            .from(client.address());
        let err = match tokio::time::timeout(rpc, call.call().into_future()).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => continue,
            Err(_) => return Err(chain("simulating settle: no answer")),
        };
        let reason = match err.as_decoded_interface_error::<PaymentStream::PaymentStreamErrors>() {
            Some(PaymentStream::PaymentStreamErrors::HostMismatch(_)) => 1,
            Some(PaymentStream::PaymentStreamErrors::PermitExpired(_)) => 2,
            Some(PaymentStream::PaymentStreamErrors::PermitRevoked(_)) => 3,
            Some(PaymentStream::PaymentStreamErrors::InvalidSignature(_)) => 4,
            Some(PaymentStream::PaymentStreamErrors::ExceedsPermitCap(_)) => 5,
            Some(PaymentStream::PaymentStreamErrors::NothingToSettle(_)) => 6,
            Some(PaymentStream::PaymentStreamErrors::InsufficientBalance(_)) => 7,
            Some(PaymentStream::PaymentStreamErrors::RequestCountDecreased(_)) => 8,
            _ => continue,
        };
        report.skipped.push((*hash, reason));
    }
    let skipped = report.skipped.clone();
    mark_refusals(meter, &skipped).await
}

/// Sends `batch` with the account's mined nonce and waits for it; replaces it (same nonce,
/// higher fees) when it is not mined in time. Whichever version is mined is returned.
async fn send_replacing(
    client: &Client,
    ps: &PaymentStream::PaymentStreamInstance<alloy::providers::DynProvider>,
    batch: Vec<IPaymentStream::Settlement>,
    config: &SettleConfig,
    report: &mut SettleReport,
) -> Result<TransactionReceipt, MeterError> {
    let p = client.provider();
    let rpc = Duration::from_secs(10).min(config.receipt_timeout.max(Duration::from_secs(1)));
    let nonce =
        within(rpc, "reading the host's nonce", p.get_transaction_count(client.address()).latest()).await?;
    let fees = within(rpc, "estimating fees", p.estimate_eip1559_fees()).await?;
    let mut sent: Vec<B256> = Vec::new();
    let mut last_err = String::new();
    for attempt in 0..config.attempts.max(1) {
        // +25 % per replacement: nodes take a replacement at +10 %
        let bump = |v: u128| v.saturating_mul(100 + 25 * u128::from(attempt)) / 100;
        let tx = ps
            .settleBatch(batch.clone())
            .nonce(nonce)
            .max_fee_per_gas(bump(fees.max_fee_per_gas).max(1))
            .max_priority_fee_per_gas(bump(fees.max_priority_fee_per_gas));
        match tokio::time::timeout(rpc, tx.send()).await {
            Ok(Ok(pending)) => {
                sent.push(*pending.tx_hash());
                report.sent += 1;
            }
            Ok(Err(e)) => {
                // "nonce too low": an earlier version was mined; "underpriced": the next bump
                last_err = div_chain::revert_reason(&e);
            }
            Err(_) => last_err = "sending: no answer".into(),
        }
        let deadline = Instant::now() + config.receipt_timeout;
        while Instant::now() < deadline {
            for h in &sent {
                if let Ok(Ok(Some(r))) =
                    tokio::time::timeout(rpc, p.get_transaction_receipt(*h).into_future()).await
                {
                    return Ok(r);
                }
            }
            if sent.is_empty() && !last_err.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !sent.is_empty() {
            tracing::warn!(attempt, nonce, "settlement not mined in time; replacing it with higher fees");
        }
    }
    Err(chain(format!(
        "settleBatch not mined after {} attempt(s) with nonce {nonce}{}",
        config.attempts.max(1),
        if last_err.is_empty() { String::new() } else { format!(" (last error: {last_err})") }
    )))
}

/// Told of every settlement round: its report, or why it failed.
pub type SettleObserver = Arc<dyn Fn(Result<&SettleReport, &MeterError>) + Send + Sync>;

/// Settles every `interval`, or sooner when `max_pending` charged requests wait, until the task
/// is dropped. A failed round is logged once and retried after a backoff.
pub async fn run(meter: Arc<Meter>, client: Client, config: SettleConfig, observe: Option<SettleObserver>) {
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            config.interval
        } else {
            let backoff = Duration::from_secs(1u64 << failures.min(16).saturating_sub(1));
            backoff.min(config.max_backoff).min(config.interval)
        };
        let due = tokio::time::sleep(wait);
        tokio::pin!(due);
        loop {
            tokio::select! {
                _ = &mut due => break,
                _ = meter.charged.notified(), if failures == 0 => {
                    if meter.ledger().unsettled_requests() >= config.max_pending {
                        break;
                    }
                }
            }
        }
        let result = settle_now(&meter, &client, &config).await;
        if let Some(o) = &observe {
            o(result.as_ref());
        }
        match result {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(after = failures, "settlement works again");
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                tracing::error!(
                    round_failures = failures,
                    "settlement failed; retrying after a backoff: {e}"
                );
            }
        }
    }
}
