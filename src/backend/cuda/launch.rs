//! Loaded kernels, and launching them by [`Kernel`].
//!
//! Every kernel takes device addresses and scalars only ([`KArg`]), so one
//! launch path serves all of them; the typed wrappers in `ops.rs` decide grids
//! and argument lists (each kernel's geometry is documented above it in
//! `kernels/*.cu`).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::nvrtc::{self, KernelModule};
use crate::backend::BackendError;
use crate::quant::ggml::WeightKind;

/// One kernel argument: a device address or a scalar.
#[derive(Debug, Clone, Copy)]
pub enum KArg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Every kernel entry point the backend launches. Launches name a kernel by
/// this enum (an index into the loaded functions), never by a formatted
/// string; [`Kernel::name`] is the entry point's name in `kernels/*.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    RmsNorm,
    AddRmsNorm,
    AddAssign,
    AddBias,
    Rope,
    SiluMul,
    GatherRows,
    GatherCols,
    ScatterAddCols,
    F32ToBf16,
    F32ToF16,
    ArgmaxLogsumexp,
    WriteKv,
    WriteKvBf16,
    AttentionPartial,
    AttentionPartialBf16,
    AttentionReduce,
    LoraShrinkF32,
    LoraExpandF32,
    LoraShrinkBf16,
    LoraExpandBf16,
    RmsNormBackward,
    SiluMulBackward,
    CrossEntropy,
    AttentionBackwardDq,
    AttentionBackwardDkv,
    AddRows,
    Dropout,
    CopyF32,
    FillF32,
    ScaleF32,
    SumSquaresPartial,
    AdamW,
    /// `gemv_<kind>`: batches of up to `gemm::GEMV_MAX_ROWS` rows.
    Gemv(WeightKind),
    /// `dequant_bf16_<kind>`: a whole weight to bf16 (for cuBLAS).
    DequantBf16(WeightKind),
    /// `dequant_rows_<kind>`: chosen rows to f32 (embedding lookups).
    DequantRows(WeightKind),
    /// `mmq_<kind>`: the tensor-core GEMM for small batches; quantised kinds only.
    Mmq(WeightKind),
}

use Kernel as K;

/// The kernels that take no weight kind: (kernel, entry point, module).
const FIXED: [(Kernel, &str, KernelModule); 33] = [
    (K::RmsNorm, "rms_norm", KernelModule::Ops),
    (K::AddRmsNorm, "add_rms_norm", KernelModule::Ops),
    (K::AddAssign, "add_assign", KernelModule::Ops),
    (K::AddBias, "add_bias", KernelModule::Ops),
    (K::Rope, "rope", KernelModule::Ops),
    (K::SiluMul, "silu_mul", KernelModule::Ops),
    (K::GatherRows, "gather_rows", KernelModule::Ops),
    (K::GatherCols, "gather_cols", KernelModule::Ops),
    (K::ScatterAddCols, "scatter_add_cols", KernelModule::Ops),
    (K::F32ToBf16, "f32_to_bf16_kernel", KernelModule::Ops),
    (K::F32ToF16, "f32_to_f16_kernel", KernelModule::Ops),
    (K::ArgmaxLogsumexp, "argmax_logsumexp", KernelModule::Ops),
    (K::WriteKv, "write_kv", KernelModule::Kv),
    (K::WriteKvBf16, "write_kv_bf16", KernelModule::Kv),
    (K::AttentionPartial, "attention_partial", KernelModule::Attention),
    (K::AttentionPartialBf16, "attention_partial_bf16", KernelModule::Attention),
    (K::AttentionReduce, "attention_reduce", KernelModule::Attention),
    (K::LoraShrinkF32, "lora_shrink_f32", KernelModule::Lora),
    (K::LoraExpandF32, "lora_expand_f32", KernelModule::Lora),
    (K::LoraShrinkBf16, "lora_shrink_bf16", KernelModule::Lora),
    (K::LoraExpandBf16, "lora_expand_bf16", KernelModule::Lora),
    (K::RmsNormBackward, "rms_norm_backward", KernelModule::Train),
    (K::SiluMulBackward, "silu_mul_backward", KernelModule::Train),
    (K::CrossEntropy, "cross_entropy", KernelModule::Train),
    (K::AttentionBackwardDq, "attention_backward_dq", KernelModule::Train),
    (K::AttentionBackwardDkv, "attention_backward_dkv", KernelModule::Train),
    (K::AddRows, "add_rows", KernelModule::Train),
    (K::Dropout, "dropout", KernelModule::Train),
    (K::CopyF32, "copy_f32", KernelModule::Train),
    (K::FillF32, "fill_f32", KernelModule::Train),
    (K::ScaleF32, "scale_f32", KernelModule::Train),
    (K::SumSquaresPartial, "sum_squares_partial", KernelModule::Train),
    (K::AdamW, "adamw", KernelModule::Train),
];

/// Whether `kind` is stored in blocks of codes (what `mmq` kernels decode).
pub fn is_block_quantized(kind: WeightKind) -> bool {
    !matches!(kind, WeightKind::F32 | WeightKind::F16 | WeightKind::BF16)
}

impl Kernel {
    /// Every kernel the backend loads.
    pub fn all() -> Vec<Kernel> {
        let mut all: Vec<Kernel> = FIXED.iter().map(|f| f.0).collect();
        for k in WeightKind::ALL {
            all.extend([K::Gemv(k), K::DequantBf16(k), K::DequantRows(k)]);
            if is_block_quantized(k) {
                all.push(K::Mmq(k));
            }
        }
        all
    }

    /// The entry point's name in `kernels/*.cu`.
    pub fn name(self) -> String {
        match self {
            K::Gemv(k) => format!("gemv_{}", k.name()),
            K::DequantBf16(k) => format!("dequant_bf16_{}", k.name()),
            K::DequantRows(k) => format!("dequant_rows_{}", k.name()),
            K::Mmq(k) => format!("mmq_{}", k.name()),
            fixed => FIXED.iter().find(|f| f.0 == fixed).expect("every fixed kernel is listed").1.to_string(),
        }
    }

    pub fn module(self) -> KernelModule {
        match self {
            K::Gemv(_) | K::DequantBf16(_) | K::DequantRows(_) | K::Mmq(_) => KernelModule::Quant,
            fixed => FIXED.iter().find(|f| f.0 == fixed).expect("every fixed kernel is listed").2,
        }
    }

    /// A dense index: fixed kernels first, then four slots per weight kind.
    fn index(self) -> usize {
        let per_kind = |k: WeightKind, i: usize| {
            let pos = WeightKind::ALL.iter().position(|&x| x == k).expect("every kind is in ALL");
            FIXED.len() + 4 * pos + i
        };
        match self {
            K::Gemv(k) => per_kind(k, 0),
            K::DequantBf16(k) => per_kind(k, 1),
            K::DequantRows(k) => per_kind(k, 2),
            K::Mmq(k) => per_kind(k, 3),
            fixed => FIXED.iter().position(|f| f.0 == fixed).expect("every fixed kernel is listed"),
        }
    }

    const COUNT: usize = FIXED.len() + 4 * WeightKind::ALL.len();
}

/// The entry points of a module (what must load for the backend to start).
pub fn kernel_names(m: KernelModule) -> Vec<String> {
    Kernel::all().into_iter().filter(|k| k.module() == m).map(Kernel::name).collect()
}

/// Every kernel, loaded for one device.
pub struct Kernels {
    /// By [`Kernel::index`]; `None` for slots no kernel uses (mmq of plain kinds).
    funcs: Vec<Option<CudaFunction>>,
}

impl Kernels {
    /// Compiles (or reads from the disk cache) and loads every module for `arch`.
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self, BackendError> {
        let mut funcs = vec![None; Kernel::COUNT];
        let all = Kernel::all();
        for m in KernelModule::ALL {
            let cubin = nvrtc::cubin(m, arch).map_err(|e| BackendError::Invalid(e.to_string()))?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| BackendError::Invalid(format!("loading {}: {e:?}", m.file_name())))?;
            for &k in all.iter().filter(|k| k.module() == m) {
                let name = k.name();
                let f = module
                    .load_function(&name)
                    .map_err(|e| BackendError::Invalid(format!("{}: kernel {name}: {e:?}", m.file_name())))?;
                funcs[k.index()] = Some(f);
            }
        }
        Ok(Self { funcs })
    }

    /// Launches `kernel` on `stream`; a rejected launch is a device error.
    pub fn launch(
        &self,
        stream: &CudaStream,
        kernel: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KArg],
    ) -> Result<(), BackendError> {
        let f = self.funcs[kernel.index()]
            .as_ref()
            .ok_or_else(|| BackendError::Device(format!("CUDA kernel {} is not loaded", kernel.name())))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut b = stream.launch_builder(f);
        for a in args {
            match a {
                KArg::Ptr(p) => b.arg(p),
                KArg::I32(v) => b.arg(v),
                KArg::I64(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument list matches the kernel's signature (the wrappers
        // in ops.rs are written against kernels/*.cu, and the emulator test
        // checks the same lists), and every address is a live allocation of the
        // size the kernel indexes.
        unsafe { b.launch(cfg) }
            .map_err(|e| super::errors::driver_error(e, &format!("launch of {}", kernel.name())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_indices_are_dense_and_distinct() {
        let all = Kernel::all();
        let mut seen = [false; Kernel::COUNT];
        for k in &all {
            assert!(!seen[k.index()], "{k:?} shares an index");
            seen[k.index()] = true;
        }
        let names: std::collections::HashSet<String> = all.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), all.len(), "entry-point names are distinct");
        assert_eq!(Kernel::Mmq(WeightKind::Q4K).name(), "mmq_q4_k");
        assert_eq!(Kernel::AdamW.name(), "adamw");
        assert!(!all.contains(&Kernel::Mmq(WeightKind::BF16)));
        assert_eq!(Kernel::Gemv(WeightKind::Int4G32).name(), "gemv_int4g32");
        assert!(all.contains(&Kernel::Mmq(WeightKind::Int4G128)));
    }
}
