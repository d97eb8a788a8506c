//! `out = x · Wᵀ (+ bias)` for every weight kind and batch size.
//!
//! Two paths share one summation order:
//! - decode (≤ 4 activation rows, AVX-512 or AVX2): each weight row is decoded block by
//!   block into registers and multiplied straight away (`fused_rows`);
//! - larger batches: the weight is walked in panels of `NR` rows; each `KC`-wide
//!   chunk is dequantised into an f32 tile in L1 and a register-blocked
//!   micro-kernel multiplies it with the activation rows.
//!
//! The summation order (the batch-invariance contract): elements are taken in
//! groups of 16 (`LANES`); group `g` is added, lane by lane, into chain
//! `g % CHAINS` with one FMA, in increasing `g`; at the end the chains are summed
//! `(c0 + c1) + (c2 + c3)` and the 16 lanes reduced in one fixed tree. Neither the
//! path, the batch size, the row blocking, the thread split nor the ISA changes
//! this, so a row gives the same bits alone or batched with others. Four chains
//! keep independent FMAs in flight when one activation row is all there is.

use rayon::prelude::*;

use super::{dequant::dequant_row_chunk, CpuWeight, Isa};

/// Weight rows per panel.
const NR: usize = 4;
/// K elements per dequantised chunk (a multiple of every block size and of 64).
const KC: usize = 1024;
/// Lanes per group.
const LANES: usize = 16;
/// Independent accumulation chains per output element.
const CHAINS: usize = 4;
/// Floats of accumulator per output element.
const ACC: usize = LANES * CHAINS;

/// One product of a grouped matmul: all jobs share the input `x`.
pub struct Job<'a> {
    pub w: &'a CpuWeight,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// One K-chunk of the tile path: rows of `x` against the dequantised tile.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    /// Activation rows, `k` floats each.
    x: &'a [f32],
    k: usize,
    /// First element of the chunk and its length.
    k0: usize,
    klen: usize,
    /// Activation rows to process.
    mrows: usize,
    /// NR dequantised weight rows, `KC` floats apart.
    tile: &'a [f32],
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
    let run = |task: &[(usize, usize)]| {
        let mut tile = vec![0f32; NR * KC];
        let mut acc = vec![0f32; mb * NR * ACC];
        for m0 in (0..m).step_by(mb) {
            let mrows = mb.min(m - m0);
            for &(j, r0) in task {
                let (w, bias) = jobs_ro[j];
                let nr = NR.min(w.rows - r0);
                panel(isa, w, r0, nr, &x[m0 * k..(m0 + mrows) * k], mrows, k, &mut tile, &mut acc);
                let out = outs[j];
                for mi in 0..mrows {
                    for r in 0..nr {
                        let mut v = reduce(isa, &acc[(mi * NR + r) * ACC..][..ACC]);
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
    };
    if panels.len() <= 1 || threads == 1 {
        run(&panels);
    } else {
        pool.install(|| panels.par_chunks(per_task).for_each(run));
    }
}

/// Up to this many activation rows, weights are decoded in registers (once per
/// 4 rows) instead of through a tile. Measured (docs/benchmarks.md): the tile
/// wins from 8 rows up.
const FUSED_MAX_ROWS: usize = 4;

/// Activation rows per block: keep one K-chunk of the block's rows of `x`
/// around 256 KiB (L2) while the dequantised tile (NR × KC) sits in L1.
fn m_block(k: usize) -> usize {
    ((256 * 1024) / (k.min(KC) * 4)).clamp(4, 64) / 4 * 4
}

/// The fixed reduction of one output element's `CHAINS × LANES` accumulators.
#[inline]
pub(super) fn reduce(isa: Isa, a: &[f32]) -> f32 {
    debug_assert!(a.len() >= ACC);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: AVX-512 was detected; `a` holds ACC floats.
        return unsafe { simd::reduce_avx512(a.as_ptr()) };
    }
    let _ = isa;
    reduce_scalar(a)
}

/// The reference order of [`reduce`]: chains pairwise, then lanes in halves.
pub(super) fn reduce_scalar(a: &[f32]) -> f32 {
    let mut l = [0f32; LANES];
    for (i, v) in l.iter_mut().enumerate() {
        *v = (a[i] + a[LANES + i]) + (a[2 * LANES + i] + a[3 * LANES + i]);
    }
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = l[i] + l[i + 8];
    }
    let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    (u[0] + u[2]) + (u[1] + u[3])
}

/// Accumulates `mrows` rows of `x` against weight rows `r0..r0+nr` into `acc`
/// (`acc[(mi * NR + r) * ACC ..]`).
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
    let row_bytes = w.row_bytes;
    let data = w.bytes.as_slice();
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && mrows <= FUSED_MAX_ROWS && super::dequant::simd::supported(w.kind) {
        for r in 0..nr {
            let row = &data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
            for m0 in (0..mrows).step_by(4) {
                let mr = 4.min(mrows - m0);
                let (xs, a) = (&x[m0 * k..], &mut acc[(m0 * NR + r) * ACC..]);
                // SAFETY: the ISA was detected at run time; the row holds k elements of w.kind.
                unsafe {
                    match isa {
                        Isa::Avx512 => simd::fused_rows_avx512(w.kind, row, xs, k, mr, a),
                        _ => simd::fused_rows_avx2(w.kind, row, xs, k, mr, a),
                    }
                }
            }
        }
        return;
    }
    // The first chunk starts its accumulators from zero instead of loading them.
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
        micro_all(isa, &Chunk { x, k, k0, klen, mrows, tile }, acc);
    }
}

fn micro_all(isa: Isa, c: &Chunk<'_>, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the ISA was detected at runtime before being chosen.
        Isa::Avx512 => unsafe { return simd::micro_avx512(c, acc) },
        Isa::Avx2 => unsafe { return simd::micro_avx2(c, acc) },
        Isa::Scalar => {}
    }
    let _ = isa;
    let Chunk { x, k, k0, klen, mrows, tile } = *c;
    for mi in 0..mrows {
        for r in 0..NR {
            let a = &mut acc[(mi * NR + r) * ACC..][..ACC];
            if k0 == 0 {
                a.fill(0.0);
            }
            for g in 0..klen / LANES {
                let c = (k0 / LANES + g) % CHAINS;
                for l in 0..LANES {
                    let (xv, wv) = (x[mi * k + k0 + g * LANES + l], tile[r * KC + g * LANES + l]);
                    a[c * LANES + l] = xv.mul_add(wv, a[c * LANES + l]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Chunk, ACC, CHAINS, KC, LANES, NR};
    use crate::backend::cpu::dequant::simd::{decode, Avx2, Avx512, Lanes};
    use crate::quant::ggml::WeightKind;
    use std::arch::x86_64::*;

    /// [`super::reduce_scalar`] in vector registers, with the same additions in
    /// the same order.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn reduce_avx512(a: *const f32) -> f32 {
        let c0 = _mm512_loadu_ps(a);
        let c1 = _mm512_loadu_ps(a.add(LANES));
        let c2 = _mm512_loadu_ps(a.add(2 * LANES));
        let c3 = _mm512_loadu_ps(a.add(3 * LANES));
        let l = _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3));
        // t[i] = l[i] + l[i + 8]
        let t = _mm256_add_ps(_mm512_castps512_ps256(l), _mm512_extractf32x8_ps(l, 1));
        // u[j] = t[j] + t[j + 4]
        let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        // (u0 + u2) + (u1 + u3)
        let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps(v, v, 1)))
    }

    /// One weight row against `mrows` (≤ 4) activation rows, decoded in registers.
    /// Writes the row's accumulators for each activation row `mi` at
    /// `acc[mi * NR * ACC..]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn fused_rows_avx512(kind: WeightKind, row: &[u8], x: &[f32], k: usize, mrows: usize, acc: &mut [f32]) {
        fused_rows::<Avx512>(kind, row, x, k, mrows, acc)
    }

    /// [`fused_rows_avx512`] on AVX2: each 16-lane group is two ymm registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fused_rows_avx2(kind: WeightKind, row: &[u8], x: &[f32], k: usize, mrows: usize, acc: &mut [f32]) {
        fused_rows::<Avx2>(kind, row, x, k, mrows, acc)
    }

    #[inline(always)]
    unsafe fn fused_rows<V: Lanes>(kind: WeightKind, row: &[u8], x: &[f32], k: usize, mrows: usize, acc: &mut [f32]) {
        match mrows {
            1 => fused::<V, 1>(kind, row, x, k, acc),
            2 => fused::<V, 2>(kind, row, x, k, acc),
            3 => fused::<V, 3>(kind, row, x, k, acc),
            _ => fused::<V, 4>(kind, row, x, k, acc),
        }
    }

    #[inline(always)]
    unsafe fn fused<V: Lanes, const M: usize>(kind: WeightKind, row: &[u8], x: &[f32], k: usize, acc: &mut [f32]) {
        // Group g always goes into slot 0, then the slots rotate: slot 0 holds
        // chain g % CHAINS when group g arrives. Constant indices keep the
        // accumulators in registers (a computed index would spill them).
        let mut a = [[V::zero(); CHAINS]; M];
        let nblocks = if kind == WeightKind::F16 { k } else { k / kind.block_size() };
        let xp = x.as_ptr();
        decode::<V, _>(kind, row.as_ptr(), nblocks, |g, v| {
            for (m, am) in a.iter_mut().enumerate() {
                let s0 = V::load(xp.add(m * k + g * LANES)).fmadd(v, am[0]);
                *am = [am[1], am[2], am[3], s0];
            }
        });
        // After n groups, slot p holds chain (p + n) % CHAINS.
        let n = k / LANES;
        for (m, am) in a.iter().enumerate() {
            for c in 0..CHAINS {
                am[(c + CHAINS - n % CHAINS) % CHAINS].store(acc.as_mut_ptr().add(m * NR * ACC + c * LANES));
            }
        }
    }

    /// The tile micro-kernel on AVX-512: 4 activation rows × NR weight rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn micro_avx512(c: &Chunk<'_>, acc: &mut [f32]) {
        micro::<Avx512, 4>(c, acc)
    }

    /// The tile micro-kernel on AVX2: one activation row at a time (an
    /// accumulator is two of the 16 ymm registers).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro_avx2(c: &Chunk<'_>, acc: &mut [f32]) {
        micro::<Avx2, 1>(c, acc)
    }

    /// Accumulates the chunk's activation rows against the NR tile rows, MR
    /// rows at a time (then single rows), one chain at a time.
    #[inline(always)]
    unsafe fn micro<V: Lanes, const MR: usize>(c: &Chunk<'_>, acc: &mut [f32]) {
        let mut mi = 0;
        while mi < c.mrows {
            if mi + MR <= c.mrows {
                rows::<V, MR>(c, mi, acc);
                mi += MR;
            } else {
                rows::<V, 1>(c, mi, acc);
                mi += 1;
            }
        }
    }

    #[inline(always)]
    unsafe fn rows<V: Lanes, const R: usize>(c: &Chunk<'_>, mi: usize, acc: &mut [f32]) {
        let Chunk { x, k, k0, klen, tile, .. } = *c;
        let t = tile.as_ptr();
        let ap = acc.as_mut_ptr();
        let xp = x.as_ptr().add(mi * k + k0);
        let g0 = k0 / LANES;
        for c in 0..CHAINS {
            // First group of this chunk that belongs to chain c.
            let first = (c + CHAINS - g0 % CHAINS) % CHAINS;
            let at = |i: usize, r: usize| ((mi + i) * NR + r) * ACC + c * LANES;
            let mut a = [[V::zero(); NR]; R];
            // The first chunk starts from zero instead of loading.
            if k0 > 0 {
                for (i, ai) in a.iter_mut().enumerate() {
                    for (r, v) in ai.iter_mut().enumerate() {
                        *v = V::load(ap.add(at(i, r)));
                    }
                }
            }
            let mut kk = first * LANES;
            while kk < klen {
                if R == 1 {
                    // One row: load each weight vector at its use (with AVX2's 16
                    // registers, holding all four would spill accumulators).
                    let xv = V::load(xp.add(kk));
                    for (r, v) in a[0].iter_mut().enumerate() {
                        *v = xv.fmadd(V::load(t.add(r * KC + kk)), *v);
                    }
                } else {
                    let w = [
                        V::load(t.add(kk)),
                        V::load(t.add(KC + kk)),
                        V::load(t.add(2 * KC + kk)),
                        V::load(t.add(3 * KC + kk)),
                    ];
                    for (i, ai) in a.iter_mut().enumerate() {
                        let xv = V::load(xp.add(i * k + kk));
                        for r in 0..NR {
                            ai[r] = xv.fmadd(w[r], ai[r]);
                        }
                    }
                }
                kk += CHAINS * LANES;
            }
            for (i, ai) in a.iter().enumerate() {
                for (r, v) in ai.iter().enumerate() {
                    v.store(ap.add(at(i, r)));
                }
            }
        }
    }
}
