//! `div custodian`: one key custodian, an independent service holding one share per model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use div_chain::Deployment;
use div_custodian::{Custodian, router};

/// Arguments of `div custodian`.
#[derive(clap::Args)]
pub struct CustodianArgs {
    /// Read settings from this TOML file: every flag by its long name (`listen = "0.0.0.0:8080"`),
    /// lists as arrays. The command line and the environment win over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "DIV_CUSTODIAN_LISTEN", default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// A file holding the custodian's hex private key (mode 0600): its identity on-chain, and
    /// the root of its at-rest and sealing keys. Or set `DIV_CUSTODIAN_KEY` in the environment.
    /// Never on the command line.
    #[arg(long, env = "DIV_CUSTODIAN_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Where shares are kept (encrypted, mode 0600).
    #[arg(long, env = "DIV_CUSTODIAN_DIR")]
    data_dir: PathBuf,
    /// The deployment's address book (for `ModelVault` and the RPC URL).
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
    /// JSON-RPC endpoint (default: the address book's).
    #[arg(long, env = "DIV_RPC_URL")]
    rpc_url: Option<String>,
}

/// Runs `div custodian`.
pub async fn run(args: CustodianArgs) -> anyhow::Result<()> {
    let signer: PrivateKeySigner =
        crate::secrets::load_key(args.key_file.as_deref(), "DIV_CUSTODIAN_KEY", "custodian")?;
    let d = Deployment::load(&args.addresses)
        .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
    let rpc = args.rpc_url.unwrap_or_else(|| d.rpc_url.clone());
    let provider = div_chain::rpc::read_provider(&rpc, div_chain::rpc::RPC_TIMEOUT)?;
    let custodian = Arc::new(Custodian::new(signer, &args.data_dir, provider, d.model_vault)?);
    let address = custodian.address();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("custodian {address} listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(custodian))
        .with_graceful_shutdown(crate::cmd_serve::shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}
