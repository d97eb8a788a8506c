//! safetensors reader: `u64 LE header length`, a JSON header
//! `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {..}}`, then data.
//!
//! Everything in the header is checked at open (lengths, offsets inside the data,
//! byte counts equal to dtype × shape), so `tensor()` can slice without re-checking.
//! Pickle (`pytorch_model.bin`) is never loaded: unpickling runs arbitrary code.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes shared with whoever keeps weights without copying them.
pub use super::SharedBytes;

/// The reference implementation's limit; real headers are well under a megabyte.
const MAX_HEADER_LEN: u64 = 100_000_000;
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
    #[error(
        "safetensors header length {len} is impossible (file has {available} bytes after it, limit {MAX_HEADER_LEN})"
    )]
    HeaderLength { len: u64, available: u64 },
    #[error("safetensors header is not valid JSON: {0}")]
    HeaderJson(String),
    #[error("safetensors header: {0}")]
    Header(String),
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
    /// Every dtype with its name in the header.
    const NAMES: [(Self, &'static str); 13] = [
        (Self::F32, "F32"),
        (Self::F16, "F16"),
        (Self::BF16, "BF16"),
        (Self::I32, "I32"),
        (Self::I64, "I64"),
        (Self::U8, "U8"),
        (Self::I8, "I8"),
        (Self::I16, "I16"),
        (Self::U16, "U16"),
        (Self::U32, "U32"),
        (Self::U64, "U64"),
        (Self::F64, "F64"),
        (Self::Bool, "BOOL"),
    ];
    /// Parse the header's dtype string (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(_, n)| *n == s).map(|(d, _)| *d)
    }
    /// The header's name for this dtype.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(d, _)| *d == self).map(|(_, n)| *n).expect("every dtype is named")
    }
}

/// A safetensors file holding `(name, dtype, shape, little-endian data)`
/// tensors in order (benches and tests write adapters with it).
pub fn serialize(tensors: &[(&str, StDtype, &[usize], &[u8])]) -> Vec<u8> {
    serialize_with_metadata(tensors, &[])
}

/// [`serialize`] with `__metadata__` string pairs (e.g. `format: pt`, which
/// torch's loaders expect); the header is padded with spaces to a multiple of
/// 8 bytes, as the reference writer does, so the data is aligned.
pub fn serialize_with_metadata(tensors: &[(&str, StDtype, &[usize], &[u8])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string()))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON map serialises");
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
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
        let buf = (*bytes).as_ref();
        let Some(len_bytes) = buf.first_chunk::<8>() else {
            return Err(SafetensorsError::TooShort(buf.len()));
        };
        let header_len = u64::from_le_bytes(*len_bytes);
        let available = (buf.len() - 8) as u64;
        if header_len > available || header_len > MAX_HEADER_LEN {
            return Err(SafetensorsError::HeaderLength { len: header_len, available });
        }
        let data_offset = 8 + header_len as usize;
        let header = &buf[8..data_offset];
        let data_len = buf.len() - data_offset;

        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(header).map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in map {
            if name == "__metadata__" {
                metadata = parse_metadata(entry)?;
                continue;
            }
            let t = parse_entry(&name, entry, data_len)?;
            tensors.insert(name, StTensor { range: t.range.start + data_offset..t.range.end + data_offset, ..t });
        }
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
        (*self.bytes).as_ref()
    }
}

fn parse_metadata(v: serde_json::Value) -> Result<BTreeMap<String, String>, SafetensorsError> {
    let serde_json::Value::Object(map) = v else {
        return Err(SafetensorsError::Header("__metadata__ is not an object".into()));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            _ => Err(SafetensorsError::Header(format!("__metadata__ value for '{k}' is not a string"))),
        })
        .collect()
}

/// Validate one header entry; the returned range is relative to the data section.
fn parse_entry(name: &str, v: serde_json::Value, data_len: usize) -> Result<StTensor, SafetensorsError> {
    let bad = |what: &str| SafetensorsError::Header(format!("tensor '{name}': {what}"));
    let serde_json::Value::Object(obj) = v else {
        return Err(bad("entry is not an object"));
    };
    let dtype_str = obj.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("missing or non-string dtype"))?;
    let dtype = StDtype::parse(dtype_str)
        .ok_or_else(|| SafetensorsError::UnsupportedDtype { name: name.into(), dtype: dtype_str.into() })?;
    let shape = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("missing or non-array shape"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape entries must be non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("data_offsets must be [start, end]"))?;
    let offset = |i: usize| {
        offsets[i]
            .as_u64()
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| bad("data_offsets must be non-negative integers"))
    };
    let (start, end) = (offset(0)?, offset(1)?);
    if start > end || end > data_len {
        return Err(SafetensorsError::OutOfBounds { name: name.into(), start, end, data_len });
    }
    let expected = shape.iter().try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d));
    if expected != Some(end - start) {
        return Err(SafetensorsError::SizeMismatch {
            name: name.into(),
            dtype,
            shape,
            expected: expected.map_or("more than usize::MAX".into(), |e| e.to_string()),
            start,
            end,
        });
    }
    Ok(StTensor { dtype, shape, range: start..end })
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
