//! A model owned by its Data DAO, end to end: `div dao` against a real anvil chain, with the
//! model's token holders voting a price change and a host authorisation through the timelock.

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use div_chain::bindings::{DevStablecoin, ModelVault, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, sign_permit};
use div_tests::LocalChain;

use super::rig::hex_key;
use super::{div, scratch};

/// Runs `div` with `args`; returns (success, stdout + stderr).
fn run(args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = div().args(args).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn ok(args: &[&str]) -> anyhow::Result<String> {
    let (success, text) = run(args)?;
    anyhow::ensure!(success, "div {args:?} failed: {text}");
    Ok(text)
}

/// Moves the chain's clock `secs` ahead and mines a block.
async fn advance(chain: &LocalChain, secs: u64) -> anyhow::Result<()> {
    let p = chain.client(0).await?;
    let _: serde_json::Value = p.provider().raw_request("evm_increaseTime".into(), (secs,)).await?;
    let _: serde_json::Value = p.provider().raw_request("evm_mine".into(), ()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn token_holders_run_their_model_through_the_dao_and_its_timelock() -> anyhow::Result<()> {
    let chain = LocalChain::start().await?;
    let dir = scratch("dao");
    std::fs::create_dir_all(&dir)?;
    let book = dir.join("addresses.json");
    chain.deployment.save(&book)?;
    let book = book.to_string_lossy().to_string();
    let model = chain.register_model("dao-model", U256::from(1_000u64)).await?;
    let id = format!("{:#x}", model.model_id);
    let key = |i: usize| hex_key(&chain.keys[i]);
    let (owner, alice, bob, stranger, new_host) = (key(1), key(4), key(6), key(9), chain.keys[10].address());

    // members buy in the primary sale: 60 and 30 tokens
    ok(&[
        "buy",
        "--private-key",
        &alice,
        "--model-id",
        &id,
        "--amount",
        "60",
        "--mint",
        "--addresses",
        &book,
    ])?;
    ok(&["buy", "--private-key", &bob, "--model-id", &id, "--amount", "30", "--mint", "--addresses", &book])?;

    // only the owner may hand the model over
    let (success, text) =
        run(&["dao", "create", "--private-key", &stranger, "--model-id", &id, "--addresses", &book])?;
    assert!(!success && text.contains("not the owner"), "{text}");
    let created = ok(&[
        "dao",
        "create",
        "--private-key",
        &owner,
        "--model-id",
        &id,
        "--addresses",
        &book,
        "--voting-delay-secs",
        "1",
        "--voting-period-secs",
        "60",
        "--timelock-delay-secs",
        "120",
        "--quorum-percent",
        "20",
    ])?;
    let timelock: Address = created
        .lines()
        .find_map(|l| l.strip_prefix("timelock "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no timelock address in {created}"))?;
    let vault = ModelVault::new(chain.deployment.model_vault, chain.client(0).await?.provider().clone());
    let m = vault.getModel(model.model_id).call().await?;
    assert_eq!((m.owner, m.payout), (timelock, timelock), "the timelock owns the model and is paid");
    // the former owner controls nothing any more
    let owner_vault =
        ModelVault::new(chain.deployment.model_vault, chain.client(1).await?.provider().clone());
    let err = owner_vault.updatePrice(model.model_id, U256::from(1u64), U256::ZERO).call().await.err();
    assert!(err.is_some_and(|e| div_chain::revert_reason(&e).starts_with("NotModelOwner")));

    // a stranger without tokens cannot propose
    let change = |who: &str| {
        vec![
            "dao".to_string(),
            "propose".into(),
            "--private-key".into(),
            who.to_string(),
            "--model-id".into(),
            id.clone(),
            "--addresses".into(),
            book.clone(),
            "--set-price".into(),
            "0.002".into(),
            "--authorize-host".into(),
            new_host.to_string(),
            "--description".into(),
            "Raise the price to 0.002 USDC and add a host".into(),
        ]
    };
    advance(&chain, 1).await?;
    let args: Vec<String> = change(&stranger);
    let (success, text) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(!success && text.contains("has 0 votes, 1 are needed to propose"), "{text}");
    // a member proposes; tokens bought after the snapshot will not count
    let args: Vec<String> = change(&alice);
    let proposed = ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let proposal = proposed
        .lines()
        .find_map(|l| l.strip_prefix("proposal "))
        .map(str::trim)
        .ok_or_else(|| anyhow::anyhow!("no proposal id in {proposed}"))?
        .to_string();
    advance(&chain, 2).await?;
    ok(&[
        "buy",
        "--private-key",
        &stranger,
        "--model-id",
        &id,
        "--amount",
        "500",
        "--mint",
        "--addresses",
        &book,
    ])?;

    // `div dao SUB --private-key WHO` on this model and proposal, with `extra` arguments
    let on_proposal = |sub: &str, who: &str, extra: &[&str]| {
        let mut args = vec!["dao", sub, "--private-key", who, "--model-id", &id, "--addresses", &book];
        args.extend(["--proposal", &proposal]);
        args.extend(extra);
        run(&args)
    };
    let vote = |who: &str, support: &str| on_proposal("vote", who, &["--support", support]);
    let (success, text) = vote(&stranger, "against")?;
    assert!(!success && text.contains("no votes at the proposal's snapshot"), "{text}");
    let (success, text) = vote(&alice, "for")?;
    assert!(success && text.contains("voted for with 60"), "{text}");
    let (success, text) = vote(&bob, "for")?;
    assert!(success, "{text}");

    let execute = |who: &str| on_proposal("execute", who, &[]);
    let (success, text) = execute(&stranger)?;
    assert!(!success && text.contains("is active"), "voting is still open: {text}");
    advance(&chain, 61).await?;
    let (success, text) = execute(&stranger)?;
    assert!(success && text.contains("queued"), "{text}");
    let (success, text) = execute(&stranger)?;
    assert!(!success && text.contains("delay ends"), "the timelock's delay is not over: {text}");
    assert_eq!(vault.getModel(model.model_id).call().await?.pricePerRequest, U256::from(1_000u64));
    advance(&chain, 121).await?;
    let (success, text) = execute(&stranger)?;
    assert!(success && text.contains("executed"), "{text}");
    assert_eq!(vault.getModel(model.model_id).call().await?.pricePerRequest, U256::from(2_000u64));
    assert!(vault.wasHostAuthorized(model.model_id, new_host).call().await?);

    // the treasury receives settlements: a host settles a user's charges, anyone claims
    let user = chain.keys[2].clone();
    chain.fund_deposit(2, U256::from(10_000_000u64)).await?;
    let domain = permit_domain(chain.deployment.chain_id, chain.deployment.payment_stream);
    let now = chain.client(0).await?.provider().get_block_number().await?;
    let ts =
        chain.client(0).await?.provider().get_block_by_number(now.into()).await?.map(|b| b.header.timestamp);
    let permit = SpendingPermit {
        user: user.address(),
        modelId: model.model_id,
        host: chain.keys[3].address(),
        token: chain.usdc()?,
        maxAmount: U256::from(1_000_000u64),
        expiry: ts.unwrap_or_default() + 86_400,
        nonce: U256::from(1u64),
    };
    let sig = sign_permit(&user, &permit, &domain).await?;
    let host = chain.client(3).await?;
    let ps = PaymentStream::new(chain.deployment.payment_stream, host.provider());
    assert!(ps.settle(permit, sig, 14_000, 7).send().await?.get_receipt().await?.status());
    let usdc = DevStablecoin::new(chain.usdc()?, host.provider());
    let treasury_before = usdc.balanceOf(timelock).call().await?;
    let claimed =
        ok(&["claim", "--owner", &timelock.to_string(), "--private-key", &stranger, "--addresses", &book])?;
    assert!(claimed.contains(&format!("claimed 0.014000 USDC to {timelock}")), "{claimed}");
    assert_eq!(usdc.balanceOf(timelock).call().await? - treasury_before, U256::from(14_000u64));
    let status = ok(&["dao", "status", "--model-id", &id, "--addresses", &book])?;
    assert!(status.contains("executed — for 90"), "{status}");

    // a model whose "access token" keeps no vote checkpoints (here a plain stablecoin) gets no
    // DAO: nobody could ever vote in it
    let owner_client = chain.client(1).await?;
    let config = div_chain::bindings::IModelVault::ModelConfig {
        name: "no-votes".into(),
        cid: "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi".into(),
        pluginCid: String::new(),
        accessToken: chain.usdc()?,
        payout: chain.keys[1].address(),
        pricePerRequest: U256::from(1_000u64),
        pricePer1kTokens: U256::ZERO,
        custodians: chain.keys.iter().skip(5).take(3).map(|k| k.address()).collect(),
        threshold: 2,
    };
    let vault = ModelVault::new(chain.deployment.model_vault, owner_client.provider());
    assert!(vault.registerModel(config).send().await?.get_receipt().await?.status());
    let plain = vault.modelIdOf(chain.keys[1].address(), "no-votes".into()).call().await?;
    let (created, text) = run(&[
        "dao",
        "create",
        "--private-key",
        &owner,
        "--model-id",
        &format!("{plain:#x}"),
        "--addresses",
        &book,
    ])?;
    assert!(!created && text.contains("has no vote checkpoints"), "{text}");
    assert_eq!(vault.getModel(plain).call().await?.owner, chain.keys[1].address(), "nothing was handed over");
    Ok(())
}
