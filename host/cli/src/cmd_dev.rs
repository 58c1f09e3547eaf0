//! `div dev`: a local chain with DIV deployed, for demos and development.
//!
//! Starts anvil (found as `--anvil`, `$DIV_ANVIL`, `anvil` on `PATH`, or the copy the bootstrap
//! installs under `contracts/node_modules/.bin`), deploys the contracts with anvil's first
//! account, writes `.div/addresses.json` and `.div/demo.env`, and keeps anvil running until it is
//! told to stop (Ctrl-C or SIGTERM). Anvil's well-known accounts get fixed roles so every script
//! agrees: #0 governance, #1 model owner, #2 user, #3 host.

use std::path::{Path, PathBuf};

use alloy::hex;
use alloy::node_bindings::Anvil;
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use div_chain::Client;

use crate::demo_env;

/// Arguments of `div dev`.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Port for anvil's JSON-RPC.
    #[arg(long, default_value_t = 8545)]
    port: u16,
    /// The chain id anvil runs as (say 314159 for a local stand-in of a second chain beside
    /// 31337; permits are signed for it).
    #[arg(long, default_value_t = 31337)]
    chain_id: u64,
    /// The anvil binary.
    #[arg(long, env = "DIV_ANVIL")]
    anvil: Option<PathBuf>,
    /// Folder for the address book and the env file.
    #[arg(long, default_value = ".div")]
    state_dir: PathBuf,
    /// Deploy, write the files, then stop anvil and exit (for checks).
    #[arg(long)]
    once: bool,
}

/// Where anvil is: the flag, then `PATH`, then the bootstrap's npm install.
fn find_anvil(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join("anvil")).find(|p| p.is_file()));
    if let Some(Some(p)) = on_path {
        return p;
    }
    Path::new("contracts/node_modules/.bin/anvil").to_path_buf()
}

/// Runs `div dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let anvil_bin = find_anvil(args.anvil);
    let book = args.state_dir.join("addresses.json");
    // a stale book must never describe this new chain
    let _ = std::fs::remove_file(&book);
    let anvil = Anvil::new()
        .path(&anvil_bin)
        .port(args.port)
        .chain_id(args.chain_id)
        .try_spawn()
        .with_context(|| format!("starting {} on port {}", anvil_bin.display(), args.port))?;
    let rpc = format!("http://127.0.0.1:{}", anvil.port());
    let keys: Vec<PrivateKeySigner> = anvil.keys().iter().cloned().map(PrivateKeySigner::from).collect();
    let [governance, owner, user, host, c1, c2, c3, ..] = keys.as_slice() else {
        anyhow::bail!("anvil started with fewer than 7 accounts");
    };
    let client = Client::connect(&rpc, governance.clone()).await?;
    let d = client.deploy_all(&[]).await.context("deploying the contracts")?;
    d.save(&book)?;
    let key_hex = |s: &PrivateKeySigner| format!("0x{}", hex::encode(s.to_bytes()));
    let mut pairs = demo_env::deployment_pairs(&d);
    pairs.extend([
        ("DIV_OWNER_KEY", key_hex(owner)),
        ("DIV_OWNER", owner.address().to_string()),
        ("DIV_USER_KEY", key_hex(user)),
        ("DIV_USER", user.address().to_string()),
        ("DIV_HOST_KEY", key_hex(host)),
        ("DIV_HOST", host.address().to_string()),
        ("DIV_CUSTODIAN1_KEY", key_hex(c1)),
        ("DIV_CUSTODIAN2_KEY", key_hex(c2)),
        ("DIV_CUSTODIAN3_KEY", key_hex(c3)),
        ("DIV_ANVIL_PID", anvil.child().id().to_string()),
    ]);
    demo_env::merge(&args.state_dir.join("demo.env"), &pairs)?;
    demo_env::print_deployment(&d);
    println!("accounts: owner {}  user {}  host {}", owner.address(), user.address(), host.address());
    println!("address book: {}  env: {}", book.display(), args.state_dir.join("demo.env").display());
    if args.once {
        return Ok(());
    }
    println!("anvil is running at {rpc}; Ctrl-C or SIGTERM stops it");
    wait_for_stop().await?;
    drop(anvil);
    Ok(())
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
