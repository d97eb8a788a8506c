//! Our scalar dequantisers against gguf-py's `gguf.quants.dequantize`, bit for bit.
//! Fixtures: `python scripts/fixtures/gguf_quants.py`.

use std::path::{Path, PathBuf};

use tandem::quant::ggml::{dequantize, f16_to_f32, get_scale_min_k4, DequantError, WeightKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quants")
}

fn check_type(name: &str) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("index.json")).unwrap()).unwrap();
    let entry = index["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no fixture for {name}"));
    let id = entry["type_id"].as_u64().unwrap() as u32;
    let ty = WeightKind::from_gguf_id(id).unwrap();
    let n = entry["n_elements"].as_u64().unwrap() as usize;
    let blocks = std::fs::read(fixtures().join(entry["blocks"].as_str().unwrap())).unwrap();
    let expected = std::fs::read(fixtures().join(entry["expected"].as_str().unwrap())).unwrap();
    assert_eq!(expected.len(), n * 4);
    assert_eq!(blocks.len(), n / ty.block_size() * ty.type_size());

    let mut out = vec![0f32; n];
    dequantize(ty, &blocks, &mut out).unwrap();
    let mut mismatches = 0;
    for (i, (got, want)) in out.iter().zip(expected.chunks_exact(4)).enumerate() {
        let want = u32::from_le_bytes([want[0], want[1], want[2], want[3]]);
        if got.to_bits() != want {
            if mismatches < 10 {
                eprintln!(
                    "{name}[{i}]: got {got:e} ({:#010x}), want {:e} ({want:#010x})",
                    got.to_bits(),
                    f32::from_bits(want)
                );
            }
            mismatches += 1;
        }
    }
    assert_eq!(mismatches, 0, "{name}: {mismatches} of {n} values differ");
}

#[test]
fn f32_bit_exact() {
    check_type("f32");
}
#[test]
fn f16_bit_exact() {
    check_type("f16");
}
#[test]
fn bf16_bit_exact() {
    check_type("bf16");
}
#[test]
fn q4_0_bit_exact() {
    check_type("q4_0");
}
#[test]
fn q5_0_bit_exact() {
    check_type("q5_0");
}
#[test]
fn q8_0_bit_exact() {
    check_type("q8_0");
}
#[test]
fn q4_k_bit_exact() {
    check_type("q4_k");
}
#[test]
fn q5_k_bit_exact() {
    check_type("q5_k");
}
#[test]
fn q6_k_bit_exact() {
    check_type("q6_k");
}

#[test]
fn size_mismatches_are_errors() {
    let mut out = vec![0f32; 32];
    assert!(matches!(dequantize(WeightKind::Q4_0, &[0u8; 17], &mut out), Err(DequantError::SizeMismatch { .. })));
    assert!(matches!(dequantize(WeightKind::Q4_0, &[0u8; 36], &mut out), Err(DequantError::SizeMismatch { .. })));
    let mut odd = vec![0f32; 33];
    assert!(matches!(dequantize(WeightKind::Q4_0, &[0u8; 36], &mut odd), Err(DequantError::PartialBlock { .. })));
    let mut none: Vec<f32> = Vec::new();
    dequantize(WeightKind::Q6K, &[], &mut none).unwrap();
}

#[test]
fn f16_conversion_edges() {
    assert_eq!(f16_to_f32(0x3C00), 1.0);
    assert_eq!(f16_to_f32(0xC000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x7BFF), 65504.0);
    assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
    assert!(f16_to_f32(0x7E00).is_nan());
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn scale_min_k4_unpacking() {
    // Byte layout from ggml: 6-bit scales/mins in 0..8, high bits folded into 8..12.
    let q: [u8; 12] = [
        0b11_000001,
        0b10_000010,
        0b01_000011,
        0b00_000100, // sc0..3 + high bits of sc4..7
        0b11_000101,
        0b01_000110,
        0b10_000111,
        0b00_001000, // m0..3 + high bits of m4..7
        0x9A,
        0xBC,
        0xDE,
        0xF0, // low nibble: sc4..7, high nibble: m4..7
    ];
    assert_eq!(get_scale_min_k4(0, &q), (1, 5));
    assert_eq!(get_scale_min_k4(3, &q), (4, 8));
    assert_eq!(get_scale_min_k4(4, &q), (0xA | (3 << 4), 0x9 | (3 << 4)));
    assert_eq!(get_scale_min_k4(5, &q), (0xC | (2 << 4), 0xB | (1 << 4)));
    assert_eq!(get_scale_min_k4(7, &q), (0x0, 0xF));
}
