//! A device op that fails (out of memory, a failed launch) is an error where
//! it happens, never a panic: serving fails that step's requests and goes on,
//! and a training step returns the error, drops its partial gradients and can
//! be taken again. The CPU backend cannot fail on its own, so a wrapper fails
//! the op after a chosen number of ops.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tandem::backend::cpu::{CpuBackend, CpuKvCache, CpuTensor, CpuWeight};
use tandem::backend::*;
use tandem::engine::{EngineCore, StepEvent};
use tandem::lora::LoraTarget;
use tandem::model::load_model;
use tandem::train::batch::Batching;
use tandem::train::data::{parse_jsonl, DataOptions};
use tandem::train::lora::{LoraSpec, TrainableLora};
use tandem::train::optim::OptimConfig;
use tandem::train::trainer::{TrainConfig, TrainError, Trainer};

/// The CPU backend, with op number `fail_at` (counting every op) failing.
struct Faulty {
    inner: CpuBackend,
    trigger: Trigger,
}

/// A handle on a [`Faulty`] backend's op counter that outlives handing the
/// backend to an engine.
#[derive(Clone)]
struct Trigger {
    ops: Arc<AtomicUsize>,
    fail_at: Arc<AtomicUsize>,
    /// Op number at which the backend panics (a bug, not a device error).
    panic_at: Arc<AtomicUsize>,
}

impl Trigger {
    /// Fails the `n`-th op from now.
    fn fail_in(&self, n: usize) {
        self.fail_at.store(self.ops.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }
    /// Panics at the `n`-th op from now.
    fn panic_in(&self, n: usize) {
        self.panic_at.store(self.ops.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }
}

impl Faulty {
    fn new() -> Self {
        let never = || Arc::new(AtomicUsize::new(usize::MAX));
        let trigger = Trigger { ops: Arc::new(AtomicUsize::new(0)), fail_at: never(), panic_at: never() };
        Self { inner: CpuBackend::new(2).unwrap(), trigger }
    }
    fn fail_in(&self, n: usize) {
        self.trigger.fail_in(n)
    }
    fn tick(&self) -> BackendResult<()> {
        let (ops, fail_at) = (&self.trigger.ops, &self.trigger.fail_at);
        let i = ops.fetch_add(1, Ordering::SeqCst);
        if i == fail_at.load(Ordering::SeqCst) {
            return Err(BackendError::Device("injected failure".into()));
        }
        if i == self.trigger.panic_at.load(Ordering::SeqCst) {
            panic!("injected panic in the engine thread");
        }
        Ok(())
    }
}

impl Backend for Faulty {
    type Weight = CpuWeight;
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;
    type LoraWeight = Arc<LoraMatrix>;

    fn name(&self) -> String {
        "faulty cpu".into()
    }
    fn load_weight(&self, w: HostWeight) -> BackendResult<CpuWeight> {
        self.inner.load_weight(w)
    }
    fn weight_shape(&self, w: &CpuWeight) -> (usize, usize) {
        self.inner.weight_shape(w)
    }
    fn zeros(&self, rows: usize, cols: usize) -> BackendResult<CpuTensor> {
        self.tick()?;
        self.inner.zeros(rows, cols)
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> BackendResult<CpuTensor> {
        self.tick()?;
        self.inner.upload(data, rows, cols)
    }
    fn download(&self, t: &CpuTensor) -> BackendResult<Vec<f32>> {
        self.tick()?;
        self.inner.download(t)
    }
    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        self.inner.shape(t)
    }
    fn embedding(&self, table: &CpuWeight, ids: &[u32], out: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.embedding(table, ids, out)
    }
    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, out: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.rms_norm(x, w, eps, out)
    }
    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.add_assign(x, y)
    }
    fn matmul_many(&self, x: &CpuTensor, jobs: &mut [MatmulJob<'_, Self>]) -> BackendResult<()> {
        self.tick()?;
        let mut inner: Vec<MatmulJob<'_, CpuBackend>> =
            jobs.iter_mut().map(|j| MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }).collect();
        self.inner.matmul_many(x, &mut inner)
    }
    fn rope(&self, x: &mut CpuTensor, heads: usize, d: usize, pos: &[u32], t: &RopeTable) -> BackendResult<()> {
        self.tick()?;
        self.inner.rope(x, heads, d, pos, t)
    }
    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.silu_mul(gate, up, out)
    }
    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> BackendResult<CpuTensor> {
        self.tick()?;
        self.inner.gather_rows(x, rows)
    }
    fn load_lora(&self, m: &Arc<LoraMatrix>) -> BackendResult<Arc<LoraMatrix>> {
        self.inner.load_lora(m)
    }
    fn lora_add(&self, x: &CpuTensor, segments: &[LoraSegment<'_, Self>], out: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        let inner: Vec<LoraSegment<'_, CpuBackend>> =
            segments.iter().map(|s| LoraSegment { rows: s.rows.clone(), w: s.w }).collect();
        self.inner.lora_add(x, &inner, out)
    }
    fn alloc_kv(&self, spec: KvCacheSpec) -> BackendResult<CpuKvCache> {
        self.inner.alloc_kv(spec)
    }
    fn write_kv(&self, c: &mut CpuKvCache, l: usize, k: &CpuTensor, v: &CpuTensor, s: &[u32]) -> BackendResult<()> {
        self.tick()?;
        self.inner.write_kv(c, l, k, v, s)
    }
    fn paged_attention(
        &self,
        c: &CpuKvCache,
        l: usize,
        q: &CpuTensor,
        m: &AttentionMeta<'_>,
        out: &mut CpuTensor,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.paged_attention(c, l, q, m, out)
    }
    fn matmul_input_grad(&self, jobs: &[(&CpuTensor, &CpuWeight)], dx: &mut CpuTensor, acc: bool) -> BackendResult<()> {
        self.tick()?;
        self.inner.matmul_input_grad(jobs, dx, acc)
    }
    fn gemm(
        &self,
        a: &CpuTensor,
        ta: bool,
        b: &CpuTensor,
        tb: bool,
        alpha: f32,
        beta: f32,
        c: &mut CpuTensor,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.gemm(a, ta, b, tb, alpha, beta, c)
    }
    fn rms_norm_backward(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        eps: f32,
        dy: &CpuTensor,
        dx: &mut CpuTensor,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.rms_norm_backward(x, w, eps, dy, dx)
    }
    fn rope_backward(&self, x: &mut CpuTensor, h: usize, d: usize, p: &[u32], t: &RopeTable) -> BackendResult<()> {
        self.tick()?;
        self.inner.rope_backward(x, h, d, p, t)
    }
    fn silu_mul_backward(
        &self,
        g: &CpuTensor,
        u: &CpuTensor,
        d: &CpuTensor,
        dg: &mut CpuTensor,
        du: &mut CpuTensor,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.silu_mul_backward(g, u, d, dg, du)
    }
    fn attention_backward(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        out: &CpuTensor,
        dout: &CpuTensor,
        meta: &AttentionMeta<'_>,
        dq: &mut CpuTensor,
        dk: &mut CpuTensor,
        dv: &mut CpuTensor,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.attention_backward(q, k, v, out, dout, meta, dq, dk, dv)
    }
    fn cross_entropy(&self, l: &mut CpuTensor, labels: &[u32], s: Option<f32>) -> BackendResult<CrossEntropySums> {
        self.tick()?;
        self.inner.cross_entropy(l, labels, s)
    }
    fn add_rows(&self, src: &CpuTensor, rows: &[usize], dst: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.add_rows(src, rows, dst)
    }
    fn dropout(&self, x: &CpuTensor, p: f32, seed: u64, out: &mut CpuTensor) -> BackendResult<()> {
        self.tick()?;
        self.inner.dropout(x, p, seed, out)
    }
    fn copy(&self, x: &CpuTensor) -> BackendResult<CpuTensor> {
        self.tick()?;
        self.inner.copy(x)
    }
    fn fill(&self, x: &mut CpuTensor, v: f32) -> BackendResult<()> {
        self.tick()?;
        self.inner.fill(x, v)
    }
    fn scale(&self, x: &mut CpuTensor, s: f32) -> BackendResult<()> {
        self.tick()?;
        self.inner.scale(x, s)
    }
    fn sum_squares(&self, x: &CpuTensor) -> BackendResult<f64> {
        self.tick()?;
        self.inner.sum_squares(x)
    }
    fn adamw(
        &self,
        p: &mut CpuTensor,
        g: &CpuTensor,
        m: &mut CpuTensor,
        v: &mut CpuTensor,
        hp: &AdamWStep,
    ) -> BackendResult<()> {
        self.tick()?;
        self.inner.adamw(p, g, m, v, hp)
    }
}

fn model_path() -> String {
    common::fixture("tiny/qwen2/hf-f32").to_str().unwrap().to_string()
}

#[test]
fn a_failed_serving_step_fails_its_requests_and_the_engine_goes_on() {
    let prompts: [&[u32]; 2] = [&[5, 17, 42, 9, 11], &[3, 3, 8]];
    // The tokens each request gets on a healthy engine.
    let clean = Faulty::new();
    let model = load_model(&clean, &model_path()).unwrap().model;
    let mut e = EngineCore::new(clean, model, &common::engine_config(16, 64, 64)).unwrap();
    let want: Vec<Vec<u32>> = e
        .generate(prompts.iter().map(|p| common::greedy(p, 6)).collect())
        .into_iter()
        .map(|(t, _)| common::token_ids(&t))
        .collect();

    let be = Faulty::new();
    let trigger = be.trigger.clone();
    let model = load_model(&be, &model_path()).unwrap().model;
    let mut e = EngineCore::new(be, model, &common::engine_config(16, 64, 64)).unwrap();
    e.add_request(1, common::greedy(prompts[0], 6));
    e.add_request(2, common::greedy(prompts[1], 6));
    let (_, first) = e.step();
    assert!(first.iter().all(|ev| !matches!(ev, StepEvent::Failed(..))));
    // The next step's forward fails part-way: both requests fail with the
    // device's reason, nothing panics, and their blocks are freed.
    trigger.fail_in(20);
    let (_, events) = e.step();
    let failed: Vec<_> = events
        .iter()
        .filter_map(|ev| match ev {
            StepEvent::Failed(id, why) => Some((*id, why.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2], "{events:?}");
    assert!(failed[0].1.contains("injected failure"), "{}", failed[0].1);
    assert!(!e.has_work());
    assert_eq!(e.scheduler().kv().pool().num_used(), 0, "the failed requests' blocks are freed");
    // The engine goes on: the same requests again give the healthy tokens.
    let again: Vec<Vec<u32>> = e
        .generate(prompts.iter().map(|p| common::greedy(p, 6)).collect())
        .into_iter()
        .map(|(t, _)| common::token_ids(&t))
        .collect();
    assert_eq!(again, want);
}

#[test]
fn a_failed_training_step_is_an_error_and_the_step_can_be_taken_again() {
    let be = Faulty::new();
    let loaded = load_model(&be, &model_path()).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let text: String = (0..4)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"a {i} {i}\"}}]}}\n"))
        .collect();
    let data = parse_jsonl(text.as_bytes(), &tok, &DataOptions::new(64)).unwrap();
    let cfg = TrainConfig {
        lora: LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 },
        optim: OptimConfig { lr: 1e-2, ..OptimConfig::default() },
        epochs: 1,
        batching: Batching::Sequential { batch_size: 2 },
        grad_accum: 1,
        max_steps: None,
        seed: 3,
        eval_every: None,
        save_every: None,
        early_stopping_patience: None,
        memory_budget: None,
        logits_chunk_bytes: 1 << 20,
    };
    let ops = || be.trigger.ops.load(Ordering::SeqCst);
    // Fails the forward or backward of the first step (the step is retried).
    let run = |fail: Option<usize>| {
        let lora = TrainableLora::init(&be, &loaded.model.config, &cfg.lora, cfg.seed).unwrap();
        let mut t = Trainer::new(&loaded.model, cfg.clone(), data.clone(), None, lora).unwrap();
        let mut failures = 0;
        if let Some(n) = fail {
            be.fail_in(n);
            let err = t.step(&be, &loaded.model).expect_err("the injected failure surfaces");
            assert!(matches!(err, TrainError::Backend(BackendError::Device(_))), "{err}");
            assert_eq!(t.state().step, 0, "a failed step does not count");
            failures += 1;
        }
        let mut losses = vec![];
        let mut step_ops = vec![];
        loop {
            let before = ops();
            let Some(r) = t.step(&be, &loaded.model).unwrap() else { break };
            step_ops.push(ops() - before);
            losses.push(r.loss);
        }
        (losses, t.lora.download(&be).unwrap(), failures, step_ops)
    };
    let (clean_losses, clean_weights, _, step_ops) = run(None);
    assert_eq!(clean_losses.len(), 2);
    // Fail early (the forward) and in the middle (the backward): the retried
    // run ends exactly where the clean one does.
    let n_ops = step_ops[0];
    for n in [3, n_ops / 2] {
        let (losses, weights, failures, _) = run(Some(n));
        assert_eq!(failures, 1);
        assert_eq!(losses, clean_losses, "failure at op {n}");
        assert_eq!(weights, clean_weights, "failure at op {n}");
    }
}

#[test]
fn a_failed_optimiser_update_stops_the_run_for_a_resume() {
    let be = Faulty::new();
    let loaded = load_model(&be, &model_path()).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let text =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a b\"}]}\n";
    let data = parse_jsonl(text.as_bytes(), &tok, &DataOptions::new(64)).unwrap();
    let cfg = TrainConfig {
        lora: LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 },
        optim: OptimConfig::default(),
        epochs: 2,
        batching: Batching::Sequential { batch_size: 1 },
        grad_accum: 1,
        max_steps: None,
        seed: 3,
        eval_every: None,
        save_every: None,
        early_stopping_patience: None,
        memory_budget: None,
        logits_chunk_bytes: 1 << 20,
    };
    let lora = TrainableLora::init(&be, &loaded.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut t = Trainer::new(&loaded.model, cfg, data, None, lora).unwrap();
    let before = be.trigger.ops.load(Ordering::SeqCst);
    t.step(&be, &loaded.model).unwrap();
    let per_step = be.trigger.ops.load(Ordering::SeqCst) - before;
    // The last ops of a step are the AdamW updates (then zeroing gradients):
    // fail one of the updates.
    be.fail_in(per_step - 30);
    let err = t.step(&be, &loaded.model).expect_err("the injected failure surfaces");
    assert!(matches!(err, TrainError::Broken(_)), "{err}");
    let again = t.step(&be, &loaded.model).expect_err("a broken run takes no more steps");
    assert!(again.to_string().contains("resume from the last checkpoint"), "{again}");
}

/// A bug that kills the engine thread (a panic, not a device error): the
/// request in flight ends without finishing, the handle reports the engine
/// dead (what `/health` answers 503 on), and new requests are refused with
/// `EngineStopped` (503) instead of hanging.
#[tokio::test]
async fn an_engine_thread_that_dies_is_reported_and_refuses_new_work() {
    use tandem::engine::{spawn_engine, EngineEvent, SubmitError};
    let be = Faulty::new();
    let trigger = be.trigger.clone();
    let model = load_model(&be, &model_path()).unwrap().model;
    let engine = spawn_engine(be, model, common::engine_config(16, 64, 64)).unwrap();
    let run = |prompt: &'static [u32]| {
        let mut stream = engine.submit(common::greedy(prompt, 4)).unwrap();
        async move {
            let mut finished = false;
            while let Some(ev) = stream.next().await {
                finished |= matches!(ev, EngineEvent::Finished(_));
            }
            finished
        }
    };
    assert!(run(&[5, 17, 42]).await, "a healthy engine finishes requests");
    assert!(engine.is_alive());

    trigger.panic_in(20);
    let finished = tokio::time::timeout(std::time::Duration::from_secs(20), run(&[5, 17, 42])).await;
    assert_eq!(finished, Ok(false), "the request in flight ends (unfinished) when the engine dies");
    let start = std::time::Instant::now();
    while engine.is_alive() && start.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!engine.is_alive(), "the engine's death is detected");
    assert!(matches!(engine.submit(common::greedy(&[5], 2)), Err(SubmitError::EngineStopped)));
}
