//! Model spec resolution against local paths and a fake HF cache; never touches
//! the network (every hub lookup here runs offline).

use std::path::{Path, PathBuf};

use tandem::loader::hub::{resolve_in_cache, resolve_model, resolve_model_with, HubError, HubOptions, ModelSource};

const REV: &str = "0123456789abcdef0123456789abcdef01234567";

fn touch(p: &Path, content: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// `models--org--name/{refs/main, snapshots/<rev>/files...}` under `cache`.
fn fake_repo(cache: &Path, repo: &str, files: &[&str]) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    touch(&root.join("refs/main"), format!("{REV}\n").as_bytes());
    let snap = root.join("snapshots").join(REV);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        let content: &[u8] = if f.ends_with(".gguf") { b"GGUF\x03\0\0\0" } else { b"{}" };
        touch(&snap.join(f), content);
    }
    snap
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions { cache_dir: Some(cache.to_path_buf()), offline: true, ..Default::default() }
}

#[test]
fn gguf_file_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    touch(&p, b"GGUF");
    let opts = offline(dir.path());
    assert_eq!(resolve_model_with(p.to_str().unwrap(), &opts).unwrap(), ModelSource::Gguf(p.clone()));
    // No extension, but GGUF magic.
    let q = dir.path().join("model-file");
    touch(&q, b"GGUF\x03\0\0\0");
    assert_eq!(resolve_model_with(q.to_str().unwrap(), &opts).unwrap(), ModelSource::Gguf(q));
    let r = dir.path().join("notes.txt");
    touch(&r, b"hello");
    assert!(matches!(resolve_model_with(r.to_str().unwrap(), &opts), Err(HubError::NotAModel { .. })));
}

#[test]
fn directories() {
    let dir = tempfile::tempdir().unwrap();
    let opts = offline(dir.path());

    let hf = dir.path().join("hf");
    touch(&hf.join("config.json"), b"{}");
    touch(&hf.join("model.safetensors"), b"");
    assert_eq!(resolve_model_with(hf.to_str().unwrap(), &opts).unwrap(), ModelSource::HfDir(hf.clone()));

    let one = dir.path().join("one");
    touch(&one.join("model-q4_k_m.gguf"), b"GGUF");
    touch(&one.join("README.md"), b"");
    assert_eq!(
        resolve_model_with(one.to_str().unwrap(), &opts).unwrap(),
        ModelSource::Gguf(one.join("model-q4_k_m.gguf"))
    );

    let two = dir.path().join("two");
    touch(&two.join("a.gguf"), b"GGUF");
    touch(&two.join("b.gguf"), b"GGUF");
    let e = resolve_model_with(two.to_str().unwrap(), &opts).unwrap_err();
    assert!(matches!(e, HubError::Ambiguous { .. }));
    let msg = e.to_string();
    assert!(msg.contains("a.gguf") && msg.contains("b.gguf"), "{msg}");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(matches!(resolve_model_with(empty.to_str().unwrap(), &opts), Err(HubError::NotAModel { .. })));

    // config.json without safetensors but with one GGUF: the GGUF is the model.
    let mixed = dir.path().join("mixed");
    touch(&mixed.join("config.json"), b"{}");
    touch(&mixed.join("m.gguf"), b"GGUF");
    assert_eq!(resolve_model_with(mixed.to_str().unwrap(), &opts).unwrap(), ModelSource::Gguf(mixed.join("m.gguf")));
}

#[test]
fn cache_lookup() {
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_repo(cache.path(), "org/name", &["config.json"]);
    assert_eq!(resolve_in_cache(cache.path(), "org/name", "main"), Some(snap.clone()));
    assert_eq!(resolve_in_cache(cache.path(), "org/name", REV), Some(snap));
    assert_eq!(resolve_in_cache(cache.path(), "org/name", "dev"), None);
    assert_eq!(resolve_in_cache(cache.path(), "org/other", "main"), None);
    assert_eq!(resolve_in_cache(cache.path(), "../org/name", "main"), None);
    // A ref pointing at a snapshot that is not there.
    let root = cache.path().join("models--org--name");
    touch(&root.join("refs/stale"), b"ffffffffffffffffffffffffffffffffffffffff");
    assert_eq!(resolve_in_cache(cache.path(), "org/name", "stale"), None);
}

#[test]
fn hub_ids_from_cache() {
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();
    let opts = offline(c);
    let hf = fake_repo(c, "org/hf", &["config.json", "tokenizer.json", "model.safetensors"]);
    assert_eq!(resolve_model_with("org/hf", &opts).unwrap(), ModelSource::HfDir(hf));

    let sharded = fake_repo(
        c,
        "org/sharded",
        &[
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    );
    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(sharded.join("model.safetensors.index.json"), index).unwrap();
    assert_eq!(resolve_model_with("org/sharded", &opts).unwrap(), ModelSource::HfDir(sharded.clone()));
    // One shard gone: incomplete, and offline there is nowhere to get it.
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let e = resolve_model_with("org/sharded", &opts).unwrap_err();
    assert!(e.to_string().contains("incomplete"), "{e}");

    let gg = fake_repo(c, "org/gguf", &["q4.gguf", "q8.gguf", "README.md"]);
    assert_eq!(resolve_model_with("org/gguf:q8.gguf", &opts).unwrap(), ModelSource::Gguf(gg.join("q8.gguf")));
    assert!(matches!(resolve_model_with("org/gguf", &opts), Err(HubError::Ambiguous { .. })));
    let e = resolve_model_with("org/gguf:q2.gguf", &opts).unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");

    let single = fake_repo(c, "org/single", &["sub/model.gguf", "only.gguf"]);
    assert_eq!(resolve_model_with("org/single", &opts).unwrap(), ModelSource::Gguf(single.join("only.gguf")));
    assert_eq!(
        resolve_model_with("org/single:sub/model.gguf", &opts).unwrap(),
        ModelSource::Gguf(single.join("sub/model.gguf"))
    );
}

#[test]
fn not_found_errors_are_clear() {
    let cache = tempfile::tempdir().unwrap();
    let opts = offline(cache.path());
    let e = resolve_model_with("org/missing", &opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, HubError::NotFound { .. }));
    assert!(
        msg.contains("'org/missing'")
            && msg.contains("not a file")
            && msg.contains("not a directory")
            && msg.contains(&cache.path().display().to_string())
            && msg.contains("offline"),
        "{msg}"
    );

    let e = resolve_model_with("/no/such/file.gguf", &opts).unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("not a hub id"), "{e}");
    let e = resolve_model_with("models/typo.gguf", &HubOptions::default()).unwrap_err();
    assert!(e.to_string().contains("no such .gguf file"), "{e}");
    assert!(matches!(resolve_model_with("just-a-name", &opts), Err(HubError::NotFound { .. })));
    assert!(matches!(resolve_model_with("a/b/c", &opts), Err(HubError::NotFound { .. })));
    assert!(matches!(resolve_model_with("org/name:../x.gguf", &opts), Err(HubError::BadSpec { .. })));
    assert!(matches!(resolve_model_with("org/name:weights.bin", &opts), Err(HubError::BadSpec { .. })));

    // No cache location at all and online: nothing to download into.
    let none = HubOptions::default();
    let e = resolve_model_with("org/missing", &none).unwrap_err();
    assert!(e.to_string().contains("no HF cache"), "{e}");
}

/// The only test that touches process environment variables.
#[test]
fn environment_is_honoured() {
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_repo(cache.path(), "envorg/model", &["config.json", "model.safetensors"]);
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let opts = HubOptions::from_env();
    assert!(opts.offline);
    assert_eq!(opts.cache_dir.as_deref(), Some(cache.path()));
    assert_eq!(resolve_model("envorg/model").unwrap(), ModelSource::HfDir(snap));
    let e = resolve_model("envorg/absent").unwrap_err();
    assert!(e.to_string().contains("offline"), "{e}");

    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", cache.path().join("home"));
    assert_eq!(HubOptions::from_env().cache_dir, Some(cache.path().join("home").join("hub")));
    std::env::set_var("HF_HUB_OFFLINE", "0");
    assert!(!HubOptions::from_env().offline);
    std::env::remove_var("HF_HOME");
    std::env::remove_var("HF_HUB_OFFLINE");
}

#[test]
fn adapter_hub_ids_resolve_from_the_cache_offline() {
    use tandem::loader::hub::resolve_adapter_with;
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_repo(cache.path(), "org/sql-lora", &["adapter_config.json", "adapter_model.safetensors"]);
    let opts = offline(cache.path());
    assert_eq!(resolve_adapter_with("org/sql-lora", &opts).unwrap(), snap);
    // A model repo (no adapter_config.json) is not an adapter; offline it cannot be fetched.
    fake_repo(cache.path(), "org/model", &["config.json", "model.safetensors"]);
    let e = resolve_adapter_with("org/model", &opts).unwrap_err();
    assert!(e.contains("offline"), "{e}");
    assert!(resolve_adapter_with("org/sql-lora:x.gguf", &opts).unwrap_err().contains("whole repository"));
    assert!(resolve_adapter_with("../etc", &opts).is_err());
}
