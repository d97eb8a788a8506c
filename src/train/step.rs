//! One micro-batch through the model: the shared forward with the trained
//! adapter, the loss on the micro-batch's target tokens, and (when training)
//! the backward into the adapter's gradients, with activations kept or
//! recomputed per layer as the [`MemoryPlan`] says.

use std::ops::Range;

use crate::backend::{Backend, BackendResult, BlockId, CrossEntropySums, KvCacheSpec, SeqAttention};
use crate::model::{DerivedActivations, LayerActivations, LayerGrads, LlamaModel, LoraHook, StepInput};

use super::lora::{ShrinkCache, TrainBackward, TrainForward, TrainableLora};
use super::memory::MemoryPlan;

/// Tokens per KV block of the training cache.
const BLOCK: usize = 16;

/// Examples flattened into one varlen batch (no padding; each example is its
/// own sequence, positions from 0, attending only to itself).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Rows of each example.
    pub seqs: Vec<Range<usize>>,
    /// Rows whose logits predict a target token, and that token.
    pub loss_rows: Vec<usize>,
    pub labels: Vec<u32>,
}

impl MicroBatch {
    /// From `(tokens, targets)` per example: `targets[t]` marks token `t` as
    /// trained, predicted by the logits at `t - 1`.
    pub fn new<'a>(examples: impl IntoIterator<Item = (&'a [u32], &'a [bool])>) -> Self {
        let mut mb = MicroBatch::default();
        for (tokens, targets) in examples {
            assert_eq!(tokens.len(), targets.len());
            let r0 = mb.tokens.len();
            mb.tokens.extend_from_slice(tokens);
            mb.positions.extend(0..tokens.len() as u32);
            mb.seqs.push(r0..r0 + tokens.len());
            for t in 1..tokens.len() {
                if targets[t] {
                    mb.loss_rows.push(r0 + t - 1);
                    mb.labels.push(tokens[t]);
                }
            }
        }
        mb
    }

    /// Tokens that carry loss.
    pub fn num_targets(&self) -> usize {
        self.labels.len()
    }
}

/// The training KV cache: blocks for one micro-batch, grown when a larger one comes.
pub struct TrainKv<B: Backend> {
    cache: Option<B::KvCache>,
    blocks: usize,
}

impl<B: Backend> Default for TrainKv<B> {
    fn default() -> Self {
        Self { cache: None, blocks: 0 }
    }
}

impl<B: Backend> TrainKv<B> {
    /// Block tables and slots for `mb`, and a cache that holds them.
    fn layout(
        &mut self,
        be: &B,
        model: &LlamaModel<B>,
        mb: &MicroBatch,
    ) -> BackendResult<(Vec<Vec<BlockId>>, Vec<u32>)> {
        let mut tables = Vec::with_capacity(mb.seqs.len());
        let mut slots = Vec::with_capacity(mb.tokens.len());
        let mut next = 1u32; // block 0 is the null block
        for s in &mb.seqs {
            let n = s.len().div_ceil(BLOCK);
            let table: Vec<BlockId> = (0..n as u32).map(|i| BlockId(next + i)).collect();
            next += n as u32;
            slots.extend((0..s.len()).map(|p| table[p / BLOCK].0 * BLOCK as u32 + (p % BLOCK) as u32));
            tables.push(table);
        }
        let need = next as usize;
        if need > self.blocks {
            let c = &model.config;
            self.cache = None;
            let spec = KvCacheSpec {
                num_layers: c.num_layers,
                num_blocks: need,
                block_size: BLOCK,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                // Training reads its own keys and values back in f32.
                dtype: crate::backend::KvDtype::F32,
            };
            self.cache = Some(be.alloc_kv(spec)?);
            self.blocks = need;
        }
        Ok((tables, slots))
    }

    /// The serving forward over `mb` in this cache (every sequence's last
    /// row's logits): what a prefill of the same tokens costs.
    pub fn prefill(
        &mut self,
        be: &B,
        model: &LlamaModel<B>,
        mb: &MicroBatch,
        lora: &mut impl LoraHook<B>,
    ) -> BackendResult<B::Tensor> {
        let (tables, slots) = self.layout(be, model, mb)?;
        let cache = self.cache.as_mut().expect("layout allocated the cache");
        let seqs = mb
            .seqs
            .iter()
            .zip(&tables)
            .map(|(r, table)| SeqAttention { rows: r.clone(), context_len: r.len(), block_table: table })
            .collect();
        let last: Vec<usize> = mb.seqs.iter().map(|r| r.end - 1).collect();
        let input = StepInput {
            token_ids: &mb.tokens,
            positions: &mb.positions,
            slot_mapping: &slots,
            seqs,
            logits_rows: &last,
        };
        model.forward(be, cache, &input, lora)
    }
}

/// Bytes of the training KV cache for micro-batches of at most `tokens` tokens in `seqs` sequences.
pub fn train_kv_bytes(c: &crate::model::ModelConfig, tokens: usize, seqs: usize) -> usize {
    let blocks = tokens.div_ceil(BLOCK) + seqs + 1;
    2 * c.num_layers * blocks * BLOCK * c.num_kv_heads * c.head_dim * 4
}

/// Runs `mb`: the loss sums over its targets, and with `grad_scale = Some(s)`
/// the gradient of `s · Σ loss` added to the adapter's gradients.
#[allow(clippy::too_many_arguments)]
pub fn run_micro_batch<B: Backend>(
    be: &B,
    model: &LlamaModel<B>,
    lora: &mut TrainableLora<B>,
    mb: &MicroBatch,
    grad_scale: Option<f32>,
    plan: &MemoryPlan,
    kv: &mut TrainKv<B>,
    dropout_seed: u64,
) -> BackendResult<CrossEntropySums> {
    let mut run = MicroBatchRun::new(mb.clone(), grad_scale, dropout_seed);
    loop {
        if let Some(sums) = run.advance(be, model, lora, plan, kv)? {
            return Ok(sums);
        }
    }
}

/// Where a [`MicroBatchRun`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Embed,
    Forward(usize),
    Head,
    /// The backward of this layer is next (layers run last to first).
    Backward(usize),
    Done,
}

/// One micro-batch as a sequence of slices (the embedding, each layer's
/// forward, the head, each layer's backward), so that a caller serving
/// requests between slices (the engine, when co-serving) delays its next step
/// by at most one layer's work. Slices run in the same order with the same
/// arithmetic whether they run back to back or not: the result is the same
/// bits as an uninterrupted run.
///
/// The run holds no borrow of the adapter, the model or the cache between
/// slices; the caller must not touch the adapter's gradients or `kv` until the
/// run is done (the trainer owns all three, so it cannot).
pub struct MicroBatchRun<B: Backend> {
    mb: MicroBatch,
    grad_scale: Option<f32>,
    dropout_seed: u64,
    phase: Phase,
    tables: Vec<Vec<BlockId>>,
    slots: Vec<u32>,
    /// The residual stream (forward), then its gradient (backward).
    x: Option<B::Tensor>,
    dx: Option<B::Tensor>,
    /// Per layer: its input (a checkpoint), and for kept layers the activations
    /// the backward reads less the derived ones, which all kept layers share
    /// (`spare`) and recompute; recomputed layers share one full set (`scratch`).
    checkpoints: Vec<B::Tensor>,
    saved: Vec<Option<LayerActivations<B>>>,
    scratch: Option<LayerActivations<B>>,
    spare: Option<DerivedActivations<B>>,
    shrinks: Option<ShrinkCache<B>>,
    grads: Option<LayerGrads<B>>,
    sums: CrossEntropySums,
}

impl<B: Backend> MicroBatchRun<B> {
    pub fn new(mb: MicroBatch, grad_scale: Option<f32>, dropout_seed: u64) -> Self {
        Self {
            mb,
            grad_scale,
            dropout_seed,
            phase: Phase::Embed,
            tables: Vec::new(),
            slots: Vec::new(),
            x: None,
            dx: None,
            checkpoints: Vec::new(),
            saved: Vec::new(),
            scratch: None,
            spare: None,
            shrinks: None,
            grads: None,
            sums: CrossEntropySums::default(),
        }
    }

    pub fn micro_batch(&self) -> &MicroBatch {
        &self.mb
    }

    /// Runs the next slice; the loss sums once the last one has run. Its
    /// matmuls run in the backend's exact mode even when serving uses int8
    /// activations (the gradients are the ones checked against peft).
    pub fn advance(
        &mut self,
        be: &B,
        model: &LlamaModel<B>,
        lora: &mut TrainableLora<B>,
        plan: &MemoryPlan,
        kv: &mut TrainKv<B>,
    ) -> BackendResult<Option<CrossEntropySums>> {
        be.exact_matmuls(|| self.advance_slice(be, model, lora, plan, kv))
    }

    fn advance_slice(
        &mut self,
        be: &B,
        model: &LlamaModel<B>,
        lora: &mut TrainableLora<B>,
        plan: &MemoryPlan,
        kv: &mut TrainKv<B>,
    ) -> BackendResult<Option<CrossEntropySums>> {
        let c = &model.config;
        let n = c.num_layers;
        let t = self.mb.tokens.len();
        let training = self.grad_scale.is_some();
        if self.phase == Phase::Embed {
            let (tables, slots) = kv.layout(be, model, &self.mb)?;
            self.tables = tables;
            self.slots = slots;
            let mut x = be.zeros(t, c.hidden_size)?;
            model.embed(be, &self.mb.tokens, &mut x)?;
            self.x = Some(x);
            self.saved = (0..n).map(|_| None).collect();
            self.shrinks = Some(ShrinkCache::new(n));
            self.phase = if n == 0 { Phase::Head } else { Phase::Forward(0) };
            return Ok(None);
        }
        let (mb, tables, slots, dropout_seed) = (&self.mb, &self.tables, &self.slots, self.dropout_seed);
        let seqs: Vec<SeqAttention> = mb
            .seqs
            .iter()
            .zip(tables)
            .map(|(r, table)| SeqAttention { rows: r.clone(), context_len: r.len(), block_table: table })
            .collect();
        let input =
            StepInput { token_ids: &mb.tokens, positions: &mb.positions, slot_mapping: slots, seqs, logits_rows: &[] };
        let meta = model.attention_meta(&input);
        let cache = kv.cache.as_mut().expect("the embed slice allocated the cache");
        match self.phase {
            Phase::Embed | Phase::Done => unreachable!("handled above / a finished run is not advanced"),
            Phase::Forward(i) => {
                let x = self.x.as_mut().expect("the forward holds x");
                // Evaluation runs without dropout; a training step draws its masks from the seed.
                let kept = if training { self.shrinks.as_mut() } else { None };
                let mut hook = TrainForward { lora, dropout_seed, dropout: training, shrinks: kept };
                if training {
                    self.checkpoints.push(be.copy(x)?);
                }
                if training && plan.keeps(i, n) {
                    let mut a = LayerActivations::with_derived(be, c, t, self.spare.take())?;
                    model.forward_layer(be, i, cache, &input, &meta, &mut hook, x, &mut a)?;
                    self.spare = Some(a.take_derived(be)?);
                    self.saved[i] = Some(a);
                } else {
                    if self.scratch.is_none() {
                        self.scratch = Some(LayerActivations::new(be, c, t)?);
                    }
                    let a = self.scratch.as_mut().expect("just set");
                    model.forward_layer(be, i, cache, &input, &meta, &mut hook, x, a)?;
                }
                self.phase = if i + 1 < n { Phase::Forward(i + 1) } else { Phase::Head };
                Ok(None)
            }
            Phase::Head => {
                let x = self.x.take().expect("the forward leaves x");
                let Some(scale) = self.grad_scale else {
                    self.phase = Phase::Done;
                    let sums = model.head_loss(be, &x, &mb.loss_rows, &mb.labels, plan.head_rows, None, None)?;
                    return Ok(Some(sums));
                };
                let mut dx = be.zeros(t, c.hidden_size)?;
                self.sums =
                    model.head_loss(be, &x, &mb.loss_rows, &mb.labels, plan.head_rows, Some(scale), Some(&mut dx))?;
                drop(x);
                self.dx = Some(dx);
                self.grads = Some(LayerGrads::new(be, c, t)?);
                if n == 0 {
                    self.phase = Phase::Done;
                    return Ok(Some(self.sums));
                }
                self.phase = Phase::Backward(n - 1);
                Ok(None)
            }
            Phase::Backward(i) => {
                let x_in = self.checkpoints.pop().expect("one checkpoint per layer");
                let grads = self.grads.as_mut().expect("the head made the gradients");
                let shrinks = self.shrinks.as_mut();
                let (mut acts, kept) = match self.saved[i].take() {
                    Some(mut a) => {
                        a.put_derived(self.spare.take().expect("kept layers leave a derived set"));
                        model.recompute_derived(be, i, &x_in, grads, &mut a)?;
                        (a, true)
                    }
                    None => {
                        // Recompute the layer from its checkpoint (same weights, same masks).
                        let mut a = match self.scratch.take() {
                            Some(a) => a,
                            None => LayerActivations::new(be, c, t)?,
                        };
                        let mut x = be.copy(&x_in)?;
                        let mut hook = TrainForward { lora, dropout_seed, dropout: true, shrinks };
                        model.forward_layer(be, i, cache, &input, &meta, &mut hook, &mut x, &mut a)?;
                        (a, false)
                    }
                };
                let mut hook = TrainBackward { lora, dropout_seed, shrinks: self.shrinks.as_mut() };
                let dx = self.dx.as_mut().expect("the head made dx");
                model.backward_layer(be, i, &input, &meta, &x_in, &acts, &mut hook, grads, dx)?;
                if kept {
                    // The layer's own tensors are done with; its derived set serves the next.
                    self.spare = Some(acts.take_derived(be)?);
                } else {
                    self.scratch = Some(acts);
                }
                if i == 0 {
                    self.phase = Phase::Done;
                    return Ok(Some(self.sums));
                }
                self.phase = Phase::Backward(i - 1);
                Ok(None)
            }
        }
    }
}
