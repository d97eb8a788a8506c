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
mod avx512 {
    use super::GgmlType;
    use crate::quant::ggml::get_scale_min_k4;
    use std::arch::x86_64::*;

    #[inline(always)]
    fn f16(b: &[u8], at: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }

    /// Dequantises whole blocks; returns false for kinds without a fast path.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn dequant(kind: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
        let n = out.len();
        match kind {
            GgmlType::Q8_0 => {
                for (b, blk) in bytes.chunks_exact(34).enumerate() {
                    if b * 32 >= n {
                        break;
                    }
                    let d = _mm512_set1_ps(f16(blk, 0));
                    let p = blk.as_ptr().add(2);
                    for h in 0..2 {
                        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16 * h) as *const __m128i));
                        let y = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                        _mm512_storeu_ps(out.as_mut_ptr().add(b * 32 + 16 * h), y);
                    }
                }
                true
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let q5 = kind == GgmlType::Q5_0;
                let (ts, qs_at, bias) = if q5 { (22, 6, 16) } else { (18, 2, 8) };
                let m4 = _mm_set1_epi8(0x0F);
                let biasv = _mm512_set1_epi32(bias);
                let sixteen = _mm512_set1_epi32(16);
                for (b, blk) in bytes.chunks_exact(ts).enumerate() {
                    if b * 32 >= n {
                        break;
                    }
                    let d = _mm512_set1_ps(f16(blk, 0));
                    let raw = _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i);
                    let mut lo = _mm512_cvtepu8_epi32(_mm_and_si128(raw, m4));
                    let mut hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
                    if q5 {
                        let h = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi32(h as u16, sixteen));
                        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi32((h >> 16) as u16, sixteen));
                    }
                    let o = out.as_mut_ptr().add(b * 32);
                    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, biasv)), d));
                    _mm512_storeu_ps(o.add(16), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, biasv)), d));
                }
                true
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let q5 = kind == GgmlType::Q5K;
                let ts = if q5 { 176 } else { 144 };
                let m4 = _mm_set1_epi8(0x0F);
                let zero = _mm_setzero_si128();
                let sixteen = _mm_set1_epi8(16);
                for (b, blk) in bytes.chunks_exact(ts).enumerate() {
                    let d = f16(blk, 0);
                    let dmin = f16(blk, 2);
                    let scales = &blk[4..16];
                    let (qh, qs) = if q5 { (&blk[16..48], &blk[48..176]) } else { (&blk[0..0], &blk[16..144]) };
                    let y = out.as_mut_ptr().add(b * 256);
                    for c in 0..4 {
                        let (s1, m1) = get_scale_min_k4(2 * c, scales);
                        let (s2, m2) = get_scale_min_k4(2 * c + 1, scales);
                        let d1 = _mm512_set1_ps(d * s1 as f32);
                        let m1 = _mm512_set1_ps(dmin * m1 as f32);
                        let d2 = _mm512_set1_ps(d * s2 as f32);
                        let m2 = _mm512_set1_ps(dmin * m2 as f32);
                        for l in [0usize, 16] {
                            let raw = _mm_loadu_si128(qs.as_ptr().add(32 * c + l) as *const __m128i);
                            let mut lo = _mm_and_si128(raw, m4);
                            let mut hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                            if q5 {
                                let h = _mm_loadu_si128(qh.as_ptr().add(l) as *const __m128i);
                                let u1 = _mm_set1_epi8(1 << (2 * c));
                                let u2 = _mm_set1_epi8((2u8 << (2 * c)) as i8);
                                let is0_1 = _mm_cmpeq_epi8(_mm_and_si128(h, u1), zero);
                                let is0_2 = _mm_cmpeq_epi8(_mm_and_si128(h, u2), zero);
                                lo = _mm_add_epi8(lo, _mm_andnot_si128(is0_1, sixteen));
                                hi = _mm_add_epi8(hi, _mm_andnot_si128(is0_2, sixteen));
                            }
                            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                            _mm512_storeu_ps(y.add(64 * c + l), _mm512_sub_ps(_mm512_mul_ps(d1, lo), m1));
                            _mm512_storeu_ps(y.add(64 * c + 32 + l), _mm512_sub_ps(_mm512_mul_ps(d2, hi), m2));
                        }
                    }
                }
                true
            }
            GgmlType::Q6K => {
                let m4 = _mm_set1_epi8(0x0F);
                let m2 = _mm_set1_epi8(3);
                let off = _mm512_set1_epi32(32);
                for (b, blk) in bytes.chunks_exact(210).enumerate() {
                    let d = f16(blk, 208);
                    let y = out.as_mut_ptr().add(b * 256);
                    for h in 0..2 {
                        let ql = blk.as_ptr().add(64 * h);
                        let qh = blk.as_ptr().add(128 + 32 * h);
                        let sc = &blk[192 + 8 * h..200 + 8 * h];
                        for l in [0usize, 16] {
                            let is = l / 16;
                            let a = _mm_loadu_si128(ql.add(l) as *const __m128i);
                            let bq = _mm_loadu_si128(ql.add(l + 32) as *const __m128i);
                            let hb = _mm_loadu_si128(qh.add(l) as *const __m128i);
                            let hpart = |shift: i32| -> __m128i {
                                let s = match shift {
                                    0 => hb,
                                    2 => _mm_srli_epi16(hb, 2),
                                    4 => _mm_srli_epi16(hb, 4),
                                    _ => _mm_srli_epi16(hb, 6),
                                };
                                _mm_slli_epi16(_mm_and_si128(s, m2), 4)
                            };
                            let quads = [
                                (_mm_or_si128(_mm_and_si128(a, m4), hpart(0)), 0, is),
                                (_mm_or_si128(_mm_and_si128(bq, m4), hpart(2)), 32, is + 2),
                                (_mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m4), hpart(4)), 64, is + 4),
                                (_mm_or_si128(_mm_and_si128(_mm_srli_epi16(bq, 4), m4), hpart(6)), 96, is + 6),
                            ];
                            for (q, at, s) in quads {
                                let scale = _mm512_set1_ps(d * (sc[s] as i8) as f32);
                                let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(q), off));
                                _mm512_storeu_ps(y.add(128 * h + at + l), _mm512_mul_ps(scale, v));
                            }
                        }
                    }
                }
                true
            }
            GgmlType::F16 => {
                let mut i = 0;
                while i + 16 <= n {
                    let h = _mm256_loadu_si256(bytes.as_ptr().add(2 * i) as *const __m256i);
                    _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
                    i += 16;
                }
                for (j, o) in out.iter_mut().enumerate().skip(i) {
                    *o = f16(bytes, 2 * j);
                }
                true
            }
            GgmlType::F32 | GgmlType::BF16 => false,
        }
    }
}
