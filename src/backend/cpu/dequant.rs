//! Dequantisation of weight-row chunks into f32 tiles for the matmul kernel.
//!
//! Every kind is expanded block by block into an f32 scratch tile that stays in
//! L1; the tile then feeds an f32 FMA micro-kernel. Activations are never
//! quantised, so results follow the f32 reference (transformers on the
//! dequantised weights) to rounding. The SIMD paths compute each element with
//! the same operations, in the same order, as the reference dequantiser
//! (`quant::ggml::dequantize`), so they agree bit for bit. AVX-512 and AVX2
//! share one decoder written against a 16-lane vector type (`simd::Lanes`);
//! other machines use the reference itself.

use crate::quant::ggml::{self, WeightKind};

use super::Isa;

/// Expands elements `[k0, k0 + len)` of one weight row (`row` = the row's bytes)
/// into `out[..len]`. `k0` and `len` are multiples of the kind's block size,
/// except that `len` may end at the row's end.
pub fn dequant_row_chunk(isa: Isa, kind: WeightKind, row: &[u8], k0: usize, out: &mut [f32]) {
    let bs = kind.block_size();
    let ts = kind.type_size();
    debug_assert_eq!(k0 % bs, 0);
    let nblocks = out.len().div_ceil(bs);
    let bytes = &row[(k0 / bs) * ts..(k0 / bs + nblocks) * ts];
    match kind {
        WeightKind::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            return;
        }
        WeightKind::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
            return;
        }
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: an Isa is only chosen after runtime detection of its features.
        let done = match isa {
            Isa::Avx512 => unsafe { simd::dequant_avx512(kind, bytes, out) },
            Isa::Avx2 => unsafe { simd::dequant_avx2(kind, bytes, out) },
            Isa::Scalar => false,
        };
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
pub(super) mod simd {
    use super::WeightKind;
    use crate::quant::ggml::get_scale_min_k4;
    use std::arch::x86_64::*;

    /// 16 f32 lanes on one instruction set. The decoders and the register path
    /// of the matmul are written once against this; both implementations do the
    /// same operation on every lane, so results are identical across ISAs.
    pub trait Lanes: Copy {
        unsafe fn zero() -> Self;
        unsafe fn splat(v: f32) -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(self, p: *mut f32);
        unsafe fn mul(self, b: Self) -> Self;
        unsafe fn sub(self, b: Self) -> Self;
        /// self * b + c with one rounding.
        unsafe fn fmadd(self, b: Self, c: Self) -> Self;
        /// 16 unsigned bytes minus `bias` (exact integer arithmetic), as f32.
        unsafe fn from_u8(b: __m128i, bias: i32) -> Self;
        /// 16 signed bytes as f32.
        unsafe fn from_i8(b: __m128i) -> Self;
        /// 16 little-endian f16 values as f32.
        unsafe fn from_f16(p: *const u8) -> Self;
    }

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Self(_mm512_mul_ps(self.0, b.0))
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Self(_mm512_sub_ps(self.0, b.0))
        }
        #[inline(always)]
        unsafe fn fmadd(self, b: Self, c: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn from_u8(b: __m128i, bias: i32) -> Self {
            let i = _mm512_cvtepu8_epi32(b);
            Self(_mm512_cvtepi32_ps(if bias == 0 { i } else { _mm512_sub_epi32(i, _mm512_set1_epi32(bias)) }))
        }
        #[inline(always)]
        unsafe fn from_i8(b: __m128i) -> Self {
            Self(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)))
        }
        #[inline(always)]
        unsafe fn from_f16(p: *const u8) -> Self {
            Self(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
        }
    }

    /// Lanes 0..8 and 8..16.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Self(_mm256_set1_ps(v), _mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Self(_mm256_mul_ps(self.0, b.0), _mm256_mul_ps(self.1, b.1))
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Self(_mm256_sub_ps(self.0, b.0), _mm256_sub_ps(self.1, b.1))
        }
        #[inline(always)]
        unsafe fn fmadd(self, b: Self, c: Self) -> Self {
            Self(_mm256_fmadd_ps(self.0, b.0, c.0), _mm256_fmadd_ps(self.1, b.1, c.1))
        }
        #[inline(always)]
        unsafe fn from_u8(b: __m128i, bias: i32) -> Self {
            let conv = |x: __m128i| {
                let i = _mm256_cvtepu8_epi32(x);
                _mm256_cvtepi32_ps(if bias == 0 { i } else { _mm256_sub_epi32(i, _mm256_set1_epi32(bias)) })
            };
            Self(conv(b), conv(_mm_srli_si128(b, 8)))
        }
        #[inline(always)]
        unsafe fn from_i8(b: __m128i) -> Self {
            Self(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))),
            )
        }
        #[inline(always)]
        unsafe fn from_f16(p: *const u8) -> Self {
            Self(
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            )
        }
    }

    #[inline(always)]
    unsafe fn f16(b: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le_bytes([*b, *b.add(1)]) as i32)))
    }

    /// Byte i = 16 where bit i of `h` is set, else 0 (Q5_0's fifth bits).
    #[inline(always)]
    unsafe fn fifth_bits(h: u16) -> __m128i {
        let bytes =
            _mm_shuffle_epi8(_mm_set1_epi16(h as i16), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
        let sel = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
        _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(bytes, sel), sel), _mm_set1_epi8(16))
    }

    /// Does `kind` have a fast decoder here?
    pub fn supported(kind: WeightKind) -> bool {
        !matches!(kind, WeightKind::F32 | WeightKind::BF16)
    }

    /// Decodes `nblocks` whole blocks starting at `bytes`, calling
    /// `emit(group, values)` for every 16-element group in increasing element
    /// order (`group` counts from the first block; for F16, `nblocks` counts
    /// elements). Each value is computed with the reference dequantiser's
    /// operations in its order, so it is bit-exact; the increasing order lets a
    /// caller accumulate straight from registers with the same summation order
    /// as a stored tile.
    #[inline(always)]
    pub unsafe fn decode<V: Lanes, F: FnMut(usize, V)>(
        kind: WeightKind,
        bytes: *const u8,
        nblocks: usize,
        mut emit: F,
    ) {
        let m4 = _mm_set1_epi8(0x0F);
        match kind {
            WeightKind::Q8_0 => {
                for b in 0..nblocks {
                    let blk = bytes.add(34 * b);
                    let d = V::splat(f16(blk));
                    for h in 0..2 {
                        let q = V::from_i8(_mm_loadu_si128(blk.add(2 + 16 * h) as *const __m128i));
                        emit(2 * b + h, q.mul(d));
                    }
                }
            }
            WeightKind::Q4_0 | WeightKind::Q5_0 => {
                let q5 = kind == WeightKind::Q5_0;
                let (ts, qs_at, bias) = if q5 { (22, 6, 16) } else { (18, 2, 8) };
                for b in 0..nblocks {
                    let blk = bytes.add(ts * b);
                    let d = V::splat(f16(blk));
                    let raw = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
                    let mut lo = _mm_and_si128(raw, m4);
                    let mut hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                    if q5 {
                        let h = (blk.add(2) as *const u32).read_unaligned();
                        lo = _mm_or_si128(lo, fifth_bits(h as u16));
                        hi = _mm_or_si128(hi, fifth_bits((h >> 16) as u16));
                    }
                    emit(2 * b, V::from_u8(lo, bias).mul(d));
                    emit(2 * b + 1, V::from_u8(hi, bias).mul(d));
                }
            }
            WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
                let (ts, subs) = (kind.type_size(), kind.block_size() / 32);
                for b in 0..nblocks {
                    let blk = bytes.add(ts * b);
                    let d = V::splat(f16(blk));
                    let zero = i32::from(*blk.add(2));
                    for s in 0..subs {
                        let raw = _mm_loadu_si128(blk.add(4 + 16 * s) as *const __m128i);
                        let lo = _mm_and_si128(raw, m4);
                        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                        emit(2 * (subs * b + s), V::from_u8(lo, zero).mul(d));
                        emit(2 * (subs * b + s) + 1, V::from_u8(hi, zero).mul(d));
                    }
                }
            }
            WeightKind::Q4K | WeightKind::Q5K => {
                let q5 = kind == WeightKind::Q5K;
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
                        let dj = V::splat(d * sc as f32);
                        let mj = V::splat(dmin * m as f32);
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
                            emit(16 * b + 2 * j + l / 16, dj.mul(V::from_u8(q, 0)).sub(mj));
                        }
                    }
                }
            }
            WeightKind::Q6K => {
                let m2 = _mm_set1_epi8(3);
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
                                let scale = V::splat(d * sc as f32);
                                emit(16 * b + 8 * h + 2 * q + l / 16, scale.mul(V::from_u8(v, 32)));
                            }
                        }
                    }
                }
            }
            WeightKind::F16 => {
                for g in 0..nblocks / 16 {
                    emit(g, V::from_f16(bytes.add(32 * g)));
                }
            }
            WeightKind::Nf4 | WeightKind::Fp4 => {
                let code = crate::quant::bnb::code(kind).unwrap_or(&[0.0; 16]);
                let mut vals = [0f32; 16];
                for b in 0..nblocks {
                    let blk = bytes.add(36 * b);
                    let absmax = V::splat((blk as *const f32).read_unaligned());
                    // Four groups of 16 values; byte j holds values 2j (high) and 2j+1 (low).
                    for g in 0..4 {
                        let qs = std::slice::from_raw_parts(blk.add(4 + 8 * g), 8);
                        for (j, &q) in qs.iter().enumerate() {
                            vals[2 * j] = code[(q >> 4) as usize];
                            vals[2 * j + 1] = code[(q & 0xF) as usize];
                        }
                        emit(4 * b + g, V::load(vals.as_ptr()).mul(absmax));
                    }
                }
            }
            WeightKind::F32 | WeightKind::BF16 => {}
        }
    }

    #[inline(always)]
    unsafe fn dequant_with<V: Lanes>(kind: WeightKind, bytes: &[u8], out: &mut [f32]) -> bool {
        let n = out.len();
        if !supported(kind) || (kind == WeightKind::F16 && !n.is_multiple_of(16)) {
            return false;
        }
        let nblocks = if kind == WeightKind::F16 { n } else { n / kind.block_size() };
        let o = out.as_mut_ptr();
        decode::<V, _>(kind, bytes.as_ptr(), nblocks, |g, v| v.store(o.add(16 * g)));
        true
    }

    /// Dequantises whole blocks into `out`; false for kinds without a decoder.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn dequant_avx512(kind: WeightKind, bytes: &[u8], out: &mut [f32]) -> bool {
        dequant_with::<Avx512>(kind, bytes, out)
    }

    /// Dequantises whole blocks into `out`; false for kinds without a decoder.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequant_avx2(kind: WeightKind, bytes: &[u8], out: &mut [f32]) -> bool {
        dequant_with::<Avx2>(kind, bytes, out)
    }
}
