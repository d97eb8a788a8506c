//! One choice = one engine request. `Choice` turns its engine events into text
//! deltas (detokenized, stop strings applied) and one final `Outcome`; both
//! endpoints and both response modes (collected, streamed) build on it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{SelectAll, Stream};
use serde_json::Value;

use super::error::ApiError;
use super::responses::Outcome;
use super::text::{TextDecoder, TextStep};
use crate::engine::handle::FinishReason;
use crate::engine::{EngineEvent, RequestStream, TokenLogprob, TokenOut};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceEvent {
    /// The prompt's logprobs (entry i is prompt token i + 1's), when asked for;
    /// before any `Delta`.
    Prompt {
        index: usize,
        prompt: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// Text released since the last event and the tokens generated since then
    /// (text may lag tokens: a possible stop string is held back).
    Delta {
        index: usize,
        text: String,
        tokens: Vec<TokenOut>,
    },
    Done {
        index: usize,
        outcome: Outcome,
    },
}

/// What a choice needs besides its engine stream.
pub struct ChoiceSpec {
    pub index: usize,
    pub prompt: Vec<u32>,
    pub stops: Vec<String>,
    pub include_stop: bool,
    pub skip_special_tokens: bool,
    /// Stop token ids the client asked for (reported in `stop_reason`; EOS is not).
    pub stop_token_ids: Vec<u32>,
    /// Charged the prompt and generated tokens when the choice ends (or is dropped).
    pub meter: Option<crate::auth::Caller>,
    /// The request's access-log tally, added to likewise.
    pub tally: Option<super::access_log::Tally>,
}

pub struct Choice {
    index: usize,
    /// `None` once finished; dropping it early aborts the engine request.
    stream: Option<RequestStream>,
    decoder: TextDecoder,
    prompt: Vec<u32>,
    /// Known once the engine has computed the prompt.
    cached_tokens: usize,
    generated: usize,
    stop_token_ids: Vec<u32>,
    queue: VecDeque<Result<ChoiceEvent, ApiError>>,
    meter: Option<crate::auth::Caller>,
    tally: Option<super::access_log::Tally>,
    /// Set by [`Choice::tap_first_tokens`].
    first_tokens: Option<FirstTokens>,
}

/// The first `n` token ids of a choice, sent once there are `n` or the
/// choice finishes; an aborted choice drops the sender unsent.
struct FirstTokens {
    n: usize,
    ids: Vec<u32>,
    tx: tokio::sync::oneshot::Sender<Vec<u32>>,
}

impl Drop for Choice {
    /// A key's tokens per minute and the access log count what the engine
    /// did, finished or not.
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.0.charge((self.prompt.len() + self.generated) as u64);
        }
        if let Some(t) = &self.tally {
            t.add(self.prompt.len(), self.generated);
        }
    }
}

impl Choice {
    pub fn new(spec: ChoiceSpec, stream: RequestStream, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            index: spec.index,
            stream: Some(stream),
            decoder: TextDecoder::new(tokenizer, &spec.prompt, spec.stops, spec.include_stop, spec.skip_special_tokens),
            prompt: spec.prompt,
            cached_tokens: 0,
            generated: 0,
            stop_token_ids: spec.stop_token_ids,
            queue: VecDeque::new(),
            meter: spec.meter,
            tally: spec.tally,
            first_tokens: None,
        }
    }

    /// The first `n` token ids this choice generates (all of them if it
    /// finishes with fewer); the receiver fails if the choice is aborted first.
    pub fn tap_first_tokens(&mut self, n: usize) -> tokio::sync::oneshot::Receiver<Vec<u32>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.first_tokens = Some(FirstTokens { n, ids: Vec::with_capacity(n), tx });
        rx
    }

    fn send_first_tokens_if(&mut self, finished: bool) {
        if self.first_tokens.as_ref().is_some_and(|f| finished || f.ids.len() >= f.n) {
            let f = self.first_tokens.take().expect("checked above");
            // The receiver may be gone (the shadow failed): nothing to compare then.
            let _ = f.tx.send(f.ids);
        }
    }

    /// The next event; `None` after `Done` or an error.
    pub async fn next(&mut self) -> Option<Result<ChoiceEvent, ApiError>> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(e);
            }
            let stream = self.stream.as_mut()?;
            match stream.next().await {
                Some(EngineEvent::Started(info)) => {
                    self.cached_tokens = info.cached_prompt_tokens;
                    if let Some(logprobs) = info.prompt_logprobs {
                        let prompt = self.prompt.clone();
                        self.queue.push_back(Ok(ChoiceEvent::Prompt { index: self.index, prompt, logprobs }));
                    }
                }
                Some(EngineEvent::Token(t)) => {
                    self.generated += 1;
                    if let Some(f) = &mut self.first_tokens {
                        f.ids.push(t.id);
                    }
                    self.send_first_tokens_if(false);
                    match self.decoder.push_token(t.id) {
                        Ok(step) => self.on_text(step, vec![t], None),
                        Err(e) => self.fail(ApiError::internal(format!("detokenizing: {e}"))),
                    }
                }
                Some(EngineEvent::Finished(info)) => match self.decoder.finish() {
                    Ok(step) => {
                        let (reason, stop_reason) = match (info.reason, info.stop_token) {
                            (FinishReason::Length, _) => ("length", Value::Null),
                            (FinishReason::Stop, Some(t)) if self.stop_token_ids.contains(&t) => ("stop", t.into()),
                            (FinishReason::Stop, _) => ("stop", Value::Null),
                        };
                        let outcome = Outcome {
                            finish_reason: reason,
                            stop_reason,
                            prompt_tokens: info.prompt_tokens,
                            cached_tokens: info.cached_prompt_tokens,
                            completion_tokens: info.output_tokens,
                        };
                        self.on_text(step, vec![], Some(outcome));
                    }
                    Err(e) => self.fail(ApiError::internal(format!("detokenizing: {e}"))),
                },
                Some(EngineEvent::Failed(m)) => self.fail(ApiError::internal(m)),
                None => self.stream = None,
            }
        }
    }

    /// Queues released text; a matched stop string (or `finished`) ends the choice.
    fn on_text(&mut self, step: TextStep, tokens: Vec<TokenOut>, finished: Option<Outcome>) {
        if !step.text.is_empty() || !tokens.is_empty() {
            self.queue.push_back(Ok(ChoiceEvent::Delta { index: self.index, text: step.text, tokens }));
        }
        let outcome = match (step.stopped, finished) {
            (Some(stop), finished) => Outcome {
                finish_reason: "stop",
                stop_reason: Value::String(stop),
                prompt_tokens: self.prompt.len(),
                cached_tokens: self.cached_tokens,
                completion_tokens: finished.as_ref().map_or(self.generated, |f| f.completion_tokens),
            },
            (None, Some(o)) => o,
            (None, None) => return,
        };
        // Dropping the stream aborts the engine request (a no-op once it finished).
        self.stream = None;
        self.send_first_tokens_if(true);
        self.queue.push_back(Ok(ChoiceEvent::Done { index: self.index, outcome }));
    }

    fn fail(&mut self, e: ApiError) {
        self.stream = None;
        self.queue.push_back(Err(e));
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<ChoiceEvent, ApiError>> + Send {
        futures::stream::unfold(self, |mut c| async move { c.next().await.map(|e| (e, c)) })
    }
}

pub type ChoiceStream = Pin<Box<dyn Stream<Item = Result<ChoiceEvent, ApiError>> + Send>>;

/// All choices' events, interleaved as they come.
pub fn merge(choices: Vec<Choice>) -> SelectAll<ChoiceStream> {
    futures::stream::select_all(choices.into_iter().map(|c| Box::pin(c.into_stream()) as ChoiceStream))
}

/// A finished choice, for non-streaming responses.
#[derive(Debug, Clone)]
pub struct Collected {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub outcome: Outcome,
}

/// Runs every choice to the end; the first error ends them all (dropping the
/// others aborts their engine requests).
pub async fn collect(choices: Vec<Choice>) -> Result<Vec<Collected>, ApiError> {
    let runs = choices.into_iter().map(|mut c| async move {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut prompt_logprobs = None;
        while let Some(ev) = c.next().await {
            match ev? {
                ChoiceEvent::Prompt { logprobs, .. } => prompt_logprobs = Some(logprobs),
                ChoiceEvent::Delta { text: t, tokens: ts, .. } => {
                    text.push_str(&t);
                    tokens.extend(ts);
                }
                ChoiceEvent::Done { index, outcome } => {
                    return Ok(Collected { index, text, tokens, prompt_logprobs, outcome })
                }
            }
        }
        Err(ApiError::internal("the engine ended the request without finishing it"))
    });
    let mut out = futures::future::try_join_all(runs).await?;
    out.sort_by_key(|c| c.index);
    Ok(out)
}

/// Submits `params.n` engine requests per prompt; choice `p * n + i` is prompt
/// `p`'s i-th. An error part-way drops (aborts) what was already submitted.
pub fn start_choices(
    ready: &super::Ready,
    params: &super::params::GenParams,
    prompts: &[Vec<u32>],
    prompt_param: &str,
) -> Result<Vec<Choice>, ApiError> {
    let info = ready.engine.info();
    let mut choices = Vec::with_capacity(prompts.len() * params.n);
    for (p, prompt) in prompts.iter().enumerate() {
        for (i, req) in params.engine_requests(prompt, info, prompt_param)?.into_iter().enumerate() {
            let stream = ready
                .engine
                .submit(req)
                .map_err(|e| ApiError::from_submit(e, prompt_param, params.max_tokens.is_some()))?;
            let spec = ChoiceSpec {
                index: p * params.n + i,
                prompt: prompt.clone(),
                stops: params.stop.clone(),
                include_stop: params.include_stop_str,
                skip_special_tokens: params.skip_special_tokens,
                stop_token_ids: params.stop_token_ids.clone(),
                meter: params.meter.clone(),
                tally: params.tally.clone(),
            };
            choices.push(Choice::new(spec, stream, ready.tokenizer.clone()));
        }
    }
    Ok(choices)
}

/// Runs the choices to the end within the server's request timeout.
pub async fn collect_within(
    choices: Vec<Choice>,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<Collected>, ApiError> {
    match timeout {
        None => collect(choices).await,
        Some(t) => tokio::time::timeout(t, collect(choices)).await.map_err(|_| ApiError::timeout(t.as_secs()))?,
    }
}
