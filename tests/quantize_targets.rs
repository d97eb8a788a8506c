//! The GGUF quantisers (`--quantize q8_0|q4_k`, `tandem quantize`) against
//! blocks written by libggml's own `ggml_quantize_chunk` (what llama-quantize
//! calls), on rows chosen to hit the edge cases: outliers, one-signed rows,
//! constant and zero sub-blocks, scales that underflow f16, large values, ties.
//! Fixtures: scripts/fixtures/ggml_quantize.py.

use std::path::PathBuf;

use tandem::quant::gguf_quantize::{quantize_q4_k, quantize_q5_0, quantize_q8_0};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants/quantize").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn input() -> (Vec<f32>, usize) {
    let index: serde_json::Value = serde_json::from_slice(&fixture("index.json")).unwrap();
    let cols = index["cols"].as_u64().unwrap() as usize;
    let x: Vec<f32> =
        fixture("input.f32.bin").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(x.len(), cols * index["rows"].as_u64().unwrap() as usize);
    (x, cols)
}

/// Byte-equal, or the first differing block named.
fn assert_blocks_equal(name: &str, ours: &[u8], reference: &[u8], block_bytes: usize) {
    assert_eq!(ours.len(), reference.len(), "{name}: length");
    if let Some(i) = ours.chunks(block_bytes).zip(reference.chunks(block_bytes)).position(|(a, b)| a != b) {
        let r = i * block_bytes..(i + 1) * block_bytes;
        panic!("{name}: block {i} differs\n ours {:?}\n ggml {:?}", &ours[r.clone()], &reference[r]);
    }
}

#[test]
fn q8_0_matches_ggml() {
    let (x, cols) = input();
    assert_blocks_equal("q8_0", &quantize_q8_0(&x, cols).unwrap(), &fixture("q8_0.bin"), 34);
}

#[test]
fn q5_0_matches_ggml() {
    let (x, cols) = input();
    assert_blocks_equal("q5_0", &quantize_q5_0(&x, cols).unwrap(), &fixture("q5_0.bin"), 22);
}

#[test]
fn q4_k_matches_ggml() {
    let (x, cols) = input();
    assert_blocks_equal("q4_k", &quantize_q4_k(&x, cols).unwrap(), &fixture("q4_k.bin"), 144);
}
