//! 256-bit integer kernels: plain AVX2 (`maddubs`) and AVX-VNNI (`vpdpbusd`),
//! both bit-equal to the scalar twins in `mod.rs` (see the contract there).

use super::{finish_pair, GgmlType, Q8Row32, PREFETCH, Q4_0, Q5_0, Q8_0};
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
pub(super) unsafe fn f16_load(p: *const u8) -> f32 {
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
