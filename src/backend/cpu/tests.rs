use super::*;
use crate::backend::{Backend, HostWeight, KvDtype, WeightBytes};
use crate::quant::ggml::{dequantize, WeightKind};
use rand::{Rng, SeedableRng};

const KINDS: [WeightKind; WeightKind::ALL.len()] = WeightKind::ALL;

/// Random but well-formed weight bytes: quants random, scales finite, of either sign.
fn random_weight(kind: WeightKind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    crate::quant::random::random_weight_bytes(kind, rows, cols, 1.0, &mut crate::quant::random::Rng::new(seed))
}

fn host(kind: WeightKind, rows: usize, cols: usize, seed: u64) -> HostWeight {
    HostWeight::new(format!("{kind:?}"), kind, rows, cols, WeightBytes::from_vec(random_weight(kind, rows, cols, seed)))
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
                let xt = be.upload(&x, m, cols).unwrap();
                let mut out = be.zeros(m, rows).unwrap();
                be.matmul(&xt, &w, &mut out).unwrap();
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
    for kind in [WeightKind::Q4K, WeightKind::Q5_0, WeightKind::F32] {
        let (rows, cols) = (37, 512);
        for isa in isas() {
            let mut be = CpuBackend::new(2).unwrap();
            be.isa = isa;
            let w = be.load_weight(host(kind, rows, cols, 3)).unwrap();
            let m = 70; // more than one m-block, with remainders
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1f32..1.0)).collect();
            let mut all = be.zeros(m, rows).unwrap();
            be.matmul(&be.upload(&x, m, cols).unwrap(), &w, &mut all).unwrap();
            for i in [0, 5, 69] {
                let mut one = be.zeros(1, rows).unwrap();
                be.matmul(&be.upload(&x[i * cols..(i + 1) * cols], 1, cols).unwrap(), &w, &mut one).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one.data), bits(&all.data[i * rows..(i + 1) * rows]), "{kind:?} {isa:?} row {i}");
            }
        }
    }
}

/// Int8 activations: a row gives the same bits alone or in a batch, with every
/// integer kernel the CPU has and any thread count, for every kind with an integer path; and the result
/// stays within the activation rounding of the f32 product.
#[test]
fn int8_matmul_is_batch_isa_and_thread_invariant() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for kind in
        [WeightKind::Q4_0, WeightKind::Q5_0, WeightKind::Q8_0, WeightKind::Q4K, WeightKind::Q5K, WeightKind::Q6K]
    {
        let (rows, cols, m) = (37, 512, 19);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let mut reference: Option<Vec<u32>> = None;
        for kernel in super::int8::Kernel::available() {
            for threads in [1, 2] {
                let mut be = CpuBackend::new(threads).unwrap().with_activations(Activations::Int8);
                be.int8 = kernel;
                let w = be.load_weight(host(kind, rows, cols, 3)).unwrap();
                let mut all = be.zeros(m, rows).unwrap();
                be.matmul(&be.upload(&x, m, cols).unwrap(), &w, &mut all).unwrap();
                let bits: Vec<u32> = all.data.iter().map(|f| f.to_bits()).collect();
                for i in [0, 4, 8, 17] {
                    let mut one = be.zeros(1, rows).unwrap();
                    be.matmul(&be.upload(&x[i * cols..(i + 1) * cols], 1, cols).unwrap(), &w, &mut one).unwrap();
                    let b1: Vec<u32> = one.data.iter().map(|f| f.to_bits()).collect();
                    assert_eq!(
                        b1,
                        bits[i * rows..(i + 1) * rows],
                        "{kind:?} {kernel:?} x{threads}: row {i} alone differs"
                    );
                }
                match &reference {
                    None => reference = Some(bits),
                    Some(r) => assert_eq!(&bits, r, "{kind:?} {kernel:?} x{threads}: differs from the scalar kernel"),
                }
            }
        }
        // Within the activation rounding of the f32 path.
        let be = CpuBackend::new(2).unwrap();
        let w = be.load_weight(host(kind, rows, cols, 3)).unwrap();
        let mut f = be.zeros(m, rows).unwrap();
        be.matmul(&be.upload(&x, m, cols).unwrap(), &w, &mut f).unwrap();
        let got: Vec<f32> = reference.unwrap().iter().map(|&b| f32::from_bits(b)).collect();
        let scale = f.data.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in got.iter().zip(&f.data) {
            assert!((a - b).abs() <= 0.02 * scale, "{kind:?}: int8 {a} vs f32 {b} (scale {scale})");
        }
    }
}

#[test]
fn matmul_many_adds_bias_per_job() {
    let be = CpuBackend::new(2).unwrap();
    let w1 = be.load_weight(host(WeightKind::F32, 5, 32, 4)).unwrap();
    let w2 = be.load_weight(host(WeightKind::Q8_0, 7, 32, 5)).unwrap();
    let bias = be
        .load_weight(HostWeight::new(
            "b".into(),
            WeightKind::F32,
            1,
            7,
            WeightBytes::from_vec((0..7).flat_map(|i| (i as f32).to_le_bytes()).collect()),
        ))
        .unwrap();
    let x = be.upload(&[0.5; 64], 2, 32).unwrap();
    let (mut o1, mut o2, mut o2b) = (be.zeros(2, 5).unwrap(), be.zeros(2, 7).unwrap(), be.zeros(2, 7).unwrap());
    be.matmul(&x, &w2, &mut o2).unwrap();
    be.matmul_many(
        &x,
        &mut [
            crate::backend::MatmulJob { w: &w1, bias: None, out: &mut o1 },
            crate::backend::MatmulJob { w: &w2, bias: Some(&bias), out: &mut o2b },
        ],
    )
    .unwrap();
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

#[test]
fn input_grad_matches_reference_and_is_identical_on_every_isa() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for kind in KINDS {
        // Two jobs sharing dx, with a K that is not a multiple of the 256-wide chunk
        // where the kind allows it, and an N with a partial 64-row panel.
        let k = match kind.block_size() {
            256 => 768,
            128 => 384,
            64 => 320,
            _ => 352,
        };
        let (n1, n2, m) = (70, 37, 13);
        let (h1, h2) = (host(kind, n1, k, 21), host(kind, n2, k, 22));
        let dy1: Vec<f32> = (0..m * n1).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let dy2: Vec<f32> = (0..m * n2).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let old: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1f32..1.0)).collect();
        let mut want = old.clone();
        for (h, dy, n) in [(&h1, &dy1, n1), (&h2, &dy2, n2)] {
            let mut wf = vec![0f32; n * k];
            dequantize(kind, h.bytes.as_slice(), &mut wf).unwrap();
            for i in 0..m {
                for c in 0..k {
                    let s: f64 = (0..n).map(|j| dy[i * n + j] as f64 * wf[j * k + c] as f64).sum();
                    want[i * k + c] += s as f32;
                }
            }
        }
        let mut first: Option<Vec<u32>> = None;
        for isa in isas() {
            let mut be = CpuBackend::new(2).unwrap();
            be.isa = isa;
            let (w1, w2) = (be.load_weight(h1.clone()).unwrap(), be.load_weight(h2.clone()).unwrap());
            let (t1, t2) = (be.upload(&dy1, m, n1).unwrap(), be.upload(&dy2, m, n2).unwrap());
            let mut dx = be.upload(&old, m, k).unwrap();
            be.matmul_input_grad(&[(&t1, &w1), (&t2, &w2)], &mut dx, true).unwrap();
            for (i, (g, e)) in dx.data.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{kind:?} {isa:?} dx[{i}]: {g} vs {e}");
            }
            let bits: Vec<u32> = dx.data.iter().map(|v| v.to_bits()).collect();
            match &first {
                None => first = Some(bits),
                Some(b) => assert_eq!(b, &bits, "{kind:?}: {isa:?} differs from the first ISA"),
            }
            // Without accumulate the old contents are ignored.
            let mut fresh = be.upload(&vec![f32::NAN; m * k], m, k).unwrap();
            be.matmul_input_grad(&[(&t1, &w1), (&t2, &w2)], &mut fresh, false).unwrap();
            for ((f, d), o) in fresh.data.iter().zip(&dx.data).zip(&old) {
                assert!((f - (d - o)).abs() <= 1e-4 * (1.0 + d.abs()), "{kind:?} {isa:?}: overwrite");
            }
        }
    }
}

/// Σ dout · attention(q, k, v) through the paged forward, for finite differences.
fn attention_objective(
    be: &CpuBackend,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    lens: &[usize],
    shape: (usize, usize, usize, Option<usize>),
) -> f64 {
    use crate::backend::{AttentionMeta, BlockId, KvCacheSpec, SeqAttention};
    let (nh, kvh, d, window) = shape;
    let rows: usize = lens.iter().sum();
    let bs = 4;
    let blocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let spec = KvCacheSpec {
        num_layers: 1,
        num_blocks: blocks + 1,
        block_size: bs,
        kv_heads: kvh,
        head_dim: d,
        dtype: KvDtype::F32,
    };
    let mut kv = be.alloc_kv(spec).unwrap();
    let mut tables = Vec::new();
    let mut next = 1u32;
    for &l in lens {
        let t: Vec<BlockId> = (0..l.div_ceil(bs)).map(|i| BlockId(next + i as u32)).collect();
        next += t.len() as u32;
        tables.push(t);
    }
    let mut slots = Vec::new();
    let mut seqs = Vec::new();
    let mut r0 = 0;
    for (s, &l) in lens.iter().enumerate() {
        slots.extend((0..l).map(|p| crate::kv::slot(&tables[s], p, bs).unwrap()));
        seqs.push(SeqAttention { rows: r0..r0 + l, context_len: l, block_table: &tables[s] });
        r0 += l;
    }
    let meta =
        AttentionMeta { seqs: &seqs, num_heads: nh, kv_heads: kvh, head_dim: d, scale: 0.3, sliding_window: window };
    let (kt, vt) = (be.upload(k, rows, kvh * d).unwrap(), be.upload(v, rows, kvh * d).unwrap());
    be.write_kv(&mut kv, 0, &kt, &vt, &slots).unwrap();
    let qt = be.upload(q, rows, nh * d).unwrap();
    let mut out = be.zeros(rows, nh * d).unwrap();
    be.paged_attention(&kv, 0, &qt, &meta, &mut out).unwrap();
    out.data.iter().zip(dout).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn attention_backward_matches_finite_differences() {
    use crate::backend::{AttentionMeta, SeqAttention};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for shape in [(4usize, 2usize, 16usize, None), (2, 2, 16, Some(3usize))] {
        let (nh, kvh, d, window) = shape;
        let lens = [5usize, 3];
        let rows: usize = lens.iter().sum();
        let mut gen = |n: usize| (0..n).map(|_| rng.gen_range(-1f32..1.0)).collect::<Vec<f32>>();
        let (q, k, v, dout) = (gen(rows * nh * d), gen(rows * kvh * d), gen(rows * kvh * d), gen(rows * nh * d));
        let be = CpuBackend::new(2).unwrap();
        // The forward output, then the analytic gradients.
        let mut seqs = Vec::new();
        let mut r0 = 0;
        for &l in &lens {
            seqs.push(SeqAttention { rows: r0..r0 + l, context_len: l, block_table: &[] });
            r0 += l;
        }
        let meta = AttentionMeta {
            seqs: &seqs,
            num_heads: nh,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.3,
            sliding_window: window,
        };
        let out = {
            let mut o = vec![0f32; rows * nh * d];
            // The forward output, element by element, from the objective's linearity in dout.
            for i in 0..o.len() {
                let mut unit = vec![0f32; o.len()];
                unit[i] = 1.0;
                o[i] = attention_objective(&be, &q, &k, &v, &unit, &lens, shape) as f32;
            }
            o
        };
        let t = |x: &[f32], c: usize| be.upload(x, rows, c).unwrap();
        let (mut dq, mut dk, mut dv) =
            (be.zeros(rows, nh * d).unwrap(), be.zeros(rows, kvh * d).unwrap(), be.zeros(rows, kvh * d).unwrap());
        be.attention_backward(
            &t(&q, nh * d),
            &t(&k, kvh * d),
            &t(&v, kvh * d),
            &t(&out, nh * d),
            &t(&dout, nh * d),
            &meta,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .unwrap();
        let h = 1e-2f32;
        let check = |name: &str, grad: &[f32], which: usize| {
            for i in (0..grad.len()).step_by(5) {
                let bump = |delta: f32| {
                    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                    [&mut q2, &mut k2, &mut v2][which][i] += delta;
                    attention_objective(&be, &q2, &k2, &v2, &dout, &lens, shape)
                };
                let fd = (bump(h) - bump(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - grad[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{shape:?} d{name}[{i}]: {fd} vs {}",
                    grad[i]
                );
            }
        };
        check("q", &dq.data, 0);
        check("k", &dk.data, 1);
        check("v", &dv.data, 2);
    }
}

/// A weight stored in another input order (GPTQ act-order) computes what the
/// same weight in natural order computes, forward and input gradient, alone
/// and grouped with a natural-order weight sharing the input.
#[test]
fn permuted_weights_equal_their_natural_order() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (n, k, m) = (24, 96, 5);
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1f32..1.0)).collect();
    let mut perm: Vec<u32> = (0..k as u32).collect();
    for i in (1..k).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    let stored: Vec<f32> =
        (0..n).flat_map(|r| perm.iter().map(|&p| w[r * k + p as usize]).collect::<Vec<_>>()).collect();
    let f32_bytes = |v: &[f32]| WeightBytes::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect());
    let be = CpuBackend::new(2).unwrap();
    let natural = be.load_weight(HostWeight::new("w".into(), WeightKind::F32, n, k, f32_bytes(&w))).unwrap();
    let mut h = HostWeight::new("wp".into(), WeightKind::F32, n, k, f32_bytes(&stored));
    h.input_perm = Some(perm.clone().into());
    let permuted = be.load_weight(h).unwrap();
    let other = be.load_weight(host(WeightKind::Q8_0, 7, k, 9)).unwrap();
    // A bad permutation is refused at load.
    let mut bad = HostWeight::new("bad".into(), WeightKind::F32, n, k, f32_bytes(&stored));
    bad.input_perm = Some(vec![0; k].into());
    assert!(be.load_weight(bad).is_err());

    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1f32..1.0)).collect();
    let xt = be.upload(&x, m, k).unwrap();
    let close = |a: &[f32], b: &[f32], what: &str| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{what}[{i}]: {p} vs {q}");
        }
    };
    let (mut want, mut got, mut side) = (be.zeros(m, n).unwrap(), be.zeros(m, n).unwrap(), be.zeros(m, 7).unwrap());
    be.matmul(&xt, &natural, &mut want).unwrap();
    be.matmul_many(
        &xt,
        &mut [
            MatmulJob { w: &permuted, bias: None, out: &mut got },
            MatmulJob { w: &other, bias: None, out: &mut side },
        ],
    )
    .unwrap();
    close(&got.data, &want.data, "forward");
    let mut side_alone = be.zeros(m, 7).unwrap();
    be.matmul(&xt, &other, &mut side_alone).unwrap();
    assert_eq!(side.data, side_alone.data, "the natural-order job beside it");

    let dy: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1f32..1.0)).collect();
    let dyt = be.upload(&dy, m, n).unwrap();
    let dy7 = be.upload(&vec![0.5; m * 7], m, 7).unwrap();
    for accumulate in [false, true] {
        let start: Vec<f32> = (0..m * k).map(|i| i as f32 * 1e-3).collect();
        let (mut a, mut b) = (be.upload(&start, m, k).unwrap(), be.upload(&start, m, k).unwrap());
        be.matmul_input_grad(&[(&dyt, &natural), (&dy7, &other)], &mut a, accumulate).unwrap();
        be.matmul_input_grad(&[(&dyt, &permuted), (&dy7, &other)], &mut b, accumulate).unwrap();
        close(&b.data, &a.data, if accumulate { "input grad +=" } else { "input grad" });
    }
}
