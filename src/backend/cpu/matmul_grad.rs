//! `dx (+)= Σ_j dy_j · W_j`: the input gradient through frozen weights of any
//! kind, the other direction from `matmul.rs` (there each output is a dot
//! product along a weight row; here each output column is a sum of weight rows
//! scaled by `dy`).
//!
//! The weight is walked in panels of [`NB`] rows; each panel's `KC`-wide column
//! chunk is dequantised once into an f32 tile (so the model is never expanded:
//! the tile is at most `NB × KC` floats), and a register-blocked micro-kernel
//! adds `dy[m, n] · tile[n, k]` into `MR` rows × `W` columns of `dx` held in
//! registers.
//!
//! Summation order: every element of `dx` is one chain of FMAs in increasing
//! `n` (jobs in order, panel after panel), starting from 0 or the old value.
//! Neither the ISA (vector width), the register blocking nor the thread split
//! changes it, so training is bit-identical on AVX-512, AVX2 and portable code.

use rayon::prelude::*;

use super::dequant::dequant_row_chunk;
use super::{CpuWeight, Isa};

/// Weight rows per dequantised panel.
const NB: usize = 64;
/// Columns per chunk: a multiple of every block size (256 for K-quants).
const KC: usize = 256;

/// One task: output rows `m0..m1`, columns `k0..k0 + klen`.
#[derive(Clone, Copy)]
struct Task {
    m0: usize,
    m1: usize,
    k0: usize,
    klen: usize,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint (rows × columns) blocks of dx.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the Send wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dx[m, k] (+)= Σ_j Σ_n dys[j][m, n] · W_j[n, k]` over `m` rows of width `k`.
pub fn matmul_input_grad(
    pool: &rayon::ThreadPool,
    isa: Isa,
    jobs: &[(&[f32], &CpuWeight)],
    dx: &mut [f32],
    m: usize,
    k: usize,
    accumulate: bool,
) {
    debug_assert_eq!(dx.len(), m * k);
    for (dy, w) in jobs {
        assert_eq!(w.cols, k, "input grad: weight '{}' has {} columns, dx has {k}", w.name, w.cols);
        assert_eq!(dy.len(), m * w.rows, "input grad: dy size for '{}'", w.name);
    }
    if !accumulate {
        dx.fill(0.0);
    }
    if m == 0 || k == 0 {
        return;
    }
    let chunks: Vec<(usize, usize)> = (0..k).step_by(KC).map(|k0| (k0, KC.min(k - k0))).collect();
    let threads = pool.current_num_threads().max(1);
    // Enough tasks to balance uneven chunks; each extra row block costs one
    // more dequantisation of the weight's chunk.
    let row_blocks = (4 * threads).div_ceil(chunks.len()).clamp(1, m.div_ceil(8));
    let mb = m.div_ceil(row_blocks);
    let mut tasks = Vec::new();
    for &(k0, klen) in &chunks {
        for m0 in (0..m).step_by(mb) {
            tasks.push(Task { m0, m1: (m0 + mb).min(m), k0, klen });
        }
    }
    let out = SendPtr(dx.as_mut_ptr());
    let run = |t: &Task| {
        let mut tile = vec![0f32; NB * KC];
        for (dy, w) in jobs {
            let n_rows = w.rows;
            let data = w.bytes.as_slice();
            for n0 in (0..n_rows).step_by(NB) {
                let nb = NB.min(n_rows - n0);
                for r in 0..nb {
                    let row = &data[(n0 + r) * w.row_bytes..(n0 + r + 1) * w.row_bytes];
                    dequant_row_chunk(isa, w.kind, row, t.k0, &mut tile[r * KC..r * KC + t.klen]);
                }
                let p = Panel { dy, n: n_rows, n0, nb, tile: &tile, k, task: *t };
                // SAFETY: the task owns rows m0..m1 × columns k0..k0+klen of dx.
                unsafe { panel(isa, &p, out.get()) };
            }
        }
    };
    if tasks.len() == 1 || threads == 1 {
        tasks.iter().for_each(run);
    } else {
        pool.install(|| tasks.par_iter().for_each(run));
    }
}

/// One dequantised panel of weight rows `n0..n0 + nb` against a task's block of dx.
struct Panel<'a> {
    dy: &'a [f32],
    /// Row width of dy (the weight's rows).
    n: usize,
    n0: usize,
    nb: usize,
    /// `nb` rows, `KC` floats apart.
    tile: &'a [f32],
    /// Row width of dx.
    k: usize,
    task: Task,
}

/// # Safety
/// `dx` points at an `m × k` buffer and no other thread touches the task's block.
unsafe fn panel(isa: Isa, p: &Panel<'_>, dx: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: an ISA is only chosen after run-time detection of its features.
        Isa::Avx512 => return simd::panel_avx512(p, dx),
        Isa::Avx2 => return simd::panel_avx2(p, dx),
        Isa::Scalar => {}
    }
    let _ = isa;
    panel_generic::<4, 16>(p, dx)
}

/// The micro-kernel in portable code: `MR` rows × `W` columns of dx in a local
/// array, FMAs in increasing n. Compiled per ISA by the wrappers below (the
/// arrays become vector registers); every element sees the same operations.
#[inline(always)]
unsafe fn panel_generic<const MR: usize, const W: usize>(p: &Panel<'_>, dx: *mut f32) {
    let t = p.task;
    let mut mi = t.m0;
    while mi < t.m1 {
        let rows = (t.m1 - mi).min(MR);
        if rows == MR {
            block::<MR, W>(p, dx, mi);
        } else {
            for r in 0..rows {
                block::<1, W>(p, dx, mi + r);
            }
        }
        mi += rows;
    }
}

#[inline(always)]
unsafe fn block<const R: usize, const W: usize>(p: &Panel<'_>, dx: *mut f32, mi: usize) {
    let t = p.task;
    let mut c = 0;
    while c < t.klen {
        if c + W <= t.klen {
            strip::<R, W>(p, dx, mi, c);
            c += W;
        } else {
            // Column counts are multiples of 16 (checked at weight load).
            strip::<R, 16>(p, dx, mi, c);
            c += 16;
        }
    }
}

#[inline(always)]
unsafe fn strip<const R: usize, const W: usize>(p: &Panel<'_>, dx: *mut f32, mi: usize, c: usize) {
    let col = p.task.k0 + c;
    let mut acc = [[0f32; W]; R];
    for (i, a) in acc.iter_mut().enumerate() {
        let src = dx.add((mi + i) * p.k + col);
        for (l, v) in a.iter_mut().enumerate() {
            *v = *src.add(l);
        }
    }
    let dy = p.dy.as_ptr();
    let tile = p.tile.as_ptr();
    for n in 0..p.nb {
        let wrow = tile.add(n * KC + c);
        let mut w = [0f32; W];
        for (l, v) in w.iter_mut().enumerate() {
            *v = *wrow.add(l);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let s = *dy.add((mi + i) * p.n + p.n0 + n);
            for l in 0..W {
                a[l] = s.mul_add(w[l], a[l]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let dst = dx.add((mi + i) * p.k + col);
        for (l, v) in a.iter().enumerate() {
            *dst.add(l) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{panel_generic, Panel};

    /// 4 rows × 64 columns: 16 zmm accumulators.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn panel_avx512(p: &Panel<'_>, dx: *mut f32) {
        panel_generic::<4, 64>(p, dx)
    }

    /// 6 rows × 16 columns: 12 ymm accumulators, leaving room for the weights.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel_avx2(p: &Panel<'_>, dx: *mut f32) {
        panel_generic::<6, 16>(p, dx)
    }
}
