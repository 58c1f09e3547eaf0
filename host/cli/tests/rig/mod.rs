//! Real processes for the whole-flow tests: anvil with the contracts, three `div custodian`s,
//! `div publish` and `div serve`, each in a scratch folder removed afterwards.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use div_custodian::{Endpoint, fetch_info};
use div_sync::{SyncConfig, VaultSync};
use div_tests::{LocalChain, TestHost, workspace_root};
use div_vault::Store;

use super::div;

pub mod paid;

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn hex_key(k: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(k.to_bytes()))
}

/// Anvil + contracts + three custodians, in a scratch folder.
pub struct Rig {
    pub chain: LocalChain,
    pub dir: PathBuf,
    pub book: PathBuf,
    pub urls: Vec<String>,
    custodians: Vec<Option<Proc>>,
}

pub const OWNER: usize = 1;
pub const HOST: usize = 3;
pub const CUSTODIAN_KEYS: [usize; 3] = [4, 5, 6];

impl Rig {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let chain = LocalChain::start().await?;
        let dir = super::scratch(name);
        std::fs::create_dir_all(&dir)?;
        let book = dir.join("addresses.json");
        chain.deployment.save(&book)?;
        let mut rig = Self { chain, dir, book, urls: Vec::new(), custodians: Vec::new() };
        for _ in 0..3 {
            let url = format!("http://127.0.0.1:{}", free_port()?);
            rig.urls.push(url);
            rig.custodians.push(None);
        }
        for i in 0..3 {
            rig.start_custodian(i).await?;
        }
        // the host publishes itself (as `div serve --vault` does on start) for the tests that
        // drive its vault sync in-process
        rig.chain.register_host(HOST).await?;
        Ok(rig)
    }

    pub async fn start_custodian(&mut self, i: usize) -> anyhow::Result<()> {
        let listen = self.urls[i].trim_start_matches("http://").to_string();
        let log = std::fs::File::create(self.dir.join(format!("custodian{i}.log")))?;
        let child = div()
            .args(["custodian", "--listen", &listen])
            .env("DIV_CUSTODIAN_KEY", hex_key(&self.chain.keys[CUSTODIAN_KEYS[i]]))
            .arg("--data-dir")
            .arg(self.dir.join(format!("custodian{i}")))
            .arg("--addresses")
            .arg(&self.book)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.custodians[i] = Some(Proc(child));
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http.get(format!("{}/healthz", self.urls[i])).send().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("custodian {i} did not come up")
    }

    pub fn stop_custodian(&mut self, i: usize) {
        self.custodians[i] = None;
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// A package folder of the tiny echo graph named `name` (plugin: the misbehaving test plugin
    /// in its correct `echo` mode).
    pub fn tiny_package(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.tiny_package_with(name, serde_json::json!({"extra": {"mode": "echo"}}), false)
    }

    /// [`Rig::tiny_package`] with manifest fields replaced by `set` (`extra`, `limits`, `task`),
    /// and MiniLM's `tokenizer.json` in the package when `tokenizer` is set.
    pub fn tiny_package_with(
        &self,
        name: &str,
        set: serde_json::Value,
        tokenizer: bool,
    ) -> anyhow::Result<PathBuf> {
        use sha2::Digest;
        let src = workspace_root().join("build/models/tiny-echo");
        let dst = self.dir.join(format!("pkg-{name}"));
        std::fs::create_dir_all(&dst)?;
        std::fs::copy(src.join("model.onnx"), dst.join("model.onnx"))?;
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("manifest.json"))?)?;
        manifest["name"] = name.into();
        manifest["extra"] = serde_json::json!({"mode": "echo"});
        if let (Some(m), Some(fields)) = (manifest.as_object_mut(), set.as_object()) {
            m.extend(fields.clone());
        }
        if tokenizer {
            let bytes = std::fs::read(div_tests::minilm_dir().join("tokenizer.json"))?;
            std::fs::write(dst.join("tokenizer.json"), &bytes)?;
            let entry = serde_json::json!({
                "name": "tokenizer.json", "size": bytes.len(), "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
            });
            if let Some(files) = manifest["files"].as_array_mut() {
                files.push(entry);
            }
        }
        std::fs::write(dst.join("manifest.json"), manifest.to_string())?;
        Ok(dst)
    }

    /// A copy of the chat model's package named `name` with `extra` merged into its manifest's.
    pub fn chat_package(&self, name: &str, extra: serde_json::Value) -> anyhow::Result<PathBuf> {
        let src = div_tests::chat_dir();
        let dst = self.dir.join(format!("pkg-{name}"));
        std::fs::create_dir_all(&dst)?;
        std::fs::copy(src.join("model.gguf"), dst.join("model.gguf"))?;
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("manifest.json"))?)?;
        manifest["name"] = name.into();
        if let (Some(m), Some(more)) = (manifest["extra"].as_object_mut(), extra.as_object()) {
            m.extend(more.clone());
        }
        std::fs::write(dst.join("manifest.json"), manifest.to_string())?;
        Ok(dst)
    }

    pub fn publish(
        &self,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
    ) -> anyhow::Result<std::process::Output> {
        self.publish_with(pkg, plugin, hosts, &[])
    }

    /// [`Rig::publish`] with more `div publish` arguments (prices, say).
    pub fn publish_with(
        &self,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
        extra: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        self.publish_as(OWNER, pkg, plugin, hosts, extra)
    }

    /// [`Rig::publish_with`] as the owner with anvil key `owner`.
    pub fn publish_as(
        &self,
        owner: usize,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
        extra: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        self.publish_on(&self.book, owner, pkg, plugin, hosts, extra)
    }

    /// [`Rig::publish_as`] onto the deployment of address book `book` (another chain: the same
    /// work folder, so the same ciphertext and custodians, registered there too).
    pub fn publish_on(
        &self,
        book: &Path,
        owner: usize,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
        extra: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let mut cmd = div();
        cmd.arg("publish").arg(pkg).arg("--plugin").arg(plugin).arg("--quiet").args(extra);
        for u in &self.urls {
            cmd.args(["--custodian", u]);
        }
        for h in hosts {
            cmd.args(["--authorize", &h.to_string()]);
        }
        cmd.args(["--threshold", "2", "--private-key", &hex_key(&self.chain.keys[owner])])
            .arg("--store")
            .arg(self.store())
            .arg("--addresses")
            .arg(book)
            .arg("--work-dir")
            .arg(
                self.dir.join(format!(
                    "publish-{owner}-{}",
                    pkg.file_name().and_then(|n| n.to_str()).unwrap_or("x")
                )),
            )
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        Ok(cmd.output()?)
    }

    pub fn publish_ok(&self, pkg: &Path, plugin: &Path, hosts: &[Address]) -> anyhow::Result<B256> {
        self.publish_ok_with(pkg, plugin, hosts, &[])
    }

    /// [`Rig::publish_ok`] with more `div publish` arguments.
    pub fn publish_ok_with(
        &self,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
        extra: &[&str],
    ) -> anyhow::Result<B256> {
        self.publish_ok_as(OWNER, pkg, plugin, hosts, extra)
    }

    /// [`Rig::publish_ok_with`] as the owner with anvil key `owner`.
    pub fn publish_ok_as(
        &self,
        owner: usize,
        pkg: &Path,
        plugin: &Path,
        hosts: &[Address],
        extra: &[&str],
    ) -> anyhow::Result<B256> {
        let out = self.publish_as(owner, pkg, plugin, hosts, extra)?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "div publish failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = stdout
            .lines()
            .find_map(|l| l.strip_prefix("published ").and_then(|r| r.split(" as ").nth(1)))
            .context("no model id printed")?;
        Ok(id.trim().parse()?)
    }

    pub fn provider(&self) -> anyhow::Result<alloy::providers::DynProvider> {
        Ok(ProviderBuilder::new().connect_http(self.chain.rpc_url.parse()?).erased())
    }

    pub fn sync(&self, host_key: usize, host: &TestHost) -> anyhow::Result<VaultSync> {
        Ok(VaultSync::new(
            SyncConfig {
                provider: self.provider()?,
                model_vault: self.chain.deployment.model_vault,
                store: Store::Local(self.store()),
                custodians: self.urls.clone(),
                signer: self.chain.keys[host_key].clone(),
                share_timeout: Duration::from_secs(3),
                poll: Duration::from_millis(100),
                on_custodian_failure: None,
                allow: div_sync::Allow {
                    owners: vec![self.chain.keys[OWNER].address()],
                    ..Default::default()
                },
                retry_base: Duration::from_millis(500),
            },
            host.store.clone(),
        ))
    }

    pub async fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        let http = reqwest::Client::new();
        let mut v = Vec::new();
        for u in &self.urls {
            let (address, _) = fetch_info(&http, u).await?;
            v.push(Endpoint { address, url: u.clone() });
        }
        Ok(v)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.custodians.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn misbehave_wasm() -> PathBuf {
    workspace_root().join("tests/plugins/target/wasm32-wasip2/release/div_misbehave.wasm")
}

pub fn chat_wasm() -> PathBuf {
    workspace_root().join("plugins/target/wasm32-wasip2/release/div_chat.wasm")
}

pub fn embeddings_wasm() -> PathBuf {
    workspace_root().join("plugins/target/wasm32-wasip2/release/div_embeddings.wasm")
}

pub async fn embed(url: &str, model: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .json(&serde_json::json!({"model": model, "input": "hello vault"}))
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}
