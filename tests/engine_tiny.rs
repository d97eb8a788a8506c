//! The engine core on a tiny fixture model: continuous batching, chunked
//! prefill, preemption and prefix caching never change what a request produces;
//! seeded sampling is reproducible; the async handle streams, aborts and
//! reports through metrics.

mod common;

use common::*;
use tandem::backend::cpu::CpuBackend;
use tandem::engine::{
    spawn_engine, EngineEvent, EngineRequest, FinishReason, SamplingParams, StoppingParams, SubmitError,
};
use tandem::model::{load_hf_dir, LlamaModel};

fn model() -> LlamaModel<CpuBackend> {
    load_hf_dir(&CpuBackend::new(2).unwrap(), &fixture("tiny/qwen2/hf-f32")).unwrap().model
}

/// Deterministic prompts of varied lengths.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..(3 + 11 * i % 70)).map(|j| ((j * 13 + i * 7 + 3) % 250) as u32).collect()).collect()
}

#[test]
fn sixteen_batched_requests_with_chunked_prefill_each_match_their_solo_run() {
    let reqs: Vec<EngineRequest> = prompts(16).iter().map(|p| greedy(p, 12)).collect();
    let solo = solo_outputs(model, &reqs);
    // A small budget: prefill is chunked and mixed with other sequences' decodes.
    let mut e = engine(model(), &engine_config(16, 256, 7));
    let batched = e.generate(reqs);
    for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
        assert_eq!(&token_ids(&b.0), s, "request {i}");
        assert_eq!(b.1.reason, FinishReason::Length);
        assert_eq!(b.1.output_tokens, 12);
    }
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
}

#[test]
fn preemption_when_the_cache_runs_out_recomputes_without_changing_outputs() {
    let reqs: Vec<EngineRequest> = prompts(8).iter().map(|p| greedy(p, 20)).collect();
    let solo = solo_outputs(model, &reqs);
    // 24 usable blocks of 4 tokens: far too few for 8 requests of up to ~90 tokens.
    let cfg = engine_config(4, 25, 64);
    let mut e = engine(model(), &cfg);
    let n = reqs.len();
    for (i, r) in reqs.into_iter().enumerate() {
        e.add_request(i as u64, r);
    }
    let mut out = vec![Vec::new(); n];
    let mut preempted = 0;
    while e.has_work() {
        let (sched, events) = e.step();
        assert!(!sched.chunks.is_empty(), "no progress");
        preempted += sched.num_preempted;
        for ev in events {
            if let tandem::engine::StepEvent::Token(id, t) = ev {
                out[id as usize].push(t.id);
            }
        }
    }
    assert!(preempted > 0, "the test must force preemption");
    assert_eq!(out, solo);
    assert_eq!(e.scheduler().kv().pool().num_used(), 0);
}

#[test]
fn a_cached_prefix_skips_prefill_and_gives_the_same_tokens() {
    let system: Vec<u32> = (0..100).map(|j| (j * 17 % 240) as u32 + 3).collect();
    let a: Vec<u32> = system.iter().copied().chain([7, 8, 9]).collect();
    let b: Vec<u32> = system.iter().copied().chain([10, 11]).collect();
    let solo = solo_outputs(model, &[greedy(&b, 10)]);
    let mut cfg = engine_config(16, 256, 512);
    let mut e = engine(model(), &cfg);
    let first = e.generate(vec![greedy(&a, 4)]);
    assert_eq!(first[0].1.cached_prompt_tokens, 0);
    let second = e.generate(vec![greedy(&b, 10)]);
    assert_eq!(second[0].1.cached_prompt_tokens, 96, "six full 16-token blocks of the shared prefix");
    assert_eq!(token_ids(&second[0].0), solo[0]);
    assert_eq!(e.scheduler().kv().pool().num_used(), 0, "cached blocks are free, not held");
    assert!(e.scheduler().kv().pool().num_cached() >= 6);
    cfg.enable_prefix_caching = false;
    let mut e = engine(model(), &cfg);
    e.generate(vec![greedy(&a, 4)]);
    assert_eq!(e.generate(vec![greedy(&b, 1)])[0].1.cached_prompt_tokens, 0);
}

#[test]
fn seeded_sampling_is_the_same_alone_and_batched() {
    let sampled = |p: &[u32], seed| EngineRequest {
        sampling: SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(seed), ..Default::default() },
        ..greedy(p, 16)
    };
    let ps = prompts(6);
    let reqs: Vec<EngineRequest> = ps.iter().enumerate().map(|(i, p)| sampled(p, 100 + i as u64)).collect();
    let solo = solo_outputs(model, &reqs);
    let mut e = engine(model(), &engine_config(16, 256, 9));
    let batched: Vec<Vec<u32>> = e.generate(reqs).iter().map(|o| token_ids(&o.0)).collect();
    assert_eq!(batched, solo);
    let other = solo_outputs(model, &[sampled(&ps[0], 999)]);
    assert_ne!(other[0], solo[0], "a different seed samples differently");
}

#[test]
fn stop_tokens_min_tokens_and_logprobs() {
    let p = &prompts(3)[2];
    let free = solo_outputs(model, &[greedy(p, 12)])[0].clone();
    // Stop at the 5th generated token: it is not output but counts as generated.
    let mut e = engine(model(), &engine_config(16, 256, 512));
    let stop = free[4];
    let first_at = free.iter().position(|&t| t == stop).unwrap();
    let r = EngineRequest {
        stopping: StoppingParams { max_tokens: 12, min_tokens: 0, stop_token_ids: vec![stop], ignore_eos: false },
        logprobs: Some(3),
        ..greedy(p, 12)
    };
    let out = e.generate(vec![r.clone()]);
    let (toks, fin) = &out[0];
    assert_eq!(token_ids(toks), free[..first_at]);
    assert_eq!((fin.reason, fin.stop_token, fin.output_tokens), (FinishReason::Stop, Some(stop), first_at + 1));
    for t in toks {
        let lp = t.logprob.unwrap();
        assert!(lp <= 0.0);
        assert_eq!(t.top_logprobs.len(), 3);
        assert_eq!(t.top_logprobs[0].0, t.id, "greedy picks the most likely token");
        assert!((t.top_logprobs[0].1 - lp).abs() < 1e-6);
        assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    // min_tokens past the stop token's position: the stop id is banned until then.
    let r = EngineRequest {
        stopping: StoppingParams { min_tokens: first_at + 2, ..r.stopping.clone() },
        logprobs: None,
        ..r
    };
    let out = e.generate(vec![r]);
    assert!(out[0].0.len() > first_at + 1);
    assert!(!token_ids(&out[0].0)[..first_at + 2].contains(&stop));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// Polls `f` until it holds (the engine applies commands asynchronously).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed().as_secs() < 20, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn the_handle_streams_tokens_aborts_on_drop_and_reports_metrics() {
    let mut cfg = engine_config(16, 256, 64);
    cfg.max_waiting = 64;
    let h = spawn_engine(CpuBackend::new(2).unwrap(), model(), cfg).unwrap();
    let p = prompts(4)[3].clone();
    let want = solo_outputs(model, &[greedy(&p, 8)])[0].clone();
    rt().block_on(async {
        let mut s = h.submit(greedy(&p, 8)).unwrap();
        let mut got = vec![];
        let fin = loop {
            match s.next().await.unwrap() {
                EngineEvent::Started(info) => assert_eq!(info.cached_prompt_tokens, 0),
                EngineEvent::Token(t) => got.push(t.id),
                EngineEvent::Finished(f) => break f,
                EngineEvent::Failed(e) => panic!("{e}"),
            }
        };
        assert_eq!(got, want);
        assert_eq!((fin.prompt_tokens, fin.output_tokens), (p.len(), 8));
        assert!(s.next().await.is_none());

        // A long request dropped after its first token is aborted and its blocks freed.
        let mut long = h.submit(greedy(&p, 200)).unwrap();
        assert!(matches!(long.next().await, Some(EngineEvent::Started(_))));
        assert!(matches!(long.next().await, Some(EngineEvent::Token(_))));
        drop(long);
    });
    eventually("the aborted request to free its blocks", || {
        let m = h.metrics();
        m.kv_blocks_used.get() == 0.0 && m.requests_running.get() == 0.0 && m.finished_abort.get() == 1.0
    });
    let text = h.metrics().render();
    assert!(text.contains("vllm:generation_tokens_total"), "{text}");
    assert!(h.metrics().ttft.count() >= 2);

    // Refusals happen before the engine sees anything.
    assert_eq!(h.submit(greedy(&[], 4)).err(), Some(SubmitError::EmptyPrompt));
    let too_long = greedy(&p, h.info().max_model_len);
    assert!(matches!(h.submit(too_long), Err(SubmitError::ContextLength { .. })));
    assert!(matches!(h.submit(greedy(&[300], 4)), Err(SubmitError::InvalidParam { param: "prompt", .. })));
    h.shutdown();
    eventually("the engine to exit after shutdown", || !h.is_alive());
}

#[test]
fn a_full_waiting_queue_refuses_with_queue_full() {
    let mut cfg = engine_config(16, 256, 64);
    cfg.max_waiting = 2;
    cfg.max_num_seqs = 1;
    let h = spawn_engine(CpuBackend::new(2).unwrap(), model(), cfg).unwrap();
    let p = prompts(2)[1].clone();
    let running = h.submit(greedy(&p, 200)).unwrap();
    eventually("the first request to run", || h.metrics().requests_running.get() == 1.0);
    let waiting: Vec<_> = (0..2).map(|_| h.submit(greedy(&p, 200)).unwrap()).collect();
    match h.submit(greedy(&p, 1)) {
        Err(SubmitError::QueueFull { waiting, retry_after_s }) => assert!(waiting == 2 && retry_after_s > 0),
        other => panic!("expected QueueFull, got {:?}", other.map(|s| s.id())),
    }
    drop(waiting);
    drop(running);
    eventually("aborted requests to leave", || {
        let m = h.metrics();
        m.requests_waiting.get() == 0.0 && m.requests_running.get() == 0.0 && m.kv_blocks_used.get() == 0.0
    });
    assert!(h.submit(greedy(&p, 1)).is_ok(), "room again once the queue drained");
}

#[test]
fn prompt_logprobs_are_the_log_softmax_of_each_prompt_position() {
    let be = CpuBackend::new(2).unwrap();
    let m = model();
    let p = prompts(5)[4].clone();
    let want = all_logits(&be, &m, &p);
    // A tiny budget splits the prompt over several steps; the first run also
    // fills the prefix cache, which a prompt-logprobs request must not use.
    let mut e = engine(m, &engine_config(4, 256, 5));
    e.generate(vec![greedy(&p, 1)]);
    let req = EngineRequest { prompt_logprobs: Some(2), ..greedy(&p, 1) };
    let id = 7;
    e.add_request(id, req);
    let mut got = None;
    while e.has_work() {
        for ev in e.step().1 {
            if let tandem::engine::StepEvent::Started(_, info) = ev {
                assert_eq!(info.cached_prompt_tokens, 0);
                got = info.prompt_logprobs;
            }
        }
    }
    let got = got.expect("prompt logprobs were asked for");
    assert_eq!(got.len(), p.len() - 1);
    for (i, lp) in got.iter().enumerate() {
        let row = &want[i];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        let expect = row[p[i + 1] as usize] - lse;
        assert!((lp.logprob - expect).abs() < 1e-4, "position {i}: {} vs {expect}", lp.logprob);
        assert_eq!(lp.top_logprobs.len(), 2);
    }
}
