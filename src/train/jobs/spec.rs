//! A fine-tuning job request (OpenAI's `POST /v1/fine_tuning/jobs` body, with
//! tandem's own settings under `tandem`) checked and resolved into a
//! [`TrainConfig`] once the training file's size is known.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::lora::LoraTarget;
use crate::train::batch::Batching;
use crate::train::lora::LoraSpec;
use crate::train::optim::{OptimConfig, Schedule};
use crate::train::trainer::TrainConfig;

use super::JobsError;

/// `"auto"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AutoOr<T> {
    #[schema(value_type = String)]
    Auto(Auto),
    Value(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    Auto,
}

impl<T: Copy> AutoOr<T> {
    fn get(v: Option<Self>) -> Option<T> {
        match v {
            Some(AutoOr::Value(x)) => Some(x),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    /// Examples per optimiser step.
    #[schema(value_type = Option<Object>)]
    pub batch_size: Option<AutoOr<u64>>,
    /// Scales tandem's base learning rate (2e-4).
    #[schema(value_type = Option<Object>)]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
    #[schema(value_type = Option<Object>)]
    pub n_epochs: Option<AutoOr<u64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Supervised {
    pub hyperparameters: Option<Hyperparameters>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Method {
    /// Only `supervised` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    pub supervised: Option<Supervised>,
    #[schema(value_type = Option<Object>)]
    pub dpo: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub reinforcement: Option<Value>,
}

/// tandem's settings beyond OpenAI's (`"tandem": {...}` in the request body;
/// `extra_body={"tandem": {...}}` with the openai client).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Extras {
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub use_rslora: Option<bool>,
    pub dropout: Option<f32>,
    /// Projections to adapt (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub targets: Option<Vec<String>>,
    /// Longest example in tokens (longer ones are truncated).
    pub max_seq_len: Option<usize>,
    /// An absolute learning rate (instead of the multiplier).
    pub learning_rate: Option<f64>,
    pub warmup_steps: Option<usize>,
    /// `linear` (default), `cosine` or `constant`.
    pub schedule: Option<String>,
    pub weight_decay: Option<f64>,
    /// Evaluate on the validation file every N steps (default: each epoch).
    pub eval_every: Option<usize>,
    /// Publish a servable checkpoint every N steps (default: each epoch).
    pub save_every: Option<usize>,
    pub early_stopping_patience: Option<usize>,
    /// Stop after this many optimiser steps.
    pub max_steps: Option<usize>,
}

/// The request body of `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// Up to 64 characters: letters, digits, `-` and `_`.
    pub suffix: Option<String>,
    pub seed: Option<i64>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub method: Option<Method>,
    /// The legacy place for the supervised hyperparameters.
    pub hyperparameters: Option<Hyperparameters>,
    /// Not supported (must be empty).
    #[schema(value_type = Option<Vec<Object>>)]
    pub integrations: Option<Vec<Value>>,
    pub tandem: Option<Extras>,
}

/// Base learning rate the multiplier scales (peft's usual LoRA rate).
pub const BASE_LR: f64 = 2e-4;

/// The checked settings of a job, saved with it (resolved further once the
/// data's size is known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    pub batch_size: Option<u64>,
    pub lr_multiplier: Option<f64>,
    pub n_epochs: Option<u64>,
    pub seed: u64,
    pub extras: Extras,
    pub max_seq_len: usize,
}

fn invalid(param: &str, message: impl Into<String>) -> JobsError {
    JobsError::Invalid { param: param.into(), message: message.into() }
}

impl JobRequest {
    /// Checks everything that does not need the files' contents.
    /// `max_rank` and `max_model_len` are the server's limits.
    pub fn check(&self, max_rank: usize, max_model_len: usize) -> Result<JobSettings, JobsError> {
        if let Some(s) = &self.suffix {
            if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(invalid("suffix", "suffix must be 1 to 64 characters: letters, digits, '-' and '_'"));
            }
        }
        if let Some(m) = &self.metadata {
            if m.len() > 16 {
                return Err(invalid("metadata", "metadata may hold at most 16 keys"));
            }
            if m.iter().any(|(k, v)| k.len() > 64 || v.len() > 512) {
                return Err(invalid("metadata", "metadata keys are at most 64 characters and values at most 512"));
            }
        }
        if self.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(invalid("integrations", "integrations are not supported by this server"));
        }
        let seed = match self.seed {
            None => 42,
            Some(s) if (0..=i32::MAX as i64).contains(&s) => s as u64,
            Some(s) => return Err(invalid("seed", format!("seed must be between 0 and 2147483647, got {s}"))),
        };
        let hp = match &self.method {
            Some(m) => {
                if m.kind != "supervised" {
                    return Err(invalid(
                        "method.type",
                        format!("method type '{}' is not supported; this server trains 'supervised' only", m.kind),
                    ));
                }
                if m.dpo.is_some() || m.reinforcement.is_some() {
                    return Err(invalid("method", "only method.supervised may be given"));
                }
                if self.hyperparameters.is_some() {
                    return Err(invalid(
                        "hyperparameters",
                        "give hyperparameters under method.supervised, not also at the top level",
                    ));
                }
                m.supervised.clone().unwrap_or_default().hyperparameters.unwrap_or_default()
            }
            None => self.hyperparameters.clone().unwrap_or_default(),
        };
        let batch_size = AutoOr::get(hp.batch_size);
        if batch_size.is_some_and(|b| !(1..=256).contains(&b)) {
            return Err(invalid("batch_size", "batch_size must be between 1 and 256"));
        }
        let n_epochs = AutoOr::get(hp.n_epochs);
        if n_epochs.is_some_and(|n| !(1..=50).contains(&n)) {
            return Err(invalid("n_epochs", "n_epochs must be between 1 and 50"));
        }
        let lr_multiplier = AutoOr::get(hp.learning_rate_multiplier);
        if lr_multiplier.is_some_and(|m| !(m > 0.0 && m <= 100.0)) {
            return Err(invalid("learning_rate_multiplier", "learning_rate_multiplier must be in (0, 100]"));
        }
        let x = self.tandem.clone().unwrap_or_default();
        if x.rank.is_some_and(|r| r == 0 || r > max_rank) {
            return Err(invalid("tandem.rank", format!("rank must be between 1 and {max_rank} (lora.max_lora_rank)")));
        }
        if x.alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
            return Err(invalid("tandem.alpha", "alpha must be a positive number"));
        }
        if x.dropout.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return Err(invalid("tandem.dropout", "dropout must be in [0, 1)"));
        }
        if let Some(ts) = &x.targets {
            if ts.is_empty() {
                return Err(invalid("tandem.targets", "targets must name at least one projection"));
            }
            if let Some(bad) = ts.iter().find(|t| LoraTarget::from_module(t).is_none()) {
                return Err(invalid(
                    "tandem.targets",
                    format!(
                        "unknown target '{bad}'; use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    ),
                ));
            }
        }
        let max_seq_len = x.max_seq_len.unwrap_or(max_model_len.min(2048));
        if max_seq_len < 2 || max_seq_len > max_model_len {
            return Err(invalid("tandem.max_seq_len", format!("max_seq_len must be between 2 and {max_model_len}")));
        }
        if x.learning_rate.is_some_and(|l| !(l > 0.0 && l <= 1.0)) {
            return Err(invalid("tandem.learning_rate", "learning_rate must be in (0, 1]"));
        }
        if x.learning_rate.is_some() && lr_multiplier.is_some() {
            return Err(invalid(
                "tandem.learning_rate",
                "give learning_rate_multiplier or tandem.learning_rate, not both",
            ));
        }
        if x.weight_decay.is_some_and(|w| !(0.0..=1.0).contains(&w)) {
            return Err(invalid("tandem.weight_decay", "weight_decay must be in [0, 1]"));
        }
        if let Some(s) = &x.schedule {
            schedule(s)?;
        }
        for (name, v) in [("eval_every", x.eval_every), ("save_every", x.save_every), ("max_steps", x.max_steps)] {
            if v == Some(0) {
                return Err(invalid(&format!("tandem.{name}"), format!("{name} must be at least 1")));
            }
        }
        if x.early_stopping_patience == Some(0) {
            return Err(invalid("tandem.early_stopping_patience", "early_stopping_patience must be at least 1"));
        }
        if x.early_stopping_patience.is_some() && self.validation_file.is_none() {
            return Err(invalid("tandem.early_stopping_patience", "early stopping needs a validation_file"));
        }
        Ok(JobSettings { batch_size, lr_multiplier, n_epochs, seed, extras: x, max_seq_len })
    }

    /// The method as the job echoes it.
    pub fn method_json(&self, s: &JobSettings) -> Value {
        json!({"type": "supervised", "supervised": {"hyperparameters": s.hyperparameters_json()}})
    }
}

fn schedule(s: &str) -> Result<Schedule, JobsError> {
    match s {
        "linear" => Ok(Schedule::Linear),
        "cosine" => Ok(Schedule::Cosine),
        "constant" => Ok(Schedule::Constant),
        other => Err(invalid("tandem.schedule", format!("unknown schedule '{other}'; use linear, cosine or constant"))),
    }
}

impl JobSettings {
    /// OpenAI's `hyperparameters` object: numbers once resolved, `"auto"` before.
    pub fn hyperparameters_json(&self) -> Value {
        let auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
        json!({
            "batch_size": auto(self.batch_size.map(Value::from)),
            "learning_rate_multiplier": auto(self.lr_multiplier.map(Value::from)),
            "n_epochs": auto(self.n_epochs.map(Value::from)),
        })
    }

    /// Fills in "auto" for a training set of `examples` examples: 3 epochs
    /// (at least enough for ~100 examples' worth of steps, at most 10),
    /// batches of about 1% of the data (1 to 8), multiplier 1.
    pub fn resolve(&mut self, examples: usize) {
        let n = examples.max(1) as u64;
        self.batch_size.get_or_insert((n / 100).clamp(1, 8));
        self.n_epochs.get_or_insert((100 / n).clamp(3, 10));
        if self.extras.learning_rate.is_none() {
            self.lr_multiplier.get_or_insert(1.0);
        }
    }

    /// The trainer's configuration (after [`JobSettings::resolve`]). Each
    /// example is its own micro-batch and a step accumulates `batch_size` of
    /// them (the loss is the mean over all their trained tokens, as one batch
    /// would give): small micro-batches keep co-serving turns short.
    pub fn train_config(
        &self,
        examples: usize,
        memory_budget: Option<usize>,
        logits_chunk_bytes: usize,
    ) -> TrainConfig {
        let x = &self.extras;
        let batch = self.batch_size.unwrap_or(1).max(1) as usize;
        let rank = x.rank.unwrap_or(8);
        let steps_per_epoch = examples.div_ceil(batch).max(1);
        TrainConfig {
            lora: LoraSpec {
                rank,
                alpha: x.alpha.unwrap_or(2.0 * rank as f64),
                use_rslora: x.use_rslora.unwrap_or(false),
                targets: match &x.targets {
                    Some(ts) => ts.iter().filter_map(|t| LoraTarget::from_module(t)).collect(),
                    None => LoraTarget::ALL.to_vec(),
                },
                dropout: x.dropout.unwrap_or(0.05),
            },
            optim: OptimConfig {
                lr: x.learning_rate.unwrap_or(BASE_LR * self.lr_multiplier.unwrap_or(1.0)),
                weight_decay: x.weight_decay.unwrap_or(0.0),
                schedule: x.schedule.as_deref().map(schedule).and_then(Result::ok).unwrap_or_default(),
                warmup_steps: x.warmup_steps.unwrap_or(0),
                ..OptimConfig::default()
            },
            epochs: self.n_epochs.unwrap_or(3).max(1) as usize,
            batching: Batching::Sequential { batch_size: 1 },
            grad_accum: batch,
            max_steps: x.max_steps,
            seed: self.seed,
            eval_every: x.eval_every,
            save_every: Some(x.save_every.unwrap_or(steps_per_epoch)),
            early_stopping_patience: x.early_stopping_patience,
            memory_budget,
            logits_chunk_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Result<JobSettings, JobsError> {
        let r: JobRequest = serde_json::from_value(v).map_err(|e| invalid("body", e.to_string()))?;
        r.check(64, 4096)
    }

    #[test]
    fn auto_and_numbers_both_parse_and_ranges_are_checked() {
        let s = req(json!({"model": "m", "training_file": "f",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}}}))
        .unwrap();
        assert_eq!((s.n_epochs, s.batch_size), (Some(2), None));
        let mut s2 = s.clone();
        s2.resolve(1000);
        assert_eq!(s2.batch_size, Some(8));
        assert_eq!(s2.hyperparameters_json()["n_epochs"], 2);
        assert_eq!(s.hyperparameters_json()["batch_size"], "auto");
        let bad = [
            json!({"model": "m", "training_file": "f", "hyperparameters": {"n_epochs": 0}}),
            json!({"model": "m", "training_file": "f", "hyperparameters": {"batch_size": 1000}}),
            json!({"model": "m", "training_file": "f", "hyperparameters": {"learning_rate_multiplier": -1}}),
            json!({"model": "m", "training_file": "f", "method": {"type": "dpo"}}),
            json!({"model": "m", "training_file": "f", "suffix": "has space"}),
            json!({"model": "m", "training_file": "f", "seed": -3}),
            json!({"model": "m", "training_file": "f", "tandem": {"rank": 65}}),
            json!({"model": "m", "training_file": "f", "tandem": {"targets": ["mlp"]}}),
            json!({"model": "m", "training_file": "f", "tandem": {"early_stopping_patience": 2}}),
            json!({"model": "m", "training_file": "f", "tandem": {"max_seq_len": 5000}}),
            json!({"model": "m", "training_file": "f", "unknown": 1}),
        ];
        for b in bad {
            assert!(req(b.clone()).is_err(), "{b}");
        }
    }

    #[test]
    fn the_trainer_config_accumulates_single_example_micro_batches() {
        let mut s =
            req(json!({"model": "m", "training_file": "f", "tandem": {"rank": 4, "learning_rate": 0.01}})).unwrap();
        s.resolve(10);
        let c = s.train_config(10, None, 1 << 20);
        assert_eq!(c.grad_accum, 1);
        assert_eq!(c.epochs, 10);
        assert_eq!(c.save_every, Some(10));
        assert_eq!((c.lora.rank, c.lora.alpha, c.optim.lr), (4, 8.0, 0.01));
        c.validate().unwrap();
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(json!("auto")),
            Just(json!("supervised")),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[a-z_ ]{0,8}".prop_map(Value::from),
            Just(json!(["q_proj", "nope"])),
            Just(json!({"n_epochs": 2})),
        ]
    }

    proptest! {
        /// Any mix of fields and values: parsed and checked without a panic,
        /// and whatever passes the check gives a configuration the trainer accepts.
        #[test]
        fn any_request_is_checked_without_panicking(
            fields in proptest::collection::btree_map(
                prop_oneof![
                    Just("model"), Just("training_file"), Just("suffix"), Just("seed"), Just("metadata"),
                    Just("method"), Just("hyperparameters"), Just("tandem"), Just("validation_file"),
                ].prop_map(str::to_string),
                value(),
                0..6,
            ),
            inner in proptest::collection::btree_map(
                prop_oneof![
                    Just("rank"), Just("alpha"), Just("dropout"), Just("targets"), Just("max_seq_len"),
                    Just("learning_rate"), Just("warmup_steps"), Just("schedule"), Just("save_every"), Just("max_steps"),
                ].prop_map(str::to_string),
                value(),
                0..5,
            ),
            examples in 1usize..5000,
        ) {
            let mut body = json!({"model": "m", "training_file": "f"});
            for (k, v) in fields {
                body[k] = v;
            }
            if body["tandem"].is_object() || body["tandem"].is_null() {
                body["tandem"] = Value::Object(inner.into_iter().collect());
            }
            if let Ok(r) = serde_json::from_value::<JobRequest>(body) {
                if let Ok(mut s) = r.check(64, 4096) {
                    s.resolve(examples);
                    let c = s.train_config(examples, None, 1 << 20);
                    prop_assert!(c.validate().is_ok(), "{c:?}");
                }
            }
        }
    }
}
