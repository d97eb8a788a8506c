//! A tokenizer rebuilt from the vocabulary a GGUF file carries.
//!
//! A GGUF has no tokenizer.json, only llama.cpp's metadata keys. The tokenizer
//! built here is the one transformers builds from the same file
//! (`integrations/gguf/gguf_tokenizer_mapping.py`), which is our golden:
//! `gpt2` files become a byte-level BPE with the split regex named by
//! `tokenizer.ggml.pre`; `llama` files (SentencePiece) become a BPE with byte
//! fallback whose merges, when the file has none, are recovered from the scores.
//! Tokens marked CONTROL become special added tokens and USER_DEFINED plain added
//! tokens, so `<|im_start|>` written in text is one id. One deliberate difference:
//! `qwen2` gets Qwen's NFC normaliser (as Qwen's own tokenizer.json and
//! transformers' `Qwen2Tokenizer` have), which transformers' GGUF path drops.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer metadata of a GGUF file, independent of how the file was read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: names the pre-tokenizer split ("qwen2", "llama-bpe", ...).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Empty when the file has none (all tokens normal).
    pub token_types: Vec<i32>,
    /// Empty when the file has none.
    pub scores: Vec<f32>,
    /// "left right" pairs, best first; empty for SentencePiece files without merges.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id`: also end generation.
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    /// `tokenizer.ggml.add_space_prefix`; `None` means SentencePiece's default (true).
    pub add_space_prefix: Option<bool>,
}

/// Text of control tokens that end a turn; llama.cpp marks these end-of-generation
/// whatever the file's eos id says (Qwen's `<|endoftext|>` next to eos `<|im_end|>`).
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end▁of▁sentence|>",
    "<end_of_utterance>",
];

const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex for a `tokenizer.ggml.pre` name (transformers' table); `None`
/// keeps GPT-2's own byte-level regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

impl GgufVocab {
    fn token_type(&self, id: usize) -> i32 {
        self.token_types.get(id).copied().unwrap_or(1)
    }

    /// transformers registers the bos/eos/unk/pad tokens as special whatever their
    /// token type (SentencePiece's `<unk>` is UNKNOWN, not CONTROL), as well as
    /// every CONTROL token.
    fn is_special(&self, id: usize) -> bool {
        self.token_type(id) == TOKEN_TYPE_CONTROL
            || [self.bos_id, self.eos_id, self.unk_id, self.pad_id].contains(&Some(id as u32))
    }

    /// Ids that end generation: eos, eot, eom, and control tokens named like an
    /// end of turn. The first is the eos id when there is one.
    pub fn end_of_generation_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.eos_id, self.eot_id, self.eom_id].into_iter().flatten().collect();
        for (id, token) in self.tokens.iter().enumerate() {
            if self.token_type(id) == TOKEN_TYPE_CONTROL && END_OF_GENERATION.contains(&token.as_str()) {
                ids.push(id as u32);
            }
        }
        let mut seen = HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }

    fn check(&self) -> Result<(), TokenizerError> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Vocab("no tokens".into()));
        }
        if !self.token_types.is_empty() && self.token_types.len() != n {
            return Err(TokenizerError::Vocab(format!("{} token types for {n} tokens", self.token_types.len())));
        }
        if !self.scores.is_empty() && self.scores.len() != n {
            return Err(TokenizerError::Vocab(format!("{} scores for {n} tokens", self.scores.len())));
        }
        for (name, id) in [("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id), ("unk", self.unk_id)] {
            if id.is_some_and(|id| id as usize >= n) {
                return Err(TokenizerError::Vocab(format!("{name} id {id:?} out of range ({n} tokens)")));
            }
        }
        Ok(())
    }
}

impl GgufVocab {
    /// Reads the `tokenizer.*` keys of an opened GGUF file.
    pub fn from_gguf(f: &crate::loader::gguf::GgufFile) -> Result<Self, TokenizerError> {
        use crate::loader::gguf::GgufValue;
        let strings = |key: &str| -> Result<Vec<String>, TokenizerError> {
            match f.get(key) {
                None => Ok(Vec::new()),
                Some(_) => f
                    .get_str_array(key)
                    .map(|a| a.into_iter().map(str::to_owned).collect())
                    .ok_or_else(|| TokenizerError::Vocab(format!("{key} is not an array of strings"))),
            }
        };
        let array = |key: &str| {
            f.get(key).map(|v| v.as_array().ok_or_else(|| TokenizerError::Vocab(format!("{key} is not an array"))))
        };
        let token_types = match array("tokenizer.ggml.token_type").transpose()? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(|v| match *v {
                    GgufValue::I32(t) => Some(t),
                    ref other => other.as_u64().and_then(|t| i32::try_from(t).ok()),
                })
                .collect::<Option<_>>()
                .ok_or_else(|| TokenizerError::Vocab("tokenizer.ggml.token_type holds non-integers".into()))?,
        };
        let scores = match array("tokenizer.ggml.scores").transpose()? {
            None => Vec::new(),
            Some(a) => a
                .iter()
                .map(GgufValue::as_f32)
                .collect::<Option<_>>()
                .ok_or_else(|| TokenizerError::Vocab("tokenizer.ggml.scores holds non-floats".into()))?,
        };
        let id = |key: &str| f.get_u64(key).and_then(|v| u32::try_from(v).ok());
        let flag = |key: &str| f.get(key).and_then(GgufValue::as_bool);
        let model =
            f.get_str("tokenizer.ggml.model").ok_or_else(|| TokenizerError::Vocab("no tokenizer.ggml.model".into()))?;
        Ok(Self {
            model: model.to_owned(),
            pre: f.get_str("tokenizer.ggml.pre").map(str::to_owned),
            tokens: strings("tokenizer.ggml.tokens")?,
            token_types,
            scores,
            merges: strings("tokenizer.ggml.merges")?,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            // llama.cpp (and transformers) add BOS to SentencePiece vocabularies that
            // do not say otherwise.
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama"),
            add_eos: flag("tokenizer.ggml.add_eos_token").unwrap_or(false),
            chat_template: f.get_str("tokenizer.chat_template").map(str::to_owned),
            eot_id: id("tokenizer.ggml.eot_token_id"),
            eom_id: id("tokenizer.ggml.eom_token_id"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
        })
    }
}

/// GPT-2's reversible byte -> printable char table.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

pub(crate) fn build(v: &GgufVocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    v.check()?;
    match v.model.as_str() {
        "gpt2" => build_byte_level(v),
        "llama" => build_sentencepiece(v),
        other => {
            Err(TokenizerError::Vocab(format!("tokenizer.ggml.model {other:?} is not supported (gpt2, llama are)")))
        }
    }
}

fn tk_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Vocab(e.to_string())
}

fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>, TokenizerError> {
    merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| TokenizerError::Vocab(format!("merge {m:?} is not \"left right\"")))
        })
        .collect()
}

fn build_byte_level(v: &GgufVocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    // Tokens written outside the byte alphabet (a file that stores raw text) are
    // respelled, as transformers does, so the BPE model can reach them.
    let mut vocab = Vocab::default();
    for (id, token) in v.tokens.iter().enumerate() {
        let spelled =
            if in_alphabet(token) { token.clone() } else { token.bytes().map(|b| table[b as usize]).collect() };
        vocab.insert(spelled, id as u32);
    }
    let bpe = BPE::builder().vocab_and_merges(vocab.clone(), parse_merges(&v.merges)?).build().map_err(tk_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre: PreTokenizerWrapper = match v.pre.as_deref().and_then(split_regex) {
        Some(regex) => PreSequence::new(vec![
            Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(tk_err)?
                .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        None => byte_level.into(),
    };
    tok.with_pre_tokenizer(Some(pre));
    if v.pre.as_deref() == Some("qwen2") {
        tok.with_normalizer(Some(NFC));
    }
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(post_processor(v)?));
    // A control token outside the byte alphabet is a llama.cpp mislabel; transformers
    // skips it (it would add an id past the model's vocabulary), and so do we.
    let specials: Vec<AddedToken> = v
        .tokens
        .iter()
        .enumerate()
        .filter(|(id, t)| v.is_special(*id) && in_alphabet(t))
        .map(|(_, t)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&specials);
    let user: Vec<AddedToken> = v
        .tokens
        .iter()
        .enumerate()
        .filter(|(id, t)| v.token_type(*id) == TOKEN_TYPE_USER_DEFINED && vocab.contains_key(*t))
        .map(|(_, t)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(&user);
    Ok(tok)
}

fn build_sentencepiece(v: &GgufVocab) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let mut vocab = Vocab::default();
    for (id, token) in v.tokens.iter().enumerate() {
        vocab.insert(token.clone(), id as u32);
    }
    let merges = if v.merges.is_empty() {
        if v.scores.is_empty() {
            return Err(TokenizerError::Vocab("SentencePiece vocabulary has neither merges nor scores".into()));
        }
        merges_from_scores(&v.tokens, &v.scores, &vocab)
    } else {
        parse_merges(&v.merges)?
    };
    // Like transformers' LlamaTokenizer: no unk token on the model (byte fallback
    // covers every character the vocabulary lacks).
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true).build().map_err(tk_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let prefix = v.add_space_prefix.unwrap_or(true);
    let scheme = if prefix { PrependScheme::First } else { PrependScheme::Never };
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(tk_err)?.into(), ByteFallback::default().into(), Fuse::default().into()];
    if prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    tok.with_post_processor(Some(post_processor(v)?));
    let added = |keep: &dyn Fn(usize) -> bool, special: bool| -> Vec<AddedToken> {
        v.tokens
            .iter()
            .enumerate()
            .filter(|(id, _)| keep(*id))
            .map(|(_, t)| AddedToken::from(t.clone(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(&added(&|id| v.is_special(id), true));
    tok.add_tokens(&added(&|id| v.token_type(id) == TOKEN_TYPE_USER_DEFINED, false));
    Ok(tok)
}

/// transformers' `generate_merges(vocab, scores)`: every split of every token into
/// two vocabulary tokens is a merge ranked by the token's score, ties broken by
/// longer left then longer right piece, then by (left id, right id).
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    // Python's dict(zip(tokens, scores)): first position, last score for repeats.
    let mut last_score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        last_score.insert(t, *s);
    }
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut merges: Vec<(String, String, f32, usize, usize)> = Vec::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = last_score[token.as_str()];
        let mut local = Vec::new();
        for (byte_idx, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(byte_idx);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, l, r));
            }
        }
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        for (_, _, l, r) in local {
            merges.push((l.to_owned(), r.to_owned(), score, l.chars().count(), r.chars().count()));
        }
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (l, r)).collect()
}

/// transformers' `update_post_processor`: BOS/EOS around the sequence per the
/// file's add_bos/add_eos flags (a flag without its token is dropped).
fn post_processor(v: &GgufVocab) -> Result<TemplateProcessing, TokenizerError> {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    let bos = v.bos_id.filter(|_| v.add_bos);
    let eos = v.eos_id.filter(|_| v.add_eos);
    if let Some(id) = bos {
        specials.push(("BOS".to_owned(), id));
        single.push("BOS".to_owned());
        pair.push("BOS:0".to_owned());
    }
    single.push("$A".to_owned());
    pair.push("$A:0".to_owned());
    if let Some(id) = eos {
        specials.push(("EOS".to_owned(), id));
        single.push("EOS".to_owned());
        pair.push("EOS:0".to_owned());
    }
    if bos.is_some() {
        pair.push("BOS:1".to_owned());
    }
    pair.push("$B:1".to_owned());
    if eos.is_some() {
        pair.push("EOS:1".to_owned());
    }
    // The template refers to specials by key; the token text only labels the encoding.
    let tokens: Vec<tokenizers::processors::template::SpecialToken> = specials
        .into_iter()
        .map(|(key, id)| {
            let text = v.tokens[id as usize].clone();
            tokenizers::processors::template::SpecialToken::new(key, vec![id], vec![text])
        })
        .collect::<Result<_, _>>()
        .map_err(tk_err)?;
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(tk_err)?
        .try_pair(pair)
        .map_err(tk_err)?
        .special_tokens(tokens)
        .build()
        .map_err(tk_err)
}
