//! safetensors reader: files built by hand in-test, a sharded directory with an
//! index, broken files rejected, pickle-only directories refused, and proptest
//! fuzzing that random or mutated bytes never panic.

use std::path::Path;

use proptest::prelude::*;
use serde_json::json;
use tandem::loader::safetensors::{
    serialize_with_metadata, SafetensorsError, SafetensorsFile, SafetensorsModel, StDtype,
};

/// safetensors bytes for `(name, dtype, shape, data)` tensors laid out in order.
fn build(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], metadata: Option<serde_json::Value>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.to_string(), json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    with_header(&serde_json::to_vec(&header).unwrap(), &data)
}

fn with_header(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample() -> Vec<u8> {
    build(
        &[
            ("model.embed_tokens.weight", "F32", vec![2, 3], f32_bytes(&[1., 2., 3., 4., 5., 6.])),
            ("model.norm.weight", "BF16", vec![4], vec![0x80, 0x3F, 0, 0x40, 0, 0, 0, 0xBF]),
            ("ids", "I64", vec![2], [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect()),
            ("flag", "BOOL", vec![], vec![1]),
            ("empty", "F16", vec![0, 5], vec![]),
        ],
        Some(json!({"format": "pt"})),
    )
}

#[test]
fn reads_hand_built_file() {
    let bytes = sample();
    let f = SafetensorsFile::from_bytes(bytes.clone()).unwrap();
    assert_eq!(f.names(), vec!["empty", "flag", "ids", "model.embed_tokens.weight", "model.norm.weight"]);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    let t = f.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(t.dtype, StDtype::F32);
    assert_eq!(t.shape, &[2, 3]);
    assert_eq!(t.data, f32_bytes(&[1., 2., 3., 4., 5., 6.]).as_slice());
    let n = f.tensor("model.norm.weight").unwrap();
    assert_eq!((n.dtype, n.data.len()), (StDtype::BF16, 8));
    assert_eq!(f.tensor("flag").unwrap().shape, &[] as &[usize]);
    assert_eq!(f.tensor("flag").unwrap().data, &[1]);
    assert_eq!(f.tensor("empty").unwrap().data.len(), 0);
    assert!(f.tensor("nope").is_none());

    let range = f.tensor_range("ids").unwrap();
    let mapped = f.mapped();
    assert_eq!(&mapped.bytes()[range.clone()], f.tensor("ids").unwrap().data);
    assert!(range.start >= f.data_offset());
    assert_eq!(StDtype::I64.size_bytes(), 8);
    assert_eq!(f.info("ids").unwrap().n_elements(), 2);
}

#[test]
fn written_files_round_trip() {
    let ids: Vec<u8> = [3i64, -9].iter().flat_map(|x| x.to_le_bytes()).collect();
    let w = f32_bytes(&[0.5, -2.0]);
    let bytes = serialize_with_metadata(
        &[("b.ids", StDtype::I64, &[2], &ids), ("a.w", StDtype::F32, &[1, 2], &w), ("c", StDtype::U8, &[0], &[])],
        &[("format", "pt")],
    );
    assert_eq!((bytes.len() - 8 - (ids.len() + w.len())) % 8, 0, "header padded to 8 bytes");
    let f = SafetensorsFile::from_bytes(bytes).unwrap();
    assert_eq!(f.names(), vec!["a.w", "b.ids", "c"]);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(f.tensor("a.w").unwrap().data, w.as_slice());
    assert_eq!(f.tensor("b.ids").unwrap().data, ids.as_slice());
    assert_eq!(f.tensor("c").unwrap().shape, &[0]);
}

#[test]
fn opens_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, sample()).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names().len(), 5);
    // Errors from open name the file.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x01\0\0\0\0\0\0\0{").unwrap();
    let msg = SafetensorsFile::open(&bad).unwrap_err().to_string();
    assert!(msg.contains("bad.safetensors"), "{msg}");
    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(SafetensorsFile::open(&empty).is_err());
    assert!(matches!(SafetensorsFile::open(&dir.path().join("missing.safetensors")), Err(SafetensorsError::Io { .. })));
}

fn err(bytes: Vec<u8>) -> SafetensorsError {
    match SafetensorsFile::from_bytes(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e,
    }
}

fn one(entry: serde_json::Value, data: usize) -> SafetensorsError {
    let header = serde_json::to_vec(&json!({ "w": entry })).unwrap();
    err(with_header(&header, &vec![0u8; data]))
}

#[test]
fn broken_files_are_errors() {
    assert!(matches!(err(vec![]), SafetensorsError::TooShort(0)));
    assert!(matches!(err(vec![1, 2, 3]), SafetensorsError::TooShort(3)));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(matches!(err(huge), SafetensorsError::HeaderLength { .. }));
    let mut past_end = 100u64.to_le_bytes().to_vec();
    past_end.extend_from_slice(b"{}");
    assert!(matches!(err(past_end), SafetensorsError::HeaderLength { .. }));
    assert!(matches!(err(with_header(b"{not json", &[])), SafetensorsError::HeaderJson(_)));
    assert!(matches!(err(with_header(b"[1, 2]", &[])), SafetensorsError::HeaderJson(_)));
    assert!(matches!(err(with_header(b"{\"a\": 3}", &[])), SafetensorsError::Header(_)));
    assert!(matches!(err(with_header(b"{\"__metadata__\": {\"k\": 1}}", &[])), SafetensorsError::Header(_)));

    let e = one(json!({"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}), 1);
    assert!(
        matches!(&e, SafetensorsError::UnsupportedDtype { name, dtype } if name == "w" && dtype == "F8_E4M3"),
        "{e}"
    );
    let e = one(json!({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}), 8);
    assert!(matches!(e, SafetensorsError::SizeMismatch { .. }), "{e}");
    let e = one(json!({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}), 8);
    assert!(matches!(e, SafetensorsError::OutOfBounds { .. }), "{e}");
    let e = one(json!({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}), 8);
    assert!(matches!(e, SafetensorsError::OutOfBounds { .. }), "{e}");
    let e = one(json!({"dtype": "F32", "shape": [1], "data_offsets": [u64::MAX - 1, u64::MAX]}), 8);
    assert!(matches!(e, SafetensorsError::OutOfBounds { .. }), "{e}");
    let e = one(json!({"dtype": "U8", "shape": [u64::MAX, u64::MAX], "data_offsets": [0, 8]}), 8);
    assert!(matches!(e, SafetensorsError::SizeMismatch { .. }), "{e}");
    // What Hugging Face's crate refuses and our old reader let through: gaps,
    // overlaps and bytes after the last tensor.
    let gap = serde_json::to_vec(&json!({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }))
    .unwrap();
    let e = err(with_header(&gap, &[0; 12]));
    assert!(matches!(&e, SafetensorsError::Layout(m) if m.contains("'b'") && m.contains("contiguous")), "{e}");
    let overlap = serde_json::to_vec(&json!({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }))
    .unwrap();
    let e = err(with_header(&overlap, &[0; 8]));
    assert!(matches!(&e, SafetensorsError::Layout(m) if m.contains("'b'")), "{e}");
    let e = one(json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}), 8);
    assert!(matches!(&e, SafetensorsError::Layout(m) if m.contains("8 bytes") && m.contains("cover 4")), "{e}");
    let e = one(json!({"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}), 1);
    assert!(matches!(&e, SafetensorsError::UnsupportedDtype { dtype, .. } if dtype == "Q4"), "{e}");
    assert!(matches!(err(with_header(b"{\"a\": 3}  \xff", &[])), SafetensorsError::HeaderJson(_)));

    for bad in [
        json!({"shape": [1], "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [0]}),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [0, -4]}),
        json!({"dtype": "F32", "shape": [1], "data_offsets": "0..4"}),
        json!([1, 2]),
    ] {
        let e = one(bad.clone(), 8);
        assert!(matches!(e, SafetensorsError::Header(_)), "{bad}: {e}");
        assert!(e.to_string().contains("'w'"), "{e}");
    }
}

fn write_file(dir: &Path, name: &str, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    std::fs::write(dir.join(name), build(tensors, None)).unwrap();
}

#[test]
fn single_file_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "model.safetensors", &[("a", "F32", vec![1], f32_bytes(&[1.5]))]);
    std::fs::write(dir.path().join("pytorch_model.bin"), b"ignored").unwrap();
    let m = SafetensorsModel::open_dir(dir.path()).unwrap();
    assert_eq!(m.names(), vec!["a"]);
    assert_eq!(m.tensor("a").unwrap().data, f32_bytes(&[1.5]).as_slice());
    assert!(m.file_of("a").is_some());
    assert!(m.tensor("b").is_none() && m.file_of("b").is_none());
}

#[test]
fn sharded_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(
        d,
        "model-00001-of-00002.safetensors",
        &[
            ("model.layers.0.w", "F32", vec![2], f32_bytes(&[1., 2.])),
            ("model.embed_tokens.weight", "F16", vec![1], vec![0, 0x3C]),
        ],
    );
    write_file(d, "model-00002-of-00002.safetensors", &[("lm_head.weight", "F32", vec![1], f32_bytes(&[9.]))]);
    let index = json!({
        "metadata": {"total_size": 14},
        "weight_map": {
            "model.layers.0.w": "model-00001-of-00002.safetensors",
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    });
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = SafetensorsModel::open_dir(d).unwrap();
    assert_eq!(m.names(), vec!["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.w"]);
    assert_eq!(m.tensor("lm_head.weight").unwrap().data, f32_bytes(&[9.]).as_slice());
    assert_eq!(m.tensor("model.embed_tokens.weight").unwrap().dtype, StDtype::F16);
    let f = m.file_of("lm_head.weight").unwrap();
    let r = f.tensor_range("lm_head.weight").unwrap();
    assert_eq!(&f.mapped().bytes()[r], f32_bytes(&[9.]).as_slice());
    assert_eq!(m.files().count(), 2);

    // The index names a tensor its shard lacks.
    let mut bad = index.clone();
    bad["weight_map"]["ghost"] = json!("model-00002-of-00002.safetensors");
    std::fs::write(d.join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let e = SafetensorsModel::open_dir(d).unwrap_err();
    assert!(matches!(&e, SafetensorsError::MissingInShard { name, .. } if name == "ghost"), "{e}");

    // Shards must stay inside the directory.
    let mut escape = index.clone();
    escape["weight_map"]["lm_head.weight"] = json!("../model.safetensors");
    std::fs::write(d.join("model.safetensors.index.json"), escape.to_string()).unwrap();
    assert!(matches!(SafetensorsModel::open_dir(d), Err(SafetensorsError::Index { .. })));

    // A missing shard is an I/O error naming it.
    let mut missing = index.clone();
    missing["weight_map"]["lm_head.weight"] = json!("model-00003-of-00002.safetensors");
    std::fs::write(d.join("model.safetensors.index.json"), missing.to_string()).unwrap();
    let msg = SafetensorsModel::open_dir(d).unwrap_err().to_string();
    assert!(msg.contains("model-00003-of-00002.safetensors"), "{msg}");

    std::fs::write(d.join("model.safetensors.index.json"), "{\"nope\": 1}").unwrap();
    assert!(matches!(SafetensorsModel::open_dir(d), Err(SafetensorsError::Index { .. })));
}

#[test]
fn unindexed_shards_are_merged_and_duplicates_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(d, "a.safetensors", &[("x", "U8", vec![1], vec![1])]);
    write_file(d, "b.safetensors", &[("y", "U8", vec![1], vec![2])]);
    let m = SafetensorsModel::open_dir(d).unwrap();
    assert_eq!(m.names(), vec!["x", "y"]);
    write_file(d, "c.safetensors", &[("x", "U8", vec![1], vec![3])]);
    assert!(matches!(SafetensorsModel::open_dir(d), Err(SafetensorsError::DuplicateTensor { .. })));
}

#[test]
fn pickle_only_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"\x80\x02").unwrap();
    let e = SafetensorsModel::open_dir(dir.path()).unwrap_err();
    assert!(matches!(e, SafetensorsError::PickleOnly { .. }));
    let msg = e.to_string();
    assert!(msg.contains("pytorch_model.bin") && msg.contains("never loads pickle"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(SafetensorsModel::open_dir(empty.path()), Err(SafetensorsError::NoWeights(_))));
}

fn exercise(f: &SafetensorsFile) {
    for name in f.names() {
        let t = f.tensor(name).unwrap();
        let n: usize = t.shape.iter().product();
        assert_eq!(n * t.dtype.size_bytes(), t.data.len());
        let r = f.tensor_range(name).unwrap();
        assert_eq!(r.len(), t.data.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(f) = SafetensorsFile::from_bytes(bytes) {
            exercise(&f);
        }
    }

    #[test]
    fn random_header_length_never_panics(len in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(&tail);
        let _ = SafetensorsFile::from_bytes(b);
    }

    #[test]
    fn mutated_file_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let mut b = sample();
        for (pos, byte) in edits {
            let i = pos % b.len();
            b[i] = byte;
        }
        if let Some(cut) = cut {
            b.truncate(cut % (b.len() + 1));
        }
        if let Ok(f) = SafetensorsFile::from_bytes(b) {
            exercise(&f);
        }
    }

    #[test]
    fn mutated_header_digits_never_panic(pos in any::<usize>(), digit in b'0'..=b'9') {
        // Byte flips rarely keep JSON valid; rewriting digits changes offsets and shapes.
        let mut b = sample();
        let digits: Vec<usize> = (8..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
        let i = digits[pos % digits.len()];
        b[i] = digit;
        if let Ok(f) = SafetensorsFile::from_bytes(b) {
            exercise(&f);
        }
    }
}

/// Directories written by HF's `save_pretrained` for other tests, when present.
#[test]
fn reads_reference_written_dirs() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let Ok(archs) = std::fs::read_dir(&tiny) else {
        eprintln!("skipping: {} missing", tiny.display());
        return;
    };
    let mut opened = 0;
    for arch in archs.flatten() {
        let Ok(dirs) = std::fs::read_dir(arch.path()) else {
            continue;
        };
        for d in dirs.flatten() {
            let p = d.path();
            if !p.join("config.json").is_file() {
                continue;
            }
            let m = SafetensorsModel::open_dir(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!m.names().is_empty(), "{}", p.display());
            for name in m.names() {
                let t = m.tensor(name).unwrap();
                assert_eq!(t.shape.iter().product::<usize>() * t.dtype.size_bytes(), t.data.len());
            }
            opened += 1;
        }
    }
    eprintln!("opened {opened} reference directories");
}
