//! The user's and the owner's side of payments: `div deposit`, `div buy`, `div permit`,
//! `div balance`, `div withdraw`, and the operator's `div settle --now`; the owner's side is in
//! `cmd_earnings`.
//!
//! Amounts are given in whole units of the stablecoin (`--amount 2.5`) and converted with its
//! decimals from the address book; access tokens have 18 decimals.

use std::path::PathBuf;

use alloy::primitives::{Address, B256, U256, utils::format_units, utils::parse_units};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_chain::bindings::{DevStablecoin, ModelAccessToken, ModelVault, PaymentStream};
use div_chain::{Client, Deployment, SpendingPermit, permit_domain, sign_permit};

use crate::demo_env;

/// Where the chain is and who signs.
#[derive(clap::Args)]
pub struct Wallet {
    /// The signer's hex private key.
    #[arg(long, env = "DIV_USER_KEY", hide_env_values = true)]
    private_key: String,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
    /// The stablecoin (symbol in the address book).
    #[arg(long, default_value = "USDC")]
    token: String,
}

impl Wallet {
    async fn open(&self) -> anyhow::Result<(Client, Deployment, div_chain::Stablecoin)> {
        let signer: PrivateKeySigner =
            self.private_key.trim().parse().context("the key is not a hex private key")?;
        let d = Deployment::load(&self.addresses)
            .with_context(|| format!("reading the address book {}", self.addresses.display()))?;
        let coin = d
            .stablecoin(&self.token)
            .with_context(|| format!("no stablecoin {:?} in the address book", self.token))?
            .clone();
        let client = Client::connect(&d.rpc_url, signer).await.context("connecting to the chain")?;
        Ok((client, d, coin))
    }
}

pub(crate) async fn send<T>(
    what: &str,
    call: alloy::contract::CallBuilder<&&alloy::providers::DynProvider, std::marker::PhantomData<T>>,
) -> anyhow::Result<alloy::rpc::types::TransactionReceipt>
where
    T: alloy::sol_types::SolCall,
{
    let sent = call.send().await.map_err(|e| anyhow::anyhow!("{what}: {}", div_chain::revert_reason(&e)))?;
    let receipt = sent.get_receipt().await.with_context(|| format!("{what}: waiting for the receipt"))?;
    anyhow::ensure!(receipt.status(), "{what}: reverted ({})", receipt.transaction_hash);
    Ok(receipt)
}

/// `div deposit`.
#[derive(clap::Args)]
pub struct DepositArgs {
    #[command(flatten)]
    wallet: Wallet,
    /// How much to deposit (whole units, e.g. 10 or 2.5).
    #[arg(long)]
    amount: String,
    /// Mint the amount first (local development stablecoins only).
    #[arg(long)]
    mint: bool,
}

/// Runs `div deposit`.
pub async fn deposit(args: DepositArgs) -> anyhow::Result<()> {
    let (client, d, coin) = args.wallet.open().await?;
    let amount = parse_units(&args.amount, coin.decimals).context("--amount")?.get_absolute();
    let p = client.provider();
    let usdc = DevStablecoin::new(coin.address, p);
    if args.mint {
        anyhow::ensure!(coin.dev, "--mint works only with the local development stablecoins");
        send("minting", usdc.mint(client.address(), amount)).await?;
    }
    if usdc.allowance(client.address(), d.payment_stream).call().await? < amount {
        send("approving PaymentStream", usdc.approve(d.payment_stream, U256::MAX)).await?;
    }
    let ps = PaymentStream::new(d.payment_stream, p);
    send("depositing", ps.deposit(coin.address, amount)).await?;
    let balance = ps.getBalance(client.address(), coin.address).call().await?;
    println!(
        "deposited {} {}; balance {} {}",
        args.amount,
        coin.symbol,
        format_units(balance, coin.decimals)?,
        coin.symbol
    );
    Ok(())
}

/// `div buy`.
#[derive(clap::Args)]
pub struct BuyArgs {
    #[command(flatten)]
    wallet: Wallet,
    /// The model's id (0x…, as `GET /v1/models` lists it).
    #[arg(long)]
    model_id: B256,
    /// Access tokens to buy (whole tokens, 18 decimals).
    #[arg(long, default_value = "1")]
    amount: String,
    /// Mint the price first (local development stablecoins only).
    #[arg(long)]
    mint: bool,
}

/// Runs `div buy`: buys the model's access tokens in its primary sale.
pub async fn buy(args: BuyArgs) -> anyhow::Result<()> {
    let (client, d, _) = args.wallet.open().await?;
    let p = client.provider();
    let m = ModelVault::new(d.model_vault, p)
        .getModel(args.model_id)
        .call()
        .await
        .context("reading the model")?;
    let token = ModelAccessToken::new(m.accessToken, p);
    // the sale takes the stablecoin its owner priced it in, whatever the user pays hosts with
    let sale = token.paymentToken().call().await.context("reading the sale's stablecoin")?;
    let coin = d
        .stablecoins
        .iter()
        .find(|c| c.address == sale)
        .with_context(|| format!("the sale takes {sale}, a token this deployment does not list"))?
        .clone();
    let amount = parse_units(&args.amount, 18).context("--amount")?.get_absolute();
    let cost = token.quote(amount).call().await?;
    let usdc = DevStablecoin::new(coin.address, p);
    if args.mint {
        anyhow::ensure!(coin.dev, "--mint works only with the local development stablecoins");
        send("minting", usdc.mint(client.address(), cost)).await?;
    }
    if usdc.allowance(client.address(), m.accessToken).call().await? < cost {
        send("approving the sale", usdc.approve(m.accessToken, U256::MAX)).await?;
    }
    send("buying access tokens", token.buy(amount)).await?;
    let balance = token.balanceOf(client.address()).call().await?;
    println!(
        "bought {} access tokens of {} for {} {}; holding {}",
        args.amount,
        m.name,
        format_units(cost, coin.decimals)?,
        coin.symbol,
        format_units(balance, 18)?
    );
    Ok(())
}

/// `div permit`.
#[derive(clap::Args)]
pub struct PermitArgs {
    #[command(flatten)]
    wallet: Wallet,
    /// The host's URL.
    #[arg(long, env = "DIV_URL")]
    url: String,
    /// The model's name on the host.
    #[arg(long, env = "DIV_MODEL")]
    model: String,
    /// The most the host may ever charge on this permit (whole units).
    #[arg(long, default_value = "5")]
    max: String,
    /// Days until the permit expires.
    #[arg(long, default_value_t = 30)]
    days: u64,
    /// Also write the key into this env file.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// The variable the key is printed and written as.
    #[arg(long, default_value = "DIV_API_KEY")]
    env_var: String,
}

/// Runs `div permit`: signs a spending permit for the host and gets its API key.
pub async fn permit(args: PermitArgs) -> anyhow::Result<()> {
    let (client, d, coin) = args.wallet.open().await?;
    let http = reqwest::Client::new();
    let url = args.url.trim_end_matches('/');
    let host: serde_json::Value = http.get(format!("{url}/v1/host")).send().await?.json().await?;
    let host_addr: Address = host["host"].as_str().context("the host does not meter payments")?.parse()?;
    let models: serde_json::Value = http.get(format!("{url}/v1/models")).send().await?.json().await?;
    let entry = models["data"]
        .as_array()
        .and_then(|v| v.iter().find(|m| m["id"] == args.model.as_str()))
        .with_context(|| format!("the host serves no model {:?}", args.model))?;
    let model_id: B256 = entry["model_id"]
        .as_str()
        .with_context(|| format!("{:?} is not a paid model", args.model))?
        .parse()?;
    // a name is only a label: say exactly which model (and whose) the permit pays for, and
    // check it against the chain, not only against the host's word
    let on_chain = ModelVault::new(d.model_vault, client.provider()).getModel(model_id).call().await?;
    if on_chain.name != args.model {
        bail!(
            "the host says {:?} is {model_id:#x}, but ModelVault names that model {:?}",
            args.model,
            on_chain.name
        );
    }
    println!("model {:?} = {model_id:#x}, owner {}", args.model, on_chain.owner);
    let expiry =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + args.days * 86_400;
    let permit = SpendingPermit {
        user: client.address(),
        modelId: model_id,
        host: host_addr,
        token: coin.address,
        maxAmount: parse_units(&args.max, coin.decimals).context("--max")?.get_absolute(),
        expiry,
        nonce: U256::from_be_bytes(rand::random::<[u8; 32]>()),
    };
    let domain = permit_domain(d.chain_id, d.payment_stream);
    let signer: PrivateKeySigner = args.wallet.private_key.trim().parse()?;
    let signature = sign_permit(&signer, &permit, &domain).await?;
    // prove to the host that this wallet, not just someone holding the permit, asks for the key
    let challenge: serde_json::Value =
        http.get(format!("{url}/v1/keys/challenge")).send().await?.json().await?;
    let nonce = challenge["challenge"].as_str().context("the host gave no key challenge")?;
    let message = div_meter::key_proof_message(host_addr, permit.signing_hash(&domain), nonce);
    let proof = alloy::signers::Signer::sign_message(&signer, message.as_bytes()).await?;
    let body = serde_json::json!({
        "permit": {
            "user": permit.user, "modelId": permit.modelId, "host": permit.host, "token": permit.token,
            "maxAmount": permit.maxAmount.to_string(), "expiry": permit.expiry, "nonce": permit.nonce.to_string(),
        },
        "signature": signature,
        "chainId": d.chain_id,
        "verifyingContract": d.payment_stream,
        "proof": {"challenge": nonce, "signature": format!("0x{}", alloy::hex::encode(proof.as_bytes()))},
    });
    let resp = http.post(format!("{url}/v1/keys")).json(&body).send().await?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        bail!("the host refused the permit ({status}): {}", answer["error"]["message"]);
    }
    let key = answer["key"].as_str().context("no key in the answer")?;
    println!("permit {} for up to {} {} on {}", answer["permit_hash"], args.max, coin.symbol, args.model);
    println!("{}={key}", args.env_var);
    if let Some(env) = &args.env_file {
        demo_env::merge(env, &[(args.env_var.as_str(), key.to_string())])?;
    }
    Ok(())
}

/// `div balance`.
#[derive(clap::Args)]
pub struct BalanceArgs {
    #[command(flatten)]
    wallet: Wallet,
}

/// Runs `div balance`: the deposit, any withdrawal waiting, and the wallet's own balance.
pub async fn balance(args: BalanceArgs) -> anyhow::Result<()> {
    let (client, d, coin) = args.wallet.open().await?;
    let p = client.provider();
    let ps = PaymentStream::new(d.payment_stream, p);
    let me = client.address();
    let dep = ps.getBalance(me, coin.address).call().await?;
    let pending = ps.pendingWithdrawal(me, coin.address).call().await?;
    let wallet = DevStablecoin::new(coin.address, p).balanceOf(me).call().await?;
    let f = |v: U256| format_units(v, coin.decimals).unwrap_or_default();
    println!("{me}: deposit {} {}; wallet {} {}", f(dep), coin.symbol, f(wallet), coin.symbol);
    if pending.amount > U256::ZERO {
        println!("withdrawal of {} {} ready at unix {}", f(pending.amount), coin.symbol, pending.readyAt);
    }
    Ok(())
}

/// `div withdraw`.
#[derive(clap::Args)]
pub struct WithdrawArgs {
    #[command(flatten)]
    wallet: Wallet,
    /// Ask to withdraw this much (whole units); it can be taken after the delay.
    #[arg(long, conflicts_with_all = ["finish", "cancel"])]
    amount: Option<String>,
    /// Take a withdrawal whose delay has passed.
    #[arg(long)]
    finish: bool,
    /// Cancel a pending withdrawal.
    #[arg(long)]
    cancel: bool,
}

/// Runs `div withdraw`.
pub async fn withdraw(args: WithdrawArgs) -> anyhow::Result<()> {
    let (client, d, coin) = args.wallet.open().await?;
    let ps = PaymentStream::new(d.payment_stream, client.provider());
    if let Some(a) = &args.amount {
        let amount = parse_units(a, coin.decimals).context("--amount")?.get_absolute();
        send("requesting the withdrawal", ps.requestWithdraw(coin.address, amount)).await?;
        let p = ps.pendingWithdrawal(client.address(), coin.address).call().await?;
        println!(
            "withdrawal of {a} {} requested; take it after unix {} with --finish",
            coin.symbol, p.readyAt
        );
    } else if args.finish {
        send("withdrawing", ps.withdraw(coin.address)).await?;
        println!("withdrawn");
    } else if args.cancel {
        send("cancelling the withdrawal", ps.cancelWithdraw(coin.address)).await?;
        println!("withdrawal cancelled");
    } else {
        bail!("say --amount X, --finish or --cancel");
    }
    Ok(())
}

/// `div settle`.
#[derive(clap::Args)]
pub struct SettleArgs {
    /// Settle now.
    #[arg(long, required = true)]
    now: bool,
    /// The host's URL.
    #[arg(long, env = "DIV_URL")]
    url: String,
    /// The host's state folder (holding its admin token).
    #[arg(long, env = "DIV_HOST_STATE", default_value = ".div/host")]
    state_dir: PathBuf,
    /// Settle only on this chain (a host taking payment on several settles each by default).
    #[arg(long)]
    chain_id: Option<u64>,
}

/// Runs `div settle --now`: asks the host to settle at once.
pub async fn settle(args: SettleArgs) -> anyhow::Result<()> {
    let _ = args.now;
    let token = std::fs::read_to_string(args.state_dir.join("admin-token"))
        .with_context(|| format!("reading the host's admin token in {}", args.state_dir.display()))?;
    let resp = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()?
        .post(match args.chain_id {
            Some(id) => format!("{}/v1/host/settle?chain_id={id}", args.url.trim_end_matches('/')),
            None => format!("{}/v1/host/settle", args.url.trim_end_matches('/')),
        })
        .bearer_auth(token.trim())
        .send()
        .await?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await?;
    if status == reqwest::StatusCode::ACCEPTED {
        println!("the settlement is still waiting for the chain; it goes on in the background");
        return Ok(());
    }
    if !status.is_success() {
        bail!("the host did not settle ({status}): {}", v["error"]["message"]);
    }
    let Some(chains) = v["chains"].as_array() else {
        print_round("", &v);
        return Ok(());
    };
    // a host that takes payment on several chains settles each; one down does not stop the rest
    let mut failed = Vec::new();
    for c in chains {
        let prefix = format!("chain {}: ", c["chain_id"]);
        if let Some(message) = c["error"]["message"].as_str() {
            println!("{prefix}not settled: {message}");
            failed.push(c["chain_id"].to_string());
        } else if c["status"] == "pending" {
            println!("{prefix}the settlement is still waiting for the chain; it goes on in the background");
        } else {
            print_round(&prefix, c);
        }
    }
    if !failed.is_empty() {
        bail!("not settled on chain {}", failed.join(", "));
    }
    Ok(())
}

/// One chain's settlement round as `POST /v1/host/settle` reports it.
fn print_round(prefix: &str, v: &serde_json::Value) {
    if v["not_settler"] == true {
        println!(
            "{prefix}another replica of this host holds the settlement lease and settles (every --settle-interval-secs)"
        );
        return;
    }
    let already = v["already_settled"].as_u64().unwrap_or(0);
    if already > 0 {
        println!("{prefix}{already} requests were already settled on chain (a round mined but not seen)");
    }
    match v["tx"].as_str() {
        Some(tx) => println!(
            "{prefix}settled {} requests ({} base units) in {tx}, {} gas",
            v["requests"],
            v["amount"].as_str().unwrap_or("0"),
            v["gas_used"]
        ),
        None if v["skipped"].as_u64().unwrap_or(0) > 0 => {
            println!(
                "{prefix}nothing to settle: PaymentStream would refuse every entry ({} skipped)",
                v["skipped"]
            )
        }
        None => println!("{prefix}nothing to settle"),
    }
}
