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

#[test]
fn train_writes_an_adapter_that_generate_serves() {
    let model = fixture("tiny/qwen2/hf-f32");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    let lines: String = (0..6)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"say {i}\"}}, \
                 {{\"role\": \"assistant\", \"content\": \"ok {i} {i}\"}}]}}\n"
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out_dir = dir.path().join("adapter");
    let out = tandem()
        .args(["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--out", out_dir.to_str().unwrap(), "--epochs", "2", "--batch-size", "3", "--rank", "4"])
        .args(["--lr", "1e-2", "--save-every", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    // Without a terminal every step is a line.
    assert!(stderr.contains("step 4/4:") && stderr.contains("loss"), "{stderr}");
    assert!(stderr.contains("checkpoint"), "{stderr}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "training_metadata.json"]
    {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let gen = tandem()
        .args(["generate", "--model", model.to_str().unwrap(), "--adapter", out_dir.to_str().unwrap()])
        .args(["--prompt", "say 1", "--max-tokens", "4"])
        .output()
        .unwrap();
    assert!(gen.status.success(), "stderr: {}", String::from_utf8_lossy(&gen.stderr));
}

#[test]
fn train_reports_every_bad_line_and_trains_nothing() {
    let model = fixture("tiny/qwen2/hf-f32");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\
         not json\n\
         {\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let out_dir = dir.path().join("adapter");
    let out = tandem()
        .args(["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 problems"), "{stderr}");
    for line in ["line 2:", "line 3:", "line 4:"] {
        assert!(stderr.contains(line), "{line} not reported: {stderr}");
    }
    assert!(!stderr.contains("line 1:"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out_dir.exists(), "nothing is written when the data is bad");
}
