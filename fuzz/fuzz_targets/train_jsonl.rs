//! Any bytes as a training file: `parse_jsonl` returns a dataset or an error,
//! never panics, and what it accepts keeps its invariants. The tokenizer is the
//! tiny fixture's (ChatML template, `<|im_end|>` eos), so no model is needed.
//! The first byte picks the options (max_seq_len, overflow); the rest is the file.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tandem::tokenizer::Tokenizer;
use tandem::train::data::{parse_jsonl, DataOptions, Overflow};

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/qwen2/hf-f32/tokenizer.json");
        Tokenizer::from_file(std::path::Path::new(path)).expect("the tiny fixture tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, file)) = data.split_first() else { return };
    let opts = DataOptions {
        max_seq_len: usize::from(knob & 0x7f) * 4,
        overflow: if knob & 0x80 == 0 { Overflow::Truncate } else { Overflow::Refuse },
        max_issues: 8,
    };
    if let Ok(ds) = parse_jsonl(file, tokenizer(), &opts) {
        for ex in &ds.examples {
            assert_eq!(ex.tokens.len(), ex.targets.len());
            assert!(ex.tokens.len() <= opts.max_seq_len);
            assert!(!ex.targets[0] && ex.targets.contains(&true));
        }
    }
});
