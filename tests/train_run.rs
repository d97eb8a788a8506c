//! Training runs on the tiny qwen2 model: what a run writes, that it resumes
//! bit for bit from a checkpoint, early stopping, the same numbers on every
//! ISA and thread count, and refusals before anything trains.

mod common;

use std::path::Path;

use serde_json::Value;
use tandem::backend::cpu::{CpuBackend, Isa};
use tandem::lora::{load_peft_dir, LoraDtype, LoraOptions, LoraTarget};
use tandem::model::{load_model, LoadedModel};
use tandem::tokenizer::Tokenizer;
use tandem::train::batch::Batching;
use tandem::train::data::{parse_jsonl, DataOptions, Dataset};
use tandem::train::lora::{HostFactor, LoraSpec, TrainableLora};
use tandem::train::optim::{OptimConfig, Schedule};
use tandem::train::output;
use tandem::train::run::{self, checkpoint_dir, Lineage};
use tandem::train::trainer::{Progress, TrainConfig, TrainError, Trainer};

const BASE: &str = "tiny/qwen2/hf-f32";

fn model(be: &CpuBackend) -> LoadedModel<CpuBackend> {
    load_model(be, common::fixture(BASE).to_str().unwrap()).unwrap()
}

/// Chat lines the tiny byte-level tokenizer can encode (printable ASCII).
fn chats(n: usize, answer: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("count {i}")},
                {"role": "assistant", "content": answer(i)},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

fn dataset(tok: &Tokenizer, text: &str) -> Dataset {
    parse_jsonl(text.as_bytes(), tok, &DataOptions::new(128)).unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        lora: LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.1 },
        optim: OptimConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            schedule: Schedule::Cosine,
            warmup_steps: 1,
            ..OptimConfig::default()
        },
        epochs: 3,
        batching: Batching::Sequential { batch_size: 3 },
        grad_accum: 2,
        max_steps: None,
        seed: 7,
        eval_every: Some(2),
        save_every: Some(3),
        early_stopping_patience: None,
        memory_budget: None,
        logits_chunk_bytes: 1 << 20,
    }
}

fn counting(i: usize) -> String {
    (i..i + 6).map(|k| k.to_string()).collect::<Vec<_>>().join(" ")
}

fn train_valid(tok: &Tokenizer) -> (Dataset, Dataset) {
    (dataset(tok, &chats(10, counting)), dataset(tok, &chats(3, |i| counting(i + 20))))
}

fn lineage() -> Lineage {
    Lineage { base_model: BASE.into(), device: "cpu".into(), ..Lineage::default() }
}

/// Every metrics line without its timing.
fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join(output::METRICS))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

#[test]
fn a_run_writes_a_peft_adapter_metrics_a_plot_and_lineage() {
    let be = CpuBackend::new(2).unwrap();
    let m = model(&be);
    let tok = m.tokenizer.clone().unwrap();
    let (train, valid) = train_valid(&tok);
    let cfg = config();
    let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut t = Trainer::new(&m.model, cfg, train, Some(valid), lora).unwrap();
    // 10 examples in micro-batches of 3 = 4 per epoch, 2 per step: 6 steps.
    assert_eq!(t.total_steps(), 6);
    let out = tempfile::tempdir().unwrap();
    let summary = run::run(&be, &m.model, &mut t, out.path(), &lineage(), |_| {}).unwrap();
    assert_eq!(summary.steps, 6);
    for f in [output::ADAPTER_CONFIG, output::ADAPTER_WEIGHTS, output::METRICS, output::METADATA, output::LOSS_PLOT] {
        assert!(out.path().join(f).is_file(), "{f} is missing");
    }
    // Checkpoints every 3 steps, except at the end.
    assert!(checkpoint_dir(out.path(), 3).join("trainer_state.json").is_file());
    assert!(!checkpoint_dir(out.path(), 6).exists());
    // metrics.jsonl: the step-0 evaluation, 6 steps, evaluations at 2, 4, 6.
    let lines = metrics(out.path());
    let kinds: Vec<(String, u64)> =
        lines.iter().map(|l| (l["type"].as_str().unwrap().to_string(), l["step"].as_u64().unwrap())).collect();
    let want: Vec<(String, u64)> = [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4)]
        .into_iter()
        .chain([("eval", 4), ("train", 5), ("train", 6), ("eval", 6)])
        .map(|(k, s)| (k.to_string(), s))
        .collect();
    assert_eq!(kinds, want);
    for l in &lines {
        assert!(l["loss"].as_f64().unwrap().is_finite());
    }
    let train_line = &lines[1];
    for key in ["lr", "grad_norm", "token_accuracy", "tokens", "trained_tokens", "epoch"] {
        assert!(!train_line[key].is_null(), "train line has no {key}: {train_line}");
    }
    let eval_line = &lines[3];
    assert!(eval_line["perplexity"].as_f64().unwrap() > 1.0);
    // It learned something: training loss of the last step below the first's.
    assert!(lines[8]["loss"].as_f64().unwrap() < lines[1]["loss"].as_f64().unwrap());
    // The lineage.
    let meta: Value = serde_json::from_slice(&std::fs::read(out.path().join(output::METADATA)).unwrap()).unwrap();
    assert_eq!(meta["steps"], 6);
    assert_eq!(meta["data"]["train"]["examples"], 10);
    assert_eq!(meta["hyperparameters"]["lora"]["rank"], 4);
    assert_eq!(meta["hyperparameters"]["seed"], 7);
    assert!(meta["final_metrics"]["valid_loss"].as_f64().is_some());
    // adapter_config.json says what peft's own says for the same adapter, in
    // the same types (the fixture is peft 0.21's output; keys that only name
    // newer features peft fills with defaults when absent).
    let ours: Value = serde_json::from_slice(&std::fs::read(out.path().join(output::ADAPTER_CONFIG)).unwrap()).unwrap();
    let peft: Value = common::read_json(&common::fixture("tiny/train/curve/init/adapter_config.json"));
    let semantic = [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "bias",
        "fan_in_fan_out",
        "init_lora_weights",
        "use_dora",
        "lora_bias",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "inference_mode",
        "base_model_name_or_path",
    ];
    for key in semantic {
        let (a, b) = (&ours[key], &peft[key]);
        let same_type = a.is_number() == b.is_number()
            && a.is_string() == b.is_string()
            && a.is_array() == b.is_array()
            && a.is_object() == b.is_object()
            && a.is_boolean() == b.is_boolean()
            && a.is_null() == b.is_null();
        assert!(same_type, "adapter_config.json {key}: ours {a}, peft's {b}");
    }
    for key in ["peft_type", "task_type", "bias", "target_modules", "use_dora", "fan_in_fan_out"] {
        assert_eq!(ours[key], peft[key], "{key}");
    }
    assert_eq!((ours["r"].as_u64(), ours["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    // The adapter serves: tandem's PEFT loader reads back exactly the trained weights.
    let limits = LoraOptions { max_rank: 64, dtype: LoraDtype::F32 };
    let served = load_peft_dir("t", out.path(), &m.model.config, limits).unwrap();
    let trained = t.final_weights(&be).unwrap();
    for f in &trained {
        let mat = served.layers[f.layer][f.target.index()].as_ref().unwrap();
        assert_eq!(mat.a.to_f32(), f.a);
        // Serving folds the scaling (alpha / r = 2) into Bᵀ.
        let bt = mat.bt.to_f32();
        let outf = f.b.len() / f.rank;
        for o in 0..outf {
            for j in 0..f.rank {
                assert_eq!(bt[j * outf + o], 2.0 * f.b[o * f.rank + j]);
            }
        }
    }
}

fn train_steps(be: &CpuBackend, steps: usize) -> (Vec<f64>, Vec<HostFactor>) {
    let m = model(be);
    let tok = m.tokenizer.clone().unwrap();
    let (train, valid) = train_valid(&tok);
    let cfg = TrainConfig { max_steps: Some(steps), ..config() };
    let lora = TrainableLora::init(be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut t = Trainer::new(&m.model, cfg, train, Some(valid), lora).unwrap();
    let mut losses = vec![];
    while let Some(r) = t.step(be, &m.model).unwrap() {
        losses.push(r.loss);
        losses.extend(r.eval.map(|e| e.loss));
    }
    (losses, t.lora.download(be).unwrap())
}

#[test]
fn losses_and_weights_are_identical_on_every_isa_and_thread_count() {
    let mut isas = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
    }
    let reference = train_steps(&CpuBackend::with_isa(2, Isa::Scalar).unwrap(), 3);
    for isa in isas {
        for threads in [1, 2] {
            let got = train_steps(&CpuBackend::with_isa(threads, isa).unwrap(), 3);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&reference.0), "{isa:?} x{threads}: losses differ");
            assert_eq!(got.1, reference.1, "{isa:?} x{threads}: weights differ");
        }
    }
}

/// The engine runs training a slice at a time between serving steps; cut
/// into one-slice calls (a deadline already past), a run must compute
/// exactly what uninterrupted steps compute, initial evaluation included.
#[test]
fn a_run_cut_into_single_slices_repeats_the_straight_run_bit_for_bit() {
    let be = CpuBackend::new(2).unwrap();
    let m = model(&be);
    let tok = m.tokenizer.clone().unwrap();
    let (train, valid) = train_valid(&tok);
    let cfg = TrainConfig { max_steps: Some(4), ..config() };
    let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut straight = Trainer::new(&m.model, cfg.clone(), train.clone(), Some(valid.clone()), lora).unwrap();
    let first = straight.initial_eval(&be, &m.model).unwrap();
    let mut want = vec![];
    while let Some(r) = straight.step(&be, &m.model).unwrap() {
        want.push(r);
    }

    let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut sliced = Trainer::new(&m.model, cfg, train, Some(valid), lora).unwrap();
    sliced.start_initial_eval().unwrap();
    let (mut got, mut slices, mut got_first) = (vec![], 0, None);
    loop {
        slices += 1;
        match sliced.advance(&be, &m.model, Some(std::time::Instant::now())).unwrap() {
            Progress::Working => {}
            Progress::InitialEval(e) => got_first = Some(e),
            Progress::Step(r) => got.push(r),
            Progress::Done => break,
        }
    }
    let layers = m.model.config.num_layers;
    assert!(slices > 4 * 2 * layers, "{slices} calls: the work was not cut per layer");
    assert_eq!(got_first.unwrap().loss.to_bits(), first.loss.to_bits());
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            (g.step, g.loss.to_bits(), g.grad_norm.to_bits()),
            (w.step, w.loss.to_bits(), w.grad_norm.to_bits())
        );
        assert_eq!(g.eval.map(|e| e.loss.to_bits()), w.eval.map(|e| e.loss.to_bits()));
    }
    assert_eq!(sliced.final_weights(&be).unwrap(), straight.final_weights(&be).unwrap());
}

#[test]
fn a_resumed_run_repeats_the_straight_run_bit_for_bit() {
    let be = CpuBackend::new(2).unwrap();
    let m = model(&be);
    let tok = m.tokenizer.clone().unwrap();
    let (train, valid) = train_valid(&tok);
    let cfg = config();
    let straight = tempfile::tempdir().unwrap();
    let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut a = Trainer::new(&m.model, cfg.clone(), train.clone(), Some(valid.clone()), lora).unwrap();
    run::run(&be, &m.model, &mut a, straight.path(), &lineage(), |_| {}).unwrap();
    let want = a.final_weights(&be).unwrap();

    // The same run, "killed" after its step-3 checkpoint: a copy of the output
    // with metrics of later steps still in it, then resumed.
    let resumed = tempfile::tempdir().unwrap();
    let ck = checkpoint_dir(straight.path(), 3);
    let mut b = Trainer::resume(&be, &m.model, cfg.clone(), train.clone(), Some(valid.clone()), &ck).unwrap();
    assert_eq!(b.state().step, 3);
    std::fs::copy(straight.path().join(output::METRICS), resumed.path().join(output::METRICS)).unwrap();
    run::run(&be, &m.model, &mut b, resumed.path(), &lineage(), |_| {}).unwrap();
    assert_eq!(b.final_weights(&be).unwrap(), want, "resumed weights differ");
    assert_eq!(metrics(resumed.path()), metrics(straight.path()), "resumed metrics differ");

    // Resuming with other settings or other data is refused.
    let other = TrainConfig { seed: 8, ..cfg.clone() };
    let err = Trainer::resume(&be, &m.model, other, train, Some(valid.clone()), &ck).err().unwrap();
    assert!(matches!(err, TrainError::Resume { .. }), "{err}");
    let other_data = dataset(&tok, &chats(10, |i| counting(i + 1)));
    let err = Trainer::resume(&be, &m.model, cfg, other_data, Some(valid), &ck).err().unwrap();
    assert!(err.to_string().contains("other settings or other data"), "{err}");
}

#[test]
fn early_stopping_publishes_the_best_evaluation() {
    let be = CpuBackend::new(2).unwrap();
    let m = model(&be);
    let tok = m.tokenizer.clone().unwrap();
    // Validation asks the training prompts for other answers: fitting the
    // training data makes validation worse after a point.
    let train = dataset(&tok, &chats(6, counting));
    let valid = dataset(&tok, &chats(6, |i| format!("no {i}")));
    let cfg = TrainConfig {
        epochs: 40,
        batching: Batching::Sequential { batch_size: 6 },
        grad_accum: 1,
        eval_every: Some(1),
        save_every: None,
        early_stopping_patience: Some(2),
        optim: OptimConfig { lr: 3e-2, ..OptimConfig::default() },
        lora: LoraSpec { dropout: 0.0, ..config().lora },
        ..config()
    };
    let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut t = Trainer::new(&m.model, cfg, train, Some(valid.clone()), lora).unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = run::run(&be, &m.model, &mut t, out.path(), &lineage(), |_| {}).unwrap();
    assert!(summary.stopped_early, "validation kept improving for 40 steps");
    assert!(summary.steps < 40);
    let best = t.state().best_eval_loss.unwrap();
    let evals: Vec<f64> =
        metrics(out.path()).iter().filter(|l| l["type"] == "eval").map(|l| l["loss"].as_f64().unwrap()).collect();
    assert_eq!(best, evals.iter().cloned().fold(f64::INFINITY, f64::min));
    // Two evaluations after the best, then it stopped.
    let at = evals.iter().position(|&e| e == best).unwrap();
    assert_eq!(evals.len() - at - 1, 2, "{evals:?}");
    // The published adapter is the best evaluation's: evaluating it gives the best loss.
    let cfg2 = TrainConfig { early_stopping_patience: None, epochs: 1, ..t.config().clone() };
    let lora = TrainableLora::from_peft_dir(&be, &m.model.config, out.path(), 0.0).unwrap();
    let mut check = Trainer::new(&m.model, cfg2, valid.clone(), Some(valid), lora).unwrap();
    let e = check.evaluate(&be, &m.model).unwrap();
    assert!((e.loss - best).abs() < 1e-9, "published adapter's loss {} vs best {best}", e.loss);
}

#[test]
fn impossible_settings_are_refused_before_training() {
    let be = CpuBackend::new(2).unwrap();
    let m = model(&be);
    let tok = m.tokenizer.clone().unwrap();
    let (train, valid) = train_valid(&tok);
    let new = |cfg: TrainConfig, valid: Option<Dataset>| {
        let lora = TrainableLora::init(&be, &m.model.config, &cfg.lora, 1).unwrap();
        Trainer::new(&m.model, cfg, train.clone(), valid, lora).err().map(|e| e.to_string())
    };
    let e = new(TrainConfig { memory_budget: Some(1 << 10), ..config() }, None).unwrap();
    assert!(e.contains("needs at least") && e.contains("budget"), "{e}");
    let e = new(TrainConfig { early_stopping_patience: Some(2), ..config() }, None).unwrap();
    assert!(e.contains("validation"), "{e}");
    let e = new(TrainConfig { grad_accum: 0, ..config() }, Some(valid.clone())).unwrap();
    assert!(e.contains("accumulation"), "{e}");
    let e = new(TrainConfig { batching: Batching::Sequential { batch_size: 0 }, ..config() }, Some(valid)).unwrap();
    assert!(e.contains("batch size"), "{e}");
}
