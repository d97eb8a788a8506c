//! Model architectures, written once against [`crate::backend::Backend`], and
//! loading a model (weights, config, tokenizer) from a GGUF file or HF directory.

pub mod backward;
pub mod config;
pub mod layer;
pub mod llama;
pub mod lora;
pub mod random;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backend, SeqAttention};
use crate::loader::gguf::GgufFile;
use crate::loader::hub::{resolve_model, ModelSource};
use crate::loader::safetensors::SafetensorsModel;
use crate::quant::ggml::WeightKind;
use crate::quant::on_load::QuantizeTarget;
use crate::tokenizer::{GgufVocab, Tokenizer};

pub use backward::{layer_grads_bytes, LayerGrads, LoraGradHook};
pub use config::{Arch, ModelConfig};
pub use layer::{
    derived_activations_bytes, layer_activations_bytes, layer_saved_bytes, DerivedActivations, LayerActivations,
    LoraHook, NoLora,
};
pub use llama::{describe_stored, LlamaModel};
pub use lora::{DeviceAdapter, LoraStep};
pub use weights::{TensorName, WeightSource};

/// What one forward step computes: a flattened varlen batch of new tokens from
/// one or more sequences (the step context passed explicitly through the model).
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    pub token_ids: &'a [u32],
    pub positions: &'a [u32],
    /// Cache slot each token's K/V is written to.
    pub slot_mapping: &'a [u32],
    pub seqs: Vec<SeqAttention<'a>>,
    /// Rows that need logits, in output order.
    pub logits_rows: &'a [usize],
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Resolve(#[from] crate::loader::hub::HubError),
    #[error("reading GGUF")]
    Gguf(#[from] crate::loader::gguf::GgufError),
    #[error("reading safetensors")]
    Safetensors(#[from] crate::loader::safetensors::SafetensorsError),
    #[error("model config")]
    Config(#[from] config::ConfigError),
    #[error("loading weights")]
    Load(#[from] llama::LoadError),
    #[error("tokenizer")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// A loaded model: the network on a backend, plus its tokenizer when it has one.
pub struct LoadedModel<B: Backend> {
    pub model: LlamaModel<B>,
    pub tokenizer: Option<Tokenizer>,
    /// Where it came from, for display.
    pub source: String,
    /// A quantised HF checkpoint's format (`HfQuant::describe`); GGUF kinds show in `model.stored`.
    pub quantization: Option<String>,
}

impl<B: Backend> LoadedModel<B> {
    /// How the weights are stored, for `/v1/models` and `/metrics`: the
    /// checkpoint's quantisation (or `--quantize`), else the quantised kinds
    /// present (a GGUF), else "none"; and the bytes of every weight as stored.
    pub fn weights_info(&self) -> WeightsInfo {
        let bytes = self.model.stored.iter().map(|s| s.2).sum();
        let quantized: Vec<String> = self
            .model
            .stored
            .iter()
            .filter(|s| !matches!(s.0, WeightKind::F32 | WeightKind::F16 | WeightKind::BF16))
            .map(|s| format!("{:?}", s.0))
            .collect();
        let quantization = match (&self.quantization, quantized.is_empty()) {
            (Some(q), _) => q.clone(),
            (None, true) => "none".to_string(),
            (None, false) => format!("gguf {}", quantized.join("+")),
        };
        WeightsInfo { quantization, bytes }
    }
}

/// What [`LoadedModel::weights_info`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsInfo {
    pub quantization: String,
    pub bytes: usize,
}

/// Loads a model from a spec: a `.gguf` file, an HF directory, or a hub id.
pub fn load_model<B: Backend>(be: &B, spec: &str) -> Result<LoadedModel<B>, ModelError> {
    load_model_quantized(be, spec, QuantizeTarget::None)
}

/// [`load_model`], quantising an unquantised model's projections to `quantize`
/// as they load (`--quantize`).
pub fn load_model_quantized<B: Backend>(
    be: &B,
    spec: &str,
    quantize: QuantizeTarget,
) -> Result<LoadedModel<B>, ModelError> {
    let mut loaded = if let Some(r) = random::parse(spec) {
        let r = r.map_err(|reason| ModelError::File { path: spec.into(), reason })?;
        let config = r.config.clone();
        let src = requantized(WeightSource::Random(Box::new(r)), quantize);
        let model = LlamaModel::load(be, &src, config)?;
        LoadedModel { model, tokenizer: None, source: spec.to_string(), quantization: None }
    } else {
        match resolve_model(spec)? {
            ModelSource::Gguf(path) => load_gguf_with(be, &path, quantize)?,
            ModelSource::HfDir(dir) => load_hf_dir_with(be, &dir, quantize)?,
        }
    };
    if quantize != QuantizeTarget::None {
        loaded.quantization = Some(format!("--quantize {quantize}"));
    }
    Ok(loaded)
}

fn requantized(src: WeightSource, quantize: QuantizeTarget) -> WeightSource {
    match quantize {
        QuantizeTarget::None => src,
        q => WeightSource::Requantized(Box::new(src), q),
    }
}

pub fn load_gguf<B: Backend>(be: &B, path: &Path) -> Result<LoadedModel<B>, ModelError> {
    load_gguf_with(be, path, QuantizeTarget::None)
}

fn load_gguf_with<B: Backend>(be: &B, path: &Path, quantize: QuantizeTarget) -> Result<LoadedModel<B>, ModelError> {
    let file = Arc::new(GgufFile::open(path)?);
    let config = ModelConfig::from_gguf(&file)?;
    // A GGUF without tokenizer metadata (test fixtures) still loads; text I/O then fails.
    let tokenizer = if file.get("tokenizer.ggml.tokens").is_some() {
        Some(Tokenizer::from_gguf_vocab(&GgufVocab::from_gguf(&file)?)?)
    } else {
        None
    };
    let src = requantized(WeightSource::Gguf(file), quantize);
    let model = LlamaModel::load(be, &src, config)?;
    Ok(LoadedModel { model, tokenizer, source: path.display().to_string(), quantization: None })
}

pub fn load_hf_dir<B: Backend>(be: &B, dir: &Path) -> Result<LoadedModel<B>, ModelError> {
    load_hf_dir_with(be, dir, QuantizeTarget::None)
}

fn load_hf_dir_with<B: Backend>(be: &B, dir: &Path, quantize: QuantizeTarget) -> Result<LoadedModel<B>, ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| ModelError::File { path: cfg_path.display().to_string(), reason: e.to_string() })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::File { path: cfg_path.display().to_string(), reason: e.to_string() })?;
    let config = ModelConfig::from_hf_json(&json)?;
    let quant = hf_quantization(dir, &json)?;
    let tokenizer = if dir.join("tokenizer.json").exists() { Some(Tokenizer::from_hf_dir(dir)?) } else { None };
    let st = Arc::new(SafetensorsModel::open_dir(dir)?);
    let quantization = quant.as_ref().map(|q| q.describe());
    let src = match quant {
        Some(q) => WeightSource::QuantizedSafetensors(st, q),
        None => WeightSource::Safetensors(st),
    };
    let src = requantized(src, quantize);
    let model = LlamaModel::load(be, &src, config)?;
    Ok(LoadedModel { model, tokenizer, source: dir.display().to_string(), quantization })
}

/// The checkpoint's quantisation: `quantization_config` in config.json, else
/// AutoGPTQ's `quantize_config.json` or AutoAWQ's `quant_config.json`.
pub fn hf_quantization(
    dir: &Path,
    config_json: &serde_json::Value,
) -> Result<Option<crate::quant::hf_config::HfQuant>, ModelError> {
    let bad = |path: &Path, reason: String| ModelError::File { path: path.display().to_string(), reason };
    if let Some(q) = config_json.get("quantization_config").filter(|v| !v.is_null()) {
        let path = dir.join("config.json");
        return crate::quant::hf_config::parse(q).map(Some).map_err(|e| bad(&path, e.to_string()));
    }
    for file in ["quantize_config.json", "quant_config.json"] {
        let path = dir.join(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))?;
            return crate::quant::hf_config::parse(&v).map(Some).map_err(|e| bad(&path, e.to_string()));
        }
    }
    Ok(None)
}
