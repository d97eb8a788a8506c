//! Kernel sources and their compilation with NVRTC.
//!
//! Each `kernels/<module>.cu` is compiled as one program with `kernels/common.cuh`
//! prepended (NVRTC sees no files, so sources have no `#include`). The result is a
//! cubin for the device's exact architecture: loading a cubin needs no PTX JIT,
//! so a newer NVRTC than the driver is no problem. Cubins are cached on disk by
//! a hash of everything that went into them; compilation happens at start-up,
//! never on the hot path. A warning fails the build in CI (`CI` set, or
//! `TANDEM_NVRTC_WARNINGS=error`): the kernels must compile clean with the
//! pinned NVRTC. On a user's machine another NVRTC (the toolkit's, preferred
//! when found) may warn where ours did not; that is logged, not fatal.

use std::ffi::{c_char, CStr, CString};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// One kernel module (`kernels/<name>.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelModule {
    Ops,
    Kv,
    Attention,
    Lora,
    Quant,
    Train,
}

impl KernelModule {
    pub const ALL: [KernelModule; 6] = [
        KernelModule::Ops,
        KernelModule::Kv,
        KernelModule::Attention,
        KernelModule::Lora,
        KernelModule::Quant,
        KernelModule::Train,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            KernelModule::Ops => "ops.cu",
            KernelModule::Kv => "kv.cu",
            KernelModule::Attention => "attention.cu",
            KernelModule::Lora => "lora.cu",
            KernelModule::Quant => "quant.cu",
            KernelModule::Train => "train.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            KernelModule::Ops => include_str!("../../../kernels/ops.cu"),
            KernelModule::Kv => include_str!("../../../kernels/kv.cu"),
            KernelModule::Attention => include_str!("../../../kernels/attention.cu"),
            KernelModule::Lora => include_str!("../../../kernels/lora.cu"),
            KernelModule::Quant => include_str!("../../../kernels/quant.cu"),
            KernelModule::Train => include_str!("../../../kernels/train.cu"),
        }
    }

    /// The program NVRTC compiles: the shared header, then the module, with
    /// `#line` so diagnostics point into the module's own file.
    pub fn source(self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file_name(), self.body())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("libnvrtc could not be found; set TANDEM_NVRTC_LIB or TANDEM_CUDA_LIB_DIRS")]
    NoNvrtc,
    #[error("{module} for {arch}: {reason}")]
    Failed { module: &'static str, arch: String, reason: String },
}

/// NVRTC's version, e.g. (13, 5).
pub fn version() -> Result<(i32, i32), CompileError> {
    if !super::libs::nvrtc_present() {
        return Err(CompileError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CompileError::Failed { module: "-", arch: "-".into(), reason: format!("nvrtcVersion: {rc:?}") });
    }
    Ok((major, minor))
}

fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--device-as-default-execution-space".into()]
}

/// What a warning in NVRTC's log does to a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warnings {
    /// Fails it, like an error (CI: the kernels compile clean with the pinned NVRTC).
    Fail,
    /// Logs it and keeps the cubin (a user's NVRTC may warn where ours did not).
    Log,
}

impl Warnings {
    /// `TANDEM_NVRTC_WARNINGS` (`error` or `warn`); otherwise `Fail` under CI
    /// (`CI` set) and `Log` elsewhere.
    pub fn from_env() -> Self {
        match std::env::var("TANDEM_NVRTC_WARNINGS").as_deref() {
            Ok("error") => Self::Fail,
            Ok("warn") => Self::Log,
            _ if std::env::var_os("CI").is_some() => Self::Fail,
            _ => Self::Log,
        }
    }
}

/// Compiles `module` to a cubin for `arch` (e.g. "sm_90"); warnings as
/// [`Warnings::from_env`] says.
pub fn compile(module: KernelModule, arch: &str) -> Result<Vec<u8>, CompileError> {
    compile_source(module.file_name(), &module.source(), arch, Warnings::from_env())
}

/// Compiles one program text (`file_name` names it in diagnostics).
pub fn compile_source(
    file_name: &'static str,
    source: &str,
    arch: &str,
    warnings: Warnings,
) -> Result<Vec<u8>, CompileError> {
    if !super::libs::nvrtc_present() {
        return Err(CompileError::NoNvrtc);
    }
    let fail = |reason: String| CompileError::Failed { module: file_name, arch: arch.into(), reason };
    let src = CString::new(source).map_err(|_| fail("source holds a NUL byte".into()))?;
    let name = CString::new(file_name).map_err(|_| fail("name holds a NUL byte".into()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("create: {e:?}")))?;
    let opts = options(arch);
    // SAFETY: `prog` is live until destroy_program below; the log and cubin
    // buffers are sized by NVRTC's own size queries.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let log = result::get_program_log(prog)
            .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().trim().to_string())
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(fail(format!("{e:?}\n{log}"))),
            Ok(()) if !log.is_empty() && warnings == Warnings::Fail => {
                Err(fail(format!("warnings are errors (TANDEM_NVRTC_WARNINGS=warn logs them instead):\n{log}")))
            }
            Ok(()) => {
                if !log.is_empty() {
                    tracing::warn!("NVRTC warned compiling {file_name} for {arch} (kept; the cubin is used):\n{log}");
                }
                let mut size = 0usize;
                let rc = sys::nvrtcGetCUBINSize(prog, &mut size);
                if rc != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(fail(format!("no cubin ({rc:?}, {size} bytes)")))
                } else {
                    let mut cubin = vec![0u8; size];
                    let rc = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char);
                    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(fail(format!("nvrtcGetCUBIN: {rc:?}")))
                    } else {
                        Ok(cubin)
                    }
                }
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// Where compiled cubins are kept: `TANDEM_KERNEL_CACHE`, else the user's cache dir.
fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TANDEM_KERNEL_CACHE") {
        return Some(d.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tandem").join("kernels"))
}

/// A cubin for `module` on `arch`, from the disk cache when the same source,
/// options and NVRTC made it before; otherwise compiled and cached (the cache
/// is best effort: a read-only disk only costs a compile per start).
pub fn cubin(module: KernelModule, arch: &str) -> Result<Vec<u8>, CompileError> {
    let nvrtc = version()?;
    let mut h = std::hash::DefaultHasher::new();
    (module.source(), options(arch), nvrtc).hash(&mut h);
    let file = format!("{}-{arch}-{:016x}.cubin", module.file_name().trim_end_matches(".cu"), h.finish());
    let dir = cache_dir();
    if let Some(bytes) = dir.as_ref().and_then(|d| std::fs::read(d.join(&file)).ok()) {
        return Ok(bytes);
    }
    let bytes = compile(module, arch)?;
    if let Some(d) = dir {
        if std::fs::create_dir_all(&d).is_ok() {
            let tmp = d.join(format!("{file}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &bytes).is_ok() {
                let _ = std::fs::rename(&tmp, d.join(&file));
            }
        }
    }
    Ok(bytes)
}
