//! GGUF quantisation as llama.cpp's `llama-quantize` writes it without an
//! importance matrix: Q8_0, Q5_0 and Q4_K (`quantize_row_*_ref` in
//! ggml-quants.c; gguf-py's `quants.py` agrees for Q8_0 and Q5_0).
//!
//! Written to give the same bytes as the reference: every float operation is
//! done in f32 in the reference's order (ggml-base is built without FMA
//! contraction or reassociation), and rounding uses its `nearest_int` (round
//! half to even through the 1.5·2^23 trick). `tests/quantize_targets.rs`
//! checks the bytes against blocks written by libggml itself.

/// Elements per Q4_K super-block.
pub const QK_K: usize = 256;
/// Bytes per Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales and
/// mins, 128 bytes of nibbles.
pub const Q4_K_BYTES: usize = 144;

/// ggml's `nearest_int`: round half to even for |x| < 2^22.
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants` for one 32-element sub-block: the codes in `l`,
/// returns `(scale, -min)` of the best weighted least-squares fit over a
/// small search of inverse scales.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32; 32],
    weights: &[f32; 32],
    l: &mut [u8; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..32 {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, qf) = (weights[i], q as f32);
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..32 {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scale and min of sub-block `j` from a Q4_K `scales` field
/// (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// GGUF Q8_0 (gguf-py `quants.py`): per 32 values `d = max|x| / 127`,
/// `q = round(x / d)` (half away from zero), `d` stored as f16.
pub fn quantize_q8_0(w: &[f32], cols: usize) -> Result<Vec<u8>, String> {
    if !cols.is_multiple_of(32) {
        return Err(format!("{cols} inputs is not a multiple of 32"));
    }
    let mut out = Vec::with_capacity(w.len() / 32 * 34);
    for block in w.chunks_exact(32) {
        let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        out.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(block.iter().map(|&x| if d == 0.0 { 0 } else { (x / d).round() as i8 as u8 }));
    }
    Ok(out)
}

/// GGUF Q5_0 (`quantize_row_q5_0_ref`): per 32 values `d = x_absmax_signed / -16`,
/// codes `min(31, trunc(x/d + 16.5))`; low nibbles of the first and second
/// half share a byte, the fifth bits go to a u32.
pub fn quantize_q5_0(w: &[f32], cols: usize) -> Result<Vec<u8>, String> {
    if !cols.is_multiple_of(32) {
        return Err(format!("{cols} inputs is not a multiple of 32"));
    }
    let mut out = Vec::with_capacity(w.len() / 32 * 22);
    for block in w.chunks_exact(32) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let code = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
        let mut qs = [0u8; 16];
        let mut qh = 0u32;
        for j in 0..16 {
            let (x0, x1) = (code(block[j]), code(block[j + 16]));
            qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
            qh |= (((x0 & 0x10) >> 4) as u32) << j;
            qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
        }
        out.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        out.extend_from_slice(&qh.to_le_bytes());
        out.extend_from_slice(&qs);
    }
    Ok(out)
}

/// Quantises rows of `cols` values (a multiple of 256) to Q4_K blocks.
pub fn quantize_q4_k(w: &[f32], cols: usize) -> Result<Vec<u8>, String> {
    if !cols.is_multiple_of(QK_K) {
        return Err(format!("{cols} inputs is not a multiple of {QK_K} (Q4_K's super-block)"));
    }
    if let Some(bad) = w.iter().find(|v| !v.is_finite() || v.abs() > 1e6) {
        return Err(format!("weight value {bad} cannot be quantised to Q4_K"));
    }
    let mut out = Vec::with_capacity(w.len() / QK_K * Q4_K_BYTES);
    for x in w.chunks_exact(QK_K) {
        out.extend_from_slice(&quantize_block(x.try_into().expect("chunks of QK_K")));
    }
    Ok(out)
}

fn quantize_block(x: &[f32; QK_K]) -> [u8; Q4_K_BYTES] {
    let mut codes = [[0u8; 32]; 8];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32 values");
        let sum_x2 = sub.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + sub[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(15, sub, &weights, &mut codes[j], -1.0, 0.1, 20);
        max_scale = max_scale.max(scales[j]);
        max_min = max_min.max(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // The reference stores nearest_int in a uint8_t before the MIN(63, ..).
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = half::f16::from_f32(max_scale / 63.0);
    let dmin = half::f16::from_f32(max_min / 63.0);
    for (j, sub_codes) in codes.iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for (i, c) in sub_codes.iter_mut().enumerate() {
            *c = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    let mut out = [0u8; Q4_K_BYTES];
    out[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    // 64 values per 32 bytes: the low nibbles hold sub-block 2p, the high 2p+1.
    for p in 0..4 {
        for i in 0..32 {
            out[16 + 32 * p + i] = codes[2 * p][i] | (codes[2 * p + 1][i] << 4);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ggml::{dequantize, WeightKind};

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (14.49, 14), (63.0, 63)] {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }

    #[test]
    fn round_trip_stays_close_and_refuses_bad_input() {
        let w: Vec<f32> = (0..2 * QK_K).map(|i| ((i * 7919 % 1000) as f32 - 400.0) * 1e-3).collect();
        let q = quantize_q4_k(&w, QK_K).unwrap();
        assert_eq!(q.len(), 2 * Q4_K_BYTES);
        let mut back = vec![0f32; w.len()];
        dequantize(WeightKind::Q4K, &q, &mut back).unwrap();
        // 16 levels over a range of 1: a step of 1/15, plus the 6-bit scale rounding.
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() <= 0.6 / 15.0, "{a} vs {b}");
        }
        let zeros = quantize_q4_k(&[0.0; QK_K], QK_K).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
        assert!(quantize_q4_k(&[0.0; 128], 128).unwrap_err().contains("multiple of 256"));
        let mut nan = vec![0.0; QK_K];
        nan[3] = f32::NAN;
        assert!(quantize_q4_k(&nan, QK_K).is_err());
    }
}
