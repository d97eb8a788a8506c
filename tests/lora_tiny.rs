//! LoRA on the tiny Qwen2 fixture against peft (tests/fixtures/tiny/lora, made by
//! scripts/fixtures/lora_adapters.py): logits equal peft's and the merged
//! model's, greedy decoding equals peft's, mixed-adapter batches equal solo
//! runs, slot contention and in-place reloads never mix versions or reuse
//! stale prefix-cache KV, and every refused adapter says why.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use serde_json::Value;
use tandem::backend::cpu::CpuBackend;
use tandem::engine::{EngineRequest, FinishInfo, TokenOut};
use tandem::lora::registry::RegistryError;
use tandem::lora::{load_peft_dir, LoraAdapter, LoraDtype, LoraError, LoraOptions, LoraRegistry, RegistryConfig};
use tandem::model::{load_hf_dir, LlamaModel, ModelConfig};

const BASE: &str = "tiny/qwen2/hf-f32";
const ADAPTERS: [&str; 4] = ["a-r4-qv", "b-r8-all", "c-r16-mlp", "a-r4-qv-v2"];
const LIMITS: LoraOptions = LoraOptions { max_rank: 64, dtype: LoraDtype::F32 };

fn golden() -> Value {
    read_json(&fixture("tiny/lora/golden.json"))
}

fn adapter_dir(name: &str) -> PathBuf {
    fixture("tiny/lora").join(name)
}

fn model() -> LlamaModel<CpuBackend> {
    load_hf_dir(&CpuBackend::new(2).unwrap(), &fixture(BASE)).unwrap().model
}

fn config() -> ModelConfig {
    model().config
}

fn adapter(name: &str) -> Arc<LoraAdapter> {
    Arc::new(load_peft_dir(name, &adapter_dir(name), &config(), LIMITS).unwrap())
}

fn adapter_bf16(name: &str) -> Arc<LoraAdapter> {
    let opts = LoraOptions { dtype: LoraDtype::Bf16, ..LIMITS };
    Arc::new(load_peft_dir(name, &adapter_dir(name), &config(), opts).unwrap())
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn with_adapter(prompt: &[u32], max_tokens: usize, a: Option<&Arc<LoraAdapter>>) -> EngineRequest {
    EngineRequest { adapter: a.cloned(), ..greedy(prompt, max_tokens) }
}

fn outputs(res: &[(Vec<TokenOut>, FinishInfo)]) -> Vec<Vec<u32>> {
    res.iter().map(|o| token_ids(&o.0)).collect()
}

#[test]
fn logits_match_peft_and_the_merged_model() {
    let g = golden();
    let be = CpuBackend::new(2).unwrap();
    let m = model();
    let inputs: Vec<Vec<u32>> = g["inputs"].as_array().unwrap().iter().map(ids).collect();
    for (i, input) in inputs.iter().enumerate() {
        let base = all_logits(&be, &m, input);
        let err = max_rel_err(&base, &rows(&g["base"]["logits"][i]));
        assert!(err < 1e-4, "base, input {i}: relative error {err}");
    }
    for name in ADAPTERS {
        let a = adapter(name);
        let want = &g["adapters"][name];
        assert_eq!(a.max_rank as u64, want["r"].as_u64().unwrap(), "{name}: rank");
        for (i, input) in inputs.iter().enumerate() {
            let got = all_logits_with(&be, &m, input, Some(&a));
            let peft = rows(&want["logits"][i]);
            let err = max_rel_err(&got, &peft);
            assert!(err < 1e-4, "{name}, input {i}: relative error {err} vs peft");
            let err = max_rel_err(&got, &rows(&want["logits_merged"][i]));
            assert!(err < 1e-4, "{name}, input {i}: relative error {err} vs the merged model");
            // The adapter really changed the output (the comparison above is not vacuous).
            let base = all_logits(&be, &m, input);
            assert!(max_rel_err(&got, &base) > 1e-2, "{name}: logits equal the base model's");
        }
    }
}

/// bf16 storage: half the bytes, outputs within bf16 rounding of peft's, still
/// batch invariant, and a version of its own (its KV differs from f32's).
#[test]
fn bf16_adapters_stay_close_to_peft_and_batch_invariant() {
    let g = golden();
    let be = CpuBackend::new(2).unwrap();
    let m = model();
    let inputs: Vec<Vec<u32>> = g["inputs"].as_array().unwrap().iter().map(ids).collect();
    for name in ADAPTERS {
        let (a, a32) = (adapter_bf16(name), adapter(name));
        assert_eq!(a.bytes() * 2, a32.bytes());
        assert_ne!(a.version, a32.version);
        for (i, input) in inputs.iter().enumerate() {
            let got = all_logits_with(&be, &m, input, Some(&a));
            let peft = rows(&g["adapters"][name]["logits"][i]);
            let base = rows(&g["base"]["logits"][i]);
            // bf16 keeps 8 mantissa bits, so the error scales with how far the
            // adapter moves the logits, not with the logits themselves.
            let max_abs = |x: &[Vec<f32>], y: &[Vec<f32>]| {
                x.iter().flatten().zip(y.iter().flatten()).fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            };
            let (err, delta) = (max_abs(&got, &peft), max_abs(&peft, &base));
            eprintln!("{name}, input {i}: bf16 error {err}, adapter delta {delta}");
            assert!(err < 0.03 * delta, "{name}, input {i}: error {err} vs peft, adapter delta {delta}");
        }
    }
    let adapters =
        [None, Some(adapter_bf16("a-r4-qv")), Some(adapter_bf16("b-r8-all")), Some(adapter_bf16("c-r16-mlp"))];
    let reqs: Vec<EngineRequest> =
        prompts().iter().enumerate().map(|(i, p)| with_adapter(p, 8, adapters[i % 4].as_ref())).collect();
    let solo = solo_outputs(model, &reqs);
    assert_eq!(outputs(&engine(model(), &engine_config(16, 256, 13)).generate(reqs)), solo);
}

#[test]
fn greedy_decoding_matches_peft() {
    let g = golden();
    let prompt = ids(&g["greedy_prompt"]);
    let n = g["base"]["greedy"].as_array().unwrap().len();
    let mut e = engine(model(), &engine_config(16, 256, 512));
    let base = outputs(&e.generate(vec![greedy(&prompt, n)]));
    assert_eq!(base[0], ids(&g["base"]["greedy"]));
    for name in ADAPTERS {
        let a = adapter(name);
        let got = outputs(&e.generate(vec![with_adapter(&prompt, n, Some(&a))]));
        assert_eq!(got[0], ids(&g["adapters"][name]["greedy"]), "{name}");
    }
}

/// Prompts of different lengths, so chunks straddle blocks and budgets.
fn prompts() -> Vec<Vec<u32>> {
    (0..8).map(|i| (0..(9 + 7 * i)).map(|j| ((j * 31 + i * 17) % 250 + 3) as u32).collect()).collect()
}

#[test]
fn one_batch_of_base_and_three_adapters_equals_each_solo_run() {
    let adapters: Vec<Option<Arc<LoraAdapter>>> =
        vec![None, Some(adapter("a-r4-qv")), Some(adapter("b-r8-all")), Some(adapter("c-r16-mlp"))];
    let reqs: Vec<EngineRequest> =
        prompts().iter().enumerate().map(|(i, p)| with_adapter(p, 10, adapters[i % 4].as_ref())).collect();
    let solo = solo_outputs(model, &reqs);
    // Each adapter changes some prompt's tokens (so equal outputs below mean something).
    let run = |p: &[u32], a: Option<&Arc<LoraAdapter>>| solo_outputs(model, &[with_adapter(p, 10, a)]);
    for a in adapters.iter().flatten() {
        assert!(prompts().iter().any(|p| run(p, Some(a)) != run(p, None)), "{} never changes the output", a.name);
    }
    // Everything in one batch, prefilled in chunks of at most 13 tokens mixed with decodes.
    let mut e = engine(model(), &engine_config(16, 256, 13));
    assert_eq!(outputs(&e.generate(reqs.clone())), solo, "chunked mixed batch");
    // Big budget: all prompts in one step, then mixed decodes.
    let mut e = engine(model(), &engine_config(16, 256, 512));
    assert_eq!(outputs(&e.generate(reqs)), solo, "one-step mixed batch");
}

#[test]
fn more_adapters_than_slots_wait_their_turn_without_changing_outputs() {
    let names = ["a-r4-qv", "b-r8-all", "c-r16-mlp", "a-r4-qv-v2"];
    let reqs: Vec<EngineRequest> =
        prompts().iter().enumerate().map(|(i, p)| with_adapter(p, 6, Some(&adapter(names[i % 4])))).collect();
    let solo = solo_outputs(model, &reqs);
    let mut cfg = engine_config(16, 256, 512);
    cfg.max_loras = 2;
    let mut e = engine(model(), &cfg);
    for (i, r) in reqs.into_iter().enumerate() {
        e.add_request(i as u64, r);
    }
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 8];
    let mut max_pinned = 0;
    let mut steps = 0;
    while e.has_work() {
        let (out, events) = e.step();
        assert!(!out.chunks.is_empty(), "no progress");
        max_pinned = max_pinned.max(e.scheduler().slots().pinned());
        steps += 1;
        for ev in events {
            if let tandem::engine::StepEvent::Token(id, t) = ev {
                got[id as usize].push(t.id);
            }
        }
    }
    assert_eq!(got, solo);
    assert!(max_pinned <= 2, "at most max_loras adapters run at once");
    let slots = e.scheduler().slots();
    assert!(slots.evictions > 0, "four adapters through two slots evict");
    assert!(steps > 6, "the adapters could not all run at once");
}

#[test]
fn a_waiting_request_without_a_slot_does_not_block_others() {
    let (a, b) = (adapter("a-r4-qv"), adapter("b-r8-all"));
    let mut cfg = engine_config(16, 256, 512);
    cfg.max_loras = 1;
    let mut e = engine(model(), &cfg);
    let p = prompts();
    e.add_request(0, with_adapter(&p[0], 8, Some(&a)));
    e.add_request(1, with_adapter(&p[1], 8, Some(&b)));
    e.add_request(2, with_adapter(&p[2], 8, None));
    e.add_request(3, with_adapter(&p[3], 8, Some(&a)));
    let (out, _) = e.step();
    let ids: Vec<u64> = out.chunks.iter().map(|c| c.0).collect();
    assert_eq!(ids, vec![0, 2, 3], "b has no slot: the base request and a's second request go ahead");
    assert_eq!(out.lora_loads.len(), 1, "a is loaded once for both its requests");
}

#[test]
fn a_reloaded_adapter_never_reuses_the_old_versions_cached_prefix() {
    let (old, new) = (adapter("a-r4-qv"), adapter("a-r4-qv-v2"));
    // The same name, as an in-place reload publishes it.
    let new = Arc::new(new.renamed("a-r4-qv", "reloaded"));
    assert_ne!(old.version, new.version);
    let p: Vec<u32> = (0..64).map(|i| (i * 7 % 250 + 3) as u32).collect();
    let want_new = solo_outputs(model, &[with_adapter(&p, 8, Some(&new))]);
    let mut e = engine(model(), &engine_config(16, 256, 512));
    let first = e.generate(vec![with_adapter(&p, 8, Some(&old))]);
    let again = e.generate(vec![with_adapter(&p, 8, Some(&old))]);
    assert_eq!(again[0].1.cached_prompt_tokens, 48, "the same version reuses its cached prefix");
    assert_eq!(outputs(&again), outputs(&first));
    let after = e.generate(vec![with_adapter(&p, 8, Some(&new))]);
    assert_eq!(after[0].1.cached_prompt_tokens, 0, "a new version must not hit the old version's blocks");
    assert_eq!(outputs(&after), want_new);
    assert_ne!(outputs(&after), outputs(&first));
    let base = e.generate(vec![greedy(&p, 8)]);
    assert_eq!(base[0].1.cached_prompt_tokens, 0, "the base model does not reuse adapter KV either");
}

#[test]
fn versions_are_content_hashes() {
    let (a, a2) = (adapter("a-r4-qv"), adapter("a-r4-qv"));
    assert_eq!(a.version, a2.version, "the same weights give the same version");
    assert_ne!(a.version, adapter("a-r4-qv-v2").version);
    assert_ne!(a.version, 0);
    // rsLoRA scaling is folded into B: alpha / sqrt(r).
    let b = adapter("b-r8-all");
    let g = golden();
    let s = g["adapters"]["b-r8-all"]["scaling"]["q_proj"].as_f64().unwrap() as f32;
    assert!((s - 16.0 / 8f32.sqrt()).abs() < 1e-6);
    assert!(b.layers.iter().all(|l| l.iter().all(|m| m.is_some())), "b targets all seven projections");
    let c = adapter("c-r16-mlp");
    assert!(c.layers[0].iter().all(|m| m.is_none()), "c adapts layer 1 only");
    assert_eq!(c.layers[1][6].as_ref().unwrap().rank, 8, "rank_pattern gives down_proj rank 8");
}

/// A copy of adapter `a-r4-qv` in a temp dir with its config edited by `edit`.
fn variant(root: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = adapter_dir("a-r4-qv");
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = read_json(&src.join("adapter_config.json"));
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    std::fs::copy(src.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    dir
}

fn registry(roots: Vec<PathBuf>, max_rank: usize) -> LoraRegistry {
    let cfg = RegistryConfig {
        max_loras: 4,
        limits: LoraOptions { max_rank, dtype: LoraDtype::F32 },
        max_host_bytes: 1 << 30,
        allowed_roots: roots,
        allow_hub: false,
    };
    LoraRegistry::new(cfg, config(), vec!["hf-f32".into()])
}

#[test]
fn bad_adapters_are_refused_with_reasons_and_leave_the_registry_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let reg = registry(vec![root.clone(), fixture("tiny/lora")], 64);
    reg.load("good", &adapter_dir("a-r4-qv"), false, false).unwrap();
    let before = reg.list();

    let pickle = root.join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(adapter_dir("a-r4-qv").join("adapter_config.json"), pickle.join("adapter_config.json")).unwrap();
    std::fs::write(pickle.join("adapter_model.bin"), b"\x80\x04not really a pickle").unwrap();

    let truncated = variant(&root, "truncated", |_| {});
    let bytes = std::fs::read(truncated.join("adapter_model.safetensors")).unwrap();
    std::fs::write(truncated.join("adapter_model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();

    let wrong_shape = root.join("wrong-shape");
    std::fs::create_dir_all(&wrong_shape).unwrap();
    std::fs::copy(adapter_dir("a-r4-qv").join("adapter_config.json"), wrong_shape.join("adapter_config.json")).unwrap();
    // b's weights under a's config (r 4): every tensor has rank 8.
    std::fs::copy(
        adapter_dir("b-r8-all").join("adapter_model.safetensors"),
        wrong_shape.join("adapter_model.safetensors"),
    )
    .unwrap();

    let outside = tempfile::tempdir().unwrap();
    let outside_dir = variant(outside.path(), "elsewhere", |_| {});

    let cases: Vec<(PathBuf, &str)> = vec![
        (pickle, "pickle"),
        (truncated, "adapter_model.safetensors"),
        (wrong_shape, "expected [4, 64]"),
        (variant(&root, "mts", |c| c["modules_to_save"] = serde_json::json!(["lm_head"])), "modules_to_save"),
        (variant(&root, "embed", |c| c["target_modules"] = serde_json::json!(["q_proj", "embed_tokens"])), "embedding"),
        (variant(&root, "lmhead-re", |c| c["target_modules"] = serde_json::json!(".*lm_head")), "LM head"),
        (variant(&root, "nosuch", |c| c["target_modules"] = serde_json::json!(["q_proj", "c_attn"])), "does not exist"),
        (variant(&root, "dora", |c| c["use_dora"] = serde_json::json!(true)), "DoRA"),
        (variant(&root, "bias", |c| c["bias"] = serde_json::json!("all")), "bias"),
        (variant(&root, "prefix", |c| c["peft_type"] = serde_json::json!("PREFIX_TUNING")), "only LORA"),
        (variant(&root, "notjson", |c| *c = serde_json::json!("[")), "not a valid PEFT config"),
        (root.join("missing"), "no such directory"),
        (outside_dir, "outside the allowed adapter roots"),
    ];
    for (dir, why) in cases {
        let e = reg.load("x", &dir, false, false).unwrap_err();
        assert!(e.to_string().contains(why), "{}: {e} (wanted {why:?})", dir.display());
        assert!(!matches!(e, RegistryError::NameTaken(_)));
    }
    // Rank above the server's limit.
    let small = registry(vec![fixture("tiny/lora")], 4);
    let e = small.load("x", &adapter_dir("b-r8-all"), false, false).unwrap_err();
    assert!(e.to_string().contains("max_lora_rank 4"), "{e}");
    // Name rules: taken, the base model's, empty.
    assert!(matches!(reg.load("good", &adapter_dir("b-r8-all"), false, false), Err(RegistryError::NameTaken(_))));
    assert!(matches!(reg.load("hf-f32", &adapter_dir("b-r8-all"), false, false), Err(RegistryError::ReservedName(_))));
    assert!(reg.load("", &adapter_dir("b-r8-all"), false, false).is_err());
    // No roots configured: HTTP paths are refused outright.
    let closed = registry(vec![], 64);
    let e = closed.load("x", &adapter_dir("a-r4-qv"), false, false).unwrap_err();
    assert!(matches!(e, RegistryError::Lora(LoraError::NotAllowed(_))), "{e}");
    assert_eq!(reg.list(), before, "failed loads left the registry as it was");
    // The fixtures name their base by path; another base name gets a warning.
    let a = reg.get("good").unwrap().unwrap();
    assert_eq!(reg.base_mismatch(&a), None);
    let other = LoraRegistry::new(RegistryConfig { ..reg.config().clone() }, config(), vec!["llama-3-8b".into()]);
    assert!(other.base_mismatch(&a).unwrap().contains("trained on 'tests/fixtures/tiny/qwen2/hf-f32'"));
    assert_eq!(reg.get("good").unwrap().unwrap().name, "good");
}

#[test]
fn reload_in_place_publishes_a_new_version_and_old_holders_keep_theirs() {
    let reg = registry(vec![fixture("tiny/lora")], 64);
    let v1 = reg.load("x", &adapter_dir("a-r4-qv"), false, false).unwrap();
    let v2 = reg.load("x", &adapter_dir("a-r4-qv-v2"), true, false).unwrap();
    assert_ne!(v1.version, v2.version);
    assert_eq!(reg.get("x").unwrap().unwrap().version, v2.version);
    // A request that resolved v1 before the reload still runs v1.
    let p = &prompts()[3];
    let mut e = engine(model(), &engine_config(16, 256, 512));
    let both = outputs(&e.generate(vec![with_adapter(p, 8, Some(&v1)), with_adapter(p, 8, Some(&v2))]));
    let want = solo_outputs(
        model,
        &[with_adapter(p, 8, Some(&adapter("a-r4-qv"))), with_adapter(p, 8, Some(&adapter("a-r4-qv-v2")))],
    );
    assert_eq!(both, want);
    reg.unload("x").unwrap();
    assert!(reg.get("x").unwrap().is_none());
    assert!(matches!(reg.unload("x"), Err(RegistryError::Unknown(_))));
}

#[test]
fn the_host_cache_drops_least_recently_used_weights_and_rereads_them() {
    let a_bytes = adapter("a-r4-qv").bytes();
    let cfg = RegistryConfig {
        max_loras: 4,
        limits: LIMITS,
        // Room for two a-sized adapters.
        max_host_bytes: a_bytes * 2 + a_bytes / 2,
        allowed_roots: vec![fixture("tiny/lora")],
        allow_hub: false,
    };
    let reg = LoraRegistry::new(cfg, config(), vec![]);
    let a = reg.load("a", &adapter_dir("a-r4-qv"), false, false).unwrap();
    reg.load("a2", &adapter_dir("a-r4-qv-v2"), false, false).unwrap();
    assert!(reg.get("a").unwrap().is_some(), "touch a: a2 is now the least recently used");
    reg.load("a3", &adapter_dir("a-r4-qv"), false, false).unwrap();
    assert!(reg.host_bytes() <= a_bytes * 2 + a_bytes / 2);
    assert_eq!(reg.counters.host_evictions.load(std::sync::atomic::Ordering::Relaxed), 1);
    let loads = reg.counters.disk_loads.load(std::sync::atomic::Ordering::Relaxed);
    // a2 was dropped from memory but is still served: it is read again.
    let again = reg.get("a2").unwrap().unwrap();
    assert_eq!(again.version, adapter("a-r4-qv-v2").version);
    assert_eq!(reg.counters.disk_loads.load(std::sync::atomic::Ordering::Relaxed), loads + 1);
    assert_eq!(reg.get("a").unwrap().unwrap().version, a.version);
    assert_eq!(reg.list().len(), 3);
}

#[test]
fn a_request_waiting_for_a_slot_does_not_starve() {
    use tandem::engine::scheduler::SLOT_WAIT_LIMIT;
    let (a, b) = (adapter("a-r4-qv"), adapter("b-r8-all"));
    let mut cfg = engine_config(16, 256, 512);
    cfg.max_loras = 1;
    let mut e = engine(model(), &cfg);
    let p = prompts();
    // A steady stream of short requests for `a` keeps the only slot pinned.
    let mut next = 0u64;
    let mut add_a = |e: &mut tandem::engine::EngineCore<CpuBackend>| {
        e.add_request(next, with_adapter(&p[(next % 8) as usize], 3, Some(&a)));
        next += 1;
    };
    add_a(&mut e);
    e.add_request(1 << 20, with_adapter(&p[0], 2, Some(&b)));
    let mut b_done_at = None;
    for step in 0..(SLOT_WAIT_LIMIT as usize * 4) {
        add_a(&mut e);
        let (_, events) = e.step();
        if events.iter().any(|ev| matches!(ev, tandem::engine::StepEvent::Finished(id, _) if *id == 1 << 20)) {
            b_done_at = Some(step);
            break;
        }
    }
    let at = b_done_at.expect("the request for b finished despite a's steady traffic");
    assert!(at >= SLOT_WAIT_LIMIT as usize, "b waited for the slot first (finished at step {at})");
}
