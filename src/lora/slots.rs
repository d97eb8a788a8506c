//! Device adapter slots as a scheduler resource: `max_loras` places where an
//! adapter's weights sit for compute. The scheduler owns this table; the model
//! runner only mirrors it (it loads what the table says, when it says).
//!
//! A slot is pinned while any running request uses it. An unpinned slot keeps
//! its adapter (a later request for it needs no load) until another adapter
//! needs the room: then the least recently used unpinned slot is evicted.
//! Slots are keyed by content version, so an adapter reloaded in place gets a
//! slot of its own while requests on the old version finish.

use std::sync::Arc;

use super::LoraAdapter;

struct Slot {
    adapter: Arc<LoraAdapter>,
    pins: usize,
    last_used: u64,
}

/// What `acquire` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAssignment {
    pub slot: usize,
    /// The runner must load the adapter into `slot` before the step runs.
    pub needs_load: bool,
}

pub struct SlotTable {
    slots: Vec<Option<Slot>>,
    clock: u64,
    /// Adapters put into a slot, and adapters evicted from one, since start.
    pub loads: u64,
    pub evictions: u64,
}

impl SlotTable {
    pub fn new(max_loras: usize) -> Self {
        Self { slots: (0..max_loras).map(|_| None).collect(), clock: 0, loads: 0, evictions: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots pinned by running requests.
    pub fn pinned(&self) -> usize {
        self.slots.iter().flatten().filter(|s| s.pins > 0).count()
    }

    /// Slots holding an adapter (pinned or not).
    pub fn occupied(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn find(&self, version: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.adapter.version == version))
    }

    /// Whether `acquire` would succeed now.
    pub fn can_acquire(&self, adapter: &LoraAdapter) -> bool {
        self.find(adapter.version).is_some() || self.slots.iter().any(|s| s.as_ref().is_none_or(|s| s.pins == 0))
    }

    /// Pins a slot for `adapter`: the one already holding its version, else an
    /// empty one, else the least recently used unpinned one (evicting it).
    /// `None` when every slot is pinned by other adapters.
    pub fn acquire(&mut self, adapter: &Arc<LoraAdapter>) -> Option<SlotAssignment> {
        self.clock += 1;
        let now = self.clock;
        if let Some(i) = self.find(adapter.version) {
            let s = self.slots[i].as_mut().expect("found slots are occupied");
            s.pins += 1;
            s.last_used = now;
            return Some(SlotAssignment { slot: i, needs_load: false });
        }
        let i = match self.slots.iter().position(|s| s.is_none()) {
            Some(i) => i,
            None => {
                let (i, _) = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().filter(|s| s.pins == 0).map(|s| (i, s.last_used)))
                    .min_by_key(|&(_, t)| t)?;
                self.evictions += 1;
                i
            }
        };
        self.slots[i] = Some(Slot { adapter: Arc::clone(adapter), pins: 1, last_used: now });
        self.loads += 1;
        Some(SlotAssignment { slot: i, needs_load: true })
    }

    /// Unpins `slot` (once per `acquire`).
    pub fn release(&mut self, slot: usize) {
        let s = self.slots[slot].as_mut().expect("released slots are occupied");
        debug_assert!(s.pins > 0, "slot {slot} released more often than acquired");
        s.pins = s.pins.saturating_sub(1);
    }

    /// Empties an unpinned slot whose load failed, so no later request takes
    /// it for resident.
    pub fn invalidate(&mut self, slot: usize) {
        if self.slots[slot].as_ref().is_some_and(|s| s.pins == 0) {
            self.slots[slot] = None;
        }
    }

    pub fn adapter(&self, slot: usize) -> Option<&Arc<LoraAdapter>> {
        self.slots.get(slot)?.as_ref().map(|s| &s.adapter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, seed: f32) -> Arc<LoraAdapter> {
        use crate::lora::LoraValues::F32;
        let m = crate::backend::LoraMatrix {
            rank: 1,
            in_features: 1,
            out_features: 1,
            a: F32(vec![seed]),
            bt: F32(vec![1.0]),
        };
        Arc::new(LoraAdapter::new(
            name.into(),
            String::new(),
            vec![[Some(Arc::new(m)), None, None, None, None, None, None]],
            None,
        ))
    }

    #[test]
    fn pins_reuse_and_lru_eviction() {
        let (a, b, c) = (adapter("a", 1.0), adapter("b", 2.0), adapter("c", 3.0));
        let mut t = SlotTable::new(2);
        let sa = t.acquire(&a).unwrap();
        assert!(sa.needs_load);
        let sb = t.acquire(&b).unwrap();
        assert_ne!(sa.slot, sb.slot);
        // Both pinned: c has no room.
        assert!(!t.can_acquire(&c));
        assert_eq!(t.acquire(&c), None);
        // A second user of a shares its slot without a load.
        assert_eq!(t.acquire(&a), Some(SlotAssignment { slot: sa.slot, needs_load: false }));
        t.release(sa.slot);
        t.release(sa.slot);
        t.release(sb.slot);
        // a was used more recently than b, so c evicts b.
        let sc = t.acquire(&c).unwrap();
        assert_eq!(sc, SlotAssignment { slot: sb.slot, needs_load: true });
        assert_eq!(t.evictions, 1);
        assert_eq!(t.adapter(sa.slot).unwrap().name, "a");
        // a stayed resident: no load.
        assert!(!t.acquire(&a).unwrap().needs_load);
        assert_eq!(t.pinned(), 2);
    }

    #[test]
    fn an_invalidated_slot_is_loaded_again() {
        let a = adapter("a", 1.0);
        let mut t = SlotTable::new(1);
        let s = t.acquire(&a).unwrap();
        t.invalidate(s.slot);
        assert!(t.adapter(s.slot).is_some(), "a pinned slot stays");
        t.release(s.slot);
        t.invalidate(s.slot);
        assert!(t.adapter(s.slot).is_none());
        assert!(t.acquire(&a).unwrap().needs_load);
    }

    #[test]
    fn a_new_version_gets_its_own_slot() {
        let (old, new) = (adapter("a", 1.0), adapter("a", 5.0));
        assert_ne!(old.version, new.version);
        let mut t = SlotTable::new(2);
        let s1 = t.acquire(&old).unwrap();
        let s2 = t.acquire(&new).unwrap();
        assert_ne!(s1.slot, s2.slot);
        assert!(s2.needs_load);
    }
}
