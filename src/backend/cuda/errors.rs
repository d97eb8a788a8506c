//! CUDA driver errors as backend errors: which ones fail a step and which
//! ones mean the context is gone.
//!
//! After a kernel faults (an illegal address, a trap, a device-side assert)
//! the context is unusable: every later call returns the same error, so
//! retrying is pointless and the engine must stop ([`BackendError::DeviceLost`]).
//! Everything else (a refused launch, out of memory, a bad argument) fails the
//! op that made it, and the engine goes on with the next step.

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

use crate::backend::BackendError;

/// Whether `code` leaves the context unusable (the driver API's "sticky"
/// errors: the process must create a new context, i.e. restart).
pub fn context_is_lost(code: CUresult) -> bool {
    use CUresult::*;
    matches!(
        code,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_NVLINK_UNCORRECTABLE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
            | CUDA_ERROR_DEINITIALIZED
            | CUDA_ERROR_EXTERNAL_DEVICE
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            // What a GPU that fell off the bus (an Xid) typically reports.
            | CUDA_ERROR_UNKNOWN
    )
}

/// Set once any driver call has reported a lost context. Every backend of
/// this process shares its device's primary context (cudarc retains it), so
/// the loss is the process's, whichever call saw it first: a training step,
/// a checkpoint's download or a serving step.
static CONTEXT_LOST: AtomicBool = AtomicBool::new(false);

/// Whether a driver call of this process has reported a lost context.
pub fn context_lost_seen() -> bool {
    CONTEXT_LOST.load(Ordering::SeqCst)
}

/// A failed driver call during `what`, typed by what it means for the engine.
pub fn driver_error(e: DriverError, what: &str) -> BackendError {
    let code = e.0;
    if context_is_lost(code) {
        CONTEXT_LOST.store(true, Ordering::SeqCst);
        BackendError::DeviceLost(format!("CUDA {what}: {code:?}"))
    } else if code == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BackendError::OutOfMemory(format!("CUDA {what}: {code:?}"))
    } else {
        BackendError::Device(format!("CUDA {what}: {code:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_errors_lose_the_device_and_the_rest_fail_one_op() {
        use CUresult::*;
        for code in
            [CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_LAUNCH_FAILED, CUDA_ERROR_ECC_UNCORRECTABLE, CUDA_ERROR_ASSERT]
        {
            let e = driver_error(DriverError(code), "synchronize");
            assert!(e.is_device_lost(), "{code:?}: {e}");
            assert!(e.to_string().contains("synchronize"), "{e}");
        }
        assert!(matches!(driver_error(DriverError(CUDA_ERROR_OUT_OF_MEMORY), "alloc"), BackendError::OutOfMemory(_)));
        for code in [CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, CUDA_ERROR_NOT_FOUND] {
            let e = driver_error(DriverError(code), "launch of rms_norm");
            assert!(matches!(e, BackendError::Device(_)), "{code:?}: {e}");
        }
    }
}
