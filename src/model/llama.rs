//! The Llama family (Llama 2/3, Qwen2/2.5, Mistral) written once against
//! [`Backend`]: pre-norm decoder layers with GQA attention over the paged KV
//! cache and a SwiGLU MLP.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::backend::{AttentionMeta, Backend, BackendResult, RopeTable};
use crate::quant::ggml::WeightKind;

use super::config::ModelConfig;
use super::layer::{Layer, LayerActivations, LoraHook};
use super::weights::{TensorName, WeightError, WeightSource};
use super::StepInput;

pub struct LlamaModel<B: Backend> {
    pub config: ModelConfig,
    pub(super) embed: B::Weight,
    pub(super) final_norm: B::Weight,
    /// `None` when tied to the embedding.
    pub(super) lm_head: Option<B::Weight>,
    pub(super) layers: Vec<Layer<B>>,
    pub(super) rope: RopeTable,
    /// What the weights are stored as: (kind, tensors, bytes), for the start-up report.
    pub stored: Vec<(WeightKind, usize, usize)>,
}

/// One line for the start-up report: each kind's tensor count and size.
pub fn describe_stored(stored: &[(WeightKind, usize, usize)]) -> String {
    let total: usize = stored.iter().map(|s| s.2).sum();
    let parts: Vec<String> =
        stored.iter().map(|(k, n, b)| format!("{k:?} x{n} ({:.1} MiB)", *b as f64 / (1 << 20) as f64)).collect();
    format!("{:.1} MiB of weights: {}", total as f64 / (1 << 20) as f64, parts.join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weight(#[from] WeightError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error("weight '{name}' has shape [{rows}, {cols}], expected [{want_rows}, {want_cols}]")]
    Shape { name: String, rows: usize, cols: usize, want_rows: usize, want_cols: usize },
}

impl<B: Backend> LlamaModel<B> {
    pub fn load(be: &B, src: &WeightSource, config: ModelConfig) -> Result<Self, LoadError> {
        let c = &config;
        let (h, ff, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let tally: RefCell<BTreeMap<String, (WeightKind, usize, usize)>> = RefCell::default();
        let load = |name: TensorName, rows: usize, cols: usize| -> Result<B::Weight, LoadError> {
            let w = src.require(name, c)?;
            if (w.rows, w.cols) != (rows, cols) {
                return Err(LoadError::Shape {
                    name: w.name,
                    rows: w.rows,
                    cols: w.cols,
                    want_rows: rows,
                    want_cols: cols,
                });
            }
            let mut t = tally.borrow_mut();
            let e = t.entry(format!("{:?}", w.kind)).or_insert((w.kind, 0, 0));
            e.1 += 1;
            e.2 += w.bytes.as_slice().len();
            Ok(be.load_weight(w)?)
        };
        let load_opt = |name: TensorName, cols: usize| -> Result<Option<B::Weight>, LoadError> {
            if !c.qkv_bias {
                return Ok(None);
            }
            load(name, 1, cols).map(Some)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            layers.push(Layer {
                attn_norm: load(TensorName::AttnNorm(i), 1, h)?,
                ffn_norm: load(TensorName::FfnNorm(i), 1, h)?,
                q: load(TensorName::Q(i), qd, h)?,
                k: load(TensorName::K(i), kvd, h)?,
                v: load(TensorName::V(i), kvd, h)?,
                o: load(TensorName::O(i), h, qd)?,
                q_bias: load_opt(TensorName::QBias(i), qd)?,
                k_bias: load_opt(TensorName::KBias(i), kvd)?,
                v_bias: load_opt(TensorName::VBias(i), kvd)?,
                gate: load(TensorName::Gate(i), ff, h)?,
                up: load(TensorName::Up(i), ff, h)?,
                down: load(TensorName::Down(i), h, ff)?,
            });
        }
        let lm_head = match src.get(TensorName::LmHead, c)? {
            Some(_) if c.tie_word_embeddings => None,
            Some(_) => Some(load(TensorName::LmHead, c.vocab_size, h)?),
            None => None,
        };
        let embed = load(TensorName::Embed, c.vocab_size, h)?;
        let final_norm = load(TensorName::FinalNorm, 1, h)?;
        let stored = tally.into_inner().into_values().collect();
        Ok(Self { embed, final_norm, lm_head, layers, rope: c.rope_table(), config, stored })
    }

    /// Runs one step: writes the new tokens' K/V into the cache and returns the
    /// logits `[input.logits_rows.len(), vocab]` for the rows that need them.
    /// `lora` adds adapter deltas to the projections (rows in a serving step's
    /// segments, or every row while training).
    pub fn forward(
        &self,
        be: &B,
        kv: &mut B::KvCache,
        input: &StepInput<'_>,
        lora: &mut impl LoraHook<B>,
    ) -> BackendResult<B::Tensor> {
        let c = &self.config;
        let t = input.token_ids.len();
        let meta = self.attention_meta(input);
        let mut x = be.zeros(t, c.hidden_size)?;
        self.embed(be, input.token_ids, &mut x)?;
        let mut acts = LayerActivations::new(be, c, t)?;
        for i in 0..self.layers.len() {
            self.forward_layer(be, i, kv, input, &meta, lora, &mut x, &mut acts)?;
        }
        let last = be.gather_rows(&x, input.logits_rows)?;
        self.logits(be, &last)
    }

    /// The token embeddings of `ids` into `x` (`[ids.len(), hidden]`).
    pub fn embed(&self, be: &B, ids: &[u32], x: &mut B::Tensor) -> BackendResult<()> {
        be.embedding(&self.embed, ids, x)
    }

    /// What attention needs to know about `input` besides the tensors.
    pub fn attention_meta<'a>(&self, input: &'a StepInput<'a>) -> AttentionMeta<'a> {
        let c = &self.config;
        AttentionMeta {
            seqs: &input.seqs,
            num_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            sliding_window: c.sliding_window,
        }
    }

    /// Layer `i` on the residual stream `x`, in place, leaving what it
    /// computed in `acts` (the one forward inference and training share).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_layer(
        &self,
        be: &B,
        i: usize,
        kv: &mut B::KvCache,
        input: &StepInput<'_>,
        meta: &AttentionMeta<'_>,
        lora: &mut impl LoraHook<B>,
        x: &mut B::Tensor,
        acts: &mut LayerActivations<B>,
    ) -> BackendResult<()> {
        self.layers[i].forward(be, &self.config, i, kv, input, meta, &self.rope, lora, x, acts)
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, hidden]`.
    pub fn logits(&self, be: &B, hidden: &B::Tensor) -> BackendResult<B::Tensor> {
        let c = &self.config;
        let (rows, _) = be.shape(hidden);
        let mut normed = be.zeros(rows, c.hidden_size)?;
        be.rms_norm(hidden, &self.final_norm, c.rms_norm_eps, &mut normed)?;
        let mut logits = be.zeros(rows, c.vocab_size)?;
        be.matmul(&normed, self.lm_head(), &mut logits)?;
        Ok(logits)
    }

    /// The output projection (the embedding when tied).
    pub(super) fn lm_head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
