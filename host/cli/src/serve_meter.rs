//! `div serve`'s meter: a charge ledger, a chain view and a settlement loop for each chain the
//! host takes payment on (`--addresses` and every `--payment-chain`), kept apart so one chain's
//! outage or misconfiguration holds no other back, and the operator's token for settling now.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_api::{AppState, Metrics};
use div_chain::Deployment;
use div_meter::settle::SettleConfig;
use div_meter::{Ledger, Meter, MeterConfig};

use crate::cmd_serve::ServeArgs;

/// One chain the host takes payment on: its address book and where its ledger lives.
struct PaymentChain {
    book: Deployment,
    ledger_dir: PathBuf,
    /// The first chain (`--addresses`): it must answer when the host starts.
    first: bool,
}

/// The chains of `--addresses` and every `--payment-chain`, each with its own ledger folder:
/// `<state>/ledger` for the first (where a single-chain host always kept it), then
/// `<state>/chains/<chain id>/ledger`.
fn payment_chains(args: &ServeArgs) -> anyhow::Result<Vec<PaymentChain>> {
    let first = Deployment::load(&args.addresses)
        .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
    let mut chains =
        vec![PaymentChain { book: first, ledger_dir: args.state_dir.join("ledger"), first: true }];
    for path in &args.payment_chains {
        let book =
            Deployment::load(path).with_context(|| format!("reading the address book {}", path.display()))?;
        if chains.iter().any(|c| c.book.chain_id == book.chain_id) {
            bail!("--payment-chain {}: chain {} is given twice", path.display(), book.chain_id);
        }
        let ledger_dir = args.state_dir.join("chains").join(book.chain_id.to_string()).join("ledger");
        chains.push(PaymentChain { book, ledger_dir, first: false });
    }
    Ok(chains)
}

/// Why a chain cannot be settled on (yet).
enum ChainCheck {
    /// It does not answer: try again later.
    Down(String),
    /// It answers, wrongly for this configuration: never settle on it.
    Wrong(String),
}

/// Checks a chain before settling on it: the RPC is the chain the address book names (permits
/// are signed for that chain id), and settlement runs well inside its withdraw delay (a user may
/// withdraw once it passes: every charge must be settled well before that). Returns that delay
/// (seconds).
async fn check_chain(
    client: &div_chain::Client,
    d: &Deployment,
    interval_secs: u64,
) -> Result<u64, ChainCheck> {
    use alloy::providers::Provider;
    let down = |what: &str, e: &dyn std::fmt::Display| {
        ChainCheck::Down(format!("{what} on chain {}: {e}", d.chain_id))
    };
    let id = client.provider().get_chain_id().await.map_err(|e| down("reading the chain id", &e))?;
    if id != d.chain_id {
        return Err(ChainCheck::Wrong(format!(
            "{} answers as chain {id}, but its address book says chain {}",
            d.rpc_url, d.chain_id
        )));
    }
    let delay = div_chain::bindings::PaymentStream::new(d.payment_stream, client.provider())
        .withdrawDelay()
        .call()
        .await
        .map_err(|e| down("reading PaymentStream.withdrawDelay", &e))?;
    if interval_secs.saturating_mul(4) > delay {
        return Err(ChainCheck::Wrong(format!(
            "--settle-interval-secs {interval_secs} is not well inside chain {}'s withdraw delay of {delay} s (at most a quarter)",
            d.chain_id
        )));
    }
    Ok(delay)
}

/// Opens a charge ledger per chain, gates and meters the vault's models, and starts settling on
/// each chain. The first chain must answer now; another that does not is metered from its
/// cached state (strangers refused) and checked and settled once it answers, so one chain down
/// holds no other back.
pub(crate) async fn start_meters(
    args: &ServeArgs,
    host: PrivateKeySigner,
    mut state: AppState,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(AppState, Vec<tokio::task::JoinHandle<()>>)> {
    let rpc_timeout = Duration::from_millis(args.rpc_timeout_ms.max(100));
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state folder {}", args.state_dir.display()))?;
    let admin_token = admin_token(&args.state_dir)?;
    let config = SettleConfig {
        interval: Duration::from_secs(args.settle_interval_secs.max(1)),
        max_pending: args.settle_max_pending.max(1),
        max_gas_price: args.max_gas_price_gwei.map(|g| u128::from(g) * 1_000_000_000),
        receipt_timeout: Duration::from_secs(args.settle_receipt_timeout_secs.max(1)),
        ..SettleConfig::default()
    };
    let poll = Duration::from_millis(args.vault_poll_ms);
    let mut first: Option<Arc<Meter>> = None;
    let (mut clients, mut tasks) = (Vec::new(), Vec::new());
    for chain in payment_chains(args)? {
        let d = chain.book;
        let provider = div_chain::rpc::read_provider(&d.rpc_url, rpc_timeout)?;
        let (ledger, place) = match args.ledger.as_deref() {
            Some(url) => {
                let schema = format!("div_c{}", d.chain_id);
                let ledger = Ledger::open_postgres(url, &schema)
                    .await
                    .with_context(|| format!("opening the PostgreSQL ledger (schema {schema})"))?;
                (ledger, format!("PostgreSQL schema {schema}"))
            }
            None => {
                std::fs::create_dir_all(&chain.ledger_dir)?;
                let ledger = Ledger::open(&chain.ledger_dir)
                    .with_context(|| format!("opening the ledger in {}", chain.ledger_dir.display()))?;
                (ledger, chain.ledger_dir.display().to_string())
            }
        };
        let ledger = Arc::new(ledger);
        ledger
            .bind(d.chain_id, d.payment_stream)
            .await
            .with_context(|| format!("the ledger in {place} is not chain {}'s", d.chain_id))?;
        tracing::info!(chain_id = d.chain_id, backend = ledger.backend(), at = %place, "charge ledger open");
        let meter_config = MeterConfig {
            host: host.clone(),
            chain_id: d.chain_id,
            payment_stream: d.payment_stream,
            model_vault: d.model_vault,
            provider,
            cache_ttl: Duration::from_millis(args.chain_cache_ms),
            rpc_timeout,
            premium_batch: args.premium_batch,
            rate_per_sec: args.rate_limit,
            premium_rate_per_sec: args.rate_limit.saturating_mul(10),
            max_keys_per_user: args.max_keys_per_user.max(1),
        };
        let meter = Arc::new(match &first {
            None => Meter::new(meter_config, ledger),
            Some(f) => Meter::beside(f, meter_config, ledger),
        });
        let client = div_chain::Client::connect_lazy(&d.rpc_url, host.clone(), rpc_timeout, d.chain_id)?;
        let checked = match check_chain(&client, &d, args.settle_interval_secs).await {
            Ok(delay) => {
                metrics.set_settle_bounds(d.chain_id, delay, args.settle_interval_secs);
                true
            }
            Err(ChainCheck::Wrong(why)) => bail!("{why}"),
            Err(ChainCheck::Down(why)) if chain.first => bail!("the chain does not answer: {why}"),
            Err(ChainCheck::Down(why)) => {
                tracing::warn!(chain_id = d.chain_id, "{why}; settling there once it answers");
                false
            }
        };
        let observer: div_meter::settle::SettleObserver = {
            let (metrics, chain_id) = (metrics.clone(), d.chain_id);
            Arc::new(move |r| metrics.settle_round(chain_id, r))
        };
        let late_metrics = metrics.clone();
        let (settling, follower, settle_client, interval) =
            (meter.clone(), meter.clone(), client.clone(), args.settle_interval_secs);
        tasks.push(tokio::spawn(async move {
            let settle = async move {
                if !checked {
                    let mut wait = Duration::from_secs(2);
                    loop {
                        tokio::time::sleep(wait).await;
                        match check_chain(&settle_client, &d, interval).await {
                            Ok(delay) => {
                                late_metrics.set_settle_bounds(d.chain_id, delay, interval);
                                break;
                            }
                            Err(ChainCheck::Down(_)) => wait = (wait * 2).min(Duration::from_secs(30)),
                            Err(ChainCheck::Wrong(why)) => {
                                tracing::error!(chain_id = d.chain_id, "not settling on this chain: {why}");
                                return;
                            }
                        }
                    }
                    tracing::info!(chain_id = d.chain_id, "the chain answers; settling there");
                }
                div_meter::settle::run(settling, settle_client, config, Some(observer)).await
            };
            tokio::join!(settle, follower.follow_chain(poll));
        }));
        println!(
            "metering paid requests on chain {}; ledger in {}",
            meter.config().chain_id,
            chain.ledger_dir.display()
        );
        clients.push((meter.config().chain_id, client));
        first.get_or_insert_with(|| meter.clone());
        state = state.with_meter(meter);
    }
    Ok((state.with_settler(clients, &admin_token, config), tasks))
}

/// The operator's token for `POST /v1/host/settle`, made once and kept readable by its owner only.
fn admin_token(dir: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("admin-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    let token = format!("{:x}", rand_token());
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(token)
}

fn rand_token() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    // two independently seeded SipHash states from the OS: 128 unpredictable bits
    let a = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let b = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (u128::from(a) << 64) | u128::from(b)
}
