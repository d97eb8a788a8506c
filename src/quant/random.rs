//! Random weights of any supported kind, for kernel self-tests and benchmarks
//! on models with real shapes but no file (`random:llama3-8b:q4_k`).
//!
//! Quantised blocks are random bytes except their f16 scale fields, which are
//! set to small finite values so dequantised weights look like a trained
//! model's (|w| around 0.01..0.1) and never hold inf or NaN.

use super::ggml::WeightKind;

/// A small, fast generator (xorshift64*): reproducible from a seed, with no
/// dependency on `rand`'s algorithm choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    pub fn fill_bytes(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// `rows × cols` weights of `kind` (cols a whole number of blocks), values of
/// magnitude about `scale`.
pub fn random_weight_bytes(kind: WeightKind, rows: usize, cols: usize, scale: f32, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = kind.row_bytes(cols).expect("cols must be whole blocks");
    let mut b = vec![0u8; rows * row_bytes];
    match kind {
        WeightKind::F32 => {
            for c in b.chunks_exact_mut(4) {
                c.copy_from_slice(&(rng.uniform() * scale).to_le_bytes());
            }
        }
        WeightKind::F16 => {
            for c in b.chunks_exact_mut(2) {
                put_f16(c, 0, rng.uniform() * scale);
            }
        }
        WeightKind::BF16 => {
            for c in b.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.uniform() * scale).to_bits().to_le_bytes());
            }
        }
        _ => {
            rng.fill_bytes(&mut b);
            let ts = kind.type_size();
            for blk in b.chunks_exact_mut(ts) {
                // Either sign: ggml's quantisers write negative scales too (q4_0
                // divides by the signed extreme), and kernels must handle them.
                let mut d = || {
                    let u = rng.uniform();
                    scale * (0.5 + 0.5 * u.abs()) * if u < 0.0 { -1.0 } else { 1.0 }
                };
                match kind {
                    // 4/5-bit codes span ±16: d of scale/8 keeps |w| ≲ 2·scale.
                    WeightKind::Q4_0 | WeightKind::Q5_0 => put_f16(blk, 0, d() / 8.0),
                    WeightKind::Q8_0 => put_f16(blk, 0, d() / 127.0),
                    // d·sc·q with 6-bit sc and 4/5-bit q; dmin·m likewise.
                    WeightKind::Q4K | WeightKind::Q5K => {
                        put_f16(blk, 0, d() / (63.0 * 16.0));
                        put_f16(blk, 2, d() / (63.0 * 16.0));
                    }
                    WeightKind::Q6K => put_f16(blk, 208, d() / (127.0 * 32.0)),
                    // code · absmax with codes in [-1, 1]; absmax is positive.
                    WeightKind::Nf4 | WeightKind::Fp4 => blk[..4].copy_from_slice(&(d().abs() * 2.0).to_le_bytes()),
                    // Codes 0..15 about a zero of 4..12: |q − z| <= 12.
                    WeightKind::Int4G128 | WeightKind::Int4G64 | WeightKind::Int4G32 => {
                        put_f16(blk, 0, d() / 8.0);
                        blk[2] = 4 + blk[2] % 9;
                        blk[3] = 0;
                    }
                    WeightKind::F32 | WeightKind::F16 | WeightKind::BF16 => unreachable!(),
                }
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_dequantise_to_small_finite_values() {
        let mut rng = Rng::new(7);
        for kind in WeightKind::ALL {
            let b = random_weight_bytes(kind, 3, 512, 0.05, &mut rng);
            let mut out = vec![0f32; 3 * 512];
            crate::quant::ggml::dequantize(kind, &b, &mut out).unwrap();
            let max = out.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(out.iter().all(|v| v.is_finite()), "{kind:?}");
            assert!(max > 0.005 && max < 0.5, "{kind:?}: max |w| {max}");
        }
    }
}
