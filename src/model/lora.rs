//! LoRA as the model sees it: adapters resident in the runner's slots, and
//! which slot each row of a step runs with.

use std::ops::Range;

use crate::backend::{Backend, BackendError, BackendResult, LoraSegment};
use crate::lora::{LoraAdapter, LoraLayers, LoraTarget};

use super::layer::LoraHook;
use super::ModelConfig;

/// An adapter loaded into a device slot.
pub struct DeviceAdapter<B: Backend> {
    pub version: u64,
    layers: LoraLayers<B::LoraWeight>,
}

impl<B: Backend> DeviceAdapter<B> {
    pub fn load(be: &B, a: &LoraAdapter, cfg: &ModelConfig) -> Result<Self, BackendError> {
        if a.layers.len() != cfg.num_layers {
            return Err(BackendError::Invalid(format!(
                "adapter '{}' has {} layers, the model {}",
                a.name,
                a.layers.len(),
                cfg.num_layers
            )));
        }
        let mut layers = Vec::with_capacity(a.layers.len());
        for targets in &a.layers {
            let mut out: [Option<B::LoraWeight>; 7] = Default::default();
            for (slot, m) in out.iter_mut().zip(targets) {
                if let Some(m) = m {
                    *slot = Some(be.load_lora(m)?);
                }
            }
            layers.push(out);
        }
        Ok(Self { version: a.version, layers })
    }
}

/// The LoRA part of a step: runs of rows that share an adapter slot (rows in
/// no run are base-only), and the runner's slots.
pub struct LoraStep<'a, B: Backend> {
    pub segments: &'a [(Range<usize>, usize)],
    pub slots: &'a [Option<DeviceAdapter<B>>],
}

impl<B: Backend> LoraStep<'_, B> {
    pub fn none() -> Self {
        LoraStep { segments: &[], slots: &[] }
    }

    /// The segments whose adapter adapts `target` in `layer`.
    pub fn segments(&self, layer: usize, target: LoraTarget) -> Vec<LoraSegment<'_, B>> {
        self.segments
            .iter()
            .filter_map(|(rows, slot)| {
                let a = self.slots.get(*slot)?.as_ref()?;
                let w = a.layers[layer][target.index()].as_ref()?;
                Some(LoraSegment { rows: rows.clone(), w })
            })
            .collect()
    }
}

impl<B: Backend> LoraHook<B> for LoraStep<'_, B> {
    fn add(
        &mut self,
        be: &B,
        layer: usize,
        target: LoraTarget,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> BackendResult<()> {
        be.lora_add(x, &self.segments(layer, target), out)
    }
}
