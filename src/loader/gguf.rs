//! GGUF v2/v3 reader (FORMATS.md §4; ggml `docs/gguf.md`, `src/gguf.cpp`).
//!
//! The whole file is validated at open: every count is bounded by the bytes left
//! before anything is allocated, every tensor's byte range lies inside the data
//! section, so later accessors can slice without re-checking. A corrupt or hostile
//! file gives a `GgufError`, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::quant::ggml::WeightKind;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml rejects `name.length() >= GGML_MAX_NAME` (64).
const MAX_TENSOR_NAME: usize = 63;
const MAX_DIMS: u32 = 4;
/// Nested arrays recurse; a file of nothing but array headers must not exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 16;
/// Bounds RAM when a corrupt count makes tensor data read as metadata: a value
/// costs ~32 bytes in memory against as little as 1 on disk. Real files hold a few
/// million at most (vocabularies of 256k tokens, their scores, types and merges).
const MAX_METADATA_VALUES: usize = 1 << 23;
/// Longest string value; chat templates, the longest real ones, are a few KB.
const MAX_STRING_LEN: u64 = 1 << 26;
/// Pre-allocation cap for counted lists; they still grow to their real size.
const PREALLOC: usize = 1024;

/// Bytes shared with whoever keeps weights without copying them.
pub use super::SharedBytes;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file: magic is {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("GGUF version 1 is not supported (it predates 64-bit counts); re-convert the model")]
    Version1,
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("unsupported GGUF version {0} (tandem reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("GGUF file truncated while reading {what} at byte {offset}")]
    Truncated { what: &'static str, offset: u64 },
    #[error("GGUF {what} count {count} is impossible: only {remaining} bytes remain at byte {offset}")]
    CountTooLarge { what: &'static str, count: u64, remaining: u64, offset: u64 },
    #[error("GGUF metadata holds more than {MAX_METADATA_VALUES} values (at key '{key}'); the file is corrupt")]
    TooManyValues { key: String },
    #[error("GGUF string at byte {offset} claims {len} bytes (at most {MAX_STRING_LEN})")]
    StringTooLong { offset: u64, len: u64 },
    #[error("GGUF metadata key '{key}' has unknown value type {ty}")]
    BadValueType { key: String, ty: u32 },
    #[error("GGUF metadata key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}")]
    ArrayTooDeep { key: String },
    #[error("GGUF {what} at byte {offset} is not valid UTF-8")]
    BadUtf8 { what: &'static str, offset: u64 },
    #[error("GGUF metadata key '{0}' appears twice")]
    DuplicateKey(String),
    #[error("GGUF tensor '{0}' appears twice")]
    DuplicateTensor(String),
    #[error("GGUF general.alignment must be a u32 power of two, got {0}")]
    BadAlignment(String),
    #[error("GGUF tensor {index} has a name of {len} bytes (at most {MAX_TENSOR_NAME})")]
    TensorNameTooLong { index: u64, len: u64 },
    #[error("GGUF tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")]
    TooManyDims { name: String, n_dims: u32 },
    #[error("GGUF tensor '{name}' has ggml type id {id}{}, which tandem does not support", known_type_name(*.id).map(|n| format!(" ({n})")).unwrap_or_default())]
    UnsupportedType { name: String, id: u32 },
    #[error("GGUF tensor '{name}' has an invalid shape {dims:?}: {reason}")]
    BadShape { name: String, dims: Vec<u64>, reason: &'static str },
    #[error("GGUF tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned { name: String, offset: u64, alignment: u64 },
    #[error("GGUF tensor '{name}' bytes {offset}..{offset}+{size} lie outside the {data_len}-byte data section")]
    OutOfBounds { name: String, offset: u64, size: u64, data_len: u64 },
}

/// Names of ggml types that exist but tandem cannot compute with, for error messages.
fn known_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        3 => "Q4_1",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// Any unsigned integer, or a signed one that is not negative: converters
    /// write the same hyperparameter as u32, u64 or i32.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml `ne` order: `dims[0]` is the contiguous dimension (PyTorch shape reversed).
    pub dims: Vec<u64>,
    pub ty: WeightKind,
    /// Relative to `GgufFile::data_offset`.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Saturates instead of overflowing; every tensor of an opened file fits in `u64`.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX)
    }
    /// Bytes on disk; `u64::MAX` if the shape is not whole blocks or overflows
    /// (never the case for a tensor of an opened file).
    pub fn n_bytes(&self) -> u64 {
        tensor_bytes(self.ty, &self.dims).unwrap_or(u64::MAX)
    }
}

/// Bytes of a tensor; `Err` says why the shape is invalid for the type.
fn tensor_bytes(ty: WeightKind, dims: &[u64]) -> Result<u64, &'static str> {
    let block = ty.block_size() as u64;
    let ne0 = dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(block) {
        return Err("first dimension is not a whole number of quant blocks");
    }
    let row = (ne0 / block).checked_mul(ty.type_size() as u64).ok_or("size overflows")?;
    dims.iter().skip(1).try_fold(row, |acc, &d| acc.checked_mul(d)).ok_or("size overflows")
}

/// A parsed GGUF file; tensor bytes stay in the (usually memory-mapped) file.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    bytes: SharedBytes,
    by_name: BTreeMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("len", &self.bytes().len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and validate a GGUF file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = super::map_file(path).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        Self::parse(bytes)
    }

    /// Parse bytes already in memory (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Arc::new(bytes))
    }

    fn parse(bytes: SharedBytes) -> Result<Self, GgufError> {
        let buf = bytes.bytes();
        let mut r = Reader { buf, pos: 0, values_left: MAX_METADATA_VALUES };
        let magic = r.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return Err(GgufError::Version1),
            v if v & 0xFFFF == 0 && (1..=3).contains(&v.swap_bytes()) => return Err(GgufError::BigEndian),
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        // Smallest encodings: a tensor info is name len + n_dims + type + offset,
        // a KV is key len + value type + a 1-byte value.
        let n_tensors = r.count("tensor", 8 + 4 + 4 + 8)?;
        let n_kv = r.count("metadata key/value", 8 + 4 + 1)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(&key, ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(other) => return Err(GgufError::BadAlignment(format!("{other:?}"))),
        };

        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC));
        let mut by_name = BTreeMap::new();
        for index in 0..n_tensors as u64 {
            let name_len = r.u64("tensor name length")?;
            if name_len > MAX_TENSOR_NAME as u64 {
                return Err(GgufError::TensorNameTooLong { index, len: name_len });
            }
            let name = r.str_of_len(name_len as usize, "tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let id = r.u32("tensor type")?;
            let ty =
                WeightKind::from_gguf_id(id).ok_or_else(|| GgufError::UnsupportedType { name: name.clone(), id })?;
            let offset = r.u64("tensor offset")?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(GgufTensorInfo { name, dims, ty, offset });
        }

        let file_len = buf.len() as u64;
        let info_end = r.pos as u64;
        let data_offset = info_end
            .checked_add((alignment - info_end % alignment) % alignment)
            .ok_or(GgufError::Truncated { what: "data section", offset: info_end })?;
        // With no tensors a writer may stop before the padding; the data section is empty.
        let data_len = file_len.saturating_sub(data_offset);
        for t in &tensors {
            validate_tensor(t, alignment, data_len)?;
        }

        Ok(Self { version, metadata, tensors, alignment, data_offset, bytes, by_name })
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        // `tensors` is public and may have been edited since open; never trust the index blindly.
        let hit = self.by_name.get(name).and_then(|&i| self.tensors.get(i));
        hit.filter(|t| t.name == name).or_else(|| self.tensors.iter().find(|t| t.name == name))
    }

    /// The tensor's bytes. Empty for an info that does not belong to this file
    /// (ranges of this file's tensors were checked at open).
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> &[u8] {
        self.tensor_range(info).and_then(|r| self.bytes().get(r)).unwrap_or(&[])
    }

    /// Absolute byte range of a tensor within `mapped()`.
    pub fn tensor_range(&self, info: &GgufTensorInfo) -> Option<std::ops::Range<usize>> {
        let start = self.data_offset.checked_add(info.offset)?;
        let end = start.checked_add(tensor_bytes(info.ty, &info.dims).ok()?)?;
        Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// The whole file; tensor bytes are at `data_offset + info.offset`.
    pub fn mapped(&self) -> SharedBytes {
        Arc::clone(&self.bytes)
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.bytes()
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    /// `None` unless the key is an array of strings only.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_str()).collect()
    }
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
}

fn validate_tensor(t: &GgufTensorInfo, alignment: u64, data_len: u64) -> Result<(), GgufError> {
    let size = tensor_bytes(t.ty, &t.dims).map_err(|reason| GgufError::BadShape {
        name: t.name.clone(),
        dims: t.dims.clone(),
        reason,
    })?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(GgufError::Misaligned { name: t.name.clone(), offset: t.offset, alignment });
    }
    let in_range = t.offset.checked_add(size).is_some_and(|end| end <= data_len);
    // Slices are indexed with usize; on 32-bit hosts a huge tensor must fail here.
    let addressable = usize::try_from(data_len).is_ok();
    if !in_range || !addressable {
        return Err(GgufError::OutOfBounds { name: t.name.clone(), offset: t.offset, size, data_len });
    }
    Ok(())
}

/// Bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    values_left: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated { what, offset: self.pos as u64 });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count of items at least `min_item` bytes each, checked against the
    /// bytes left so a corrupt count cannot drive a huge allocation.
    fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let remaining = self.remaining() as u64;
        if count > remaining / min_item.max(1) as u64 {
            return Err(GgufError::CountTooLarge { what, count, remaining, offset });
        }
        Ok(count as usize)
    }

    fn str_of_len(&mut self, len: usize, what: &'static str) -> Result<String, GgufError> {
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what, offset })
    }

    fn string_len(&mut self, what: &'static str) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong { offset, len });
        }
        Ok(len as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.string_len(what)?;
        self.str_of_len(len, what)
    }

    /// A string value. ggml stores arbitrary bytes here (some tokenizer vocabularies
    /// hold invalid UTF-8); a replacement character beats refusing the whole model.
    fn value_string(&mut self) -> Result<String, GgufError> {
        let len = self.string_len("string value length")?;
        let bytes = self.take(len, "string value")?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        self.values_left =
            self.values_left.checked_sub(1).ok_or_else(|| GgufError::TooManyValues { key: key.into() })?;
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>("u8 value")?[0]),
            1 => GgufValue::I8(self.array::<1>("i8 value")?[0] as i8),
            2 => GgufValue::U16(self.array("u16 value").map(u16::from_le_bytes)?),
            3 => GgufValue::I16(self.array("i16 value").map(i16::from_le_bytes)?),
            4 => GgufValue::U32(self.u32("u32 value")?),
            5 => GgufValue::I32(self.array("i32 value").map(i32::from_le_bytes)?),
            6 => GgufValue::F32(self.array("f32 value").map(f32::from_le_bytes)?),
            7 => GgufValue::Bool(self.array::<1>("bool value")?[0] != 0),
            8 => GgufValue::String(self.value_string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep { key: key.into() });
                }
                let elem = self.u32("array element type")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 4 + 8,
                    _ => return Err(GgufError::BadValueType { key: key.into(), ty: elem }),
                };
                let n = self.count("array element", min)?;
                let mut items = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64("u64 value")?),
            11 => GgufValue::I64(self.array("i64 value").map(i64::from_le_bytes)?),
            12 => GgufValue::F64(self.array("f64 value").map(f64::from_le_bytes)?),
            _ => return Err(GgufError::BadValueType { key: key.into(), ty }),
        })
    }
}
