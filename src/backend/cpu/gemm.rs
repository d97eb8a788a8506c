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
use super::Isa;

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

pub fn gemm(pool: &rayon::ThreadPool, isa: Isa, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, trans_a, trans_b, .. } = g;
    assert_eq!(a.len(), m * k, "gemm: a");
    assert_eq!(b.len(), k * n, "gemm: b");
    assert_eq!(c.len(), m * n, "gemm: c");
    if m == 0 || n == 0 {
        return;
    }
    assert!(!(trans_a && trans_b), "gemm: transposing both operands is not supported");
    let out = SendPtr(c.as_mut_ptr());
    let parallel = m * n * k.max(1) >= 1 << 16 && pool.current_num_threads() > 1;
    // Tasks are blocks of c: (rows, columns).
    let (mt, nt) = if trans_b { (DOT_ROWS, n) } else { (AXPY_ROWS, AXPY_COLS) };
    let tasks: Vec<Block> = (0..m)
        .step_by(mt)
        .flat_map(|m0| (0..n).step_by(nt).map(move |c0| Block { m0, m1: (m0 + mt).min(m), c0, c1: (c0 + nt).min(n) }))
        .collect();
    let p = Operands { g, a, b, c: out };
    let run = |t: &Block| {
        // SAFETY: each task writes its own block of c, which no other task touches.
        unsafe { block(isa, &p, t) };
    };
    if parallel && tasks.len() > 1 {
        pool.install(|| tasks.par_iter().for_each(run));
    } else {
        tasks.iter().for_each(run);
    }
}

/// Rows and columns of c per axpy-form task, and rows per dot-form task.
const AXPY_ROWS: usize = 64;
const AXPY_COLS: usize = 256;
const DOT_ROWS: usize = 16;

#[derive(Clone, Copy)]
struct Block {
    m0: usize,
    m1: usize,
    c0: usize,
    c1: usize,
}

struct Operands<'a> {
    g: Gemm,
    a: &'a [f32],
    b: &'a [f32],
    c: SendPtr,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of c.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[inline(always)]
fn finish(alpha: f32, beta: f32, acc: f32, old: f32) -> f32 {
    if beta == 0.0 {
        alpha * acc
    } else {
        alpha.mul_add(acc, beta * old)
    }
}

/// # Safety
/// `p.c` points at `m × n` floats and the block belongs to the caller alone.
unsafe fn block(isa: Isa, p: &Operands<'_>, t: &Block) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: an ISA is only chosen after run-time detection of its features.
        Isa::Avx512 => return simd::block_avx512(p, t),
        Isa::Avx2 => return simd::block_avx2(p, t),
        Isa::Scalar => {}
    }
    let _ = isa;
    block_generic::<2, 16, 1, 4>(p, t)
}

/// The register-blocked kernels, compiled per ISA by the wrappers in `simd`:
/// axpy tiles of `R` rows × `W` columns, dot tiles of `DR` rows × `DQ` columns.
#[inline(always)]
unsafe fn block_generic<const R: usize, const W: usize, const DR: usize, const DQ: usize>(p: &Operands<'_>, t: &Block) {
    if p.g.trans_b {
        let mut i = t.m0;
        while i < t.m1 {
            if i + DR <= t.m1 {
                dot_tile::<DR, DQ>(p, i, t.c0, t.c1);
                i += DR;
            } else {
                dot_tile::<1, DQ>(p, i, t.c0, t.c1);
                i += 1;
            }
        }
        return;
    }
    let mut i = t.m0;
    while i < t.m1 {
        let rows = R.min(t.m1 - i);
        let mut j = t.c0;
        while j < t.c1 {
            let cols = W.min(t.c1 - j);
            if rows == R && cols == W {
                axpy_tile::<R, W>(p, i, j);
            } else {
                axpy_edge(p, i, rows, j, cols);
            }
            j += cols;
        }
        i += rows;
    }
}

/// op(a)[i, kk]
#[inline(always)]
fn a_at(p: &Operands<'_>, i: usize, kk: usize) -> f32 {
    if p.g.trans_a {
        p.a[kk * p.g.m + i]
    } else {
        p.a[i * p.g.k + kk]
    }
}

/// `R × W` outputs in registers, one FMA chain each in increasing k.
#[inline(always)]
unsafe fn axpy_tile<const R: usize, const W: usize>(p: &Operands<'_>, i0: usize, j0: usize) {
    let Gemm { n, k, alpha, beta, .. } = p.g;
    let mut acc = [[0f32; W]; R];
    let b = p.b.as_ptr();
    for kk in 0..k {
        let mut bv = [0f32; W];
        for (l, v) in bv.iter_mut().enumerate() {
            *v = *b.add(kk * n + j0 + l);
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let s = a_at(p, i0 + i, kk);
            for l in 0..W {
                acc[l] = s.mul_add(bv[l], acc[l]);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let crow = p.c.0.add((i0 + i) * n + j0);
        for (l, &x) in acc.iter().enumerate() {
            *crow.add(l) = finish(alpha, beta, x, *crow.add(l));
        }
    }
}

/// [`axpy_tile`]'s arithmetic for a partial tile.
unsafe fn axpy_edge(p: &Operands<'_>, i0: usize, rows: usize, j0: usize, cols: usize) {
    let Gemm { n, k, alpha, beta, .. } = p.g;
    for i in i0..i0 + rows {
        for j in j0..j0 + cols {
            let mut acc = 0f32;
            for kk in 0..k {
                acc = a_at(p, i, kk).mul_add(p.b[kk * n + j], acc);
            }
            let cp = p.c.0.add(i * n + j);
            *cp = finish(alpha, beta, acc, *cp);
        }
    }
}

/// `R` rows × all columns `c0..c1`, `Q` columns at a time: each output is
/// [`dot16`] of a row of `a` and a row of `b`, computed exactly as `dot16` does.
#[inline(always)]
unsafe fn dot_tile<const R: usize, const Q: usize>(p: &Operands<'_>, i0: usize, c0: usize, c1: usize) {
    let Gemm { n, k, alpha, beta, .. } = p.g;
    let whole = k / 16 * 16;
    let (a, b) = (p.a.as_ptr(), p.b.as_ptr());
    let mut j = c0;
    while j < c1 {
        if j + Q > c1 {
            for i in i0..i0 + R {
                let v = dot16(&p.a[i * k..(i + 1) * k], &p.b[j * k..(j + 1) * k]);
                let cp = p.c.0.add(i * n + j);
                *cp = finish(alpha, beta, v, *cp);
            }
            j += 1;
            continue;
        }
        let mut acc = [[[0f32; 16]; Q]; R];
        for c in (0..whole).step_by(16) {
            let mut bv = [[0f32; 16]; Q];
            for (q, bq) in bv.iter_mut().enumerate() {
                for (l, v) in bq.iter_mut().enumerate() {
                    *v = *b.add((j + q) * k + c + l);
                }
            }
            for (i, ai) in acc.iter_mut().enumerate() {
                let mut av = [0f32; 16];
                for (l, v) in av.iter_mut().enumerate() {
                    *v = *a.add((i0 + i) * k + c + l);
                }
                for (aq, bq) in ai.iter_mut().zip(&bv) {
                    for l in 0..16 {
                        aq[l] = av[l].mul_add(bq[l], aq[l]);
                    }
                }
            }
        }
        for (i, ai) in acc.iter().enumerate() {
            for (q, aq) in ai.iter().enumerate() {
                let mut s = sum16(aq);
                for kk in whole..k {
                    s = (*a.add((i0 + i) * k + kk)).mul_add(*b.add((j + q) * k + kk), s);
                }
                let cp = p.c.0.add((i0 + i) * n + j + q);
                *cp = finish(alpha, beta, s, *cp);
            }
        }
        j += Q;
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{block_generic, Block, Operands};

    /// axpy 4 rows × 64 columns (16 zmm), dot 4 rows × 4 columns (16 zmm).
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn block_avx512(p: &Operands<'_>, t: &Block) {
        block_generic::<4, 64, 4, 4>(p, t)
    }

    /// axpy 6 rows × 16 columns (12 ymm), dot 2 rows × 2 columns (8 ymm).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_avx2(p: &Operands<'_>, t: &Block) {
        block_generic::<6, 16, 2, 2>(p, t)
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
    fn every_supported_transpose_matches_a_naive_product_identically_on_every_isa() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin() * 0.5).collect::<Vec<f32>>();
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Avx512 {
                isas.push(Isa::Avx512);
            }
        }
        let shapes = [(37, 9, 53), (5, 700, 33), (8, 3, 1), (64, 64, 64), (3, 1030, 7), (130, 8, 300), (8, 200, 131)];
        for (m, n, k) in shapes {
            for (ta, tb) in [(false, false), (true, false), (false, true)] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (2.0, -0.25)] {
                    let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta };
                    let (a, b, c0) = (fill(m * k, 0.37), fill(k * n, 0.11), fill(m * n, 0.05));
                    let want = naive(g, &a, &b, &c0);
                    let mut first: Option<Vec<u32>> = None;
                    for &isa in &isas {
                        let mut c = c0.clone();
                        gemm(&pool, isa, g, &a, &b, &mut c);
                        for (x, y) in c.iter().zip(&want) {
                            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{g:?} {isa:?}: {x} vs {y}");
                        }
                        let bits: Vec<u32> = c.iter().map(|v| v.to_bits()).collect();
                        match &first {
                            None => first = Some(bits),
                            Some(f) => assert_eq!(f, &bits, "{g:?}: {isa:?} differs from the scalar code"),
                        }
                    }
                }
            }
        }
    }
}
