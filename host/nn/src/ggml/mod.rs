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
//! Concurrent generations on one model decode together, one llama.cpp batch per step, each in a
//! sequence of its own with its own KV budget and sampler ([`batch`]: continuous batching, as
//! `llama-server` runs parallel slots); requests join and leave between steps. The worker decodes
//! one token ahead of the plugin: while the plugin handles token n, token n+1 is being computed,
//! so the sandbox costs almost nothing in tokens/s. Dropping the context (the request ended, or
//! the caller went away) frees its slot at the next step.
//!
//! Plaintext weights never touch a filesystem: llama.cpp loads GGUF only from a path, so the host
//! writes the decrypted bytes into an anonymous memory file (`memfd_create`, sealed against
//! writes), and llama.cpp maps it from `/proc/self/fd/N`; the caller's buffer is zeroised after.

use std::io::Write as _;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id, NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor};

use crate::template::{ChatMessage, ChatTemplate};
use crate::{NnError, RequestUsage};

mod batch;
mod prompt;

pub use batch::{BatchStats, Generation, batch_stats};

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

/// The process is exiting: batch workers start no new decode.
static EXITING: AtomicBool = AtomicBool::new(false);
/// Decodes in flight, across every model.
static DECODING: AtomicUsize = AtomicUsize::new(0);

/// A decode in flight; `None` once the process has begun to exit.
pub(crate) struct Decoding(());

impl Decoding {
    pub(crate) fn start() -> Option<Self> {
        DECODING.fetch_add(1, Ordering::SeqCst);
        if EXITING.load(Ordering::SeqCst) {
            DECODING.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(()))
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        DECODING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// At process exit, C++ static destructors tear down ggml's CPU backend while a batch worker may
/// be in the middle of a decode on another thread, which then crashes the exit (seen as SIGSEGV
/// when a test binary or the host ends mid-generation). So exit first stops new decodes and waits
/// (up to 10 s) for those in flight. Exit handlers run in reverse order of registration, and ggml
/// registers some of its destructors lazily, during a model's first decode: so a batch worker
/// registers this wait after its first decode, which puts it ahead of them (at most 64 times in a
/// process's life; it is idempotent).
pub(crate) fn register_exit_wait() {
    static REGISTERED: AtomicUsize = AtomicUsize::new(0);
    if REGISTERED.fetch_add(1, Ordering::SeqCst) < 64 {
        atexit_wait();
    }
}

#[allow(unsafe_code)]
fn atexit_wait() {
    extern "C" fn wait_for_decodes() {
        EXITING.store(true, Ordering::SeqCst);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while DECODING.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    // SAFETY: `atexit` only records a function pointer; `wait_for_decodes` touches atomics and
    // sleeps, and cannot unwind.
    unsafe {
        libc::atexit(wait_for_decodes);
    }
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

/// How a model's generations are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlConfig {
    /// Context length in tokens (prompt + generation) of each request: its KV budget.
    pub n_ctx: u32,
    /// Tokens decoded per batch (every sequence's next token, then prompt chunks).
    pub n_batch: u32,
    /// Threads each decode step uses.
    pub threads: i32,
    /// Generations decoded together per model; more wait for a free slot.
    pub slots: u32,
}

impl Default for GgmlConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { n_ctx: 2048, n_batch: 512, threads: i32::try_from(cores).unwrap_or(1), slots: 4 }
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

/// A loaded GGUF model, shared by every request on it, and its batched decoder (started on
/// first use; it stops once the last clone is gone and no generation is left).
#[derive(Clone)]
pub struct GgmlGraph(Arc<Inner>, Arc<OnceLock<Result<batch::Batcher, String>>>);

/// What one generation is asked for.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
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
    /// A llama.cpp grammar (GBNF, rule `root`) the output must follow (structured output).
    pub grammar: Option<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0, grammar: None }
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
        Ok(Self(
            Arc::new(Inner { model, create: Mutex::new(()), config, template, specials }),
            Arc::default(),
        ))
    }

    /// The chat template requests on this model are rendered with, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.0.template.as_ref()
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

    /// Starts generating from the `prompt` tokens in the model's batch; the steps arrive in
    /// order.
    pub fn generate(&self, prompt: Vec<LlamaToken>, options: GenOptions) -> Generation {
        match self.1.get_or_init(|| batch::Batcher::start(self.0.clone()).map_err(|e| e.to_string())) {
            Ok(b) => b.submit(prompt, options),
            Err(e) => Generation::failed(NnError::Inference(e.clone())),
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
        // the batch worker computes the step on its own thread: this one only waits
        let s = usage.waiting(|| generation.next_step())?;
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
