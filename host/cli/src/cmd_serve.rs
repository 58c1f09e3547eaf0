//! `div serve`: the host. Loads plaintext model packages from disk with their plugins and serves
//! the OpenAI-compatible API until SIGTERM or Ctrl-C, then drains in-flight requests.
//! With `--vault` it also serves the encrypted models its operator allows (`--allow-owner`,
//! `--allow-model`) that `ModelVault` authorises it for: fetched by content id, decrypted in
//! memory with keys from the custodians, and kept in step with the chain's events. It listens
//! at once; each vault model is served as soon as it is ready (`503 model_loading` until then,
//! `GET /readyz` says where each stands).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_api::{ApiConfig, AppState, Metrics, router};
use div_chain::Deployment;
use div_meter::settle::SettleConfig;
use div_meter::{Ledger, Meter, MeterConfig};
use div_models::{LoadOptions, ModelFiles, ModelStore, Origin};
use div_nn::OnnxConfig;
use div_runtime::{Limits, Runtime, RuntimeConfig};

/// Arguments of `div serve`; every flag can also be set by the environment variable named.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file: every flag by its long name (`listen = "0.0.0.0:8080"`),
    /// lists as arrays. The command line and the environment win over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    /// A file holding the host's hex private key (its identity to custodians and on-chain),
    /// mode 0600; or set `DIV_HOST_KEY` in the environment. Never on the command line.
    #[arg(long, env = "DIV_HOST_KEY_FILE")]
    host_key_file: Option<PathBuf>,
    /// Serve the models of this owner (repeatable): the host serves only what its operator
    /// allows, whoever authorised it on-chain.
    #[arg(long = "allow-owner", env = "DIV_ALLOW_OWNERS", value_delimiter = ',')]
    pub(crate) allow_owners: Vec<Address>,
    /// Serve this model id, whoever owns it (repeatable).
    #[arg(long = "allow-model", env = "DIV_ALLOW_MODELS", value_delimiter = ',')]
    pub(crate) allow_models: Vec<B256>,
    /// Serve every model any owner authorises for this host (trusting every owner).
    #[arg(long, env = "DIV_ALLOW_ANY_OWNER")]
    pub(crate) allow_any_owner: bool,
    /// This host's public URL (default `http://<listen address>`): the domain Sign-In with
    /// Ethereum messages must name.
    #[arg(long, env = "DIV_PUBLIC_URL")]
    public_url: Option<String>,
    /// A custodian's base URL (repeatable).
    #[arg(long = "custodian", env = "DIV_CUSTODIANS", value_delimiter = ',')]
    pub(crate) custodians: Vec<String>,
    /// Where ciphertexts are fetched from: a directory, or `ipfs+http://HOST:PORT` (Kubo).
    #[arg(long, env = "DIV_STORE", default_value = ".div/store")]
    pub(crate) store: String,
    /// The deployment's address book.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    pub(crate) addresses: PathBuf,
    /// How often to read new `ModelVault` events (ms).
    #[arg(long, env = "DIV_VAULT_POLL_MS", default_value_t = 1000)]
    pub(crate) vault_poll_ms: u64,
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
    /// How long a settlement transaction may wait to be mined before it is replaced (seconds).
    #[arg(long, env = "DIV_SETTLE_RECEIPT_TIMEOUT_SECS", default_value_t = 30)]
    settle_receipt_timeout_secs: u64,
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
    /// Longest any chain call may take (ms); past it the RPC counts as down.
    #[arg(long, env = "DIV_RPC_TIMEOUT_MS", default_value_t = 5000)]
    pub(crate) rpc_timeout_ms: u64,
    /// Unexpired API keys one user may hold on this host.
    #[arg(long, env = "DIV_MAX_KEYS_PER_USER", default_value_t = 32)]
    max_keys_per_user: usize,
    /// First wait before retrying a vault model that failed to load (ms; doubles up to 5 min).
    #[arg(long, env = "DIV_LOAD_RETRY_MS", default_value_t = 2000)]
    pub(crate) load_retry_ms: u64,
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
    /// Inference requests served at once across models; more get 503 with Retry-After. Each
    /// model is also bounded by its own sandbox limit (manifest `limits.max_instances`).
    #[arg(long, env = "DIV_MAX_CONCURRENCY", default_value_t = 256)]
    max_concurrency: usize,
    /// Connections open at once; more are closed on accept.
    #[arg(long, env = "DIV_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Longest a request's headers may take to arrive (seconds).
    #[arg(long, env = "DIV_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    header_timeout_secs: u64,
    /// Longest a connection may sit idle (seconds).
    #[arg(long, env = "DIV_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Largest answer a plugin may give (bytes).
    #[arg(long, env = "DIV_MAX_RESPONSE_BYTES", default_value_t = 16 << 20)]
    max_response_bytes: usize,
    /// How long a streamed answer waits for a caller who stopped reading before it stops the
    /// generation (seconds).
    #[arg(long, env = "DIV_STREAM_STALL_SECS", default_value_t = 30)]
    stream_stall_secs: u64,
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
    /// Run every ONNX request alone, even for models whose manifest asks for batching.
    #[arg(long, env = "DIV_NO_BATCHING")]
    no_batching: bool,
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
    /// Generations decoded together per text-generation model (continuous batching); more wait
    /// for a free slot. Each slot has its own `--llm-context` tokens of KV cache.
    #[arg(long, env = "DIV_LLM_SLOTS", default_value_t = 4)]
    llm_slots: u32,
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
        batch_window_cap: if args.no_batching { None } else { LoadOptions::default().batch_window_cap },
        ggml: div_nn::GgmlConfig {
            n_ctx: args.llm_context.max(16),
            threads: args.llm_threads.unwrap_or(div_nn::GgmlConfig::default().threads).max(1),
            slots: args.llm_slots.clamp(1, 64),
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
    // listen before any vault model loads: each is served as soon as it is ready
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    let public_url = args.public_url.clone().unwrap_or_else(|| format!("http://{local}"));
    let host_key = if args.vault {
        Some(crate::secrets::load_key(args.host_key_file.as_deref(), "DIV_HOST_KEY", "host")?)
    } else {
        None
    };
    let sync = match &host_key {
        Some(key) => Some(crate::serve_vault::start_vault(
            &args,
            key.clone(),
            &public_url,
            store.clone(),
            metrics.clone(),
        )?),
        None => None,
    };
    let mut state = AppState::new(
        store,
        metrics.clone(),
        ApiConfig {
            max_body_bytes: args.max_body_bytes,
            max_concurrency: args.max_concurrency,
            max_response_bytes: args.max_response_bytes,
            stream_stall: Duration::from_secs(args.stream_stall_secs.max(1)),
            public_url: Some(public_url),
        },
    );
    if let Some((sync, _)) = &sync {
        state = state.with_catalog(Arc::new(crate::serve_vault::SyncCatalog(sync.clone())));
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
    if let (Some(key), false) = (&host_key, args.no_meter) {
        let (s, task) = start_meter(&args, key.clone(), state, metrics).await?;
        state = s;
        settler = Some(task);
    }
    println!("listening on http://{local}");
    let serve = div_api::ServeConfig {
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
        ..div_api::ServeConfig::default()
    };
    div_api::serve(listener, router(state), serve, shutdown_signal()).await.context("serving")?;
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
    host: PrivateKeySigner,
    state: AppState,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(AppState, tokio::task::JoinHandle<()>)> {
    let d = Deployment::load(&args.addresses)?;
    let rpc_timeout = Duration::from_millis(args.rpc_timeout_ms.max(100));
    let provider = div_chain::rpc::read_provider(&d.rpc_url, rpc_timeout)?;
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
            rpc_timeout,
            premium_batch: args.premium_batch,
            rate_per_sec: args.rate_limit,
            premium_rate_per_sec: args.rate_limit.saturating_mul(10),
            max_keys_per_user: args.max_keys_per_user.max(1),
        },
        ledger,
    ));
    let client = div_chain::Client::connect_with_timeout(&d.rpc_url, host, rpc_timeout)
        .await
        .context("connecting the host wallet")?;
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
        receipt_timeout: Duration::from_secs(args.settle_receipt_timeout_secs.max(1)),
        ..SettleConfig::default()
    };
    let observer: div_meter::settle::SettleObserver = Arc::new(move |r| metrics.settle_round(r));
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
    Ok((state.with_meter(meter).with_settler(client, &admin_token, config), task))
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
