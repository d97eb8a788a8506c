//! The backward of causal attention over whole sequences (training).
//!
//! For query row i of head h, with keys j visible to it (causal, cut by a
//! sliding window), `p = softmax(scale · q_i·k_j)` is recomputed from q and k
//! (as FlashAttention's backward does, so no n × n matrix is kept), then with
//! `D_i = dout_i · out_i` and `ds_j = p_j (dout_i · v_j − D_i)`:
//! `dq_i = scale Σ_j ds_j k_j`, `dk_j += scale ds_j q_i`, `dv_j += p_j dout_i`.
//!
//! One task per (sequence, KV head) owns that head's dk/dv rows and its query
//! heads' dq rows, and walks the query rows in order: results do not depend on
//! the thread split.

use rayon::prelude::*;

use super::gemm::dot16;
use super::math::{exp_nonpositive, sum_fixed};
use super::CpuTensor;
use crate::backend::{AttentionMeta, RowSpan};

#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint (rows × head columns) of dq, dk and dv.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the Send wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    pool: &rayon::ThreadPool,
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    out: &CpuTensor,
    dout: &CpuTensor,
    meta: &AttentionMeta<'_>,
    dq: &mut CpuTensor,
    dk: &mut CpuTensor,
    dv: &mut CpuTensor,
) {
    let (nh, kvh, d) = (meta.num_heads, meta.kv_heads, meta.head_dim);
    let (qw, kw) = (nh * d, kvh * d);
    let rows = q.rows;
    assert_eq!((q.cols, out.cols, dout.cols, dq.cols), (qw, qw, qw, qw));
    assert_eq!((k.cols, v.cols, dk.cols, dv.cols), (kw, kw, kw, kw));
    for t in [k, v, out, dout] {
        assert_eq!(t.rows, rows);
    }
    assert_eq!((dq.rows, dk.rows, dv.rows), (rows, rows, rows));
    for s in meta.seqs {
        assert_eq!(s.context_len, s.rows.len(), "attention backward needs whole sequences");
    }
    let group = nh / kvh;
    let spans = meta.row_spans(rows);
    dq.data.fill(0.0);
    dk.data.fill(0.0);
    dv.data.fill(0.0);
    let (dqp, dkp, dvp) = (Out(dq.data.as_mut_ptr()), Out(dk.data.as_mut_ptr()), Out(dv.data.as_mut_ptr()));
    let tasks: Vec<(usize, usize)> = (0..meta.seqs.len()).flat_map(|s| (0..kvh).map(move |g| (s, g))).collect();
    let run = |&(s, g): &(usize, usize)| {
        let seq = &meta.seqs[s];
        let r0 = seq.rows.start;
        let n = seq.rows.len();
        let mut p = vec![0f32; n];
        let mut dqh = vec![0f32; d];
        for i in seq.rows.clone() {
            let Some(RowSpan { first, ctx, .. }) = spans[i] else { continue };
            let keys = first..ctx;
            for hh in 0..group {
                let h = g * group + hh;
                let qi = &q.data[i * qw + h * d..][..d];
                let oi = &out.data[i * qw + h * d..][..d];
                let doi = &dout.data[i * qw + h * d..][..d];
                let p = &mut p[..keys.len()];
                let mut max = f32::NEG_INFINITY;
                for (pj, j) in p.iter_mut().zip(keys.clone()) {
                    *pj = dot16(qi, &k.data[(r0 + j) * kw + g * d..][..d]) * meta.scale;
                    max = max.max(*pj);
                }
                for pj in p.iter_mut() {
                    *pj = exp_nonpositive(*pj - max);
                }
                let inv = 1.0 / sum_fixed(p);
                let big_d = dot16(doi, oi);
                dqh.fill(0.0);
                for (pj, j) in p.iter_mut().zip(keys.clone()) {
                    let kr = (r0 + j) * kw + g * d;
                    let prob = *pj * inv;
                    let ds = prob * (dot16(doi, &v.data[kr..kr + d]) - big_d);
                    let kj = &k.data[kr..kr + d];
                    for (a, &kv) in dqh.iter_mut().zip(kj) {
                        *a = ds.mul_add(kv, *a);
                    }
                    let sds = meta.scale * ds;
                    // SAFETY: row r0 + j of head g belongs to this task alone.
                    unsafe {
                        let dkr = dkp.get().add(kr);
                        let dvr = dvp.get().add(kr);
                        for c in 0..d {
                            *dkr.add(c) = sds.mul_add(qi[c], *dkr.add(c));
                            *dvr.add(c) = prob.mul_add(doi[c], *dvr.add(c));
                        }
                    }
                }
                // SAFETY: row i, head h belongs to this task alone.
                unsafe {
                    let dqr = dqp.get().add(i * qw + h * d);
                    for (c, a) in dqh.iter().enumerate() {
                        *dqr.add(c) = meta.scale * a;
                    }
                }
            }
        }
    };
    if tasks.len() > 1 && pool.current_num_threads() > 1 {
        pool.install(|| tasks.par_iter().for_each(run));
    } else {
        tasks.iter().for_each(run);
    }
}
