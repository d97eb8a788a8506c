//! Per-step metadata on the device: token ids, positions, the KV slot
//! mapping, the attention plan and the LoRA row segments.
//!
//! The model hands every layer of a step the same positions, slots, attention
//! metadata and adapter rows. Each kind has one device buffer that only grows
//! (allocated a few times while batches grow, then never) and remembers what
//! it holds: a call with the same values as the last one uses the buffer as
//! it is, so each is copied once per step instead of once per op and layer.
//! The tables of LoRA matrix addresses differ per layer and projection but
//! repeat from step to step while the same adapters run; they are kept by
//! content (the addresses themselves are the key, so a hit is always right).
//!
//! Overwriting a buffer that queued kernels still read is safe: the copy is
//! queued on the backend's one stream, after them.

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::{errors, grow, CudaBackend};
use crate::backend::BackendResult;

/// One kind of metadata: the device buffer and the values it holds.
pub(super) struct MetaBuf<T> {
    host: Vec<T>,
    dev: Option<CudaSlice<T>>,
}

impl<T> Default for MetaBuf<T> {
    fn default() -> Self {
        Self { host: Vec::new(), dev: None }
    }
}

/// LoRA address tables kept at most (about 200 per adapter mix on an 8B
/// model: layers x projections); past it the cache starts over.
const MAX_LORA_TABLES: usize = 4096;

#[derive(Default)]
pub(super) struct StepMeta {
    pub token_ids: MetaBuf<u32>,
    pub positions: MetaBuf<u32>,
    pub kv_slots: MetaBuf<u32>,
    pub attn_tokens: MetaBuf<i32>,
    pub attn_tables: MetaBuf<u32>,
    pub lora_rows: MetaBuf<i32>,
    pub gather_rows: MetaBuf<u32>,
    lora_tables: HashMap<Vec<u64>, CudaSlice<u64>>,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy + PartialEq> MetaBuf<T> {
    /// The device address of `values`, copied into this buffer unless it
    /// already holds exactly them. The address is valid until the next `put`
    /// on this buffer (kernels queued before it still read the old values).
    pub fn put(&mut self, be: &CudaBackend, values: &[T]) -> BackendResult<u64> {
        if self.dev.is_none() || self.host != values {
            // Forget the old contents first: if growing or copying fails, the
            // buffer must not pass for holding them on the next call.
            self.host.clear();
            let dev = grow(be, &mut self.dev, values.len().max(1))?;
            if !values.is_empty() {
                let mut dst = dev.slice_mut(..values.len());
                be.stream.memcpy_htod(values, &mut dst).map_err(|e| errors::driver_error(e, "step metadata copy"))?;
            }
            self.host.clear();
            self.host.extend_from_slice(values);
        }
        Ok(be.ptr(self.dev.as_ref().expect("set above")))
    }
}

impl StepMeta {
    /// Device addresses of the per-segment A addresses, Bᵀ addresses and
    /// ranks (i32) for one LoRA call, from the content-keyed cache.
    pub fn lora_table(&mut self, be: &CudaBackend, a: &[u64], bt: &[u64], ranks: &[i32]) -> BackendResult<[u64; 3]> {
        let n = a.len();
        let key: Vec<u64> = lora_table_words(a, bt, ranks);
        if !self.lora_tables.contains_key(&key) {
            if self.lora_tables.len() >= MAX_LORA_TABLES {
                self.lora_tables.clear();
            }
            let dev = be.stream.clone_htod(&key).map_err(|e| errors::driver_error(e, "LoRA table copy"))?;
            self.lora_tables.insert(key.clone(), dev);
        }
        let base = be.ptr(&self.lora_tables[&key]);
        Ok([base, base + 8 * n as u64, base + 16 * n as u64])
    }
}

/// The words of a LoRA table: A addresses, Bᵀ addresses, then the ranks as
/// an i32 array (two per word, little endian, as the kernels read them).
fn lora_table_words(a: &[u64], bt: &[u64], ranks: &[i32]) -> Vec<u64> {
    let mut words: Vec<u64> = a.iter().chain(bt).copied().collect();
    for pair in ranks.chunks(2) {
        let lo = pair[0] as u32 as u64;
        let hi = pair.get(1).map_or(0, |&r| r as u32 as u64);
        words.push(lo | (hi << 32));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_table_words_lay_ranks_out_as_an_i32_array() {
        let words = lora_table_words(&[0x10, 0x20, 0x30], &[0x40, 0x50, 0x60], &[8, 16, -1]);
        assert_eq!(&words[..6], &[0x10, 0x20, 0x30, 0x40, 0x50, 0x60]);
        let bytes: Vec<u8> = words[6..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let ranks: Vec<i32> = bytes.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(&ranks[..3], &[8, 16, -1]);
    }
}
