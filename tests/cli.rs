//! The `tandem` binary end to end: `generate` prints exactly the generated text,
//! `bench` prints its table, and bad input is a clear error (exit 1), never a panic.

mod common;

use std::process::Command;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::model::load_hf_dir;

fn tandem() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.env("TANDEM_THREADS", "2");
    c
}

#[test]
fn generate_prints_only_the_generated_text() {
    let dir = fixture("tiny/qwen2/hf-f32");
    let be = CpuBackend::new(2).unwrap();
    let loaded = load_hf_dir(&be, &dir).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let golden = read_json(&fixture("tiny/qwen2/golden.json"));
    let prompt = tok.decode(&ids(&golden["greedy"]["prompt"]), false).unwrap();
    // What the library generates for that text is what the CLI must print.
    let mut e = engine(loaded.model, &engine_config(16, 256, 64));
    let want = e.generate(vec![greedy(&tok.encode(&prompt, true).unwrap(), 12)]);
    let want_text = tok.decode(&token_ids(&want[0].0), true).unwrap();
    assert!(!want_text.is_empty());

    let out = tandem()
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt", &prompt, "--max-tokens", "12", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{want_text}\n"));
}

#[test]
fn bench_prints_a_table() {
    let dir = fixture("tiny/llama/hf-f32");
    let out = tandem()
        .args([
            "bench",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-len",
            "32",
            "--decode-steps",
            "4",
            "--batch",
            "1,4",
        ])
        .args(["--reps", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for row in ["| prefill pp32 |", "| decode batch 1 |", "| decode batch 4 |"] {
        assert!(text.contains(row), "missing {row} in:\n{text}");
    }
}

#[test]
fn bad_models_and_prompts_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("broken.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), tmp.path().join("missing.gguf").display().to_string()], "missing.gguf"),
        (vec!["--model".into(), corrupt.display().to_string()], "GGUF"),
        (vec!["--model".into(), empty.path().display().to_string()], "not a model"),
    ];
    let gguf = fixture("tiny/qwen2/model-f32.gguf").display().to_string();
    let cases = cases
        .into_iter()
        .map(|(mut a, n)| {
            a.extend(["--prompt".to_string(), "hi".to_string()]);
            (a, n)
        })
        .chain([(vec!["--model".to_string(), gguf, "--prompt".into(), "".into()], "empty")]);
    for (args, needle) in cases {
        let out = tandem().arg("generate").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("error:") && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
