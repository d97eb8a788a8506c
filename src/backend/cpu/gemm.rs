//! `c = alpha · op(a) · op(b) + beta · c` for f32 tensors: the LoRA factors
//! and their gradients in training (skinny products: one side has the rank,
//! 4–64, as a dimension).
//!
//! Two shapes of kernel, each with a fixed summation order that no ISA or
//! thread split changes:
//! - `b` not transposed (`op(b)` rows contiguous): each row of `c` is built as
//!   `Σ_k op(a)[m, k] · b[k, :]`, one FMA chain per element in increasing `k`,
//!   vectorised along the row;
//! - `b` transposed (`op(b)[k, n] = b[n, k]`, rows of `b` are what `c[m, n]`
//!   dots with): each element is a dot product in 16 lanes (`k ≡ l mod 16`)
//!   reduced in a fixed tree. `a` must then be untransposed, which is the only
//!   combination training needs.

use rayon::prelude::*;

use super::ops::sum16;

/// Shapes and flags of one call; `c` is `m × n`, the inner dimension `k`.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

pub fn gemm(pool: &rayon::ThreadPool, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    assert_eq!(a.len(), m * k, "gemm: a");
    assert_eq!(b.len(), k * n, "gemm: b");
    assert_eq!(c.len(), m * n, "gemm: c");
    if m == 0 || n == 0 {
        return;
    }
    // op(a)[i, kk]
    let a_at = |i: usize, kk: usize| if trans_a { a[kk * m + i] } else { a[i * k + kk] };
    let finish = |acc: f32, old: f32| if beta == 0.0 { alpha * acc } else { alpha.mul_add(acc, beta * old) };
    let work = m * n * k.max(1);
    let parallel = work >= 1 << 16 && pool.current_num_threads() > 1;
    if !trans_b {
        // Row-axpy form, blocked over columns for cache locality.
        const NC: usize = 512;
        let row = |(i, crow): (usize, &mut [f32])| {
            let mut acc = [0f32; NC];
            for c0 in (0..n).step_by(NC) {
                let w = NC.min(n - c0);
                let acc = &mut acc[..w];
                acc.fill(0.0);
                for kk in 0..k {
                    let s = a_at(i, kk);
                    let brow = &b[kk * n + c0..kk * n + c0 + w];
                    for (x, &y) in acc.iter_mut().zip(brow) {
                        *x = s.mul_add(y, *x);
                    }
                }
                for (o, &x) in crow[c0..c0 + w].iter_mut().zip(acc.iter()) {
                    *o = finish(x, *o);
                }
            }
        };
        if parallel {
            pool.install(|| c.par_chunks_mut(n).enumerate().for_each(row));
        } else {
            c.chunks_mut(n).enumerate().for_each(row);
        }
        return;
    }
    assert!(!trans_a, "gemm: transposing both operands is not supported");
    let row = |(i, crow): (usize, &mut [f32])| {
        let arow = &a[i * k..(i + 1) * k];
        for (j, o) in crow.iter_mut().enumerate() {
            *o = finish(dot16(arow, &b[j * k..(j + 1) * k]), *o);
        }
    };
    if parallel {
        pool.install(|| c.par_chunks_mut(n).enumerate().for_each(row));
    } else {
        c.chunks_mut(n).enumerate().for_each(row);
    }
}

/// Σ a·b in 16 lanes (`i ≡ l mod 16`, FMAs in increasing i), then the fixed
/// pairwise reduction of `sum16`, then the tail in order.
#[inline]
pub fn dot16(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let whole = a.len() / 16 * 16;
    let mut p = [0f32; 16];
    for (x, y) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for l in 0..16 {
            p[l] = x[l].mul_add(y[l], p[l]);
        }
    }
    let mut s = sum16(&p);
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(g: Gemm, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
        let mut out = c.to_vec();
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0f64;
                for kk in 0..g.k {
                    let x = if g.trans_a { a[kk * g.m + i] } else { a[i * g.k + kk] };
                    let y = if g.trans_b { b[j * g.k + kk] } else { b[kk * g.n + j] };
                    s += x as f64 * y as f64;
                }
                out[i * g.n + j] = (g.alpha as f64 * s + g.beta as f64 * c[i * g.n + j] as f64) as f32;
            }
        }
        out
    }

    #[test]
    fn every_supported_transpose_matches_a_naive_product() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin() * 0.5).collect::<Vec<f32>>();
        for (m, n, k) in [(37, 9, 53), (5, 700, 33), (8, 3, 1), (64, 64, 64), (3, 1030, 7)] {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (2.0, -0.25)] {
                    let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta };
                    let (a, b, c0) = (fill(m * k, 0.37), fill(k * n, 0.11), fill(m * n, 0.05));
                    let mut c = c0.clone();
                    gemm(&pool, g, &a, &b, &mut c);
                    let want = naive(g, &a, &b, &c0);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{g:?}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
