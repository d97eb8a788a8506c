//! Reading a PEFT LoRA directory (`adapter_config.json` +
//! `adapter_model.safetensors`, FORMATS.md §5) into a [`LoraAdapter`]:
//! every tensor checked against the base model's shapes, the scaling
//! (`alpha / r`, or `alpha / √r` with rsLoRA, after `rank_pattern` /
//! `alpha_pattern`) folded into B. Anything tandem would serve wrongly is
//! refused with a message that says what and why; pickle weights are never
//! opened.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::loader::safetensors::SafetensorsFile;
use crate::model::ModelConfig;

use super::{LoraAdapter, LoraDtype, LoraLayers, LoraMatrix, LoraTarget, LoraValues};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraError {
    /// The path holds no adapter (HTTP 404).
    #[error("no LoRA adapter at '{path}': {reason}")]
    NotFound { path: String, reason: String },
    /// The adapter is there but tandem will not serve it (HTTP 400).
    #[error("LoRA adapter '{path}' cannot be loaded: {reason}")]
    Invalid { path: String, reason: String },
    /// The request may not load from there (HTTP 400).
    #[error("{0}")]
    NotAllowed(String),
}

impl LoraError {
    fn invalid(path: &str, reason: impl Into<String>) -> Self {
        LoraError::Invalid { path: path.to_string(), reason: reason.into() }
    }
}

/// Limits an adapter must meet, and how its weights are stored.
#[derive(Debug, Clone, Copy)]
pub struct LoraOptions {
    pub max_rank: usize,
    pub dtype: LoraDtype,
}

/// The fields of `adapter_config.json` tandem reads; the rest are ignored.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "default_alpha")]
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    target_modules: Option<Value>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    modules_to_save: Option<Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// Modules an adapter may name that tandem refuses with a specific reason.
const EMBEDDING_MODULES: &[&str] = &["embed_tokens", "lm_head", "wte", "embed_in", "embed_out"];

/// Reads and checks the adapter in `dir` against `base`.
pub fn load_peft_dir(
    name: &str,
    dir: &Path,
    base: &ModelConfig,
    limits: LoraOptions,
) -> Result<LoraAdapter, LoraError> {
    let (config, weights) = read_peft_files(dir)?;
    let shown = dir.display().to_string();
    let (layers, base_model) =
        parse_peft(&config, &weights, base, limits).map_err(|r| LoraError::invalid(&shown, r))?;
    Ok(LoraAdapter::new(name.to_string(), shown, layers, base_model))
}

/// Reads the adapter in `dir` as PEFT stores it (unfolded), checked against `base`.
pub fn load_peft_dir_raw(dir: &Path, base: &ModelConfig, max_rank: usize) -> Result<PeftAdapter, LoraError> {
    let (config, weights) = read_peft_files(dir)?;
    parse_peft_raw(&config, &weights, base, max_rank).map_err(|r| LoraError::invalid(&dir.display().to_string(), r))
}

/// The config bytes and the weights file of a PEFT directory.
fn read_peft_files(dir: &Path) -> Result<(Vec<u8>, SafetensorsFile), LoraError> {
    let shown = dir.display().to_string();
    if !dir.is_dir() {
        return Err(LoraError::NotFound { path: shown, reason: "not a directory".into() });
    }
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(LoraError::NotFound { path: shown, reason: format!("it has no {CONFIG_FILE}") });
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        if dir.join("adapter_model.bin").exists() {
            return Err(LoraError::invalid(
                &shown,
                format!(
                    "it has only adapter_model.bin, a pickle file, which tandem never loads (unpickling runs code); \
                     convert it to {WEIGHTS_FILE}"
                ),
            ));
        }
        return Err(LoraError::NotFound { path: shown, reason: format!("it has no {WEIGHTS_FILE}") });
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| LoraError::invalid(&shown, format!("{}: {e}", p.display())));
    let config = read(&cfg_path)?;
    // Read whole (adapters are small): a memory map would fault if the file
    // were replaced while in use.
    let weights = SafetensorsFile::from_bytes(read(&weights_path)?)
        .map_err(|e| LoraError::invalid(&shown, format!("{WEIGHTS_FILE}: {e}")))?;
    Ok((config, weights))
}

/// One adapted projection as PEFT stores it, before serving folds the scaling in.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftMatrix {
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA, after the patterns.
    pub scaling: f32,
    /// `lora_A.weight`, `[rank, in]`.
    pub a: Vec<f32>,
    /// `lora_B.weight`, `[out, rank]`.
    pub b: Vec<f32>,
}

/// A PEFT adapter's config as tandem reads it, and its matrices per layer and target.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub layers: LoraLayers<PeftMatrix>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub base_model: Option<String>,
}

/// Parses a config and its tensors into folded matrices. Errors are the reason only.
pub fn parse_peft(
    config: &[u8],
    weights: &SafetensorsFile,
    base: &ModelConfig,
    limits: LoraOptions,
) -> Result<(LoraLayers<Arc<LoraMatrix>>, Option<String>), String> {
    let raw = parse_peft_raw(config, weights, base, limits.max_rank)?;
    let layers = raw
        .layers
        .into_iter()
        .map(|targets| {
            targets.map(|m| {
                m.map(|m| {
                    let (r, outf) = (m.rank, m.b.len() / m.rank);
                    // bt[j][o] = scaling * B[o][j]
                    let mut bt = vec![0.0f32; r * outf];
                    for o in 0..outf {
                        for j in 0..r {
                            bt[j * outf + o] = m.scaling * m.b[o * r + j];
                        }
                    }
                    Arc::new(LoraMatrix {
                        rank: r,
                        in_features: m.a.len() / r,
                        out_features: outf,
                        a: LoraValues::from_f32(m.a, limits.dtype),
                        bt: LoraValues::from_f32(bt, limits.dtype),
                    })
                })
            })
        })
        .collect();
    Ok((layers, raw.base_model))
}

/// Parses a config and its tensors into PEFT's own matrices (A, B and the
/// scaling, unfolded): what training starts from. Errors are the reason only.
pub fn parse_peft_raw(
    config: &[u8],
    weights: &SafetensorsFile,
    base: &ModelConfig,
    max_rank: usize,
) -> Result<PeftAdapter, String> {
    let cfg: PeftConfig =
        serde_json::from_slice(config).map_err(|e| format!("{CONFIG_FILE} is not a valid PEFT config: {e}"))?;
    check_config(&cfg, base)?;
    // Pair up lora_A and lora_B per (layer, target).
    let mut found: BTreeMap<(usize, LoraTarget), [Option<&str>; 2]> = BTreeMap::new();
    for name in weights.names() {
        let (layer, target, is_b) = parse_key(name, base.num_layers)?;
        let slot = &mut found.entry((layer, target)).or_default()[is_b as usize];
        *slot = Some(name);
    }
    if found.is_empty() {
        return Err(format!("{WEIGHTS_FILE} holds no LoRA weights"));
    }
    let mut layers: LoraLayers<PeftMatrix> = (0..base.num_layers).map(|_| Default::default()).collect();
    for ((layer, target), [a, b]) in found {
        let module = format!("model.layers.{layer}.{}.{}", target.parent(), target.module());
        let (Some(a), Some(b)) = (a, b) else {
            return Err(format!("{module} has lora_A without lora_B or the reverse"));
        };
        let (inf, outf) = target.shape(base);
        let r = pattern_value(&cfg.rank_pattern, &module).unwrap_or(cfg.r);
        let alpha = pattern_value(&cfg.alpha_pattern, &module).unwrap_or(cfg.lora_alpha);
        let a_vals = read_f32(weights, a, r, inf)?;
        let b_vals = read_f32(weights, b, outf, r)?;
        if r == 0 {
            return Err(format!("{module}: rank 0"));
        }
        if r > max_rank {
            return Err(format!("{module} has rank {r}, above this server's max_lora_rank {max_rank}"));
        }
        let scaling = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        if !scaling.is_finite() || !(scaling as f32).is_finite() {
            return Err(format!("{module}: scaling {alpha}/{r} is not finite"));
        }
        let scaling = scaling as f32;
        if a_vals.iter().chain(&b_vals).any(|x| !x.is_finite()) || b_vals.iter().any(|x| !(scaling * x).is_finite()) {
            return Err(format!("{module} has non-finite weights"));
        }
        layers[layer][target.index()] = Some(PeftMatrix { rank: r, scaling, a: a_vals, b: b_vals });
    }
    Ok(PeftAdapter {
        layers,
        r: cfg.r,
        lora_alpha: cfg.lora_alpha,
        use_rslora: cfg.use_rslora,
        base_model: cfg.base_model_name_or_path.clone(),
    })
}

fn check_config(cfg: &PeftConfig, base: &ModelConfig) -> Result<(), String> {
    if let Some(t) = &cfg.peft_type {
        if t != "LORA" {
            return Err(format!("peft_type is {t:?}; only LORA adapters are served"));
        }
    }
    if cfg.use_dora {
        return Err("DoRA adapters (use_dora) are not supported".into());
    }
    if cfg.lora_bias {
        return Err("adapters with a lora_B bias (lora_bias) are not supported".into());
    }
    if cfg.fan_in_fan_out {
        return Err("fan_in_fan_out adapters (GPT-2 Conv1D layout) do not fit the Llama family".into());
    }
    if let Some(b) = cfg.bias.as_deref() {
        if b != "none" {
            return Err(format!("bias = {b:?} trains the base model's biases; only \"none\" is supported"));
        }
    }
    let has_modules_to_save = match &cfg.modules_to_save {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if has_modules_to_save {
        return Err(format!(
            "modules_to_save ({}) replaces whole base modules per adapter, which tandem does not serve",
            cfg.modules_to_save.as_ref().map(|v| v.to_string()).unwrap_or_default()
        ));
    }
    match &cfg.target_modules {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == "all-linear" => Ok(()),
        Some(Value::String(pattern)) => check_target_regex(pattern, base),
        Some(Value::Array(items)) => {
            for item in items {
                let Some(t) = item.as_str() else { return Err(format!("target_modules entry {item} is not a string")) };
                check_target_name(t)?;
            }
            Ok(())
        }
        Some(other) => Err(format!("target_modules {other} is neither a string nor a list")),
    }
}

/// A `target_modules` list entry matches a module whose name equals it or ends with `.entry`.
fn check_target_name(t: &str) -> Result<(), String> {
    let last = t.rsplit('.').next().unwrap_or(t);
    if EMBEDDING_MODULES.contains(&last) {
        return Err(format!(
            "target module {t:?} is an embedding or the LM head; only the attention and MLP projections can be adapted"
        ));
    }
    if LoraTarget::from_module(last).is_none() {
        return Err(format!(
            "target module {t:?} does not exist in the base model (it has {})",
            LoraTarget::ALL.map(|t| t.module()).join(", ")
        ));
    }
    Ok(())
}

/// A string `target_modules` is a regex matched against whole module names.
fn check_target_regex(pattern: &str, base: &ModelConfig) -> Result<(), String> {
    let re = regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("target_modules {pattern:?} is not a valid regex: {e}"))?;
    for m in ["model.embed_tokens", "lm_head"] {
        if re.is_match(m) {
            return Err(format!(
                "target_modules {pattern:?} matches {m}; embeddings and the LM head cannot be adapted"
            ));
        }
    }
    let any = (0..base.num_layers).any(|l| {
        LoraTarget::ALL.iter().any(|t| re.is_match(&format!("model.layers.{l}.{}.{}", t.parent(), t.module())))
    });
    if !any {
        return Err(format!("target_modules {pattern:?} matches no module of the base model"));
    }
    Ok(())
}

/// PEFT's `get_pattern_key`: a pattern key applies to a module whose name is
/// the key or ends with `.key` (keys are regexes).
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        let hit = module == k
            || module.ends_with(&format!(".{k}"))
            || regex::Regex::new(&format!("^(?:.*\\.)?(?:{k})$")).is_ok_and(|re| re.is_match(module));
        hit.then_some(*v)
    })
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`
/// → (layer, target, is_b). Every other key is refused with its reason.
fn parse_key(name: &str, num_layers: usize) -> Result<(usize, LoraTarget, bool), String> {
    let refuse = |why: &str| Err(format!("tensor {name:?}: {why}"));
    if name.contains("lora_embedding") || EMBEDDING_MODULES.iter().any(|m| name.contains(&format!(".{m}."))) {
        return refuse(
            "adapts an embedding or the LM head (or is a modules_to_save copy), which tandem does not serve",
        );
    }
    if name.contains("lora_magnitude_vector") {
        return refuse("is a DoRA magnitude vector; DoRA is not supported");
    }
    let Some(rest) = name.strip_prefix("base_model.model.model.layers.") else {
        return refuse("is not a LoRA weight of a decoder layer");
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let [layer, parent, module, ab, "weight"] = parts.as_slice() else {
        return refuse("is not a `<layer>.<block>.<proj>.lora_A|lora_B.weight` tensor");
    };
    let layer: usize = layer.parse().map_err(|_| format!("tensor {name:?}: bad layer index"))?;
    if layer >= num_layers {
        return refuse(&format!("layer {layer} does not exist (the base model has {num_layers})"));
    }
    let Some(target) = LoraTarget::from_module(module) else {
        return refuse(&format!("module {module:?} does not exist in the base model"));
    };
    if *parent != target.parent() {
        return refuse(&format!("{module} belongs under {}, not {parent}", target.parent()));
    }
    let is_b = match *ab {
        "lora_A" => false,
        "lora_B" => true,
        _ => return refuse("is neither lora_A nor lora_B"),
    };
    Ok((layer, target, is_b))
}

/// A `[rows, cols]` float tensor as f32.
fn read_f32(f: &SafetensorsFile, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
    let t = f.tensor(name).ok_or_else(|| format!("tensor {name:?} has no data"))?;
    if t.shape != [rows, cols] {
        return Err(format!(
            "tensor {name:?} has shape {:?}, expected [{rows}, {cols}] for the base model and the config's rank",
            t.shape
        ));
    }
    t.to_f32().ok_or_else(|| format!("tensor {name:?} has dtype {:?}; LoRA weights must be F32, F16 or BF16", t.dtype))
}
