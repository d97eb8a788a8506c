//! Training data: a JSONL file -> token ids + which tokens are trained.
//!
//! Each non-blank line is one example in one of three formats, told apart by its
//! keys (a file uses one format throughout):
//!
//! - chat (OpenAI's fine-tuning format): `{"messages": [...], "tools"?: [...],
//!   "parallel_tool_calls"?: bool}`; an assistant message may carry
//!   `"weight": 0 | 1` (0: not trained on);
//! - prompt/completion: `{"prompt": str, "completion": str}`, a user turn and an
//!   assistant turn;
//! - Alpaca: `{"instruction": str, "input"?: str, "output": str}`, a user turn
//!   (the instruction, then the input after a blank line) and an assistant turn.
//!
//! Every format is rendered through the model's own chat template, with the
//! messages checked and normalised by the same code serving uses
//! ([`crate::tokenizer::messages`]), and tokenized once, as inference tokenizes a
//! prompt. Only assistant turns are trained. The tokens a trained assistant turn
//! owns are found with prefix renders (see `render.rs`): the text the template
//! adds for that message after the generation prompt, up to and including its
//! end-of-turn token.
//!
//! The whole file is checked before anything is returned: every bad line is
//! reported with its 1-based number ([`DataError::Invalid`]), and no partial
//! dataset is ever produced. No input makes this module panic.

mod format;
mod render;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::tokenizer::Tokenizer;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// `targets[t]`: token `t` is trained (its loss is taken on the logits at
    /// `t - 1`). Same length as `tokens`; `targets[0]` is always false.
    pub targets: Vec<bool>,
    /// 1-based line of the file the example came from.
    pub line: usize,
}

impl Example {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of trained tokens.
    pub fn trained_tokens(&self) -> usize {
        self.targets.iter().filter(|t| **t).count()
    }

    /// transformers' `labels`: the token id where trained, -100 elsewhere (the
    /// model shifts them itself).
    pub fn labels(&self) -> Vec<i64> {
        self.tokens
            .iter()
            .zip(&self.targets)
            .map(|(&id, &trained)| if trained { i64::from(id) } else { -100 })
            .collect()
    }
}

/// The shape of a training file's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// `{"messages": [...]}` (OpenAI's chat fine-tuning format).
    Chat,
    /// `{"prompt": "...", "completion": "..."}`.
    PromptCompletion,
    /// `{"instruction": "...", "input"?: "...", "output": "..."}`.
    Alpaca,
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Chat => "chat",
            DataFormat::PromptCompletion => "prompt/completion",
            DataFormat::Alpaca => "alpaca",
        })
    }
}

/// What to do with an example longer than `max_seq_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Keep its first `max_seq_len` tokens (OpenAI's behaviour); the line is an
    /// error only when no trained token is left.
    Truncate,
    /// The line is an error.
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// Longest example, in tokens.
    pub max_seq_len: usize,
    pub overflow: Overflow,
    /// How many problems [`DataError::Invalid`] lists (the rest are counted);
    /// at least one is always listed.
    pub max_issues: usize,
}

impl DataOptions {
    /// `max_seq_len` with OpenAI's defaults: truncate long examples, list up to
    /// 100 problems.
    pub fn new(max_seq_len: usize) -> Self {
        Self { max_seq_len, overflow: Overflow::Truncate, max_issues: 100 }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataStats {
    pub examples: usize,
    /// Tokens over all examples (after truncation).
    pub tokens: usize,
    /// Tokens with a loss over all examples.
    pub trained_tokens: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Whitespace-only lines, skipped.
    pub blank_lines: usize,
}

/// A checked training file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub format: DataFormat,
    /// In file order.
    pub examples: Vec<Example>,
    pub stats: DataStats,
}

impl Dataset {
    /// Each example's length in tokens, in order (what `batch::plan_epoch` takes).
    pub fn lengths(&self) -> Vec<usize> {
        self.examples.iter().map(Example::len).collect()
    }
}

/// A problem with one line of a training file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIssue {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for DataIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Every problem found, in line order (at most `max_issues`), and how many
    /// more there were.
    #[error("{}", describe_issues(.issues, *.more))]
    Invalid { issues: Vec<DataIssue>, more: usize },
    /// Training data is rendered through the model's chat template; the string
    /// says why there is none.
    #[error("the model has no usable chat template ({0}); training data is rendered through it")]
    NoChatTemplate(String),
    #[error("the training file has no examples (it is empty or holds only blank lines)")]
    Empty,
}

fn describe_issues(issues: &[DataIssue], more: usize) -> String {
    let total = issues.len() + more;
    let mut text = format!("{total} problem{} in the training file:", if total == 1 { "" } else { "s" });
    for issue in issues {
        text.push('\n');
        text.push_str(&issue.to_string());
    }
    if more > 0 {
        text.push_str(&format!("\n... and {more} more"));
    }
    text
}

/// Reads and checks the JSONL training file at `path` (see [`parse_jsonl`]).
pub fn load_jsonl(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    parse_jsonl(&bytes, tok, opts)
}

/// Checks a whole JSONL training file and turns it into examples, or reports
/// every bad line. Lines end with `\n` (a `\r` before it is dropped); a UTF-8
/// byte-order mark at the start is skipped; whitespace-only lines are skipped
/// and counted. Runs on the calling thread.
pub fn parse_jsonl(bytes: &[u8], tok: &Tokenizer, opts: &DataOptions) -> Result<Dataset, DataError> {
    let template = tok.chat_template().ok_or_else(|| {
        DataError::NoChatTemplate(match tok.chat_template_error() {
            Some(e) => format!("it failed to compile: {e}"),
            None => "the tokenizer has none".to_owned(),
        })
    })?;
    let renderer = render::Renderer::new(tok, template);
    let mut issues = Issues { list: Vec::new(), more: 0, cap: opts.max_issues.max(1) };
    let mut stats = DataStats::default();
    let mut examples = Vec::new();
    // The file's format (its first example's) and the line that set it.
    let mut file_format: Option<(DataFormat, usize)> = None;
    let mut mixing_reported = false;

    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop(); // the newline that ends the last line starts no line
    }
    for (index, raw) in lines.into_iter().enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(text) => text,
            Err(e) => {
                issues.push(line, format!("not valid UTF-8 (bad byte at column {})", e.valid_up_to() + 1));
                continue;
            }
        };
        if text.trim().is_empty() {
            stats.blank_lines += 1;
            continue;
        }
        let (line_format, object) = match format::detect(text) {
            Ok(found) => found,
            Err(message) => {
                issues.push(line, message);
                continue;
            }
        };
        match file_format {
            None => file_format = Some((line_format, line)),
            Some((first, first_line)) if first != line_format && !mixing_reported => {
                mixing_reported = true;
                issues.push(
                    line,
                    format!(
                        "this line is in the {line_format} format, but the file's first example (line \
                         {first_line}) is {first}; a file must use one format"
                    ),
                );
                continue;
            }
            Some(_) => {}
        }
        let built = format::conversation(line_format, &object).and_then(|c| renderer.example(&c, opts));
        match built {
            Err(message) => issues.push(line, message),
            Ok(built) => {
                stats.truncated += usize::from(built.truncated);
                // Once the file is known to be bad, only problems matter.
                if issues.is_empty() {
                    let example = Example { tokens: built.tokens, targets: built.targets, line };
                    stats.examples += 1;
                    stats.tokens += example.len();
                    stats.trained_tokens += example.trained_tokens();
                    examples.push(example);
                }
            }
        }
    }
    if !issues.is_empty() {
        return Err(DataError::Invalid { issues: issues.list, more: issues.more });
    }
    match file_format {
        Some((format, _)) if !examples.is_empty() => Ok(Dataset { format, examples, stats }),
        _ => Err(DataError::Empty),
    }
}

struct Issues {
    list: Vec<DataIssue>,
    more: usize,
    cap: usize,
}

impl Issues {
    fn push(&mut self, line: usize, message: String) {
        if self.list.len() < self.cap {
            self.list.push(DataIssue { line, message });
        } else {
            self.more += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty() && self.more == 0
    }
}
