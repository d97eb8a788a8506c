//! The fuzz targets' seed corpora (fuzz/seeds/, written by
//! scripts/fixtures/fuzz_seeds.py) run through the very harnesses the fuzz
//! targets call (`tandem::fuzz_harness`): no seed panics, the valid seeds get
//! past the parser (so every target starts fuzzing on its success path, not in
//! front of a harness that refuses everything), and the edge-case seeds are
//! refused as errors.

use std::path::{Path, PathBuf};

use tandem::fuzz_harness as h;
use tandem::tokenizer::Tokenizer;

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fixtures/fuzz_seeds.py)", dir.display()))
        .map(|e| {
            let p: PathBuf = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Seeds whose names say they are edge cases the parser must refuse.
fn meant_to_fail(name: &str) -> bool {
    [
        "truncated",
        "magic-only",
        "too-long",
        "crash",
        "not-json",
        "bad-",
        "mismatch",
        "refused",
        "zero-weight",
        "unknown",
        "no-assistant",
        "refuse-short",
    ]
    .iter()
    .any(|m| name.contains(m))
}

fn check(target: &str, harness: impl Fn(&[u8]) -> bool) {
    let all = seeds(target);
    assert!(all.len() >= 3, "{target}: {} seeds", all.len());
    let mut accepted = 0;
    for (name, data) in &all {
        let ok = harness(data);
        assert_eq!(ok, !meant_to_fail(name), "{target}/{name}: accepted = {ok}");
        accepted += usize::from(ok);
    }
    assert!(accepted >= 1, "{target}: no seed reaches the success path");
}

#[test]
fn every_fuzz_target_starts_on_its_success_path() {
    check("gguf_parse", h::gguf_parse);
    check("safetensors_parse", h::safetensors_parse);
    check("chat_template", h::chat_template);
    check("openai_request", h::openai_request);
    check("peft_adapter", h::peft_adapter);
    let tok = Tokenizer::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/qwen2/hf-f32/tokenizer.json"),
    )
    .unwrap();
    check("train_jsonl", |d| h::train_jsonl(d, &tok));
    check("quant_checkpoint", h::quant_checkpoint);
    check("route_and_key_config", h::route_and_key_config);
    check("multipart_upload", h::multipart_upload);
}
