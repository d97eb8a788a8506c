//! It learns: on the default model, six steps on four invented facts
//! (tests/fixtures/train-data, made by scripts/fixtures/learn_data.py) drive
//! the validation loss (the same facts asked with other words) down, and the
//! trained adapter, served as any PEFT adapter is, answers the trained
//! questions with the trained sentences, which the base model does not.

mod common;

use std::sync::Arc;

use serde_json::Value;
use tandem::backend::cpu::CpuBackend;
use tandem::engine::{EngineConfig, EngineCore, EngineRequest, SamplingParams, StoppingParams};
use tandem::lora::{load_peft_dir, LoraAdapter, LoraDtype, LoraOptions, LoraTarget};
use tandem::model::load_model;
use tandem::train::batch::Batching;
use tandem::train::data::{load_jsonl, DataOptions};
use tandem::train::lora::{LoraSpec, TrainableLora};
use tandem::train::optim::{OptimConfig, Schedule};
use tandem::train::output::write_adapter;
use tandem::train::trainer::{TrainConfig, Trainer};

#[test]
fn six_steps_teach_the_default_model_four_invented_facts() {
    let Some(path) = common::default_model() else { return };
    let be = CpuBackend::new(0).unwrap();
    let loaded = load_model(&be, path.to_str().unwrap()).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let data = common::fixture("train-data");
    let opts = DataOptions::new(256);
    let train = load_jsonl(&data.join("facts.train.jsonl"), &tok, &opts).unwrap();
    let valid = load_jsonl(&data.join("facts.valid.jsonl"), &tok, &opts).unwrap();
    let cfg = TrainConfig {
        lora: LoraSpec { rank: 8, alpha: 16.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 },
        optim: OptimConfig { lr: 3e-3, schedule: Schedule::Linear, ..OptimConfig::default() },
        epochs: 6,
        batching: Batching::Sequential { batch_size: 4 },
        grad_accum: 1,
        max_steps: None,
        seed: 42,
        eval_every: None,
        save_every: None,
        early_stopping_patience: None,
        memory_budget: Some(512 << 20),
        logits_chunk_bytes: 64 << 20,
    };
    let lora = TrainableLora::init(&be, &loaded.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut trainer = Trainer::new(&loaded.model, cfg, train, Some(valid), lora).unwrap();
    let before = trainer.evaluate(&be, &loaded.model).unwrap();
    let mut evals = vec![before.loss];
    while let Some(r) = trainer.step(&be, &loaded.model).unwrap() {
        evals.extend(r.eval.map(|e| e.loss));
    }
    assert_eq!(trainer.state().step, 6);
    let after = *evals.last().unwrap();
    assert!(after < 0.3 * before.loss, "validation loss {} -> {after}: {evals:?}", before.loss);
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), &trainer.lora.spec, "default", &trainer.final_weights(&be).unwrap()).unwrap();
    drop(trainer);

    // Serve it like any PEFT adapter, greedy.
    let limits = LoraOptions { max_rank: 64, dtype: LoraDtype::F32 };
    let adapter = Arc::new(load_peft_dir("facts", dir.path(), &loaded.model.config, limits).unwrap());
    let template = tok.chat_template().unwrap().clone();
    let lines = std::fs::read_to_string(data.join("facts.train.jsonl")).unwrap();
    let cases: Vec<(Vec<u32>, String)> = lines
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let msgs = v["messages"].as_array().unwrap();
            let prompt = Value::Array(msgs[..2].to_vec());
            let text = template.render(&prompt, None, true, None).unwrap();
            (tok.encode(&text, false).unwrap(), msgs[2]["content"].as_str().unwrap().to_string())
        })
        .collect();
    let engine_cfg = EngineConfig {
        max_loras: 1,
        ..EngineConfig::from_config(&tandem::config::Config::defaults(), tok.eos_token_ids())
    };
    let mut engine = EngineCore::new(be, loaded.model, &engine_cfg).unwrap();
    let greedy = |engine: &mut EngineCore<CpuBackend>, a: Option<&Arc<LoraAdapter>>| -> Vec<String> {
        let reqs = cases
            .iter()
            .map(|(ids, _)| EngineRequest {
                prompt: ids.clone(),
                sampling: SamplingParams::default(),
                stopping: StoppingParams { max_tokens: 24, min_tokens: 0, stop_token_ids: vec![], ignore_eos: false },
                logprobs: None,
                prompt_logprobs: None,
                adapter: a.cloned(),
            })
            .collect();
        engine
            .generate(reqs)
            .into_iter()
            .map(|(toks, _)| {
                let ids: Vec<u32> = toks.iter().map(|t| t.id).collect();
                tok.decode(&ids, true).unwrap()
            })
            .collect()
    };
    let trained = greedy(&mut engine, Some(&adapter));
    let base = greedy(&mut engine, None);
    for (((_, want), got), b) in cases.iter().zip(&trained).zip(&base) {
        assert_eq!(got.trim(), want, "the trained adapter's answer");
        assert_ne!(b.trim(), want, "the base model already knew this");
    }
}
