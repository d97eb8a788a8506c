//! Finding the CUDA libraries at run time.
//!
//! cudarc opens libcuda, libcublas and libnvrtc by bare name (`dlopen`), which
//! only finds them on the loader's path. CUDA often lives elsewhere: a toolkit
//! under /usr/local/cuda, or the PyPI wheels (`nvidia/cu13/lib`) that torch and
//! our CI install. So before cudarc needs a library we look in those places and
//! open it by full path with RTLD_GLOBAL; the later open by bare name then finds
//! the already-loaded library by its soname.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Directories searched, in order, after `TANDEM_CUDA_LIB_DIRS` (colon-separated).
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("TANDEM_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            dirs.push(Path::new(&v).join("lib64"));
            dirs.push(Path::new(&v).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    // PyPI wheels inside any Python environment the process was started from.
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        dirs.extend(wheel_dirs(Path::new(&v)));
    }
    dirs
}

/// `nvidia/*/lib` directories of the wheels in a Python environment.
fn wheel_dirs(env: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(libs) = std::fs::read_dir(env.join("lib")) else { return out };
    for py in libs.flatten() {
        let nvidia = py.path().join("site-packages").join("nvidia");
        let Ok(pkgs) = std::fs::read_dir(&nvidia) else { continue };
        for p in pkgs.flatten() {
            out.push(p.path().join("lib"));
        }
    }
    out.sort();
    out
}

/// Opens the library at `path` with RTLD_GLOBAL and keeps it loaded for the
/// life of the process (its soname then satisfies later opens by bare name).
fn open_global(path: &Path) -> bool {
    // SAFETY: loading a CUDA library runs its initialisers, which is what
    // cudarc would do moments later with the same library.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    };
    lib.map(std::mem::forget).is_ok()
}

/// Opens `file` (e.g. `libnvrtc.so.13`) from the first candidate directory that
/// has it. Returns its path.
fn preload(file: &str) -> Option<PathBuf> {
    candidate_dirs().into_iter().map(|dir| dir.join(file)).find(|path| path.is_file() && open_global(path))
}

/// Where libnvrtc was found (None: only the loader's default path is left).
/// `TANDEM_NVRTC_LIB` names the file outright.
pub fn nvrtc() -> Option<&'static Path> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Ok(p) = std::env::var("TANDEM_NVRTC_LIB") {
                let path = PathBuf::from(p);
                return open_global(&path).then_some(path);
            }
            preload("libnvrtc.so.13").or_else(|| preload("libnvrtc.so.12")).or_else(|| preload("libnvrtc.so"))
        })
        .as_deref()
}

/// Preloads cuBLAS (and cuBLASLt, which it links to) when found off the loader's path.
pub fn cublas() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let _ = preload("libcublasLt.so.13");
        let _ = preload("libcublas.so.13");
    });
}

/// Whether libnvrtc can be opened (preloaded or on the loader's path).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the library opens.
    nvrtc().is_some() || unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the CUDA driver library can be opened.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the library opens.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be opened.
pub fn cublas_present() -> bool {
    cublas();
    // SAFETY: only probes whether the library opens.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}
