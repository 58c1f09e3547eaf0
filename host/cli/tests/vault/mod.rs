//! The vault against real processes: a real anvil chain with the contracts, three `div custodian`
//! processes (t = 2), `div publish` as an owner runs it, and a host loading through the real
//! store, custodians and backend.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use alloy::providers::Provider;
use anyhow::Context;
use div_chain::bindings::ModelVault;
use div_custodian::{CustodianError, fetch_info, request_share};
use div_tests::TestHost;
use div_vault::SealKey;

use super::div;
use super::rig::{HOST, OWNER, Proc, Rig, embed, embeddings_wasm, free_port, hex_key, misbehave_wasm};

fn refusal_code(e: &CustodianError) -> String {
    match e {
        CustodianError::Refused { code, .. } => code.clone(),
        other => format!("not a refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn published_model_serves_with_a_custodian_down_and_a_lying_one_named() -> anyhow::Result<()> {
    let mut rig = Rig::start("vault-faults").await?;
    let host_addr = rig.chain.keys[HOST].address();
    let pkg = rig.tiny_package("tiny-vault")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[host_addr])?;
    let host = TestHost::start(Default::default()).await?;
    let sync = rig.sync(HOST, &host)?;

    // all up: loads and serves
    let (model, timings) = sync.load(id).await?;
    assert_eq!(model.manifest.name, "tiny-vault");
    assert!(
        matches!(&model.origin, div_models::Origin::Vault { model_id, .. } if *model_id == id.0),
        "{}",
        model.origin
    );
    assert!(timings.decrypt > Duration::ZERO);
    let (status, body) = embed(&host.url, "tiny-vault").await?;
    assert_eq!(status, 200, "{body}");

    // t − 1 = 1 custodian down: still loads, and the down one is named
    rig.stop_custodian(2);
    host.store.unload("tiny-vault");
    let (_, _) = sync.load(id).await?;
    assert_eq!(embed(&host.url, "tiny-vault").await?.0, 200);

    // custodian 1 now holds a wrong share (a valid-looking share of another dealing, deposited
    // by the owner with matching fake commitments): detected, named, and the load still works
    rig.start_custodian(2).await?;
    let eps = rig.endpoints().await?;
    let model_vault = ModelVault::new(rig.chain.deployment.model_vault, rig.provider()?);
    let name = model_vault.getModel(id).call().await?.name;
    let fake = div_vault::shares::deal(&id.0, 2, 3)?;
    let fake_header = div_vault::Header::new(id.0, 1, 4096, fake.commitments.clone())?;
    let http = reqwest::Client::new();
    let (_, key1) = fetch_info(&http, &eps[1].url).await?;
    div_custodian::deposit(
        &http,
        &eps[1],
        &key1,
        &rig.chain.keys[OWNER],
        &name,
        &fake.shares[1],
        &fake_header,
    )
    .await?;
    // make sure the liar answers: only it and one honest custodian are up
    rig.stop_custodian(0);
    let err = sync.load(id).await.err().context("one honest share must not be enough")?;
    let text = err.to_string();
    assert!(text.contains(&eps[1].address.to_string()) && text.contains("wrong share"), "{text}");
    rig.start_custodian(0).await?;
    host.store.unload("tiny-vault");
    let (_, _) = sync.load(id).await?;
    assert_eq!(embed(&host.url, "tiny-vault").await?.0, 200);

    // fewer than t reachable: a clear error and nothing loaded
    host.store.unload("tiny-vault");
    rig.stop_custodian(0);
    rig.stop_custodian(2);
    let err = sync.load(id).await.err().context("must fail with one custodian")?;
    assert!(err.to_string().contains("valid key shares of 2 needed"), "{err}");
    assert!(host.store.get("tiny-vault").is_none(), "nothing loaded");
    assert_eq!(embed(&host.url, "tiny-vault").await?.0, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn custodians_refuse_unauthorised_revoked_stale_and_replayed_requests() -> anyhow::Result<()> {
    let rig = Rig::start("vault-refusals").await?;
    let host_addr = rig.chain.keys[HOST].address();
    let pkg = rig.tiny_package("tiny-gated")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[host_addr])?;
    let eps = rig.endpoints().await?;
    let http = reqwest::Client::new();
    let eph = SealKey::generate();

    // a host nobody authorised: every custodian refuses, no share leaves
    let stranger = &rig.chain.keys[7];
    for ep in &eps {
        let e = request_share(&http, ep, id, stranger, &eph).await.err().context("stranger got a share")?;
        assert_eq!(refusal_code(&e), "host_not_authorized", "{e}");
    }
    let host = TestHost::start(Default::default()).await?;
    let err = rig.sync(7, &host)?.load(id).await.err().context("unauthorised host loaded the model")?;
    assert!(err.to_string().contains("0 valid key shares"), "{err}");

    // authorised by the owner but never registered: no host serves by surprise
    let owner = rig.chain.client(OWNER).await?;
    owner.authorize_host(&rig.chain.deployment, id, stranger.address()).await?;
    for ep in &eps {
        let e = request_share(&http, ep, id, stranger, &eph)
            .await
            .err()
            .context("unregistered host got a share")?;
        assert_eq!(refusal_code(&e), "host_not_authorized", "{e}");
    }
    // once it publishes where it serves, the authorisation takes effect
    rig.chain.register_host(7).await?;
    for ep in &eps {
        request_share(&http, ep, id, stranger, &eph).await?;
    }
    owner.revoke_host(&rig.chain.deployment, id, stranger.address()).await?;

    // the owner can always recover its key; the authorised host gets shares
    for ep in &eps {
        request_share(&http, ep, id, &rig.chain.keys[OWNER], &eph).await?;
        request_share(&http, ep, id, &rig.chain.keys[HOST], &eph).await?;
    }

    // a replayed request (same signature, same nonce) and a stale one are refused
    use alloy::signers::SignerSync;
    use div_custodian::protocol::{ReleaseRequest, now};
    let sign = |issued_at: u64, nonce: &str| -> anyhow::Result<ReleaseRequest> {
        let mut req = ReleaseRequest {
            requester: host_addr,
            ephemeral_key: alloy::hex::encode(eph.public()),
            issued_at,
            nonce: nonce.into(),
            signature: String::new(),
        };
        let sig = rig.chain.keys[HOST].sign_message_sync(req.message(id, eps[0].address).as_bytes())?;
        req.signature = alloy::hex::encode(sig.as_bytes());
        Ok(req)
    };
    let post = |req: ReleaseRequest| {
        let http = http.clone();
        let url = format!("{}/v1/models/{id:#x}/release", eps[0].url);
        async move {
            let r = http.post(url).json(&req).send().await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.json::<serde_json::Value>().await?))
        }
    };
    let fresh = sign(now(), "00112233445566778899aabbccddeeff")?;
    assert_eq!(post(fresh.clone()).await?.0, 200);
    let (status, body) = post(fresh).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("replayed_request")), "{body}");
    let (status, body) = post(sign(now() - 3600, "ffeeddccbbaa99887766554433221100")?).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("stale_request")), "{body}");
    let mut forged = sign(now(), "0102030405060708090a0b0c0d0e0f10")?;
    forged.requester = rig.chain.keys[OWNER].address();
    let (status, body) = post(forged).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("bad_signature")), "{body}");

    // revoked: refused from the next request on, and a following host unloads the model
    let sync = Arc::new(rig.sync(HOST, &host)?);
    sync.load(id).await?;
    assert_eq!(embed(&host.url, "tiny-gated").await?.0, 200);
    let from = rig.provider()?.get_block_number().await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follower = {
        let sync = sync.clone();
        tokio::spawn(async move {
            sync.follow(from, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    owner.revoke_host(&rig.chain.deployment, id, host_addr).await?;
    for ep in &eps {
        let e = request_share(&http, ep, id, &rig.chain.keys[HOST], &eph)
            .await
            .err()
            .context("revoked host got a share")?;
        assert_eq!(refusal_code(&e), "host_not_authorized", "{e}");
    }
    let mut unloaded = false;
    for _ in 0..50 {
        if host.store.get("tiny-gated").is_none() {
            unloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unloaded, "the host kept serving a model it was revoked from");
    assert_eq!(embed(&host.url, "tiny-gated").await?.0, 404);
    // authorised again: the follower loads it back
    owner.authorize_host(&rig.chain.deployment, id, host_addr).await?;
    let mut back = false;
    for _ in 0..100 {
        if host.store.get("tiny-gated").is_some() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "re-authorised model was not loaded again");
    let _ = stop_tx.send(());
    follower.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_resumes_after_a_failure_and_never_registers_without_shares() -> anyhow::Result<()> {
    let mut rig = Rig::start("vault-resume").await?;
    let pkg = rig.tiny_package("tiny-resume")?;
    let owner = rig.chain.keys[OWNER].address();
    let id = div_custodian::protocol::model_id(owner, "tiny-resume");
    // custodian 2 is down at publish time: the first two shares go out, then it stops
    rig.stop_custodian(2);
    let out = rig.publish(&pkg, &misbehave_wasm(), &[])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("asking custodian") || err.contains("delivering share 3"), "{err}");
    let vault = ModelVault::new(rig.chain.deployment.model_vault, rig.provider()?);
    assert!(vault.getModel(id).call().await.is_err(), "registered without every share delivered");

    // with all three up it goes through; run once more with one down after delivery: resumes
    rig.start_custodian(2).await?;
    let first = rig.publish_ok(&pkg, &misbehave_wasm(), &[])?;
    assert_eq!(first, id);
    let m = vault.getModel(id).call().await?;
    assert_eq!(m.threshold, 2);
    assert_eq!(m.custodians.len(), 3);
    let out = rig.publish(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("resuming") && stdout.contains("already registered"),
        "{stdout}"
    );
    assert!(vault.isHostAuthorized(id, rig.chain.keys[HOST].address()).call().await?);
    // the CID on chain is what `div cid` and the store say
    let stored = rig.store().join(&m.cid);
    let printed = div().arg("cid").arg(&stored).output()?;
    assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), m.cid);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_ciphertext_is_refused_before_the_backend() -> anyhow::Result<()> {
    let rig = Rig::start("vault-tamper").await?;
    let host_addr = rig.chain.keys[HOST].address();
    let pkg = rig.tiny_package("tiny-tamper")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[host_addr])?;
    let vault = ModelVault::new(rig.chain.deployment.model_vault, rig.provider()?);
    let cid = vault.getModel(id).call().await?.cid;
    let path = rig.store().join(&cid);
    let original = std::fs::read(&path)?;
    let host = TestHost::start(Default::default()).await?;
    let sync = rig.sync(HOST, &host)?;
    let mut flipped = original.clone();
    let at = original.len() - 20;
    flipped[at] ^= 0x04;
    for (what, bytes) in [("flipped bit", flipped), ("truncated", original[..original.len() - 16].to_vec())] {
        std::fs::write(&path, &bytes)?;
        let err = sync.load(id).await.err().with_context(|| format!("{what} loaded"))?;
        assert!(err.to_string().contains("refused"), "{what}: {err}");
        assert!(host.store.get("tiny-tamper").is_none(), "{what}: something was loaded");
    }
    std::fs::write(&path, &original)?;
    sync.load(id).await?;
    Ok(())
}

/// Every file the custodians, the store and a `div serve --vault` process wrote during a serve,
/// searched for the model's weight bytes: none may hold them. On the way, the same process shows
/// that sharing backend runs (the sample manifest turns batching on) leaks nothing between callers.
#[tokio::test(flavor = "multi_thread")]
async fn no_plaintext_weights_reach_the_disk() -> anyhow::Result<()> {
    let rig = Rig::start("vault-disk").await?;
    let host_key = &rig.chain.keys[HOST];
    let id = rig.publish_ok(&div_tests::minilm_dir(), &embeddings_wasm(), &[host_key.address()])?;
    let port = free_port()?;
    let work = rig.dir.join("host");
    std::fs::create_dir_all(&work)?;
    let log = std::fs::File::create(work.join("serve.log"))?;
    let _serve = Proc(
        div()
            .args([
                "serve",
                "--vault",
                "--no-meter",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--allow-owner",
                &rig.chain.keys[OWNER].address().to_string(),
            ])
            .env("DIV_HOST_KEY", hex_key(host_key))
            .args(["--custodian", &rig.urls.join(",")])
            .arg("--store")
            .arg(rig.store())
            .arg("--addresses")
            .arg(&rig.book)
            .arg("--ort-dylib")
            .arg(div_tests::ort_dylib()?)
            .arg("--cache-dir")
            .arg(work.join("cache"))
            .current_dir(&work)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    let url = format!("http://127.0.0.1:{port}");
    let mut served = None;
    for _ in 0..600 {
        if let Ok((200, body)) = embed(&url, "all-minilm-l6-v2").await {
            served = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = served.with_context(|| {
        format!(
            "the host never served: {}",
            std::fs::read_to_string(work.join("serve.log")).unwrap_or_default()
        )
    })?;
    assert_eq!(body["data"][0]["embedding"].as_array().map(Vec::len), Some(384));
    let metrics = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    assert!(metrics.contains("div_requests_total"), "{metrics}");
    // the host published itself on chain: its URL and the model it serves, so the dApp lists it
    let vault = ModelVault::new(rig.chain.deployment.model_vault, rig.provider()?);
    let mut published = false;
    for _ in 0..100 {
        let r = vault.hostRecord(host_key.address()).call().await?;
        if r.url == url && r.models.contains(&id) {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(published, "the host did not publish {url} serving {id:#x}");
    assert!(vault.isHostServing(id, host_key.address()).call().await?);
    batch_mates_cannot_change_an_answer(&url).await?;

    // 64-byte windows of the weights at spread offsets
    let weights = std::fs::read(div_tests::minilm_dir().join("model.onnx"))?;
    let probes: Vec<memchr::memmem::Finder> =
        (1..16).map(|k| memchr::memmem::Finder::new(&weights[k * weights.len() / 17..][..64])).collect();
    let mut checked = 0;
    let mut stack = vec![rig.dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p)?;
            for probe in &probes {
                assert!(probe.find(&bytes).is_none(), "{} holds plaintext weight bytes", p.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} files checked");
    Ok(())
}

/// A caller's answer beside another caller's flood of maximum-length inputs (the host stacks
/// them into shared ONNX runs, padded to the longest) is the answer it gets alone.
async fn batch_mates_cannot_change_an_answer(url: &str) -> anyhow::Result<()> {
    let embed_text = |input: String| {
        let url = url.to_string();
        async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/embeddings"))
                .json(&serde_json::json!({"model": "all-minilm-l6-v2", "input": input}))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
            let v: serde_json::Value = r.json().await?;
            Ok::<Vec<f32>, anyhow::Error>(serde_json::from_value(v["data"][0]["embedding"].clone())?)
        }
    };
    let probe = "The vault keeps the weights; a host sees them only in memory.".to_string();
    let alone = embed_text(probe.clone()).await?;
    let runs = |m: &str, what: &str| {
        div_tests::metric(m, &format!("div_backend_batch_requests_{what}"), "all-minilm-l6-v2")
    };
    let before = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let mut tasks = Vec::new();
    for i in 0..32 {
        // another caller: inputs cut at the model's 256 tokens, each different
        tasks.push((false, tokio::spawn(embed_text(format!("{i} {}", "overflowing words ".repeat(300))))));
        if i % 2 == 0 {
            tasks.push((true, tokio::spawn(embed_text(probe.clone()))));
        }
    }
    for (is_probe, t) in tasks {
        let v = t.await??;
        if is_probe {
            let c = div_tests::cosine(&v, &alone);
            assert!(c >= 0.99999, "the probe's answer changed beside a flood: cosine {c}");
        }
    }
    let after = reqwest::get(format!("{url}/metrics")).await?.text().await?;
    let (served, made) =
        (runs(&after, "sum") - runs(&before, "sum"), runs(&after, "count") - runs(&before, "count"));
    assert_eq!(served, 48.0, "every request went through the batch queue");
    assert!(made < served, "48 concurrent requests never shared a run ({made} runs)");
    Ok(())
}

/// Our content ids against Debian's `ipfs_cid` (an independent implementation of `ipfs add`'s
/// importer) for sizes from empty to a three-level DAG.
#[test]
fn content_ids_match_ipfs_add() -> anyhow::Result<()> {
    let dir = super::scratch("cids");
    std::fs::create_dir_all(&dir)?;
    let chunk = 262_144usize;
    for size in [0, 1, 1000, chunk - 1, chunk, chunk + 1, 5 * chunk + 7, 174 * chunk + 1] {
        let path = dir.join(format!("f{size}"));
        let bytes: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &bytes)?;
        let theirs =
            Command::new("ipfs_cid").arg(&path).output().context("ipfs_cid (make bootstrap installs it)")?;
        anyhow::ensure!(theirs.status.success(), "ipfs_cid failed on {size} bytes");
        let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout)?;
        let v1 = div().arg("cid").arg(&path).output()?;
        let v0 = div().args(["cid", "--v0"]).arg(&path).output()?;
        assert_eq!(String::from_utf8_lossy(&v1.stdout).trim(), theirs["CIDv1"], "CIDv1 of {size} bytes");
        assert_eq!(String::from_utf8_lossy(&v0.stdout).trim(), theirs["CIDv0"], "CIDv0 of {size} bytes");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
