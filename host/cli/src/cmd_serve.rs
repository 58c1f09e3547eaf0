//! `div serve`: the host. Loads plaintext model packages from disk with their plugins and serves
//! the OpenAI-compatible API until SIGTERM or Ctrl-C, then drains in-flight requests.
//! With `--vault` it also serves the encrypted models its operator allows (`--allow-owner`,
//! `--allow-model`) that `ModelVault` authorises it for: fetched by content id, decrypted in
//! memory with keys from the custodians, and kept in step with the chain's events. It listens
//! at once; each vault model is served as soon as it is ready (`503 model_loading` until then,
//! `GET /readyz` says where each stands). Payment is metered and settled per chain by
//! [`serve_meter`](crate::serve_meter): `--addresses`' chain, and every `--payment-chain`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use anyhow::{Context, bail};
use div_api::{ApiConfig, AppState, Metrics, router};
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
    /// The deployment's address book: its `ModelVault` says which models this host serves, and
    /// its `PaymentStream` takes payment for them.
    #[arg(long, env = "DIV_ADDRESSES", default_value = ".div/addresses.json")]
    pub(crate) addresses: PathBuf,
    /// Also take payment on the deployment in this address book, another EVM chain (repeatable):
    /// users whose deposits and permits live there are served too, each chain with a ledger and a
    /// settlement of its own. An owner registers the model there too (`div publish` again with
    /// that address book) and authorises this host there.
    #[arg(
        long = "payment-chain",
        env = "DIV_PAYMENT_CHAINS",
        value_delimiter = ',',
        value_name = "ADDRESSES"
    )]
    pub(crate) payment_chains: Vec<PathBuf>,
    /// How often to read new `ModelVault` events (ms).
    #[arg(long, env = "DIV_VAULT_POLL_MS", default_value_t = 1000)]
    pub(crate) vault_poll_ms: u64,
    /// Serve vault models without gating or metering (a private deployment).
    #[arg(long, env = "DIV_NO_METER")]
    no_meter: bool,
    /// Where the host keeps its charge ledger and admin token.
    #[arg(long, env = "DIV_HOST_STATE", default_value = ".div/host")]
    pub(crate) state_dir: PathBuf,
    /// Keep the charge ledger in PostgreSQL (`postgres://user@host/db`) instead of sled under
    /// `--state-dir`: every replica of this host given the same database shares it, and one of
    /// them settles at a time. Each payment chain gets a schema of its own (`div_c<chain id>`).
    #[arg(long, env = "DIV_LEDGER", value_name = "POSTGRES_URL")]
    pub(crate) ledger: Option<String>,
    /// Share a result cache (for models whose manifest allows it: `result_cache`) and the
    /// per-permit rate limits with the other replicas of this host in Redis (`redis://host:6379`).
    /// Redis only speeds things up: when it does not answer, the model runs and each replica
    /// counts its own rate.
    #[arg(long, env = "DIV_REDIS", value_name = "REDIS_URL")]
    pub(crate) redis: Option<String>,
    /// Seconds between settlements while charges wait.
    #[arg(long, env = "DIV_SETTLE_INTERVAL_SECS", default_value_t = 30)]
    pub(crate) settle_interval_secs: u64,
    /// Settle at once when this many charged requests wait.
    #[arg(long, env = "DIV_SETTLE_MAX_PENDING", default_value_t = 1000)]
    pub(crate) settle_max_pending: u64,
    /// How long a settlement transaction may wait to be mined before it is replaced (seconds).
    #[arg(long, env = "DIV_SETTLE_RECEIPT_TIMEOUT_SECS", default_value_t = 30)]
    pub(crate) settle_receipt_timeout_secs: u64,
    /// Postpone settlement while the gas price is above this (gwei).
    #[arg(long, env = "DIV_MAX_GAS_PRICE_GWEI")]
    pub(crate) max_gas_price_gwei: Option<u64>,
    /// Largest batch (inputs) without the premium tier.
    #[arg(long, env = "DIV_PREMIUM_BATCH", default_value_t = 16)]
    pub(crate) premium_batch: usize,
    /// Requests per second per permit (access tier; premium gets 10×).
    #[arg(long, env = "DIV_RATE_LIMIT", default_value_t = 50)]
    pub(crate) rate_limit: u32,
    /// How long chain reads (balances, thresholds, revocations) are trusted, in ms.
    #[arg(long, env = "DIV_CHAIN_CACHE_MS", default_value_t = 5000)]
    pub(crate) chain_cache_ms: u64,
    /// Longest any chain call may take (ms); past it the RPC counts as down.
    #[arg(long, env = "DIV_RPC_TIMEOUT_MS", default_value_t = 5000)]
    pub(crate) rpc_timeout_ms: u64,
    /// Unexpired API keys one user may hold on this host.
    #[arg(long, env = "DIV_MAX_KEYS_PER_USER", default_value_t = 32)]
    pub(crate) max_keys_per_user: usize,
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
    /// On SIGTERM, keep serving this long with `/readyz` answering 503 `draining` before closing
    /// the listener (seconds): behind a load balancer, longer than its health checks take to
    /// notice, so no request is sent to a closed port. In-flight requests then finish.
    #[arg(long, env = "DIV_DRAIN_NOTICE_SECS", default_value_t = 0)]
    drain_notice_secs: u64,
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
    /// Send a trace of every request (gate, sandbox, backend, ledger) over OTLP/HTTP to this
    /// collector (`http://HOST:4318`; `/v1/traces` is appended). Off by default.
    #[arg(long, env = "DIV_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
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
        for path in &args.payment_chains {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the address book {}", path.display()))?;
            let book: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("reading the address book {}", path.display()))?;
            state = state.with_deployment(book);
        }
    }
    if let Some(url) = &args.redis {
        let shared = div_api::shared::Shared::connect(url)
            .await
            .context("connecting to Redis (--redis): the result cache and shared rate limits")?;
        state = state.with_shared(shared);
        tracing::info!("sharing the result cache and rate limits in Redis");
    }
    if let Some(dir) = &args.web_dir {
        if !dir.join("index.html").is_file() {
            bail!("--web-dir {}: no index.html (build it with `make web`)", dir.display());
        }
        println!("serving the web dApp from {}", dir.display());
        state = state.with_web_dir(dir.clone());
    }
    let mut settlers = Vec::new();
    if let (Some(key), false) = (&host_key, args.no_meter) {
        let (s, tasks) = crate::serve_meter::start_meters(&args, key.clone(), state, metrics).await?;
        state = s;
        settlers = tasks;
    }
    println!("listening on http://{local}");
    let serve = div_api::ServeConfig {
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
        ..div_api::ServeConfig::default()
    };
    let (draining, notice) = (state.draining(), Duration::from_secs(args.drain_notice_secs));
    let stop = async move {
        shutdown_signal().await;
        draining.store(true, std::sync::atomic::Ordering::Release);
        if !notice.is_zero() {
            tracing::info!(
                notice_secs = notice.as_secs(),
                "draining: /readyz answers 503 while requests are still served"
            );
            tokio::time::sleep(notice).await;
        }
    };
    let meters = state.meters();
    div_api::serve(listener, router(state), serve, stop).await.context("serving")?;
    if let Some((_, task)) = sync {
        task.abort();
    }
    for task in settlers {
        task.abort();
    }
    // replicas sharing a ledger: another one settles from its next round
    for m in meters.iter() {
        m.ledger().release_settlement().await;
    }
    Ok(())
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
