//! Any bytes as a training file (first byte: options). The harness is
//! `tandem::fuzz_harness::train_jsonl` (shared with tests/fuzz_seeds.rs, which
//! checks the seeds in fuzz/seeds/train_jsonl reach its success path); the
//! tokenizer is the tiny fixture's (ChatML template), so no model is needed.
#![no_main]

use std::sync::OnceLock;

use tandem::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny/qwen2/hf-f32/tokenizer.json");
        Tokenizer::from_file(std::path::Path::new(path)).expect("the tiny fixture tokenizer")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::train_jsonl(data, tokenizer());
});
