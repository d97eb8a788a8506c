//! GGUF reader: a file written by gguf-py's GGUFWriter read back exactly, hand-broken
//! files rejected with clear errors (never a panic), mutations fuzzed with proptest,
//! and the default model's header when it is present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{json, Value};
use tandem::loader::gguf::{GgufError, GgufFile, GgufValue};
use tandem::quant::ggml::{dequantize, WeightKind};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/gguf/small.gguf")).unwrap()
}

/// The form scripts/fixtures/gguf_quants.py writes expected values in.
fn render(v: &GgufValue) -> Value {
    match v {
        GgufValue::U8(x) => json!({"t": "u8", "v": x}),
        GgufValue::I8(x) => json!({"t": "i8", "v": x}),
        GgufValue::U16(x) => json!({"t": "u16", "v": x}),
        GgufValue::I16(x) => json!({"t": "i16", "v": x}),
        GgufValue::U32(x) => json!({"t": "u32", "v": x}),
        GgufValue::I32(x) => json!({"t": "i32", "v": x}),
        GgufValue::U64(x) => json!({"t": "u64", "v": x}),
        GgufValue::I64(x) => json!({"t": "i64", "v": x}),
        GgufValue::F32(x) => json!({"t": "f32", "bits": x.to_bits()}),
        GgufValue::F64(x) => json!({"t": "f64", "bits": x.to_bits()}),
        GgufValue::Bool(x) => json!({"t": "bool", "v": x}),
        GgufValue::String(x) => json!({"t": "string", "v": x}),
        GgufValue::Array(items) => {
            json!({"t": "array", "items": items.iter().map(render).collect::<Vec<_>>()})
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_against_expected(f: &GgufFile) {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/gguf/small.expected.json")).unwrap())
            .unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, expected["alignment"].as_u64().unwrap());
    assert_eq!(f.data_offset % f.alignment, 0);

    let got: serde_json::Map<String, Value> = f.metadata.iter().map(|(k, v)| (k.clone(), render(v))).collect();
    let want = expected["metadata"].as_object().unwrap();
    assert_eq!(got.len(), want.len(), "keys: {:?}", got.keys().collect::<Vec<_>>());
    for (k, w) in want {
        assert_eq!(got.get(k), Some(w), "metadata key {k}");
    }

    let want_tensors = expected["tensors"].as_array().unwrap();
    assert_eq!(f.tensors.len(), want_tensors.len());
    let mapped = f.mapped();
    let all = mapped.bytes();
    for (t, w) in f.tensors.iter().zip(want_tensors) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let dims: Vec<u64> = w["ne"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(t.dims, dims, "{}", t.name);
        assert_eq!(u64::from(t.ty.gguf_id().unwrap()), w["type_id"].as_u64().unwrap(), "{}", t.name);
        assert_eq!(t.offset % f.alignment, 0);
        let data = f.tensor_data(t);
        assert_eq!(hex(data), w["hex"].as_str().unwrap(), "bytes of {}", t.name);
        assert_eq!(data.len() as u64, t.n_bytes());
        let start = (f.data_offset + t.offset) as usize;
        assert_eq!(&all[start..start + data.len()], data);
        assert_eq!(f.tensor(&t.name), Some(t));
    }
}

#[test]
fn reads_gguf_py_fixture_exactly() {
    let f = GgufFile::open(&root().join("tests/fixtures/gguf/small.gguf")).unwrap();
    check_against_expected(&f);
    let g = GgufFile::from_bytes(fixture_bytes()).unwrap();
    check_against_expected(&g);
}

#[test]
fn accessors() {
    let f = GgufFile::from_bytes(fixture_bytes()).unwrap();
    assert_eq!(f.architecture(), Some("testarch"));
    assert_eq!(f.get_u64("testarch.block_count"), Some(2)); // u32 on disk
    assert_eq!(f.get_u64("testarch.context_length"), Some(4096)); // u64 on disk
    assert_eq!(f.get_u64("test.u8"), Some(200));
    assert_eq!(f.get_u64("test.i8"), None); // negative
    assert_eq!(f.get_u64("test.string"), None);
    assert_eq!(f.get_f32("test.f32"), Some(0.1));
    assert_eq!(f.get_f32("test.f64"), Some(std::f64::consts::E as f32));
    assert_eq!(f.get_str("test.string"), Some("héllo, wörld ✓"));
    assert_eq!(f.get("test.bool_true").and_then(|v| v.as_bool()), Some(true));
    assert_eq!(f.get_str_array("test.arr_str"), Some(vec!["a", "bb", "", "ccc"]));
    assert_eq!(f.get_str_array("test.arr_i32"), None);
    let nested = f.get("test.nested").unwrap().as_array().unwrap();
    assert_eq!(nested[1].as_array().unwrap()[2].as_u64(), Some(5));
    assert!(f.get("missing").is_none());
    assert!(f.tensor("missing").is_none());
    let t = f.tensor("blk.0.q4_k").unwrap();
    assert_eq!((t.ty, t.n_elements(), t.n_bytes()), (WeightKind::Q4K, 512, 288));
    let t = f.tensor("blk.0.cube").unwrap();
    assert_eq!((t.n_elements(), t.n_bytes()), (24, 96));
    // A tensor's bytes dequantise the same as the quant fixture they were cut from.
    let mut out = vec![0f32; 512];
    dequantize(t.ty, f.tensor_data(t), &mut out[..24]).unwrap();
}

#[test]
fn version_2_is_read() {
    let mut b = fixture_bytes();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    let f = GgufFile::from_bytes(b).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.tensors.len(), 9);
}

#[test]
fn every_truncation_is_an_error_until_the_last_tensor_ends() {
    let b = fixture_bytes();
    let f = GgufFile::from_bytes(b.clone()).unwrap();
    let last_end = f.tensors.iter().map(|t| f.data_offset + t.offset + t.n_bytes()).max().unwrap() as usize;
    for cut in 0..b.len() {
        let r = GgufFile::from_bytes(b[..cut].to_vec());
        if cut < last_end {
            let e = r.expect_err(&format!("cut at {cut} must fail"));
            assert!(!e.to_string().is_empty());
        } else {
            // Only trailing padding is missing.
            r.unwrap();
        }
    }
}

/// Builds GGUF bytes by hand.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut b = B(b"GGUF".to_vec());
        b.u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pad to 32 and append `n` data bytes.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let mut v = self.0.clone();
        v.resize(v.len().div_ceil(32) * 32, 0);
        v.resize(v.len() + n, 0xAB);
        v
    }
}

fn err(bytes: Vec<u8>) -> GgufError {
    match GgufFile::from_bytes(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e,
    }
}

#[test]
fn minimal_hand_built_file_parses() {
    let mut b = B::header(3, 2, 1);
    b.kv_u32("general.alignment", 32).tensor("a", &[4], 0, 0).tensor("b", &[32, 2], 8, 32);
    let f = GgufFile::from_bytes(b.data(32 + 68)).unwrap();
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensor_data(f.tensor("b").unwrap()).len(), 68);
    // No tensors, no padding, no data: fine.
    GgufFile::from_bytes(B::header(3, 0, 0).0).unwrap();
}

#[test]
fn header_errors() {
    assert!(matches!(err(b"GGML\x03\0\0\0".to_vec()), GgufError::BadMagic(_)));
    assert!(matches!(err(b"GG".to_vec()), GgufError::Truncated { .. }));
    assert!(matches!(err(B::header(1, 0, 0).0), GgufError::Version1));
    assert!(matches!(err(B::header(4, 0, 0).0), GgufError::UnsupportedVersion(4)));
    assert!(matches!(err(B::header(0, 0, 0).0), GgufError::UnsupportedVersion(0)));
    assert!(matches!(err(B::header(3u32.swap_bytes(), 0, 0).0), GgufError::BigEndian));
    let e = err(B::header(3, u64::MAX, 0).0);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    let e = err(B::header(3, 0, u64::MAX).0);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    // A plausible-looking but impossible count in a larger file.
    let mut b = B::header(3, 0, 1_000_000);
    b.0.resize(4096, 0);
    assert!(matches!(err(b.0), GgufError::CountTooLarge { .. }));
}

#[test]
fn metadata_errors() {
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(0).u64(u64::MAX); // u8 array of 2^64 elements
    assert!(matches!(err(b.0), GgufError::CountTooLarge { .. }));

    let mut b = B::header(3, 0, 1);
    b.str("k").u32(8).u64(u64::MAX - 3); // huge string
    assert!(matches!(err(b.0), GgufError::StringTooLong { .. }));

    let mut b = B::header(3, 0, 1);
    b.u64(u64::MAX); // huge key length
    b.0.resize(b.0.len() + 16, 0);
    assert!(matches!(err(b.0), GgufError::StringTooLong { .. }));

    let mut b = B::header(3, 0, 1);
    b.str("k").u32(13).u32(0);
    let e = err(b.0);
    assert!(matches!(&e, GgufError::BadValueType { key, ty: 13 } if key == "k"), "{e}");

    let mut b = B::header(3, 0, 1);
    b.str("k").u32(9).u32(77).u64(1).u32(0);
    assert!(matches!(err(b.0), GgufError::BadValueType { ty: 77, .. }));

    let mut b = B::header(3, 0, 2);
    b.kv_u32("dup", 1).kv_u32("dup", 2);
    assert!(matches!(err(b.0), GgufError::DuplicateKey(k) if k == "dup"));

    let mut b = B::header(3, 0, 1);
    b.u64(2);
    b.0.extend_from_slice(&[0xFF, 0xFE]);
    b.u32(4).u32(0);
    assert!(matches!(err(b.0), GgufError::BadUtf8 { .. }));

    // Arrays nested 100 deep: refused before the stack is at risk.
    let mut b = B::header(3, 0, 1);
    b.str("deep");
    b.u32(9);
    for _ in 0..100 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    b.0.resize(b.0.len() + 64, 0);
    assert!(matches!(err(b.0), GgufError::ArrayTooDeep { .. }));

    // Invalid UTF-8 in a string *value* is kept (lossily), as ggml does.
    let mut b = B::header(3, 0, 1);
    b.str("tok").u32(8).u64(1);
    b.0.push(0xFF);
    let f = GgufFile::from_bytes(b.0).unwrap();
    assert_eq!(f.get_str("tok"), Some("\u{FFFD}"));
}

#[test]
fn alignment_errors() {
    for bad in [0u32, 48, 3] {
        let mut b = B::header(3, 0, 1);
        b.kv_u32("general.alignment", bad);
        assert!(matches!(err(b.0), GgufError::BadAlignment(_)), "{bad}");
    }
    let mut b = B::header(3, 0, 1);
    b.str("general.alignment").u32(10).u64(32); // u64, not u32
    assert!(matches!(err(b.0), GgufError::BadAlignment(_)));
}

#[test]
fn tensor_info_errors() {
    let one = |name: &str, dims: &[u64], ty: u32, offset: u64, data: usize| {
        let mut b = B::header(3, 1, 0);
        b.tensor(name, dims, ty, offset);
        err(b.data(data))
    };
    let e = one("w", &[64], 0, 32, 64 * 4);
    assert!(matches!(e, GgufError::OutOfBounds { .. }), "{e}");
    assert!(e.to_string().contains("'w'"));
    let e = one("w", &[4], 0, 8, 64);
    assert!(matches!(e, GgufError::Misaligned { offset: 8, .. }), "{e}");
    let e = one("w", &[4], 0, u64::MAX - 31, 64);
    assert!(matches!(e, GgufError::Misaligned { .. } | GgufError::OutOfBounds { .. }), "{e}");
    let e = one("blk.0.attn_q.weight", &[32], 3, 0, 64);
    assert!(matches!(e, GgufError::UnsupportedType { id: 3, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains('3') && msg.contains("Q4_1"), "{msg}");
    let e = one("w", &[32], 99, 0, 64);
    assert!(matches!(e, GgufError::UnsupportedType { id: 99, .. }), "{e}");
    let e = one("w", &[1, 1, 1, 1, 1], 0, 0, 64);
    assert!(matches!(e, GgufError::TooManyDims { n_dims: 5, .. }), "{e}");
    let long = "x".repeat(64);
    let e = one(&long, &[1], 0, 0, 64);
    assert!(matches!(e, GgufError::TensorNameTooLong { len: 64, .. }), "{e}");
    let e = one("q", &[33], 2, 0, 64); // Q4_0 rows must be whole 32-element blocks
    assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
    let e = one("big", &[u64::MAX, u64::MAX], 0, 0, 64);
    assert!(matches!(e, GgufError::BadShape { .. }), "{e}");
    let e = one("big", &[1 << 40, 1 << 40], 0, 0, 64);
    assert!(matches!(e, GgufError::BadShape { .. } | GgufError::OutOfBounds { .. }), "{e}");

    let mut b = B::header(3, 2, 0);
    b.tensor("same", &[1], 0, 0).tensor("same", &[1], 0, 32);
    assert!(matches!(err(b.data(64)), GgufError::DuplicateTensor(n) if n == "same"));

    // A name with 63 bytes is the longest allowed.
    let mut b = B::header(3, 1, 0);
    b.tensor(&"y".repeat(63), &[1], 0, 0);
    GgufFile::from_bytes(b.data(4)).unwrap();
}

/// Touch everything a parsed file offers; any panic fails the property.
fn exercise(f: &GgufFile) {
    let mut total = 0usize;
    for t in &f.tensors {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.n_bytes());
        total += d.len();
        if t.n_elements() <= 4096 {
            let mut out = vec![0f32; t.n_elements() as usize];
            dequantize(t.ty, d, &mut out).unwrap();
        }
    }
    for (k, v) in &f.metadata {
        let _ = (f.get_u64(k), f.get_f32(k), f.get_str(k), f.get_str_array(k), v.as_bool());
    }
    let _ = (f.architecture(), total, format!("{f:?}"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_fixture_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut b = fixture_bytes();
        for (pos, byte) in edits {
            let i = pos % b.len();
            b[i] = byte;
        }
        if let Some(cut) = cut {
            b.truncate(cut % (b.len() + 1));
        }
        if let Ok(f) = GgufFile::from_bytes(b) {
            exercise(&f);
        }
    }

    #[test]
    fn random_bytes_after_header_never_panic(
        n_tensors in 0u64..4,
        n_kv in 0u64..4,
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut b = B::header(3, n_tensors, n_kv);
        b.0.extend_from_slice(&tail);
        if let Ok(f) = GgufFile::from_bytes(b.0) {
            exercise(&f);
        }
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3))
}

#[test]
fn default_model_header() {
    let path = root().join("models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    if !Path::new(&path).exists() {
        eprintln!("skipping: {} missing (scripts/get-default-model.sh fetches it)", path.display());
        return;
    }
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensors.len(), 291);
    assert_eq!(f.metadata.len(), 26);
    assert_eq!(f.architecture(), Some("qwen2"));
    assert_eq!(f.get_u64("qwen2.block_count"), Some(24));
    assert_eq!(f.get_u64("qwen2.embedding_length"), Some(896));
    assert_eq!(f.get_u64("general.quantization_version"), Some(2));
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").map(|t| t.len()), Some(151936));
    let mut hist: BTreeMap<String, usize> = BTreeMap::new();
    for t in &f.tensors {
        *hist.entry(format!("{:?}", t.ty)).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = [("Q5_0", 133), ("F32", 121), ("Q8_0", 13), ("Q6K", 12), ("Q4K", 12)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(hist, want);

    // Row 0 of the first tensor of each type dequantises as gguf-py does.
    let rows: Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/gguf/default_model_rows.json")).unwrap())
            .unwrap();
    for r in rows.as_array().unwrap() {
        let t = f.tensor(r["name"].as_str().unwrap()).unwrap();
        assert_eq!(u64::from(t.ty.gguf_id().unwrap()), r["type_id"].as_u64().unwrap());
        let ne0 = t.dims[0] as usize;
        let row_bytes = t.ty.row_bytes(ne0).unwrap();
        let mut out = vec![0f32; ne0];
        dequantize(t.ty, &f.tensor_data(t)[..row_bytes], &mut out).unwrap();
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(format!("{:016x}", fnv1a64(&bytes)), r["fnv1a64"].as_str().unwrap(), "{}", t.name);
        let first: Vec<u64> = out[..8].iter().map(|v| u64::from(v.to_bits())).collect();
        let want: Vec<u64> = r["first_bits"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(first, want, "{}", t.name);
    }
}
