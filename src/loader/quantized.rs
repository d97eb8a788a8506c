//! Reading one quantised linear layer out of an HF safetensors checkpoint
//! (GPTQ, AWQ, bitsandbytes 4-bit) into a [`HostWeight`] the backends take.
//!
//! Every tensor's dtype and shape is checked against the others and against
//! the config before a byte is unpacked, so a shard that contradicts its
//! config is refused with the tensor's name, never read past its end.

use std::sync::Arc;

use crate::backend::{HostWeight, WeightBytes};
use crate::quant::bnb::{self, Absmax};
use crate::quant::ggml::WeightKind;
use crate::quant::gptq::{self, GroupCodes};
use crate::quant::hf_config::{Bnb4Type, HfQuant};

use super::safetensors::{SafetensorsModel, StDtype, TensorView};

/// Whether `prefix` (e.g. `model.layers.0.self_attn.q_proj`) names a module
/// the checkpoint left unquantised.
fn skipped(quant: &HfQuant, prefix: &str) -> bool {
    let list: &[String] = match quant {
        HfQuant::Awq(c) => &c.modules_to_not_convert,
        HfQuant::Bnb4(c) => &c.skip_modules,
        HfQuant::Gptq(_) => &[],
    };
    list.iter().any(|m| prefix == m || prefix.ends_with(&format!(".{m}")) || prefix.contains(&format!("{m}.")))
}

/// The layer `prefix` as a quantised weight, or `None` when the checkpoint
/// stores it as plain floats (`prefix.weight` of a float dtype).
pub fn linear(m: &SafetensorsModel, quant: &HfQuant, prefix: &str) -> Result<Option<HostWeight>, String> {
    let float_weight = m.tensor(&format!("{prefix}.weight")).filter(|t| is_float(t.dtype));
    let marker = match quant {
        HfQuant::Gptq(_) | HfQuant::Awq(_) => "qweight",
        HfQuant::Bnb4(_) => "weight",
    };
    // Absent altogether (a tied lm_head), plain floats, or left unquantised.
    if float_weight.is_some() || skipped(quant, prefix) || m.tensor(&format!("{prefix}.{marker}")).is_none() {
        return Ok(None);
    }
    match quant {
        HfQuant::Gptq(c) => {
            let qweight = tensor(m, prefix, "qweight", &[StDtype::I32, StDtype::U32], 2)?;
            let scales = tensor(m, prefix, "scales", &[StDtype::F16, StDtype::BF16, StDtype::F32], 2)?;
            let qzeros = tensor(m, prefix, "qzeros", &[StDtype::I32, StDtype::U32], 2)?;
            let n_out = qweight.shape[1];
            let per = 32 / c.bits as usize;
            let k_in = qweight.shape[0] * per;
            let g_idx = match m.tensor(&format!("{prefix}.g_idx")) {
                Some(t) => {
                    expect(prefix, "g_idx", &t, &[StDtype::I32, StDtype::U32], 1)?;
                    if t.shape[0] != k_in {
                        return Err(format!("{prefix}.g_idx has {} rows, qweight packs {k_in} inputs", t.shape[0]));
                    }
                    Some(gptq::words(t.data))
                }
                None if c.desc_act => return Err(format!("{prefix}.g_idx is missing but desc_act is true")),
                None => None,
            };
            let groups = k_in.div_ceil(c.group_size.unwrap_or(k_in).max(1));
            if scales.shape != [groups, n_out] {
                return Err(format!(
                    "{prefix}.scales has shape {:?}, expected [{groups}, {n_out}] for group size {:?}",
                    scales.shape, c.group_size
                ));
            }
            if qzeros.shape != [groups, n_out / per] {
                return Err(format!(
                    "{prefix}.qzeros has shape {:?}, expected [{groups}, {}]",
                    qzeros.shape,
                    n_out / per
                ));
            }
            // desc_act: g_idx decides each row's group; the file's own g_idx is
            // the truth even when it is trivial.
            let codes = gptq::unpack_gptq(
                c.bits,
                c.group_size,
                c.v1,
                n_out,
                k_in,
                &gptq::words(qweight.data),
                &gptq::words(qzeros.data),
                floats(&scales),
                g_idx,
            )
            .map_err(|e| format!("{prefix}: {e}"))?;
            rewritten(prefix, &codes).map(Some)
        }
        HfQuant::Awq(c) => {
            let qweight = tensor(m, prefix, "qweight", &[StDtype::I32, StDtype::U32], 2)?;
            let qzeros = tensor(m, prefix, "qzeros", &[StDtype::I32, StDtype::U32], 2)?;
            let scales = tensor(m, prefix, "scales", &[StDtype::F16, StDtype::BF16, StDtype::F32], 2)?;
            let (k_in, n_out) = (qweight.shape[0], qweight.shape[1] * 8);
            let groups = k_in / c.group_size.max(1);
            if scales.shape != [groups, n_out] || qzeros.shape != [groups, n_out / 8] {
                return Err(format!(
                    "{prefix}: scales {:?} / qzeros {:?} do not match qweight {:?} with group size {}",
                    scales.shape, qzeros.shape, qweight.shape, c.group_size
                ));
            }
            let codes = gptq::unpack_awq(
                c.group_size,
                n_out,
                k_in,
                &gptq::words(qweight.data),
                &gptq::words(qzeros.data),
                floats(&scales),
            )
            .map_err(|e| format!("{prefix}: {e}"))?;
            rewritten(prefix, &codes).map(Some)
        }
        HfQuant::Bnb4(c) => bnb_linear(m, c.quant_type, c.double_quant, prefix).map(Some),
    }
}

fn is_float(d: StDtype) -> bool {
    matches!(d, StDtype::F32 | StDtype::F16 | StDtype::BF16)
}

fn tensor<'a>(
    m: &'a SafetensorsModel,
    prefix: &str,
    suffix: &str,
    dtypes: &[StDtype],
    dims: usize,
) -> Result<TensorView<'a>, String> {
    let t = m.tensor(&format!("{prefix}.{suffix}")).ok_or_else(|| format!("{prefix}.{suffix} is missing"))?;
    expect(prefix, suffix, &t, dtypes, dims)?;
    Ok(t)
}

fn expect(prefix: &str, suffix: &str, t: &TensorView<'_>, dtypes: &[StDtype], dims: usize) -> Result<(), String> {
    if !dtypes.contains(&t.dtype) {
        return Err(format!("{prefix}.{suffix} has dtype {:?}, expected one of {dtypes:?}", t.dtype));
    }
    if t.shape.len() != dims {
        return Err(format!("{prefix}.{suffix} has shape {:?}, expected {dims} dimensions", t.shape));
    }
    Ok(())
}

/// A float tensor's values as f32 (its dtype was checked by `tensor`/`expect`).
fn floats(t: &TensorView<'_>) -> Vec<f32> {
    t.to_f32().unwrap_or_default()
}

fn rewritten(prefix: &str, codes: &GroupCodes) -> Result<HostWeight, String> {
    let r = codes.rewrite().map_err(|e| format!("{prefix}: {e}"))?;
    let mut w =
        HostWeight::new(format!("{prefix}.qweight"), r.kind, codes.n_out, codes.k_in, WeightBytes::from_vec(r.bytes));
    w.input_perm = r.input_perm.map(Arc::from);
    Ok(w)
}

/// The JSON that bitsandbytes stores next to a 4-bit weight.
#[derive(serde::Deserialize)]
struct QuantState {
    quant_type: String,
    blocksize: usize,
    shape: Vec<usize>,
    #[serde(default)]
    nested_blocksize: Option<usize>,
    #[serde(default)]
    nested_offset: Option<f64>,
}

fn bnb_linear(m: &SafetensorsModel, ty: Bnb4Type, double_quant: bool, prefix: &str) -> Result<HostWeight, String> {
    let name = format!("{prefix}.weight");
    let tname = match ty {
        Bnb4Type::Nf4 => "nf4",
        Bnb4Type::Fp4 => "fp4",
    };
    let kind = match ty {
        Bnb4Type::Nf4 => WeightKind::Nf4,
        Bnb4Type::Fp4 => WeightKind::Fp4,
    };
    let packed = m.tensor(&name).ok_or_else(|| format!("{name} is missing"))?;
    if packed.dtype != StDtype::U8 {
        return Err(format!("{name} has dtype {:?}, expected U8 (packed 4-bit)", packed.dtype));
    }
    let state_name = format!("{name}.quant_state.bitsandbytes__{tname}");
    let state = m.tensor(&state_name).ok_or_else(|| format!("{state_name} is missing (is the file {tname}?)"))?;
    let state: QuantState =
        serde_json::from_slice(state.data).map_err(|e| format!("{state_name} is not bitsandbytes' JSON: {e}"))?;
    if state.quant_type != tname {
        return Err(format!("{state_name} says quant_type {}", state.quant_type));
    }
    let [rows, cols] = state.shape[..] else {
        return Err(format!("{state_name}: shape {:?} is not 2-D", state.shape));
    };
    let quant_map = m.tensor(&format!("{name}.quant_map")).ok_or_else(|| format!("{name}.quant_map is missing"))?;
    let want = bnb::code(kind).expect("4-bit kind");
    if quant_map.dtype != StDtype::F32 || floats(&quant_map) != want.as_slice() {
        return Err(format!("{name}.quant_map is not bitsandbytes' {tname} code"));
    }
    let absmax_t = m.tensor(&format!("{name}.absmax")).ok_or_else(|| format!("{name}.absmax is missing"))?;
    let absmax = if double_quant || absmax_t.dtype == StDtype::U8 {
        if absmax_t.dtype != StDtype::U8 {
            return Err(format!("{name}.absmax has dtype {:?}; double quantisation stores U8", absmax_t.dtype));
        }
        let nested = m
            .tensor(&format!("{name}.nested_absmax"))
            .filter(|t| t.dtype == StDtype::F32)
            .ok_or_else(|| format!("{name}.nested_absmax (F32) is missing"))?;
        let nested_map = m
            .tensor(&format!("{name}.nested_quant_map"))
            .filter(|t| t.dtype == StDtype::F32)
            .ok_or_else(|| format!("{name}.nested_quant_map (F32) is missing"))?;
        Absmax::Nested {
            codes: absmax_t.data,
            nested_absmax: floats(&nested),
            nested_code: floats(&nested_map),
            nested_blocksize: state.nested_blocksize.ok_or_else(|| format!("{state_name} lacks nested_blocksize"))?,
            offset: state.nested_offset.ok_or_else(|| format!("{state_name} lacks nested_offset"))? as f32,
        }
    } else if absmax_t.dtype == StDtype::F32 {
        Absmax::Plain(floats(&absmax_t))
    } else {
        return Err(format!("{name}.absmax has dtype {:?}, expected F32", absmax_t.dtype));
    };
    let bytes =
        bnb::to_rows(kind, rows, cols, state.blocksize, packed.data, &absmax).map_err(|e| format!("{name}: {e}"))?;
    Ok(HostWeight::new(name, kind, rows, cols, WeightBytes::from_vec(bytes)))
}
