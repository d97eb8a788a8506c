//! `out = x · Wᵀ (+ bias)` for every weight kind, one kernel shape for all batch sizes.
//!
//! The weight is walked in panels of `NR` rows. For each panel and each K-chunk
//! of `KC` elements, the rows are dequantised into an f32 tile in L1
//! (`dequant.rs`), then a register-blocked micro-kernel accumulates
//! `MR` activation rows × `NR` weight rows.
//!
//! Batch invariance is built in: every output element is accumulated in 16
//! logical lanes (lane `l` sums the products at `k ≡ l (mod 16)`, in increasing
//! k), then the lanes are reduced in one fixed tree. Neither `MR`, the batch
//! size, the thread split nor the ISA (AVX-512 = one register per lane group,
//! AVX2 = two, scalar = an array) changes that order, so a row gives the same
//! bits alone or batched with others.

use rayon::prelude::*;

use super::{dequant::dequant_row_chunk, CpuWeight, Isa};

/// Weight rows per panel.
const NR: usize = 4;
/// K elements per dequantised chunk (a multiple of every block size).
const KC: usize = 256;
/// Logical accumulator lanes per output element.
const LANES: usize = 16;

/// One product of a grouped matmul: all jobs share the input `x`.
pub struct Job<'a> {
    pub w: &'a CpuWeight,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: each task writes a disjoint set of output columns.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Computes every job's `out[m, n] = Σ_k x[m, k]·w[n, k] + bias[n]` over `m` rows.
pub fn matmul_many(pool: &rayon::ThreadPool, isa: Isa, x: &[f32], m: usize, k: usize, jobs: &mut [Job<'_>]) {
    debug_assert_eq!(x.len(), m * k);
    // (job, first panel row) for every panel of every job, split into tasks.
    let mut panels: Vec<(usize, usize)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        assert_eq!(job.w.cols, k, "matmul: weight '{}' has {} columns, input has {k}", job.w.name, job.w.cols);
        assert_eq!(job.out.len(), m * job.w.rows, "matmul: output size for '{}'", job.w.name);
        panels.extend((0..job.w.rows).step_by(NR).map(|r| (j, r)));
    }
    let outs: Vec<SendPtr> = jobs.iter_mut().map(|j| SendPtr(j.out.as_mut_ptr())).collect();
    let jobs_ro: Vec<(&CpuWeight, Option<&[f32]>)> = jobs.iter().map(|j| (j.w, j.bias)).collect();
    let threads = pool.current_num_threads().max(1);
    // A few tasks per thread balances panels of unequal cost (different kinds).
    let per_task = panels.len().div_ceil(threads * 4).max(1);
    let mb = m_block(k);
    pool.install(|| {
        panels.par_chunks(per_task).for_each(|task| {
            let mut tile = vec![0f32; NR * KC];
            let mut acc = vec![0f32; mb * NR * LANES];
            for m0 in (0..m).step_by(mb) {
                let mrows = mb.min(m - m0);
                for &(j, r0) in task {
                    let (w, bias) = jobs_ro[j];
                    let nr = NR.min(w.rows - r0);
                    panel(isa, w, r0, nr, &x[m0 * k..(m0 + mrows) * k], mrows, k, &mut tile, &mut acc);
                    let out = outs[j];
                    for mi in 0..mrows {
                        for r in 0..nr {
                            let mut v = reduce(&acc[(mi * NR + r) * LANES..][..LANES]);
                            if let Some(b) = bias {
                                v += b[r0 + r];
                            }
                            // SAFETY: (m0+mi, r0+r) is inside this job's output and
                            // only this task owns panel (j, r0).
                            unsafe { *out.0.add((m0 + mi) * w.rows + r0 + r) = v };
                        }
                    }
                }
            }
        });
    });
}

/// Activation rows per block: keep the block of `x` around 256 KiB (L2).
fn m_block(k: usize) -> usize {
    ((256 * 1024) / (k * 4)).clamp(4, 64) / 4 * 4
}

/// Fixed-order reduction of 16 lanes (the same on every ISA).
#[inline]
fn reduce(l: &[f32]) -> f32 {
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = l[i] + l[i + 8];
    }
    let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    (u[0] + u[2]) + (u[1] + u[3])
}

/// Accumulates `mrows` rows of `x` against weight rows `r0..r0+nr` into `acc`.
#[allow(clippy::too_many_arguments)]
fn panel(
    isa: Isa,
    w: &CpuWeight,
    r0: usize,
    nr: usize,
    x: &[f32],
    mrows: usize,
    k: usize,
    tile: &mut [f32],
    acc: &mut [f32],
) {
    acc[..mrows * NR * LANES].fill(0.0);
    let row_bytes = w.row_bytes;
    let data = w.bytes.as_slice();
    for k0 in (0..k).step_by(KC) {
        let klen = KC.min(k - k0);
        for r in 0..NR {
            let t = &mut tile[r * KC..r * KC + klen];
            if r < nr {
                let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
                dequant_row_chunk(isa, w.kind, row, k0, t);
            } else {
                t.fill(0.0);
            }
        }
        micro_all(isa, x, k, k0, klen, mrows, tile, acc);
    }
}

#[allow(clippy::too_many_arguments)]
fn micro_all(isa: Isa, x: &[f32], k: usize, k0: usize, klen: usize, mrows: usize, tile: &[f32], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was detected at runtime before being chosen.
        Isa::Avx512 => unsafe { return simd::micro_avx512(x, k, k0, klen, mrows, tile, acc) },
        Isa::Avx2 => unsafe { return simd::micro_avx2(x, k, k0, klen, mrows, tile, acc) },
        Isa::Scalar => {}
    }
    let _ = isa;
    for mi in 0..mrows {
        let xr = &x[mi * k + k0..mi * k + k0 + klen];
        for r in 0..NR {
            let a = &mut acc[(mi * NR + r) * LANES..][..LANES];
            let t = &tile[r * KC..r * KC + klen];
            for (xc, tc) in xr.chunks_exact(LANES).zip(t.chunks_exact(LANES)) {
                for l in 0..LANES {
                    a[l] = xc[l].mul_add(tc[l], a[l]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{KC, LANES, NR};
    use std::arch::x86_64::*;

    /// MR = 4 rows at a time (16 accumulators), then single rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn micro_avx512(
        x: &[f32],
        k: usize,
        k0: usize,
        klen: usize,
        mrows: usize,
        tile: &[f32],
        acc: &mut [f32],
    ) {
        let t = tile.as_ptr();
        let mut mi = 0;
        while mi + 4 <= mrows {
            let mut a = [[_mm512_setzero_ps(); NR]; 4];
            for (i, ai) in a.iter_mut().enumerate() {
                for (r, v) in ai.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(acc.as_ptr().add(((mi + i) * NR + r) * LANES));
                }
            }
            let xp = x.as_ptr().add(mi * k + k0);
            let mut kk = 0;
            while kk < klen {
                let w = [
                    _mm512_loadu_ps(t.add(kk)),
                    _mm512_loadu_ps(t.add(KC + kk)),
                    _mm512_loadu_ps(t.add(2 * KC + kk)),
                    _mm512_loadu_ps(t.add(3 * KC + kk)),
                ];
                for (i, ai) in a.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(i * k + kk));
                    for r in 0..NR {
                        ai[r] = _mm512_fmadd_ps(xv, w[r], ai[r]);
                    }
                }
                kk += LANES;
            }
            for (i, ai) in a.iter().enumerate() {
                for (r, v) in ai.iter().enumerate() {
                    _mm512_storeu_ps(acc.as_mut_ptr().add(((mi + i) * NR + r) * LANES), *v);
                }
            }
            mi += 4;
        }
        while mi < mrows {
            let mut a = [_mm512_setzero_ps(); NR];
            for (r, v) in a.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(acc.as_ptr().add((mi * NR + r) * LANES));
            }
            let xp = x.as_ptr().add(mi * k + k0);
            let mut kk = 0;
            while kk < klen {
                let xv = _mm512_loadu_ps(xp.add(kk));
                for (r, v) in a.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(xv, _mm512_loadu_ps(t.add(r * KC + kk)), *v);
                }
                kk += LANES;
            }
            for (r, v) in a.iter().enumerate() {
                _mm512_storeu_ps(acc.as_mut_ptr().add((mi * NR + r) * LANES), *v);
            }
            mi += 1;
        }
    }

    /// One row at a time; each logical 16-lane accumulator is two ymm registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_avx2(x: &[f32], k: usize, k0: usize, klen: usize, mrows: usize, tile: &[f32], acc: &mut [f32]) {
        let t = tile.as_ptr();
        for mi in 0..mrows {
            let mut a = [[_mm256_setzero_ps(); 2]; NR];
            for (r, v) in a.iter_mut().enumerate() {
                let p = acc.as_ptr().add((mi * NR + r) * LANES);
                *v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
            }
            let xp = x.as_ptr().add(mi * k + k0);
            let mut kk = 0;
            while kk < klen {
                let x0 = _mm256_loadu_ps(xp.add(kk));
                let x1 = _mm256_loadu_ps(xp.add(kk + 8));
                for (r, v) in a.iter_mut().enumerate() {
                    v[0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(t.add(r * KC + kk)), v[0]);
                    v[1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(t.add(r * KC + kk + 8)), v[1]);
                }
                kk += LANES;
            }
            for (r, v) in a.iter().enumerate() {
                let p = acc.as_mut_ptr().add((mi * NR + r) * LANES);
                _mm256_storeu_ps(p, v[0]);
                _mm256_storeu_ps(p.add(8), v[1]);
            }
        }
    }
}
