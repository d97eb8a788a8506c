//! A flat pool of refcounted KV blocks with a free list.

use super::BlockId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockPoolError {
    #[error("KV cache exhausted: {requested} blocks requested, {free} free")]
    Exhausted { requested: usize, free: usize },
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcounts: Vec<u32>,
    /// Free blocks; popped from the back so recently freed blocks are reused last
    /// (keeps their contents around longer for prefix caching).
    free: std::collections::VecDeque<BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks, of which block 0 is the reserved null block.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(num_blocks >= 1 && block_size >= 1, "a pool needs the null block and a block size");
        let free = (1..num_blocks as u32).map(BlockId).collect();
        Self { block_size, refcounts: vec![0; num_blocks], free }
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.refcounts.len()
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// Blocks in use (excluding the null block).
    pub fn num_used(&self) -> usize {
        self.num_blocks() - 1 - self.num_free()
    }
    /// Takes `n` free blocks, each with refcount 1; all or nothing.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, BlockPoolError> {
        if n > self.free.len() {
            return Err(BlockPoolError::Exhausted { requested: n, free: self.free.len() });
        }
        let blocks: Vec<BlockId> = self.free.drain(..n).collect();
        for b in &blocks {
            self.refcounts[b.index()] = 1;
        }
        Ok(blocks)
    }
    /// Adds a holder to a block in use (prefix sharing).
    pub fn retain(&mut self, b: BlockId) {
        debug_assert!(self.refcounts[b.index()] > 0, "retain of a free block");
        self.refcounts[b.index()] += 1;
    }
    /// Drops one holder; the block returns to the free list when none remain.
    pub fn release(&mut self, b: BlockId) {
        let rc = &mut self.refcounts[b.index()];
        debug_assert!(*rc > 0, "double release of {b:?}");
        if *rc == 0 || b == BlockId::NULL {
            return;
        }
        *rc -= 1;
        if *rc == 0 {
            self.free.push_back(b);
        }
    }
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refcounts[b.index()]
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
}
