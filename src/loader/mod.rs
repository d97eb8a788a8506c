//! Reading models from disk: GGUF files, HF safetensors directories, the HF hub cache.

pub mod gguf;
pub mod hub;
pub mod quantized;
pub mod safetensors;

use std::path::Path;
use std::sync::Arc;

/// A file's bytes, shared: a read-only memory map, or an owned buffer.
pub type SharedBytes = Arc<dyn ByteStore>;

use crate::backend::ByteStore;

/// A file mapped read-only.
struct MappedFile(memmap2::Mmap);

impl ByteStore for MappedFile {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn release_pages(&self, range: std::ops::Range<usize>) {
        // Whole pages inside the range only: a neighbour's bytes may share
        // the pages at its ends.
        const PAGE: usize = 4096;
        let (start, end) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
        if start < end && end <= self.0.len() {
            // SAFETY: the map is read-only and file-backed, so dropping its
            // pages loses nothing: the next read faults them in from the file.
            let _ = unsafe { self.0.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }
}

/// Memory-maps a file read-only (an empty file becomes an empty buffer, since
/// mapping zero bytes fails on some platforms).
pub(crate) fn map_file(path: &Path) -> std::io::Result<SharedBytes> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(Arc::new(Vec::<u8>::new()));
    }
    // SAFETY: the map is read-only. Model files are not expected to change while
    // served; if one is truncated underneath us, reads fault (as with llama.cpp).
    Ok(Arc::new(MappedFile(unsafe { memmap2::Mmap::map(&file) }?)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Handing pages back loses nothing: the bytes read the same afterwards,
    /// for whole and ragged ranges, from a map and from an owned buffer.
    #[test]
    fn released_pages_read_back_the_same() {
        let data: Vec<u8> = (0..5 * 4096 + 123).map(|i| (i * 31 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, &data).unwrap();
        let mapped = map_file(&path).unwrap();
        let owned: SharedBytes = Arc::new(data.clone());
        for store in [mapped, owned] {
            assert_eq!(store.bytes(), &data[..]);
            for range in [0..data.len(), 100..9000, 4096..8192, 5..6, 20_000..data.len()] {
                store.release_pages(range);
                assert_eq!(store.bytes(), &data[..]);
            }
        }
    }
}
