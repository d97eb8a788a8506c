//! A GGUF model quantised again into a new `.gguf`: every metadata key kept
//! (tokenizer, chat template, hyper-parameters), projection matrices
//! quantised to the target kind, every other tensor copied byte for byte, as
//! llama.cpp's `llama-quantize --allow-requantize` does.

use std::io::Write;

use rayon::prelude::*;

use crate::loader::gguf::{GgufFile, GgufValue};
use crate::model::TensorName;
use crate::quant::ggml::WeightKind;
use crate::quant::on_load::{quantize, QuantizeTarget};

use super::ExportError;

/// The projections of a llama-family GGUF (`blk.N.attn_q.weight`, ...).
fn is_projection(name: &str) -> bool {
    TensorName::from_gguf(name).is_some_and(TensorName::is_projection)
}

/// llama.cpp's `llama_ftype` for the file's dominant kind (`general.file_type`).
pub(super) fn file_type(target: QuantizeTarget) -> Option<u32> {
    match target {
        QuantizeTarget::Q8_0 => Some(7),
        // MOSTLY_Q4_K_S: Q4_K everywhere it fits, as `--pure` would do it.
        QuantizeTarget::Q4K => Some(14),
        _ => None,
    }
}

/// One tensor of the output: its header fields and data.
pub(super) struct OutTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: WeightKind,
    pub data: Vec<u8>,
    /// A projection quantised to the target (else copied as it was).
    pub requantized: bool,
}

/// The output's tensors, in the source's order.
pub(super) fn requantize(src: &GgufFile, target: QuantizeTarget) -> Result<Vec<OutTensor>, ExportError> {
    src.tensors
        .par_iter()
        .map(|t| {
            let data = src.tensor_data(t);
            let requantized = is_projection(&t.name) && t.dims.len() == 2;
            let (kind, data) = if requantized {
                let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
                quantize(target, t.ty, data, rows, cols)
                    .map_err(|reason| ExportError::Refused(format!("tensor '{}': {reason}", t.name)))?
            } else {
                (t.ty, data.to_vec())
            };
            Ok(OutTensor { name: t.name.clone(), dims: t.dims.clone(), kind, data, requantized })
        })
        .collect()
}

/// The whole file: the source's metadata (with the new file type), then the
/// tensors, as [`write_file`] lays them out.
pub(super) fn write(
    src: &GgufFile,
    target: QuantizeTarget,
    tensors: &[OutTensor],
    w: &mut impl Write,
) -> std::io::Result<u64> {
    let mut metadata = src.metadata.clone();
    if let Some(ft) = file_type(target) {
        metadata.insert("general.file_type".into(), GgufValue::U32(ft));
    }
    metadata.insert("general.quantization_version".into(), GgufValue::U32(2));
    let entries: Vec<(&str, &GgufValue)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_file(&entries, src.alignment, tensors, w)
}

/// A GGUF (version 3): header, `metadata` in the order given, tensor infos,
/// then the data of each tensor at `alignment`.
pub(super) fn write_file(
    metadata: &[(&str, &GgufValue)],
    alignment: u64,
    tensors: &[OutTensor],
    w: &mut impl Write,
) -> std::io::Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut head, key);
        head.extend_from_slice(&value_type(value).to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        let id = t.kind.gguf_id().expect("GGUF tensors are written in GGUF kinds");
        head.extend_from_slice(&id.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    head.resize((head.len() as u64).next_multiple_of(alignment) as usize, 0);
    w.write_all(&head)?;
    let mut written = head.len() as u64;
    for t in tensors {
        w.write_all(&t.data)?;
        let pad = (t.data.len() as u64).next_multiple_of(alignment) - t.data.len() as u64;
        w.write_all(&vec![0u8; pad as usize])?;
        written += t.data.len() as u64 + pad;
    }
    Ok(written)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids.
fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Array(items) => {
            // The reader keeps no element type for an empty array; u8 is as
            // good as any for zero elements.
            let elem = items.first().map_or(0, value_type);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_are_recognised_by_name() {
        assert!(is_projection("blk.0.attn_q.weight") && is_projection("blk.23.ffn_down.weight"));
        for n in
            ["token_embd.weight", "output.weight", "blk.0.attn_q.bias", "blk.x.attn_q.weight", "blk.0.attn_norm.weight"]
        {
            assert!(!is_projection(n), "{n}");
        }
    }
}
