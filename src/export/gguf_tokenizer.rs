//! An HF tokenizer (tokenizer.json and the files beside it) as GGUF tokenizer
//! metadata, laid out as llama.cpp's `convert_hf_to_gguf.py` lays out a
//! byte-level BPE (`_set_vocab_gpt2`): `tokenizer.ggml.model = "gpt2"`, the
//! `tokenizer.ggml.pre` name of its pre-tokenizer, every id's token in id
//! order (ids the tokenizer lacks below the model's vocab size as `[PAD<id>]`,
//! UNUSED), token types (NORMAL; added tokens CONTROL when special or looking
//! special, else USER_DEFINED), the merges as "left right", the special ids,
//! the add-BOS/EOS flags and the chat template.
//!
//! Only what tandem's own GGUF tokenizer ([`GgufVocab`]) rebuilds exactly is
//! written; anything else is refused, naming what GGUF cannot carry:
//!
//! - the pre-tokenizer name is the one under which tandem's GGUF reader builds
//!   the same normaliser and pre-tokenizer as tokenizer.json's (compared as
//!   `tokenizers` serialises them), not a guess from the model family;
//! - with `ignore_merges` (GGUF has no such flag), the text of every
//!   vocabulary token must encode alike without it;
//! - the post-processor may only add one special token before and/or after;
//! - and before anything is written, the rebuilt tokenizer must encode and
//!   decode a set of probe texts (whitespace, digits, contractions, several
//!   scripts, every added token, the rendered chat template) to the same ids
//!   and text as tokenizer.json does.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::loader::gguf::GgufValue;
use crate::model::Arch;
use crate::tokenizer::{GgufVocab, Tokenizer, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};

use super::ExportError;

const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNUSED: i32 = 5;

/// The `tokenizer.ggml.pre` names `convert_hf_to_gguf.py` writes for the
/// byte-level splits tandem's GGUF reader knows, tried in this order.
const PRE_NAMES: &[&str] = &["gpt-2", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"];

/// The tokenizer of a `.gguf` written from an HF directory.
pub(super) struct GgufTokenizer {
    pub vocab: GgufVocab,
    /// Keys besides those of [`GgufVocab`]: named chat templates, `add_space_prefix`.
    pub extra: Vec<(String, GgufValue)>,
    /// What the caller should know (ids that end generation the file cannot hold).
    pub notes: Vec<String>,
}

fn refuse(msg: impl std::fmt::Display) -> ExportError {
    ExportError::Refused(format!("cannot write the tokenizer as GGUF metadata: {msg}"))
}

fn read_json(path: &Path) -> Result<Option<Json>, ExportError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(super::io_err(path)(e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| refuse(format!("{}: {e}", path.display())))
}

/// One entry of tokenizer.json's `added_tokens`.
struct Added {
    id: u32,
    content: String,
    special: bool,
}

/// Reads the tokenizer of the HF directory `dir` (whose config.json is
/// `config_json`) as GGUF metadata for a model of `arch` with `vocab_size`
/// embedding rows, checked as the module documentation says.
pub(super) fn from_hf_dir(
    dir: &Path,
    config_json: &Json,
    arch: Arch,
    vocab_size: usize,
) -> Result<GgufTokenizer, ExportError> {
    let path = dir.join("tokenizer.json");
    let tj = read_json(&path)?.ok_or_else(|| {
        refuse(format!(
            "{} has no tokenizer.json (a .gguf carries its tokenizer; tandem converts only tokenizer.json, \
             not a SentencePiece tokenizer.model)",
            dir.display()
        ))
    })?;
    let model =
        tj.get("model").filter(|m| m.is_object()).ok_or_else(|| refuse("tokenizer.json has no \"model\" object"))?;
    check_bpe_model(model)?;
    let vocab = model_vocab(model)?;
    let merges = model_merges(model)?;
    let added = added_tokens(&tj)?;

    // Every id below the model's vocab size, in id order (convert_hf_to_gguf's get_vocab_base).
    let mut by_id: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    for (id, token) in &vocab {
        let slot = by_id
            .get_mut(*id as usize)
            .ok_or_else(|| refuse(format!("token {token:?} has id {id}, past the model's vocab_size {vocab_size}")))?;
        *slot = Some((token.clone(), TOKEN_TYPE_NORMAL));
    }
    let vocab_ids: HashMap<&str, u32> = vocab.iter().map(|(id, t)| (t.as_str(), *id)).collect();
    for a in &added {
        if let Some(&other) = vocab_ids.get(a.content.as_str()) {
            if other != a.id {
                return Err(refuse(format!(
                    "added token {:?} has id {} but the vocabulary gives it {other}",
                    a.content, a.id
                )));
            }
        }
        let slot = by_id.get_mut(a.id as usize).ok_or_else(|| {
            refuse(format!("added token {:?} has id {}, past the model's vocab_size {vocab_size}", a.content, a.id))
        })?;
        if let Some((t, _)) = slot.as_ref().filter(|(t, _)| *t != a.content) {
            return Err(refuse(format!("id {} is both {t:?} (vocabulary) and {:?} (added token)", a.id, a.content)));
        }
        let ty = if a.special || looks_special(&a.content) { TOKEN_TYPE_CONTROL } else { TOKEN_TYPE_USER_DEFINED };
        *slot = Some((a.content.clone(), ty));
    }
    let (tokens, token_types): (Vec<String>, Vec<i32>) = by_id
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_TYPE_UNUSED)))
        .unzip();

    let pre = pre_name(&tj)?;
    check_decoder(&tj)?;
    let (lead, trail) = post_processor_specials(&tj)?;

    let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
    // convert_hf_to_gguf's SpecialVocab: tokenizer_config.json's token text
    // looked up among the added tokens, else config.json's integer id; then
    // generation_config.json.
    let special = |text_key: &str, id_key: &str| -> Option<u32> {
        let text = match tc.get(text_key) {
            Some(Json::String(s)) => Some(s.as_str()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str),
            _ => None,
        };
        text.and_then(|t| added.iter().find(|a| a.content == t).map(|a| a.id))
            .or_else(|| config_json.get(id_key).and_then(Json::as_u64).and_then(|v| u32::try_from(v).ok()))
            .or_else(|| match generation.get(id_key) {
                Some(Json::Array(a)) => a.first().and_then(Json::as_u64).and_then(|v| u32::try_from(v).ok()),
                Some(v) => v.as_u64().and_then(|v| u32::try_from(v).ok()),
                None => None,
            })
    };
    let mut bos_id = special("bos_token", "bos_token_id");
    let mut eos_id = special("eos_token", "eos_token_id");
    let mut pad_id = special("pad_token", "pad_token_id");
    let mut unk_id = special("unk_token", "unk_token_id");
    // What tokenizer.json's post-processor adds is what tandem's HF tokenizer
    // adds (transformers 5 ignores tokenizer_config.json's add_bos_token).
    for (what, added_id, id) in [("before", lead, &mut bos_id), ("after", trail, &mut eos_id)] {
        match (added_id, *id) {
            (Some(a), Some(b)) if a != b => {
                return Err(refuse(format!(
                    "tokenizer.json adds token {a} {what} every text, but the model's {} token is {b}; GGUF can only \
                     add the bos/eos token itself",
                    if what == "before" { "bos" } else { "eos" }
                )))
            }
            (Some(a), _) => *id = Some(a),
            _ => {}
        }
    }
    let mut notes = Vec::new();
    let is_added = |id: u32| added.iter().any(|a| a.id == id);
    for (name, id) in [("bos", &mut bos_id), ("eos", &mut eos_id), ("pad", &mut pad_id), ("unk", &mut unk_id)] {
        let Some(i) = *id else { continue };
        if i as usize >= vocab_size {
            return Err(refuse(format!("the {name} token id {i} is past the model's vocab_size {vocab_size}")));
        }
        // tandem's GGUF tokenizer (as transformers') makes the bos/eos/pad/unk
        // tokens special: one that tokenizer.json merges like any text would
        // then split differently.
        if !is_added(i) {
            if name == "bos" || name == "eos" {
                return Err(refuse(format!(
                    "the {name} token ({i}, {:?}) is not an added token of tokenizer.json; from GGUF metadata it \
                     would become a special token and text containing it would split differently",
                    tokens[i as usize]
                )));
            }
            notes.push(format!("the {name} token id {i} is an ordinary token of tokenizer.json: not written"));
            *id = None;
        }
    }

    let hf_tok = Tokenizer::from_hf_dir(dir).map_err(|e| refuse(format!("tokenizer.json does not load: {e}")))?;
    let meta = crate::tokenizer::hf_files::HfMeta::read(dir, hf_tok.inner())
        .map_err(|e| refuse(format!("the tokenizer's side files do not load: {e}")))?;
    let mut extra = named_chat_templates(dir, &tc)?;
    if arch != Arch::Qwen2 {
        // convert_hf_to_gguf's LlamaModel.set_vocab.
        if let Some(b) = tc.get("add_prefix_space").and_then(Json::as_bool) {
            extra.push(("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(b)));
        }
    }
    let add_space_prefix =
        extra.iter().find(|(k, _)| k == "tokenizer.ggml.add_space_prefix").and_then(|(_, v)| v.as_bool());
    let gv = GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.to_string()),
        tokens,
        token_types,
        scores: Vec::new(),
        merges,
        bos_id,
        eos_id,
        pad_id,
        unk_id,
        add_bos: lead.is_some(),
        add_eos: trail.is_some(),
        chat_template: meta.chat_template.clone(),
        eot_id: None,
        eom_id: None,
        add_space_prefix,
    };
    let gguf_tok =
        Tokenizer::from_gguf_vocab(&gv).map_err(|e| refuse(format!("tandem's GGUF reader cannot rebuild it: {e}")))?;
    if model.get("ignore_merges").and_then(Json::as_bool) == Some(true) {
        check_ignore_merges(&vocab, &added, &hf_tok, &gguf_tok)?;
    }
    compare_probes(&hf_tok, &gguf_tok, &added)?;
    let hf_eos = hf_tok.eos_token_ids();
    let gguf_eos = gguf_tok.eos_token_ids();
    let lost: Vec<u32> = hf_eos.iter().copied().filter(|id| !gguf_eos.contains(id)).collect();
    if !lost.is_empty() {
        notes.push(format!(
            "generation from the .gguf does not stop on ids {lost:?}, which the HF files list as end of \
             generation (GGUF holds one eos id; it stops on {gguf_eos:?})"
        ));
    }
    Ok(GgufTokenizer { vocab: gv, extra, notes })
}

impl GgufTokenizer {
    /// The `tokenizer.*` keys, in the order convert_hf_to_gguf writes them.
    pub(super) fn metadata(&self) -> Vec<(String, GgufValue)> {
        let v = &self.vocab;
        let strings = |a: &[String]| GgufValue::Array(a.iter().cloned().map(GgufValue::String).collect());
        let mut out = vec![
            ("tokenizer.ggml.model".to_string(), GgufValue::String(v.model.clone())),
            ("tokenizer.ggml.pre".to_string(), GgufValue::String(v.pre.clone().unwrap_or_default())),
            ("tokenizer.ggml.tokens".to_string(), strings(&v.tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array(v.token_types.iter().copied().map(GgufValue::I32).collect()),
            ),
        ];
        // An empty array would have no element type llama.cpp accepts.
        if !v.merges.is_empty() {
            out.push(("tokenizer.ggml.merges".into(), strings(&v.merges)));
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", v.bos_id),
            ("tokenizer.ggml.eos_token_id", v.eos_id),
            ("tokenizer.ggml.unknown_token_id", v.unk_id),
            ("tokenizer.ggml.padding_token_id", v.pad_id),
        ] {
            if let Some(id) = id {
                out.push((key.into(), GgufValue::U32(id)));
            }
        }
        out.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(v.add_bos)));
        out.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(v.add_eos)));
        out.extend(self.extra.iter().cloned());
        if let Some(t) = &v.chat_template {
            out.push(("tokenizer.chat_template".into(), GgufValue::String(t.clone())));
        }
        out
    }
}

/// convert_hf_to_gguf's `does_token_look_special`: added tokens some models
/// forget to mark special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The model must be a plain byte-level BPE: no byte fallback (a SentencePiece
/// vocabulary), no word prefixes/suffixes, no dropout.
fn check_bpe_model(model: &Json) -> Result<(), ExportError> {
    match model.get("type") {
        Some(Json::String(t)) if t == "BPE" => {}
        Some(Json::String(t)) => {
            return Err(refuse(format!(
                "tokenizer.json's model is {t}; tandem writes only byte-level BPE tokenizers (GPT-2 style: Llama 3, \
                 Qwen2) as GGUF metadata. Convert this model with llama.cpp's convert_hf_to_gguf.py"
            )))
        }
        Some(other) => return Err(refuse(format!("tokenizer.json's model type is {other}, not a name"))),
        None if model.get("merges").is_some() => {}
        None => return Err(refuse("tokenizer.json's model has neither a type nor merges")),
    }
    if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(refuse(
            "tokenizer.json's BPE falls back to bytes (a SentencePiece-style vocabulary, GGUF's \"llama\" model); \
             tandem writes only byte-level BPE tokenizers. Convert this model with llama.cpp's convert_hf_to_gguf.py",
        ));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        match model.get(key) {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) if s.is_empty() => {}
            Some(v) => return Err(refuse(format!("tokenizer.json's BPE has {key} {v}, which GGUF cannot carry"))),
        }
    }
    match model.get("dropout") {
        None | Some(Json::Null) => {}
        Some(v) if v.as_f64() == Some(0.0) => {}
        Some(v) => return Err(refuse(format!("tokenizer.json's BPE has dropout {v}, which GGUF cannot carry"))),
    }
    Ok(())
}

/// `model.vocab`: token -> id, as (id, token) sorted by id, each id once.
fn model_vocab(model: &Json) -> Result<Vec<(u32, String)>, ExportError> {
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| refuse("tokenizer.json's model has no vocab object"))?;
    let mut out = Vec::with_capacity(vocab.len());
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| refuse(format!("vocab token {token:?} has id {id}, not a token id")))?;
        out.push((id, token.clone()));
    }
    out.sort();
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(refuse(format!("vocab tokens {:?} and {:?} share id {}", w[0].1, w[1].1, w[0].0)));
    }
    Ok(out)
}

/// `model.merges` as GGUF's "left right" strings: tokenizers' old form ("a b")
/// or its new one (["a", "b"]); a part holding a space cannot be written.
fn model_merges(model: &Json) -> Result<Vec<String>, ExportError> {
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .ok_or_else(|| refuse("tokenizer.json's BPE has no merges list"))?;
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let parts: Vec<&str> = match m {
                Json::String(s) => s.split(' ').collect(),
                Json::Array(a) => a
                    .iter()
                    .map(|p| p.as_str().filter(|p| !p.contains(' ')))
                    .collect::<Option<_>>()
                    .ok_or_else(|| refuse(format!("merge {i} ({m}) is not a pair of tokens without spaces")))?,
                other => {
                    return Err(refuse(format!("merge {i} ({other}) is neither a \"left right\" string nor a pair")))
                }
            };
            match parts.as_slice() {
                [l, r] if !l.is_empty() && !r.is_empty() => Ok(format!("{l} {r}")),
                _ => Err(refuse(format!("merge {i} ({m}) is not two tokens"))),
            }
        })
        .collect()
}

/// `added_tokens`; options GGUF metadata cannot carry are refused.
fn added_tokens(tj: &Json) -> Result<Vec<Added>, ExportError> {
    let list = match tj.get("added_tokens") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(a)) => a,
        Some(other) => return Err(refuse(format!("tokenizer.json's added_tokens is {other}, not a list"))),
    };
    list.iter()
        .map(|t| {
            let id = t.get("id").and_then(Json::as_u64).and_then(|v| u32::try_from(v).ok());
            let content = t.get("content").and_then(Json::as_str);
            let (Some(id), Some(content)) = (id, content) else {
                return Err(refuse(format!("added token {t} has no id or content")));
            };
            for flag in ["lstrip", "rstrip", "single_word"] {
                if t.get(flag).and_then(Json::as_bool) == Some(true) {
                    return Err(refuse(format!(
                        "added token {content:?} sets {flag}, which GGUF metadata cannot carry (it would split differently)"
                    )));
                }
            }
            let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
            Ok(Added { id, content: content.to_string(), special })
        })
        .collect()
}

/// ByteLevel's `trim_offsets` moves offsets, never ids: not compared.
fn strip_offsets(v: &mut Json) {
    match v {
        Json::Object(o) => {
            if o.get("type").and_then(Json::as_str) == Some("ByteLevel") {
                o.remove("trim_offsets");
            }
            o.values_mut().for_each(strip_offsets);
        }
        Json::Array(a) => a.iter_mut().for_each(strip_offsets),
        _ => {}
    }
}

/// A component of tokenizer.json as `tokenizers` reads and writes it back
/// (defaults filled in), for comparison.
fn canonical<T: serde::Serialize + serde::de::DeserializeOwned>(
    v: Option<&Json>,
    what: &str,
) -> Result<Json, ExportError> {
    let v = match v {
        None | Some(Json::Null) => return Ok(Json::Null),
        Some(v) => v,
    };
    let parsed: T =
        serde_json::from_value(v.clone()).map_err(|e| refuse(format!("tokenizer.json's {what} is not valid: {e}")))?;
    let mut out = serde_json::to_value(&parsed).map_err(|e| refuse(format!("{what}: {e}")))?;
    strip_offsets(&mut out);
    Ok(out)
}

/// The `tokenizer.ggml.pre` under which tandem's GGUF reader builds the same
/// normaliser and pre-tokenizer as tokenizer.json has.
fn pre_name(tj: &Json) -> Result<&'static str, ExportError> {
    let want = (
        canonical::<NormalizerWrapper>(tj.get("normalizer"), "normalizer")?,
        canonical::<PreTokenizerWrapper>(tj.get("pre_tokenizer"), "pre_tokenizer")?,
    );
    for &pre in PRE_NAMES {
        let probe =
            GgufVocab { model: "gpt2".into(), pre: Some(pre.into()), tokens: vec!["a".into()], ..Default::default() };
        let tok = Tokenizer::from_gguf_vocab(&probe).map_err(refuse)?;
        let mut got = (
            serde_json::to_value(tok.inner().get_normalizer()).map_err(refuse)?,
            serde_json::to_value(tok.inner().get_pre_tokenizer()).map_err(refuse)?,
        );
        strip_offsets(&mut got.0);
        strip_offsets(&mut got.1);
        if got == want {
            return Ok(pre);
        }
    }
    Err(refuse(format!(
        "tokenizer.json's normalizer {} and pre_tokenizer {} match none of the byte-level pre-tokenizers tandem \
         reads from GGUF ({})",
        want.0,
        want.1,
        PRE_NAMES.join(", ")
    )))
}

/// Text comes back through GPT-2's byte-level decoder, as tandem's GGUF reader builds it.
fn check_decoder(tj: &Json) -> Result<(), ExportError> {
    let d = match tj.get("decoder") {
        None | Some(Json::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<DecoderWrapper>(v.clone())
                .map_err(|e| refuse(format!("tokenizer.json's decoder is not valid: {e}")))?,
        ),
    };
    match d {
        Some(DecoderWrapper::ByteLevel(_)) => Ok(()),
        _ => Err(refuse(format!(
            "tokenizer.json's decoder is {}, not ByteLevel (the only one a GGUF \"gpt2\" tokenizer has)",
            tj.get("decoder").unwrap_or(&Json::Null)
        ))),
    }
}

/// The ids tokenizer.json's post-processor adds before and after every text:
/// nothing, or one special token each side (a TemplateProcessing, alone or in a
/// Sequence with ByteLevel, which only moves offsets).
fn post_processor_specials(tj: &Json) -> Result<(Option<u32>, Option<u32>), ExportError> {
    let pp = match tj.get("post_processor") {
        None | Some(Json::Null) => return Ok((None, None)),
        Some(v) => v,
    };
    let bad = |why: String| {
        refuse(format!("tokenizer.json's post_processor {why}; GGUF can only say \"add bos\" / \"add eos\""))
    };
    let list: Vec<&Json> = match pp.get("type").and_then(Json::as_str) {
        Some("Sequence") => pp
            .get("processors")
            .and_then(Json::as_array)
            .ok_or_else(|| bad("is a Sequence without processors".into()))?
            .iter()
            .collect(),
        _ => vec![pp],
    };
    let mut out = (None, None);
    let mut templates = 0;
    for p in list {
        match p.get("type").and_then(Json::as_str) {
            Some("ByteLevel") => {}
            Some("TemplateProcessing") => {
                templates += 1;
                out = template_specials(p).map_err(bad)?;
            }
            other => return Err(bad(format!("is of type {}", other.unwrap_or("(none)")))),
        }
    }
    if templates > 1 {
        return Err(bad("holds several templates".into()));
    }
    Ok(out)
}

fn template_specials(p: &Json) -> Result<(Option<u32>, Option<u32>), String> {
    let single = p.get("single").and_then(Json::as_array).ok_or("has no single-sequence template")?;
    let id_of = |item: &Json| -> Result<Option<u32>, String> {
        if let Some(seq) = item.get("Sequence") {
            return match seq.get("id").and_then(Json::as_str) {
                Some("A") => Ok(None),
                _ => Err(format!("puts {item} in the single-sequence template")),
            };
        }
        let name = item
            .get("SpecialToken")
            .and_then(|s| s.get("id"))
            .and_then(Json::as_str)
            .ok_or_else(|| format!("has a template item {item} that is neither a sequence nor a special token"))?;
        let ids = p
            .get("special_tokens")
            .and_then(|s| s.get(name))
            .and_then(|s| s.get("ids"))
            .and_then(Json::as_array)
            .ok_or_else(|| format!("names special token {name:?} without its ids"))?;
        match ids.as_slice() {
            [id] => id
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| format!("gives {name:?} the id {id}")),
            _ => Err(format!("adds {} ids for {name:?}", ids.len())),
        }
    };
    let ids: Vec<Option<u32>> = single.iter().map(id_of).collect::<Result<_, _>>()?;
    match ids.as_slice() {
        [None] => Ok((None, None)),
        [Some(b), None] => Ok((Some(*b), None)),
        [None, Some(e)] => Ok((None, Some(*e))),
        [Some(b), None, Some(e)] => Ok((Some(*b), Some(*e))),
        _ => Err(format!("has the single-sequence template {}", Json::Array(single.clone()))),
    }
}

/// Named chat templates of a tokenizer_config.json list (the default one is
/// `tokenizer.chat_template`), as gguf-py's `add_chat_template` writes them.
fn named_chat_templates(dir: &Path, tc: &Json) -> Result<Vec<(String, GgufValue)>, ExportError> {
    // chat_template.jinja replaces tokenizer_config.json's template(s) (transformers 5).
    if dir.join("chat_template.jinja").exists() {
        return Ok(Vec::new());
    }
    let Some(list) = tc.get("chat_template").and_then(Json::as_array) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let mut names = Vec::new();
    for t in list {
        let (Some(name), Some(template)) =
            (t.get("name").and_then(Json::as_str), t.get("template").and_then(Json::as_str))
        else {
            continue;
        };
        let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        if name.is_empty() || name == "default" {
            continue;
        }
        out.push((format!("tokenizer.chat_template.{name}"), GgufValue::String(template.to_string())));
        names.push(GgufValue::String(name));
    }
    if !names.is_empty() {
        out.push(("tokenizer.chat_templates".into(), GgufValue::Array(names)));
    }
    Ok(out)
}

/// With `ignore_merges`, tokenizer.json takes a word found whole in the
/// vocabulary as it is, which GGUF has no flag for: the text of every
/// vocabulary token must encode alike without it (a token that is a whole
/// pre-tokenised word must come out of the merges as itself).
fn check_ignore_merges(
    vocab: &[(u32, String)],
    added: &[Added],
    hf: &Tokenizer,
    gguf: &Tokenizer,
) -> Result<(), ExportError> {
    use rayon::prelude::*;
    let added: std::collections::HashSet<u32> = added.iter().map(|a| a.id).collect();
    let differ = |id: u32| -> Option<String> {
        let text = hf.decode(&[id], false).ok()?;
        // Part of a character: never a whole word.
        if text.is_empty() || text.contains('\u{fffd}') {
            return None;
        }
        (hf.encode(&text, false).ok()? != gguf.encode(&text, false).ok()?).then_some(text)
    };
    let bad: Vec<(u32, String)> = vocab
        .par_iter()
        .filter(|(id, _)| !added.contains(id))
        .filter_map(|(id, _)| differ(*id).map(|text| (*id, text)))
        .collect();
    if let Some((id, text)) = bad.first() {
        return Err(refuse(format!(
            "tokenizer.json sets ignore_merges and {} vocabulary token(s) (first: {text:?}, id {id}) are not produced \
             by its merges; GGUF metadata has no ignore_merges flag, so tandem's GGUF tokenizer would split them",
            bad.len()
        )));
    }
    Ok(())
}

/// Texts both tokenizers must encode alike: whitespace runs, digits,
/// contractions, several scripts and emoji, composed and decomposed accents.
const PROBES: &[&str] = &[
    "Hello, world! How are you today?",
    "\n \n\n \t \t\t \t\n  \n   \n    leading  and trailing   ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "3 33 333 3333 33333 333333 3.3 3..3 1,000,000 0x1F",
    "fn main() {\n\tprintln!(\"{}\", a[0] + b); // done\n}\r\n",
    "caf\u{e9} cafe\u{301} na\u{ef}ve A\u{30a}ngstr\u{f6}m \u{fb01}le",
    "\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c} \u{43d}\u{435}\u{449}\u{43e} \u{1780}\u{17b6}\u{1793}\u{17cb} \u{1f680}\u{1f999} \u{1f636}\u{200d}\u{1f32b}\u{fe0f}",
    "------======= ......!!!!!!?????? ```````\"\"\"\" ~~~ <<>> [[]] {{}}",
];

/// The GGUF tokenizer must encode every probe (with and without the
/// post-processor's tokens) to tokenizer.json's ids and decode them to its text.
fn compare_probes(hf: &Tokenizer, gguf: &Tokenizer, added: &[Added]) -> Result<(), ExportError> {
    let mut texts: Vec<String> = PROBES.iter().map(|s| s.to_string()).collect();
    for a in added {
        let t = &a.content;
        texts.extend([t.clone(), format!("a{t}b"), format!(" {t} {t}{t}\n")]);
    }
    if let Some(template) = hf.chat_template() {
        let messages = serde_json::json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi there! What is 3.14 \u{d7} 2? \u{1f999}"},
            {"role": "assistant", "content": "It is 6.28."},
            {"role": "user", "content": "Thanks,\n  bye"},
        ]);
        // A template may refuse this conversation (roles it does not allow): nothing to compare then.
        if let Ok(text) = template.render(&messages, None, true, None) {
            texts.push(text);
        }
    }
    for text in &texts {
        for add_special in [false, true] {
            let want = hf.encode(text, add_special).map_err(refuse)?;
            let got = gguf.encode(text, add_special).map_err(refuse)?;
            if got != want {
                return Err(refuse(format!(
                    "from GGUF metadata tandem would encode {text:?} as {got:?}, tokenizer.json as {want:?}; not \
                     writing a .gguf that tokenises differently"
                )));
            }
            let (a, b) = (hf.decode(&want, false).map_err(refuse)?, gguf.decode(&got, false).map_err(refuse)?);
            if a != b {
                return Err(refuse(format!(
                    "from GGUF metadata tandem would decode {want:?} as {b:?}, tokenizer.json as {a:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merges_in_either_form_become_left_right_strings_and_bad_ones_are_refused() {
        let m = json!({"merges": ["a b", ["c", "d"]]});
        assert_eq!(model_merges(&m).unwrap(), vec!["a b", "c d"]);
        for bad in [
            json!([1]),
            json!(["ab"]),
            json!(["a b c"]),
            json!([["a"]]),
            json!([["a", 2]]),
            json!([["a b", "c"]]),
            json!([["", "c"]]),
            json!("a b"),
        ] {
            let err = model_merges(&json!({ "merges": bad })).unwrap_err().to_string();
            assert!(err.contains("merge"), "{bad}: {err}");
        }
    }

    #[test]
    fn only_plain_byte_level_bpe_models_pass() {
        assert!(check_bpe_model(&json!({"type": "BPE", "byte_fallback": false, "dropout": null})).is_ok());
        assert!(check_bpe_model(&json!({"merges": []})).is_ok());
        for (bad, says) in [
            (json!({"type": "Unigram"}), "Unigram"),
            (json!({"type": "WordPiece"}), "WordPiece"),
            (json!({"type": "BPE", "byte_fallback": true}), "falls back to bytes"),
            (json!({"type": "BPE", "continuing_subword_prefix": "##"}), "continuing_subword_prefix"),
            (json!({"type": "BPE", "dropout": 0.1}), "dropout"),
            (json!({"type": 3}), "not a name"),
            (json!({}), "neither a type nor merges"),
        ] {
            let err = check_bpe_model(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_pre_tokenizer_name_is_the_one_tandem_rebuilds_the_same_split_from() {
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_name(&json!({"normalizer": null, "pre_tokenizer": byte_level})).unwrap(), "gpt-2");
        let split = |regex: &str| {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]})
        };
        let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let nfc = json!({"type": "NFC"});
        assert_eq!(pre_name(&json!({"normalizer": nfc, "pre_tokenizer": split(qwen2)})).unwrap(), "qwen2");
        assert_eq!(pre_name(&json!({"normalizer": null, "pre_tokenizer": split(llama3)})).unwrap(), "llama-bpe");
        // Qwen2's split without its NFC normaliser, a prefix space, an unknown regex: no GGUF name fits.
        for bad in [
            json!({"normalizer": null, "pre_tokenizer": split(qwen2)}),
            json!({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}}),
            json!({"pre_tokenizer": split(r"\w+")}),
            json!({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first"}}),
        ] {
            assert!(pre_name(&bad).unwrap_err().to_string().contains("match none"), "{bad}");
        }
        assert!(pre_name(&json!({"pre_tokenizer": {"type": "Nope"}})).unwrap_err().to_string().contains("not valid"));
    }

    #[test]
    fn post_processors_say_what_is_added_before_and_after() {
        let tp = |single: Json| {
            json!({"type": "TemplateProcessing", "single": single, "pair": [],
                   "special_tokens": {"<s>": {"id": "<s>", "ids": [7], "tokens": ["<s>"]},
                                      "</s>": {"id": "</s>", "ids": [8], "tokens": ["</s>"]}}})
        };
        let a = json!({"Sequence": {"id": "A", "type_id": 0}});
        let s = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let of = |pp: Json| post_processor_specials(&json!({ "post_processor": pp }));
        assert_eq!(of(Json::Null).unwrap(), (None, None));
        assert_eq!(of(json!({"type": "ByteLevel"})).unwrap(), (None, None));
        assert_eq!(of(tp(json!([a]))).unwrap(), (None, None));
        assert_eq!(of(tp(json!([s("<s>"), a]))).unwrap(), (Some(7), None));
        assert_eq!(
            of(json!({"type": "Sequence", "processors": [{"type": "ByteLevel"}, tp(json!([s("<s>"), a, s("</s>")]))]}))
                .unwrap(),
            (Some(7), Some(8))
        );
        for bad in [
            tp(json!([s("<s>"), s("<s>"), a])),
            tp(json!([s("<x>"), a])),
            tp(json!([a, json!({"Sequence": {"id": "B", "type_id": 1}})])),
            json!({"type": "RobertaProcessing"}),
            json!({"type": "TemplateProcessing"}),
        ] {
            assert!(of(bad.clone()).unwrap_err().to_string().contains("post_processor"), "{bad}");
        }
    }

    #[test]
    fn added_tokens_that_look_special_are_control_tokens() {
        assert!(looks_special("<|fim_prefix|>") && looks_special("<pad>") && looks_special("<unused12>"));
        assert!(!looks_special("<tool_call>") && !looks_special("<|x") && !looks_special("hello"));
    }
}
