//! A device op that fails (out of memory, a failed launch) is an error where
//! it happens, never a panic: serving fails that step's requests and goes on,
//! and a training step returns the error, drops its partial gradients and can
//! be taken again. A lost device (its context gone) fails every request and
//! stops the engine, which then refuses new work. The CPU backend cannot fail
//! on its own, so `backend::fault_inject` fails the op a test arms.

mod common;

use std::time::Duration;

use tandem::backend::cpu::CpuBackend;
use tandem::backend::fault_inject::{FaultInjecting, FaultTrigger, InjectedFault};
use tandem::backend::{Backend, BackendError};
use tandem::engine::{spawn_engine, EngineCore, EngineEvent, EngineHandle, StepEvent, SubmitError};
use tandem::lora::LoraTarget;
use tandem::model::load_model;
use tandem::train::batch::Batching;
use tandem::train::data::{parse_jsonl, DataOptions};
use tandem::train::lora::{LoraSpec, TrainableLora};
use tandem::train::optim::OptimConfig;
use tandem::train::trainer::{TrainConfig, TrainError, Trainer};

/// The CPU backend, failing where a test arms it.
type Faulty = FaultInjecting<CpuBackend>;

fn faulty() -> Faulty {
    FaultInjecting::new(CpuBackend::new(2).unwrap())
}

/// (request, reason) of each failure among a step's events.
fn failures(events: &[StepEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|ev| match ev {
            StepEvent::Failed(id, why) => Some((*id, why.clone())),
            _ => None,
        })
        .collect()
}

fn model_path() -> String {
    common::fixture("tiny/qwen2/hf-f32").to_str().unwrap().to_string()
}

#[test]
fn a_failed_serving_step_fails_its_requests_and_the_engine_goes_on() {
    let prompts: [&[u32]; 2] = [&[5, 17, 42, 9, 11], &[3, 3, 8]];
    // The tokens each request gets on a healthy engine.
    let clean = faulty();
    let model = load_model(&clean, &model_path()).unwrap().model;
    let mut e = EngineCore::new(clean, model, &common::engine_config(16, 64, 64)).unwrap();
    let want: Vec<Vec<u32>> = e
        .generate(prompts.iter().map(|p| common::greedy(p, 6)).collect())
        .into_iter()
        .map(|(t, _)| common::token_ids(&t))
        .collect();

    let be = faulty();
    let trigger = be.trigger();
    let model = load_model(&be, &model_path()).unwrap().model;
    let mut e = EngineCore::new(be, model, &common::engine_config(16, 64, 64)).unwrap();
    e.add_request(1, common::greedy(prompts[0], 6));
    e.add_request(2, common::greedy(prompts[1], 6));
    let (_, first) = e.step();
    assert!(first.iter().all(|ev| !matches!(ev, StepEvent::Failed(..))));
    // The next step's forward fails part-way: both requests fail with the
    // device's reason, nothing panics, and their blocks are freed.
    trigger.arm(21, InjectedFault::Failed);
    let (_, events) = e.step();
    let failed = failures(&events);
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2], "{events:?}");
    assert!(failed[0].1.contains("injected failure"), "{}", failed[0].1);
    assert!(!e.has_work());
    assert_eq!(e.scheduler().kv().pool().num_used(), 0, "the failed requests' blocks are freed");
    // The engine goes on: the same requests again give the healthy tokens.
    let again: Vec<Vec<u32>> = e
        .generate(prompts.iter().map(|p| common::greedy(p, 6)).collect())
        .into_iter()
        .map(|(t, _)| common::token_ids(&t))
        .collect();
    assert_eq!(again, want);
}

#[test]
fn a_failed_training_step_is_an_error_and_the_step_can_be_taken_again() {
    let be = faulty();
    let loaded = load_model(&be, &model_path()).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let text: String = (0..4)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"a {i} {i}\"}}]}}\n"))
        .collect();
    let data = parse_jsonl(text.as_bytes(), &tok, &DataOptions::new(64)).unwrap();
    let cfg = TrainConfig {
        lora: LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 },
        optim: OptimConfig { lr: 1e-2, ..OptimConfig::default() },
        epochs: 1,
        batching: Batching::Sequential { batch_size: 2 },
        grad_accum: 1,
        max_steps: None,
        seed: 3,
        eval_every: None,
        save_every: None,
        early_stopping_patience: None,
        memory_budget: None,
        logits_chunk_bytes: 1 << 20,
    };
    let ops = || be.trigger().ops();
    // Fails the forward or backward of the first step (the step is retried).
    let run = |fail: Option<usize>| {
        let lora = TrainableLora::init(&be, &loaded.model.config, &cfg.lora, cfg.seed).unwrap();
        let mut t = Trainer::new(&loaded.model, cfg.clone(), data.clone(), None, lora).unwrap();
        let mut failures = 0;
        if let Some(n) = fail {
            be.trigger().arm(n + 1, InjectedFault::Failed);
            let err = t.step(&be, &loaded.model).expect_err("the injected failure surfaces");
            assert!(matches!(err, TrainError::Backend(BackendError::Device(_))), "{err}");
            assert_eq!(t.state().step, 0, "a failed step does not count");
            failures += 1;
        }
        let mut losses = vec![];
        let mut step_ops = vec![];
        loop {
            let before = ops();
            let Some(r) = t.step(&be, &loaded.model).unwrap() else { break };
            step_ops.push(ops() - before);
            losses.push(r.loss);
        }
        (losses, t.lora.download(&be).unwrap(), failures, step_ops)
    };
    let (clean_losses, clean_weights, _, step_ops) = run(None);
    assert_eq!(clean_losses.len(), 2);
    // Fail early (the forward) and in the middle (the backward): the retried
    // run ends exactly where the clean one does.
    let n_ops = step_ops[0];
    for n in [3, n_ops / 2] {
        let (losses, weights, failures, _) = run(Some(n));
        assert_eq!(failures, 1);
        assert_eq!(losses, clean_losses, "failure at op {n}");
        assert_eq!(weights, clean_weights, "failure at op {n}");
    }
}

#[test]
fn a_failed_optimiser_update_stops_the_run_for_a_resume() {
    let be = faulty();
    let loaded = load_model(&be, &model_path()).unwrap();
    let tok = loaded.tokenizer.clone().unwrap();
    let text =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a b\"}]}\n";
    let data = parse_jsonl(text.as_bytes(), &tok, &DataOptions::new(64)).unwrap();
    let cfg = TrainConfig {
        lora: LoraSpec { rank: 4, alpha: 8.0, use_rslora: false, targets: LoraTarget::ALL.to_vec(), dropout: 0.0 },
        optim: OptimConfig::default(),
        epochs: 2,
        batching: Batching::Sequential { batch_size: 1 },
        grad_accum: 1,
        max_steps: None,
        seed: 3,
        eval_every: None,
        save_every: None,
        early_stopping_patience: None,
        memory_budget: None,
        logits_chunk_bytes: 1 << 20,
    };
    let lora = TrainableLora::init(&be, &loaded.model.config, &cfg.lora, cfg.seed).unwrap();
    let mut t = Trainer::new(&loaded.model, cfg, data, None, lora).unwrap();
    let before = be.trigger().ops();
    t.step(&be, &loaded.model).unwrap();
    let per_step = be.trigger().ops() - before;
    // The last ops of a step are the AdamW updates (then zeroing gradients):
    // fail one of the updates.
    be.trigger().arm(per_step - 29, InjectedFault::Failed);
    let err = t.step(&be, &loaded.model).expect_err("the injected failure surfaces");
    assert!(matches!(err, TrainError::Broken(_)), "{err}");
    let again = t.step(&be, &loaded.model).expect_err("a broken run takes no more steps");
    assert!(again.to_string().contains("resume from the last checkpoint"), "{again}");
}

/// A bug that kills the engine thread (a panic, not a device error): the
/// request in flight ends without finishing, the handle reports the engine
/// dead (what `/health` answers 503 on), and new requests are refused with
/// `EngineStopped` (503) instead of hanging.
#[tokio::test]
async fn an_engine_thread_that_dies_is_reported_and_refuses_new_work() {
    let (engine, trigger) = spawn_faulty();
    assert!(matches!(last_event(&engine, &[5, 17, 42]).await, Some(EngineEvent::Finished(_))));
    assert!(engine.is_alive());

    trigger.arm(21, InjectedFault::Panic);
    let last = tokio::time::timeout(Duration::from_secs(20), last_event(&engine, &[5, 17, 42])).await.unwrap();
    assert!(
        !matches!(last, Some(EngineEvent::Finished(_))),
        "the request in flight ends unfinished when the engine dies: {last:?}"
    );
    assert_dead_and_refusing(&engine).await;
}

fn spawn_faulty() -> (EngineHandle, FaultTrigger) {
    let be = faulty();
    let trigger = be.trigger();
    let model = load_model(&be, &model_path()).unwrap().model;
    (spawn_engine(be, model, common::engine_config(16, 64, 64)).unwrap(), trigger)
}

/// The last event of a greedy request's stream (`None`: it ended without one).
async fn last_event(engine: &EngineHandle, prompt: &[u32]) -> Option<EngineEvent> {
    let mut stream = engine.submit(common::greedy(prompt, 4)).unwrap();
    let mut last = None;
    while let Some(ev) = stream.next().await {
        last = Some(ev);
    }
    last
}

/// The engine is reported dead (what `/health` answers 503 on) and refuses
/// new requests at once instead of hanging.
async fn assert_dead_and_refusing(engine: &EngineHandle) {
    let start = std::time::Instant::now();
    while engine.is_alive() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!engine.is_alive(), "the engine's death is detected");
    assert!(matches!(engine.submit(common::greedy(&[5], 2)), Err(SubmitError::EngineStopped)));
}

/// A lost device (a kernel fault, the GPU gone): the step's requests and the
/// ones still waiting fail with the reason, the engine thread stops (what
/// `/health` answers 503 on) and new requests are refused at once.
#[tokio::test]
async fn a_lost_device_fails_every_request_and_stops_the_engine() {
    // The core alone: every request fails, not only the step's, and so does
    // any later step.
    let be = faulty();
    let trigger = be.trigger();
    let model = load_model(&be, &model_path()).unwrap().model;
    let mut e = EngineCore::new(be, model, &common::engine_config(16, 64, 64)).unwrap();
    // max_num_seqs 1 keeps the second request waiting, outside the failed step.
    e.set_max_num_seqs(1);
    e.add_request(1, common::greedy(&[5, 17, 42], 6));
    e.add_request(2, common::greedy(&[3, 3, 8], 6));
    let (_, first) = e.step();
    assert!(first.iter().all(|ev| !matches!(ev, StepEvent::Failed(..))));
    trigger.arm(5, InjectedFault::Lost);
    let (_, events) = e.step();
    let failed = failures(&events);
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2], "{events:?}");
    assert!(failed.iter().all(|f| f.1.contains("the device is lost")), "{failed:?}");
    assert!(e.device_lost().is_some());
    assert!(e.device().0.device_lost(), "the backend reports it too (for callers that wrap its errors)");
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
    e.add_request(3, common::greedy(&[1, 2], 2));
    let (_, later) = e.step();
    assert!(matches!(&later[..], [StepEvent::Failed(3, _)]), "{later:?}");

    // The engine thread: the stream in flight ends with the reason, the
    // engine is reported dead, and new work is refused.
    let (engine, trigger) = spawn_faulty();
    assert!(matches!(last_event(&engine, &[5, 17, 42]).await, Some(EngineEvent::Finished(_))));
    trigger.arm(30, InjectedFault::Lost);
    match tokio::time::timeout(Duration::from_secs(20), last_event(&engine, &[5, 17, 42])).await.unwrap() {
        Some(EngineEvent::Failed(why)) => assert!(why.contains("the device is lost"), "{why}"),
        other => panic!("the request in flight fails with the reason, got {other:?}"),
    }
    assert_dead_and_refusing(&engine).await;
}
