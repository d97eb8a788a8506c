//! Any bytes: `SafetensorsFile::from_bytes` returns, never panics, and every tensor
//! of a file it accepts has exactly dtype × shape bytes inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::loader::safetensors::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes(data.to_vec()) else {
        return;
    };
    for name in f.names() {
        let t = f.tensor(name).expect("listed tensor is readable");
        let n: usize = t.shape.iter().product();
        assert_eq!(n * t.dtype.size_bytes(), t.data.len());
        assert_eq!(f.tensor_range(name).map(|r| r.len()), Some(t.data.len()));
    }
});
