//! The training ops of a backend against the CPU: input gradients through
//! every weight kind, the f32 GEMM in each transpose, the row-wise backward
//! ops, attention's backward, cross-entropy, dropout, AdamW and the tensor
//! utilities. Outputs that an op overwrites are NaN-poisoned first.

use std::any::TypeId;

use super::{host_weight, poisoned, randn, Report, TOL_BF16, TOL_F32, TOL_F32_REDUCE};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWStep, AttentionMeta, Backend, BackendResult, RopeStyle, RopeTable, SeqAttention};
use crate::quant::ggml::WeightKind;
use crate::quant::random::{random_weight_bytes, Rng};

/// `dx (+)= Σ dy · W` for every weight kind (two weights sharing dx), mixed
/// kinds in one call, and no jobs at all.
pub(super) fn input_grads<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    let m = 40;
    let weights = |rng: &mut Rng, kind: WeightKind, rows: usize, cols: usize| -> BackendResult<(B::Weight, _)> {
        let bytes = random_weight_bytes(kind, rows, cols, 0.05, rng);
        Ok((
            dev.load_weight(host_weight(kind, rows, cols, bytes.clone()))?,
            cpu.load_weight(host_weight(kind, rows, cols, bytes))?,
        ))
    };
    for kind in WeightKind::ALL {
        let cols = match kind.block_size() {
            256 => 512,
            128 => 384,
            64 => 192,
            _ => 96,
        };
        let (n1, n2) = (37, 20);
        let (dw1, cw1) = weights(rng, kind, n1, cols)?;
        let (dw2, cw2) = weights(rng, kind, n2, cols)?;
        let (y1, y2) = (randn(rng, m * n1, 1.0), randn(rng, m * n2, 1.0));
        let (dy1, cy1) = (dev.upload(&y1, m, n1)?, cpu.upload(&y1, m, n1)?);
        let (dy2, cy2) = (dev.upload(&y2, m, n2)?, cpu.upload(&y2, m, n2)?);
        // Quantised and 16-bit weights may run on tensor cores with dy in bf16.
        let tol = if kind == WeightKind::F32 { TOL_F32_REDUCE } else { TOL_BF16 };
        for accumulate in [false, true] {
            let start = if accumulate { randn(rng, m * cols, 1.0) } else { vec![f32::NAN; m * cols] };
            let (mut ddx, mut cdx) = (dev.upload(&start, m, cols)?, cpu.upload(&start, m, cols)?);
            dev.matmul_input_grad(&[(&dy1, &dw1), (&dy2, &dw2)], &mut ddx, accumulate)?;
            cpu.matmul_input_grad(&[(&cy1, &cw1), (&cy2, &cw2)], &mut cdx, accumulate)?;
            let acc = if accumulate { " +=" } else { "" };
            r.push(
                format!("matmul_input_grad {kind:?} {m}x({n1}+{n2})·{cols}{acc}"),
                &dev.download(&ddx)?,
                &cpu.download(&cdx)?,
                tol,
            );
        }
    }
    // A quantised and an f32 weight into one dx: the f32 GEMM adds to the bf16 one.
    let cols = 512;
    let (dq, cq) = weights(rng, WeightKind::Q4K, 24, cols)?;
    let (df, cf) = weights(rng, WeightKind::F32, 33, cols)?;
    let (y1, y2) = (randn(rng, m * 24, 1.0), randn(rng, m * 33, 1.0));
    let (dy1, cy1) = (dev.upload(&y1, m, 24)?, cpu.upload(&y1, m, 24)?);
    let (dy2, cy2) = (dev.upload(&y2, m, 33)?, cpu.upload(&y2, m, 33)?);
    let got = poisoned(dev, m, cols, |o| dev.matmul_input_grad(&[(&dy1, &dq), (&dy2, &df)], o, false))?;
    let want = poisoned(cpu, m, cols, |o| cpu.matmul_input_grad(&[(&cy1, &cq), (&cy2, &cf)], o, false))?;
    r.push(format!("matmul_input_grad Q4K+F32 {m}x(24+33)·{cols}"), &got, &want, TOL_BF16);
    // GPTQ act-order: the gradient comes back in natural input order, added
    // to a natural-order weight's.
    let (dp, cp) = super::act_order_weight(dev, cpu, rng, 24, 96)?;
    let (dn, cn) = weights(rng, WeightKind::Q8_0, 33, 96)?;
    let (dy1, cy1) = (dev.upload(&y1, m, 24)?, cpu.upload(&y1, m, 24)?);
    let got = poisoned(dev, m, 96, |o| dev.matmul_input_grad(&[(&dy1, &dp), (&dy2, &dn)], o, false))?;
    let want = poisoned(cpu, m, 96, |o| cpu.matmul_input_grad(&[(&cy1, &cp), (&cy2, &cn)], o, false))?;
    r.push(format!("matmul_input_grad act-order Q4_0+Q8_0 {m}x(24+33)·96"), &got, &want, TOL_BF16);
    // No jobs: the empty sum.
    let got = poisoned(dev, 3, 16, |o| dev.matmul_input_grad(&[], o, false))?;
    r.push("matmul_input_grad no jobs".into(), &got, &[0.0; 48], 0.0);
    Ok(())
}

/// `c = alpha · op(a) · op(b) + beta · c` in every transpose combination the
/// reference has (the CPU has no both-transposed GEMM: for a device that does,
/// the CPU computes it from a transposed copy of `a`).
pub(super) fn gemms<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    let dev_is_cpu = TypeId::of::<B>() == TypeId::of::<CpuBackend>();
    for (m, n, k) in [(37, 9, 53), (5, 700, 33), (64, 16, 896)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            if ta && tb && dev_is_cpu {
                continue;
            }
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0)] {
                let a = randn(rng, m * k, 1.0);
                let b = randn(rng, k * n, 1.0);
                let (ar, ac) = if ta { (k, m) } else { (m, k) };
                let (br, bc) = if tb { (n, k) } else { (k, n) };
                // beta = 0 must not read c: poison it.
                let c0 = if beta == 0.0 { vec![f32::NAN; m * n] } else { randn(rng, m * n, 1.0) };
                let (da, db) = (dev.upload(&a, ar, ac)?, dev.upload(&b, br, bc)?);
                let mut dc = dev.upload(&c0, m, n)?;
                dev.gemm(&da, ta, &db, tb, alpha, beta, &mut dc)?;
                let mut cc = cpu.upload(&c0, m, n)?;
                if ta && tb {
                    let at: Vec<f32> = (0..m * k).map(|i| a[(i % k) * m + i / k]).collect();
                    cpu.gemm(&cpu.upload(&at, m, k)?, false, &cpu.upload(&b, br, bc)?, true, alpha, beta, &mut cc)?;
                } else {
                    cpu.gemm(&cpu.upload(&a, ar, ac)?, ta, &cpu.upload(&b, br, bc)?, tb, alpha, beta, &mut cc)?;
                }
                let t = |x: bool| if x { "T" } else { "N" };
                r.push(
                    format!("gemm {}{} {m}x{n}x{k} a{alpha} b{beta}", t(ta), t(tb)),
                    &dev.download(&dc)?,
                    &cpu.download(&cc)?,
                    TOL_F32_REDUCE,
                );
            }
        }
    }
    Ok(())
}

/// rms_norm_backward (accumulating into dx), rope_backward, silu_mul_backward.
pub(super) fn row_grads<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    for (rows, cols) in [(3, 80), (17, 896)] {
        let x = randn(rng, rows * cols, 2.0);
        let dy = randn(rng, rows * cols, 1.0);
        let dx0 = randn(rng, rows * cols, 1.0);
        let wb: Vec<u8> = randn(rng, cols, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect();
        let dw = dev.load_weight(host_weight(WeightKind::F32, 1, cols, wb.clone()))?;
        let cw = cpu.load_weight(host_weight(WeightKind::F32, 1, cols, wb))?;
        let (mut ddx, mut cdx) = (dev.upload(&dx0, rows, cols)?, cpu.upload(&dx0, rows, cols)?);
        dev.rms_norm_backward(&dev.upload(&x, rows, cols)?, &dw, 1e-6, &dev.upload(&dy, rows, cols)?, &mut ddx)?;
        cpu.rms_norm_backward(&cpu.upload(&x, rows, cols)?, &cw, 1e-6, &cpu.upload(&dy, rows, cols)?, &mut cdx)?;
        r.push(format!("rms_norm_backward {rows}x{cols}"), &dev.download(&ddx)?, &cpu.download(&cdx)?, TOL_F32);

        let gate = randn(rng, rows * cols, 6.0);
        let up = randn(rng, rows * cols, 2.0);
        let (dg, du, dd) = (dev.upload(&gate, rows, cols)?, dev.upload(&up, rows, cols)?, dev.upload(&dy, rows, cols)?);
        let (cg, cu, cd) = (cpu.upload(&gate, rows, cols)?, cpu.upload(&up, rows, cols)?, cpu.upload(&dy, rows, cols)?);
        let mut grads = vec![];
        for be_is_dev in [true, false] {
            let nan = vec![f32::NAN; rows * cols];
            let pair = if be_is_dev {
                let (mut a, mut b) = (dev.upload(&nan, rows, cols)?, dev.upload(&nan, rows, cols)?);
                dev.silu_mul_backward(&dg, &du, &dd, &mut a, &mut b)?;
                (dev.download(&a)?, dev.download(&b)?)
            } else {
                let (mut a, mut b) = (cpu.upload(&nan, rows, cols)?, cpu.upload(&nan, rows, cols)?);
                cpu.silu_mul_backward(&cg, &cu, &cd, &mut a, &mut b)?;
                (cpu.download(&a)?, cpu.download(&b)?)
            };
            grads.push(pair);
        }
        r.push(format!("silu_mul_backward d gate {rows}x{cols}"), &grads[0].0, &grads[1].0, TOL_F32);
        r.push(format!("silu_mul_backward d up {rows}x{cols}"), &grads[0].1, &grads[1].1, TOL_F32);
    }
    for (style, head_dim, heads, tokens) in [(RopeStyle::Neox, 64, 14, 5), (RopeStyle::Interleaved, 128, 2, 3)] {
        let table = RopeTable {
            inv_freq: (0..head_dim / 2).map(|i| 1e6f32.powf(-((2 * i) as f32) / head_dim as f32)).collect(),
            style,
        };
        let cols = heads * head_dim;
        let x = randn(rng, tokens * cols, 1.0);
        let pos: Vec<u32> = (0..tokens as u32).map(|t| t * 41 + 7).collect();
        let (mut dx, mut cx) = (dev.upload(&x, tokens, cols)?, cpu.upload(&x, tokens, cols)?);
        dev.rope_backward(&mut dx, heads, head_dim, &pos, &table)?;
        cpu.rope_backward(&mut cx, heads, head_dim, &pos, &table)?;
        let what = format!("rope_backward {style:?} d{head_dim} h{heads} t{tokens}");
        r.push(what, &dev.download(&dx)?, &cpu.download(&cx)?, TOL_F32);
    }
    Ok(())
}

/// Attention's backward over two whole sequences of different lengths with a
/// row in neither: GQA, multi-head, and a sliding window.
pub(super) fn attention_grads<B: Backend>(
    dev: &B,
    cpu: &CpuBackend,
    rng: &mut Rng,
    r: &mut Report,
) -> BackendResult<()> {
    let (len0, len1) = (150, 37);
    let rows = len0 + 1 + len1;
    let seqs = [
        SeqAttention { rows: 0..len0, context_len: len0, block_table: &[] },
        SeqAttention { rows: len0 + 1..rows, context_len: len1, block_table: &[] },
    ];
    for (nh, kvh, d, window) in [(14, 2, 64, None), (8, 8, 128, None), (4, 2, 64, Some(40))] {
        let meta = AttentionMeta {
            seqs: &seqs,
            num_heads: nh,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.125,
            sliding_window: window,
        };
        let (qw, kw) = (nh * d, kvh * d);
        let inputs: Vec<(Vec<f32>, usize)> =
            [qw, kw, kw, qw, qw].iter().map(|&w| (randn(rng, rows * w, 1.0), w)).collect();
        let mut results = vec![];
        for be_is_dev in [true, false] {
            let nan = |w: usize| vec![f32::NAN; rows * w];
            let grads = if be_is_dev {
                let t: Vec<B::Tensor> =
                    inputs.iter().map(|(v, w)| dev.upload(v, rows, *w)).collect::<Result<_, _>>()?;
                let (mut dq, mut dk, mut dv) =
                    (dev.upload(&nan(qw), rows, qw)?, dev.upload(&nan(kw), rows, kw)?, dev.upload(&nan(kw), rows, kw)?);
                dev.attention_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &meta, &mut dq, &mut dk, &mut dv)?;
                [dev.download(&dq)?, dev.download(&dk)?, dev.download(&dv)?]
            } else {
                let t: Vec<_> = inputs.iter().map(|(v, w)| cpu.upload(v, rows, *w)).collect::<Result<_, _>>()?;
                let (mut dq, mut dk, mut dv) =
                    (cpu.upload(&nan(qw), rows, qw)?, cpu.upload(&nan(kw), rows, kw)?, cpu.upload(&nan(kw), rows, kw)?);
                cpu.attention_backward(&t[0], &t[1], &t[2], &t[3], &t[4], &meta, &mut dq, &mut dk, &mut dv)?;
                [cpu.download(&dq)?, cpu.download(&dk)?, cpu.download(&dv)?]
            };
            results.push(grads);
        }
        let w = window.map_or(String::new(), |w| format!(" window {w}"));
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            r.push(
                format!("attention_backward {name} h{nh}/{kvh} d{d} seqs {len0},{len1}{w}"),
                &results[0][i],
                &results[1][i],
                TOL_F32_REDUCE,
            );
        }
    }
    Ok(())
}

/// Loss, hits and gradient, at a small and at a real vocabulary size.
pub(super) fn losses<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    for (rows, vocab) in [(5, 1000), (3, 151_936)] {
        let mut x = randn(rng, rows * vocab, 8.0);
        let labels: Vec<u32> = (0..rows).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
        // Some rows are hits: a clear winner at the label (one at the last index).
        x[labels[0] as usize] = 20.0;
        let last = (rows - 1) * vocab + vocab - 1;
        x[last] = 20.0;
        let mut labels = labels;
        labels[rows - 1] = vocab as u32 - 1;
        let grad_scale = 1.0 / rows as f32;
        let (mut dl, mut cl) = (dev.upload(&x, rows, vocab)?, cpu.upload(&x, rows, vocab)?);
        let got = dev.cross_entropy(&mut dl, &labels, Some(grad_scale))?;
        let want = cpu.cross_entropy(&mut cl, &labels, Some(grad_scale))?;
        let what = format!("cross_entropy {rows}x{vocab}");
        r.push(format!("{what} loss"), &[got.loss as f32], &[want.loss as f32], TOL_F32_REDUCE);
        r.checks.push(super::Check {
            name: format!("{what} hits {}/{}", got.correct, want.correct),
            err: if got.correct == want.correct { 0.0 } else { f32::INFINITY },
            tol: 0.0,
        });
        r.push(format!("{what} gradient"), &dev.download(&dl)?, &cpu.download(&cl)?, TOL_F32);
        let (mut dl, mut cl) = (dev.upload(&x, rows, vocab)?, cpu.upload(&x, rows, vocab)?);
        let got = dev.cross_entropy(&mut dl, &labels, None)?;
        let want = cpu.cross_entropy(&mut cl, &labels, None)?;
        let untouched = dev.download(&dl)? == x;
        r.checks.push(super::Check {
            name: format!("{what} loss only (logits untouched: {untouched})"),
            err: if untouched { super::rel_err(&[got.loss as f32], &[want.loss as f32]) } else { f32::INFINITY },
            tol: TOL_F32_REDUCE,
        });
    }
    Ok(())
}

/// add_rows, dropout (the same mask), copy, fill, scale, sum_squares and two
/// AdamW steps.
pub(super) fn utilities<B: Backend>(dev: &B, cpu: &CpuBackend, rng: &mut Rng, r: &mut Report) -> BackendResult<()> {
    let (rows, cols) = (23, 896);
    let n = rows * cols;
    let x = randn(rng, n, 1.0);
    let (dx, cx) = (dev.upload(&x, rows, cols)?, cpu.upload(&x, rows, cols)?);

    let src = randn(rng, 5 * cols, 1.0);
    let pick = [22, 0, 7, 8, 3];
    let (mut dd, mut cd) = (dev.upload(&x, rows, cols)?, cpu.upload(&x, rows, cols)?);
    dev.add_rows(&dev.upload(&src, 5, cols)?, &pick, &mut dd)?;
    cpu.add_rows(&cpu.upload(&src, 5, cols)?, &pick, &mut cd)?;
    r.push(format!("add_rows 5 into {rows}x{cols}"), &dev.download(&dd)?, &cpu.download(&cd)?, 0.0);

    for (p, seed) in [(0.1f32, 0xDEAD_BEEF_CAFE_F00Du64), (0.5, 42)] {
        let got = poisoned(dev, rows, cols, |o| dev.dropout(&dx, p, seed, o))?;
        let want = poisoned(cpu, rows, cols, |o| cpu.dropout(&cx, p, seed, o))?;
        r.push(format!("dropout p{p} {rows}x{cols} (the same mask)"), &got, &want, 0.0);
    }

    r.push(format!("copy {rows}x{cols}"), &dev.download(&dev.copy(&dx)?)?, &x, 0.0);
    let got = poisoned(dev, rows, cols, |o| dev.fill(o, -1.5))?;
    r.push(format!("fill {rows}x{cols}"), &got, &vec![-1.5; n], 0.0);
    let (mut ds, mut cs) = (dev.upload(&x, rows, cols)?, cpu.upload(&x, rows, cols)?);
    dev.scale(&mut ds, 0.37)?;
    cpu.scale(&mut cs, 0.37)?;
    r.push(format!("scale {rows}x{cols}"), &dev.download(&ds)?, &cpu.download(&cs)?, 0.0);

    for len in [1000, 3 * 4096 + 77] {
        let v = randn(rng, len, 1.0);
        let got = dev.sum_squares(&dev.upload(&v, 1, len)?)? as f32;
        let want = cpu.sum_squares(&cpu.upload(&v, 1, len)?)? as f32;
        r.push(format!("sum_squares {len}"), &[got], &[want], TOL_F32);
    }

    let param = randn(rng, n, 1.0);
    let (mut dp, mut cp) = (dev.upload(&param, rows, cols)?, cpu.upload(&param, rows, cols)?);
    let zeros = vec![0.0; n];
    let (mut dm, mut cm) = (dev.upload(&zeros, rows, cols)?, cpu.upload(&zeros, rows, cols)?);
    let (mut dv, mut cv) = (dev.upload(&zeros, rows, cols)?, cpu.upload(&zeros, rows, cols)?);
    for step in [1, 2] {
        let g = randn(rng, n, 0.1);
        let (dg, cg) = (dev.upload(&g, rows, cols)?, cpu.upload(&g, rows, cols)?);
        let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 0.7 };
        dev.adamw(&mut dp, &dg, &mut dm, &mut dv, &hp)?;
        cpu.adamw(&mut cp, &cg, &mut cm, &mut cv, &hp)?;
    }
    for (name, d, c) in [("param", &dp, &cp), ("m", &dm, &cm), ("v", &dv, &cv)] {
        r.push(format!("adamw 2 steps {name} {rows}x{cols}"), &dev.download(d)?, &cpu.download(c)?, TOL_F32);
    }
    Ok(())
}
