//! Paged attention over a flattened varlen batch: each new token attends to its
//! own sequence's cached keys up to its position (causal), reading K/V through
//! the sequence's block table. Every (token, head) is computed independently and
//! in a fixed order, so results do not depend on what else is in the batch.

use rayon::prelude::*;
use std::cell::RefCell;

use super::math::{exp_nonpositive, sum_fixed};
use super::{CpuKvCache, CpuTensor};
use crate::backend::{AttentionMeta, RowSpan};

pub fn paged_attention(
    pool: &rayon::ThreadPool,
    cache: &CpuKvCache,
    layer: usize,
    q: &CpuTensor,
    meta: &AttentionMeta<'_>,
    out: &mut CpuTensor,
) {
    let (nh, kvh, d) = (meta.num_heads, meta.kv_heads, meta.head_dim);
    assert_eq!(q.cols, nh * d);
    assert_eq!((out.rows, out.cols), (q.rows, q.cols));
    let bs = cache.spec.block_size;
    let kw = kvh * d;
    let group = nh / kvh;
    assert!(group <= MAX_GROUP, "{group} query heads per KV head");
    let spans = meta.row_spans(q.rows);
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    pool.install(|| {
        out.data.par_chunks_mut(nh * d).enumerate().for_each(|(r, orow)| {
            let Some(RowSpan { seq, first, ctx }) = spans[r] else {
                orow.fill(0.0);
                return;
            };
            let table = meta.seqs[seq].block_table;
            let n = ctx - first;
            SCRATCH.with_borrow_mut(|s| {
                let RowScratch { slots, scores, acc } = s;
                // Cache slot of every visible key, in order.
                slots.clear();
                for (bi, block) in table.iter().enumerate().take(ctx.div_ceil(bs)).skip(first / bs) {
                    let (from, to) = ((bi * bs).max(first), ((bi + 1) * bs).min(ctx));
                    let base = block.index() * bs;
                    slots.extend((from..to).map(|p| base + p % bs));
                }
                // The query heads sharing one KV head are done together, so each
                // key and value row is read once per group, not once per head.
                scores.clear();
                scores.resize(group * n, 0.0);
                acc.clear();
                acc.resize(group * d, 0.0);
                for g in 0..kvh {
                    let kvoff = g * d;
                    let qg = &q.data[r * nh * d + g * group * d..][..group * d];
                    let key = |j: usize| &kc[slots[j] * kw + kvoff..][..d];
                    let quads = n / 4 * 4;
                    for j in (0..quads).step_by(4) {
                        let ks = [key(j), key(j + 1), key(j + 2), key(j + 3)];
                        for (hh, qh) in qg.chunks_exact(d).enumerate() {
                            for (s, v) in scores[hh * n + j..][..4].iter_mut().zip(dot4(qh, ks)) {
                                *s = v * meta.scale;
                            }
                        }
                    }
                    for j in quads..n {
                        for (hh, qh) in qg.chunks_exact(d).enumerate() {
                            scores[hh * n + j] = dot(qh, key(j)) * meta.scale;
                        }
                    }
                    let mut inv = [0f32; MAX_GROUP];
                    for (hh, sc) in scores.chunks_exact_mut(n).enumerate() {
                        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        for x in sc.iter_mut() {
                            *x = exp_nonpositive(*x - max);
                        }
                        inv[hh] = 1.0 / sum_fixed(sc);
                    }
                    acc.fill(0.0);
                    for (j, &slot) in slots.iter().enumerate() {
                        let vj = &vc[slot * kw + kvoff..][..d];
                        for (hh, a) in acc.chunks_exact_mut(d).enumerate() {
                            let p = scores[hh * n + j];
                            for (a, &v) in a.iter_mut().zip(vj) {
                                *a = p.mul_add(v, *a);
                            }
                        }
                    }
                    let og = &mut orow[g * group * d..(g + 1) * group * d];
                    for (hh, (o, a)) in og.chunks_exact_mut(d).zip(acc.chunks_exact(d)).enumerate() {
                        for (o, a) in o.iter_mut().zip(a) {
                            *o = a * inv[hh];
                        }
                    }
                }
            });
        });
    });
}

/// A worker thread's buffers for one query row, kept between rows and steps
/// (allocating them per row was measurable at batch 1).
#[derive(Default)]
struct RowScratch {
    slots: Vec<usize>,
    scores: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<RowScratch> = RefCell::default();
}

/// Query heads per KV head we support (GQA groups are 1..=16 in practice).
const MAX_GROUP: usize = 64;

/// Dot product in 16 partial sums (lane l sums elements i = l mod 16 with
/// FMAs), then a fixed reduction. LLVM vectorised the portable loop only
/// 2 wide here, so x86-64-v3 builds (the default) spell it in AVX2; both
/// versions compute exactly the same sums in the same order.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let whole = a.len() / 16 * 16;
    let mut p = [0f32; 16];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: the build enables AVX2 and FMA; every load reads 8 floats at an
    // offset i + 8 + 8 <= whole <= len of both slices.
    unsafe {
        use std::arch::x86_64::*;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..whole).step_by(16) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), hi);
        }
        _mm256_storeu_ps(p.as_mut_ptr(), lo);
        _mm256_storeu_ps(p.as_mut_ptr().add(8), hi);
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for l in 0..16 {
            p[l] = x[l].mul_add(y[l], p[l]);
        }
    }
    let mut s = super::ops::sum16(&p);
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s += x * y;
    }
    s
}

/// [`dot`] of `a` with four rows at once, bit for bit: each row's 16
/// partial sums as `dot` keeps them, then `sum16`'s tree done for the four
/// rows in shared registers (the horizontal sums were most of a key's cost).
#[inline]
fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        assert!(b.iter().all(|b| b.len() == a.len()));
        let whole = a.len() / 16 * 16;
        let mut s = [0f32; 8];
        // SAFETY: the build enables AVX2 and FMA; every load reads 8 floats at
        // an offset i + 8 + 8 <= whole <= len of every slice.
        unsafe {
            use std::arch::x86_64::*;
            let pa = a.as_ptr();
            let pb = b.map(|b| b.as_ptr());
            let (mut lo, mut hi) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for i in (0..whole).step_by(16) {
                let (xa, xb) = (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pa.add(i + 8)));
                for r in 0..4 {
                    lo[r] = _mm256_fmadd_ps(xa, _mm256_loadu_ps(pb[r].add(i)), lo[r]);
                    hi[r] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(pb[r].add(i + 8)), hi[r]);
                }
            }
            // sum16: t = p[l] + p[l + 8]; u = t[l] + t[l + 4]; (u0 + u2) + (u1 + u3).
            let t: [__m256; 4] = std::array::from_fn(|r| _mm256_add_ps(lo[r], hi[r]));
            let u = |x: __m256, y: __m256| {
                _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y))
            };
            // [u of row 0 | u of row 1], [u of row 2 | u of row 3]
            let (u01, u23) = (u(t[0], t[1]), u(t[2], t[3]));
            // Per half: [u0+u2, u1+u3] of rows 0 and 2 (low), 1 and 3 (high).
            let v = _mm256_add_ps(
                _mm256_shuffle_ps::<0b01_00_01_00>(u01, u23),
                _mm256_shuffle_ps::<0b11_10_11_10>(u01, u23),
            );
            let w = _mm256_add_ps(_mm256_shuffle_ps::<0b10_00_10_00>(v, v), _mm256_shuffle_ps::<0b11_01_11_01>(v, v));
            _mm256_storeu_ps(s.as_mut_ptr(), w);
        }
        let mut out = [s[0], s[4], s[1], s[5]];
        for (o, b) in out.iter_mut().zip(b) {
            for (x, y) in a[whole..].iter().zip(&b[whole..]) {
                *o += x * y;
            }
        }
        out
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    b.map(|b| dot(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_sums_lane_by_lane_then_in_a_fixed_order() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut p = [0f32; 16];
        for i in 0..32 {
            p[i % 16] = a[i].mul_add(b[i], p[i % 16]);
        }
        let mut want = crate::backend::cpu::ops::sum16(&p);
        for i in 32..37 {
            want += a[i] * b[i];
        }
        assert_eq!(dot(&a, &b).to_bits(), want.to_bits());
    }

    #[test]
    fn dot4_is_four_dots() {
        for len in [16, 37, 64, 128] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| (0..len).map(|i| (i as f32 * 0.11 + r as f32).cos() * 1e3f32.powi(r)).collect())
                .collect();
            let got = dot4(&a, [&rows[0], &rows[1], &rows[2], &rows[3]]);
            for (g, r) in got.iter().zip(&rows) {
                assert_eq!(g.to_bits(), dot(&a, r).to_bits(), "len {len}");
            }
        }
    }
}
