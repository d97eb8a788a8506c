//! Any bytes as a completions or chat request body. The harness is `tandem::fuzz_harness::openai_request`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/openai_request
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::openai_request(data);
});
