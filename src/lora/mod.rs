//! LoRA adapters: parsing PEFT directories into f32 matrices with the scaling
//! folded in (`peft`), the named registry the API resolves `model` against with
//! a host cache bounded in bytes (`registry`), and the device slots the
//! scheduler hands out (`slots`).
//!
//! An adapter's identity for caching is its content `version` (a hash of the
//! folded weights), never its name: reloading an adapter under the same name
//! gives a new version, so prefix-cache blocks computed with the old weights
//! are never reused (vLLM #30931).

pub mod peft;
pub mod registry;
pub mod slots;

use std::hash::Hasher;
use std::sync::Arc;

pub use peft::{load_peft_dir, load_peft_dir_raw, LoraError, LoraOptions, PeftAdapter, PeftMatrix};
pub use registry::{LoraRegistry, RegistryConfig};
pub use slots::{SlotAssignment, SlotTable};

pub use crate::backend::{LoraDtype, LoraMatrix, LoraValues};

/// A projection of the Llama family that an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's name in HF/PEFT (`q_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The parent module in HF naming (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_module(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.module() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// (in features, out features) of this projection in a model.
    pub fn shape(self, c: &crate::model::ModelConfig) -> (usize, usize) {
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            LoraTarget::Q => (h, qd),
            LoraTarget::K | LoraTarget::V => (h, kvd),
            LoraTarget::O => (qd, h),
            LoraTarget::Gate | LoraTarget::Up => (h, ff),
            LoraTarget::Down => (ff, h),
        }
    }
}

/// Per layer, per [`LoraTarget`] (indexed by `LoraTarget::index`).
pub type LoraLayers<M> = Vec<[Option<M>; 7]>;

/// A parsed adapter, shared (`Arc`) by the registry, requests that use it and
/// the slot that holds it. Immutable: a reload is a new `LoraAdapter`.
#[derive(Debug)]
pub struct LoraAdapter {
    /// The name it was loaded under (what metrics and `/v1/models` show).
    pub name: String,
    /// Where it was read from (a directory), for `/v1/models` `root`.
    pub source: String,
    /// Content version: a hash of the folded weights; never 0 (0 = the base model).
    pub version: u64,
    /// The largest rank over its matrices.
    pub max_rank: usize,
    pub layers: LoraLayers<Arc<LoraMatrix>>,
    /// `base_model_name_or_path` from its config.
    pub base_model: Option<String>,
}

/// Two handles are the same adapter when name and content version agree.
impl PartialEq for LoraAdapter {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.version == other.version
    }
}

impl LoraAdapter {
    /// Builds an adapter and computes its content version.
    pub fn new(name: String, source: String, layers: LoraLayers<Arc<LoraMatrix>>, base_model: Option<String>) -> Self {
        let max_rank = layers.iter().flatten().flatten().map(|m| m.rank).max().unwrap_or(0);
        let version = content_version(&layers);
        Self { name, source, version, max_rank, layers, base_model }
    }

    /// Host bytes of its weights.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(|m| m.bytes()).sum()
    }

    /// A copy under another name (same weights, same version).
    pub fn renamed(&self, name: &str, source: &str) -> Self {
        Self {
            name: name.to_string(),
            source: source.to_string(),
            version: self.version,
            max_rank: self.max_rank,
            layers: self.layers.clone(),
            base_model: self.base_model.clone(),
        }
    }
}

/// A 64-bit hash of every matrix with its position, shape and storage dtype
/// (bf16 weights compute other outputs than f32 ones, so they are another
/// version). SipHash with fixed keys: the same weights give the same version in
/// every process.
fn content_version(layers: &LoraLayers<Arc<LoraMatrix>>) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x7461_6e64_656d_6c6f, 0x7261_7665_7273_696f);
    let mut buf = Vec::with_capacity(4096);
    for (l, targets) in layers.iter().enumerate() {
        for (t, m) in targets.iter().enumerate() {
            let Some(m) = m else { continue };
            for v in [l, t, m.rank, m.in_features, m.out_features] {
                h.write_u64(v as u64);
            }
            write_values(&m.a, &mut h, &mut buf);
            write_values(&m.bt, &mut h, &mut buf);
        }
    }
    // 0 means "no adapter" in prefix-cache keys.
    h.finish().max(1)
}

/// Little-endian bytes of the stored values (for hashing), with a dtype tag.
fn write_values(v: &LoraValues, h: &mut impl Hasher, buf: &mut Vec<u8>) {
    match v {
        LoraValues::F32(v) => {
            h.write_u8(0);
            for chunk in v.chunks(1024) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                h.write(buf);
            }
        }
        LoraValues::Bf16(v) => {
            h.write_u8(1);
            for chunk in v.chunks(2048) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                h.write(buf);
            }
        }
    }
}
