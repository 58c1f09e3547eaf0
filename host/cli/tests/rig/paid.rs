//! A rig with a paid model and a metering `div serve --vault` process, and what a user does
//! against it (fund, sign permits with proof, call, settle). Shared by the payment flows and the
//! hostile runs.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use div_chain::bindings::{DevStablecoin, PaymentStream};
use div_chain::{SpendingPermit, permit_domain, sign_permit};
use div_meter::Receipt;
use serde_json::{Value, json};

use super::{HOST, OWNER, Proc, Rig, chat_wasm, free_port, hex_key, misbehave_wasm};
use crate::div;

/// The price `div publish` sets by default: 0.001 USDC.
pub const PRICE: u64 = 1000;

/// A rig with a paid model and a metering host process.
pub struct Paid {
    pub rig: Rig,
    pub id: B256,
    pub url: String,
    pub port: u16,
    pub state: PathBuf,
    pub host: Option<Proc>,
    /// The address book the host reads (the rig's, or one pointing at a proxy).
    pub book: PathBuf,
}

impl Paid {
    pub async fn start(name: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let rig = Rig::start(name).await?;
        let pkg = rig.tiny_package("tiny-paid")?;
        let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
        Self::serve(rig, id, extra).await
    }

    /// The chat model (SmolLM2-135M-Instruct) with the chat plugin, priced per request and per
    /// 1000 tokens.
    pub async fn start_chat(name: &str) -> anyhow::Result<Self> {
        let rig = Rig::start(name).await?;
        let id = rig.publish_ok_with(
            &div_tests::chat_dir(),
            &chat_wasm(),
            &[rig.chain.keys[HOST].address()],
            &["--price", "0.0005", "--price-per-1k-tokens", "0.002"],
        )?;
        Self::serve(rig, id, &[]).await
    }

    pub async fn serve(rig: Rig, id: B256, extra: &[&str]) -> anyhow::Result<Self> {
        let book = rig.book.clone();
        Self::serve_with_book(rig, id, book, extra).await
    }

    /// [`Paid::serve`] with the host reading `book` (say, one whose RPC URL is a proxy).
    pub async fn serve_with_book(rig: Rig, id: B256, book: PathBuf, extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let state = rig.dir.join("host-state");
        let mut paid =
            Self { url: format!("http://127.0.0.1:{port}"), rig, id, port, state, host: None, book };
        paid.start_host(extra).await?;
        Ok(paid)
    }

    pub async fn start_host(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        let (port, state) = (self.port, self.state.clone());
        self.host = Some(self.spawn_host(port, &state, "serve.log", extra).await?);
        Ok(())
    }

    /// Starts a `div serve --vault` process of this host (its key) on `port` with its state in
    /// `state`, logging to `log` in the rig's folder; returns once it serves the model.
    pub async fn spawn_host(
        &self,
        port: u16,
        state: &std::path::Path,
        log: &str,
        extra: &[&str],
    ) -> anyhow::Result<Proc> {
        let log_path = self.rig.dir.join(log);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = div()
            .args(["serve", "--vault", "--listen", &format!("127.0.0.1:{port}")])
            .env("DIV_HOST_KEY", hex_key(&self.rig.chain.keys[HOST]))
            .args(["--custodian", &self.rig.urls.join(",")])
            .args(["--allow-owner", &self.rig.chain.keys[OWNER].address().to_string()])
            .arg("--store")
            .arg(self.rig.store())
            .arg("--addresses")
            .arg(&self.book)
            .arg("--state-dir")
            .arg(state)
            .arg("--ort-dylib")
            .arg(div_tests::ort_dylib()?)
            .args(if extra.contains(&"--settle-interval-secs") {
                &[][..]
            } else {
                &["--settle-interval-secs", "900"][..]
            })
            .args(["--vault-poll-ms", "200"])
            .args(if extra.contains(&"--chain-cache-ms") {
                &[][..]
            } else {
                &["--chain-cache-ms", "200"][..]
            })
            .args(extra)
            .current_dir(&self.rig.dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        let proc = Proc(child);
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/v1/models")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["data"].as_array().is_some_and(|d| !d.is_empty())
            {
                return Ok(proc);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!(
            "the host did not serve the model: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    }

    /// Signs in with Ethereum as account `who`; returns the session token.
    pub async fn sign_in(&self, who: usize) -> anyhow::Result<String> {
        use alloy::signers::SignerSync;
        let http = reqwest::Client::new();
        let key = self.key(who).clone();
        let nonce: Value = http.get(format!("{}/v1/siwe/nonce", self.url)).send().await?.json().await?;
        let msg = siwe_message(
            &format!("127.0.0.1:{}", self.port),
            &self.url,
            key.address(),
            nonce["nonce"].as_str().unwrap_or_default(),
        );
        let sig = alloy::hex::encode(key.sign_message_sync(msg.as_bytes())?.as_bytes());
        let r = http
            .post(format!("{}/v1/siwe", self.url))
            .json(&json!({"message": msg, "signature": sig}))
            .send()
            .await?;
        let (s, v) = (r.status().as_u16(), r.json::<Value>().await?);
        anyhow::ensure!(s == 200, "sign-in refused: {v}");
        Ok(v["token"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until `GET /readyz` says every model is loaded.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let mut last = Value::Null;
        for _ in 0..1500 {
            if let Ok(r) = http.get(format!("{}/readyz", self.url)).send().await {
                let ok = r.status().is_success();
                last = r.json().await.unwrap_or_default();
                if ok {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("the host never got ready: {last}")
    }

    /// The host process's id.
    pub fn pid(&self) -> Option<u32> {
        self.host.as_ref().map(|h| h.0.id())
    }

    pub fn key(&self, i: usize) -> &PrivateKeySigner {
        &self.rig.chain.keys[i]
    }

    pub fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = div()
            .args(args)
            .arg("--private-key")
            .arg(hex_key(self.key(i)))
            .arg("--addresses")
            .arg(&self.rig.book)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "div {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// Funds user `i` with `deposit` base units and, if `tokens`, one access token.
    pub async fn fund(&self, i: usize, deposit: u64, tokens: bool) -> anyhow::Result<()> {
        self.rig.chain.fund_deposit(i, U256::from(deposit)).await?;
        if tokens {
            self.cli(i, &["buy", "--model-id", &format!("{:#x}", self.id), "--amount", "1", "--mint"])?;
        }
        Ok(())
    }

    pub fn permit(
        &self,
        user: usize,
        max: u64,
        expiry: u64,
        host: Address,
    ) -> anyhow::Result<SpendingPermit> {
        Ok(SpendingPermit {
            user: self.key(user).address(),
            modelId: self.id,
            host,
            token: self.rig.chain.usdc()?,
            maxAmount: U256::from(max),
            expiry,
            nonce: U256::from(rand_nonce()),
        })
    }

    /// Signs `permit` for `chain_id` and posts it to `/v1/keys` with `extra` fields, proving
    /// control of `user` with a signed challenge (unless `extra` sets `proof` itself).
    pub async fn post_key(
        &self,
        user: usize,
        permit: &SpendingPermit,
        chain_id: u64,
        extra: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let domain = permit_domain(chain_id, self.rig.chain.deployment.payment_stream);
        let sig = sign_permit(self.key(user), permit, &domain).await?;
        let proof = self.proof(user, permit.signing_hash(&domain)).await?;
        let mut body = json!({
            "permit": permit_json(permit),
            "signature": sig,
            "proof": proof,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let r = reqwest::Client::new().post(format!("{}/v1/keys", self.url)).json(&body).send().await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    /// `user`'s proof of control for the permit `hash`: a signed challenge of this host.
    pub async fn proof(&self, user: usize, hash: B256) -> anyhow::Result<Value> {
        use alloy::signers::SignerSync;
        let c: Value = reqwest::get(format!("{}/v1/keys/challenge", self.url)).await?.json().await?;
        let nonce = c["challenge"].as_str().context("no challenge")?.to_string();
        let msg = div_meter::key_proof_message(self.key(HOST).address(), hash, &nonce);
        let sig = self.key(user).sign_message_sync(msg.as_bytes())?;
        Ok(json!({"challenge": nonce, "signature": format!("0x{}", alloy::hex::encode(sig.as_bytes()))}))
    }

    pub async fn key_for(&self, user: usize, max: u64) -> anyhow::Result<String> {
        let p = self.permit(user, max, now() + 3600, self.key(HOST).address())?;
        let (s, v) = self.post_key(user, &p, 31337, json!({})).await?;
        anyhow::ensure!(s == 201, "key refused: {v}");
        Ok(v["key"].as_str().context("no key")?.to_string())
    }

    pub async fn embed(&self, key: Option<&str>, inputs: usize) -> anyhow::Result<(u16, Value)> {
        let input: Vec<String> = (0..inputs).map(|i| format!("sentence {i}")).collect();
        let mut req = reqwest::Client::new()
            .post(format!("{}/v1/embeddings", self.url))
            .json(&json!({"model": "tiny-paid", "input": input}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await?;
        Ok((r.status().as_u16(), r.json().await?))
    }

    pub async fn settle(&self) -> anyhow::Result<String> {
        let out = div()
            .args(["settle", "--now", "--url", &self.url])
            .arg("--state-dir")
            .arg(&self.state)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "div settle: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// Runs `div claim` with the owner's key: every credit of the owner's models is paid out.
    pub async fn claim(&self) -> anyhow::Result<String> {
        self.cli(OWNER, &["claim"])
    }

    /// What settlement credited to the model and nobody claimed yet (USDC base units).
    pub async fn claimable(&self) -> anyhow::Result<U256> {
        let ps = PaymentStream::new(self.rig.chain.deployment.payment_stream, self.rig.provider()?);
        Ok(ps.claimable(self.id, self.rig.chain.usdc()?).call().await?)
    }

    pub async fn usdc_of(&self, who: Address) -> anyhow::Result<U256> {
        Ok(DevStablecoin::new(self.rig.chain.usdc()?, self.rig.provider()?).balanceOf(who).call().await?)
    }

    pub async fn deposit_of(&self, who: Address) -> anyhow::Result<U256> {
        let ps = PaymentStream::new(self.rig.chain.deployment.payment_stream, self.rig.provider()?);
        Ok(ps.getBalance(who, self.rig.chain.usdc()?).call().await?)
    }
}

/// An EIP-4361 message for `domain`, as the dApp writes one.
pub fn siwe_message(domain: &str, url: &str, who: Address, nonce: &str) -> String {
    let issued = {
        let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
    };
    format!(
        "{domain} wants you to sign in with your Ethereum account:\n{who}\n\nSign in to DIV.\n\n\
         URI: {url}\nVersion: 1\nChain ID: 31337\nNonce: {nonce}\nIssued At: {issued}"
    )
}

/// A permit as `/v1/keys` takes it.
pub fn permit_json(permit: &SpendingPermit) -> Value {
    json!({
        "user": permit.user, "modelId": permit.modelId, "host": permit.host, "token": permit.token,
        "maxAmount": permit.maxAmount.to_string(), "expiry": permit.expiry, "nonce": permit.nonce.to_string(),
    })
}

/// Reads an SSE stream to its end: the text, the last `usage` and the `receipt`.
pub async fn read_stream(r: reqwest::Response) -> anyhow::Result<(String, Value, Receipt)> {
    let body = r.text().await?;
    let (mut text, mut usage, mut receipt) = (String::new(), Value::Null, None);
    for data in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        if !v["receipt"].is_null() {
            receipt = Some(serde_json::from_value(v["receipt"].clone())?);
        }
    }
    Ok((text, usage, receipt.with_context(|| format!("no receipt in the stream: {body}"))?))
}

/// USDC base units of a request: 0.0005 + 0.002 per 1000 tokens, rounded up.
pub fn chat_price(tokens: u64) -> u64 {
    500 + (2000 * tokens).div_ceil(1000)
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn rand_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("-")
}

/// Receipts by permit, each permit's in number order, and their total: asserts that every
/// permit's cumulative numbers are 1..n, none issued twice or lost, and that its amounts add up
/// to its last cumulative amount.
pub fn numbered(receipts: &[Receipt]) -> (std::collections::BTreeMap<B256, Vec<&Receipt>>, U256) {
    let mut by_permit: std::collections::BTreeMap<B256, Vec<&Receipt>> = Default::default();
    for r in receipts {
        by_permit.entry(r.permit_hash).or_default().push(r);
    }
    let mut total = U256::ZERO;
    for (hash, rs) in by_permit.iter_mut() {
        rs.sort_by_key(|r| r.cumulative_requests);
        let counts: Vec<u64> = rs.iter().map(|r| r.cumulative_requests).collect();
        assert_eq!(
            counts,
            (1..=rs.len() as u64).collect::<Vec<_>>(),
            "permit {hash}: a number issued twice or lost"
        );
        let sum = rs.iter().fold(U256::ZERO, |t, r| t + r.amount);
        assert_eq!(rs.last().map(|r| r.cumulative_amount), Some(sum), "permit {hash}: amounts");
        total += sum;
    }
    (by_permit, total)
}
