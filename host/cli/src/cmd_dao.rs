//! `div dao create | propose | vote | execute | status`: a model owned by its Data DAO.
//!
//! `create` (the model's owner) deploys a `ModelGovernor` over the model's access token and a
//! `DaoTimelock`, and hands the model over: from then on a price change or a host authorisation is
//! a proposal the token's holders vote on, run by the timelock after its delay, and settlements
//! are claimed to the timelock (the DAO's treasury). The DAO is found from the chain alone
//! (`div_chain::find_dao`); proposals are read back from the governor's `ProposalCreated` events.

use std::path::PathBuf;

use alloy::primitives::{Address, B256, Bytes, U256, keccak256, utils::format_units, utils::parse_units};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};
use anyhow::{Context, bail};
use div_chain::bindings::{ModelGovernor, ModelVault};
use div_chain::{Client, Dao, DaoParams, Deployment, find_dao};

use crate::cmd_wallet::send;

/// `div dao`.
#[derive(clap::Args)]
pub struct DaoArgs {
    #[command(subcommand)]
    command: DaoCommand,
}

#[derive(clap::Subcommand)]
enum DaoCommand {
    /// Give the key's model to a new DAO of its token holders (the model's owner).
    Create(CreateArgs),
    /// Propose changes to the model (a member with enough votes).
    Propose(ProposeArgs),
    /// Vote on a proposal (a member; votes are counted at the proposal's snapshot).
    Vote(VoteArgs),
    /// Queue a proposal that passed, or run a queued one once the timelock's delay is over.
    Execute(OnProposal),
    /// The DAO's addresses, treasury and proposals.
    Status(StatusArgs),
}

/// The chain, the model and who signs.
#[derive(clap::Args)]
struct Common {
    /// The model (its id, 0x…).
    #[arg(long)]
    model_id: B256,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
}

impl Common {
    fn deployment(&self) -> anyhow::Result<Deployment> {
        Deployment::load(&self.addresses)
            .with_context(|| format!("reading the address book {}", self.addresses.display()))
    }
}

/// Access-token base units (18 decimals) as whole tokens, without trailing zeros.
fn whole(v: U256) -> String {
    let s = format_units(v, 18).unwrap_or_else(|_| v.to_string());
    match s.split_once('.') {
        Some((i, f)) if f.trim_end_matches('0').is_empty() => i.to_string(),
        Some((i, f)) => format!("{i}.{}", f.trim_end_matches('0')),
        None => s,
    }
}

async fn signer_client(d: &Deployment, key: &str) -> anyhow::Result<Client> {
    let signer: PrivateKeySigner = key.trim().parse().context("the key is not a hex private key")?;
    Client::connect(&d.rpc_url, signer).await.context("connecting to the chain")
}

async fn dao_of(p: &DynProvider, d: &Deployment, model: B256) -> anyhow::Result<Dao> {
    find_dao(p, d, model)
        .await?
        .with_context(|| format!("model {model:#x} is not owned by a DAO (div dao create)"))
}

#[derive(clap::Args)]
struct CreateArgs {
    #[command(flatten)]
    common: Common,
    /// The model owner's hex private key.
    #[arg(long, env = "DIV_OWNER_KEY", hide_env_values = true)]
    private_key: String,
    /// Seconds from a proposal to the start of voting (its vote snapshot).
    #[arg(long, default_value_t = 60)]
    voting_delay_secs: u64,
    /// Seconds voting stays open.
    #[arg(long, default_value_t = 3 * 24 * 3600)]
    voting_period_secs: u32,
    /// Seconds the timelock waits before running what passed (members' time to react).
    #[arg(long, default_value_t = 2 * 24 * 3600)]
    timelock_delay_secs: u64,
    /// Whole access tokens needed to propose.
    #[arg(long, default_value = "1")]
    proposal_threshold: String,
    /// Percent of the token supply that must vote for (or abstain) for a proposal to count.
    #[arg(long, default_value_t = 10)]
    quorum_percent: u64,
}

#[derive(clap::Args)]
struct ProposeArgs {
    #[command(flatten)]
    common: Common,
    /// The member's hex private key.
    #[arg(long, env = "DIV_USER_KEY", hide_env_values = true)]
    private_key: String,
    /// New price per request in US dollars (e.g. 0.002).
    #[arg(long)]
    set_price: Option<String>,
    /// New price per 1000 tokens in US dollars (with --set-price; default: unchanged).
    #[arg(long, requires = "set_price")]
    set_price_per_1k_tokens: Option<String>,
    /// Authorise this host to serve the model.
    #[arg(long)]
    authorize_host: Vec<Address>,
    /// Stop this host serving the model.
    #[arg(long)]
    revoke_host: Vec<Address>,
    /// What the proposal is for, in words (voters read it).
    #[arg(long)]
    description: String,
}

/// A proposal of the model's DAO, and the key that acts on it.
#[derive(clap::Args)]
struct OnProposal {
    #[command(flatten)]
    common: Common,
    /// The member's hex private key (for `execute`, any funded key: queueing and executing are
    /// open to anyone).
    #[arg(long, env = "DIV_USER_KEY", hide_env_values = true)]
    private_key: String,
    /// The proposal id (decimal or 0x…).
    #[arg(long)]
    proposal: U256,
}

#[derive(clap::Args)]
struct VoteArgs {
    #[command(flatten)]
    on: OnProposal,
    /// for, against or abstain.
    #[arg(long)]
    support: String,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

/// Runs `div dao …`.
pub async fn run(args: DaoArgs) -> anyhow::Result<()> {
    match args.command {
        DaoCommand::Create(a) => create(a).await,
        DaoCommand::Propose(a) => propose(a).await,
        DaoCommand::Vote(a) => vote(a).await,
        DaoCommand::Execute(a) => execute(a).await,
        DaoCommand::Status(a) => status(a).await,
    }
}

async fn create(a: CreateArgs) -> anyhow::Result<()> {
    let d = a.common.deployment()?;
    let client = signer_client(&d, &a.private_key).await?;
    let vault = ModelVault::new(d.model_vault, client.provider());
    let m = vault.getModel(a.common.model_id).call().await.context("reading the model")?;
    if m.owner != client.address() {
        bail!("the key is not the owner of model {:#x} (its owner is {})", a.common.model_id, m.owner);
    }
    // members vote with the access token's checkpoints: a token without them (an access token
    // from before ERC20Votes, not upgraded) would make a DAO nobody can ever vote in
    let token = div_chain::bindings::ModelAccessToken::new(m.accessToken, client.provider());
    match token.CLOCK_MODE().call().await {
        Ok(mode) if mode == "mode=timestamp" => {}
        Ok(mode) => bail!(
            "the model's access token keeps votes by {mode:?}, not by timestamp; DIV's governor counts time in seconds"
        ),
        Err(_) => bail!(
            "the model's access token {} has no vote checkpoints (ERC20Votes): upgrade it to the current ModelAccessToken first, or nobody could vote",
            m.accessToken
        ),
    }
    if token.totalSupply().call().await.context("reading the token's supply")?.is_zero() {
        println!("note: nobody holds {}'s token yet; no proposal can pass until members buy some", m.name);
    }
    let params = DaoParams {
        voting_delay: a.voting_delay_secs,
        voting_period: a.voting_period_secs,
        timelock_delay: a.timelock_delay_secs,
        proposal_threshold: parse_units(&a.proposal_threshold, 18)
            .context("--proposal-threshold")?
            .get_absolute(),
        quorum_percent: a.quorum_percent,
    };
    if params.quorum_percent == 0 || params.quorum_percent > 100 {
        bail!("--quorum-percent must be 1 to 100");
    }
    let dao = client.create_dao(&d, a.common.model_id, &format!("{} DAO", m.name), &params).await?;
    println!("{} is now owned by its DAO", m.name);
    println!("governor {}", dao.governor);
    println!("timelock {} (the model's owner and payout, the treasury)", dao.timelock);
    println!(
        "members vote with {} tokens; voting opens {} s after a proposal for {} s; the timelock waits {} s; quorum {} %",
        m.name, params.voting_delay, params.voting_period, params.timelock_delay, params.quorum_percent
    );
    Ok(())
}

async fn propose(a: ProposeArgs) -> anyhow::Result<()> {
    let d = a.common.deployment()?;
    let client = signer_client(&d, &a.private_key).await?;
    let p = client.provider();
    let dao = dao_of(p, &d, a.common.model_id).await?;
    let id = a.common.model_id;
    let mut calls: Vec<Bytes> = Vec::new();
    if let Some(price) = &a.set_price {
        let m = ModelVault::new(d.model_vault, p).getModel(id).call().await?;
        let per_request =
            parse_units(price, div_meter::PRICE_DECIMALS).context("--set-price")?.get_absolute();
        let per_1k = match &a.set_price_per_1k_tokens {
            Some(v) => {
                parse_units(v, div_meter::PRICE_DECIMALS).context("--set-price-per-1k-tokens")?.get_absolute()
            }
            None => m.pricePer1kTokens,
        };
        calls.push(
            ModelVault::updatePriceCall {
                modelId: id,
                pricePerRequest: per_request,
                pricePer1kTokens: per_1k,
            }
            .abi_encode()
            .into(),
        );
    }
    for host in &a.authorize_host {
        calls.push(ModelVault::authorizeHostCall { modelId: id, host: *host }.abi_encode().into());
    }
    for host in &a.revoke_host {
        calls.push(ModelVault::revokeHostCall { modelId: id, host: *host }.abi_encode().into());
    }
    if calls.is_empty() {
        bail!("say what to change: --set-price, --authorize-host or --revoke-host");
    }
    let gov = ModelGovernor::new(dao.governor, p);
    // the governor counts the proposer's votes as of the previous second
    let now = gov.clock().call().await.context("reading the governor's clock")?;
    let votes = gov.getVotes(client.address(), U256::from(now).saturating_sub(U256::ONE)).call().await?;
    let threshold = gov.proposalThreshold().call().await?;
    if votes < threshold {
        bail!(
            "{} has {} votes, {} are needed to propose (tokens count from the second after they arrive)",
            client.address(),
            whole(votes),
            whole(threshold)
        );
    }
    let n = calls.len();
    let targets = vec![d.model_vault; n];
    let values = vec![U256::ZERO; n];
    let receipt =
        send("proposing", gov.propose(targets.clone(), values.clone(), calls.clone(), a.description.clone()))
            .await?;
    let created = receipt
        .inner
        .logs()
        .iter()
        .find_map(|l| ModelGovernor::ProposalCreated::decode_log(&l.inner).ok())
        .context("the governor logged no ProposalCreated")?;
    println!("proposal {}", created.data.proposalId);
    println!("voting from {} to {} (unix time)", created.data.voteStart, created.data.voteEnd);
    Ok(())
}

async fn vote(a: VoteArgs) -> anyhow::Result<()> {
    let support: u8 = match a.support.as_str() {
        "against" => 0,
        "for" => 1,
        "abstain" => 2,
        other => bail!("--support is for, against or abstain, not {other:?}"),
    };
    let d = a.on.common.deployment()?;
    let client = signer_client(&d, &a.on.private_key).await?;
    let p = client.provider();
    let dao = dao_of(p, &d, a.on.common.model_id).await?;
    let gov = ModelGovernor::new(dao.governor, p);
    let snapshot = gov.proposalSnapshot(a.on.proposal).call().await.context("reading the proposal")?;
    if snapshot.is_zero() {
        bail!("the DAO has no proposal {}", a.on.proposal);
    }
    let weight = gov.getVotes(client.address(), snapshot).call().await.context("reading the votes")?;
    if weight.is_zero() {
        bail!(
            "{} had no votes at the proposal's snapshot ({snapshot}): only tokens held (and delegated) before it count",
            client.address()
        );
    }
    send("voting", gov.castVote(a.on.proposal, support)).await?;
    println!("voted {} with {} votes", a.support, whole(weight));
    Ok(())
}

/// Every proposal of the DAO's governor, from its `ProposalCreated` events, oldest first.
async fn proposals(
    p: &DynProvider,
    d: &Deployment,
    governor: Address,
) -> anyhow::Result<Vec<ModelGovernor::ProposalCreated>> {
    let logs = p
        .get_logs(
            &Filter::new()
                .address(governor)
                .event_signature(ModelGovernor::ProposalCreated::SIGNATURE_HASH)
                .from_block(d.deployed_at_block),
        )
        .await?;
    Ok(logs
        .iter()
        .filter_map(|l| ModelGovernor::ProposalCreated::decode_log(&l.inner).ok())
        .map(|e| e.data)
        .collect())
}

/// The proposal's actions, from its `ProposalCreated` event.
async fn proposal_of(
    p: &DynProvider,
    d: &Deployment,
    governor: Address,
    id: U256,
) -> anyhow::Result<ModelGovernor::ProposalCreated> {
    proposals(p, d, governor)
        .await?
        .into_iter()
        .find(|e| e.proposalId == id)
        .with_context(|| format!("the DAO has no proposal {id}"))
}

const STATES: [&str; 8] =
    ["pending", "active", "canceled", "defeated", "succeeded", "queued", "expired", "executed"];

async fn execute(a: OnProposal) -> anyhow::Result<()> {
    let d = a.common.deployment()?;
    let client = signer_client(&d, &a.private_key).await?;
    let p = client.provider();
    let dao = dao_of(p, &d, a.common.model_id).await?;
    let gov = ModelGovernor::new(dao.governor, p);
    let e = proposal_of(p, &d, dao.governor, a.proposal).await?;
    let hash = keccak256(e.description.as_bytes());
    let state = gov.state(a.proposal).call().await? as usize;
    match STATES.get(state).copied() {
        Some("succeeded") => {
            send("queueing", gov.queue(e.targets.clone(), e.values.clone(), e.calldatas.clone(), hash))
                .await?;
            let eta = gov.proposalEta(a.proposal).call().await?;
            println!("queued: the timelock runs it from {eta} (unix time); run `div dao execute` again then");
        }
        Some("queued") => {
            let eta = gov.proposalEta(a.proposal).call().await?;
            let now =
                p.get_block_by_number(Default::default()).await?.context("no latest block")?.header.timestamp;
            if U256::from(now) < eta {
                bail!(
                    "queued: the timelock's delay ends at {eta} (unix time), {} s from now",
                    eta - U256::from(now)
                );
            }
            send("executing", gov.execute(e.targets, e.values, e.calldatas, hash)).await?;
            println!("executed");
        }
        other => {
            bail!("proposal {} is {}: nothing to queue or execute", a.proposal, other.unwrap_or("unknown"))
        }
    }
    Ok(())
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let d = a.common.deployment()?;
    let p = alloy::providers::ProviderBuilder::new().connect_http(d.rpc_url.parse()?).erased();
    let dao = dao_of(&p, &d, a.common.model_id).await?;
    let gov = ModelGovernor::new(dao.governor, &p);
    println!("governor {}\ntimelock {}", dao.governor, dao.timelock);
    let ps = div_chain::bindings::PaymentStream::new(d.payment_stream, &p);
    for coin in &d.stablecoins {
        let held =
            div_chain::bindings::DevStablecoin::new(coin.address, &p).balanceOf(dao.timelock).call().await?;
        let to_claim = ps.claimable(a.common.model_id, coin.address).call().await?;
        if !held.is_zero() || !to_claim.is_zero() {
            println!(
                "treasury {} {}, {} to claim",
                format_units(held, coin.decimals)?,
                coin.symbol,
                format_units(to_claim, coin.decimals)?
            );
        }
    }
    for e in proposals(&p, &d, dao.governor).await? {
        let id = e.proposalId;
        let state = gov.state(id).call().await? as usize;
        let votes = gov.proposalVotes(id).call().await?;
        println!(
            "proposal {id}: {} — for {}, against {}, abstain {}: {}",
            STATES.get(state).copied().unwrap_or("unknown"),
            whole(votes.forVotes),
            whole(votes.againstVotes),
            whole(votes.abstainVotes),
            e.description
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_tokens_drop_trailing_zeros() {
        assert_eq!(whole(U256::ZERO), "0");
        assert_eq!(whole(U256::from(60u64) * U256::from(10u64).pow(U256::from(18u64))), "60");
        assert_eq!(whole(U256::from(15u64) * U256::from(10u64).pow(U256::from(17u64))), "1.5");
        assert_eq!(whole(U256::from(1u64)), "0.000000000000000001");
    }
}
