//! `div publish`: a model folder and its plugin, from plaintext on the owner's disk to an
//! encrypted, registered, served model.
//!
//! Steps, each recorded in `<work-dir>/state.json` as it completes so a re-run resumes where a
//! crash stopped it:
//!
//! 1. deal a fresh content key t-of-n, seal each share to its custodian's published key, and
//!    encrypt the package (streaming, with a progress bar) to `<work-dir>/model.divenc`;
//! 2. store the ciphertext and the plugin, getting their content ids;
//! 3. deposit every share with its custodian;
//! 4. register the model in `ModelVault` (or point an existing registration at the new content);
//! 5. authorise the given hosts.
//!
//! The content key itself is never written: the state keeps only the shares sealed to the
//! custodians, so a crash before step 1 ends simply starts over with a new key, and a model is
//! registered only after its ciphertext is stored and every share delivered.

use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256, U256, utils::parse_units};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_chain::{Client, Deployment, ModelRegistration, bindings::ModelVault};
use div_custodian::{Endpoint, deposit_sealed, fetch_info, seal_share};
use div_vault::{Header, Sealed, Store, format, package::Packer, shares};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Arguments of `div publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The model package folder (`manifest.json` and the files it lists).
    dir: PathBuf,
    /// The plugin component (`.wasm`).
    #[arg(long)]
    plugin: PathBuf,
    /// A custodian's base URL (repeatable; their order is the share order).
    #[arg(long = "custodian", required = true)]
    custodians: Vec<String>,
    /// Shares needed to recover the key.
    #[arg(long, default_value_t = 2)]
    threshold: u8,
    /// Price per request in US dollars (e.g. 0.001), charged in whichever accepted stablecoin a
    /// user's permit names (stored in micro-dollars).
    #[arg(long, default_value = "0.001")]
    price: String,
    /// Price per 1000 tokens (prompt and generated; text generation) in US dollars, charged on
    /// top of `--price`.
    #[arg(long, default_value = "0")]
    price_per_1k_tokens: String,
    /// Price of one access token, in whole units of the sale stablecoin.
    #[arg(long, default_value = "1")]
    token_price: String,
    /// The stablecoin (symbol in the address book) the access token sells for.
    #[arg(long, default_value = "USDC")]
    sale_token: String,
    /// Hosts to authorise (repeatable).
    #[arg(long = "authorize")]
    hosts: Vec<Address>,
    /// Where to store the ciphertext: a directory, or `ipfs+http://HOST:PORT` for a Kubo node.
    #[arg(long, env = "DIV_STORE", default_value = ".div/store")]
    store: String,
    /// The owner's hex private key.
    #[arg(long, env = "DIV_OWNER_KEY", hide_env_values = true)]
    private_key: String,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
    /// Where progress is kept between runs (default `.div/publish/<model name>`).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Encryption chunk size in bytes.
    #[arg(long, default_value_t = format::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// What a run has done so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PublishState {
    /// What is being published: digest of manifest, plugin and custodian set.
    input: String,
    model_id: B256,
    name: String,
    custodians: Vec<Address>,
    threshold: u8,
    /// The encoded ciphertext header (hex).
    header: String,
    /// One share per custodian, sealed to it.
    sealed: Vec<Sealed>,
    cid: Option<String>,
    plugin_cid: Option<String>,
    delivered: Vec<bool>,
    registered: bool,
}

fn save(path: &Path, state: &PublishState) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs `div publish`.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let owner: PrivateKeySigner =
        args.private_key.trim().parse().context("the owner key is not a hex private key")?;
    let d = Deployment::load(&args.addresses)
        .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
    let packer =
        Packer::from_dir(&args.dir).with_context(|| format!("reading the package {}", args.dir.display()))?;
    let manifest: serde_json::Value = serde_json::from_slice(packer.manifest())?;
    let name = manifest["name"].as_str().context("manifest.json has no name")?.to_string();
    let plugin = std::fs::read(&args.plugin).with_context(|| format!("reading {}", args.plugin.display()))?;
    let n = u8::try_from(args.custodians.len()).context("at most 255 custodians")?;
    if args.threshold == 0 || args.threshold > n {
        bail!("--threshold {} with {n} custodians", args.threshold);
    }
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build()?;
    let mut endpoints = Vec::new();
    let mut keys = Vec::new();
    for url in &args.custodians {
        let (address, key) =
            fetch_info(&http, url).await.with_context(|| format!("asking custodian {url}"))?;
        endpoints.push(Endpoint { address, url: url.clone() });
        keys.push(key);
    }
    let model_id = div_custodian::protocol::model_id(owner.address(), &name);
    let input = {
        let mut h = Sha256::new();
        h.update(packer.manifest());
        h.update(Sha256::digest(&plugin));
        for e in &endpoints {
            h.update(e.address);
        }
        h.update([args.threshold]);
        hex::encode(h.finalize())
    };
    let work = args.work_dir.clone().unwrap_or_else(|| PathBuf::from(".div/publish").join(&name));
    std::fs::create_dir_all(&work)?;
    let state_path = work.join("state.json");
    let ciphertext_path = work.join("model.divenc");
    let resumed = std::fs::read(&state_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<PublishState>(&b).ok())
        .filter(|s| s.input == input && s.model_id == model_id && ciphertext_path.exists());
    let mut state = match resumed {
        Some(s) => {
            println!("resuming the publication of {name} from {}", state_path.display());
            s
        }
        None => {
            let state = encrypt(&args, &packer, model_id, &name, &endpoints, &keys, &ciphertext_path, input)?;
            save(&state_path, &state)?;
            state
        }
    };
    let (header, _) = Header::decode(&hex::decode(&state.header)?)?;

    let store = Store::from_spec(&args.store);
    if state.cid.is_none() {
        let cid = store.put_file(&ciphertext_path).await.context("storing the ciphertext")?;
        state.cid = Some(cid.v1());
        save(&state_path, &state)?;
    }
    if state.plugin_cid.is_none() {
        let cid = store.put_bytes(plugin.clone()).await.context("storing the plugin")?;
        state.plugin_cid = Some(cid.v1());
        save(&state_path, &state)?;
    }
    let cid = state.cid.clone().unwrap_or_default();
    let plugin_cid = state.plugin_cid.clone().unwrap_or_default();
    println!("ciphertext {cid}\nplugin     {plugin_cid}");

    for (i, ep) in endpoints.iter().enumerate() {
        if state.delivered[i] {
            continue;
        }
        deposit_sealed(&http, ep, &owner, &name, i as u8 + 1, &header, state.sealed[i].clone())
            .await
            .with_context(|| format!("delivering share {} to {}", i + 1, ep.url))?;
        state.delivered[i] = true;
        save(&state_path, &state)?;
        println!("share {} delivered to {} ({})", i + 1, ep.address, ep.url);
    }

    let client = Client::connect(&d.rpc_url, owner.clone()).await.context("connecting to the chain")?;
    let vault = ModelVault::new(d.model_vault, client.provider().clone());
    let existing = vault.getModel(model_id).call().await.ok();
    match existing {
        Some(m) if m.cid == cid && m.pluginCid == plugin_cid => println!("already registered: {model_id:#x}"),
        Some(_) => {
            client
                .update_content(&d, model_id, &cid, &plugin_cid, state.custodians.clone(), state.threshold)
                .await
                .context("pointing the registered model at the new content")?;
            println!("updated {model_id:#x} to the new content");
        }
        None => {
            let coin = d
                .stablecoin(&args.sale_token)
                .with_context(|| format!("no stablecoin {:?} in the address book", args.sale_token))?;
            let parse = |s: &str, decimals: u8, what: &str| -> anyhow::Result<U256> {
                Ok(parse_units(s, decimals).with_context(|| format!("{what} {s:?}"))?.get_absolute())
            };
            // request prices are dollars (micro-dollars on chain); the token sale's price is an
            // amount of its stablecoin
            let usd = |s: &str, what: &str| parse(s, div_meter::PRICE_DECIMALS, what);
            let units = |s: &str, what: &str| parse(s, coin.decimals, what);
            let reg = ModelRegistration {
                name: name.clone(),
                cid: cid.clone(),
                plugin_cid: plugin_cid.clone(),
                price_per_request: usd(&args.price, "--price")?,
                price_per_1k_tokens: usd(&args.price_per_1k_tokens, "--price-per-1k-tokens")?,
                payout: None,
                custodians: state.custodians.clone(),
                threshold: state.threshold,
                token_name: format!("{name} access"),
                token_symbol: "DIVA".into(),
                sale_token: coin.address,
                token_price: units(&args.token_price, "--token-price")?,
            };
            let registered = client.register_model(&d, &reg).await.context("registering the model")?;
            println!("registered {model_id:#x} (access token {})", registered.access_token);
        }
    }
    state.registered = true;
    save(&state_path, &state)?;
    for host in &args.hosts {
        if vault.isHostAuthorized(model_id, *host).call().await.unwrap_or(false) {
            println!("host {host} already authorised");
            continue;
        }
        client.authorize_host(&d, model_id, *host).await.with_context(|| format!("authorising {host}"))?;
        println!("host {host} authorised");
    }
    println!("published {name} as {model_id:#x}");
    Ok(())
}

/// Step 1: a fresh key, its shares sealed to the custodians, and the ciphertext on disk.
#[allow(clippy::too_many_arguments)]
fn encrypt(
    args: &PublishArgs,
    packer: &Packer,
    model_id: B256,
    name: &str,
    endpoints: &[Endpoint],
    keys: &[[u8; 32]],
    out: &Path,
    input: String,
) -> anyhow::Result<PublishState> {
    let n = endpoints.len() as u8;
    let dealing = shares::deal(&model_id.0, args.threshold, n)?;
    let header = Header::new(model_id.0, packer.len(), args.chunk_size, dealing.commitments.clone())?;
    let sealed = endpoints
        .iter()
        .zip(keys)
        .zip(&dealing.shares)
        .map(|((ep, key), share)| seal_share(ep, key, model_id, share))
        .collect::<Result<Vec<_>, _>>()?;
    let bar =
        if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(packer.len()) };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "encrypting {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let tmp = out.with_extension("divenc.tmp");
    let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    format::encrypt_stream(&dealing.content_key, &header, packer.reader()?, file, |done| {
        bar.set_position(done)
    })
    .context("encrypting the package")?;
    bar.finish_and_clear();
    std::fs::rename(&tmp, out)?;
    println!("encrypted {name}: {} bytes -> {}", packer.len(), out.display());
    Ok(PublishState {
        input,
        model_id,
        name: name.to_string(),
        custodians: endpoints.iter().map(|e| e.address).collect(),
        threshold: args.threshold,
        header: hex::encode(header.encode()),
        sealed,
        cid: None,
        plugin_cid: None,
        delivered: vec![false; endpoints.len()],
        registered: false,
    })
}
