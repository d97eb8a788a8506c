//! The adapter being trained: f32 master weights for every adapted projection
//! (`A` `[r, in]` as PEFT stores it, `Bᵀ` `[r, out]` so the expand walks
//! contiguous rows), their gradients and AdamW moments, all resident on the
//! backend; and the two hooks through which the model's shared forward and
//! backward reach it.
//!
//! `y = x·Wᵀ + scale · (drop(x)·Aᵀ)·Bᵀ` as peft computes it (dropout acts on
//! the input of A only; `scale = alpha / r`, or `alpha / √r` with rsLoRA).

use std::path::Path;

use crate::backend::{Backend, BackendError, BackendResult};
use crate::lora::{LoraError, LoraTarget, PeftAdapter};
use crate::model::{LoraGradHook, LoraHook, ModelConfig};
use crate::quant::random::Rng;

/// The shape of the adapter to train.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<LoraTarget>,
    /// Dropout probability on the input of A (0: none, as peft's nn.Identity).
    pub dropout: f32,
}

impl LoraSpec {
    pub fn scaling(&self) -> f32 {
        let r = self.rank as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("rank must be at least 1".into());
        }
        if self.targets.is_empty() {
            return Err("at least one target module is needed".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("alpha must be a positive number, not {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout must be in [0, 1), not {}", self.dropout));
        }
        Ok(())
    }
}

/// A trained tensor with its gradient and AdamW moments.
pub struct Param<B: Backend> {
    pub value: B::Tensor,
    pub grad: B::Tensor,
    pub m: B::Tensor,
    pub v: B::Tensor,
}

impl<B: Backend> Param<B> {
    /// `data` as a `[rows, cols]` parameter with zero gradient and moments.
    pub fn new(be: &B, data: &[f32], rows: usize, cols: usize) -> BackendResult<Self> {
        Ok(Self {
            value: be.upload(data, rows, cols)?,
            grad: be.zeros(rows, cols)?,
            m: be.zeros(rows, cols)?,
            v: be.zeros(rows, cols)?,
        })
    }
}

/// One adapted projection.
pub struct Factor<B: Backend> {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
    /// `[rank, in]`.
    pub a: Param<B>,
    /// `[rank, out]` (PEFT's `lora_B.weight` transposed).
    pub bt: Param<B>,
}

/// Every factor of the adapter, per layer and [`LoraTarget`].
pub struct TrainableLora<B: Backend> {
    pub spec: LoraSpec,
    pub layers: Vec<[Option<Factor<B>>; 7]>,
}

/// Host copies of one factor, PEFT's layout (`b` `[out, rank]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostFactor {
    pub layer: usize,
    pub target: LoraTarget,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl<B: Backend> TrainableLora<B> {
    /// peft's default initialisation: `A ~ U(-1/√in, 1/√in)` (kaiming_uniform
    /// with a = √5), `B = 0`, so step 0 is the base model. Seeded: the same
    /// seed gives the same adapter on every machine.
    pub fn init(be: &B, cfg: &ModelConfig, spec: &LoraSpec, seed: u64) -> BackendResult<Self> {
        spec.validate().map_err(BackendError::Invalid)?;
        let mut rng = Rng::new(seed ^ 0x4c6f_5241_696e_6974);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut row: [Option<Factor<B>>; 7] = Default::default();
            for t in LoraTarget::ALL {
                if !spec.targets.contains(&t) {
                    continue;
                }
                let (inf, outf) = t.shape(cfg);
                let bound = 1.0 / (inf as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * inf).map(|_| rng.uniform() * bound).collect();
                let b = vec![0f32; outf * spec.rank];
                row[t.index()] = Some(Factor::new(be, spec.rank, inf, outf, spec.scaling(), &a, &b)?);
            }
            layers.push(row);
        }
        Ok(Self { spec: spec.clone(), layers })
    }

    /// Starts from a PEFT adapter directory (its own rank, alpha and targets).
    pub fn from_peft_dir(be: &B, cfg: &ModelConfig, dir: &Path, dropout: f32) -> Result<Self, LoraError> {
        let peft = crate::lora::load_peft_dir_raw(dir, cfg, usize::MAX)?;
        let shown = dir.display().to_string();
        Self::from_peft(be, cfg, &peft, dropout).map_err(|e| LoraError::Invalid { path: shown, reason: e })
    }

    pub fn from_peft(be: &B, cfg: &ModelConfig, peft: &PeftAdapter, dropout: f32) -> Result<Self, String> {
        let mut targets = Vec::new();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in &peft.layers {
            let mut row: [Option<Factor<B>>; 7] = Default::default();
            for t in LoraTarget::ALL {
                let Some(m) = &l[t.index()] else { continue };
                if !targets.contains(&t) {
                    targets.push(t);
                }
                let (inf, outf) = t.shape(cfg);
                let f = Factor::new(be, m.rank, inf, outf, m.scaling, &m.a, &m.b).map_err(|e| e.to_string())?;
                row[t.index()] = Some(f);
            }
            layers.push(row);
        }
        targets.sort();
        let spec = LoraSpec { rank: peft.r, alpha: peft.lora_alpha, use_rslora: peft.use_rslora, targets, dropout };
        spec.validate()?;
        Ok(Self { spec, layers })
    }

    /// Every trained tensor, in a fixed order (layer, target, A then Bᵀ).
    pub fn params(&self) -> impl Iterator<Item = &Param<B>> {
        self.factors().flat_map(|(_, _, f)| [&f.a, &f.bt])
    }

    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param<B>> {
        self.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()).flat_map(|f| [&mut f.a, &mut f.bt])
    }

    pub fn factors(&self) -> impl Iterator<Item = (usize, LoraTarget, &Factor<B>)> {
        self.layers.iter().enumerate().flat_map(|(l, row)| {
            LoraTarget::ALL.into_iter().filter_map(move |t| row[t.index()].as_ref().map(|f| (l, t, f)))
        })
    }

    /// Number of trained values.
    pub fn num_params(&self) -> usize {
        self.factors().map(|(_, _, f)| f.rank * (f.in_features + f.out_features)).sum()
    }

    /// Sets every gradient to zero.
    pub fn zero_grads(&mut self, be: &B) -> BackendResult<()> {
        for p in self.params_mut() {
            be.fill(&mut p.grad, 0.0)?;
        }
        Ok(())
    }

    /// The weights on the host in PEFT's layout.
    pub fn download(&self, be: &B) -> BackendResult<Vec<HostFactor>> {
        self.factors()
            .map(|(layer, target, f)| {
                let bt = be.download(&f.bt.value)?;
                Ok(HostFactor { layer, target, rank: f.rank, a: be.download(&f.a.value)?, b: transpose(&bt, f.rank) })
            })
            .collect()
    }

    /// The gradients on the host, in PEFT's layout (`b` is dL/dB `[out, rank]`).
    pub fn download_grads(&self, be: &B) -> BackendResult<Vec<HostFactor>> {
        self.factors()
            .map(|(layer, target, f)| {
                let bt = be.download(&f.bt.grad)?;
                Ok(HostFactor { layer, target, rank: f.rank, a: be.download(&f.a.grad)?, b: transpose(&bt, f.rank) })
            })
            .collect()
    }
}

impl<B: Backend> Factor<B> {
    fn new(be: &B, rank: usize, inf: usize, outf: usize, scale: f32, a: &[f32], b: &[f32]) -> BackendResult<Self> {
        assert_eq!(a.len(), rank * inf);
        assert_eq!(b.len(), outf * rank);
        let bt = transpose(b, outf);
        Ok(Self {
            rank,
            in_features: inf,
            out_features: outf,
            scale,
            a: Param::new(be, a, rank, inf)?,
            bt: Param::new(be, &bt, rank, outf)?,
        })
    }
}

/// A row-major matrix of `rows` rows, transposed.
pub fn transpose(v: &[f32], rows: usize) -> Vec<f32> {
    let cols = v.len() / rows.max(1);
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// The dropout seed of one projection in one micro-batch: the forward and the
/// backward draw the same mask from it.
fn dropout_seed(base: u64, layer: usize, target: LoraTarget) -> u64 {
    let mut z = base ^ ((layer as u64) << 8 | target.index() as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z ^ (z >> 32)
}

/// The shrink `drop(x)·Aᵀ` (`[tokens, rank]`) of each adapted projection,
/// kept by the forward for the backward (a few MB: rank columns).
pub struct ShrinkCache<B: Backend> {
    slots: Vec<Option<B::Tensor>>,
}

impl<B: Backend> ShrinkCache<B> {
    pub fn new(layers: usize) -> Self {
        Self { slots: (0..layers * 7).map(|_| None).collect() }
    }
}

/// The trained adapter as the shared forward sees it.
pub struct TrainForward<'a, B: Backend> {
    pub lora: &'a TrainableLora<B>,
    /// Per micro-batch: the dropout masks' seed.
    pub dropout_seed: u64,
    /// Whether dropout applies (training) or not (evaluation).
    pub dropout: bool,
    /// Where to keep each shrink for the backward (training).
    pub shrinks: Option<&'a mut ShrinkCache<B>>,
}

/// The trained adapter as the shared backward sees it: gradients accumulate
/// into its parameters' `grad` tensors.
pub struct TrainBackward<'a, B: Backend> {
    pub lora: &'a mut TrainableLora<B>,
    pub dropout_seed: u64,
    /// The forward's shrinks (recomputed when absent).
    pub shrinks: Option<&'a mut ShrinkCache<B>>,
}

/// `x`, or a dropped-out copy of it.
fn dropped<B: Backend>(be: &B, x: &B::Tensor, p: f32, seed: u64) -> BackendResult<Option<B::Tensor>> {
    if p == 0.0 {
        return Ok(None);
    }
    let (r, c) = be.shape(x);
    let mut out = be.zeros(r, c)?;
    be.dropout(x, p, seed, &mut out)?;
    Ok(Some(out))
}

impl<B: Backend> LoraHook<B> for TrainForward<'_, B> {
    fn add(
        &mut self,
        be: &B,
        layer: usize,
        target: LoraTarget,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> BackendResult<()> {
        let Some(f) = &self.lora.layers[layer][target.index()] else { return Ok(()) };
        let p = if self.dropout { self.lora.spec.dropout } else { 0.0 };
        let xd = dropped(be, x, p, dropout_seed(self.dropout_seed, layer, target))?;
        let x = xd.as_ref().unwrap_or(x);
        let (rows, _) = be.shape(x);
        let mut s = be.zeros(rows, f.rank)?;
        be.gemm(x, false, &f.a.value, true, 1.0, 0.0, &mut s)?;
        be.gemm(&s, false, &f.bt.value, false, f.scale, 1.0, out)?;
        if let Some(cache) = self.shrinks.as_deref_mut() {
            cache.slots[layer * 7 + target.index()] = Some(s);
        }
        Ok(())
    }
}

impl<B: Backend> LoraGradHook<B> for TrainBackward<'_, B> {
    fn backward(
        &mut self,
        be: &B,
        layer: usize,
        target: LoraTarget,
        x: &B::Tensor,
        dy: &B::Tensor,
        dx: &mut B::Tensor,
    ) -> BackendResult<()> {
        let p = self.lora.spec.dropout;
        let Some(f) = &mut self.lora.layers[layer][target.index()] else { return Ok(()) };
        let seed = dropout_seed(self.dropout_seed, layer, target);
        let xd = dropped(be, x, p, seed)?;
        let x = xd.as_ref().unwrap_or(x);
        let (rows, _) = be.shape(x);
        // s = drop(x)·Aᵀ, as the forward left it (or recomputed).
        let kept = self.shrinks.as_deref_mut().and_then(|c| c.slots[layer * 7 + target.index()].take());
        let s = match kept {
            Some(s) => s,
            None => {
                let mut s = be.zeros(rows, f.rank)?;
                be.gemm(x, false, &f.a.value, true, 1.0, 0.0, &mut s)?;
                s
            }
        };
        // dBᵀ += scale · sᵀ·dy; ds = scale · dy·B.
        be.gemm(&s, true, dy, false, f.scale, 1.0, &mut f.bt.grad)?;
        let mut ds = be.zeros(rows, f.rank)?;
        be.gemm(dy, false, &f.bt.value, true, f.scale, 0.0, &mut ds)?;
        // dA += dsᵀ·drop(x); dx += drop'(ds·A).
        be.gemm(&ds, true, x, false, 1.0, 1.0, &mut f.a.grad)?;
        if p == 0.0 {
            return be.gemm(&ds, false, &f.a.value, false, 1.0, 1.0, dx);
        }
        let mut dxd = be.zeros(rows, f.in_features)?;
        be.gemm(&ds, false, &f.a.value, false, 1.0, 0.0, &mut dxd)?;
        let mut masked = be.zeros(rows, f.in_features)?;
        be.dropout(&dxd, p, seed, &mut masked)?;
        be.add_assign(dx, &masked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2 x 3
        assert_eq!(transpose(&v, 2), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(transpose(&transpose(&v, 2), 3), v.to_vec());
    }

    #[test]
    fn dropout_seeds_differ_per_projection() {
        let a = dropout_seed(7, 0, LoraTarget::Q);
        assert_ne!(a, dropout_seed(7, 0, LoraTarget::K));
        assert_ne!(a, dropout_seed(7, 1, LoraTarget::Q));
        assert_ne!(a, dropout_seed(8, 0, LoraTarget::Q));
        assert_eq!(a, dropout_seed(7, 0, LoraTarget::Q));
    }
}
