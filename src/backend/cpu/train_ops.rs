//! Training's row-wise and elementwise ops on the CPU: the backward of RMS
//! norm, RoPE and SiLU·mul, cross-entropy with its gradient, dropout and
//! AdamW. Each follows PyTorch's f32 arithmetic where a golden compares
//! against it, and sums in a fixed order (no result depends on the thread
//! split or the ISA).

use rayon::prelude::*;

use super::math::exp_nonpositive;
use super::ops::sum16;
use super::CpuTensor;
use crate::backend::{dropout_keep, AdamWScalars, AdamWStep, CrossEntropySums, RopeTable};

/// Rows per parallel task for row-wise ops.
const ROWS_PER_TASK: usize = 8;

fn par_rows(pool: &rayon::ThreadPool, data: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let rows = data.len() / cols.max(1);
    if rows >= 2 * ROWS_PER_TASK && pool.current_num_threads() > 1 {
        pool.install(|| data.par_chunks_mut(cols).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, x)| f(r, x)));
    } else {
        data.chunks_mut(cols).enumerate().for_each(|(r, x)| f(r, x));
    }
}

/// Σ x·y in 16 lanes then the fixed tree (the reduction every op here uses).
fn dot_fixed(x: &[f32], y: &[f32]) -> f32 {
    super::gemm::dot16(x, y)
}

/// `dx += ∂(w · x / rms(x))/∂x · dy`: with `r = 1/sqrt(mean(x²) + eps)` and
/// `g = dy · w`, `dx = r·g − x · r³ · (g·x) / n`.
pub fn rms_norm_backward(
    pool: &rayon::ThreadPool,
    x: &CpuTensor,
    w: &[f32],
    eps: f32,
    dy: &CpuTensor,
    dx: &mut CpuTensor,
) {
    let n = x.cols;
    assert_eq!((x.rows, x.cols), (dy.rows, dy.cols));
    assert_eq!((x.rows, x.cols), (dx.rows, dx.cols));
    assert_eq!(w.len(), n);
    par_rows(pool, &mut dx.data, n, |r, dxr| {
        let xr = &x.data[r * n..(r + 1) * n];
        let dyr = &dy.data[r * n..(r + 1) * n];
        let ss = super::ops::sum_squares(xr) / n as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        let mut p = [0f32; 16];
        let whole = n / 16 * 16;
        for ((xc, dc), wc) in xr[..whole].chunks_exact(16).zip(dyr[..whole].chunks_exact(16)).zip(w.chunks_exact(16)) {
            for l in 0..16 {
                p[l] = (dc[l] * wc[l]).mul_add(xc[l], p[l]);
            }
        }
        let mut gx = sum16(&p);
        for i in whole..n {
            gx = (dyr[i] * w[i]).mul_add(xr[i], gx);
        }
        let coef = inv * inv * inv * gx / n as f32;
        for i in 0..n {
            dxr[i] += inv * (dyr[i] * w[i]) - xr[i] * coef;
        }
    });
}

/// The gradient through `rope`: rotating each pair back by its angle.
pub fn rope_backward(x: &mut CpuTensor, heads: usize, head_dim: usize, positions: &[u32], table: &RopeTable) {
    super::ops::rope_rotate(x, heads, head_dim, positions, table, -1.0);
}

/// With `s = sigmoid(g)`: `d up = dout · g·s`, `d gate = dout · up · s·(1 + g·(1 − s))`.
pub fn silu_mul_backward(
    pool: &rayon::ThreadPool,
    gate: &CpuTensor,
    up: &CpuTensor,
    dout: &CpuTensor,
    dgate: &mut CpuTensor,
    dup: &mut CpuTensor,
) {
    let n = gate.data.len();
    assert!(up.data.len() == n && dout.data.len() == n && dgate.data.len() == n && dup.data.len() == n);
    const C: usize = super::ops::ELEMENTWISE_CHUNK;
    let run = |(i, (dg, du)): (usize, (&mut [f32], &mut [f32]))| {
        let base = i * C;
        for (j, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
            let (g, u, d) = (gate.data[base + j], up.data[base + j], dout.data[base + j]);
            let s = 1.0 / (1.0 + (-g).exp());
            *du = d * (g * s);
            *dg = d * u * (s * (1.0 + g * (1.0 - s)));
        }
    };
    if n > C && pool.current_num_threads() > 1 {
        pool.install(|| dgate.data.par_chunks_mut(C).zip(dup.data.par_chunks_mut(C)).enumerate().for_each(run));
    } else {
        dgate.data.chunks_mut(C).zip(dup.data.chunks_mut(C)).enumerate().for_each(run);
    }
}

/// Per row: `loss = logsumexp(x) − x[label]`; with a scale, `x ← s·(softmax(x) − onehot)`.
pub fn cross_entropy(
    pool: &rayon::ThreadPool,
    logits: &mut CpuTensor,
    labels: &[u32],
    grad_scale: Option<f32>,
) -> CrossEntropySums {
    let v = logits.cols;
    assert_eq!(logits.rows, labels.len(), "cross-entropy: one label per row");
    let mut per_row = vec![(0f64, false); labels.len()];
    let run = |(r, (xr, out)): (usize, (&mut [f32], &mut (f64, bool)))| {
        let label = labels[r] as usize;
        assert!(label < v, "label {label} outside a vocabulary of {v}");
        // First maximum, as torch.argmax.
        let (mut best, mut max) = (0, f32::NEG_INFINITY);
        for (i, &x) in xr.iter().enumerate() {
            if x > max {
                (best, max) = (i, x);
            }
        }
        let mut p = [0f32; 16];
        let whole = v / 16 * 16;
        for c in xr[..whole].chunks_exact(16) {
            for l in 0..16 {
                p[l] += exp_nonpositive(c[l] - max);
            }
        }
        let mut sum = sum16(&p);
        for &x in &xr[whole..] {
            sum += exp_nonpositive(x - max);
        }
        let lse = max + sum.ln();
        *out = ((lse - xr[label]) as f64, best == label);
        if let Some(s) = grad_scale {
            let inv = s / sum;
            for x in xr.iter_mut() {
                *x = exp_nonpositive(*x - max) * inv;
            }
            xr[label] -= s;
        }
    };
    if labels.len() >= 2 && pool.current_num_threads() > 1 {
        pool.install(|| logits.data.par_chunks_mut(v).zip(per_row.par_iter_mut()).enumerate().for_each(run));
    } else {
        logits.data.chunks_mut(v).zip(per_row.iter_mut()).enumerate().for_each(run);
    }
    // Rows are summed in order, so the total does not depend on the split.
    let mut sums = CrossEntropySums::default();
    for (loss, correct) in per_row {
        sums.loss += loss;
        sums.correct += correct as usize;
    }
    sums
}

/// `dst[rows[i]] += src[i]`.
pub fn add_rows(src: &CpuTensor, rows: &[usize], dst: &mut CpuTensor) {
    assert_eq!(src.cols, dst.cols);
    assert_eq!(src.rows, rows.len());
    let c = src.cols;
    for (i, &r) in rows.iter().enumerate() {
        assert!(r < dst.rows, "row {r} of {}", dst.rows);
        for (d, s) in dst.data[r * c..(r + 1) * c].iter_mut().zip(&src.data[i * c..(i + 1) * c]) {
            *d += s;
        }
    }
}

pub fn dropout(pool: &rayon::ThreadPool, x: &CpuTensor, p: f32, seed: u64, out: &mut CpuTensor) {
    assert_eq!(x.data.len(), out.data.len());
    let keep_scale = 1.0 / (1.0 - p);
    let cols = x.cols.max(1);
    par_rows(pool, &mut out.data, cols, |r, o| {
        let xr = &x.data[r * cols..(r + 1) * cols];
        for (c, (o, &v)) in o.iter_mut().zip(xr).enumerate() {
            let keep = dropout_keep(seed, (r * cols + c) as u64, p);
            *o = if keep { v * keep_scale } else { 0.0 };
        }
    });
}

pub fn sum_squares(x: &CpuTensor) -> f64 {
    // Chunks summed in f64 in order: exact enough for a norm and split-independent.
    x.data.chunks(4096).map(|c| dot_fixed(c, c) as f64).sum()
}

/// torch.optim.AdamW (single-tensor path) in f32, with the step's scalars of
/// [`AdamWStep::scalars`] (the CUDA kernel takes the same).
pub fn adamw(param: &mut CpuTensor, grad: &CpuTensor, m: &mut CpuTensor, v: &mut CpuTensor, hp: &AdamWStep) {
    let n = param.data.len();
    assert!(grad.data.len() == n && m.data.len() == n && v.data.len() == n);
    let AdamWScalars { decay, w1, w2, bc2_sqrt, step_size } = hp.scalars();
    let beta2 = hp.beta2;
    for i in 0..n {
        let g = grad.data[i] * hp.grad_scale;
        let p = param.data[i] * decay;
        // torch.lerp with a weight below 0.5: m + w·(g − m).
        let mi = if w1 < 0.5 { m.data[i] + w1 * (g - m.data[i]) } else { g - (g - m.data[i]) * (1.0 - w1) };
        let vi = v.data[i] * beta2 + w2 * (g * g);
        let denom = vi.sqrt() / bc2_sqrt + hp.eps;
        param.data[i] = p + -step_size * (mi / denom);
        m.data[i] = mi;
        v.data[i] = vi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RopeStyle;

    fn t(data: Vec<f32>, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data, rows, cols }
    }

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap()
    }

    fn wave(n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * s).sin()).collect()
    }

    /// Σ dy·f(x) as a function of x, for finite differences.
    fn fd_check(f: impl Fn(&[f32]) -> Vec<f32>, x: &[f32], dy: &[f32], grad: &[f32]) {
        let h = 1e-3f64;
        for i in (0..x.len()).step_by(7) {
            let mut xp: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let eval = |xs: &[f64]| -> f64 {
                let xf: Vec<f32> = xs.iter().map(|&v| v as f32).collect();
                f(&xf).iter().zip(dy).map(|(a, b)| *a as f64 * *b as f64).sum()
            };
            xp[i] += h;
            let up = eval(&xp);
            xp[i] -= 2.0 * h;
            let down = eval(&xp);
            let fd = (up - down) / (2.0 * h);
            assert!((fd - grad[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()), "element {i}: fd {fd} vs {}", grad[i]);
        }
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let (rows, cols) = (3, 48);
        let x = wave(rows * cols, 0.37);
        let w: Vec<f32> = wave(cols, 0.11).iter().map(|v| 1.0 + 0.3 * v).collect();
        let dy = wave(rows * cols, 0.23);
        let f = |xs: &[f32]| {
            let mut out = t(vec![0.0; rows * cols], rows, cols);
            super::super::ops::rms_norm(&pool(), &t(xs.to_vec(), rows, cols), &w, 1e-6, &mut out);
            std::mem::take(&mut out.data)
        };
        let mut dx = t(vec![0.5; rows * cols], rows, cols);
        rms_norm_backward(&pool(), &t(x.clone(), rows, cols), &w, 1e-6, &t(dy.clone(), rows, cols), &mut dx);
        let grad: Vec<f32> = dx.data.iter().map(|v| v - 0.5).collect();
        fd_check(f, &x, &dy, &grad);
    }

    #[test]
    fn silu_mul_backward_matches_finite_differences() {
        let n = 40;
        let (g, u, d) = (wave(n, 0.7), wave(n, 0.3), wave(n, 0.9));
        let (mut dg, mut du) = (t(vec![0.0; n], 1, n), t(vec![0.0; n], 1, n));
        silu_mul_backward(&pool(), &t(g.clone(), 1, n), &t(u.clone(), 1, n), &t(d.clone(), 1, n), &mut dg, &mut du);
        let silu_mul = |gs: &[f32], us: &[f32]| {
            let mut o = t(vec![0.0; n], 1, n);
            super::super::ops::silu_mul(&pool(), &t(gs.to_vec(), 1, n), &t(us.to_vec(), 1, n), &mut o);
            std::mem::take(&mut o.data)
        };
        fd_check(|gs| silu_mul(gs, &u), &g, &d, &dg.data);
        fd_check(|us| silu_mul(&g, us), &u, &d, &du.data);
    }

    #[test]
    fn rope_backward_undoes_the_rotation() {
        let table = RopeTable { inv_freq: vec![1.0, 0.1, 0.01, 0.001], style: RopeStyle::Neox };
        let x0 = wave(2 * 16, 0.41);
        let mut x = t(x0.clone(), 2, 16);
        super::super::ops::rope(&mut x, 2, 8, &[3, 17], &table);
        assert!(x.data.iter().zip(&x0).any(|(a, b)| (a - b).abs() > 1e-3));
        rope_backward(&mut x, 2, 8, &[3, 17], &table);
        for (a, b) in x.data.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn cross_entropy_loss_and_gradient() {
        let v = 37;
        let x0 = wave(2 * v, 0.31).iter().map(|a| a * 3.0).collect::<Vec<f32>>();
        let labels = [5u32, 30];
        let mut x = t(x0.clone(), 2, v);
        let sums = cross_entropy(&pool(), &mut x, &labels, Some(0.5));
        let mut want_loss = 0f64;
        let mut correct = 0;
        for r in 0..2 {
            let row: Vec<f64> = x0[r * v..(r + 1) * v].iter().map(|&a| a as f64).collect();
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = row.iter().map(|a| (a - max).exp()).sum();
            want_loss += max + sum.ln() - row[labels[r] as usize];
            let arg = row.iter().enumerate().fold(0, |b, (i, a)| if *a > row[b] { i } else { b });
            correct += (arg == labels[r] as usize) as usize;
            for (i, &a) in row.iter().enumerate() {
                let g = 0.5 * ((a - max).exp() / sum - (i == labels[r] as usize) as u8 as f64);
                assert!((x.data[r * v + i] as f64 - g).abs() < 1e-6, "row {r} col {i}");
            }
        }
        assert!((sums.loss - want_loss).abs() < 1e-5, "{} vs {want_loss}", sums.loss);
        assert_eq!(sums.correct, correct);
    }

    #[test]
    fn dropout_keeps_about_one_minus_p_and_rescales() {
        let n = 10_000;
        let x = t(vec![1.0; n], 100, 100);
        let mut out = t(vec![0.0; n], 100, 100);
        dropout(&pool(), &x, 0.25, 42, &mut out);
        let kept = out.data.iter().filter(|&&v| v != 0.0).count();
        assert!((7200..7800).contains(&kept), "{kept}");
        assert!(out.data.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
        let mut again = t(vec![0.0; n], 100, 100);
        dropout(&pool(), &x, 0.25, 42, &mut again);
        assert_eq!(out, again, "the same seed gives the same mask");
        dropout(&pool(), &x, 0.25, 43, &mut again);
        assert_ne!(out, again);
    }
}
