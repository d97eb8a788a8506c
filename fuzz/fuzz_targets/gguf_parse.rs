//! Any bytes as a GGUF file. The harness is `tandem::fuzz_harness::gguf_parse`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/gguf_parse
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::gguf_parse(data);
});
