//! One decoder layer of the Llama family, its forward pass, and the
//! activations it produces. Inference and training run this same forward: a
//! serving step reuses one [`LayerActivations`] for every layer, training keeps
//! a set per layer (or recomputes one) for the backward in `backward.rs`.

use crate::backend::{AttentionMeta, Backend, BackendResult, MatmulJob};
use crate::lora::LoraTarget;

use super::config::ModelConfig;
use super::StepInput;

pub(super) struct Layer<B: Backend> {
    pub attn_norm: B::Weight,
    pub ffn_norm: B::Weight,
    pub q: B::Weight,
    pub k: B::Weight,
    pub v: B::Weight,
    pub o: B::Weight,
    pub q_bias: Option<B::Weight>,
    pub k_bias: Option<B::Weight>,
    pub v_bias: Option<B::Weight>,
    pub gate: B::Weight,
    pub up: B::Weight,
    pub down: B::Weight,
}

/// Where a layer's projections get their LoRA deltas: serving adds each row's
/// adapter from its slot (`LoraStep`), training adds the adapter being trained.
pub trait LoraHook<B: Backend> {
    /// Adds the delta of `target` in `layer` for input `x` to the projection's output `out`.
    fn add(
        &mut self,
        be: &B,
        layer: usize,
        target: LoraTarget,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> BackendResult<()>;
}

/// No adapter anywhere.
pub struct NoLora;

impl<B: Backend> LoraHook<B> for NoLora {
    fn add(&mut self, _: &B, _: usize, _: LoraTarget, _: &B::Tensor, _: &mut B::Tensor) -> BackendResult<()> {
        Ok(())
    }
}

/// What one layer computes for `rows` tokens, kept for the backward: every
/// tensor the gradient formulas read.
pub struct LayerActivations<B: Backend> {
    /// rms_norm(x) before attention `[rows, hidden]`.
    pub attn_in: B::Tensor,
    /// Queries and keys after RoPE, values `[rows, heads · head_dim]`.
    pub q: B::Tensor,
    pub k: B::Tensor,
    pub v: B::Tensor,
    /// Attention output, the o-projection's input `[rows, heads · head_dim]`.
    pub attn: B::Tensor,
    /// The o-projection's output (the residual's first increment).
    pub attn_out: B::Tensor,
    /// rms_norm(x + attn_out) before the MLP.
    pub mlp_in: B::Tensor,
    pub gate: B::Tensor,
    pub up: B::Tensor,
    /// silu(gate) · up, the down-projection's input.
    pub act: B::Tensor,
    /// The down-projection's output (the residual's second increment).
    pub mlp_out: B::Tensor,
}

impl<B: Backend> LayerActivations<B> {
    pub fn new(be: &B, c: &ModelConfig, rows: usize) -> BackendResult<Self> {
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok(Self {
            attn_in: be.zeros(rows, h)?,
            q: be.zeros(rows, qd)?,
            k: be.zeros(rows, kvd)?,
            v: be.zeros(rows, kvd)?,
            attn: be.zeros(rows, qd)?,
            attn_out: be.zeros(rows, h)?,
            mlp_in: be.zeros(rows, h)?,
            gate: be.zeros(rows, ff)?,
            up: be.zeros(rows, ff)?,
            act: be.zeros(rows, ff)?,
            mlp_out: be.zeros(rows, h)?,
        })
    }
}

/// The activations the backward can recompute cheaply from the layer's input
/// and the others (two RMS norms and an elementwise product) or does not read
/// (the MLP output): training keeps one set of these for all kept layers.
pub struct DerivedActivations<B: Backend> {
    pub attn_in: B::Tensor,
    pub mlp_in: B::Tensor,
    pub act: B::Tensor,
    pub mlp_out: B::Tensor,
}

impl<B: Backend> LayerActivations<B> {
    /// A set whose derived tensors are `derived` (or new ones).
    pub fn with_derived(
        be: &B,
        c: &ModelConfig,
        rows: usize,
        derived: Option<DerivedActivations<B>>,
    ) -> BackendResult<Self> {
        let Some(d) = derived else { return Self::new(be, c, rows) };
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok(Self {
            attn_in: d.attn_in,
            q: be.zeros(rows, qd)?,
            k: be.zeros(rows, kvd)?,
            v: be.zeros(rows, kvd)?,
            attn: be.zeros(rows, qd)?,
            attn_out: be.zeros(rows, h)?,
            mlp_in: d.mlp_in,
            gate: be.zeros(rows, ff)?,
            up: be.zeros(rows, ff)?,
            act: d.act,
            mlp_out: d.mlp_out,
        })
    }

    /// Moves the derived tensors out (leaving empty ones), for another layer to use.
    pub fn take_derived(&mut self, be: &B) -> BackendResult<DerivedActivations<B>> {
        let empty = |t: &mut B::Tensor| -> BackendResult<B::Tensor> {
            let cols = be.shape(t).1;
            Ok(std::mem::replace(t, be.zeros(0, cols)?))
        };
        Ok(DerivedActivations {
            attn_in: empty(&mut self.attn_in)?,
            mlp_in: empty(&mut self.mlp_in)?,
            act: empty(&mut self.act)?,
            mlp_out: empty(&mut self.mlp_out)?,
        })
    }

    /// Puts derived tensors back (their contents are recomputed by
    /// `LlamaModel::recompute_derived` before the backward reads them).
    pub fn put_derived(&mut self, d: DerivedActivations<B>) {
        self.attn_in = d.attn_in;
        self.mlp_in = d.mlp_in;
        self.act = d.act;
        self.mlp_out = d.mlp_out;
    }
}

/// Bytes of one full [`LayerActivations`] set for `rows` tokens (f32).
pub fn layer_activations_bytes(c: &ModelConfig, rows: usize) -> usize {
    layer_saved_bytes(c, rows) + derived_activations_bytes(c, rows)
}

/// Bytes a kept layer holds: its activations less the derived ones.
pub fn layer_saved_bytes(c: &ModelConfig, rows: usize) -> usize {
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    4 * rows * (c.hidden_size + 2 * qd + 2 * kvd + 2 * c.intermediate_size)
}

/// Bytes of one [`DerivedActivations`] set.
pub fn derived_activations_bytes(c: &ModelConfig, rows: usize) -> usize {
    4 * rows * (3 * c.hidden_size + c.intermediate_size)
}

impl<B: Backend> Layer<B> {
    /// Recomputes the derived activations of a kept layer from its input
    /// `x_in`: the two normed inputs and silu(gate)·up (`mlp_out` is left as
    /// it is: the backward does not read it). `x_mid` is scratch `[rows, hidden]`.
    pub fn recompute_derived(
        &self,
        be: &B,
        c: &ModelConfig,
        x_in: &B::Tensor,
        x_mid: &mut B::Tensor,
        a: &mut LayerActivations<B>,
    ) -> BackendResult<()> {
        be.rms_norm(x_in, &self.attn_norm, c.rms_norm_eps, &mut a.attn_in)?;
        be.fill(x_mid, 0.0)?;
        be.add_assign(x_mid, x_in)?;
        be.add_assign(x_mid, &a.attn_out)?;
        be.rms_norm(x_mid, &self.ffn_norm, c.rms_norm_eps, &mut a.mlp_in)?;
        be.silu_mul(&a.gate, &a.up, &mut a.act)
    }

    /// `x` (the residual stream, `[rows, hidden]`) goes through the layer in
    /// place; K/V are written to the cache at `input.slot_mapping`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        c: &ModelConfig,
        index: usize,
        kv: &mut B::KvCache,
        input: &StepInput<'_>,
        meta: &AttentionMeta<'_>,
        rope: &crate::backend::RopeTable,
        lora: &mut impl LoraHook<B>,
        x: &mut B::Tensor,
        a: &mut LayerActivations<B>,
    ) -> BackendResult<()> {
        let (d, eps) = (c.head_dim, c.rms_norm_eps);
        be.rms_norm(x, &self.attn_norm, eps, &mut a.attn_in)?;
        be.matmul_many(
            &a.attn_in,
            &mut [
                MatmulJob { w: &self.q, bias: self.q_bias.as_ref(), out: &mut a.q },
                MatmulJob { w: &self.k, bias: self.k_bias.as_ref(), out: &mut a.k },
                MatmulJob { w: &self.v, bias: self.v_bias.as_ref(), out: &mut a.v },
            ],
        )?;
        lora.add(be, index, LoraTarget::Q, &a.attn_in, &mut a.q)?;
        lora.add(be, index, LoraTarget::K, &a.attn_in, &mut a.k)?;
        lora.add(be, index, LoraTarget::V, &a.attn_in, &mut a.v)?;
        be.rope(&mut a.q, c.num_heads, d, input.positions, rope)?;
        be.rope(&mut a.k, c.num_kv_heads, d, input.positions, rope)?;
        be.write_kv(kv, index, &a.k, &a.v, input.slot_mapping)?;
        be.paged_attention(kv, index, &a.q, meta, &mut a.attn)?;
        be.matmul(&a.attn, &self.o, &mut a.attn_out)?;
        lora.add(be, index, LoraTarget::O, &a.attn, &mut a.attn_out)?;
        be.add_assign(x, &a.attn_out)?;

        be.rms_norm(x, &self.ffn_norm, eps, &mut a.mlp_in)?;
        be.matmul_many(
            &a.mlp_in,
            &mut [
                MatmulJob { w: &self.gate, bias: None, out: &mut a.gate },
                MatmulJob { w: &self.up, bias: None, out: &mut a.up },
            ],
        )?;
        lora.add(be, index, LoraTarget::Gate, &a.mlp_in, &mut a.gate)?;
        lora.add(be, index, LoraTarget::Up, &a.mlp_in, &mut a.up)?;
        be.silu_mul(&a.gate, &a.up, &mut a.act)?;
        be.matmul(&a.act, &self.down, &mut a.mlp_out)?;
        lora.add(be, index, LoraTarget::Down, &a.act, &mut a.mlp_out)?;
        be.add_assign(x, &a.mlp_out)
    }
}
