//! A chat template source, NUL, then messages as JSON. The harness is `tandem::fuzz_harness::chat_template`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/chat_template
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::chat_template(data);
});
