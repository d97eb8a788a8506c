//! The trainer against PyTorch + peft (tests/fixtures/tiny/train, made by
//! scripts/fixtures/train_goldens.py): LoRA gradients through a dense f32, a
//! GGUF Q8_0 and a GGUF Q4_K base; one AdamW step with clipping and warmup;
//! 20 training steps' loss curve.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tandem::backend::cpu::CpuBackend;
use tandem::backend::Backend;
use tandem::loader::safetensors::SafetensorsFile;
use tandem::model::{load_model, LlamaModel};
use tandem::train::lora::{HostFactor, Param, TrainableLora};
use tandem::train::memory::{MemoryPlan, DEFAULT_LOGITS_CHUNK_BYTES};
use tandem::train::optim::{adamw_step, optimizer_step, OptimConfig, Schedule};
use tandem::train::step::{run_micro_batch, MicroBatch, TrainKv};

use common::{fixture, read_json, repo};

fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.tensor(n).unwrap();
            let v = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (n.to_string(), v)
        })
        .collect()
}

fn key(f: &HostFactor, b: bool) -> String {
    format!(
        "base_model.model.model.layers.{}.{}.{}.lora_{}.weight",
        f.layer,
        f.target.parent(),
        f.target.module(),
        if b { "B" } else { "A" }
    )
}

/// ‖got − want‖₂ / ‖want‖₂.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// (tokens, targets) of a sequence given HF labels (-100 = not trained).
fn example(input_ids: &Value, labels: &Value) -> (Vec<u32>, Vec<bool>) {
    let toks: Vec<u32> = ids(input_ids).into_iter().map(|t| t as u32).collect();
    let targets = ids(labels).into_iter().map(|l| l != -100).collect();
    (toks, targets)
}

fn micro_batch(seqs: &[(Vec<u32>, Vec<bool>)]) -> MicroBatch {
    MicroBatch::new(seqs.iter().map(|(t, m)| (t.as_slice(), m.as_slice())))
}

fn load(be: &CpuBackend, base: &str) -> LlamaModel<CpuBackend> {
    load_model(be, repo().join(base).to_str().unwrap()).unwrap().model
}

/// Also through a backend serving with int8 activations (the default): a
/// training step runs its matmuls exactly, so its gradients are the same bits.
#[test]
fn lora_gradients_match_peft_on_f32_q8_0_and_q4_k_bases() {
    let be = CpuBackend::new(2).unwrap();
    let serving = CpuBackend::new(2).unwrap().with_activations(tandem::backend::cpu::Activations::Int8);
    for case in ["grad-qwen2-f32", "grad-llama2-q8_0", "grad-q4k"] {
        let dir = fixture(&format!("tiny/train/{case}"));
        let c = read_json(&dir.join("case.json"));
        let model = load(&be, c["base"].as_str().unwrap());
        let seqs: Vec<_> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["labels"].as_array().unwrap())
            .map(|(i, l)| example(i, l))
            .collect();
        let mb = micro_batch(&seqs);
        let n_items = c["num_items"].as_u64().unwrap() as usize;
        assert_eq!(mb.num_targets(), n_items);
        let want = tensors(&dir.join("grads.safetensors"));
        // Every layer kept, and every layer recomputed from its checkpoint: the same gradients.
        let tokens = mb.tokens.len();
        let keep_all = MemoryPlan::new(&model.config, tokens, 3, 0, None, DEFAULT_LOGITS_CHUNK_BYTES).unwrap();
        let recompute = MemoryPlan { saved_layers: 0, head_rows: 2, ..keep_all };
        let mut first: Option<Vec<HostFactor>> = None;
        for (plan, be) in [(keep_all, &be), (recompute, &be), (keep_all, &serving)] {
            let mut lora = TrainableLora::from_peft_dir(be, &model.config, &dir, 0.0).unwrap();
            let mut kv = TrainKv::default();
            let sums =
                run_micro_batch(be, &model, &mut lora, &mb, Some(1.0 / n_items as f32), &plan, &mut kv, 1).unwrap();
            let loss = sums.loss / n_items as f64;
            let want_loss = c["loss"].as_f64().unwrap();
            assert!((loss - want_loss).abs() < 1e-5 * want_loss, "{case}: loss {loss} vs {want_loss}");
            let grads = lora.download_grads(be).unwrap();
            assert_eq!(grads.len(), 14, "{case}: 7 targets x 2 layers");
            for g in &grads {
                for (is_b, got) in [(false, &g.a), (true, &g.b)] {
                    let k = key(g, is_b);
                    let w = want.get(&k).unwrap_or_else(|| panic!("{case}: no golden for {k}"));
                    let err = rel_l2(got, w);
                    assert!(err < 1e-4, "{case} {k}: relative L2 error {err:.2e}");
                }
            }
            match &first {
                None => first = Some(grads),
                Some(f) => assert_eq!(f, &grads, "{case}: recomputing layers or int8 serving changed the gradients"),
            }
        }
    }
}

#[test]
fn loss_masked_tokens_carry_no_gradient() {
    // The gradient depends on the labels of trained tokens only: changing a
    // masked token's label (the token itself stays, it is input) changes
    // nothing, changing a trained one does.
    let be = CpuBackend::new(2).unwrap();
    let dir = fixture("tiny/train/grad-qwen2-f32");
    let c = read_json(&dir.join("case.json"));
    let model = load(&be, c["base"].as_str().unwrap());
    let (toks, targets) = example(&c["input_ids"][0], &c["labels"][0]);
    let grads_for = |targets: &[bool]| {
        let mb = MicroBatch::new([(toks.as_slice(), targets)]);
        let plan = MemoryPlan::new(&model.config, toks.len(), 1, 0, None, DEFAULT_LOGITS_CHUNK_BYTES).unwrap();
        let mut lora = TrainableLora::from_peft_dir(&be, &model.config, &dir, 0.0).unwrap();
        run_micro_batch(&be, &model, &mut lora, &mb, Some(1.0), &plan, &mut TrainKv::default(), 1).unwrap();
        lora.download_grads(&be).unwrap()
    };
    let base = grads_for(&targets);
    // Masking position 1 (not trained before) is the same mask: identical.
    let mut same = targets.clone();
    same[1] = false;
    assert_eq!(grads_for(&same), base);
    // Only the first trained position: a different, non-zero gradient.
    let first = targets.iter().position(|&t| t).unwrap();
    let mut one = vec![false; toks.len()];
    one[first] = true;
    let g1 = grads_for(&one);
    assert_ne!(g1, base);
    assert!(g1.iter().any(|f| f.b.iter().any(|&v| v != 0.0)));
    // Nothing trained: every gradient is exactly zero.
    let none = grads_for(&vec![false; toks.len()]);
    assert!(none.iter().all(|f| f.a.iter().chain(&f.b).all(|&v| v == 0.0)));
}

#[test]
fn adamw_with_clipping_and_warmup_matches_torch() {
    let be = CpuBackend::new(2).unwrap();
    let dir = fixture("tiny/train/adamw");
    let j = read_json(&dir.join("adamw.json"));
    let t = tensors(&dir.join("adamw.safetensors"));
    let shapes: Vec<(usize, usize)> = j["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize))
        .collect();
    for (schedule, suffix, lr_key) in [(Schedule::Cosine, "", "lr"), (Schedule::Linear, "_linear", "lr_linear")] {
        let cfg = OptimConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            warmup_steps: 2,
            schedule,
            ..OptimConfig::default()
        };
        let mut params: Vec<Param<CpuBackend>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(r, c))| Param::new(&be, &t[&format!("p0.{i}")], r, c).unwrap())
            .collect();
        for (s, step) in j["steps"].as_array().unwrap().iter().enumerate() {
            for (i, p) in params.iter_mut().enumerate() {
                let (r, c) = shapes[i];
                p.grad = be.upload(&t[&format!("grad{}.{i}", s + 1)], r, c).unwrap();
            }
            let stats = adamw_step(&be, params.iter_mut().collect(), &cfg, s, 10).unwrap();
            let want_lr = step[lr_key].as_f64().unwrap();
            assert!((stats.lr - want_lr).abs() <= 1e-15, "step {}: lr {} vs {want_lr}", s + 1, stats.lr);
            let want_norm = step["grad_norm"].as_f64().unwrap();
            assert!((stats.grad_norm - want_norm).abs() < 1e-6 * want_norm, "step {}", s + 1);
            assert_eq!(stats.clipped, step["clipped"].as_bool().unwrap(), "step {}", s + 1);
            for (i, p) in params.iter().enumerate() {
                let want = &t[&format!("p{}{suffix}.{i}", s + 1)];
                let got = be.download(&p.value).unwrap();
                for (a, b) in got.iter().zip(want) {
                    assert!((a - b).abs() <= 1e-7 + 1e-6 * b.abs(), "{schedule:?} step {} p{i}: {a} vs {b}", s + 1);
                }
            }
        }
    }
}

#[test]
fn twenty_steps_follow_peft_loss_curve() {
    let be = CpuBackend::new(2).unwrap();
    let dir = fixture("tiny/train/curve");
    let j = read_json(&dir.join("curve.json"));
    let model = load(&be, j["base"].as_str().unwrap());
    let seqs: Vec<_> =
        j["sequences"].as_array().unwrap().iter().map(|s| example(&s["input_ids"], &s["labels"])).collect();
    let hp = &j["hyperparameters"];
    let cfg = OptimConfig {
        lr: hp["lr"].as_f64().unwrap(),
        weight_decay: hp["weight_decay"].as_f64().unwrap(),
        max_grad_norm: hp["max_grad_norm"].as_f64().unwrap(),
        warmup_steps: hp["num_warmup_steps"].as_u64().unwrap() as usize,
        schedule: Schedule::Cosine,
        ..OptimConfig::default()
    };
    let total = hp["num_training_steps"].as_u64().unwrap() as usize;
    let mut lora = TrainableLora::from_peft_dir(&be, &model.config, &dir.join("init"), 0.0).unwrap();
    let plan = MemoryPlan::new(&model.config, 64, 2, 0, None, DEFAULT_LOGITS_CHUNK_BYTES).unwrap();
    let mut kv = TrainKv::default();
    for (s, step) in j["steps"].as_array().unwrap().iter().enumerate() {
        let mbs: Vec<MicroBatch> = step["micro_batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let pick: Vec<_> =
                    m.as_array().unwrap().iter().map(|i| seqs[i.as_u64().unwrap() as usize].clone()).collect();
                micro_batch(&pick)
            })
            .collect();
        let n_items: usize = mbs.iter().map(|m| m.num_targets()).sum();
        assert_eq!(n_items as u64, step["num_items"].as_u64().unwrap());
        let mut loss = 0f64;
        for mb in &mbs {
            let sums =
                run_micro_batch(&be, &model, &mut lora, mb, Some(1.0 / n_items as f32), &plan, &mut kv, 9).unwrap();
            loss += sums.loss / n_items as f64;
        }
        let stats = optimizer_step(&be, &mut lora, &cfg, s, total).unwrap();
        let want = step["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-3, "step {}: loss {loss} vs peft {want}", s + 1);
        assert!((stats.lr - step["lr"].as_f64().unwrap()).abs() < 1e-12, "step {}", s + 1);
        assert_eq!(stats.clipped, step["clipped"].as_bool().unwrap(), "step {}", s + 1);
    }
    let want = tensors(&dir.join("final.safetensors"));
    for f in lora.download(&be).unwrap() {
        for (is_b, got) in [(false, &f.a), (true, &f.b)] {
            let k = key(&f, is_b);
            let err = rel_l2(got, &want[&k]);
            assert!(err < 1e-3, "{k}: relative L2 error {err:.2e} after 20 steps");
        }
    }
}
