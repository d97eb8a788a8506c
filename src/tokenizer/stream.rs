//! Incremental detokenization for streaming responses.
//!
//! Decoding token by token and concatenating is wrong in general: a character may
//! span several byte-level or `<0xNN>` byte-fallback tokens, and SentencePiece
//! decoders strip a leading space from whatever they decode. So each step decodes a
//! short window of recent ids twice, with and without the newest ones, and emits
//! the difference once it no longer ends in an incomplete character (U+FFFD). The
//! window always starts at a token whose text was already emitted, so strip rules
//! apply to both decodes alike. This is the scheme vLLM and TGI use.

use super::{Tokenizer, TokenizerError};

/// Per-sequence streaming state; owns no reference to the tokenizer, so it can
/// live in a request's task while the tokenizer is shared.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    /// Ids from `prefix_offset` on; older ones are dropped as the window moves.
    ids: Vec<u32>,
    /// Start of the text already emitted that the next decode is measured against.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl DecodeStream {
    /// A stream for generated ids with no context before them: the concatenation
    /// of everything it returns equals `tokenizer.decode(all_ids)`.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    /// A stream that continues after `context` (e.g. the prompt's last few ids),
    /// so the first generated token decodes as it would mid-text (" Hello", not
    /// "Hello"). The context itself is never returned.
    pub fn with_context(context: &[u32], skip_special_tokens: bool) -> Self {
        Self { ids: context.to_vec(), prefix_offset: 0, read_offset: context.len(), skip_special_tokens }
    }

    /// Feeds one generated id; returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new_text = new_suffix(&prefix, &full).to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(Some(new_text))
    }

    /// Text still held back at the end of generation (an incomplete character
    /// comes out as U+FFFD, as `decode` of all ids would print it).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() <= prefix.len() {
            return Ok(String::new());
        }
        Ok(new_suffix(&prefix, &full).to_owned())
    }

    /// Drops ids before the window so a long generation keeps O(window) state.
    fn compact(&mut self) {
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

/// `full` minus the already-emitted `prefix`. When `full` does not extend `prefix`
/// (only with invalid byte sequences, whose U+FFFD can change as bytes arrive),
/// emit from the end of the longest common prefix rather than fail the stream.
fn new_suffix<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(full.len()));
    let mut cut = common.min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    &full[cut..]
}

#[cfg(test)]
mod tests {
    use super::new_suffix;

    #[test]
    fn suffix_after_common_prefix() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        assert_eq!(new_suffix("a\u{FFFD}", "aé!"), "é!");
        assert_eq!(new_suffix("", "x"), "x");
    }
}
