//! Turning a model spec into files on disk: a `.gguf` path, an HF model directory,
//! or a hub id (`org/name`, `org/name:file.gguf`) found in the local HF cache or,
//! when online, downloaded into it with `hf-hub`.
//!
//! The cache layout is the one huggingface_hub writes, so models pulled by Python
//! tools are reused: `models--org--name/refs/<rev>` holds a commit hash and
//! `models--org--name/snapshots/<hash>/` the files.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::Cache;

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// One GGUF file (weights, tokenizer and config all inside).
    Gguf(PathBuf),
    /// A Hugging Face directory: config.json, tokenizer files, safetensors weights.
    HfDir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model '{spec}' not found: {reason}")]
    NotFound { spec: String, reason: String },
    #[error("{path} is not a model: {reason}")]
    NotAModel { path: String, reason: String },
    #[error("{location} holds several GGUF files ({}); choose one with a path or '<org>/<name>:<file>.gguf'", files.join(", "))]
    Ambiguous { location: String, files: Vec<String> },
    #[error("invalid model spec '{spec}': {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("hub download of '{file}' from {repo} failed: {source}")]
    Download { repo: String, file: String, source: ApiError },
}

/// How hub ids are resolved; `from_env` reads the usual HF variables.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// `None` when no cache location can be found (no HF_HUB_CACHE, HF_HOME or HOME).
    pub cache_dir: Option<PathBuf>,
    /// HF_HUB_OFFLINE: never touch the network.
    pub offline: bool,
    /// HF_TOKEN; when absent hf-hub reads the token file next to the cache.
    pub token: Option<String>,
    /// HF_ENDPOINT (mirrors).
    pub endpoint: Option<String>,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str()));
        Self { cache_dir: hub_cache_dir(), offline, token: var("HF_TOKEN"), endpoint: var("HF_ENDPOINT") }
    }
}

/// HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = var("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Resolve a model spec using the environment's HF settings.
pub fn resolve_model(spec: &str) -> Result<ModelSource, HubError> {
    resolve_model_with(spec, &HubOptions::from_env())
}

/// Resolve a model spec: a `.gguf` file, a directory (HF layout or one `.gguf`),
/// or a hub id looked up in the cache and, when online, downloaded.
pub fn resolve_model_with(spec: &str, opts: &HubOptions) -> Result<ModelSource, HubError> {
    let path = Path::new(spec);
    if path.is_file() {
        return resolve_file(path);
    }
    if path.is_dir() {
        return resolve_dir(path);
    }
    let id = parse_hub_id(spec)?;
    let cache_desc =
        opts.cache_dir.as_ref().map_or("<none: set HF_HUB_CACHE or HOME>".into(), |c| c.display().to_string());
    let mut cached_note = String::new();
    if let Some(cache) = &opts.cache_dir {
        if let Some(snap) = resolve_in_cache(cache, id.repo, "main") {
            match from_snapshot(&snap, id.file)? {
                Some(src) => return Ok(src),
                None => cached_note = format!(" (cached snapshot {} is incomplete)", snap.display()),
            }
        }
    }
    if opts.offline {
        return Err(HubError::NotFound {
            spec: spec.into(),
            reason: format!(
                "not a file, not a directory, not in the HF cache at {cache_desc}{cached_note}, and offline (HF_HUB_OFFLINE)"
            ),
        });
    }
    let Some(cache) = &opts.cache_dir else {
        return Err(HubError::NotFound {
            spec: spec.into(),
            reason: "not a file, not a directory, and no HF cache location to download into".into(),
        });
    };
    download(&id, cache, opts)
}

/// The snapshot directory of `repo_id` at `revision` (a branch/tag name under
/// `refs/`, or a commit hash), if present in the cache.
pub fn resolve_in_cache(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    if repo_id.is_empty() || repo_id.contains("..") || revision.contains("..") {
        return None;
    }
    let repo_dir = cache_dir.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if is_commit && snapshots.join(revision).is_dir() {
        return Some(snapshots.join(revision));
    }
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let commit = commit.trim();
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.contains("..") {
        return None;
    }
    let snap = snapshots.join(commit);
    snap.is_dir().then_some(snap)
}

fn resolve_file(path: &Path) -> Result<ModelSource, HubError> {
    let has_ext = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if has_ext || starts_with_gguf_magic(path) {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    let reason = if path.file_name().is_some_and(|n| n == "config.json") {
        "pass the directory that holds config.json, not the file"
    } else {
        "expected a .gguf file or a model directory"
    };
    Err(HubError::NotAModel { path: path.display().to_string(), reason: reason.into() })
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

fn resolve_dir(dir: &Path) -> Result<ModelSource, HubError> {
    let ggufs = gguf_files_in(dir)?;
    let has_config = dir.join("config.json").is_file();
    if has_config && (has_safetensors(dir)? || ggufs.is_empty()) {
        return Ok(ModelSource::HfDir(dir.to_path_buf()));
    }
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(dir.join(one))),
        [] => Err(HubError::NotAModel {
            path: dir.display().to_string(),
            reason: "the directory has neither config.json nor a .gguf file".into(),
        }),
        _ => Err(HubError::Ambiguous { location: dir.display().to_string(), files: ggufs }),
    }
}

fn list_files(dir: &Path) -> Result<Vec<String>, HubError> {
    super::list_files(dir).map_err(|source| HubError::Io { path: dir.to_path_buf(), source })
}

fn gguf_files_in(dir: &Path) -> Result<Vec<String>, HubError> {
    let mut v = list_files(dir)?;
    v.retain(|n| n.to_ascii_lowercase().ends_with(".gguf"));
    Ok(v)
}

fn has_safetensors(dir: &Path) -> Result<bool, HubError> {
    Ok(list_files(dir)?.iter().any(|n| n.ends_with(".safetensors")))
}

/// A model in a cached snapshot, or `None` if the files needed are not all there.
fn from_snapshot(snap: &Path, file: Option<&str>) -> Result<Option<ModelSource>, HubError> {
    if let Some(file) = file {
        let p = snap.join(file);
        return Ok(p.is_file().then_some(ModelSource::Gguf(p)));
    }
    if snap.join("config.json").is_file() && hf_weights_complete(snap) {
        return Ok(Some(ModelSource::HfDir(snap.to_path_buf())));
    }
    match resolve_dir(snap) {
        Ok(ModelSource::Gguf(p)) => Ok(Some(ModelSource::Gguf(p))),
        Err(e @ HubError::Ambiguous { .. }) => Err(e),
        _ => Ok(None),
    }
}

/// config.json alone is often cached by tools that only peek at a model.
fn hf_weights_complete(dir: &Path) -> bool {
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    let Ok(text) = std::fs::read(dir.join("model.safetensors.index.json")) else {
        return false;
    };
    match shards_of_index(&text) {
        Some(shards) => !shards.is_empty() && shards.iter().all(|s| dir.join(s).is_file()),
        None => false,
    }
}

/// Distinct shard file names of a `model.safetensors.index.json`, sorted.
fn shards_of_index(text: &[u8]) -> Option<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(text).ok()?;
    let mut shards: Vec<String> =
        json.get("weight_map")?.as_object()?.values().map(|v| v.as_str().map(String::from)).collect::<Option<_>>()?;
    shards.sort();
    shards.dedup();
    shards.iter().all(|s| is_repo_relative(s)).then_some(shards)
}

struct HubId<'a> {
    repo: &'a str,
    file: Option<&'a str>,
}

fn parse_hub_id(spec: &str) -> Result<HubId<'_>, HubError> {
    let not_found = |reason: &str| HubError::NotFound {
        spec: spec.into(),
        reason: format!("not a file, not a directory, and {reason}"),
    };
    let (repo, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let valid_part = |p: &&str| {
        !p.is_empty()
            && p.len() <= 96
            && *p != "."
            && *p != ".."
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    if parts.len() != 2 || !parts.iter().all(valid_part) {
        return Err(not_found("not a hub id of the form <org>/<name>[:<file>.gguf]"));
    }
    if file.is_none() && repo.to_ascii_lowercase().ends_with(".gguf") {
        // Almost certainly a mistyped path, not a repository named like a file.
        return Err(not_found(
            "no such .gguf file (to pick a file from a hub repository use <org>/<name>:<file>.gguf)",
        ));
    }
    if let Some(f) = file {
        if !is_repo_relative(f) || !f.to_ascii_lowercase().ends_with(".gguf") {
            return Err(HubError::BadSpec {
                spec: spec.into(),
                reason: format!("'{f}' is not a .gguf file path inside the repository"),
            });
        }
    }
    Ok(HubId { repo, file })
}

/// A path inside a repository: relative, no `..`, no empty components.
fn is_repo_relative(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains('\\')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// An hf-hub client writing into `cache`, with the token and endpoint of `opts`.
fn hub_api(cache: &Path, opts: &HubOptions, progress: bool) -> Result<hf_hub::api::sync::Api, ApiError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf())).with_progress(progress);
    if let Some(t) = &opts.token {
        builder = builder.with_token(Some(t.clone()));
    }
    if let Some(e) = &opts.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    builder.build()
}

fn download(id: &HubId<'_>, cache: &Path, opts: &HubOptions) -> Result<ModelSource, HubError> {
    let dl_err = |file: &str, source| HubError::Download { repo: id.repo.into(), file: file.into(), source };
    let api = hub_api(cache, opts, std::io::stderr().is_terminal()).map_err(|e| dl_err("(client setup)", e))?;
    let repo = api.model(id.repo.to_string());
    let get = |f: &str| repo.get(f).map_err(|e| dl_err(f, e));

    if let Some(file) = id.file {
        return Ok(ModelSource::Gguf(get(file)?));
    }
    let info = repo.info().map_err(|e| dl_err("(repository listing)", e))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |f: &str| files.contains(&f);

    let weights_single = has("model.safetensors");
    let weights_index = has("model.safetensors.index.json");
    if has("config.json") && (weights_single || weights_index) {
        let config = get("config.json")?;
        for optional in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
            if has(optional) {
                get(optional)?;
            }
        }
        if weights_single {
            get("model.safetensors")?;
        } else {
            let index = get("model.safetensors.index.json")?;
            let text = std::fs::read(&index).map_err(|source| HubError::Io { path: index.clone(), source })?;
            let shards = shards_of_index(&text).ok_or_else(|| HubError::NotAModel {
                path: index.display().to_string(),
                reason: "invalid weight_map".into(),
            })?;
            for s in &shards {
                get(s)?;
            }
        }
        let dir = config.parent().unwrap_or(cache).to_path_buf();
        return Ok(ModelSource::HfDir(dir));
    }

    let ggufs: Vec<&str> = files.iter().copied().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(get(one)?)),
        [] => {
            let pickle = files.iter().any(|f| f.ends_with(".bin") || f.ends_with(".pt"));
            let reason = if pickle {
                "it has only pickle weights, which tandem never loads (unpickling runs code)"
            } else {
                "it has neither config.json with safetensors weights nor a .gguf file"
            };
            Err(HubError::NotAModel { path: format!("hub repository {}", id.repo), reason: reason.into() })
        }
        many => Err(HubError::Ambiguous {
            location: format!("hub repository {}", id.repo),
            files: many.iter().map(|s| s.to_string()).collect(),
        }),
    }
}

/// The directory of a PEFT adapter hub repo (`org/name`): its cached snapshot
/// when that has `adapter_config.json`, else (when online) the config and
/// `adapter_model.safetensors` downloaded into the HF cache. Never fetches
/// pickle weights. Errors are the reason, for the caller to wrap.
pub fn resolve_adapter(repo: &str) -> Result<PathBuf, String> {
    resolve_adapter_with(repo, &HubOptions::from_env())
}

pub fn resolve_adapter_with(repo: &str, opts: &HubOptions) -> Result<PathBuf, String> {
    let id = parse_hub_id(repo).map_err(|e| e.to_string())?;
    if id.file.is_some() {
        return Err("an adapter is a whole repository: use <org>/<name>".into());
    }
    let Some(cache) = &opts.cache_dir else { return Err("no HF cache location (set HF_HUB_CACHE or HOME)".into()) };
    if let Some(snap) = resolve_in_cache(cache, id.repo, "main") {
        if snap.join("adapter_config.json").is_file() {
            return Ok(snap);
        }
    }
    if opts.offline {
        return Err(format!("not in the HF cache at {} and offline (HF_HUB_OFFLINE)", cache.display()));
    }
    let api = hub_api(cache, opts, false).map_err(|e| format!("hub client: {e}"))?;
    let r = api.model(id.repo.to_string());
    let config = r.get("adapter_config.json").map_err(|e| format!("downloading adapter_config.json: {e}"))?;
    r.get("adapter_model.safetensors").map_err(|e| format!("downloading adapter_model.safetensors: {e}"))?;
    config.parent().map(Path::to_path_buf).ok_or_else(|| "the downloaded file has no directory".into())
}
