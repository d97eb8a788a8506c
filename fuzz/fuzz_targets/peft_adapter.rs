//! A PEFT adapter: config length / 4, config, safetensors. The harness is `tandem::fuzz_harness::peft_adapter`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/peft_adapter
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::peft_adapter(data);
});
