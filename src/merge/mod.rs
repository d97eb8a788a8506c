//! `tandem merge`: a base model with a PEFT LoRA adapter folded into its
//! weights, written as a standard Hugging Face checkpoint directory
//! (`config.json`, `model.safetensors` under HF names, tokenizer files) that
//! transformers, vLLM and tandem itself load as a plain model.
//!
//! The arithmetic is peft's `merge_and_unload`: for every adapted projection
//! `W' = W + (B·A)·scaling` with `scaling = alpha / r` (`alpha / √r` with
//! rsLoRA, after `rank_pattern` / `alpha_pattern`), computed in f32 from the
//! base's values (quantised GGUF blocks are dequantised first) and rounded once
//! to the output dtype, as peft's in-place add into a 16-bit weight does.
//! Weights come through the same [`WeightSource`] the model loader uses, so GGUF
//! llama Q/K rows are already back in HF order.
//!
//! Every input is checked before anything is written, and the directory is
//! filled under a temporary name beside `out`, synced, and renamed into place:
//! an error or a crash leaves no half-written checkpoint.

pub(crate) mod files;
pub(crate) mod tensors;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::loader::gguf::GgufFile;
use crate::loader::hub::{resolve_model, ModelSource};
use crate::loader::safetensors::SafetensorsModel;
use crate::lora::{load_peft_dir_raw, LoraError, LoraTarget, PeftAdapter, PeftMatrix};
use crate::model::config::RopeScaling;
use crate::model::{Arch, ModelConfig, ModelError, TensorName, WeightSource};
use crate::quant::ggml::WeightKind;

/// The float dtype of the merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    F32,
    Bf16,
    F16,
}

impl MergeDtype {
    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "float32",
            MergeDtype::Bf16 => "bfloat16",
            MergeDtype::F16 => "float16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            MergeDtype::F32 => 4,
            MergeDtype::Bf16 | MergeDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for MergeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(MergeDtype::F32),
            "bf16" | "bfloat16" => Ok(MergeDtype::Bf16),
            "f16" | "float16" => Ok(MergeDtype::F16),
            _ => Err(format!("dtype {s:?}: expected f32, bf16 or f16")),
        }
    }
}

impl std::fmt::Display for MergeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MergeDtype::F32 => "f32",
            MergeDtype::Bf16 => "bf16",
            MergeDtype::F16 => "f16",
        })
    }
}

/// What `merge` may be asked besides the paths.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// `None`: the base's own float dtype when every matrix has the same one,
    /// else (quantised or mixed bases) bf16.
    pub dtype: Option<MergeDtype>,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The inputs cannot be merged as asked (the message says why).
    #[error("{0}")]
    Refused(String),
    #[error("loading the base model '{spec}'")]
    Model {
        spec: String,
        #[source]
        source: ModelError,
    },
    #[error("reading the adapter")]
    Adapter(#[from] LoraError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io { path: path.to_owned(), source }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub out: PathBuf,
    pub dtype: MergeDtype,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Projections the adapter changed.
    pub adapted: usize,
    pub weights_bytes: u64,
    /// Every file of the directory, sorted.
    pub files: Vec<String>,
    /// `base_model_name_or_path` of the adapter's config.
    pub adapter_base: Option<String>,
    /// Things the caller should know (no tokenizer in the source, ...).
    pub notes: Vec<String>,
}

/// The base model as the merge reads it.
pub(crate) enum Base {
    Gguf { file: Arc<GgufFile> },
    Hf { dir: PathBuf, json: serde_json::Value },
}

/// One tensor of the output: its HF name and shape, where its values come
/// from, and the adapter matrix to fold in.
pub(crate) struct Planned<'a> {
    pub hf_name: String,
    /// `[cols]` for vectors, `[rows, cols]` for matrices.
    pub shape: Vec<usize>,
    pub from: Values,
    pub lora: Option<&'a PeftMatrix>,
}

pub(crate) enum Values {
    Weight(TensorName),
    /// A bias the HF class has and the source lacks (it adds nothing).
    Zeros,
}

/// Merges the PEFT adapter in `adapter` into the model `spec` (a `.gguf` file,
/// an HF directory or a hub id) and writes the result to `out`, which must not
/// exist or be an empty directory.
pub fn merge(spec: &str, adapter: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport, MergeError> {
    check_out(out)?;
    let model_err = |source: ModelError| MergeError::Model { spec: spec.to_string(), source };
    if crate::model::random::parse(spec).is_some() {
        return Err(MergeError::Refused(format!("'{spec}' is a generated model with no weights file to merge into")));
    }
    let (base, config, src) = open_base(spec).map_err(model_err)?;
    let peft = load_peft_dir_raw(adapter, &config, usize::MAX)?;
    let plan = plan(&base, &config, &src, Some(&peft))?;
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&plan, &config, &src));
    // Everything the directory needs besides the weights, built before writing.
    let side = files::side_files(&base, &config, dtype, None)?;
    let mut notes = side.notes.clone();
    if !side.has_tokenizer {
        notes.push("the base model has no tokenizer, so the merged directory has none".into());
    }
    let adapted = plan.iter().filter(|p| p.lora.is_some()).count();
    let (weights_bytes, file_names) = publish(out, |dir| {
        let bytes = tensors::write_safetensors(&dir.join("model.safetensors"), &plan, &src, &config, dtype)?;
        let mut names = vec!["model.safetensors".to_string()];
        for (name, contents) in &side.files {
            files::write_synced(&dir.join(name), contents)?;
            names.push(name.clone());
        }
        names.sort();
        Ok((bytes, names))
    })?;
    Ok(MergeReport {
        out: out.to_path_buf(),
        dtype,
        tensors: plan.len(),
        adapted,
        weights_bytes,
        files: file_names,
        adapter_base: peft.base_model.clone(),
        notes,
    })
}

/// `out` must be new or an empty directory.
pub(crate) fn check_out(out: &Path) -> Result<(), MergeError> {
    if out.as_os_str().is_empty() {
        return Err(MergeError::Refused("no output directory given (an empty path)".into()));
    }
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(out)(e)),
        Ok(m) if m.is_dir() => {
            let mut entries = std::fs::read_dir(out).map_err(io_err(out))?;
            if entries.next().is_some() {
                return Err(MergeError::Refused(format!(
                    "output directory {} exists and is not empty; choose a new directory (nothing is overwritten)",
                    out.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(MergeError::Refused(format!("output {} exists and is not a directory", out.display()))),
    }
}

/// The base's file(s), config and weights.
pub(crate) fn open_base(spec: &str) -> Result<(Base, ModelConfig, WeightSource), ModelError> {
    match resolve_model(spec)? {
        ModelSource::Gguf(path) => {
            let file = Arc::new(GgufFile::open(&path)?);
            let config = ModelConfig::from_gguf(&file)?;
            Ok((Base::Gguf { file: file.clone() }, config, WeightSource::Gguf(file)))
        }
        ModelSource::HfDir(dir) => {
            let cfg_path = dir.join("config.json");
            let bad = |reason: String| ModelError::File { path: cfg_path.display().to_string(), reason };
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| bad(e.to_string()))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let config = ModelConfig::from_hf_json(&json)?;
            let st = Arc::new(SafetensorsModel::open_dir(&dir)?);
            // A GPTQ / AWQ / bitsandbytes base reads as the loader reads it:
            // its projections dequantised, act-order put back.
            let src = match crate::model::hf_quantization(&dir, &json)? {
                Some(q) => WeightSource::QuantizedSafetensors(st, q),
                None => WeightSource::Safetensors(st),
            };
            Ok((Base::Hf { dir, json }, config, src))
        }
    }
}

/// The output's tensors in HF order, each checked against the config, with
/// the adapter's matrices attached; refuses a base tandem would not
/// reproduce faithfully (tensors it does not model, rope it cannot write).
pub(crate) fn plan<'a>(
    base: &Base,
    c: &ModelConfig,
    src: &WeightSource,
    peft: Option<&'a PeftAdapter>,
) -> Result<Vec<Planned<'a>>, MergeError> {
    if let (Base::Gguf { .. }, RopeScaling::FreqFactors(_)) = (base, &c.rope_scaling) {
        return Err(MergeError::Refused(
            "this GGUF scales rope by per-frequency factors (rope_freqs.weight, Llama 3.1 style); the original \
             rope_scaling parameters are not in the file, so no faithful config.json can be written: merge into \
             the HF checkpoint of this model instead"
                .into(),
        ));
    }
    let (h, ff, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
    let w = |name: TensorName, shape: Vec<usize>, lora: Option<&'a PeftMatrix>| Planned {
        hf_name: name.hf(),
        shape,
        from: Values::Weight(name),
        lora,
    };
    let zeros = |hf_name: String, n: usize| Planned { hf_name, shape: vec![n], from: Values::Zeros, lora: None };
    let mut out: Vec<Planned<'a>> = vec![w(TensorName::Embed, vec![c.vocab_size, h], None)];
    for i in 0..c.num_layers {
        let lora = |t: LoraTarget| peft.and_then(|p| p.layers[i][t.index()].as_ref());
        out.push(w(TensorName::AttnNorm(i), vec![h], None));
        out.push(w(TensorName::Q(i), vec![qd, h], lora(LoraTarget::Q)));
        out.push(w(TensorName::K(i), vec![kvd, h], lora(LoraTarget::K)));
        out.push(w(TensorName::V(i), vec![kvd, h], lora(LoraTarget::V)));
        // The HF class decides which biases exist: Qwen2 always has q/k/v
        // biases, Llama with attention_bias has o_proj's too; a bias the
        // source lacks is written as zeros (it adds nothing, as in tandem).
        for (name, n) in [(TensorName::QBias(i), qd), (TensorName::KBias(i), kvd), (TensorName::VBias(i), kvd)] {
            if c.qkv_bias {
                out.push(w(name, vec![n], None));
            } else if c.arch == Arch::Qwen2 {
                out.push(zeros(name.hf(), n));
            }
        }
        out.push(w(TensorName::O(i), vec![h, qd], lora(LoraTarget::O)));
        if c.arch != Arch::Qwen2 && c.qkv_bias {
            out.push(zeros(format!("model.layers.{i}.self_attn.o_proj.bias"), h));
        }
        out.push(w(TensorName::FfnNorm(i), vec![h], None));
        out.push(w(TensorName::Gate(i), vec![ff, h], lora(LoraTarget::Gate)));
        out.push(w(TensorName::Up(i), vec![ff, h], lora(LoraTarget::Up)));
        out.push(w(TensorName::Down(i), vec![h, ff], lora(LoraTarget::Down)));
    }
    out.push(w(TensorName::FinalNorm, vec![h], None));
    if !c.tie_word_embeddings {
        // tandem falls back to the embedding when an untied file has no head; write what it computes.
        let from = if src.get(TensorName::LmHead, c).map_err(weight_err)?.is_some() {
            TensorName::LmHead
        } else {
            TensorName::Embed
        };
        out.push(Planned {
            hf_name: TensorName::LmHead.hf(),
            shape: vec![c.vocab_size, h],
            from: Values::Weight(from),
            lora: None,
        });
    }
    for p in &out {
        if let Values::Weight(name) = p.from {
            let w = src.require(name, c).map_err(weight_err)?;
            let want = match p.shape.as_slice() {
                [n] => (1, *n),
                [r, n] => (*r, *n),
                _ => unreachable!("planned tensors are vectors or matrices"),
            };
            if (w.rows, w.cols) != want {
                return Err(MergeError::Refused(format!(
                    "base weight '{}' has shape [{}, {}], expected [{}, {}] from its config",
                    w.name, w.rows, w.cols, want.0, want.1
                )));
            }
        }
    }
    check_nothing_dropped(base, c, src, &out)?;
    Ok(out)
}

fn weight_err(e: crate::model::weights::WeightError) -> MergeError {
    MergeError::Refused(format!("base model: {e}"))
}

/// Every tensor of the source must be written (or be one tandem knows to
/// skip): a merge never silently drops part of a model.
fn check_nothing_dropped(base: &Base, c: &ModelConfig, src: &WeightSource, plan: &[Planned]) -> Result<(), MergeError> {
    // Only tensors read from the source count: a zero bias stands in for one
    // the source lacks, never for one it has.
    let written: std::collections::HashSet<String> = plan
        .iter()
        .filter_map(|p| match (&p.from, base) {
            (Values::Weight(n), Base::Gguf { .. }) => Some(n.gguf()),
            (Values::Weight(n), Base::Hf { .. }) => Some(n.hf()),
            (Values::Zeros, _) => None,
        })
        .collect();
    let names: Vec<String> = match (base, src) {
        (Base::Gguf { file, .. }, _) => file.tensors.iter().map(|t| t.name.clone()).collect(),
        (Base::Hf { .. }, WeightSource::Safetensors(m)) => m.names().into_iter().map(str::to_string).collect(),
        // Each packed tensor counts as the weight it stands for.
        (Base::Hf { .. }, WeightSource::QuantizedSafetensors(m, _)) => {
            m.names().into_iter().map(quantized_part_of).collect()
        }
        _ => Vec::new(),
    };
    let skippable = |n: &str| {
        n.ends_with("rotary_emb.inv_freq") || (c.tie_word_embeddings && (n == "lm_head.weight" || n == "output.weight"))
    };
    let dropped: Vec<&String> = names.iter().filter(|n| !written.contains(*n) && !skippable(n)).collect();
    if let Some(first) = dropped.first() {
        return Err(MergeError::Refused(format!(
            "the base model has {} tensor(s) tandem does not model (first: '{first}'); a merged checkpoint \
             without them would not be this model",
            dropped.len()
        )));
    }
    Ok(())
}

/// The weight a quantised checkpoint's tensor is part of: GPTQ/AWQ's
/// `{p}.qweight|qzeros|scales|g_idx` and bitsandbytes' `{p}.weight.absmax`
/// (and its other `weight.*` state) are all `{p}.weight`.
fn quantized_part_of(name: &str) -> String {
    if let Some(i) = name.find(".weight.") {
        return name[..i + ".weight".len()].to_string();
    }
    for suffix in [".qweight", ".qzeros", ".scales", ".g_idx"] {
        if let Some(prefix) = name.strip_suffix(suffix) {
            return format!("{prefix}.weight");
        }
    }
    name.to_string()
}

/// The base's float dtype when all its matrices share one, else bf16.
pub(crate) fn default_dtype(plan: &[Planned], c: &ModelConfig, src: &WeightSource) -> MergeDtype {
    let mut kinds = plan.iter().filter(|p| p.shape.len() == 2).filter_map(|p| match p.from {
        Values::Weight(n) => src.get(n, c).ok().flatten().map(|w| w.kind),
        Values::Zeros => None,
    });
    let first = kinds.next();
    if kinds.any(|k| Some(k) != first) {
        return MergeDtype::Bf16;
    }
    match first {
        Some(WeightKind::F32) => MergeDtype::F32,
        Some(WeightKind::F16) => MergeDtype::F16,
        _ => MergeDtype::Bf16,
    }
}

/// Fills a fresh temporary directory beside `out` with `fill`, syncs it and
/// renames it to `out`; on any error the temporary directory is removed.
pub(crate) fn publish<R>(out: &Path, fill: impl FnOnce(&Path) -> Result<R, MergeError>) -> Result<R, MergeError> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let leaf = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "merged".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = parent.join(format!(".{leaf}.merging-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
    }
    let mut guard = Cleanup(&tmp, false);
    let r = fill(&tmp)?;
    files::sync_dir(&tmp)?;
    // An empty directory at `out` (checked at the start) is replaced; one that
    // gained files meanwhile makes remove_dir fail, and nothing is lost.
    if out.is_dir() {
        std::fs::remove_dir(out)
            .map_err(|e| MergeError::Refused(format!("output directory {} is no longer empty: {e}", out.display())))?;
    }
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    guard.1 = true;
    files::sync_dir(&parent)?;
    Ok(r)
}
