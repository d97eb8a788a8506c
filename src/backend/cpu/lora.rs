//! Batched heterogeneous LoRA on the CPU: every row of the batch that belongs
//! to an adapter segment gets `y += (x · Aᵀ) · Bt` with its own adapter's
//! matrices, rows in parallel. The shrink is a dot product per rank (64
//! independent lanes, reduced in a fixed order) and the expand a sum of scaled
//! `Bt` rows, a tile of outputs at a time; both are written so the compiler vectorises them for the ISA the
//! wrapper enables, with the same arithmetic order on every ISA, so a row's
//! result never depends on the batch around it.

use rayon::prelude::*;

use half::bf16;

use super::Isa;
use crate::backend::{LoraMatrix, LoraValues};

/// `out[r] += (x[r] · Aᵀ) · Bt` for each row `r` with `Some(matrix)` in `row_w`.
pub fn lora_add(
    pool: &rayon::ThreadPool,
    isa: Isa,
    x: &[f32],
    k: usize,
    row_w: &[Option<&LoraMatrix>],
    out: &mut [f32],
    n: usize,
) {
    let rows = row_w.len();
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(out.len(), rows * n);
    let active = row_w.iter().filter(|w| w.is_some()).count();
    if active == 0 {
        return;
    }
    let run = |(r, o): (usize, &mut [f32])| {
        if let Some(w) = row_w[r] {
            row(isa, &x[r * k..(r + 1) * k], w, o);
        }
    };
    let threads = pool.current_num_threads().max(1);
    if active == 1 || threads == 1 {
        out.chunks_mut(n).enumerate().for_each(run);
    } else {
        let min_len = (rows / (threads * 4)).max(1);
        pool.install(|| out.par_chunks_mut(n).enumerate().with_min_len(min_len).for_each(run));
    }
}

fn row(isa: Isa, x: &[f32], w: &LoraMatrix, out: &mut [f32]) {
    assert_eq!(x.len(), w.in_features);
    assert_eq!(out.len(), w.out_features);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `Isa::detect` only reports an ISA whose features the CPU has.
        match isa {
            Isa::Avx512 => return unsafe { row_avx512(x, w, out) },
            Isa::Avx2 => return unsafe { row_avx2(x, w, out) },
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    row_body(x, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512(x: &[f32], w: &LoraMatrix, out: &mut [f32]) {
    row_body(x, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2(x: &[f32], w: &LoraMatrix, out: &mut [f32]) {
    row_body(x, w, out)
}

/// A stored weight value, widened to f32 in registers.
trait Elem: Copy {
    fn f(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    /// bf16 is the top half of an f32: widening is a shift (vectorises).
    #[inline(always)]
    fn f(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Ranks handled without a heap allocation (larger ranks allocate).
const STACK_RANK: usize = 128;

#[inline(always)]
fn row_body(x: &[f32], w: &LoraMatrix, out: &mut [f32]) {
    match (&w.a, &w.bt) {
        (LoraValues::F32(a), LoraValues::F32(bt)) => row_typed(x, w, a, bt, out),
        (LoraValues::Bf16(a), LoraValues::Bf16(bt)) => row_typed(x, w, a, bt, out),
        (LoraValues::F32(a), LoraValues::Bf16(bt)) => row_typed(x, w, a, bt, out),
        (LoraValues::Bf16(a), LoraValues::F32(bt)) => row_typed(x, w, a, bt, out),
    }
}

#[inline(always)]
fn row_typed<A: Elem, B: Elem>(x: &[f32], w: &LoraMatrix, a: &[A], bt: &[B], out: &mut [f32]) {
    let (k, n, r) = (w.in_features, w.out_features, w.rank);
    let mut stack = [0f32; STACK_RANK];
    let mut heap = Vec::new();
    let v: &mut [f32] = if r <= STACK_RANK {
        &mut stack[..r]
    } else {
        heap.resize(r, 0.0);
        &mut heap
    };
    for (j, vj) in v.iter_mut().enumerate() {
        *vj = dot(x, &a[j * k..(j + 1) * k]);
    }
    // Expand a tile of outputs at a time, held in registers across the rank:
    // each output still gets out + v0·b0 + v1·b1 + ... in that order.
    const T: usize = 64;
    let split = n / T * T;
    for (t, tile) in out[..split].chunks_exact_mut(T).enumerate() {
        let o0 = t * T;
        let mut acc = [0f32; T];
        acc.copy_from_slice(tile);
        for (j, &vj) in v.iter().enumerate() {
            let b = &bt[j * n + o0..j * n + o0 + T];
            for i in 0..T {
                acc[i] += vj * b[i].f();
            }
        }
        tile.copy_from_slice(&acc);
    }
    for (o, y) in out.iter_mut().enumerate().skip(split) {
        for (j, &vj) in v.iter().enumerate() {
            *y += vj * bt[j * n + o].f();
        }
    }
}

/// Sum of products in 64 independent lanes (several vector registers, so the
/// adds do not wait on each other), then a fixed pairwise reduction.
#[inline(always)]
fn dot<B: Elem>(a: &[f32], b: &[B]) -> f32 {
    const L: usize = 64;
    let mut acc = [0f32; L];
    let split = a.len() / L * L;
    for (ca, cb) in a[..split].chunks_exact(L).zip(b[..split].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += ca[i] * cb[i].f();
        }
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    let mut s = acc[0];
    for (x, y) in a[split..].iter().zip(&b[split..]) {
        s += x * y.f();
    }
    s
}
