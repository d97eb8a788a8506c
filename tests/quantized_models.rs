//! GPTQ, AWQ and bitsandbytes checkpoints made by the real packers
//! (scripts/fixtures/quantized_models.py -> tests/fixtures/tiny/quantized/):
//! dequantised weights bit-equal to each packer's own dequantiser, logits within
//! 1e-3 of transformers on those weights, greedy tokens equal, LoRA on each base
//! equal to peft's; and malformed checkpoints refused with the tensor's name.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::backend::HostWeight;
use tandem::loader::safetensors::{SafetensorsModel, StDtype};
use tandem::lora::{load_peft_dir, LoraDtype, LoraOptions};
use tandem::model::{hf_quantization, load_hf_dir, ModelConfig, TensorName, WeightSource};
use tandem::quant::ggml::{dequantize, WeightKind};
use tandem::quant::on_load::QuantizeTarget;

const FORMATS: [(&str, &[WeightKind]); 7] = [
    ("gptq-g32-sym-v1", &[WeightKind::Q4_0]),
    ("gptq-g64-asym-act-v1", &[WeightKind::Int4G64]),
    ("gptq-g32-asym-v2", &[WeightKind::Int4G32]),
    ("gptq-8bit-gall-sym", &[WeightKind::Q8_0]),
    ("awq-g32", &[WeightKind::Int4G32]),
    ("bnb-nf4-dq", &[WeightKind::Nf4]),
    ("bnb-fp4", &[WeightKind::Fp4]),
];
const TOL: f32 = 1e-3;

fn dir(name: &str) -> PathBuf {
    fixture(&format!("tiny/quantized/{name}"))
}

fn source(dir: &Path) -> (WeightSource, ModelConfig) {
    let json = read_json(&dir.join("config.json"));
    let cfg = ModelConfig::from_hf_json(&json).unwrap();
    let quant = hf_quantization(dir, &json).unwrap().expect("a quantised checkpoint");
    (WeightSource::QuantizedSafetensors(Arc::new(SafetensorsModel::open_dir(dir).unwrap()), quant), cfg)
}

/// The weight's values in natural input order, `[rows, cols]`, spelled out
/// here independently of `HostWeight::dequantize_natural` (checked equal).
fn natural(w: &HostWeight) -> Vec<f32> {
    let mut stored = vec![0f32; w.rows * w.cols];
    dequantize(w.kind, w.bytes.as_slice(), &mut stored).unwrap();
    let out = match &w.input_perm {
        None => stored,
        Some(perm) => {
            let mut out = vec![0f32; stored.len()];
            for r in 0..w.rows {
                for (j, &k) in perm.iter().enumerate() {
                    out[r * w.cols + k as usize] = stored[r * w.cols + j];
                }
            }
            out
        }
    };
    let lib = w.dequantize_natural().unwrap();
    assert!(out.iter().zip(&lib).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: dequantize_natural differs", w.name);
    out
}

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s += ": ";
        s += &x.to_string();
        src = x.source();
    }
    s
}

fn round_to(dtype: &str, v: f32) -> u32 {
    match dtype {
        "float16" => u32::from(half::f16::from_f32(v).to_bits()),
        "bfloat16" => u32::from(half::bf16::from_f32(v).to_bits()),
        "float32" => v.to_bits(),
        other => panic!("dtype {other}"),
    }
}

#[test]
fn dequantised_weights_equal_each_packers_dequantiser() {
    for (name, kinds) in FORMATS {
        let d = dir(name);
        let golden = read_json(&d.join("golden.json"));
        let (src, cfg) = source(&d);
        let mut checked = 0;
        for (tensor, want) in golden["dequant"].as_object().unwrap() {
            let layer: usize = tensor.split('.').nth(2).unwrap().parse().unwrap();
            let tname = if tensor.contains("q_proj") { TensorName::Q(layer) } else { TensorName::Down(layer) };
            let w = src.require(tname, &cfg).unwrap();
            assert!(kinds.contains(&w.kind), "{name} {tensor}: kind {:?}", w.kind);
            let dtype = want["dtype"].as_str().unwrap();
            let want = floats(&want["values"]);
            let got = natural(&w);
            assert_eq!(got.len(), want.len(), "{name} {tensor}");
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert_eq!(round_to(dtype, *g), round_to(dtype, *r), "{name} {tensor}[{i}]: {g} vs {r} ({dtype})");
            }
            checked += 1;
        }
        assert_eq!(checked, 2, "{name}");
        if name.contains("act") {
            assert!(src.require(TensorName::Down(0), &cfg).unwrap().input_perm.is_some(), "{name}: act-order kept");
        }
    }
}

fn logits_rows(golden: &serde_json::Value, key: &str) -> Vec<Vec<f32>> {
    golden[key].as_array().unwrap().iter().map(floats).collect()
}

#[test]
fn logits_greedy_and_lora_match_the_reference_stack() {
    let be = CpuBackend::new(2).unwrap();
    for (name, _) in FORMATS {
        let d = dir(name);
        let golden = read_json(&d.join("golden.json"));
        let loaded = load_hf_dir(&be, &d).unwrap_or_else(|e| panic!("{name}: {}", chain(&e)));
        let method = match name.split('-').next().unwrap() {
            "bnb" => "bitsandbytes",
            m => m,
        };
        let described = loaded.quantization.clone().unwrap_or_default();
        assert!(described.starts_with(method), "{name}: reported as {described:?}");
        let m = loaded.model;
        let ids16 = ids(&golden["input_ids"]);
        let err = max_rel_err(&all_logits(&be, &m, &ids16), &logits_rows(&golden, "logits"));
        eprintln!("{name}: logits max relative error {err:.2e}");
        assert!(err <= TOL, "{name}: logits max relative error {err:e}");

        let mut seq = ids(&golden["greedy_input_ids"]);
        let want = ids(&golden["greedy"]);
        for _ in 0..want.len() {
            let last = all_logits(&be, &m, &seq).pop().unwrap();
            let best = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a))).unwrap();
            seq.push(best as u32);
        }
        assert_eq!(&seq[seq.len() - want.len()..], &want[..], "{name}: greedy tokens");

        let adapter_dir = fixture(&format!("tiny/lora/{}", golden["lora_adapter"].as_str().unwrap()));
        let opts = LoraOptions { max_rank: 64, dtype: LoraDtype::F32 };
        let adapter = load_peft_dir("a", &adapter_dir, &m.config, opts).unwrap();
        let got = all_logits_with(&be, &m, &ids16, Some(&adapter));
        let err = max_rel_err(&got, &logits_rows(&golden, "lora_logits"));
        eprintln!("{name}: LoRA logits max relative error {err:.2e}");
        assert!(err <= TOL, "{name}: LoRA logits max relative error {err:e}");
    }
}

/// `tandem merge` and `tandem quantize` read a quantised base as the server
/// loads it (act-order put back in natural order): the merged model computes
/// what peft computes on the quantised base with the adapter, and NF4 written
/// from it equals `--quantize nf4` on loading it.
#[test]
fn merge_and_quantize_read_quantised_bases_in_natural_order() {
    use tandem::export::{quantize_checkpoint, ExportFormat};
    use tandem::merge::{merge, MergeDtype, MergeOptions};
    let be = CpuBackend::new(2).unwrap();
    for (name, _) in FORMATS {
        let d = dir(name);
        let golden = read_json(&d.join("golden.json"));
        let adapter_dir = fixture(&format!("tiny/lora/{}", golden["lora_adapter"].as_str().unwrap()));
        let tmp = tempfile::tempdir().unwrap();

        let merged = tmp.path().join("merged");
        let opts = MergeOptions { dtype: Some(MergeDtype::F32) };
        merge(d.to_str().unwrap(), &adapter_dir, &merged, &opts).unwrap_or_else(|e| panic!("{name}: {}", chain(&e)));
        let m = load_hf_dir(&be, &merged).unwrap().model;
        let ids16 = ids(&golden["input_ids"]);
        let err = max_rel_err(&all_logits(&be, &m, &ids16), &logits_rows(&golden, "lora_logits"));
        eprintln!("{name}: merged logits vs peft's unmerged LoRA, max relative error {err:.2e}");
        assert!(err <= TOL, "{name}: merged logits max relative error {err:e}");

        let nf4 = tmp.path().join("nf4");
        quantize_checkpoint(d.to_str().unwrap(), ExportFormat::Nf4, &nf4)
            .unwrap_or_else(|e| panic!("{name}: {}", chain(&e)));
        let (written, cfg) = source(&nf4);
        let on_load = WeightSource::Requantized(Box::new(source(&d).0), QuantizeTarget::Nf4);
        for t in [TensorName::Q(0), TensorName::Down(cfg.num_layers - 1), TensorName::O(1)] {
            let (a, b) = (written.require(t, &cfg).unwrap(), on_load.require(t, &cfg).unwrap());
            assert_eq!((a.kind, b.kind), (WeightKind::Nf4, WeightKind::Nf4), "{name} {t:?}");
            let (a, b) = (a.dequantize_natural().unwrap(), b.dequantize_natural().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} {t:?}: written NF4 differs");
        }
    }
}

/// `--quantize` on an act-order base quantises the weight's natural rows, so
/// the result multiplies inputs in their natural order.
#[test]
fn requantising_an_act_order_base_keeps_its_inputs_in_place() {
    let d = dir("gptq-g64-asym-act-v1");
    let (src, cfg) = source(&d);
    let w = src.require(TensorName::Down(0), &cfg).unwrap();
    assert!(w.input_perm.is_some(), "the fixture is act-order");
    let natural_vals = natural(&w);
    let requantized = WeightSource::Requantized(Box::new(source(&d).0), QuantizeTarget::Int8);
    let q = requantized.require(TensorName::Down(0), &cfg).unwrap();
    assert!(q.input_perm.is_none());
    let got = q.dequantize_natural().unwrap();
    // int8 with a per-group absmax scale: within half a step of each value.
    let max = natural_vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&natural_vals).map(|(g, v)| (g - v).abs()).fold(0f32, f32::max);
    assert!(worst <= max / 127.0, "requantised act-order weight is off by {worst} (max value {max})");
}

// ---- malformed checkpoints ----

/// A checkpoint's tensors as (name, dtype, shape, bytes), to edit.
type Tensors = Vec<(String, StDtype, Vec<usize>, Vec<u8>)>;

/// A copy of fixture `name` with its config's quantization_config edited and
/// tensors replaced or removed.
fn broken(
    name: &str,
    edit_config: impl Fn(&mut serde_json::Value),
    edit_tensors: impl Fn(&mut Tensors),
) -> tempfile::TempDir {
    let src = dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = read_json(&src.join("config.json"));
    edit_config(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let st = SafetensorsModel::open_dir(&src).unwrap();
    let mut tensors: Tensors = st
        .names()
        .into_iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            (n.to_string(), t.dtype, t.shape.to_vec(), t.data.to_vec())
        })
        .collect();
    edit_tensors(&mut tensors);
    let refs: Vec<(&str, StDtype, &[usize], &[u8])> =
        tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    std::fs::write(tmp.path().join("model.safetensors"), tandem::loader::safetensors::serialize(&refs)).unwrap();
    tmp
}

fn set_quant(key: &'static str, v: serde_json::Value) -> impl Fn(&mut serde_json::Value) {
    move |c| c["quantization_config"][key] = v.clone()
}

fn keep(_: &mut serde_json::Value) {}

fn drop_tensor(suffix: &'static str) -> impl Fn(&mut Tensors) {
    move |t| t.retain(|(n, ..)| !n.ends_with(suffix))
}

fn reshape(suffix: &'static str, f: fn(&mut Vec<usize>, &mut Vec<u8>)) -> impl Fn(&mut Tensors) {
    move |t| {
        for (n, _, shape, bytes) in t.iter_mut() {
            if n.ends_with(suffix) {
                f(shape, bytes);
            }
        }
    }
}

fn retype(suffix: &'static str, dtype: StDtype) -> impl Fn(&mut Tensors) {
    move |t| {
        for (n, d, shape, bytes) in t.iter_mut() {
            if n.ends_with(suffix) {
                *d = dtype;
                let elems: usize = shape.iter().product();
                bytes.resize(elems * dtype.size_bytes(), 0);
            }
        }
    }
}

fn no_tensors(_: &mut Tensors) {}

#[test]
fn malformed_checkpoints_are_refused_with_a_clear_error() {
    type Case = (&'static str, Box<dyn Fn(&mut serde_json::Value)>, Box<dyn Fn(&mut Tensors)>, &'static str);
    let q0 = "layers.0.self_attn.q_proj";
    let cases: Vec<Case> = vec![
        ("gptq-g32-sym-v1", Box::new(set_quant("bits", 3.into())), Box::new(no_tensors), "bits = 3"),
        ("gptq-g32-sym-v1", Box::new(set_quant("group_size", 48.into())), Box::new(no_tensors), "group_size = 48"),
        ("gptq-g32-sym-v1", Box::new(set_quant("checkpoint_format", "marlin".into())), Box::new(no_tensors), "marlin"),
        ("gptq-g32-sym-v1", Box::new(set_quant("surprise", true.into())), Box::new(no_tensors), "surprise = true"),
        ("gptq-g32-sym-v1", Box::new(set_quant("quant_method", "exl2".into())), Box::new(no_tensors), "exl2"),
        // The config says group 64 but the scales hold group-32 rows.
        ("gptq-g32-sym-v1", Box::new(set_quant("group_size", 64.into())), Box::new(no_tensors), "scales has shape"),
        ("gptq-g32-sym-v1", Box::new(keep), Box::new(drop_tensor("q_proj.qzeros")), "qzeros is missing"),
        ("gptq-g32-sym-v1", Box::new(keep), Box::new(drop_tensor("q_proj.scales")), "scales is missing"),
        ("gptq-g32-sym-v1", Box::new(keep), Box::new(retype("q_proj.qweight", StDtype::F32)), "qweight has dtype"),
        (
            "gptq-g32-sym-v1",
            Box::new(keep),
            Box::new(reshape("q_proj.g_idx", |s, b| {
                s[0] -= 8;
                b.truncate(s[0] * 4)
            })),
            "g_idx has",
        ),
        (
            "gptq-g32-sym-v1",
            Box::new(keep),
            Box::new(reshape("q_proj.g_idx", |_, b| b[0] = 99)),
            "g_idx holds group 99",
        ),
        (
            "gptq-g32-sym-v1",
            Box::new(keep),
            Box::new(reshape("q_proj.qweight", |s, b| {
                s[0] -= 1;
                b.truncate(s[0] * s[1] * 4)
            })),
            "g_idx has",
        ),
        ("gptq-g64-asym-act-v1", Box::new(keep), Box::new(drop_tensor("q_proj.g_idx")), "desc_act"),
        (
            "gptq-g32-sym-v1",
            Box::new(keep),
            Box::new(reshape("q_proj.qzeros", |s, b| {
                s[1] += 1;
                b.resize(s[0] * s[1] * 4, 0)
            })),
            "qzeros has shape",
        ),
        ("awq-g32", Box::new(set_quant("version", "gemv".into())), Box::new(no_tensors), "gemv"),
        ("awq-g32", Box::new(set_quant("bits", 8.into())), Box::new(no_tensors), "bits = 8"),
        ("awq-g32", Box::new(set_quant("group_size", 64.into())), Box::new(no_tensors), "do not match"),
        (
            "awq-g32",
            Box::new(keep),
            Box::new(reshape("q_proj.scales", |s, b| {
                s[0] -= 1;
                b.truncate(s[0] * s[1] * 2)
            })),
            "do not match",
        ),
        ("awq-g32", Box::new(keep), Box::new(drop_tensor("q_proj.qweight")), "q_proj.weight' is missing"),
        ("bnb-nf4-dq", Box::new(set_quant("load_in_8bit", true.into())), Box::new(no_tensors), "load_in_8bit"),
        (
            "bnb-nf4-dq",
            Box::new(set_quant("bnb_4bit_quant_type", "fp4".into())),
            Box::new(no_tensors),
            "bitsandbytes__fp4 is missing",
        ),
        ("bnb-nf4-dq", Box::new(keep), Box::new(drop_tensor("q_proj.weight.nested_absmax")), "nested_absmax"),
        (
            "bnb-nf4-dq",
            Box::new(keep),
            Box::new(reshape("q_proj.weight.absmax", |s, b| {
                s[0] -= 1;
                b.truncate(s[0])
            })),
            "absmax values",
        ),
        (
            "bnb-nf4-dq",
            Box::new(keep),
            Box::new(reshape("q_proj.weight", |s, b| {
                s[0] -= 1;
                b.truncate(s[0])
            })),
            "packed bytes",
        ),
        ("bnb-nf4-dq", Box::new(keep), Box::new(reshape("q_proj.weight.quant_map", |_, b| b[0] ^= 1)), "quant_map"),
        (
            "bnb-nf4-dq",
            Box::new(keep),
            Box::new(reshape("quant_state.bitsandbytes__nf4", |s, b| {
                b.truncate(5);
                s[0] = 5
            })),
            "JSON",
        ),
        ("bnb-fp4", Box::new(keep), Box::new(retype("q_proj.weight.absmax", StDtype::F16)), "absmax has dtype"),
    ];
    assert!(cases.len() >= 20);
    let be = CpuBackend::new(1).unwrap();
    for (i, (name, cfg, tensors, want)) in cases.iter().enumerate() {
        let tmp = broken(name, cfg, tensors);
        let err = match load_hf_dir(&be, tmp.path()) {
            Ok(_) => panic!("case {i} ({name}, want {want}): loaded"),
            Err(e) => chain(&e),
        };
        assert!(err.contains(want), "case {i} ({name}): {err:?} lacks {want:?}");
        if !want.contains(" = ") && !["marlin", "exl2", "gemv", "load_in_8bit", "desc_act"].contains(want) {
            assert!(err.contains(q0) || err.contains("q_proj"), "case {i}: error names the tensor: {err}");
        }
    }
}

// ---- --quantize on load ----

fn requantized(dir: &Path, target: QuantizeTarget) -> (WeightSource, ModelConfig) {
    let json = read_json(&dir.join("config.json"));
    let cfg = ModelConfig::from_hf_json(&json).unwrap();
    let st = WeightSource::Safetensors(Arc::new(SafetensorsModel::open_dir(dir).unwrap()));
    (WeightSource::Requantized(Box::new(st), target), cfg)
}

const PROJECTIONS: [fn(usize) -> TensorName; 7] =
    [TensorName::Q, TensorName::K, TensorName::V, TensorName::O, TensorName::Gate, TensorName::Up, TensorName::Down];

#[test]
fn quantize_fp4_and_nf4_on_load_write_bitsandbytes_bytes() {
    let base = fixture("tiny/qwen2/hf-f32");
    // FP4 without double quantisation: every byte (absmax and nibbles) as bitsandbytes wrote it.
    let (ours, cfg) = requantized(&base, QuantizeTarget::Fp4);
    let (theirs, _) = source(&dir("bnb-fp4"));
    for layer in 0..cfg.num_layers {
        for t in PROJECTIONS {
            let (a, b) = (ours.require(t(layer), &cfg).unwrap(), theirs.require(t(layer), &cfg).unwrap());
            assert_eq!((a.kind, a.rows, a.cols), (WeightKind::Fp4, b.rows, b.cols));
            let (x, y) = (a.bytes.as_slice(), b.bytes.as_slice());
            let first = x.iter().zip(y).position(|(p, q)| p != q);
            assert!(first.is_none(), "fp4 {:?}: first difference at byte {first:?} of {}", t(layer), x.len());
        }
    }
    // NF4: the nibbles equal bitsandbytes' (its file's absmax is double-quantised, ours exact).
    let (ours, _) = requantized(&base, QuantizeTarget::Nf4);
    let (theirs, _) = source(&dir("bnb-nf4-dq"));
    let (a, b) = (ours.require(TensorName::Down(1), &cfg).unwrap(), theirs.require(TensorName::Down(1), &cfg).unwrap());
    let nibbles =
        |w: &HostWeight| -> Vec<u8> { w.bytes.as_slice().chunks_exact(36).flat_map(|c| c[4..].to_vec()).collect() };
    assert_eq!(nibbles(&a), nibbles(&b));

    let be = CpuBackend::new(2).unwrap();
    let m = tandem::model::load_model_quantized(&be, base.to_str().unwrap(), QuantizeTarget::Fp4).unwrap();
    assert_eq!(m.quantization.as_deref(), Some("--quantize fp4"));
    let golden = read_json(&dir("bnb-fp4").join("golden.json"));
    let err = max_rel_err(&all_logits(&be, &m.model, &ids(&golden["input_ids"])), &logits_rows(&golden, "logits"));
    eprintln!("--quantize fp4 vs bitsandbytes: logits max relative error {err:.2e}");
    assert!(err <= TOL, "{err:e}");
}

#[test]
fn quantize_q8_0_on_load_writes_gguf_py_blocks() {
    // tests/fixtures/tiny/llama2/model-q8_0.gguf was quantised by gguf-py from these weights.
    let (ours, cfg) = requantized(&fixture("tiny/llama2/hf-f32"), QuantizeTarget::Q8_0);
    let gguf = tandem::loader::gguf::GgufFile::open(&fixture("tiny/llama2/model-q8_0.gguf")).unwrap();
    let theirs = WeightSource::Gguf(Arc::new(gguf));
    for layer in 0..cfg.num_layers {
        for t in PROJECTIONS {
            let (a, b) = (ours.require(t(layer), &cfg).unwrap(), theirs.require(t(layer), &cfg).unwrap());
            assert_eq!((a.kind, b.kind), (WeightKind::Q8_0, WeightKind::Q8_0));
            assert!(a.bytes.as_slice() == b.bytes.as_slice(), "q8_0 {:?}", t(layer));
        }
    }
}

#[test]
fn quantize_int4_and_int8_on_load_stay_near_the_float_model() {
    let base = fixture("tiny/qwen2/hf-f32");
    let golden = read_json(&fixture("tiny/qwen2/golden.json"));
    let case = &golden["cases"][0];
    let want: Vec<Vec<f32>> = case["logits"].as_array().unwrap().iter().map(floats).collect();
    let be = CpuBackend::new(2).unwrap();
    for (target, kind, tol) in [
        (QuantizeTarget::Q8_0, WeightKind::Q8_0, 0.05),
        (QuantizeTarget::Int8, WeightKind::Q8_0, 0.05),
        (QuantizeTarget::Int4, WeightKind::Int4G64, 0.5),
    ] {
        let (src, cfg) = requantized(&base, target);
        assert_eq!(src.require(TensorName::Up(0), &cfg).unwrap().kind, kind);
        // Embeddings and norms are left alone.
        assert_eq!(src.require(TensorName::Embed, &cfg).unwrap().kind, WeightKind::F32);
        let m = tandem::model::load_model_quantized(&be, base.to_str().unwrap(), target).unwrap();
        let err = max_rel_err(&all_logits(&be, &m.model, &ids(&case["input_ids"])), &want);
        eprintln!("--quantize {target}: logits max relative error vs f32 {err:.2e}");
        assert!(err <= tol, "{target}: {err:e}");
    }
    // A quantised model is requantised: dequantised, then quantised again.
    let gguf = fixture("tiny/llama2/model-q8_0.gguf");
    let m = tandem::model::load_model_quantized(&be, gguf.to_str().unwrap(), QuantizeTarget::Nf4).unwrap();
    assert!(m.model.stored.iter().any(|s| s.0 == WeightKind::Nf4));
    assert_eq!(m.weights_info().quantization, "--quantize nf4");
}
