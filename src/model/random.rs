//! Models with real shapes and random weights (`random:<shape>:<kind>`), for
//! benchmarks of sizes we cannot download here, e.g. `random:llama3-8b:q4_k`.
//! Matrices are random of the given kind; norms are ones. Outputs are noise,
//! but every kernel does the work it does on the real model.

use super::config::{Arch, ModelConfig, RopeScaling};
use super::weights::TensorName;
use crate::backend::{HostWeight, WeightBytes};
use crate::quant::ggml::WeightKind;
use crate::quant::random::{random_weight_bytes, Rng};

/// A spec's shape and weight kind.
pub struct RandomModel {
    pub config: ModelConfig,
    pub kind: WeightKind,
}

/// Parses `random:<shape>:<kind>`; `None` when `spec` is not a random spec,
/// an error naming the choices when it is but names an unknown shape or kind.
pub fn parse(spec: &str) -> Option<Result<RandomModel, String>> {
    let rest = spec.strip_prefix("random:")?;
    let (shape, kind) = rest.split_once(':').unwrap_or((rest, "bf16"));
    let Some(kind) = WeightKind::ALL.into_iter().find(|k| k.name() == kind) else {
        let names: Vec<&str> = WeightKind::ALL.iter().map(|k| k.name()).collect();
        return Some(Err(format!("unknown weight kind {kind:?} ({})", names.join(", "))));
    };
    let config = match shape {
        "llama3-8b" => llama(4096, 14336, 32, 32, 8, 128_256, 500_000.0),
        "llama3-1b" => llama(2048, 8192, 16, 32, 8, 128_256, 500_000.0),
        "tiny" => llama(256, 512, 2, 4, 2, 1024, 10_000.0),
        s => return Some(Err(format!("unknown random model shape {s:?} (llama3-8b, llama3-1b, tiny)"))),
    };
    Some(Ok(RandomModel { config, kind }))
}

fn llama(h: usize, ff: usize, layers: usize, heads: usize, kv: usize, vocab: usize, theta: f32) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: vocab,
        hidden_size: h,
        intermediate_size: ff,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: h / heads,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: RopeScaling::None,
        max_position: 8192,
        tie_word_embeddings: false,
        qkv_bias: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

impl RandomModel {
    /// The weight `name` would have in a real model of this shape.
    pub fn weight(&self, name: TensorName) -> Option<HostWeight> {
        let c = &self.config;
        let (h, ff, qd, kvd) =
            (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let (rows, cols, idx) = match name {
            TensorName::Embed => (c.vocab_size, h, 0),
            TensorName::LmHead => (c.vocab_size, h, 1),
            TensorName::FinalNorm => (1, h, 2),
            TensorName::AttnNorm(i) => (1, h, 16 * i + 3),
            TensorName::FfnNorm(i) => (1, h, 16 * i + 4),
            TensorName::Q(i) => (qd, h, 16 * i + 5),
            TensorName::K(i) => (kvd, h, 16 * i + 6),
            TensorName::V(i) => (kvd, h, 16 * i + 7),
            TensorName::O(i) => (h, qd, 16 * i + 8),
            TensorName::Gate(i) => (ff, h, 16 * i + 9),
            TensorName::Up(i) => (ff, h, 16 * i + 10),
            TensorName::Down(i) => (h, ff, 16 * i + 11),
            TensorName::QBias(_) | TensorName::KBias(_) | TensorName::VBias(_) => return None,
        };
        let bytes = if rows == 1 {
            (0..cols).flat_map(|_| 1f32.to_le_bytes()).collect()
        } else {
            // Each tensor has its own seed, so any one is reproducible alone.
            random_weight_bytes(self.kind, rows, cols, 0.05, &mut Rng::new(idx as u64 + 1))
        };
        let kind = if rows == 1 { WeightKind::F32 } else { self.kind };
        Some(HostWeight::new(format!("{name:?}"), kind, rows, cols, WeightBytes::from_vec(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::model::load_model;

    #[test]
    fn random_specs_load_and_bad_ones_say_why() {
        let be = CpuBackend::new(1).unwrap();
        let m = load_model(&be, "random:tiny:q4_k").unwrap();
        assert_eq!((m.model.config.hidden_size, m.model.config.num_layers), (256, 2));
        let err = load_model(&be, "random:huge:q4_k").err().unwrap().to_string();
        assert!(err.contains("huge") && err.contains("llama3-8b"), "{err}");
        let err = load_model(&be, "random:tiny:q3_k").err().unwrap().to_string();
        assert!(err.contains("q3_k"), "{err}");
    }
}
