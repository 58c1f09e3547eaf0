//! A model's Data DAO: an OpenZeppelin `Governor` whose members are the holders of the model's
//! access token, and a `TimelockController` that runs what passes and owns the model.
//!
//! [`Client::create_dao`] deploys both and hands the model over (vault owner and payout, token
//! admin and sale proceeds) in the order that never leaves it without an owner; [`find_dao`]
//! finds a model's DAO from the chain alone (the model's owner is the timelock, whose proposer
//! is the governor), so no file has to travel with it.

use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::sol_types::{SolCall, SolEvent};

use crate::addresses::Deployment;
use crate::bindings::{DaoTimelock, ModelAccessToken, ModelGovernor, ModelVault};
use crate::deploy::{Client, confirm};
use crate::error::ChainError;

/// How a DAO decides.
#[derive(Debug, Clone)]
pub struct DaoParams {
    /// Seconds from a proposal to its vote snapshot and the start of voting.
    pub voting_delay: u64,
    /// Seconds voting stays open.
    pub voting_period: u32,
    /// Seconds the timelock waits before running what passed.
    pub timelock_delay: u64,
    /// Votes (token base units) needed to propose.
    pub proposal_threshold: U256,
    /// Share of the supply at the snapshot that must vote for or abstain (percent).
    pub quorum_percent: u64,
}

/// A model's DAO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dao {
    /// The `ModelGovernor`.
    pub governor: Address,
    /// The `DaoTimelock`: the model's owner and payout, the treasury.
    pub timelock: Address,
}

impl Client {
    /// Deploys a DAO for the sender's model `model_id` and hands the model over to it: the vault
    /// makes the timelock the model's payout and owner; the access token sends sale proceeds to
    /// it and makes it the admin, and the sender gives up the token's admin and minter roles.
    pub async fn create_dao(
        &self,
        d: &Deployment,
        model_id: B256,
        name: &str,
        params: &DaoParams,
    ) -> Result<Dao, ChainError> {
        let p = self.provider();
        let vault = ModelVault::new(d.model_vault, p);
        let model =
            vault.getModel(model_id).call().await.map_err(ChainError::contract("reading the model"))?;
        let timelock = DaoTimelock::deploy(
            p,
            U256::from(params.timelock_delay),
            Vec::new(),
            vec![Address::ZERO], // anyone may execute what passed
            self.address(),
        )
        .await
        .map_err(ChainError::contract("deploying the DAO's timelock"))?;
        let governor = ModelGovernor::deploy(
            p,
            name.to_string(),
            model.accessToken,
            *timelock.address(),
            alloy::primitives::aliases::U48::from(params.voting_delay),
            params.voting_period,
            params.proposal_threshold,
            U256::from(params.quorum_percent),
        )
        .await
        .map_err(ChainError::contract("deploying the DAO's governor"))?;
        let (gov, tl) = (*governor.address(), *timelock.address());
        let proposer =
            timelock.PROPOSER_ROLE().call().await.map_err(ChainError::contract("reading a role"))?;
        let canceller =
            timelock.CANCELLER_ROLE().call().await.map_err(ChainError::contract("reading a role"))?;
        let admin =
            timelock.DEFAULT_ADMIN_ROLE().call().await.map_err(ChainError::contract("reading a role"))?;
        confirm("letting the governor propose", timelock.grantRole(proposer, gov).send().await).await?;
        confirm("letting the governor cancel", timelock.grantRole(canceller, gov).send().await).await?;
        confirm("giving up the timelock's admin", timelock.renounceRole(admin, self.address()).send().await)
            .await?;

        let token = ModelAccessToken::new(model.accessToken, p);
        let token_admin =
            token.DEFAULT_ADMIN_ROLE().call().await.map_err(ChainError::contract("reading a role"))?;
        let minter = token.MINTER_ROLE().call().await.map_err(ChainError::contract("reading a role"))?;
        let price = token.pricePerToken().call().await.map_err(ChainError::contract("reading the sale"))?;
        confirm("paying the vault's settlements to the DAO", vault.updatePayout(model_id, tl).send().await)
            .await?;
        confirm("paying token sales to the DAO", token.configureSale(price, tl).send().await).await?;
        confirm("making the DAO the token's admin", token.grantRole(token_admin, tl).send().await).await?;
        confirm("giving up minting", token.renounceRole(minter, self.address()).send().await).await?;
        confirm("giving up the token's admin", token.renounceRole(token_admin, self.address()).send().await)
            .await?;
        // last: until now the sender could still undo everything above
        confirm("handing the model to the DAO", vault.transferModelOwnership(model_id, tl).send().await)
            .await?;
        Ok(Dao { governor: gov, timelock: tl })
    }
}

impl Client {
    /// Hands the governance of `ModelVault` and `PaymentStream` (upgrades, accepted tokens,
    /// delays) to a new `DaoTimelock` whose only proposer and executor is the sender, with a
    /// delay of `delay` seconds: from then on every governance call, an upgrade first, is public
    /// for that long before it can run. The timelock starts with no delay so that it can accept
    /// the ownerships and set its own delay in one batch, before anyone else can use it. Returns
    /// the timelock and records it as the deployment's governance.
    pub async fn govern_by_timelock(&self, d: &mut Deployment, delay: u64) -> Result<Address, ChainError> {
        let p = self.provider();
        let me = self.address();
        let timelock = DaoTimelock::deploy(p, U256::ZERO, vec![me], vec![me], Address::ZERO)
            .await
            .map_err(ChainError::contract("deploying the governance timelock"))?;
        let tl = *timelock.address();
        let vault = ModelVault::new(d.model_vault, p);
        let stream = crate::bindings::PaymentStream::new(d.payment_stream, p);
        confirm("offering the vault to the timelock", vault.transferOwnership(tl).send().await).await?;
        confirm("offering PaymentStream to the timelock", stream.transferOwnership(tl).send().await).await?;
        let targets = vec![d.model_vault, d.payment_stream, tl];
        let values = vec![U256::ZERO; 3];
        let accept = alloy::primitives::Bytes::from(ModelVault::acceptOwnershipCall {}.abi_encode());
        let set_delay = DaoTimelock::updateDelayCall { newDelay: U256::from(delay) }.abi_encode().into();
        let payloads = vec![accept.clone(), accept, set_delay];
        let (zero, salt) = (B256::ZERO, B256::ZERO);
        confirm(
            "scheduling the hand-over",
            timelock
                .scheduleBatch(targets.clone(), values.clone(), payloads.clone(), zero, salt, U256::ZERO)
                .send()
                .await,
        )
        .await?;
        confirm(
            "running the hand-over",
            timelock.executeBatch(targets, values, payloads, zero, salt).send().await,
        )
        .await?;
        d.governance = tl;
        Ok(tl)
    }
}

/// The DAO that owns model `model_id`, if its owner is a `DaoTimelock` whose proposer is a
/// governor of the model's access token.
pub async fn find_dao(p: &DynProvider, d: &Deployment, model_id: B256) -> Result<Option<Dao>, ChainError> {
    let vault = ModelVault::new(d.model_vault, p);
    let model = vault.getModel(model_id).call().await.map_err(ChainError::contract("reading the model"))?;
    let timelock = model.owner;
    let code = p.get_code_at(timelock).await.map_err(ChainError::rpc("reading the owner's code"))?;
    if code.is_empty() {
        return Ok(None);
    }
    let tl = DaoTimelock::new(timelock, p);
    let Ok(proposer) = tl.PROPOSER_ROLE().call().await else { return Ok(None) };
    let logs = p
        .get_logs(
            &Filter::new()
                .address(timelock)
                .event_signature(DaoTimelock::RoleGranted::SIGNATURE_HASH)
                .topic1(proposer)
                .from_block(d.deployed_at_block),
        )
        .await
        .map_err(ChainError::rpc("reading the timelock's roles"))?;
    for log in logs.iter().rev() {
        let Ok(e) = DaoTimelock::RoleGranted::decode_log(&log.inner) else { continue };
        let candidate = e.data.account;
        let has =
            tl.hasRole(proposer, candidate).call().await.map_err(ChainError::contract("reading a role"))?;
        let token = ModelGovernor::new(candidate, p).token().call().await;
        if has && token.is_ok_and(|t| t == model.accessToken) {
            return Ok(Some(Dao { governor: candidate, timelock }));
        }
    }
    Ok(None)
}
