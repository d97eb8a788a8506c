//! kernels/quant.cu's `mmq_*` (tensor-core GEMM on packed quantised weights, for
//! 9..64 activation rows) in the emulator, against the dequant + bf16 path it
//! replaces: the weight dequantised by `quant::ggml` and both operands rounded
//! to bf16, then an f32 matmul. The emulator's mma follows the PTX fragment
//! layout that common.cuh documents; only a GPU proves that reading of it.

use super::*;

/// Quantised kinds, and two `cols` each: whole blocks, and for the 32- and
/// 64-value kinds a last K-chunk shorter than the kernel's 128.
const MMQ_KINDS: [(WeightKind, &str, [usize; 2]); 11] = [
    (WeightKind::Q4_0, "q4_0", [64, 160]),
    (WeightKind::Q5_0, "q5_0", [96, 160]),
    (WeightKind::Q8_0, "q8_0", [64, 160]),
    (WeightKind::Q4K, "q4_k", [256, 512]),
    (WeightKind::Q5K, "q5_k", [256, 512]),
    (WeightKind::Q6K, "q6_k", [256, 512]),
    (WeightKind::Nf4, "nf4", [128, 192]),
    (WeightKind::Fp4, "fp4", [128, 192]),
    (WeightKind::Int4G128, "int4g128", [128, 384]),
    (WeightKind::Int4G64, "int4g64", [128, 192]),
    (WeightKind::Int4G32, "int4g32", [128, 160]),
];

fn to_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

#[test]
fn quant_mmq_every_kind() {
    let Some(emu) = emulator() else { return };
    let mut rng = StdRng::seed_from_u64(8);
    // (weight rows, batch, index into the kind's cols, grid.y): rows past a
    // 64-row tile, batches of one row, partial and whole n-tiles, and more than
    // 64 rows both as grid.y tiles and as the kernel's own loop (grid.y 1).
    let shapes = [(70usize, 1usize, 0usize, 1u32), (70, 9, 1, 1), (130, 16, 0, 1), (70, 33, 1, 1), (130, 64, 1, 1)];
    for (ki, (kind, name, cols_of)) in MMQ_KINDS.into_iter().enumerate() {
        let big = (70usize, 80usize, ki % 2, if ki % 2 == 0 { 2u32 } else { 1 });
        for (si, &(rows, batch, ci, gy)) in shapes.iter().chain([&big]).enumerate() {
            let cols = cols_of[ci];
            let wb = random_weight(&mut rng, kind, rows, cols);
            let mut wf = vec![0f32; rows * cols];
            dequantize(kind, &wb, &mut wf).unwrap();
            let wf = to_bf16(&wf);
            let x = rand_vec(&mut rng, batch * cols, -1.0, 1.0);
            let xr = to_bf16(&x);
            let bias = (si % 2 == 1).then(|| rand_vec(&mut rng, rows, -1.0, 1.0));
            let mut want = vec![0f32; batch * rows];
            // Scale of each output: Σ|x·w| (+|bias|), what rounding errors grow with.
            let mut scale = vec![0f32; batch * rows];
            for b in 0..batch {
                for r in 0..rows {
                    let (xs, ws) = (&xr[b * cols..][..cols], &wf[r * cols..][..cols]);
                    let bv = bias.as_ref().map_or(0.0, |bv| bv[r]);
                    want[b * rows + r] = xs.iter().zip(ws).map(|(a, c)| a * c).sum::<f32>() + bv;
                    scale[b * rows + r] = xs.iter().zip(ws).map(|(a, c)| (a * c).abs()).sum::<f32>() + bv.abs();
                }
            }
            let mut a = vec![Arg::B(wb), buf!(&x), bias.as_ref().map_or(Arg::Null, |b| buf!(b))];
            a.push(nan_buf(batch * rows));
            a.extend(ints([rows, cols, kind.row_bytes(cols).unwrap(), batch]));
            launch(emu, &format!("mmq_{name}"), [rows.div_ceil(64) as u32, gy, 1], B128, &mut a);
            let what = format!(
                "mmq_{name} {rows}x{cols} batch {batch} grid.y {gy} {}",
                if bias.is_some() { "bias" } else { "no bias" }
            );
            check(&what, &f32s(&a[3]), &want, &scale, 1e-5);
        }
    }
}
