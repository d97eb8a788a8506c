//! One `Config`: the defaults in `config/default.toml`, then an optional TOML
//! file, then environment variables (`TANDEM_<SECTION>_<KEY>` for every key,
//! and a few short aliases: see `keys`); command-line flags override last (in
//! main).

use serde::Deserialize;
use std::path::Path;

pub mod keys;

const DEFAULTS: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub cpu: CpuSection,
    pub cache: CacheSection,
    pub scheduler: SchedulerSection,
    pub server: ServerSection,
    pub lora: LoraSection,
    pub device: DeviceSection,
    pub train: TrainSection,
    pub store: StoreSection,
    /// Aliases split between targets (`[routes.ALIAS]`, see crate::routing);
    /// routes made over the admin API are stored in the data directory.
    #[serde(default)]
    pub routes: std::collections::BTreeMap<String, crate::routing::RouteSpec>,
    /// API keys (`[[auth.keys]]`, plus TANDEM_API_KEYS / TANDEM_ADMIN_KEYS).
    #[serde(default)]
    pub auth: crate::auth::AuthSection,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Files, jobs, checkpoints and adapters (empty: the files and fine-tuning APIs are off).
    pub data_dir: String,
    pub max_upload_mib: usize,
    /// The `<org>` part of `ft:` model names.
    pub organization: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// MiB training may hold besides the model's weights (0: no limit).
    pub memory_budget_mib: usize,
    /// MiB of logits computed at once by the loss.
    pub logits_chunk_mib: usize,
    /// Co-serving: the longest a training turn may hold up serving.
    pub max_turn_ms: u64,
    /// Co-serving: training's share of engine time while serving is busy.
    pub busy_share: f64,
    /// Co-serving: turn length while serving is idle.
    pub idle_turn_ms: u64,
    /// Co-serving: serving steps between two training turns, at least.
    pub min_steps_between_turns: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// "cpu" or "cuda:N" ("cuda" = "cuda:0").
    pub name: String,
    /// CUDA: the fraction of device memory tandem may use; KV blocks fill what
    /// weights, adapter slots and activations leave of it.
    pub gpu_memory_utilization: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Adapter slots: distinct adapters a running batch can hold (0 disables LoRA).
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// How adapter weights are stored for compute.
    pub dtype: crate::lora::LoraDtype,
    /// Host cache for parsed adapter weights, in MiB.
    pub max_cpu_lora_mib: usize,
    /// Directories HTTP requests may load adapters from.
    pub allowed_roots: Vec<String>,
    /// Whether HTTP requests may name Hugging Face hub adapters.
    pub allow_hub: bool,
    /// Adapters loaded at start: name -> directory (or hub id).
    pub adapters: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub path: String,
    /// Quantise an unquantised model's projections while loading (`--quantize`).
    #[serde(default)]
    pub quantize: crate::quant::on_load::QuantizeTarget,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CpuSection {
    pub threads: usize,
    /// Activations of quantised matmuls: f32 (exact) or int8 (integer dot products).
    pub activations: crate::backend::cpu::Activations,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub block_size: usize,
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
    pub kv_cache_dtype: crate::backend::KvDtype,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_waiting: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub host: String,
    pub port: u16,
    /// Name the base model is served under (empty = the model file's stem).
    pub served_model_name: String,
    pub max_body_bytes: usize,
    /// Whole-request limit; a request past it ends (streams with an error event).
    pub request_timeout_s: u64,
    /// "human" or "json" log lines (src/logging.rs).
    pub log_format: crate::logging::LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
}

impl Config {
    /// The built-in defaults.
    pub fn defaults() -> Self {
        toml::from_str(DEFAULTS).expect("config/default.toml is valid")
    }

    /// Defaults, overlaid with `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigFileError> {
        Self::load_with_env(file, &|name| std::env::var(name).ok())
    }

    /// [`Config::load`] reading variables through `env`.
    pub fn load_with_env(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigFileError> {
        Self::from_merged(Self::merged(file, env)?, file)
    }

    /// The `Config` of a [`Config::merged`] value (`file` names it in errors).
    pub fn from_merged(merged: toml::Value, file: Option<&Path>) -> Result<Self, ConfigFileError> {
        merged.try_into().map_err(|e: toml::de::Error| ConfigFileError::Parse {
            path: file.map(|p| p.display().to_string()).unwrap_or_default(),
            reason: e.to_string(),
        })
    }

    /// The defaults with `file` and the environment over them, as TOML (what
    /// `tandem config` prints).
    pub fn merged(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<toml::Value, ConfigFileError> {
        let mut merged: toml::Value = toml::from_str(DEFAULTS).expect("config/default.toml is valid");
        if let Some(path) = file {
            let p = path.display().to_string();
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigFileError::Read { path: p.clone(), reason: e.to_string() })?;
            let over: toml::Value =
                toml::from_str(&text).map_err(|e| ConfigFileError::Parse { path: p.clone(), reason: e.to_string() })?;
            overlay(&mut merged, over);
        }
        keys::overlay_env(&mut merged, &Self::keys(), env)?;
        Ok(merged)
    }

    /// Every settable key of the defaults (see [`keys`]).
    pub fn keys() -> Vec<keys::Key> {
        keys::keys(DEFAULTS)
    }
}

fn overlay(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[cpu]\nthreads = 3\n").unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.cpu.threads, 3);
        assert_eq!(c.cache.block_size, Config::defaults().cache.block_size);
        std::fs::write(&p, "[cpu]\nthreadz = 3\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("threadz"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_aliases_the_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[scheduler]\nmax_num_seqs = 3\n[server]\nport = 1\n").unwrap();
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let env = vars(&[
            ("TANDEM_SCHEDULER_MAX_NUM_SEQS", "9"),
            ("TANDEM_LORA_ALLOWED_ROOTS", "/a,/b"),
            ("TANDEM_TRAIN_BUSY_SHARE", "1"),
            ("TANDEM_CPU_THREADS", "5"),
            ("TANDEM_THREADS", "6"),
        ]);
        let c = Config::load_with_env(Some(&p), &env).unwrap();
        assert_eq!(c.scheduler.max_num_seqs, 9);
        assert_eq!(c.server.port, 1, "the file where no variable is set");
        assert_eq!(c.lora.allowed_roots, ["/a", "/b"]);
        assert_eq!(c.train.busy_share, 1.0);
        assert_eq!(c.cpu.threads, 6, "the short alias wins");
        let e = Config::load_with_env(None, &vars(&[("TANDEM_SERVER_PORT", "http")])).unwrap_err().to_string();
        assert!(e.contains("TANDEM_SERVER_PORT") && e.contains("not a valid integer"), "{e}");
        let e = Config::load_with_env(None, &vars(&[("TANDEM_CPU_ACTIVATIONS", "int3")])).unwrap_err().to_string();
        assert!(e.contains("int3"), "a bad value of the right type is refused by the section: {e}");
    }
}
