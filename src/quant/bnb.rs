//! bitsandbytes 4-bit checkpoints (NF4 / FP4, FORMATS.md §3) rewritten into
//! [`WeightKind::Nf4`] / [`WeightKind::Fp4`] rows.
//!
//! The file packs the row-major `[N, K]` weight as one flat run of nibbles in
//! blocks of `blocksize` elements, each with an absmax (f32, or 8-bit under
//! double quantisation). tandem keeps the nibbles as they are and puts the
//! block's f32 absmax in front of every 64 elements, so a row is whole blocks
//! and the kernels see one scale per 64 values: 36 bytes per 64 weights
//! (4.5 bits), against 4.13 bits for a double-quantised file.

use super::ggml::WeightKind;

/// bitsandbytes' NF4 code (`functional.py::get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 code: the e2m1 values in bit-pattern order, divided by
/// their largest magnitude (12) in f32 as `get_4bit_type("fp4")` does. Its
/// "negative zero" (index 8) is Python's integer `-0`, so a plain +0.
pub const FP4_CODE: [f32; 16] = {
    let raw = [0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = raw[i] / 12.0;
        i += 1;
    }
    out
};

/// Elements per tandem block (one absmax each).
pub const BLOCK: usize = 64;

/// The code table of a 4-bit kind.
pub fn code(kind: WeightKind) -> Option<&'static [f32; 16]> {
    match kind {
        WeightKind::Nf4 => Some(&NF4_CODE),
        WeightKind::Fp4 => Some(&FP4_CODE),
        _ => None,
    }
}

/// Dequantises one 36-byte block into 64 floats: `code[nibble] · absmax` in
/// f32, as bitsandbytes' `dequantize_4bit` computes before casting to the
/// model's dtype.
pub fn dequant_block(code: &[f32; 16], b: &[u8], y: &mut [f32]) {
    let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, &byte) in b[4..36].iter().enumerate() {
        y[2 * j] = code[(byte >> 4) as usize] * absmax;
        y[2 * j + 1] = code[(byte & 0xF) as usize] * absmax;
    }
}

/// The per-block scales of a file, as stored.
pub enum Absmax<'a> {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantisation: an 8-bit code per block into `nested_code`, scaled
    /// by the nested absmax of its group of `nested_blocksize` and offset.
    Nested { codes: &'a [u8], nested_absmax: Vec<f32>, nested_code: Vec<f32>, nested_blocksize: usize, offset: f32 },
}

impl Absmax<'_> {
    fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { codes, .. } => codes.len(),
        }
    }
    /// The f32 absmax of block `b`, computed as bitsandbytes does
    /// (`dequantize_blockwise`, then `+= offset`; two f32 roundings, no FMA).
    fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested { codes, nested_absmax, nested_code, nested_blocksize, offset } => {
                let scaled = nested_code[codes[b] as usize] * nested_absmax[b / nested_blocksize];
                scaled + offset
            }
        }
    }
}

/// Rewrites a bitsandbytes weight `[rows, cols]` (packed nibbles of the
/// row-major matrix, `blocksize` elements per absmax) into tandem rows of
/// `kind`. Every size is checked before anything is read.
pub fn to_rows(
    kind: WeightKind,
    rows: usize,
    cols: usize,
    blocksize: usize,
    packed: &[u8],
    absmax: &Absmax<'_>,
) -> Result<Vec<u8>, String> {
    if code(kind).is_none() {
        return Err(format!("{kind:?} is not a bitsandbytes kind"));
    }
    if blocksize == 0 || !blocksize.is_multiple_of(BLOCK) {
        return Err(format!("blocksize {blocksize} is not supported (tandem needs a multiple of {BLOCK})"));
    }
    if !cols.is_multiple_of(BLOCK) {
        return Err(format!("{cols} input features is not a multiple of {BLOCK}"));
    }
    let n = rows.checked_mul(cols).ok_or("shape overflows")?;
    if packed.len() != n.div_ceil(2) {
        return Err(format!("{} packed bytes for [{rows}, {cols}], expected {}", packed.len(), n.div_ceil(2)));
    }
    let file_blocks = n.div_ceil(blocksize);
    if absmax.len() != file_blocks {
        return Err(format!("{} absmax values for {file_blocks} blocks of {blocksize}", absmax.len()));
    }
    if let Absmax::Nested { nested_absmax, nested_code, nested_blocksize, .. } = absmax {
        if *nested_blocksize == 0 || nested_absmax.len() != file_blocks.div_ceil(*nested_blocksize) {
            return Err(format!(
                "{} nested absmax values for {file_blocks} blocks in groups of {nested_blocksize}",
                nested_absmax.len()
            ));
        }
        if nested_code.len() != 256 {
            return Err(format!("nested_quant_map has {} entries, expected 256", nested_code.len()));
        }
    }
    let ours = n / BLOCK;
    let mut out = Vec::with_capacity(ours * 36);
    for b in 0..ours {
        let scale = absmax.get(b * BLOCK / blocksize);
        out.extend_from_slice(&scale.to_le_bytes());
        out.extend_from_slice(&packed[b * 32..b * 32 + 32]);
    }
    Ok(out)
}

/// Quantises `[rows, cols]` f32 weights the way `bitsandbytes.quantize_4bit`
/// does without double quantisation (its CPU kernel, `backends/default/ops.py`):
/// blocks of 64, `scaled = clamp(w · (1 / absmax), -1, 1)`, the bucket among
/// the midpoints of the sorted code (`torch.bucketize`: a value on a midpoint
/// goes to the lower bucket), mapped back to the code's index (FP4's code is
/// not sorted; its two zeros sort index 0 first). Straight into tandem rows;
/// used by `--quantize nf4|fp4`.
pub fn quantize(kind: WeightKind, w: &[f32], cols: usize) -> Result<Vec<u8>, String> {
    let code = code(kind).ok_or_else(|| format!("{kind:?} is not a bitsandbytes kind"))?;
    if !cols.is_multiple_of(BLOCK) || !w.len().is_multiple_of(cols) {
        return Err(format!("{cols} input features is not a multiple of {BLOCK}"));
    }
    let mut order: Vec<u8> = (0..16).collect();
    order.sort_by(|&a, &b| code[a as usize].total_cmp(&code[b as usize]));
    let midpoints: Vec<f32> = order.windows(2).map(|p| (code[p[0] as usize] + code[p[1] as usize]) / 2.0).collect();
    let nibble = |scaled: f32| -> u8 { order[midpoints.iter().filter(|&&m| m < scaled).count()] };
    let mut out = Vec::with_capacity(w.len() / BLOCK * 36);
    for block in w.chunks_exact(BLOCK) {
        let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        out.extend_from_slice(&absmax.to_le_bytes());
        let inv = 1.0 / absmax.max(1e-38);
        let scaled = |v: f32| (v * inv).clamp(-1.0, 1.0);
        for pair in block.chunks_exact(2) {
            out.push((nibble(scaled(pair[0])) << 4) | nibble(scaled(pair[1])));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_code_is_the_normalised_e2m1_table() {
        assert_eq!(FP4_CODE[3], 1.0);
        assert_eq!(FP4_CODE[1], 0.0625f32 / 12.0);
        assert_eq!(FP4_CODE[11], -1.0);
        assert_eq!(FP4_CODE[8].to_bits(), 0, "bitsandbytes' -0 entry is the integer -0");
    }

    #[test]
    fn rows_repeat_a_large_blocks_absmax_and_keep_the_nibbles() {
        // 2 rows x 128 columns, one file block of 256: both rows use absmax 2.
        let packed: Vec<u8> = (0..128u32).map(|i| (i * 37 % 256) as u8).collect();
        let rows = to_rows(WeightKind::Nf4, 2, 128, 256, &packed, &Absmax::Plain(vec![2.0])).unwrap();
        assert_eq!(rows.len(), 4 * 36);
        let mut y = vec![0f32; 64];
        dequant_block(&NF4_CODE, &rows[36..72], &mut y);
        assert_eq!(y[0], NF4_CODE[(packed[32] >> 4) as usize] * 2.0);
        assert_eq!(y[1], NF4_CODE[(packed[32] & 15) as usize] * 2.0);
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        let a = Absmax::Plain(vec![1.0; 2]);
        assert!(to_rows(WeightKind::Nf4, 2, 64, 64, &[0; 63], &a).is_err());
        assert!(to_rows(WeightKind::Nf4, 2, 64, 64, &[0; 64], &Absmax::Plain(vec![1.0])).is_err());
        assert!(to_rows(WeightKind::Nf4, 2, 64, 32, &[0; 64], &a).is_err());
        assert!(to_rows(WeightKind::Nf4, 1, 96, 32, &[0; 48], &a).is_err());
        assert!(to_rows(WeightKind::Q4_0, 2, 64, 64, &[0; 64], &a).is_err());
        let nested = Absmax::Nested {
            codes: &[0, 1],
            nested_absmax: vec![],
            nested_code: vec![0.0; 256],
            nested_blocksize: 256,
            offset: 0.0,
        };
        assert!(to_rows(WeightKind::Nf4, 2, 64, 64, &[0; 64], &nested).is_err());
    }

    #[test]
    fn quantize_round_trips_code_values() {
        let w: Vec<f32> = (0..128).map(|i| NF4_CODE[i % 16] * 3.0).collect();
        let q = quantize(WeightKind::Nf4, &w, 128).unwrap();
        let mut y = vec![0f32; 64];
        for (b, chunk) in q.chunks_exact(36).enumerate() {
            dequant_block(&NF4_CODE, chunk, &mut y);
            assert_eq!(&y[..], &w[b * 64..b * 64 + 64]);
        }
    }
}
