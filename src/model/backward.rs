//! Gradients through the frozen model, for training LoRA adapters: the
//! backward of one decoder layer (the forward is `layer.rs`, shared with
//! serving) and of the output head with its cross-entropy.
//!
//! Only input gradients flow through base weights (they are frozen); the
//! adapter's own gradients come from the [`LoraGradHook`] at each adapted
//! projection, in the same place its [`super::LoraHook`] added the delta.

use crate::backend::{AttentionMeta, Backend, BackendResult, CrossEntropySums};
use crate::lora::LoraTarget;

use super::config::ModelConfig;
use super::layer::LayerActivations;
use super::{LlamaModel, StepInput};

/// The adapter side of the backward at one projection `y = x·Wᵀ + Δ(x)`.
pub trait LoraGradHook<B: Backend> {
    /// Accumulates the adapter's gradients for `target` in `layer` from the
    /// projection's input `x` and output gradient `dy`, and adds `∂Δ/∂x · dy`
    /// to `dx`.
    fn backward(
        &mut self,
        be: &B,
        layer: usize,
        target: LoraTarget,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> BackendResult<()>;
}

/// Scratch for one layer's backward over `rows` tokens, reused layer after layer.
pub struct LayerGrads<B: Backend> {
    dact: B::Tensor,
    dgate: B::Tensor,
    dup: B::Tensor,
    /// Gradient at the MLP's or attention's normed input `[rows, hidden]`.
    dnormed: B::Tensor,
    /// The residual stream between attention and MLP (recomputed).
    x_mid: B::Tensor,
    dattn: B::Tensor,
    dq: B::Tensor,
    dk: B::Tensor,
    dv: B::Tensor,
}

impl<B: Backend> LayerGrads<B> {
    pub fn new(be: &B, c: &ModelConfig, rows: usize) -> BackendResult<Self> {
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Ok(Self {
            dact: be.zeros(rows, ff)?,
            dgate: be.zeros(rows, ff)?,
            dup: be.zeros(rows, ff)?,
            dnormed: be.zeros(rows, h)?,
            x_mid: be.zeros(rows, h)?,
            dattn: be.zeros(rows, qd)?,
            dq: be.zeros(rows, qd)?,
            dk: be.zeros(rows, kvd)?,
            dv: be.zeros(rows, kvd)?,
        })
    }
}

/// Bytes of the [`LayerGrads`] scratch for `rows` tokens (f32).
pub fn layer_grads_bytes(c: &ModelConfig, rows: usize) -> usize {
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    4 * rows * (3 * c.intermediate_size + 2 * c.hidden_size + 2 * qd + 2 * kvd)
}

impl<B: Backend> LlamaModel<B> {
    /// Refills the derived activations of layer `i` (see
    /// [`super::DerivedActivations`]) from its input before its backward.
    pub fn recompute_derived(
        &self,
        be: &B,
        i: usize,
        x_in: &B::Tensor,
        g: &mut LayerGrads<B>,
        a: &mut LayerActivations<B>,
    ) -> BackendResult<()> {
        self.layers[i].recompute_derived(be, &self.config, x_in, &mut g.x_mid, a)
    }

    /// The backward of layer `i`: on entry `dx` is the gradient at the layer's
    /// output, on return at its input `x_in`. `acts` is what the forward of this
    /// layer computed from `x_in` for `input` (whole sequences).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_layer(
        &self,
        be: &B,
        i: usize,
        input: &StepInput<'_>,
        meta: &AttentionMeta<'_>,
        x_in: &B::Tensor,
        a: &LayerActivations<B>,
        lora: &mut impl LoraGradHook<B>,
        g: &mut LayerGrads<B>,
        dx: &mut B::Tensor,
    ) -> BackendResult<()> {
        let c = &self.config;
        let l = &self.layers[i];
        let (d, eps) = (c.head_dim, c.rms_norm_eps);

        // MLP: x_out = x_mid + down(silu(gate(n)) · up(n)), n = rms_norm(x_mid).
        be.matmul_input_grad(&[(&*dx, &l.down)], &mut g.dact, false)?;
        lora.backward(be, i, LoraTarget::Down, &a.act, dx, &mut g.dact)?;
        be.silu_mul_backward(&a.gate, &a.up, &g.dact, &mut g.dgate, &mut g.dup)?;
        be.matmul_input_grad(&[(&g.dgate, &l.gate), (&g.dup, &l.up)], &mut g.dnormed, false)?;
        lora.backward(be, i, LoraTarget::Gate, &a.mlp_in, &g.dgate, &mut g.dnormed)?;
        lora.backward(be, i, LoraTarget::Up, &a.mlp_in, &g.dup, &mut g.dnormed)?;
        be.fill(&mut g.x_mid, 0.0)?;
        be.add_assign(&mut g.x_mid, x_in)?;
        be.add_assign(&mut g.x_mid, &a.attn_out)?;
        be.rms_norm_backward(&g.x_mid, &l.ffn_norm, eps, &g.dnormed, dx)?;

        // Attention: x_mid = x_in + o(attention(rope(q(n)), rope(k(n)), v(n))), n = rms_norm(x_in).
        be.matmul_input_grad(&[(&*dx, &l.o)], &mut g.dattn, false)?;
        lora.backward(be, i, LoraTarget::O, &a.attn, dx, &mut g.dattn)?;
        be.attention_backward(&a.q, &a.k, &a.v, &a.attn, &g.dattn, meta, &mut g.dq, &mut g.dk, &mut g.dv)?;
        be.rope_backward(&mut g.dq, c.num_heads, d, input.positions, &self.rope)?;
        be.rope_backward(&mut g.dk, c.num_kv_heads, d, input.positions, &self.rope)?;
        be.matmul_input_grad(&[(&g.dq, &l.q), (&g.dk, &l.k), (&g.dv, &l.v)], &mut g.dnormed, false)?;
        lora.backward(be, i, LoraTarget::Q, &a.attn_in, &g.dq, &mut g.dnormed)?;
        lora.backward(be, i, LoraTarget::K, &a.attn_in, &g.dk, &mut g.dnormed)?;
        lora.backward(be, i, LoraTarget::V, &a.attn_in, &g.dv, &mut g.dnormed)?;
        be.rms_norm_backward(x_in, &l.attn_norm, eps, &g.dnormed, dx)
    }

    /// Cross-entropy of the next-token predictions at `rows` of the final
    /// hidden states `hidden` (`[tokens, hidden]`) against `labels`, `chunk`
    /// rows at a time (so `chunk × vocab` logits exist at once, never
    /// `rows × vocab`). With `grad_scale = Some(s)` the gradient of
    /// `s · Σ loss` is added to `dhidden` at those rows.
    #[allow(clippy::too_many_arguments)]
    pub fn head_loss(
        &self,
        be: &B,
        hidden: &B::Tensor,
        rows: &[usize],
        labels: &[u32],
        chunk: usize,
        grad_scale: Option<f32>,
        mut dhidden: Option<&mut B::Tensor>,
    ) -> BackendResult<CrossEntropySums> {
        assert_eq!(rows.len(), labels.len());
        let c = &self.config;
        let mut sums = CrossEntropySums::default();
        for (rs, ls) in rows.chunks(chunk.max(1)).zip(labels.chunks(chunk.max(1))) {
            let h = be.gather_rows(hidden, rs)?;
            let mut normed = be.zeros(rs.len(), c.hidden_size)?;
            be.rms_norm(&h, &self.final_norm, c.rms_norm_eps, &mut normed)?;
            let mut logits = be.zeros(rs.len(), c.vocab_size)?;
            be.matmul(&normed, self.lm_head(), &mut logits)?;
            let s = be.cross_entropy(&mut logits, ls, grad_scale)?;
            sums.loss += s.loss;
            sums.correct += s.correct;
            if let (Some(_), Some(dh)) = (grad_scale, dhidden.as_deref_mut()) {
                // logits now hold dL/dlogits.
                be.matmul_input_grad(&[(&logits, self.lm_head())], &mut normed, false)?;
                let mut dh_rows = be.zeros(rs.len(), c.hidden_size)?;
                be.rms_norm_backward(&h, &self.final_norm, c.rms_norm_eps, &normed, &mut dh_rows)?;
                be.add_rows(&dh_rows, rs, dh)?;
            }
        }
        Ok(sums)
    }
}
