//! Loaded kernels and launching them by name.
//!
//! Every kernel takes device addresses and scalars only ([`KArg`]), so one
//! launch path serves all of them; the typed wrappers in `ops.rs` decide grids
//! and argument lists (each kernel's geometry is documented above it in
//! `kernels/*.cu`).

use std::collections::HashMap;
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

/// The suffix of the quantised-weight kernels for a kind (`gemv_q4_k`, ...).
pub fn kind_suffix(kind: WeightKind) -> &'static str {
    match kind {
        WeightKind::F32 => "f32",
        WeightKind::F16 => "f16",
        WeightKind::BF16 => "bf16",
        WeightKind::Q4_0 => "q4_0",
        WeightKind::Q5_0 => "q5_0",
        WeightKind::Q8_0 => "q8_0",
        WeightKind::Q4K => "q4_k",
        WeightKind::Q5K => "q5_k",
        WeightKind::Q6K => "q6_k",
        WeightKind::Nf4 => "nf4",
        WeightKind::Fp4 => "fp4",
    }
}

/// The entry points of a module (what must load for the backend to start).
pub fn kernel_names(m: KernelModule) -> Vec<String> {
    let fixed: &[&str] = match m {
        KernelModule::Ops => &[
            "rms_norm",
            "add_rms_norm",
            "add_assign",
            "add_bias",
            "rope",
            "silu_mul",
            "gather_rows",
            "f32_to_bf16_kernel",
            "f32_to_f16_kernel",
            "argmax_logsumexp",
        ],
        KernelModule::Kv => &["write_kv"],
        KernelModule::Attention => &["attention_partial", "attention_reduce"],
        KernelModule::Lora => &["lora_shrink_f32", "lora_expand_f32", "lora_shrink_bf16", "lora_expand_bf16"],
        KernelModule::Quant => &[],
        KernelModule::Train => &[
            "rms_norm_backward",
            "silu_mul_backward",
            "cross_entropy",
            "attention_backward_dq",
            "attention_backward_dkv",
            "add_rows",
            "dropout",
            "copy_f32",
            "fill_f32",
            "scale_f32",
            "sum_squares_partial",
            "adamw",
        ],
    };
    let mut names: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    if m == KernelModule::Quant {
        for k in WeightKind::ALL {
            for f in ["gemv", "dequant_bf16", "dequant_rows"] {
                names.push(format!("{f}_{}", kind_suffix(k)));
            }
        }
    }
    names
}

/// Every kernel, loaded for one device.
pub struct Kernels {
    funcs: HashMap<String, CudaFunction>,
}

impl Kernels {
    /// Compiles (or reads from the disk cache) and loads every module for `arch`.
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Self, BackendError> {
        let mut funcs = HashMap::new();
        for m in KernelModule::ALL {
            let cubin = nvrtc::cubin(m, arch).map_err(|e| BackendError::Invalid(e.to_string()))?;
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| BackendError::Invalid(format!("loading {}: {e:?}", m.file_name())))?;
            for name in kernel_names(m) {
                let f = module
                    .load_function(&name)
                    .map_err(|e| BackendError::Invalid(format!("{}: kernel {name}: {e:?}", m.file_name())))?;
                funcs.insert(name, f);
            }
        }
        Ok(Self { funcs })
    }

    /// Launches `name` on `stream`; a rejected launch is a device error.
    pub fn launch(
        &self,
        stream: &CudaStream,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KArg],
    ) -> Result<(), BackendError> {
        let f =
            self.funcs.get(name).ok_or_else(|| BackendError::Device(format!("CUDA kernel {name} is not loaded")))?;
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
        unsafe { b.launch(cfg) }.map_err(|e| super::errors::driver_error(e, &format!("launch of {name}")))?;
        Ok(())
    }
}
