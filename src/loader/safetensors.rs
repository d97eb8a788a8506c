//! safetensors files, read and written through Hugging Face's `safetensors`
//! crate (zero-copy over the memory map): `u64 LE header length`, a JSON header
//! `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {..}}`, then data.
//!
//! The crate decides validity at open (lengths, offsets contiguous and inside the
//! data, byte counts equal to dtype × shape); on top of it tandem refuses the
//! dtypes it does not compute with (fp8, fp4, complex) and, when the crate
//! refuses, names the tensor at fault. So `tensor()` can slice without re-checking.
//! Pickle (`pytorch_model.bin`) is never loaded: unpickling runs arbitrary code.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorInfo, View};

/// Bytes shared with whoever keeps weights without copying them.
pub use super::SharedBytes;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<SafetensorsError>,
    },
    #[error("safetensors file is {0} bytes, too short for the 8-byte header length")]
    TooShort(usize),
    #[error("safetensors header length {len} is impossible (file has {available} bytes after it, limit 100000000)")]
    HeaderLength { len: u64, available: u64 },
    #[error("safetensors header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("safetensors header: {0}")]
    Header(String),
    #[error("safetensors layout: {0}")]
    Layout(String),
    #[error("safetensors tensor '{name}' has unsupported dtype '{dtype}'")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("safetensors tensor '{name}': shape {shape:?} of {dtype:?} needs {expected} bytes but data_offsets [{start}, {end}] cover {}", end.saturating_sub(*start))]
    SizeMismatch { name: String, dtype: StDtype, shape: Vec<usize>, expected: String, start: usize, end: usize },
    #[error("safetensors tensor '{name}': data_offsets [{start}, {end}] outside the {data_len}-byte data section")]
    OutOfBounds { name: String, start: usize, end: usize, data_len: usize },
    #[error("{path}: invalid index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("tensor '{name}' is listed in the index for shard {shard} but that shard does not contain it")]
    MissingInShard { name: String, shard: String },
    #[error("tensor '{name}' appears in both {first} and {second}")]
    DuplicateTensor { name: String, first: String, second: String },
    #[error("{dir} holds only pickle weights ({file}); tandem never loads pickle (unpickling runs code). Convert the model to safetensors")]
    PickleOnly { dir: PathBuf, file: String },
    #[error("{0} has no {SINGLE_FILE}, no {INDEX_FILE} and no other .safetensors file")]
    NoWeights(PathBuf),
}

/// Element types of the safetensors format that tandem reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    I32,
    I64,
    U8,
    I8,
    I16,
    U16,
    U32,
    U64,
    F64,
    Bool,
}

impl StDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F64 | Self::I64 | Self::U64 => 8,
        }
    }
    /// Every dtype tandem reads, with the crate's name for it.
    const ALL: [(Self, Dtype); 13] = [
        (Self::F32, Dtype::F32),
        (Self::F16, Dtype::F16),
        (Self::BF16, Dtype::BF16),
        (Self::I32, Dtype::I32),
        (Self::I64, Dtype::I64),
        (Self::U8, Dtype::U8),
        (Self::I8, Dtype::I8),
        (Self::I16, Dtype::I16),
        (Self::U16, Dtype::U16),
        (Self::U32, Dtype::U32),
        (Self::U64, Dtype::U64),
        (Self::F64, Dtype::F64),
        (Self::Bool, Dtype::BOOL),
    ];
    /// The `safetensors` crate's dtype.
    pub fn to_crate(self) -> Dtype {
        Self::ALL.iter().find(|(d, _)| *d == self).map(|(_, c)| *c).expect("every dtype has a crate twin")
    }
    /// `None` for the crate's dtypes that tandem does not compute with (fp8, fp4, complex).
    pub fn from_crate(dtype: Dtype) -> Option<Self> {
        Self::ALL.iter().find(|(_, c)| *c == dtype).map(|(d, _)| *d)
    }
    /// Parse the header's dtype string (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, c)| c.to_string() == s).map(|(d, _)| *d)
    }
    /// The header's name for this dtype.
    pub fn name(self) -> String {
        self.to_crate().to_string()
    }
}

/// A tensor to write: borrowed bytes, for the crate's serializer.
struct Outgoing<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for Outgoing<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.data.into()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A safetensors file holding `(name, dtype, shape, little-endian data)`
/// tensors (benches and tests write adapters with it).
pub fn serialize(tensors: &[(&str, StDtype, &[usize], &[u8])]) -> Vec<u8> {
    serialize_with_metadata(tensors, &[])
}

/// [`serialize`] with `__metadata__` string pairs (e.g. `format: pt`, which
/// torch's loaders expect), written by Hugging Face's crate (tensors ordered
/// by alignment then name, header padded to 8 bytes; a repeated name keeps
/// its last tensor). Panics if a tensor's
/// bytes do not match its dtype and shape: that is a bug in the caller.
pub fn serialize_with_metadata(tensors: &[(&str, StDtype, &[usize], &[u8])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let metadata =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    // A name given twice keeps its last tensor, as a Python dict would (the
    // crate's writer cannot take duplicates).
    let mut by_name = BTreeMap::new();
    for &(name, dtype, shape, data) in tensors {
        by_name.insert(name, Outgoing { dtype: dtype.to_crate(), shape, data });
    }
    safetensors::serialize(by_name, metadata).expect("tensor bytes match their dtype and shape")
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensor {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte range within the file (header included).
    pub range: Range<usize>,
}

impl StTensor {
    pub fn n_elements(&self) -> usize {
        // Cannot overflow: checked at open against the byte count.
        self.shape.iter().product()
    }
}

/// A borrowed tensor: dtype, shape and its bytes (little-endian, row-major).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The values of an F32, F16 or BF16 tensor as f32 (exact); `None` for
    /// other dtypes.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = self.data;
        Some(match self.dtype {
            StDtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StDtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            _ => return None,
        })
    }
}

/// One parsed `.safetensors` file; tensor bytes stay in the (usually mapped) file.
pub struct SafetensorsFile {
    tensors: BTreeMap<String, StTensor>,
    metadata: BTreeMap<String, String>,
    data_offset: usize,
    bytes: SharedBytes,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-map and validate a file. Errors name the path.
    pub fn open(path: &Path) -> Result<Self, SafetensorsError> {
        let bytes =
            super::map_file(path).map_err(|source| SafetensorsError::Io { path: path.to_path_buf(), source })?;
        Self::parse(bytes).map_err(|e| SafetensorsError::InFile { path: path.to_path_buf(), source: Box::new(e) })
    }

    /// Parse bytes already in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SafetensorsError> {
        Self::parse(Arc::new(bytes))
    }

    fn parse(bytes: SharedBytes) -> Result<Self, SafetensorsError> {
        let buf = bytes.bytes();
        // Hugging Face's crate decides what is a valid file (header length,
        // JSON schema, offsets contiguous from 0 and covering the data exactly,
        // byte counts equal to dtype × shape); `explain_refusal` only names
        // the culprit when it refuses.
        let (header_len, meta) = SafeTensors::read_metadata(buf).map_err(|e| explain_refusal(buf, e))?;
        let data_offset = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            // On top of the crate: only the dtypes tandem computes with.
            let dtype = StDtype::from_crate(info.dtype).ok_or_else(|| SafetensorsError::UnsupportedDtype {
                name: name.clone(),
                dtype: info.dtype.to_string(),
            })?;
            let (start, end) = info.data_offsets;
            // The crate proved end <= data length; checked anyway, as slicing relies on it.
            let range = data_offset.checked_add(start).zip(data_offset.checked_add(end)).map(|(s, e)| s..e);
            let Some(range) = range.filter(|r| r.start <= r.end && r.end <= buf.len()) else {
                return Err(SafetensorsError::OutOfBounds { name, start, end, data_len: buf.len() - data_offset });
            };
            tensors.insert(name, StTensor { dtype, shape: info.shape.clone(), range });
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Self { tensors, metadata, data_offset, bytes })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn info(&self, name: &str) -> Option<&StTensor> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&str, &StTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let t = self.tensors.get(name)?;
        Some(TensorView { dtype: t.dtype, shape: &t.shape, data: self.bytes().get(t.range.clone())? })
    }

    /// Absolute byte range of a tensor within `mapped()`.
    pub fn tensor_range(&self, name: &str) -> Option<Range<usize>> {
        self.tensors.get(name).map(|t| t.range.clone())
    }

    /// The `__metadata__` string map (e.g. `{"format": "pt"}`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Absolute offset of the data section (8 + header length).
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The whole file, so weights can be kept without copying.
    pub fn mapped(&self) -> SharedBytes {
        Arc::clone(&self.bytes)
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.bytes()
    }
}

/// Our error for a file the crate refused: the crate's verdict stands, but
/// its errors mostly do not say which tensor is wrong, so the header is read
/// again (with the crate's own `TensorInfo` schema) to name it.
fn explain_refusal(buf: &[u8], refusal: SafeTensorError) -> SafetensorsError {
    let header_len = buf.first_chunk::<8>().map(|b| u64::from_le_bytes(*b));
    let available = buf.len().saturating_sub(8) as u64;
    let header = || {
        let len = usize::try_from(header_len?).ok()?;
        buf.get(8..8usize.checked_add(len)?)
    };
    match refusal {
        SafeTensorError::HeaderTooSmall => SafetensorsError::TooShort(buf.len()),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            SafetensorsError::HeaderLength { len: header_len.unwrap_or(0), available }
        }
        SafeTensorError::InvalidHeader(e) => SafetensorsError::HeaderJson(format!("not UTF-8: {e}")),
        other => {
            let data_len = header().map_or(0, |h| available as usize - h.len());
            header().and_then(|h| name_the_culprit(h, data_len)).unwrap_or_else(|| match other {
                SafeTensorError::InvalidHeaderDeserialization(e) => SafetensorsError::HeaderJson(e.to_string()),
                e => SafetensorsError::Header(e.to_string()),
            })
        }
    }
}

/// The first header entry that breaks the format, as a specific error; `None`
/// when the header is not a JSON object (a plain JSON error says it best).
fn name_the_culprit(header: &[u8], data_len: usize) -> Option<SafetensorsError> {
    let serde_json::Value::Object(map) = serde_json::from_slice(header).ok()? else {
        return None;
    };
    let mut entries = Vec::new();
    for (name, entry) in map {
        if name == "__metadata__" {
            if serde_json::from_value::<BTreeMap<String, String>>(entry).is_err() {
                return Some(SafetensorsError::Header("__metadata__ must map strings to strings".into()));
            }
            continue;
        }
        let dtype = entry.get("dtype").and_then(|d| d.as_str()).map(str::to_owned);
        match serde_json::from_value::<TensorInfo>(entry) {
            Ok(info) => entries.push((name, info)),
            Err(_) if dtype.as_deref().is_some_and(|d| StDtype::parse(d).is_none()) => {
                return Some(SafetensorsError::UnsupportedDtype { name, dtype: dtype.unwrap_or_default() });
            }
            Err(e) => return Some(SafetensorsError::Header(format!("tensor '{name}': {e}"))),
        }
    }
    // The crate's order: by offsets.
    entries.sort_by_key(|(_, info)| info.data_offsets);
    let mut covered = 0;
    for (name, info) in entries {
        let (start, end) = info.data_offsets;
        if start > end || end > data_len {
            return Some(SafetensorsError::OutOfBounds { name, start, end, data_len });
        }
        let expected = info.shape.iter().try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d)).map(|b| b / 8);
        if expected != Some(end - start) {
            return Some(match StDtype::from_crate(info.dtype) {
                Some(dtype) => SafetensorsError::SizeMismatch {
                    name,
                    dtype,
                    shape: info.shape,
                    expected: expected.map_or("more than usize::MAX".into(), |e| e.to_string()),
                    start,
                    end,
                },
                None => SafetensorsError::UnsupportedDtype { name, dtype: info.dtype.to_string() },
            });
        }
        if start != covered {
            return Some(SafetensorsError::Layout(format!(
                "tensor '{name}' starts at byte {start} of the data section but the tensors before it end at {covered} (tensors must be contiguous)"
            )));
        }
        covered = end;
    }
    (covered != data_len).then(|| {
        SafetensorsError::Layout(format!(
            "the data section has {data_len} bytes but its tensors cover {covered} (files end with their last tensor)"
        ))
    })
}

/// A Hugging Face model directory: one `model.safetensors`, or an index with shards.
#[derive(Debug)]
pub struct SafetensorsModel {
    dir: PathBuf,
    files: Vec<(String, SafetensorsFile)>,
    /// Tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl SafetensorsModel {
    pub fn open_dir(dir: &Path) -> Result<Self, SafetensorsError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_sharded(dir, &index_path);
        }
        let single = dir.join(SINGLE_FILE);
        let names: Vec<String> = if single.is_file() {
            vec![SINGLE_FILE.to_string()]
        } else {
            let entries = list_dir(dir)?;
            let st: Vec<String> = entries.iter().filter(|n| n.ends_with(".safetensors")).cloned().collect();
            if st.is_empty() {
                let pickle = entries
                    .iter()
                    .find(|n| [".bin", ".pt", ".pth", ".pkl", ".ckpt"].iter().any(|ext| n.ends_with(ext)));
                return Err(match pickle {
                    Some(file) => SafetensorsError::PickleOnly { dir: dir.to_path_buf(), file: file.clone() },
                    None => SafetensorsError::NoWeights(dir.to_path_buf()),
                });
            }
            st
        };
        let mut model = Self { dir: dir.to_path_buf(), files: Vec::new(), index: BTreeMap::new() };
        for name in names {
            let file = SafetensorsFile::open(&dir.join(&name))?;
            let fi = model.files.len();
            for t in file.tensors.keys() {
                if let Some(&prev) = model.index.get(t) {
                    return Err(SafetensorsError::DuplicateTensor {
                        name: t.clone(),
                        first: model.files[prev].0.clone(),
                        second: name.clone(),
                    });
                }
                model.index.insert(t.clone(), fi);
            }
            model.files.push((name, file));
        }
        Ok(model)
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self, SafetensorsError> {
        let bad = |reason: String| SafetensorsError::Index { path: index_path.to_path_buf(), reason };
        let text = std::fs::read(index_path)
            .map_err(|source| SafetensorsError::Io { path: index_path.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let weight_map =
            json.get("weight_map").and_then(|w| w.as_object()).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut shards: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (name, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| bad(format!("shard of '{name}' is not a string")))?;
            if !is_plain_file_name(shard) {
                return Err(bad(format!("shard '{shard}' is not a file name in the model directory")));
            }
            let fi = match shards.get(shard) {
                Some(&fi) => fi,
                None => {
                    let file = SafetensorsFile::open(&dir.join(shard))?;
                    files.push((shard.to_string(), file));
                    shards.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            if files[fi].1.info(name).is_none() {
                return Err(SafetensorsError::MissingInShard { name: name.clone(), shard: shard.into() });
            }
            index.insert(name.clone(), fi);
        }
        Ok(Self { dir: dir.to_path_buf(), files, index })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.file_of(name)?.tensor(name)
    }

    /// The file holding a tensor, for its `mapped()` bytes and `tensor_range()`.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        let &fi = self.index.get(name)?;
        self.files.get(fi).map(|(_, f)| f)
    }

    /// (file name, file) pairs in load order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &SafetensorsFile)> {
        self.files.iter().map(|(n, f)| (n.as_str(), f))
    }
}

/// A shard named by an index must stay inside the model directory.
fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\']) && !Path::new(s).is_absolute()
}

fn list_dir(dir: &Path) -> Result<Vec<String>, SafetensorsError> {
    super::list_files(dir).map_err(|source| SafetensorsError::Io { path: dir.to_path_buf(), source })
}
