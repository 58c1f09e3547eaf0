//! Shared set-up for the workspace's whole-flow tests and benchmarks: a real anvil chain with
//! the real contracts deployed, and wallet clients for anvil's well-known accounts.
//!
//! Roles follow `div dev`: account #0 governance, #1 model owner, #2 user, #3 host.

use std::path::{Path, PathBuf};

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use div_chain::bindings::DevStablecoin;
use div_chain::{Client, Deployment, ModelRegistration, RegisteredModel};

pub mod load;
mod servers;

pub use servers::{Postgres, Redis};

/// A TCP port free on 127.0.0.1 now.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The workspace root (where `Cargo.toml`, `contracts/` and `bench/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `libonnxruntime.so` of the bootstrap's venv (or `$ORT_DYLIB_PATH`).
pub fn ort_dylib() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    div_nn::locate_onnx_runtime(&workspace_root()).with_context(|| {
        format!("no libonnxruntime.so under {}/.venv (run `make bootstrap`)", workspace_root().display())
    })
}

/// The built plugin `name` (e.g. `div_embeddings`) from `make plugins`.
pub fn plugin_wasm(name: &str) -> anyhow::Result<Vec<u8>> {
    let p = workspace_root().join(format!("plugins/target/wasm32-wasip2/release/{name}.wasm"));
    std::fs::read(&p).with_context(|| format!("{} (run `make plugins`)", p.display()))
}

/// The sample model package the bootstrap builds.
pub fn minilm_dir() -> PathBuf {
    workspace_root().join("build/models/all-minilm-l6-v2")
}

/// The int8 variant the bootstrap builds from it (`scripts/make-minilm-int8.py`).
pub fn minilm_int8_dir() -> PathBuf {
    workspace_root().join("build/models/all-minilm-l6-v2-int8")
}

/// The reference embeddings sentence-transformers produced (`shared/fixtures/minilm`).
#[derive(serde::Deserialize)]
pub struct Reference {
    /// Sentences and their embeddings.
    pub items: Vec<ReferenceItem>,
}

/// One reference sentence.
#[derive(serde::Deserialize)]
pub struct ReferenceItem {
    /// The sentence.
    pub input: String,
    /// Its embedding.
    pub embedding: Vec<f32>,
}

/// Reads `../shared/fixtures/minilm/reference.json` (beside the clone).
pub fn minilm_reference() -> anyhow::Result<Reference> {
    let p = workspace_root().join("../shared/fixtures/minilm/reference.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The sum of the Prometheus samples in `text` whose line starts with `name` and contains `with`
/// (a label, or "" for every series of the metric).
pub fn metric(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A plugin built from `tests/plugins` (`make plugins`).
pub fn test_plugin_wasm(name: &str) -> anyhow::Result<Vec<u8>> {
    let p = workspace_root().join(format!("tests/plugins/target/wasm32-wasip2/release/{name}.wasm"));
    std::fs::read(&p).with_context(|| format!("{} (run `make plugins`)", p.display()))
}

/// A DIV host running in this process on a loopback port: the real router, model store,
/// runtime and backend behind the host's own hyper server loop.
pub struct TestHost {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The store, to load more models.
    pub store: std::sync::Arc<div_models::ModelStore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestHost {
    /// Starts a host with `api` limits and no models.
    pub async fn start(api: div_api::ApiConfig) -> anyhow::Result<Self> {
        Self::start_with(api, None).await
    }

    /// [`TestHost::start`], sharing a result cache and rate limits through `shared` (Redis).
    pub async fn start_with(
        api: div_api::ApiConfig,
        shared: Option<div_api::shared::Shared>,
    ) -> anyhow::Result<Self> {
        div_nn::init_onnx_runtime(&ort_dylib()?)?;
        let runtime = div_runtime::Runtime::new(div_runtime::RuntimeConfig {
            cache_dir: Some(workspace_root().join("target/div-test-cache")),
            ..Default::default()
        })?;
        let metrics = std::sync::Arc::new(div_api::Metrics::default());
        let options = div_models::LoadOptions {
            backend_observer: Some(metrics.backend_observer()),
            onnx: div_nn::OnnxConfig { sessions: 2, intra_threads: 1, ..Default::default() },
            ..Default::default()
        };
        let store = std::sync::Arc::new(div_models::ModelStore::new(runtime, options));
        let mut state = div_api::AppState::new(store.clone(), metrics, api);
        if let Some(shared) = shared {
            state = state.with_shared(shared);
        }
        let app = div_api::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        // the host's own server loop (header, idle and connection limits), as `div serve` runs it
        let task = tokio::spawn(async move {
            let _ =
                div_api::serve(listener, app, div_api::ServeConfig::default(), std::future::pending()).await;
        });
        Ok(Self { url, store, task })
    }

    /// Loads the MiniLM package with the embeddings plugin.
    pub async fn load_minilm(&self) -> anyhow::Result<()> {
        let files = div_models::ModelFiles::read_dir(&minilm_dir())?;
        self.store.load(files, &plugin_wasm("div_embeddings")?).await?;
        Ok(())
    }

    /// Loads the chat model (SmolLM2-135M-Instruct) with the chat plugin.
    pub async fn load_chat(&self) -> anyhow::Result<()> {
        let files = div_models::ModelFiles::read_dir(&chat_dir())?;
        self.store.load(files, &plugin_wasm("div_chat")?).await?;
        Ok(())
    }

    /// The tiny test graph as a text-generation model `name` whose plugin (the misbehaving one)
    /// acts out `mode` on the generation routes, within `deadline`.
    pub async fn load_misbehaving_chat(
        &self,
        name: &str,
        mode: &str,
        deadline_ms: u64,
    ) -> anyhow::Result<()> {
        let mut files = div_models::ModelFiles::read_dir(&workspace_root().join("build/models/tiny-echo"))?;
        files.manifest.name = name.to_string();
        files.manifest.task = "chat".into();
        files.manifest.limits.deadline_ms = Some(deadline_ms);
        files.manifest.extra.insert("mode".into(), serde_json::Value::String(mode.to_string()));
        self.store.load(files, &test_plugin_wasm("div_misbehave")?).await?;
        Ok(())
    }

    /// Loads the tiny test graph as `name` with the misbehaving plugin in `mode`.
    pub async fn load_misbehave(&self, name: &str, mode: &str) -> anyhow::Result<()> {
        self.load_misbehave_with(name, mode, None).await
    }

    /// [`TestHost::load_misbehave`] with a per-model instance limit.
    pub async fn load_misbehave_with(
        &self,
        name: &str,
        mode: &str,
        max_instances: Option<u32>,
    ) -> anyhow::Result<()> {
        self.load_misbehave_limits(name, mode, max_instances, None).await
    }

    /// [`TestHost::load_misbehave`] with an instance limit and a deadline of its own.
    pub async fn load_misbehave_limits(
        &self,
        name: &str,
        mode: &str,
        max_instances: Option<u32>,
        deadline_ms: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut files = div_models::ModelFiles::read_dir(&workspace_root().join("build/models/tiny-echo"))?;
        files.manifest.limits.max_instances = max_instances;
        if deadline_ms.is_some() {
            files.manifest.limits.deadline_ms = deadline_ms;
        }
        files.manifest.name = name.to_string();
        files.manifest.extra.insert("mode".into(), serde_json::Value::String(mode.to_string()));
        self.store.load(files, &test_plugin_wasm("div_misbehave")?).await?;
        Ok(())
    }
}

/// The chat model's name on the API.
pub const CHAT_MODEL: &str = "smollm2-135m-instruct";

/// The SmolLM2-135M-Instruct package (built by `scripts/make-smollm2-model.py`).
pub fn chat_dir() -> PathBuf {
    workspace_root().join("build/models/smollm2-135m-instruct")
}

/// The demo chat model as the host loads it: its GGUF with its manifest's chat template.
pub fn chat_graph() -> anyhow::Result<div_nn::GgmlGraph> {
    let dir = chat_dir();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    let template = manifest["extra"]["chat_template"].as_str().map(str::to_string);
    Ok(div_nn::GgmlGraph::load(
        &std::fs::read(dir.join("model.gguf"))?,
        div_nn::GgmlConfig::default(),
        template,
    )?)
}

/// One user message as the demo chat model's template renders it: ChatML, as its manifest's
/// `extra.chat_template` writes it (the GGUF's own minus its default system turn; see
/// scripts/make-smollm2-model.py).
pub fn chat_prompt(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

/// What llama.cpp itself generates greedily for `prompt` (template applied), called directly
/// through `llama-cpp-2` with the package's GGUF file: the reference the host must match.
pub fn llama_greedy(prompt: &str, max_tokens: usize) -> anyhow::Result<String> {
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::model::params::LlamaModelParams;
    let backend = div_nn::llama_backend()?;
    let model =
        LlamaModel::load_from_file(backend, chat_dir().join("model.gguf"), &LlamaModelParams::default())?;
    let mut out = Vec::new();
    llama_generate(&model, prompt, max_tokens, |piece| out.extend_from_slice(piece))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Greedy generation on `model` with `llama-cpp-2` alone (a context of 2048 tokens and the
/// host's threads; more than the cores would make ggml's workers spin each other out), calling
/// `on_token` with each token's bytes; returns the tokens generated.
pub fn llama_generate(
    model: &llama_cpp_2::model::LlamaModel,
    prompt: &str,
    max_tokens: usize,
    mut on_token: impl FnMut(&[u8]),
) -> anyhow::Result<usize> {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::sampling::LlamaSampler;
    let backend = div_nn::llama_backend()?;
    let threads = div_nn::GgmlConfig::default().threads;
    let params = LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(2048))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params)?;
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i + 1 == tokens.len())?;
    }
    ctx.decode(&mut batch)?;
    let mut sampler = LlamaSampler::greedy();
    let mut piece = Vec::new();
    let start = tokens.len() as i32;
    let mut n = 0;
    for pos in start..start + max_tokens as i32 {
        let t = sampler.sample(&ctx, batch.n_tokens() - 1);
        sampler.accept(t);
        if vocab.is_eog(t) {
            break;
        }
        piece.clear();
        vocab.token_to_piece_into(t, &mut piece, false, None);
        n += 1;
        on_token(&piece);
        batch.clear();
        batch.add(t, pos, &[0], true)?;
        ctx.decode(&mut batch)?;
    }
    Ok(n)
}

/// The anvil binary: `$DIV_ANVIL`, else the bootstrap's npm install in `contracts/`.
pub fn anvil_bin() -> PathBuf {
    std::env::var_os("DIV_ANVIL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("contracts/node_modules/.bin/anvil"))
}

/// A running anvil with DIV deployed.
pub struct LocalChain {
    /// The anvil process; killed on drop.
    pub anvil: AnvilInstance,
    /// Its JSON-RPC URL.
    pub rpc_url: String,
    /// Anvil's funded accounts.
    pub keys: Vec<PrivateKeySigner>,
    /// The contracts.
    pub deployment: Deployment,
}

impl LocalChain {
    /// Starts anvil on a free port and deploys everything with account #0.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_accounts(20).await
    }

    /// [`LocalChain::start`] with `accounts` funded anvil accounts.
    pub async fn start_with_accounts(accounts: usize) -> anyhow::Result<Self> {
        Self::start_on(31337, accounts).await
    }

    /// [`LocalChain::start`] on a chain with id `chain_id` (a second chain beside 31337, say
    /// 314159 as Filecoin's calibration network has), with `accounts` funded anvil accounts (the
    /// same keys on every chain).
    pub async fn start_on(chain_id: u64, accounts: usize) -> anyhow::Result<Self> {
        let bin = anvil_bin();
        let accounts = accounts.to_string();
        let anvil = Anvil::new()
            .path(&bin)
            .chain_id(chain_id)
            .args(["--accounts", accounts.as_str()])
            .try_spawn()
            .with_context(|| format!("starting {} (run `make bootstrap`)", bin.display()))?;
        let rpc_url = format!("http://127.0.0.1:{}", anvil.port());
        let keys: Vec<PrivateKeySigner> = anvil.keys().iter().cloned().map(PrivateKeySigner::from).collect();
        let gov = keys.first().context("anvil has no accounts")?.clone();
        let deployment = Client::connect(&rpc_url, gov).await?.deploy_all(&[]).await?;
        Ok(Self { anvil, rpc_url, keys, deployment })
    }

    /// A wallet client for anvil account `index`.
    pub async fn client(&self, index: usize) -> anyhow::Result<Client> {
        let key = self.keys.get(index).with_context(|| format!("no anvil account #{index}"))?.clone();
        Ok(Client::connect(&self.rpc_url, key).await?)
    }

    /// The USDC stand-in's address.
    pub fn usdc(&self) -> anyhow::Result<Address> {
        Ok(self.deployment.stablecoin("USDC").context("no USDC in the deployment")?.address)
    }

    /// Mints `amount` USDC base units to `to` (the stand-in's open mint).
    pub async fn mint_usdc(&self, to: Address, amount: U256) -> anyhow::Result<()> {
        let c = self.client(0).await?;
        let usdc = DevStablecoin::new(self.usdc()?, c.provider());
        let receipt = usdc.mint(to, amount).send().await?.get_receipt().await?;
        anyhow::ensure!(receipt.status(), "mint reverted");
        Ok(())
    }

    /// Mints `amount` USDC to account `index` and deposits it all into `PaymentStream`.
    pub async fn fund_deposit(&self, index: usize, amount: U256) -> anyhow::Result<()> {
        let c = self.client(index).await?;
        let user = self.keys.get(index).with_context(|| format!("no anvil account #{index}"))?.address();
        let (usdc, stream) = (self.usdc()?, self.deployment.payment_stream);
        self.mint_usdc(user, amount).await?;
        let r = DevStablecoin::new(usdc, c.provider())
            .approve(stream, U256::MAX)
            .send()
            .await?
            .get_receipt()
            .await?;
        anyhow::ensure!(r.status(), "approve reverted");
        let r = div_chain::bindings::PaymentStream::new(stream, c.provider())
            .deposit(usdc, amount)
            .send()
            .await?
            .get_receipt()
            .await?;
        anyhow::ensure!(r.status(), "deposit reverted");
        Ok(())
    }

    /// Registers a model owned by account #1 with custodians #5..#7 (t = 2), priced at
    /// `price` USDC base units per request, its token sold at 2 USDC, and authorises host #3.
    pub async fn register_model(&self, name: &str, price: U256) -> anyhow::Result<RegisteredModel> {
        let owner = self.client(1).await?;
        let custodians = self.keys.iter().skip(5).take(3).map(|k| k.address()).collect();
        let reg = ModelRegistration {
            name: name.to_string(),
            cid: "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi".into(),
            plugin_cid: String::new(),
            price_per_request: price,
            price_per_1k_tokens: U256::ZERO,
            payout: None,
            custodians,
            threshold: 2,
            token_name: format!("{name} access"),
            token_symbol: "ACC".into(),
            sale_token: self.usdc()?,
            token_price: U256::from(2_000_000u64),
        };
        let model = owner.register_model(&self.deployment, &reg).await?;
        let host = self.keys.get(3).context("no anvil account #3")?.address();
        owner.authorize_host(&self.deployment, model.model_id, host).await?;
        self.register_host(3).await?;
        Ok(model)
    }

    /// Registers account `index` as a host on `ModelVault` (an owner's authorisation takes effect
    /// only for a registered host), at a placeholder URL unless it is registered already (at any URL).
    pub async fn register_host(&self, index: usize) -> anyhow::Result<()> {
        let host = self.client(index).await?;
        let vault = div_chain::bindings::ModelVault::new(self.deployment.model_vault, host.provider());
        if vault.hostRecord(host.address()).call().await?.registeredAt == 0 {
            host.ensure_host_registered(&self.deployment, &format!("http://host-{index}.invalid"), None)
                .await?;
        }
        Ok(())
    }
}
