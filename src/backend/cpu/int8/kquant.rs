//! The K-quant kernels (Q4_K, Q5_K, Q6_K against 256-element activation
//! super-blocks): `maddubs` with the 16-bit group scales applied by `madd`,
//! bit-equal to [`super::dot_256_scalar`]: on 256-bit registers for AVX2, and
//! on 512-bit ones (64 codes per instruction) with AVX-512.

use super::avx2::f16_load;
use super::{Q8Block256, WeightKind, PREFETCH};
use std::arch::x86_64::*;

/// The lane sums of `a` and of `b`, in one reduction.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum2_i32(a: __m256i, b: __m256i) -> (i32, i32) {
    // [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
    let h = _mm256_hadd_epi32(a, b);
    let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    // [a.., a.., b.., b..] → pairwise within each half
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    (_mm_cvtsi128_si32(s), _mm_extract_epi32(s, 2))
}

/// Super-block `i` of `row` (blocks of `ts` bytes), prefetching the weights
/// [`PREFETCH`] bytes ahead of it.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn super_block(row: &[u8], i: usize, ts: usize) -> &[u8] {
    let b = &row[i * ts..(i + 1) * ts];
    for line in (0..ts).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(line + PREFETCH) as *const i8);
    }
    b
}

/// The super-block's scale and (Q4_K/Q5_K) minimum scale.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn super_scales<const K: u8>(b: &[u8]) -> (f32, f32) {
    let p = b.as_ptr();
    if K == Q6K {
        (f16_load(p.add(208)), 0.0)
    } else {
        (f16_load(p), f16_load(p.add(2)))
    }
}

/// The end of one super-block for one activation row: its exact integer sums
/// `s` (for Q6_K before the codes' −32, applied here) into the row's result
/// and minimum accumulators, as the scalar twin does.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_super<const K: u8>(
    s: __m256i,
    xb: &Q8Block256,
    mins16: __m256i,
    q6_scales: __m256i,
    d: f32,
    dmin: f32,
    acc: &mut f32,
    corr: &mut f32,
) {
    let bs = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
    let s = if K == Q6K {
        // Σ_g scale_g · 32 · Σ_{e∈g} x_e.
        _mm256_sub_epi32(s, _mm256_slli_epi32::<5>(_mm256_madd_epi16(q6_scales, bs)))
    } else {
        s
    };
    // Σ_j min_j · (bsum_2j + bsum_2j+1), exact as the scalar twin's.
    let (sumi, summ) = hsum2_i32(s, _mm256_madd_epi16(bs, mins16));
    *acc = (d * xb.d).mul_add(sumi as f32, *acc);
    if K != Q6K {
        *corr = (dmin * xb.d).mul_add(summ as f32, *corr);
    }
}

/// The eight 6-bit scales (bytes 0..8) and minimums (bytes 8..16) of a
/// Q4_K/Q5_K super-block from its 12 packed bytes: sub-blocks 0..4 keep the
/// low 6 bits of bytes 0..4 (scales) and 4..8 (mins); sub-blocks 4..8 take
/// their low 4 bits from bytes 8..12 and their top 2 from the spare top bits
/// of bytes 0..8 (see `get_scale_min_k4`, which this equals).
#[inline]
fn k4_scales_mins(p: &[u8]) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
    let (a, b, c) = (w(0), w(1), w(2));
    let (low6, low4, top2) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
    let sc_lo = a & low6;
    let sc_hi = (c & low4) | (((a >> 6) & top2) << 4);
    let mn_lo = b & low6;
    let mn_hi = ((c >> 4) & low4) | (((b >> 6) & top2) << 4);
    let mut out = [0u8; 16];
    for (i, v) in [sc_lo, sc_hi, mn_lo, mn_hi].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

pub const Q4K: u8 = 4;
pub const Q5K: u8 = 5;
pub const Q6K: u8 = 6;

macro_rules! dot_256_kernel {
    ($module:ident, $features:literal) => {
        pub mod $module {
            use super::*;

            /// [`super::dot_256_scalar`] for `R` activation rows at once: each 32-byte
            /// chunk of codes is decoded once for all rows; codes stay unsigned (Q6_K's
            /// −32 is applied through the activation's 16-element sums).
            #[target_feature(enable = $features)]
            pub unsafe fn dot_256_rows<const K: u8, const R: usize>(
                kind: WeightKind,
                row: &[u8],
                xs: [&[Q8Block256]; R],
            ) -> [f32; R] {
                let ts = kind.type_size();
                let (mut acc, mut corr) = ([0f32; R], [0f32; R]);
                let m4 = _mm256_set1_epi8(0xF);
                for i in 0..row.len() / ts {
                    let b = super_block(row, i, ts);
                    let mut sums = [_mm256_setzero_si256(); R];
                    // Q4_K/Q5_K: each sub-block's minimum twice, against the 16-element sums.
                    let mut mins16 = _mm256_setzero_si256();
                    let mut q6_scales = _mm256_setzero_si256();
                    if K == Q6K {
                        for h in 0..2 {
                            let ql = b.as_ptr().add(64 * h);
                            let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
                            let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                            let l0 = _mm256_loadu_si256(ql as *const __m256i);
                            let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                            let lows = [
                                _mm256_and_si256(l0, m4),
                                _mm256_and_si256(l1, m4),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                            ];
                            for (t, lo) in lows.into_iter().enumerate() {
                                let hi = _mm256_and_si256(
                                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)),
                                    _mm256_set1_epi8(3),
                                );
                                let u = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                                let scale = _mm256_set_m128i(
                                    _mm_set1_epi16(sc[2 * t + 1] as i8 as i16),
                                    _mm_set1_epi16(sc[2 * t] as i8 as i16),
                                );
                                let off = 128 * h + 32 * t;
                                for r in 0..R {
                                    let xv = _mm256_loadu_si256(
                                        xs[r].get_unchecked(i).q.as_ptr().add(off) as *const __m256i
                                    );
                                    sums[r] = _mm256_add_epi32(
                                        sums[r],
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), scale),
                                    );
                                }
                            }
                        }
                        q6_scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.as_ptr().add(192) as *const __m128i));
                    } else {
                        let sm = k4_scales_mins(&b[4..16]);
                        let m8 = _mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i);
                        mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
                        let (qh, qs) = if K == Q5K {
                            (b.as_ptr().add(16), b.as_ptr().add(48))
                        } else {
                            (b.as_ptr(), b.as_ptr().add(16))
                        };
                        let hbits =
                            if K == Q5K { _mm256_loadu_si256(qh as *const __m256i) } else { _mm256_setzero_si256() };
                        for c in 0..4 {
                            let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                            let mut lo = _mm256_and_si256(q, m4);
                            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                            if K == Q5K {
                                // Bit 2c of each qh byte is element l's fifth bit in sub-block 2c, bit 2c+1 in 2c+1.
                                let h = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * c as i32));
                                let sixteen = _mm256_set1_epi8(16);
                                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(h), sixteen));
                                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<3>(h), sixteen));
                            }
                            let (s_lo, s_hi) =
                                (_mm256_set1_epi16(sm[2 * c] as i16), _mm256_set1_epi16(sm[2 * c + 1] as i16));
                            for r in 0..R {
                                let xq = xs[r].get_unchecked(i).q.as_ptr().add(64 * c);
                                let x_lo = _mm256_loadu_si256(xq as *const __m256i);
                                let x_hi = _mm256_loadu_si256(xq.add(32) as *const __m256i);
                                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), s_lo);
                                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), s_hi);
                                sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(p_lo, p_hi));
                            }
                        }
                    }
                    let (d, dmin) = super_scales::<K>(b);
                    for r in 0..R {
                        let xb = xs[r].get_unchecked(i);
                        finish_super::<K>(sums[r], xb, mins16, q6_scales, d, dmin, &mut acc[r], &mut corr[r]);
                    }
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    out[r] = acc[r] - corr[r];
                }
                out
            }
        }
    };
}

dot_256_kernel!(avx2, "avx2,fma,f16c");

/// The K-quant kernel on 512-bit registers (AVX-512 BW): 64 codes per
/// instruction, so a row costs half the `maddubs`/`madd`/add of the AVX2
/// kernel per super-block. Same integers, same float steps: bit-equal to
/// [`super::dot_256_scalar`].
pub mod avx512 {
    use super::*;

    /// Words `[v[k] ×16, v[k + 1] ×16]` of the 16-bit values in `v`'s low lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn two_scales(v: __m512i, k: i16) -> __m512i {
        _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_set1_epi16(k), _mm256_set1_epi16(k + 1), 1), v)
    }

    /// Words `[v[k] ×8, v[k+1] ×8, v[k+2] ×8, v[k+3] ×8]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn four_scales(v: __m512i, k: i16) -> __m512i {
        let lo = _mm256_set_m128i(_mm_set1_epi16(k + 1), _mm_set1_epi16(k));
        let hi = _mm256_set_m128i(_mm_set1_epi16(k + 3), _mm_set1_epi16(k + 2));
        _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), v)
    }

    /// `[v, v]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn twice(v: __m256i) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot_256_rows<const K: u8, const R: usize>(
        kind: WeightKind,
        row: &[u8],
        xs: [&[Q8Block256]; R],
    ) -> [f32; R] {
        let ts = kind.type_size();
        let (mut acc, mut corr) = ([0f32; R], [0f32; R]);
        let m4 = _mm512_set1_epi8(0xF);
        let words = |lo: i64, hi: i64| _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo);
        for i in 0..row.len() / ts {
            let b = super_block(row, i, ts);
            let mut sums = [_mm512_setzero_si512(); R];
            let mut mins16 = _mm256_setzero_si256();
            let mut q6_scales = _mm256_setzero_si256();
            if K == Q6K {
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.as_ptr().add(192) as *const __m128i));
                let scw = _mm512_castsi256_si512(sc16);
                for h in 0..2 {
                    let ql = _mm512_loadu_si512(b.as_ptr().add(64 * h) as *const __m512i);
                    let qh = twice(_mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i));
                    // Elements 128h.. +64: low nibbles with qh bits 0-1 (first 32) and 2-3.
                    let ha =
                        _mm512_and_si512(_mm512_srlv_epi16(qh, words(0, 0x0002_0002_0002_0002)), _mm512_set1_epi8(3));
                    let a = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16::<4>(ha));
                    // Elements 128h+64.. +64: high nibbles with qh bits 4-5 and 6-7.
                    let shifts = words(0x0004_0004_0004_0004, 0x0006_0006_0006_0006);
                    let hb = _mm512_and_si512(_mm512_srlv_epi16(qh, shifts), _mm512_set1_epi8(3));
                    let bb =
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4), _mm512_slli_epi16::<4>(hb));
                    let (sa, sb) = (four_scales(scw, 8 * h as i16), four_scales(scw, 8 * h as i16 + 4));
                    for r in 0..R {
                        let xq = xs[r].get_unchecked(i).q.as_ptr().add(128 * h);
                        let xa = _mm512_loadu_si512(xq as *const __m512i);
                        let xb = _mm512_loadu_si512(xq.add(64) as *const __m512i);
                        let pa = _mm512_madd_epi16(_mm512_maddubs_epi16(a, xa), sa);
                        let pb = _mm512_madd_epi16(_mm512_maddubs_epi16(bb, xb), sb);
                        sums[r] = _mm512_add_epi32(sums[r], _mm512_add_epi32(pa, pb));
                    }
                }
                q6_scales = sc16;
            } else {
                let sm = k4_scales_mins(&b[4..16]);
                let m8 = _mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i);
                mins16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
                let scw = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr() as *const __m128i)));
                let qs = if K == Q5K { b.as_ptr().add(48) } else { b.as_ptr().add(16) };
                // Q5_K: bit 2c of qh[l] for sub-block 2c, bit 2c+1 for 2c+1; shifted down 2 per chunk.
                let mut hcur = if K == Q5K {
                    let qh = _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i);
                    _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<1>(qh), 1)
                } else {
                    _mm512_setzero_si512()
                };
                for c in 0..4 {
                    let q = twice(_mm256_loadu_si256(qs.add(32 * c) as *const __m256i));
                    let mut codes = _mm512_and_si512(_mm512_srlv_epi16(q, words(0, 0x0004_0004_0004_0004)), m4);
                    if K == Q5K {
                        let bit = _mm512_and_si512(hcur, _mm512_set1_epi8(1));
                        codes = _mm512_or_si512(codes, _mm512_slli_epi16::<4>(bit));
                        hcur = _mm512_srli_epi16::<2>(hcur);
                    }
                    let scale = two_scales(scw, 2 * c as i16);
                    for r in 0..R {
                        let x = _mm512_loadu_si512(xs[r].get_unchecked(i).q.as_ptr().add(64 * c) as *const __m512i);
                        sums[r] = _mm512_add_epi32(sums[r], _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x), scale));
                    }
                }
            }
            let (d, dmin) = super_scales::<K>(b);
            for r in 0..R {
                let xb = xs[r].get_unchecked(i);
                let s = _mm256_add_epi32(_mm512_castsi512_si256(sums[r]), _mm512_extracti64x4_epi64(sums[r], 1));
                finish_super::<K>(s, xb, mins16, q6_scales, d, dmin, &mut acc[r], &mut corr[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = acc[r] - corr[r];
        }
        out
    }
}
