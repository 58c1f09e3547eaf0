//! `div serve`: the host. Loads plaintext model packages from disk with their plugins and serves
//! the OpenAI-compatible API until SIGTERM or Ctrl-C, then drains in-flight requests.
//! With `--vault` it also serves every encrypted model `ModelVault` authorises it for: fetched
//! by content id, decrypted in memory with keys from the custodians, and kept in step with the
//! chain's events.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_api::{ApiConfig, AppState, Metrics, router};
use div_chain::Deployment;
use div_meter::settle::SettleConfig;
use div_meter::{Ledger, Meter, MeterConfig};
use div_models::{LoadOptions, ModelFiles, ModelStore, Origin};
use div_nn::OnnxConfig;
use div_runtime::{Limits, Runtime, RuntimeConfig};
use div_sync::{CustodianObserver, SyncConfig, VaultSync};
use div_vault::Store;

/// Arguments of `div serve`; every flag can also be set by the environment variable named.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DIV_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A model package folder to serve, optionally with its plugin: DIR or DIR=PLUGIN.wasm
    /// (without a plugin, the manifest's `plugin` file inside DIR). Repeatable.
    #[arg(long = "model", env = "DIV_MODELS", value_delimiter = ',', required_unless_present = "vault")]
    models: Vec<String>,
    /// Serve the encrypted models `ModelVault` authorises this host for, following its events.
    #[arg(long, env = "DIV_VAULT")]
    vault: bool,
    /// The host's hex private key (its identity to custodians and on-chain).
    #[arg(long, env = "DIV_HOST_KEY", hide_env_values = true, required_if_eq("vault", "true"))]
    host_key: Option<String>,
    /// A custodian's base URL (repeatable).
    #[arg(long = "custodian", env = "DIV_CUSTODIANS", value_delimiter = ',')]
    custodians: Vec<String>,
    /// Where ciphertexts are fetched from: a directory, or `ipfs+http://HOST:PORT` (Kubo).
    #[arg(long, env = "DIV_STORE", default_value = ".div/store")]
    store: String,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    addresses: PathBuf,
    /// How often to read new `ModelVault` events (ms).
    #[arg(long, env = "DIV_VAULT_POLL_MS", default_value_t = 1000)]
    vault_poll_ms: u64,
    /// Serve vault models without gating or metering (a private deployment).
    #[arg(long, env = "DIV_NO_METER")]
    no_meter: bool,
    /// Where the host keeps its charge ledger and admin token.
    #[arg(long, env = "DIV_HOST_STATE", default_value = ".div/host")]
    state_dir: PathBuf,
    /// Seconds between settlements while charges wait.
    #[arg(long, env = "DIV_SETTLE_INTERVAL_SECS", default_value_t = 30)]
    settle_interval_secs: u64,
    /// Settle at once when this many charged requests wait.
    #[arg(long, env = "DIV_SETTLE_MAX_PENDING", default_value_t = 1000)]
    settle_max_pending: u64,
    /// Postpone settlement while the gas price is above this (gwei).
    #[arg(long, env = "DIV_MAX_GAS_PRICE_GWEI")]
    max_gas_price_gwei: Option<u64>,
    /// Largest batch (inputs) without the premium tier.
    #[arg(long, env = "DIV_PREMIUM_BATCH", default_value_t = 16)]
    premium_batch: usize,
    /// Requests per second per permit (access tier; premium gets 10×).
    #[arg(long, env = "DIV_RATE_LIMIT", default_value_t = 50)]
    rate_limit: u32,
    /// How long chain reads (balances, thresholds, revocations) are trusted, in ms.
    #[arg(long, env = "DIV_CHAIN_CACHE_MS", default_value_t = 5000)]
    chain_cache_ms: u64,
    /// Plaintext bytes of models kept loaded (MiB); past it the least recently used is unloaded.
    #[arg(long, env = "DIV_MODEL_CACHE_MIB")]
    model_cache_mib: Option<u64>,
    /// ONNX Runtime's shared library (default: `libonnxruntime.so.*` in `./.venv`, where the
    /// bootstrap installs it).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_dylib: Option<PathBuf>,
    /// Where compiled plugins and snapshots are cached.
    #[arg(long, env = "DIV_CACHE_DIR", default_value = ".div/cache")]
    cache_dir: PathBuf,
    /// Inference requests served at once; more get 503 with Retry-After.
    #[arg(long, env = "DIV_MAX_CONCURRENCY", default_value_t = 64)]
    max_concurrency: usize,
    /// Largest request body in bytes.
    #[arg(long, env = "DIV_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Plugin memory limit (MiB) where a manifest sets none.
    #[arg(long, env = "DIV_PLUGIN_MEMORY_MIB", default_value_t = 256)]
    plugin_memory_mib: usize,
    /// Plugin deadline per request (ms) where a manifest sets none.
    #[arg(long, env = "DIV_PLUGIN_DEADLINE_MS", default_value_t = 10_000)]
    plugin_deadline_ms: u64,
    /// ONNX Runtime sessions per model (concurrent inferences on one model).
    #[arg(long, env = "DIV_ONNX_SESSIONS")]
    onnx_sessions: Option<usize>,
    /// ONNX Runtime threads per inference.
    #[arg(long, env = "DIV_ONNX_THREADS")]
    onnx_threads: Option<usize>,
    /// Serve the built web dApp (`web/dist`) at `/`.
    #[arg(long, env = "DIV_WEB_DIR")]
    web_dir: Option<PathBuf>,
    /// The chain RPC URL browsers should use (default: the address book's).
    #[arg(long, env = "DIV_PUBLIC_RPC_URL")]
    public_rpc_url: Option<String>,
    /// Context length (tokens) of each text-generation request on `ggml` models.
    #[arg(long, env = "DIV_LLM_CONTEXT", default_value_t = 2048)]
    llm_context: u32,
    /// Threads each text-generation request decodes with (default: one per core).
    #[arg(long, env = "DIV_LLM_THREADS")]
    llm_threads: Option<i32>,
    /// Run `initialize` in every request instead of snapshotting it once (for comparison).
    #[arg(long, env = "DIV_NO_SNAPSHOT")]
    no_snapshot: bool,
}

/// Runs `div serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ort = match args.ort_dylib.clone().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p,
        None => div_nn::locate_onnx_runtime(&std::env::current_dir()?)
            .context("no libonnxruntime.so in ./.venv; run `make bootstrap` or pass --ort-dylib")?,
    };
    div_nn::init_onnx_runtime(&ort)?;
    let runtime =
        Runtime::new(RuntimeConfig { cache_dir: Some(args.cache_dir.clone()), ..RuntimeConfig::default() })?;
    let metrics = Arc::new(Metrics::default());
    let defaults = OnnxConfig::default();
    let options = LoadOptions {
        backend_observer: Some(metrics.backend_observer()),
        onnx: OnnxConfig {
            sessions: args.onnx_sessions.unwrap_or(defaults.sessions),
            intra_threads: args.onnx_threads.unwrap_or(defaults.intra_threads),
            ..defaults
        },
        ggml: div_nn::GgmlConfig {
            n_ctx: args.llm_context.max(16),
            threads: args.llm_threads.unwrap_or(div_nn::GgmlConfig::default().threads).max(1),
            ..div_nn::GgmlConfig::default()
        },
        snapshot: !args.no_snapshot,
        default_limits: Limits {
            memory_bytes: args.plugin_memory_mib << 20,
            deadline: Duration::from_millis(args.plugin_deadline_ms),
            ..Limits::default()
        },
        capacity_bytes: args.model_cache_mib.map(|m| m << 20),
        ..LoadOptions::default()
    };
    let store = Arc::new(ModelStore::new(runtime, options));
    for spec in &args.models {
        let (dir, plugin) = match spec.split_once('=') {
            Some((d, p)) => (PathBuf::from(d), Some(PathBuf::from(p))),
            None => (PathBuf::from(spec), None),
        };
        let files =
            ModelFiles::read_dir(&dir).with_context(|| format!("reading the package {}", dir.display()))?;
        let plugin = match plugin.or_else(|| files.manifest.plugin.as_ref().map(|p| dir.join(p))) {
            Some(p) => p,
            None => bail!("{}: no plugin given (DIR=PLUGIN.wasm) and the manifest names none", dir.display()),
        };
        let wasm =
            std::fs::read(&plugin).with_context(|| format!("reading the plugin {}", plugin.display()))?;
        let origin = Origin::Folder(dir.display().to_string());
        let model = store
            .load_from(files, &wasm, origin)
            .await
            .with_context(|| format!("loading {}", dir.display()))?;
        println!("serving {} ({}) with {}", model.manifest.name, model.manifest.task, plugin.display());
    }
    let sync =
        if args.vault { Some(start_vault(&args, store.clone(), metrics.clone()).await?) } else { None };
    let loader = sync.as_ref().map(|(sync, _)| {
        let sync = sync.clone();
        let load: div_api::ModelLoader = Arc::new(move |name: &str| sync.request_load(name));
        load
    });
    let mut state = AppState::new(
        store,
        metrics.clone(),
        ApiConfig { max_body_bytes: args.max_body_bytes, max_concurrency: args.max_concurrency },
    );
    if let Some(load) = loader {
        state = state.with_loader(load);
    }
    if let Ok(text) = std::fs::read_to_string(&args.addresses) {
        let mut book: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
        if let Some(url) = &args.public_rpc_url {
            book["rpcUrl"] = url.clone().into();
        }
        state = state.with_deployment(book);
    }
    if let Some(dir) = &args.web_dir {
        if !dir.join("index.html").is_file() {
            bail!("--web-dir {}: no index.html (build it with `make web`)", dir.display());
        }
        println!("serving the web dApp from {}", dir.display());
        state = state.with_web_dir(dir.clone());
    }
    let mut settler = None;
    if args.vault && !args.no_meter {
        let (s, task) = start_meter(&args, state, metrics).await?;
        state = s;
        settler = Some(task);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    if let Some((_, task)) = sync {
        task.abort();
    }
    if let Some(task) = settler {
        task.abort();
    }
    Ok(())
}

/// Opens the charge ledger, gates and meters the vault's models, and starts settling.
async fn start_meter(
    args: &ServeArgs,
    state: AppState,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(AppState, tokio::task::JoinHandle<()>)> {
    let key = args.host_key.as_deref().context("metering needs --host-key")?;
    let host: PrivateKeySigner = key.trim().parse().context("--host-key is not a hex private key")?;
    let d = Deployment::load(&args.addresses)?;
    let provider = ProviderBuilder::new().connect_http(d.rpc_url.parse().context("RPC URL")?).erased();
    std::fs::create_dir_all(&args.state_dir)?;
    let ledger = Arc::new(
        Ledger::open(&args.state_dir.join("ledger"))
            .with_context(|| format!("opening the ledger in {}", args.state_dir.display()))?,
    );
    let meter = Arc::new(Meter::new(
        MeterConfig {
            host: host.clone(),
            chain_id: d.chain_id,
            payment_stream: d.payment_stream,
            model_vault: d.model_vault,
            provider,
            cache_ttl: Duration::from_millis(args.chain_cache_ms),
            premium_batch: args.premium_batch,
            rate_per_sec: args.rate_limit,
            premium_rate_per_sec: args.rate_limit.saturating_mul(10),
        },
        ledger,
    ));
    let client = div_chain::Client::connect(&d.rpc_url, host).await.context("connecting the host wallet")?;
    // a user may withdraw once the delay passes: every charge must be settled well before that
    let delay = div_chain::bindings::PaymentStream::new(d.payment_stream, client.provider())
        .withdrawDelay()
        .call()
        .await
        .context("reading PaymentStream.withdrawDelay")?;
    if args.settle_interval_secs.saturating_mul(4) > delay {
        bail!(
            "--settle-interval-secs {} is not well inside the withdraw delay of {delay} s (at most a quarter)",
            args.settle_interval_secs
        );
    }
    let admin_token = admin_token(&args.state_dir)?;
    let config = SettleConfig {
        interval: Duration::from_secs(args.settle_interval_secs.max(1)),
        max_pending: args.settle_max_pending.max(1),
        max_gas_price: args.max_gas_price_gwei.map(|g| u128::from(g) * 1_000_000_000),
    };
    let observer: div_meter::settle::SettleObserver = Arc::new(move |r| metrics.settlement(r));
    let (meter_for_settle, client_for_settle) = (meter.clone(), client.clone());
    let follower = meter.clone();
    let poll = Duration::from_millis(args.vault_poll_ms);
    let task = tokio::spawn(async move {
        tokio::join!(
            div_meter::settle::run(meter_for_settle, client_for_settle, config, Some(observer)),
            follower.follow_chain(poll),
        );
    });
    println!("metering paid requests; ledger in {}", args.state_dir.join("ledger").display());
    Ok((state.with_meter(meter).with_settler(client, &admin_token), task))
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

/// Loads the authorised models from the vault, then follows `ModelVault` in the background.
async fn start_vault(
    args: &ServeArgs,
    store: Arc<ModelStore>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<VaultSync>, tokio::task::JoinHandle<()>)> {
    let key = args.host_key.as_deref().context("--vault needs --host-key")?;
    let signer: PrivateKeySigner = key.trim().parse().context("--host-key is not a hex private key")?;
    let d = Deployment::load(&args.addresses)
        .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
    let provider = ProviderBuilder::new().connect_http(d.rpc_url.parse().context("RPC URL")?).erased();
    let observer: CustodianObserver = Arc::new(move |c, _why| metrics.custodian_failure(&c.to_string()));
    let sync = Arc::new(VaultSync::new(
        SyncConfig {
            provider,
            model_vault: d.model_vault,
            store: Store::from_spec(&args.store),
            custodians: args.custodians.clone(),
            signer,
            share_timeout: Duration::from_secs(5),
            poll: Duration::from_millis(args.vault_poll_ms),
            on_custodian_failure: Some(observer),
        },
        store,
    ));
    println!("host {} following ModelVault {}", sync.host(), d.model_vault);
    let from = sync.initial_sync().await.context("reading ModelVault")?;
    let follower = sync.clone();
    Ok((sync, tokio::spawn(async move { follower.follow(from, std::future::pending()).await })))
}

pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down; finishing in-flight requests");
}
