//! The Llama family (Llama 2/3, Qwen2/2.5, Mistral) written once against
//! [`Backend`]: pre-norm decoder layers with GQA attention over the paged KV
//! cache and a SwiGLU MLP.

use crate::backend::{AttentionMeta, Backend, MatmulJob, RopeTable};

use crate::lora::LoraTarget;

use super::config::ModelConfig;
use super::lora::LoraStep;
use super::weights::{TensorName, WeightError, WeightSource};
use super::StepInput;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    ffn_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    o: B::Weight,
    q_bias: Option<B::Weight>,
    k_bias: Option<B::Weight>,
    v_bias: Option<B::Weight>,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

pub struct LlamaModel<B: Backend> {
    pub config: ModelConfig,
    embed: B::Weight,
    final_norm: B::Weight,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    rope: RopeTable,
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
        Ok(Self {
            embed: load(TensorName::Embed, c.vocab_size, h)?,
            final_norm: load(TensorName::FinalNorm, 1, h)?,
            lm_head,
            layers,
            rope: c.rope_table(),
            config,
        })
    }

    /// Runs one step: writes the new tokens' K/V into the cache and returns the
    /// logits `[input.logits_rows.len(), vocab]` for the rows that need them.
    /// Rows in a `lora` segment add their adapter's delta to every projection it targets.
    pub fn forward(&self, be: &B, kv: &mut B::KvCache, input: &StepInput<'_>, lora: &LoraStep<'_, B>) -> B::Tensor {
        let c = &self.config;
        let t = input.token_ids.len();
        let (h, d) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
        let meta = AttentionMeta {
            seqs: &input.seqs,
            num_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            sliding_window: c.sliding_window,
        };
        let mut x = be.zeros(t, h);
        be.embedding(&self.embed, input.token_ids, &mut x);
        let mut normed = be.zeros(t, h);
        let (mut q, mut k, mut v) = (be.zeros(t, qd), be.zeros(t, kvd), be.zeros(t, kvd));
        let mut attn = be.zeros(t, qd);
        let mut proj = be.zeros(t, h);
        let (mut gate, mut up) = (be.zeros(t, c.intermediate_size), be.zeros(t, c.intermediate_size));
        let mut act = be.zeros(t, c.intermediate_size);
        for (i, l) in self.layers.iter().enumerate() {
            be.rms_norm(&x, &l.attn_norm, c.rms_norm_eps, &mut normed);
            be.matmul_many(
                &normed,
                &mut [
                    MatmulJob { w: &l.q, bias: l.q_bias.as_ref(), out: &mut q },
                    MatmulJob { w: &l.k, bias: l.k_bias.as_ref(), out: &mut k },
                    MatmulJob { w: &l.v, bias: l.v_bias.as_ref(), out: &mut v },
                ],
            );
            be.lora_add(&normed, &lora.segments(i, LoraTarget::Q), &mut q);
            be.lora_add(&normed, &lora.segments(i, LoraTarget::K), &mut k);
            be.lora_add(&normed, &lora.segments(i, LoraTarget::V), &mut v);
            be.rope(&mut q, c.num_heads, d, input.positions, &self.rope);
            be.rope(&mut k, c.num_kv_heads, d, input.positions, &self.rope);
            be.write_kv(kv, i, &k, &v, input.slot_mapping);
            be.paged_attention(kv, i, &q, &meta, &mut attn);
            be.matmul(&attn, &l.o, &mut proj);
            be.lora_add(&attn, &lora.segments(i, LoraTarget::O), &mut proj);
            be.add_assign(&mut x, &proj);

            be.rms_norm(&x, &l.ffn_norm, c.rms_norm_eps, &mut normed);
            be.matmul_many(
                &normed,
                &mut [
                    MatmulJob { w: &l.gate, bias: None, out: &mut gate },
                    MatmulJob { w: &l.up, bias: None, out: &mut up },
                ],
            );
            be.lora_add(&normed, &lora.segments(i, LoraTarget::Gate), &mut gate);
            be.lora_add(&normed, &lora.segments(i, LoraTarget::Up), &mut up);
            be.silu_mul(&gate, &up, &mut act);
            be.matmul(&act, &l.down, &mut proj);
            be.lora_add(&act, &lora.segments(i, LoraTarget::Down), &mut proj);
            be.add_assign(&mut x, &proj);
        }
        let last = be.gather_rows(&x, input.logits_rows);
        let mut last_normed = be.zeros(input.logits_rows.len(), h);
        be.rms_norm(&last, &self.final_norm, c.rms_norm_eps, &mut last_normed);
        let mut logits = be.zeros(input.logits_rows.len(), c.vocab_size);
        be.matmul(&last_normed, self.lm_head.as_ref().unwrap_or(&self.embed), &mut logits);
        logits
    }
}
