//! The owner's side of payments: `div earnings` and `div claim`.
//!
//! Settlement credits a model inside `PaymentStream` (no transfer per settlement, which is what
//! keeps it under 100 gas a request); `claim` pays a model's whole credit in one stablecoin to
//! the payout address the vault names. Anyone may send the claim, the money can only go to the
//! payout, so an operator or a DAO member can pay an owner out as well as the owner.

use std::path::PathBuf;

use alloy::primitives::{Address, B256, U256, utils::format_units};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use anyhow::{Context, bail};
use div_chain::bindings::{ModelVault, PaymentStream};
use div_chain::{Client, Deployment};

use crate::cmd_wallet::send;

/// Whose models: an address, or the owner's key.
#[derive(clap::Args)]
pub struct OwnerArgs {
    /// The owner's address (default: the key's).
    #[arg(long)]
    owner: Option<Address>,
    /// The owner's hex private key (to name the owner; `div claim` also sends with it).
    #[arg(long, env = "DIV_OWNER_KEY", hide_env_values = true)]
    private_key: Option<String>,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
}

impl OwnerArgs {
    fn signer(&self) -> anyhow::Result<Option<PrivateKeySigner>> {
        self.private_key
            .as_deref()
            .map(|k| k.trim().parse::<PrivateKeySigner>().context("the key is not a hex private key"))
            .transpose()
    }

    fn owner(&self) -> anyhow::Result<Address> {
        match (self.owner, self.signer()?) {
            (Some(o), _) => Ok(o),
            (None, Some(k)) => Ok(k.address()),
            (None, None) => bail!("say --owner ADDRESS or set DIV_OWNER_KEY"),
        }
    }
}

/// `div earnings`.
#[derive(clap::Args)]
pub struct EarningsArgs {
    #[command(flatten)]
    who: OwnerArgs,
}

/// `div claim`.
#[derive(clap::Args)]
pub struct ClaimArgs {
    #[command(flatten)]
    who: OwnerArgs,
    /// Only this model (its id, 0x…; anyone may claim it to its payout, no owner needed);
    /// default: every model of the owner with a credit.
    #[arg(long)]
    model: Option<B256>,
}

/// A model of the owner, as the vault lists it.
struct OwnedModel {
    id: B256,
    model: div_chain::bindings::IModelVault::Model,
}

async fn owned_models(p: &DynProvider, d: &Deployment, owner: Address) -> anyhow::Result<Vec<OwnedModel>> {
    let vault = ModelVault::new(d.model_vault, p);
    let count = vault.modelCount().call().await?.saturating_to::<u64>();
    let mut out = Vec::new();
    for i in 0..count {
        let id = vault.modelIdAt(U256::from(i)).call().await?;
        let model = vault.getModel(id).call().await?;
        if model.owner == owner {
            out.push(OwnedModel { id, model });
        }
    }
    Ok(out)
}

fn units(d: &Deployment, token: Address, amount: U256) -> anyhow::Result<String> {
    let coin = d.stablecoins.iter().find(|c| c.address == token);
    let (sym, dec) = coin.map(|c| (c.symbol.as_str(), c.decimals)).unwrap_or(("?", 0));
    Ok(format!("{} {sym}", format_units(amount, dec)?))
}

/// Runs `div earnings`: for each of the owner's models, the requests settled, what settlement
/// credited in each stablecoin (from `Settled` events) and what of it is still to claim.
pub async fn earnings(args: EarningsArgs) -> anyhow::Result<()> {
    let d = Deployment::load(&args.who.addresses)?;
    let owner = args.who.owner()?;
    let p = alloy::providers::ProviderBuilder::new().connect_http(d.rpc_url.parse()?).erased();
    let ps = PaymentStream::new(d.payment_stream, &p);
    let models = owned_models(&p, &d, owner).await?;
    for OwnedModel { id, model: m } in &models {
        let logs = p
            .get_logs(
                &Filter::new()
                    .address(d.payment_stream)
                    .event_signature(PaymentStream::Settled::SIGNATURE_HASH)
                    .topic2(*id)
                    .from_block(d.deployed_at_block),
            )
            .await?;
        let mut by_token: std::collections::BTreeMap<Address, U256> =
            d.stablecoins.iter().map(|c| (c.address, U256::ZERO)).collect();
        for log in &logs {
            if let Ok(e) = PaymentStream::Settled::decode_log(&log.inner) {
                *by_token.entry(e.data.token).or_default() += e.data.amount;
            }
        }
        println!("{} ({id:#x}): {} inferences settled, payout {}", m.name, m.totalInferences, m.payout);
        for (token, earned) in by_token {
            let to_claim = ps.claimable(*id, token).call().await?;
            if earned.is_zero() && to_claim.is_zero() {
                continue;
            }
            println!("  earned {}, {} to claim", units(&d, token, earned)?, units(&d, token, to_claim)?);
        }
    }
    if models.is_empty() {
        println!("{owner} owns no model");
    }
    Ok(())
}

/// Runs `div claim`: pays every credit of the owner's models (or of `--model`) to their payout
/// addresses, one transaction per model and stablecoin with a credit.
pub async fn claim(args: ClaimArgs) -> anyhow::Result<()> {
    let d = Deployment::load(&args.who.addresses)?;
    let signer =
        args.who.signer()?.context("div claim sends transactions: set DIV_OWNER_KEY or --private-key")?;
    let client = Client::connect(&d.rpc_url, signer).await.context("connecting to the chain")?;
    let p = client.provider();
    let ps = PaymentStream::new(d.payment_stream, p);
    let models = match (args.model, args.who.owner) {
        // anyone may claim a model's credit to its payout (a DAO's treasury, say): no owner needed
        (Some(id), None) => {
            let model = ModelVault::new(d.model_vault, p).getModel(id).call().await.map_err(|e| {
                anyhow::anyhow!("reading the model {id:#x}: {}", div_chain::revert_reason(&e))
            })?;
            vec![OwnedModel { id, model }]
        }
        (model, _) => {
            let owner = args.who.owner()?;
            let owned = owned_models(p, &d, owner).await?;
            match model {
                Some(id) => vec![
                    owned
                        .into_iter()
                        .find(|m| m.id == id)
                        .with_context(|| format!("{owner} owns no model {id:#x}"))?,
                ],
                None => owned,
            }
        }
    };
    let chosen: Vec<&OwnedModel> = models.iter().collect();
    let mut claimed = 0;
    for OwnedModel { id, model: m } in chosen {
        for coin in &d.stablecoins {
            let credit = ps.claimable(*id, coin.address).call().await?;
            if credit.is_zero() {
                continue;
            }
            send(&format!("claiming {}'s {}", m.name, coin.symbol), ps.claim(*id, coin.address)).await?;
            println!("{}: claimed {} to {}", m.name, units(&d, coin.address, credit)?, m.payout);
            claimed += 1;
        }
    }
    if claimed == 0 {
        println!("nothing to claim");
    }
    Ok(())
}
