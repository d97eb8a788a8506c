//! 256-bit integer kernels: plain AVX2 (`maddubs`) and AVX-VNNI (`vpdpbusd`),
//! both bit-equal to the scalar twins in `mod.rs` (see the contract there).

use super::{finish_pair, GgmlType, Q8Block256, Q8Row32, PREFETCH, Q4_0, Q5_0, Q8_0};
use std::arch::x86_64::*;

/// The f16 at `p` as f32 in every lane. From a broadcast load: converting a
/// scalar the compiler moves into a register itself becomes `vpinsrw` into
/// whatever register is free, often the accumulator, which chained every
/// block behind the previous block's FMA (about 3x slower).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn f16_splat(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()))
}

/// The f16 at `p` as f32 (see [`f16_splat`]).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_load(p: *const u8) -> f32 {
    _mm256_cvtss_f32(f16_splat(p))
}

/// Byte `i` = 16 if bit `i` of `h` is set, else 0.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn spread_bits(h: u32) -> __m256i {
    // Broadcast each of the 4 bytes of h to 8 lanes, then test one bit per lane.
    let v = _mm256_set1_epi32(h as i32);
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(v, shuf);
    let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mask), mask);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// The 16 packed bytes at `p` as 32 nibble codes (low nibbles, then high).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let lo = _mm_and_si128(q, _mm_set1_epi8(0xF));
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF));
    _mm256_set_m128i(hi, lo)
}

/// The codes of one 32-element block of kind `K` as unsigned bytes (Q4_0: q,
/// Q5_0: q; Q8_0: the signed codes as they are).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_codes<const K: u8>(b: *const u8) -> __m256i {
    match K {
        Q8_0 => _mm256_loadu_si256(b.add(2) as *const __m256i),
        Q4_0 => nibbles(b.add(2)),
        _ => {
            let h = (b.add(2) as *const u32).read_unaligned();
            _mm256_or_si256(nibbles(b.add(6)), spread_bits(u32::from_le(h)))
        }
    }
}

/// `offset · (−Σx)` per lane for kind `K`'s unsigned codes (Q8_0 offset by 128).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn offset_correction<const K: u8>(neg_sums: *const i32) -> __m256i {
    let v = _mm256_loadu_si256(neg_sums as *const __m256i);
    match K {
        Q4_0 => _mm256_slli_epi32::<3>(v),
        Q5_0 => _mm256_slli_epi32::<4>(v),
        _ => _mm256_slli_epi32::<7>(v),
    }
}

/// The 32-element kernel for `R` activation rows at once, once per lane
/// instruction: each weight block is decoded once, and every row's arithmetic
/// is exactly its single-row arithmetic ([`super::dot_32_scalar`]).
macro_rules! dot_32_kernel {
    ($(#[$doc:meta])* $module:ident, $features:literal, |$u:ident, $xv:ident, $sums:ident| $lanes:expr) => {
        $(#[$doc])*
        pub mod $module {
            use super::*;

            /// One block's exact lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn lanes<const K: u8>($u: __m256i, $xv: __m256i, $sums: *const i32) -> __m256i {
                $lanes
            }

            /// Block `i` of `row` into `acc` (the even or the odd accumulators).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn block<const K: u8, const R: usize>(
                row: *const u8,
                ts: usize,
                i: usize,
                xs: &[&Q8Row32; R],
                acc: &mut [__m256; R],
            ) {
                let b = row.add(i * ts);
                let u = block_codes::<K>(b);
                let dw = f16_splat(b);
                for r in 0..R {
                    let x = xs[r];
                    let xv = _mm256_loadu_si256(x.q.as_ptr().add(32 * i) as *const __m256i);
                    let lanes = lanes::<K>(u, xv, x.lane_neg_sums.as_ptr().add(8 * i));
                    let s = _mm256_mul_ps(dw, _mm256_loadu_ps(x.lane_d.as_ptr().add(8 * i)));
                    acc[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(lanes), acc[r]);
                }
            }

            #[target_feature(enable = $features)]
            pub unsafe fn dot_32_rows<const K: u8, const R: usize>(
                kind: GgmlType,
                row: &[u8],
                xs: [&Q8Row32; R],
            ) -> [f32; R] {
                let ts = kind.type_size();
                let n = row.len() / ts;
                let (mut even, mut odd) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
                let p = row.as_ptr();
                let mut i = 0;
                while i + 1 < n {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(i * ts + PREFETCH) as *const i8);
                    block::<K, R>(p, ts, i, &xs, &mut even);
                    block::<K, R>(p, ts, i + 1, &xs, &mut odd);
                    i += 2;
                }
                if i < n {
                    block::<K, R>(p, ts, i, &xs, &mut even);
                }
                let mut out = [0f32; R];
                for r in 0..R {
                    let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
                    _mm256_storeu_ps(a.as_mut_ptr(), even[r]);
                    _mm256_storeu_ps(b.as_mut_ptr(), odd[r]);
                    out[r] = finish_pair(&a, &b);
                }
                out
            }
        }
    };
}

dot_32_kernel!(
    /// Plain AVX2: `maddubs` on unsigned codes; Q8_0 by the sign trick, since
    /// its codes offset by 128 would overflow `maddubs`' 16-bit pair sums.
    maddubs,
    "avx2,fma,f16c",
    |u, xv, sums| {
        let ones = _mm256_set1_epi16(1);
        if K == Q8_0 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(xv, u)), ones)
        } else {
            _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), ones), offset_correction::<K>(sums))
        }
    }
);

dot_32_kernel!(
    /// AVX-VNNI: `vpdpbusd` on unsigned codes (Q8_0 offset by 128), starting
    /// from the offset correction.
    vnni,
    "avx2,fma,f16c,avxvnni",
    |u, xv, sums| {
        let u = if K == Q8_0 { _mm256_xor_si256(u, _mm256_set1_epi8(-128)) } else { u };
        _mm256_dpbusd_avx_epi32(offset_correction::<K>(sums), u, xv)
    }
);

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
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

pub(super) const Q4K: u8 = 4;
pub(super) const Q5K: u8 = 5;
pub(super) const Q6K: u8 = 6;

/// [`super::dot_256_scalar`] for `R` activation rows at once: each 32-byte
/// chunk of codes is decoded once for all rows; codes stay unsigned (Q6_K's
/// −32 is applied through the activation's 16-element sums).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_256_rows<const K: u8, const R: usize>(
    kind: GgmlType,
    row: &[u8],
    xs: [&[Q8Block256]; R],
) -> [f32; R] {
    let ts = kind.type_size();
    let (mut acc, mut corr) = ([0f32; R], [0f32; R]);
    let m4 = _mm256_set1_epi8(0xF);
    for i in 0..row.len() / ts {
        let b = std::slice::from_raw_parts(row.as_ptr().add(i * ts), ts);
        for line in (0..ts).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(b.as_ptr().wrapping_add(line + PREFETCH) as *const i8);
        }
        let mut sums = [_mm256_setzero_si256(); R];
        let mut mins = [0i32; 8];
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
                    let hi =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)), _mm256_set1_epi8(3));
                    let u = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                    let scale = _mm256_set_m128i(
                        _mm_set1_epi16(sc[2 * t + 1] as i8 as i16),
                        _mm_set1_epi16(sc[2 * t] as i8 as i16),
                    );
                    let off = 128 * h + 32 * t;
                    for r in 0..R {
                        let xv = _mm256_loadu_si256(xs[r].get_unchecked(i).q.as_ptr().add(off) as *const __m256i);
                        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv), scale));
                    }
                }
            }
            // The codes' −32: Σ_g scale_g · 32 · Σ_{e∈g} x_e.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.as_ptr().add(192) as *const __m128i));
            for r in 0..R {
                let bs = _mm256_loadu_si256(xs[r].get_unchecked(i).bsums.as_ptr() as *const __m256i);
                sums[r] = _mm256_sub_epi32(sums[r], _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs)));
            }
        } else {
            let sm = k4_scales_mins(&b[4..16]);
            for (j, m) in mins.iter_mut().enumerate() {
                *m = sm[8 + j] as i32;
            }
            let (qh, qs) =
                if K == Q5K { (b.as_ptr().add(16), b.as_ptr().add(48)) } else { (b.as_ptr(), b.as_ptr().add(16)) };
            let hbits = if K == Q5K { _mm256_loadu_si256(qh as *const __m256i) } else { _mm256_setzero_si256() };
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
                let (s_lo, s_hi) = (_mm256_set1_epi16(sm[2 * c] as i16), _mm256_set1_epi16(sm[2 * c + 1] as i16));
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
        let p = b.as_ptr();
        let (d, dmin) = if K == Q6K { (f16_load(p.add(208)), 0.0) } else { (f16_load(p), f16_load(p.add(2))) };
        for r in 0..R {
            let xb = xs[r].get_unchecked(i);
            acc[r] = (d * xb.d).mul_add(hsum_i32(sums[r]) as f32, acc[r]);
            if K != Q6K {
                let summ: i32 = (0..8).map(|j| mins[j] * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32)).sum();
                corr[r] = (dmin * xb.d).mul_add(summ as f32, corr[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = acc[r] - corr[r];
    }
    out
}
