//! The AVX512-VNNI kernel for 32-element blocks: one 512-bit register holds
//! a pair of blocks (even block in the low half, odd in the high half), which
//! is exactly the contract's `A`/`B` accumulator split, so it is bit-equal to
//! the scalar twin in `mod.rs`. `vpdpbusd` multiplies unsigned by signed
//! bytes: the activations come offset by 128 (`Q8Row32::qu`) and the signed
//! weight codes' `128 · Σw` per lane is subtracted once per block pair, so a
//! row costs four instructions per pair (dot, scale, convert, accumulate).

use super::{finish_pair, GgmlType, Q8Row32, PREFETCH, Q4_0, Q8_0};
use std::arch::x86_64::*;

/// The signed codes of blocks `b0` (low half) and `b1` (high half) of kind `K`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pair_codes<const K: u8>(b0: *const u8, b1: *const u8) -> __m512i {
    if K == Q8_0 {
        let lo = _mm256_loadu_si256(b0.add(2) as *const __m256i);
        let hi = _mm256_loadu_si256(b1.add(2) as *const __m256i);
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    // Nibbles: each block's 16 packed bytes twice, the second copy shifted down by 4.
    let off = if K == Q4_0 { 2 } else { 6 };
    let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(b0.add(off) as *const __m128i));
    let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(b1.add(off) as *const __m128i));
    let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    let four = 0x0004_0004_0004_0004i64;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let z = _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0xF));
    if K == Q4_0 {
        return _mm512_sub_epi8(z, _mm512_set1_epi8(8));
    }
    // Q5_0: q − 16 is the nibble where the fifth bit is set and the nibble − 16
    // where it is not; the bits go straight into a mask register.
    let h0 = (b0.add(2) as *const u32).read_unaligned() as u64;
    let h1 = (b1.add(2) as *const u32).read_unaligned() as u64;
    let unset = _cvtu64_mask64(!u64::from_le(h0 | (h1 << 32)));
    _mm512_mask_sub_epi8(z, unset, z, _mm512_set1_epi8(16))
}

/// `−128 · Σw` per lane of signed codes `w`: what offsetting the activations
/// by 128 added to each lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn offset_correction(w: __m512i) -> __m512i {
    let z = _mm512_setzero_si512();
    _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(-128), w))
}

/// The scales of blocks `b0`, `b1` as `[d0 ×8, d1 ×8]`, from broadcast loads
/// (see `avx2::f16_splat` for why not from a scalar).
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,f16c")]
unsafe fn pair_scales(b0: *const u8, b1: *const u8) -> __m512 {
    let h0 = _mm_set1_epi16((b0 as *const i16).read_unaligned());
    let h1 = _mm_set1_epi16((b1 as *const i16).read_unaligned());
    _mm512_cvtph_ps(_mm256_set_m128i(h1, h0))
}

/// [`super::dot_32_scalar`] for `R` activation rows at once: each block pair
/// is decoded once; every row's arithmetic is exactly its single-row arithmetic.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub unsafe fn dot_32_rows<const K: u8, const R: usize>(kind: GgmlType, row: &[u8], xs: [&Q8Row32; R]) -> [f32; R] {
    let ts = kind.type_size();
    let n = row.len() / ts;
    let mut acc = [_mm512_setzero_ps(); R];
    let p = row.as_ptr();
    let mut i = 0;
    while i + 1 < n {
        let (b0, b1) = (p.add(i * ts), p.add((i + 1) * ts));
        _mm_prefetch::<_MM_HINT_T0>(b0.add(PREFETCH) as *const i8);
        let w = pair_codes::<K>(b0, b1);
        let corr = offset_correction(w);
        let wd = pair_scales(b0, b1);
        for r in 0..R {
            let x = xs[r];
            let xv = _mm512_loadu_si512(x.qu.as_ptr().add(32 * i) as *const __m512i);
            let lanes = _mm512_dpbusd_epi32(corr, xv, w);
            let s = _mm512_mul_ps(wd, _mm512_loadu_ps(x.lane_d.as_ptr().add(8 * i)));
            acc[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(lanes), acc[r]);
        }
        i += 2;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let mut a = _mm512_castps512_ps256(acc[r]);
        if i < n {
            // The last block of an odd count: the low half's (even) accumulator, on 256 bits.
            let b = p.add(i * ts);
            let x = xs[r];
            let w = pair_codes::<K>(b, b);
            let corr = _mm512_castsi512_si256(offset_correction(w));
            let xv = _mm256_loadu_si256(x.qu.as_ptr().add(32 * i) as *const __m256i);
            let lanes = _mm256_dpbusd_epi32(corr, xv, _mm512_castsi512_si256(w));
            let wd = _mm512_castps512_ps256(pair_scales(b, b));
            let s = _mm256_mul_ps(wd, _mm256_loadu_ps(x.lane_d.as_ptr().add(8 * i)));
            a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(lanes), a);
        }
        let (mut lo, mut hi) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(lo.as_mut_ptr(), a);
        _mm256_storeu_ps(hi.as_mut_ptr(), _mm512_extractf32x8_ps(acc[r], 1));
        out[r] = finish_pair(&lo, &hi);
    }
    out
}
