//! Host-side launch metadata, kept apart from the launches so it can be
//! tested (and fed to the kernel emulator) on machines without a GPU.

use crate::backend::AttentionMeta;

/// Keys per attention partition (split-K): small enough that short contexts
/// still spread over many thread blocks, a multiple of 32 and ≤ 1024 as
/// kernels/attention.cu requires.
pub const ATTENTION_PARTITION: usize = 256;

/// What `attention_partial` / `attention_reduce` read about a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Per query row: `first` visible key position, `ctx` (one past the last),
    /// and the offset of its sequence's block table in `block_tables`.
    /// Rows in no sequence have ctx 0 (their output is zero).
    pub tok_meta: Vec<i32>,
    /// Every sequence's block table, concatenated.
    pub block_tables: Vec<u32>,
    /// Partitions the longest visible span needs (at least 1).
    pub max_partitions: usize,
}

pub fn attention_plan(meta: &AttentionMeta<'_>, rows: usize, partition: usize) -> AttentionPlan {
    // Each sequence's table, concatenated; offsets[s] is where sequence s's starts.
    let mut block_tables = Vec::new();
    let mut offsets = Vec::with_capacity(meta.seqs.len());
    for seq in meta.seqs {
        offsets.push(block_tables.len());
        block_tables.extend(seq.block_table.iter().map(|b| b.index() as u32));
    }
    let mut tok_meta = vec![0i32; rows * 3];
    let mut longest = 0usize;
    for (r, span) in meta.row_spans(rows).into_iter().enumerate() {
        if let Some(s) = span {
            longest = longest.max(s.ctx - s.first);
            tok_meta[r * 3..r * 3 + 3].copy_from_slice(&[s.first as i32, s.ctx as i32, offsets[s.seq] as i32]);
        }
    }
    AttentionPlan { tok_meta, block_tables, max_partitions: longest.div_ceil(partition).max(1) }
}

/// What `attention_backward_dq` / `attention_backward_dkv` read about a batch
/// of whole sequences (key j of a sequence is its row `rows.start + j`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionGradPlan {
    /// Per query row: the rows `[lo, hi)` holding the keys it sees (0, 0 for a
    /// row in no sequence).
    pub q_meta: Vec<i32>,
    /// Per key row: the query rows `[lo, hi)` that see it (0, 0 for none).
    pub k_meta: Vec<i32>,
}

/// The key rows of every query row and the query rows of every key row, from
/// the same [`AttentionMeta::row_spans`] the CPU walks. Within a sequence both
/// ends of a query's span grow with its row, so the queries that see key `j`
/// are a range: from the first whose span ends past `j` to the first whose
/// span starts past it.
pub fn attention_grad_plan(meta: &AttentionMeta<'_>, rows: usize) -> AttentionGradPlan {
    let spans = meta.row_spans(rows);
    let mut q_meta = vec![0i32; rows * 2];
    let mut k_meta = vec![0i32; rows * 2];
    for seq in meta.seqs {
        assert_eq!(seq.context_len, seq.rows.len(), "attention backward needs whole sequences");
        let r0 = seq.rows.start;
        let span = |i: usize| spans[i].expect("a row of a sequence has a span");
        for i in seq.rows.clone() {
            let s = span(i);
            q_meta[2 * i..2 * i + 2].copy_from_slice(&[(r0 + s.first) as i32, (r0 + s.ctx) as i32]);
        }
        let (mut lo, mut hi) = (seq.rows.start, seq.rows.start);
        for j in 0..seq.rows.len() {
            while lo < seq.rows.end && span(lo).ctx <= j {
                lo += 1;
            }
            while hi < seq.rows.end && span(hi).first <= j {
                hi += 1;
            }
            let r = r0 + j;
            k_meta[2 * r..2 * r + 2].copy_from_slice(&[lo as i32, hi.max(lo) as i32]);
        }
    }
    AttentionGradPlan { q_meta, k_meta }
}

/// A row-major product `c[m, n] = op(a) · op(b)` as one column-major cuBLAS
/// call. Read column-major, a row-major `[r, c]` matrix is its transpose
/// (`[c, r]`, leading dimension c), so cuBLAS computes
/// `cᵀ = op(b)ᵀ · op(a)ᵀ`: its first operand is our `b` (transposed by cuBLAS
/// exactly when `op(b)` is not a transpose already being undone, i.e. when
/// `trans_b`), its second our `a` (likewise `trans_a`), its `m × n` output is
/// `cᵀ` (`n × m` in our terms) with leading dimension `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlasGemm {
    /// cuBLAS `transa`, applied to our `b`.
    pub trans_first: bool,
    /// cuBLAS `transb`, applied to our `a`.
    pub trans_second: bool,
    /// cuBLAS m: columns of our c.
    pub m: usize,
    /// cuBLAS n: rows of our c.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Leading dimension of `b` (its row length).
    pub ld_first: usize,
    /// Leading dimension of `a` (its row length).
    pub ld_second: usize,
    /// Leading dimension of `c` (its row length).
    pub ldc: usize,
}

impl BlasGemm {
    /// `(rows, cols)` of the row-major output `c`.
    pub fn c_shape(&self) -> (usize, usize) {
        (self.n, self.m)
    }
}

/// The cuBLAS call for `op(a) · op(b)` with `a` `[a_rows, a_cols]` and `b`
/// `[b_rows, b_cols]` row-major; inner dimensions must agree.
pub fn blas_gemm(a: (usize, usize), trans_a: bool, b: (usize, usize), trans_b: bool) -> BlasGemm {
    let (m, k) = if trans_a { (a.1, a.0) } else { a };
    let (kb, n) = if trans_b { (b.1, b.0) } else { b };
    assert_eq!(k, kb, "gemm inner dimensions: op(a) is {m}x{k}, op(b) is {kb}x{n}");
    BlasGemm { trans_first: trans_b, trans_second: trans_a, m: n, n: m, k, ld_first: b.1, ld_second: a.1, ldc: n }
}

/// Per row, the index of its segment in `segments` or -1.
pub fn lora_row_segments(rows: usize, segments: &[std::ops::Range<usize>]) -> Vec<i32> {
    let mut row_seg = vec![-1i32; rows];
    for (s, r) in segments.iter().enumerate() {
        for row in r.clone() {
            row_seg[row] = s as i32;
        }
    }
    row_seg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BlockId;
    use crate::backend::SeqAttention;

    #[test]
    fn attention_plan_positions_windows_and_tables() {
        let t0 = [BlockId(3), BlockId(1)];
        let t1 = [BlockId(7)];
        let seqs = [
            // A 3-token prefill chunk ending at position 5 (context 6).
            SeqAttention { rows: 0..3, context_len: 6, block_table: &t0 },
            // A decode at position 2; row 3 belongs to no sequence.
            SeqAttention { rows: 4..5, context_len: 3, block_table: &t1 },
        ];
        let meta =
            AttentionMeta { seqs: &seqs, num_heads: 2, kv_heads: 1, head_dim: 4, scale: 0.5, sliding_window: Some(4) };
        let p = attention_plan(&meta, 5, 2);
        assert_eq!(p.block_tables, vec![3, 1, 7]);
        assert_eq!(p.tok_meta, vec![0, 4, 0, 1, 5, 0, 2, 6, 0, 0, 0, 0, 0, 3, 2]);
        // Longest visible span is 4 keys (the window): 2 partitions of 2.
        assert_eq!(p.max_partitions, 2);
    }

    /// The query rows that see each key, by brute force over the CPU's spans.
    fn brute_force_k_meta(meta: &AttentionMeta<'_>, rows: usize) -> Vec<i32> {
        let spans = meta.row_spans(rows);
        let mut k_meta = vec![0i32; rows * 2];
        for seq in meta.seqs {
            for j in 0..seq.rows.len() {
                let seeing: Vec<usize> =
                    seq.rows.clone().filter(|&i| spans[i].is_some_and(|s| s.first <= j && j < s.ctx)).collect();
                // Contiguous, so a range describes it.
                assert!(seeing.windows(2).all(|w| w[1] == w[0] + 1), "{seeing:?}");
                if let (Some(&lo), Some(&hi)) = (seeing.first(), seeing.last()) {
                    let r = seq.rows.start + j;
                    k_meta[2 * r..2 * r + 2].copy_from_slice(&[lo as i32, hi as i32 + 1]);
                }
            }
        }
        k_meta
    }

    #[test]
    fn attention_grad_plan_ranges_match_the_row_spans() {
        // Two sequences, a row between them in none, one after them.
        let seqs = [
            SeqAttention { rows: 0..5, context_len: 5, block_table: &[] },
            SeqAttention { rows: 6..13, context_len: 7, block_table: &[] },
        ];
        for window in [None, Some(1), Some(3), Some(7), Some(100)] {
            let meta = AttentionMeta {
                seqs: &seqs,
                num_heads: 4,
                kv_heads: 2,
                head_dim: 8,
                scale: 1.0,
                sliding_window: window,
            };
            let p = attention_grad_plan(&meta, 14);
            let spans = meta.row_spans(14);
            for (i, s) in spans.iter().enumerate() {
                let want = s.map_or([0, 0], |s| {
                    let r0 = seqs[s.seq].rows.start;
                    [(r0 + s.first) as i32, (r0 + s.ctx) as i32]
                });
                assert_eq!(p.q_meta[2 * i..2 * i + 2], want, "query row {i}, window {window:?}");
            }
            assert_eq!(p.k_meta, brute_force_k_meta(&meta, 14), "window {window:?}");
        }
        // Spot values: causal, row 6 is key 0 of the second sequence (seen by
        // all its rows); with a window of 3, key 2 of the first is seen by
        // queries 2..5 (positions 2, 3, 4).
        let causal =
            AttentionMeta { seqs: &seqs, num_heads: 1, kv_heads: 1, head_dim: 8, scale: 1.0, sliding_window: None };
        let p = attention_grad_plan(&causal, 14);
        assert_eq!(p.k_meta[12..14], [6, 13]);
        assert_eq!(p.q_meta[24..26], [6, 13]);
        assert_eq!(p.q_meta[10..12], [0, 0]);
        assert_eq!(p.k_meta[10..12], [0, 0]);
        let windowed = AttentionMeta { sliding_window: Some(3), ..causal };
        assert_eq!(attention_grad_plan(&windowed, 14).k_meta[4..6], [2, 5]);
    }

    /// cuBLAS's sgemm semantics, written out: column-major `C = α op(A) op(B) + β C`.
    #[allow(clippy::too_many_arguments)]
    fn colmajor_gemm(
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        for j in 0..n {
            for i in 0..m {
                let mut s = 0f64;
                for l in 0..k {
                    let x = if ta { a[l + i * lda] } else { a[i + l * lda] };
                    let y = if tb { b[j + l * ldb] } else { b[l + j * ldb] };
                    s += x as f64 * y as f64;
                }
                let old = if beta == 0.0 { 0.0 } else { beta as f64 * c[i + j * ldc] as f64 };
                c[i + j * ldc] = (alpha as f64 * s + old) as f32;
            }
        }
    }

    #[test]
    fn blas_gemm_maps_every_transpose_to_column_major() {
        let fill = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
        for (m, n, k) in [(5usize, 7usize, 3usize), (1, 9, 4), (6, 1, 11), (4, 4, 1)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a_shape = if ta { (k, m) } else { (m, k) };
                let b_shape = if tb { (n, k) } else { (k, n) };
                let (a, b, c0) = (fill(m * k, 0.37), fill(k * n, 0.11), fill(m * n, 0.05));
                // The row-major product, naively.
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0f64;
                        for l in 0..k {
                            let x = if ta { a[l * m + i] } else { a[i * k + l] };
                            let y = if tb { b[j * k + l] } else { b[l * n + j] };
                            s += x as f64 * y as f64;
                        }
                        want[i * n + j] = (0.5 * s + 2.0 * c0[i * n + j] as f64) as f32;
                    }
                }
                let g = blas_gemm(a_shape, ta, b_shape, tb);
                assert_eq!(g.c_shape(), (m, n));
                let mut c = c0.clone();
                colmajor_gemm(
                    g.trans_first,
                    g.trans_second,
                    (g.m, g.n, g.k),
                    0.5,
                    &b,
                    g.ld_first,
                    &a,
                    g.ld_second,
                    2.0,
                    &mut c,
                    g.ldc,
                );
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-5, "{m}x{n}x{k} ta {ta} tb {tb}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn blas_gemm_of_the_forward_and_the_input_gradient() {
        // Forward: out[m, n] = x[m, k] · W[n, k]ᵀ is W transposed by cuBLAS
        // against x as it lies (gemm.rs's matmul before this mapping existed).
        let (m, n, k) = (9, 37, 96);
        let g = blas_gemm((m, k), false, (n, k), true);
        let want =
            BlasGemm { trans_first: true, trans_second: false, m: n, n: m, k, ld_first: k, ld_second: k, ldc: n };
        assert_eq!(g, want);
        // Input gradient: dx[m, k] = dy[m, n] · W[n, k], nothing transposed.
        let g = blas_gemm((m, n), false, (n, k), false);
        let want =
            BlasGemm { trans_first: false, trans_second: false, m: k, n: m, k: n, ld_first: k, ld_second: n, ldc: k };
        assert_eq!(g, want);
    }

    #[test]
    #[should_panic(expected = "inner dimensions")]
    fn blas_gemm_refuses_mismatched_inner_dimensions() {
        blas_gemm((3, 4), false, (5, 6), false);
    }

    #[test]
    fn lora_rows_map_to_segments() {
        assert_eq!(lora_row_segments(5, &[0..2, 3..4]), vec![0, 0, -1, 1, -1]);
    }
}
