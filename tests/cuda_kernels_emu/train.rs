//! kernels/train.cu in the emulator against the CPU backend's training ops.
//! (matmul_input_grad and gemm run on cuBLAS, which no emulator runs: their
//! row-major → column-major mapping is unit-tested in src/backend/cuda/plan.rs.)

use super::*;
use tandem::backend::cuda::plan::attention_grad_plan;
use tandem::backend::{dropout_keep, AdamWStep};

// ---- row-wise backward ops ----

#[test]
fn train_rms_norm_and_silu_mul_backward() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    for (rows, cols) in [(3usize, 80usize), (2, 1000), (5, 37)] {
        let x = rand_vec(&mut rng, rows * cols, -2.0, 2.0);
        let dy = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
        let dx0 = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
        let w = rand_vec(&mut rng, cols, 0.5, 1.5);
        let eps = 1e-5f32;
        let mut want = tensor(&dx0, rows, cols);
        be.rms_norm_backward(
            &tensor(&x, rows, cols),
            &f32_weight(&be, &w, 1, cols),
            eps,
            &tensor(&dy, rows, cols),
            &mut want,
        )
        .unwrap();
        let mut a = [buf!(&x), buf!(&w), buf!(&dy), buf!(&dx0), Arg::I(rows as i32), Arg::I(cols as i32), Arg::F(eps)];
        launch(emu, "rms_norm_backward", [rows as u32, 1, 1], B256, &mut a);
        check(
            &format!("rms_norm_backward {rows}x{cols}"),
            &f32s(&a[3]),
            &want.data,
            &row_scale(&want.data, cols),
            2e-6,
        );
    }

    let n = 1007;
    let g = rand_vec(&mut rng, n, -8.0, 8.0);
    let u = rand_vec(&mut rng, n, -2.0, 2.0);
    let d = rand_vec(&mut rng, n, -2.0, 2.0);
    let (mut dg, mut du) = (be.zeros(1, n).unwrap(), be.zeros(1, n).unwrap());
    be.silu_mul_backward(&tensor(&g, 1, n), &tensor(&u, 1, n), &tensor(&d, 1, n), &mut dg, &mut du).unwrap();
    let mut a = [buf!(&g), buf!(&u), buf!(&d), nan_buf(n), nan_buf(n), Arg::L(n as i64)];
    launch(emu, "silu_mul_backward", grid_for(n), B256, &mut a);
    // d gate = dout·up·f(gate) where f crosses zero: errors scale with |dout·up|.
    let du_scale: Vec<f32> = d.iter().zip(&u).map(|(a, b)| (a * b).abs()).collect();
    check("silu_mul_backward d gate", &f32s(&a[3]), &dg.data, &du_scale, 1e-6);
    check("silu_mul_backward d up", &f32s(&a[4]), &du.data, &elem_scale(&du.data), 1e-6);
}

// ---- cross-entropy ----

#[test]
fn train_cross_entropy_loss_hits_and_gradient() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(22);
    // A vocabulary that is no multiple of the block, and one of Qwen's size.
    for (rows, vocab) in [(4usize, 1000usize), (1, 151_937)] {
        let mut x = rand_vec(&mut rng, rows * vocab, -10.0, 10.0);
        let mut labels: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        // The label at the last index, and the argmax there: a hit.
        labels[0] = vocab as u32 - 1;
        x[vocab - 1] = 30.0;
        if rows > 1 {
            // A tie for the maximum: the first index wins, and it is the label.
            x[vocab + 10] = 40.0;
            x[vocab + 900] = 40.0;
            labels[1] = 10;
            // The same tie with the label on the later index: a miss.
            x[2 * vocab + 10] = 40.0;
            x[2 * vocab + 900] = 40.0;
            labels[2] = 900;
        }
        // Per-row reference: the CPU's op on each row alone.
        let per_row: Vec<(f64, usize, Vec<f32>)> = (0..rows)
            .map(|r| {
                let mut t = tensor(&x[r * vocab..(r + 1) * vocab], 1, vocab);
                let s = be.cross_entropy(&mut t, &labels[r..r + 1], Some(0.25)).unwrap();
                (s.loss, s.correct, std::mem::take(&mut t.data))
            })
            .collect();
        for grad in [true, false] {
            let mut a = [
                buf!(&x),
                buf!(&labels),
                Arg::I(rows as i32),
                Arg::I(vocab as i32),
                Arg::I(grad as i32),
                Arg::F(if grad { 0.25 } else { 0.0 }),
                nan_buf(rows),
                buf!(vec![7u32; rows]),
            ];
            launch(emu, "cross_entropy", [rows as u32, 1, 1], B256, &mut a);
            let (loss, correct) = (f32s(&a[6]), u32s(&a[7]));
            for r in 0..rows {
                let want = per_row[r].0 as f32;
                // The loss is lse − x[label]: its rounding scales with those terms.
                let scale = want.abs().max(x[r * vocab + labels[r] as usize].abs()).max(1.0);
                check(&format!("cross_entropy {vocab} row {r} loss"), &loss[r..r + 1], &[want], &[scale], 1e-6);
                assert_eq!(correct[r] as usize, per_row[r].1, "cross_entropy {vocab} row {r} hit");
            }
            if rows > 1 {
                assert_eq!(&correct[..3], &[1, 1, 0], "hits of the crafted rows");
            }
            let got = f32s(&a[0]);
            if grad {
                let want: Vec<f32> = per_row.iter().flat_map(|p| p.2.clone()).collect();
                // s·(softmax − onehot): errors are relative to s (a confident
                // row's gradient is all near zero).
                check(&format!("cross_entropy {vocab} gradient"), &got, &want, &vec![0.25; want.len()], 1e-6);
            } else {
                exact(&format!("cross_entropy {vocab} without gradient leaves logits"), &got, &x);
            }
        }
    }
}

// ---- attention backward ----

#[test]
fn train_attention_backward_gqa_window_two_sequences() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    // Two sequences of different lengths with a row in none between them.
    let (len0, len1) = (13usize, 21usize);
    let rows = len0 + 1 + len1;
    let seqs = [
        SeqAttention { rows: 0..len0, context_len: len0, block_table: &[] },
        SeqAttention { rows: len0 + 1..rows, context_len: len1, block_table: &[] },
    ];
    for (nh, kvh, d, window) in [(4usize, 2usize, 64usize, None), (2, 2, 64, Some(5usize)), (4, 1, 40, Some(8))] {
        let (qw, kw) = (nh * d, kvh * d);
        let scale = 1.0 / (d as f32).sqrt();
        let meta =
            AttentionMeta { seqs: &seqs, num_heads: nh, kv_heads: kvh, head_dim: d, scale, sliding_window: window };
        let q = rand_vec(&mut rng, rows * qw, -2.0, 2.0);
        let k = rand_vec(&mut rng, rows * kw, -2.0, 2.0);
        let v = rand_vec(&mut rng, rows * kw, -1.0, 1.0);
        let out = rand_vec(&mut rng, rows * qw, -1.0, 1.0);
        let dout = rand_vec(&mut rng, rows * qw, -1.0, 1.0);
        let (mut dq, mut dk, mut dv) =
            (be.zeros(rows, qw).unwrap(), be.zeros(rows, kw).unwrap(), be.zeros(rows, kw).unwrap());
        be.attention_backward(
            &tensor(&q, rows, qw),
            &tensor(&k, rows, kw),
            &tensor(&v, rows, kw),
            &tensor(&out, rows, qw),
            &tensor(&dout, rows, qw),
            &meta,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .unwrap();

        let plan = attention_grad_plan(&meta, rows);
        let mut a1 =
            vec![buf!(&q), buf!(&k), buf!(&v), buf!(&out), buf!(&dout), buf!(&plan.q_meta), nan_buf(rows * nh * 3)];
        a1.push(nan_buf(rows * qw));
        a1.extend(ints([rows, nh, kvh, d]));
        a1.push(Arg::F(scale));
        launch(emu, "attention_backward_dq", [rows as u32, nh as u32, 1], B128, &mut a1);
        let what = format!("attention_backward h{nh}/{kvh} d{d} window {window:?}");
        // ds = p·(dout·v − D) cancels, so a gradient's error scales with the
        // whole tensor's magnitude, not with its own (which can be near zero).
        let tensor_scale = |t: &[f32]| vec![t.iter().fold(0f32, |m, x| m.max(x.abs())); t.len()];
        check(&format!("{what} dq"), &f32s(&a1[7]), &dq.data, &tensor_scale(&dq.data), 1e-5);

        let mut a2 = vec![buf!(&q), buf!(&k), buf!(&v), buf!(&dout), buf!(&plan.k_meta), take(&mut a1[6])];
        a2.extend([nan_buf(rows * kw), nan_buf(rows * kw)]);
        a2.extend(ints([rows, nh, kvh, d]));
        a2.push(Arg::F(scale));
        launch(emu, "attention_backward_dkv", [rows as u32, kvh as u32, 1], B128, &mut a2);
        check(&format!("{what} dk"), &f32s(&a2[6]), &dk.data, &tensor_scale(&dk.data), 1e-5);
        check(&format!("{what} dv"), &f32s(&a2[7]), &dv.data, &tensor_scale(&dv.data), 1e-5);
        // The row in no sequence is zero in every gradient.
        for (name, t, w) in [("dq", &a1[7], qw), ("dk", &a2[6], kw), ("dv", &a2[7], kw)] {
            assert!(f32s(t)[len0 * w..(len0 + 1) * w].iter().all(|&x| x == 0.0), "{what}: {name} of the free row");
        }
    }
}

// ---- dropout, AdamW and the utilities ----

#[test]
fn train_dropout_mask_is_the_cpus_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(24);
    let (rows, cols) = (7usize, 301usize);
    let n = rows * cols;
    let x = rand_vec(&mut rng, n, -3.0, 3.0);
    // A seed with the top bit set (passed as a negative i64) and a small one.
    for (p, seed) in [(0.1f32, 0xDEAD_BEEF_CAFE_F00Du64), (0.5, 7), (0.9, u64::MAX), (0.0, 1)] {
        let mut want = be.zeros(rows, cols).unwrap();
        be.dropout(&tensor(&x, rows, cols), p, seed, &mut want).unwrap();
        let keep_scale = 1.0f32 / (1.0 - p);
        let mut a = [buf!(&x), nan_buf(n), Arg::L(n as i64), Arg::F(p), Arg::F(keep_scale), Arg::L(seed as i64)];
        launch(emu, "dropout", grid_for(n), B256, &mut a);
        let got = f32s(&a[1]);
        exact(&format!("dropout p {p} seed {seed:#x}"), &got, &want.data);
        // The mask is dropout_keep's (a zero input could hide a wrong keep).
        for (i, &g) in got.iter().enumerate() {
            assert_eq!(g != 0.0, dropout_keep(seed, i as u64, p), "dropout p {p}: element {i}");
        }
    }
}

#[test]
fn train_adamw_is_the_cpus_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(25);
    let n = 1013;
    // beta1 0.9 takes torch.lerp's first form (weight 0.1), beta1 0.3 its second.
    for (beta1, step, weight_decay, grad_scale) in
        [(0.9f32, 1u32, 0.01f32, 1.0f32), (0.9, 17, 0.0, 0.37), (0.3, 3, 0.1, 2.0)]
    {
        let hp = AdamWStep { lr: 3e-4, beta1, beta2: 0.999, eps: 1e-8, weight_decay, step, grad_scale };
        let param = rand_vec(&mut rng, n, -1.0, 1.0);
        let grad = rand_vec(&mut rng, n, -0.1, 0.1);
        let m = rand_vec(&mut rng, n, -0.01, 0.01);
        let v = rand_vec(&mut rng, n, 0.0, 1e-4);
        let (mut wp, mut wm, mut wv) = (tensor(&param, 1, n), tensor(&m, 1, n), tensor(&v, 1, n));
        be.adamw(&mut wp, &tensor(&grad, 1, n), &mut wm, &mut wv, &hp).unwrap();
        let s = hp.scalars();
        let mut a = vec![buf!(&param), buf!(&grad), buf!(&m), buf!(&v), Arg::L(n as i64)];
        a.extend([hp.grad_scale, s.decay, s.w1, s.w2, hp.beta2, s.bc2_sqrt, s.step_size, hp.eps].map(Arg::F));
        launch(emu, "adamw", grid_for(n), B256, &mut a);
        let what = format!("adamw beta1 {beta1} step {step}");
        exact(&format!("{what} param"), &f32s(&a[0]), &wp.data);
        exact(&format!("{what} m"), &f32s(&a[2]), &wm.data);
        exact(&format!("{what} v"), &f32s(&a[3]), &wv.data);
    }
}

#[test]
fn train_sum_squares_add_rows_fill_scale_copy() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(26);
    // Three whole chunks of 4096 and a ragged one; and less than one chunk.
    for n in [3 * 4096 + 5, 1000] {
        let x = rand_vec(&mut rng, n, -2.0, 2.0);
        let want = be.sum_squares(&tensor(&x, 1, n)).unwrap();
        let chunks = n.div_ceil(4096);
        let mut a = [buf!(&x), Arg::L(n as i64), nan_buf(chunks)];
        launch(emu, "sum_squares_partial", [chunks as u32, 1, 1], B256, &mut a);
        let got: f64 = f32s(&a[2]).iter().map(|&p| p as f64).sum();
        let err = ((got - want) / want).abs();
        assert!(err < 1e-6, "sum_squares {n}: {got} vs {want}");
        println!("sum_squares {n}: relative error {err:.2e}");
    }

    let (rows, cols) = (7usize, 83usize);
    let dst = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    let src = rand_vec(&mut rng, 3 * cols, -1.0, 1.0);
    let pick = [6usize, 0, 3];
    let mut want = tensor(&dst, rows, cols);
    be.add_rows(&tensor(&src, 3, cols), &pick, &mut want).unwrap();
    let ids: Vec<u32> = pick.iter().map(|&r| r as u32).collect();
    let mut a = [buf!(&src), buf!(&ids), buf!(&dst), Arg::I(3), Arg::I(cols as i32)];
    launch(emu, "add_rows", [3, 1, 1], B256, &mut a);
    exact("add_rows", &f32s(&a[2]), &want.data);

    let n = rows * cols;
    let mut want = tensor(&dst, rows, cols);
    be.scale(&mut want, -0.37).unwrap();
    let mut a = [buf!(&dst), Arg::L(n as i64), Arg::F(-0.37)];
    launch(emu, "scale_f32", grid_for(n), B256, &mut a);
    exact("scale_f32", &f32s(&a[0]), &want.data);

    let mut want = tensor(&dst, rows, cols);
    be.fill(&mut want, 2.5).unwrap();
    let mut a = [nan_buf(n), Arg::L(n as i64), Arg::F(2.5)];
    launch(emu, "fill_f32", grid_for(n), B256, &mut a);
    exact("fill_f32", &f32s(&a[0]), &want.data);

    let want = be.copy(&tensor(&dst, rows, cols)).unwrap();
    let mut a = [buf!(&dst), nan_buf(n), Arg::L(n as i64)];
    launch(emu, "copy_f32", grid_for(n), B256, &mut a);
    exact("copy_f32", &f32s(&a[1]), &want.data);
}
