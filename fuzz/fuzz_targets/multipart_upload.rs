//! A `POST /v1/files` multipart body, chunked as the first byte says. The
//! harness is `tandem::fuzz_harness::multipart_upload` (shared with
//! tests/fuzz_seeds.rs, which checks the seeds in fuzz/seeds/multipart_upload
//! reach its success path).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem::fuzz_harness::multipart_upload(data);
});
