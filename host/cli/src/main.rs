//! `div`: one command for every step of DIV.
//!
//! This binary only wires the library crates under `host/` together; each subcommand lives in
//! its own module. Errors reach the user with the context of what was being done (`anyhow`).

mod cmd_cid;
mod cmd_custodian;
mod cmd_dao;
mod cmd_deploy;
mod cmd_dev;
mod cmd_earnings;
mod cmd_publish;
mod cmd_serve;
mod cmd_wallet;
mod config_file;
mod demo_env;
mod secrets;
mod serve_meter;
mod serve_vault;
mod telemetry;

use clap::{CommandFactory, Parser, Subcommand};

/// DIV, the Decentralized Inference Vault.
#[derive(Parser)]
#[command(name = "div", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local anvil chain, deploy the contracts, write `.div/`, and keep running.
    Dev(cmd_dev::DevArgs),
    /// Deploy the contracts to any EVM JSON-RPC endpoint and write the address book.
    Deploy(cmd_deploy::DeployArgs),
    /// Run a key custodian: hold key shares, release them sealed to authorised hosts.
    Custodian(cmd_custodian::CustodianArgs),
    /// Encrypt a model package, store it, hand its key shares to custodians, register it.
    Publish(Box<cmd_publish::PublishArgs>),
    /// Deposit stablecoins into PaymentStream (user).
    Deposit(Box<cmd_wallet::DepositArgs>),
    /// Buy a model's access tokens in its primary sale (user).
    Buy(Box<cmd_wallet::BuyArgs>),
    /// Sign a spending permit for a host and get its API key (user).
    Permit(Box<cmd_wallet::PermitArgs>),
    /// Show the deposit, a pending withdrawal and the wallet balance (user).
    Balance(Box<cmd_wallet::BalanceArgs>),
    /// Request, take or cancel a withdrawal (user).
    Withdraw(Box<cmd_wallet::WithdrawArgs>),
    /// What settlement credited to each of an owner's models, and what is still to claim (owner).
    Earnings(cmd_earnings::EarningsArgs),
    /// Pay the credits of an owner's models to their payout addresses (owner, or anyone).
    Claim(cmd_earnings::ClaimArgs),
    /// A model owned by its Data DAO: create, propose, vote, execute, status.
    Dao(cmd_dao::DaoArgs),
    /// Ask a host to settle its charges now (operator).
    Settle(cmd_wallet::SettleArgs),
    /// Print the IPFS content id of a file (what `ipfs add` computes).
    Cid(cmd_cid::CidArgs),
    /// Serve models over the OpenAI-compatible API, one sandboxed plugin instance per request.
    Serve(Box<cmd_serve::ServeArgs>),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    secrets::private_umask();
    // `--config FILE` (serve, custodian): the file's settings become flags clap then checks
    let args = match config_file::expand(&Cli::command(), std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let otlp = match &cli.command {
        Command::Serve(a) => a.otlp_endpoint.clone(),
        _ => None,
    };
    let telemetry = match telemetry::init(otlp.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Dev(args) => cmd_dev::run(args).await,
        Command::Deploy(args) => cmd_deploy::run(args).await,
        Command::Serve(args) => cmd_serve::run(*args).await,
        Command::Cid(args) => cmd_cid::run(args),
        Command::Deposit(args) => cmd_wallet::deposit(*args).await,
        Command::Buy(args) => cmd_wallet::buy(*args).await,
        Command::Permit(args) => cmd_wallet::permit(*args).await,
        Command::Balance(args) => cmd_wallet::balance(*args).await,
        Command::Withdraw(args) => cmd_wallet::withdraw(*args).await,
        Command::Earnings(args) => cmd_earnings::earnings(args).await,
        Command::Claim(args) => cmd_earnings::claim(args).await,
        Command::Settle(args) => cmd_wallet::settle(args).await,
        Command::Dao(args) => cmd_dao::run(args).await,
        Command::Custodian(args) => cmd_custodian::run(args).await,
        Command::Publish(args) => cmd_publish::run(*args).await,
    };
    telemetry.flush().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
