//! `div deploy`: the contract set onto any EVM JSON-RPC endpoint.

use std::path::PathBuf;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_chain::Client;

use crate::demo_env;

/// Arguments of `div deploy`.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// JSON-RPC endpoint of the chain.
    #[arg(long, env = "DIV_RPC_URL")]
    rpc_url: String,
    /// Hex private key that pays for and governs the deployment.
    #[arg(long, env = "DIV_PRIVATE_KEY", hide_env_values = true)]
    private_key: String,
    /// An existing stablecoin to accept, as SYMBOL:ADDRESS:DECIMALS (repeatable). Without any,
    /// USDC and USDFC stand-ins (with EIP-2612 permits) and a USDT one (without) are deployed
    /// (local chains only).
    #[arg(long = "stablecoin", value_name = "SYMBOL:ADDRESS:DECIMALS")]
    stablecoins: Vec<String>,
    /// Where to write the address book.
    #[arg(long, default_value = ".div/addresses.json")]
    out: PathBuf,
    /// Also merge the addresses into this env file.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// Hand governance (upgrades, accepted tokens, delays) to a timelock with this delay in
    /// seconds, the key its only proposer: every upgrade is then public that long before it
    /// runs. Use at least 172800 (2 days) on a public chain.
    #[arg(long)]
    governance_timelock_secs: Option<u64>,
}

/// Runs `div deploy`.
pub async fn run(args: DeployArgs) -> anyhow::Result<()> {
    let signer: PrivateKeySigner =
        args.private_key.trim().parse().context("--private-key is not a hex private key")?;
    let mut coins = Vec::new();
    for spec in &args.stablecoins {
        let parts: Vec<&str> = spec.split(':').collect();
        let [symbol, address, decimals] = parts.as_slice() else {
            bail!("--stablecoin {spec:?}: expected SYMBOL:ADDRESS:DECIMALS");
        };
        let address: Address =
            address.parse().with_context(|| format!("--stablecoin {spec:?}: bad address"))?;
        let decimals: u8 =
            decimals.parse().with_context(|| format!("--stablecoin {spec:?}: bad decimals"))?;
        coins.push(div_chain::Stablecoin { symbol: (*symbol).to_string(), address, decimals, dev: false });
    }
    let client = Client::connect(&args.rpc_url, signer)
        .await
        .with_context(|| format!("connecting to {}", args.rpc_url))?;
    let mut d = client.deploy_all(&coins).await.context("deploying the contracts")?;
    if let Some(delay) = args.governance_timelock_secs {
        let tl =
            client.govern_by_timelock(&mut d, delay).await.context("handing governance to a timelock")?;
        println!("governance: timelock {tl} (delay {delay} s, proposer {})", client.address());
    }
    d.save(&args.out)?;
    if let Some(env) = &args.env_file {
        demo_env::merge(env, &demo_env::deployment_pairs(&d))?;
    }
    demo_env::print_deployment(&d);
    println!("address book: {}", args.out.display());
    Ok(())
}
