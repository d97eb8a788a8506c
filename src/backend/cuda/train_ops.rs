//! Typed launch wrappers for `kernels/train.cu` (training's backward ops,
//! loss, dropout, optimiser and tensor utilities), one per kernel family, each
//! with the grid its `.cu` comment documents. The cuBLAS side of training
//! (`matmul_input_grad`, `gemm`) lives in `gemm.rs`; rope's backward is
//! `ops::rope` with direction −1.

use cudarc::driver::CudaSlice;

use super::launch::{KArg, Kernel};
use super::ops::vector;
use super::plan::attention_grad_plan;
use super::{CudaBackend, CudaTensor, CudaWeight};
use crate::backend::{AdamWStep, AttentionMeta, BackendResult, CrossEntropySums};

use KArg::{Ptr, F32, I32, I64};

const BLOCK: u32 = 256;
/// Elements per partial sum of `sum_squares_partial` (SUMSQ_CHUNK in train.cu).
const SUMSQ_CHUNK: usize = 4096;
/// The largest head the attention backward kernels take (AB_MAX_DIM).
const MAX_HEAD_DIM: usize = 256;

fn elementwise_grid(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(BLOCK as usize) as u32, 1, 1)
}

fn len(t: &CudaTensor) -> usize {
    t.rows * t.cols
}

/// `dx += ∂(rms_norm(x) · w)/∂x · dy`, one block per row.
pub fn rms_norm_backward(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    eps: f32,
    dy: &CudaTensor,
    dx: &mut CudaTensor,
) -> BackendResult<()> {
    assert_eq!((x.rows, x.cols), (dy.rows, dy.cols));
    assert_eq!((x.rows, x.cols), (dx.rows, dx.cols));
    assert_eq!(w.cols, x.cols);
    be.kernels.launch(
        &be.stream,
        Kernel::RmsNormBackward,
        (x.rows as u32, 1, 1),
        BLOCK,
        &[
            Ptr(be.ptr(&x.data)),
            Ptr(be.ptr(vector(w))),
            Ptr(be.ptr(&dy.data)),
            Ptr(be.ptr(&dx.data)),
            I32(x.rows as i32),
            I32(x.cols as i32),
            F32(eps),
        ],
    )
}

pub fn silu_mul_backward(
    be: &CudaBackend,
    gate: &CudaTensor,
    up: &CudaTensor,
    dout: &CudaTensor,
    dgate: &mut CudaTensor,
    dup: &mut CudaTensor,
) -> BackendResult<()> {
    let n = len(gate);
    assert!(len(up) == n && len(dout) == n && len(dgate) == n && len(dup) == n);
    be.kernels.launch(
        &be.stream,
        Kernel::SiluMulBackward,
        elementwise_grid(n),
        BLOCK,
        &[
            Ptr(be.ptr(&gate.data)),
            Ptr(be.ptr(&up.data)),
            Ptr(be.ptr(&dout.data)),
            Ptr(be.ptr(&dgate.data)),
            Ptr(be.ptr(&dup.data)),
            I64(n as i64),
        ],
    )
}

/// Per-row loss and hit on the device (one block per row), summed here in
/// row order (the loss in f64), as the CPU sums them.
pub fn cross_entropy(
    be: &CudaBackend,
    logits: &mut CudaTensor,
    labels: &[u32],
    grad_scale: Option<f32>,
) -> BackendResult<CrossEntropySums> {
    let (rows, vocab) = (logits.rows, logits.cols);
    assert_eq!(rows, labels.len(), "cross-entropy: one label per row");
    for &l in labels {
        assert!((l as usize) < vocab, "label {l} outside a vocabulary of {vocab}");
    }
    if rows == 0 {
        return Ok(CrossEntropySums::default());
    }
    let d_labels = be.upload_vec(labels)?;
    let loss = be.alloc_zeros::<f32>(rows)?;
    let correct = be.alloc_zeros::<u32>(rows)?;
    be.kernels.launch(
        &be.stream,
        Kernel::CrossEntropy,
        (rows as u32, 1, 1),
        BLOCK,
        &[
            Ptr(be.ptr(&logits.data)),
            Ptr(be.ptr(&d_labels)),
            I32(rows as i32),
            I32(vocab as i32),
            I32(grad_scale.is_some() as i32),
            F32(grad_scale.unwrap_or(0.0)),
            Ptr(be.ptr(&loss)),
            Ptr(be.ptr(&correct)),
        ],
    )?;
    let loss = download(be, &loss, rows)?;
    let correct = download(be, &correct, rows)?;
    let mut sums = CrossEntropySums::default();
    for (l, c) in loss.iter().zip(&correct) {
        sums.loss += *l as f64;
        sums.correct += (*c != 0) as usize;
    }
    Ok(sums)
}

/// The first `n` elements of a device buffer (an empty buffer is allocated as
/// one element).
fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    be: &CudaBackend,
    s: &CudaSlice<T>,
    n: usize,
) -> BackendResult<Vec<T>> {
    let mut v = super::ck(be.stream.clone_dtoh(s), "download")?;
    v.truncate(n);
    Ok(v)
}

/// Attention's backward over whole sequences: `attention_backward_dq` per
/// (query row, head) writes dq and each row's softmax statistics, then
/// `attention_backward_dkv` per (key row, KV head) writes dk and dv. Every
/// element of dq, dk and dv is written (zeros for rows in no sequence).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    be: &CudaBackend,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    out: &CudaTensor,
    dout: &CudaTensor,
    meta: &AttentionMeta<'_>,
    dq: &mut CudaTensor,
    dk: &mut CudaTensor,
    dv: &mut CudaTensor,
) -> BackendResult<()> {
    let (nh, kvh, d) = (meta.num_heads, meta.kv_heads, meta.head_dim);
    let (qw, kw) = (nh * d, kvh * d);
    let rows = q.rows;
    assert_eq!((q.cols, out.cols, dout.cols, dq.cols), (qw, qw, qw, qw));
    assert_eq!((k.cols, v.cols, dk.cols, dv.cols), (kw, kw, kw, kw));
    for t in [k, v, out, dout] {
        assert_eq!(t.rows, rows);
    }
    assert_eq!((dq.rows, dk.rows, dv.rows), (rows, rows, rows));
    assert!(kvh > 0 && nh % kvh == 0, "{nh} query heads over {kvh} KV heads");
    assert!(d > 0 && d <= MAX_HEAD_DIM, "head_dim {d} is not supported by kernels/train.cu");
    if rows == 0 {
        return Ok(());
    }
    let plan = attention_grad_plan(meta, rows);
    let q_meta = be.upload_vec(&plan.q_meta)?;
    let k_meta = be.upload_vec(&plan.k_meta)?;
    let stats = be.alloc_zeros::<f32>(rows * nh * 3)?;
    be.kernels.launch(
        &be.stream,
        Kernel::AttentionBackwardDq,
        (rows as u32, nh as u32, 1),
        128,
        &[
            Ptr(be.ptr(&q.data)),
            Ptr(be.ptr(&k.data)),
            Ptr(be.ptr(&v.data)),
            Ptr(be.ptr(&out.data)),
            Ptr(be.ptr(&dout.data)),
            Ptr(be.ptr(&q_meta)),
            Ptr(be.ptr(&stats)),
            Ptr(be.ptr(&dq.data)),
            I32(rows as i32),
            I32(nh as i32),
            I32(kvh as i32),
            I32(d as i32),
            F32(meta.scale),
        ],
    )?;
    be.kernels.launch(
        &be.stream,
        Kernel::AttentionBackwardDkv,
        (rows as u32, kvh as u32, 1),
        128,
        &[
            Ptr(be.ptr(&q.data)),
            Ptr(be.ptr(&k.data)),
            Ptr(be.ptr(&v.data)),
            Ptr(be.ptr(&dout.data)),
            Ptr(be.ptr(&k_meta)),
            Ptr(be.ptr(&stats)),
            Ptr(be.ptr(&dk.data)),
            Ptr(be.ptr(&dv.data)),
            I32(rows as i32),
            I32(nh as i32),
            I32(kvh as i32),
            I32(d as i32),
            F32(meta.scale),
        ],
    )
}

/// `dst[rows[i]] += src[i]`, one block per source row. Rows must be distinct
/// (blocks run concurrently; checked here) and inside `dst`.
pub fn add_rows(be: &CudaBackend, src: &CudaTensor, rows: &[usize], dst: &mut CudaTensor) -> BackendResult<()> {
    assert_eq!(src.cols, dst.cols);
    assert_eq!(src.rows, rows.len());
    let mut seen = vec![false; dst.rows];
    for &r in rows {
        assert!(r < dst.rows, "row {r} of {}", dst.rows);
        assert!(!std::mem::replace(&mut seen[r], true), "add_rows: row {r} twice");
    }
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let d_idx = be.upload_vec(&idx)?;
    be.kernels.launch(
        &be.stream,
        Kernel::AddRows,
        (rows.len() as u32, 1, 1),
        BLOCK,
        &[
            Ptr(be.ptr(&src.data)),
            Ptr(be.ptr(&d_idx)),
            Ptr(be.ptr(&dst.data)),
            I32(rows.len() as i32),
            I32(src.cols as i32),
        ],
    )
}

/// Inverted dropout with the mask of [`crate::backend::dropout_keep`], bit for bit.
pub fn dropout(be: &CudaBackend, x: &CudaTensor, p: f32, seed: u64, out: &mut CudaTensor) -> BackendResult<()> {
    let n = len(x);
    assert_eq!(n, len(out));
    // Rounded to f32 as the CPU computes it.
    let keep_scale = 1.0f32 / (1.0 - p);
    be.kernels.launch(
        &be.stream,
        Kernel::Dropout,
        elementwise_grid(n),
        BLOCK,
        &[Ptr(be.ptr(&x.data)), Ptr(be.ptr(&out.data)), I64(n as i64), F32(p), F32(keep_scale), I64(seed as i64)],
    )
}

pub fn copy(be: &CudaBackend, x: &CudaTensor) -> BackendResult<CudaTensor> {
    let n = len(x);
    let out = CudaTensor { data: be.alloc_zeros(n)?, rows: x.rows, cols: x.cols };
    be.kernels.launch(
        &be.stream,
        Kernel::CopyF32,
        elementwise_grid(n),
        BLOCK,
        &[Ptr(be.ptr(&x.data)), Ptr(be.ptr(&out.data)), I64(n as i64)],
    )?;
    Ok(out)
}

pub fn fill(be: &CudaBackend, x: &mut CudaTensor, value: f32) -> BackendResult<()> {
    let n = len(x);
    be.kernels.launch(
        &be.stream,
        Kernel::FillF32,
        elementwise_grid(n),
        BLOCK,
        &[Ptr(be.ptr(&x.data)), I64(n as i64), F32(value)],
    )
}

pub fn scale(be: &CudaBackend, x: &mut CudaTensor, s: f32) -> BackendResult<()> {
    let n = len(x);
    be.kernels.launch(
        &be.stream,
        Kernel::ScaleF32,
        elementwise_grid(n),
        BLOCK,
        &[Ptr(be.ptr(&x.data)), I64(n as i64), F32(s)],
    )
}

/// Σ x²: a partial sum per 4096 elements on the device, added here in f64 in
/// order (the CPU sums the same chunks the same way).
pub fn sum_squares(be: &CudaBackend, x: &CudaTensor) -> BackendResult<f64> {
    let n = len(x);
    let chunks = n.div_ceil(SUMSQ_CHUNK);
    if chunks == 0 {
        return Ok(0.0);
    }
    let partial = be.alloc_zeros::<f32>(chunks)?;
    be.kernels.launch(
        &be.stream,
        Kernel::SumSquaresPartial,
        (chunks as u32, 1, 1),
        BLOCK,
        &[Ptr(be.ptr(&x.data)), I64(n as i64), Ptr(be.ptr(&partial))],
    )?;
    Ok(download(be, &partial, chunks)?.iter().map(|&p| p as f64).sum())
}

/// One AdamW step with the scalars of [`AdamWStep::scalars`], as the CPU.
pub fn adamw(
    be: &CudaBackend,
    param: &mut CudaTensor,
    grad: &CudaTensor,
    m: &mut CudaTensor,
    v: &mut CudaTensor,
    hp: &AdamWStep,
) -> BackendResult<()> {
    let n = len(param);
    assert!(len(grad) == n && len(m) == n && len(v) == n);
    let s = hp.scalars();
    be.kernels.launch(
        &be.stream,
        Kernel::AdamW,
        elementwise_grid(n),
        BLOCK,
        &[
            Ptr(be.ptr(&param.data)),
            Ptr(be.ptr(&grad.data)),
            Ptr(be.ptr(&m.data)),
            Ptr(be.ptr(&v.data)),
            I64(n as i64),
            F32(hp.grad_scale),
            F32(s.decay),
            F32(s.w1),
            F32(s.w2),
            F32(hp.beta2),
            F32(s.bc2_sqrt),
            F32(s.step_size),
            F32(hp.eps),
        ],
    )
}
