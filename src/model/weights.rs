//! Where a model's weights come from: one naming scheme over GGUF files and HF
//! safetensors directories, producing [`HostWeight`]s that point into the
//! memory-mapped files (no copy), except GGUF llama Q/K, whose rows are brought
//! back to HF order (FORMATS.md §4) so one rope style serves every source.

use std::sync::Arc;

use crate::backend::{HostWeight, WeightBytes};
use crate::loader::gguf::GgufFile;
use crate::loader::safetensors::{SafetensorsModel, StDtype};
use crate::quant::ggml::WeightKind;
use crate::quant::hf_config::HfQuant;
use crate::quant::on_load::QuantizeTarget;

use super::config::{Arch, ModelConfig};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("weight '{0}' is missing")]
    Missing(String),
    #[error("weight '{name}': {reason}")]
    Bad { name: String, reason: String },
}

/// A tensor of the Llama family, independent of the file format's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorName {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    FfnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

impl TensorName {
    /// A transformer block's projection matrix: what quantisation targets
    /// (embeddings, head, norms and biases stay as they are).
    pub fn is_projection(self) -> bool {
        use TensorName::*;
        matches!(self, Q(_) | K(_) | V(_) | O(_) | Gate(_) | Up(_) | Down(_))
    }
    pub fn hf(self) -> String {
        use TensorName::*;
        let l = |i: usize, s: &str| format!("model.layers.{i}.{s}");
        match self {
            Embed => "model.embed_tokens.weight".into(),
            FinalNorm => "model.norm.weight".into(),
            LmHead => "lm_head.weight".into(),
            AttnNorm(i) => l(i, "input_layernorm.weight"),
            FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            Q(i) => l(i, "self_attn.q_proj.weight"),
            K(i) => l(i, "self_attn.k_proj.weight"),
            V(i) => l(i, "self_attn.v_proj.weight"),
            O(i) => l(i, "self_attn.o_proj.weight"),
            QBias(i) => l(i, "self_attn.q_proj.bias"),
            KBias(i) => l(i, "self_attn.k_proj.bias"),
            VBias(i) => l(i, "self_attn.v_proj.bias"),
            Gate(i) => l(i, "mlp.gate_proj.weight"),
            Up(i) => l(i, "mlp.up_proj.weight"),
            Down(i) => l(i, "mlp.down_proj.weight"),
        }
    }
    pub fn gguf(self) -> String {
        use TensorName::*;
        let l = |i: usize, s: &str| format!("blk.{i}.{s}");
        match self {
            Embed => "token_embd.weight".into(),
            FinalNorm => "output_norm.weight".into(),
            LmHead => "output.weight".into(),
            AttnNorm(i) => l(i, "attn_norm.weight"),
            FfnNorm(i) => l(i, "ffn_norm.weight"),
            Q(i) => l(i, "attn_q.weight"),
            K(i) => l(i, "attn_k.weight"),
            V(i) => l(i, "attn_v.weight"),
            O(i) => l(i, "attn_output.weight"),
            QBias(i) => l(i, "attn_q.bias"),
            KBias(i) => l(i, "attn_k.bias"),
            VBias(i) => l(i, "attn_v.bias"),
            Gate(i) => l(i, "ffn_gate.weight"),
            Up(i) => l(i, "ffn_up.weight"),
            Down(i) => l(i, "ffn_down.weight"),
        }
    }
}

impl TensorName {
    /// The tensor a llama-family GGUF name stands for (the inverse of
    /// [`TensorName::gguf`]), or `None` for a name tandem does not model.
    pub fn from_gguf(name: &str) -> Option<TensorName> {
        use TensorName::*;
        let global = [Embed, FinalNorm, LmHead];
        if let Some(n) = global.into_iter().find(|n| n.gguf() == name) {
            return Some(n);
        }
        let layer: usize = name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()?;
        Self::PER_LAYER.into_iter().map(|f| f(layer)).find(|n| n.gguf() == name)
    }

    /// Every per-layer tensor, by layer index.
    pub const PER_LAYER: [fn(usize) -> TensorName; 12] = {
        use TensorName::*;
        [AttnNorm, FfnNorm, Q, K, V, O, QBias, KBias, VBias, Gate, Up, Down]
    };
}

/// A model file (or directory) that can hand out weights by [`TensorName`].
pub enum WeightSource {
    Gguf(Arc<GgufFile>),
    Safetensors(Arc<SafetensorsModel>),
    /// A GPTQ / AWQ / bitsandbytes checkpoint: its linear layers are rewritten
    /// at load (`loader::quantized`); everything else reads as above.
    QuantizedSafetensors(Arc<SafetensorsModel>, HfQuant),
    /// Generated on demand (benchmarks of shapes without a file).
    Random(Box<super::random::RandomModel>),
    /// Another source whose projection weights are quantised as they load (`--quantize`).
    Requantized(Box<WeightSource>, QuantizeTarget),
}

impl WeightSource {
    /// The weight, or `None` when the file does not have it.
    pub fn get(&self, name: TensorName, cfg: &ModelConfig) -> Result<Option<HostWeight>, WeightError> {
        match self {
            WeightSource::Gguf(f) => gguf_weight(f, name, cfg),
            WeightSource::Safetensors(m) => st_weight(m, name),
            WeightSource::QuantizedSafetensors(m, q) => {
                let hname = name.hf();
                let linear = !matches!(
                    name,
                    TensorName::Embed
                        | TensorName::FinalNorm
                        | TensorName::AttnNorm(_)
                        | TensorName::FfnNorm(_)
                        | TensorName::QBias(_)
                        | TensorName::KBias(_)
                        | TensorName::VBias(_)
                );
                let prefix = hname.strip_suffix(".weight").unwrap_or(&hname);
                match linear.then(|| crate::loader::quantized::linear(m, q, prefix)).transpose() {
                    Ok(Some(Some(w))) => Ok(Some(w)),
                    Ok(_) => st_weight(m, name),
                    Err(reason) => Err(WeightError::Bad { name: hname.clone(), reason }),
                }
            }
            WeightSource::Random(r) => Ok(r.weight(name)),
            WeightSource::Requantized(inner, target) => {
                let Some(w) = inner.get(name, cfg)? else { return Ok(None) };
                if !name.is_projection() || *target == QuantizeTarget::None {
                    return Ok(Some(w));
                }
                let bad = |reason| WeightError::Bad { name: w.name.clone(), reason };
                // Natural order: an act-order GPTQ weight's rows are stored permuted.
                let vals = w.dequantize_natural().map_err(bad)?;
                let (kind, bytes) =
                    crate::quant::on_load::quantize_values(*target, w.kind, &vals, w.rows, w.cols).map_err(bad)?;
                // The source's pages were read once; only the quantised copy is kept.
                w.bytes.release_pages();
                Ok(Some(HostWeight::new(w.name, kind, w.rows, w.cols, WeightBytes::from_vec(bytes))))
            }
        }
    }
    pub fn require(&self, name: TensorName, cfg: &ModelConfig) -> Result<HostWeight, WeightError> {
        self.get(name, cfg)?.ok_or_else(|| WeightError::Missing(self.display_name(name)))
    }
    fn display_name(&self, name: TensorName) -> String {
        match self {
            WeightSource::Gguf(_) => name.gguf(),
            WeightSource::Safetensors(_) | WeightSource::QuantizedSafetensors(..) => name.hf(),
            WeightSource::Random(_) => format!("{name:?}"),
            WeightSource::Requantized(inner, _) => inner.display_name(name),
        }
    }
}

fn gguf_weight(f: &GgufFile, name: TensorName, cfg: &ModelConfig) -> Result<Option<HostWeight>, WeightError> {
    let gname = name.gguf();
    let Some(info) = f.tensor(&gname) else { return Ok(None) };
    let bad = |reason: String| WeightError::Bad { name: gname.clone(), reason };
    let (rows, cols) = match info.dims.as_slice() {
        [k] => (1usize, *k as usize),
        [k, n] => (*n as usize, *k as usize),
        other => return Err(bad(format!("expected 1 or 2 dims, found {other:?}"))),
    };
    let start = (f.data_offset + info.offset) as usize;
    let range = start..start + info.n_bytes() as usize;
    let bytes = WeightBytes::new(f.mapped(), range).ok_or_else(|| bad("data lies outside the file".into()))?;
    let mut w = HostWeight::new(gname.clone(), info.ty, rows, cols, bytes);
    // convert_hf_to_gguf permutes llama Q/K rows for llama.cpp's interleaved rope.
    if cfg.arch == Arch::Llama || cfg.arch == Arch::Mistral {
        let heads = match name {
            TensorName::Q(_) | TensorName::QBias(_) => Some(cfg.num_heads),
            TensorName::K(_) | TensorName::KBias(_) => Some(cfg.num_kv_heads),
            _ => None,
        };
        if let Some(h) = heads {
            w = unpermute_rows(w, h, cfg.head_dim).map_err(bad)?;
        }
    }
    Ok(Some(w))
}

/// Undoes `permute(w, n_head)`: GGUF row `h*D + 2i + a` is HF row `h*D + a*D/2 + i`.
fn unpermute_rows(w: HostWeight, heads: usize, head_dim: usize) -> Result<HostWeight, String> {
    // A bias is a single row of `heads*head_dim` elements: permute elements instead.
    let (unit_bytes, units) = if w.rows == 1 {
        if w.kind != WeightKind::F32 {
            return Err("a permuted bias must be F32".into());
        }
        (4, w.cols)
    } else {
        (w.kind.row_bytes(w.cols).ok_or("bad row size")?, w.rows)
    };
    if units != heads * head_dim {
        return Err(format!("{units} rows is not {heads} heads x {head_dim}"));
    }
    let src = w.bytes.as_slice();
    let mut dst = vec![0u8; src.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for i in 0..half {
            for a in 0..2 {
                let from = h * head_dim + 2 * i + a;
                let to = h * head_dim + a * half + i;
                dst[to * unit_bytes..(to + 1) * unit_bytes]
                    .copy_from_slice(&src[from * unit_bytes..(from + 1) * unit_bytes]);
            }
        }
    }
    Ok(HostWeight { bytes: WeightBytes::from_vec(dst), ..w })
}

fn st_weight(m: &SafetensorsModel, name: TensorName) -> Result<Option<HostWeight>, WeightError> {
    let hname = name.hf();
    let Some(view) = m.tensor(&hname) else { return Ok(None) };
    let bad = |reason: String| WeightError::Bad { name: hname.clone(), reason };
    let kind = match view.dtype {
        StDtype::F32 => WeightKind::F32,
        StDtype::F16 => WeightKind::F16,
        StDtype::BF16 => WeightKind::BF16,
        other => return Err(bad(format!("dtype {other:?} is not a float weight"))),
    };
    let (rows, cols) = match view.shape {
        [k] => (1, *k),
        [n, k] => (*n, *k),
        other => return Err(bad(format!("expected 1 or 2 dims, found {other:?}"))),
    };
    let file = m.file_of(&hname).ok_or_else(|| bad("no file holds it".into()))?;
    let range = file.tensor_range(&hname).ok_or_else(|| bad("no byte range".into()))?;
    let bytes = WeightBytes::new(file.mapped(), range).ok_or_else(|| bad("data lies outside the file".into()))?;
    Ok(Some(HostWeight::new(hname, kind, rows, cols, bytes)))
}

#[cfg(test)]
mod tests {
    use super::TensorName::{self, *};

    #[test]
    fn gguf_names_parse_back_to_the_tensor_they_name() {
        let mut all = vec![Embed, FinalNorm, LmHead];
        all.extend([0, 7, 31].iter().flat_map(|&i| TensorName::PER_LAYER.map(|f| f(i))));
        for n in all {
            assert_eq!(TensorName::from_gguf(&n.gguf()), Some(n), "{}", n.gguf());
        }
        for other in
            ["rope_freqs.weight", "blk.x.attn_q.weight", "blk.0.attn_q.weightx", "blk.0", "blk..attn_q.weight", ""]
        {
            assert_eq!(TensorName::from_gguf(other), None, "{other:?}");
        }
    }
}
