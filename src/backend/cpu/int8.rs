//! 8-bit activations: each activation row is quantised once per matmul input
//! (per 32-element block for Q4_0/Q5_0/Q8_0 weights, per 256-element
//! super-block with 16-element sums for the K-quants), and every weight block
//! is multiplied with it in integers (`maddubs` on AVX2), as llama.cpp's
//! `ggml_vec_dot_*_q8_*` functions do. Written from the formats, not copied.
//!
//! The summation contract (batch and ISA invariance): a block's integer sums
//! are exact, so only the float steps fix the result, and they are the same in
//! the scalar and SIMD code.
//! - 32-element blocks: eight lanes; lane `l` of a block is the exact integer
//!   sum over its elements `4l..4l+4`; `acc[l] = fma(d_w·d_x, lane, acc[l])` in
//!   block order; the result is `reduce8(acc)`, one fixed tree.
//! - 256-element super-blocks: the exact integer sum of the whole super-block
//!   (scales applied in integers), then `acc = fma(d_w·d_x, sum, acc)` (and the
//!   minimum's term into its own accumulator) in block order.
//!
//! A row's quantisation depends only on the row, and each output is one dot
//! of one weight row with one activation row: batching, threads and the ISA
//! cannot change a bit (tests in backend/cpu/tests.rs).

use crate::quant::ggml::{f16_to_f32, get_scale_min_k4, GgmlType};

/// An activation block for 32-element weight blocks.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Q8Block32 {
    pub d: f32,
    pub q: [i8; 32],
}

/// An activation super-block for 256-element weight blocks.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Q8Block256 {
    pub d: f32,
    /// Sums of `q` over each 16 elements.
    pub bsums: [i16; 16],
    pub q: [i8; 256],
}

/// Whether weights of `kind` have an integer path.
pub fn supported(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

/// Whether `kind` pairs with 256-element activation blocks.
pub fn uses_256(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

/// The scale and codes of one block: `d = max|x| / 127`, `q = round(x / d)`.
fn quantise_into(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Row `x` (a multiple of 32 long) as 32-element blocks.
pub fn quantise_32(x: &[f32], out: &mut Vec<Q8Block32>) {
    out.clear();
    for c in x.chunks_exact(32) {
        let mut b = Q8Block32 { d: 0.0, q: [0; 32] };
        b.d = quantise_into(c, &mut b.q);
        out.push(b);
    }
}

/// Row `x` (a multiple of 256 long) as 256-element super-blocks.
pub fn quantise_256(x: &[f32], out: &mut Vec<Q8Block256>) {
    out.clear();
    for c in x.chunks_exact(256) {
        let mut b = Q8Block256 { d: 0.0, bsums: [0; 16], q: [0; 256] };
        b.d = quantise_into(c, &mut b.q);
        for (s, g) in b.bsums.iter_mut().zip(b.q.chunks_exact(16)) {
            *s = g.iter().map(|&v| v as i16).sum();
        }
        out.push(b);
    }
}

/// The fixed reduction of the eight lanes.
#[inline]
pub fn reduce8(a: &[f32; 8]) -> f32 {
    let t = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let u = [t[0] + t[2], t[1] + t[3]];
    u[0] + u[1]
}

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// The signed codes of one 32-element block of `kind` (Q4_0, Q5_0, Q8_0).
#[inline]
fn codes_32(kind: GgmlType, b: &[u8], w: &mut [i32; 32]) {
    match kind {
        GgmlType::Q4_0 => {
            for j in 0..16 {
                w[j] = (b[2 + j] & 0xF) as i32 - 8;
                w[j + 16] = (b[2 + j] >> 4) as i32 - 8;
            }
        }
        GgmlType::Q5_0 => {
            let h = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                w[j] = ((b[6 + j] & 0xF) as u32 | (((h >> j) & 1) << 4)) as i32 - 16;
                w[j + 16] = ((b[6 + j] >> 4) as u32 | (((h >> (j + 16)) & 1) << 4)) as i32 - 16;
            }
        }
        GgmlType::Q8_0 => {
            for j in 0..32 {
                w[j] = b[2 + j] as i8 as i32;
            }
        }
        _ => unreachable!("not a 32-element kind"),
    }
}

/// `Σ w·x` of one weight row of a 32-element kind with a quantised row (scalar twin).
pub fn dot_32_scalar(kind: GgmlType, row: &[u8], x: &[Q8Block32]) -> f32 {
    let ts = kind.type_size();
    let mut acc = [0f32; 8];
    let mut w = [0i32; 32];
    for (b, xb) in row.chunks_exact(ts).zip(x) {
        codes_32(kind, b, &mut w);
        let d = f16_at(b, 0) * xb.d;
        for (l, a) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * l..4 * l + 4).map(|e| w[e] * xb.q[e] as i32).sum();
            *a = d.mul_add(lane as f32, *a);
        }
    }
    reduce8(&acc)
}

/// The codes (0..63 for Q4_K/Q5_K unsigned; Q6_K signed, -32 applied) and the
/// per-group integer scale of one super-block: `codes[e]`, `scale[e / 16]`,
/// and for Q4_K/Q5_K the minimum per 32-element sub-block.
struct Super {
    codes: [i32; 256],
    /// Per 16-element group.
    scales: [i32; 16],
    /// Q4_K / Q5_K: per 32-element sub-block.
    mins: [i32; 8],
    d: f32,
    dmin: f32,
}

fn decode_super(kind: GgmlType, b: &[u8]) -> Super {
    let mut s = Super { codes: [0; 256], scales: [0; 16], mins: [0; 8], d: 0.0, dmin: 0.0 };
    match kind {
        GgmlType::Q4K | GgmlType::Q5K => {
            s.d = f16_at(b, 0);
            s.dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let (qh, qs) = if kind == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for sub in 0..8 {
                let (sc, m) = get_scale_min_k4(sub, scales);
                s.scales[2 * sub] = sc as i32;
                s.scales[2 * sub + 1] = sc as i32;
                s.mins[sub] = m as i32;
                let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
                for l in 0..32 {
                    let mut v = if sub % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                    if let Some(qh) = qh {
                        v |= ((qh[l] >> sub) & 1) << 4;
                    }
                    s.codes[32 * sub + l] = v as i32;
                }
            }
        }
        GgmlType::Q6K => {
            s.d = f16_at(b, 208);
            for h in 0..2 {
                let ql = &b[64 * h..64 * h + 64];
                let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                for l in 0..32 {
                    let c = &mut s.codes[128 * h..128 * h + 128];
                    c[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    c[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    c[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    c[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
                for (g, &v) in sc.iter().enumerate() {
                    s.scales[8 * h + g] = v as i8 as i32;
                }
            }
        }
        _ => unreachable!("not a K-quant"),
    }
    s
}

/// `Σ w·x` of one weight row of a K-quant with a quantised row (scalar twin).
pub fn dot_256_scalar(kind: GgmlType, row: &[u8], x: &[Q8Block256]) -> f32 {
    let ts = kind.type_size();
    let (mut acc, mut corr) = (0f32, 0f32);
    for (b, xb) in row.chunks_exact(ts).zip(x) {
        let s = decode_super(kind, b);
        let mut sumi = 0i32;
        for g in 0..16 {
            let dot: i32 = (16 * g..16 * g + 16).map(|e| s.codes[e] * xb.q[e] as i32).sum();
            sumi += s.scales[g] * dot;
        }
        acc = (s.d * xb.d).mul_add(sumi as f32, acc);
        if kind != GgmlType::Q6K {
            let summ: i32 = (0..8).map(|j| s.mins[j] * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32)).sum();
            corr = (s.dmin * xb.d).mul_add(summ as f32, corr);
        }
    }
    acc - corr
}

/// An activation row quantised for whichever block family its weights use.
#[derive(Clone, Copy)]
pub enum QuantRow<'a> {
    B32(&'a [Q8Block32]),
    B256(&'a [Q8Block256]),
}

/// `Σ w·x` of one weight row with one quantised activation row, on `isa`.
#[inline]
pub fn dot(isa: super::Isa, kind: GgmlType, row: &[u8], x: QuantRow<'_>) -> f32 {
    if isa != super::Isa::Scalar {
        let mut out = [0f32];
        dot_rows(isa, kind, row, &[x], &mut out);
        return out[0];
    }
    match x {
        QuantRow::B32(x) => dot_32_scalar(kind, row, x),
        QuantRow::B256(x) => dot_256_scalar(kind, row, x),
    }
}

/// Weight row `row` against up to eight quantised activation rows at once
/// (`out[i]` for `xs[i]`), each with exactly its single-row arithmetic.
pub fn dot_rows(isa: super::Isa, kind: GgmlType, row: &[u8], xs: &[QuantRow<'_>], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != super::Isa::Scalar {
        macro_rules! go {
            ($variant:ident, $f:ident, $n:literal) => {{
                let v: [_; $n] = std::array::from_fn(|i| match &xs[i] {
                    QuantRow::$variant(x) => *x,
                    _ => unreachable!("one block family per weight"),
                });
                // SAFETY: AVX2, FMA and F16C were detected for every non-scalar ISA.
                out[..$n].copy_from_slice(&unsafe { avx2::$f::<$n>(kind, row, v) });
            }};
        }
        match (uses_256(kind), xs.len()) {
            (false, 1) => go!(B32, dot_32_rows, 1),
            (false, 2) => go!(B32, dot_32_rows, 2),
            (false, 3) => go!(B32, dot_32_rows, 3),
            (false, 4) => go!(B32, dot_32_rows, 4),
            (false, 8) => go!(B32, dot_32_rows, 8),
            (true, 1) => go!(B256, dot_256_rows, 1),
            (true, 2) => go!(B256, dot_256_rows, 2),
            (true, 3) => go!(B256, dot_256_rows, 3),
            (true, 4) => go!(B256, dot_256_rows, 4),
            (true, 8) => go!(B256, dot_256_rows, 8),
            (fam, n) => {
                // 5 to 7 rows: four, then the rest.
                let (a, b) = xs.split_at(4);
                let (oa, ob) = out.split_at_mut(4);
                let _ = fam;
                dot_rows(isa, kind, row, a, oa);
                dot_rows(isa, kind, row, b, &mut ob[..n - 4]);
            }
        }
        return;
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = dot(isa, kind, row, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The 32 signed codes of one block as i8 (Q4_0: q-8, Q5_0: q-16, Q8_0: q).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn codes_32(kind: GgmlType, b: *const u8) -> __m256i {
        match kind {
            GgmlType::Q8_0 => _mm256_loadu_si256(b.add(2) as *const __m256i),
            GgmlType::Q4_0 => {
                let q = _mm_loadu_si128(b.add(2) as *const __m128i);
                let lo = _mm_and_si128(q, _mm_set1_epi8(0xF));
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF));
                let v = _mm256_set_m128i(hi, lo);
                _mm256_sub_epi8(v, _mm256_set1_epi8(8))
            }
            GgmlType::Q5_0 => {
                let q = _mm_loadu_si128(b.add(6) as *const __m128i);
                let lo = _mm_and_si128(q, _mm_set1_epi8(0xF));
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0xF));
                let v = _mm256_set_m128i(hi, lo);
                let h = u32::from_le_bytes([*b.add(2), *b.add(3), *b.add(4), *b.add(5)]);
                let bits = spread_bits(h);
                _mm256_sub_epi8(_mm256_or_si256(v, bits), _mm256_set1_epi8(16))
            }
            _ => unreachable!(),
        }
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

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// [`super::dot_32_scalar`] for `R` activation rows at once: each weight block is decoded
    /// once; every row's arithmetic is exactly its single-row arithmetic.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_32_rows<const R: usize>(kind: GgmlType, row: &[u8], xs: [&[Q8Block32]; R]) -> [f32; R] {
        let ts = kind.type_size();
        let mut acc = [_mm256_setzero_ps(); R];
        let ones = _mm256_set1_epi16(1);
        for i in 0..row.len() / ts {
            let b = row.as_ptr().add(i * ts);
            let w = codes_32(kind, b);
            let aw = _mm256_sign_epi8(w, w);
            let dw = f16_at(std::slice::from_raw_parts(b, 2), 0);
            for r in 0..R {
                let xb = xs[r].get_unchecked(i);
                let xv = _mm256_loadu_si256(xb.q.as_ptr() as *const __m256i);
                let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut a = [0f32; 8];
            _mm256_storeu_ps(a.as_mut_ptr(), acc[r]);
            out[r] = reduce8(&a);
        }
        out
    }

    /// [`super::dot_256_scalar`] for `R` activation rows at once (codes decoded once per super-block).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_256_rows<const R: usize>(kind: GgmlType, row: &[u8], xs: [&[Q8Block256]; R]) -> [f32; R] {
        let ts = kind.type_size();
        let (mut acc, mut corr) = ([0f32; R], [0f32; R]);
        let m4 = _mm256_set1_epi8(0xF);
        // Per 32-element chunk: its codes and the scales of its two 16-element groups.
        let mut codes = [_mm256_setzero_si256(); 8];
        let mut scales = [_mm256_setzero_si256(); 8];
        for i in 0..row.len() / ts {
            let b = std::slice::from_raw_parts(row.as_ptr().add(i * ts), ts);
            let signed = kind == GgmlType::Q6K;
            let mut mins = [0i32; 8];
            match kind {
                GgmlType::Q4K | GgmlType::Q5K => {
                    let sc = &b[4..16];
                    let (qh, qs) =
                        if kind == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                    let hbits = qh.map(|h| _mm256_loadu_si256(h.as_ptr() as *const __m256i));
                    for c in 0..4 {
                        let q = _mm256_loadu_si256(qs.as_ptr().add(32 * c) as *const __m256i);
                        for half in 0..2 {
                            let sub = 2 * c + half;
                            let mut v = if half == 0 {
                                _mm256_and_si256(q, m4)
                            } else {
                                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4)
                            };
                            if let Some(h) = hbits {
                                let bit = _mm256_and_si256(h, _mm256_set1_epi8(1 << sub));
                                let set = _mm256_cmpeq_epi8(bit, _mm256_set1_epi8(1 << sub));
                                v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(16)));
                            }
                            let (s, m) = get_scale_min_k4(sub, sc);
                            codes[sub] = v;
                            scales[sub] = _mm256_set1_epi16(s as i16);
                            mins[sub] = m as i32;
                        }
                    }
                }
                GgmlType::Q6K => {
                    let m2 = _mm256_set1_epi8(3);
                    for h in 0..2 {
                        let ql = b.as_ptr().add(64 * h);
                        let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * h) as *const __m256i);
                        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                        let l0 = _mm256_loadu_si256(ql as *const __m256i);
                        let l1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                        let parts = [
                            (_mm256_and_si256(l0, m4), 0),
                            (_mm256_and_si256(l1, m4), 2),
                            (_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), 4),
                            (_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), 6),
                        ];
                        for (t, (lo, shift)) in parts.into_iter().enumerate() {
                            let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift)), m2);
                            let v = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                            codes[4 * h + t] = _mm256_sub_epi8(v, _mm256_set1_epi8(32));
                            scales[4 * h + t] = _mm256_set_m128i(
                                _mm_set1_epi16(sc[2 * t + 1] as i8 as i16),
                                _mm_set1_epi16(sc[2 * t] as i8 as i16),
                            );
                        }
                    }
                }
                _ => unreachable!(),
            }
            let (d, dmin) = if signed { (f16_at(b, 208), 0.0) } else { (f16_at(b, 0), f16_at(b, 2)) };
            for r in 0..R {
                let xb = xs[r].get_unchecked(i);
                let xq = xb.q.as_ptr();
                let mut sums = _mm256_setzero_si256();
                for c in 0..8 {
                    let xv = _mm256_loadu_si256(xq.add(32 * c) as *const __m256i);
                    let p = if signed {
                        _mm256_maddubs_epi16(_mm256_sign_epi8(codes[c], codes[c]), _mm256_sign_epi8(xv, codes[c]))
                    } else {
                        _mm256_maddubs_epi16(codes[c], xv)
                    };
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(p, scales[c]));
                }
                acc[r] = (d * xb.d).mul_add(hsum_i32(sums) as f32, acc[r]);
                if !signed {
                    let summ: i32 =
                        (0..8).map(|j| mins[j] * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32)).sum();
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
}

/// `out[m, n] = Σ_k x[m, k]·w[n, k] + bias[n]` for every job, with `x`
/// quantised once (per block family the jobs need). Every job's weight kind
/// must be [`supported`].
pub fn matmul_many(
    pool: &rayon::ThreadPool,
    isa: super::Isa,
    x: &[f32],
    m: usize,
    k: usize,
    jobs: &mut [super::matmul::Job<'_>],
) {
    use rayon::prelude::*;
    debug_assert_eq!(x.len(), m * k);
    let need32 = jobs.iter().any(|j| !uses_256(j.w.kind));
    let need256 = jobs.iter().any(|j| uses_256(j.w.kind));
    let q32: Vec<Vec<Q8Block32>> = if need32 {
        pool.install(|| {
            x.par_chunks(k)
                .map(|r| {
                    let mut v = Vec::new();
                    quantise_32(r, &mut v);
                    v
                })
                .collect()
        })
    } else {
        Vec::new()
    };
    let q256: Vec<Vec<Q8Block256>> = if need256 {
        pool.install(|| {
            x.par_chunks(k)
                .map(|r| {
                    let mut v = Vec::new();
                    quantise_256(r, &mut v);
                    v
                })
                .collect()
        })
    } else {
        Vec::new()
    };
    /// Weight rows per task: enough to amortise the task, few enough to balance.
    const ROWS: usize = 16;
    let mut tasks: Vec<(usize, usize)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        assert_eq!(job.w.cols, k, "matmul: weight '{}' has {} columns, input has {k}", job.w.name, job.w.cols);
        assert_eq!(job.out.len(), m * job.w.rows, "matmul: output size for '{}'", job.w.name);
        assert!(supported(job.w.kind), "int8 matmul: {:?} has no integer path", job.w.kind);
        tasks.extend((0..job.w.rows).step_by(ROWS).map(|r| (j, r)));
    }
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: each task writes a disjoint set of output columns.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    let outs: Vec<Out> = jobs.iter_mut().map(|j| Out(j.out.as_mut_ptr())).collect();
    let ro: Vec<_> = jobs.iter().map(|j| (j.w, j.bias)).collect();
    let run = |&(j, r0): &(usize, usize)| {
        let (w, bias) = ro[j];
        let data = w.bytes.as_slice();
        let mut vals = [0f32; 8];
        for r in r0..(r0 + ROWS).min(w.rows) {
            let row = &data[r * w.row_bytes..(r + 1) * w.row_bytes];
            for m0 in (0..m).step_by(8) {
                let n = 8.min(m - m0);
                let xq: [QuantRow<'_>; 8] = std::array::from_fn(|i| {
                    let mi = (m0 + i).min(m - 1);
                    if uses_256(w.kind) {
                        QuantRow::B256(&q256[mi])
                    } else {
                        QuantRow::B32(&q32[mi])
                    }
                });
                dot_rows(isa, w.kind, row, &xq[..n], &mut vals[..n]);
                for (i, &v) in vals[..n].iter().enumerate() {
                    let v = match bias {
                        Some(b) => v + b[r],
                        None => v,
                    };
                    // SAFETY: (m0+i, r) is inside this job's output and only this task owns row r.
                    unsafe { *outs[j].0.add((m0 + i) * w.rows + r) = v };
                }
            }
        }
    };
    if tasks.len() <= 1 || pool.current_num_threads() == 1 {
        tasks.iter().for_each(run);
    } else {
        pool.install(|| tasks.par_iter().for_each(run));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random blocks of `kind` with sane scales (finite f16).
    fn random_row(kind: GgmlType, blocks: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let ts = kind.type_size();
        let mut row: Vec<u8> = (0..blocks * ts).map(|_| rng.gen()).collect();
        for b in row.chunks_exact_mut(ts) {
            let put = |b: &mut [u8], off: usize, v: f32| {
                b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
            };
            match kind {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put(b, 0, rng.gen_range(-0.1..0.1)),
                GgmlType::Q4K | GgmlType::Q5K => {
                    put(b, 0, rng.gen_range(0.0..0.01));
                    put(b, 2, rng.gen_range(0.0..0.01));
                }
                GgmlType::Q6K => put(b, 208, rng.gen_range(-0.01..0.01)),
                _ => unreachable!(),
            }
        }
        row
    }

    /// The f32 reference: dequantised weights against the dequantised activations.
    fn reference(kind: GgmlType, row: &[u8], x: &[f32]) -> f64 {
        let mut w = vec![0f32; x.len()];
        crate::quant::ggml::dequantize(kind, row, &mut w).unwrap();
        w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    #[test]
    fn integer_dots_equal_their_scalar_twins_and_the_dequantised_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let isas = [super::super::Isa::detect(), super::super::Isa::Scalar];
        for kind in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            for _ in 0..20 {
                let k = 1024;
                let row = random_row(kind, k / kind.block_size(), &mut rng);
                let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let (mut q32, mut q256) = (Vec::new(), Vec::new());
                quantise_32(&x, &mut q32);
                quantise_256(&x, &mut q256);
                let qr = || if uses_256(kind) { QuantRow::B256(&q256) } else { QuantRow::B32(&q32) };
                let want =
                    if uses_256(kind) { dot_256_scalar(kind, &row, &q256) } else { dot_32_scalar(kind, &row, &q32) };
                for isa in isas {
                    let got = dot(isa, kind, &row, qr());
                    assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} {isa:?}: {got} vs scalar {want}");
                }
                // Against f32: the activation's rounding only (≤ 1/254 of each |x| per element).
                let deq: Vec<f32> = if uses_256(kind) {
                    q256.iter().flat_map(|b| b.q.iter().map(move |&q| q as f32 * b.d)).collect()
                } else {
                    q32.iter().flat_map(|b| b.q.iter().map(move |&q| q as f32 * b.d)).collect()
                };
                let exact = reference(kind, &row, &deq);
                let mut w = vec![0f32; k];
                crate::quant::ggml::dequantize(kind, &row, &mut w).unwrap();
                let l1: f64 = w.iter().zip(&deq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                assert!(((want as f64) - exact).abs() <= 1e-5 * l1 + 1e-6, "{kind:?}: {want} vs {exact} (l1 {l1})");
            }
        }
    }
}
