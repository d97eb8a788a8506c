//! Prometheus metrics. Names follow vLLM's where one exists (gateways and
//! dashboards read them); tandem's own carry the `tandem_` prefix. The engine
//! thread writes plain atomics (no locks on its hot path); a scrape collects
//! them as the `prometheus` crate's metric families ([`Families`]), and the
//! crate's registry and text encoder serve them at `/metrics` (`api/health.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus::proto::{self, MetricFamily, MetricType};

/// The metric families of one scrape, in the crate's data model.
#[derive(Default)]
pub struct Families(pub Vec<MetricFamily>);

fn label_pairs(labels: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    labels
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Families {
    fn family(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        f.set_metric(metrics);
        self.0.push(f);
    }

    fn sample(kind: MetricType, labels: &[(&str, &str)], v: f64) -> proto::Metric {
        let mut m = proto::Metric::default();
        m.set_label(label_pairs(labels));
        if kind == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        m
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, help, MetricType::GAUGE, vec![Self::sample(MetricType::GAUGE, &[], v)]);
    }

    pub fn counter(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, help, MetricType::COUNTER, vec![Self::sample(MetricType::COUNTER, &[], v)]);
    }

    /// A family of labelled samples (one with no samples is left out of the scrape).
    pub fn labelled<'a>(
        &mut self,
        name: &str,
        help: &str,
        counter: bool,
        samples: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, f64)>,
    ) {
        let kind = if counter { MetricType::COUNTER } else { MetricType::GAUGE };
        let metrics = samples.into_iter().map(|(labels, v)| Self::sample(kind, &labels, v)).collect();
        self.family(name, help, kind, metrics);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.histograms(name, help, [(vec![], h)]);
    }

    /// A family of labelled histograms (one with none is left out of the scrape).
    pub fn histograms<'a>(
        &mut self,
        name: &str,
        help: &str,
        items: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, &'a Histogram)>,
    ) {
        let metrics = items
            .into_iter()
            .map(|(labels, h)| {
                let s = h.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let mut acc = 0;
                let buckets = h
                    .bounds
                    .iter()
                    .zip(&s.counts)
                    .map(|(&b, &c)| {
                        acc += c;
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(b);
                        bucket.set_cumulative_count(acc);
                        bucket
                    })
                    .collect();
                let mut ph = proto::Histogram::default();
                ph.set_bucket(buckets);
                ph.set_sample_count(s.count);
                ph.set_sample_sum(s.sum);
                let mut m = proto::Metric::default();
                m.set_label(label_pairs(&labels));
                m.set_histogram(ph);
                m
            })
            .collect();
        self.family(name, help, MetricType::HISTOGRAM, metrics);
    }
}

/// Renders families in the Prometheus text format through the crate's
/// registry (which checks names, labels and duplicates) and encoder.
pub fn expose(families: Families) -> Result<String, String> {
    struct Scrape(Mutex<Vec<MetricFamily>>);
    impl prometheus::core::Collector for Scrape {
        fn desc(&self) -> Vec<&prometheus::core::Desc> {
            Vec::new()
        }
        fn collect(&self) -> Vec<MetricFamily> {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }
    // The registry merges same-named families and does not check names, so
    // each family is checked first: unique, and a valid `Desc` for the crate.
    let mut seen = std::collections::HashSet::new();
    for f in &families.0 {
        if !seen.insert(f.name().to_string()) {
            return Err(format!("metric family {} is collected twice", f.name()));
        }
        let labels: Vec<String> = f
            .get_metric()
            .first()
            .map(|m| m.get_label().iter().map(|l| l.name().to_string()).collect())
            .unwrap_or_default();
        prometheus::core::Desc::new(f.name().to_string(), f.help().to_string(), labels, Default::default())
            .map_err(|e| format!("metric family {}: {e}", f.name()))?;
    }
    let registry = prometheus::Registry::new();
    registry.register(Box::new(Scrape(Mutex::new(families.0)))).map_err(|e| e.to_string())?;
    prometheus::TextEncoder::new().encode_to_string(&registry.gather()).map_err(|e| e.to_string())
}

/// A gauge or counter holding an f64 (stored as bits).
#[derive(Default)]
pub struct Value(AtomicU64);

impl Value {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, v: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + v).to_bits()));
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").field("count", &self.count()).finish()
    }
}

#[derive(Default, Clone)]
struct HistogramState {
    /// Non-cumulative counts per bucket, plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new(HistogramState { counts: vec![0; bounds.len() + 1], ..Default::default() }) }
    }
    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.counts[i] += 1;
        s.sum += v;
        s.count += 1;
    }
    pub fn count(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).count
    }
}

// vLLM's bucket bounds for these families.
pub const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
pub const E2E_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0];

pub struct Metrics {
    pub block_size: usize,
    pub num_blocks: usize,
    pub prefix_caching: bool,
    pub requests_running: Value,
    pub requests_waiting: Value,
    /// Fraction (0..1) of KV blocks held by requests.
    pub kv_usage: Value,
    pub kv_blocks_used: Value,
    /// Blocks carrying a prefix-cache entry (in use or free).
    pub kv_blocks_cached: Value,
    pub prompt_tokens: Value,
    pub generation_tokens: Value,
    pub preemptions: Value,
    pub prefix_cache_queries: Value,
    pub prefix_cache_hits: Value,
    pub finished_stop: Value,
    pub finished_length: Value,
    pub finished_abort: Value,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub lora: LoraMetrics,
    pub train: TrainMetrics,
}

const SLICE_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Fine-tuning jobs and co-serving, written by the engine thread (steps,
/// slices) and the job manager (jobs by state).
pub struct TrainMetrics {
    /// Jobs per status (validating_files, queued, running, paused, succeeded, failed, cancelled).
    pub jobs: Mutex<BTreeMap<&'static str, u64>>,
    pub steps: Value,
    pub tokens: Value,
    pub loss: Value,
    pub tokens_per_second: Value,
    /// Bytes the running job reserved (adapter, optimiser state, activations).
    pub memory_bytes: Value,
    /// One co-serving turn's duration (slices run between two serving steps).
    pub turn_seconds: Histogram,
    /// Serving steps that waited for a training turn.
    pub serving_steps_delayed: Value,
    pub training_seconds: Value,
}

impl Default for TrainMetrics {
    fn default() -> Self {
        Self {
            jobs: Mutex::default(),
            steps: Value::default(),
            tokens: Value::default(),
            loss: Value::default(),
            tokens_per_second: Value::default(),
            memory_bytes: Value::default(),
            turn_seconds: Histogram::new(SLICE_BUCKETS),
            serving_steps_delayed: Value::default(),
            training_seconds: Value::default(),
        }
    }
}

impl TrainMetrics {
    fn collect(&self, f: &mut Families) {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.labelled(
            "tandem_train_jobs",
            "Fine-tuning jobs by status.",
            false,
            jobs.iter().map(|(state, n)| (vec![("status", *state)], *n as f64)),
        );
        f.counter("tandem_train_steps_total", "Optimiser steps taken.", self.steps.get());
        f.counter("tandem_train_tokens_total", "Tokens trained on (forward and backward).", self.tokens.get());
        f.gauge("tandem_train_loss", "Training loss of the last step.", self.loss.get());
        f.gauge(
            "tandem_train_tokens_per_second",
            "Training tokens per second of compute in the last step.",
            self.tokens_per_second.get(),
        );
        f.gauge("tandem_train_memory_bytes", "Memory reserved by the running job.", self.memory_bytes.get());
        f.counter(
            "tandem_train_serving_steps_delayed_total",
            "Serving steps that waited for a training turn.",
            self.serving_steps_delayed.get(),
        );
        f.counter("tandem_train_seconds_total", "Engine time spent training.", self.training_seconds.get());
        f.histogram(
            "tandem_train_turn_seconds",
            "Training work run between two engine iterations.",
            &self.turn_seconds,
        );
    }
}

/// LoRA gauges and counters written by the engine thread.
#[derive(Default)]
pub struct LoraMetrics {
    pub max_loras: usize,
    /// Adapter names of running / waiting requests, comma-separated, and when they were set.
    pub info: Mutex<LoraInfo>,
    /// Slots pinned by running requests, and slots holding an adapter.
    pub slots_pinned: Value,
    pub slots_occupied: Value,
    pub slot_loads: Value,
    pub slot_evictions: Value,
    /// Per adapter name: (finished requests, generated tokens).
    pub per_adapter: Mutex<BTreeMap<String, (u64, u64)>>,
}

#[derive(Default, Clone, PartialEq)]
pub struct LoraInfo {
    pub running: String,
    pub waiting: String,
    pub updated_unix_s: f64,
}

impl LoraMetrics {
    pub fn count_tokens(&self, adapter: &str, tokens: u64) {
        self.per_adapter.lock().unwrap_or_else(|e| e.into_inner()).entry(adapter.to_string()).or_default().1 += tokens;
    }
    pub fn count_request(&self, adapter: &str) {
        self.per_adapter.lock().unwrap_or_else(|e| e.into_inner()).entry(adapter.to_string()).or_default().0 += 1;
    }
    /// Sets the adapter lists; the timestamp moves only when they change.
    pub fn set_info(&self, running: String, waiting: String) {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner());
        if i.running != running || i.waiting != waiting || i.updated_unix_s == 0.0 {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
            *i = LoraInfo { running, waiting, updated_unix_s: now };
        }
    }

    fn collect(&self, f: &mut Families) {
        let info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let max = self.max_loras.to_string();
        f.labelled(
            "vllm:lora_requests_info",
            "Running stats on LoRA requests (value: when the lists last changed).",
            false,
            [(
                vec![
                    ("max_lora", max.as_str()),
                    ("running_lora_adapters", info.running.as_str()),
                    ("waiting_lora_adapters", info.waiting.as_str()),
                ],
                info.updated_unix_s,
            )],
        );
        f.gauge("tandem_lora_slots_total", "LoRA adapter slots (max_loras).", self.max_loras as f64);
        f.gauge("tandem_lora_slots_pinned", "Adapter slots in use by running requests.", self.slots_pinned.get());
        f.gauge("tandem_lora_slots_occupied", "Adapter slots holding an adapter.", self.slots_occupied.get());
        f.gauge(
            "tandem_lora_slot_utilization",
            "Pinned adapter slots over all slots.",
            if self.max_loras > 0 { self.slots_pinned.get() / self.max_loras as f64 } else { 0.0 },
        );
        f.counter("tandem_lora_slot_loads_total", "Adapters put into a slot.", self.slot_loads.get());
        f.counter("tandem_lora_slot_evictions_total", "Adapters evicted from a slot.", self.slot_evictions.get());
        let per = self.per_adapter.lock().unwrap_or_else(|e| e.into_inner()).clone();
        f.labelled(
            "tandem_lora_requests_total",
            "Finished requests per adapter.",
            true,
            per.iter().map(|(name, (reqs, _))| (vec![("adapter", name.as_str())], *reqs as f64)),
        );
        f.labelled(
            "tandem_lora_generation_tokens_total",
            "Generated tokens per adapter.",
            true,
            per.iter().map(|(name, (_, toks))| (vec![("adapter", name.as_str())], *toks as f64)),
        );
    }
}

impl Metrics {
    pub fn new(block_size: usize, num_blocks: usize, prefix_caching: bool, max_loras: usize) -> Self {
        Self {
            block_size,
            num_blocks,
            prefix_caching,
            requests_running: Value::default(),
            requests_waiting: Value::default(),
            kv_usage: Value::default(),
            kv_blocks_used: Value::default(),
            kv_blocks_cached: Value::default(),
            prompt_tokens: Value::default(),
            generation_tokens: Value::default(),
            preemptions: Value::default(),
            prefix_cache_queries: Value::default(),
            prefix_cache_hits: Value::default(),
            finished_stop: Value::default(),
            finished_length: Value::default(),
            finished_abort: Value::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            inter_token: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            queue_time: Histogram::new(E2E_BUCKETS),
            lora: LoraMetrics { max_loras, ..Default::default() },
            train: TrainMetrics::default(),
        }
    }

    /// Adds every engine metric to `f`.
    pub fn collect(&self, f: &mut Families) {
        f.gauge("vllm:num_requests_running", "Requests in the running batch.", self.requests_running.get());
        f.gauge("vllm:num_requests_waiting", "Requests waiting for admission.", self.requests_waiting.get());
        f.gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks held by requests (1 = full).", self.kv_usage.get());
        f.gauge("tandem_kv_blocks_used", "KV blocks held by requests.", self.kv_blocks_used.get());
        f.gauge("tandem_kv_blocks_cached", "KV blocks carrying a prefix-cache entry.", self.kv_blocks_cached.get());
        f.counter("vllm:prompt_tokens_total", "Prompt tokens of admitted requests.", self.prompt_tokens.get());
        f.counter("vllm:generation_tokens_total", "Generated tokens.", self.generation_tokens.get());
        f.counter("vllm:num_preemptions_total", "Requests preempted to free KV blocks.", self.preemptions.get());
        f.counter(
            "vllm:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            self.prefix_cache_queries.get(),
        );
        f.counter(
            "vllm:prefix_cache_hits_total",
            "Prompt tokens served by the prefix cache.",
            self.prefix_cache_hits.get(),
        );
        let q = self.prefix_cache_queries.get();
        f.gauge(
            "tandem_prefix_cache_hit_rate",
            "Prefix-cache hits over queries, in prompt tokens, since start.",
            if q > 0.0 { self.prefix_cache_hits.get() / q } else { 0.0 },
        );
        f.labelled(
            "vllm:request_success_total",
            "Finished requests by reason.",
            true,
            [("stop", &self.finished_stop), ("length", &self.finished_length), ("abort", &self.finished_abort)]
                .into_iter()
                .map(|(reason, v)| (vec![("finished_reason", reason)], v.get())),
        );
        let (bs, nb, pc) = (self.block_size.to_string(), self.num_blocks.to_string(), self.prefix_caching.to_string());
        f.labelled(
            "vllm:cache_config_info",
            "KV cache configuration.",
            false,
            [(
                vec![
                    ("block_size", bs.as_str()),
                    ("num_gpu_blocks", nb.as_str()),
                    ("enable_prefix_caching", pc.as_str()),
                ],
                1.0,
            )],
        );
        f.histogram("vllm:time_to_first_token_seconds", "Time to first token.", &self.ttft);
        f.histogram("vllm:time_per_output_token_seconds", "Time between output tokens.", &self.inter_token);
        f.histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", &self.e2e);
        f.histogram("vllm:request_queue_time_seconds", "Arrival to first admission.", &self.queue_time);
        self.lora.collect(f);
        self.train.collect(f);
    }

    /// The engine's metrics alone in the text format (tests, benches).
    pub fn render(&self) -> String {
        let mut f = Families::default();
        self.collect(&mut f);
        expose(f).expect("the engine's metric families are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.7, 9.0] {
            h.observe(v);
        }
        let mut f = Families::default();
        f.histogram("x", "h", &h);
        let s = expose(f).unwrap();
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
    }

    #[test]
    fn invalid_families_are_refused_by_the_registry() {
        let mut f = Families::default();
        f.gauge("ok", "fine", 1.0);
        f.gauge("ok", "twice", 2.0);
        assert!(expose(f).is_err(), "a duplicate family");
        let mut f = Families::default();
        f.gauge("bad name", "spaces", 1.0);
        assert!(expose(f).is_err(), "an invalid name");
    }

    #[test]
    fn gauges_render_under_vllm_names() {
        let m = Metrics::new(16, 100, true, 4);
        m.lora.set_info("a,b".into(), "c\"".into());
        m.lora.count_request("a");
        m.requests_running.set(3.0);
        let t = m.render();
        assert!(t.contains("\nvllm:num_requests_running 3\n"), "{t}");
        assert!(t.contains("num_gpu_blocks=\"100\""), "{t}");
        assert!(
            t.contains(
                "vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"c\\\"\"}"
            ),
            "{t}"
        );
        assert!(t.contains("tandem_lora_requests_total{adapter=\"a\"} 1\n"), "{t}");
    }
}
