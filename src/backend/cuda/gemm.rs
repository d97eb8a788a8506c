//! `out = x · Wᵀ (+ bias)` for every weight kind.
//!
//! Small batches (≤ [`GEMV_MAX_ROWS`] rows, i.e. decode) are memory-bound: a
//! GEMV kernel per kind reads each weight byte once, dequantising in registers,
//! with f32 activations. Larger batches are compute-bound and go to cuBLAS on
//! tensor cores: activations are rounded to bf16 (f16 for f16 weights), and a
//! quantised weight is first expanded to a bf16 scratch matrix, whose cost the
//! batch amortises. f32 weights use a plain f32 GEMM.

use super::launch::{kind_suffix, KArg};
use super::{grow, ops, CudaBackend, CudaTensor, CudaWeight};
use crate::backend::{BackendResult, MatmulJob};
use crate::quant::ggml::GgmlType;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};

/// The most activation rows the GEMV kernels take (kernels/quant.cu).
pub const GEMV_MAX_ROWS: usize = 8;

pub fn matmul_many(be: &CudaBackend, x: &CudaTensor, jobs: &mut [MatmulJob<'_, CudaBackend>]) -> BackendResult<()> {
    for j in jobs.iter() {
        assert_eq!(j.w.cols, x.cols, "weight '{}' input features", j.w.name);
        assert_eq!((j.out.rows, j.out.cols), (x.rows, j.w.rows), "weight '{}' output shape", j.w.name);
    }
    if x.rows <= GEMV_MAX_ROWS {
        for j in jobs.iter_mut() {
            gemv(be, x, j.w, j.bias, j.out)?;
        }
        return Ok(());
    }
    let mut scratch = be.scratch.lock().map_err(|_| super::poisoned())?;
    let n = x.rows * x.cols;
    let x_f32 = (be.ptr(&x.data), cudaDataType_t::CUDA_R_32F);
    // The 16-bit copy of x is made once and shared by every job that needs it.
    let mut x_half: Option<bool> = None;
    for j in jobs.iter_mut() {
        let w = j.w;
        match w.kind {
            GgmlType::F32 => gemm(be, (be.ptr(&w.data), cudaDataType_t::CUDA_R_32F), x_f32, w, j.out)?,
            _ if be.options.f32_gemm => {
                // The whole weight expanded to f32 by the embedding kernel (row ids 0..rows).
                if scratch.iota.as_ref().is_none_or(|s| s.len() < w.rows) {
                    let ids: Vec<u32> = (0..w.rows.next_power_of_two() as u32).collect();
                    scratch.iota = Some(be.upload_vec(&ids)?);
                }
                let iota = be.ptr(scratch.iota.as_ref().expect("just set"));
                let wbuf = be.ptr(grow(be, &mut scratch.weight32, w.rows * w.cols)?);
                ops::dequant_rows(be, w, iota, w.rows, wbuf)?;
                gemm(be, (wbuf, cudaDataType_t::CUDA_R_32F), x_f32, w, j.out)?;
            }
            kind => {
                let f16 = kind == GgmlType::F16;
                let half_type = if f16 { cudaDataType_t::CUDA_R_16F } else { cudaDataType_t::CUDA_R_16BF };
                let act = grow(be, &mut scratch.act16, n)?;
                if x_half != Some(f16) {
                    ops::to_half(be, x, act, f16)?;
                    x_half = Some(f16);
                }
                let x16 = (be.ptr(act), half_type);
                let w16 = if matches!(kind, GgmlType::F16 | GgmlType::BF16) {
                    be.ptr(&w.data)
                } else {
                    let wbuf = be.ptr(grow(be, &mut scratch.weight16, w.rows * w.cols)?);
                    ops::dequant_bf16(be, w, wbuf)?;
                    wbuf
                };
                gemm(be, (w16, half_type), x16, w, j.out)?;
            }
        }
        if let Some(b) = j.bias {
            ops::add_bias(be, j.out, b)?;
        }
    }
    Ok(())
}

fn gemv(
    be: &CudaBackend,
    x: &CudaTensor,
    w: &CudaWeight,
    bias: Option<&CudaWeight>,
    out: &mut CudaTensor,
) -> BackendResult<()> {
    let bias_ptr = bias.map_or(0, |b| be.ptr(ops::vector(b)));
    be.kernels.launch(
        &be.stream,
        &format!("gemv_{}", kind_suffix(w.kind)),
        ((w.rows as u32).div_ceil(4), 1, 1),
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

/// cuBLAS is column-major: row-major `out[m, n] = x[m, k] · W[n, k]ᵀ` is
/// column-major `outᵀ[n, m] = W'ᵀ · x'` where `W'` = W read as `[k, n]` and
/// `x'` = x read as `[k, m]`, all with leading dimension k (n for out).
fn gemm(
    be: &CudaBackend,
    (w_ptr, w_type): (u64, cudaDataType_t),
    (x_ptr, x_type): (u64, cudaDataType_t),
    wt: &CudaWeight,
    out: &mut CudaTensor,
) -> BackendResult<()> {
    let (n, k, m) = (wt.rows as i32, wt.cols as i32, out.rows as i32);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let blas = be.blas.lock().expect("cuBLAS lock");
    // SAFETY: every pointer is a live device allocation of at least the size
    // the dimensions above index; alpha/beta live across the call.
    let r = unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            &alpha as *const f32 as *const _,
            w_ptr as *const _,
            w_type,
            k,
            x_ptr as *const _,
            x_type,
            k,
            &beta as *const f32 as *const _,
            be.ptr(&out.data) as *mut _,
            cudaDataType_t::CUDA_R_32F,
            n,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    super::ck(r, "cublasGemmEx")?;
    Ok(())
}
