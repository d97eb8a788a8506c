//! GPTQ and AWQ checkpoints (FORMATS.md §1-2) rewritten into GGUF blocks.
//!
//! Both formats store unsigned integer codes `q` with a scale `s` and a zero
//! `z` per (group of input rows, output column): `W[n,k] = s·(q − z)`. Once
//! unpacked ([`GroupCodes`]), the inputs of a group (in stored order) share
//! one (s, z), so the codes map onto blocks that dequantise to exactly the
//! same f32 values:
//! - 4-bit: the group-wise int4 kinds, one block per group of 128, 64 or 32
//!   (the largest whose aligned runs each lie in one group: a file's group of
//!   128, or 64/32 for smaller groups, or for group −1 the largest dividing
//!   the inputs), code q, zero z, `d·(q − z)`; 4.25 / 4.5 / 5 bits per weight
//!   against the file's 4.16 / 4.31 / 4.63. Where only runs of 32 fit and the
//!   layer is symmetric (z = 8 everywhere), Q4_0 (4.5 bpw) instead;
//! - 8-bit with every `q − z` in -128..127: Q8_0, `d·(q − z)`;
//!
//! with `d = s` (exact when the file's scale is f16, or a bf16 value inside
//! f16's range, which is every scale seen in practice). Anything that does not
//! fit (a scale outside f16, 8-bit zeros far off centre, 4-bit zeros outside
//! 0..=16) keeps exact f32 rows.
//!
//! `desc_act` checkpoints give each input row its group through `g_idx`. The
//! rows are then reordered so that each group's rows are adjacent (the stable
//! sort by group, as exllama does) and the weight carries that permutation:
//! the backend gathers its input in the same order before the product.

use super::ggml::WeightKind;

/// AWQ's packing order: nibble `i` of a word holds column `8c + ORDER[i]`.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Its inverse: column `8c + j` is nibble `AWQ_REVERSE[j]`.
pub const AWQ_REVERSE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Unpacked codes of one quantised linear layer `[n_out, k_in]`.
pub struct GroupCodes {
    pub bits: u32,
    pub n_out: usize,
    pub k_in: usize,
    /// `q[n * k_in + k]`.
    pub q: Vec<u8>,
    /// Zero point per (group, column): `z[g * n_out + n]`, already with the
    /// format's convention applied (GPTQ v1's +1).
    pub z: Vec<i32>,
    /// Scale per (group, column), as f32.
    pub s: Vec<f32>,
    /// Group of each input row.
    pub g_idx: Vec<u32>,
    pub groups: usize,
}

/// A layer rewritten for the backend.
#[derive(Debug)]
pub struct Rewritten {
    pub kind: WeightKind,
    pub bytes: Vec<u8>,
    /// Input order of the rows' elements (`perm[j]` = original input of
    /// element j), when the groups were not already contiguous.
    pub input_perm: Option<Vec<u32>>,
}

/// The little-endian 32-bit words of raw tensor bytes.
pub fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// GPTQ tensors: `qweight` [k·bits/32, n] packed along k, `qzeros`
/// [groups, n·bits/32] packed along n, `scales` [groups, n], `g_idx` [k] (or
/// `None` for the trivial k / group_size). `v1` adds GPTQ's +1 to the zeros.
#[allow(clippy::too_many_arguments)]
pub fn unpack_gptq(
    bits: u32,
    group_size: Option<usize>,
    v1: bool,
    n_out: usize,
    k_in: usize,
    qweight: &[u32],
    qzeros: &[u32],
    scales: Vec<f32>,
    g_idx: Option<Vec<u32>>,
) -> Result<GroupCodes, String> {
    if bits != 4 && bits != 8 {
        return Err(format!("bits {bits} is not supported (4 or 8)"));
    }
    let per = (32 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    let g = group_size.unwrap_or(k_in);
    if g == 0 || !k_in.is_multiple_of(per) || !n_out.is_multiple_of(per) {
        return Err(format!("shape [{n_out}, {k_in}] does not pack into {bits}-bit words"));
    }
    let groups = k_in.div_ceil(g);
    check_len("qweight", qweight.len(), k_in / per * n_out)?;
    check_len("qzeros", qzeros.len(), groups * n_out / per)?;
    check_len("scales", scales.len(), groups * n_out)?;
    let g_idx = match g_idx {
        Some(v) => {
            check_len("g_idx", v.len(), k_in)?;
            if let Some(bad) = v.iter().find(|&&x| x as usize >= groups) {
                return Err(format!("g_idx holds group {bad}, but there are {groups} groups"));
            }
            v
        }
        None => (0..k_in).map(|k| (k / g) as u32).collect(),
    };
    let mut q = vec![0u8; n_out * k_in];
    for k in 0..k_in {
        let shift = bits * (k % per) as u32;
        let row = &qweight[(k / per) * n_out..][..n_out];
        for n in 0..n_out {
            q[n * k_in + k] = ((row[n] >> shift) & mask) as u8;
        }
    }
    let plus = i32::from(v1);
    let mut z = vec![0i32; groups * n_out];
    for gi in 0..groups {
        for n in 0..n_out {
            let word = qzeros[gi * (n_out / per) + n / per];
            z[gi * n_out + n] = ((word >> (bits * (n % per) as u32)) & mask) as i32 + plus;
        }
    }
    Ok(GroupCodes { bits, n_out, k_in, q, z, s: scales, g_idx, groups })
}

/// AWQ GEMM tensors: `qweight` [k, n/8] and `qzeros` [groups, n/8], packed
/// along n in [`AWQ_ORDER`]; `scales` [groups, n]. Zeros are stored as they are.
pub fn unpack_awq(
    group_size: usize,
    n_out: usize,
    k_in: usize,
    qweight: &[u32],
    qzeros: &[u32],
    scales: Vec<f32>,
) -> Result<GroupCodes, String> {
    if group_size == 0 || !k_in.is_multiple_of(group_size) || !n_out.is_multiple_of(8) {
        return Err(format!("shape [{n_out}, {k_in}] does not fit AWQ packing with group size {group_size}"));
    }
    let groups = k_in / group_size;
    let cols = n_out / 8;
    check_len("qweight", qweight.len(), k_in * cols)?;
    check_len("qzeros", qzeros.len(), groups * cols)?;
    check_len("scales", scales.len(), groups * n_out)?;
    let nib = |word: u32, j: usize| -> u32 { (word >> (4 * AWQ_REVERSE[j])) & 0xF };
    let mut q = vec![0u8; n_out * k_in];
    for k in 0..k_in {
        for n in 0..n_out {
            q[n * k_in + k] = nib(qweight[k * cols + n / 8], n % 8) as u8;
        }
    }
    let mut z = vec![0i32; groups * n_out];
    for gi in 0..groups {
        for n in 0..n_out {
            z[gi * n_out + n] = nib(qzeros[gi * cols + n / 8], n % 8) as i32;
        }
    }
    let g_idx = (0..k_in).map(|k| (k / group_size) as u32).collect();
    Ok(GroupCodes { bits: 4, n_out, k_in, q, z, s: scales, g_idx, groups })
}

fn check_len(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got != want {
        return Err(format!("{what} has {got} elements, expected {want} for this shape"));
    }
    Ok(())
}

impl GroupCodes {
    /// The reference dequantisation, `W[n,k] = s·(q − z)` in f32, row-major
    /// `[n_out, k_in]` (what `dequantize_gemm` / GPTQ's torch path compute,
    /// before any cast to the checkpoint's dtype).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n_out * self.k_in];
        for n in 0..self.n_out {
            for k in 0..self.k_in {
                let g = self.g_idx[k] as usize * self.n_out + n;
                w[n * self.k_in + k] = self.s[g] * (i32::from(self.q[n * self.k_in + k]) - self.z[g]) as f32;
            }
        }
        w
    }

    /// The input order that makes groups contiguous: `None` when it is
    /// already the identity.
    fn permutation(&self) -> Option<Vec<u32>> {
        let mut perm: Vec<u32> = (0..self.k_in as u32).collect();
        perm.sort_by_key(|&k| self.g_idx[k as usize]);
        perm.iter().enumerate().any(|(i, &p)| i as u32 != p).then_some(perm)
    }

    /// Rewrites the layer into GGUF blocks (see the module comment).
    pub fn rewrite(&self) -> Result<Rewritten, String> {
        if !self.k_in.is_multiple_of(32) {
            return Err(format!("{} input features is not a multiple of 32", self.k_in));
        }
        let perm = self.permutation();
        let order: Vec<usize> = match &perm {
            Some(p) => p.iter().map(|&k| k as usize).collect(),
            None => (0..self.k_in).collect(),
        };
        // The longest aligned runs (in the new order) that each lie in one group.
        let run_fits = |len: usize| {
            self.k_in.is_multiple_of(len)
                && order.chunks_exact(len).all(|run| run.iter().all(|&k| self.g_idx[k] == self.g_idx[run[0]]))
        };
        let Some(run) = [128, 64, 32].into_iter().find(|&len| run_fits(len)) else {
            return Err("groups are not whole multiples of 32 input rows".into());
        };
        let f16_exact = self.s.iter().all(|&s| half::f16::from_f32(s).to_f32() == s);
        let z_range = self.z.iter().fold((i32::MAX, i32::MIN), |(lo, hi), &z| (lo.min(z), hi.max(z)));
        let kind = match self.bits {
            _ if !f16_exact => WeightKind::F32,
            4 if run == 32 && z_range == (8, 8) => WeightKind::Q4_0,
            4 if z_range.0 >= 0 && z_range.1 <= 16 => WeightKind::int4_group(run).ok_or("group run")?,
            8 if z_range == (128, 128) => WeightKind::Q8_0,
            8 if self.fits_q8() => WeightKind::Q8_0,
            _ => WeightKind::F32,
        };
        let row_bytes = kind.row_bytes(self.k_in).ok_or("row size")?;
        let mut bytes = Vec::with_capacity(row_bytes * self.n_out);
        // Blocks of the kind's own length (one group run for the int4 kinds).
        let block_len = if kind.is_int4_group() { run } else { 32 };
        for n in 0..self.n_out {
            let row = &self.q[n * self.k_in..(n + 1) * self.k_in];
            for block in order.chunks_exact(block_len) {
                let gi = self.g_idx[block[0]] as usize * self.n_out + n;
                let (s, z) = (self.s[gi], self.z[gi]);
                let d = half::f16::from_f32(s).to_bits().to_le_bytes();
                let code = |j: usize| i32::from(row[block[j]]) - z;
                // Q4_0-style nibbles of the 32 inputs from `at`.
                let nibbles = |at: usize| {
                    (0..16).map(move |j| (row[block[at + j]] & 0xF) | ((row[block[at + j + 16]] & 0xF) << 4))
                };
                match kind {
                    WeightKind::Q4_0 => {
                        bytes.extend_from_slice(&d);
                        bytes.extend(nibbles(0));
                    }
                    WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
                        bytes.extend_from_slice(&d);
                        bytes.extend([z as u8, 0]);
                        for at in (0..block_len).step_by(32) {
                            bytes.extend(nibbles(at));
                        }
                    }
                    WeightKind::Q8_0 => {
                        bytes.extend_from_slice(&d);
                        bytes.extend((0..32).map(|j| code(j) as i8 as u8));
                    }
                    _ => bytes.extend((0..block_len).flat_map(|j| (s * code(j) as f32).to_le_bytes())),
                }
            }
        }
        Ok(Rewritten { kind, bytes, input_perm: perm })
    }

    fn fits_q8(&self) -> bool {
        (0..self.n_out).all(|n| {
            (0..self.k_in).all(|k| {
                let z = self.z[self.g_idx[k] as usize * self.n_out + n];
                (-128..=127).contains(&(i32::from(self.q[n * self.k_in + k]) - z))
            })
        })
    }
}

/// How round-to-nearest quantisation picks each group's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtnGrid {
    /// GPTQ's `sym`: `s = 2·max|w| / (2^bits − 1)`, `z = 2^(bits−1)`.
    Symmetric,
    /// GPTQ's asymmetric grid: `s = (max − min) / (2^bits − 1)` over the
    /// group's range widened to hold 0, `z = round(−min / s)`, kept in
    /// 1..=2^bits − 1 so that GPTQ v1's "zero − 1" storage holds it (a group
    /// that would take zero 0 keeps 1 with a step widened to fit). (GPTQ's
    /// optional `mse` range search was tried on the default model and made
    /// perplexity worse at every setting: docs/benchmarks.md.)
    Asymmetric,
}

/// Round-to-nearest quantisation of `[rows, cols]` f32 weights into GPTQ's
/// form (no calibration data), per group of `group` inputs and output row,
/// on `grid`; the scale is rounded to f16 (as checkpoints store it) before
/// the codes are chosen, `q = clamp(round(w/s) + z, 0, 2^bits − 1)`. Used by
/// `--quantize int4` (asymmetric) / `int8` (symmetric) and
/// `tandem quantize --format gptq`.
pub fn quantize_rtn(
    bits: u32,
    grid: RtnGrid,
    w: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<GroupCodes, String> {
    if bits != 4 && bits != 8 {
        return Err(format!("{bits}-bit round-to-nearest is not supported (4 or 8)"));
    }
    if group == 0 || !cols.is_multiple_of(group) || w.len() != rows * cols {
        return Err(format!("{cols} input features is not a multiple of the group size {group}"));
    }
    let maxq = (1u32 << bits) - 1;
    let groups = cols / group;
    let mut s = vec![0f32; groups * rows];
    let mut z = vec![0i32; groups * rows];
    let mut q = vec![0u8; rows * cols];
    for n in 0..rows {
        for g in 0..groups {
            let xs = &w[n * cols + g * group..][..group];
            let codes = &mut q[n * cols + g * group..][..group];
            let (scale, zero) = match grid {
                RtnGrid::Symmetric => symmetric_grid(xs, maxq),
                RtnGrid::Asymmetric => asymmetric_grid(xs, maxq),
            };
            round_to_grid(xs, scale, zero, maxq, codes);
            s[g * rows + n] = scale;
            z[g * rows + n] = zero as i32;
        }
    }
    let g_idx = (0..cols).map(|k| (k / group) as u32).collect();
    Ok(GroupCodes { bits, n_out: rows, k_in: cols, q, z, s, g_idx, groups })
}

/// `q = clamp(round(x/s) + z, 0, maxq)` for every x (all `z` for a zero scale).
fn round_to_grid(xs: &[f32], scale: f32, zero: u32, maxq: u32, codes: &mut [u8]) {
    for (c, &x) in codes.iter_mut().zip(xs) {
        let v = if scale > 0.0 { (x / scale).round() + zero as f32 } else { zero as f32 };
        *c = v.clamp(0.0, maxq as f32) as u8;
    }
}

fn symmetric_grid(xs: &[f32], maxq: u32) -> (f32, u32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    (half::f16::from_f32(2.0 * amax / maxq as f32).to_f32(), maxq.div_ceil(2))
}

/// The f16 scale and zero of [`RtnGrid::Asymmetric`].
fn asymmetric_grid(xs: &[f32], maxq: u32) -> (f32, u32) {
    let lo = xs.iter().fold(0f32, |m, &v| m.min(v));
    let hi = xs.iter().fold(0f32, |m, &v| m.max(v));
    let scale = half::f16::from_f32((hi - lo) / maxq as f32).to_f32();
    if scale <= 0.0 || !scale.is_finite() {
        return (0.0, 1);
    }
    let zero = (-lo / scale).round();
    if zero >= 1.0 {
        return (scale, zero.min(maxq as f32) as u32);
    }
    // A group with (almost) nothing below 0 would take zero 0, which GPTQ v1
    // cannot store: keep zero 1 and widen the step so its top value still
    // fits under the highest code (rather than clipping it by a step).
    let wide = half::f16::from_f32(hi / (maxq - 1) as f32);
    let wide = if wide.to_f32() < hi / (maxq - 1) as f32 { half::f16::from_bits(wide.to_bits() + 1) } else { wide };
    (wide.to_f32(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ggml::dequantize;

    fn codes(bits: u32, n: usize, k: usize, g: usize, zero: impl Fn(usize, usize) -> i32, seed: u32) -> GroupCodes {
        let groups = k / g;
        let max = (1u32 << bits) - 1;
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            x >> 8
        };
        let q = (0..n * k).map(|_| (next() % (max + 1)) as u8).collect();
        let s = (0..groups * n).map(|_| half::f16::from_f32((next() % 1000) as f32 * 1e-5 + 1e-4).to_f32()).collect();
        let z = (0..groups * n).map(|i| zero(i / n, i % n)).collect();
        GroupCodes { bits, n_out: n, k_in: k, q, z, s, g_idx: (0..k).map(|i| (i / g) as u32).collect(), groups }
    }

    fn check_rewrite(c: &GroupCodes, want_kind: WeightKind) {
        let r = c.rewrite().unwrap();
        assert_eq!(r.kind, want_kind);
        let mut got = vec![0f32; c.n_out * c.k_in];
        dequantize(r.kind, &r.bytes, &mut got).unwrap();
        let want = c.dequantize();
        let perm: Vec<usize> = match &r.input_perm {
            Some(p) => p.iter().map(|&k| k as usize).collect(),
            None => (0..c.k_in).collect(),
        };
        for n in 0..c.n_out {
            for (j, &k) in perm.iter().enumerate() {
                assert_eq!(got[n * c.k_in + j].to_bits(), want[n * c.k_in + k].to_bits(), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn rewrites_dequantise_to_the_reference_bits() {
        check_rewrite(&codes(4, 8, 128, 32, |_, _| 8, 1), WeightKind::Q4_0);
        check_rewrite(&codes(4, 8, 128, 32, |g, n| ((g * 5 + n) % 17) as i32, 9), WeightKind::Int4G32);
        check_rewrite(&codes(4, 8, 128, 64, |g, n| ((g * 7 + n) % 17) as i32, 2), WeightKind::Int4G64);
        check_rewrite(&codes(4, 8, 256, 128, |g, n| ((g * 3 + n) % 17) as i32, 10), WeightKind::Int4G128);
        // Symmetric with groups of 128: the smaller int4 kind, not Q4_0.
        check_rewrite(&codes(4, 8, 256, 128, |_, _| 8, 11), WeightKind::Int4G128);
        // One group per row (group −1): the largest run dividing the inputs.
        check_rewrite(&codes(4, 8, 192, 192, |_, n| n as i32, 12), WeightKind::Int4G64);
        check_rewrite(&codes(4, 8, 96, 96, |_, n| n as i32, 13), WeightKind::Int4G32);
        // A zero past 16 cannot be an int4 block.
        check_rewrite(&codes(4, 8, 128, 128, |_, n| 14 + n as i32, 14), WeightKind::F32);
        check_rewrite(&codes(8, 8, 128, 128, |_, _| 128, 3), WeightKind::Q8_0);
        check_rewrite(&codes(8, 8, 128, 32, |g, n| ((g * 31 + n * 3) % 256) as i32, 4), WeightKind::F32);
        // A zero of 127 lets q - z reach 128, one past i8: those rows stay f32.
        check_rewrite(&codes(8, 8, 128, 32, |_, _| 127, 6), WeightKind::F32);
        check_rewrite(&codes(8, 8, 128, 32, |_, n| 120 + (n % 9) as i32, 7), WeightKind::F32);
    }

    #[test]
    fn act_order_groups_are_gathered_and_the_permutation_kept() {
        let mut c = codes(4, 4, 128, 32, |g, n| (g + n) as i32 % 16, 5);
        // Input k belongs to group (k * 5) % 4: 32 rows per group, scattered.
        c.g_idx = (0..128).map(|k| ((k * 5) % 4) as u32).collect();
        let r = c.rewrite().unwrap();
        let perm = r.input_perm.as_ref().unwrap();
        assert!(perm.windows(2).all(|w| c.g_idx[w[0] as usize] <= c.g_idx[w[1] as usize]));
        check_rewrite(&c, WeightKind::Int4G32);
        // Groups of 16 cannot form blocks of 32.
        c.g_idx = (0..128).map(|k| ((k * 5) % 8) as u32).collect();
        c.groups = 8;
        assert!(c.rewrite().is_err());
    }

    #[test]
    fn awq_reverse_inverts_its_order() {
        for (i, &o) in AWQ_ORDER.iter().enumerate() {
            assert_eq!(AWQ_REVERSE[o], i);
        }
    }

    #[test]
    fn gptq_and_awq_packing_unpack_to_the_codes() {
        let c = codes(4, 16, 64, 32, |g, n| ((g + n) % 15) as i32, 6);
        // GPTQ v1 packing (zeros stored minus one).
        let mut qweight = vec![0u32; 64 / 8 * 16];
        for k in 0..64 {
            for n in 0..16 {
                qweight[(k / 8) * 16 + n] |= u32::from(c.q[n * 64 + k]) << (4 * (k % 8));
            }
        }
        let mut qzeros = vec![0u32; 2 * 2];
        for g in 0..2 {
            for n in 0..16 {
                qzeros[g * 2 + n / 8] |= ((c.z[g * 16 + n] - 1) as u32 & 0xF) << (4 * (n % 8));
            }
        }
        let u = unpack_gptq(4, Some(32), true, 16, 64, &qweight, &qzeros, c.s.clone(), None).unwrap();
        assert_eq!(u.q, c.q);
        assert_eq!(u.z.iter().map(|&z| z & 0xF).collect::<Vec<_>>(), c.z.iter().map(|&z| z & 0xF).collect::<Vec<_>>());
        // AWQ packing.
        let mut aw = vec![0u32; 64 * 2];
        for k in 0..64 {
            for n in 0..16 {
                let i = AWQ_ORDER.iter().position(|&o| o == n % 8).unwrap();
                aw[k * 2 + n / 8] |= u32::from(c.q[n * 64 + k]) << (4 * i);
            }
        }
        let mut az = vec![0u32; 2 * 2];
        for g in 0..2 {
            for n in 0..16 {
                let i = AWQ_ORDER.iter().position(|&o| o == n % 8).unwrap();
                az[g * 2 + n / 8] |= (c.z[g * 16 + n] as u32) << (4 * i);
            }
        }
        let a = unpack_awq(32, 16, 64, &aw, &az, c.s.clone()).unwrap();
        assert_eq!(a.q, c.q);
        assert_eq!(a.z, c.z);
        assert!(unpack_awq(32, 16, 64, &aw[1..], &az, c.s.clone()).is_err());
        assert!(unpack_gptq(4, Some(32), true, 16, 64, &qweight, &qzeros[1..], c.s.clone(), None).is_err());
        assert!(unpack_gptq(3, Some(32), true, 16, 64, &qweight, &qzeros, c.s, None).is_err());
    }

    #[test]
    fn rtn_int4_is_int4_g128_within_half_a_step() {
        let w: Vec<f32> = (0..4 * 256).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let c = quantize_rtn(4, RtnGrid::Symmetric, &w, 4, 256, 128).unwrap();
        let r = c.rewrite().unwrap();
        assert_eq!(r.kind, WeightKind::Int4G128);
        let q8 = quantize_rtn(8, RtnGrid::Symmetric, &w, 4, 256, 128).unwrap();
        assert_eq!(q8.rewrite().unwrap().kind, WeightKind::Q8_0);
        let back = c.dequantize();
        for n in 0..4 {
            for k in 0..256 {
                let s = c.s[(k / 128) * 4 + n];
                assert!((back[n * 256 + k] - w[n * 256 + k]).abs() <= 0.51 * s + 1e-7);
            }
        }
    }

    #[test]
    fn asymmetric_grid_fits_skewed_groups_better_than_the_symmetric_one() {
        // Skewed groups (mostly positive): a symmetric grid wastes its negative levels.
        let mut x = 17u32;
        let mut next = move || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 8) as f32 / (1u32 << 24) as f32
        };
        let (rows, cols) = (8, 512);
        let w: Vec<f32> = (0..rows * cols).map(|_| next() * 0.02 - 0.004).collect();
        let sq_err =
            |c: &GroupCodes| -> f64 { c.dequantize().iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum() };
        let sym = quantize_rtn(4, RtnGrid::Symmetric, &w, rows, cols, 128).unwrap();
        let asym = quantize_rtn(4, RtnGrid::Asymmetric, &w, rows, cols, 128).unwrap();
        let (e_sym, e_asym) = (sq_err(&sym), sq_err(&asym));
        assert!(e_asym < 0.5 * e_sym, "asymmetric {e_asym:e} vs symmetric {e_sym:e}");
        // Zeros fit GPTQ v1's storage; nothing is clipped: half a step at most
        // (plus the scale's f16 rounding over at most 15 steps).
        assert!(asym.z.iter().all(|&z| (1..=15).contains(&z)));
        let back = asym.dequantize();
        for n in 0..rows {
            for k in 0..cols {
                let s = asym.s[(k / 128) * rows + n];
                assert!((back[n * cols + k] - w[n * cols + k]).abs() <= 0.52 * s, "[{n}, {k}]");
            }
        }
        // The rewrite keeps those zeros: a group-wise int4 kind, bit for bit.
        assert_eq!(asym.rewrite().unwrap().kind, WeightKind::Int4G128);
        // Groups with nothing (or next to nothing) below zero keep zero 1 and
        // still reach their top value within half a step, nothing clipped.
        for lo in [0.0f32, -0.01] {
            let xs: Vec<f32> = (0..128).map(|i| if i == 0 { lo } else { 1.5 * i as f32 / 127.0 }).collect();
            let c = quantize_rtn(4, RtnGrid::Asymmetric, &xs, 1, 128, 128).unwrap();
            assert_eq!(c.z[0], 1, "lo {lo}");
            for (a, b) in c.dequantize().iter().zip(&xs) {
                assert!((a - b).abs() <= 0.5 * c.s[0] * 1.001, "lo {lo}: {a} vs {b} (step {})", c.s[0]);
            }
        }
        // A constant group quantises to its zero and back to 0 (no division by zero).
        let flat = quantize_rtn(4, RtnGrid::Asymmetric, &[0.0; 128], 1, 128, 128).unwrap();
        assert!(flat.dequantize().iter().all(|&v| v == 0.0));
    }
}
