//! Reading models from disk: GGUF files, HF safetensors directories, the HF hub cache.

pub mod gguf;
pub mod hub;
pub mod quantized;
pub mod safetensors;

use std::path::Path;
use std::sync::Arc;

/// A file's bytes, shared: a read-only memory map, or an owned buffer.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Memory-maps a file read-only (an empty file becomes an empty buffer, since
/// mapping zero bytes fails on some platforms).
pub(crate) fn map_file(path: &Path) -> std::io::Result<SharedBytes> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Arc::new(Vec::<u8>::new()));
    }
    // SAFETY: the map is read-only. Model files are not expected to change while
    // served; if one is truncated underneath us, reads fault (as with llama.cpp).
    Ok(Arc::new(unsafe { memmap2::Mmap::map(&file) }?))
}

/// Names of the regular files in `dir` (symlinks followed, as HF cache
/// snapshots link into blobs/), sorted.
pub(crate) fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().is_file() {
            if let Some(n) = entry.file_name().to_str() {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}
