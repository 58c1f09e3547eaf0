//! The contracts on a real anvil chain, driven through the Rust bindings the host uses:
//! deploy → register → buy access → deposit → sign a permit → settle → balances on chain.

use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::Provider;
use div_chain::bindings::{DevStablecoin, IPaymentStream, ModelAccessToken, ModelVault, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, revert_reason, sign_permit};
use div_tests::LocalChain;

const PRICE: u64 = 1_000; // 0.001 USDC per request

async fn now(chain: &LocalChain) -> anyhow::Result<u64> {
    let c = chain.client(0).await?;
    let block = c
        .provider()
        .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no latest block"))?;
    Ok(block.header.timestamp)
}

#[tokio::test]
async fn a_paid_permit_settles_exactly_to_the_owner() -> anyhow::Result<()> {
    let chain = LocalChain::start().await?;
    let d = chain.deployment.clone();
    let model = chain.register_model("minilm", U256::from(PRICE)).await?;
    let owner = chain.keys[1].address();
    let user_key = chain.keys[2].clone();
    let user_addr = user_key.address();
    let host_addr = chain.keys[3].address();

    let user = chain.client(2).await?;
    let host = chain.client(3).await?;
    let usdc_addr = chain.usdc()?;
    chain.mint_usdc(user_addr, U256::from(100_000_000u64)).await?;

    // buy one access token (2 USDC) and deposit 50 USDC
    let usdc = DevStablecoin::new(usdc_addr, user.provider());
    let token = ModelAccessToken::new(model.access_token, user.provider());
    usdc.approve(model.access_token, U256::MAX).send().await?.get_receipt().await?;
    assert!(!token.hasAccess(user_addr).call().await?, "no tokens yet, no access");
    token.buy(U256::from(10u64).pow(U256::from(18u64))).send().await?.get_receipt().await?;
    assert!(token.hasAccess(user_addr).call().await?);
    assert!(!token.isPremium(user_addr).call().await?);
    assert_eq!(
        usdc.balanceOf(owner).call().await?,
        U256::from(2_000_000u64),
        "sale proceeds go to the owner"
    );

    let stream = PaymentStream::new(d.payment_stream, user.provider());
    usdc.approve(d.payment_stream, U256::MAX).send().await?.get_receipt().await?;
    stream.deposit(usdc_addr, U256::from(50_000_000u64)).send().await?.get_receipt().await?;
    assert_eq!(stream.getBalance(user_addr, usdc_addr).call().await?, U256::from(50_000_000u64));

    // sign a permit for 10 USDC with an alloy signer; the contract computes the same digest
    let permit = SpendingPermit {
        user: user_addr,
        modelId: model.model_id,
        host: host_addr,
        token: usdc_addr,
        maxAmount: U256::from(10_000_000u64),
        expiry: now(&chain).await? + 86_400,
        nonce: U256::from(1u64),
    };
    let domain = permit_domain(d.chain_id, d.payment_stream);
    let sig = sign_permit(&user_key, &permit, &domain).await?;
    assert_eq!(stream.hashPermit(permit.clone()).call().await?, permit.signing_hash(&domain));

    // the host settles 7 requests, then 10 cumulative: only the difference moves each time
    let host_stream = PaymentStream::new(d.payment_stream, host.provider());
    let owner_before = usdc.balanceOf(owner).call().await?;
    let r = host_stream
        .settle(permit.clone(), sig.clone(), 7 * PRICE as u128, 7)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(r.status());
    let credit = || async { stream.claimable(model.model_id, usdc_addr).call().await };
    assert_eq!(credit().await?, U256::from(7 * PRICE), "settlement credits the model");
    assert_eq!(usdc.balanceOf(owner).call().await?, owner_before, "and transfers nothing");
    host_stream
        .settle(permit.clone(), sig.clone(), 10 * PRICE as u128, 10)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert_eq!(credit().await?, U256::from(10 * PRICE));
    // anyone may claim (here the user): the credit can only go to the model's payout
    let r = stream.claim(model.model_id, usdc_addr).send().await?.get_receipt().await?;
    assert!(r.status());
    assert_eq!(
        usdc.balanceOf(owner).call().await? - owner_before,
        U256::from(10 * PRICE),
        "100 % to the owner"
    );
    assert_eq!(credit().await?, U256::ZERO);
    let err = stream.claim(model.model_id, usdc_addr).call().await;
    let reason = err.err().map(|e| revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("NothingToClaim"), "{reason}");
    assert_eq!(stream.getBalance(user_addr, usdc_addr).call().await?, U256::from(50_000_000u64 - 10 * PRICE));
    let vault = ModelVault::new(d.model_vault, user.provider());
    assert_eq!(vault.getModel(model.model_id).call().await?.totalInferences, 10);
    let state = stream.permitState(permit.signing_hash(&domain)).call().await?;
    assert_eq!((state.settledAmount, state.settledRequests), (10 * PRICE as u128, 10));

    // the same cumulative again moves nothing and says why, by name
    let err = host_stream.settle(permit.clone(), sig.clone(), 10 * PRICE as u128, 10).call().await;
    let reason = err.err().map(|e| revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("NothingToSettle"), "{reason}");
    // past the cap
    let err = host_stream.settle(permit.clone(), sig.clone(), 10_000_001, 11).call().await;
    let reason = err.err().map(|e| revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("ExceedsPermitCap"), "{reason}");
    // another account cannot settle the host's permit
    let err = stream.settle(permit.clone(), sig.clone(), 11 * PRICE as u128, 11).call().await;
    let reason = err.err().map(|e| revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("HostMismatch"), "{reason}");
    // a host the owner never authorised cannot settle, even with the user's own signature
    let stranger = chain.client(4).await?;
    let mut foreign = permit.clone();
    foreign.host = chain.keys[4].address();
    let foreign_sig = sign_permit(&user_key, &foreign, &domain).await?;
    let err = PaymentStream::new(d.payment_stream, stranger.provider())
        .settle(foreign, foreign_sig, PRICE as u128, 1)
        .call()
        .await;
    let reason = err.err().map(|e| revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("HostNotAuthorized"), "{reason}");
    assert_eq!(usdc.balanceOf(owner).call().await? - owner_before, U256::from(10 * PRICE), "nothing moved");
    Ok(())
}

#[tokio::test]
async fn a_batch_settles_the_good_permits_and_skips_an_empty_balance() -> anyhow::Result<()> {
    let chain = LocalChain::start().await?;
    let d = chain.deployment.clone();
    let model = chain.register_model("batch", U256::from(PRICE)).await?;
    let usdc_addr = chain.usdc()?;
    let host_addr = chain.keys[3].address();
    let domain = permit_domain(d.chain_id, d.payment_stream);
    let expiry = now(&chain).await? + 3_600;

    let mut entries = Vec::new();
    // users #2 and #4 deposit 1 USDC; user #8 deposits nothing
    for (i, deposit) in [(2usize, 1_000_000u64), (4, 1_000_000), (8, 0)] {
        let key = chain.keys[i].clone();
        if deposit > 0 {
            chain.fund_deposit(i, U256::from(deposit)).await?;
        }
        let permit = SpendingPermit {
            user: key.address(),
            modelId: model.model_id,
            host: host_addr,
            token: usdc_addr,
            maxAmount: U256::from(1_000_000u64),
            expiry,
            nonce: U256::from(i as u64),
        };
        let signature: Bytes = sign_permit(&key, &permit, &domain).await?;
        entries.push(IPaymentStream::Settlement {
            permit,
            signature,
            cumulativeAmount: 5 * PRICE as u128,
            cumulativeRequests: 5,
        });
    }
    let host = chain.client(3).await?;
    let stream = PaymentStream::new(d.payment_stream, host.provider());
    let usdc = DevStablecoin::new(usdc_addr, host.provider());
    let owner: Address = chain.keys[1].address();
    let before = usdc.balanceOf(owner).call().await?;
    let receipt = stream.settleBatch(entries).send().await?.get_receipt().await?;
    assert!(receipt.status());
    let skipped: Vec<_> = receipt
        .inner
        .logs()
        .iter()
        .filter_map(|l| l.log_decode::<PaymentStream::SettlementSkipped>().ok())
        .map(|l| l.inner.data.reason)
        .collect();
    // SkipReason.InsufficientBalance (IPaymentStream.sol) for the unfunded permit, and only it
    assert_eq!(skipped, vec![7u8], "exactly the unfunded permit is skipped");
    assert_eq!(stream.claimable(model.model_id, usdc_addr).call().await?, U256::from(10 * PRICE));
    assert!(stream.claim(model.model_id, usdc_addr).send().await?.get_receipt().await?.status());
    assert_eq!(usdc.balanceOf(owner).call().await? - before, U256::from(10 * PRICE));
    let vault = ModelVault::new(d.model_vault, host.provider());
    assert_eq!(vault.getModel(model.model_id).call().await?.totalInferences, 10);
    Ok(())
}

/// Vote checkpoints are kept by timestamp, so a `buy` estimated in the second of the last
/// checkpoint is cheaper than the same `buy` mined a second later: sent with the bare estimate it
/// runs out of gas (a revert the buyer pays for, as `div buy` once did in CI). The wallet client
/// every DIV command sends with adds `div_chain::gas::with_margin`, which covers it.
#[tokio::test]
async fn a_buy_mined_a_second_after_its_estimate_fits_the_margin() -> anyhow::Result<()> {
    use div_chain::gas::with_margin;
    let chain = LocalChain::start().await?;
    let model = chain.register_model("clock", U256::from(PRICE)).await?;
    let one = U256::from(10u64).pow(U256::from(18u64));
    let mut buyers = Vec::new();
    for i in [2usize, 4, 8] {
        let c = chain.client(i).await?;
        chain.mint_usdc(c.address(), U256::from(100_000_000u64)).await?;
        let usdc = DevStablecoin::new(chain.usdc()?, c.provider());
        assert!(usdc.approve(model.access_token, U256::MAX).send().await?.get_receipt().await?.status());
        buyers.push(c);
    }
    // the first buy writes a total-supply checkpoint at the latest block's second
    let first = ModelAccessToken::new(model.access_token, buyers[0].provider());
    assert!(first.buy(one).send().await?.get_receipt().await?.status());
    let t = now(&chain).await?;

    let (token, estimate) = estimate_then_mine_later(&chain, model.access_token, &buyers[1], one).await?;
    let bare = token.buy(one).gas(estimate).send().await?.get_receipt().await?;
    assert!(!bare.status(), "mined a second after its estimate, the bare estimate ran out of gas");
    assert!(now(&chain).await? > t);

    // again, now with the margin: a checkpoint in the latest block's second, then the same race
    assert!(first.buy(one).send().await?.get_receipt().await?.status());
    let (token, estimate) = estimate_then_mine_later(&chain, model.access_token, &buyers[2], one).await?;
    let covered = token.buy(one).gas(with_margin(estimate)).send().await?.get_receipt().await?;
    assert!(covered.status(), "the margin covers the new checkpoint");

    // and the wallet client adds that margin by itself
    let token = ModelAccessToken::new(model.access_token, buyers[1].provider());
    let estimate = token.buy(one).estimate_gas().await?;
    let sent = token.buy(one).send().await?.get_receipt().await?;
    assert!(sent.status());
    let tx = buyers[1]
        .provider()
        .get_transaction_by_hash(sent.transaction_hash)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the buy is not on chain"))?;
    use alloy::consensus::Transaction as _;
    assert_eq!(tx.gas_limit(), with_margin(estimate));
    Ok(())
}

/// Estimates `c`'s buy of `amount` against the latest block, then has the next block mined a
/// second later.
async fn estimate_then_mine_later(
    chain: &LocalChain,
    token: Address,
    c: &div_chain::Client,
    amount: U256,
) -> anyhow::Result<(ModelAccessToken::ModelAccessTokenInstance<alloy::providers::DynProvider>, u64)> {
    let token = ModelAccessToken::new(token, c.provider().clone());
    let estimate = token.buy(amount).block(alloy::eips::BlockId::latest()).estimate_gas().await?;
    let late = now(chain).await? + 1;
    chain
        .client(0)
        .await?
        .provider()
        .raw_request::<_, serde_json::Value>("evm_setNextBlockTimestamp".into(), (late,))
        .await?;
    Ok((token, estimate))
}
