//! Quantised projections in the Hugging Face layouts transformers loads:
//! GPTQ (4-bit, symmetric, v1 zero points, no act-order) as gptqmodel packs
//! it, and bitsandbytes NF4/FP4 as transformers saves a `load_in_4bit` model.
//! The codes are the same as `--quantize int4|nf4|fp4` computes on load.

use serde_json::{json, Value};

use crate::loader::safetensors::StDtype;
use crate::quant::ggml::WeightKind;
use crate::quant::{bnb, gptq};

/// How the projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HfQuant {
    /// Round-to-nearest symmetric 4-bit with this group size.
    Gptq { group: usize },
    /// bitsandbytes blockwise 4-bit (blocks of 64), `Nf4` or `Fp4`.
    Bnb(WeightKind),
}

/// A tensor of the output file.
pub(super) struct Named {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// `config.json`'s `quantization_config`; `dtype` is the torch name of the
/// unquantised tensors' dtype (bitsandbytes' compute dtype).
pub(super) fn quantization_config(q: HfQuant, dtype: &str) -> Value {
    match q {
        HfQuant::Gptq { group } => json!({
            "bits": 4,
            "checkpoint_format": "gptq",
            "desc_act": false,
            "format": "gptq",
            "group_size": group,
            "lm_head": false,
            "meta": {"quantizer": [format!("tandem:{}", env!("CARGO_PKG_VERSION"))]},
            "method": "gptq",
            "pack_dtype": "int32",
            "quant_method": "gptq",
            "sym": false,
        }),
        HfQuant::Bnb(kind) => json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": bnb_name(kind),
            "bnb_4bit_use_double_quant": false,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": null,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        }),
    }
}

fn bnb_name(kind: WeightKind) -> &'static str {
    if kind == WeightKind::Fp4 {
        "fp4"
    } else {
        "nf4"
    }
}

/// The tensors that stand for the `[rows, cols]` projection `{prefix}.weight`.
pub(super) fn projection(
    q: HfQuant,
    prefix: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    dtype: &str,
) -> Result<Vec<Named>, String> {
    match q {
        HfQuant::Gptq { group } => gptq_tensors(prefix, w, rows, cols, group),
        HfQuant::Bnb(kind) => bnb_tensors(kind, prefix, w, rows, cols, dtype),
    }
}

fn i32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// GPTQ v1: `qweight` int32 `[cols/8, rows]` (8 codes along the input, low
/// nibble first), `qzeros` int32 `[groups, rows/8]` holding zero − 1, `scales`
/// f16 `[groups, rows]`, `g_idx` int32 `[cols]`.
fn gptq_tensors(prefix: &str, w: &[f32], rows: usize, cols: usize, group: usize) -> Result<Vec<Named>, String> {
    if !rows.is_multiple_of(8) || !cols.is_multiple_of(8) {
        return Err(format!("GPTQ packs 8 codes per int32: [{rows}, {cols}] is not a multiple of 8 both ways"));
    }
    let c = gptq::quantize_rtn(4, gptq::RtnGrid::Asymmetric, w, rows, cols, group)?;
    let mut qweight = vec![0u32; cols / 8 * rows];
    for n in 0..rows {
        for k in 0..cols {
            qweight[(k / 8) * rows + n] |= u32::from(c.q[n * cols + k]) << (4 * (k % 8));
        }
    }
    let mut qzeros = vec![0u32; c.groups * rows / 8];
    for g in 0..c.groups {
        for n in 0..rows {
            let stored = (c.z[g * rows + n] - 1) as u32 & 0xF;
            qzeros[g * rows / 8 + n / 8] |= stored << (4 * (n % 8));
        }
    }
    let scales: Vec<u8> = c.s.iter().flat_map(|&s| half::f16::from_f32(s).to_le_bytes()).collect();
    let g_idx: Vec<u32> = c.g_idx.clone();
    let t =
        |suffix: &str, dtype, shape: Vec<usize>, data| Named { name: format!("{prefix}.{suffix}"), dtype, shape, data };
    Ok(vec![
        t("qweight", StDtype::I32, vec![cols / 8, rows], i32_bytes(&qweight)),
        t("qzeros", StDtype::I32, vec![c.groups, rows / 8], i32_bytes(&qzeros)),
        t("scales", StDtype::F16, vec![c.groups, rows], scales),
        t("g_idx", StDtype::I32, vec![cols], i32_bytes(&g_idx)),
    ])
}

/// bitsandbytes: `weight` uint8 `[rows·cols/2, 1]` (two codes a byte, high
/// nibble first), `weight.absmax` f32 per 64 values, `weight.quant_map` (the
/// code table) and `weight.quant_state.bitsandbytes__{nf4,fp4}` (a JSON
/// string as uint8).
fn bnb_tensors(
    kind: WeightKind,
    prefix: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    dtype: &str,
) -> Result<Vec<Named>, String> {
    let blocks = bnb::quantize(kind, w, cols)?;
    let (mut absmax, mut packed) = (Vec::new(), Vec::with_capacity(w.len() / 2));
    for b in blocks.chunks_exact(36) {
        absmax.extend_from_slice(&b[..4]);
        packed.extend_from_slice(&b[4..]);
    }
    let code = bnb::code(kind).expect("a bitsandbytes kind");
    let quant_map: Vec<u8> = code.iter().flat_map(|v| v.to_le_bytes()).collect();
    let name = bnb_name(kind);
    let state =
        json!({"quant_type": name, "blocksize": 64, "dtype": dtype, "shape": [rows, cols]}).to_string().into_bytes();
    let t =
        |suffix: &str, dtype, shape: Vec<usize>, data| Named { name: format!("{prefix}.{suffix}"), dtype, shape, data };
    Ok(vec![
        t("weight", StDtype::U8, vec![packed.len(), 1], packed),
        t("weight.absmax", StDtype::F32, vec![absmax.len() / 4], absmax),
        t("weight.quant_map", StDtype::F32, vec![16], quant_map),
        t(&format!("weight.quant_state.bitsandbytes__{name}"), StDtype::U8, vec![state.len()], state),
    ])
}
