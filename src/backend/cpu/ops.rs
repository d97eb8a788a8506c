//! Elementwise and row-wise ops, computed as transformers does in f32.

use rayon::prelude::*;

use super::CpuTensor;
use crate::backend::{RopeStyle, RopeTable};

pub fn rms_norm(pool: &rayon::ThreadPool, x: &CpuTensor, w: &[f32], eps: f32, out: &mut CpuTensor) {
    assert_eq!((x.rows, x.cols), (out.rows, out.cols));
    assert_eq!(w.len(), x.cols);
    let n = x.cols;
    let run = |(xr, or): (&[f32], &mut [f32])| {
        let ss = sum_squares(xr) / n as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    };
    if x.rows >= 64 {
        pool.install(|| x.data.par_chunks(n).zip(out.data.par_chunks_mut(n)).for_each(run));
    } else {
        x.data.chunks(n).zip(out.data.chunks_mut(n)).for_each(run);
    }
}

pub fn rope(x: &mut CpuTensor, heads: usize, head_dim: usize, positions: &[u32], table: &RopeTable) {
    rope_rotate(x, heads, head_dim, positions, table, 1.0);
}

/// Rotates each pair by `direction` (1 or -1) times its angle: -1 is the
/// inverse rotation, which is also rope's gradient.
pub fn rope_rotate(
    x: &mut CpuTensor,
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    table: &RopeTable,
    direction: f32,
) {
    assert_eq!(x.cols, heads * head_dim);
    assert_eq!(x.rows, positions.len());
    let half = head_dim / 2;
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (t, &pos) in positions.iter().enumerate() {
        for i in 0..half {
            // The angle is rounded to f32 first, as transformers computes it.
            let angle = pos as f32 * table.inv_freq[i];
            cos[i] = (angle as f64).cos() as f32;
            sin[i] = direction * (angle as f64).sin() as f32;
        }
        let row = &mut x.data[t * x.cols..(t + 1) * x.cols];
        for h in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match table.style {
                    RopeStyle::Neox => (i, i + half),
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (h[a], h[b]);
                h[a] = x1 * cos[i] - x2 * sin[i];
                h[b] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// Elements per parallel task of elementwise ops (large enough that the
/// split costs nothing; results do not depend on it).
pub const ELEMENTWISE_CHUNK: usize = 1 << 14;

pub fn silu_mul(pool: &rayon::ThreadPool, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) {
    assert_eq!(gate.data.len(), up.data.len());
    assert_eq!(gate.data.len(), out.data.len());
    let run = |(i, o): (usize, &mut [f32])| {
        let base = i * ELEMENTWISE_CHUNK;
        for (j, o) in o.iter_mut().enumerate() {
            let (g, u) = (gate.data[base + j], up.data[base + j]);
            *o = g / (1.0 + (-g).exp()) * u;
        }
    };
    if out.data.len() > ELEMENTWISE_CHUNK && pool.current_num_threads() > 1 {
        pool.install(|| out.data.par_chunks_mut(ELEMENTWISE_CHUNK).enumerate().for_each(run));
    } else {
        out.data.chunks_mut(ELEMENTWISE_CHUNK).enumerate().for_each(run);
    }
}

/// Σ v² in 16 partial sums (vectorised, fixed order).
pub fn sum_squares(x: &[f32]) -> f32 {
    let mut p = [0f32; 16];
    let c = x.chunks_exact(16);
    let rest = c.remainder();
    for v in c {
        for l in 0..16 {
            p[l] += v[l] * v[l];
        }
    }
    sum16(&p) + rest.iter().map(|v| v * v).sum::<f32>()
}

/// Pairwise sum of 16 partial sums in a fixed order.
#[inline]
pub fn sum16(p: &[f32; 16]) -> f32 {
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = p[i] + p[i + 8];
    }
    ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
}
