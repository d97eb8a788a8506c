//! The scheduler (vLLM v1's contract): each step it says, per request, how many
//! tokens to run — a decode is a 1-token chunk, a prompt is prefilled in chunks
//! — under a token budget and a cap on running sequences. Running requests go
//! first, in arrival order; when the KV cache cannot hold the next token of one,
//! the latest-arrived running request is preempted (its blocks freed, its tokens
//! recomputed later), never failed. Waiting requests are admitted only while
//! blocks are available, with their cached prefix adopted first.

use std::collections::{HashMap, VecDeque};

use crate::kv::{KvCacheManager, PrefixHit};
use crate::lora::SlotTable;

use super::handle::{FinishReason, RequestId, TokenOut};
use super::request::Request;

/// Admission passes a request may wait for an adapter slot before the
/// scheduler stops admitting other adapters' requests (base-model requests
/// still go), so pinned slots drain and it cannot starve.
pub const SLOT_WAIT_LIMIT: u32 = 32;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// What one step runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// (request, tokens to run), running requests first.
    pub chunks: Vec<(RequestId, usize)>,
    /// Requests admitted from the waiting queue for the first time this step.
    pub first_admitted: Vec<RequestId>,
    pub num_preempted: usize,
    /// Adapter slots the runner must (re)load, from `Scheduler::slots`, before running.
    pub lora_loads: Vec<usize>,
}

/// What became of a request in `update_from_output`.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestUpdate {
    /// A generated token to hand to the client.
    Token(RequestId, TokenOut),
    /// Done; its blocks are already back in the pool.
    Finished { id: RequestId, reason: FinishReason, stop_token: Option<u32> },
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    slots: SlotTable,
    /// Prefix-cache lookups and hits, in prompt tokens (for the hit-rate metric).
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvCacheManager, max_loras: usize) -> Self {
        Self {
            cfg,
            kv,
            slots: SlotTable::new(max_loras),
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }
    /// Changes the cap on running sequences (benchmarks); running ones stay.
    pub fn set_max_num_seqs(&mut self, n: usize) {
        self.cfg.max_num_seqs = n.max(1);
    }
    /// Fails every request scheduled in `out` on one of `slots` (their adapter
    /// could not be loaded): they are dropped from the step and from the
    /// scheduler, and the slots emptied. Returns the dropped requests.
    pub fn fail_slots(&mut self, out: &mut SchedulerOutput, slots: &[usize]) -> Vec<RequestId> {
        let doomed: Vec<RequestId> = out
            .chunks
            .iter()
            .map(|c| c.0)
            .filter(|id| self.requests.get(id).and_then(|r| r.lora_slot).is_some_and(|s| slots.contains(&s)))
            .collect();
        for &id in &doomed {
            self.abort(id);
        }
        out.chunks.retain(|c| !doomed.contains(&c.0));
        for &s in slots {
            self.slots.invalidate(s);
        }
        doomed
    }
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }
    /// Running and waiting requests, for gauges.
    pub fn running_requests(&self) -> impl Iterator<Item = &Request> {
        self.running.iter().filter_map(|id| self.requests.get(id))
    }
    pub fn waiting_requests(&self) -> impl Iterator<Item = &Request> {
        self.waiting.iter().filter_map(|id| self.requests.get(id))
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }
    pub fn get(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }
    pub fn get_mut(&mut self, id: RequestId) -> Option<&mut Request> {
        self.requests.get_mut(&id)
    }

    pub fn add(&mut self, mut req: Request) {
        self.kv.hash_full_blocks(&req.tokens, req.adapter_version(), &mut req.block_hashes);
        self.waiting.push_back(req.id);
        self.requests.insert(req.id, req);
    }

    /// Drops a request wherever it is and frees its blocks. Returns it (if it
    /// existed) so the caller can tell whether it had ever been admitted.
    pub fn abort(&mut self, id: RequestId) -> Option<Request> {
        let mut req = self.requests.remove(&id)?;
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.kv.free(&mut req.blocks);
        if let Some(slot) = req.lora_slot.take() {
            self.slots.release(slot);
        }
        Some(req)
    }

    /// Drops every request (the device is lost); returns their ids.
    pub fn abort_all(&mut self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            self.abort(id);
        }
        ids
    }

    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let req = &self.requests[&id];
            let n = req.num_uncomputed().min(budget);
            let target = req.num_computed + n;
            let mut scheduled = true;
            loop {
                let req = self.requests.get_mut(&id).expect("running requests exist");
                if self.kv.allocate(&mut req.blocks, &PrefixHit::default(), target).is_ok() {
                    break;
                }
                // Make room by preempting the latest arrival; possibly this one.
                let victim = self.running.pop().expect("this request is running");
                self.preempt(victim);
                out.num_preempted += 1;
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            out.chunks.push((id, n));
            budget -= n;
            i += 1;
        }
        // vLLM's rule: no admissions in a step that had to preempt.
        let mut w = 0;
        // The adapter version of the oldest request that has waited too long for a slot.
        let mut starving: Option<u64> = self
            .waiting
            .iter()
            .filter_map(|id| self.requests.get(id))
            .find(|r| r.slot_waits >= SLOT_WAIT_LIMIT)
            .and_then(|r| r.adapter.as_ref().map(|a| a.version));
        while out.num_preempted == 0 && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.get(w) else { break };
            let req = self.requests.get_mut(&id).expect("waiting requests exist");
            // A request whose adapter has no free slot waits without holding up
            // others, unless one has waited so long that adapters yield to it.
            if let Some(a) = &req.adapter {
                let yields = starving.is_some_and(|v| v != a.version);
                if yields || !self.slots.can_acquire(a) {
                    if !yields {
                        req.slot_waits += 1;
                        if req.slot_waits >= SLOT_WAIT_LIMIT && starving.is_none() {
                            starving = Some(a.version);
                        }
                    }
                    w += 1;
                    continue;
                }
            }
            let hit = if req.num_computed == 0 && req.prompt_logprobs.is_none() {
                self.kv.find_prefix(&req.tokens, &req.block_hashes)
            } else {
                Default::default()
            };
            let start = hit.num_tokens;
            let n = (req.tokens.len() - start).min(budget);
            if self.kv.allocate(&mut req.blocks, &hit, start + n).is_err() {
                break;
            }
            if let Some(a) = &req.adapter {
                let got = self.slots.acquire(a).expect("can_acquire said yes and nothing ran since");
                if got.needs_load {
                    out.lora_loads.push(got.slot);
                }
                req.lora_slot = Some(got.slot);
            }
            req.num_computed = start;
            req.num_registered_blocks = hit.blocks.len();
            if req.cached_prompt_tokens.is_none() {
                req.cached_prompt_tokens = Some(start.min(req.prompt_len));
                self.prefix_queried_tokens += req.prompt_len as u64;
                self.prefix_hit_tokens += start.min(req.prompt_len) as u64;
                out.first_admitted.push(id);
            }
            self.waiting.remove(w);
            self.running.push(id);
            out.chunks.push((id, n));
            budget -= n;
        }
        out
    }

    fn preempt(&mut self, id: RequestId) {
        let req = self.requests.get_mut(&id).expect("preempted requests exist");
        self.kv.free(&mut req.blocks);
        req.num_computed = 0;
        req.num_registered_blocks = 0;
        if let Some(slot) = req.lora_slot.take() {
            self.slots.release(slot);
        }
        self.waiting.push_front(id);
    }

    /// Applies one executed step: advances every chunk, registers the blocks it
    /// filled in the prefix cache, and appends `sampled` tokens (one per request
    /// whose chunk reached the end of its tokens), finishing requests that stop.
    pub fn update_from_output(
        &mut self,
        out: &SchedulerOutput,
        sampled: Vec<(RequestId, TokenOut)>,
        eos: &[u32],
    ) -> Vec<RequestUpdate> {
        let bs = self.kv.block_size();
        for &(id, n) in &out.chunks {
            let req = self.requests.get_mut(&id).expect("scheduled requests exist");
            req.num_computed += n;
            let full = (req.num_computed / bs).min(req.block_hashes.len());
            if full > req.num_registered_blocks {
                self.kv.cache_full_blocks(
                    &req.blocks,
                    &req.tokens,
                    &req.block_hashes[..full],
                    req.num_registered_blocks,
                );
                req.num_registered_blocks = full;
            }
        }
        let mut updates = Vec::with_capacity(sampled.len() + 1);
        for (id, tok) in sampled {
            let req = self.requests.get_mut(&id).expect("sampled requests exist");
            let finish = req.check_stop(tok.id, eos, self.cfg.max_model_len);
            req.num_generated += 1;
            if finish == Some(FinishReason::Stop) {
                self.finish(id, FinishReason::Stop, Some(tok.id), &mut updates);
                continue;
            }
            req.tokens.push(tok.id);
            req.sampler.observe(tok.id);
            self.kv.hash_full_blocks(&req.tokens, req.adapter_version(), &mut req.block_hashes);
            updates.push(RequestUpdate::Token(id, tok));
            if let Some(reason) = finish {
                self.finish(id, reason, None, &mut updates);
            }
        }
        updates
    }

    fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        stop_token: Option<u32>,
        updates: &mut Vec<RequestUpdate>,
    ) {
        self.running.retain(|&r| r != id);
        if let Some(req) = self.requests.get_mut(&id) {
            self.kv.free(&mut req.blocks);
            if let Some(slot) = req.lora_slot.take() {
                self.slots.release(slot);
            }
        }
        updates.push(RequestUpdate::Finished { id, reason, stop_token });
    }

    /// Removes a finished request (after its final event was built from it).
    pub fn take_finished(&mut self, id: RequestId) -> Option<Request> {
        self.requests.remove(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::handle::{EngineRequest, StoppingParams};
    use crate::engine::sampler::SamplingParams;

    fn req(id: RequestId, prompt: Vec<u32>, max_tokens: usize) -> Request {
        let r = EngineRequest {
            prompt,
            sampling: SamplingParams::default(),
            stopping: StoppingParams { max_tokens, min_tokens: 0, stop_token_ids: vec![], ignore_eos: false },
            logprobs: None,
            prompt_logprobs: None,
            adapter: None,
        };
        Request::new(id, r)
    }

    fn sched(budget: usize, max_seqs: usize, blocks: usize, bs: usize) -> Scheduler {
        let cfg = SchedulerConfig { max_num_batched_tokens: budget, max_num_seqs: max_seqs, max_model_len: 1 << 20 };
        Scheduler::new(cfg, KvCacheManager::new(blocks, bs, true), 2)
    }

    /// Pretends the model ran `out` and sampled `tok` for every finished chunk.
    fn run(s: &mut Scheduler, out: &SchedulerOutput, tok: u32) -> Vec<RequestUpdate> {
        let sampled = out
            .chunks
            .iter()
            .filter(|&&(id, n)| {
                let r = s.get(id).unwrap();
                r.num_computed + n == r.tokens.len()
            })
            .map(|&(id, _)| (id, TokenOut { id: tok, logprob: None, top_logprobs: vec![] }))
            .collect();
        s.update_from_output(out, sampled, &[999])
    }

    #[test]
    fn long_prompts_prefill_in_chunks_and_decodes_go_first() {
        let mut s = sched(8, 4, 64, 4);
        s.add(req(1, (0..3).collect(), 5));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 3)]);
        run(&mut s, &out, 7);
        s.add(req(2, (0..20).collect(), 5));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 1), (2, 7)], "the decode first, then a prefill chunk filling the budget");
        run(&mut s, &out, 7);
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 1), (2, 7)]);
        run(&mut s, &out, 7);
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 1), (2, 6)]);
        let ups = run(&mut s, &out, 7);
        assert!(ups.contains(&RequestUpdate::Token(2, TokenOut { id: 7, logprob: None, top_logprobs: vec![] })));
    }

    #[test]
    fn max_tokens_and_stop_tokens_finish_and_free_blocks() {
        let mut s = sched(64, 4, 64, 4);
        s.add(req(1, vec![1, 2, 3], 2));
        s.add(req(2, vec![1, 2, 3], 10));
        for _ in 0..2 {
            let out = s.schedule();
            run(&mut s, &out, 5);
        }
        assert_eq!(s.num_running(), 1);
        assert_eq!(s.take_finished(1).unwrap().num_generated, 2);
        let out = s.schedule();
        let ups = run(&mut s, &out, 999);
        assert_eq!(ups, vec![RequestUpdate::Finished { id: 2, reason: FinishReason::Stop, stop_token: Some(999) }]);
        assert_eq!(s.num_running(), 0);
        assert_eq!(s.kv().pool().num_used(), 0);
        assert_eq!(s.take_finished(2).unwrap().num_generated, 3, "the stop token counts as generated");
    }

    #[test]
    fn running_out_of_blocks_preempts_the_latest_and_recomputes_it_later() {
        // 5 usable blocks of 2 tokens: two 4-token prompts take 4; the next
        // decode of each needs a third block each.
        let mut s = sched(64, 4, 6, 2);
        s.add(req(1, vec![1, 2, 3, 4], 2));
        s.add(req(2, vec![5, 6, 7, 8], 6));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 4), (2, 4)]);
        run(&mut s, &out, 9);
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 1)], "request 2 was preempted to make room");
        assert_eq!(out.num_preempted, 1);
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.get(2).unwrap().num_computed, 0);
        assert_eq!(s.get(2).unwrap().tokens, vec![5, 6, 7, 8, 9], "its generated token is kept for the recompute");
        let ups = run(&mut s, &out, 9);
        assert!(ups.contains(&RequestUpdate::Finished { id: 1, reason: FinishReason::Length, stop_token: None }));
        s.take_finished(1);
        // Request 2 is readmitted, reusing its cached prompt blocks.
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(2, 1)], "4 of its 5 tokens came from the prefix cache");
        assert_eq!(s.get(2).unwrap().cached_prompt_tokens, Some(0), "cached-prompt accounting is from first admission");
    }

    #[test]
    fn admission_waits_for_blocks_and_respects_max_num_seqs() {
        let mut s = sched(64, 2, 4, 4);
        s.add(req(1, (0..8).collect(), 4));
        s.add(req(2, (100..108).collect(), 4));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 8)], "3 usable blocks: the second 8-token prompt does not fit yet");
        let mut s = sched(64, 2, 64, 4);
        for i in 1..=3 {
            s.add(req(i, vec![i as u32; 3], 4));
        }
        assert_eq!(s.schedule().chunks.len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn abort_frees_blocks_wherever_the_request_is() {
        let mut s = sched(64, 4, 64, 4);
        s.add(req(1, (0..10).collect(), 4));
        s.add(req(2, (0..10).collect(), 4));
        let out = s.schedule();
        run(&mut s, &out, 3);
        assert!(s.kv().pool().num_used() > 0);
        assert!(s.abort(1).is_some());
        assert!(s.abort(2).is_some());
        assert!(s.abort(2).is_none());
        assert_eq!(s.kv().pool().num_used(), 0);
        assert!(!s.has_work());
    }

    #[test]
    fn a_repeated_prompt_skips_its_cached_prefill() {
        let mut s = sched(256, 4, 64, 4);
        let prompt: Vec<u32> = (0..100).collect();
        s.add(req(1, prompt.clone(), 1));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(1, 100)]);
        run(&mut s, &out, 3);
        s.add(req(2, prompt, 1));
        let out = s.schedule();
        assert_eq!(out.chunks, vec![(2, 4)], "96 tokens (24 full blocks) from the cache; the last block recomputed");
        assert_eq!(s.get(2).unwrap().cached_prompt_tokens, Some(96));
        assert_eq!((s.prefix_queried_tokens, s.prefix_hit_tokens), (200, 96));
    }
}
