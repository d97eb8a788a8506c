//! Reuse of activation buffers: a tensor's buffer goes back to its thread's
//! free list when the tensor is dropped, and the next tensor of the same
//! length on that thread takes it, so a decode step stops allocating once
//! warm (every step has the same shapes).

use std::cell::RefCell;

/// What one thread keeps for reuse: a decode step's tensors and a moderate
/// prefill's, bounded so that one long prompt does not pin its peak.
const MAX_KEPT_BYTES: usize = 64 << 20;
const MAX_KEPT: usize = 64;

#[derive(Default)]
struct FreeList {
    bufs: Vec<Vec<f32>>,
    bytes: usize,
}

thread_local! {
    static FREE: RefCell<FreeList> = RefCell::default();
}

/// An empty buffer with room for exactly `n` floats, if this thread kept one.
pub fn take(n: usize) -> Option<Vec<f32>> {
    FREE.try_with(|f| {
        let mut f = f.borrow_mut();
        let i = f.bufs.iter().rposition(|b| b.capacity() == n)?;
        let mut v = f.bufs.swap_remove(i);
        f.bytes -= 4 * n;
        v.clear();
        Some(v)
    })
    .ok()
    .flatten()
}

/// Keeps `v` for a later [`take`] on this thread, or frees it when the list is full.
pub fn give(v: Vec<f32>) {
    let bytes = 4 * v.capacity();
    if bytes == 0 {
        return;
    }
    // After the thread's locals are gone (thread exit), `v` is simply freed.
    let _ = FREE.try_with(|f| {
        let mut f = f.borrow_mut();
        if f.bufs.len() < MAX_KEPT && f.bytes + bytes <= MAX_KEPT_BYTES {
            f.bytes += bytes;
            f.bufs.push(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_serves_the_next_of_its_length_only() {
        let v = vec![1f32; 1000];
        let p = v.as_ptr();
        give(v);
        assert!(take(999).is_none());
        let v = take(1000).expect("kept");
        assert_eq!((v.as_ptr(), v.len(), v.capacity()), (p, 0, 1000));
        assert!(take(1000).is_none());
    }

    #[test]
    fn the_free_list_is_bounded() {
        let big = MAX_KEPT_BYTES / 4 + 1;
        give(vec![0f32; big]);
        assert!(take(big).is_none(), "over the byte bound: freed, not kept");
        for _ in 0..MAX_KEPT + 5 {
            give(vec![0f32; 7]);
        }
        let kept = std::iter::from_fn(|| take(7)).count();
        assert_eq!(kept, MAX_KEPT);
    }

    #[test]
    fn tensors_reuse_their_buffers_and_start_zeroed() {
        use crate::backend::Backend;
        let be = super::super::CpuBackend::new(1).unwrap();
        let mut t = be.zeros(3, 5).unwrap();
        t.data.fill(7.0);
        let p = t.data.as_ptr();
        drop(t);
        let t = be.zeros(3, 5).unwrap();
        assert_eq!(t.data.as_ptr(), p);
        assert!(t.data.iter().all(|&v| v == 0.0));
    }
}
