//! The merged weights: each planned tensor dequantised to f32 a block of rows
//! at a time, the adapter's `(B·A)·scaling` added to adapted projections, and
//! the result rounded to the output dtype and streamed into one safetensors
//! file whose header is known before the first byte of data.

use std::io::{BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use crate::loader::safetensors::StDtype;
use crate::lora::PeftMatrix;
use crate::model::{ModelConfig, WeightSource};

use super::{io_err, MergeDtype, MergeError, Planned, Values};

/// Elements converted per block of rows (16 MB of f32).
const CHUNK_ELEMENTS: usize = 1 << 22;

fn st_dtype(d: MergeDtype) -> StDtype {
    match d {
        MergeDtype::F32 => StDtype::F32,
        MergeDtype::Bf16 => StDtype::BF16,
        MergeDtype::F16 => StDtype::F16,
    }
}

/// The safetensors header for `plan` in `dtype`, padded to 8 bytes, and the
/// data section's length.
pub(super) fn header(plan: &[Planned], dtype: MergeDtype) -> (Vec<u8>, u64) {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for p in plan {
        let n = p.shape.iter().product::<usize>() as u64 * dtype.size_bytes() as u64;
        map.insert(
            p.hf_name.clone(),
            json!({"dtype": st_dtype(dtype).name(), "shape": p.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(map)).expect("a JSON map serialises");
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    (bytes, offset)
}

/// Writes `model.safetensors` to `path` (synced); returns its size in bytes.
pub(super) fn write_safetensors(
    path: &Path,
    plan: &[Planned],
    src: &WeightSource,
    c: &ModelConfig,
    dtype: MergeDtype,
) -> Result<u64, MergeError> {
    let (head, data_len) = header(plan, dtype);
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io_err(path))?;
    w.write_all(&head).map_err(io_err(path))?;
    let mut written = 0u64;
    for p in plan {
        written += write_tensor(&mut w, p, src, c, dtype).map_err(|e| match e {
            TensorError::Io(source) => MergeError::Io { path: path.to_owned(), source },
            TensorError::Bad(reason) => MergeError::Refused(format!("weight '{}': {reason}", p.hf_name)),
        })?;
    }
    debug_assert_eq!(written, data_len);
    let file = w.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(8 + head.len() as u64 + data_len)
}

enum TensorError {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for TensorError {
    fn from(e: std::io::Error) -> Self {
        TensorError::Io(e)
    }
}

/// One tensor's data in `dtype`; returns the bytes written.
fn write_tensor(
    w: &mut impl Write,
    p: &Planned,
    src: &WeightSource,
    c: &ModelConfig,
    dtype: MergeDtype,
) -> Result<u64, TensorError> {
    let n: usize = p.shape.iter().product();
    let cols = *p.shape.last().expect("planned tensors have a shape");
    let rows = n / cols;
    let size = dtype.size_bytes();
    let name = match p.from {
        Values::Zeros => {
            w.write_all(&vec![0u8; n * size])?;
            return Ok((n * size) as u64);
        }
        Values::Weight(name) => name,
    };
    let weight = src.require(name, c).map_err(|e| TensorError::Bad(e.to_string()))?;
    if (weight.rows, weight.cols) != (rows, cols) {
        return Err(TensorError::Bad(format!("shape [{}, {}] changed since it was checked", weight.rows, weight.cols)));
    }
    let chunk_rows = (CHUNK_ELEMENTS / cols).clamp(1, rows);
    let mut vals = vec![0f32; chunk_rows * cols];
    let mut out = vec![0u8; chunk_rows * cols * size];
    for r0 in (0..rows).step_by(chunk_rows) {
        let r1 = (r0 + chunk_rows).min(rows);
        let (vals, out) = (&mut vals[..(r1 - r0) * cols], &mut out[..(r1 - r0) * cols * size]);
        weight.dequantize_rows(r0..r1, vals).map_err(TensorError::Bad)?;
        if let Some(m) = p.lora {
            add_delta(vals, r0, cols, m);
        }
        convert(vals, cols, dtype, out).map_err(|(row, col, x)| {
            TensorError::Bad(format!(
                "the value {x} at [{}, {col}] does not fit {dtype}; merge with --dtype bf16 or f32",
                r0 + row
            ))
        })?;
        w.write_all(out)?;
    }
    Ok((n * size) as u64)
}

/// `vals[o][i] += (Σ_j B[r0+o][j] · A[j][i]) · scaling` for the rows in `vals`:
/// peft's `(lora_B @ lora_A) * scaling`, in f32, added to the f32 weight.
fn add_delta(vals: &mut [f32], r0: usize, cols: usize, m: &PeftMatrix) {
    let r = m.rank;
    vals.par_chunks_mut(cols).enumerate().for_each_init(
        || vec![0f32; cols],
        |acc, (o, row)| {
            acc.fill(0.0);
            let b = &m.b[(r0 + o) * r..(r0 + o + 1) * r];
            for (j, &bj) in b.iter().enumerate() {
                for (s, &a) in acc.iter_mut().zip(&m.a[j * cols..(j + 1) * cols]) {
                    *s += bj * a;
                }
            }
            for (x, &d) in row.iter_mut().zip(acc.iter()) {
                *x += d * m.scaling;
            }
        },
    );
}

/// Rounds f32 values to `dtype` (to nearest, ties to even) as little-endian
/// bytes. A finite value that overflows f16 is an error: (row, col, value).
pub(crate) fn convert(vals: &[f32], cols: usize, dtype: MergeDtype, out: &mut [u8]) -> Result<(), (usize, usize, f32)> {
    let size = dtype.size_bytes();
    out.par_chunks_mut(cols * size).zip(vals.par_chunks(cols)).enumerate().try_for_each(|(row, (o, v))| {
        for (col, (o, &x)) in o.chunks_exact_mut(size).zip(v).enumerate() {
            match dtype {
                MergeDtype::F32 => o.copy_from_slice(&x.to_le_bytes()),
                MergeDtype::Bf16 => o.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                MergeDtype::F16 => {
                    let h = half::f16::from_f32(x);
                    if h.is_infinite() && x.is_finite() {
                        return Err((row, col, x));
                    }
                    o.copy_from_slice(&h.to_le_bytes());
                }
            }
        }
        Ok(())
    })
}
