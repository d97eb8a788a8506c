//! Prometheus metrics, rendered in the text exposition format at `/metrics`.
//! Names follow vLLM's where one exists (gateways and dashboards read them);
//! tandem's own carry the `tandem_` prefix. The engine thread writes them; the
//! HTTP side only renders.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&s.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.sum, s.count);
    }
}

// vLLM's bucket bounds for these families.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] =
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
    fn render(&self, o: &mut String) {
        let _ = writeln!(o, "# HELP tandem_train_jobs Fine-tuning jobs by status.\n# TYPE tandem_train_jobs gauge");
        for (state, n) in self.jobs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "tandem_train_jobs{{status=\"{state}\"}} {n}");
        }
        write_metric(o, "tandem_train_steps_total", "counter", "Optimiser steps taken.", self.steps.get());
        write_metric(
            o,
            "tandem_train_tokens_total",
            "counter",
            "Tokens trained on (forward and backward).",
            self.tokens.get(),
        );
        write_metric(o, "tandem_train_loss", "gauge", "Training loss of the last step.", self.loss.get());
        write_metric(
            o,
            "tandem_train_tokens_per_second",
            "gauge",
            "Training tokens per second of compute in the last step.",
            self.tokens_per_second.get(),
        );
        write_metric(
            o,
            "tandem_train_memory_bytes",
            "gauge",
            "Memory reserved by the running job.",
            self.memory_bytes.get(),
        );
        write_metric(
            o,
            "tandem_train_serving_steps_delayed_total",
            "counter",
            "Serving steps that waited for a training turn.",
            self.serving_steps_delayed.get(),
        );
        write_metric(
            o,
            "tandem_train_seconds_total",
            "counter",
            "Engine time spent training.",
            self.training_seconds.get(),
        );
        self.turn_seconds.render(o, "tandem_train_turn_seconds", "Training work run between two engine iterations.");
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

    fn render(&self, o: &mut String) {
        let info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(
            o,
            "# HELP vllm:lora_requests_info Running stats on LoRA requests (value: when the lists last changed).\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
            self.max_loras,
            escape_label(&info.running),
            escape_label(&info.waiting),
            info.updated_unix_s
        );
        let mut one = |name: &str, kind: &str, help: &str, v: f64| write_metric(o, name, kind, help, v);
        one("tandem_lora_slots_total", "gauge", "LoRA adapter slots (max_loras).", self.max_loras as f64);
        one("tandem_lora_slots_pinned", "gauge", "Adapter slots in use by running requests.", self.slots_pinned.get());
        one("tandem_lora_slots_occupied", "gauge", "Adapter slots holding an adapter.", self.slots_occupied.get());
        one(
            "tandem_lora_slot_utilization",
            "gauge",
            "Pinned adapter slots over all slots.",
            if self.max_loras > 0 { self.slots_pinned.get() / self.max_loras as f64 } else { 0.0 },
        );
        one("tandem_lora_slot_loads_total", "counter", "Adapters put into a slot.", self.slot_loads.get());
        one("tandem_lora_slot_evictions_total", "counter", "Adapters evicted from a slot.", self.slot_evictions.get());
        let per = self.per_adapter.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(
            o,
            "# HELP tandem_lora_requests_total Finished requests per adapter.\n# TYPE tandem_lora_requests_total counter"
        );
        for (name, (reqs, _)) in &per {
            let _ = writeln!(o, "tandem_lora_requests_total{{adapter=\"{}\"}} {reqs}", escape_label(name));
        }
        let _ = writeln!(
            o,
            "# HELP tandem_lora_generation_tokens_total Generated tokens per adapter.\n# TYPE tandem_lora_generation_tokens_total counter"
        );
        for (name, (_, toks)) in &per {
            let _ = writeln!(o, "tandem_lora_generation_tokens_total{{adapter=\"{}\"}} {toks}", escape_label(name));
        }
    }
}

/// One unlabelled gauge or counter with its HELP and TYPE lines.
pub fn write_metric(o: &mut String, name: &str, kind: &str, help: &str, v: f64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
}

/// Prometheus label-value escaping.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: f64| write_metric(&mut o, name, kind, help, v);
        one("vllm:num_requests_running", "gauge", "Requests in the running batch.", self.requests_running.get());
        one("vllm:num_requests_waiting", "gauge", "Requests waiting for admission.", self.requests_waiting.get());
        one(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "Fraction of KV blocks held by requests (1 = full).",
            self.kv_usage.get(),
        );
        one("tandem_kv_blocks_used", "gauge", "KV blocks held by requests.", self.kv_blocks_used.get());
        one(
            "tandem_kv_blocks_cached",
            "gauge",
            "KV blocks carrying a prefix-cache entry.",
            self.kv_blocks_cached.get(),
        );
        one("vllm:prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens.get());
        one("vllm:generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens.get());
        one("vllm:num_preemptions_total", "counter", "Requests preempted to free KV blocks.", self.preemptions.get());
        one(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            self.prefix_cache_queries.get(),
        );
        one(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prompt tokens served by the prefix cache.",
            self.prefix_cache_hits.get(),
        );
        let q = self.prefix_cache_queries.get();
        one(
            "tandem_prefix_cache_hit_rate",
            "gauge",
            "Prefix-cache hits over queries, in prompt tokens, since start.",
            if q > 0.0 { self.prefix_cache_hits.get() / q } else { 0.0 },
        );
        let _ = writeln!(
            o,
            "# HELP vllm:request_success_total Finished requests by reason.\n# TYPE vllm:request_success_total counter"
        );
        for (reason, v) in
            [("stop", &self.finished_stop), ("length", &self.finished_length), ("abort", &self.finished_abort)]
        {
            let _ = writeln!(o, "vllm:request_success_total{{finished_reason=\"{reason}\"}} {}", v.get());
        }
        let _ = writeln!(
            o,
            "# HELP vllm:cache_config_info KV cache configuration.\n# TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"{}\"}} 1",
            self.block_size, self.num_blocks, self.prefix_caching
        );
        self.ttft.render(&mut o, "vllm:time_to_first_token_seconds", "Time to first token.");
        self.inter_token.render(&mut o, "vllm:time_per_output_token_seconds", "Time between output tokens.");
        self.e2e.render(&mut o, "vllm:e2e_request_latency_seconds", "Arrival to finish.");
        self.queue_time.render(&mut o, "vllm:request_queue_time_seconds", "Arrival to first admission.");
        self.lora.render(&mut o);
        self.train.render(&mut o);
        o
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
        let mut s = String::new();
        h.render(&mut s, "x", "h");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_count 4\n"), "{s}");
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
