//! Validation of the generation parameters both endpoints share, and the engine
//! requests they turn into. Every range error names its field in `param`.

use std::collections::BTreeMap;

use super::error::ApiError;
use crate::engine::{EngineInfo, EngineRequest, SamplingParams, StoppingParams};

/// Most choices per prompt (OpenAI's limit).
pub const MAX_N: usize = 128;
/// Most alternatives per position for logprobs (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;
/// Default `max_tokens` is the rest of the context, but no more than this: a client
/// that forgot `max_tokens` on a long-context model should not hold a sequence for
/// tens of thousands of tokens of a runaway generation.
pub const DEFAULT_MAX_TOKENS_CAP: usize = 16384;

/// The shared request fields, borrowed (built by `protocol`'s `shared()`).
#[derive(Debug, Clone, Default)]
pub struct Shared<'a> {
    pub n: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<&'a BTreeMap<String, f64>>,
    pub seed: Option<i64>,
    pub stop: &'a [String],
    pub max_tokens: Option<i64>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    pub min_tokens: Option<i64>,
    pub stop_token_ids: &'a [u32],
    pub skip_special_tokens: bool,
    pub include_stop_str_in_output: bool,
}

/// Validated generation settings for every choice of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub n: usize,
    pub sampling: SamplingParams,
    /// As the client gave it; `None` = the rest of the context (capped).
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub include_stop_str: bool,
    /// `Some(k)`: return logprobs with k alternatives.
    pub logprobs: Option<usize>,
    /// `Some(k)`: also the prompt's logprobs (completions with `echo`).
    pub prompt_logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// The LoRA adapter every choice runs with (set after model resolution).
    pub adapter: Option<std::sync::Arc<crate::lora::LoraAdapter>>,
    /// The API key the tokens are charged to (its tokens-per-minute limit).
    pub meter: Option<crate::auth::Caller>,
    /// The request's token count for its access log line.
    pub tally: Option<super::access_log::Tally>,
}

fn range(param: &str, v: Option<f64>, ok: impl Fn(f64) -> bool, rule: &str) -> Result<(), ApiError> {
    match v {
        Some(x) if !x.is_finite() || !ok(x) => {
            Err(ApiError::invalid_param(param, format!("{param} must be {rule}, got {x}")))
        }
        _ => Ok(()),
    }
}

/// Checks `s` against the engine's limits. `max_tokens` is the endpoint's
/// effective value (chat prefers `max_completion_tokens`), `logprobs` its
/// already-validated request for log probabilities.
pub fn validate(
    s: &Shared<'_>,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
    info: &EngineInfo,
) -> Result<GenParams, ApiError> {
    let n = s.n.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(ApiError::invalid_param("n", format!("n must be between 1 and {MAX_N}, got {n}")));
    }
    range("temperature", s.temperature, |x| x >= 0.0, "at least 0")?;
    range("top_p", s.top_p, |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
    range("min_p", s.min_p, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
    range("presence_penalty", s.presence_penalty, |x| (-2.0..=2.0).contains(&x), "in [-2, 2]")?;
    range("frequency_penalty", s.frequency_penalty, |x| (-2.0..=2.0).contains(&x), "in [-2, 2]")?;
    range("repetition_penalty", s.repetition_penalty, |x| x > 0.0, "greater than 0")?;
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param("top_k", format!("top_k must be -1 (off) or at least 1, got {k}")))
        }
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        Some(m) => {
            return Err(ApiError::invalid_param("max_tokens", format!("max_tokens must be at least 1, got {m}")))
        }
    };
    let min_tokens = match s.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::invalid_param("min_tokens", format!("min_tokens must be at least 0, got {m}")))
        }
        Some(m) => m as usize,
    };
    if let Some(max) = max_tokens {
        if min_tokens > max {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max})"),
            ));
        }
    }
    let mut logit_bias = Vec::new();
    for (k, &v) in s.logit_bias.into_iter().flatten() {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::invalid_param("logit_bias", format!("logit_bias keys must be token ids, got '{k}'"))
        })?;
        if id as usize >= info.vocab_size {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("logit_bias token id {id} is outside the vocabulary (size {})", info.vocab_size),
            ));
        }
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("logit_bias values must be in [-100, 100], got {v}"),
            ));
        }
        logit_bias.push((id, v as f32));
    }
    if let Some(&t) = s.stop_token_ids.iter().find(|&&t| t as usize >= info.vocab_size) {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!("stop token id {t} is outside the vocabulary (size {})", info.vocab_size),
        ));
    }
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0) as f32,
        top_k,
        top_p: s.top_p.unwrap_or(1.0) as f32,
        min_p: s.min_p.unwrap_or(0.0) as f32,
        // JSON seeds are signed; the bits are what matters.
        seed: s.seed.map(|x| x as u64),
        presence_penalty: s.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0) as f32,
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0) as f32,
        logit_bias,
    };
    Ok(GenParams {
        n: n as usize,
        sampling,
        max_tokens,
        min_tokens,
        // An empty stop string would match everywhere; OpenAI ignores it.
        stop: s.stop.iter().filter(|x| !x.is_empty()).cloned().collect(),
        stop_token_ids: s.stop_token_ids.to_vec(),
        ignore_eos: s.ignore_eos,
        skip_special_tokens: s.skip_special_tokens,
        include_stop_str: s.include_stop_str_in_output,
        logprobs,
        prompt_logprobs: None,
        stream: s.stream,
        include_usage: s.include_usage,
        adapter: None,
        meter: None,
        tally: None,
    })
}

/// `logprobs` of /v1/completions (an integer, 0..=20).
pub fn completion_logprobs(v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if (0..=MAX_LOGPROBS as i64).contains(&k) => Ok(Some(k as usize)),
        Some(k) => {
            Err(ApiError::invalid_param("logprobs", format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {k}")))
        }
    }
}

/// `logprobs` + `top_logprobs` of /v1/chat/completions.
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let top = match top {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {MAX_LOGPROBS}, got {k}"),
            ))
        }
    };
    match (logprobs.unwrap_or(false), top) {
        (true, k) => Ok(Some(k.unwrap_or(0))),
        (false, Some(k)) if k > 0 => {
            Err(ApiError::invalid_param("top_logprobs", "top_logprobs needs logprobs to be true"))
        }
        (false, _) => Ok(None),
    }
}

impl GenParams {
    /// One engine request per choice for `prompt`; choice `i` samples with
    /// `seed + i` so seeded choices differ but stay reproducible.
    pub fn engine_requests(
        &self,
        prompt: &[u32],
        info: &EngineInfo,
        prompt_param: &str,
    ) -> Result<Vec<EngineRequest>, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid_param(prompt_param, format!("{prompt_param} is empty (0 tokens)")));
        }
        let rest = info.max_model_len.saturating_sub(prompt.len());
        let max_tokens = self.max_tokens.unwrap_or(rest.min(DEFAULT_MAX_TOKENS_CAP)).max(1);
        if prompt.len().saturating_add(max_tokens) > info.max_model_len {
            let e = crate::engine::SubmitError::ContextLength {
                prompt: prompt.len(),
                max_tokens,
                limit: info.max_model_len,
            };
            return Err(ApiError::from_submit(e, prompt_param, self.max_tokens.is_some()));
        }
        Ok((0..self.n)
            .map(|i| {
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                EngineRequest {
                    prompt: prompt.to_vec(),
                    sampling,
                    stopping: StoppingParams {
                        max_tokens,
                        min_tokens: self.min_tokens.min(max_tokens),
                        stop_token_ids: self.stop_token_ids.clone(),
                        ignore_eos: self.ignore_eos,
                    },
                    logprobs: self.logprobs,
                    prompt_logprobs: self.prompt_logprobs,
                    adapter: self.adapter.clone(),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn info() -> EngineInfo {
        EngineInfo {
            max_model_len: 100,
            vocab_size: 50,
            eos_token_ids: vec![2],
            block_size: 16,
            num_blocks: 64,
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            max_waiting: 16,
            max_loras: 2,
        }
    }

    fn param_of(s: Shared<'_>) -> Option<String> {
        validate(&s, s.max_tokens, None, &info()).unwrap_err().param
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let d = Shared::default;
        assert_eq!(param_of(Shared { n: Some(0), ..d() }).as_deref(), Some("n"));
        assert_eq!(param_of(Shared { temperature: Some(-0.5), ..d() }).as_deref(), Some("temperature"));
        assert_eq!(param_of(Shared { top_p: Some(0.0), ..d() }).as_deref(), Some("top_p"));
        assert_eq!(param_of(Shared { top_k: Some(-2), ..d() }).as_deref(), Some("top_k"));
        assert_eq!(param_of(Shared { min_p: Some(1.5), ..d() }).as_deref(), Some("min_p"));
        assert_eq!(param_of(Shared { presence_penalty: Some(3.0), ..d() }).as_deref(), Some("presence_penalty"));
        assert_eq!(param_of(Shared { repetition_penalty: Some(0.0), ..d() }).as_deref(), Some("repetition_penalty"));
        assert_eq!(param_of(Shared { max_tokens: Some(0), ..d() }).as_deref(), Some("max_tokens"));
        assert_eq!(param_of(Shared { max_tokens: Some(-5), ..d() }).as_deref(), Some("max_tokens"));
        assert_eq!(param_of(Shared { min_tokens: Some(9), max_tokens: Some(3), ..d() }).as_deref(), Some("min_tokens"));
        assert_eq!(param_of(Shared { stop_token_ids: &[50], ..d() }).as_deref(), Some("stop_token_ids"));
        for (k, v) in [("x", 1.0), ("50", 1.0), ("3", 101.0)] {
            let lb = BTreeMap::from([(k.to_string(), v)]);
            assert_eq!(param_of(Shared { logit_bias: Some(&lb), ..d() }).as_deref(), Some("logit_bias"), "{k} {v}");
        }
    }

    #[test]
    fn defaults_are_vllm_defaults() {
        let p = validate(&Shared { skip_special_tokens: true, ..Default::default() }, None, None, &info()).unwrap();
        assert_eq!(p.n, 1);
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_k, 0);
        assert_eq!(p.sampling.repetition_penalty, 1.0);
        assert!(p.skip_special_tokens);
        let lb = BTreeMap::from([("7".to_string(), -100.0)]);
        let stop = ["".to_string(), "x".to_string()];
        let p = validate(
            &Shared { logit_bias: Some(&lb), top_k: Some(-1), stop: &stop, ..Default::default() },
            None,
            None,
            &info(),
        )
        .unwrap();
        assert_eq!(p.sampling.logit_bias, vec![(7, -100.0)]);
        assert_eq!(p.stop, vec!["x".to_string()], "empty stop strings are dropped");
    }

    #[test]
    fn max_tokens_defaults_to_the_rest_of_the_context() {
        let p = validate(&Shared { n: Some(3), seed: Some(7), ..Default::default() }, None, None, &info()).unwrap();
        let reqs = p.engine_requests(&[1; 30], &info(), "prompt").unwrap();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].stopping.max_tokens, 70);
        let seeds: Vec<_> = reqs.iter().map(|r| r.sampling.seed).collect();
        assert_eq!(seeds, vec![Some(7), Some(8), Some(9)]);
        // A prompt that fills the context: the prompt is what must shrink.
        let e = p.engine_requests(&[1; 100], &info(), "messages").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = p.engine_requests(&[], &info(), "prompt").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        // An explicit max_tokens past the context names max_tokens.
        let p = validate(&Shared::default(), Some(1 << 40), None, &info()).unwrap();
        let e = p.engine_requests(&[1; 30], &info(), "prompt").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("100"), "{}", e.message);
    }

    #[test]
    fn logprob_requests() {
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(Some(true), Some(5)).unwrap(), Some(5));
        assert_eq!(chat_logprobs(Some(false), Some(3)).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert_eq!(chat_logprobs(Some(true), Some(21)).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert_eq!(completion_logprobs(Some(0)).unwrap(), Some(0));
        assert_eq!(completion_logprobs(Some(-1)).unwrap_err().param.as_deref(), Some("logprobs"));
    }
}
