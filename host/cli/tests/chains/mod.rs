//! One host taking payment on two chains, end to end: anvil as chain 31337 (USDC, 6 decimals)
//! and as chain 314159 (a USDFC stand-in, 18 decimals), the model registered on both, owned by
//! its Data DAO on the first; a user paying on each; one chain stalled while the other goes on;
//! each chain settled and claimed on its own, every payout exactly its chain's receipts.

use std::path::Path;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::ProviderBuilder;
use div_chain::bindings::{DevStablecoin, ModelVault, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, sign_permit};
use div_meter::Receipt;
use div_tests::LocalChain;
use serde_json::{Value, json};

use super::div;
use super::rig::paid::{Paid, now, permit_json, rand_nonce};
use super::rig::{HOST, OWNER, Rig, hex_key, misbehave_wasm};

const CHAIN_A: u64 = 31337;
const CHAIN_B: u64 = 314159;
/// Pays on chain A (USDC), then on chain B's.
const ALICE: usize = 7;
/// Pays on chain B (USDFC).
const BOB: usize = 8;

/// Runs `div` with `args` and `--addresses book`; its stdout, or the error with its output.
fn cli(args: &[&str], book: &Path) -> anyhow::Result<String> {
    let out = div().args(args).arg("--addresses").arg(book).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "div {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

/// `div permit` as a user would run it: the API key it prints.
fn api_key(user: &str, book: &Path, url: &str, token: &str) -> anyhow::Result<String> {
    let out = cli(
        &[
            "permit",
            "--private-key",
            user,
            "--url",
            url,
            "--model",
            "tiny-paid",
            "--max",
            "1",
            "--token",
            token,
        ],
        book,
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("DIV_API_KEY="))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no key printed: {out}"))
}

/// `n` paid requests with `key`; their receipts.
async fn spend(p: &Paid, key: &str, n: usize) -> anyhow::Result<Vec<Receipt>> {
    let mut receipts = Vec::new();
    for _ in 0..n {
        let (status, body) = p.embed(Some(key), 1).await?;
        anyhow::ensure!(status == 200, "a paid request was refused ({status}): {body}");
        let r: Receipt = serde_json::from_value(body["receipt"].clone())?;
        anyhow::ensure!(r.verify(), "the receipt is not the host's");
        receipts.push(r);
    }
    Ok(receipts)
}

fn total(receipts: &[Receipt]) -> U256 {
    receipts.iter().map(|r| r.amount).sum()
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?.success();
    anyhow::ensure!(ok, "kill {sig} {pid} failed");
    Ok(())
}

async fn balance(chain: &LocalChain, coin: Address, who: Address) -> anyhow::Result<U256> {
    let p = ProviderBuilder::new().connect_http(chain.rpc_url.parse()?);
    Ok(DevStablecoin::new(coin, &p).balanceOf(who).call().await?)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_host_takes_payment_on_two_chains_and_a_stalled_chain_stops_only_itself() -> anyhow::Result<()> {
    let rig = Rig::start("chains").await?;
    let b = LocalChain::start_on(CHAIN_B, 20).await?;
    let book_a = rig.book.clone();
    let book_b = rig.dir.join("addresses-314159.json");
    b.deployment.save(&book_b)?;
    let host = rig.chain.keys[HOST].address();
    let (usdc, usdfc) = (
        rig.chain.usdc()?,
        b.deployment.stablecoin("USDFC").map(|c| c.address).ok_or_else(|| anyhow::anyhow!("no USDFC"))?,
    );

    // the owner publishes on chain A and registers the same model (same ciphertext, custodians
    // and id) on chain B, its access token sold for USDFC there
    let pkg = rig.tiny_package("tiny-paid")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[host])?;
    let out = rig.publish_on(&book_b, OWNER, &pkg, &misbehave_wasm(), &[host], &["--sale-token", "USDFC"])?;
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "publishing on chain B: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains(&format!("published tiny-paid as {id:#x}")),
        "the same id on chain B: {printed}"
    );

    // on chain A the model belongs to its Data DAO: settlements there are claimed into its treasury
    let (alice, bob, owner) =
        (hex_key(&rig.chain.keys[ALICE]), hex_key(&b.keys[BOB]), hex_key(&rig.chain.keys[OWNER]));
    let model = format!("{id:#x}");
    cli(&["buy", "--private-key", &alice, "--model-id", &model, "--amount", "1", "--mint"], &book_a)?;
    cli(
        &[
            "dao",
            "create",
            "--private-key",
            &owner,
            "--model-id",
            &model,
            "--voting-delay-secs",
            "1",
            "--voting-period-secs",
            "3600",
            "--timelock-delay-secs",
            "60",
        ],
        &book_a,
    )?;
    let pa = ProviderBuilder::new().connect_http(rig.chain.rpc_url.parse()?);
    let treasury = ModelVault::new(rig.chain.deployment.model_vault, &pa).getModel(id).call().await?.owner;
    assert_ne!(treasury, rig.chain.keys[OWNER].address(), "the DAO's timelock owns the model on chain A");

    // one host, both chains; its operator allows the model by id (the DAO owns it now)
    let p = Paid::serve(rig, id, &["--payment-chain", &book_b.to_string_lossy(), "--allow-model", &model])
        .await?;
    p.wait_ready().await?;
    let info: Value = reqwest::get(format!("{}/v1/host", p.url)).await?.json().await?;
    let chains: Vec<u64> =
        info["chains"].as_array().into_iter().flatten().filter_map(|c| c["chain_id"].as_u64()).collect();
    assert_eq!(chains, vec![CHAIN_A, CHAIN_B], "{info}");
    assert_eq!(info["deployments"][1]["chainId"], CHAIN_B, "the dApp learns both deployments: {info}");

    // the host publishes itself on chain B too, with the model
    let pb = ProviderBuilder::new().connect_http(b.rpc_url.parse()?);
    let vault_b = ModelVault::new(b.deployment.model_vault, &pb);
    let mut serving = false;
    for _ in 0..300 {
        if vault_b.isHostServing(id, host).call().await? {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(serving, "the host never published itself and the model on chain B");

    // Alice pays on chain A in USDC; Bob on chain B in USDFC (18 decimals)
    cli(&["deposit", "--private-key", &alice, "--amount", "1", "--mint"], &book_a)?;
    cli(&["deposit", "--private-key", &bob, "--amount", "1", "--mint", "--token", "USDFC"], &book_b)?;
    cli(&["buy", "--private-key", &bob, "--model-id", &model, "--amount", "1", "--mint"], &book_b)?;
    let key_a = api_key(&alice, &book_a, &p.url, "USDC")?;
    let key_b = api_key(&bob, &book_b, &p.url, "USDFC")?;
    let mut on_a = spend(&p, &key_a, 4).await?;
    let mut on_b = spend(&p, &key_b, 3).await?;
    assert_eq!(on_a[0].amount, U256::from(1_000u64), "0.001 USDC");
    assert_eq!(on_b[0].amount, U256::from(10u64).pow(U256::from(15u64)), "the same 0.001 dollars in USDFC");
    // the operator sees each chain apart; the custodians count the releases they answered
    let metrics = reqwest::get(format!("{}/metrics", p.url)).await?.text().await?;
    for line in [
        r#"div_unsettled_requests{chain_id="31337"} 4"#,
        r#"div_unsettled_requests{chain_id="314159"} 3"#,
        r#"div_withdraw_delay_seconds{chain_id="314159"} 3600"#,
        r#"div_chain_up{chain_id="314159"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line} in:\n{metrics}");
    }
    let custodian = reqwest::get(format!("{}/metrics", p.rig.urls[0])).await?.text().await?;
    assert!(
        custodian
            .contains(r#"div_custodian_requests_total{route="/v1/models/{model_id}/release",status="200"}"#),
        "{custodian}"
    );

    // hostile: Bob's chain-B permit replayed as if signed for chain A, and a chain this host
    // does not take payment on, are refused; neither leaves a key behind
    let permit = SpendingPermit {
        user: b.keys[BOB].address(),
        modelId: id,
        host,
        token: usdfc,
        maxAmount: U256::from(10u64).pow(U256::from(18u64)),
        expiry: now() + 3600,
        nonce: U256::from(rand_nonce()),
    };
    let sig =
        sign_permit(&b.keys[BOB], &permit, &permit_domain(CHAIN_B, b.deployment.payment_stream)).await?;
    for (chain_id, contract, want) in
        [(CHAIN_A, p.rig.chain.deployment.payment_stream, 401), (1, b.deployment.payment_stream, 403)]
    {
        let body = json!({
            "permit": permit_json(&permit), "signature": sig, "chainId": chain_id,
            "verifyingContract": contract, "proof": {"challenge": "x", "signature": "0x00"},
        });
        let r = reqwest::Client::new().post(format!("{}/v1/keys", p.url)).json(&body).send().await?;
        let (status, v) = (r.status().as_u16(), r.json::<Value>().await?);
        assert_eq!(status, want, "chain {chain_id}: {v}");
        let code = if chain_id == 1 { "permit_wrong_chain" } else { "invalid_signature" };
        assert_eq!(v["error"]["code"], code, "{v}");
    }

    // chain B stalls (its node stops answering): chain A's users go on, and A settles alone
    let b_pid = b.anvil.child().id();
    signal(b_pid, "-STOP")?;
    let stalled = async {
        on_a.extend(spend(&p, &key_a, 3).await?);
        let one = div()
            .args(["settle", "--now", "--url", &p.url, "--chain-id", &CHAIN_A.to_string(), "--state-dir"])
            .arg(&p.state)
            .output()?;
        let text = String::from_utf8_lossy(&one.stdout).to_string();
        anyhow::ensure!(one.status.success(), "settling chain A alone: {text}");
        anyhow::ensure!(text.contains("settled 7 requests"), "{text}");
        // settling everything reports chain B's failure and still settles what A has
        on_a.extend(spend(&p, &key_a, 1).await?);
        let all = div().args(["settle", "--now", "--url", &p.url, "--state-dir"]).arg(&p.state).output()?;
        let text = String::from_utf8_lossy(&all.stdout).to_string();
        anyhow::ensure!(!all.status.success(), "a stalled chain's settlement is a failure: {text}");
        anyhow::ensure!(text.contains("chain 31337: settled 1 requests"), "{text}");
        anyhow::ensure!(text.contains("chain 314159: not settled"), "{text}");
        Ok(())
    }
    .await;
    signal(b_pid, "-CONT")?;
    stalled?;

    // chain B answers again: Bob goes on and B settles
    on_b.extend(spend(&p, &key_b, 2).await?);
    let text = p.settle().await?;
    assert!(text.contains("chain 314159: settled 5 requests"), "{text}");
    assert!(text.contains("chain 31337: nothing to settle"), "{text}");

    // each chain pays exactly its own receipts: the DAO's treasury on A (claimed by anyone), the
    // owner on B
    let before_a = balance(&p.rig.chain, usdc, treasury).await?;
    cli(&["claim", "--private-key", &bob, "--model", &model], &book_a)?;
    assert_eq!(
        balance(&p.rig.chain, usdc, treasury).await? - before_a,
        total(&on_a),
        "treasury Δ = Σ chain A receipts"
    );
    let owner_b = b.keys[OWNER].address();
    let before_b = balance(&b, usdfc, owner_b).await?;
    cli(&["claim", "--private-key", &owner, "--model", &model], &book_b)?;
    assert_eq!(balance(&b, usdfc, owner_b).await? - before_b, total(&on_b), "owner Δ = Σ chain B receipts");
    for (chain, d, receipts) in [(&p.rig.chain, &p.rig.chain.deployment, &on_a), (&b, &b.deployment, &on_b)] {
        let provider = ProviderBuilder::new().connect_http(chain.rpc_url.parse()?);
        let ps = PaymentStream::new(d.payment_stream, &provider);
        let hash: B256 = receipts[0].permit_hash;
        let state = ps.permitState(hash).call().await?;
        assert_eq!(
            U256::from(state.settledAmount),
            total(receipts),
            "chain {}: settled = Σ receipts",
            d.chain_id
        );
    }
    // neither chain settled the other's permit
    let other = PaymentStream::new(p.rig.chain.deployment.payment_stream, &pa)
        .permitState(on_b[0].permit_hash)
        .call()
        .await?;
    assert_eq!(other.settledAmount, 0, "chain A never settled a chain B permit");

    // a restart with the two address books swapped finds each ledger bound to its chain
    let (rig_dir, state) = (p.rig.dir.clone(), p.state.clone());
    let mut p = p;
    p.host = None;
    let out = div()
        .args(["serve", "--vault", "--listen", "127.0.0.1:0", "--allow-any-owner"])
        .env("DIV_HOST_KEY", hex_key(&p.rig.chain.keys[HOST]))
        .arg("--addresses")
        .arg(&book_b)
        .arg("--payment-chain")
        .arg(&book_a)
        .arg("--state-dir")
        .arg(&state)
        .arg("--store")
        .arg(p.rig.store())
        .args(["--settle-interval-secs", "900", "--ort-dylib"])
        .arg(div_tests::ort_dylib()?)
        .current_dir(&rig_dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a host with swapped chains must not start");
    assert!(err.contains("holds the charges of chain 31337") && err.contains("not chain 314159"), "{err}");
    Ok(())
}
