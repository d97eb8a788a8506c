//! One adapted projection of a LoRA adapter as plain data: the form every
//! backend loads into an adapter slot (`Backend::load_lora`). It lives here,
//! not in `lora/`, so the backend depends on nothing above it.

/// How adapter weights are stored for compute. f32 reproduces peft's float32
/// outputs; bf16 halves the bytes every distinct adapter in a step costs to
/// read (the limit when many adapters share a batch), as vLLM stores LoRA
/// weights in the model's 16-bit dtype. Activations stay f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDtype {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for LoraDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(LoraDtype::F32),
            "bf16" => Ok(LoraDtype::Bf16),
            _ => Err(format!("LoRA dtype {s:?}: expected f32 or bf16")),
        }
    }
}

/// A matrix's values in their storage dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraValues {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl LoraValues {
    pub fn from_f32(v: Vec<f32>, dtype: LoraDtype) -> Self {
        match dtype {
            LoraDtype::F32 => LoraValues::F32(v),
            LoraDtype::Bf16 => LoraValues::Bf16(v.into_iter().map(half::bf16::from_f32).collect()),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            LoraValues::F32(v) => v.len(),
            LoraValues::Bf16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        match self {
            LoraValues::F32(v) => v.len() * 4,
            LoraValues::Bf16(v) => v.len() * 2,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            LoraValues::F32(v) => v.clone(),
            LoraValues::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// One adapted projection: `y += (x · Aᵀ) · Bt`, with the PEFT scaling already
/// folded into `bt`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMatrix {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// PEFT `lora_A.weight`, `[rank, in]` row-major.
    pub a: LoraValues,
    /// `(scaling · lora_B.weight)ᵀ`, `[rank, out]` row-major, so the expand is
    /// a sum of scaled rows (contiguous, vectorisable).
    pub bt: LoraValues,
}

impl LoraMatrix {
    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.bt.bytes()
    }
}
