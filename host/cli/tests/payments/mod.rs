//! Gating and payments against real processes: anvil with the contracts, three custodians, a
//! model published encrypted, and `div serve --vault` metering every request, settled on-chain.

use std::time::Duration;

use alloy::primitives::{Address, U256};
use anyhow::Context;
use div_chain::bindings::{ModelVault, PaymentStream};
use div_chain::{permit_domain, sign_permit};
use div_meter::Receipt;
use serde_json::{Value, json};

use super::div;
use super::rig::paid::{PRICE, Paid, chat_price, code, now, permit_json, read_stream};
use super::rig::{HOST, OWNER, misbehave_wasm};

#[tokio::test(flavor = "multi_thread")]
async fn paid_requests_settle_exactly_and_bad_callers_are_refused_without_charge() -> anyhow::Result<()> {
    // a minute-long cache: the revocation below can only be seen in time through the chain's events
    let web = std::env::temp_dir().join(format!("div-web-{}", std::process::id()));
    std::fs::create_dir_all(web.join("assets"))?;
    std::fs::write(web.join("index.html"), "<!doctype html><title>DIV dApp marker</title>")?;
    std::fs::write(web.join("assets/app.js"), "console.log('div');")?;
    let web_arg = web.display().to_string();
    let p = Paid::start(
        "pay-e2e",
        &["--rate-limit", "5", "--premium-batch", "4", "--chain-cache-ms", "60000", "--web-dir", &web_arg],
    )
    .await?;
    let http = reqwest::Client::new();
    // the dApp on the host's origin: files, its own routes falling back to index.html, and the
    // API's unknown routes still JSON errors
    for (path, status, needle) in [
        ("/", 200, "DIV dApp marker"),
        ("/model/0x01", 200, "DIV dApp marker"),
        ("/assets/app.js", 200, "console.log"),
        ("/v1/nope", 404, "no route /v1/nope"),
    ] {
        let r = http.get(format!("{}{path}", p.url)).send().await?;
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert!(r.text().await?.contains(needle), "{path}");
    }
    let info: Value = http.get(format!("{}/v1/host", p.url)).send().await?.json().await?;
    assert_eq!(info["host"].as_str().map(str::to_lowercase), Some(format!("{:#x}", p.key(HOST).address())));
    assert_eq!(
        info["deployment"]["modelVault"].as_str().map(str::to_lowercase),
        Some(format!("{:#x}", p.rig.chain.deployment.model_vault)),
        "the dApp learns the contracts from the host: {info}"
    );
    let (u, v, w) = (2usize, 8usize, 9usize);
    p.fund(u, 10_000_000, true).await?;
    p.fund(v, 10_000_000, false).await?;
    p.fund(w, 3 * PRICE, true).await?;
    let vault = ModelVault::new(p.rig.chain.deployment.model_vault, p.rig.provider()?);
    let owner = p.key(OWNER).address();

    // a permit through the CLI, as a user gets one
    let out = p.cli(u, &["permit", "--url", &p.url, "--model", "tiny-paid", "--max", "5"])?;
    let key = out.lines().find_map(|l| l.strip_prefix("DIV_API_KEY=")).context("no key printed")?.to_string();
    let mut ok = 0u64;
    let mut last = U256::ZERO;
    for i in 1..=5u64 {
        let (s, body) = p.embed(Some(&key), 1).await?;
        assert_eq!(s, 200, "{body}");
        let r: Receipt = serde_json::from_value(body["receipt"].clone())?;
        assert!(r.verify(), "the receipt is signed by the host");
        assert_eq!((r.amount, r.cumulative_requests), (U256::from(PRICE), i));
        assert_eq!(r.host, p.key(HOST).address());
        last = r.cumulative_amount;
        ok += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last, U256::from(5 * PRICE));

    // who is calling
    assert_eq!(code(&p.embed(None, 1).await?.1), "missing_api_key");
    let (s, b) = p.embed(Some("div-not-a-key"), 1).await?;
    assert_eq!((s, code(&b)), (401, "invalid_api_key"));
    // permits that must not become keys
    let host = p.key(HOST).address();
    let (s, b) =
        p.post_key(u, &p.permit(u, 1000, now() + 60, Address::repeat_byte(7))?, 31337, json!({})).await?;
    assert_eq!((s, code(&b)), (403, "permit_wrong_host"), "{b}");
    let (s, b) = p.post_key(u, &p.permit(u, 1000, now() - 10, host)?, 31337, json!({})).await?;
    assert_eq!((s, code(&b)), (403, "permit_expired"), "{b}");
    let pm = p.permit(u, 1000, now() + 60, host)?;
    let (s, b) = p.post_key(u, &pm, 1, json!({"chainId": 1})).await?;
    assert_eq!((s, code(&b)), (403, "permit_wrong_chain"), "{b}");
    let (s, b) = p.post_key(u, &pm, 1, json!({})).await?;
    assert_eq!((s, code(&b)), (401, "invalid_signature"), "signed for chain 1, sent bare: {b}");
    let replayed = p.permit(u, 1000, now() + 60, host)?;
    assert_eq!(p.post_key(u, &replayed, 31337, json!({})).await?.0, 201);
    let (s, b) = p.post_key(u, &replayed, 31337, json!({})).await?;
    assert_eq!((s, code(&b)), (409, "permit_replayed"), "{b}");
    let (s, b) = {
        let r = reqwest::Client::new().post(format!("{}/v1/keys", p.url)).body("{not json").send().await?;
        (r.status().as_u16(), r.json::<Value>().await?)
    };
    assert_eq!((s, code(&b)), (400, "invalid_json"), "{b}");

    // may they: no access token; a batch past the premium size
    // a wallet without the access token gets no key at all (strangers leave no state)
    let (s, b) = p
        .post_key(v, &p.permit(v, 1_000_000, now() + 3600, p.key(HOST).address())?, 31337, json!({}))
        .await?;
    assert_eq!((s, code(&b)), (403, "insufficient_token_balance"), "{b}");
    let (s, b) = p.embed(Some(&key), 5).await?;
    assert_eq!((s, code(&b)), (403, "premium_required"), "{b}");

    // can they pay: a permit cap, a deposit that runs out mid-stream
    let capped = p.key_for(u, 2 * PRICE).await?;
    for _ in 0..2 {
        assert_eq!(p.embed(Some(&capped), 1).await?.0, 200);
        ok += 1;
    }
    let (s, b) = p.embed(Some(&capped), 1).await?;
    assert_eq!((s, code(&b)), (402, "insufficient_quota"), "{b}");
    let w_key = p.key_for(w, 1_000_000).await?;
    for _ in 0..3 {
        let (s, b) = p.embed(Some(&w_key), 1).await?;
        assert_eq!(s, 200, "{b}");
        ok += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (s, b) = p.embed(Some(&w_key), 1).await?;
    assert_eq!((s, code(&b)), (402, "insufficient_quota"), "deposit spent: {b}");

    // rate limit (5/s, burst 10) is 429, distinct from quota
    let fast = p.key_for(u, 1_000_000).await?;
    let mut limited = 0;
    let burst = futures_join(&p, &fast, 16).await?;
    for (s, b) in &burst {
        match s {
            200 => ok += 1,
            429 => {
                assert_eq!(code(b), "rate_limit_exceeded");
                limited += 1;
            }
            other => anyhow::bail!("unexpected {other}: {b}"),
        }
    }
    assert!(limited >= 1, "16 requests at once passed a 5/s limit");

    // revoked on-chain: refused as soon as the host reads the event
    let revocable = p.permit(u, 1_000_000, now() + 3600, host)?;
    let (s, b) = p.post_key(u, &revocable, 31337, json!({})).await?;
    assert_eq!(s, 201, "{b}");
    let rkey = b["key"].as_str().unwrap_or_default().to_string();
    let user = p.rig.chain.client(u).await?;
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, user.provider());
    let r = ps.revokePermit(revocable).send().await?.get_receipt().await?;
    assert!(r.status());
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (s, b) = p.embed(Some(&rkey), 1).await?;
    assert_eq!((s, code(&b)), (403, "permit_revoked"), "{b}");

    // settle: exactly the successful requests move, 100 % to the owner
    let (owner_before, u_before, w_before) = (
        p.usdc_of(owner).await?,
        p.deposit_of(p.key(u).address()).await?,
        p.deposit_of(p.key(w).address()).await?,
    );
    let total_before = vault.getModel(p.id).call().await?.totalInferences;
    let usage = |v: Value| v["usage"].clone();
    let before: Value = http.get(format!("{}/v1/models/tiny-paid", p.url)).send().await?.json().await?;
    assert_eq!(usage(before.clone())["charged_requests"], json!(ok), "{before}");
    assert_eq!(usage(before.clone())["unsettled_amount"], json!((ok * PRICE).to_string()), "{before}");
    let out = p.settle().await?;
    assert!(out.contains(&format!("settled {ok} requests")), "{out}");
    let total_after = vault.getModel(p.id).call().await?.totalInferences;
    assert_eq!(total_after - total_before, ok, "totalInferences += N");
    // settlement credits the model; the owner's claim pays it out in one transfer
    assert_eq!(p.usdc_of(owner).await?, owner_before, "settlement itself transfers nothing");
    assert_eq!(p.claimable().await?, U256::from(ok * PRICE), "the model's credit += N × price");
    let earnings = p.cli(OWNER, &["earnings"])?;
    assert!(earnings.contains(&format!("{ok} inferences settled")), "{earnings}");
    let credit = format!("{} USDC", alloy::primitives::utils::format_units(U256::from(ok * PRICE), 6)?);
    assert!(earnings.contains(&format!("{credit} to claim")), "{earnings}");
    let claimed = p.claim().await?;
    assert!(claimed.contains(&format!("claimed {credit} to {owner}")), "{claimed}");
    assert!(p.claim().await?.contains("nothing to claim"), "a second claim pays nothing");
    assert_eq!(p.claimable().await?, U256::ZERO);
    assert_eq!(p.usdc_of(owner).await? - owner_before, U256::from(ok * PRICE), "owner payout += N × price");
    let paid_u = u_before - p.deposit_of(p.key(u).address()).await?;
    let paid_w = w_before - p.deposit_of(p.key(w).address()).await?;
    assert_eq!(paid_w, U256::from(3 * PRICE));
    assert_eq!(paid_u + paid_w, U256::from(ok * PRICE), "users paid exactly what the owner got");
    assert!(p.settle().await?.contains("nothing to settle"), "a second settle moves nothing");
    let after: Value = http.get(format!("{}/v1/models/tiny-paid", p.url)).send().await?.json().await?;
    assert_eq!(usage(after.clone())["settled_requests"], json!(ok), "the owner dashboard's numbers: {after}");
    assert_eq!(usage(after.clone())["unsettled_amount"], json!("0"), "{after}");
    let _ = std::fs::remove_dir_all(&web);
    let earnings = div()
        .args(["earnings", "--owner", &owner.to_string()])
        .arg("--addresses")
        .arg(&p.rig.book)
        .output()?;
    let earnings = String::from_utf8_lossy(&earnings.stdout);
    assert!(earnings.contains(&format!("{ok} inferences settled")), "{earnings}");
    assert!(earnings.contains(&format!("earned {credit}, 0.000000 USDC to claim")), "{earnings}");
    Ok(())
}

async fn futures_join(p: &Paid, key: &str, n: usize) -> anyhow::Result<Vec<(u16, Value)>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (url, key) = (p.url.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/embeddings"))
                .bearer_auth(key)
                .json(&json!({"model": "tiny-paid", "input": "x"}))
                .send()
                .await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.json::<Value>().await?))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// `kill -9` the host three times while 32 clients send paid requests on three permits, each
/// request with its own `x-request-id`. After the last restart the clients reconcile every
/// request whose answer they lost (`GET /v1/receipts/{id}`). Then, per permit, every cumulative
/// number was issued exactly once (1..n, no repeat, no gap) and the amounts add up; after
/// settlement the owner's payout is exactly the sum of the receipts.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_host_loses_no_charge_and_charges_none_twice() -> anyhow::Result<()> {
    let mut p = Paid::start("pay-crash", &["--rate-limit", "100000"]).await?;
    let users = [2usize, 8, 9];
    let mut keys = Vec::new();
    for u in users {
        p.fund(u, 100_000_000, true).await?;
        keys.push(p.key_for(u, 100_000_000).await?);
    }
    let owner = p.key(OWNER).address();
    let before = p.usdc_of(owner).await?;
    let mut receipts: Vec<Receipt> = Vec::new();
    let mut lost: Vec<(String, String)> = Vec::new(); // (key, client request id)
    for round in 0..3 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..32 {
            let (url, key, stop) = (p.url.clone(), keys[c % keys.len()].clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let (mut got, mut lost): (Vec<Receipt>, Vec<(String, String)>) = (Vec::new(), Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let id = format!("r{round}-c{c}-{i}");
                    let sent = http
                        .post(format!("{url}/v1/embeddings"))
                        .bearer_auth(&key)
                        .header("x-request-id", &id)
                        .json(&json!({"model": "tiny-paid", "input": "crash me"}))
                        .send()
                        .await;
                    let body = match sent {
                        Ok(r) => r.json::<Value>().await.ok(),
                        Err(_) => None,
                    };
                    match body.and_then(|b| serde_json::from_value::<Receipt>(b["receipt"].clone()).ok()) {
                        Some(rc) => got.push(rc),
                        None => {
                            // the answer never arrived: the request may or may not have been charged
                            lost.push((key.clone(), id));
                            break;
                        }
                    }
                }
                (got, lost)
            }));
        }
        // short bursts: the old write order lost charges right here
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(mut h) = p.host.take() {
            h.0.kill()?;
            h.0.wait()?;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in clients {
            let (got, l) = c.await?;
            receipts.extend(got);
            lost.extend(l);
        }
        p.start_host(&["--rate-limit", "100000"]).await?;
    }
    assert!(receipts.len() > 96, "only {} requests were served", receipts.len());
    assert!(receipts.iter().all(Receipt::verify));
    // reconcile: the receipts of requests that were charged but whose answers were lost
    let http = reqwest::Client::new();
    let mut recovered = 0;
    for (key, id) in &lost {
        let r = http.get(format!("{}/v1/receipts/{id}", p.url)).bearer_auth(key).send().await?;
        match r.status().as_u16() {
            200 => {
                let rc: Receipt = r.json().await?;
                assert!(rc.verify());
                assert_eq!(rc.client_request_id.as_deref(), Some(id.as_str()));
                receipts.push(rc);
                recovered += 1;
            }
            404 => {}
            other => anyhow::bail!("receipt lookup answered {other}"),
        }
    }
    eprintln!(
        "crash test: {} receipts held, {recovered} recovered of {} lost answers",
        receipts.len(),
        lost.len()
    );
    // per permit: 1..n exactly once, amounts adding up
    let (by_permit, total) = crate::rig::paid::numbered(&receipts);
    assert_eq!(by_permit.len(), 3);
    // settle and claim: the owner gets exactly the receipts
    p.settle().await?;
    p.claim().await?;
    assert_eq!(p.usdc_of(owner).await? - before, total, "payout Δ = Σ receipts");
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, p.rig.provider()?);
    for (hash, rs) in &by_permit {
        let st = ps.permitState(*hash).call().await?;
        assert_eq!(st.settledRequests, rs.len() as u64);
    }
    // the next request continues its permit after the last receipt
    let (s, b) = p.embed(Some(&keys[0]), 1).await?;
    assert_eq!(s, 200, "{b}");
    let next: Receipt = serde_json::from_value(b["receipt"].clone())?;
    let had = by_permit.get(&next.permit_hash).map_or(0, Vec::len) as u64;
    assert_eq!(next.cumulative_requests, had + 1);
    Ok(())
}

/// Sign-In with Ethereum admits the owner free and shows a user their permits; a permit alone
/// (as anyone can read it on chain) never pays: neither in a header nor for a key; a session
/// proves control of the permit's user; a model the byte-bounded cache unloaded comes back on
/// demand.
#[tokio::test(flavor = "multi_thread")]
async fn siwe_sessions_permit_headers_and_reload_on_demand() -> anyhow::Result<()> {
    use alloy::signers::SignerSync;
    use base64::Engine as _;
    let p = Paid::start("pay-siwe", &["--model-cache-mib", "0"]).await?;
    let http = reqwest::Client::new();
    let sign_in = |who: usize| {
        let (http, url, port, key) = (http.clone(), p.url.clone(), p.port, p.key(who).clone());
        async move {
            let nonce: Value = http.get(format!("{url}/v1/siwe/nonce")).send().await?.json().await?;
            let issued = {
                let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output()?;
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            let msg = format!(
                "127.0.0.1:{port} wants you to sign in with your Ethereum account:\n{}\n\nSign in to DIV.\n\n\
                 URI: {url}\nVersion: 1\nChain ID: 31337\nNonce: {}\nIssued At: {issued}",
                key.address(),
                nonce["nonce"].as_str().unwrap_or_default()
            );
            let sig = alloy::hex::encode(key.sign_message_sync(msg.as_bytes())?.as_bytes());
            let r = http
                .post(format!("{url}/v1/siwe"))
                .json(&json!({"message": msg, "signature": sig}))
                .send()
                .await?;
            let (s, v) = (r.status().as_u16(), r.json::<Value>().await?);
            anyhow::ensure!(s == 200, "sign-in refused: {v}");
            Ok::<_, anyhow::Error>(v["token"].as_str().unwrap_or_default().to_string())
        }
    };
    // the owner, signed in, uses their own model free (no receipt)
    let owner_session = sign_in(OWNER).await?;
    let (s, b) = p.embed(Some(&owner_session), 1).await?;
    assert_eq!(s, 200, "{b}");
    assert!(b.get("receipt").is_none(), "the owner is not charged");
    // a user's session identifies them but does not pay
    let u = 2usize;
    p.fund(u, 1_000_000, true).await?;
    let user_session = sign_in(u).await?;
    let (s, b) = p.embed(Some(&user_session), 1).await?;
    assert_eq!((s, code(&b)), (401, "permit_required"), "{b}");

    // a permit and its signature are public once settled: holding them gets nothing
    let permit = p.permit(u, 10 * PRICE, now() + 600, p.key(HOST).address())?;
    let domain = permit_domain(31337, p.rig.chain.deployment.payment_stream);
    let sig = sign_permit(p.key(u), &permit, &domain).await?;
    let signed = json!({"permit": permit_json(&permit), "signature": sig});
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed.to_string());
    let r = http
        .post(format!("{}/v1/embeddings", p.url))
        .header("x-div-permit", header)
        .json(&json!({"model": "tiny-paid", "input": "by permit"}))
        .send()
        .await?;
    let (s, b) = (r.status().as_u16(), r.json::<Value>().await?);
    assert_eq!((s, code(&b)), (401, "missing_api_key"), "a permit in a header is no credential: {b}");
    let post = |body: Value, bearer: Option<String>| {
        let (http, url) = (http.clone(), p.url.clone());
        async move {
            let mut r = http.post(format!("{url}/v1/keys")).json(&body);
            if let Some(t) = bearer {
                r = r.bearer_auth(t);
            }
            let r = r.send().await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.json::<Value>().await?))
        }
    };
    let (s, b) = post(signed.clone(), None).await?;
    assert_eq!((s, code(&b)), (401, "key_proof_required"), "{b}");
    // a proof signed by someone else (the attacker's own wallet)
    let mut stolen = signed.clone();
    stolen["proof"] = p.proof(9, permit.signing_hash(&domain)).await?;
    let (s, b) = post(stolen, None).await?;
    assert_eq!((s, code(&b)), (401, "invalid_key_proof"), "{b}");
    // another user's session proves nothing about this permit
    let (s, b) = post(signed.clone(), Some(owner_session.clone())).await?;
    assert_eq!((s, code(&b)), (401, "key_proof_required"), "{b}");
    // the user's own session does: one key, once
    let (s, b) = post(signed.clone(), Some(user_session.clone())).await?;
    assert_eq!(s, 201, "{b}");
    let key = b["key"].as_str().context("no key")?.to_string();
    assert_eq!(b["owner"].as_str().map(str::to_lowercase), Some(format!("{:#x}", p.key(OWNER).address())));
    let (s, b) = post(signed, Some(user_session.clone())).await?;
    assert_eq!((s, code(&b)), (409, "permit_replayed"), "{b}");
    let (s, b) = p.embed(Some(&key), 1).await?;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["receipt"]["cumulative_requests"].as_u64(), Some(1));
    let me: Value =
        http.get(format!("{}/v1/me", p.url)).bearer_auth(&user_session).send().await?.json().await?;
    assert_eq!(me["permits"].as_array().map(Vec::len), Some(1), "{me}");
    assert_eq!(me["permits"][0]["charged_requests"].as_u64(), Some(1));

    // a second model pushes the first out of a zero-byte cache; asking for the first reloads it
    let pkg = p.rig.tiny_package("tiny-other")?;
    p.rig.publish_ok(&pkg, &misbehave_wasm(), &[p.key(HOST).address()])?;
    let mut other_up = false;
    for _ in 0..100 {
        let models: Value = http.get(format!("{}/v1/models", p.url)).send().await?.json().await?;
        if models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "tiny-other")) {
            other_up = models["data"].as_array().map(Vec::len) == Some(1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(other_up, "the second model did not replace the first in the cache");
    let (s, b) = p.embed(Some(&owner_session), 1).await?;
    assert_eq!((s, code(&b)), (503, "model_loading"), "{b}");
    let mut back = false;
    for _ in 0..100 {
        if p.embed(Some(&owner_session), 1).await?.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(back, "the unloaded model did not come back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_generation_is_charged_per_token_and_a_hang_up_only_for_what_was_generated()
-> anyhow::Result<()> {
    let p = Paid::start_chat("pay-chat").await?;
    let u = 2usize;
    p.fund(u, 10_000_000, true).await?;
    let out = p.cli(u, &["permit", "--url", &p.url, "--model", div_tests::CHAT_MODEL, "--max", "1"])?;
    let key = out.lines().find_map(|l| l.strip_prefix("DIV_API_KEY=")).context("no key printed")?.to_string();
    let http = reqwest::Client::new();
    let chat = |body: Value| {
        http.post(format!("{}/v1/chat/completions", p.url)).bearer_auth(&key).json(&body).send()
    };

    // a whole stream: the receipt in it charges exactly the tokens the usage reports
    let r = chat(
        json!({"model": div_tests::CHAT_MODEL, "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await?;
    assert_eq!(r.status(), 200);
    let (text, usage, receipt) = read_stream(r).await?;
    assert!(!text.is_empty());
    let tokens = usage["total_tokens"].as_u64().context("usage")?;
    assert!(receipt.verify(), "the receipt is signed by the host");
    assert_eq!(receipt.amount, U256::from(chat_price(tokens)), "price + per-token price of {tokens} tokens");
    assert_eq!(receipt.cumulative_requests, 1);

    // a caller who hangs up after three chunks pays for what was generated, no more
    let mut r = chat(
        json!({"model": div_tests::CHAT_MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": 1500, "stream": true}),
    )
    .await?;
    for _ in 0..3 {
        r.chunk().await?.context("the stream ended early")?;
    }
    drop(r);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let usage_now = loop {
        let v: Value =
            http.get(format!("{}/v1/models/{}", p.url, div_tests::CHAT_MODEL)).send().await?.json().await?;
        if v["usage"]["charged_requests"] == json!(2) {
            break v["usage"].clone();
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the hang-up was never charged: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = http.get(format!("{}/metrics", p.url)).send().await?.text().await?;
    let generated: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("div_generation_tokens_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    let second = generated - tokens;
    assert!(second < 200, "{second} tokens for a caller who left after three chunks");
    let charged: u64 = usage_now["charged_amount"].as_str().context("charged")?.parse()?;
    assert_eq!(charged, chat_price(tokens) + chat_price(second), "charged for exactly the tokens generated");

    // four at once decode in one batch; each is still charged exactly its own tokens
    let ask = |q: &str| {
        chat(
            json!({"model": div_tests::CHAT_MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 20 + q.len()}),
        )
    };
    let (a, b, c, d) = tokio::join!(
        ask("What is 2 + 2?"),
        ask("Name a fruit."),
        ask("What is the capital of Italy?"),
        ask("Say hello.")
    );
    let mut batch_total = 0;
    for a in [a, b, c, d] {
        let b: Value = a?.json().await?;
        let receipt: Receipt =
            serde_json::from_value(b["receipt"].clone()).with_context(|| format!("{b}"))?;
        let t = b["usage"]["total_tokens"].as_u64().context("usage")?;
        assert!(b["usage"]["completion_tokens"].as_u64().is_some_and(|c| c > 0), "{b}");
        assert_eq!(receipt.amount, U256::from(chat_price(t)), "a batched request pays its own {t} tokens");
        batch_total += chat_price(t);
    }
    let charged = charged + batch_total;

    // settlement pays the owner exactly that
    let owner = p.key(OWNER).address();
    let before = p.usdc_of(owner).await?;
    assert!(p.settle().await?.contains("settled 6 requests"));
    p.claim().await?;
    assert_eq!(p.usdc_of(owner).await? - before, U256::from(charged));
    Ok(())
}

/// Prices are dollars. A user who pays with an 18-decimal stablecoin (USDFC) is charged the same
/// 0.001 per request as one paying with USDC (6 decimals), not a trillionth of it: the vault's
/// price is micro-dollars and the host converts it to the permit's token. Settlement credits the
/// model in USDFC and the claim pays the owner exactly the receipts.
#[tokio::test(flavor = "multi_thread")]
async fn an_eighteen_decimal_stablecoin_pays_the_same_dollars_not_a_trillionth() -> anyhow::Result<()> {
    let p = Paid::start("pay-usdfc", &[]).await?;
    let u = 2usize;
    p.fund(u, 1_000_000, true).await?; // USDC too, and the access token
    p.cli(u, &["deposit", "--token", "USDFC", "--amount", "1", "--mint"])?;
    // a cap of 0.0025 USDFC admits two requests of 0.001, not a third (a trillionth would admit billions)
    let out = p.cli(
        u,
        &["permit", "--token", "USDFC", "--url", &p.url, "--model", "tiny-paid", "--max", "0.0025"],
    )?;
    let key = out.lines().find_map(|l| l.strip_prefix("DIV_API_KEY=")).context("no key printed")?.to_string();
    let per_request = U256::from(PRICE) * U256::from(10u64).pow(U256::from(12u64));
    let mut total = U256::ZERO;
    for n in 1..=2u64 {
        let (s, b) = p.embed(Some(&key), 1).await?;
        assert_eq!(s, 200, "{b}");
        let r: Receipt = serde_json::from_value(b["receipt"].clone())?;
        assert!(r.verify());
        assert_eq!(r.amount, per_request, "0.001 USDFC = 10^15 base units");
        assert_eq!(r.cumulative_requests, n);
        total += r.amount;
    }
    let (s, b) = p.embed(Some(&key), 1).await?;
    assert_eq!((s, code(&b)), (402, "insufficient_quota"), "{b}");

    let owner = p.key(OWNER).address();
    let usdfc = p.rig.chain.deployment.stablecoin("USDFC").context("no USDFC")?.address;
    let coin = div_chain::bindings::DevStablecoin::new(usdfc, p.rig.provider()?);
    let before = coin.balanceOf(owner).call().await?;
    assert!(p.settle().await?.contains("settled 2 requests"));
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, p.rig.provider()?);
    assert_eq!(ps.claimable(p.id, usdfc).call().await?, total, "the model's USDFC credit");
    assert!(p.claim().await?.contains("claimed 0.002000000000000000 USDFC"));
    assert_eq!(coin.balanceOf(owner).call().await? - before, total, "payout Δ = Σ receipts, in USDFC");
    Ok(())
}
