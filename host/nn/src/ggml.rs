//! GGUF models on llama.cpp (through `llama-cpp-2`), as a wasmtime-wasi-nn backend for the `ggml`
//! encoding: text generation, one token per `compute`.
//!
//! wasi-nn has no streaming, so a generation is a run of `compute` calls on one execution
//! context. The first call carries the inputs: either `messages` (U8, a JSON list of
//! `{"role", "content"}`: the host renders them with the model's own chat template, see
//! [`crate::template`]) or `prompt` (U8, plain UTF-8 text for completion), and optionally
//! `options` (U8, JSON: `{"max_tokens", "temperature", "top_p", "seed"}`). Only a template's own
//! markers become control tokens: message text and prompts are tokenized as plain text, so a
//! caller cannot forge a turn or an end-of-sequence. Every call answers with the next piece of
//! text: `token` (U8, whole UTF-8 characters only; a character split across tokens waits for its
//! end), `done` (U8 `[1]` once the model ended, `max_tokens` was reached or the context is full)
//! and `usage` (I32 `[prompt tokens, generated tokens]`). The plugin sees every token, so stop
//! sequences and post-processing stay the owner's, inside the sandbox. The same counts go to the
//! request's [`RequestUsage`], which the host bills from: the plugin's own report is not trusted.
//!
//! Each execution context owns a llama.cpp context (its own KV cache) on a worker thread of its
//! own, so concurrent requests on one loaded model decode side by side over the shared read-only
//! weights; no global lock is held while decoding (creating a context takes a short per-model
//! lock, as llama.cpp mutates the model while doing so). The worker decodes one token ahead of the
//! plugin: while the plugin handles token n, token n+1 is being computed, so the sandbox costs
//! almost nothing in tokens/s. Dropping the context (the request ended, or the caller went away)
//! stops the worker after at most that one token. Decode steps draw on a process-wide pool of
//! cores, so concurrent generations take turns instead of oversubscribing ggml's spinning
//! workers.
//!
//! Plaintext weights never touch a filesystem: llama.cpp loads GGUF only from a path, so the host
//! writes the decrypted bytes into an anonymous memory file (`memfd_create`, sealed against
//! writes), and llama.cpp maps it from `/proc/self/fd/N`; the caller's buffer is zeroised after.

use std::io::Write as _;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id, NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor};

use crate::template::{ChatMessage, ChatTemplate, Segment};
use crate::{NnError, RequestUsage};

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// llama.cpp's process-wide state (for code that calls llama.cpp directly in the same process,
/// such as the benchmarks' baseline), initialised on first use.
pub fn llama_backend() -> Result<&'static LlamaBackend, NnError> {
    backend()
}

/// llama.cpp's process-wide state, initialised once. Its own chatter (a hundred lines per model
/// load) is dropped unless `DIV_LLAMA_LOG` is set, then it goes to `tracing`.
fn backend() -> Result<&'static LlamaBackend, NnError> {
    BACKEND
        .get_or_init(|| {
            let enabled = std::env::var_os("DIV_LLAMA_LOG").is_some();
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(enabled));
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| NnError::Runtime(format!("llama.cpp: {e}")))
}

/// Decodes running at once across every model: ggml's workers spin while they wait for each
/// other, so more compute threads than cores turns a slowdown into a collapse (measured here: 4
/// threads on 2 cores ran a 48-token generation 50× slower). Each decode step takes
/// `threads` of the machine's cores from this pool, so concurrent requests take turns token by
/// token instead of fighting over the cores.
struct DecodeSlots {
    /// The machine's cores, read once (it reads cgroup files: not for every token).
    cores: usize,
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

static SLOTS: OnceLock<DecodeSlots> = OnceLock::new();

fn slots() -> &'static DecodeSlots {
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        DecodeSlots { cores, free: Mutex::new(cores), freed: std::sync::Condvar::new() }
    })
}

/// Cores held for one decode step; given back on drop.
struct CoresHeld(usize);

impl CoresHeld {
    fn take(n: usize) -> Self {
        let s = slots();
        // a request never waits for more cores than the machine has
        let n = n.clamp(1, s.cores);
        let mut free = s.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = s.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
        Self(n)
    }
}

impl Drop for CoresHeld {
    fn drop(&mut self) {
        let s = slots();
        *s.free.lock().unwrap_or_else(|p| p.into_inner()) += self.0;
        s.freed.notify_all();
    }
}

/// How generation contexts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlConfig {
    /// Context length in tokens (prompt + generation) of each request.
    pub n_ctx: u32,
    /// Prompt tokens decoded per batch.
    pub n_batch: u32,
    /// Threads each request's decoding uses.
    pub threads: i32,
}

impl Default for GgmlConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { n_ctx: 2048, n_batch: 512, threads: i32::try_from(cores).unwrap_or(1) }
    }
}

/// Loads `ggml` graphs with a [`GgmlConfig`].
pub struct GgmlBackend {
    config: GgmlConfig,
}

impl GgmlBackend {
    /// A backend that loads graphs with `config`.
    pub fn new(config: GgmlConfig) -> Self {
        Self { config }
    }
}

impl BackendInner for GgmlBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Ggml
    }

    fn load(&mut self, builders: &[&[u8]], _target: ExecutionTarget) -> Result<Graph, BackendError> {
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        Ok(GgmlGraph::load(bytes, self.config, None)?.into_wasi_nn())
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

struct Inner {
    model: LlamaModel,
    /// llama.cpp mutates the model while creating a context: one at a time.
    create: Mutex<()>,
    config: GgmlConfig,
    /// The chat template (the manifest's, else the GGUF's own), if there is one.
    template: Option<ChatTemplate>,
    /// The texts of the vocabulary's control tokens, longest first: what llama.cpp turns into
    /// control tokens when it parses special tokens (here: in template text only).
    specials: Vec<(Vec<u8>, LlamaToken)>,
}

/// A piece of a prompt on its way to tokens.
enum Fragment {
    /// Text, tokenized as text.
    Raw(Vec<u8>),
    /// A control token the template wrote.
    Special(LlamaToken),
}

/// A loaded GGUF model, shared by every request on it.
#[derive(Clone)]
pub struct GgmlGraph(Arc<Inner>);

/// What one generation is asked for.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenOptions {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 (or less) is greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f32,
    /// The sampler's seed (fixed seed + same prompt = same text).
    pub seed: u32,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// One generated piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Whole UTF-8 characters (possibly empty when a character is still incomplete).
    pub text: Vec<u8>,
    /// No more tokens will come.
    pub done: bool,
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub generated: u32,
}

impl GgmlGraph {
    /// Loads GGUF `bytes` through an anonymous memory file (never a path on disk). The chat
    /// template is `template` when given (the manifest's override), else the GGUF's own
    /// `tokenizer.chat_template`; a template that does not compile is refused here.
    pub fn load(bytes: &[u8], config: GgmlConfig, template: Option<String>) -> Result<Self, NnError> {
        let backend = backend()?;
        if bytes.len() < 4 || &bytes[..4] != b"GGUF" {
            return Err(NnError::Load("not a GGUF file (no GGUF magic)".into()));
        }
        let fd = memfd_with(bytes)?;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let params = LlamaModelParams::default();
        let model = LlamaModel::load_from_file(backend, &path, &params)
            .map_err(|e| NnError::Load(format!("llama.cpp could not load the GGUF: {e}")))?;
        // the mapping llama.cpp made keeps the pages; the descriptor is no longer needed
        drop(fd);
        let source = template.or_else(|| model.meta_val_str("tokenizer.chat_template").ok());
        let template = match source {
            Some(src) => {
                let vocab = model.vocab();
                let text = |t: LlamaToken| {
                    vocab.text(t).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
                };
                let (bos, eos) = (text(vocab.bos()), text(vocab.eos()));
                Some(ChatTemplate::new(src, bos, eos).map_err(NnError::Load)?)
            }
            None => None,
        };
        let specials = {
            let vocab = model.vocab();
            let mut v: Vec<(Vec<u8>, LlamaToken)> = vocab
                .tokens()
                .filter(|t| vocab.is_control(*t))
                .filter_map(|t| vocab.text(t).map(|c| (c.to_bytes().to_vec(), t)))
                .filter(|(text, _)| !text.is_empty())
                .collect();
            v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.0.cmp(&b.1.0)));
            v
        };
        Ok(Self(Arc::new(Inner { model, create: Mutex::new(()), config, template, specials })))
    }

    /// Cuts template text at the control tokens it names (longest first, as llama.cpp does).
    fn partition(&self, text: &[u8], out: &mut Vec<Fragment>) {
        let mut frags = vec![Fragment::Raw(text.to_vec())];
        for (special, token) in &self.0.specials {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Raw(raw) = f else {
                    next.push(f);
                    continue;
                };
                let mut rest: &[u8] = &raw;
                while let Some(i) = find(rest, special) {
                    if i > 0 {
                        next.push(Fragment::Raw(rest[..i].to_vec()));
                    }
                    next.push(Fragment::Special(*token));
                    rest = &rest[i + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Raw(rest.to_vec()));
                }
            }
            frags = next;
        }
        out.extend(frags);
    }

    /// The chat template requests on this model are rendered with, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.0.template.as_ref()
    }

    /// The prompt tokens of a conversation: rendered with the model's chat template, template
    /// text tokenized with its special tokens, message text as plain text.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<LlamaToken>, NnError> {
        let template = self.0.template.as_ref().ok_or_else(|| {
            NnError::InvalidInput(
                "this model has no chat template (the GGUF has none and the manifest sets no \
                 `extra.chat_template`): use /v1/completions"
                    .into(),
            )
        })?;
        let segments = template.render(messages, true).map_err(NnError::InvalidInput)?;
        // the fragments llama.cpp would make of the whole rendered text, except that control
        // tokens are only looked for in the template's own text; adjacent text (template and
        // message) is joined again, so the tokens are exactly those of the whole prompt
        let mut frags: Vec<Fragment> = Vec::new();
        for seg in &segments {
            match seg {
                Segment::Template(t) => self.partition(t.as_bytes(), &mut frags),
                Segment::Content(c) => frags.push(Fragment::Raw(c.as_bytes().to_vec())),
            }
        }
        let mut merged: Vec<Fragment> = Vec::with_capacity(frags.len());
        for f in frags {
            match (merged.last_mut(), f) {
                (Some(Fragment::Raw(prev)), Fragment::Raw(more)) => prev.extend_from_slice(&more),
                (_, f) => merged.push(f),
            }
        }
        let vocab = self.0.model.vocab();
        let bos = vocab.bos();
        let mut tokens = Vec::new();
        // BOS as the model wants it, unless the template wrote it itself
        if vocab.should_add_bos() && !matches!(merged.first(), Some(Fragment::Special(t)) if *t == bos) {
            tokens.push(bos);
        }
        for f in &merged {
            match f {
                Fragment::Raw(text) => vocab.tokenize_into(text, &mut tokens, false, false),
                Fragment::Special(t) => tokens.push(*t),
            }
        }
        Ok(tokens)
    }

    /// The prompt tokens of a completion: plain text (no control tokens), after BOS.
    pub fn prompt_tokens(&self, prompt: &[u8]) -> Vec<LlamaToken> {
        self.0.model.vocab().tokenize(prompt, true, false)
    }

    /// Token ids of this model are below this.
    pub fn vocab_size(&self) -> u32 {
        u32::try_from(self.0.model.vocab().n_tokens()).unwrap_or(0)
    }

    /// The context length one request gets.
    pub fn n_ctx(&self) -> u32 {
        self.0.config.n_ctx.min(self.0.model.n_ctx_train().max(1))
    }

    /// This graph as a wasi-nn [`Graph`] for a registry.
    pub fn into_wasi_nn(self) -> Graph {
        Graph::from(Box::new(self) as Box<dyn BackendGraph>)
    }

    /// This graph as one request sees it: its usage measured into `usage`.
    pub fn into_wasi_nn_metered(self, usage: Arc<RequestUsage>) -> Graph {
        Graph::from(Box::new(Metered { graph: self, usage }) as Box<dyn BackendGraph>)
    }

    /// The model's context length in training (an upper bound for `n_ctx`).
    pub fn n_ctx_train(&self) -> u32 {
        self.0.model.n_ctx_train()
    }

    /// Tokens of `text` as a completion prompt (plain text, after BOS).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.prompt_tokens(text.as_bytes()).len()
    }

    /// Starts generating from the `prompt` tokens on a worker of its own; the steps arrive in
    /// order.
    pub fn generate(&self, prompt: Vec<LlamaToken>, options: GenOptions) -> Generation {
        let (tx, rx) = sync_channel(1);
        let inner = self.0.clone();
        let spawned = std::thread::Builder::new()
            .name("div-llm".into())
            .spawn(move || run_generation(&inner, &prompt, options, &tx));
        match spawned {
            Ok(handle) => Generation { rx: Mutex::new(Some(rx)), worker: Some(handle), finished: false },
            Err(e) => {
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(NnError::Inference(format!("starting a generation thread: {e}"))));
                Generation { rx: Mutex::new(Some(rx)), worker: None, finished: false }
            }
        }
    }
}

/// The steps of one generation, in order. Dropping it stops the worker and waits for it (at
/// most the one decode step in flight), so no llama.cpp work outlives the request.
pub struct Generation {
    /// In a mutex only to be `Sync` (wasi-nn's contexts must be); never contended.
    rx: Mutex<Option<Receiver<Result<Step, NnError>>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    finished: bool,
}

impl Generation {
    /// The next step; after the one marked `done`, an error.
    pub fn next_step(&mut self) -> Result<Step, NnError> {
        if self.finished {
            return Err(NnError::InvalidInput(
                "the generation has ended; compute again with a new prompt".into(),
            ));
        }
        let rx = self.rx.get_mut().unwrap_or_else(|p| p.into_inner());
        let rx = rx.as_ref().ok_or_else(|| NnError::Inference("the generation was stopped".into()))?;
        let step = rx.recv().map_err(|_| NnError::Inference("the generation thread stopped".into()))??;
        self.finished = step.done;
        Ok(step)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // closing the channel first makes the worker's next send fail, and so end
        drop(self.rx.get_mut().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Writes `bytes` into a sealed anonymous memory file.
fn memfd_with(bytes: &[u8]) -> Result<OwnedFd, NnError> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(c"div-weights", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|e| NnError::Load(format!("memfd_create: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes).map_err(|e| NnError::Load(format!("filling the memory file: {e}")))?;
    let fd = OwnedFd::from(file);
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )
    .map_err(|e| NnError::Load(format!("sealing the memory file: {e}")))?;
    Ok(fd)
}

fn run_generation(
    inner: &Inner,
    prompt: &[LlamaToken],
    o: GenOptions,
    tx: &SyncSender<Result<Step, NnError>>,
) {
    if let Err(e) = generate_steps(inner, prompt, o, tx) {
        let _ = tx.send(Err(e));
    }
}

fn generate_steps(
    inner: &Inner,
    tokens: &[LlamaToken],
    o: GenOptions,
    tx: &SyncSender<Result<Step, NnError>>,
) -> Result<(), NnError> {
    let backend = backend()?;
    let model = &inner.model;
    let vocab = model.vocab();
    let n_ctx = inner.config.n_ctx.min(model.n_ctx_train().max(1));
    if tokens.is_empty() {
        return Err(NnError::InvalidInput("the prompt is empty".into()));
    }
    if tokens.len() >= n_ctx as usize {
        return Err(NnError::InvalidInput(format!(
            "the prompt has {} tokens; this model's context holds {n_ctx}",
            tokens.len()
        )));
    }
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(inner.config.n_batch)
        .with_n_threads(inner.config.threads)
        .with_n_threads_batch(inner.config.threads);
    let mut ctx = {
        let _one_at_a_time = inner.create.lock().unwrap_or_else(|p| p.into_inner());
        model
            .new_context(backend, params)
            .map_err(|e| NnError::Inference(format!("llama.cpp context: {e}")))?
    };
    let decode_err = |e: llama_cpp_2::DecodeError| NnError::Inference(format!("llama.cpp decode: {e}"));
    // the prompt, in batches; logits only for its last token
    let n_batch = inner.config.n_batch.max(1) as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let last = tokens.len() - 1;
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (j, t) in chunk.iter().enumerate() {
            let pos = c * n_batch + j;
            batch.add(*t, pos as i32, &[0], pos == last).map_err(|e| NnError::Inference(e.to_string()))?;
        }
        let _cores = CoresHeld::take(inner.config.threads.max(1) as usize);
        ctx.decode(&mut batch).map_err(decode_err)?;
    }
    let mut sampler = if o.temperature <= 0.0 {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::top_p(o.top_p.clamp(0.0, 1.0), 1),
            LlamaSampler::temp(o.temperature),
            LlamaSampler::dist(o.seed),
        ])
    };
    let prompt_tokens = tokens.len() as u32;
    let mut n_past = tokens.len() as i32;
    let mut generated = 0u32;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let token: LlamaToken = sampler.sample(&ctx, batch.n_tokens() - 1);
        sampler.accept(token);
        generated += 1;
        let eog = vocab.is_eog(token);
        if !eog {
            vocab.token_to_piece_into(token, &mut pending, false, None);
        }
        let full = n_past as u32 + 1 >= n_ctx;
        let done = eog || generated >= o.max_tokens.max(1) || full;
        let text = if done { std::mem::take(&mut pending) } else { take_whole_chars(&mut pending) };
        // an end token is not text the caller receives, nor one they pay for
        let counted = if eog { generated - 1 } else { generated };
        if tx.send(Ok(Step { text, done, prompt_tokens, generated: counted })).is_err() || done {
            // the request went away, or the generation is over: the context and its KV cache go
            return Ok(());
        }
        batch.clear();
        batch.add(token, n_past, &[0], true).map_err(|e| NnError::Inference(e.to_string()))?;
        let cores = CoresHeld::take(inner.config.threads.max(1) as usize);
        ctx.decode(&mut batch).map_err(decode_err)?;
        drop(cores);
        n_past += 1;
    }
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Takes the longest prefix of `buf` that is whole UTF-8 characters, leaving an incomplete tail.
fn take_whole_chars(buf: &mut Vec<u8>) -> Vec<u8> {
    let valid = match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        // an incomplete sequence at the end waits; invalid bytes in the middle pass as they are
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    let rest = buf.split_off(valid);
    std::mem::replace(buf, rest)
}

impl BackendGraph for GgmlGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        Ok(ExecutionContext::from(Box::new(GgmlContext {
            graph: self.clone(),
            staged: crate::Staged::new(),
            generation: None,
            usage: Arc::default(),
        }) as Box<dyn BackendExecutionContext>))
    }
}

/// A graph bound to one request's usage.
struct Metered {
    graph: GgmlGraph,
    usage: Arc<RequestUsage>,
}

impl BackendGraph for Metered {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        Ok(ExecutionContext::from(Box::new(GgmlContext {
            graph: self.graph.clone(),
            staged: crate::Staged::new(),
            generation: None,
            usage: self.usage.clone(),
        }) as Box<dyn BackendExecutionContext>))
    }
}

/// One request's generation, seen through wasi-nn.
struct GgmlContext {
    graph: GgmlGraph,
    staged: crate::Staged,
    generation: Option<Generation>,
    usage: Arc<RequestUsage>,
}

impl GgmlContext {
    fn step(
        graph: &GgmlGraph,
        generation: &mut Option<Generation>,
        usage: &RequestUsage,
        inputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>, NnError> {
        let mut prompt: Option<(Vec<LlamaToken>, &'static str)> = None;
        let mut options = GenOptions::default();
        for t in inputs {
            if t.tensor.ty != TensorType::U8 {
                return Err(NnError::InvalidInput(format!("input {:?} must be U8 (UTF-8 bytes)", t.name)));
            }
            match t.name.as_str() {
                "prompt" => prompt = Some((graph.prompt_tokens(&t.tensor.data), "prompt")),
                "messages" => {
                    let messages: Vec<ChatMessage> = serde_json::from_slice(&t.tensor.data)
                        .map_err(|e| NnError::InvalidInput(format!("messages: {e}")))?;
                    let tokens = graph.chat_tokens(&messages).inspect_err(|e| {
                        // a template that refuses the conversation is the caller's to fix
                        if let NnError::InvalidInput(m) = e {
                            usage.refuse("messages", m.clone());
                        }
                    })?;
                    prompt = Some((tokens, "messages"));
                }
                "options" => {
                    options = serde_json::from_slice(&t.tensor.data)
                        .map_err(|e| NnError::InvalidInput(format!("options: {e}")))?;
                }
                other => {
                    return Err(NnError::InvalidInput(format!(
                        "unknown input {other:?} (messages or prompt, options)"
                    )));
                }
            }
        }
        if let Some((tokens, param)) = prompt {
            let n_ctx = graph.n_ctx() as usize;
            if tokens.is_empty() {
                usage.refuse(param, "the prompt is empty");
                return Err(NnError::InvalidInput("the prompt is empty".into()));
            }
            if tokens.len() >= n_ctx {
                let m = format!("the prompt is {} tokens; this model's context holds {n_ctx}", tokens.len());
                usage.refuse(param, m.clone());
                return Err(NnError::InvalidInput(m));
            }
            usage.record(u32::try_from(tokens.len()).unwrap_or(u32::MAX), 0);
            // a new prompt starts a new generation (the old one, if any, stops)
            *generation = Some(graph.generate(tokens, options));
        }
        let generation = generation.as_mut().ok_or_else(|| {
            NnError::InvalidInput("no prompt: the first compute needs a `prompt` input".into())
        })?;
        let s = generation.next_step()?;
        usage.record(s.prompt_tokens, s.generated);
        let len = u32::try_from(s.text.len()).unwrap_or(u32::MAX);
        let usage = [s.prompt_tokens as i32, s.generated as i32];
        Ok(vec![
            NamedTensor {
                name: "token".into(),
                tensor: Tensor { dimensions: vec![len], ty: TensorType::U8, data: s.text },
            },
            NamedTensor {
                name: "done".into(),
                tensor: Tensor { dimensions: vec![1], ty: TensorType::U8, data: vec![u8::from(s.done)] },
            },
            NamedTensor {
                name: "usage".into(),
                tensor: Tensor {
                    dimensions: vec![2],
                    ty: TensorType::I32,
                    data: usage.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            },
        ])
    }
}

impl BackendExecutionContext for GgmlContext {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let name = match id {
            Id::Name(n) => n,
            Id::Index(0) => "prompt".into(),
            Id::Index(1) => "options".into(),
            Id::Index(2) => "messages".into(),
            Id::Index(i) => {
                return Err(NnError::InvalidInput(format!(
                    "no input #{i} (0 prompt, 1 options, 2 messages)"
                ))
                .into());
            }
        };
        self.staged.set(name, tensor);
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        Ok(self.staged.output(&id)?)
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let (graph, generation, usage) = (&self.graph, &mut self.generation, &self.usage);
        Ok(self.staged.compute(inputs, |i| Self::step(graph, generation, usage, i))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_back_only_an_incomplete_character() {
        let mut buf = "héllo".as_bytes().to_vec();
        assert_eq!(take_whole_chars(&mut buf), "héllo".as_bytes());
        assert!(buf.is_empty());
        let euro = "€".as_bytes(); // three bytes
        let mut buf = b"a".to_vec();
        buf.extend_from_slice(&euro[..2]);
        assert_eq!(take_whole_chars(&mut buf), b"a");
        assert_eq!(buf, &euro[..2]);
        buf.extend_from_slice(&euro[2..]);
        assert_eq!(take_whole_chars(&mut buf), euro);
    }

    #[test]
    fn options_are_checked() {
        let o: GenOptions = serde_json::from_str(r#"{"max_tokens": 5, "seed": 7}"#).unwrap_or_default();
        assert_eq!((o.max_tokens, o.seed, o.temperature), (5, 7, 0.0));
        assert!(serde_json::from_str::<GenOptions>(r#"{"max_token": 5}"#).is_err(), "a typo is refused");
    }

    #[test]
    fn bytes_that_are_not_gguf_are_refused_before_llama_cpp_sees_them() {
        let Err(e) = GgmlGraph::load(b"not a model", GgmlConfig::default(), None) else {
            panic!("loaded garbage")
        };
        assert!(e.to_string().contains("GGUF"), "{e}");
    }
}
