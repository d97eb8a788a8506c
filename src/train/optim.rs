//! The optimiser step as the HF Trainer takes it: clip the global gradient
//! norm, AdamW with the scheduled learning rate, zero the gradients.
//! The schedules are transformers' `get_*_schedule_with_warmup`.

use crate::backend::{AdamWStep, Backend, BackendResult};

use super::lora::{Param, TrainableLora};

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!("schedule {s:?}: expected linear, cosine or constant")),
        }
    }
}

/// The optimiser's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global L2 norm of the gradients to this (0: no clipping).
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
}

impl Default for OptimConfig {
    /// The values peft's examples train LoRA with (lr 2e-4 rather than the HF
    /// Trainer's full-fine-tuning 5e-5), HF's clipping at 1.0.
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<(), String> {
        let bad = |what: &str, v: f64| Err(format!("{what} = {v} is out of range"));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("learning rate", self.lr);
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(name, b);
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay);
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad("max_grad_norm", self.max_grad_norm);
        }
        Ok(())
    }

    /// The learning rate of optimiser step `step` (0-based) of `total`, as
    /// `LambdaLR` gives it: the scheduler is stepped after each optimiser step.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, total as f64);
        let factor = if step < self.warmup_steps {
            s / w.max(1.0)
        } else {
            match self.schedule {
                Schedule::Constant => 1.0,
                Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
                Schedule::Cosine => {
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.lr * factor
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub clipped: bool,
}

/// Clips, updates every parameter of `lora` with AdamW at step `step`
/// (0-based) of `total`, and zeroes the gradients.
pub fn optimizer_step<B: Backend>(
    be: &B,
    lora: &mut TrainableLora<B>,
    cfg: &OptimConfig,
    step: usize,
    total: usize,
) -> BackendResult<StepStats> {
    let stats = adamw_step(be, lora.params_mut().collect(), cfg, step, total)?;
    lora.zero_grads(be)?;
    Ok(stats)
}

/// `clip_grad_norm_(params, max_grad_norm)` then `AdamW.step()` at the
/// scheduled learning rate, over `params` (gradients are left as they are).
pub fn adamw_step<B: Backend>(
    be: &B,
    mut params: Vec<&mut Param<B>>,
    cfg: &OptimConfig,
    step: usize,
    total: usize,
) -> BackendResult<StepStats> {
    // One L2 norm over every gradient together.
    let mut ss = 0f64;
    for p in &params {
        ss += be.sum_squares(&p.grad)?;
    }
    let norm = ss.sqrt();
    // torch: clip_coef = max_norm / (norm + 1e-6), clamped to 1 (in f32).
    let coef = if cfg.max_grad_norm > 0.0 { (cfg.max_grad_norm / (norm + 1e-6)) as f32 } else { 1.0 };
    let grad_scale = coef.min(1.0);
    let lr = cfg.lr_at(step, total);
    let hp = AdamWStep {
        lr: lr as f32,
        beta1: cfg.beta1 as f32,
        beta2: cfg.beta2 as f32,
        eps: cfg.eps as f32,
        weight_decay: cfg.weight_decay as f32,
        step: (step + 1) as u32,
        grad_scale,
    };
    for p in params.iter_mut() {
        be.adamw(&mut p.value, &p.grad, &mut p.m, &mut p.v, &hp)?;
    }
    Ok(StepStats { grad_norm: norm, lr, clipped: grad_scale < 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        let c = |schedule| OptimConfig { lr: 1.0, schedule, warmup_steps: 2, ..OptimConfig::default() };
        let lin = c(Schedule::Linear);
        assert_eq!([lin.lr_at(0, 10), lin.lr_at(1, 10), lin.lr_at(2, 10)], [0.0, 0.5, 1.0]);
        assert!((lin.lr_at(6, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lin.lr_at(10, 10), 0.0);
        let cos = c(Schedule::Cosine);
        assert_eq!(cos.lr_at(2, 10), 1.0);
        assert!((cos.lr_at(6, 10) - 0.5).abs() < 1e-12);
        assert!(cos.lr_at(9, 10) > 0.0 && cos.lr_at(9, 10) < 0.05);
        assert_eq!(c(Schedule::Constant).lr_at(9, 10), 1.0);
        let no_warmup = OptimConfig { lr: 2.0, warmup_steps: 0, ..OptimConfig::default() };
        assert_eq!(no_warmup.lr_at(0, 4), 2.0);
    }
}
