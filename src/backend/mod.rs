//! Compute backends. The model is written once against [`Backend`]; the CPU
//! backend is the reference every other backend is tested against.
//!
//! Activations are f32 `[rows, cols]` row-major tensors owned by the backend.
//! Weights keep the storage kind they were loaded in ([`HostWeight`]); the
//! backend picks the kernel for each kind, so quantised formats never leak into
//! model code.

pub mod cpu;
pub mod cuda;
pub mod fault_inject;
mod lora_matrix;
pub mod selftest;

use std::ops::Range;
use std::sync::Arc;

use crate::quant::ggml::WeightKind;

pub use lora_matrix::{LoraDtype, LoraMatrix, LoraValues};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("weight '{name}': {reason}")]
    BadWeight { name: String, reason: String },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device reported an error (a failed launch or library call); what
    /// was computed in the op is lost.
    #[error("device error: {0}")]
    Device(String),
    /// The device can run nothing more: its context is gone (a kernel fault,
    /// an uncorrectable ECC error, the GPU fell off the bus). Unlike
    /// [`BackendError::Device`], which fails one step, this ends the engine.
    #[error("the device is lost: {0}")]
    DeviceLost(String),
    #[error("{0}")]
    Invalid(String),
}

impl BackendError {
    /// Whether nothing more can run on this device (see [`BackendError::DeviceLost`]).
    pub fn is_device_lost(&self) -> bool {
        matches!(self, BackendError::DeviceLost(_))
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// Where loaded bytes live: an owned buffer, or a read-only file mapping
/// whose resident pages can be handed back once they have been read.
pub trait ByteStore: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// Lets the OS drop the resident pages of `range` (a file mapping reads
    /// them again on the next access). A no-op for owned buffers.
    fn release_pages(&self, _range: Range<usize>) {}
}

impl ByteStore for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Bytes of a weight as loaded: usually a range of a memory-mapped file (no copy),
/// or an owned buffer when loading had to rearrange the data.
#[derive(Clone)]
pub struct WeightBytes {
    owner: Arc<dyn ByteStore>,
    range: Range<usize>,
}

impl WeightBytes {
    pub fn new(owner: Arc<dyn ByteStore>, range: Range<usize>) -> Option<Self> {
        let len = owner.bytes().len();
        (range.start <= range.end && range.end <= len).then_some(Self { owner, range })
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self { owner: Arc::new(v), range: 0..len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.owner.bytes()[self.range.clone()]
    }
    /// Hands these bytes' resident file pages back to the OS (after they were
    /// quantised into a copy, say); they are read again if ever used.
    pub fn release_pages(&self) {
        self.owner.release_pages(self.range.clone());
    }
}

/// A weight matrix `[rows, cols]` (HF `nn.Linear.weight` layout: `rows` = out
/// features, `cols` = in features; each row is whole blocks of `kind`). Vectors
/// (norm weights, biases) are `rows = 1`.
#[derive(Clone)]
pub struct HostWeight {
    pub name: String,
    pub kind: WeightKind,
    pub rows: usize,
    pub cols: usize,
    pub bytes: WeightBytes,
    /// The order of the inputs the rows were stored in, when it is not the
    /// natural one (GPTQ act-order, `quant::gptq`): element `j` of a row
    /// multiplies input `input_perm[j]`.
    pub input_perm: Option<Arc<[u32]>>,
}

impl HostWeight {
    /// A weight in natural input order.
    pub fn new(name: String, kind: WeightKind, rows: usize, cols: usize, bytes: WeightBytes) -> Self {
        Self { name, kind, rows, cols, bytes, input_perm: None }
    }

    /// Rows `rows` of the weight as f32 `[rows.len(), cols]` in natural input
    /// order (act-order rows are put back), rows dequantised in parallel. What
    /// every reader of a weight's values outside the kernels uses (merge,
    /// export, `--quantize`), so none of them can forget the permutation.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) -> Result<(), String> {
        use rayon::prelude::*;
        // Sizes and the permutation are checked once here, so the loop below
        // can neither read past a row nor write past `out`.
        self.validate().map_err(|e| e.to_string())?;
        let cols = self.cols;
        let rb = self.kind.row_bytes(cols).unwrap_or(0);
        if rows.end > self.rows || out.len() != rows.len() * cols {
            return Err(format!("rows {rows:?} of a [{}, {cols}] weight into {} values", self.rows, out.len()));
        }
        let bytes = self.bytes.as_slice();
        let perm = self.input_perm.as_deref();
        out.par_chunks_mut(cols).zip(bytes[rows.start * rb..rows.end * rb].par_chunks(rb)).try_for_each_init(
            || perm.map(|_| vec![0f32; cols]),
            |stored, (row, b)| match (stored, perm) {
                (Some(stored), Some(perm)) => {
                    crate::quant::ggml::dequantize(self.kind, b, stored).map_err(|e| e.to_string())?;
                    for (&k, &v) in perm.iter().zip(stored.iter()) {
                        row[k as usize] = v;
                    }
                    Ok(())
                }
                _ => crate::quant::ggml::dequantize(self.kind, b, row).map_err(|e| e.to_string()),
            },
        )
    }

    /// The whole weight as f32 `[rows, cols]` in natural input order.
    pub fn dequantize_natural(&self) -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0..self.rows, &mut out)?;
        Ok(out)
    }

    /// Checks that the byte length matches kind and shape.
    pub fn validate(&self) -> Result<(), BackendError> {
        let bad = |reason: String| BackendError::BadWeight { name: self.name.clone(), reason };
        let row_bytes = self
            .kind
            .row_bytes(self.cols)
            .ok_or_else(|| bad(format!("{} columns is not a whole number of {:?} blocks", self.cols, self.kind)))?;
        let want = row_bytes.checked_mul(self.rows).ok_or_else(|| bad("size overflows".into()))?;
        if let Some(p) = &self.input_perm {
            let mut seen = vec![false; self.cols];
            if p.len() != self.cols
                || !p.iter().all(|&k| (k as usize) < self.cols && !std::mem::replace(&mut seen[k as usize], true))
            {
                return Err(bad(format!("input permutation is not a permutation of {} inputs", self.cols)));
            }
        }
        if self.bytes.as_slice().len() != want {
            return Err(bad(format!(
                "expected {want} bytes for [{}, {}] {:?}, found {}",
                self.rows,
                self.cols,
                self.kind,
                self.bytes.as_slice().len()
            )));
        }
        Ok(())
    }
}

/// How rotary embedding pairs dimensions within a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// HF "rotate half": dimension i pairs with i + d/2 (Llama, Qwen2, Mistral in HF layout).
    Neox,
    /// Adjacent pairs (2i, 2i+1), GPT-J / llama.cpp's NORM.
    Interleaved,
}

/// Shape of the paged KV cache: per layer, `num_blocks` blocks of `block_size`
/// token slots, each slot holding `kv_heads * head_dim` keys and as many values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvCacheSpec {
    /// Bytes of one block: keys and values of every layer.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.block_size * self.kv_heads * self.head_dim * self.dtype.bytes()
    }
}

/// What the KV cache stores (`cache.kv_cache_dtype`). bf16 halves the cache's
/// memory and the attention's reads; keys and values are rounded once, when
/// written (CUDA only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// f32, as computed ("auto": the activations' type).
    #[default]
    #[serde(alias = "auto")]
    F32,
    Bf16,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

/// Index of a KV block in the backend's cache (block 0 is the null block that
/// pads block tables; the `kv` module hands out the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub const NULL: BlockId = BlockId(0);
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One sequence's part of a flattened varlen batch, as attention needs it.
#[derive(Debug, Clone)]
pub struct SeqAttention<'a> {
    /// Rows of the flattened batch that are this sequence's new tokens.
    pub rows: Range<usize>,
    /// Tokens in the cache for this sequence after this step's KV write
    /// (the last new token sits at position `context_len - 1`).
    pub context_len: usize,
    /// Blocks holding this sequence's KV, in order.
    pub block_table: &'a [BlockId],
}

/// What attention needs to know about a batch besides the tensors.
#[derive(Debug, Clone)]
pub struct AttentionMeta<'a> {
    pub seqs: &'a [SeqAttention<'a>],
    pub num_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding-window attention: a token at position p sees keys p-w+1..=p.
    pub sliding_window: Option<usize>,
}

/// Which keys one query row of a batch attends to: positions `[first, ctx)` of
/// sequence `seq` (causal up to its own position, cut by a sliding window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub seq: usize,
    pub first: usize,
    pub ctx: usize,
}

impl AttentionMeta<'_> {
    /// The span of every row of a `rows`-row batch; `None` for rows in no sequence.
    pub fn row_spans(&self, rows: usize) -> Vec<Option<RowSpan>> {
        let mut spans = vec![None; rows];
        for (s, seq) in self.seqs.iter().enumerate() {
            let n = seq.rows.len();
            for (i, r) in seq.rows.clone().enumerate() {
                let ctx = seq.context_len - n + i + 1;
                let first = self.sliding_window.map_or(0, |w| ctx.saturating_sub(w));
                spans[r] = Some(RowSpan { seq: s, first, ctx });
            }
        }
        spans
    }
}

/// Precomputed rotary frequencies (one inverse frequency per pair in a head).
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub inv_freq: Vec<f32>,
    pub style: RopeStyle,
}

/// The ops a model needs, for inference and for training LoRA adapters
/// through frozen weights. All tensors are f32 `[rows, cols]`, row-major.
///
/// Every op can fail (a device out of memory, a failed launch) and says so; a
/// failed op fails the step or training step it belongs to, never the process.
/// Shapes are the caller's contract: a mismatch is a bug and panics.
pub trait Backend: Send + Sync + 'static {
    type Weight: Send + Sync;
    type Tensor: Send;
    type KvCache: Send;
    /// One adapted projection of a LoRA adapter, resident where the backend computes.
    type LoraWeight: Send + Sync;

    fn name(&self) -> String;
    /// Runs `f` with this thread's matmuls in the backend's exact mode (the
    /// CPU's f32 activations) whatever mode serving uses: training's forward
    /// and gradients are the ones checked against peft. A backend with one
    /// mode just runs `f`.
    fn exact_matmuls<R>(&self, f: impl FnOnce() -> R) -> R
    where
        Self: Sized,
    {
        f()
    }
    /// Whether the device has been lost (see [`BackendError::DeviceLost`]),
    /// whichever op saw it: callers that turn errors into other errors (a
    /// failed checkpoint, a broken optimiser step) ask this before deciding
    /// that only their own work failed.
    fn device_lost(&self) -> bool {
        false
    }
    fn load_weight(&self, w: HostWeight) -> BackendResult<Self::Weight>;
    /// (rows, cols) of a weight.
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);
    fn zeros(&self, rows: usize, cols: usize) -> BackendResult<Self::Tensor>;
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> BackendResult<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> BackendResult<Vec<f32>>;
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);

    /// out[i] = table[ids[i]] (rows of a possibly quantised table).
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Tensor) -> BackendResult<()>;
    /// out = rms_norm(x) * w.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32, out: &mut Self::Tensor) -> BackendResult<()>;
    /// x += y.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> BackendResult<()>;
    /// Several independent `out = x · wᵀ (+ bias)` sharing one input, in one dispatch.
    fn matmul_many(&self, x: &Self::Tensor, jobs: &mut [MatmulJob<'_, Self>]) -> BackendResult<()>;
    /// out = x · wᵀ.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight, out: &mut Self::Tensor) -> BackendResult<()> {
        self.matmul_many(x, &mut [MatmulJob { w, bias: None, out }])
    }
    /// Rotary embedding in place on `x` = `[tokens, heads * head_dim]`.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()>;
    /// out = silu(gate) * up.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor, out: &mut Self::Tensor) -> BackendResult<()>;
    /// Rows `rows` of `x`, in order, as a new tensor.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> BackendResult<Self::Tensor>;

    /// Puts one LoRA matrix pair where the backend computes (a device slot).
    fn load_lora(&self, m: &Arc<LoraMatrix>) -> BackendResult<Self::LoraWeight>;
    /// For each segment, `out[rows] += (x[rows] · Aᵀ) · Bt` with that segment's
    /// adapter (SGMV-style: one call covers every adapter in the batch; rows in
    /// no segment are untouched and cost nothing).
    fn lora_add(
        &self,
        x: &Self::Tensor,
        segments: &[LoraSegment<'_, Self>],
        out: &mut Self::Tensor,
    ) -> BackendResult<()>;

    fn alloc_kv(&self, spec: KvCacheSpec) -> BackendResult<Self::KvCache>;
    /// Writes each token's K and V (`[tokens, kv_heads*head_dim]`) to its slot
    /// (`block * block_size + offset`) in `layer`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[u32],
    ) -> BackendResult<()>;
    /// Causal attention of each new token over its sequence's cached keys/values.
    /// `q` and `out` are `[tokens, num_heads*head_dim]`.
    fn paged_attention(
        &self,
        cache: &Self::KvCache,
        layer: usize,
        q: &Self::Tensor,
        meta: &AttentionMeta<'_>,
        out: &mut Self::Tensor,
    ) -> BackendResult<()>;

    // ---- Training: gradients through frozen weights, and the optimiser. ----

    /// `dx (+)= Σ_j dy_j · W_j`: the input gradient of `y_j = x · W_jᵀ` through
    /// frozen weights of any kind (the transpose direction of `matmul`), summed
    /// over jobs that share the input. `accumulate` adds to `dx`, else overwrites.
    fn matmul_input_grad(
        &self,
        jobs: &[(&Self::Tensor, &Self::Weight)],
        dx: &mut Self::Tensor,
        accumulate: bool,
    ) -> BackendResult<()>;
    /// `c = alpha · op(a) · op(b) + beta · c` on f32 tensors, `op` transposing
    /// when its flag is set (LoRA factors and their gradients).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: &Self::Tensor,
        trans_a: bool,
        b: &Self::Tensor,
        trans_b: bool,
        alpha: f32,
        beta: f32,
        c: &mut Self::Tensor,
    ) -> BackendResult<()>;
    /// `dx += ∂(rms_norm(x) · w)/∂x · dy`, row by row.
    fn rms_norm_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        eps: f32,
        dy: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> BackendResult<()>;
    /// The gradient through [`Backend::rope`], in place (the inverse rotation).
    fn rope_backward(
        &self,
        dx: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> BackendResult<()>;
    /// Gradients of `out = silu(gate) * up` with respect to gate and up.
    fn silu_mul_backward(
        &self,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        dout: &Self::Tensor,
        dgate: &mut Self::Tensor,
        dup: &mut Self::Tensor,
    ) -> BackendResult<()>;
    /// Gradients of causal attention over whole sequences: `q`, `k`, `v`,
    /// `out` and `dout` are rows of one flattened batch in which every sequence
    /// of `meta` is complete (`context_len == rows.len()`, so key j of a
    /// sequence is its row `rows.start + j`). Overwrites `dq`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        dout: &Self::Tensor,
        meta: &AttentionMeta<'_>,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
    ) -> BackendResult<()>;
    /// Cross-entropy of each row of `logits` against `labels[row]`. With
    /// `grad_scale = Some(s)`, overwrites `logits` with `s · (softmax − onehot)`,
    /// the gradient of `s · Σ loss`.
    fn cross_entropy(
        &self,
        logits: &mut Self::Tensor,
        labels: &[u32],
        grad_scale: Option<f32>,
    ) -> BackendResult<CrossEntropySums>;
    /// `dst[rows[i]] += src[i]` (the gradient of `gather_rows`; rows distinct).
    fn add_rows(&self, src: &Self::Tensor, rows: &[usize], dst: &mut Self::Tensor) -> BackendResult<()>;
    /// Inverted dropout: `out = x · keep / (1 − p)`, `keep` drawn per element
    /// from a counter-based hash of (`seed`, element index) that every backend
    /// computes alike, so the backward is the same call on the gradient.
    fn dropout(&self, x: &Self::Tensor, p: f32, seed: u64, out: &mut Self::Tensor) -> BackendResult<()>;
    /// A copy of `x`.
    fn copy(&self, x: &Self::Tensor) -> BackendResult<Self::Tensor>;
    /// Every element set to `value`.
    fn fill(&self, x: &mut Self::Tensor, value: f32) -> BackendResult<()>;
    /// x *= s.
    fn scale(&self, x: &mut Self::Tensor, s: f32) -> BackendResult<()>;
    /// Σ x² in f64 (for global gradient norms).
    fn sum_squares(&self, x: &Self::Tensor) -> BackendResult<f64>;
    /// One AdamW update of `param` from `grad · hp.grad_scale` (torch.optim.AdamW's
    /// arithmetic: decoupled weight decay, bias-corrected moments).
    fn adamw(
        &self,
        param: &mut Self::Tensor,
        grad: &Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        hp: &AdamWStep,
    ) -> BackendResult<()>;
}

/// Sums over the rows of one [`Backend::cross_entropy`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CrossEntropySums {
    /// Σ over rows of `logsumexp(logits) − logits[label]`.
    pub loss: f64,
    /// Rows whose argmax (the first, on ties) is the label.
    pub correct: usize,
}

/// One AdamW step's scalars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for the bias corrections.
    pub step: u32,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f32,
}

/// The per-step scalars of AdamW as every backend's kernel takes them:
/// computed in f64 and rounded once, as PyTorch passes Python floats to its
/// f32 kernels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr · weight_decay` (decoupled weight decay).
    pub decay: f32,
    /// `1 − beta1`, the weight of the gradient in the first moment's lerp.
    pub w1: f32,
    /// `1 − beta2`.
    pub w2: f32,
    /// `sqrt(1 − beta2^step)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 − beta1^step)`.
    pub step_size: f32,
}

impl AdamWStep {
    pub fn scalars(&self) -> AdamWScalars {
        let step = self.step.max(1) as i32;
        let (b1, b2) = (self.beta1 as f64, self.beta2 as f64);
        AdamWScalars {
            decay: (1.0 - self.lr as f64 * self.weight_decay as f64) as f32,
            w1: (1.0 - b1) as f32,
            w2: (1.0 - b2) as f32,
            bc2_sqrt: (1.0 - b2.powi(step)).sqrt() as f32,
            step_size: (self.lr as f64 / (1.0 - b1.powi(step))) as f32,
        }
    }
}

/// Keep-or-drop of element `index` under dropout probability `p` for `seed`:
/// SplitMix64 of (seed, index), top 24 bits as a uniform in [0, 1). Every
/// backend's dropout kernel computes exactly this.
pub fn dropout_keep(seed: u64, index: u64, p: f32) -> bool {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u64 << 24) as f32;
    u >= p
}

/// One product of [`Backend::matmul_many`].
pub struct MatmulJob<'a, B: Backend + ?Sized> {
    pub w: &'a B::Weight,
    pub bias: Option<&'a B::Weight>,
    pub out: &'a mut B::Tensor,
}

/// Rows of a batch that run one adapter's matrix (see [`Backend::lora_add`]).
pub struct LoraSegment<'a, B: Backend + ?Sized> {
    pub rows: Range<usize>,
    pub w: &'a B::LoraWeight,
}
