//! Prometheus metrics: requests and latency per model and route, sandbox instantiate time, plugin
//! call time, backend inference time, requests in flight. Served at `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    model: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteModel {
    route: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CustodianLabel {
    custodian: String,
}

fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn batch_buckets() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

fn fine_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_002, 2.0, 24))
}

/// The host's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteModel, Histogram, fn() -> Histogram>,
    instantiate: Family<ModelLabel, Histogram, fn() -> Histogram>,
    plugin: Family<ModelLabel, Histogram, fn() -> Histogram>,
    backend: Family<ModelLabel, Histogram, fn() -> Histogram>,
    batch_requests: Family<ModelLabel, Histogram, fn() -> Histogram>,
    queue_wait: Family<ModelLabel, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    tokens: Family<TokenLabels, Counter>,
    cancelled: Family<ModelLabel, Counter>,
    custodian_failures: Family<CustodianLabel, Counter>,
    unsettled: Gauge,
    last_settle: Gauge,
    settled_requests: Counter,
    settle_gas: Counter,
    settle_failures: Counter,
    chain_up: Gauge,
    model_ready: Family<ModelLabel, Gauge>,
    parked: Family<ModelLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    llm_steps: Gauge,
    llm_sequence_steps: Gauge,
    llm_most_sequences: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("div");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency =
            Family::<RouteModel, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        let instantiate =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(fine_buckets);
        let plugin =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        let backend =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_buckets);
        let batch_requests =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(batch_buckets);
        registry.register(
            "backend_batch_requests",
            "Requests one backend run served (dynamic batching below the sandbox)",
            batch_requests.clone(),
        );
        let queue_wait =
            Family::<ModelLabel, Histogram, fn() -> Histogram>::new_with_constructor(fine_buckets);
        registry.register(
            "backend_queue_wait_seconds",
            "Time a request waited for a backend run (batch window or busy sessions)",
            queue_wait.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("requests", "Requests answered, by route, model and status", requests.clone());
        registry.register("request_duration_seconds", "Time to answer a request", latency.clone());
        registry.register(
            "sandbox_instantiate_seconds",
            "Time to create a request's sandbox",
            instantiate.clone(),
        );
        registry.register("plugin_call_seconds", "Time inside the plugin, backend included", plugin.clone());
        registry.register(
            "backend_inference_seconds",
            "Time in the ML backend per inference",
            backend.clone(),
        );
        registry.register("requests_in_flight", "Inference requests being served", in_flight.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "generation_tokens",
            "Tokens of text generation, by model and kind (prompt, completion)",
            tokens.clone(),
        );
        let cancelled = Family::<ModelLabel, Counter>::default();
        registry.register(
            "generations_cancelled",
            "Generations stopped because the caller went away",
            cancelled.clone(),
        );
        let custodian_failures = Family::<CustodianLabel, Counter>::default();
        registry.register(
            "custodian_failures",
            "Key custodians that failed to give a valid share (down, refusing, or a wrong share)",
            custodian_failures.clone(),
        );
        let unsettled = Gauge::default();
        let last_settle = Gauge::default();
        let settled_requests = Counter::default();
        let settle_gas = Counter::default();
        let settle_failures = Counter::default();
        registry.register(
            "unsettled_amount",
            "Charged but not yet settled (token base units)",
            unsettled.clone(),
        );
        registry.register(
            "last_settle_timestamp_seconds",
            "When the last settlement landed",
            last_settle.clone(),
        );
        registry.register("settled_requests", "Requests settled on-chain", settled_requests.clone());
        registry.register("settle_gas", "Gas used by settlement transactions", settle_gas.clone());
        registry.register("settle_failures", "Settlement rounds that failed", settle_failures.clone());
        let chain_up = Gauge::default();
        registry.register("chain_up", "1 while the chain RPC answers, 0 while it does not", chain_up.clone());
        let model_ready = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "model_ready",
            "1 for a model this host serves and has loaded, 0 while it loads or failed to",
            model_ready.clone(),
        );
        let parked = Family::<ModelLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "sandbox_parked_seconds",
            "Time sandboxes spent parked to give other models their fair share of cores",
            parked.clone(),
        );
        let (llm_steps, llm_sequence_steps, llm_most_sequences) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "llm_decode_steps",
            "Decode steps of the text-generation batches",
            llm_steps.clone(),
        );
        registry.register(
            "llm_decoded_sequences",
            "Sequences decoded, summed over steps (÷ steps: the average batch)",
            llm_sequence_steps.clone(),
        );
        registry.register(
            "llm_batch_most_sequences",
            "The most generations one decode step carried together",
            llm_most_sequences.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            instantiate,
            plugin,
            backend,
            batch_requests,
            queue_wait,
            in_flight,
            tokens,
            cancelled,
            custodian_failures,
            unsettled,
            last_settle,
            settled_requests,
            settle_gas,
            settle_failures,
            chain_up,
            model_ready,
            parked,
            llm_steps,
            llm_sequence_steps,
            llm_most_sequences,
        }
    }
}

impl Metrics {
    /// Copies the text-generation batches' counters in (before an export).
    pub fn refresh_llm(&self) {
        let b = div_nn::batch_stats();
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.llm_steps.set(g(b.steps));
        self.llm_sequence_steps.set(g(b.sequence_steps));
        self.llm_most_sequences.set(g(b.most_sequences));
    }

    /// Records a settlement round or its failure.
    pub fn settle_round(&self, round: Result<&div_meter::settle::SettleReport, &div_meter::MeterError>) {
        match round {
            Ok(r) => self.settlement(r),
            Err(_) => self.settlement_failed(),
        }
    }

    /// Whether the chain answers.
    pub fn set_chain_up(&self, up: bool) {
        self.chain_up.set(i64::from(up));
    }

    /// Whether `model` is loaded and serving.
    pub fn set_model_ready(&self, model: &str, ready: bool) {
        self.model_ready.get_or_create(&ModelLabel { model: model.to_string() }).set(i64::from(ready));
    }

    /// Time a request of `model` spent parked for fairness.
    pub fn parked(&self, model: &str, took: Duration) {
        if !took.is_zero() {
            self.parked.get_or_create(&ModelLabel { model: model.to_string() }).inc_by(took.as_secs_f64());
        }
    }

    /// Records a settlement round.
    pub fn settlement(&self, report: &div_meter::settle::SettleReport) {
        if report.tx.is_some() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.last_settle.set(i64::try_from(now).unwrap_or(i64::MAX));
            self.settled_requests.inc_by(report.requests);
            self.settle_gas.inc_by(report.gas_used);
        }
    }

    /// Counts a failed settlement round.
    pub fn settlement_failed(&self) {
        self.settle_failures.inc();
    }

    /// Sets the unsettled amount.
    pub fn set_unsettled(&self, amount: alloy::primitives::U256) {
        self.unsettled.set(i64::try_from(amount).unwrap_or(i64::MAX));
    }

    /// Counts a custodian that failed to give a valid share.
    pub fn custodian_failure(&self, custodian: &str) {
        self.custodian_failures.get_or_create(&CustodianLabel { custodian: custodian.to_string() }).inc();
    }

    /// Counts an answered request.
    pub fn request(&self, route: &str, model: &str, status: u16, took: Duration) {
        let (route, model) = (route.to_string(), model.to_string());
        self.requests
            .get_or_create(&RequestLabels { route: route.clone(), model: model.clone(), status })
            .inc();
        self.latency.get_or_create(&RouteModel { route, model }).observe(took.as_secs_f64());
    }

    /// Records one sandbox's instantiate and call times.
    pub fn sandbox(&self, model: &str, instantiate: Duration, call: Duration) {
        let label = ModelLabel { model: model.to_string() };
        self.instantiate.get_or_create(&label).observe(instantiate.as_secs_f64());
        self.plugin.get_or_create(&label).observe(call.as_secs_f64());
    }

    /// Records one ONNX run: its time, how many requests it served, how long each waited.
    pub fn backend_run(&self, model: &str, run: &div_nn::RunReport) {
        let label = ModelLabel { model: model.to_string() };
        self.backend.get_or_create(&label).observe(run.took.as_secs_f64());
        self.batch_requests.get_or_create(&label).observe(run.requests as f64);
        let waits = self.queue_wait.get_or_create(&label);
        for w in &run.waits {
            waits.observe(w.as_secs_f64());
        }
    }

    /// Records one generation's token counts (and whether the caller left before its end).
    pub fn generation(&self, model: &str, prompt: u32, completion: u32, cancelled: bool) {
        let t = |kind: &str| TokenLabels { model: model.to_string(), kind: kind.to_string() };
        self.tokens.get_or_create(&t("prompt")).inc_by(u64::from(prompt));
        self.tokens.get_or_create(&t("completion")).inc_by(u64::from(completion));
        if cancelled {
            self.cancelled.get_or_create(&ModelLabel { model: model.to_string() }).inc();
        }
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// An observer for the model store that feeds [`Metrics::backend_run`].
    pub fn backend_observer(self: &Arc<Self>) -> div_models::BackendObserver {
        let me = self.clone();
        Arc::new(move |model, run| me.backend_run(model, run))
    }
}
