//! The 32-element kinds' tile: a few weight rows packed so that each 32-bit
//! lane of a register belongs to one row. For every block, register `t`
//! holds elements `4t..4t+4` of every row; an activation row's four codes
//! for that group are broadcast to all lanes, and one `vpdpbusd` (or
//! `maddubs`) advances every row's dot product at once. A block's dot is
//! then whole in its lane, scaled and accumulated with one FMA: eight
//! integer instructions and three float ones per block for 16 weight rows,
//! where a row-major kernel spends a horizontal reduction or a float step
//! per four elements. The packing (decode, transpose) is paid once per
//! matmul call and shared by all its activation rows; a decode step with one
//! row pays it as it paid the decoding before.

use super::{
    avx2, avx512, blocks_32, blocks_per_stored, is_bnb, is_int4g, Kernel, Q8Row32, WeightKind, FP4, INT4G128, INT4G32,
    INT4G64, NF4, Q4_0, Q5_0, Q8_0, TILE_ROWS,
};
use std::cell::RefCell;

/// One 64-byte aligned register's worth of bytes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// Packed weight rows (8 or 16 lanes), kept per thread so that a matmul
/// allocates nothing once warm.
#[derive(Default)]
pub struct Tile {
    /// Per block, 8 registers of `4 · lanes` bytes: the unsigned codes
    /// (Q4_0 `q`, Q5_0 `q`, Q8_0 and NF4/FP4 `q + 128`, group-wise int4
    /// `q − z + 16`) of group `t` of every row.
    pub codes: Vec<Line>,
    /// Per block and lane: the row's block scale.
    pub d: Vec<f32>,
}

impl Tile {
    /// Room for `blocks` blocks of `lanes` rows.
    pub fn reserve(&mut self, blocks: usize, lanes: usize) {
        self.codes.resize(blocks * lanes / 2, Line([0; 64]));
        self.d.resize(blocks * lanes, 0.0);
    }
}

/// `log2` of kind `K`'s code offset (8, 16, 128): kernels on unsigned codes
/// add `offset · (−Σx)` per block.
pub const fn offset_shift(kind: u8) -> u32 {
    match kind {
        Q4_0 => 3,
        Q5_0 | INT4G128 | INT4G64 | INT4G32 => 4,
        _ => 7,
    }
}

/// Where 32-element block `b` of a row of kind `K` starts (blocks of `ts`
/// bytes; for bitsandbytes and group-wise int4 kinds, where its 16 code
/// bytes start).
#[inline(always)]
pub fn block_at<const K: u8>(b: usize, ts: usize) -> usize {
    if is_bnb(K) {
        (b / 2) * 36 + 4 + (b % 2) * 16
    } else if is_int4g(K) {
        let subs = blocks_per_stored(K);
        (b / subs) * ts + 4 + (b % subs) * 16
    } else {
        b * ts
    }
}

/// Where the f16 scale of 32-element block `b` of a row of kind `K` lies
/// (not for bitsandbytes kinds, whose scale is [`bnb_d`]).
#[inline(always)]
pub fn scale_at<const K: u8>(b: usize, ts: usize) -> usize {
    (b / blocks_per_stored(K)) * ts
}

/// A bitsandbytes row's scale for 32-element block `b`: its 64-block's
/// absmax / 127 (the scalar twin's value, bit for bit).
///
/// # Safety
/// `row` must hold block `b`.
#[inline(always)]
pub unsafe fn bnb_d(row: *const u8, b: usize) -> f32 {
    (row.add((b / 2) * 36) as *const f32).read_unaligned() / 127.0
}

thread_local! {
    static TILE: RefCell<Tile> = RefCell::default();
}

/// Activation rows per multiplication call (their accumulators and the
/// block's weight registers fit in 16 ymm or 32 zmm registers).
const GROUP: usize = 4;

/// [`super::dot_32_tile`] on a SIMD kernel.
///
/// # Safety
/// `kernel` must be one the CPU runs (as `Kernel::for_isa` / `available` give).
pub unsafe fn dot_32_tile(
    kernel: Kernel,
    kind: WeightKind,
    rows: &[&[u8]],
    xs: &[Q8Row32],
    sink: &mut impl FnMut(usize, usize, &[f32]),
) {
    let lanes = if kernel == Kernel::Avx512Vnni { 16 } else { 8 };
    let ts = kind.type_size();
    let nb = blocks_32(kind, rows[0].len());
    // Packing prefetches the same place in the next task's rows (which this
    // thread most likely packs next): prefetching 1 KiB ahead within the row,
    // as the row-major kernels do, left decode ~10% slower, since a tile
    // reads its 16 rows side by side and a row is often shorter than that.
    let ahead = TILE_ROWS * rows[0].len();
    TILE.with(|tile| {
        let tile = &mut *tile.borrow_mut();
        for (c, chunk) in rows.chunks(lanes).enumerate() {
            // A short chunk repeats its last row in the spare lanes.
            let padded: [&[u8]; 16] = std::array::from_fn(|j| chunk[j.min(chunk.len() - 1)]);
            let padded = &padded[..lanes];
            macro_rules! pack {
                ($($f:ident)::+) => {
                    match kind {
                        WeightKind::Q4_0 => $($f)::+::<Q4_0>(padded, ts, ahead, tile),
                        WeightKind::Q5_0 => $($f)::+::<Q5_0>(padded, ts, ahead, tile),
                        WeightKind::Nf4 => $($f)::+::<NF4>(padded, ts, ahead, tile),
                        WeightKind::Fp4 => $($f)::+::<FP4>(padded, ts, ahead, tile),
                        WeightKind::Int4G128 => $($f)::+::<INT4G128>(padded, ts, ahead, tile),
                        WeightKind::Int4G64 => $($f)::+::<INT4G64>(padded, ts, ahead, tile),
                        WeightKind::Int4G32 => $($f)::+::<INT4G32>(padded, ts, ahead, tile),
                        _ => $($f)::+::<Q8_0>(padded, ts, ahead, tile),
                    }
                };
            }
            if kernel == Kernel::Avx512Vnni {
                pack!(avx512::pack)
            } else {
                pack!(avx2::pack)
            }
            let mut vals = [[0f32; 16]; GROUP];
            for g in (0..xs.len()).step_by(GROUP) {
                let x = &xs[g..xs.len().min(g + GROUP)];
                macro_rules! by_rows {
                    ($($f:ident)::+, $k:block) => {
                        match x.len() {
                            1 => $($f)::+::<$k, 1>(tile, nb, x, &mut vals),
                            2 => $($f)::+::<$k, 2>(tile, nb, x, &mut vals),
                            3 => $($f)::+::<$k, 3>(tile, nb, x, &mut vals),
                            _ => $($f)::+::<$k, 4>(tile, nb, x, &mut vals),
                        }
                    };
                }
                macro_rules! by_kind {
                    ($($f:ident)::+) => {
                        match kind {
                            WeightKind::Q4_0 => by_rows!($($f)::+, { Q4_0 }),
                            // Group-wise int4 codes are offset by 16 like Q5_0's.
                            WeightKind::Q5_0 | WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
                                by_rows!($($f)::+, { Q5_0 })
                            }
                            // NF4/FP4 codes are offset like Q8_0's: the same multiply.
                            _ => by_rows!($($f)::+, { Q8_0 }),
                        }
                    };
                }
                match kernel {
                    Kernel::Avx512Vnni => by_kind!(avx512::multiply),
                    Kernel::AvxVnni => by_kind!(avx2::vnni::multiply),
                    _ => by_kind!(avx2::maddubs::multiply),
                }
                for (i, v) in vals[..x.len()].iter().enumerate() {
                    sink(g + i, c * lanes, &v[..chunk.len()]);
                }
            }
        }
    });
}
