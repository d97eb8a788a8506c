//! `out = x · Wᵀ (+ bias)` for every weight kind, its input gradient
//! `dx (+)= Σ dy · W`, and the f32 `gemm` training uses for LoRA factors.
//!
//! Small batches (≤ [`GEMV_MAX_ROWS`] rows, i.e. decode) are memory-bound: a
//! GEMV kernel per kind reads each weight byte once, dequantising in registers,
//! with f32 activations. Up to [`MMQ_MAX_ROWS`] rows a quantised weight stays
//! packed too: `mmq_<kind>` decodes it tile by tile into shared memory and runs
//! tensor-core products (sm_80+; [`gemm_path`] decides). Larger batches are
//! compute-bound and go to cuBLAS on
//! tensor cores: activations are rounded to bf16 (f16 for f16 weights), and a
//! quantised weight is first expanded to a bf16 scratch matrix, whose cost the
//! batch amortises. f32 weights use a plain f32 GEMM.
//!
//! Every cuBLAS call goes through [`blas`] with the row-major → column-major
//! mapping of `plan::blas_gemm` (unit-tested there without a GPU).

use super::launch::{is_block_quantized, KArg, Kernel};
use super::plan::{blas_gemm, BlasGemm};
use super::{grow, ops, train_ops, CudaBackend, CudaTensor, CudaWeight, Scratch};
use crate::backend::{BackendError, BackendResult, MatmulJob};
use crate::quant::ggml::WeightKind;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};

const F32: cudaDataType_t = cudaDataType_t::CUDA_R_32F;

/// The most activation rows the GEMV kernels take (kernels/quant.cu).
pub const GEMV_MAX_ROWS: usize = 8;
/// The most activation rows the tensor-core `mmq` kernels take for a
/// quantised weight; above it the bf16 expansion + cuBLAS amortises.
pub const MMQ_MAX_ROWS: usize = 64;

/// How one weight's product is computed for a batch of `rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// `gemv_<kind>`: f32 activations, weights decoded in registers.
    Gemv,
    /// `mmq_<kind>`: packed weights decoded to bf16 tiles in shared memory,
    /// tensor-core products (sm_80+).
    Mmq,
    /// cuBLAS on the weight as stored (f32, f16, bf16) or expanded.
    Blas,
}

/// The path for a `rows`-row batch against a `kind` weight.
pub fn gemm_path(rows: usize, kind: WeightKind, tensor_cores: bool, f32_gemm: bool) -> GemmPath {
    if rows <= GEMV_MAX_ROWS {
        GemmPath::Gemv
    } else if rows <= MMQ_MAX_ROWS && tensor_cores && !f32_gemm && is_block_quantized(kind) {
        GemmPath::Mmq
    } else {
        GemmPath::Blas
    }
}

pub fn matmul_many(be: &CudaBackend, x: &CudaTensor, jobs: &mut [MatmulJob<'_, CudaBackend>]) -> BackendResult<()> {
    for j in jobs.iter() {
        assert_eq!(j.w.cols, x.cols, "weight '{}' input features", j.w.name);
        assert_eq!((j.out.rows, j.out.cols), (x.rows, j.w.rows), "weight '{}' output shape", j.w.name);
    }
    if jobs.iter().all(|j| j.w.input_perm.is_none()) {
        return matmul_stored_order(be, x, jobs);
    }
    // Act-order weights each take their own gathered copy of the input; the
    // rest share one call (as on the CPU).
    let (permuted, natural): (Vec<_>, Vec<_>) = jobs.iter_mut().partition(|j| j.w.input_perm.is_some());
    for j in permuted {
        let xp = ops::gather_cols(be, x, j.w.input_perm.as_ref().expect("partitioned on it"))?;
        matmul_stored_order(be, &xp, &mut [MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }])?;
    }
    let mut rest: Vec<MatmulJob<'_, CudaBackend>> =
        natural.into_iter().map(|j| MatmulJob { w: j.w, bias: j.bias, out: &mut *j.out }).collect();
    matmul_stored_order(be, x, &mut rest)
}

/// `matmul_many` with `x` already in each weight's stored input order.
fn matmul_stored_order(be: &CudaBackend, x: &CudaTensor, jobs: &mut [MatmulJob<'_, CudaBackend>]) -> BackendResult<()> {
    let path = |w: &CudaWeight| gemm_path(x.rows, w.kind, be.tensor_cores, be.options.f32_gemm);
    for j in jobs.iter_mut() {
        match path(j.w) {
            GemmPath::Gemv => launch_packed(be, x, j.w, j.bias, j.out, Kernel::Gemv(j.w.kind))?,
            GemmPath::Mmq => launch_packed(be, x, j.w, j.bias, j.out, Kernel::Mmq(j.w.kind))?,
            GemmPath::Blas => {}
        }
    }
    if jobs.iter().all(|j| path(j.w) != GemmPath::Blas) {
        return Ok(());
    }
    let mut scratch = be.scratch.lock().map_err(|_| super::poisoned())?;
    let n = x.rows * x.cols;
    let x_f32 = (be.ptr(&x.data), F32);
    // The 16-bit copy of x is made once and shared by every job that needs it.
    let mut x_half: Option<bool> = None;
    for j in jobs.iter_mut().filter(|j| path(j.w) == GemmPath::Blas) {
        let w = j.w;
        // out[m, n] = x[m, k] · W[n, k]ᵀ.
        let g = blas_gemm((x.rows, x.cols), false, (w.rows, w.cols), true);
        let out = be.ptr(&j.out.data);
        match w.kind {
            WeightKind::F32 => blas(be, g, (be.ptr(&w.data), F32), x_f32, 1.0, 0.0, out)?,
            _ if be.options.f32_gemm => {
                let wbuf = expand_f32(be, &mut scratch, w)?;
                blas(be, g, (wbuf, F32), x_f32, 1.0, 0.0, out)?;
            }
            kind => {
                let f16 = kind == WeightKind::F16;
                let half_type = if f16 { cudaDataType_t::CUDA_R_16F } else { cudaDataType_t::CUDA_R_16BF };
                let act = grow(be, &mut scratch.act16, n)?;
                if x_half != Some(f16) {
                    ops::to_half(be, x, act, f16)?;
                    x_half = Some(f16);
                }
                let x16 = (be.ptr(act), half_type);
                let w16 = if matches!(kind, WeightKind::F16 | WeightKind::BF16) {
                    be.ptr(&w.data)
                } else {
                    expand_bf16(be, &mut scratch, w)?
                };
                blas(be, g, (w16, half_type), x16, 1.0, 0.0, out)?;
            }
        }
        if let Some(b) = j.bias {
            ops::add_bias(be, j.out, b)?;
        }
    }
    Ok(())
}

/// `out = x · Wᵀ (+ bias)` by a kernel that reads the weight as stored
/// (both take the same arguments): `gemv_<kind>` (grid: 4 weight rows per
/// block) or `mmq_<kind>` (grid: 64 weight rows x 64 batch rows per block).
fn launch_packed(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    bias: Option<&CudaWeight>,
    out: &mut CudaTensor,
    kernel: Kernel,
) -> BackendResult<()> {
    let bias_ptr = bias.map_or(0, |b| be.ptr(ops::vector(b)));
    let grid = match kernel {
        Kernel::Mmq(_) => ((w.rows as u32).div_ceil(64), (x.rows as u32).div_ceil(64), 1),
        _ => ((w.rows as u32).div_ceil(4), 1, 1),
    };
    be.kernels.launch(
        &be.stream,
        kernel,
        grid,
        128,
        &[
            KArg::Ptr(be.ptr(&w.data)),
            KArg::Ptr(be.ptr(&x.data)),
            KArg::Ptr(bias_ptr),
            KArg::Ptr(be.ptr(&out.data)),
            KArg::I32(w.rows as i32),
            KArg::I32(w.cols as i32),
            KArg::I32(w.row_bytes as i32),
            KArg::I32(x.rows as i32),
        ],
    )?;
    Ok(())
}

/// The whole of `w` expanded to f32 in the scratch (by the embedding kernel,
/// with row ids 0..rows); returns its address.
fn expand_f32(be: &CudaBackend, scratch: &mut Scratch, w: &CudaWeight) -> BackendResult<u64> {
    if scratch.iota.as_ref().is_none_or(|s| s.len() < w.rows) {
        let ids: Vec<u32> = (0..w.rows.next_power_of_two() as u32).collect();
        scratch.iota = Some(be.upload_vec(&ids)?);
    }
    let iota = be.ptr(scratch.iota.as_ref().expect("just set"));
    let wbuf = be.ptr(grow(be, &mut scratch.weight32, w.rows * w.cols)?);
    ops::dequant_rows(be, w, iota, w.rows, wbuf)?;
    Ok(wbuf)
}

/// The whole of `w` expanded to bf16 in the scratch; returns its address.
fn expand_bf16(be: &CudaBackend, scratch: &mut Scratch, w: &CudaWeight) -> BackendResult<u64> {
    let wbuf = be.ptr(grow(be, &mut scratch.weight16, w.rows * w.cols)?);
    ops::dequant_bf16(be, w, wbuf)?;
    Ok(wbuf)
}

/// `dx (+)= Σ_j dy_j · W_j`, one cuBLAS GEMM per job (the first overwrites
/// unless accumulating, the others add). f32 weights run in f32, as do all
/// weights under `CudaOptions::f32_gemm` (expanded to an f32 scratch). Other
/// kinds run on tensor cores in bf16: `dy` rounded to bf16 (as the forward
/// rounds activations) against the weight in bf16 (bf16 as stored, others
/// expanded to a bf16 scratch). f16 weights are expanded to bf16 too rather
/// than rounding `dy` to f16 as the forward does with activations: gradients
/// are small, and f16's range would flush them to zero.
pub fn matmul_input_grad(
    be: &CudaBackend,
    jobs: &[(&CudaTensor, &CudaWeight)],
    dx: &mut CudaTensor,
    accumulate: bool,
) -> BackendResult<()> {
    for (dy, w) in jobs {
        assert_eq!(w.cols, dx.cols, "input grad: weight '{}' has {} columns, dx has {}", w.name, w.cols, dx.cols);
        assert_eq!((dy.rows, dy.cols), (dx.rows, w.rows), "input grad through '{}'", w.name);
    }
    if dx.rows == 0 || dx.cols == 0 {
        return Ok(());
    }
    let (permuted, natural): (Vec<_>, Vec<_>) = jobs.iter().partition(|(_, w)| w.input_perm.is_some());
    input_grad_stored_order(be, &natural, dx, accumulate)?;
    // An act-order weight gives its gradient in stored input order; it is
    // added back in natural order.
    for job in permuted {
        let mut part = CudaTensor { data: be.alloc_zeros(dx.rows * dx.cols)?, rows: dx.rows, cols: dx.cols };
        input_grad_stored_order(be, &[job], &mut part, false)?;
        ops::scatter_add_cols(be, &part, job.1.input_perm.as_ref().expect("partitioned on it"), dx)?;
    }
    Ok(())
}

/// `matmul_input_grad` for weights in natural input order (an empty list
/// zeroes `dx` unless accumulating).
fn input_grad_stored_order(
    be: &CudaBackend,
    jobs: &[(&CudaTensor, &CudaWeight)],
    dx: &mut CudaTensor,
    accumulate: bool,
) -> BackendResult<()> {
    let mut scratch = be.scratch.lock().map_err(|_| super::poisoned())?;
    let out = be.ptr(&dx.data);
    let mut beta = if accumulate { 1.0 } else { 0.0 };
    for (dy, w) in jobs {
        if w.rows == 0 {
            continue;
        }
        let g = blas_gemm((dy.rows, dy.cols), false, (w.rows, w.cols), false);
        let dy_f32 = (be.ptr(&dy.data), F32);
        match w.kind {
            WeightKind::F32 => blas(be, g, (be.ptr(&w.data), F32), dy_f32, 1.0, beta, out)?,
            _ if be.options.f32_gemm => {
                let wbuf = expand_f32(be, &mut scratch, w)?;
                blas(be, g, (wbuf, F32), dy_f32, 1.0, beta, out)?;
            }
            kind => {
                let act = grow(be, &mut scratch.act16, dy.rows * dy.cols)?;
                ops::to_half(be, dy, act, false)?;
                let dy16 = (be.ptr(act), cudaDataType_t::CUDA_R_16BF);
                let w16 = if kind == WeightKind::BF16 { be.ptr(&w.data) } else { expand_bf16(be, &mut scratch, w)? };
                blas(be, g, (w16, cudaDataType_t::CUDA_R_16BF), dy16, 1.0, beta, out)?;
            }
        }
        beta = 1.0;
    }
    drop(scratch);
    if beta == 0.0 {
        // No job with rows: the sum is empty.
        train_ops::fill(be, dx, 0.0)?;
    }
    Ok(())
}

/// `c = alpha · op(a) · op(b) + beta · c` in f32 (every transpose combination).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    be: &CudaBackend,
    a: &CudaTensor,
    trans_a: bool,
    b: &CudaTensor,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    c: &mut CudaTensor,
) -> BackendResult<()> {
    let g = blas_gemm((a.rows, a.cols), trans_a, (b.rows, b.cols), trans_b);
    assert_eq!((c.rows, c.cols), g.c_shape(), "gemm output shape");
    if c.rows == 0 || c.cols == 0 {
        return Ok(());
    }
    if g.k == 0 {
        // An empty product: c = beta · c (never read when beta is 0, as cuBLAS).
        return if beta == 0.0 { train_ops::fill(be, c, 0.0) } else { train_ops::scale(be, c, beta) };
    }
    blas(be, g, (be.ptr(&b.data), F32), (be.ptr(&a.data), F32), alpha, beta, be.ptr(&c.data))
}

/// One cuBLAS GemmEx with f32 accumulation and an f32 output: `first` is our
/// `b` operand, `second` our `a` (see [`BlasGemm`]). With beta = 0 cuBLAS does
/// not read the output.
fn blas(
    be: &CudaBackend,
    g: BlasGemm,
    (first, first_type): (u64, cudaDataType_t),
    (second, second_type): (u64, cudaDataType_t),
    alpha: f32,
    beta: f32,
    c: u64,
) -> BackendResult<()> {
    let dim = |v: usize| {
        i32::try_from(v).map_err(|_| BackendError::Invalid(format!("GEMM dimension {v} exceeds cuBLAS's int range")))
    };
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let (m, n, k) = (dim(g.m)?, dim(g.n)?, dim(g.k)?);
    let (lda, ldb, ldc) = (dim(g.ld_first)?, dim(g.ld_second)?, dim(g.ldc)?);
    let blas = be.blas.lock().map_err(|_| super::poisoned())?;
    // SAFETY: every pointer is a live device allocation of at least the size
    // the dimensions index (the callers check shapes); alpha/beta live across
    // the call.
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(g.trans_first),
            op(g.trans_second),
            m,
            n,
            k,
            &alpha as *const f32 as *const _,
            first as *const _,
            first_type,
            lda,
            second as *const _,
            second_type,
            ldb,
            &beta as *const f32 as *const _,
            c as *mut _,
            F32,
            ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    r.map_err(|e| match e.0 {
        cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => {
            BackendError::OutOfMemory(format!("cublasGemmEx: {e:?}"))
        }
        _ => BackendError::Device(format!("cublasGemmEx: {e:?}")),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_size_and_kind_choose_the_product() {
        use GemmPath::*;
        let q = WeightKind::Q4K;
        assert_eq!(gemm_path(1, q, true, false), Gemv);
        assert_eq!(gemm_path(8, q, true, false), Gemv);
        assert_eq!(gemm_path(9, q, true, false), Mmq);
        assert_eq!(gemm_path(64, WeightKind::Nf4, true, false), Mmq);
        for k in [WeightKind::Int4G128, WeightKind::Int4G64, WeightKind::Int4G32] {
            assert_eq!(gemm_path(9, k, true, false), Mmq);
            assert_eq!(gemm_path(65, k, true, false), Blas);
        }
        assert_eq!(gemm_path(65, q, true, false), Blas);
        // Plain kinds go to cuBLAS as stored; no tensor cores or the exact
        // f32 mode keep the bf16 expansion / f32 GEMM.
        assert_eq!(gemm_path(16, WeightKind::BF16, true, false), Blas);
        assert_eq!(gemm_path(16, q, false, false), Blas);
        assert_eq!(gemm_path(16, q, true, true), Blas);
    }
}
