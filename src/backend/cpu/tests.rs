use super::*;
use crate::backend::{Backend, HostWeight, WeightBytes};
use crate::quant::ggml::{dequantize, GgmlType};
use rand::{Rng, SeedableRng};

const KINDS: [GgmlType; 9] = GgmlType::ALL;

/// Random but well-formed weight bytes: quants random, scales finite, of either sign.
fn random_weight(kind: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    crate::quant::random::random_weight_bytes(kind, rows, cols, 1.0, &mut crate::quant::random::Rng::new(seed))
}

fn host(kind: GgmlType, rows: usize, cols: usize, seed: u64) -> HostWeight {
    HostWeight {
        name: format!("{kind:?}"),
        kind,
        rows,
        cols,
        bytes: WeightBytes::from_vec(random_weight(kind, rows, cols, seed)),
    }
}

fn reference_matmul(w: &HostWeight, x: &[f32], m: usize) -> Vec<f32> {
    let mut wf = vec![0f32; w.rows * w.cols];
    dequantize(w.kind, w.bytes.as_slice(), &mut wf).unwrap();
    let mut out = vec![0f32; m * w.rows];
    for i in 0..m {
        for n in 0..w.rows {
            let mut s = 0f64;
            for k in 0..w.cols {
                s += x[i * w.cols + k] as f64 * wf[n * w.cols + k] as f64;
            }
            out[i * w.rows + n] = s as f32;
        }
    }
    out
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
        if Isa::detect() == Isa::Avx512 {
            v.push(Isa::Avx512);
        }
    }
    v
}

#[test]
fn simd_dequant_matches_reference_bit_for_bit() {
    for kind in KINDS {
        let cols = 512;
        let w = host(kind, 3, cols, 7);
        let mut want = vec![0f32; 3 * cols];
        dequantize(kind, w.bytes.as_slice(), &mut want).unwrap();
        for isa in isas() {
            for r in 0..3 {
                let row = &w.bytes.as_slice()[r * kind.row_bytes(cols).unwrap()..][..kind.row_bytes(cols).unwrap()];
                let mut got = vec![0f32; cols];
                // In two chunks, as the matmul walks it.
                dequant_row_chunk(isa, kind, row, 0, &mut got[..256]);
                dequant_row_chunk(isa, kind, row, 256, &mut got[256..]);
                for (i, (g, e)) in got.iter().zip(&want[r * cols..]).enumerate() {
                    assert_eq!(g.to_bits(), e.to_bits(), "{kind:?} {isa:?} row {r} elem {i}: {g} vs {e}");
                }
            }
        }
    }
}

#[test]
fn matmul_matches_f64_reference_for_every_kind_and_isa() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for kind in KINDS {
        // Odd row counts exercise partial panels; 768 columns = 3 K-chunks.
        let (rows, cols) = (13, 768);
        let hw = host(kind, rows, cols, 11);
        for m in [1usize, 3, 9] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1f32..1.0)).collect();
            let want = reference_matmul(&hw, &x, m);
            for isa in isas() {
                let mut be = CpuBackend::new(2).unwrap();
                be.isa = isa;
                let w = be.load_weight(hw.clone()).unwrap();
                let xt = be.upload(&x, m, cols);
                let mut out = be.zeros(m, rows);
                be.matmul(&xt, &w, &mut out);
                for (i, (g, e)) in out.data.iter().zip(&want).enumerate() {
                    let tol = 1e-4 * (1.0 + e.abs());
                    assert!((g - e).abs() <= tol, "{kind:?} {isa:?} m={m} out[{i}]: {g} vs {e}");
                }
            }
        }
    }
}

#[test]
fn matmul_rows_are_batch_invariant() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for kind in [GgmlType::Q4K, GgmlType::Q5_0, GgmlType::F32] {
        let (rows, cols) = (37, 512);
        for isa in isas() {
            let mut be = CpuBackend::new(2).unwrap();
            be.isa = isa;
            let w = be.load_weight(host(kind, rows, cols, 3)).unwrap();
            let m = 70; // more than one m-block, with remainders
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1f32..1.0)).collect();
            let mut all = be.zeros(m, rows);
            be.matmul(&be.upload(&x, m, cols), &w, &mut all);
            for i in [0, 5, 69] {
                let mut one = be.zeros(1, rows);
                be.matmul(&be.upload(&x[i * cols..(i + 1) * cols], 1, cols), &w, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one.data), bits(&all.data[i * rows..(i + 1) * rows]), "{kind:?} {isa:?} row {i}");
            }
        }
    }
}

#[test]
fn matmul_many_adds_bias_per_job() {
    let be = CpuBackend::new(2).unwrap();
    let w1 = be.load_weight(host(GgmlType::F32, 5, 32, 4)).unwrap();
    let w2 = be.load_weight(host(GgmlType::Q8_0, 7, 32, 5)).unwrap();
    let bias = be
        .load_weight(HostWeight {
            name: "b".into(),
            kind: GgmlType::F32,
            rows: 1,
            cols: 7,
            bytes: WeightBytes::from_vec((0..7).flat_map(|i| (i as f32).to_le_bytes()).collect()),
        })
        .unwrap();
    let x = be.upload(&[0.5; 64], 2, 32);
    let (mut o1, mut o2, mut o2b) = (be.zeros(2, 5), be.zeros(2, 7), be.zeros(2, 7));
    be.matmul(&x, &w2, &mut o2);
    be.matmul_many(
        &x,
        &mut [
            crate::backend::MatmulJob { w: &w1, bias: None, out: &mut o1 },
            crate::backend::MatmulJob { w: &w2, bias: Some(&bias), out: &mut o2b },
        ],
    );
    for r in 0..2 {
        for n in 0..7 {
            assert_eq!(o2b.data[r * 7 + n], o2.data[r * 7 + n] + n as f32);
        }
    }
    assert!(o1.data.iter().any(|v| *v != 0.0));
}

#[test]
fn simd_reduction_matches_the_reference_order() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..1000 {
        let a: Vec<f32> = (0..64).map(|_| rng.gen_range(-1e3f32..1e3)).collect();
        for isa in isas() {
            assert_eq!(super::matmul::reduce(isa, &a).to_bits(), super::matmul::reduce_scalar(&a).to_bits(), "{isa:?}");
        }
    }
}
