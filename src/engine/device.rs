//! Choosing a backend by name ("cpu", "cuda:N") and what differs per device at
//! start-up: how it opens and how many KV blocks it gives the model.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError, KvCacheSpec};
use crate::config::Config;
use crate::model::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {other:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")),
        }
    }
}

/// A backend `tandem` can start on.
pub trait OpenBackend: Backend + Sized {
    fn open(cfg: &Config) -> Result<Self, BackendError>;
    /// KV blocks for `model`, decided once its weights are resident.
    fn kv_blocks(&self, model: &ModelConfig, cfg: &Config) -> Result<usize, BackendError>;
}

impl OpenBackend for CpuBackend {
    fn open(cfg: &Config) -> Result<Self, BackendError> {
        Ok(CpuBackend::new(cfg.cpu.threads)?.with_activations(cfg.cpu.activations))
    }
    /// Host memory is committed only as blocks are written, so the configured
    /// count is an upper bound, not an allocation.
    fn kv_blocks(&self, _model: &ModelConfig, cfg: &Config) -> Result<usize, BackendError> {
        Ok(cfg.cache.num_blocks)
    }
}

impl OpenBackend for CudaBackend {
    fn open(cfg: &Config) -> Result<Self, BackendError> {
        match cfg.device.name.parse::<Device>().map_err(BackendError::Invalid)? {
            Device::Cuda(i) => CudaBackend::new(i),
            Device::Cpu => Err(BackendError::Invalid("the CUDA backend was asked to open the CPU".into())),
        }
    }
    /// vLLM's rule: blocks fill `gpu_memory_utilization` of the device after
    /// the weights (already loaded), keeping room for one full step's
    /// activations: logits, the MLP's intermediates and the bf16 GEMM scratch.
    fn kv_blocks(&self, m: &ModelConfig, cfg: &Config) -> Result<usize, BackendError> {
        let tokens = cfg.scheduler.max_num_batched_tokens;
        let per_token = 4 * (m.vocab_size + 6 * m.intermediate_size + 8 * m.hidden_size);
        let gemm_scratch = 2 * m.intermediate_size.max(m.vocab_size) * m.hidden_size;
        let reserve = (512 << 20) + tokens * per_token + gemm_scratch;
        let spec = KvCacheSpec {
            num_layers: m.num_layers,
            num_blocks: 0,
            block_size: cfg.cache.block_size,
            kv_heads: m.num_kv_heads,
            head_dim: m.head_dim,
            dtype: cfg.cache.kv_cache_dtype,
        };
        let n = self.kv_blocks_that_fit(spec, cfg.device.gpu_memory_utilization, reserve)?;
        if n == 0 {
            return Err(BackendError::OutOfMemory(format!(
                "no room for KV blocks within device.gpu_memory_utilization = {} after the weights",
                cfg.device.gpu_memory_utilization
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("gpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn cuda_open_without_a_driver_is_a_clear_error() {
        if crate::backend::cuda::libs::driver_present() {
            eprintln!("SKIP: this machine has a CUDA driver");
            return;
        }
        let mut cfg = Config::defaults();
        cfg.device.name = "cuda:0".into();
        let err = CudaBackend::open(&cfg).err().expect("no driver, no backend").to_string();
        assert!(err.contains("no CUDA driver"), "{err}");
    }
}
