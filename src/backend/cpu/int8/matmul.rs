//! The int8 matmul driver: quantise the input rows once (into buffers kept
//! per calling thread, so a decode step allocates nothing), then split the
//! weight rows of every job into tasks over the pool.

use super::{
    dot_256_rows, dot_32_tile, quantise_256, quantise_32, supported, uses_256, Kernel, Q8Block256, Q8Row32, ROWS_256,
    TILE_ROWS,
};
use rayon::prelude::*;
use std::cell::RefCell;

/// The quantised input rows of the last matmul on this thread.
#[derive(Default)]
struct Scratch {
    q32: Vec<Q8Row32>,
    q256: Vec<Vec<Q8Block256>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Weight rows per task: enough to amortise the task, few enough to balance;
/// one packed tile for the 32-element kinds.
const ROWS: usize = TILE_ROWS;

/// `out[m, n] = Σ_k x[m, k]·w[n, k] + bias[n]` for every job, with `x`
/// quantised once (per block family the jobs need). Every job's weight kind
/// must be [`supported`].
pub fn matmul_many(
    pool: &rayon::ThreadPool,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    jobs: &mut [crate::backend::cpu::matmul::Job<'_>],
) {
    debug_assert_eq!(x.len(), m * k);
    for job in jobs.iter() {
        assert_eq!(job.w.cols, k, "matmul: weight '{}' has {} columns, input has {k}", job.w.name, job.w.cols);
        assert_eq!(job.out.len(), m * job.w.rows, "matmul: output size for '{}'", job.w.name);
        assert!(supported(job.w.kind), "int8 matmul: {:?} has no integer path", job.w.kind);
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        if jobs.iter().any(|j| !uses_256(j.w.kind)) {
            if s.q32.len() < m {
                s.q32.resize_with(m, Default::default);
            }
            quantise_rows(pool, x, k, &mut s.q32[..m], quantise_32);
        }
        if jobs.iter().any(|j| uses_256(j.w.kind)) {
            if s.q256.len() < m {
                s.q256.resize_with(m, Default::default);
            }
            quantise_rows(pool, x, k, &mut s.q256[..m], quantise_256);
        }
        run(pool, kernel, &s.q32, &s.q256, m, jobs);
    });
}

fn quantise_rows<T: Send>(pool: &rayon::ThreadPool, x: &[f32], k: usize, rows: &mut [T], f: fn(&[f32], &mut T)) {
    if rows.len() == 1 {
        f(x, &mut rows[0]);
    } else {
        pool.install(|| rows.par_iter_mut().zip(x.par_chunks(k)).for_each(|(r, x)| f(x, r)));
    }
}

fn run(
    pool: &rayon::ThreadPool,
    kernel: Kernel,
    q32: &[Q8Row32],
    q256: &[Vec<Q8Block256>],
    m: usize,
    jobs: &mut [crate::backend::cpu::matmul::Job<'_>],
) {
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: each task writes a disjoint set of output columns.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    let outs: Vec<Out> = jobs.iter_mut().map(|j| Out(j.out.as_mut_ptr())).collect();
    let jobs: &[crate::backend::cpu::matmul::Job<'_>] = jobs;
    let tasks_of = |j: &crate::backend::cpu::matmul::Job<'_>| j.w.rows.div_ceil(ROWS);
    let total: usize = jobs.iter().map(tasks_of).sum();
    let task = |t: usize| {
        // Task `t` → (job, first weight row).
        let (mut j, mut t) = (0, t);
        while t >= tasks_of(&jobs[j]) {
            t -= tasks_of(&jobs[j]);
            j += 1;
        }
        let (w, bias) = (jobs[j].w, jobs[j].bias);
        let data = w.bytes.as_slice();
        let rows = t * ROWS..((t + 1) * ROWS).min(w.rows);
        let row = |r: usize| &data[r * w.row_bytes..(r + 1) * w.row_bytes];
        // Results `v` of activation row `i` for weight rows `r0..`, plus the bias.
        let write = |i: usize, r0: usize, v: &[f32]| {
            // SAFETY: row i's columns r0..r0+len are inside this job's output, and only this task owns them.
            let dst = unsafe { std::slice::from_raw_parts_mut(outs[j].0.add(i * w.rows + r0), v.len()) };
            match bias {
                Some(b) => dst.iter_mut().zip(v).zip(&b[r0..]).for_each(|((d, v), b)| *d = v + b),
                None => dst.copy_from_slice(v),
            }
        };
        if uses_256(w.kind) {
            let mut vals = [0f32; ROWS_256];
            // Activation rows outer: a group of them and this task's weight
            // rows both stay in L1 while every pair is multiplied.
            for m0 in (0..m).step_by(ROWS_256) {
                let n = ROWS_256.min(m - m0);
                let xq: [&[Q8Block256]; ROWS_256] = std::array::from_fn(|i| &q256[(m0 + i).min(m - 1)][..]);
                for r in rows.clone() {
                    dot_256_rows(kernel, w.kind, row(r), &xq[..n], &mut vals[..n]);
                    for (i, v) in vals[..n].iter().enumerate() {
                        write(m0 + i, r, std::slice::from_ref(v));
                    }
                }
            }
        } else {
            let tile: [&[u8]; TILE_ROWS] = std::array::from_fn(|i| row((rows.start + i).min(rows.end - 1)));
            dot_32_tile(kernel, w.kind, &tile[..rows.len()], &q32[..m], |i, j0, v| write(i, rows.start + j0, v));
        }
    };
    if total <= 1 || pool.current_num_threads() == 1 {
        (0..total).for_each(task);
    } else {
        pool.install(|| (0..total).into_par_iter().for_each(task));
    }
}
