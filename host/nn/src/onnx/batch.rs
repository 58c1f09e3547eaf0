//! Dynamic batching below the sandbox.
//!
//! Every request keeps its own fresh sandbox: no caller's input ever enters another caller's
//! instance. What is shared is the backend: `compute` calls that reach one graph from concurrent
//! sandboxes wait in one queue, and whichever waiter finds a free session runs everything queued
//! (up to the batch bound) as one ONNX Runtime run, padding every request to the longest
//! sequence and cutting each one's rows and positions back out of the outputs.
//!
//! When it waits, and how long:
//! - Nothing is ever held back while a session is free and no other sandbox of the graph is about
//!   to compute: a lone request runs at once, as it would without batching.
//! - While every session is busy, requests queue by themselves; the next free session takes them
//!   all (continuous batching, no timer involved).
//! - When sandboxes of the graph exist that have not computed yet (they are tokenizing, say), the
//!   run waits for them, at most [`BatchConfig::window`], and never past a full batch.
//!
//! Padding is with zeros, which is right for graphs that take an attention mask (a padded
//! position is masked out, so a row's outputs at its own positions do not depend on the rows
//! beside it, up to floating-point summation order). That is why batching is opt-in, per model,
//! by its owner (`batching` in the manifest), and why a graph is batched only when its declared
//! shapes say which axis is the batch and which is the sequence (symbolic dimensions, as every
//! Hugging Face export has them): inputs `[batch, sequence]`, outputs `[batch, …]` whose other
//! dynamic axes are `sequence`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime_wasi_nn::Tensor;
use wasmtime_wasi_nn::backend::NamedTensor;

use super::tensor::{InputSpec, element_size};
use crate::NnError;

/// How a graph coalesces concurrent `compute` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most rows (batch entries, summed over the requests) one run takes; 1 turns batching off.
    pub max_batch: usize,
    /// Longest a run waits for sandboxes of the graph that exist but have not computed yet.
    pub window: Duration,
}

impl BatchConfig {
    /// No batching: each `compute` runs alone, on the next free session.
    pub const OFF: Self = Self { max_batch: 1, window: Duration::ZERO };

    /// Whether runs may stack more than one row.
    pub fn is_on(&self) -> bool {
        self.max_batch > 1
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self::OFF
    }
}

/// One declared output of a graph.
#[derive(Debug, Clone)]
pub(crate) struct OutputSpec {
    pub(crate) name: String,
    /// -1 where the dimension is dynamic.
    pub(crate) shape: Vec<i64>,
    pub(crate) symbols: Vec<String>,
}

/// Which axes of each output follow the sequence, so a request's positions can be cut back out.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    seq_axes: HashMap<String, Vec<usize>>,
}

impl Plan {
    /// The plan for a graph, or why it cannot be batched.
    pub(crate) fn new(inputs: &[InputSpec], outputs: &[OutputSpec]) -> Result<Self, String> {
        let first = inputs.first().ok_or("the graph has no inputs")?;
        let symbol = |s: &InputSpec, i: usize| s.symbols.get(i).filter(|x| !x.is_empty()).cloned();
        let (Some(batch), Some(seq)) = (symbol(first, 0), symbol(first, 1)) else {
            return Err(format!(
                "input '{}' does not name its dimensions (it needs [batch, sequence] with symbolic names)",
                first.name
            ));
        };
        for s in inputs {
            if s.shape.len() != 2 || s.shape.iter().any(|&d| d >= 0) {
                return Err(format!("input '{}' is {:?}; batching needs [batch, sequence]", s.name, s.shape));
            }
            if symbol(s, 0).as_ref() != Some(&batch) || symbol(s, 1).as_ref() != Some(&seq) {
                return Err(format!(
                    "input '{}' has dimensions {:?}; every input must be [{batch}, {seq}]",
                    s.name, s.symbols
                ));
            }
        }
        let mut seq_axes = HashMap::new();
        for o in outputs {
            if o.shape.first().is_none_or(|&d| d >= 0) || o.symbols.first() != Some(&batch) {
                return Err(format!("output '{}' does not start with the batch dimension '{batch}'", o.name));
            }
            let mut axes = Vec::new();
            for (i, &d) in o.shape.iter().enumerate().skip(1) {
                if o.symbols.get(i) == Some(&seq) {
                    axes.push(i);
                } else if d < 0 {
                    return Err(format!(
                        "output '{}' has a dynamic dimension {i} that is not '{seq}'; its rows could not \
                         be cut apart",
                        o.name
                    ));
                }
            }
            seq_axes.insert(o.name.clone(), axes);
        }
        Ok(Self { seq_axes })
    }
}

/// One request's inputs, in the graph's input order.
pub(crate) struct Job {
    pub(crate) inputs: Vec<NamedTensor>,
    /// `[rows, seq]` when every input has exactly that shape (so it can share a run).
    shape: Option<(usize, usize)>,
}

impl Job {
    pub(crate) fn new(inputs: Vec<NamedTensor>) -> Self {
        let dims = |t: &NamedTensor| match t.tensor.dimensions.as_slice() {
            &[r, s] => Some((r as usize, s as usize)),
            _ => None,
        };
        let first = inputs.first().and_then(dims);
        let shape = first.filter(|f| inputs.iter().all(|t| dims(t).as_ref() == Some(f)));
        Self { inputs, shape }
    }
}

/// What one run did, for metrics.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// Time inside ONNX Runtime.
    pub took: Duration,
    /// Requests the run served.
    pub requests: usize,
    /// Rows it ran (padded requests stacked).
    pub rows: usize,
    /// How long each of those requests waited in the queue.
    pub waits: Vec<Duration>,
}

type Answer = Result<Vec<NamedTensor>, NnError>;

/// Runs a batch of jobs on a session and answers each, in order, with the time it took.
pub(crate) type Execute<'a, S> = dyn Fn(&mut S, &[Job], &Option<Plan>) -> (Vec<Answer>, Duration) + 'a;

struct Queued {
    id: u64,
    job: Job,
    since: Instant,
}

struct Queue<S> {
    sessions: Vec<S>,
    pending: VecDeque<Queued>,
    done: HashMap<u64, Answer>,
    next: u64,
    /// Sandboxes of the graph that exist and have not computed yet.
    expected: usize,
    /// A run is holding a session while it waits for the window.
    gathering: bool,
}

/// The queue in front of a graph's sessions.
pub(crate) struct Coalescer<S> {
    queue: Mutex<Queue<S>>,
    wake: Condvar,
    config: BatchConfig,
    plan: Option<Plan>,
    /// Most elements of one stacked input (rows × longest sequence).
    max_elements: usize,
}

impl<S> Coalescer<S> {
    /// A queue over `sessions`; `plan` is `None` for a graph that is not batched.
    pub(crate) fn new(
        sessions: Vec<S>,
        config: BatchConfig,
        plan: Option<Plan>,
        max_elements: usize,
    ) -> Self {
        let config = if plan.is_some() { config } else { BatchConfig::OFF };
        Self {
            queue: Mutex::new(Queue {
                sessions,
                pending: VecDeque::new(),
                done: HashMap::new(),
                next: 0,
                expected: 0,
                gathering: false,
            }),
            wake: Condvar::new(),
            config,
            plan,
            max_elements,
        }
    }

    pub(crate) fn config(&self) -> BatchConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, Queue<S>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sandbox of the graph now exists and will likely compute.
    pub(crate) fn expect(&self) {
        if self.config.is_on() {
            self.lock().expected += 1;
        }
    }

    /// That sandbox has computed, or ended without computing.
    pub(crate) fn arrived(&self) {
        if self.config.is_on() {
            let mut q = self.lock();
            q.expected = q.expected.saturating_sub(1);
            drop(q);
            self.wake.notify_all();
        }
    }

    /// Queues `job` and returns its outputs once a run has served it. `execute` runs a batch of
    /// jobs on a session and answers each, in order; it is called by whichever waiter leads.
    /// `announced`: the job's sandbox was counted by [`Coalescer::expect`]; it stops being
    /// expected in the same step as its job is queued, so no run can start in between.
    pub(crate) fn run(
        &self,
        job: Job,
        announced: bool,
        execute: &Execute<'_, S>,
        observe: &dyn Fn(RunReport),
    ) -> Answer {
        let mut q = self.lock();
        let id = q.next;
        q.next += 1;
        q.pending.push_back(Queued { id, job, since: Instant::now() });
        if announced && self.config.is_on() {
            q.expected = q.expected.saturating_sub(1);
        }
        self.wake.notify_all();
        loop {
            if let Some(answer) = q.done.remove(&id) {
                return answer;
            }
            if !q.gathering && !q.pending.is_empty() && !q.sessions.is_empty() {
                q = self.lead(q, execute, observe);
                continue;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes a session, waits for the window if more work is on its way, runs what is queued and
    /// posts the answers.
    fn lead<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue<S>>,
        execute: &Execute<'_, S>,
        observe: &dyn Fn(RunReport),
    ) -> MutexGuard<'a, Queue<S>> {
        let Some(mut session) = q.sessions.pop() else { return q };
        if self.config.is_on() && q.pending.front().is_some_and(|j| j.job.shape.is_some()) {
            q.gathering = true;
            let until = Instant::now() + self.config.window;
            loop {
                let rows: usize = q.pending.iter().filter_map(|j| j.job.shape.map(|s| s.0)).sum();
                let now = Instant::now();
                if q.expected == 0 || rows >= self.config.max_batch || now >= until {
                    break;
                }
                q = self.wake.wait_timeout(q, until - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            q.gathering = false;
        }
        let taken = self.take(&mut q.pending);
        drop(q);
        // another waiter may lead on another session while this one runs
        self.wake.notify_all();
        let started = Instant::now();
        let waits = taken.iter().map(|j| started.saturating_duration_since(j.since)).collect();
        let (ids, jobs): (Vec<u64>, Vec<Job>) = taken.into_iter().map(|j| (j.id, j.job)).unzip();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute(&mut session, &jobs, &self.plan)
        }));
        let (answers, took) = match ran {
            Ok((answers, took)) if answers.len() == jobs.len() => (answers, took),
            Ok(_) => (
                jobs.iter().map(|_| Err(NnError::Inference("a batch lost answers".into()))).collect(),
                Duration::ZERO,
            ),
            Err(_) => (
                jobs.iter().map(|_| Err(NnError::Inference("the backend panicked".into()))).collect(),
                Duration::ZERO,
            ),
        };
        let rows = jobs.iter().map(|j| j.shape.map_or(1, |s| s.0)).sum();
        observe(RunReport { took, requests: jobs.len(), rows, waits });
        let mut q = self.lock();
        q.sessions.push(session);
        for (id, answer) in ids.into_iter().zip(answers) {
            q.done.insert(id, answer);
        }
        self.wake.notify_all();
        q
    }

    /// The jobs of the next run: the oldest, and behind it every queued job that fits the bounds
    /// (rows, and elements once padded to the longest sequence).
    fn take(&self, pending: &mut VecDeque<Queued>) -> Vec<Queued> {
        let Some(first) = pending.pop_front() else { return Vec::new() };
        let Some((mut rows, mut seq)) = first.job.shape.filter(|_| self.config.is_on()) else {
            return vec![first];
        };
        let mut taken = vec![first];
        let mut rest = VecDeque::with_capacity(pending.len());
        while let Some(j) = pending.pop_front() {
            let fits = j.job.shape.is_some_and(|(r, s)| {
                let (r2, s2) = (rows + r, seq.max(s));
                r2 <= self.config.max_batch && r2.saturating_mul(s2) <= self.max_elements
            });
            if fits {
                if let Some((r, s)) = j.job.shape {
                    rows += r;
                    seq = seq.max(s);
                }
                taken.push(j);
            } else {
                rest.push_back(j);
            }
        }
        *pending = rest;
        taken
    }
}

/// The inputs of `jobs` stacked row after row, each padded with zeros to the longest sequence.
/// Returns them with the longest sequence.
pub(crate) fn stack(specs: &[InputSpec], jobs: &[Job]) -> Result<(Vec<NamedTensor>, usize), NnError> {
    let seq = jobs.iter().filter_map(|j| j.shape.map(|s| s.1)).max().unwrap_or(0);
    let rows: usize = jobs.iter().filter_map(|j| j.shape.map(|s| s.0)).sum();
    let mut out = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let first = jobs
            .first()
            .and_then(|j| j.inputs.get(i))
            .ok_or_else(|| NnError::Inference("an empty batch".into()))?;
        let ty = first.tensor.ty;
        let e = element_size(ty);
        let mut data = vec![0u8; rows * seq * e];
        let mut row0 = 0;
        for job in jobs {
            let (Some((r, s)), Some(t)) = (job.shape, job.inputs.get(i)) else {
                return Err(NnError::Inference("a request that cannot be batched was batched".into()));
            };
            if t.name != spec.name || t.tensor.ty != ty {
                return Err(NnError::Inference(format!("input '{}' differs between requests", spec.name)));
            }
            for k in 0..r {
                let src = t.tensor.data.get(k * s * e..(k + 1) * s * e);
                let dst = data.get_mut((row0 + k) * seq * e..((row0 + k) * seq + s) * e);
                match (src, dst) {
                    (Some(src), Some(dst)) => dst.copy_from_slice(src),
                    _ => {
                        return Err(NnError::Inference("a request's rows are shorter than its shape".into()));
                    }
                }
            }
            row0 += r;
        }
        out.push(NamedTensor {
            name: spec.name.clone(),
            tensor: Tensor::new(vec![rows as u32, seq as u32], ty, data),
        });
    }
    Ok((out, seq))
}

/// Each job's own rows and positions out of a stacked run's outputs.
pub(crate) fn split(plan: &Plan, outputs: &[NamedTensor], jobs: &[Job], seq: usize) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(jobs.len());
    let mut row0 = 0;
    for job in jobs {
        let Some((rows, own_seq)) = job.shape else {
            answers.push(Err(NnError::Inference("a request that cannot be batched was batched".into())));
            continue;
        };
        answers.push(
            outputs
                .iter()
                .map(|o| {
                    let axes = plan.seq_axes.get(&o.name).map(Vec::as_slice).unwrap_or_default();
                    let tensor = cut(&o.tensor, row0, rows, axes, seq, own_seq)?;
                    Ok(NamedTensor { name: o.name.clone(), tensor })
                })
                .collect(),
        );
        row0 += rows;
    }
    answers
}

/// Rows `row0..row0 + rows` of `t`, and positions `0..own_seq` along each of `seq_axes` (which
/// are `seq` long in `t`).
fn cut(
    t: &Tensor,
    row0: usize,
    rows: usize,
    seq_axes: &[usize],
    seq: usize,
    own_seq: usize,
) -> Result<Tensor, NnError> {
    let dims: Vec<usize> = t.dimensions.iter().map(|&d| d as usize).collect();
    let bad = || NnError::Inference(format!("an output of shape {dims:?} does not fit the batch"));
    if dims.first().is_none_or(|&b| b < row0 + rows) || seq_axes.iter().any(|&a| dims.get(a) != Some(&seq)) {
        return Err(bad());
    }
    let mut want = dims.clone();
    want[0] = rows;
    for &a in seq_axes {
        want[a] = own_seq;
    }
    let e = element_size(t.ty);
    // the innermost axes that are kept whole are copied as one block
    let k = (0..dims.len()).rev().find(|&i| want[i] != dims[i]).map_or(0, |i| i + 1);
    let block = dims[k..].iter().product::<usize>() * e;
    let mut strides = vec![0usize; dims.len()];
    let mut acc = block;
    for i in (0..k).rev() {
        strides[i] = acc;
        acc *= dims[i];
    }
    let outer: usize = want[..k].iter().product();
    let mut data = Vec::with_capacity(outer * block);
    let mut index = vec![0usize; k];
    for _ in 0..outer {
        let mut at = row0 * strides.first().copied().unwrap_or(0);
        for (i, &x) in index.iter().enumerate() {
            at += x * strides[i];
        }
        data.extend_from_slice(t.data.get(at..at + block).ok_or_else(bad)?);
        // the next index, last axis fastest
        for i in (0..k).rev() {
            index[i] += 1;
            if index[i] < want[i] {
                break;
            }
            index[i] = 0;
        }
    }
    Ok(Tensor::new(want.iter().map(|&d| d as u32).collect(), t.ty, data))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ort::tensor::TensorElementType;
    use wasmtime_wasi_nn::wit::TensorType;

    use super::*;

    fn i64s(dims: [u32; 2], v: &[i64]) -> Tensor {
        Tensor::new(dims.to_vec(), TensorType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// A request of `rows` rows of `seq` tokens, every id `id` (so its rows are recognisable).
    fn job(rows: u32, seq: u32, id: i64) -> Job {
        let n = (rows * seq) as usize;
        Job::new(vec![
            NamedTensor { name: "ids".into(), tensor: i64s([rows, seq], &vec![id; n]) },
            NamedTensor { name: "mask".into(), tensor: i64s([rows, seq], &vec![1; n]) },
        ])
    }

    fn specs() -> Vec<InputSpec> {
        ["ids", "mask"]
            .iter()
            .map(|n| InputSpec {
                name: n.to_string(),
                ty: TensorElementType::Int64,
                shape: vec![-1, -1],
                symbols: vec!["batch".into(), "sequence".into()],
            })
            .collect()
    }

    fn output(name: &str, shape: &[i64], symbols: &[&str]) -> OutputSpec {
        OutputSpec {
            name: name.into(),
            shape: shape.to_vec(),
            symbols: symbols.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn plan() -> Plan {
        Plan::new(&specs(), &[output("hidden", &[-1, -1, 2], &["batch", "sequence", ""])])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn values(t: &Tensor) -> Vec<i64> {
        t.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
    }

    /// A stand-in for ONNX Runtime: `hidden[b, s, :] = [ids[b, s], mask[b, s]]`, and a log of how
    /// many requests each run served.
    fn fake_execute(
        log: Arc<Mutex<Vec<usize>>>,
    ) -> impl Fn(&mut u8, &[Job], &Option<Plan>) -> (Vec<Answer>, Duration) {
        move |_session, jobs, plan| {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(jobs.len());
            let run = |inputs: &[NamedTensor]| {
                let (ids, mask) = (values(&inputs[0].tensor), values(&inputs[1].tensor));
                let d = inputs[0].tensor.dimensions.clone();
                let data = ids.iter().zip(&mask).flat_map(|(a, b)| [*a, *b]).flat_map(|x| x.to_le_bytes());
                vec![NamedTensor {
                    name: "hidden".into(),
                    tensor: Tensor::new(vec![d[0], d[1], 2], TensorType::I64, data.collect()),
                }]
            };
            let answers = match (jobs, plan) {
                ([one], _) => vec![Ok(run(&one.inputs))],
                (many, Some(plan)) => {
                    let (stacked, seq) = stack(&specs(), many).unwrap_or_else(|e| panic!("{e}"));
                    split(plan, &run(&stacked), many, seq)
                }
                (many, None) => many.iter().map(|j| Ok(run(&j.inputs))).collect(),
            };
            (answers, Duration::ZERO)
        }
    }

    /// Runs `jobs` from one thread each, every sandbox announced first (as a request's registry
    /// does), and answers each thread's outputs with the runs' sizes.
    fn run_all(queue: Arc<Coalescer<u8>>, jobs: Vec<Job>) -> (Vec<Answer>, Vec<usize>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        for _ in &jobs {
            queue.expect();
        }
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|j| {
                let (q, log) = (queue.clone(), log.clone());
                std::thread::spawn(move || q.run(j, true, &fake_execute(log), &|_| {}))
            })
            .collect();
        let answers =
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| panic!("a thread panicked"))).collect();
        let sizes = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (answers, sizes)
    }

    fn batched(sessions: usize, max_batch: usize, window: Duration) -> Arc<Coalescer<u8>> {
        Arc::new(Coalescer::new(vec![0; sessions], BatchConfig { max_batch, window }, Some(plan()), 1 << 20))
    }

    #[test]
    fn announced_sandboxes_share_one_run_and_each_gets_its_own_rows_back() {
        // a minute's window: the run starts once every announced sandbox has arrived, not on a timer
        let queue = batched(1, 64, Duration::from_secs(60));
        let jobs = vec![job(1, 3, 7), job(2, 5, 8), job(1, 1, 9)];
        let (answers, sizes) = run_all(queue, jobs);
        assert_eq!(sizes, vec![3], "one run for the three requests");
        for (answer, (rows, seq, id)) in answers.into_iter().zip([(1u32, 3u32, 7i64), (2, 5, 8), (1, 1, 9)]) {
            let out = answer.unwrap_or_else(|e| panic!("{e}"));
            let t = &out[0].tensor;
            assert_eq!(t.dimensions, vec![rows, seq, 2], "cut back to the request's own shape");
            // only its own ids, every position unmasked: nothing of the padding or the others
            let v = values(t);
            assert!(v.chunks(2).all(|p| p == [id, 1]), "request {id} got {v:?}");
        }
    }

    #[test]
    fn a_lone_request_never_waits_for_the_window() {
        let queue = batched(1, 64, Duration::from_secs(3600));
        let started = Instant::now();
        let (answers, sizes) = run_all(queue, vec![job(1, 4, 1)]);
        assert!(answers[0].is_ok());
        assert_eq!(sizes, vec![1]);
        assert!(started.elapsed() < Duration::from_secs(600), "it waited for the hour-long window");
    }

    #[test]
    fn a_sandbox_that_ends_without_computing_does_not_hold_the_run() {
        let queue = batched(1, 64, Duration::from_secs(3600));
        queue.expect(); // a sandbox that will trap before it computes
        let q = queue.clone();
        let gone = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            q.arrived();
        });
        let (answers, _) = run_all(queue, vec![job(1, 2, 1)]);
        assert!(answers[0].is_ok());
        gone.join().unwrap_or_else(|_| panic!("panicked"));
    }

    #[test]
    fn a_sandbox_that_never_computes_holds_a_run_for_the_window_only() {
        let window = Duration::from_millis(50);
        let queue = batched(1, 64, window);
        queue.expect(); // a sandbox that spins until its deadline and never computes
        let started = Instant::now();
        let (answers, sizes) = run_all(queue, vec![job(1, 2, 1)]);
        assert!(answers[0].is_ok());
        assert_eq!(sizes, vec![1]);
        assert!(started.elapsed() >= window, "the run did not wait for the announced sandbox");
    }

    #[test]
    fn runs_stay_within_the_row_and_element_bounds() {
        let queue = batched(1, 2, Duration::from_secs(60));
        let (answers, sizes) = run_all(queue, (0..5).map(|i| job(1, 2, i)).collect());
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(sizes.iter().sum::<usize>(), 5);
        assert!(sizes.iter().all(|&n| n <= 2), "a run took more than 2 rows: {sizes:?}");
        // elements: 4 rows of 8 positions fit 32; the fifth request waits for the next run
        let queue = Arc::new(Coalescer::new(
            vec![0u8],
            BatchConfig { max_batch: 64, window: Duration::from_secs(60) },
            Some(plan()),
            32,
        ));
        let (_, sizes) = run_all(queue, (0..5).map(|i| job(1, 8, i)).collect());
        assert!(sizes.iter().all(|&n| n <= 4), "a run went past the element bound: {sizes:?}");
    }

    #[test]
    fn a_request_that_cannot_be_stacked_runs_alone() {
        let queue = batched(1, 64, Duration::from_secs(60));
        let odd = Job::new(vec![
            NamedTensor { name: "ids".into(), tensor: i64s([1, 3], &[5, 5, 5]) },
            NamedTensor { name: "mask".into(), tensor: i64s([1, 2], &[1, 1]) },
        ]);
        assert!(odd.shape.is_none());
        let (_, sizes) = run_all(queue, vec![job(1, 3, 1), odd, job(1, 3, 2)]);
        assert_eq!(sizes.iter().sum::<usize>(), 3);
        assert!(sizes.contains(&1), "the odd request ran with others: {sizes:?}");
    }

    #[test]
    fn without_batching_every_request_runs_alone_on_the_next_free_session() {
        let queue = Arc::new(Coalescer::new(vec![0u8, 1], BatchConfig::OFF, None, 1 << 20));
        let (answers, sizes) = run_all(queue, (0..6).map(|i| job(1, 2, i)).collect());
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(sizes, vec![1; 6]);
    }

    #[test]
    fn a_panicking_backend_answers_errors_and_keeps_its_session() {
        let queue: Coalescer<u8> = Coalescer::new(vec![0u8], BatchConfig::OFF, None, 1 << 20);
        let calls = AtomicUsize::new(0);
        let boom = |_: &mut u8, _: &[Job], _: &Option<Plan>| -> (Vec<Answer>, Duration) {
            calls.fetch_add(1, Ordering::Relaxed);
            panic!("backend bug")
        };
        let e =
            queue.run(job(1, 1, 1), false, &boom, &|_| {}).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("panicked"), "{e}");
        // the session came back: the next request runs
        let log = Arc::new(Mutex::new(Vec::new()));
        assert!(queue.run(job(1, 1, 1), false, &fake_execute(log), &|_| {}).is_ok());
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_graph_without_named_batch_and_sequence_axes_is_not_batched() {
        let mut s = specs();
        s[1].symbols.clear();
        assert!(Plan::new(&s, &[]).is_err_and(|e| e.contains("every input must be")));
        let fixed = vec![InputSpec { shape: vec![1, -1], ..specs()[0].clone() }];
        assert!(Plan::new(&fixed, &[]).is_err_and(|e| e.contains("batching needs [batch, sequence]")));
        let other = [output("x", &[-1, -1], &["batch", "other"])];
        assert!(Plan::new(&specs(), &other).is_err_and(|e| e.contains("not 'sequence'")));
        let unbatched = [output("x", &[1, 4], &["", ""])];
        assert!(Plan::new(&specs(), &unbatched).is_err_and(|e| e.contains("batch dimension")));
    }

    #[test]
    fn cut_takes_rows_and_sequence_positions_only() {
        // [3 rows, 4 positions, 2 features], value = 100 r + 10 s + f
        let data: Vec<i64> = (0..3)
            .flat_map(|r| (0..4).flat_map(move |s| (0..2).map(move |f| 100 * r + 10 * s + f)))
            .collect();
        let t =
            Tensor::new(vec![3, 4, 2], TensorType::I64, data.iter().flat_map(|x| x.to_le_bytes()).collect());
        let c = cut(&t, 1, 2, &[1], 4, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.dimensions, vec![2, 2, 2]);
        assert_eq!(values(&c), vec![100, 101, 110, 111, 200, 201, 210, 211]);
        // a pooled output [rows, features] has no sequence axis
        let p = Tensor::new(vec![3, 2], TensorType::I64, (0..6i64).flat_map(|x| x.to_le_bytes()).collect());
        assert_eq!(values(&cut(&p, 2, 1, &[], 4, 2).unwrap_or_else(|e| panic!("{e}"))), vec![4, 5]);
        // an output that does not have the run's shape is refused, not read out of bounds
        assert!(cut(&p, 2, 2, &[], 4, 2).is_err());
    }
}
