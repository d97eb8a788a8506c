//! Parts of a GPTQ / AWQ / bitsandbytes checkpoint. The harness is `tandem::fuzz_harness::quant_checkpoint`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/quant_checkpoint
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::quant_checkpoint(data);
});
