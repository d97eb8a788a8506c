//! A conversation -> tokens + targets, through the model's chat template.
//!
//! The whole conversation is rendered once (no generation prompt, tools passed
//! through) and tokenized once, exactly as inference tokenizes a prompt (the
//! template writes any BOS itself, so no special tokens are added). Which
//! characters a trained assistant message `i` owns is found without reading the
//! template: render `messages[..i]` with the generation prompt (P) and
//! `messages[..=i]` without (R). P must be a prefix of R and R a prefix of the
//! full render, or the template does not render the conversation incrementally
//! and the line is refused. The turn owns `R[len(P)..]` up to and including the
//! first end-of-turn token text inside it (the tokenizer's eos tokens, e.g.
//! Qwen's `<|im_end|>`); what follows it (a newline) is prompt, as is the role
//! header the generation prompt wrote. A token is trained iff its start offset
//! lies in an owned span. One rule for every template, `{% generation %}` blocks
//! or not.

use std::ops::Range;

use serde_json::Value;

use super::format::Conversation;
use super::{DataOptions, Overflow};
use crate::tokenizer::{ChatTemplate, Tokenizer, TokenizerError};

pub(super) struct Built {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
    pub truncated: bool,
}

pub(super) struct Renderer<'a> {
    template: &'a ChatTemplate,
    /// The tokenizer without its post-processor. With `add_special_tokens`
    /// false a post-processor adds no tokens, so the ids are the ones
    /// `Tokenizer::encode(text, false)` gives; but some (ByteLevel with
    /// `trim_offsets`) move offsets off whitespace, which would shift a token
    /// ending the prompt (the `\n` after `assistant`) into the turn's span.
    offsets: tokenizers::Tokenizer,
    /// Text of each end-of-turn token.
    end_of_turn: Vec<String>,
}

impl<'a> Renderer<'a> {
    pub fn new(tok: &Tokenizer, template: &'a ChatTemplate) -> Self {
        let mut offsets = tok.inner().clone();
        offsets.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let mut end_of_turn: Vec<String> = tok
            .eos_token_ids()
            .into_iter()
            .filter_map(|id| tok.decode(&[id], false).ok())
            .filter(|text| !text.is_empty())
            .collect();
        end_of_turn.sort();
        end_of_turn.dedup();
        Self { template, offsets, end_of_turn }
    }

    pub fn example(&self, conv: &Conversation, opts: &DataOptions) -> Result<Built, String> {
        let messages = &conv.messages;
        let tools = conv.tools.as_ref();
        let full = self.render(messages, tools, false, "the conversation")?;
        let mut spans: Vec<Range<usize>> = Vec::with_capacity(conv.trained.len());
        for &i in &conv.trained {
            let before = format!("the conversation before messages[{i}] (with the generation prompt)");
            let prefix = self.render(&messages[..i], tools, true, &before)?;
            let upto = self.render(&messages[..=i], tools, false, &format!("the conversation up to messages[{i}]"))?;
            let broken = if !upto.starts_with(&prefix) {
                Some(format!(
                    "its render up to messages[{i}] does not start with the render before messages[{i}] plus the \
                     generation prompt"
                ))
            } else if !full.starts_with(&upto) {
                Some(format!(
                    "the whole conversation's render does not start with its render up to messages[{i}] (the \
                     template changes earlier turns when more follow)"
                ))
            } else {
                None
            };
            if let Some(why) = broken {
                return Err(format!(
                    "the chat template does not render this conversation incrementally: {why}; the trained tokens \
                     of messages[{i}] cannot be found"
                ));
            }
            let turn = &upto[prefix.len()..];
            let owned = self
                .end_of_turn
                .iter()
                .filter_map(|end| turn.find(end.as_str()).map(|at| at + end.len()))
                .min()
                .unwrap_or(turn.len());
            spans.push(prefix.len()..prefix.len() + owned);
        }
        let spans = merge(spans);

        let encoding = self
            .offsets
            .encode(full.as_str(), false)
            .map_err(|e| format!("tokenizing the rendered conversation: {e}"))?;
        let mut tokens = encoding.get_ids().to_vec();
        let mut targets: Vec<bool> = encoding
            .get_offsets()
            .iter()
            .enumerate()
            .map(|(t, &(start, _))| t > 0 && in_spans(&spans, start))
            .collect();
        if targets.len() != tokens.len() {
            return Err("the tokenizer gave offsets that do not match its tokens".into());
        }

        let len = tokens.len();
        let limit = opts.max_seq_len;
        let truncated = len > limit;
        if truncated {
            if opts.overflow == Overflow::Refuse {
                return Err(format!("the example is {len} tokens, longer than max_seq_len ({limit} tokens)"));
            }
            tokens.truncate(limit);
            targets.truncate(limit);
        }
        if !targets.contains(&true) {
            return Err(if truncated {
                format!(
                    "no trained token is left after truncating the example from {len} to max_seq_len ({limit}) \
                     tokens; the assistant turns all start after the cut"
                )
            } else {
                "no token is trained: the chat template renders the trained assistant messages as nothing".into()
            });
        }
        Ok(Built { tokens, targets, truncated })
    }

    fn render(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        generation: bool,
        what: &str,
    ) -> Result<String, String> {
        let list = Value::Array(messages.to_vec());
        self.template.render(&list, tools, generation, None).map_err(|e| match e {
            TokenizerError::TemplateRaised(m) => format!("the chat template refused {what}: {m}"),
            TokenizerError::TemplateRender(m) => format!("the chat template could not render {what}: {m}"),
            other => format!("rendering {what}: {other}"),
        })
    }
}

/// Sorted, disjoint spans covering the same bytes.
fn merge(mut spans: Vec<Range<usize>>) -> Vec<Range<usize>> {
    spans.retain(|s| !s.is_empty());
    spans.sort_by_key(|s| s.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.start <= last.end => last.end = last.end.max(s.end),
            _ => out.push(s),
        }
    }
    out
}

fn in_spans(spans: &[Range<usize>], at: usize) -> bool {
    let i = spans.partition_point(|s| s.end <= at);
    spans.get(i).is_some_and(|s| s.contains(&at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_merge_and_lookup() {
        let spans = merge(vec![10..12, 0..3, 2..5, 7..7, 12..14]);
        assert_eq!(spans, vec![0..5, 10..14]);
        let inside: Vec<usize> = (0..16).filter(|&at| in_spans(&spans, at)).collect();
        assert_eq!(inside, vec![0, 1, 2, 3, 4, 10, 11, 12, 13]);
        assert!(!in_spans(&[], 0));
    }
}
