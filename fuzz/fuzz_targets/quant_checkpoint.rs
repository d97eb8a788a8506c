//! Any bytes as the parts of a quantised checkpoint: the `quantization_config`
//! JSON, or GPTQ / AWQ / bitsandbytes tensors of a small shape the first bytes
//! pick. Parsing and unpacking return a value or an error, never panic or read
//! past a buffer; what unpacks rewrites into whole rows that dequantise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::quant::bnb::{self, Absmax};
use tandem::quant::ggml::{dequantize, WeightKind};
use tandem::quant::gptq::{self, GroupCodes};
use tandem::quant::hf_config;

/// `count` words cycled from `words` (the fuzzer's bytes fill any size).
fn take(words: &[u32], from: usize, count: usize) -> Vec<u32> {
    (0..count).map(|i| words[(from + i) % words.len()]).collect()
}

fn check(codes: GroupCodes) {
    let Ok(r) = codes.rewrite() else { return };
    let row = r.kind.row_bytes(codes.k_in).expect("whole blocks");
    assert_eq!(r.bytes.len(), row * codes.n_out);
    let mut out = vec![0f32; codes.n_out * codes.k_in];
    dequantize(r.kind, &r.bytes, &mut out).expect("sizes agree");
    let order: Vec<usize> = match &r.input_perm {
        Some(p) => p.iter().map(|&k| k as usize).collect(),
        None => (0..codes.k_in).collect(),
    };
    let mut seen = vec![false; codes.k_in];
    assert!(order.iter().all(|&k| !std::mem::replace(&mut seen[k], true)), "a permutation");
    // The rewrite dequantises to exactly s·(q − z).
    let want = codes.dequantize();
    for n in 0..codes.n_out {
        for (j, &k) in order.iter().enumerate() {
            let (a, b) = (out[n * codes.k_in + j], want[n * codes.k_in + k]);
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{:?} [{n},{k}]: {a} vs {b}", r.kind);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_at_checked(4) else { return };
    let words = gptq::words(rest);
    let n = 8 * (1 + usize::from(head[1] >> 4) % 4);
    let k = 32 * (1 + usize::from(head[2]) % 4);
    let exact = head[3] & 0x80 == 0; // sizes that fit, or whatever the bytes give
    match head[0] % 4 {
        0 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                if let Ok(q) = hf_config::parse(&v) {
                    assert!(!q.describe().is_empty());
                }
            }
        }
        1 if !words.is_empty() => {
            let bits = if head[1] & 1 == 0 { 4 } else { 8 };
            let per = 32 / bits as usize;
            let group = [None, Some(32), Some(64)][usize::from(head[3]) % 3];
            let groups = k.div_ceil(group.unwrap_or(k));
            let (nq, nz) = if exact { (k / per * n, groups * n / per) } else { (words.len() / 2, words.len() / 4) };
            let scales = take(&words, 7, groups * n).into_iter().map(|w| f32::from_bits(w & 0x3fff_ffff)).collect();
            let g_idx = (head[3] & 0x40 != 0).then(|| take(&words, 3, k).iter().map(|w| w % (groups as u32 + 1)).collect());
            let c = gptq::unpack_gptq(bits, group, head[1] & 2 != 0, n, k, &take(&words, 0, nq), &take(&words, 5, nz), scales, g_idx);
            if let Ok(c) = c {
                check(c);
            }
        }
        2 if !words.is_empty() => {
            let g = if head[3] & 1 == 0 { 32 } else { 64 };
            let groups = k / g;
            let (nq, nz) = if exact { (k * n / 8, groups * n / 8) } else { (words.len(), words.len() / 3) };
            let scales = take(&words, 1, groups * n).into_iter().map(|w| half::f16::from_bits(w as u16).to_f32()).collect();
            if let Ok(c) = gptq::unpack_awq(g, n, k, &take(&words, 0, nq), &take(&words, 2, nz), scales) {
                check(c);
            }
        }
        3 => {
            let kind = if head[1] & 1 == 0 { WeightKind::Nf4 } else { WeightKind::Fp4 };
            let cols = 64 * (1 + usize::from(head[2]) % 3);
            let blocksize = [64, 128, 32, 256][usize::from(head[3]) % 4];
            let packed_len = if exact { n * cols / 2 } else { rest.len() };
            let packed: Vec<u8> = (0..packed_len).map(|i| rest.get(i).copied().unwrap_or(0)).collect();
            let absmax = Absmax::Plain((0..(n * cols).div_ceil(blocksize)).map(|i| i as f32 * 0.5).collect());
            if let Ok(rows) = bnb::to_rows(kind, n, cols, blocksize, &packed, &absmax) {
                let mut out = vec![0f32; n * cols];
                dequantize(kind, &rows, &mut out).expect("sizes agree");
            }
        }
        _ => {}
    }
});
