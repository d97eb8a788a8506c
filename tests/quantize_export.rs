//! `tandem quantize`: the checkpoints it writes load in transformers (gptqmodel,
//! bitsandbytes, transformers' GGUF loader; scripts/fixtures/quantize_export.py
//! records their logits and the sha256 of the bytes they read), tandem writes
//! those same bytes today, and tandem serving them computes transformers'
//! logits. Serving the written checkpoint also equals quantising on load.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tandem::backend::cpu::CpuBackend;
use tandem::export::{quantize_checkpoint, ExportFormat};
use tandem::loader::gguf::GgufFile;
use tandem::model::config::RopeScaling;
use tandem::model::{Arch, ModelConfig};
use tandem::quant::ggml::WeightKind;
use tandem::quant::on_load::QuantizeTarget;
use tandem::tokenizer::Tokenizer;

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
    // An HF source writes a .gguf too (its tokenizer as GGUF metadata), but
    // not a model whose sliding window the file could not record.
    let elsewhere = tempfile::tempdir().unwrap();
    let written = elsewhere.path().join("x.gguf");
    assert_eq!(quantize_checkpoint(hf.to_str().unwrap(), ExportFormat::Q4K, &written).unwrap().quantized, 14);
    assert!(written.is_file());
    let out = tmp.path().join("x.gguf");
    assert!(msg(&fixture("tiny/mistral-swa/hf-f32"), "q8_0", &out).contains("sliding window of 5 tokens"));
    assert!(!out.exists());
    // A tokenizer.json GGUF metadata cannot reproduce (or a broken one) is
    // refused, saying what is wrong, and nothing is written.
    for (what, edit, says) in tokenizer_refusals() {
        let src = hf_copy(elsewhere.path(), what, edit);
        let err = msg(&src, "q8_0", &out);
        assert!(err.contains(says), "{what}: {err:?} does not say {says:?}");
        assert!(!out.exists(), "{what}");
    }
    // ignore_merges is harmless when the merges make every token.
    let src = hf_copy(elsewhere.path(), "ignore_merges", with(|tj| tj["model"]["ignore_merges"] = json!(true)));
    assert!(quantize_checkpoint(src.to_str().unwrap(), ExportFormat::Q8_0, &elsewhere.path().join("im.gguf")).is_ok());
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

/// A copy of the tiny Qwen2 HF fixture in `root/name`, its tokenizer.json
/// changed by `edit` (`None`: the file is removed; `Some(text)` replaces it).
fn hf_copy(root: &std::path::Path, name: &str, edit: impl FnOnce(Value) -> Option<String>) -> std::path::PathBuf {
    let src = fixture("tiny/qwen2/hf-f32");
    let dir = root.join(name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    let _ = std::fs::remove_file(dir.join("tokenizer.json"));
    if let Some(text) = edit(tj) {
        std::fs::write(dir.join("tokenizer.json"), text).unwrap();
    }
    dir
}

type Edit = Box<dyn FnOnce(Value) -> Option<String>>;

/// tokenizer.json changed in place by `f`.
fn with(f: impl FnOnce(&mut Value) + 'static) -> Edit {
    Box::new(move |mut tj| {
        f(&mut tj);
        Some(tj.to_string())
    })
}

/// tokenizer.json edits `tandem quantize --format q8_0` must refuse, and what the refusal says.
fn tokenizer_refusals() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        ("no tokenizer.json", Box::new(|_| None), "no tokenizer.json"),
        ("not JSON", Box::new(|_| Some("{\"model\": ".into())), "tokenizer.json"),
        ("no model", with(|tj| drop(tj.as_object_mut().unwrap().remove("model"))), "no \"model\""),
        ("model not an object", with(|tj| tj["model"] = json!("BPE")), "no \"model\""),
        ("Unigram", with(|tj| tj["model"] = json!({"type": "Unigram", "vocab": [["a", 0.0]]})), "model is Unigram"),
        ("WordPiece", with(|tj| tj["model"]["type"] = json!("WordPiece")), "model is WordPiece"),
        ("byte fallback", with(|tj| tj["model"]["byte_fallback"] = json!(true)), "falls back to bytes"),
        ("no merges", with(|tj| drop(tj["model"].as_object_mut().unwrap().remove("merges"))), "no merges list"),
        ("merges not a list", with(|tj| tj["model"]["merges"] = json!("a b")), "no merges list"),
        ("merge of numbers", with(|tj| tj["model"]["merges"][0] = json!([1, 2])), "merge 0"),
        ("merge of one token", with(|tj| tj["model"]["merges"][3] = json!("he")), "merge 3"),
        ("merge of three", with(|tj| tj["model"]["merges"][0] = json!(["a", "b", "c"])), "merge 0"),
        ("merge of an object", with(|tj| tj["model"]["merges"][1] = json!({"a": "b"})), "merge 1"),
        ("unknown merge tokens", with(|tj| tj["model"]["merges"][0] = json!("zz qq")), "tokenizer.json does not load"),
        ("vocab id past the model", with(|tj| tj["model"]["vocab"]["he"] = json!(300)), "past the model's vocab_size"),
        ("vocab id not a number", with(|tj| tj["model"]["vocab"]["he"] = json!("x")), "not a token id"),
        (
            "SentencePiece pre-tokenizer",
            with(|tj| {
                tj["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first"})
            }),
            "match none",
        ),
        ("prefix space", with(|tj| tj["pre_tokenizer"]["add_prefix_space"] = json!(true)), "match none"),
        ("lowercasing", with(|tj| tj["normalizer"] = json!({"type": "Lowercase"})), "match none"),
        ("WordPiece decoder", with(|tj| tj["decoder"] = json!({"type": "WordPiece", "prefix": "##"})), "decoder"),
        (
            "RoBERTa post-processor",
            with(|tj| {
                tj["post_processor"] = json!({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]})
            }),
            "post_processor",
        ),
        ("lstrip added token", with(|tj| tj["added_tokens"][1]["lstrip"] = json!(true)), "sets lstrip"),
        (
            "added token without id",
            with(|tj| drop(tj["added_tokens"][0].as_object_mut().unwrap().remove("id"))),
            "no id",
        ),
        (
            // "co" stays in the vocabulary, but no merge makes it any more.
            "ignore_merges with a token no merge makes",
            with(|tj| {
                tj["model"]["merges"].as_array_mut().unwrap().pop();
                tj["model"]["ignore_merges"] = json!(true);
            }),
            "ignore_merges and 1 vocabulary token(s) (first: \"co\"",
        ),
    ]
}

/// Every single-field corruption of tokenizer.json (each value at the top,
/// in the model, in a merge and in an added token replaced by null, a
/// number, a string, a list or an object) is either refused with an error or
/// written as a .gguf whose tokenizer encodes like the corrupted
/// tokenizer.json: never a panic, never a half-written file.
#[test]
fn any_corrupted_tokenizer_json_is_refused_or_converted_faithfully() {
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny/qwen2/hf-f32/tokenizer.json")).unwrap()).unwrap();
    let mut paths: Vec<Vec<Value>> = Vec::new();
    for k in tok.as_object().unwrap().keys() {
        paths.push(vec![json!(k)]);
    }
    for k in tok["model"].as_object().unwrap().keys() {
        paths.push(vec![json!("model"), json!(k)]);
    }
    paths.push(vec![json!("model"), json!("merges"), json!(0)]);
    paths.push(vec![json!("model"), json!("vocab"), json!("he")]);
    for k in tok["added_tokens"][0].as_object().unwrap().keys() {
        paths.push(vec![json!("added_tokens"), json!(0), json!(k)]);
    }
    let replacements = [json!(null), json!(7), json!("x"), json!([]), json!({}), json!(["a", "b"])];
    let srcs = tempfile::tempdir().unwrap();
    let outs = tempfile::tempdir().unwrap();
    let (mut refused, mut written) = (0, 0);
    for (i, path) in paths.iter().enumerate() {
        for (j, r) in replacements.iter().enumerate() {
            let name = format!("m{i}_{j}");
            let (path2, r2) = (path.clone(), r.clone());
            let src = hf_copy(srcs.path(), &name, move |mut tj| {
                let mut at = &mut tj;
                for p in &path2 {
                    at = match p {
                        Value::String(k) => &mut at[k.as_str()],
                        Value::Number(n) => &mut at[n.as_u64().unwrap() as usize],
                        _ => unreachable!(),
                    };
                }
                *at = r2;
                Some(tj.to_string())
            });
            let out = outs.path().join(format!("{name}.gguf"));
            let result =
                std::panic::catch_unwind(|| quantize_checkpoint(src.to_str().unwrap(), ExportFormat::Q8_0, &out));
            let path_text = serde_json::to_string(path).unwrap();
            match result {
                Err(_) => panic!("{path_text} = {r}: panicked"),
                Ok(Err(e)) => {
                    assert!(!out.exists(), "{path_text} = {r}: refused ({e}) but wrote a file");
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                }
                Ok(Ok(_)) => {
                    let hf = Tokenizer::from_hf_dir(&src).unwrap();
                    let gguf = Tokenizer::from_gguf_vocab(
                        &tandem::tokenizer::GgufVocab::from_gguf(&GgufFile::open(&out).unwrap()).unwrap(),
                    )
                    .unwrap();
                    for text in ["Hello, world! I've 3.14 <|im_start|>x<|im_end|>", "  a\n\tb"] {
                        assert_eq!(
                            gguf.encode(text, true).unwrap(),
                            hf.encode(text, true).unwrap(),
                            "{path_text} = {r}"
                        );
                    }
                    written += 1;
                }
            }
        }
    }
    eprintln!(
        "{} corrupted tokenizer.json files: {refused} refused, {written} written and tokenising alike",
        refused + written
    );
    assert!(refused > 0 && written > 0);
    let left: Vec<_> = std::fs::read_dir(outs.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), written, "temporary files left behind: {left:?}");
}

/// What `load_model_quantized` on the HF source computes, as the .gguf's
/// loader reads it: Mistral is written as llama, Llama 3 rope scaling as
/// per-frequency factors, and GGUF holds one eos id.
fn comparable(c: &ModelConfig) -> ModelConfig {
    ModelConfig {
        arch: if c.arch == Arch::Mistral { Arch::Llama } else { c.arch },
        rope_scaling: RopeScaling::None,
        eos_token_ids: c.eos_token_ids.first().copied().into_iter().collect(),
        ..c.clone()
    }
}

/// A .gguf written from each tiny HF fixture with a tokenizer (f32 and bf16,
/// q8_0 and q4_k) serves the same logits as quantising the HF directory on
/// load (the same codes: permuted llama Q/K rows are put back by the loader),
/// reads back the same config, and its tokenizer, rebuilt from GGUF metadata,
/// encodes like tokenizer.json and keeps the chat template.
#[test]
fn gguf_from_hf_serves_as_quantising_on_load_and_tokenises_as_tokenizer_json() {
    let be = CpuBackend::new(2).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ids16: Vec<u32> = (3..19).collect();
    let chat = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi! caf\u{e9} \u{2713}"},
        {"role": "assistant", "content": "Hello."},
    ]);
    for model in ["qwen2", "llama", "llama2", "mistral"] {
        for dtype in ["hf-f32", "hf-bf16"] {
            let src = fixture(&format!("tiny/{model}/{dtype}"));
            let src = src.to_str().unwrap();
            let hf_tok = Tokenizer::from_hf_dir(std::path::Path::new(src)).unwrap();
            let hf_template = hf_tok.chat_template().unwrap();
            let rendered = hf_template.render(&chat, None, true, None).unwrap();
            let texts = [
                "Hello, world! How are you today?",
                "fn main() {\n\tprintln!(\"{}\", a[0]); // 1000000\n}\n",
                "  two  spaces, I've 'RE 3.14 ...!!!",
                "unicode: caf\u{e9} \u{2713} \u{1f999} \u{65e5}\u{672c}",
                "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>x<|im_end|>",
                &rendered,
            ];
            for (name, target) in [("q8_0", QuantizeTarget::Q8_0), ("q4_k", QuantizeTarget::Q4K)] {
                let out = tmp.path().join(format!("{model}-{dtype}-{name}.gguf"));
                let report = quantize_checkpoint(src, name.parse().unwrap(), &out).unwrap();
                assert_eq!(report.quantized, 14, "{model}/{dtype} {name}");
                let written = tandem::model::load_model(&be, out.to_str().unwrap()).unwrap();
                let on_load = tandem::model::load_model_quantized(&be, src, target).unwrap();
                let (wc, oc) = (&written.model.config, &on_load.model.config);
                assert_eq!(comparable(wc), comparable(oc), "{model}/{dtype} {name}: config read back");
                assert_eq!(wc.rope_table().inv_freq, oc.rope_table().inv_freq, "{model}/{dtype} {name}: rope");
                // The same quantised weights (norms are F32 in the file, whatever the source's dtype).
                let quantised = |m: &tandem::model::LlamaModel<CpuBackend>| {
                    m.stored
                        .iter()
                        .filter(|s| !matches!(s.0, WeightKind::F32 | WeightKind::BF16 | WeightKind::F16))
                        .copied()
                        .collect::<Vec<_>>()
                };
                assert_eq!(quantised(&written.model), quantised(&on_load.model), "{model}/{dtype} {name}");
                let (a, b) = (all_logits(&be, &written.model, &ids16), all_logits(&be, &on_load.model, &ids16));
                assert_eq!(a, b, "{model}/{dtype} {name}: the .gguf and --quantize {target} differ");

                let tok = written.tokenizer.as_ref().unwrap();
                for text in texts {
                    for special in [false, true] {
                        let (g, h) = (tok.encode(text, special).unwrap(), hf_tok.encode(text, special).unwrap());
                        assert_eq!(g, h, "{model}/{dtype} {name}: {text:?}");
                        assert_eq!(tok.decode(&g, false).unwrap(), hf_tok.decode(&h, false).unwrap(), "{text:?}");
                    }
                }
                let template = tok.chat_template().unwrap();
                assert_eq!(template.source(), hf_template.source());
                assert_eq!(template.render(&chat, None, true, None).unwrap(), rendered);
                assert_eq!(tok.bos_token_id(), hf_tok.bos_token_id());
                assert_eq!(tok.eos_token_ids()[0], hf_tok.eos_token_ids()[0]);
                eprintln!(
                    "{model}/{dtype} {name}: {} tensors, logits identical to --quantize {target} ({} values); {} \
                     texts encode as tokenizer.json ({} ids for the chat)",
                    report.tensors,
                    a.len() * a[0].len(),
                    texts.len(),
                    hf_tok.encode(&rendered, true).unwrap().len(),
                );
            }
        }
    }
}

/// gguf-py's name of a tensor type.
fn type_name(k: WeightKind) -> &'static str {
    match k {
        WeightKind::F32 => "F32",
        WeightKind::F16 => "F16",
        WeightKind::BF16 => "BF16",
        WeightKind::Q8_0 => "Q8_0",
        WeightKind::Q5_0 => "Q5_0",
        WeightKind::Q4_0 => "Q4_0",
        WeightKind::Q4K => "Q4_K",
        WeightKind::Q5K => "Q5_K",
        WeightKind::Q6K => "Q6_K",
        other => panic!("{other:?} is not written to a .gguf"),
    }
}

fn sha256_lines(items: &[&str]) -> String {
    Sha256::digest(items.join("\n").as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The .gguf files written from HF directories are the bytes gguf-py and
/// transformers read (scripts/fixtures/quantize_export.py): tandem reads the
/// same metadata back as gguf-py did, serves transformers' logits, and its
/// tokenizer gives the ids tokenizer.json gave (which transformers' GGUF
/// tokenizer reproduced).
#[test]
fn gguf_from_hf_is_what_gguf_py_and_transformers_read() {
    let golden = read_json(&fixture("tiny/quantized/export-golden.json"));
    let ids16 = ids(&golden["input_ids"]);
    let be = CpuBackend::new(2).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let entries = golden["from_hf"].as_object().expect("export-golden.json has from_hf entries");
    assert_eq!(entries.len(), 3);
    for (key, want) in entries {
        let src = fixture(&format!("tiny/{}", want["source"].as_str().unwrap()));
        let out = tmp.path().join(format!("{key}.gguf"));
        quantize_checkpoint(src.to_str().unwrap(), want["format"].as_str().unwrap().parse().unwrap(), &out).unwrap();
        assert_eq!(
            sha256(&out),
            want["sha256"].as_str().unwrap(),
            "{key}: not the bytes gguf-py and transformers read"
        );

        // Metadata and tensors as gguf-py read them.
        let f = GgufFile::open(&out).unwrap();
        let g = &want["gguf"];
        let arch = g["architecture"].as_str().unwrap();
        assert_eq!(f.architecture(), Some(arch));
        assert_eq!(f.get_str("general.name"), g["name"].as_str());
        assert_eq!(f.get_u64("general.file_type"), g["file_type"].as_u64());
        let hparams = g["hparams"].as_object().unwrap();
        let ours: Vec<&String> = f.metadata.keys().filter(|k| k.starts_with(&format!("{arch}."))).collect();
        assert_eq!(ours, hparams.keys().collect::<Vec<_>>(), "{key}: hyperparameter keys");
        for (k, v) in hparams {
            match v.as_u64() {
                Some(n) => assert_eq!(f.get_u64(k), Some(n), "{key}: {k}"),
                None => assert_eq!(f.get_f32(k), v.as_f64().map(|x| x as f32), "{key}: {k}"),
            }
        }
        let t = &g["tokenizer"];
        assert_eq!(f.get_str("tokenizer.ggml.model"), t["model"].as_str());
        assert_eq!(f.get_str("tokenizer.ggml.pre"), t["pre"].as_str());
        let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
        assert_eq!(tokens.len() as u64, t["n_tokens"].as_u64().unwrap());
        assert_eq!(sha256_lines(&tokens), t["tokens_sha256"].as_str().unwrap());
        let merges = f.get_str_array("tokenizer.ggml.merges").unwrap();
        assert_eq!(merges.len() as u64, t["n_merges"].as_u64().unwrap());
        assert_eq!(sha256_lines(&merges), t["merges_sha256"].as_str().unwrap());
        let types = f.get("tokenizer.ggml.token_type").unwrap().as_array().unwrap();
        for (ty, n) in t["token_types"].as_object().unwrap() {
            let ours = types.iter().filter(|v| v.as_u64().map(|x| x.to_string()).as_deref() == Some(ty)).count();
            assert_eq!(ours as u64, n.as_u64().unwrap(), "{key}: tokens of type {ty}");
        }
        for k in ["bos_token_id", "eos_token_id", "padding_token_id"] {
            assert_eq!(f.get_u64(&format!("tokenizer.ggml.{k}")), t[k].as_u64(), "{key}: {k}");
        }
        for k in ["add_bos_token", "add_eos_token"] {
            assert_eq!(f.get(&format!("tokenizer.ggml.{k}")).and_then(|v| v.as_bool()), t[k].as_bool(), "{key}: {k}");
        }
        let template = f.get_str("tokenizer.chat_template").unwrap();
        assert_eq!(sha256_lines(&[template]), t["chat_template_sha256"].as_str().unwrap());
        let tensors = g["tensors"].as_object().unwrap();
        assert_eq!(f.tensors.len(), tensors.len());
        for info in &f.tensors {
            let w = &tensors[&info.name];
            assert_eq!(w[0].as_str().unwrap(), type_name(info.ty), "{key}: {}", info.name);
            assert_eq!(ids(&w[1]).iter().map(|&d| d as u64).collect::<Vec<_>>(), info.dims, "{key}: {}", info.name);
        }

        // transformers' logits on the same file.
        let loaded = tandem::model::load_model(&be, out.to_str().unwrap()).unwrap();
        let got = all_logits(&be, &loaded.model, &ids16);
        let want_logits: Vec<Vec<f32>> = want["logits"].as_array().unwrap().iter().map(floats).collect();
        let err = max_rel_err(&got, &want_logits);
        // The tokenizer.json ids of the golden texts.
        let tok = loaded.tokenizer.as_ref().unwrap();
        let texts = want["tokenizer"]["texts"].as_array().unwrap();
        for (text, want_ids) in texts.iter().zip(want["tokenizer"]["ids"].as_array().unwrap()) {
            assert_eq!(tok.encode(text.as_str().unwrap(), true).unwrap(), ids(want_ids), "{key}: {text}");
        }
        eprintln!(
            "{key}: gguf-py read {arch}, pre {}, {} tokens, {} merges, {} tensors; transformers loaded q_proj as {}, \
             logits max relative error {err:.2e}; {} texts encode to tokenizer.json's ids",
            t["pre"],
            tokens.len(),
            merges.len(),
            f.tensors.len(),
            want["loaded_as"],
            texts.len()
        );
        assert!(err <= TOL, "{key}: logits max relative error {err:e}");
    }
}
