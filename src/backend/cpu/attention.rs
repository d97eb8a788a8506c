//! Paged attention over a flattened varlen batch: each new token attends to its
//! own sequence's cached keys up to its position (causal), reading K/V through
//! the sequence's block table. Every (token, head) is computed independently and
//! in a fixed order, so results do not depend on what else is in the batch.

use rayon::prelude::*;

use super::{CpuKvCache, CpuTensor};
use crate::backend::AttentionMeta;

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
    // Row -> (sequence, position of that token).
    let mut row_seq = vec![(usize::MAX, 0usize); q.rows];
    for (s, seq) in meta.seqs.iter().enumerate() {
        let n = seq.rows.len();
        for (i, r) in seq.rows.clone().enumerate() {
            row_seq[r] = (s, seq.context_len - n + i);
        }
    }
    let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
    pool.install(|| {
        out.data.par_chunks_mut(nh * d).enumerate().for_each(|(r, orow)| {
            let (s, pos) = row_seq[r];
            if s == usize::MAX {
                orow.fill(0.0);
                return;
            }
            let table = meta.seqs[s].block_table;
            let ctx = pos + 1;
            let mut scores = vec![0f32; ctx];
            let mut acc = vec![0f32; d];
            for h in 0..nh {
                let qh = &q.data[r * nh * d + h * d..][..d];
                let kvoff = (h / group) * d;
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    let slot = table[j / bs].index() * bs + j % bs;
                    let kj = &kc[slot * kw + kvoff..][..d];
                    *sc = dot(qh, kj) * meta.scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                acc.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let slot = table[j / bs].index() * bs + j % bs;
                    let vj = &vc[slot * kw + kvoff..][..d];
                    for (a, &v) in acc.iter_mut().zip(vj) {
                        *a += p * v;
                    }
                }
                let inv = 1.0 / sum;
                for (o, a) in orow[h * d..(h + 1) * d].iter_mut().zip(&acc) {
                    *o = a * inv;
                }
            }
        });
    });
}

/// Dot product in 8 partial sums (vectorisable, fixed order).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            p[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}
