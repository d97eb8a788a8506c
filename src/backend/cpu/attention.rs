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
            // Keys this token sees: [first, ctx).
            let first = meta.sliding_window.map_or(0, |w| ctx.saturating_sub(w));
            let mut scores = vec![0f32; ctx - first];
            let mut acc = vec![0f32; d];
            // Blocks overlapping [first, ctx), as (cache slot of `from`, from, to).
            let spans: Vec<(usize, usize, usize)> = (first / bs..ctx.div_ceil(bs))
                .map(|bi| {
                    let from = (bi * bs).max(first);
                    (table[bi].index() * bs + from % bs, from, ((bi + 1) * bs).min(ctx))
                })
                .collect();
            for h in 0..nh {
                let qh = &q.data[r * nh * d + h * d..][..d];
                let kvoff = (h / group) * d;
                let mut max = f32::NEG_INFINITY;
                for &(slot0, from, to) in &spans {
                    for (o, sc) in scores[from - first..to - first].iter_mut().enumerate() {
                        let kj = &kc[(slot0 + o) * kw + kvoff..][..d];
                        *sc = dot(qh, kj) * meta.scale;
                        max = max.max(*sc);
                    }
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                acc.fill(0.0);
                for &(slot0, from, to) in &spans {
                    for (o, &p) in scores[from - first..to - first].iter().enumerate() {
                        let vj = &vc[(slot0 + o) * kw + kvoff..][..d];
                        for (a, &v) in acc.iter_mut().zip(vj) {
                            *a += p * v;
                        }
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

/// Dot product in 16 partial sums (vectorised, fixed order).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut p = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            p[l] += x[l] * y[l];
        }
    }
    let mut s = super::ops::sum16(&p);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}
