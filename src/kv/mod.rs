//! Paged KV-cache bookkeeping: which blocks are free, who holds which. The KV
//! tensors themselves live in the backend (`Backend::alloc_kv`); this module only
//! hands out block ids. Block 0 is reserved as the null block (padding in block
//! tables), so it is never handed out.

mod block_pool;
mod manager;

pub use block_pool::{BlockPool, BlockPoolError};
pub use manager::{KvCacheManager, PrefixHit};

/// Identity of a full block's content in the prefix cache: a chained hash of
/// the previous block's hash, this block's tokens and the adapter's content
/// version (never its name: a reloaded adapter must not reuse stale KV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

impl BlockHash {
    pub fn of(parent: Option<BlockHash>, tokens: &[u32], adapter_version: u64) -> Self {
        use std::hash::{Hash, Hasher};
        // DefaultHasher::new() has fixed keys: the same content hashes the same
        // for the life of the process, which is all the cache needs.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        adapter_version.hash(&mut h);
        tokens.hash(&mut h);
        BlockHash(h.finish())
    }
}

/// Block ids are part of the backend's KV-cache interface (block tables are
/// what attention reads); this module hands them out.
pub use crate::backend::BlockId;

/// Cache slot (block * block_size + offset) of token position `pos` of a
/// sequence whose blocks, in token order, are `blocks`.
pub fn slot(blocks: &[BlockId], pos: usize, block_size: usize) -> Option<u32> {
    let block = blocks.get(pos / block_size)?;
    u32::try_from(block.index() * block_size + pos % block_size).ok()
}

/// Blocks held by one sequence, in token order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
}

impl BlockTable {
    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
        tokens.div_ceil(block_size)
    }
    /// Cache slot (block * block_size + offset) of token position `pos`.
    pub fn slot(&self, pos: usize, block_size: usize) -> Option<u32> {
        slot(&self.blocks, pos, block_size)
    }
    /// Grows the table so it can hold `tokens` tokens, taking blocks from `pool`.
    /// On failure nothing is taken.
    pub fn reserve(&mut self, pool: &mut BlockPool, tokens: usize) -> Result<(), BlockPoolError> {
        let need = Self::blocks_for(tokens, pool.block_size()).saturating_sub(self.blocks.len());
        let new = pool.allocate(need)?;
        self.blocks.extend(new);
        Ok(())
    }
    /// Returns every block to `pool`.
    pub fn release(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
    }
}
