//! `tandem selftest`: every op of a backend against the CPU reference, on fresh
//! random inputs at several shapes (odd sizes included), with each output
//! poisoned with NaN before the run so an op that skips part of its output
//! fails. Errors are measured relative to the reference's largest magnitude
//! (per check), with a threshold per precision class; NaN never passes.
//!
//! The training ops (`selftest/training.rs`) are checked the same way.
//!
//! Written against the [`Backend`] trait, so the harness itself is tested on
//! machines without a GPU by comparing two CPU backends (AVX-512 against the
//! portable code), and runs unchanged against CUDA.

use std::fmt;
use std::sync::Arc;

use super::cpu::CpuBackend;
use super::{
    AttentionMeta, Backend, HostWeight, KvCacheSpec, KvDtype, LoraSegment, MatmulJob, RopeStyle, RopeTable,
    SeqAttention, WeightBytes,
};
use crate::backend::{BackendError, BackendResult, BlockId};
use crate::backend::{LoraDtype, LoraMatrix, LoraValues};
use crate::quant::ggml::WeightKind;
use crate::quant::random::{random_weight_bytes, Rng};

mod training;

/// Thresholds (max |err| / max |ref|) per precision class.
pub const TOL_F32: f32 = 1e-5;
/// Long f32 reductions (matmul, attention): summation order differs.
pub const TOL_F32_REDUCE: f32 = 1e-4;
/// Activations rounded to bf16 for tensor-core GEMMs.
pub const TOL_BF16: f32 = 1e-2;

pub struct Check {
    pub name: String,
    pub err: f32,
    pub tol: f32,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.err.is_finite() && self.err <= self.tol
    }
}

#[derive(Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed()).count()
    }
    fn push(&mut self, name: String, got: &[f32], want: &[f32], tol: f32) {
        self.checks.push(Check { name, err: rel_err(got, want), tol });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| check | rel. error | threshold | |")?;
        writeln!(f, "| --- | ---: | ---: | --- |")?;
        for c in &self.checks {
            writeln!(f, "| {} | {:.2e} | {:.0e} | {} |", c.name, c.err, c.tol, if c.passed() { "ok" } else { "FAIL" })?;
        }
        writeln!(f, "{} checks, {} failed", self.checks.len(), self.failures())
    }
}

/// max |got - want| / max |want|; infinite for NaN, a length mismatch or a
/// non-finite reference.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs();
        if !e.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max(e);
    }
    worst / scale
}

fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform() * scale).collect()
}

fn host_weight(kind: WeightKind, rows: usize, cols: usize, bytes: Vec<u8>) -> HostWeight {
    HostWeight::new(format!("{kind:?}[{rows}x{cols}]"), kind, rows, cols, WeightBytes::from_vec(bytes))
}

/// Runs `op` on a NaN-poisoned output of `rows × cols` and returns it.
fn poisoned<B: Backend>(
    be: &B,
    rows: usize,
    cols: usize,
    op: impl FnOnce(&mut B::Tensor) -> BackendResult<()>,
) -> BackendResult<Vec<f32>> {
    let mut out = be.upload(&vec![f32::NAN; rows * cols], rows, cols)?;
    op(&mut out)?;
    be.download(&out)
}

/// Every op of `dev` against `reference` (normally the CPU backend).
pub fn run<B: Backend>(dev: &B, reference: &CpuBackend, seed: u64) -> Report {
    let mut r = Report::default();
    let mut rng = Rng::new(seed);
    type Section<B> = fn(&B, &CpuBackend, &mut Rng, &mut Report) -> BackendResult<()>;
    let sections: [(&str, Section<B>); 10] = [
        ("elementwise", elementwise),
        ("matmuls", matmuls),
        ("loras", loras),
        ("attention", attention),
        ("training: input gradients", training::input_grads),
        ("training: gemm", training::gemms),
        ("training: row-wise backward", training::row_grads),
        ("training: attention backward", training::attention_grads),
        ("training: cross-entropy", training::losses),
        ("training: dropout, AdamW, utilities", training::utilities),
    ];
    for (name, section) in sections {
        // A failing op is one failed check; the other sections still run.
        if let Err(e) = section(dev, reference, &mut rng, &mut r) {
            r.checks.push(Check { name: format!("{name}: {e}"), err: f32::INFINITY, tol: 0.0 });
        }
    }
    r
}

fn elementwise<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    for (rows, cols) in [(1, 64), (3, 80), (17, 896), (64, 4096)] {
        let x = randn(rng, rows * cols, 2.0);
        let y = randn(rng, rows * cols, 2.0);
        let wv = randn(rng, cols, 1.0);
        let wb: Vec<u8> = wv.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (dw, cw) = (
            dev.load_weight(host_weight(WeightKind::F32, 1, cols, wb.clone()))?,
            cpu.load_weight(host_weight(WeightKind::F32, 1, cols, wb))?,
        );
        let (dx, cx) = (dev.upload(&x, rows, cols)?, cpu.upload(&x, rows, cols)?);
        let (dy, cy) = (dev.upload(&y, rows, cols)?, cpu.upload(&y, rows, cols)?);
        let got = poisoned(dev, rows, cols, |o| dev.rms_norm(&dx, &dw, 1e-6, o))?;
        let want = poisoned(cpu, rows, cols, |o| cpu.rms_norm(&cx, &cw, 1e-6, o))?;
        r.push(format!("rms_norm {rows}x{cols}"), &got, &want, TOL_F32);

        let got = poisoned(dev, rows, cols, |o| dev.silu_mul(&dx, &dy, o))?;
        let want = poisoned(cpu, rows, cols, |o| cpu.silu_mul(&cx, &cy, o))?;
        r.push(format!("silu_mul {rows}x{cols}"), &got, &want, TOL_F32);

        let (mut dsum, mut csum) = (dev.upload(&x, rows, cols)?, cpu.upload(&x, rows, cols)?);
        dev.add_assign(&mut dsum, &dy)?;
        cpu.add_assign(&mut csum, &cy)?;
        r.push(format!("add_assign {rows}x{cols}"), &dev.download(&dsum)?, &cpu.download(&csum)?, TOL_F32);

        let pick: Vec<usize> = (0..rows).rev().step_by(2).collect();
        let got = dev.download(&dev.gather_rows(&dx, &pick)?)?;
        let want = cpu.download(&cpu.gather_rows(&cx, &pick)?)?;
        r.push(format!("gather_rows {}of{rows}x{cols}", pick.len()), &got, &want, 0.0);
    }
    for (style, head_dim, heads, tokens) in
        [(RopeStyle::Neox, 64, 14, 5), (RopeStyle::Interleaved, 64, 2, 3), (RopeStyle::Neox, 128, 8, 33)]
    {
        let table = RopeTable {
            inv_freq: (0..head_dim / 2).map(|i| 1e6f32.powf(-((2 * i) as f32) / head_dim as f32)).collect(),
            style,
        };
        let cols = heads * head_dim;
        let x = randn(rng, tokens * cols, 1.0);
        let pos: Vec<u32> = (0..tokens as u32).map(|t| t * 37 + 3).collect();
        let (mut dx, mut cx) = (dev.upload(&x, tokens, cols)?, cpu.upload(&x, tokens, cols)?);
        dev.rope(&mut dx, heads, head_dim, &pos, &table)?;
        cpu.rope(&mut cx, heads, head_dim, &pos, &table)?;
        r.push(
            format!("rope {style:?} d{head_dim} h{heads} t{tokens}"),
            &dev.download(&dx)?,
            &cpu.download(&cx)?,
            TOL_F32,
        );
    }
    Ok(())
}

/// Every weight kind, as embedding table and as matmul weight, at decode (GEMV)
/// and prefill (GEMM) batch sizes, with and without bias.
fn matmuls<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    let kinds = WeightKind::ALL;
    for kind in kinds {
        let cols = match kind.block_size() {
            256 => 512,
            128 => 384,
            64 => 192,
            _ => 96,
        };
        let rows = 37;
        let bytes = random_weight_bytes(kind, rows, cols, 0.05, rng);
        let dw = dev.load_weight(host_weight(kind, rows, cols, bytes.clone()))?;
        let cw = cpu.load_weight(host_weight(kind, rows, cols, bytes))?;
        let ids = [0u32, 36, 5, 5, 999];
        let got = poisoned(dev, ids.len(), cols, |o| dev.embedding(&dw, &ids, o))?;
        let want = poisoned(cpu, ids.len(), cols, |o| cpu.embedding(&cw, &ids, o))?;
        r.push(format!("embedding {kind:?} {rows}x{cols}"), &got, &want, 0.0);

        let bias = randn(rng, rows, 0.5);
        let bb: Vec<u8> = bias.iter().flat_map(|v| v.to_le_bytes()).collect();
        let db = dev.load_weight(host_weight(WeightKind::F32, 1, rows, bb.clone()))?;
        let cb = cpu.load_weight(host_weight(WeightKind::F32, 1, rows, bb))?;
        // 1..8: GEMV; 9..64: the packed tensor-core GEMM on quantised kinds
        // (CUDA sm_80+); 65: bf16 expansion + cuBLAS.
        for m in [1usize, 3, 8, 9, 40, 64, 65] {
            let x = randn(rng, m * cols, 1.0);
            let (dx, cx) = (dev.upload(&x, m, cols)?, cpu.upload(&x, m, cols)?);
            let with_bias = m % 2 == 1;
            let got = poisoned(dev, m, rows, |o| {
                dev.matmul_many(&dx, &mut [MatmulJob { w: &dw, bias: with_bias.then_some(&db), out: o }])
            })?;
            let want = poisoned(cpu, m, rows, |o| {
                cpu.matmul_many(&cx, &mut [MatmulJob { w: &cw, bias: with_bias.then_some(&cb), out: o }])
            })?;
            // Batches past the GEMV size may round activations to bf16 (tensor cores).
            let tol = if m > 8 && kind != WeightKind::F32 { TOL_BF16 } else { TOL_F32_REDUCE };
            let b = if with_bias { "+bias" } else { "" };
            r.push(format!("matmul {kind:?} {m}x{cols}·{rows}{b}"), &got, &want, tol);
        }
    }
    // GPTQ act-order: a weight stored in another input order, next to one in
    // natural order in the same call, on every path (GEMV, mmq, cuBLAS).
    let (rows, cols) = (37, 96);
    let (dp, cp) = act_order_weight(dev, cpu, rng, rows, cols)?;
    let bytes = random_weight_bytes(WeightKind::Q8_0, 20, cols, 0.05, rng);
    let dn = dev.load_weight(host_weight(WeightKind::Q8_0, 20, cols, bytes.clone()))?;
    let cn = cpu.load_weight(host_weight(WeightKind::Q8_0, 20, cols, bytes))?;
    for m in [1usize, 9, 65] {
        let x = randn(rng, m * cols, 1.0);
        let (dx, cx) = (dev.upload(&x, m, cols)?, cpu.upload(&x, m, cols)?);
        let got = matmul_pair(dev, &dx, [(&dp, rows), (&dn, 20)])?;
        let want = matmul_pair(cpu, &cx, [(&cp, rows), (&cn, 20)])?;
        let tol = if m > 8 { TOL_BF16 } else { TOL_F32_REDUCE };
        r.push(format!("matmul act-order Q4_0 + Q8_0 {m}x{cols}"), &got, &want, tol);
    }
    Ok(())
}

/// Both products of one `matmul_many` call (outputs NaN-poisoned first),
/// concatenated.
fn matmul_pair<B: Backend>(be: &B, x: &B::Tensor, jobs: [(&B::Weight, usize); 2]) -> BackendResult<Vec<f32>> {
    let m = be.shape(x).0;
    let [(w1, n1), (w2, n2)] = jobs;
    let (mut a, mut b) = (be.upload(&vec![f32::NAN; m * n1], m, n1)?, be.upload(&vec![f32::NAN; m * n2], m, n2)?);
    be.matmul_many(
        x,
        &mut [MatmulJob { w: w1, bias: None, out: &mut a }, MatmulJob { w: w2, bias: None, out: &mut b }],
    )?;
    Ok([be.download(&a)?, be.download(&b)?].concat())
}

/// A Q4_0 weight with a GPTQ act-order input permutation, on both backends.
pub(super) fn act_order_weight<B: Backend>(
    dev: &B,
    cpu: &CpuBackend,
    rng: &mut Rng,
    rows: usize,
    cols: usize,
) -> BackendResult<(B::Weight, crate::backend::cpu::CpuWeight)> {
    let bytes = random_weight_bytes(WeightKind::Q4_0, rows, cols, 0.05, rng);
    let mut perm: Vec<u32> = (0..cols as u32).collect();
    for i in (1..cols).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let perm: Arc<[u32]> = perm.into();
    let mut h = host_weight(WeightKind::Q4_0, rows, cols, bytes);
    h.input_perm = Some(perm);
    Ok((dev.load_weight(h.clone())?, cpu.load_weight(h)?))
}

fn lora_matrix(rng: &mut Rng, rank: usize, inf: usize, outf: usize, dtype: LoraDtype) -> Arc<LoraMatrix> {
    Arc::new(LoraMatrix {
        rank,
        in_features: inf,
        out_features: outf,
        a: LoraValues::from_f32(randn(rng, rank * inf, 0.1), dtype),
        bt: LoraValues::from_f32(randn(rng, rank * outf, 0.1), dtype),
    })
}

/// Two adapters of different ranks over separate row ranges, with rows in no
/// segment that must stay untouched.
fn loras<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    for dtype in [LoraDtype::F32, LoraDtype::Bf16] {
        for (rows, inf, outf) in [(1, 896, 128), (11, 896, 4864), (7, 80, 48)] {
            let m1 = lora_matrix(rng, 8, inf, outf, dtype);
            let m2 = lora_matrix(rng, 16, inf, outf, dtype);
            let (d1, d2) = (dev.load_lora(&m1)?, dev.load_lora(&m2)?);
            let (c1, c2) = (cpu.load_lora(&m1)?, cpu.load_lora(&m2)?);
            let x = randn(rng, rows * inf, 1.0);
            let base = randn(rng, rows * outf, 1.0);
            let (dx, cx) = (dev.upload(&x, rows, inf)?, cpu.upload(&x, rows, inf)?);
            let (mut dout, mut cout) = (dev.upload(&base, rows, outf)?, cpu.upload(&base, rows, outf)?);
            let (s1, s2) = (0..rows.div_ceil(3), rows.div_ceil(3)..rows - rows / 4);
            dev.lora_add(
                &dx,
                &[LoraSegment { rows: s1.clone(), w: &d1 }, LoraSegment { rows: s2.clone(), w: &d2 }],
                &mut dout,
            )?;
            cpu.lora_add(&cx, &[LoraSegment { rows: s1, w: &c1 }, LoraSegment { rows: s2, w: &c2 }], &mut cout)?;
            r.push(
                format!("lora_add {dtype:?} r8+r16 {rows}x{inf}->{outf}"),
                &dev.download(&dout)?,
                &cpu.download(&cout)?,
                TOL_F32_REDUCE,
            );
        }
    }
    Ok(())
}

/// KV writes then paged attention: prefill chunks and decodes in one batch,
/// GQA, blocks out of order, a sliding window, and contexts long enough for
/// several split-K partitions; with an f32 cache, and with a bf16 one where
/// the device has it (checked against the CPU on the bf16-rounded keys and
/// values, and against the f32 cache within bf16 rounding).
fn attention<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    let cases = [(14, 2, 64, None), (8, 8, 128, None), (4, 2, 64, Some(100))];
    for (dtype, (nh, kvh, d, window)) in
        [KvDtype::F32, KvDtype::Bf16].into_iter().flat_map(|t| cases.into_iter().map(move |c| (t, c)))
    {
        let spec = KvCacheSpec { num_layers: 2, num_blocks: 64, block_size: 16, kv_heads: kvh, head_dim: d, dtype };
        let mut dkv = match dev.alloc_kv(spec) {
            // The CPU backend has only the f32 cache.
            Err(BackendError::Invalid(_)) if dtype == KvDtype::Bf16 => continue,
            other => other?,
        };
        let cpu_spec = KvCacheSpec { dtype: KvDtype::F32, ..spec };
        let mut ckv = cpu.alloc_kv(cpu_spec)?;
        let mut exact = cpu.alloc_kv(cpu_spec)?;
        let round = |x: Vec<f32>| -> Vec<f32> {
            match dtype {
                KvDtype::F32 => x,
                KvDtype::Bf16 => x.into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect(),
            }
        };
        // Sequence 0: 600 tokens in blocks 40..2 (descending); sequence 1: 37 tokens.
        let t0: Vec<BlockId> = (0..38).map(|i| BlockId(40 - i)).collect();
        let t1: Vec<BlockId> = (0..3).map(|i| BlockId(50 + i)).collect();
        let layer = 1;
        // Fill the whole context of both sequences.
        let lens = [600usize, 37];
        let tables = [&t0, &t1];
        for (s, &len) in lens.iter().enumerate() {
            let slots: Vec<u32> = (0..len).map(|p| tables[s][p / 16].0 * 16 + (p % 16) as u32).collect();
            let k = randn(rng, len * kvh * d, 1.0);
            let v = randn(rng, len * kvh * d, 1.0);
            let (dk, dv) = (dev.upload(&k, len, kvh * d)?, dev.upload(&v, len, kvh * d)?);
            dev.write_kv(&mut dkv, layer, &dk, &dv, &slots)?;
            let (ek, ev) = (cpu.upload(&k, len, kvh * d)?, cpu.upload(&v, len, kvh * d)?);
            cpu.write_kv(&mut exact, layer, &ek, &ev, &slots)?;
            let (ck, cv) = (cpu.upload(&round(k), len, kvh * d)?, cpu.upload(&round(v), len, kvh * d)?);
            cpu.write_kv(&mut ckv, layer, &ck, &cv, &slots)?;
        }
        // Queries: the last 5 tokens of sequence 0 (a prefill chunk), one row
        // in no sequence, and the last token of sequence 1 (a decode).
        let rows = 7;
        let seqs = [
            SeqAttention { rows: 0..5, context_len: 600, block_table: &t0 },
            SeqAttention { rows: 6..7, context_len: 37, block_table: &t1 },
        ];
        let meta = AttentionMeta {
            seqs: &seqs,
            num_heads: nh,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.125,
            sliding_window: window,
        };
        let q = randn(rng, rows * nh * d, 1.0);
        let (dq, cq) = (dev.upload(&q, rows, nh * d)?, cpu.upload(&q, rows, nh * d)?);
        let got = poisoned(dev, rows, nh * d, |o| dev.paged_attention(&dkv, layer, &dq, &meta, o))?;
        let want = poisoned(cpu, rows, nh * d, |o| cpu.paged_attention(&ckv, layer, &cq, &meta, o))?;
        let w = window.map_or(String::new(), |w| format!(" window {w}"));
        let t = if dtype == KvDtype::Bf16 { " bf16 cache" } else { "" };
        r.push(format!("kv+attention h{nh}/{kvh} d{d} ctx 600,37{w}{t}"), &got, &want, TOL_F32_REDUCE);
        if dtype == KvDtype::Bf16 {
            let f32_cache = poisoned(cpu, rows, nh * d, |o| cpu.paged_attention(&exact, layer, &cq, &meta, o))?;
            r.push(format!("  bf16 cache vs f32 cache h{nh}/{kvh} d{d}{w}"), &got, &f32_cache, TOL_BF16);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Isa;

    /// The harness against itself: the portable CPU code against the SIMD code.
    /// Every check must run and pass, and a corrupted output must fail.
    #[test]
    fn selftest_passes_portable_cpu_against_simd_cpu() {
        let simd = CpuBackend::new(2).unwrap();
        let scalar = CpuBackend::with_isa(2, Isa::Scalar).unwrap();
        let report = run(&scalar, &simd, 1);
        eprintln!("{report}");
        // 143 inference checks and 85 training ones (a device runs 6 more
        // with a bf16 KV cache, and 6 with a both-transposed gemm, which the
        // CPU lacks): a section that stops at a failing op would report one
        // check instead of its own.
        assert_eq!(report.checks.len(), 228, "{report}");
        assert_eq!(report.failures(), 0, "{report}");
    }

    #[test]
    fn rel_err_catches_nan_and_mismatch() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[1.0, f32::NAN], &[1.0, 2.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
        assert!((rel_err(&[1.0, 2.2], &[1.0, 2.0]) - 0.1).abs() < 1e-6);
        let c = Check { name: "x".into(), err: f32::NAN, tol: 1.0 };
        assert!(!c.passed());
    }
}
