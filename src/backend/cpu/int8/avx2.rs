//! 256-bit kernels for 32-element blocks, eight weight rows per register
//! (one per 32-bit lane; see `tile.rs`): the packing, and the multiplication
//! on plain AVX2 (`maddubs`) and AVX-VNNI (`vpdpbusd`), both bit-equal to
//! [`super::dot_32_scalar`]. Also the f16 helpers the K-quant kernels share.

use super::tile::{block_at, bnb_d, offset_shift, scale_at, Tile};
use super::{blocks_per_stored, is_bnb, is_int4g, Q8Row32, BNB_I8, FP4, Q4_0, Q8_0};
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

/// A bitsandbytes half-block's 16 code bytes at `p` (byte j: element 2j in
/// the high nibble, 2j+1 in the low) as 32 unsigned codes, `BNB_I8 + 128`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn bnb_codes<const K: u8>(p: *const u8) -> __m256i {
    let lut = BNB_I8[(K == FP4) as usize];
    let lut = _mm_xor_si128(_mm_loadu_si128(lut.as_ptr() as *const __m128i), _mm_set1_epi8(-128));
    let q = _mm_loadu_si128(p as *const __m128i);
    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF));
    let lo = _mm_and_si128(q, _mm_set1_epi8(0xF));
    let first = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(hi, lo));
    let second = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(hi, lo));
    _mm256_set_m128i(second, first)
}

/// The codes of one 32-element block of kind `K` as unsigned bytes: the
/// stored codes of Q4_0 and Q5_0, and Q8_0's signed codes plus 128. For
/// bitsandbytes kinds `b` points at the half-block's code bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_codes<const K: u8>(b: *const u8) -> __m256i {
    if is_bnb(K) {
        return bnb_codes::<K>(b);
    }
    match K {
        Q8_0 => _mm256_xor_si256(_mm256_loadu_si256(b.add(2) as *const __m256i), _mm256_set1_epi8(-128)),
        Q4_0 => nibbles(b.add(2)),
        // Group-wise int4: `b` points at the sub-block's code bytes.
        _ if is_int4g(K) => nibbles(b),
        _ => {
            let h = (b.add(2) as *const u32).read_unaligned();
            _mm256_or_si256(nibbles(b.add(6)), spread_bits(u32::from_le(h)))
        }
    }
}

/// Weight rows `rows` (eight of kind `K`, blocks of `ts` bytes; prefetching
/// `ahead` bytes on) into `tile`: per block, each row's unsigned codes in a
/// register, then an 8x8 transpose of 32-bit groups, so that register `t` of
/// a block holds the elements `4t..4t+4` of all eight rows, lane `j` for row `j`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn pack<const K: u8>(rows: &[&[u8]], ts: usize, ahead: usize, tile: &mut Tile) {
    debug_assert_eq!(rows.len(), 8);
    let nb = rows[0].len() / ts * blocks_per_stored(K);
    tile.reserve(nb, 8);
    let p: [*const u8; 8] = std::array::from_fn(|j| rows[j].as_ptr());
    let codes = tile.codes.as_mut_ptr() as *mut __m256i;
    let mut d16 = [0u16; 8];
    // Group-wise int4: each row's zero (the byte after its scale).
    let mut zeros = [0u8; 16];
    for b in 0..nb {
        let off = block_at::<K>(b, ts);
        if b % 2 == 0 {
            for row in p {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(off + ahead) as *const i8);
            }
        }
        let z: [__m256i; 8] = std::array::from_fn(|j| block_codes::<K>(p[j].add(off)));
        if is_bnb(K) {
            for (j, row) in p.iter().enumerate() {
                *tile.d.get_unchecked_mut(8 * b + j) = bnb_d(*row, b);
            }
        } else {
            for ((h, z), row) in d16.iter_mut().zip(&mut zeros).zip(p) {
                let head = (row.add(scale_at::<K>(b, ts)) as *const u32).read_unaligned();
                (*h, *z) = (head as u16, (head >> 16) as u8);
            }
        }
        // Within each 128-bit half: pairs of rows interleaved, then quads.
        let t: [__m256i; 8] = std::array::from_fn(|i| {
            let (x, y) = (z[i & !1], z[i | 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi32(x, y)
            } else {
                _mm256_unpackhi_epi32(x, y)
            }
        });
        // q[i]: rows 0-3 (i < 4) or 4-7, elements 4t..4t+4 in the low half and t+4 in the high, t = i % 4.
        let q: [__m256i; 8] = std::array::from_fn(|i| {
            let (x, y) = (t[4 * (i / 4) + (i % 4) / 2], t[4 * (i / 4) + (i % 4) / 2 + 2]);
            if i % 2 == 0 {
                _mm256_unpacklo_epi64(x, y)
            } else {
                _mm256_unpackhi_epi64(x, y)
            }
        });
        // Group-wise int4: nibbles q become q − z + 16, lane j's four bytes by row j's zero.
        let offset = if is_int4g(K) {
            let z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(zeros.as_ptr() as *const __m128i));
            _mm256_sub_epi8(_mm256_set1_epi8(16), _mm256_mullo_epi32(z, _mm256_set1_epi32(0x0101_0101)))
        } else {
            _mm256_setzero_si256()
        };
        let finish = |v: __m256i| if is_int4g(K) { _mm256_add_epi8(v, offset) } else { v };
        for i in 0..4 {
            let (rows03, rows47) = (q[i], q[i + 4]);
            _mm256_store_si256(codes.add(8 * b + i), finish(_mm256_permute2x128_si256::<0x20>(rows03, rows47)));
            _mm256_store_si256(codes.add(8 * b + i + 4), finish(_mm256_permute2x128_si256::<0x31>(rows03, rows47)));
        }
        if !is_bnb(K) {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(d16.as_ptr() as *const __m128i));
            _mm256_storeu_ps(tile.d.as_mut_ptr().add(8 * b), d);
        }
    }
}

/// Element group `t` (4 codes) of block `b` of `x`, in every lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn x_group(x: &Q8Row32, b: usize, t: usize) -> __m256i {
    _mm256_set1_epi32((x.q.as_ptr().add(32 * b + 4 * t) as *const i32).read_unaligned())
}

/// `offset · (−Σx)` of block `b` of `x` for kind `K`'s unsigned codes, in every lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn x_offset<const K: u8>(x: &Q8Row32, b: usize) -> __m256i {
    _mm256_sllv_epi32(_mm256_set1_epi32(*x.neg_sums.get_unchecked(b)), _mm256_set1_epi32(offset_shift(K) as i32))
}

/// The end of block `b` for every row: `acc = fma(d_w·d_x, dot, acc)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish_block<const R: usize>(
    tile: &Tile,
    b: usize,
    xs: &[&Q8Row32; R],
    dots: [__m256i; R],
    acc: &mut [__m256; R],
) {
    let d = _mm256_loadu_ps(tile.d.as_ptr().add(8 * b));
    for r in 0..R {
        let s = _mm256_mul_ps(d, _mm256_set1_ps(*xs[r].d.get_unchecked(b)));
        acc[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dots[r]), acc[r]);
    }
}

/// Plain AVX2: `maddubs` of the unsigned weight codes with the signed
/// activations. Q4_0/Q5_0 codes are small enough (≤ 31) that four `maddubs`
/// sum in 16 bits without saturating; Q8_0 takes the sign trick instead,
/// since its codes offset by 128 would overflow the 16-bit pair sums.
pub mod maddubs {
    use super::*;

    /// `R` activation rows against the packed tile: `out[r][j]` for row `j`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn multiply<const K: u8, const R: usize>(tile: &Tile, nb: usize, xs: &[Q8Row32], out: &mut [[f32; 16]]) {
        let xs: [&Q8Row32; R] = std::array::from_fn(|r| &xs[r]);
        let w = tile.codes.as_ptr() as *const __m256i;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let mut dots: [__m256i; R] =
                std::array::from_fn(|r| if K == Q8_0 { _mm256_setzero_si256() } else { x_offset::<K>(xs[r], b) });
            if K == Q8_0 {
                for t in 0..8 {
                    let ws = _mm256_xor_si256(_mm256_load_si256(w.add(8 * b + t)), _mm256_set1_epi8(-128));
                    let aw = _mm256_abs_epi8(ws);
                    for r in 0..R {
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x_group(xs[r], b, t), ws));
                        dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(p, ones));
                    }
                }
            } else {
                for half in 0..2 {
                    let mut h = [_mm256_setzero_si256(); R];
                    for t in 4 * half..4 * half + 4 {
                        let wt = _mm256_load_si256(w.add(8 * b + t));
                        for r in 0..R {
                            h[r] = _mm256_add_epi16(h[r], _mm256_maddubs_epi16(wt, x_group(xs[r], b, t)));
                        }
                    }
                    for r in 0..R {
                        dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(h[r], ones));
                    }
                }
            }
            finish_block(tile, b, &xs, dots, &mut acc);
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}

/// AVX-VNNI: `vpdpbusd` of the unsigned weight codes with the signed
/// activations, starting from the offset correction (Q4_0's codes are
/// offset by 8, Q5_0's by 16, Q8_0's by 128).
pub mod vnni {
    use super::*;

    /// `R` activation rows against the packed tile: `out[r][j]` for row `j`.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn multiply<const K: u8, const R: usize>(tile: &Tile, nb: usize, xs: &[Q8Row32], out: &mut [[f32; 16]]) {
        let xs: [&Q8Row32; R] = std::array::from_fn(|r| &xs[r]);
        let w = tile.codes.as_ptr() as *const __m256i;
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // Two chains per row: eight dependent `vpdpbusd` would wait on each other.
            let mut even: [__m256i; R] = std::array::from_fn(|r| x_offset::<K>(xs[r], b));
            let mut odd = [_mm256_setzero_si256(); R];
            for t in (0..8).step_by(2) {
                let (w0, w1) = (_mm256_load_si256(w.add(8 * b + t)), _mm256_load_si256(w.add(8 * b + t + 1)));
                for r in 0..R {
                    even[r] = _mm256_dpbusd_avx_epi32(even[r], w0, x_group(xs[r], b, t));
                    odd[r] = _mm256_dpbusd_avx_epi32(odd[r], w1, x_group(xs[r], b, t + 1));
                }
            }
            finish_block(tile, b, &xs, std::array::from_fn(|r| _mm256_add_epi32(even[r], odd[r])), &mut acc);
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}
