//! Weight storage kinds: the GGUF block types (`ggml_type`) plus the
//! bitsandbytes 4-bit codes; sizes and reference dequantisation.
//! Layouts: ../shared/FORMATS.md §3 (bitsandbytes), §4 (ggml-common.h).
//! GPTQ and AWQ checkpoints have no kind of their own: they are rewritten at load
//! into Q4_0 / Q5_0 / Q8_0 blocks that dequantise to the same values (`quant::gptq`).

/// How a weight row is stored: whole blocks of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    F32,
    F16,
    BF16,
    Q4_0,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// bitsandbytes NF4 in 64-element blocks: f32 absmax, then 32 bytes of
    /// codes (element 2j in the high nibble, 2j+1 in the low), as in the file.
    Nf4,
    /// bitsandbytes FP4, laid out as [`WeightKind::Nf4`].
    Fp4,
    /// 4-bit integer codes with one f16 scale and one zero point per group of
    /// 128 inputs (GPTQ/AWQ's asymmetric layout, one block per group):
    /// f16 `d`, u8 zero `z` (0..=16), a zero byte, then 64 bytes of codes as
    /// four Q4_0-style sub-blocks of 32 (byte j of a sub-block: element j in
    /// the low nibble, j + 16 in the high). Value `d·(q − z)`. 68 bytes,
    /// 4.25 bits per weight.
    Int4G128,
    /// [`WeightKind::Int4G128`] with groups of 64 (36 bytes, 4.5 bpw).
    Int4G64,
    /// [`WeightKind::Int4G128`] with groups of 32 (20 bytes, 5 bpw).
    Int4G32,
}

impl WeightKind {
    /// Every kind tandem supports.
    pub const ALL: [WeightKind; 14] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q5_0,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Nf4,
        Self::Fp4,
        Self::Int4G128,
        Self::Int4G64,
        Self::Int4G32,
    ];
    /// Parse a GGUF `ggml_type` id; `None` for types tandem does not support.
    pub fn from_gguf_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            30 => Self::BF16,
            2 => Self::Q4_0,
            6 => Self::Q5_0,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            _ => return None,
        })
    }
    /// The `ggml_type` id written in GGUF files; `None` for kinds GGUF lacks.
    pub fn gguf_id(self) -> Option<u32> {
        Some(match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 30,
            Self::Q4_0 => 2,
            Self::Q5_0 => 6,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Nf4 | Self::Fp4 | Self::Int4G128 | Self::Int4G64 | Self::Int4G32 => return None,
        })
    }
    /// The kind's lower-case name: `random:<shape>:<name>` models and the
    /// CUDA kernels' suffixes (`gemv_q4_k`) spell kinds this way.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q4_0 => "q4_0",
            Self::Q5_0 => "q5_0",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
            Self::Int4G128 => "int4g128",
            Self::Int4G64 => "int4g64",
            Self::Int4G32 => "int4g32",
        }
    }
    /// The group-wise int4 kind for groups of `group` inputs (32, 64, 128).
    pub fn int4_group(group: usize) -> Option<Self> {
        Some(match group {
            32 => Self::Int4G32,
            64 => Self::Int4G64,
            128 => Self::Int4G128,
            _ => return None,
        })
    }
    /// Whether this is one of the group-wise int4 kinds.
    pub fn is_int4_group(self) -> bool {
        matches!(self, Self::Int4G128 | Self::Int4G64 | Self::Int4G32)
    }
    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => 32,
            Self::Nf4 | Self::Fp4 => 64,
            Self::Int4G32 => 32,
            Self::Int4G64 => 64,
            Self::Int4G128 => 128,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Nf4 | Self::Fp4 => 36,
            Self::Int4G32 => 20,
            Self::Int4G64 => 36,
            Self::Int4G128 => 68,
        }
    }
    /// Bytes of one row of `n` elements; `None` if `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

/// Why a buffer could not be dequantised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("{ty:?}: {n} elements is not a whole number of {block}-element blocks")]
    PartialBlock { ty: WeightKind, n: usize, block: usize },
    #[error("{ty:?}: {n} elements need {expected} bytes of blocks, got {got}")]
    SizeMismatch { ty: WeightKind, n: usize, expected: usize, got: usize },
}

/// IEEE half to single; exact for every input (NaN payloads included).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed scale bytes
/// of a Q4_K / Q5_K block (`ggml-quants.c::get_scale_min_k4`).
///
/// # Panics
/// If `j >= 8` or `q` is shorter than 12 bytes (a caller bug, not a file error).
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// Dequantise whole blocks of `ty` into `out` (`out.len()` elements).
///
/// Scalar reference: every product is rounded to f32 in the same order as
/// gguf-py's numpy code (`(d*sc)*q - dmin*m`, never fused), so the results are
/// bit-identical to `gguf.quants.dequantize`.
pub fn dequantize(ty: WeightKind, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let n = out.len();
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(DequantError::PartialBlock { ty, n, block });
    }
    let expected = (n / block).checked_mul(ty.type_size());
    if expected != Some(data.len()) {
        return Err(DequantError::SizeMismatch { ty, n, expected: expected.unwrap_or(usize::MAX), got: data.len() });
    }
    let blocks = data.chunks_exact(ty.type_size());
    let outs = out.chunks_exact_mut(block);
    match ty {
        WeightKind::F32 => blocks.zip(outs).for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        WeightKind::F16 => blocks.zip(outs).for_each(|(b, y)| y[0] = f16_at(b, 0)),
        WeightKind::BF16 => {
            blocks.zip(outs).for_each(|(b, y)| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
        }
        WeightKind::Q4_0 => blocks.zip(outs).for_each(|(b, y)| block_q4_0(b, y)),
        WeightKind::Q5_0 => blocks.zip(outs).for_each(|(b, y)| block_q5_0(b, y)),
        WeightKind::Q8_0 => blocks.zip(outs).for_each(|(b, y)| block_q8_0(b, y)),
        WeightKind::Q4K => blocks.zip(outs).for_each(|(b, y)| block_q4k(b, y)),
        WeightKind::Q5K => blocks.zip(outs).for_each(|(b, y)| block_q5k(b, y)),
        WeightKind::Q6K => blocks.zip(outs).for_each(|(b, y)| block_q6k(b, y)),
        WeightKind::Nf4 => blocks.zip(outs).for_each(|(b, y)| super::bnb::dequant_block(&super::bnb::NF4_CODE, b, y)),
        WeightKind::Fp4 => blocks.zip(outs).for_each(|(b, y)| super::bnb::dequant_block(&super::bnb::FP4_CODE, b, y)),
        WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
            blocks.zip(outs).for_each(|(b, y)| block_int4_group(b, y))
        }
    }
    Ok(())
}

fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// One group of a group-wise int4 kind (`y.len()` is the group).
fn block_int4_group(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let z = i32::from(b[2]);
    for (qs, y) in b[4..].chunks_exact(16).zip(y.chunks_exact_mut(32)) {
        for j in 0..16 {
            y[j] = d * ((qs[j] & 0xF) as i32 - z) as f32;
            y[j + 16] = d * ((qs[j] >> 4) as i32 - z) as f32;
        }
    }
}

fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let h = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as u32 | (((h >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((h >> (j + 16)) & 1) << 4);
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = (q as i8) as f32 * d;
    }
}

/// Shared body of Q4_K and Q5_K: `qh` is `None` for Q4_K.
fn block_k4(d: f32, dmin: f32, scales: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        for half in 0..2 {
            let sub = 2 * c + half;
            let (sc, m) = get_scale_min_k4(sub, scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let yo = &mut y[32 * sub..32 * sub + 32];
            for l in 0..32 {
                let mut v = if half == 0 { q[l] & 0xF } else { q[l] >> 4 };
                if let Some(qh) = qh {
                    v |= ((qh[l] >> sub) & 1) << 4;
                }
                yo[l] = dl * v as f32 - ml;
            }
        }
    }
}

fn block_q4k(b: &[u8], y: &mut [f32]) {
    block_k4(f16_at(b, 0), f16_at(b, 2), &b[4..16], None, &b[16..144], y);
}

fn block_q5k(b: &[u8], y: &mut [f32]) {
    let qh = &b[16..48];
    block_k4(f16_at(b, 0), f16_at(b, 2), &b[4..16], Some(qh), &b[48..176], y);
}

fn block_q6k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let yo = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
