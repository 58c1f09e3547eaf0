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
struct ChainLabel {
    chain_id: u64,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    model: String,
    outcome: &'static str,
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
    result_cache: Family<CacheLabels, Counter>,
    custodian_failures: Family<CustodianLabel, Counter>,
    unsettled: Family<ChainLabel, FloatGauge>,
    unsettled_requests: Family<ChainLabel, Gauge>,
    unsettled_since: Family<ChainLabel, Gauge>,
    settlement_lease: Family<ChainLabel, Gauge>,
    last_settle: Family<ChainLabel, Gauge>,
    withdraw_delay: Family<ChainLabel, Gauge>,
    settle_interval: Gauge,
    settled_requests: Counter,
    settle_gas: Counter,
    settle_failures: Counter,
    chain_up: Family<ChainLabel, Gauge>,
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
        let result_cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "result_cache",
            "Shared result cache lookups, by model and outcome (hit, miss, error: Redis did not answer)",
            result_cache.clone(),
        );
        let custodian_failures = Family::<CustodianLabel, Counter>::default();
        registry.register(
            "custodian_failures",
            "Key custodians that failed to give a valid share (down, refusing, or a wrong share)",
            custodian_failures.clone(),
        );
        let unsettled = Family::<ChainLabel, FloatGauge>::default();
        let unsettled_requests = Family::<ChainLabel, Gauge>::default();
        let unsettled_since = Family::<ChainLabel, Gauge>::default();
        let last_settle = Family::<ChainLabel, Gauge>::default();
        let settlement_lease = Family::<ChainLabel, Gauge>::default();
        registry.register(
            "settlement_lease",
            "1 while this replica holds the settlement lease of a shared (PostgreSQL) ledger, by chain; \
             absent with the embedded ledger, whose one process always settles",
            settlement_lease.clone(),
        );
        let withdraw_delay = Family::<ChainLabel, Gauge>::default();
        let settle_interval = Gauge::default();
        let settled_requests = Counter::default();
        let settle_gas = Counter::default();
        let settle_failures = Counter::default();
        registry.register(
            "unsettled_amount",
            "Charged but not yet settled, by chain (token base units, every stablecoin of the chain added)",
            unsettled.clone(),
        );
        registry.register(
            "unsettled_requests",
            "Charged requests not yet settled, by chain",
            unsettled_requests.clone(),
        );
        registry.register(
            "unsettled_since_timestamp_seconds",
            "Since when the chain has had charges waiting (seen at a scrape or after a settlement; 0: none)",
            unsettled_since.clone(),
        );
        registry.register(
            "last_settle_timestamp_seconds",
            "When the last settlement landed, by chain",
            last_settle.clone(),
        );
        registry.register(
            "withdraw_delay_seconds",
            "PaymentStream's withdraw delay, by chain: every charge must be settled well before it",
            withdraw_delay.clone(),
        );
        registry.register("settle_interval_seconds", "The settlement interval", settle_interval.clone());
        registry.register("settled_requests", "Requests settled on-chain", settled_requests.clone());
        registry.register("settle_gas", "Gas used by settlement transactions", settle_gas.clone());
        registry.register("settle_failures", "Settlement rounds that failed", settle_failures.clone());
        let chain_up = Family::<ChainLabel, Gauge>::default();
        registry.register(
            "chain_up",
            "1 while the chain's RPC answers, 0 while it does not, by chain",
            chain_up.clone(),
        );
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
            result_cache,
            custodian_failures,
            unsettled,
            unsettled_requests,
            unsettled_since,
            settlement_lease,
            last_settle,
            withdraw_delay,
            settle_interval,
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

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

    /// Records a settlement round on `chain_id`, or its failure.
    pub fn settle_round(
        &self,
        chain_id: u64,
        round: Result<&div_meter::settle::SettleReport, &div_meter::MeterError>,
    ) {
        match round {
            Ok(r) => self.settlement(chain_id, r),
            Err(_) => self.settlement_failed(),
        }
    }

    /// Counts a result cache lookup of `model`: `hit`, `miss` or `error`.
    pub fn result_cache(&self, model: &str, outcome: &'static str) {
        self.result_cache.get_or_create(&CacheLabels { model: model.to_string(), outcome }).inc();
    }

    /// Whether this replica holds `chain_id`'s settlement lease.
    pub fn set_settlement_lease(&self, chain_id: u64, held: bool) {
        self.settlement_lease.get_or_create(&ChainLabel { chain_id }).set(i64::from(held));
    }

    /// Whether `chain_id`'s RPC answers.
    pub fn set_chain_up(&self, chain_id: u64, up: bool) {
        self.chain_up.get_or_create(&ChainLabel { chain_id }).set(i64::from(up));
    }

    /// What the host must settle in time: `chain_id`'s withdraw delay, and its own interval.
    pub fn set_settle_bounds(&self, chain_id: u64, withdraw_delay_secs: u64, interval_secs: u64) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.withdraw_delay.get_or_create(&ChainLabel { chain_id }).set(g(withdraw_delay_secs));
        self.settle_interval.set(g(interval_secs));
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

    /// Records a settlement round on `chain_id`.
    pub fn settlement(&self, chain_id: u64, report: &div_meter::settle::SettleReport) {
        if report.tx.is_some() {
            let label = ChainLabel { chain_id };
            self.last_settle.get_or_create(&label).set(i64::try_from(now_secs()).unwrap_or(i64::MAX));
            // what waits now was charged after this round began: its age counts from here
            self.unsettled_since.get_or_create(&label).set(0);
            self.settled_requests.inc_by(report.requests);
            self.settle_gas.inc_by(report.gas_used);
        }
    }

    /// Counts a failed settlement round.
    pub fn settlement_failed(&self) {
        self.settle_failures.inc();
    }

    /// Sets what `chain_id` has charged and not settled; a backlog first seen now is dated now.
    pub fn set_unsettled(&self, chain_id: u64, amount: alloy::primitives::U256, requests: u64) {
        let label = ChainLabel { chain_id };
        self.unsettled.get_or_create(&label).set(f64::from(amount));
        self.unsettled_requests.get_or_create(&label).set(i64::try_from(requests).unwrap_or(i64::MAX));
        let since = self.unsettled_since.get_or_create(&label);
        if requests == 0 && amount.is_zero() {
            since.set(0);
        } else if since.get() == 0 {
            since.set(i64::try_from(now_secs()).unwrap_or(i64::MAX));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names (`div_…`) an operator's file refers to, as the exposition names their
    /// families: counters without `_total`, histograms without `_bucket`/`_sum`/`_count`.
    pub(crate) fn referenced(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(at) = text[i..].find("div_") {
            let start = i + at;
            let boundary =
                start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |n| start + n);
            if boundary {
                let name = &text[start..end];
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                names.insert(base.to_string());
            }
            i = end.max(start + 4);
        }
        names
    }

    /// Every metric the alert rules and the Grafana dashboard use is one the host exports (the
    /// custodian's own are checked in `div-custodian`): a renamed metric fails here, not
    /// silently in an operator's dashboard.
    #[test]
    fn the_alert_rules_and_the_dashboard_use_metrics_the_host_exports()
    -> Result<(), Box<dyn std::error::Error>> {
        // a family is exported once it has a series: give each one, as a serving host would
        let m = Metrics::default();
        m.request("/v1/embeddings", "m", 200, Duration::from_millis(3));
        m.sandbox("m", Duration::from_micros(50), Duration::from_millis(2));
        let run = div_nn::RunReport {
            took: Duration::from_millis(1),
            requests: 2,
            rows: 2,
            waits: vec![Duration::ZERO],
        };
        m.backend_run("m", &run);
        m.generation("m", 5, 7, true);
        m.custodian_failure("0xc1");
        m.set_unsettled(31337, alloy::primitives::U256::from(1000u64), 1);
        m.settlement(
            31337,
            &div_meter::settle::SettleReport { tx: Some(Default::default()), ..Default::default() },
        );
        m.settlement_failed();
        m.set_chain_up(31337, true);
        m.set_settle_bounds(31337, 3600, 30);
        m.set_model_ready("m", true);
        m.parked("m", Duration::from_millis(1));
        m.set_settlement_lease(31337, true);
        m.result_cache("m", "hit");
        let exported: std::collections::BTreeSet<String> = m
            .encode()?
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for file in ["deploy/prometheus/rules.yml", "deploy/grafana/div-host.json"] {
            let text = std::fs::read_to_string(root.join(file))?;
            let used = referenced(&text);
            assert!(used.len() > 5, "{file}: too few metrics found ({used:?})");
            for name in used.iter().filter(|n| !n.starts_with("div_custodian_requests")) {
                assert!(exported.contains(name), "{file} uses {name}, which the host does not export");
            }
        }
        Ok(())
    }

    #[test]
    fn referenced_names_lose_their_sample_suffixes() {
        let used = referenced("rate(div_requests_total[5m]) x_div_no div_a_bucket{le} div_b_count");
        assert_eq!(used.into_iter().collect::<Vec<_>>(), ["div_a", "div_b", "div_requests"]);
    }
}
