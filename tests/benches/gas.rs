//! Gas per settled request on a real anvil chain, against a plain ERC-20 `transfer` measured in
//! the same run.
//!
//! One permit settles once after covering N requests (N = 1, 10, 100, 1000); gas per request is
//! the settle transaction's `gasUsed` (base fee, calldata, signature and host checks, the credit
//! to the model all included) ÷ N. Also a 100-permit `settleBatch` at 100 requests each, as the
//! permits' first settlement and again 100 requests later, and the owner's `claim` that pays all of
//! it out in one transfer. Every number comes from a transaction receipt; nothing is estimated.
//! Writes `bench/out/gas.json` for `bench/report`.

use alloy::primitives::U256;
use alloy::providers::Provider;
use anyhow::Context;
use div_chain::bindings::{DevStablecoin, IPaymentStream, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, sign_permit};
use div_tests::{LocalChain, workspace_root};
use serde_json::json;

const PRICE: u64 = 1_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // accounts #20.. are the batch's 100 users
    let chain = LocalChain::start_with_accounts(120).await?;
    let d = chain.deployment.clone();
    let model = chain.register_model("gas-bench", U256::from(PRICE)).await?;
    let usdc_addr = chain.usdc()?;
    let host = chain.client(3).await?;
    let stream = PaymentStream::new(d.payment_stream, host.provider());
    let domain = permit_domain(d.chain_id, d.payment_stream);
    let head = host.provider().get_block_number().await?;
    let ts =
        host.provider().get_block_by_number(head.into()).await?.context("no head block")?.header.timestamp;

    // users #2 and #20..#119 fund their balances; user #2's first settle warms the model's
    // counters so every measured settle sees the steady state a busy model is in
    let batch_users: Vec<usize> = (20..120).collect();
    for &i in std::iter::once(&2).chain(&batch_users) {
        chain.fund_deposit(i, U256::from(1_000_000_000u64)).await?;
    }
    let user = chain.keys[2].clone();
    let mut nonce = 0u64;
    let mut make_permit = |who: alloy::primitives::Address| {
        nonce += 1;
        SpendingPermit {
            user: who,
            modelId: model.model_id,
            host: chain.keys[3].address(),
            token: usdc_addr,
            maxAmount: U256::from(10_000_000_000u64),
            expiry: ts + 86_400,
            nonce: U256::from(nonce),
        }
    };
    let warm = make_permit(user.address());
    let sig = sign_permit(&user, &warm, &domain).await?;
    stream.settle(warm, sig, PRICE as u128, 1).send().await?.get_receipt().await?;

    let mut rows = Vec::new();
    let mut per_request = serde_json::Map::new();
    for n in [1u64, 10, 100, 1000] {
        let p = make_permit(user.address());
        let sig = sign_permit(&user, &p, &domain).await?;
        let r = stream.settle(p, sig, (n * PRICE) as u128, n).send().await?.get_receipt().await?;
        anyhow::ensure!(r.status(), "settle of {n} requests reverted");
        let per = r.gas_used as f64 / n as f64;
        rows.push((format!("settle, 1 permit, {n} requests"), r.gas_used, per));
        per_request.insert(format!("gas_per_request_at_{n}"), json!(per));
    }

    // a batch: 100 permits (100 users) × 100 requests in one transaction, first as each
    // permit's first settlement (signature and host checked, its state slot created), then again
    // 100 requests later as the host settles a permit it settled before (no signature sent: the
    // stored state proves it, and the host's meter leaves it out the same way)
    let mut entries = Vec::new();
    for &i in &batch_users {
        let key = chain.keys[i].clone();
        let p = make_permit(key.address());
        let signature = sign_permit(&key, &p, &domain).await?;
        entries.push(IPaymentStream::Settlement {
            permit: p,
            signature,
            cumulativeAmount: (100 * PRICE) as u128,
            cumulativeRequests: 100,
        });
    }
    let n_batch = entries.len() as u64;
    let r = stream.settleBatch(entries.clone()).send().await?.get_receipt().await?;
    anyhow::ensure!(r.status(), "batch settle reverted");
    let settled = stream.settleBatch(entries.clone()).call().await;
    anyhow::ensure!(settled.is_err() || settled.is_ok_and(|n| n.is_zero()), "a batch settled twice");
    let batch_first = r.gas_used as f64 / (n_batch * 100) as f64;
    rows.push((format!("settleBatch, {n_batch} fresh permits × 100 requests"), r.gas_used, batch_first));
    for e in &mut entries {
        e.signature = Default::default();
        e.cumulativeAmount += (100 * PRICE) as u128;
        e.cumulativeRequests += 100;
    }
    let r = stream.settleBatch(entries).send().await?.get_receipt().await?;
    anyhow::ensure!(r.status(), "second batch settle reverted");
    let batch_steady = r.gas_used as f64 / (n_batch * 100) as f64;
    rows.push((
        format!("settleBatch, the same {n_batch} permits, 100 requests more"),
        r.gas_used,
        batch_steady,
    ));

    // the owner's claim: every settlement above paid into the model's credit; one transfer out
    let claimable = stream.claimable(model.model_id, usdc_addr).call().await?;
    let r = stream.claim(model.model_id, usdc_addr).send().await?.get_receipt().await?;
    anyhow::ensure!(r.status(), "claim reverted");
    let claim_gas = r.gas_used;
    let owner = chain.keys[1].address();
    let paid = DevStablecoin::new(usdc_addr, host.provider()).balanceOf(owner).call().await?;
    anyhow::ensure!(
        paid >= claimable && !claimable.is_zero(),
        "the claim paid {paid}, credit was {claimable}"
    );
    rows.push(("claim (all of a model's credit, one transfer)".into(), claim_gas, claim_gas as f64));

    // the baseline: a plain ERC-20 transfer between two accounts that already hold tokens
    let payer = chain.client(4).await?;
    let usdc = DevStablecoin::new(usdc_addr, payer.provider());
    chain.mint_usdc(chain.keys[4].address(), U256::from(1_000u64)).await?;
    let r = usdc.transfer(chain.keys[1].address(), U256::from(1_000u64)).send().await?.get_receipt().await?;
    let transfer_gas = r.gas_used;
    rows.push(("ERC-20 transfer (baseline)".into(), transfer_gas, transfer_gas as f64));

    println!("{:<44} {:>10} {:>14}", "gas bench (anvil, receipts)", "tx gas", "gas / request");
    for (name, gas, per) in &rows {
        println!("{name:<44} {gas:>10} {per:>14.1}");
    }
    let at_1000 = per_request.get("gas_per_request_at_1000").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    println!(
        "gas per request at 1000 = {at_1000:.1} (goal ≤ 100); one settle of 1000 requests = {:.3} ERC-20 transfers",
        at_1000 * 1000.0 / transfer_gas as f64
    );

    let mut out = per_request;
    out.insert("erc20_transfer_gas".into(), json!(transfer_gas));
    out.insert("gas_per_request_batch100x100".into(), json!(batch_steady));
    out.insert("gas_per_request_batch100x100_first".into(), json!(batch_first));
    out.insert("claim_gas".into(), json!(claim_gas));
    let md = {
        let mut s = String::from(
            "## Settlement gas (anvil, from receipts)\n\n| what | tx gas | gas / request |\n|---|---:|---:|\n",
        );
        for (name, gas, per) in &rows {
            s.push_str(&format!("| {name} | {gas} | {per:.1} |\n"));
        }
        let verdict = |ok: bool| if ok { "met" } else { "missed" };
        s.push_str(&format!(
            "\nGoal ≤ 100 gas per request at 1000 requests per settlement: **{at_1000:.1}** ({}). \
             Goal ≤ 250 gas per request for 100 permits × 100 requests in one `settleBatch`: \
             **{batch_steady:.1}** ({}) for permits that settled before (a host settles each permit \
             many times over its life), {batch_first:.1} at the permits' first settlement. A claim \
             pays a model's whole credit in one transfer: {claim_gas} gas.\n\n\
             The single-permit rows are each a permit's first settlement (the dearest case: its \
             state slot goes from zero to non-zero, 22.1k gas, its signature is recovered, ~4k, and \
             the vault is read once to check the owner authorised the host, ~10k). The rest: 21k \
             base, ~4k calldata, the proxy hop (~5k), the user's balance, the model's credit and its \
             request count (~5k each, cold) and the Settled event (~3k). No transfer: settlement \
             credits the model inside PaymentStream and `claim` pays out. A batch's later \
             settlements send no signature (the stored state proves it) and write two warm-ish \
             slots per permit (its state and the user's balance).\n",
            verdict(at_1000 <= 100.0),
            verdict(batch_steady <= 250.0)
        ));
        s
    };
    let dir = workspace_root().join("bench/out");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("gas.json"), serde_json::to_string_pretty(&out)?)?;
    std::fs::write(dir.join("gas.md"), md)?;
    Ok(())
}
