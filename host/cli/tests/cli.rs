//! The `div` binary as a user runs it, against a real anvil chain.

use std::path::PathBuf;
use std::process::Command;

use alloy::primitives::Address;
use alloy::providers::{Provider, ProviderBuilder};
use div_chain::Deployment;
use div_chain::bindings::{DaoTimelock, ModelVault, PaymentStream};
use div_tests::{LocalChain, anvil_bin};

mod chains;
mod dao;
mod payments;
mod replicas;
mod rig;
mod traces;
mod vault;

fn div() -> Command {
    Command::new(env!("CARGO_BIN_EXE_div"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("div-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn deploy_writes_an_address_book_that_points_at_live_contracts() -> anyhow::Result<()> {
    let chain = LocalChain::start().await?;
    let dir = scratch("deploy");
    let key = format!("0x{}", alloy::hex::encode(chain.keys[9].to_bytes()));
    let out = div()
        .args(["deploy", "--rpc-url", &chain.rpc_url, "--out"])
        .arg(dir.join("addresses.json"))
        .arg("--env-file")
        .arg(dir.join("demo.env"))
        .env("DIV_PRIVATE_KEY", &key)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "div deploy failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let d = Deployment::load(&dir.join("addresses.json"))?;
    assert!(stdout.contains(&d.payment_stream.to_string()), "prints the addresses: {stdout}");
    assert_eq!(d.governance, chain.keys[9].address());
    let provider = ProviderBuilder::new().connect_http(chain.rpc_url.parse()?);
    for a in [d.model_vault, d.payment_stream, d.access_token_implementation] {
        assert!(!provider.get_code_at(a).await?.is_empty(), "no code at {a}");
    }
    let linked: Address = ModelVault::new(d.model_vault, &provider).paymentStream().call().await?;
    assert_eq!(linked, d.payment_stream, "vault is linked to the payment contract");
    let env = std::fs::read_to_string(dir.join("demo.env"))?;
    assert!(env.contains(&format!("DIV_PAYMENT_STREAM={}", d.payment_stream)), "{env}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// `div deploy --governance-timelock-secs`: the deploying key keeps no direct power; an upgrade
/// can only be scheduled through the timelock, and not for sooner than its delay.
#[tokio::test]
async fn deploy_behind_a_timelock_makes_every_upgrade_wait() -> anyhow::Result<()> {
    let chain = LocalChain::start().await?;
    let dir = scratch("deploy-timelock");
    let deployer = chain.keys[9].clone();
    let out = div()
        .args(["deploy", "--rpc-url", &chain.rpc_url, "--governance-timelock-secs", "3600", "--out"])
        .arg(dir.join("addresses.json"))
        .env("DIV_PRIVATE_KEY", format!("0x{}", alloy::hex::encode(deployer.to_bytes())))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "div deploy failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let d = Deployment::load(&dir.join("addresses.json"))?;
    let timelock = d.governance;
    assert_ne!(timelock, deployer.address());
    assert!(stdout.contains(&format!("governance: timelock {timelock}")), "{stdout}");
    let client = div_chain::Client::connect(&chain.rpc_url, deployer).await?;
    let p = client.provider();
    let (vault, stream) = (ModelVault::new(d.model_vault, p), PaymentStream::new(d.payment_stream, p));
    assert_eq!(vault.owner().call().await?, timelock);
    assert_eq!(stream.owner().call().await?, timelock);
    assert_eq!(vault.pendingOwner().call().await?, Address::ZERO);
    let tl = DaoTimelock::new(timelock, p);
    assert_eq!(tl.getMinDelay().call().await?, alloy::primitives::U256::from(3600u64));
    // the deployer cannot upgrade directly, nor schedule an upgrade for sooner than the delay
    let upgrade =
        ModelVault::upgradeToAndCallCall { newImplementation: d.model_vault, data: Default::default() };
    let direct = vault.upgradeToAndCall(d.model_vault, Default::default()).call().await;
    let reason = direct.err().map(|e| div_chain::revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("OwnableUnauthorizedAccount"), "{reason}");
    let early = tl
        .schedule(
            d.model_vault,
            Default::default(),
            alloy::sol_types::SolCall::abi_encode(&upgrade).into(),
            Default::default(),
            Default::default(),
            alloy::primitives::U256::from(60u64),
        )
        .call()
        .await;
    let reason = early.err().map(|e| div_chain::revert_reason(&e)).unwrap_or_default();
    assert!(reason.starts_with("TimelockInsufficientDelay"), "{reason}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn deploy_refuses_a_bad_key_and_an_unreachable_chain_clearly() -> anyhow::Result<()> {
    let out =
        div().args(["deploy", "--rpc-url", "http://127.0.0.1:9", "--private-key", "0xnot-a-key"]).output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--private-key is not a hex private key"), "{err}");

    let key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    let out = div().args(["deploy", "--rpc-url", "http://127.0.0.1:9", "--private-key", key]).output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to http://127.0.0.1:9"), "{err}");
    Ok(())
}

#[test]
fn dev_starts_anvil_deploys_and_writes_the_demo_env() -> anyhow::Result<()> {
    let dir = scratch("dev");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let out = div()
        .args(["dev", "--once", "--port", &port.to_string(), "--state-dir"])
        .arg(&dir)
        .env("DIV_ANVIL", anvil_bin())
        .output()?;
    assert!(out.status.success(), "div dev failed: {}", String::from_utf8_lossy(&out.stderr));
    let d = Deployment::load(&dir.join("addresses.json"))?;
    assert_eq!(d.chain_id, 31337);
    assert_eq!(d.rpc_url, format!("http://127.0.0.1:{port}"));
    let env = std::fs::read_to_string(dir.join("demo.env"))?;
    for key in ["DIV_RPC_URL=", "DIV_MODEL_VAULT=", "DIV_USDC=", "DIV_USDFC=", "DIV_USER_KEY=", "DIV_HOST="] {
        assert!(env.contains(key), "{key} missing from {env}");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Ends a child process on drop (SIGTERM first via `kill`, then the hard way).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_answers_the_openai_python_client_and_stops_gracefully() -> anyhow::Result<()> {
    let root = div_tests::workspace_root();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let model = format!(
        "{}={}",
        div_tests::minilm_dir().display(),
        root.join("plugins/target/wasm32-wasip2/release/div_embeddings.wasm").display()
    );
    let mut child = Child(
        div()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--model",
                &model,
                "--drain-notice-secs",
                "5",
            ])
            .arg("--cache-dir")
            .arg(root.join("target/div-test-cache"))
            .env("ORT_DYLIB_PATH", div_tests::ort_dylib()?)
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let started = std::time::Instant::now();
    loop {
        if let Ok(out) = Command::new("curl").args(["-sf", &format!("{url}/healthz")]).output()
            && out.status.success()
        {
            break;
        }
        if let Some(status) = child.0.try_wait()? {
            anyhow::bail!("div serve exited early: {status}");
        }
        anyhow::ensure!(started.elapsed().as_secs() < 180, "div serve did not come up");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let python = root.join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(root.join("tests/python/check_openai_embeddings.py"))
        .arg(root.join("../shared/fixtures/minilm/reference.json"))
        .env("DIV_URL", &url)
        .env("DIV_MODEL", "all-minilm-l6-v2")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai client check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert!(report["worst_cosine"].as_f64().unwrap_or(0.0) >= 0.9999, "{report}");
    assert_eq!(report["unknown_model_status"], 404);
    // the README's example runs as shown
    let out = Command::new(&python)
        .arg(root.join("examples/openai_embeddings.py"))
        .env("DIV_URL", &url)
        .env("DIV_MODEL", "all-minilm-l6-v2")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("3 vectors of 384 dimensions"), "{stdout}");
    // SIGTERM: /readyz turns 503 `draining` at once while requests are still answered for the
    // notice (a load balancer stops sending), then the host stops accepting, finishes and exits
    let curl = |path: &str| -> anyhow::Result<(String, String)> {
        let out =
            Command::new("curl").args(["-s", "-w", "\n%{http_code}", &format!("{url}{path}")]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        Ok((body.to_string(), code.to_string()))
    };
    assert_eq!(curl("/readyz")?.1, "200");
    Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status()?;
    let signalled = std::time::Instant::now();
    let mut drained = None;
    while signalled.elapsed() < std::time::Duration::from_secs(4) {
        let (body, code) = curl("/readyz")?;
        if code == "503" {
            drained = Some(body);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let body = drained.ok_or_else(|| anyhow::anyhow!("/readyz never said draining"))?;
    assert!(body.contains("\"status\":\"draining\""), "{body}");
    assert_eq!(curl("/v1/models")?.1, "200", "requests are still served during the notice");
    let status = child.0.wait()?;
    assert!(status.success(), "div serve exited with {status} after SIGTERM");
    assert!(signalled.elapsed() >= std::time::Duration::from_secs(5), "it kept serving for the notice");
    Ok(())
}
