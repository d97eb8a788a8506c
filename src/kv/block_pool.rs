//! A flat pool of refcounted KV blocks. Free blocks sit in an LRU list; a freed
//! block keeps its prefix-cache identity until it is handed out again, so a later
//! request with the same prefix can revive it instead of recomputing it.

use std::collections::HashMap;

use super::{BlockHash, BlockId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockPoolError {
    #[error("KV cache exhausted: {requested} blocks requested, {free} free")]
    Exhausted { requested: usize, free: usize },
}

/// What a cached block holds: its tokens, after the prefix named by `parent`
/// (the previous block's hash), under one adapter version. Stored so a hash hit
/// is verified against the real content, not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CachedContent {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

/// Free blocks in least-recently-freed order, as a doubly linked list over
/// block indices so a revived block leaves from the middle in O(1).
#[derive(Debug)]
struct FreeList {
    prev: Vec<u32>,
    next: Vec<u32>,
    len: usize,
}

impl FreeList {
    /// Index `n` (one past the last block) is the list's sentinel.
    fn new(n: usize) -> Self {
        let s = n as u32;
        let mut l = Self { prev: vec![s; n + 1], next: vec![s; n + 1], len: 0 };
        for i in 1..n as u32 {
            l.push_back(i);
        }
        l
    }
    fn sentinel(&self) -> u32 {
        (self.prev.len() - 1) as u32
    }
    fn push_back(&mut self, b: u32) {
        let s = self.sentinel();
        let last = self.prev[s as usize];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = s;
        self.prev[s as usize] = b;
        self.len += 1;
    }
    fn remove(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.len -= 1;
    }
    fn pop_front(&mut self) -> Option<u32> {
        let first = self.next[self.sentinel() as usize];
        (first != self.sentinel()).then(|| {
            self.remove(first);
            first
        })
    }
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcounts: Vec<u32>,
    free: FreeList,
    content: Vec<Option<CachedContent>>,
    /// Hash -> the block holding that content (in use or free).
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks, of which block 0 is the reserved null block.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(num_blocks >= 1 && block_size >= 1, "a pool needs the null block and a block size");
        assert!(num_blocks < u32::MAX as usize, "block ids are u32");
        Self {
            block_size,
            refcounts: vec![0; num_blocks],
            free: FreeList::new(num_blocks),
            content: vec![None; num_blocks],
            cached: HashMap::new(),
        }
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.refcounts.len()
    }
    /// Blocks nobody holds (some may still be revivable from the prefix cache).
    pub fn num_free(&self) -> usize {
        self.free.len
    }
    /// Blocks in use (excluding the null block).
    pub fn num_used(&self) -> usize {
        self.num_blocks() - 1 - self.num_free()
    }
    /// Blocks that carry a prefix-cache entry, in use or free.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }
    /// Takes `n` free blocks, least recently freed first, each with refcount 1;
    /// all or nothing. A taken block loses its prefix-cache entry.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, BlockPoolError> {
        if n > self.free.len {
            return Err(BlockPoolError::Exhausted { requested: n, free: self.free.len });
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.free.pop_front().expect("length checked above");
            if let Some(c) = self.content[b as usize].take() {
                self.cached.remove(&c.hash);
            }
            self.refcounts[b as usize] = 1;
            blocks.push(BlockId(b));
        }
        Ok(blocks)
    }
    /// Adds a holder to a block; a free (cached) block is revived.
    pub fn retain(&mut self, b: BlockId) {
        debug_assert!(b != BlockId::NULL, "retain of the null block");
        let rc = &mut self.refcounts[b.index()];
        if *rc == 0 {
            self.free.remove(b.0);
        }
        *rc += 1;
    }
    /// Drops one holder; the block joins the back of the free list (evicted last)
    /// when none remain.
    pub fn release(&mut self, b: BlockId) {
        let rc = &mut self.refcounts[b.index()];
        debug_assert!(*rc > 0, "double release of {b:?}");
        if *rc == 0 || b == BlockId::NULL {
            return;
        }
        *rc -= 1;
        if *rc == 0 {
            self.free.push_back(b.0);
        }
    }
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refcounts[b.index()]
    }
    /// Would retaining `b` take it off the free list?
    pub fn is_free(&self, b: BlockId) -> bool {
        self.refcounts[b.index()] == 0
    }

    /// Records that full block `b` holds `tokens` after the prefix `parent`.
    /// If another block already holds that content, `b` stays unnamed (it is
    /// freed normally and the first copy keeps serving hits).
    pub fn register(&mut self, b: BlockId, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) {
        debug_assert_eq!(tokens.len(), self.block_size);
        if self.content[b.index()].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash, b);
        self.content[b.index()] = Some(CachedContent { hash, parent, tokens: tokens.into() });
    }

    /// The block holding exactly `tokens` after `parent`, if cached.
    pub fn lookup(&self, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) -> Option<BlockId> {
        let b = *self.cached.get(&hash)?;
        let c = self.content[b.index()].as_ref()?;
        (c.parent == parent && *c.tokens == *tokens).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockTable;

    #[test]
    fn null_block_is_never_handed_out() {
        let mut p = BlockPool::new(4, 16);
        let got = p.allocate(3).unwrap();
        assert!(!got.contains(&BlockId::NULL));
        assert_eq!(p.allocate(1), Err(BlockPoolError::Exhausted { requested: 1, free: 0 }));
    }

    #[test]
    fn refcounted_release_returns_blocks_once() {
        let mut p = BlockPool::new(3, 16);
        let b = p.allocate(1).unwrap()[0];
        p.retain(b);
        p.release(b);
        assert_eq!(p.num_free(), 1);
        p.release(b);
        assert_eq!(p.num_free(), 2);
        assert_eq!(p.num_used(), 0);
    }

    #[test]
    fn block_table_grows_all_or_nothing_and_maps_slots() {
        let mut p = BlockPool::new(4, 4);
        let mut t = BlockTable::default();
        t.reserve(&mut p, 5).unwrap();
        assert_eq!(t.blocks.len(), 2);
        let s = t.slot(5, 4).unwrap();
        assert_eq!(s as usize, t.blocks[1].index() * 4 + 1);
        assert!(t.reserve(&mut p, 100).is_err());
        assert_eq!(t.blocks.len(), 2, "a failed reserve takes nothing");
        t.release(&mut p);
        assert_eq!(p.num_used(), 0);
    }

    #[test]
    fn freed_cached_block_is_revived_until_it_is_reused() {
        let mut p = BlockPool::new(4, 2);
        let [a, b] = p.allocate(2).unwrap()[..] else { panic!() };
        p.register(a, BlockHash(7), None, &[1, 2]);
        p.release(a);
        p.release(b);
        assert_eq!(p.num_free(), 3);
        assert_eq!(p.lookup(BlockHash(7), None, &[1, 2]), Some(a));
        assert_eq!(p.lookup(BlockHash(7), None, &[1, 3]), None, "content is verified, not just the hash");
        p.retain(a);
        assert_eq!(p.num_free(), 2);
        p.release(a);
        // LRU: the never-used block 3 goes first, then b, then a (freed last).
        let got = p.allocate(2).unwrap();
        assert_eq!(got, vec![BlockId(3), b]);
        assert_eq!(p.lookup(BlockHash(7), None, &[1, 2]), Some(a));
        let got = p.allocate(1).unwrap();
        assert_eq!(got, vec![a]);
        assert_eq!(p.lookup(BlockHash(7), None, &[1, 2]), None, "a reused block loses its cache entry");
        assert_eq!(p.num_cached(), 0);
    }
}
