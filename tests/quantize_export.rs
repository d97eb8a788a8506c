//! `tandem quantize`: the checkpoints it writes load in transformers (gptqmodel,
//! bitsandbytes, transformers' GGUF loader; scripts/fixtures/quantize_export.py
//! records their logits and the sha256 of the bytes they read), tandem writes
//! those same bytes today, and tandem serving them computes transformers'
//! logits. Serving the written checkpoint also equals quantising on load.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use tandem::backend::cpu::CpuBackend;
use tandem::export::{quantize_checkpoint, ExportFormat};
use tandem::quant::on_load::QuantizeTarget;

const TOL: f32 = 1e-3;

fn sha256(p: &std::path::Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn written_checkpoints_match_what_transformers_loaded() {
    let golden = read_json(&fixture("tiny/quantized/export-golden.json"));
    let ids16 = ids(&golden["input_ids"]);
    let be = CpuBackend::new(2).unwrap();
    let hf = fixture("tiny/qwen2/hf-f32");
    let gguf = fixture("tiny/qwen2/model-f32.gguf");
    let tmp = tempfile::tempdir().unwrap();
    for (name, src) in [("gptq", &hf), ("nf4", &hf), ("fp4", &hf), ("q8_0", &gguf), ("q4_k", &gguf)] {
        let format: ExportFormat = name.parse().unwrap();
        let out = tmp.path().join(if format.is_gguf() { format!("{name}.gguf") } else { name.to_string() });
        let report = quantize_checkpoint(src.to_str().unwrap(), format, &out).unwrap();
        assert_eq!(report.quantized, 14, "{name}: 2 layers x 7 projections");
        let weights = if format.is_gguf() { out.clone() } else { out.join("model.safetensors") };
        let want = &golden[name];
        assert_eq!(sha256(&weights), want["sha256"].as_str().unwrap(), "{name}: not the bytes transformers read");

        let loaded = tandem::model::load_model(&be, out.to_str().unwrap()).unwrap();
        let got = all_logits(&be, &loaded.model, &ids16);
        let want_logits: Vec<Vec<f32>> = want["logits"].as_array().unwrap().iter().map(floats).collect();
        let err = max_rel_err(&got, &want_logits);
        eprintln!("{name}: loaded by transformers as {}, logits max relative error {err:.2e}", want["loaded_as"]);
        assert!(err <= TOL, "{name}: logits max relative error {err:e}");
    }
}

#[test]
fn serving_a_written_checkpoint_equals_quantising_on_load() {
    let be = CpuBackend::new(2).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ids16: Vec<u32> = (3..19).collect();
    for (name, src, target) in [
        ("nf4", "tiny/qwen2/hf-f32", QuantizeTarget::Nf4),
        ("q4_k", "tiny/qwen2/model-f32.gguf", QuantizeTarget::Q4K),
        ("q8_0", "tiny/qwen2/model-f32.gguf", QuantizeTarget::Q8_0),
    ] {
        let src = fixture(src);
        let format: ExportFormat = name.parse().unwrap();
        let out = tmp.path().join(if format.is_gguf() { format!("{name}.gguf") } else { name.to_string() });
        quantize_checkpoint(src.to_str().unwrap(), format, &out).unwrap();
        let written = tandem::model::load_model(&be, out.to_str().unwrap()).unwrap();
        let on_load = tandem::model::load_model_quantized(&be, src.to_str().unwrap(), target).unwrap();
        let (a, b) = (all_logits(&be, &written.model, &ids16), all_logits(&be, &on_load.model, &ids16));
        assert_eq!(a, b, "{name}: the written checkpoint and --quantize {target} differ");
    }
}

#[test]
fn bad_requests_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = fixture("tiny/qwen2/hf-f32");
    let gguf = fixture("tiny/qwen2/model-f32.gguf");
    let msg = |spec: &std::path::Path, f: &str, out: &std::path::Path| {
        quantize_checkpoint(spec.to_str().unwrap(), f.parse().unwrap(), out).unwrap_err().to_string()
    };
    // A .gguf needs GGUF tokenizer metadata: only GGUF sources.
    let out = tmp.path().join("x.gguf");
    assert!(msg(&hf, "q4_k", &out).contains("convert_hf_to_gguf"));
    assert!(!out.exists());
    // Nothing is overwritten.
    std::fs::write(&out, b"keep").unwrap();
    assert!(msg(&gguf, "q8_0", &out).contains("exists"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("a"), b"").unwrap();
    assert!(msg(&hf, "gptq", &full).contains("not empty"));
    assert!(quantize_checkpoint("random:tiny", ExportFormat::Nf4, &tmp.path().join("r")).is_err());
    assert!("awq".parse::<ExportFormat>().unwrap_err().contains("expected gptq"));
    // Only the pre-existing entries remain: no temporary files left behind.
    let mut left: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, vec!["full", "x.gguf"]);
}
