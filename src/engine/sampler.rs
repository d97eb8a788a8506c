//! Logits -> token ids: greedy, or seeded temperature / top-k / top-p / min-p
//! sampling, after OpenAI's and vLLM's logit processors (bias, penalties).

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off: drop tokens whose probability is below `min_p` x the top one's.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// OpenAI penalties, subtracted from the logits of tokens already generated:
    /// `presence` once, `frequency` per occurrence. 0 = off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// vLLM/HF repetition penalty over prompt and generated tokens. 1 = off.
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids (OpenAI `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// Per-sequence sampling state: its own RNG (so results do not depend on
/// batching) and the token counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    /// Generated tokens and how often each appeared (presence/frequency penalties).
    output_counts: HashMap<u32, u32>,
    /// Prompt and generated tokens (repetition penalty).
    seen: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self::with_prompt(params, &[])
    }

    pub fn with_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_entropy(),
        };
        let seen = if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() };
        Self { params, rng, output_counts: HashMap::new(), seen }
    }

    /// Records a generated token (for the penalties).
    pub fn observe(&mut self, token: u32) {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            *self.output_counts.entry(token).or_default() += 1;
        }
        if p.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    fn needs_processing(&self, banned: &[u32]) -> bool {
        let p = &self.params;
        !banned.is_empty()
            || !p.logit_bias.is_empty()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || p.repetition_penalty != 1.0
    }

    /// Picks the next token from raw `logits`; `banned` ids (e.g. end-of-sequence
    /// before `min_tokens`) are never picked.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> u32 {
        let processed;
        let logits = if self.needs_processing(banned) {
            processed = self.process(logits, banned);
            &processed[..]
        } else {
            logits
        };
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        self.sample_random(logits)
    }

    /// Bias, penalties and bans, in vLLM's order.
    fn process(&self, logits: &[f32], banned: &[u32]) -> Vec<f32> {
        let p = &self.params;
        let mut l = logits.to_vec();
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
            }
        }
        for (&t, &c) in &self.output_counts {
            if let Some(x) = l.get_mut(t as usize) {
                *x -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
        for &t in banned {
            if let Some(x) = l.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        l
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l * inv_t)).collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        // Highest first; ties by id so the order is deterministic.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
        }
        let needs_order = p.top_p < 1.0 || p.top_k > 0;
        if needs_order {
            cand.sort_unstable_by(order);
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        if p.min_p > 0.0 {
            // exp(l - max) is already the probability relative to the top token.
            for q in probs.iter_mut() {
                if *q < p.min_p {
                    *q = 0.0;
                }
            }
        }
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept: f32 = probs[..keep].iter().sum();
        let r: f32 = self.rng.gen::<f32>() * kept;
        let mut acc = 0.0;
        for i in 0..keep {
            acc += probs[i];
            if r < acc && probs[i] > 0.0 {
                return cand[i].0;
            }
        }
        // Rounding left r at the very top: the last token with mass.
        (0..keep).rev().find(|&i| probs[i] > 0.0).map_or(cand[0].0, |i| cand[i].0)
    }
}

/// Log-probability of `chosen` and the `k` most likely tokens (ties by id),
/// from the log-softmax of raw `logits`.
pub fn logprobs(logits: &[f32], chosen: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let k = k.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_unstable_by(order);
        top = idx.into_iter().map(|t| (t, logits[t as usize] - lse)).collect();
    }
    (logits[chosen as usize] - lse, top)
}

/// Index of the largest logit; the first one on ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 0.8, top_k: 5, seed: Some(42), ..Default::default() };
        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p));
        let xs: Vec<u32> = (0..100).map(|_| a.sample(&logits, &[])).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.sample(&logits, &[])).collect();
        assert_eq!(xs, ys);
        // The top 5 logits are those with i % 7 == 6 (value 1.8): ids 6, 13, 20, 27, 34.
        assert!(xs.iter().all(|x| [6, 13, 20, 27, 34].contains(x)), "{xs:?}");
        assert!(xs.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let mut logits = vec![-10.0f32; 10];
        logits[3] = 5.0;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(1), ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 3));
    }

    #[test]
    fn banned_tokens_bias_and_penalties_change_the_greedy_pick() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[1]), 2, "a banned token is never picked");
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(3, 10.0)], ..Default::default() });
        assert_eq!(s.sample(&logits, &[]), 3);
        let mut s = Sampler::new(SamplingParams { presence_penalty: 1.5, ..Default::default() });
        assert_eq!(s.sample(&logits, &[]), 1);
        s.observe(1);
        assert_eq!(s.sample(&logits, &[]), 2, "3 - 1.5 < 2");
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.6, ..Default::default() });
        s.observe(1);
        assert_eq!(s.sample(&logits, &[]), 1, "3 - 0.6 > 2");
        s.observe(1);
        assert_eq!(s.sample(&logits, &[]), 2, "3 - 1.2 < 2");
        let mut s = Sampler::with_prompt(SamplingParams { repetition_penalty: 2.0, ..Default::default() }, &[1]);
        assert_eq!(s.sample(&logits, &[]), 2, "3 / 2 < 2");
    }

    #[test]
    fn min_p_drops_the_tail() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, seed: Some(3), ..Default::default() });
        let picks: HashSet<u32> = (0..200).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(picks, HashSet::from([1, 2]));
    }

    #[test]
    fn logprobs_match_log_softmax_and_sort_the_top() {
        let logits = [0.0f32, 1.0, 2.0, 1.0];
        let (lp, top) = logprobs(&logits, 1, 3);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp - (1.0 - z.ln())).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1, 3]);
        let mass: f32 = top.iter().map(|t| t.1.exp()).sum();
        assert!((mass - (2f32.exp() + 2.0 * 1f32.exp()) / z).abs() < 1e-5);
    }
}
