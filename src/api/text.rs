//! Generated token ids -> text, off the engine thread: incremental UTF-8-safe
//! detokenization (`DecodeStream`) feeding a stop-string matcher.
//!
//! The matcher holds back the longest tail of the text that could still become a
//! stop string, so a streaming client never sees the start of a stop string that
//! later completes (vLLM does the same). The first stop string found ends the
//! text: everything from it on is dropped (or kept, with
//! `include_stop_str_in_output`).

use std::sync::Arc;

use crate::tokenizer::{DecodeStream, Tokenizer, TokenizerError};

/// What one step of text produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextStep {
    /// Text that is final and may go to the client.
    pub text: String,
    /// The stop string that matched; generation must end.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop: bool,
    /// Text not yet released: it ends in what could be the start of a stop string.
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>, include_stop: bool) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), include_stop, pending: String::new() }
    }

    /// Adds `text`; returns what can be released now.
    pub fn push(&mut self, text: &str) -> TextStep {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return TextStep { text: std::mem::take(&mut self.pending), stopped: None };
        }
        // Earliest match wins; at equal positions the longer stop string (the
        // more specific one). Earlier text had no full match, so any match here
        // ends in the new text.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, stop)) = found {
            let end = if self.include_stop { at + stop.len() } else { at };
            let stop = stop.clone();
            let text = self.pending[..end].to_string();
            self.pending.clear();
            return TextStep { text, stopped: Some(stop) };
        }
        let keep = self.stops.iter().map(|s| partial_suffix(&self.pending, s)).max().unwrap_or(0);
        // A suffix equal to a stop string's prefix starts on a character boundary:
        // its first byte equals the stop string's first byte, which is no
        // continuation byte.
        let cut = self.pending.len() - keep;
        let rest = self.pending.split_off(cut);
        TextStep { text: std::mem::replace(&mut self.pending, rest), stopped: None }
    }

    /// End of generation: nothing more can complete a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn partial_suffix(text: &str, stop: &str) -> usize {
    let (t, s) = (text.as_bytes(), stop.as_bytes());
    (1..s.len().min(t.len() + 1)).rev().find(|&k| t.ends_with(&s[..k])).unwrap_or(0)
}

/// One choice's text: token ids in, releasable text out.
pub struct TextDecoder {
    tokenizer: Arc<Tokenizer>,
    stream: DecodeStream,
    stops: StopMatcher,
}

/// Prompt ids the decoder sees as context, so the first generated token decodes
/// as it would mid-text (a SentencePiece leading space is kept, as vLLM does).
const CONTEXT_TOKENS: usize = 4;

impl TextDecoder {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt: &[u32],
        stops: Vec<String>,
        include_stop: bool,
        skip_special_tokens: bool,
    ) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            tokenizer,
            stream: DecodeStream::with_context(context, skip_special_tokens),
            stops: StopMatcher::new(stops, include_stop),
        }
    }

    pub fn push_token(&mut self, id: u32) -> Result<TextStep, TokenizerError> {
        match self.stream.step(&self.tokenizer, id)? {
            Some(piece) => Ok(self.stops.push(&piece)),
            None => Ok(TextStep::default()),
        }
    }

    /// Generation ended: the decoder's held-back bytes may still complete a stop
    /// string; then whatever is pending is final.
    pub fn finish(&mut self) -> Result<TextStep, TokenizerError> {
        let tail = self.stream.flush(&self.tokenizer)?;
        let mut step = self.stops.push(&tail);
        if step.stopped.is_none() {
            step.text.push_str(&self.stops.finish());
        }
        Ok(step)
    }
}

/// The UTF-8 bytes of one token on its own. A token that is part of a multi-byte
/// character does not decode to valid text by itself; its bytes come from the
/// vocabulary entry (`<0xNN>` byte fallback, or GPT-2's byte-to-unicode map).
pub fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let text = tokenizer.decode(&[id], false).unwrap_or_default();
    if !text.contains('\u{FFFD}') {
        return text.into_bytes();
    }
    if let Some(piece) = tokenizer.id_to_token(id) {
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|r| r.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        if let Some(bytes) = piece.chars().map(gpt2_byte).collect::<Option<Vec<u8>>>() {
            return bytes;
        }
    }
    text.into_bytes()
}

/// GPT-2's byte-level BPE writes byte b as a printable character: printable
/// Latin-1 bytes as themselves, the other 68 as U+0100 + their rank.
fn gpt2_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let c = c as u32;
    if c < 0x100 {
        return printable(c).then_some(c as u8);
    }
    let rank = c - 0x100;
    (0u32..256).filter(|&b| !printable(b)).nth(rank as usize).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the concatenated released text and the stop.
    fn run(stops: &[&str], include: bool, pieces: &[&str]) -> (Vec<String>, Option<String>, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect(), include);
        let mut out = vec![];
        for p in pieces {
            let s = m.push(p);
            out.push(s.text);
            if s.stopped.is_some() {
                return (out, s.stopped, String::new());
            }
        }
        let tail = m.finish();
        (out, None, tail)
    }

    #[test]
    fn holds_back_a_possible_stop_across_pieces() {
        let (out, stop, _) = run(&["END"], false, &["abc E", "N", "D more"]);
        assert_eq!(out, vec!["abc ", "", ""]);
        assert_eq!(stop.as_deref(), Some("END"));
        // A false start is released as soon as it cannot match.
        let (out, stop, tail) = run(&["END"], false, &["abc E", "Nx", "E"]);
        assert_eq!(out, vec!["abc ", "ENx", ""]);
        assert_eq!(stop, None);
        assert_eq!(tail, "E", "held text comes out at the end");
    }

    #[test]
    fn earliest_stop_wins_and_include_keeps_it() {
        let (out, stop, _) = run(&["world", "lo"], false, &["hello world"]);
        assert_eq!((out[0].as_str(), stop.as_deref()), ("hel", Some("lo")));
        let (out, stop, _) = run(&["o w", "o"], true, &["hello world"]);
        assert_eq!((out[0].as_str(), stop.as_deref()), ("hello w", Some("o w")), "longer stop at the same place");
        let (out, stop, _) = run(&["x"], false, &["x"]);
        assert_eq!((out[0].as_str(), stop.as_deref()), ("", Some("x")));
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        // "é" is C3 A9, "ë" is C3 AB: a stop "éa" shares the first byte with "ë".
        let (out, stop, tail) = run(&["éa"], false, &["caf", "é", "ë", "!"]);
        assert_eq!(out, vec!["caf", "", "éë", "!"]);
        assert_eq!((stop, tail.as_str()), (None, ""));
        let (out, stop, _) = run(&["日本"], false, &["今日", "本は"]);
        assert_eq!(out, vec!["今", ""]);
        assert_eq!(stop.as_deref(), Some("日本"));
        for s in out {
            assert!(std::str::from_utf8(s.as_bytes()).is_ok());
        }
    }

    #[test]
    fn no_stops_releases_everything() {
        let (out, stop, tail) = run(&[], false, &["a", "b"]);
        assert_eq!((out, stop, tail), (vec!["a".to_string(), "b".to_string()], None, String::new()));
    }

    #[test]
    fn gpt2_byte_map_is_a_bijection() {
        let mut seen = [false; 256];
        for c in (0x21u32..0x100).chain(0x100..0x144).filter_map(char::from_u32) {
            if let Some(b) = gpt2_byte(c) {
                assert!(!seen[b as usize], "byte {b} twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(gpt2_byte('Ġ'), Some(b' '));
        assert_eq!(gpt2_byte('Ċ'), Some(b'\n'));
    }

    fn tiny_tokenizer() -> Arc<Tokenizer> {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/tiny_bpe/tokenizer.json");
        Arc::new(Tokenizer::from_file(&p).unwrap())
    }

    #[test]
    fn decoder_output_equals_decode_and_stops_across_tokens() {
        let tok = tiny_tokenizer();
        let text = "héllo wörld, stop here";
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() > 8, "byte-level tokens: {}", ids.len());
        let mut d = TextDecoder::new(tok.clone(), &[], vec![], false, true);
        let mut out = String::new();
        for &id in &ids {
            out += &d.push_token(id).unwrap().text;
        }
        out += &d.finish().unwrap().text;
        assert_eq!(out, tok.decode(&ids, true).unwrap());

        let mut d = TextDecoder::new(tok.clone(), &[], vec!["stop".into()], false, true);
        let mut out = String::new();
        let mut stopped = None;
        for &id in &ids {
            let s = d.push_token(id).unwrap();
            out += &s.text;
            if s.stopped.is_some() {
                stopped = s.stopped;
                break;
            }
        }
        assert_eq!((out.as_str(), stopped.as_deref()), ("héllo wörld, ", Some("stop")));
    }

    #[test]
    fn token_bytes_of_partial_characters() {
        let tok = tiny_tokenizer();
        let ids = tok.encode("ö", false).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| token_bytes(&tok, i)).collect();
        assert_eq!(bytes, "ö".as_bytes());
    }
}
