//! The named adapters this server answers to, and the host cache that holds
//! their parsed weights. Owned by the HTTP side; the engine never sees names,
//! only the `Arc<LoraAdapter>` a request carries.
//!
//! Every call that reads files blocks (run it off the async threads). File
//! reads and parsing happen outside the lock, so one slow load never holds up
//! requests for adapters already loaded.
//!
//! The host cache is bounded in bytes: when a load pushes it over, the least
//! recently used adapters drop their weights but stay registered, and are read
//! again from their directory when next asked for. Requests in flight keep the
//! weights they started with alive through their `Arc`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::model::ModelConfig;

use super::peft::{load_peft_dir, LoraError, LoraOptions};
use super::LoraAdapter;

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Device slots (0 = LoRA disabled: every load is refused).
    pub max_loras: usize,
    pub limits: LoraOptions,
    /// Host cache budget for parsed weights.
    pub max_host_bytes: usize,
    /// Directories that HTTP-supplied paths must lie under (empty: none may).
    pub allowed_roots: Vec<PathBuf>,
    /// Whether HTTP requests may name hub repos.
    pub allow_hub: bool,
}

/// Why a registry call failed, with the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// 400: `load_inplace` was false.
    #[error("The lora adapter '{0}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.")]
    NameTaken(String),
    /// 400: an adapter may not take the base model's name.
    #[error("'{0}' is the base model's name; choose another lora_name")]
    ReservedName(String),
    /// 404.
    #[error("The lora adapter '{0}' cannot be found.")]
    Unknown(String),
    /// 400.
    #[error("LoRA adapters are disabled on this server (lora.max_loras = 0)")]
    Disabled,
}

struct Entry {
    /// Directory the weights are (re)read from.
    dir: PathBuf,
    /// `None` after the host cache dropped the weights.
    adapter: Option<Arc<LoraAdapter>>,
    last_used: u64,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Entry>,
    clock: u64,
}

impl State {
    /// Bytes of the weights held in memory.
    fn resident_bytes(&self) -> usize {
        self.entries.values().filter_map(|e| e.adapter.as_ref()).map(|a| a.bytes()).sum()
    }
}

/// Counters the registry keeps for `/metrics`.
#[derive(Default)]
pub struct RegistryCounters {
    /// Adapters read from disk (first loads, reloads, re-reads after eviction).
    pub disk_loads: AtomicU64,
    /// Adapters whose weights the host cache dropped.
    pub host_evictions: AtomicU64,
}

pub struct LoraRegistry {
    cfg: RegistryConfig,
    base: ModelConfig,
    reserved: Vec<String>,
    state: Mutex<State>,
    pub counters: RegistryCounters,
}

impl LoraRegistry {
    /// `reserved`: names that stay the base model's (served name, aliases).
    pub fn new(cfg: RegistryConfig, base: ModelConfig, reserved: Vec<String>) -> Self {
        Self { cfg, base, reserved, state: Mutex::new(State::default()), counters: RegistryCounters::default() }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `name` is registered (its weights may need a re-read).
    pub fn contains(&self, name: &str) -> bool {
        self.lock().entries.contains_key(name)
    }

    /// (name, directory) of every registered adapter, by name.
    pub fn list(&self) -> Vec<(String, String)> {
        self.lock().entries.iter().map(|(n, e)| (n.clone(), e.dir.display().to_string())).collect()
    }

    /// Bytes of weights the host cache holds.
    pub fn host_bytes(&self) -> usize {
        self.lock().resident_bytes()
    }

    /// The adapter registered as `name`, re-read from disk if the host cache
    /// dropped it. `Ok(None)`: no such name. Blocks on a re-read.
    pub fn get(&self, name: &str) -> Result<Option<Arc<LoraAdapter>>, RegistryError> {
        let dir = {
            let mut st = self.lock();
            st.clock += 1;
            let now = st.clock;
            let Some(e) = st.entries.get_mut(name) else { return Ok(None) };
            e.last_used = now;
            match &e.adapter {
                Some(a) => return Ok(Some(a.clone())),
                None => e.dir.clone(),
            }
        };
        let fresh = Arc::new(self.read(name, &dir)?);
        let mut st = self.lock();
        // Unloaded or replaced while we read: answer with what is there now.
        match st.entries.get_mut(name) {
            Some(e) if e.dir == dir && e.adapter.is_none() => e.adapter = Some(fresh.clone()),
            Some(e) => return Ok(Some(e.adapter.clone().unwrap_or(fresh))),
            None => return Ok(None),
        }
        self.shrink(&mut st, name);
        Ok(Some(fresh))
    }

    /// Loads `dir` as `name` (vLLM's `load_lora_adapter`). With `inplace`, an
    /// existing `name` is replaced atomically: requests already holding the old
    /// version finish on it, later ones get the new one. `trusted` skips the
    /// allowed-roots check (adapters named by the operator at start).
    pub fn load(
        &self,
        name: &str,
        dir: &Path,
        inplace: bool,
        trusted: bool,
    ) -> Result<Arc<LoraAdapter>, RegistryError> {
        if self.cfg.max_loras == 0 {
            return Err(RegistryError::Disabled);
        }
        if self.reserved.iter().any(|r| r == name) {
            return Err(RegistryError::ReservedName(name.to_string()));
        }
        if name.is_empty() {
            return Err(LoraError::NotAllowed("lora_name must not be empty".into()).into());
        }
        if !inplace && self.contains(name) {
            return Err(RegistryError::NameTaken(name.to_string()));
        }
        let dir = if trusted { dir.to_path_buf() } else { self.check_allowed(dir)? };
        let adapter = Arc::new(self.read(name, &dir)?);
        if let Some(w) = self.base_mismatch(&adapter) {
            tracing::warn!("LoRA adapter '{name}': {w}");
        }
        let mut st = self.lock();
        if !inplace && st.entries.contains_key(name) {
            return Err(RegistryError::NameTaken(name.to_string()));
        }
        st.clock += 1;
        let last_used = st.clock;
        st.entries.insert(name.to_string(), Entry { dir, adapter: Some(adapter.clone()), last_used });
        self.shrink(&mut st, name);
        Ok(adapter)
    }

    /// An adapter the operator named at start (`--lora name=spec`, `[lora.adapters]`):
    /// a directory, or a hub repo (cache first, then download when online).
    pub fn load_startup(&self, name: &str, spec: &str) -> Result<Arc<LoraAdapter>, RegistryError> {
        let dir = if Path::new(spec).exists() {
            PathBuf::from(spec)
        } else {
            crate::loader::hub::resolve_adapter(spec)
                .map_err(|reason| LoraError::NotFound { path: spec.to_string(), reason })?
        };
        self.load(name, &dir, false, true)
    }

    /// Removes `name`. Requests already running with it finish normally.
    pub fn unload(&self, name: &str) -> Result<(), RegistryError> {
        match self.lock().entries.remove(name) {
            Some(_) => Ok(()),
            None => Err(RegistryError::Unknown(name.to_string())),
        }
    }

    /// LoRAX's on-demand `adapter_id`: a directory under an allowed root
    /// (`source` "local") or a hub repo (`source` "hub", when allowed),
    /// registered under the id itself on first use.
    pub fn on_demand(&self, adapter_id: &str, source: Option<&str>) -> Result<Arc<LoraAdapter>, RegistryError> {
        if let Some(a) = self.get(adapter_id)? {
            return Ok(a);
        }
        let dir = match source.unwrap_or("") {
            "local" => PathBuf::from(adapter_id),
            "hub" => self.hub_dir(adapter_id)?,
            "" if Path::new(adapter_id).is_absolute() => PathBuf::from(adapter_id),
            "" => self.hub_dir(adapter_id)?,
            other => {
                return Err(LoraError::NotAllowed(format!(
                    "adapter_source {other:?} is not supported (use \"local\" or \"hub\")"
                ))
                .into())
            }
        };
        match self.load(adapter_id, &dir, false, false) {
            // Another request loaded it first.
            Err(RegistryError::NameTaken(_)) => self.get(adapter_id)?.ok_or(RegistryError::Unknown(adapter_id.into())),
            r => r,
        }
    }

    fn hub_dir(&self, repo: &str) -> Result<PathBuf, RegistryError> {
        if !self.cfg.allow_hub {
            return Err(LoraError::NotAllowed(format!(
                "adapter {repo:?}: loading adapters from the Hugging Face hub is disabled (lora.allow_hub = false)"
            ))
            .into());
        }
        crate::loader::hub::resolve_adapter(repo)
            .map_err(|reason| LoraError::NotFound { path: repo.to_string(), reason }.into())
    }

    /// Why `a` may not fit this base model, judged by name only (PEFT records
    /// the base it was trained on as a hub id or path; ours may be a file name).
    pub fn base_mismatch(&self, a: &LoraAdapter) -> Option<String> {
        let trained = a.base_model.as_deref()?.trim_end_matches('/');
        let stem = trained.rsplit('/').next().unwrap_or(trained).to_ascii_lowercase();
        if stem.is_empty() {
            return None;
        }
        let ours: Vec<String> = self.reserved.iter().map(|n| n.to_ascii_lowercase()).collect();
        let same = ours.iter().any(|n| n.contains(&stem) || (!n.is_empty() && stem.contains(n.as_str())));
        (!same).then(|| {
            format!("it was trained on '{trained}', and this server's base is '{}'", self.reserved.join("' / '"))
        })
    }

    fn read(&self, name: &str, dir: &Path) -> Result<LoraAdapter, RegistryError> {
        let a = load_peft_dir(name, dir, &self.base, self.cfg.limits)?;
        self.counters.disk_loads.fetch_add(1, Ordering::Relaxed);
        Ok(a)
    }

    /// The canonical form of an HTTP-supplied path, if it lies under an allowed root.
    fn check_allowed(&self, dir: &Path) -> Result<PathBuf, RegistryError> {
        let shown = dir.display().to_string();
        if self.cfg.allowed_roots.is_empty() {
            return Err(LoraError::NotAllowed(format!(
                "loading adapters from paths over HTTP is disabled: no lora.allowed_roots are configured \
                 (refused '{shown}')"
            ))
            .into());
        }
        let canon = match dir.canonicalize() {
            Ok(p) => p,
            Err(_) => return Err(LoraError::NotFound { path: shown, reason: "no such directory".into() }.into()),
        };
        let inside = self.cfg.allowed_roots.iter().filter_map(|r| r.canonicalize().ok()).any(|r| canon.starts_with(&r));
        if !inside {
            return Err(LoraError::NotAllowed(format!("'{shown}' is outside the allowed adapter roots")).into());
        }
        Ok(canon)
    }

    /// Appends the registry's metrics in the Prometheus text format.
    pub fn collect_metrics(&self, f: &mut crate::metrics::Families) {
        let (registered, resident, bytes) = {
            let st = self.lock();
            (st.entries.len(), st.entries.values().filter(|e| e.adapter.is_some()).count(), st.resident_bytes())
        };
        let rows = [
            ("tandem_lora_adapters_registered", "gauge", "Adapters the server answers to.", registered as f64),
            (
                "tandem_lora_adapters_in_host_cache",
                "gauge",
                "Registered adapters whose weights are in memory.",
                resident as f64,
            ),
            ("tandem_lora_host_cache_bytes", "gauge", "Bytes of adapter weights in the host cache.", bytes as f64),
            (
                "tandem_lora_disk_loads_total",
                "counter",
                "Adapters read from disk (loads, reloads, re-reads after eviction).",
                self.counters.disk_loads.load(Ordering::Relaxed) as f64,
            ),
            (
                "tandem_lora_host_evictions_total",
                "counter",
                "Adapters whose weights the host cache dropped.",
                self.counters.host_evictions.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, v) in rows {
            if kind == "counter" {
                f.counter(name, help, v);
            } else {
                f.gauge(name, help, v);
            }
        }
    }

    /// Drops the least recently used weights (never `keep`'s) until the cache fits.
    fn shrink(&self, st: &mut State, keep: &str) {
        let mut total = st.resident_bytes();
        while total > self.cfg.max_host_bytes {
            let victim = st
                .entries
                .iter_mut()
                .filter(|(n, e)| e.adapter.is_some() && n.as_str() != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(_, e)| e);
            let Some(v) = victim else { return };
            total -= v.adapter.take().map_or(0, |a| a.bytes());
            self.counters.host_evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}
