//! The files of a merged checkpoint besides the weights: `config.json` (the
//! source's with the new dtype, or written from GGUF metadata), and the
//! tokenizer and generation files (copied from an HF source; rebuilt from a
//! GGUF vocabulary as tandem's loader builds it).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::loader::gguf::GgufFile;
use crate::model::{Arch, ModelConfig};
use crate::tokenizer::{GgufVocab, Tokenizer};

use super::{io_err, Base, MergeDtype, MergeError};

/// Files an HF source keeps beside its weights that a merged checkpoint keeps
/// too (config.json is rewritten, weights and their index are not copied).
const COPIED: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
];

/// Name and contents of every file but the weights.
pub(crate) struct SideFiles {
    pub files: Vec<(String, Vec<u8>)>,
    pub has_tokenizer: bool,
    pub notes: Vec<String>,
}

/// `quantization`: the `quantization_config` of quantised weights, or `None`
/// for plain floats (a source's own quantization_config is then dropped).
pub(crate) fn side_files(
    base: &Base,
    c: &ModelConfig,
    dtype: MergeDtype,
    quantization: Option<&Value>,
) -> Result<SideFiles, MergeError> {
    let mut side = match base {
        Base::Hf { dir, json } => hf_side_files(dir, json, dtype, quantization.is_some())?,
        Base::Gguf { file, .. } => gguf_side_files(file, c, dtype)?,
    };
    if let Some(q) = quantization {
        let (_, config) =
            side.files.iter_mut().find(|(n, _)| n == "config.json").expect("config.json is always written");
        let mut json: Value = serde_json::from_slice(config).expect("config.json was written as JSON");
        json["quantization_config"] = q.clone();
        *config = pretty(&json);
    }
    Ok(side)
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec_pretty(v).expect("JSON serialises");
    b.push(b'\n');
    b
}

fn hf_side_files(dir: &Path, json: &Value, dtype: MergeDtype, requantized: bool) -> Result<SideFiles, MergeError> {
    let mut config = json.clone();
    let mut notes = Vec::new();
    if let Some(obj) = config.as_object_mut() {
        // transformers 5 writes `dtype`, older versions `torch_dtype`; keep whichever the source has.
        let mut set = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), Value::String(dtype.torch_name().into()));
                set = true;
            }
        }
        if !set {
            obj.insert("torch_dtype".into(), Value::String(dtype.torch_name().into()));
        }
        if obj.remove("quantization_config").is_some() && !requantized {
            notes.push("dropped quantization_config from config.json: the merged weights are plain floats".into());
        }
    }
    let mut files = vec![("config.json".to_string(), pretty(&config))];
    for name in COPIED {
        let p = dir.join(name);
        if p.is_file() {
            files.push((name.to_string(), std::fs::read(&p).map_err(io_err(&p))?));
        }
    }
    let has_tokenizer = ["tokenizer.json", "tokenizer.model", "vocab.json"].iter().any(|f| dir.join(f).is_file());
    Ok(SideFiles { files, has_tokenizer, notes })
}

/// A float as JSON the way Python would print the f32 (1e-06, not 9.99999997e-07).
fn num(x: f32) -> Value {
    x.to_string().parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number).unwrap_or(Value::Null)
}

/// One id, or a list when there are several (as HF configs write them).
fn id_or_list(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// `config.json` for a model read from GGUF metadata, in the classic layout
/// (`rope_theta`, `torch_dtype`) every transformers version reads.
pub(super) fn gguf_config(c: &ModelConfig, dtype: MergeDtype) -> Value {
    let (class, model_type) = match c.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Mistral => ("MistralForCausalLM", "mistral"),
    };
    let mut m = Map::new();
    m.insert("architectures".into(), json!([class]));
    m.insert("model_type".into(), json!(model_type));
    m.insert("vocab_size".into(), json!(c.vocab_size));
    m.insert("hidden_size".into(), json!(c.hidden_size));
    m.insert("intermediate_size".into(), json!(c.intermediate_size));
    m.insert("num_hidden_layers".into(), json!(c.num_layers));
    m.insert("num_attention_heads".into(), json!(c.num_heads));
    m.insert("num_key_value_heads".into(), json!(c.num_kv_heads));
    m.insert("head_dim".into(), json!(c.head_dim));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("max_position_embeddings".into(), json!(c.max_position));
    m.insert("rms_norm_eps".into(), num(c.rms_norm_eps));
    m.insert("rope_theta".into(), num(c.rope_theta));
    m.insert("rope_scaling".into(), Value::Null);
    m.insert("tie_word_embeddings".into(), json!(c.tie_word_embeddings));
    match c.arch {
        Arch::Qwen2 => {
            m.insert("use_sliding_window".into(), json!(false));
            m.insert("sliding_window".into(), Value::Null);
            m.insert("max_window_layers".into(), json!(c.num_layers));
        }
        Arch::Llama | Arch::Mistral => {
            m.insert("attention_bias".into(), json!(c.qkv_bias));
            m.insert("mlp_bias".into(), json!(false));
        }
    }
    m.insert("attention_dropout".into(), json!(0.0));
    m.insert("initializer_range".into(), json!(0.02));
    m.insert("bos_token_id".into(), c.bos_token_id.map_or(Value::Null, |b| json!(b)));
    m.insert("eos_token_id".into(), id_or_list(&c.eos_token_ids));
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    m.insert("use_cache".into(), json!(true));
    Value::Object(m)
}

fn gguf_side_files(file: &GgufFile, c: &ModelConfig, dtype: MergeDtype) -> Result<SideFiles, MergeError> {
    let mut files = vec![("config.json".to_string(), pretty(&gguf_config(c, dtype)))];
    let mut generation = Map::new();
    generation.insert("bos_token_id".into(), c.bos_token_id.map_or(Value::Null, |b| json!(b)));
    generation.insert("eos_token_id".into(), id_or_list(&c.eos_token_ids));
    let has_tokenizer = file.get("tokenizer.ggml.tokens").is_some();
    if has_tokenizer {
        let bad = |e: crate::tokenizer::TokenizerError| {
            MergeError::Refused(format!("the GGUF's tokenizer cannot be rebuilt as tokenizer.json: {e}"))
        };
        let vocab = GgufVocab::from_gguf(file).map_err(bad)?;
        let tok = Tokenizer::from_gguf_vocab(&vocab).map_err(bad)?;
        let json = tok.inner().to_string(true).map_err(|e| bad(e.into()))?;
        files.push(("tokenizer.json".into(), json.into_bytes()));
        let text = |id: Option<u32>| id.and_then(|id| vocab.tokens.get(id as usize)).map_or(Value::Null, |t| json!(t));
        let mut tc = Map::new();
        tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        tc.insert("bos_token".into(), text(vocab.bos_id));
        tc.insert("eos_token".into(), text(vocab.eos_id));
        tc.insert("pad_token".into(), text(vocab.pad_id));
        tc.insert("unk_token".into(), text(vocab.unk_id));
        tc.insert("clean_up_tokenization_spaces".into(), json!(false));
        tc.insert("model_max_length".into(), json!(c.max_position));
        if let Some(t) = &vocab.chat_template {
            tc.insert("chat_template".into(), json!(t));
        }
        files.push(("tokenizer_config.json".into(), pretty(&Value::Object(tc))));
        // Every id that ends generation in tandem (eos, eot, end-of-turn controls), eos first.
        generation.insert("eos_token_id".into(), id_or_list(&tok.eos_token_ids()));
        if let Some(p) = vocab.pad_id {
            generation.insert("pad_token_id".into(), json!(p));
        }
    }
    files.push(("generation_config.json".into(), pretty(&Value::Object(generation))));
    Ok(SideFiles { files, has_tokenizer, notes: Vec::new() })
}

/// Writes `bytes` to `path` and syncs it (the directory is published whole later).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), MergeError> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Syncs a directory's entries (a rename into it is durable once it is synced).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), MergeError> {
    match std::fs::File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(e) => Err(io_err(dir)(e)),
    }
}
