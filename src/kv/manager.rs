//! The KV-cache manager: one owner for the block pool and the prefix cache.
//! The scheduler asks it for a request's cached prefix, for slots for the
//! tokens it is about to run, and gives blocks back when a request ends or is
//! preempted. It knows token ids and block ids only.

use super::{BlockHash, BlockPool, BlockPoolError, BlockTable};

#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    prefix_caching: bool,
}

/// A request's cached prefix: blocks to adopt and the tokens they cover.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<super::BlockId>,
    pub num_tokens: usize,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self { pool: BlockPool::new(num_blocks, block_size), prefix_caching }
    }
    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
    /// Usable blocks (the null block excluded).
    pub fn capacity(&self) -> usize {
        self.pool.num_blocks() - 1
    }
    pub fn usage(&self) -> f64 {
        self.pool.num_used() as f64 / self.capacity().max(1) as f64
    }

    /// Extends `hashes` with the chained hashes of every full block of `tokens`
    /// not yet hashed.
    pub fn hash_full_blocks(&self, tokens: &[u32], adapter_version: u64, hashes: &mut Vec<BlockHash>) {
        let bs = self.block_size();
        while (hashes.len() + 1) * bs <= tokens.len() {
            let i = hashes.len();
            hashes.push(BlockHash::of(hashes.last().copied(), &tokens[i * bs..(i + 1) * bs], adapter_version));
        }
    }

    /// The longest run of leading full blocks of `tokens` already in the cache,
    /// leaving at least one token to compute (its logits are needed).
    pub fn find_prefix(&self, tokens: &[u32], hashes: &[BlockHash]) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching {
            return hit;
        }
        let bs = self.block_size();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        for (i, &h) in hashes.iter().take(max_blocks).enumerate() {
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            match self.pool.lookup(h, parent, &tokens[i * bs..(i + 1) * bs]) {
                Some(b) => hit.blocks.push(b),
                None => break,
            }
        }
        hit.num_tokens = hit.blocks.len() * bs;
        hit
    }

    /// Makes `table` able to hold `num_tokens` tokens, first adopting `hit`'s
    /// blocks (a table that is empty so far), then taking fresh ones. All or
    /// nothing: on failure neither the table nor the pool changed.
    pub fn allocate(
        &mut self,
        table: &mut BlockTable,
        hit: &PrefixHit,
        num_tokens: usize,
    ) -> Result<(), BlockPoolError> {
        debug_assert!(hit.blocks.is_empty() || table.blocks.is_empty());
        let have = table.blocks.len() + hit.blocks.len();
        let need = BlockTable::blocks_for(num_tokens, self.block_size()).saturating_sub(have);
        // Reviving a free cached block takes it off the free list too.
        let revived = hit.blocks.iter().filter(|&&b| self.pool.is_free(b)).count();
        let free = self.pool.num_free();
        if need + revived > free {
            return Err(BlockPoolError::Exhausted { requested: need + revived, free });
        }
        for &b in &hit.blocks {
            self.pool.retain(b);
        }
        table.blocks.extend_from_slice(&hit.blocks);
        let fresh = self.pool.allocate(need)?;
        table.blocks.extend(fresh);
        Ok(())
    }

    /// Registers the blocks of `table` that are full of computed tokens
    /// (`hashes[i]` names block i) from block `from` on.
    pub fn cache_full_blocks(&mut self, table: &BlockTable, tokens: &[u32], hashes: &[BlockHash], from: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size();
        for i in from..hashes.len().min(table.blocks.len()) {
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            self.pool.register(table.blocks[i], hashes[i], parent, &tokens[i * bs..(i + 1) * bs]);
        }
    }

    /// Gives back every block of `table`, tail first, so the tail of a prefix
    /// is evicted before its head.
    pub fn free(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            self.pool.release(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(m: &KvCacheManager, tokens: &[u32]) -> Vec<BlockHash> {
        let mut h = Vec::new();
        m.hash_full_blocks(tokens, 0, &mut h);
        h
    }

    #[test]
    fn second_request_with_same_prefix_adopts_cached_blocks() {
        let mut m = KvCacheManager::new(16, 4, true);
        let a: Vec<u32> = (0..10).collect();
        let ha = hashes(&m, &a);
        assert_eq!(ha.len(), 2);
        let mut ta = BlockTable::default();
        let hit = m.find_prefix(&a, &ha);
        assert_eq!(hit.num_tokens, 0);
        m.allocate(&mut ta, &hit, a.len()).unwrap();
        m.cache_full_blocks(&ta, &a, &ha, 0);
        // Same first 8 tokens, different tail.
        let b: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        let hb = hashes(&m, &b);
        let hit = m.find_prefix(&b, &hb);
        assert_eq!(hit.num_tokens, 8);
        assert_eq!(hit.blocks, ta.blocks[..2]);
        let mut tb = BlockTable::default();
        m.allocate(&mut tb, &hit, b.len()).unwrap();
        assert_eq!(m.pool().refcount(ta.blocks[0]), 2);
        m.free(&mut ta);
        m.free(&mut tb);
        assert_eq!(m.pool().num_used(), 0);
        // Free but still cached: a third request revives them.
        let hit = m.find_prefix(&b, &hb);
        assert_eq!(hit.num_tokens, 8);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut m = KvCacheManager::new(16, 4, true);
        let a: Vec<u32> = (0..8).collect();
        let ha = hashes(&m, &a);
        let mut t = BlockTable::default();
        m.allocate(&mut t, &PrefixHit::default(), 8).unwrap();
        m.cache_full_blocks(&t, &a, &ha, 0);
        assert_eq!(m.find_prefix(&a, &ha).num_tokens, 4);
    }

    #[test]
    fn adapter_version_separates_prefixes() {
        let m = KvCacheManager::new(4, 2, true);
        let t = [1, 2, 3, 4];
        let (mut h0, mut h1) = (vec![], vec![]);
        m.hash_full_blocks(&t, 0, &mut h0);
        m.hash_full_blocks(&t, 1, &mut h1);
        assert_ne!(h0, h1);
    }

    #[test]
    fn allocation_counts_revived_blocks_against_the_free_list() {
        let mut m = KvCacheManager::new(4, 2, true);
        let a = [1, 2, 3, 4, 5];
        let ha = hashes(&m, &a);
        let mut t = BlockTable::default();
        m.allocate(&mut t, &PrefixHit::default(), 5).unwrap();
        m.cache_full_blocks(&t, &a, &ha, 0);
        m.free(&mut t);
        let hit = m.find_prefix(&a, &ha);
        assert_eq!(hit.blocks.len(), 2);
        // 3 free blocks, 2 of them the hit: asking for 2 more must fail cleanly.
        let mut t2 = BlockTable::default();
        assert!(m.allocate(&mut t2, &hit, 8).is_err());
        assert!(t2.blocks.is_empty());
        assert_eq!(m.pool().num_free(), 3);
        m.allocate(&mut t2, &hit, 6).unwrap();
        assert_eq!(m.pool().num_free(), 0);
    }
}
