//! `tandem quantize`: a model written back to disk quantised, in the standard
//! layout of the chosen format, for transformers, vLLM, llama.cpp or tandem
//! to load:
//!
//! - `gptq`, `nf4`, `fp4`: a Hugging Face directory (config.json with its
//!   `quantization_config`, model.safetensors, tokenizer and generation files)
//!   from an HF directory or a GGUF, built on the same plan, side files and
//!   atomic publish as `tandem merge`;
//! - `q8_0`, `q4_k`: a `.gguf`, from a GGUF (its tokenizer and metadata are
//!   kept) or from an HF directory, laid out as llama.cpp's
//!   `convert_hf_to_gguf.py` lays it out (hyperparameters, GGUF tensor names,
//!   llama Q/K rows permuted for llama.cpp's rope, the byte-level BPE
//!   tokenizer as GGUF metadata; a tokenizer GGUF metadata would not
//!   reproduce is refused).
//!
//! The codes are exactly what `--quantize` computes on load (round-to-nearest,
//! no calibration), so serving the written checkpoint and quantising on load
//! agree, and the file saves the quantisation at every start.

mod from_hf;
mod gguf;
mod gguf_tokenizer;
mod hf;

use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::loader::gguf::GgufFile;
use crate::loader::hub::{resolve_model, ModelSource};
use crate::loader::safetensors::{serialize_with_metadata, StDtype};
use crate::merge::{self, files, io_err, MergeDtype, Planned, Values};
use crate::model::{ModelConfig, WeightSource};
use crate::quant::ggml::WeightKind;
use crate::quant::on_load::QuantizeTarget;

use hf::{HfQuant, Named};

/// Errors are the merge's: refusals with a reason, model loading, I/O.
pub use crate::merge::MergeError as ExportError;

/// What `tandem quantize --format` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Gptq,
    Nf4,
    Fp4,
    Q8_0,
    Q4K,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "gptq" => Self::Gptq,
            "nf4" => Self::Nf4,
            "fp4" => Self::Fp4,
            "q8_0" => Self::Q8_0,
            "q4_k" => Self::Q4K,
            other => {
                return Err(format!("format {other:?}: expected gptq, nf4, fp4 (HF directories) or q8_0, q4_k (.gguf)"))
            }
        })
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gptq => "gptq",
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        })
    }
}

impl ExportFormat {
    /// Whether the output is one `.gguf` file (else an HF directory).
    pub fn is_gguf(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q4K)
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub format: ExportFormat,
    pub tensors: usize,
    /// Projection matrices quantised.
    pub quantized: usize,
    /// Bytes of the weights file.
    pub weights_bytes: u64,
    pub notes: Vec<String>,
}

/// Quantises the model `spec` (a `.gguf`, an HF directory or a hub id) to
/// `format` and writes it to `out`: a new `.gguf` file, or a new (or empty)
/// directory. Nothing is left at `out` on error.
pub fn quantize_checkpoint(spec: &str, format: ExportFormat, out: &Path) -> Result<ExportReport, ExportError> {
    if crate::model::random::parse(spec).is_some() {
        return Err(ExportError::Refused(format!("'{spec}' is a generated model with no weights file to quantise")));
    }
    let source = resolve_model(spec)
        .map_err(|e| ExportError::Model { spec: spec.into(), source: crate::model::ModelError::Resolve(e) })?;
    match (format.is_gguf(), source) {
        (true, ModelSource::Gguf(path)) => write_gguf(spec, &path, format, out),
        (true, ModelSource::HfDir(_)) => from_hf::write(spec, format, out),
        (false, _) => write_hf(spec, format, out),
    }
}

fn target_of(format: ExportFormat) -> QuantizeTarget {
    match format {
        ExportFormat::Gptq => QuantizeTarget::Int4,
        ExportFormat::Nf4 => QuantizeTarget::Nf4,
        ExportFormat::Fp4 => QuantizeTarget::Fp4,
        ExportFormat::Q8_0 => QuantizeTarget::Q8_0,
        ExportFormat::Q4K => QuantizeTarget::Q4K,
    }
}

fn write_gguf(spec: &str, path: &Path, format: ExportFormat, out: &Path) -> Result<ExportReport, ExportError> {
    check_new_file(out)?;
    let src = GgufFile::open(path)
        .map_err(|e| ExportError::Model { spec: spec.into(), source: crate::model::ModelError::from(e) })?;
    let target = target_of(format);
    let tensors = gguf::requantize(&src, target)?;
    let quantized = tensors.iter().filter(|t| t.requantized).count();
    let weights_bytes = publish_file(out, |w| gguf::write(&src, target, &tensors, w))?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        format,
        tensors: tensors.len(),
        quantized,
        weights_bytes,
        notes: Vec::new(),
    })
}

/// `out` must not exist (a file is never overwritten).
fn check_new_file(out: &Path) -> Result<(), ExportError> {
    if out.as_os_str().is_empty() {
        return Err(ExportError::Refused("no output file given (an empty path)".into()));
    }
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(ExportError::Refused(format!(
            "output {} exists; choose a new file (nothing is overwritten)",
            out.display()
        )));
    }
    Ok(())
}

/// Writes `out` under a temporary name beside it, syncs and renames it.
fn publish_file(
    out: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<u64>,
) -> Result<u64, ExportError> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let leaf = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.gguf".into());
    let tmp = parent.join(format!(".{leaf}.writing-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        let n = fill(&mut w)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, out)?;
        Ok(n)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(out)(e)
    })
}

/// GPTQ's config holds one group size for the whole model: the one
/// `--quantize int4` would pick for a layer with as many inputs as the
/// greatest common divisor of every projection's.
fn gptq_group(c: &ModelConfig) -> Result<usize, ExportError> {
    let inputs = [c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim];
    let gcd = inputs.iter().fold(0, |a, &b| gcd(a, b));
    crate::quant::on_load::group_for(gcd).ok_or_else(|| {
        ExportError::Refused(format!("GPTQ needs layer inputs that are multiples of 32; this model has {inputs:?}"))
    })
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn write_hf(spec: &str, format: ExportFormat, out: &Path) -> Result<ExportReport, ExportError> {
    merge::check_out(out)?;
    let (base, config, src) =
        merge::open_base(spec).map_err(|source| ExportError::Model { spec: spec.into(), source })?;
    let plan = merge::plan(&base, &config, &src, None)?;
    let dtype = merge::default_dtype(&plan, &config, &src);
    let quant = match format {
        ExportFormat::Gptq => HfQuant::Gptq { group: gptq_group(&config)? },
        ExportFormat::Nf4 => HfQuant::Bnb(WeightKind::Nf4),
        ExportFormat::Fp4 => HfQuant::Bnb(WeightKind::Fp4),
        ExportFormat::Q8_0 | ExportFormat::Q4K => unreachable!("GGUF formats are written by write_gguf"),
    };
    let side = files::side_files(&base, &config, dtype, Some(&hf::quantization_config(quant, dtype.torch_name())))?;
    let mut notes = side.notes.clone();
    if !side.has_tokenizer {
        notes.push("the source has no tokenizer, so the quantised directory has none".into());
    }
    let per_planned: Vec<Vec<Named>> =
        plan.par_iter().map(|p| planned_tensors(p, &src, &config, quant, dtype)).collect::<Result<_, _>>()?;
    let quantized = plan.iter().filter(|p| matches!(p.from, Values::Weight(n) if n.is_projection())).count();
    let tensors: Vec<&Named> = per_planned.iter().flatten().collect();
    let refs: Vec<(&str, StDtype, &[usize], &[u8])> =
        tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.data.as_slice())).collect();
    let bytes = serialize_with_metadata(&refs, &[("format", "pt")]);
    merge::publish(out, |dir| {
        files::write_synced(&dir.join("model.safetensors"), &bytes)?;
        for (name, contents) in &side.files {
            files::write_synced(&dir.join(name), contents)?;
        }
        Ok(())
    })?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        format,
        tensors: tensors.len(),
        quantized,
        weights_bytes: bytes.len() as u64,
        notes,
    })
}

/// One planned tensor as the output stores it: quantised projections, the
/// rest in the checkpoint's float dtype.
fn planned_tensors(
    p: &Planned,
    src: &WeightSource,
    c: &ModelConfig,
    quant: HfQuant,
    dtype: MergeDtype,
) -> Result<Vec<Named>, ExportError> {
    let n: usize = p.shape.iter().product();
    let cols = *p.shape.last().expect("planned tensors have a shape");
    let rows = n / cols;
    let bad = |reason: String| ExportError::Refused(format!("weight '{}': {reason}", p.hf_name));
    let vals = match p.from {
        Values::Zeros => vec![0f32; n],
        Values::Weight(name) => {
            let w = src.require(name, c).map_err(|e| bad(e.to_string()))?;
            if (w.rows, w.cols) != (rows, cols) {
                return Err(bad(format!("shape [{}, {}] changed since it was checked", w.rows, w.cols)));
            }
            let vals = w.dequantize_natural().map_err(bad)?;
            if name.is_projection() {
                let prefix = p.hf_name.strip_suffix(".weight").unwrap_or(&p.hf_name);
                return hf::projection(quant, prefix, &vals, rows, cols, dtype.torch_name()).map_err(bad);
            }
            vals
        }
    };
    let mut data = vec![0u8; n * dtype.size_bytes()];
    merge::tensors::convert(&vals, cols, dtype, &mut data)
        .map_err(|(row, col, x)| bad(format!("the value {x} at [{row}, {col}] does not fit {dtype}")))?;
    let st = match dtype {
        MergeDtype::F32 => StDtype::F32,
        MergeDtype::Bf16 => StDtype::BF16,
        MergeDtype::F16 => StDtype::F16,
    };
    Ok(vec![Named { name: p.hf_name.clone(), dtype: st, shape: p.shape.clone(), data }])
}
