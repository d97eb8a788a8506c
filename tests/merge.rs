//! `tandem merge` against peft's `merge_and_unload` (tests/fixtures/tiny/merge,
//! made by scripts/fixtures/merge_goldens.py): the merged directory loads with
//! tandem's own loader as a plain model whose logits equal peft's merged
//! model's, from f32, bf16 and quantised GGUF bases (llama Q/K back in HF
//! order); the CLI writes the same bytes; bad inputs are refused with nothing
//! written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use serde_json::Value;
use tandem::backend::cpu::CpuBackend;
use tandem::lora::{load_peft_dir, LoraDtype, LoraOptions, LoraTarget};
use tandem::merge::{merge, MergeDtype, MergeError, MergeOptions};
use tandem::model::{load_gguf, load_hf_dir, load_model};

const LIMITS: LoraOptions = LoraOptions { max_rank: 64, dtype: LoraDtype::F32 };

fn golden() -> Value {
    read_json(&fixture("tiny/merge/golden.json"))
}

fn tandem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.env("TANDEM_THREADS", "2");
    c
}

fn opts(dtype: Option<MergeDtype>) -> MergeOptions {
    MergeOptions { dtype }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Logits of the merged model at the golden case's positions.
fn merged_logits(dir: &Path, case: &Value) -> Vec<Vec<f32>> {
    let be = CpuBackend::new(2).unwrap();
    let m = load_hf_dir(&be, dir).unwrap().model;
    let all = all_logits(&be, &m, &ids(&case["input_ids"]));
    ids(&case["positions"]).iter().map(|&p| all[p as usize].clone()).collect()
}

fn want_logits(case: &Value) -> Vec<Vec<f32>> {
    case["logits"].as_array().unwrap().iter().map(floats).collect()
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Nothing but `keep` in `dir` (no temporary directory left behind).
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, keep, "entries of {}", dir.display());
}

#[test]
fn merged_checkpoints_match_peft() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in g["cases"].as_object().unwrap() {
        let base = fixture(case["base"].as_str().unwrap());
        let adapter = fixture(case["adapter"].as_str().unwrap());
        let want_dtype: MergeDtype = case["dtype"].as_str().unwrap().parse().unwrap();
        // HF bases keep their own dtype by default; quantised GGUFs are asked for f32 here.
        let dtype = base.extension().is_some_and(|e| e == "gguf").then_some(want_dtype);
        let out = tmp.path().join(name);
        let report = merge(s(&base), &adapter, &out, &opts(dtype)).unwrap();
        assert_eq!(report.dtype, want_dtype, "{name}");
        assert!(report.adapted > 0, "{name}");
        assert!(
            report.files.contains(&"config.json".to_string()) && report.files.contains(&"model.safetensors".into())
        );
        let config = read_json(&out.join("config.json"));
        let torch_dtype = if want_dtype == MergeDtype::F32 { "float32" } else { "bfloat16" };
        assert_eq!(config["torch_dtype"], torch_dtype, "{name}");

        let got = merged_logits(&out, case);
        let want = want_logits(case);
        let err = max_rel_err(&got, &want);
        eprintln!("{name}: max |tandem merged - peft merged| {:.3e} (relative {err:.3e})", max_abs(&got, &want));
        // bf16: both sides hold the same bf16 weights up to the rare last-bit
        // tie of a sum computed in another order.
        let tol = if want_dtype == MergeDtype::F32 { 1e-5 } else { 1e-4 };
        assert!(err < tol, "{name}: relative error {err} vs peft's merged model");
    }
    assert_only(tmp.path(), &["llama2-q8_0", "q4k", "qwen2-bf16", "qwen2-f32", "qwen2-q4_0"]);
}

/// The merged model computes what tandem computes with the adapter applied at run time.
#[test]
fn merged_equals_base_with_adapter() {
    let be = CpuBackend::new(2).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let g = golden();
    for (base, adapter) in
        [("tiny/llama2/model-q8_0.gguf", "tiny/train/grad-llama2-q8_0"), ("tiny/qwen2/hf-f32", "tiny/lora/c-r16-mlp")]
    {
        let out = tmp.path().join(adapter.replace('/', "_"));
        merge(s(&fixture(base)), &fixture(adapter), &out, &opts(Some(MergeDtype::F32))).unwrap();
        let loaded = load_model(&be, s(&fixture(base))).unwrap().model;
        let a = load_peft_dir("a", &fixture(adapter), &loaded.config, LIMITS).unwrap();
        let input = ids(&g["cases"]["qwen2-f32"]["input_ids"]);
        let want = all_logits_with(&be, &loaded, &input, Some(&a));
        let merged = load_hf_dir(&be, &out).unwrap().model;
        assert_eq!(merged.config.num_layers, loaded.config.num_layers);
        let got = all_logits(&be, &merged, &input);
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-5, "{base} + {adapter}: relative error {err} vs the adapter at run time");
    }
}

/// Quantised bases default to bf16 output, within bf16 rounding of the f32 reference.
#[test]
fn quantised_bases_default_to_bf16() {
    let g = golden();
    let case = &g["cases"]["q4k"];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixture(case["base"].as_str().unwrap());
    let report = merge(s(&base), &fixture(case["adapter"].as_str().unwrap()), &out, &opts(None)).unwrap();
    assert_eq!(report.dtype, MergeDtype::Bf16);
    let got = merged_logits(&out, case);
    let want = want_logits(case);
    let err = max_rel_err(&got, &want);
    assert!(err < 2e-2, "relative error {err} vs the f32 reference");
    // The greedy choice survives the rounding.
    for (g, w) in got.iter().zip(&want) {
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        assert_eq!(argmax(g), argmax(w));
    }
    // f16 is written on request.
    let out16 = tmp.path().join("out16");
    merge(s(&base), &fixture(case["adapter"].as_str().unwrap()), &out16, &opts(Some(MergeDtype::F16))).unwrap();
    assert_eq!(read_json(&out16.join("config.json"))["torch_dtype"], "float16");
    assert!(max_rel_err(&merged_logits(&out16, case), &want) < 2e-2);
}

/// A GGUF's vocabulary becomes a tokenizer.json (and companions) that tandem
/// loads back into the same tokenizer: same ids, end-of-generation ids and chat template.
#[test]
fn gguf_tokenizer_survives_the_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = fixture("tiny/qwen2/model-f32.gguf");
    let report = merge(s(&base), &fixture("tiny/lora/a-r4-qv"), &out, &opts(None)).unwrap();
    assert_eq!(report.dtype, MergeDtype::F32);
    let be = CpuBackend::new(1).unwrap();
    let src = load_gguf(&be, &base).unwrap();
    let merged = load_hf_dir(&be, &out).unwrap();
    let (a, b) = (src.tokenizer.expect("the fixture GGUF has a vocabulary"), merged.tokenizer.expect("tokenizer.json"));
    for text in ["hello world", "<|im_start|>user\nhi<|im_end|>\n", " a  b\tc"] {
        assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap(), "{text:?}");
    }
    assert_eq!(a.eos_token_ids(), b.eos_token_ids());
    assert_eq!(a.bos_token_id(), b.bos_token_id());
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let render = |t: &tandem::tokenizer::Tokenizer| t.chat_template().unwrap().render(&msgs, None, true, None).unwrap();
    assert_eq!(render(&a), render(&b));
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
}

#[test]
fn bad_inputs_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let qwen = fixture("tiny/qwen2/hf-f32");
    let adapter = fixture("tiny/lora/a-r4-qv");
    // An output directory with something in it is never touched.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let e = merge(s(&qwen), &adapter, &full, &opts(None)).unwrap_err();
    assert!(matches!(e, MergeError::Refused(_)) && e.to_string().contains("not empty"), "{e}");
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine");
    // A file in the way.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = merge(s(&qwen), &adapter, &file, &opts(None)).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    // An adapter for another base: llama2's k/v are 64 wide, the tiny qwen2's 32.
    let e = merge(s(&qwen), &fixture("tiny/train/grad-llama2-q8_0"), &tmp.path().join("o1"), &opts(None)).unwrap_err();
    let chain = format!("{:#}", anyhow::Error::from(e));
    assert!(chain.contains("shape"), "{chain}");
    // Missing inputs.
    let e = merge(s(&qwen), &tmp.path().join("no-adapter"), &tmp.path().join("o2"), &opts(None)).unwrap_err();
    assert!(format!("{:#}", anyhow::Error::from(e)).contains("no LoRA adapter"));
    let e = merge(s(&tmp.path().join("none.gguf")), &adapter, &tmp.path().join("o3"), &opts(None)).unwrap_err();
    assert!(matches!(e, MergeError::Model { .. }), "{e}");
    // A GGUF whose rope scaling config.json cannot express (llama3 rope_freqs).
    let e = merge(s(&fixture("tiny/llama/model-f32.gguf")), &adapter, &tmp.path().join("o4"), &opts(None)).unwrap_err();
    assert!(e.to_string().contains("rope_freqs"), "{e}");
    // An empty output directory is fine: it is replaced by the merged one.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    merge(s(&qwen), &adapter, &empty, &opts(None)).unwrap();
    assert!(empty.join("model.safetensors").is_file());
    assert_only(tmp.path(), &["empty", "file", "full"]);
}

#[test]
fn cli_writes_what_the_library_writes_and_refuses_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("tiny/qwen2/hf-bf16");
    let adapter = fixture("tiny/lora/b-r8-all");
    let lib_out = tmp.path().join("lib");
    merge(s(&base), &adapter, &lib_out, &opts(None)).unwrap();
    let cli_out = tmp.path().join("cli");
    let out =
        tandem().args(["merge", "--model", s(&base), "--lora", s(&adapter), "--out", s(&cli_out)]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("bf16") && stdout.contains("14 adapted"), "{stdout}");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(lib_out.join(f)).unwrap(), std::fs::read(cli_out.join(f)).unwrap(), "{f}");
    }

    let run = |args: &[&str]| {
        let out = tandem().arg("merge").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let fresh = tmp.path().join("fresh");
    let other_base = fixture("tiny/train/grad-q4k");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", s(&base), "--lora", s(&adapter), "--out", s(&cli_out)], "not empty"),
        (vec!["--model", s(&base), "--lora", s(&adapter), "--out", s(&fresh), "--quantize", "q8_0"], "supported: none"),
        (vec!["--model", s(&base), "--lora", "/nonexistent/adapter", "--out", s(&fresh)], "no LoRA adapter"),
        (vec!["--model", "/nonexistent/model.gguf", "--lora", s(&adapter), "--out", s(&fresh)], "model.gguf"),
        (vec!["--model", s(&base), "--lora", s(&other_base), "--out", s(&fresh)], "cannot be loaded"),
    ];
    for (args, needle) in cases {
        let (code, err) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("error:") && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let (code, err) = run(&["--model", s(&base), "--lora", s(&adapter), "--out", s(&fresh), "--dtype", "f8"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("f32, bf16 or f16"), "{err}");
    assert_only(tmp.path(), &["cli", "lib"]);
}

/// A random rank-8 adapter on every projection of the default model, with
/// B large enough to move the logits.
fn random_adapter(dir: &Path, cfg: &tandem::model::ModelConfig) {
    use rand::{Rng, SeedableRng};
    use tandem::train::lora::{HostFactor, LoraSpec};
    let spec = LoraSpec { rank: 8, alpha: 16.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut factors = Vec::new();
    for layer in 0..cfg.num_layers {
        for target in LoraTarget::ALL {
            let (inf, outf) = target.shape(cfg);
            let a = (0..8 * inf).map(|_| rng.gen_range(-1.0..1.0) / (inf as f32).sqrt()).collect();
            let b = (0..outf * 8).map(|_| rng.gen_range(-0.02..0.02)).collect();
            factors.push(HostFactor { layer, target, rank: 8, a, b });
        }
    }
    tandem::train::output::write_adapter(dir, &spec, "Qwen/Qwen2.5-Coder-0.5B-Instruct", &factors).unwrap();
}

/// The default model (Q4_K_M GGUF, untied head, Qwen tokenizer) merged to
/// bf16 computes what tandem computes with the adapter at run time, within
/// bf16 rounding of the dequantised weights. With TANDEM_MERGE_KEEP=DIR the
/// adapter, the merged directory and tandem's logits (logits.json, for
/// `scripts/fixtures/merge_goldens.py --check DIR/merged --against DIR/logits.json`)
/// are kept in DIR.
#[test]
fn default_model_merges() {
    let Some(model) = default_model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("TANDEM_MERGE_KEEP").map(PathBuf::from);
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (adapter_dir, out) = (root.join("adapter"), root.join("merged"));
    let be = CpuBackend::new(2).unwrap();
    let loaded = load_gguf(&be, &model).unwrap();
    let cfg = loaded.model.config.clone();
    random_adapter(&adapter_dir, &cfg);
    let adapter = Arc::new(load_peft_dir("a", &adapter_dir, &cfg, LIMITS).unwrap());
    let tok = loaded.tokenizer.as_ref().unwrap();
    let input = tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", false).unwrap();
    let want = all_logits_with(&be, &loaded.model, &input, Some(&adapter));
    let base = all_logits(&be, &loaded.model, &input);
    drop(loaded);

    let report = merge(s(&model), &adapter_dir, &out, &opts(None)).unwrap();
    assert_eq!((report.dtype, report.adapted), (MergeDtype::Bf16, 7 * cfg.num_layers));
    let merged = load_hf_dir(&be, &out).unwrap();
    let got = all_logits(&be, &merged.model, &input);
    let (d, moved) = (max_abs(&got, &want), max_abs(&base, &want));
    let top = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let agree = got.iter().zip(&want).filter(|(g, w)| top(g) == top(w)).count();
    eprintln!(
        "default model: max |merged bf16 - base+adapter| {d:.4} (the adapter moves logits by {moved:.2}); \
         argmax agrees at {agree}/{} positions",
        got.len()
    );
    assert!(moved > 1.0, "the adapter should matter ({moved})");
    assert!(d < 0.1 * moved && agree * 10 >= got.len() * 9, "{d} / {agree}");
    let mt = merged.tokenizer.unwrap();
    assert_eq!(mt.encode("def f(x):\n\treturn x  # ok", false).unwrap(), {
        let t = load_gguf(&be, &model).unwrap().tokenizer.unwrap();
        t.encode("def f(x):\n\treturn x  # ok", false).unwrap()
    });
    if keep.is_some() {
        let pos: Vec<usize> = (0..input.len()).collect();
        let dump = serde_json::json!({"input_ids": input, "positions": pos, "logits": want});
        std::fs::write(root.join("logits.json"), dump.to_string()).unwrap();
    }
}
