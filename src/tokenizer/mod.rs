//! Text to token ids and back, chat templates, and the chat messages they render
//! (checked and normalised once for serving and training: [`messages`]).
//!
//! [`Tokenizer`] wraps a `tokenizers::Tokenizer` loaded from an HF tokenizer.json
//! (with the tokenizer_config.json / generation_config.json beside it) or rebuilt
//! from a GGUF vocabulary ([`GgufVocab`]), plus what serving needs around it: the
//! ids that end generation, the BOS id and the chat template. transformers is the
//! reference for every output here; tests compare against its goldens.

mod chat_template;
mod gguf_vocab;
pub(crate) mod hf_files;
mod jinja_py;
pub mod messages;
mod stream;

use std::path::{Path, PathBuf};

pub use chat_template::ChatTemplate;
pub use gguf_vocab::{GgufVocab, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};
pub use messages::{prepare_messages, MessageError};
pub use stream::DecodeStream;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    #[error("invalid GGUF vocabulary: {0}")]
    Vocab(String),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),
    #[error("chat template failed: {0}")]
    TemplateRender(String),
    /// The template called `raise_exception(message)`: the request does not fit
    /// the model's chat format (a client error; the message is for the client).
    #[error("{0}")]
    TemplateRaised(String),
    #[error("{0}")]
    InvalidInput(String),
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(e: tokenizers::Error) -> Self {
        TokenizerError::Tokenizers(e.to_string())
    }
}

/// A loaded tokenizer. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    chat_template_error: Option<String>,
}

impl Tokenizer {
    /// Loads an HF `tokenizer.json`, reading `tokenizer_config.json`,
    /// `generation_config.json`, `config.json` and `chat_template.jinja` beside it
    /// when present.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| {
            if !tokenizer_json.exists() {
                TokenizerError::Io {
                    path: tokenizer_json.to_owned(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                }
            } else {
                TokenizerError::InvalidFile { path: tokenizer_json.to_owned(), message: e.to_string() }
            }
        })?;
        let dir = tokenizer_json.parent().unwrap_or_else(|| Path::new("."));
        let meta = hf_files::HfMeta::read(dir, &inner)?;
        let (chat_template, chat_template_error) =
            compile_template(meta.chat_template.as_deref(), meta.bos_token, meta.eos_token);
        Ok(Self { inner, bos_id: meta.bos_id, eos_ids: meta.eos_ids, chat_template, chat_template_error })
    }

    /// Loads an HF model directory (tokenizer.json and its companions).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Builds the tokenizer a GGUF file describes (see [`GgufVocab`]).
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Self, TokenizerError> {
        let inner = gguf_vocab::build(v)?;
        let text = |id: Option<u32>| id.and_then(|id| v.tokens.get(id as usize).cloned());
        let (chat_template, chat_template_error) =
            compile_template(v.chat_template.as_deref(), text(v.bos_id), text(v.eos_id));
        Ok(Self { inner, bos_id: v.bos_id, eos_ids: v.end_of_generation_ids(), chat_template, chat_template_error })
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`)
    /// become their ids, as in transformers; `add_special_tokens` adds what the
    /// tokenizer's post-processor adds (BOS for Llama-style models, nothing for Qwen).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.inner.encode_fast(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Text for `ids`; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    /// Number of ids, added tokens included (the model's logits may be wider).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every id that ends generation, the tokenizer's eos first.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The model's chat template, if it has one that compiles.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Why the model's chat template failed to compile, if it did; loading still
    /// succeeds so the completions API keeps working.
    pub fn chat_template_error(&self) -> Option<&str> {
        self.chat_template_error.as_deref()
    }

    /// Replaces the chat template (e.g. one given on the command line).
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        self.chat_template = Some(template);
        self.chat_template_error = None;
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special (control) token, which `decode(.., true)` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    /// The wrapped `tokenizers` tokenizer, for what this API does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn compile_template(
    source: Option<&str>,
    bos: Option<String>,
    eos: Option<String>,
) -> (Option<ChatTemplate>, Option<String>) {
    match source.map(|s| ChatTemplate::new(s, bos, eos)) {
        None => (None, None),
        Some(Ok(t)) => (Some(t), None),
        Some(Err(e)) => (None, Some(e.to_string())),
    }
}
