//! The engine thread: owns the `EngineCore` (and through it the device), takes
//! commands from the HTTP side, steps while there is work, and sends each
//! request's events to its own channel. It blocks only when idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::Backend;
use crate::metrics::Metrics;

use super::core::{EngineCore, StepEvent};
use super::handle::{Command, EngineEvent, FinishReason, RequestId};
use super::training::CoServing;

struct Client {
    events: UnboundedSender<EngineEvent>,
    /// The adapter's name, for per-adapter counters.
    adapter: Option<String>,
    arrival: Instant,
    admitted: bool,
    last_token_at: Option<Instant>,
}

pub(crate) struct EngineLoop<B: Backend> {
    pub core: EngineCore<B>,
    pub commands: Receiver<Command>,
    pub metrics: Arc<Metrics>,
    /// Submitted requests not yet admitted (shared with `EngineHandle::submit`).
    pub waiting: Arc<AtomicUsize>,
    pub alive: Arc<AtomicBool>,
    /// Fine-tuning jobs, run in turns between serving steps.
    pub training: CoServing<B>,
}

impl<B: Backend> EngineLoop<B> {
    pub fn run(mut self) {
        let _alive = AliveGuard(self.alive.clone());
        let mut clients: HashMap<RequestId, Client> = HashMap::new();
        let mut shutting_down = false;
        loop {
            // Block while idle; otherwise only drain what has arrived.
            if !self.core.has_work() && (shutting_down || !self.training.has_work()) {
                if shutting_down {
                    // Jobs resume from their checkpoints at the next start.
                    let (be, _) = self.core.device();
                    self.training.checkpoint_all(be);
                    return;
                }
                match self.commands.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => self.apply(c, &mut clients, &mut shutting_down),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(c) => self.apply(c, &mut clients, &mut shutting_down),
                    Err(TryRecvError::Empty) => break,
                    // Every handle is gone: finish what runs, then exit.
                    Err(TryRecvError::Disconnected) => {
                        shutting_down = true;
                        break;
                    }
                }
            }
            if !self.core.has_work() {
                if !shutting_down && self.training.has_work() {
                    let (be, model) = self.core.device();
                    self.training.turn(be, model, false, Duration::ZERO);
                    if self.stop_if_device_lost(&mut clients) {
                        return;
                    }
                }
                continue;
            }
            let started = Instant::now();
            let (out, events) = self.core.step();
            let now = Instant::now();
            for id in &out.first_admitted {
                if let Some(c) = clients.get_mut(id) {
                    c.admitted = true;
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    self.metrics.queue_time.observe((now - c.arrival).as_secs_f64());
                }
            }
            self.metrics.preemptions.add(out.num_preempted as f64);
            let mut generated = 0;
            for ev in events {
                match ev {
                    StepEvent::Token(id, t) => {
                        generated += 1;
                        let Some(c) = clients.get_mut(&id) else { continue };
                        match c.last_token_at {
                            None => self.metrics.ttft.observe((now - c.arrival).as_secs_f64()),
                            Some(prev) => self.metrics.inter_token.observe((now - prev).as_secs_f64()),
                        }
                        c.last_token_at = Some(now);
                        if let Some(a) = &c.adapter {
                            self.metrics.lora.count_tokens(a, 1);
                        }
                        // A closed receiver means the client left; its Abort is on the way.
                        let _ = c.events.send(EngineEvent::Token(t));
                    }
                    StepEvent::Failed(id, why) => {
                        self.metrics.finished_abort.add(1.0);
                        if let Some(c) = clients.remove(&id) {
                            if !c.admitted {
                                self.waiting.fetch_sub(1, Ordering::SeqCst);
                            }
                            let _ = c.events.send(EngineEvent::Failed(why));
                        }
                    }
                    StepEvent::Started(id, info) => {
                        if let Some(c) = clients.get(&id) {
                            let _ = c.events.send(EngineEvent::Started(info));
                        }
                    }
                    StepEvent::Finished(id, f) => {
                        if f.stop_token.is_some() {
                            generated += 1;
                        }
                        match f.reason {
                            FinishReason::Stop => self.metrics.finished_stop.add(1.0),
                            FinishReason::Length => self.metrics.finished_length.add(1.0),
                        }
                        self.metrics.prompt_tokens.add(f.prompt_tokens as f64);
                        if let Some(c) = clients.remove(&id) {
                            self.metrics.e2e.observe((now - c.arrival).as_secs_f64());
                            if let Some(a) = &c.adapter {
                                if f.stop_token.is_some() {
                                    self.metrics.lora.count_tokens(a, 1);
                                }
                                self.metrics.lora.count_request(a);
                            }
                            let _ = c.events.send(EngineEvent::Finished(f));
                        }
                    }
                }
            }
            self.metrics.generation_tokens.add(generated as f64);
            self.update_gauges();
            if self.stop_if_device_lost(&mut clients) {
                return;
            }
            if !shutting_down && self.training.has_work() {
                let served = started.elapsed();
                let busy = self.core.has_work();
                let (be, model) = self.core.device();
                self.training.turn(be, model, busy, served);
                if self.stop_if_device_lost(&mut clients) {
                    return;
                }
            }
        }
    }

    /// A lost device ends the engine: every client still waiting is told why,
    /// and the thread returns (the alive flag drops, `/health` answers 503).
    /// Requests the core knew of have already failed with the same reason.
    fn stop_if_device_lost(&mut self, clients: &mut HashMap<RequestId, Client>) -> bool {
        let why = match (self.core.device_lost(), self.training.device_lost()) {
            (Some(why), _) | (None, Some(why)) => why.to_string(),
            // Some other call (an adapter upload, a checkpoint) saw it first.
            (None, None) if self.core.device().0.device_lost() => "the device is lost".to_string(),
            (None, None) => return false,
        };
        tracing::error!("{why}; the engine stops, restart the server to serve again");
        for (id, c) in clients.drain() {
            if !c.admitted {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            self.core.abort(id);
            let _ = c.events.send(EngineEvent::Failed(why.clone()));
        }
        self.update_gauges();
        true
    }

    fn apply(&mut self, c: Command, clients: &mut HashMap<RequestId, Client>, shutting_down: &mut bool) {
        match c {
            Command::Add { id, req, events } => {
                let arrival = Instant::now();
                let adapter = req.adapter.as_ref().map(|a| a.name.clone());
                self.core.add_request(id, req);
                clients.insert(id, Client { events, adapter, arrival, admitted: false, last_token_at: None });
            }
            Command::Abort(id) => {
                if self.core.abort(id).is_some() {
                    self.metrics.finished_abort.add(1.0);
                }
                if let Some(c) = clients.remove(&id) {
                    if !c.admitted {
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Command::Train(t) => {
                let (be, _) = self.core.device();
                self.training.command(be, t);
            }
            Command::Shutdown => *shutting_down = true,
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let s = self.core.scheduler();
        let m = &self.metrics;
        m.requests_running.set(s.num_running() as f64);
        m.requests_waiting.set(s.num_waiting() as f64);
        m.kv_usage.set(s.kv().usage());
        m.kv_blocks_used.set(s.kv().pool().num_used() as f64);
        m.kv_blocks_cached.set(s.kv().pool().num_cached() as f64);
        m.prefix_cache_queries.set(s.prefix_queried_tokens as f64);
        m.prefix_cache_hits.set(s.prefix_hit_tokens as f64);
        let slots = s.slots();
        m.lora.slots_pinned.set(slots.pinned() as f64);
        m.lora.slots_occupied.set(slots.occupied() as f64);
        m.lora.slot_loads.set(slots.loads as f64);
        m.lora.slot_evictions.set(slots.evictions as f64);
        if slots.capacity() > 0 {
            let names = |it: &mut dyn Iterator<Item = &super::request::Request>| {
                let set: std::collections::BTreeSet<&str> =
                    it.filter_map(|r| r.adapter.as_deref().map(|a| a.name.as_str())).collect();
                set.into_iter().collect::<Vec<_>>().join(",")
            };
            m.lora.set_info(names(&mut s.running_requests()), names(&mut s.waiting_requests()));
        }
    }
}

/// Marks the engine dead however the thread ends (return or panic).
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}
