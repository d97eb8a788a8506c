//! Any bytes: `GgufFile::from_bytes` returns, never panics, and every accessor of
//! a file it accepts stays in bounds. Seed corpus: tests/fixtures/gguf/*.gguf.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::loader::gguf::GgufFile;
use tandem::quant::ggml::dequantize;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    for t in &f.tensors {
        let bytes = f.tensor_data(t);
        assert_eq!(bytes.len() as u64, t.n_bytes());
        // Small tensors only: dequantising is not what is being fuzzed.
        if t.n_elements() <= 4096 {
            let mut out = vec![0f32; t.n_elements() as usize];
            dequantize(t.ty, bytes, &mut out).expect("validated tensor dequantises");
        }
    }
    for k in f.metadata.keys() {
        let _ = (f.get_u64(k), f.get_f32(k), f.get_str(k), f.get_str_array(k));
    }
    let _ = f.architecture();
});
