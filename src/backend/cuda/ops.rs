//! Typed launch wrappers: one per kernel family, each choosing the grid the
//! kernel's comment in `kernels/*.cu` documents and passing its exact
//! argument list.

use super::launch::{KArg, Kernel};
use super::plan::{attention_plan, lora_row_segments, ATTENTION_PARTITION};
use super::{grow, CudaBackend, CudaKvCache, CudaTensor, CudaWeight};
use crate::backend::{AttentionMeta, BackendResult, KvDtype, LoraSegment, RopeStyle, RopeTable};

use KArg::{Ptr, F32, I32, I64};

const ELEMWISE_BLOCK: u32 = 256;

fn elementwise_grid(n: usize) -> (u32, u32, u32) {
    ((n as u32).div_ceil(ELEMWISE_BLOCK), 1, 1)
}

pub(super) fn vector(w: &CudaWeight) -> &cudarc::driver::CudaSlice<f32> {
    w.vector.as_ref().unwrap_or_else(|| panic!("weight '{}' is a matrix, not a vector", w.name))
}

pub fn embedding(be: &CudaBackend, table: &CudaWeight, ids: &[u32], out: &mut CudaTensor) -> BackendResult<()> {
    assert_eq!((out.rows, out.cols), (ids.len(), table.cols));
    let d_ids = be.meta.lock().map_err(|_| super::poisoned())?.token_ids.put(be, ids)?;
    dequant_rows(be, table, d_ids, ids.len(), be.ptr(&out.data))?;
    Ok(())
}

/// Rows `ids[..n]` of `w` (clamped to its last row) expanded to f32 at `out`:
/// the embedding lookup, and with ids 0..rows the whole weight.
pub fn dequant_rows(be: &CudaBackend, w: &CudaWeight, ids: u64, n: usize, out: u64) -> BackendResult<()> {
    be.kernels.launch(
        &be.stream,
        Kernel::DequantRows(w.kind),
        (n as u32, 1, 1),
        256,
        &[
            Ptr(be.ptr(&w.data)),
            Ptr(ids),
            Ptr(out),
            I32(n as i32),
            I32(w.cols as i32),
            I32(w.row_bytes as i32),
            I32(w.rows as i32),
        ],
    )?;
    Ok(())
}

/// The whole of `w` expanded to bf16 at `out` (`[rows, cols]`, for a tensor-core GEMM).
pub fn dequant_bf16(be: &CudaBackend, w: &CudaWeight, out: u64) -> BackendResult<()> {
    be.kernels.launch(
        &be.stream,
        Kernel::DequantBf16(w.kind),
        (w.rows as u32, 1, 1),
        256,
        &[Ptr(be.ptr(&w.data)), Ptr(out), I32(w.rows as i32), I32(w.cols as i32), I32(w.row_bytes as i32)],
    )?;
    Ok(())
}

pub fn rms_norm(be: &CudaBackend, x: &CudaTensor, w: &CudaWeight, eps: f32, out: &mut CudaTensor) -> BackendResult<()> {
    assert_eq!((x.rows, x.cols), (out.rows, out.cols));
    assert_eq!(w.cols, x.cols);
    be.kernels.launch(
        &be.stream,
        Kernel::RmsNorm,
        (x.rows as u32, 1, 1),
        256,
        &[
            Ptr(be.ptr(&x.data)),
            Ptr(be.ptr(vector(w))),
            Ptr(be.ptr(&out.data)),
            I32(x.rows as i32),
            I32(x.cols as i32),
            F32(eps),
        ],
    )?;
    Ok(())
}

pub fn add_assign(be: &CudaBackend, x: &mut CudaTensor, y: &CudaTensor) -> BackendResult<()> {
    let n = x.rows * x.cols;
    assert_eq!(n, y.rows * y.cols);
    be.kernels.launch(
        &be.stream,
        Kernel::AddAssign,
        elementwise_grid(n),
        ELEMWISE_BLOCK,
        &[Ptr(be.ptr(&x.data)), Ptr(be.ptr(&y.data)), I64(n as i64)],
    )?;
    Ok(())
}

pub fn add_bias(be: &CudaBackend, out: &mut CudaTensor, bias: &CudaWeight) -> BackendResult<()> {
    assert_eq!(bias.cols, out.cols);
    be.kernels.launch(
        &be.stream,
        Kernel::AddBias,
        (out.rows as u32, (out.cols as u32).div_ceil(256), 1),
        256,
        &[Ptr(be.ptr(&out.data)), Ptr(be.ptr(vector(bias))), I32(out.rows as i32), I32(out.cols as i32)],
    )?;
    Ok(())
}

/// Rotary embedding in place; `direction` −1 rotates back (rope's gradient).
pub fn rope(
    be: &CudaBackend,
    x: &mut CudaTensor,
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    t: &RopeTable,
    direction: f32,
) -> BackendResult<()> {
    assert_eq!(x.cols, heads * head_dim);
    assert_eq!(x.rows, positions.len());
    let mut cached = be.rope_freq.lock().map_err(|_| super::poisoned())?;
    if cached.as_ref().is_none_or(|(host, _)| host != &t.inv_freq) {
        *cached = Some((t.inv_freq.clone(), be.upload_vec(&t.inv_freq)?));
    }
    let freq = &cached.as_ref().expect("just set").1;
    let pos = be.meta.lock().map_err(|_| super::poisoned())?.positions.put(be, positions)?;
    be.kernels.launch(
        &be.stream,
        Kernel::Rope,
        (x.rows as u32, heads as u32, 1),
        64,
        &[
            Ptr(be.ptr(&x.data)),
            Ptr(pos),
            Ptr(be.ptr(freq)),
            I32(x.rows as i32),
            I32(heads as i32),
            I32(head_dim as i32),
            I32((t.style == RopeStyle::Interleaved) as i32),
            F32(direction),
        ],
    )?;
    Ok(())
}

pub fn silu_mul(be: &CudaBackend, gate: &CudaTensor, up: &CudaTensor, out: &mut CudaTensor) -> BackendResult<()> {
    let n = gate.rows * gate.cols;
    assert_eq!(n, up.rows * up.cols);
    assert_eq!(n, out.rows * out.cols);
    be.kernels.launch(
        &be.stream,
        Kernel::SiluMul,
        elementwise_grid(n),
        ELEMWISE_BLOCK,
        &[Ptr(be.ptr(&gate.data)), Ptr(be.ptr(&up.data)), Ptr(be.ptr(&out.data)), I64(n as i64)],
    )?;
    Ok(())
}

pub fn gather_rows(be: &CudaBackend, x: &CudaTensor, rows: &[usize]) -> BackendResult<CudaTensor> {
    let out = CudaTensor { data: be.alloc_zeros(rows.len() * x.cols)?, rows: rows.len(), cols: x.cols };
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let d_idx = be.meta.lock().map_err(|_| super::poisoned())?.gather_rows.put(be, &idx)?;
    be.kernels.launch(
        &be.stream,
        Kernel::GatherRows,
        (rows.len() as u32, 1, 1),
        256,
        &[Ptr(be.ptr(&x.data)), Ptr(d_idx), Ptr(be.ptr(&out.data)), I32(rows.len() as i32), I32(x.cols as i32)],
    )?;
    Ok(out)
}

/// `x`'s columns in `w`'s stored input order (GPTQ act-order): `out[r, j] =
/// x[r, perm[j]]`.
pub fn gather_cols(
    be: &CudaBackend,
    x: &CudaTensor,
    perm: &cudarc::driver::CudaSlice<u32>,
) -> BackendResult<CudaTensor> {
    let out = CudaTensor { data: be.alloc_zeros(x.rows * x.cols)?, rows: x.rows, cols: x.cols };
    be.kernels.launch(
        &be.stream,
        Kernel::GatherCols,
        (x.rows as u32, 1, 1),
        256,
        &[Ptr(be.ptr(&x.data)), Ptr(be.ptr(perm)), Ptr(be.ptr(&out.data)), I32(x.rows as i32), I32(x.cols as i32)],
    )?;
    Ok(out)
}

/// `dst[r, perm[j]] += src[r, j]`: a gradient in stored input order added
/// back in natural order.
pub fn scatter_add_cols(
    be: &CudaBackend,
    src: &CudaTensor,
    perm: &cudarc::driver::CudaSlice<u32>,
    dst: &mut CudaTensor,
) -> BackendResult<()> {
    assert_eq!((src.rows, src.cols), (dst.rows, dst.cols));
    be.kernels.launch(
        &be.stream,
        Kernel::ScatterAddCols,
        (src.rows as u32, 1, 1),
        256,
        &[
            Ptr(be.ptr(&src.data)),
            Ptr(be.ptr(perm)),
            Ptr(be.ptr(&dst.data)),
            I32(src.rows as i32),
            I32(src.cols as i32),
        ],
    )
}

/// `x` converted to bf16 (or f16) into `dst` (the GEMM input for 16-bit weights).
pub fn to_half(be: &CudaBackend, x: &CudaTensor, dst: &cudarc::driver::CudaSlice<u16>, f16: bool) -> BackendResult<()> {
    let n = x.rows * x.cols;
    let kernel = if f16 { Kernel::F32ToF16 } else { Kernel::F32ToBf16 };
    be.kernels.launch(
        &be.stream,
        kernel,
        elementwise_grid(n),
        ELEMWISE_BLOCK,
        &[Ptr(be.ptr(&x.data)), Ptr(be.ptr(dst)), I64(n as i64)],
    )?;
    Ok(())
}

pub fn write_kv(
    be: &CudaBackend,
    cache: &mut CudaKvCache,
    layer: usize,
    k: &CudaTensor,
    v: &CudaTensor,
    slots: &[u32],
) -> BackendResult<()> {
    let width = cache.spec.kv_heads * cache.spec.head_dim;
    assert_eq!((k.cols, v.cols), (width, width));
    assert_eq!(k.rows, slots.len());
    let d_slots = be.meta.lock().map_err(|_| super::poisoned())?.kv_slots.put(be, slots)?;
    let kernel = match cache.spec.dtype {
        KvDtype::F32 => Kernel::WriteKv,
        KvDtype::Bf16 => Kernel::WriteKvBf16,
    };
    be.kernels.launch(
        &be.stream,
        kernel,
        (slots.len() as u32, 1, 1),
        256,
        &[
            Ptr(be.ptr(&k.data)),
            Ptr(be.ptr(&v.data)),
            Ptr(be.ptr(&cache.k[layer])),
            Ptr(be.ptr(&cache.v[layer])),
            Ptr(d_slots),
            I32(slots.len() as i32),
            I32(width as i32),
        ],
    )?;
    Ok(())
}

pub fn paged_attention(
    be: &CudaBackend,
    cache: &CudaKvCache,
    layer: usize,
    q: &CudaTensor,
    meta: &AttentionMeta<'_>,
    out: &mut CudaTensor,
) -> BackendResult<()> {
    let (nh, d) = (meta.num_heads, meta.head_dim);
    assert_eq!(q.cols, nh * d);
    assert_eq!((out.rows, out.cols), (q.rows, q.cols));
    assert!(d <= 256 && d % 2 == 0, "head_dim {d} is not supported by kernels/attention.cu");
    let plan = attention_plan(meta, q.rows, ATTENTION_PARTITION);
    let (tok_meta, tables) = {
        let mut m = be.meta.lock().map_err(|_| super::poisoned())?;
        (m.attn_tokens.put(be, &plan.tok_meta)?, m.attn_tables.put(be, &plan.block_tables)?)
    };
    let parts = plan.max_partitions;
    let mut scratch = be.scratch.lock().map_err(|_| super::poisoned())?;
    let cells = q.rows * nh * parts;
    let acc = be.ptr(grow(be, &mut scratch.attn_acc, cells * d)?);
    let ml = be.ptr(grow(be, &mut scratch.attn_ml, cells * 2)?);
    let partial = match cache.spec.dtype {
        KvDtype::F32 => Kernel::AttentionPartial,
        KvDtype::Bf16 => Kernel::AttentionPartialBf16,
    };
    be.kernels.launch(
        &be.stream,
        partial,
        (q.rows as u32, nh as u32, parts as u32),
        128,
        &[
            Ptr(be.ptr(&q.data)),
            Ptr(be.ptr(&cache.k[layer])),
            Ptr(be.ptr(&cache.v[layer])),
            Ptr(tables),
            Ptr(tok_meta),
            Ptr(acc),
            Ptr(ml),
            I32(nh as i32),
            I32(meta.kv_heads as i32),
            I32(d as i32),
            I32(cache.spec.block_size as i32),
            F32(meta.scale),
            I32(ATTENTION_PARTITION as i32),
            I32(parts as i32),
        ],
    )?;
    be.kernels.launch(
        &be.stream,
        Kernel::AttentionReduce,
        (q.rows as u32, nh as u32, 1),
        128,
        &[Ptr(acc), Ptr(ml), Ptr(be.ptr(&out.data)), I32(nh as i32), I32(d as i32), I32(parts as i32)],
    )?;
    Ok(())
}

pub fn lora_add(
    be: &CudaBackend,
    x: &CudaTensor,
    segments: &[LoraSegment<'_, CudaBackend>],
    out: &mut CudaTensor,
) -> BackendResult<()> {
    assert_eq!(x.rows, out.rows);
    // f32 and bf16 adapters run as two passes; in practice one config means one dtype.
    for bf16 in [false, true] {
        let segs: Vec<&LoraSegment<'_, CudaBackend>> = segments.iter().filter(|s| s.w.bf16 == bf16).collect();
        if segs.is_empty() {
            continue;
        }
        for s in &segs {
            assert_eq!((s.w.in_features, s.w.out_features), (x.cols, out.cols), "LoRA matrix shape");
        }
        let ranges: Vec<_> = segs.iter().map(|s| s.rows.clone()).collect();
        let mut meta = be.meta.lock().map_err(|_| super::poisoned())?;
        let row_seg = meta.lora_rows.put(be, &lora_row_segments(x.rows, &ranges))?;
        let seg_a: Vec<u64> = segs.iter().map(|s| be.ptr(&s.w.a)).collect();
        let seg_bt: Vec<u64> = segs.iter().map(|s| be.ptr(&s.w.bt)).collect();
        let seg_rank: Vec<i32> = segs.iter().map(|s| s.w.rank as i32).collect();
        let max_rank = segs.iter().map(|s| s.w.rank).max().unwrap_or(0);
        let [d_a, d_bt, d_rank] = meta.lora_table(be, &seg_a, &seg_bt, &seg_rank)?;
        drop(meta);
        let mut scratch = be.scratch.lock().map_err(|_| super::poisoned())?;
        let t = be.ptr(grow(be, &mut scratch.lora_t, x.rows * max_rank)?);
        let (shrink, expand) = if bf16 {
            (Kernel::LoraShrinkBf16, Kernel::LoraExpandBf16)
        } else {
            (Kernel::LoraShrinkF32, Kernel::LoraExpandF32)
        };
        be.kernels.launch(
            &be.stream,
            shrink,
            (x.rows as u32, max_rank as u32, 1),
            128,
            &[
                Ptr(be.ptr(&x.data)),
                Ptr(row_seg),
                Ptr(d_a),
                Ptr(d_rank),
                Ptr(t),
                I32(x.rows as i32),
                I32(x.cols as i32),
                I32(max_rank as i32),
            ],
        )?;
        be.kernels.launch(
            &be.stream,
            expand,
            (x.rows as u32, (out.cols as u32).div_ceil(256), 1),
            256,
            &[
                Ptr(t),
                Ptr(row_seg),
                Ptr(d_bt),
                Ptr(d_rank),
                Ptr(be.ptr(&out.data)),
                I32(x.rows as i32),
                I32(out.cols as i32),
                I32(max_rank as i32),
            ],
        )?;
    }
    Ok(())
}

pub fn argmax_logsumexp(be: &CudaBackend, logits: &CudaTensor) -> BackendResult<Vec<(u32, f32, f32)>> {
    let rows = logits.rows;
    let idx = be.alloc_zeros::<u32>(rows)?;
    let mx = be.alloc_zeros::<f32>(rows)?;
    let lse = be.alloc_zeros::<f32>(rows)?;
    be.kernels.launch(
        &be.stream,
        Kernel::ArgmaxLogsumexp,
        (rows as u32, 1, 1),
        256,
        &[
            Ptr(be.ptr(&logits.data)),
            I32(rows as i32),
            I32(logits.cols as i32),
            Ptr(be.ptr(&idx)),
            Ptr(be.ptr(&mx)),
            Ptr(be.ptr(&lse)),
        ],
    )?;
    let i = super::ck(be.stream.clone_dtoh(&idx), "download")?;
    let m = super::ck(be.stream.clone_dtoh(&mx), "download")?;
    let l = super::ck(be.stream.clone_dtoh(&lse), "download")?;
    Ok((0..rows).map(|r| (i[r], m[r], l[r])).collect())
}
