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

    #[test]
    fn lora_rows_map_to_segments() {
        assert_eq!(lora_row_segments(5, &[0..2, 3..4]), vec![0, 0, -1, 1, -1]);
    }
}
