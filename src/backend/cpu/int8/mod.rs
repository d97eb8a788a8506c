//! 8-bit activations: each activation row is quantised once per matmul input
//! (per 32-element block for Q4_0/Q5_0/Q8_0 weights, per 256-element
//! super-block with 16-element sums for the K-quants), and every weight block
//! is multiplied with it in integers (`maddubs` on AVX2, `vpdpbusd` with
//! AVX-VNNI and AVX512-VNNI), as llama.cpp's `ggml_vec_dot_*_q8_*` functions
//! do. Written from the formats, not copied.
//!
//! The summation contract (batch, thread and ISA invariance): a block's
//! integer sums are exact, however a kernel computes them, so only the float
//! steps fix the result, and they are the same in the scalar and SIMD code.
//! - 32-element blocks: the exact integer dot of the whole block, then
//!   `acc = fma(f16(d_w)·d_x, dot, acc)` in block order. Whole-block sums let
//!   the kernels put one weight row per lane (a tile of 8 or 16 rows, packed
//!   once per matmul and reused by every activation row: see `tile.rs`).
//! - 256-element super-blocks: the exact integer sum of the whole super-block
//!   (scales applied in integers), then `acc = fma(d_w·d_x, sum, acc)` (and the
//!   minimum's term into its own accumulator) in block order.
//!
//! Kernels may compute a dot from unsigned weight codes (`q + 8` for Q4_0,
//! `q + 16` for Q5_0, `q + 128` for Q8_0) and add `offset · (−Σx)` from the
//! block sums stored beside the activation codes: the integer is the same.
//!
//! A row's quantisation depends only on the row, and each output is one dot
//! of one weight row with one activation row: batching, threads and the ISA
//! cannot change a bit (tests here and in backend/cpu/tests.rs).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod kquant;
mod matmul;
#[cfg(target_arch = "x86_64")]
mod tile;

pub use matmul::matmul_many;

use super::Isa;
use crate::quant::ggml::{f16_to_f32, get_scale_min_k4, WeightKind};

/// Which integer kernels run: chosen once per backend from the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// `maddubs` on 256-bit registers (AVX2-only machines such as Zen 3).
    Avx2,
    /// `vpdpbusd` on 256-bit registers (AVX-VNNI without AVX-512).
    AvxVnni,
    /// `vpdpbusd` on 512-bit registers (16 weight rows per register for 32-element blocks).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel the CPU allows under `isa` (`TANDEM_CPU_ISA=avx2`
    /// gives plain AVX2, as on a machine without any VNNI).
    pub fn for_isa(isa: Isa) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let plain_avx2 = std::env::var("TANDEM_CPU_ISA").as_deref() == Ok("avx2");
            match isa {
                Isa::Scalar => {}
                Isa::Avx512 if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512dq") => {
                    return Self::Avx512Vnni
                }
                _ if !plain_avx2 && is_x86_feature_detected!("avxvnni") => return Self::AvxVnni,
                _ => return Self::Avx2,
            }
        }
        let _ = isa;
        Self::Scalar
    }

    /// Every kernel this CPU can run (the tests compare them all with the scalar twin).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                v.push(Self::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    v.push(Self::AvxVnni);
                }
                if Kernel::for_isa(Isa::Avx512) == Kernel::Avx512Vnni && Isa::detect() == Isa::Avx512 {
                    v.push(Self::Avx512Vnni);
                }
            }
        }
        v
    }
}

/// One activation row for 32-element weight blocks.
#[derive(Clone, Debug, Default)]
pub struct Q8Row32 {
    /// The codes, one per element.
    pub q: Vec<i8>,
    /// Per block: its scale `max|x| / 127`.
    pub d: Vec<f32>,
    /// Per block: minus the sum of its codes (kernels on unsigned weight
    /// codes add `offset · this`).
    pub neg_sums: Vec<i32>,
}

/// An activation super-block for 256-element weight blocks.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Q8Block256 {
    pub d: f32,
    /// Sums of `q` over each 16 elements.
    pub bsums: [i16; 16],
    pub q: [i8; 256],
}

/// How far ahead of the weights being decoded the kernels prefetch (bytes):
/// the hardware prefetchers alone left a core at ~60% of its streaming rate,
/// with the decode's instructions filling the window that would overlap misses.
const PREFETCH: usize = 1024;

/// The 32-element kinds as constants for the kernels' generic parameter.
pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q5_0: u8 = 1;
pub(crate) const Q8_0: u8 = 2;
/// bitsandbytes' 4-bit kinds: 64-element blocks, seen by the tile as two
/// 32-element blocks with the same scale.
pub(crate) const NF4: u8 = 3;
pub(crate) const FP4: u8 = 4;
/// The group-wise int4 kinds: one stored block per group of 128, 64 or 32,
/// seen by the tile as 4, 2 or 1 32-element blocks sharing the group's scale
/// and zero. Their codes `q − z + 16` (0..=31) go through Q5_0's multiply.
pub(crate) const INT4G128: u8 = 5;
pub(crate) const INT4G64: u8 = 6;
pub(crate) const INT4G32: u8 = 7;

/// Whether the kernels' kind constant is a group-wise int4 kind.
pub(crate) const fn is_int4g(k: u8) -> bool {
    k == INT4G128 || k == INT4G64 || k == INT4G32
}

/// The 32-element blocks in one stored block of the kernels' kind `k`.
pub(crate) const fn blocks_per_stored(k: u8) -> usize {
    match k {
        NF4 | FP4 | INT4G64 => 2,
        INT4G128 => 4,
        _ => 1,
    }
}

/// Whether the kernels' kind constant is a bitsandbytes kind.
pub(crate) const fn is_bnb(k: u8) -> bool {
    k == NF4 || k == FP4
}

/// bitsandbytes' code values as integers: `round(code · 127)` (NF4, FP4).
/// The one place an integer path is not exact in its weights: each value
/// moves by at most 0.5/127 of the block's absmax (llama.cpp's IQ4_NL makes
/// the same trade), against the activation's own rounding of 0.5/127 of its
/// block maximum.
pub const BNB_I8: [[i8; 16]; 2] = [
    [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127],
    [0, 1, 85, 127, 42, 64, 21, 32, 0, -1, -85, -127, -42, -64, -21, -32],
];

/// The 32-element blocks of a row of `kind` that is `len` bytes long.
pub fn blocks_32(kind: WeightKind, len: usize) -> usize {
    len / kind.type_size() * (kind.block_size() / 32)
}

/// Whether weights of `kind` have an integer path.
pub fn supported(kind: WeightKind) -> bool {
    matches!(
        kind,
        WeightKind::Q4_0
            | WeightKind::Q5_0
            | WeightKind::Q8_0
            | WeightKind::Q4K
            | WeightKind::Q5K
            | WeightKind::Q6K
            | WeightKind::Nf4
            | WeightKind::Fp4
            | WeightKind::Int4G128
            | WeightKind::Int4G64
            | WeightKind::Int4G32
    )
}

/// Whether `kind` pairs with 256-element activation blocks.
pub fn uses_256(kind: WeightKind) -> bool {
    matches!(kind, WeightKind::Q4K | WeightKind::Q5K | WeightKind::Q6K)
}

/// The scale and codes of one block (a multiple of 8 long): `d = max|x| / 127`,
/// `q = round(x / d)`, rounding half away from zero. Written so that LLVM
/// vectorises it (eight running maxima; `round` as truncation plus a
/// correction, exactly `f32::round`), since at prefill sizes quantising took
/// 8% of a step.
fn quantise_into(x: &[f32], q: &mut [i8]) -> f32 {
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = m.iter().fold(0f32, |a, &b| a.max(b));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &v) in q.iter_mut().zip(x) {
        let y = v * id;
        let t = y.trunc();
        let r = if (y - t).abs() >= 0.5 { t + 1f32.copysign(y) } else { t };
        *qi = r.clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Row `x` (a multiple of 32 long) as 32-element blocks, reusing `out`'s buffers.
pub fn quantise_32(x: &[f32], out: &mut Q8Row32) {
    let n = x.len() / 32;
    out.q.resize(32 * n, 0);
    out.d.resize(n, 0.0);
    out.neg_sums.resize(n, 0);
    for (i, (c, q)) in x.chunks_exact(32).zip(out.q.chunks_exact_mut(32)).enumerate() {
        out.d[i] = quantise_into(c, q);
        out.neg_sums[i] = -q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// Row `x` (a multiple of 256 long) as 256-element super-blocks, reusing `out`.
pub fn quantise_256(x: &[f32], out: &mut Vec<Q8Block256>) {
    out.clear();
    for c in x.chunks_exact(256) {
        let mut b = Q8Block256 { d: 0.0, bsums: [0; 16], q: [0; 256] };
        b.d = quantise_into(c, &mut b.q);
        for (s, g) in b.bsums.iter_mut().zip(b.q.chunks_exact(16)) {
            *s = g.iter().map(|&v| v as i16).sum();
        }
        out.push(b);
    }
}

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// The signed codes of 32-element block `i` of a row of `kind` (Q4_0,
/// Q5_0, Q8_0, NF4/FP4 as [`BNB_I8`], group-wise int4 `q − z`) and the
/// block's weight scale: the stored f16 `d` (the group's, for int4), or a
/// bitsandbytes block's `absmax / 127`.
#[inline]
fn block_32(kind: WeightKind, row: &[u8], i: usize, w: &mut [i32; 32]) -> f32 {
    if kind.is_int4_group() {
        let subs = kind.block_size() / 32;
        let group = &row[(i / subs) * kind.type_size()..][..kind.type_size()];
        let z = i32::from(group[2]);
        for (j, &byte) in group[4 + (i % subs) * 16..][..16].iter().enumerate() {
            w[j] = i32::from(byte & 0xF) - z;
            w[j + 16] = i32::from(byte >> 4) - z;
        }
        return f16_at(group, 0);
    }
    if let WeightKind::Nf4 | WeightKind::Fp4 = kind {
        let lut = &BNB_I8[usize::from(kind == WeightKind::Fp4)];
        let blk = &row[(i / 2) * 36..(i / 2) * 36 + 36];
        for (j, &byte) in blk[4 + (i % 2) * 16..][..16].iter().enumerate() {
            w[2 * j] = i32::from(lut[usize::from(byte >> 4)]);
            w[2 * j + 1] = i32::from(lut[usize::from(byte & 0xF)]);
        }
        return f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]) / 127.0;
    }
    let b = &row[i * kind.type_size()..(i + 1) * kind.type_size()];
    match kind {
        WeightKind::Q4_0 => {
            for j in 0..16 {
                w[j] = (b[2 + j] & 0xF) as i32 - 8;
                w[j + 16] = (b[2 + j] >> 4) as i32 - 8;
            }
        }
        WeightKind::Q5_0 => {
            let h = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                w[j] = ((b[6 + j] & 0xF) as u32 | (((h >> j) & 1) << 4)) as i32 - 16;
                w[j + 16] = ((b[6 + j] >> 4) as u32 | (((h >> (j + 16)) & 1) << 4)) as i32 - 16;
            }
        }
        WeightKind::Q8_0 => {
            for j in 0..32 {
                w[j] = b[2 + j] as i8 as i32;
            }
        }
        _ => unreachable!("not a 32-element kind"),
    }
    f16_at(b, 0)
}

/// `Σ w·x` of one weight row of a 32-element kind with a quantised row (scalar twin).
pub fn dot_32_scalar(kind: WeightKind, row: &[u8], x: &Q8Row32) -> f32 {
    let mut acc = 0f32;
    let mut w = [0i32; 32];
    for i in 0..blocks_32(kind, row.len()) {
        let d = block_32(kind, row, i, &mut w);
        let xq = &x.q[32 * i..32 * i + 32];
        let dot: i32 = w.iter().zip(xq).map(|(&w, &x)| w * x as i32).sum();
        acc = (d * x.d[i]).mul_add(dot as f32, acc);
    }
    acc
}

/// The codes (0..63 for Q4_K/Q5_K unsigned; Q6_K signed, -32 applied) and the
/// per-group integer scale of one super-block: `codes[e]`, `scale[e / 16]`,
/// and for Q4_K/Q5_K the minimum per 32-element sub-block.
struct Super {
    codes: [i32; 256],
    /// Per 16-element group.
    scales: [i32; 16],
    /// Q4_K / Q5_K: per 32-element sub-block.
    mins: [i32; 8],
    d: f32,
    dmin: f32,
}

fn decode_super(kind: WeightKind, b: &[u8]) -> Super {
    let mut s = Super { codes: [0; 256], scales: [0; 16], mins: [0; 8], d: 0.0, dmin: 0.0 };
    match kind {
        WeightKind::Q4K | WeightKind::Q5K => {
            s.d = f16_at(b, 0);
            s.dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let (qh, qs) = if kind == WeightKind::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
            for sub in 0..8 {
                let (sc, m) = get_scale_min_k4(sub, scales);
                s.scales[2 * sub] = sc as i32;
                s.scales[2 * sub + 1] = sc as i32;
                s.mins[sub] = m as i32;
                let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
                for l in 0..32 {
                    let mut v = if sub % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                    if let Some(qh) = qh {
                        v |= ((qh[l] >> sub) & 1) << 4;
                    }
                    s.codes[32 * sub + l] = v as i32;
                }
            }
        }
        WeightKind::Q6K => {
            s.d = f16_at(b, 208);
            for h in 0..2 {
                let ql = &b[64 * h..64 * h + 64];
                let qh = &b[128 + 32 * h..128 + 32 * h + 32];
                let sc = &b[192 + 8 * h..192 + 8 * h + 8];
                for l in 0..32 {
                    let c = &mut s.codes[128 * h..128 * h + 128];
                    c[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    c[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    c[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    c[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
                for (g, &v) in sc.iter().enumerate() {
                    s.scales[8 * h + g] = v as i8 as i32;
                }
            }
        }
        _ => unreachable!("not a K-quant"),
    }
    s
}

/// `Σ w·x` of one weight row of a K-quant with a quantised row (scalar twin).
pub fn dot_256_scalar(kind: WeightKind, row: &[u8], x: &[Q8Block256]) -> f32 {
    let ts = kind.type_size();
    let (mut acc, mut corr) = (0f32, 0f32);
    for (b, xb) in row.chunks_exact(ts).zip(x) {
        let s = decode_super(kind, b);
        let mut sumi = 0i32;
        for g in 0..16 {
            let dot: i32 = (16 * g..16 * g + 16).map(|e| s.codes[e] * xb.q[e] as i32).sum();
            sumi += s.scales[g] * dot;
        }
        acc = (s.d * xb.d).mul_add(sumi as f32, acc);
        if kind != WeightKind::Q6K {
            let summ: i32 = (0..8).map(|j| s.mins[j] * (xb.bsums[2 * j] as i32 + xb.bsums[2 * j + 1] as i32)).sum();
            corr = (s.dmin * xb.d).mul_add(summ as f32, corr);
        }
    }
    acc - corr
}

/// The most activation rows one [`dot_256_rows`] call takes.
pub const MAX_ROWS: usize = 16;

/// Activation rows per [`dot_256_rows`] call (each super-block is decoded
/// once per call; 16 rows of K-quant sums spill, and their long rows leave L1).
pub const ROWS_256: usize = 8;

/// Weight rows `rows` (1 to [`TILE_ROWS`], each a whole row of a 32-element
/// kind) against activation rows `xs`: `sink(i, j, v)` receives row `xs[i]`'s
/// results for weight rows `j..j + v.len()`, each with exactly its
/// single-pair arithmetic. The rows are packed once (a weight row per lane),
/// then every activation row reuses them.
pub fn dot_32_tile(
    kernel: Kernel,
    kind: WeightKind,
    rows: &[&[u8]],
    xs: &[Q8Row32],
    mut sink: impl FnMut(usize, usize, &[f32]),
) {
    debug_assert!(!rows.is_empty() && rows.len() <= TILE_ROWS);
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Scalar {
        // SAFETY: `Kernel::for_isa` / `available` only name kernels whose features were detected.
        unsafe { tile::dot_32_tile(kernel, kind, rows, xs, &mut sink) };
        return;
    }
    let mut vals = [0f32; TILE_ROWS];
    for (i, x) in xs.iter().enumerate() {
        for (v, row) in vals.iter_mut().zip(rows) {
            *v = dot_32_scalar(kind, row, x);
        }
        sink(i, 0, &vals[..rows.len()]);
    }
}

/// Weight rows per [`dot_32_tile`] call.
pub const TILE_ROWS: usize = 16;

/// K-quant weight row `row` against up to [`MAX_ROWS`] quantised activation
/// rows at once (`out[i]` for `xs[i]`), each with exactly its single-row arithmetic.
pub fn dot_256_rows(kernel: Kernel, kind: WeightKind, row: &[u8], xs: &[&[Q8Block256]], out: &mut [f32]) {
    debug_assert!(xs.len() <= MAX_ROWS && out.len() >= xs.len());
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Scalar {
        macro_rules! go {
            ($call:expr, $n:literal) => {{
                let v: [&[Q8Block256]; $n] = std::array::from_fn(|i| xs[i]);
                // SAFETY: `Kernel::for_isa` / `available` only name kernels whose features were detected.
                out[..$n].copy_from_slice(&unsafe { $call(kind, row, v) });
            }};
        }
        // One instance per (kernel, kind, rows): the kind's decoding and the
        // row count are constants inside the loop.
        macro_rules! by_rows {
            ($($f:ident)::+, $k:block) => {
                match xs.len() {
                    1 => go!($($f)::+::<$k, 1>, 1),
                    2 => go!($($f)::+::<$k, 2>, 2),
                    3 => go!($($f)::+::<$k, 3>, 3),
                    4 => go!($($f)::+::<$k, 4>, 4),
                    8 => go!($($f)::+::<$k, 8>, 8),
                    n if n > 8 => {
                        let (a, b) = xs.split_at(8);
                        let (oa, ob) = out.split_at_mut(8);
                        dot_256_rows(kernel, kind, row, a, oa);
                        dot_256_rows(kernel, kind, row, b, &mut ob[..n - 8]);
                    }
                    n => {
                        // 5 to 7 rows: four, then the rest.
                        let (a, b) = xs.split_at(4);
                        let (oa, ob) = out.split_at_mut(4);
                        dot_256_rows(kernel, kind, row, a, oa);
                        dot_256_rows(kernel, kind, row, b, &mut ob[..n - 4]);
                    }
                }
            };
        }
        macro_rules! by_kind {
            ($($f:ident)::+) => {
                match kind {
                    WeightKind::Q4K => by_rows!($($f)::+, { kquant::Q4K }),
                    WeightKind::Q5K => by_rows!($($f)::+, { kquant::Q5K }),
                    _ => by_rows!($($f)::+, { kquant::Q6K }),
                }
            };
        }
        // AVX-512 BW is all the 512-bit K-quant kernel needs; every machine with VNNI on zmm has it.
        if kernel == Kernel::Avx512Vnni {
            by_kind!(kquant::avx512::dot_256_rows)
        } else {
            by_kind!(kquant::avx2::dot_256_rows)
        }
        return;
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_256_scalar(kind, row, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// An activation row quantised for whichever block family its weights use.
    #[derive(Clone, Copy)]
    enum QuantRow<'a> {
        B32(&'a Q8Row32),
        B256(&'a [Q8Block256]),
    }

    /// `Σ w·x` of one weight row with one quantised activation row, on `kernel`.
    fn dot(kernel: Kernel, kind: WeightKind, row: &[u8], x: QuantRow<'_>) -> f32 {
        let mut out = [0f32];
        match x {
            QuantRow::B32(x) => dot_32_tile(kernel, kind, &[row], std::slice::from_ref(x), |_, _, v| out[0] = v[0]),
            QuantRow::B256(x) => dot_256_rows(kernel, kind, row, &[x], &mut out),
        }
        out[0]
    }

    /// Random blocks of `kind` with sane scales (finite f16).
    fn random_row(kind: WeightKind, blocks: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let ts = kind.type_size();
        let mut row: Vec<u8> = (0..blocks * ts).map(|_| rng.gen()).collect();
        for b in row.chunks_exact_mut(ts) {
            let put = |b: &mut [u8], off: usize, v: f32| {
                b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
            };
            match kind {
                WeightKind::Q4_0 | WeightKind::Q5_0 | WeightKind::Q8_0 => put(b, 0, rng.gen_range(-0.1..0.1)),
                WeightKind::Nf4 | WeightKind::Fp4 => b[..4].copy_from_slice(&rng.gen_range(0.0f32..2.0).to_le_bytes()),
                // Zero points anywhere in 0..=16 (GPTQ v1's +1 makes 16 possible).
                WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
                    put(b, 0, rng.gen_range(-0.1..0.1));
                    b[2] = rng.gen_range(0..=16);
                }
                WeightKind::Q4K | WeightKind::Q5K => {
                    put(b, 0, rng.gen_range(0.0..0.01));
                    put(b, 2, rng.gen_range(0.0..0.01));
                }
                WeightKind::Q6K => put(b, 208, rng.gen_range(-0.01..0.01)),
                _ => unreachable!(),
            }
        }
        row
    }

    /// The f32 reference: dequantised weights against the dequantised activations.
    fn reference(kind: WeightKind, row: &[u8], x: &[f32]) -> f64 {
        let mut w = vec![0f32; x.len()];
        crate::quant::ggml::dequantize(kind, row, &mut w).unwrap();
        w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    const KINDS: [WeightKind; 11] = [
        WeightKind::Q4_0,
        WeightKind::Q5_0,
        WeightKind::Q8_0,
        WeightKind::Q4K,
        WeightKind::Q5K,
        WeightKind::Q6K,
        WeightKind::Nf4,
        WeightKind::Fp4,
        WeightKind::Int4G128,
        WeightKind::Int4G64,
        WeightKind::Int4G32,
    ];
    const KINDS_32: [WeightKind; 8] = [
        WeightKind::Q4_0,
        WeightKind::Q5_0,
        WeightKind::Q8_0,
        WeightKind::Nf4,
        WeightKind::Fp4,
        WeightKind::Int4G128,
        WeightKind::Int4G64,
        WeightKind::Int4G32,
    ];

    #[test]
    fn bnb_integer_codes_are_the_rounded_code_values() {
        for (lut, code) in BNB_I8.iter().zip([&crate::quant::bnb::NF4_CODE, &crate::quant::bnb::FP4_CODE]) {
            for (&q, &c) in lut.iter().zip(code) {
                assert_eq!(q as f32, (c * 127.0).round(), "{c}");
            }
        }
    }

    #[test]
    fn integer_dots_equal_their_scalar_twins_and_the_dequantised_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let kernels = Kernel::available();
        println!("int8 kernels on this CPU: {kernels:?}");
        for kind in KINDS {
            // Odd and even block counts (the 32-element pair split), extreme codes included.
            for k in [1024, 1024 + 256, 256 * 7] {
                for _ in 0..8 {
                    let row = random_row(kind, k / kind.block_size(), &mut rng);
                    let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let (mut q32, mut q256) = (Q8Row32::default(), Vec::new());
                    quantise_32(&x, &mut q32);
                    quantise_256(&x, &mut q256);
                    let qr = || if uses_256(kind) { QuantRow::B256(&q256) } else { QuantRow::B32(&q32) };
                    let want = if uses_256(kind) {
                        dot_256_scalar(kind, &row, &q256)
                    } else {
                        dot_32_scalar(kind, &row, &q32)
                    };
                    for &kernel in &kernels {
                        let got = dot(kernel, kind, &row, qr());
                        assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} {kernel:?} k={k}: {got} vs scalar {want}");
                        // Every activation row count the K-quant kernels batch gives each row its solo bits.
                        if uses_256(kind) {
                            for n in 2..=MAX_ROWS {
                                let xs = vec![&q256[..]; n];
                                let mut out = [0f32; MAX_ROWS];
                                dot_256_rows(kernel, kind, &row, &xs, &mut out[..n]);
                                assert!(
                                    out[..n].iter().all(|v| v.to_bits() == want.to_bits()),
                                    "{kind:?} {kernel:?} x{n}"
                                );
                            }
                        }
                    }
                    // Against f32: the activation's rounding only (≤ 1/254 of each |x| per element).
                    let deq: Vec<f32> = if uses_256(kind) {
                        q256.iter().flat_map(|b| b.q.iter().map(move |&q| q as f32 * b.d)).collect()
                    } else {
                        q32.q.iter().enumerate().map(|(e, &q)| q as f32 * q32.d[e / 32]).collect()
                    };
                    let exact = reference(kind, &row, &deq);
                    let mut w = vec![0f32; k];
                    crate::quant::ggml::dequantize(kind, &row, &mut w).unwrap();
                    let l1: f64 = w.iter().zip(&deq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    // bitsandbytes kinds round their code values to 1/127 of the block's absmax.
                    let amax = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                    let bnb = matches!(kind, WeightKind::Nf4 | WeightKind::Fp4);
                    let slack =
                        if bnb { 0.5 / 127.0 * amax * deq.iter().map(|v| v.abs() as f64).sum::<f64>() } else { 0.0 };
                    assert!(
                        ((want as f64) - exact).abs() <= 1e-5 * l1 + 1e-6 + slack,
                        "{kind:?}: {want} vs {exact} (l1 {l1})"
                    );
                }
            }
        }
    }

    #[test]
    fn tiles_of_every_width_give_each_pair_its_scalar_bits() {
        // 1..=16 distinct weight rows (a short tile repeats its last row in
        // the spare lanes) against 1..=9 activation rows (whole groups of four
        // and remainders), odd and even block counts.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let kernels = Kernel::available();
        for kind in KINDS_32 {
            for blocks in [2, 4, 14, 28] {
                // Whole groups for the int4 kinds (odd group counts included).
                let k = 32 * blocks * if kind.is_int4_group() { kind.block_size() / 32 } else { 1 };
                let wrows: Vec<Vec<u8>> =
                    (0..TILE_ROWS).map(|_| random_row(kind, k / kind.block_size(), &mut rng)).collect();
                let xs: Vec<Q8Row32> = (0..9)
                    .map(|_| {
                        let x: Vec<f32> = (0..k).map(|_| rng.gen_range(-3.0..3.0)).collect();
                        let mut q = Q8Row32::default();
                        quantise_32(&x, &mut q);
                        q
                    })
                    .collect();
                for &kernel in &kernels {
                    for n in 1..=TILE_ROWS {
                        for m in [1, 2, 3, 4, 5, 9] {
                            let rows: Vec<&[u8]> = wrows[..n].iter().map(|r| &r[..]).collect();
                            let mut got = vec![f32::NAN; m * n];
                            dot_32_tile(kernel, kind, &rows, &xs[..m], |i, j, v| {
                                got[i * n + j..i * n + j + v.len()].copy_from_slice(v)
                            });
                            for i in 0..m {
                                for j in 0..n {
                                    let want = dot_32_scalar(kind, rows[j], &xs[i]);
                                    let g = got[i * n + j];
                                    assert_eq!(
                                        g.to_bits(),
                                        want.to_bits(),
                                        "{kind:?} {kernel:?} {blocks} blocks, {n}x{m} [{i},{j}]"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn quantising_rounds_half_away_from_zero_like_f32_round() {
        // Exact halves, values just below them, and random rows.
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut rows: Vec<Vec<f32>> = vec![(0..32).map(|i| (i as f32 - 16.0) * 127.0 / 16.0 + 0.5).collect()];
        rows.push((0..32).map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 }).collect());
        rows.push((0..32).map(|i| if i == 0 { 127.0 } else { (i as f32 - 15.5).next_down_toward_zero() }).collect());
        rows.extend((0..64).map(|_| (0..32).map(|_| rng.gen_range(-5.0f32..5.0)).collect()));
        for x in rows {
            let mut q = [0i8; 32];
            let d = quantise_into(&x, &mut q);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(d.to_bits(), (amax / 127.0).to_bits());
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (&qi, &v) in q.iter().zip(&x) {
                assert_eq!(qi, (v * id).round().clamp(-127.0, 127.0) as i8, "{v}");
            }
        }
    }

    trait NextDown {
        fn next_down_toward_zero(self) -> f32;
    }
    impl NextDown for f32 {
        fn next_down_toward_zero(self) -> f32 {
            f32::from_bits(self.to_bits() - 1)
        }
    }

    #[test]
    fn extreme_codes_do_not_saturate() {
        // Every weight code at its extreme against ±127 activations: the
        // 16-bit pair sums of `maddubs` are where a kernel could saturate.
        let kernels = Kernel::available();
        for kind in KINDS_32 {
            let bnb = matches!(kind, WeightKind::Nf4 | WeightKind::Fp4);
            for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
                let ts = kind.type_size();
                let mut row = vec![fill; 128 / kind.block_size() * ts];
                for b in row.chunks_exact_mut(ts) {
                    if bnb {
                        b[..4].copy_from_slice(&1f32.to_le_bytes());
                    } else if kind.is_int4_group() {
                        // The widest codes: q − z from −16 (z = 16) up to 15 (z = 0).
                        b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
                        b[2] = if fill >= 0x80 { 0 } else { 16 };
                        b[3] = 0;
                    } else {
                        b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
                    }
                }
                for sign in [1f32, -1.0] {
                    let x: Vec<f32> = (0..128).map(|i| if i % 3 == 0 { sign } else { -sign }).collect();
                    let mut q = Q8Row32::default();
                    quantise_32(&x, &mut q);
                    let want = dot_32_scalar(kind, &row, &q);
                    let exact = reference(kind, &row, &x);
                    // bitsandbytes: each code value within 0.5/127 of the absmax (1), 128 elements.
                    let slack = if bnb { 0.5 / 127.0 * 128.0 } else { 0.0 };
                    assert!((want as f64 - exact).abs() <= 1e-3 * exact.abs().max(1.0) + slack, "{kind:?} {fill:#x}");
                    for &kernel in &kernels {
                        let got = dot(kernel, kind, &row, QuantRow::B32(&q));
                        assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} {kernel:?} fill {fill:#x}");
                    }
                }
            }
        }
    }
}
