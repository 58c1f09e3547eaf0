//! Continuous batching: every generation on one model decodes in one llama.cpp batch.
//!
//! Each loaded GGUF model gets, on first use, one worker thread owning one llama.cpp context
//! with [`GgmlConfig::slots`] sequences, each with its own KV budget of `n_ctx` tokens (as
//! `llama-server` runs parallel slots). Requests join between decode steps: a new one takes a
//! free slot, its prompt is decoded in chunks beside the others' next tokens, and from then on
//! each step decodes one token of every active sequence in a single batch. Requests leave between
//! steps too: when one finishes, or its caller goes away (its [`Generation`] is dropped), its
//! slot and KV cells are freed before the next step. More requests than slots wait in order.
//!
//! Every request keeps its own sampler (greedy, or top-p/temperature with its own seed, and a
//! grammar when its output must be JSON), so batching changes nothing a request can observe but
//! its speed. Each step hands every request one piece of text through a one-place channel: a
//! request whose plugin has not taken its last piece yet sits the next step out, so a slow reader
//! slows only itself.
//!
//! Decode steps draw on the process-wide pool of cores, so two models' batches take turns
//! instead of oversubscribing ggml's spinning workers.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::{CoresHeld, Decoding, GenOptions, Inner, Step, backend, take_whole_chars};
use crate::NnError;

static STEPS: AtomicU64 = AtomicU64::new(0);
static SEQUENCE_STEPS: AtomicU64 = AtomicU64::new(0);
static MOST_SEQUENCES: AtomicU64 = AtomicU64::new(0);

/// What the batch workers have done so far, across models: decode steps, sequences decoded
/// (summed over steps), and the most sequences one step decoded together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// Decode steps.
    pub steps: u64,
    /// Sequences decoded, summed over steps (÷ steps = average batch).
    pub sequence_steps: u64,
    /// The most sequences one step decoded.
    pub most_sequences: u64,
}

/// The batch workers' counters.
pub fn batch_stats() -> BatchStats {
    BatchStats {
        steps: STEPS.load(Ordering::Relaxed),
        sequence_steps: SEQUENCE_STEPS.load(Ordering::Relaxed),
        most_sequences: MOST_SEQUENCES.load(Ordering::Relaxed),
    }
}

/// A generation asked of the worker.
struct Job {
    tokens: Vec<LlamaToken>,
    options: GenOptions,
    steps: SyncSender<Result<Step, NnError>>,
}

/// One model's batched decoder.
pub(crate) struct Batcher {
    jobs: Sender<Job>,
}

impl Batcher {
    /// Starts the worker for `inner`'s model.
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Self, NnError> {
        let (jobs, rx) = channel();
        std::thread::Builder::new()
            .name("div-llm-batch".into())
            .spawn(move || run(&inner, &rx))
            .map_err(|e| NnError::Inference(format!("starting the batch worker: {e}")))?;
        Ok(Self { jobs })
    }

    /// Queues a generation of `tokens`; its steps arrive in order.
    pub(crate) fn submit(&self, tokens: Vec<LlamaToken>, options: GenOptions) -> Generation {
        let (steps, rx) = sync_channel(1);
        if let Err(e) = self.jobs.send(Job { tokens, options, steps }) {
            let _ = e.0.steps.try_send(Err(NnError::Inference("the batch worker stopped".into())));
        }
        Generation { rx: Mutex::new(Some(rx)), finished: false }
    }
}

/// The steps of one generation, in order. Dropping it frees its slot at the worker's next step.
pub struct Generation {
    /// In a mutex only to be `Sync` (wasi-nn's contexts must be); never contended.
    rx: Mutex<Option<Receiver<Result<Step, NnError>>>>,
    finished: bool,
}

impl Generation {
    /// A generation that failed before it started.
    pub(crate) fn failed(e: NnError) -> Self {
        let (tx, rx) = sync_channel(1);
        let _ = tx.try_send(Err(e));
        Self { rx: Mutex::new(Some(rx)), finished: false }
    }

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

/// A sequence in the shared context.
struct Slot {
    seq: i32,
    steps: SyncSender<Result<Step, NnError>>,
    sampler: LlamaSampler,
    prompt: Vec<LlamaToken>,
    /// Prompt tokens decoded so far.
    prefilled: usize,
    /// Tokens in this sequence's KV cells.
    n_past: i32,
    /// The token sampled last, to decode next.
    next: Option<LlamaToken>,
    generated: u32,
    max_tokens: u32,
    pending: Vec<u8>,
    /// A step the plugin has not taken yet.
    held: Option<Step>,
    done: bool,
}

fn sampler_for(o: &GenOptions, model: &LlamaModel) -> Result<LlamaSampler, NnError> {
    let mut chain = Vec::new();
    if let Some(g) = &o.grammar {
        chain.push(
            LlamaSampler::grammar(model, g, "root")
                .map_err(|e| NnError::InvalidInput(format!("the output grammar does not load: {e}")))?,
        );
    }
    if o.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.push(LlamaSampler::top_p(o.top_p.clamp(0.0, 1.0), 1));
        chain.push(LlamaSampler::temp(o.temperature));
        chain.push(LlamaSampler::dist(o.seed));
    }
    Ok(if chain.len() == 1 { chain.remove(0) } else { LlamaSampler::chain_simple(chain) })
}

fn free(ctx: &mut LlamaContext<'_>, slot: &mut Option<Slot>) {
    if let Some(s) = slot.take() {
        let _ = ctx.clear_kv_cache_seq(u32::try_from(s.seq).ok(), None, None);
    }
}

/// The worker: admits queued generations into free slots, decodes one batch per step, samples
/// each sequence, hands out the pieces; until the model is unloaded and no generation is left.
fn run(inner: &Inner, jobs: &Receiver<Job>) {
    let fail_all = |why: String| {
        while let Ok(j) = jobs.recv() {
            let _ = j.steps.try_send(Err(NnError::Inference(why.clone())));
        }
    };
    let backend = match backend() {
        Ok(b) => b,
        Err(e) => return fail_all(e.to_string()),
    };
    let model = &inner.model;
    let vocab = model.vocab();
    let cfg = inner.config;
    let n_slots = cfg.slots.max(1);
    let per_seq = cfg.n_ctx.min(model.n_ctx_train().max(1)).max(16);
    let n_batch = cfg.n_batch.max(n_slots + 16);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(per_seq.saturating_mul(n_slots)))
        .with_n_seq_max(n_slots)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(cfg.threads)
        .with_n_threads_batch(cfg.threads);
    let ctx = {
        let _one_at_a_time = inner.create.lock().unwrap_or_else(|p| p.into_inner());
        model.new_context(backend, params)
    };
    let mut ctx = match ctx {
        Ok(c) => c,
        Err(e) => return fail_all(format!("llama.cpp context: {e}")),
    };
    let mut slots: Vec<Option<Slot>> = (0..n_slots).map(|_| None).collect();
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut batch = LlamaBatch::new(n_batch as usize, i32::try_from(n_slots).unwrap_or(1));
    let mut closed = false;
    let mut decoded_once = false;
    loop {
        // take what was asked; sleep only when there is nothing at all to do
        if slots.iter().all(Option::is_none) && queue.is_empty() {
            if closed {
                return;
            }
            match jobs.recv() {
                Ok(j) => queue.push_back(j),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(j) => queue.push_back(j),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // join: free slots take waiting generations
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some(job) = queue.pop_front() else { break };
            if job.tokens.is_empty() || job.tokens.len() >= per_seq as usize {
                let _ = job.steps.try_send(Err(NnError::InvalidInput(format!(
                    "the prompt is {} tokens; a request's context holds {per_seq}",
                    job.tokens.len()
                ))));
                continue;
            }
            let sampler = match sampler_for(&job.options, model) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.steps.try_send(Err(e));
                    continue;
                }
            };
            let seq = i32::try_from(i).unwrap_or(0);
            let _ = ctx.clear_kv_cache_seq(u32::try_from(i).ok(), None, None);
            *slot = Some(Slot {
                seq,
                steps: job.steps,
                sampler,
                prompt: job.tokens,
                prefilled: 0,
                n_past: 0,
                next: None,
                generated: 0,
                max_tokens: job.options.max_tokens.max(1),
                pending: Vec::new(),
                held: None,
                done: false,
            });
        }
        // hand out what readers could not take yet; leave: the finished and the gone
        for slot in slots.iter_mut() {
            let Some(s) = slot.as_mut() else { continue };
            if let Some(step) = s.held.take() {
                match s.steps.try_send(Ok(step)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(Ok(step))) => s.held = Some(step),
                    Err(_) => s.done = true,
                }
            }
            if s.done && s.held.is_none() {
                free(&mut ctx, slot);
            }
        }
        // one batch: a token of every sequence that is generating and read, then prompt chunks
        batch.clear();
        let mut sample_at: Vec<(usize, i32)> = Vec::new();
        let mut budget = n_batch as usize;
        let mut add_err = None;
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(s) = slot.as_mut() else { continue };
            if let (Some(t), None) = (s.next, &s.held) {
                let idx = batch.n_tokens();
                if let Err(e) = batch.add(t, s.n_past, &[s.seq], true) {
                    add_err = Some(e.to_string());
                    break;
                }
                s.next = None;
                s.n_past += 1;
                sample_at.push((i, idx));
                budget = budget.saturating_sub(1);
            }
        }
        let mut prefilling: Vec<usize> = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(s) = slot.as_mut() else { continue };
            if add_err.is_some() || budget == 0 || s.prefilled >= s.prompt.len() {
                continue;
            }
            prefilling.push(i);
            let end = s.prompt.len().min(s.prefilled + budget);
            for p in s.prefilled..end {
                let last = p + 1 == s.prompt.len();
                let idx = batch.n_tokens();
                if let Err(e) = batch.add(s.prompt[p], s.n_past, &[s.seq], last) {
                    add_err = Some(e.to_string());
                    break;
                }
                s.n_past += 1;
                if last {
                    sample_at.push((i, idx));
                }
            }
            budget -= end - s.prefilled;
            s.prefilled = end;
        }
        if let Some(e) = add_err {
            for slot in slots.iter_mut() {
                if let Some(s) = slot.as_ref() {
                    let _ = s.steps.try_send(Err(NnError::Inference(format!("llama.cpp batch: {e}"))));
                }
                free(&mut ctx, slot);
            }
            continue;
        }
        if batch.n_tokens() == 0 {
            // every sequence waits for its reader: wait a little (or for a new request)
            match jobs.recv_timeout(Duration::from_millis(1)) {
                Ok(j) => queue.push_back(j),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            continue;
        }
        let Some(_decoding) = Decoding::start() else {
            // the process is exiting: decode nothing more
            for slot in slots.iter_mut() {
                if let Some(s) = slot.as_ref() {
                    let _ = s.steps.try_send(Err(NnError::Inference("the host is shutting down".into())));
                }
                free(&mut ctx, slot);
            }
            return;
        };
        let decoded = {
            let _cores = CoresHeld::take(cfg.threads.max(1) as usize);
            ctx.decode(&mut batch)
        };
        // the sequences this step decoded a token (or a prompt chunk) of
        let mut in_batch: Vec<usize> = sample_at.iter().map(|(i, _)| *i).collect();
        in_batch.extend(prefilling);
        in_batch.sort_unstable();
        in_batch.dedup();
        let sequences = in_batch.len() as u64;
        if !decoded_once {
            decoded_once = true;
            super::register_exit_wait();
        }
        STEPS.fetch_add(1, Ordering::Relaxed);
        SEQUENCE_STEPS.fetch_add(sequences, Ordering::Relaxed);
        MOST_SEQUENCES.fetch_max(sequences, Ordering::Relaxed);
        if let Err(e) = decoded {
            for slot in slots.iter_mut() {
                if let Some(s) = slot.as_ref() {
                    let _ = s.steps.try_send(Err(NnError::Inference(format!("llama.cpp decode: {e}"))));
                }
                free(&mut ctx, slot);
            }
            continue;
        }
        for (i, idx) in sample_at {
            let Some(s) = slots[i].as_mut() else { continue };
            let token = s.sampler.sample(&ctx, idx);
            s.generated += 1;
            let eog = vocab.is_eog(token);
            if !eog {
                vocab.token_to_piece_into(token, &mut s.pending, false, None);
            }
            let full = u32::try_from(s.n_past).unwrap_or(u32::MAX) + 1 >= per_seq;
            let done = eog || s.generated >= s.max_tokens || full;
            let text = if done { std::mem::take(&mut s.pending) } else { take_whole_chars(&mut s.pending) };
            // an end token is not text the caller receives, nor one they pay for
            let counted = if eog { s.generated - 1 } else { s.generated };
            let prompt_tokens = u32::try_from(s.prompt.len()).unwrap_or(u32::MAX);
            let step = Step { text, done, prompt_tokens, generated: counted };
            s.done = done;
            if !done {
                s.next = Some(token);
            }
            match s.steps.try_send(Ok(step)) {
                Ok(()) => {}
                Err(TrySendError::Full(Ok(step))) => s.held = Some(step),
                Err(_) => s.done = true,
            }
            if s.done && s.held.is_none() {
                free(&mut ctx, &mut slots[i]);
            }
        }
    }
}
