//! Vectorisable math shared by the CPU kernels.

/// e^x for x <= 0 (scores minus their maximum), Cephes' expf polynomial
/// (about 1 ulp). Written without calls or branches so the loop over a row
/// of scores vectorises; libm's expf would be a scalar call per score.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Below -87, e^x is under f32's normal range: flush to (nearly) zero.
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * y
}
/// Sum in 16 partial sums, then a fixed pairwise reduction (vectorises; the
/// order depends only on the length).
pub fn sum_fixed(x: &[f32]) -> f32 {
    let mut p = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            p[l] += c[l];
        }
    }
    super::ops::sum16(&p) + rest.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        // Below the clamp the result is e^-87: negligible next to the row's 1.
        assert!(exp_nonpositive(-1e30) < 2e-38);
    }
}
