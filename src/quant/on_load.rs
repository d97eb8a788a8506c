//! `--quantize`: an unquantised (f32/f16/bf16) model's projection weights
//! quantised while it loads, with no calibration data.
//!
//! - `nf4`, `fp4`: bitsandbytes' blockwise 4-bit (blocks of 64, absmax
//!   scaling, the nearest code), the same nibbles `quantize_4bit` writes;
//! - `int4`: round-to-nearest asymmetric 4-bit in GPTQ's form, group 128
//!   (or the largest of 64 / 32 that divides a layer's inputs), served as the
//!   group-wise int4 kind of that group;
//! - `int8`: round-to-nearest symmetric 8-bit, the same groups, served as Q8_0;
//! - `q8_0`: GGUF's Q8_0, as gguf-py's `quantize` writes it;
//! - `q4_k`: GGUF's Q4_K, as `llama-quantize` writes it without an importance
//!   matrix; a layer whose inputs are not a multiple of 256 falls back to Q5_0,
//!   as llama-quantize does (the default model's 896-wide layers).
//!
//! Embeddings, the output head, norms and biases stay as they are (as
//! bitsandbytes and GPTQ leave them by default). Already-quantised weights
//! (a GGUF) are dequantised and quantised again, with a warning: both
//! roundings then count (llama.cpp's `--allow-requantize`).

use super::ggml::{dequantize, WeightKind};
use super::{bnb, gguf_quantize, gptq};

/// What `--quantize` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantizeTarget {
    #[default]
    None,
    Nf4,
    Fp4,
    Int4,
    Int8,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_k")]
    Q4K,
}

impl std::str::FromStr for QuantizeTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Self::None,
            "nf4" => Self::Nf4,
            "fp4" => Self::Fp4,
            "int4" => Self::Int4,
            "int8" => Self::Int8,
            "q8_0" => Self::Q8_0,
            "q4_k" => Self::Q4K,
            other => return Err(format!("--quantize {other:?}: expected none, nf4, fp4, int4, int8, q8_0 or q4_k")),
        })
    }
}

impl std::fmt::Display for QuantizeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        })
    }
}

/// The group size of the GPTQ-style targets for a layer of `cols` inputs.
pub(crate) fn group_for(cols: usize) -> Option<usize> {
    [128, 64, 32].into_iter().find(|g| cols.is_multiple_of(*g))
}

/// Quantises one `[rows, cols]` weight stored as `bytes` of `kind` (in
/// natural input order) to `target`: the new kind and bytes.
pub fn quantize(
    target: QuantizeTarget,
    kind: WeightKind,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<(WeightKind, Vec<u8>), String> {
    if target == QuantizeTarget::None {
        return Ok((kind, bytes.to_vec()));
    }
    let mut w = vec![0f32; rows * cols];
    dequantize(kind, bytes, &mut w).map_err(|e| e.to_string())?;
    quantize_values(target, kind, &w, rows, cols)
}

/// Quantises the `[rows, cols]` values `w` (natural input order), which were
/// stored as `from`, to `target` (not `None`): the new kind and bytes.
pub fn quantize_values(
    target: QuantizeTarget,
    from: WeightKind,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(WeightKind, Vec<u8>), String> {
    if !matches!(from, WeightKind::F32 | WeightKind::F16 | WeightKind::BF16) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "--quantize {target} requantises weights that are already {from:?} \
                 (dequantised, then quantised again: both roundings count)"
            );
        }
    }
    if w.len() != rows * cols {
        return Err(format!("{} values for a [{rows}, {cols}] weight", w.len()));
    }
    match target {
        QuantizeTarget::None => Err("no quantisation target given".into()),
        QuantizeTarget::Nf4 => Ok((WeightKind::Nf4, bnb::quantize(WeightKind::Nf4, w, cols)?)),
        QuantizeTarget::Fp4 => Ok((WeightKind::Fp4, bnb::quantize(WeightKind::Fp4, w, cols)?)),
        QuantizeTarget::Int4 | QuantizeTarget::Int8 => {
            let (bits, grid) = if target == QuantizeTarget::Int4 {
                (4, gptq::RtnGrid::Asymmetric)
            } else {
                (8, gptq::RtnGrid::Symmetric)
            };
            let group = group_for(cols).ok_or_else(|| format!("{cols} inputs is not a multiple of 32"))?;
            let r = gptq::quantize_rtn(bits, grid, w, rows, cols, group)?.rewrite()?;
            Ok((r.kind, r.bytes))
        }
        QuantizeTarget::Q8_0 => Ok((WeightKind::Q8_0, gguf_quantize::quantize_q8_0(w, cols)?)),
        QuantizeTarget::Q4K if cols.is_multiple_of(gguf_quantize::QK_K) => {
            Ok((WeightKind::Q4K, gguf_quantize::quantize_q4_k(w, cols)?))
        }
        QuantizeTarget::Q4K => Ok((WeightKind::Q5_0, gguf_quantize::quantize_q5_0(w, cols)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_refuse_clearly() {
        assert_eq!("nf4".parse::<QuantizeTarget>(), Ok(QuantizeTarget::Nf4));
        assert_eq!("q8_0".parse::<QuantizeTarget>(), Ok(QuantizeTarget::Q8_0));
        assert!("gptq".parse::<QuantizeTarget>().unwrap_err().contains("expected none"));
        for t in ["none", "nf4", "fp4", "int4", "int8", "q8_0", "q4_k"] {
            assert_eq!(t.parse::<QuantizeTarget>().unwrap().to_string(), t);
        }
    }

    #[test]
    fn every_target_stays_within_its_step() {
        let (rows, cols) = (3, 256);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (t, step) in [
            (QuantizeTarget::Nf4, 0.5 * 0.32),
            (QuantizeTarget::Fp4, 0.5 * 0.34),
            // Half a step of the group's range (at most twice its largest |w|).
            (QuantizeTarget::Int4, 0.5 * 2.0 / 15.0 * 1.01),
            // Plus the f16 rounding of the scale, up to 128 steps away from zero.
            (QuantizeTarget::Int8, 0.57 * 2.0 / 255.0),
            (QuantizeTarget::Q8_0, 0.5 / 127.0 * 1.01),
            // 256 inputs: Q4_K (16 levels, 6-bit scales); the case of 96 is Q5_0 below.
            (QuantizeTarget::Q4K, 0.6 / 15.0 * 2.0),
        ] {
            let (kind, q) = quantize(t, WeightKind::F32, &bytes, rows, cols).unwrap();
            let mut back = vec![0f32; rows * cols];
            dequantize(kind, &q, &mut back).unwrap();
            let amax = 0.5f32;
            for (a, b) in back.iter().zip(&w) {
                assert!((a - b).abs() <= step * amax + 1e-6, "{t}: {a} vs {b}");
            }
        }
        let (kind, _) = quantize(QuantizeTarget::Q4K, WeightKind::F32, &bytes[..96 * 4], 1, 96).unwrap();
        assert_eq!(kind, WeightKind::Q5_0, "inputs not a multiple of 256 fall back to Q5_0");
        // Requantising: a Q8_0 block of zeros stays zeros.
        let (kind, q) = quantize(QuantizeTarget::Nf4, WeightKind::Q8_0, &[0; 68], 1, 64).unwrap();
        assert_eq!((kind, q.len()), (WeightKind::Nf4, 36));
    }
}
