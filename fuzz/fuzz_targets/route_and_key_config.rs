//! A route spec (JSON) or an `[auth]` section (TOML). The harness is `tandem::fuzz_harness::route_and_key_config`
//! (shared with tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/route_and_key_config
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::route_and_key_config(data);
});
