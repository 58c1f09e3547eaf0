//! Deploying DIV to an EVM chain and registering models on it.
//!
//! [`Client::deploy_all`] puts the whole contract set on any JSON-RPC endpoint: stablecoin
//! stand-ins where the chain has none of ours, `ModelVault` and `PaymentStream` behind ERC-1967
//! proxies (UUPS), the `ModelAccessToken` implementation that per-model token proxies share, and
//! the link from vault to payment contract. [`Client::register_model`] gives one model its access
//! token and its entry in the vault. Every transaction is awaited to its receipt and a revert is
//! reported by its decoded custom error.

use alloy::network::{Ethereum, EthereumWallet};
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{DynProvider, PendingTransactionBuilder, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;

use crate::addresses::{Deployment, Stablecoin};
use crate::bindings::{
    DevPlainStablecoin, DevStablecoin, DivProxy, IModelVault, ModelAccessToken, ModelVault, PaymentStream,
};
use crate::error::ChainError;

/// A wallet-backed connection to the chain: deploys, registers, and sends as one account.
#[derive(Clone)]
pub struct Client {
    provider: DynProvider,
    from: Address,
    rpc_url: String,
}

/// What an owner registers for one model.
#[derive(Debug, Clone)]
pub struct ModelRegistration {
    /// Unique per owner; the model id is `keccak256(abi.encode(owner, name))`.
    pub name: String,
    /// Content id of the encrypted package.
    pub cid: String,
    /// Content id of the plugin component ("" for none).
    pub plugin_cid: String,
    /// Price per request in the payment stablecoin's base units.
    pub price_per_request: U256,
    /// Price per 1000 tokens (0 when priced per request only).
    pub price_per_1k_tokens: U256,
    /// Where earnings go (defaults to the owner when `None`).
    pub payout: Option<Address>,
    /// Key custodians, each holding one share.
    pub custodians: Vec<Address>,
    /// Shares needed to recover the key.
    pub threshold: u8,
    /// Access token name and symbol.
    pub token_name: String,
    /// Access token symbol.
    pub token_symbol: String,
    /// Stablecoin the token's primary sale takes.
    pub sale_token: Address,
    /// Price of one whole access token in `sale_token` base units (0 closes the sale).
    pub token_price: U256,
}

/// A model after registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegisteredModel {
    /// Its id in `ModelVault`.
    pub model_id: alloy::primitives::B256,
    /// Its `ModelAccessToken` proxy.
    pub access_token: Address,
}

/// Awaits a sent transaction's receipt and turns a revert into an error.
pub(crate) async fn confirm(
    what: &'static str,
    sent: Result<PendingTransactionBuilder<Ethereum>, alloy::contract::Error>,
) -> Result<TransactionReceipt, ChainError> {
    let pending = sent.map_err(ChainError::contract(what))?;
    let receipt = pending.get_receipt().await.map_err(ChainError::pending(what))?;
    if !receipt.status() {
        return Err(ChainError::Reverted { what, tx: receipt.transaction_hash });
    }
    Ok(receipt)
}

impl Client {
    /// Connects to `rpc_url` with `signer` paying for transactions. Every call gives up after
    /// [`RPC_TIMEOUT`](crate::rpc::RPC_TIMEOUT); each transaction's nonce is read from the chain
    /// when it is sent (never from a local counter that a failed send would leave ahead of the
    /// chain, stranding every later transaction behind a gap).
    pub async fn connect(rpc_url: &str, signer: PrivateKeySigner) -> Result<Self, ChainError> {
        Self::connect_with_timeout(rpc_url, signer, crate::rpc::RPC_TIMEOUT).await
    }

    /// [`Client::connect`] with another deadline per call.
    pub async fn connect_with_timeout(
        rpc_url: &str,
        signer: PrivateKeySigner,
        timeout: std::time::Duration,
    ) -> Result<Self, ChainError> {
        let me = Self::build(rpc_url, signer, timeout, None)?;
        me.provider.get_chain_id().await.map_err(ChainError::rpc("reading the chain id"))?;
        Ok(me)
    }

    /// [`Client::connect_with_timeout`] without asking the chain anything: transactions are
    /// signed for `chain_id` (from the address book). For a chain that may be down when the host
    /// starts; check [`Provider::get_chain_id`] once it answers.
    pub fn connect_lazy(
        rpc_url: &str,
        signer: PrivateKeySigner,
        timeout: std::time::Duration,
        chain_id: u64,
    ) -> Result<Self, ChainError> {
        Self::build(rpc_url, signer, timeout, Some(chain_id))
    }

    /// The wallet's provider: gas estimated (with a margin, see [`crate::gas`]), the nonce read from the chain at each send, and the
    /// chain id `chain_id` (or the RPC's, asked once, when `None`).
    fn build(
        rpc_url: &str,
        signer: PrivateKeySigner,
        timeout: std::time::Duration,
        chain_id: Option<u64>,
    ) -> Result<Self, ChainError> {
        let from = signer.address();
        let client = crate::rpc::rpc_client(rpc_url, timeout)?;
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .filler(crate::gas::GasMarginFiller::default())
            .with_simple_nonce_management()
            .filler(alloy::providers::fillers::ChainIdFiller::new(chain_id))
            .wallet(EthereumWallet::from(signer))
            .connect_client(client)
            .erased();
        Ok(Self { provider, from, rpc_url: rpc_url.to_string() })
    }

    /// The provider (with the wallet attached).
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// The sending address.
    pub fn address(&self) -> Address {
        self.from
    }

    /// Deploys the whole contract set. `stablecoins` are existing tokens to accept; when empty,
    /// USDC (6 decimals) and USDFC (18 decimals) stand-ins with EIP-2612 permits are deployed,
    /// and a USDT stand-in (6 decimals) without.
    pub async fn deploy_all(&self, stablecoins: &[Stablecoin]) -> Result<Deployment, ChainError> {
        let p = &self.provider;
        let chain_id = p.get_chain_id().await.map_err(ChainError::rpc("reading the chain id"))?;
        let mut coins = stablecoins.to_vec();
        if coins.is_empty() {
            for (name, symbol, decimals) in
                [("USD Coin (DIV dev)", "USDC", 6u8), ("USD for Filecoin (DIV dev)", "USDFC", 18u8)]
            {
                let c = DevStablecoin::deploy(p, name.to_string(), symbol.to_string(), decimals)
                    .await
                    .map_err(ChainError::contract("deploying a stablecoin stand-in"))?;
                coins.push(Stablecoin { symbol: symbol.into(), address: *c.address(), decimals, dev: true });
            }
            // a stablecoin without EIP-2612 permits (as USDT has none): wallets approve, then deposit
            let c =
                DevPlainStablecoin::deploy(p, "Tether USD (DIV dev)".to_string(), "USDT".to_string(), 6u8)
                    .await
                    .map_err(ChainError::contract("deploying a stablecoin stand-in"))?;
            coins.push(Stablecoin { symbol: "USDT".into(), address: *c.address(), decimals: 6, dev: true });
        }

        let vault_impl = ModelVault::deploy(p).await.map_err(ChainError::contract("deploying ModelVault"))?;
        let init = ModelVault::initializeCall { governance: self.from }.abi_encode();
        let vault = self.proxy(*vault_impl.address(), init, "deploying the ModelVault proxy").await?;

        let stream_impl =
            PaymentStream::deploy(p).await.map_err(ChainError::contract("deploying PaymentStream"))?;
        let init = PaymentStream::initializeCall {
            governance: self.from,
            vault_: vault,
            tokens: coins.iter().map(|c| c.address).collect(),
        }
        .abi_encode();
        let stream = self.proxy(*stream_impl.address(), init, "deploying the PaymentStream proxy").await?;

        let vault_c = ModelVault::new(vault, p);
        confirm("linking the vault to PaymentStream", vault_c.setPaymentStream(stream).send().await).await?;

        let token_impl =
            ModelAccessToken::deploy(p).await.map_err(ChainError::contract("deploying ModelAccessToken"))?;
        let block = p.get_block_number().await.map_err(ChainError::rpc("reading the block number"))?;

        Ok(Deployment {
            chain_id,
            rpc_url: self.rpc_url.clone(),
            governance: self.from,
            model_vault: vault,
            payment_stream: stream,
            access_token_implementation: *token_impl.address(),
            stablecoins: coins,
            deployed_at_block: block,
        })
    }

    async fn proxy(
        &self,
        implementation: Address,
        init: Vec<u8>,
        what: &'static str,
    ) -> Result<Address, ChainError> {
        let proxy = DivProxy::deploy(&self.provider, implementation, Bytes::from(init))
            .await
            .map_err(ChainError::contract(what))?;
        Ok(*proxy.address())
    }

    /// Deploys the model's access token (a proxy of the shared implementation, administered by
    /// the sender) and registers the model in the vault, owned by the sender.
    pub async fn register_model(
        &self,
        deployment: &Deployment,
        reg: &ModelRegistration,
    ) -> Result<RegisteredModel, ChainError> {
        let payout = reg.payout.unwrap_or(self.from);
        let init = ModelAccessToken::initializeCall {
            name_: reg.token_name.clone(),
            symbol_: reg.token_symbol.clone(),
            admin: self.from,
            paymentToken_: reg.sale_token,
            pricePerToken_: reg.token_price,
            payout_: payout,
        }
        .abi_encode();
        let token = self
            .proxy(deployment.access_token_implementation, init, "deploying the model's access token")
            .await?;
        let vault = ModelVault::new(deployment.model_vault, &self.provider);
        let config = IModelVault::ModelConfig {
            name: reg.name.clone(),
            cid: reg.cid.clone(),
            pluginCid: reg.plugin_cid.clone(),
            accessToken: token,
            payout,
            pricePerRequest: reg.price_per_request,
            pricePer1kTokens: reg.price_per_1k_tokens,
            custodians: reg.custodians.clone(),
            threshold: reg.threshold,
        };
        confirm("registering the model", vault.registerModel(config).send().await).await?;
        let model_id = vault
            .modelIdOf(self.from, reg.name.clone())
            .call()
            .await
            .map_err(ChainError::contract("reading the model id"))?;
        Ok(RegisteredModel { model_id, access_token: token })
    }

    /// Authorises `host` to serve (and be paid for) the sender's model `model_id`.
    pub async fn authorize_host(
        &self,
        deployment: &Deployment,
        model_id: alloy::primitives::B256,
        host: Address,
    ) -> Result<(), ChainError> {
        let vault = ModelVault::new(deployment.model_vault, &self.provider);
        confirm("authorising the host", vault.authorizeHost(model_id, host).send().await).await?;
        Ok(())
    }

    /// Publishes the sender, a host, at `url` serving `models`, unless the vault already says
    /// exactly that (same URL, same set of models). `models: None` keeps the models published
    /// before when the URL is unchanged. Returns whether a transaction was sent.
    pub async fn ensure_host_registered(
        &self,
        deployment: &Deployment,
        url: &str,
        models: Option<&[alloy::primitives::B256]>,
    ) -> Result<bool, ChainError> {
        let vault = ModelVault::new(deployment.model_vault, &self.provider);
        let now = vault
            .hostRecord(self.address())
            .call()
            .await
            .map_err(ChainError::contract("reading the host's registration"))?;
        let registered = now.registeredAt != 0 && now.url == url;
        let mut wanted: Vec<alloy::primitives::B256> = match models {
            Some(m) => m.to_vec(),
            None if registered => return Ok(false),
            None => Vec::new(),
        };
        let mut have = now.models;
        have.sort();
        wanted.sort();
        wanted.dedup();
        if registered && have == wanted {
            return Ok(false);
        }
        confirm("registering the host", vault.registerHost(url.to_string(), wanted).send().await).await?;
        Ok(true)
    }

    /// Stops `host` serving the sender's model `model_id`.
    pub async fn revoke_host(
        &self,
        deployment: &Deployment,
        model_id: alloy::primitives::B256,
        host: Address,
    ) -> Result<(), ChainError> {
        let vault = ModelVault::new(deployment.model_vault, &self.provider);
        confirm("revoking the host", vault.revokeHost(model_id, host).send().await).await?;
        Ok(())
    }

    /// Points the sender's model at new content (a re-published ciphertext and plugin) and its
    /// new custodian set.
    pub async fn update_content(
        &self,
        deployment: &Deployment,
        model_id: alloy::primitives::B256,
        cid: &str,
        plugin_cid: &str,
        custodians: Vec<Address>,
        threshold: u8,
    ) -> Result<(), ChainError> {
        let vault = ModelVault::new(deployment.model_vault, &self.provider);
        confirm(
            "updating the custodians",
            vault.updateCustodians(model_id, custodians, threshold).send().await,
        )
        .await?;
        confirm(
            "updating the content",
            vault.updateContent(model_id, cid.to_string(), plugin_cid.to_string()).send().await,
        )
        .await?;
        Ok(())
    }
}
