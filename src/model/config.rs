//! `ModelConfig`: the architecture hyperparameters, from an HF `config.json` or
//! GGUF metadata.

use serde_json::Value;

use crate::backend::{RopeStyle, RopeTable};
use crate::loader::gguf::GgufFile;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, mistral)")]
    UnsupportedArch(String),
    #[error("config is missing '{0}'")]
    Missing(String),
    #[error("config value '{key}' is invalid: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
    /// Per-pair frequency divisors as GGUF stores Llama 3 scaling (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub qkv_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn usize_of(v: &Value, key: &str) -> Result<usize, ConfigError> {
    opt_usize(v, key)?.ok_or_else(|| ConfigError::Missing(key.into()))
}

fn opt_usize(v: &Value, key: &str) -> Result<Option<usize>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            reason: format!("expected a non-negative integer, found {x}"),
        }),
    }
}

fn opt_f32(v: &Value, key: &str) -> Result<Option<f32>, ConfigError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(|n| Some(n as f32))
            .ok_or_else(|| ConfigError::Invalid { key: key.into(), reason: format!("expected a number, found {x}") }),
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// From an HF `config.json` value.
    pub fn from_hf_json(v: &Value) -> Result<Self, ConfigError> {
        let mt = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match mt {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => return Err(ConfigError::UnsupportedArch(other.into())),
        };
        let hidden_size = usize_of(v, "hidden_size")?;
        let num_heads = usize_of(v, "num_attention_heads")?;
        let num_kv_heads = opt_usize(v, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = opt_usize(v, "head_dim")?.unwrap_or(hidden_size / num_heads.max(1));
        // transformers 5 writes `rope_parameters` (theta and scaling together);
        // older configs `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = match rope_params {
            Some(p) => opt_f32(p, "rope_theta")?,
            None => opt_f32(v, "rope_theta")?,
        };
        let rope_scaling = match rope_params.or_else(|| v.get("rope_scaling")) {
            None | Some(Value::Null) => RopeScaling::None,
            Some(rs) => {
                let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(Value::as_str).unwrap_or("");
                match kind {
                    "llama3" => RopeScaling::Llama3 {
                        factor: opt_f32(rs, "factor")?
                            .ok_or_else(|| ConfigError::Missing("rope_scaling.factor".into()))?,
                        low_freq_factor: opt_f32(rs, "low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: opt_f32(rs, "high_freq_factor")?.unwrap_or(4.0),
                        original_max_position: opt_f32(rs, "original_max_position_embeddings")?.unwrap_or(8192.0),
                    },
                    "default" => RopeScaling::None,
                    other => {
                        return Err(ConfigError::Invalid {
                            key: "rope_scaling".into(),
                            reason: format!("rope type '{other}' is not supported yet"),
                        })
                    }
                }
            }
        };
        let cfg = Self {
            arch,
            vocab_size: usize_of(v, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_of(v, "intermediate_size")?,
            num_layers: usize_of(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f32(v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            max_position: opt_usize(v, "max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            sliding_window: if v.get("use_sliding_window").and_then(Value::as_bool) == Some(false)
                && arch == Arch::Qwen2
            {
                None
            } else {
                opt_usize(v, "sliding_window")?
            },
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// From GGUF metadata (`<arch>.*` keys); tensors settle the vocab size and tying.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = f.architecture().ok_or_else(|| ConfigError::Missing("general.architecture".into()))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(ConfigError::UnsupportedArch(other.into())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize, ConfigError> {
            f.get_u64(&key(k)).map(|n| n as usize).ok_or_else(|| ConfigError::Missing(key(k)))
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let num_kv_heads = f.get_u64(&key("attention.head_count_kv")).map(|n| n as usize).unwrap_or(num_heads);
        let head_dim =
            f.get_u64(&key("attention.key_length")).map(|n| n as usize).unwrap_or(hidden_size / num_heads.max(1));
        let embd = f.tensor("token_embd.weight").ok_or_else(|| ConfigError::Missing("token_embd.weight".into()))?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
        if let Some(kind) = f.get_str(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(ConfigError::Invalid {
                    key: key("rope.scaling.type"),
                    reason: format!("rope scaling '{kind}' is not supported yet"),
                });
            }
        }
        let rope_scaling = match f.tensor("rope_freqs.weight") {
            Some(t) => {
                let mut v = vec![0f32; t.n_elements() as usize];
                crate::quant::ggml::dequantize(t.ty, f.tensor_data(t), &mut v)
                    .map_err(|e| ConfigError::Invalid { key: "rope_freqs.weight".into(), reason: e.to_string() })?;
                RopeScaling::FreqFactors(v)
            }
            None => RopeScaling::None,
        };
        let cfg = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: req("feed_forward_length")?,
            num_layers: req("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            rope_theta: f.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position: req("context_length").unwrap_or(4096),
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            sliding_window: None,
            bos_token_id: f.get_u64("tokenizer.ggml.bos_token_id").map(|n| n as u32),
            eos_token_ids: f.get_u64("tokenizer.ggml.eos_token_id").map(|n| vec![n as u32]).unwrap_or_default(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad("num_key_value_heads", "must divide num_attention_heads");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", "must be even and non-zero");
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size/hidden_size/num_hidden_layers", "must be non-zero");
        }
        if let RopeScaling::FreqFactors(v) = &self.rope_scaling {
            if v.len() != self.head_dim / 2 {
                return bad("rope_freqs.weight", "must hold head_dim/2 values");
            }
        }
        Ok(())
    }

    /// Rotary frequencies for this model. Weights are always brought to HF layout
    /// at load (GGUF llama Q/K rows un-permuted), so the style is rotate-half.
    pub fn rope_table(&self) -> RopeTable {
        let d = self.head_dim;
        let base = self.rope_theta as f64;
        let mut inv_freq: Vec<f32> = (0..d / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / d as f64)) as f32).collect();
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::FreqFactors(f) => {
                for (x, f) in inv_freq.iter_mut().zip(f) {
                    *x /= f;
                }
            }
            &RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                for x in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *x;
                    if wavelen > low_wavelen {
                        *x /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth =
                            (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *x = (1.0 - smooth) * *x / factor + smooth * *x;
                    }
                }
            }
        }
        RopeTable { inv_freq, style: RopeStyle::Neox }
    }
}
