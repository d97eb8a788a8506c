//! 512-bit kernels for 32-element blocks with AVX512-VNNI: sixteen weight
//! rows per register, one per 32-bit lane (see `tile.rs`). Packing decodes a
//! row's block pair per register and transposes 32-bit groups across the
//! rows; the multiplication is eight `vpdpbusd` per block and activation row
//! (unsigned weight codes against the row's signed codes broadcast from
//! memory), bit-equal to [`super::dot_32_scalar`].

use super::tile::{block_at, bnb_d, offset_shift, scale_at, Tile};
use super::{avx2, blocks_per_stored, is_bnb, is_int4g, Q8Row32, Q4_0, Q8_0};
use std::arch::x86_64::*;

/// The unsigned codes of blocks `b0` (low half) and `b1` (high half) of kind
/// `K`: the stored codes of Q4_0 and Q5_0, Q8_0's signed codes plus 128.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pair_codes<const K: u8>(b0: *const u8, b1: *const u8) -> __m512i {
    if is_bnb(K) {
        let (lo, hi) = (avx2::bnb_codes::<K>(b0), avx2::bnb_codes::<K>(b1));
        return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    if K == Q8_0 {
        let lo = _mm256_loadu_si256(b0.add(2) as *const __m256i);
        let hi = _mm256_loadu_si256(b1.add(2) as *const __m256i);
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(-128));
    }
    // Nibbles: each block's 16 packed bytes twice, the second copy shifted down by 4.
    // Group-wise int4: the pointers are at the sub-blocks' code bytes.
    let off = if K == Q4_0 {
        2
    } else if is_int4g(K) {
        0
    } else {
        6
    };
    let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(b0.add(off) as *const __m128i));
    let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(b1.add(off) as *const __m128i));
    let z = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    let four = 0x0004_0004_0004_0004i64;
    let shifts = _mm512_set_epi64(four, four, 0, 0, four, four, 0, 0);
    let z = _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0xF));
    if K == Q4_0 || is_int4g(K) {
        return z;
    }
    // Q5_0: the fifth bits go straight into a mask register.
    let h0 = (b0.add(2) as *const u32).read_unaligned() as u64;
    let h1 = (b1.add(2) as *const u32).read_unaligned() as u64;
    let set = _cvtu64_mask64(u64::from_le(h0 | (h1 << 32)));
    _mm512_mask_add_epi8(z, set, z, _mm512_set1_epi8(16))
}

/// Weight rows `rows` (sixteen of kind `K`, blocks of `ts` bytes; prefetching
/// `ahead` bytes on) into `tile`: per block, rows `j` and `j + 8` decoded into
/// one register, then a 16x8 transpose of 32-bit groups, so that register `t`
/// of a block holds the elements `4t..4t+4` of all sixteen rows, lane `j` for
/// row `j`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub unsafe fn pack<const K: u8>(rows: &[&[u8]], ts: usize, ahead: usize, tile: &mut Tile) {
    debug_assert_eq!(rows.len(), 16);
    let nb = rows[0].len() / ts * blocks_per_stored(K);
    tile.reserve(nb, 16);
    let p: [*const u8; 16] = std::array::from_fn(|j| rows[j].as_ptr());
    let codes = tile.codes.as_mut_ptr() as *mut __m512i;
    // Which 128-bit lanes of the two operands make the output (in qwords).
    let first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    let mut d16 = [0u16; 16];
    // Group-wise int4: each row's zero (the byte after its scale).
    let mut zeros = [0u8; 16];
    for b in 0..nb {
        let off = block_at::<K>(b, ts);
        if b % 2 == 0 {
            for row in p {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(off + ahead) as *const i8);
            }
        }
        // z[j]: row j in the low half, row j + 8 in the high half.
        let z: [__m512i; 8] = std::array::from_fn(|j| pair_codes::<K>(p[j].add(off), p[j + 8].add(off)));
        if is_bnb(K) {
            for (j, row) in p.iter().enumerate() {
                *tile.d.get_unchecked_mut(16 * b + j) = bnb_d(*row, b);
            }
        } else {
            for ((h, z), row) in d16.iter_mut().zip(&mut zeros).zip(p) {
                let head = (row.add(scale_at::<K>(b, ts)) as *const u32).read_unaligned();
                (*h, *z) = (head as u16, (head >> 16) as u8);
            }
        }
        // Within each 128-bit lane: pairs of rows interleaved, then quads.
        let t: [__m512i; 8] = std::array::from_fn(|i| {
            let (x, y) = (z[i & !1], z[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(x, y)
            } else {
                _mm512_unpackhi_epi32(x, y)
            }
        });
        // q[i]: rows {0-3, 8-11} (i < 4) or {4-7, 12-15}; lanes 0 and 2 hold
        // elements 4t..4t+4, lanes 1 and 3 elements 4(t+4).., t = i % 4.
        let q: [__m512i; 8] = std::array::from_fn(|i| {
            let (x, y) = (t[4 * (i / 4) + (i % 4) / 2], t[4 * (i / 4) + (i % 4) / 2 + 2]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi64(x, y)
            } else {
                _mm512_unpackhi_epi64(x, y)
            }
        });
        // Group-wise int4: nibbles q become q − z + 16, lane j's four bytes by row j's zero.
        let offset = if is_int4g(K) {
            let z = _mm512_cvtepu8_epi32(_mm_loadu_si128(zeros.as_ptr() as *const __m128i));
            _mm512_sub_epi8(_mm512_set1_epi8(16), _mm512_mullo_epi32(z, _mm512_set1_epi32(0x0101_0101)))
        } else {
            _mm512_setzero_si512()
        };
        let finish = |v: __m512i| if is_int4g(K) { _mm512_add_epi8(v, offset) } else { v };
        for i in 0..4 {
            let (a, c) = (q[i], q[i + 4]);
            _mm512_store_si512(codes.add(8 * b + i), finish(_mm512_permutex2var_epi64(a, first, c)));
            _mm512_store_si512(codes.add(8 * b + i + 4), finish(_mm512_permutex2var_epi64(a, second, c)));
        }
        if !is_bnb(K) {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(d16.as_ptr() as *const __m256i));
            _mm512_storeu_ps(tile.d.as_mut_ptr().add(16 * b), d);
        }
    }
}

/// `R` activation rows against the packed tile: `out[r][j]` for weight row `j`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn multiply<const K: u8, const R: usize>(tile: &Tile, nb: usize, xs: &[Q8Row32], out: &mut [[f32; 16]]) {
    let xs: [&Q8Row32; R] = std::array::from_fn(|r| &xs[r]);
    let w = tile.codes.as_ptr() as *const __m512i;
    let shift = _mm512_set1_epi32(offset_shift(K) as i32);
    let group = |x: &Q8Row32, b: usize, t: usize| {
        _mm512_set1_epi32((x.q.as_ptr().add(32 * b + 4 * t) as *const i32).read_unaligned())
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        // Two chains per row: eight dependent `vpdpbusd` would wait on each other.
        let mut even: [__m512i; R] =
            std::array::from_fn(|r| _mm512_sllv_epi32(_mm512_set1_epi32(*xs[r].neg_sums.get_unchecked(b)), shift));
        let mut odd = [_mm512_setzero_si512(); R];
        for t in (0..8).step_by(2) {
            let (w0, w1) = (_mm512_load_si512(w.add(8 * b + t)), _mm512_load_si512(w.add(8 * b + t + 1)));
            for r in 0..R {
                even[r] = _mm512_dpbusd_epi32(even[r], w0, group(xs[r], b, t));
                odd[r] = _mm512_dpbusd_epi32(odd[r], w1, group(xs[r], b, t + 1));
            }
        }
        let d = _mm512_loadu_ps(tile.d.as_ptr().add(16 * b));
        for r in 0..R {
            let s = _mm512_mul_ps(d, _mm512_set1_ps(*xs[r].d.get_unchecked(b)));
            acc[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r])), acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}
