//! The faults, each injected against real processes: a settlement re-sent or refused for good,
//! a chain RPC that refuses and then hangs under load, one that goes silent, custodians down
//! when the host starts, and failures that must name their real cause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{B256, U256};
use alloy::providers::Provider;
use anyhow::Context;
use div_chain::bindings::{IPaymentStream, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, sign_permit};
use div_meter::Receipt;
use div_tests::metric;
use serde_json::{Value, json};

use crate::div;
use crate::proxy::{Mode, Proxy};
use crate::rig::paid::{PRICE, Paid, code, now, rand_nonce};
use crate::rig::{HOST, OWNER, Proc, Rig, free_port, hex_key, misbehave_wasm};
use crate::stack::Shared;

/// A funded user with an access token of `model` and a key for a fresh permit; returns the key,
/// the permit and its signature.
async fn user_key(
    p: &Paid,
    user: usize,
    model: B256,
) -> anyhow::Result<(String, SpendingPermit, alloy::primitives::Bytes)> {
    p.rig.chain.fund_deposit(user, U256::from(50_000_000u64)).await?;
    p.cli(user, &["buy", "--model-id", &format!("{model:#x}"), "--amount", "1", "--mint"])?;
    let permit = SpendingPermit {
        user: p.key(user).address(),
        modelId: model,
        host: p.key(HOST).address(),
        token: p.rig.chain.usdc()?,
        maxAmount: U256::from(40_000_000u64),
        expiry: now() + 3600,
        nonce: U256::from(rand_nonce()),
    };
    let sig = sign_permit(p.key(user), &permit, &permit_domain(31337, p.rig.chain.deployment.payment_stream))
        .await?;
    let (s, b) = p.post_key(user, &permit, 31337, json!({})).await?;
    anyhow::ensure!(s == 201, "key refused: {b}");
    Ok((b["key"].as_str().context("key")?.to_string(), permit, sig))
}

async fn host_nonce(p: &Paid) -> anyhow::Result<(u64, u64)> {
    let provider = p.rig.provider()?;
    let who = p.key(HOST).address();
    Ok((
        provider.get_transaction_count(who).latest().await?,
        provider.get_transaction_count(who).pending().await?,
    ))
}

/// 15.8: a settlement with nothing left to move is not sent (no gas), and one that was mined
/// but never seen by the host is found on chain, not paid twice, and reported as such.
pub async fn a_resent_settlement_moves_nothing_and_sends_nothing(shared: Arc<Shared>) -> anyhow::Result<()> {
    let st = shared.get().await?;
    let p = &st.paid;
    let (key, permit, sig) = user_key(p, 16, st.id("tiny-paid")).await?;
    for _ in 0..2 {
        assert_eq!(p.embed(Some(&key), 1).await?.0, 200);
    }
    p.settle().await?;
    let (n0, _) = host_nonce(p).await?;
    let out = p.settle().await?;
    assert!(out.contains("nothing to settle"), "{out}");
    assert_eq!(host_nonce(p).await?.0, n0, "a round with nothing to move sent a transaction");
    // three more charges, settled behind the host's back with its own key (a round it mined
    // but never saw, say before a crash)
    let mut last = None;
    for _ in 0..3 {
        let (s, b) = p.embed(Some(&key), 1).await?;
        assert_eq!(s, 200, "{b}");
        last = Some(serde_json::from_value::<Receipt>(b["receipt"].clone())?);
    }
    let last = last.context("no receipt")?;
    let host = p.rig.chain.client(HOST).await?;
    let entry = IPaymentStream::Settlement {
        permit,
        signature: sig,
        cumulativeAmount: last.cumulative_amount.saturating_to::<u128>(),
        cumulativeRequests: last.cumulative_requests,
    };
    let r = PaymentStream::new(p.rig.chain.deployment.payment_stream, host.provider())
        .settleBatch(vec![entry])
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(r.status());
    let (n1, _) = host_nonce(p).await?;
    let out = p.settle().await?;
    assert!(out.contains("3 requests were already settled") && out.contains("nothing to settle"), "{out}");
    assert_eq!(host_nonce(p).await?.0, n1, "the host re-sent a settlement that was already mined");
    Ok(())
}

/// 14.3 / 15.8: a permit `PaymentStream` refuses for good (revoked past its grace period) is
/// marked: its key stops working, and it is never sent again.
pub async fn a_permit_the_contract_refuses_is_marked_and_never_resent(
    _shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let p = Paid::start("refused", &[]).await?;
    let u = 2usize;
    let (key, permit, _) = user_key(&p, u, p.id).await?;
    for _ in 0..2 {
        assert_eq!(p.embed(Some(&key), 1).await?.0, 200);
    }
    let user = p.rig.chain.client(u).await?;
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, user.provider());
    assert!(ps.revokePermit(permit.clone()).send().await?.get_receipt().await?.status());
    // past the settle grace (1 h): the contract will refuse it for good
    let provider = p.rig.provider()?;
    provider.raw_request::<_, Value>("evm_increaseTime".into(), (3700u64,)).await?;
    provider.raw_request::<_, Value>("evm_mine".into(), ()).await?;
    let (n0, _) = host_nonce(&p).await?;
    let out = p.settle().await?;
    assert!(out.contains("nothing to settle") && out.contains("refuse"), "{out}");
    assert_eq!(host_nonce(&p).await?.0, n0, "a batch the contract refuses entirely was sent anyway");
    let session = p.sign_in(u).await?;
    let me: Value = reqwest::Client::new()
        .get(format!("{}/v1/me", p.url))
        .bearer_auth(&session)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(me["permits"][0]["rejected"], "Revoked", "{me}");
    let (s, b) = p.embed(Some(&key), 1).await?;
    assert_eq!(s, 403, "{b}");
    assert!(matches!(code(&b), "permit_rejected" | "permit_revoked"), "{b}");
    let out = p.settle().await?;
    assert!(out.trim() == "nothing to settle", "re-sent: {out}");
    assert_eq!(host_nonce(&p).await?.0, n0);
    Ok(())
}

/// A rig with `tiny-paid`, and a metering host that reaches the chain through a proxy.
async fn behind_proxy(name: &str, flags: &[&str]) -> anyhow::Result<(Paid, Proxy)> {
    let rig = Rig::start(name).await?;
    let pkg = rig.tiny_package("tiny-paid")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    let anvil: std::net::SocketAddr = rig.chain.rpc_url.trim_start_matches("http://").parse()?;
    let proxy = Proxy::start(anvil).await?;
    let mut book: Value = serde_json::from_slice(&std::fs::read(&rig.book)?)?;
    book["rpcUrl"] = proxy.url().into();
    let proxied = rig.dir.join("addresses-proxied.json");
    std::fs::write(&proxied, book.to_string())?;
    let p = Paid::serve_with_book(rig, id, proxied, flags).await?;
    Ok((p, proxy))
}

/// 15.2: under load, the chain RPC refuses connections for 20 s and then accepts them and
/// answers nothing for 20 s. Paid traffic goes on; settlement fails (counted, logged once a
/// round, backing off), then resumes by itself with no nonce gap: the owner is paid exactly the
/// receipts.
pub async fn settlement_heals_after_the_rpc_refuses_then_hangs(_shared: Arc<Shared>) -> anyhow::Result<()> {
    let (p, proxy) = behind_proxy(
        "rpc-outage",
        &[
            "--settle-interval-secs",
            "2",
            "--settle-receipt-timeout-secs",
            "3",
            "--rpc-timeout-ms",
            "1000",
            "--rate-limit",
            "1000",
        ],
    )
    .await?;
    let (key, permit, _) = user_key(&p, 2, p.id).await?;
    let owner = p.key(OWNER).address();
    let before = p.usdc_of(owner).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (url, key, stop) = (p.url.clone(), key.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
            let mut receipts: Vec<Receipt> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r = http
                    .post(format!("{url}/v1/embeddings"))
                    .bearer_auth(&key)
                    .header("x-request-id", format!("c{c}-{i}"))
                    .json(&json!({"model": "tiny-paid", "input": "during the outage"}))
                    .send()
                    .await;
                if let Ok(r) = r
                    && let Ok(b) = r.json::<Value>().await
                    && let Ok(rc) = serde_json::from_value::<Receipt>(b["receipt"].clone())
                {
                    receipts.push(rc);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>(receipts)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut receipts = Vec::new();
    for c in clients {
        receipts.extend(c.await??);
    }
    let metrics = reqwest::get(format!("{}/metrics", p.url)).await?.text().await?;
    let failures = metric(&metrics, "div_settle_failures_total", "");
    assert!(failures >= 1.0, "the outage's failed rounds were not counted");
    // settlement resumes by itself
    let hash = permit.signing_hash(&permit_domain(31337, p.rig.chain.deployment.payment_stream));
    let total: U256 = receipts.iter().fold(U256::ZERO, |t, r| t + r.amount);
    let last = receipts.iter().map(|r| r.cumulative_requests).max().unwrap_or(0);
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, p.rig.provider()?);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st = ps.permitState(hash).call().await?;
        if st.settledRequests >= last {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "settlement never resumed: {} of {last} settled",
            st.settledRequests
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // every receipt is a distinct cumulative number, and the owner got exactly their sum
    let mut counts: Vec<u64> = receipts.iter().map(|r| r.cumulative_requests).collect();
    counts.sort_unstable();
    counts.dedup();
    assert_eq!(counts.len(), receipts.len(), "a cumulative number was issued twice");
    p.claim().await?;
    assert_eq!(p.usdc_of(owner).await? - before, total, "payout Δ = Σ receipts");
    let (latest, pending) = host_nonce(&p).await?;
    assert_eq!(latest, pending, "a transaction is stuck behind a nonce gap");
    let log = std::fs::read_to_string(p.rig.dir.join("serve.log"))?;
    let failed_lines = log.lines().filter(|l| l.contains("settlement failed")).count();
    eprintln!(
        "rpc outage: {} receipts, {failures} failed rounds, {failed_lines} log lines, settled {last} requests",
        receipts.len()
    );
    assert!(failed_lines < 30, "{failed_lines} failure lines for a 40 s outage");
    assert!(receipts.len() > 100, "paid traffic stopped during the outage: {} receipts", receipts.len());
    Ok(())
}

/// 15.3: the chain RPC goes silent (accepts, never answers). Callers the host knows are served
/// within their bounds; a new caller gets a fast 503; the outage is logged; when the RPC answers
/// again, the new caller is served.
pub async fn a_silent_rpc_stalls_no_paid_traffic(_shared: Arc<Shared>) -> anyhow::Result<()> {
    let (p, proxy) = behind_proxy(
        "rpc-silent",
        &["--chain-cache-ms", "500", "--rpc-timeout-ms", "1000", "--rate-limit", "1000"],
    )
    .await?;
    let (key, _, _) = user_key(&p, 2, p.id).await?;
    assert_eq!(p.embed(Some(&key), 1).await?.0, 200);
    // a second user, funded on chain but never seen by the host
    let v = 8usize;
    p.rig.chain.fund_deposit(v, U256::from(10_000_000u64)).await?;
    p.cli(v, &["buy", "--model-id", &format!("{:#x}", p.id), "--amount", "1", "--mint"])?;
    proxy.set(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let (s, b) = p.embed(Some(&key), 1).await?;
        if s != 200 {
            let log = std::fs::read_to_string(p.rig.dir.join("serve.log")).unwrap_or_default();
            anyhow::bail!("a known caller was refused during the outage: {b}\n{log}");
        }
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(slowest < Duration::from_secs(5), "a known caller waited {slowest:?}");
    let t = Instant::now();
    let permit = p.permit(v, PRICE * 10, now() + 600, p.key(HOST).address())?;
    let (s, b) = p.post_key(v, &permit, 31337, json!({})).await?;
    assert_eq!((s, code(&b)), (503, "chain_unavailable"), "{b}");
    assert!(t.elapsed() < Duration::from_secs(5), "a new caller waited {:?} for its 503", t.elapsed());
    let log = std::fs::read_to_string(p.rig.dir.join("serve.log"))?;
    assert!(log.contains("not answering"), "the outage was not logged");
    proxy.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let permit = p.permit(v, PRICE * 10, now() + 600, p.key(HOST).address())?;
        let (s, b) = p.post_key(v, &permit, 31337, json!({})).await?;
        if s == 201 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the new caller was never served after the outage: {b}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// 15.4 / 15.5: with 2 of 3 custodians down when the host starts, it listens at once, says the
/// model is loading (503 with Retry-After, /readyz with the reason), and when the custodians
/// come back it loads the model by itself.
pub async fn a_model_that_failed_to_load_heals_by_itself(_shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut rig = Rig::start("heal").await?;
    let pkg = rig.tiny_package("tiny-heal")?;
    rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    rig.stop_custodian(0);
    rig.stop_custodian(1);
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(rig.dir.join("serve-heal.log"))?;
    let started = Instant::now();
    let _host = Proc(
        div()
            .args(["serve", "--vault", "--no-meter", "--listen", &format!("127.0.0.1:{port}")])
            .env("DIV_HOST_KEY", hex_key(&rig.chain.keys[HOST]))
            .args(["--allow-owner", &rig.chain.keys[OWNER].address().to_string()])
            .args(["--custodian", &rig.urls.join(","), "--load-retry-ms", "500", "--vault-poll-ms", "200"])
            .arg("--store")
            .arg(rig.store())
            .arg("--addresses")
            .arg(&rig.book)
            .arg("--state-dir")
            .arg(rig.dir.join("state-heal"))
            .arg("--ort-dylib")
            .arg(div_tests::ort_dylib()?)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let http = reqwest::Client::new();
    loop {
        if http.get(format!("{url}/healthz")).send().await.is_ok() {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the host did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("heal: listening {:?} after start", started.elapsed());
    // the first attempt fails for want of shares: readiness says so, callers are told to retry
    let mut ready = Value::Null;
    for _ in 0..300 {
        let r = http.get(format!("{url}/readyz")).send().await?;
        assert_eq!(r.status().as_u16(), 503);
        ready = r.json().await?;
        if ready["models"][0]["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["models"][0]["state"], "failed", "{ready}");
    assert!(ready["models"][0]["error"].as_str().is_some_and(|e| e.contains("key shares")), "{ready}");
    let r = http
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": "tiny-heal", "input": "x"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let b: Value = r.json().await?;
    assert_eq!(code(&b), "model_loading", "{b}");
    let h: Value = http.get(format!("{url}/healthz")).send().await?.json().await?;
    assert_eq!(h["status"], "ok", "liveness is the process, not the models");
    // the custodians come back: no restart, the host heals
    rig.start_custodian(0).await?;
    rig.start_custodian(1).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, _) = crate::rig::embed(&url, "tiny-heal").await?;
        if s == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the model never loaded after the custodians came back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = http.get(format!("{url}/readyz")).send().await?;
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await?);
    Ok(())
}

/// 15.6: each failure names its real cause: a custodian with no known URL or refusing
/// connections (not "builder error"), a ciphertext header that fits no custodian's share (not
/// three honest custodians blamed), a custodian's damaged share file (logged by the custodian),
/// a stale request ("… s ago", not "from now").
pub async fn failures_name_their_real_cause(_shared: Arc<Shared>) -> anyhow::Result<()> {
    use div_custodian::{CustodianError, Endpoint, collect_key, request_share};
    let mut rig = Rig::start("causes").await?;
    let pkg = rig.tiny_package("tiny-causes")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    let eps = rig.endpoints().await?;
    let vault = div_chain::bindings::ModelVault::new(rig.chain.deployment.model_vault, rig.provider()?);
    let cid = vault.getModel(id).call().await?.cid;
    let ciphertext = std::fs::read(rig.store().join(&cid))?;
    let (header, _) = div_vault::Header::decode(&ciphertext)?;
    let http = reqwest::Client::new();
    let host = &rig.chain.keys[HOST].clone();
    // one custodian nobody can reach by URL, one down
    rig.stop_custodian(2);
    let endpoints =
        vec![eps[0].clone(), Endpoint { address: eps[1].address, url: String::new() }, eps[2].clone()];
    let err = collect_key(&http, &endpoints, &header, host, Duration::from_secs(3))
        .await
        .err()
        .context("no key expected")?;
    let text = err.to_string();
    assert!(!text.contains("builder error"), "{text}");
    assert!(text.contains("no URL known"), "{text}");
    assert!(
        text.contains("Connection refused")
            || text.contains("connection refused")
            || text.contains("error sending request"),
        "{text}"
    );
    rig.start_custodian(2).await?;
    // a header whose commitments are another dealing's: every honest share misfits it
    let fake = div_vault::shares::deal(&id.0, 2, 3)?;
    let bad_header =
        div_vault::Header::new(id.0, header.plaintext_len, header.chunk_size, fake.commitments.clone())?;
    let err = collect_key(&http, &eps, &bad_header, host, Duration::from_secs(3))
        .await
        .err()
        .context("a key from a bad header")?;
    assert!(matches!(err, CustodianError::HeaderMismatch { .. }), "the custodians were blamed: {err}");
    assert!(err.to_string().contains("no custodian is at fault"), "{err}");
    // custodian 0's share file damaged: it answers 500 and says why in its own log
    let share_file =
        rig.dir.join("custodian0").join("shares").join(format!("{}.json", alloy::hex::encode(id)));
    std::fs::write(&share_file, b"{ damaged")?;
    let eph = div_vault::SealKey::generate();
    let e =
        request_share(&http, &eps[0], id, host, &eph).await.err().context("a share from a damaged file")?;
    assert!(matches!(&e, CustodianError::Refused { status: 500, .. }), "{e}");
    let clog = std::fs::read_to_string(rig.dir.join("custodian0.log"))?;
    assert!(clog.contains("damaged"), "the custodian did not log its damaged share file: {clog}");
    // a request signed an hour ago
    use alloy::signers::SignerSync;
    use div_custodian::protocol::ReleaseRequest;
    let mut req = ReleaseRequest {
        requester: host.address(),
        ephemeral_key: alloy::hex::encode(eph.public()),
        issued_at: div_custodian::protocol::now() - 3600,
        nonce: "00112233445566778899aabbccddeeff".into(),
        signature: String::new(),
    };
    req.signature =
        alloy::hex::encode(host.sign_message_sync(req.message(id, eps[1].address).as_bytes())?.as_bytes());
    let r = http.post(format!("{}/v1/models/{id:#x}/release", eps[1].url)).json(&req).send().await?;
    let b: Value = r.json().await?;
    let msg = b["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("s ago") && !msg.contains("from now"), "{msg}");
    Ok(())
}
