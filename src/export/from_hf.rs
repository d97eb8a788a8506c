//! An HF checkpoint (config.json, safetensors, tokenizer.json) written as a
//! `.gguf`, laid out as llama.cpp's `convert_hf_to_gguf.py` lays out Llama,
//! Mistral (as `llama`) and Qwen2:
//!
//! - `general.*` and the architecture's hyperparameter keys, from which
//!   tandem's GGUF loader reads back the config the HF directory gives;
//! - tensors under GGUF names in the HF order of the merge's plan (so nothing
//!   of the source is dropped), projections quantised by
//!   [`quantize_values`], exactly the codes `--quantize` computes on load;
//!   llama Q/K rows (and biases) permuted for llama.cpp's rope as
//!   `LlamaModel.permute` does, after quantising (rows are quantised one by
//!   one, so the codes are the same either way); norms and biases F32;
//!   embeddings and the output head in the source's float type (or F32);
//!   Llama 3 rope scaling as `rope_freqs.weight`;
//! - the tokenizer as GGUF metadata ([`super::gguf_tokenizer`]).

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::Value as Json;

use crate::loader::gguf::GgufValue;
use crate::merge::{self, Base, Planned, Values};
use crate::model::config::RopeScaling;
use crate::model::{Arch, ModelConfig, TensorName, WeightSource};
use crate::quant::ggml::WeightKind;
use crate::quant::on_load::{quantize_values, QuantizeTarget};

use super::gguf::{file_type, write_file, OutTensor};
use super::{check_new_file, gguf_tokenizer, publish_file, target_of, ExportError, ExportFormat, ExportReport};

/// GGUF's default alignment (the file writes no `general.alignment`).
const ALIGNMENT: u64 = 32;

pub(super) fn write(spec: &str, format: ExportFormat, out: &Path) -> Result<ExportReport, ExportError> {
    check_new_file(out)?;
    let (base, config, src) =
        merge::open_base(spec).map_err(|source| ExportError::Model { spec: spec.into(), source })?;
    let Base::Hf { dir, json } = &base else {
        return Err(ExportError::Refused(format!("'{spec}' is not an HF directory")));
    };
    check_expressible(&config)?;
    let plan = merge::plan(&base, &config, &src, None)?;
    let tokenizer = gguf_tokenizer::from_hf_dir(dir, json, config.arch, config.vocab_size)?;
    let target = target_of(format);
    let tensors = tensors(&plan, &src, &config, target)?;
    let name = model_name(dir);
    let mut metadata = hyperparameters(&config, json, &name, target)?;
    metadata.extend(tokenizer.metadata());
    let entries: Vec<(&str, &GgufValue)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let weights_bytes = publish_file(out, |w| write_file(&entries, ALIGNMENT, &tensors, w))?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        format,
        tensors: tensors.len(),
        quantized: tensors.iter().filter(|t| t.requantized).count(),
        weights_bytes,
        notes: tokenizer.notes,
    })
}

/// `general.name`: the repository's name for a hub cache snapshot
/// (`models--org--name/snapshots/<hash>`), else the directory's.
fn model_name(dir: &Path) -> String {
    let hub = dir.ancestors().filter_map(|a| a.file_name()?.to_str()?.strip_prefix("models--")).next();
    match hub.and_then(|r| r.rsplit("--").next()) {
        Some(name) => name.to_string(),
        None => dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
    }
}

/// What a GGUF of this architecture cannot say, so that tandem (or llama.cpp)
/// would compute another model from it.
fn check_expressible(c: &ModelConfig) -> Result<(), ExportError> {
    if let Some(w) = c.sliding_window.filter(|w| *w < c.max_position) {
        return Err(ExportError::Refused(format!(
            "this model attends within a sliding window of {w} tokens, which a {} GGUF does not record (tandem \
             and llama.cpp would attend to the whole context)",
            gguf_arch(c.arch)
        )));
    }
    if c.arch == Arch::Qwen2 && !matches!(c.rope_scaling, RopeScaling::None) {
        return Err(ExportError::Refused(
            "Llama 3 rope scaling on a Qwen2 model: llama.cpp's qwen2 has no rope_freqs.weight".into(),
        ));
    }
    Ok(())
}

/// `general.architecture`: convert_hf_to_gguf writes Mistral as llama.
fn gguf_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
    }
}

/// The `general.*` and `{arch}.*` keys, in convert_hf_to_gguf's order.
fn hyperparameters(
    c: &ModelConfig,
    json: &Json,
    name: &str,
    target: QuantizeTarget,
) -> Result<Vec<(String, GgufValue)>, ExportError> {
    let arch = gguf_arch(c.arch);
    let u32_of = |key: &str, v: usize| {
        u32::try_from(v)
            .map(GgufValue::U32)
            .map_err(|_| ExportError::Refused(format!("{key} = {v} does not fit GGUF's u32")))
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut out = vec![
        ("general.architecture".to_string(), GgufValue::String(arch.into())),
        ("general.type".to_string(), GgufValue::String("model".into())),
        ("general.name".to_string(), GgufValue::String(name.into())),
        (k("block_count"), u32_of("num_hidden_layers", c.num_layers)?),
        (k("context_length"), u32_of("max_position_embeddings", c.max_position)?),
        (k("embedding_length"), u32_of("hidden_size", c.hidden_size)?),
        (k("feed_forward_length"), u32_of("intermediate_size", c.intermediate_size)?),
        (k("attention.head_count"), u32_of("num_attention_heads", c.num_heads)?),
        (k("attention.head_count_kv"), u32_of("num_key_value_heads", c.num_kv_heads)?),
        (k("rope.freq_base"), GgufValue::F32(c.rope_theta)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(c.rms_norm_eps)),
    ];
    // convert_hf_to_gguf writes them when config.json names a head_dim; tandem
    // needs them whenever it is not hidden_size / num_heads.
    if json.get("head_dim").is_some_and(|v| !v.is_null()) || c.head_dim * c.num_heads != c.hidden_size {
        out.push((k("attention.key_length"), u32_of("head_dim", c.head_dim)?));
        out.push((k("attention.value_length"), u32_of("head_dim", c.head_dim)?));
    }
    let ft = file_type(target).expect("GGUF targets have a file type");
    out.push(("general.file_type".into(), GgufValue::U32(ft)));
    if arch == "llama" {
        out.push((k("vocab_size"), u32_of("vocab_size", c.vocab_size)?));
        out.push((k("rope.dimension_count"), u32_of("head_dim", c.head_dim)?));
    }
    out.push(("general.quantization_version".into(), GgufValue::U32(2)));
    Ok(out)
}

/// The heads whose rows convert_hf_to_gguf permutes for llama.cpp's
/// interleaved rope (llama and mistral Q/K weights and biases).
fn permuted_heads(c: &ModelConfig, name: TensorName) -> Option<usize> {
    if !matches!(c.arch, Arch::Llama | Arch::Mistral) {
        return None;
    }
    match name {
        TensorName::Q(_) | TensorName::QBias(_) => Some(c.num_heads),
        TensorName::K(_) | TensorName::KBias(_) => Some(c.num_kv_heads),
        _ => None,
    }
}

/// `LlamaModel.permute` on units (rows, or a bias's elements) of `unit`
/// bytes: HF unit `h*D + a*D/2 + i` becomes GGUF unit `h*D + 2i + a`, the
/// inverse of what tandem's GGUF loader undoes.
fn permute(src: &[u8], unit: usize, heads: usize, head_dim: usize) -> Result<Vec<u8>, String> {
    if src.len() != heads * head_dim * unit {
        return Err(format!("{} bytes is not {heads} heads x {head_dim} x {unit}", src.len()));
    }
    let half = head_dim / 2;
    let mut dst = vec![0u8; src.len()];
    for h in 0..heads {
        for i in 0..half {
            for a in 0..2 {
                let to = h * head_dim + 2 * i + a;
                let from = h * head_dim + a * half + i;
                dst[to * unit..(to + 1) * unit].copy_from_slice(&src[from * unit..(from + 1) * unit]);
            }
        }
    }
    Ok(dst)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every tensor of the output: `rope_freqs.weight` first (as convert_hf_to_gguf
/// yields its extra tensors first), then the plan's, under GGUF names.
fn tensors(
    plan: &[Planned],
    src: &WeightSource,
    c: &ModelConfig,
    target: QuantizeTarget,
) -> Result<Vec<OutTensor>, ExportError> {
    let mut by_hf: HashMap<String, TensorName> =
        [TensorName::Embed, TensorName::FinalNorm, TensorName::LmHead].into_iter().map(|n| (n.hf(), n)).collect();
    for i in 0..c.num_layers {
        by_hf.extend(TensorName::PER_LAYER.iter().map(|f| (f(i).hf(), f(i))));
    }
    let mut out = Vec::new();
    if let RopeScaling::Llama3 { .. } = c.rope_scaling {
        let f = llama3_rope_factors(c);
        out.push(OutTensor {
            name: "rope_freqs.weight".into(),
            dims: vec![f.len() as u64],
            kind: WeightKind::F32,
            data: f32_bytes(&f),
            requantized: false,
        });
    }
    let planned: Vec<OutTensor> = plan
        .par_iter()
        .filter_map(|p| match (by_hf.get(&p.hf_name), &p.from) {
            (Some(&name), _) => Some(tensor(p, name, src, c, target)),
            // A zero bias tandem has no tensor for (Llama's o_proj with
            // attention_bias): it adds nothing, and llama.cpp reads none.
            (None, Values::Zeros) => None,
            (None, Values::Weight(_)) => {
                Some(Err(ExportError::Refused(format!("weight '{}' has no GGUF name", p.hf_name))))
            }
        })
        .collect::<Result<_, _>>()?;
    out.extend(planned);
    Ok(out)
}

/// One planned tensor, written as `name` (an untied head the source lacks is
/// the embedding's values under `output.weight`).
fn tensor(
    p: &Planned,
    name: TensorName,
    src: &WeightSource,
    c: &ModelConfig,
    target: QuantizeTarget,
) -> Result<OutTensor, ExportError> {
    let bad = |reason: String| ExportError::Refused(format!("weight '{}': {reason}", p.hf_name));
    let (rows, cols) = match p.shape.as_slice() {
        [n] => (1, *n),
        [r, n] => (*r, *n),
        other => return Err(bad(format!("shape {other:?}"))),
    };
    let dims: Vec<u64> = p.shape.iter().rev().map(|&d| d as u64).collect();
    let heads = permuted_heads(c, name);
    let permuted = |data: Vec<u8>, unit: usize| match heads {
        Some(h) => permute(&data, unit, h, c.head_dim).map_err(bad),
        None => Ok(data),
    };
    let w = match p.from {
        Values::Zeros => {
            let data = vec![0u8; rows * cols * 4];
            return Ok(OutTensor { name: name.gguf(), dims, kind: WeightKind::F32, data, requantized: false });
        }
        Values::Weight(from) => src.require(from, c).map_err(|e| bad(e.to_string()))?,
    };
    if (w.rows, w.cols) != (rows, cols) {
        return Err(bad(format!("shape [{}, {}] changed since it was checked", w.rows, w.cols)));
    }
    if name.is_projection() {
        // `WeightSource::Requantized`'s arithmetic: natural-order values, then quantize_values.
        let vals = w.dequantize_natural().map_err(bad)?;
        let (kind, data) = quantize_values(target, w.kind, &vals, rows, cols).map_err(bad)?;
        let row = kind.row_bytes(cols).ok_or_else(|| bad(format!("{cols} inputs do not fill {kind:?} blocks")))?;
        let data = permuted(data, row)?;
        return Ok(OutTensor { name: name.gguf(), dims, kind, data, requantized: true });
    }
    // Norms and biases as F32 (convert_hf_to_gguf keeps 1-D tensors F32);
    // embeddings and head as stored when that is a GGUF float type, else F32.
    let keep =
        rows > 1 && w.input_perm.is_none() && matches!(w.kind, WeightKind::F32 | WeightKind::F16 | WeightKind::BF16);
    let (kind, data) = if keep {
        (w.kind, w.bytes.as_slice().to_vec())
    } else {
        (WeightKind::F32, f32_bytes(&w.dequantize_natural().map_err(bad)?))
    };
    let unit = if rows == 1 { 4 } else { kind.row_bytes(cols).ok_or_else(|| bad("bad row size".into()))? };
    let data = permuted(data, unit)?;
    Ok(OutTensor { name: name.gguf(), dims, kind, data, requantized: false })
}

/// `rope_freqs.weight` for Llama 3 rope scaling: per frequency pair, the
/// divisor of the unscaled inverse frequency (convert_hf_to_gguf's
/// `generate_extra_tensors`, with `original_max_position_embeddings` from
/// `rope_scaling`, as transformers reads it). Each is the f32 nearest that
/// value for which tandem's `inv_freq / factor` gives back exactly the inverse
/// frequency it computes from the HF config, so the GGUF rotates as the HF
/// checkpoint does, bit for bit; where no f32 does (rare: one pair of Llama
/// 3.1's 64), the frequency is one rounding off.
fn llama3_rope_factors(c: &ModelConfig) -> Vec<f32> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = c.rope_scaling
    else {
        return Vec::new();
    };
    let scaled = c.rope_table().inv_freq;
    let plain = ModelConfig { rope_scaling: RopeScaling::None, ..c.clone() }.rope_table().inv_freq;
    let (factor, low, high, orig) =
        (factor as f64, low_freq_factor as f64, high_freq_factor as f64, original_max_position as f64);
    plain
        .iter()
        .zip(&scaled)
        .map(|(&x, &y)| {
            let wavelen = 2.0 * std::f64::consts::PI / x as f64;
            let reference = if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            } as f32;
            exact_divisor(x, y, reference)
        })
        .collect()
}

/// Among the f32 near `reference` and near `x / y`, the one closest to
/// `reference` with `x / f == y` in f32; `x / y` rounded when none is (the
/// frequency is then one rounding off).
fn exact_divisor(x: f32, y: f32, reference: f32) -> f32 {
    let quotient = (x as f64 / y as f64) as f32;
    if !(reference.is_finite() && reference > 0.0 && quotient.is_finite() && quotient > 0.0) {
        return reference;
    }
    let near = |f: f32| (0..=8u32).flat_map(move |k| [f.to_bits() + k, f.to_bits().saturating_sub(k)]);
    near(reference)
        .chain(near(quotient))
        .map(f32::from_bits)
        .filter(|&f| f.is_finite() && f > 0.0 && x / f == y)
        .min_by(|a, b| (a - reference).abs().total_cmp(&(b - reference).abs()))
        .unwrap_or(quotient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_snapshots_are_named_after_their_repository() {
        let snap = Path::new("/c/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc");
        assert_eq!(model_name(snap), "Qwen2.5-0.5B");
        assert_eq!(model_name(Path::new("/data/tiny/hf-f32")), "hf-f32");
    }

    #[test]
    fn permute_is_what_the_gguf_loader_undoes() {
        // tandem's loader: GGUF row h*D + 2i + a is HF row h*D + a*D/2 + i.
        let (heads, d) = (3, 8);
        let hf: Vec<u8> = (0..(heads * d) as u8).collect();
        let gguf = permute(&hf, 1, heads, d).unwrap();
        for h in 0..heads {
            for i in 0..d / 2 {
                for a in 0..2 {
                    assert_eq!(gguf[h * d + 2 * i + a], hf[h * d + a * d / 2 + i]);
                }
            }
        }
        // Whole rows move together.
        let rows: Vec<u8> = (0..(heads * d * 4) as u8).collect();
        let p = permute(&rows, 4, heads, d).unwrap();
        assert_eq!(&p[4..8], &rows[4 * (d / 2)..4 * (d / 2) + 4]);
        assert!(permute(&rows, 4, heads, d + 2).is_err());
    }

    #[test]
    fn rope_factors_give_back_the_hf_frequencies_exactly() {
        let mut c = crate::model::random::parse("random:tiny").unwrap().unwrap().config;
        c.head_dim = 128;
        c.rope_theta = 500000.0;
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192.0,
        };
        let f = llama3_rope_factors(&c);
        let want = c.rope_table().inv_freq;
        let got = ModelConfig { rope_scaling: RopeScaling::FreqFactors(f.clone()), ..c.clone() }.rope_table().inv_freq;
        // Exact wherever an f32 divisor gives the frequency back (one pair of
        // Llama 3.1's 64 has none: it is then one rounding off).
        let ulps: Vec<i64> =
            got.iter().zip(&want).map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs()).collect();
        assert!(ulps.iter().all(|&u| u <= 1), "{ulps:?}");
        assert!(ulps.iter().filter(|&&u| u == 0).count() >= 63, "{ulps:?}");
        // The tiny llama fixture's (theta 5e5, 8 pairs, original context 64): every pair exact.
        let tiny = ModelConfig {
            head_dim: 16,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 64.0,
            },
            ..c.clone()
        };
        let f16 = llama3_rope_factors(&tiny);
        let back = ModelConfig { rope_scaling: RopeScaling::FreqFactors(f16), ..tiny.clone() }.rope_table().inv_freq;
        assert_eq!(back, tiny.rope_table().inv_freq);
        // The ends of the band are exactly 1 and the factor, as convert_hf_to_gguf writes them.
        assert_eq!((f[0], f[63]), (1.0, 8.0));
        assert!(f.iter().all(|x| (1.0..=8.0).contains(x)));
    }

    #[test]
    fn exact_divisors_stay_near_the_reference() {
        let (x, y) = (0.3f32, 0.3f32 / 2.7f32);
        let f = exact_divisor(x, y, 2.7);
        assert_eq!(x / f, y);
        assert!((f - 2.7).abs() < 1e-5);
        assert_eq!(exact_divisor(1.0, 1.0, 1.0), 1.0);
    }
}
