//! Dequantisation of weight-row chunks into f32 tiles for the matmul kernel.
//!
//! Every kind is expanded block by block into an f32 scratch tile that stays in
//! L1; the tile then feeds an f32 FMA micro-kernel. Activations are never
//! quantised, so results follow the f32 reference (transformers on the
//! dequantised weights) to rounding. The AVX-512 paths compute each element with
//! the same operations, in the same order, as the reference dequantiser
//! (`quant::ggml::dequantize`), so they agree bit for bit; other machines use the
//! reference itself.

use crate::quant::ggml::{self, GgmlType};

use super::Isa;

/// Expands elements `[k0, k0 + len)` of one weight row (`row` = the row's bytes)
/// into `out[..len]`. `k0` and `len` are multiples of the kind's block size,
/// except that `len` may end at the row's end.
pub fn dequant_row_chunk(isa: Isa, kind: GgmlType, row: &[u8], k0: usize, out: &mut [f32]) {
    let bs = kind.block_size();
    let ts = kind.type_size();
    debug_assert_eq!(k0 % bs, 0);
    let nblocks = out.len().div_ceil(bs);
    let bytes = &row[(k0 / bs) * ts..(k0 / bs + nblocks) * ts];
    match kind {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return;
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
            return;
        }
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: Isa::Avx512 is only chosen after runtime detection of avx512f/bw.
        let done = unsafe { avx512::dequant(kind, bytes, out) };
        if done {
            return;
        }
    }
    let _ = isa;
    // Reference path: cannot fail here since sizes were validated at load.
    if ggml::dequantize(kind, bytes, out).is_err() {
        out.fill(f32::NAN);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::GgmlType;
    use crate::quant::ggml::get_scale_min_k4;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16(b: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*b, *b.add(1)]) as i32)))
    }

    /// Does `kind` have a fast decoder here?
    pub fn supported(kind: GgmlType) -> bool {
        !matches!(kind, GgmlType::F32 | GgmlType::BF16)
    }

    /// Decodes `nblocks` whole blocks starting at `bytes`, calling
    /// `emit(group, values)` for every 16-element group in increasing element
    /// order (`group` counts from the first block). Each value is computed with
    /// the reference dequantiser's operations in its order, so it is bit-exact;
    /// the increasing order lets a caller accumulate straight from registers with
    /// the same summation order as a stored tile.
    #[inline(always)]
    pub unsafe fn decode<F: FnMut(usize, __m512)>(kind: GgmlType, bytes: *const u8, nblocks: usize, mut emit: F) {
        let m4 = _mm_set1_epi8(0x0F);
        match kind {
            GgmlType::Q8_0 => {
                for b in 0..nblocks {
                    let blk = bytes.add(34 * b);
                    let d = _mm512_set1_ps(f16(blk));
                    for h in 0..2 {
                        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2 + 16 * h) as *const __m128i));
                        emit(2 * b + h, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
                    }
                }
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let q5 = kind == GgmlType::Q5_0;
                let (ts, qs_at, bias) = if q5 { (22, 6, 16) } else { (18, 2, 8) };
                let biasv = _mm512_set1_epi32(bias);
                let sixteen = _mm512_set1_epi32(16);
                for b in 0..nblocks {
                    let blk = bytes.add(ts * b);
                    let d = _mm512_set1_ps(f16(blk));
                    let raw = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
                    let mut lo = _mm512_cvtepu8_epi32(_mm_and_si128(raw, m4));
                    let mut hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
                    if q5 {
                        let h = (blk.add(2) as *const u32).read_unaligned();
                        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi32(h as u16, sixteen));
                        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi32((h >> 16) as u16, sixteen));
                    }
                    emit(2 * b, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, biasv)), d));
                    emit(2 * b + 1, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, biasv)), d));
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let q5 = kind == GgmlType::Q5K;
                let (ts, qs_at) = if q5 { (176, 48) } else { (144, 16) };
                let zero = _mm_setzero_si128();
                let sixteen = _mm_set1_epi8(16);
                for b in 0..nblocks {
                    let blk = bytes.add(ts * b);
                    let d = f16(blk);
                    let dmin = f16(blk.add(2));
                    let scales = std::slice::from_raw_parts(blk.add(4), 12);
                    // Sub-block j covers elements 32j..32j+32 (groups 2j, 2j+1).
                    for j in 0..8 {
                        let (sc, m) = get_scale_min_k4(j, scales);
                        let dj = _mm512_set1_ps(d * sc as f32);
                        let mj = _mm512_set1_ps(dmin * m as f32);
                        let (c, high) = (j / 2, j % 2 == 1);
                        for l in [0usize, 16] {
                            let raw = _mm_loadu_si128(blk.add(qs_at + 32 * c + l) as *const __m128i);
                            let mut q =
                                if high { _mm_and_si128(_mm_srli_epi16(raw, 4), m4) } else { _mm_and_si128(raw, m4) };
                            if q5 {
                                let h = _mm_loadu_si128(blk.add(16 + l) as *const __m128i);
                                let bit = _mm_set1_epi8((1u8 << j) as i8);
                                let unset = _mm_cmpeq_epi8(_mm_and_si128(h, bit), zero);
                                q = _mm_add_epi8(q, _mm_andnot_si128(unset, sixteen));
                            }
                            let qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
                            emit(16 * b + 2 * j + l / 16, _mm512_sub_ps(_mm512_mul_ps(dj, qf), mj));
                        }
                    }
                }
            }
            GgmlType::Q6K => {
                let m2 = _mm_set1_epi8(3);
                let off = _mm512_set1_epi32(32);
                for b in 0..nblocks {
                    let blk = bytes.add(210 * b);
                    let d = f16(blk.add(208));
                    // Element 128h + 32q + l (q = quarter, l < 32): low bits from
                    // ql[64h + l + 32(q%2)] (nibble q/2), high bits from
                    // qh[32h + l] >> 2q, scale sc[8h + 2q + l/16].
                    for h in 0..2 {
                        for q in 0..4 {
                            for l in [0usize, 16] {
                                let ql = _mm_loadu_si128(blk.add(64 * h + l + 32 * (q % 2)) as *const __m128i);
                                let lo = if q >= 2 { _mm_srli_epi16(ql, 4) } else { ql };
                                let qh = _mm_loadu_si128(blk.add(128 + 32 * h + l) as *const __m128i);
                                let hb = match q {
                                    0 => qh,
                                    1 => _mm_srli_epi16(qh, 2),
                                    2 => _mm_srli_epi16(qh, 4),
                                    _ => _mm_srli_epi16(qh, 6),
                                };
                                let v = _mm_or_si128(_mm_and_si128(lo, m4), _mm_slli_epi16(_mm_and_si128(hb, m2), 4));
                                let sc = *blk.add(192 + 8 * h + 2 * q + l / 16) as i8;
                                let scale = _mm512_set1_ps(d * sc as f32);
                                let vf = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(v), off));
                                emit(16 * b + 8 * h + 2 * q + l / 16, _mm512_mul_ps(scale, vf));
                            }
                        }
                    }
                }
            }
            GgmlType::F16 => {
                for g in 0..nblocks / 16 {
                    let h = _mm256_loadu_si256(bytes.add(32 * g) as *const __m256i);
                    emit(g, _mm512_cvtph_ps(h));
                }
            }
            GgmlType::F32 | GgmlType::BF16 => {}
        }
    }

    /// Dequantises whole blocks into `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn dequant(kind: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
        if !supported(kind) {
            return false;
        }
        let n = out.len();
        if kind == GgmlType::F16 && !n.is_multiple_of(16) {
            return false;
        }
        let nblocks = if kind == GgmlType::F16 { n } else { n / kind.block_size() };
        let o = out.as_mut_ptr();
        decode(kind, bytes.as_ptr(), nblocks, |g, v| _mm512_storeu_ps(o.add(16 * g), v));
        true
    }
}
