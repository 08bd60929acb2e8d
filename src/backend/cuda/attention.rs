//! Attention on the device: dense and sparse paged decode (split-K over chunks of each
//! sequence's token list, partial states merged by LSE), `merge_states`, and the paged
//! append that writes K/V into their slots.
//!
//! Semantics are exactly those of the CPU functions [`crate::attention::decode`],
//! [`crate::attention::decode_sparse`] and [`crate::attention::merge_states`] (same
//! [`AttentionParams`], RoPE at read and [`PositionMode`]s), within dtype tolerance.
//!
//! Device limits: K/V in f16 or bf16; head_dim 64 or 128; page_size a power of two; K/V
//! strides multiples of 8 elements and base addresses aligned to 16 bytes (each thread
//! reads 8 channels at once); for half-split RoPE at read, `rotary_dim` a multiple of 16.
//! Queries and outputs may be f32, f16 or bf16 with any strides.
//!
//! # CUDA graphs
//! [`decode`], [`decode_sparse`], [`merge_states`] and [`append`] only queue kernels on the
//! given stream: no allocation (once the [`Workspace`] is large enough, see
//! [`Workspace::reserve`]), no copy from the host, no synchronisation. Make one call of the
//! largest shape before capturing: it loads the kernel module and sizes the workspace. Their launch sizes
//! depend on host-known values only (batch, heads, `max_seq_len` of the page table,
//! `max_per_head` of the selections, `chunk_size`), so they can be captured in a CUDA graph
//! and replayed while the engine updates the device page table, selections and positions.

use std::sync::{Arc, Mutex};

use crate::attention::{AttentionParams, PositionMode, RopeStyle};
use crate::backend::cuda::device::{CudaDevice, Stream};
use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::view::{CudaPagedKv, CudaSelections};
use crate::backend::cuda::ModuleId;
use crate::config::KeyRope;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::PagedKvLayout;

/// Threads per decode block (the kernel's `NT`).
const DECODE_THREADS: u32 = 128;
/// Chunk lengths are multiples of this (a block's tokens per step at head_dim 64).
const CHUNK_QUANTUM: usize = 64;
/// Most rotated pairs the decode kernel holds frequencies for (head_dim 128).
const MAX_HALF_ROTARY: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeParams {
    k: u64,
    v: u64,
    indptr: u64,
    indices: u64,
    last_page_len: u64,
    positions: u64,
    sel_indptr: u64,
    sel_indices: u64,
    q: u64,
    o_part: u64,
    lse_part: u64,
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    q_stride: [i64; 3],
    batch: i32,
    num_qo_heads: i32,
    num_kv_heads: i32,
    group: i32,
    row_groups: i32,
    page_shift: i32,
    chunk: i32,
    max_chunks: i32,
    q_dtype: u32,
    q_scale: f32,
    soft_cap: f32,
    rope_mode: u32,
    rope_style: u32,
    rotary_dim: i32,
    position_scale: f32,
    max_distance: i32,
    inv_freq: [f32; MAX_HALF_ROTARY],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeMergeParams {
    o_part: u64,
    lse_part: u64,
    out: u64,
    lse: u64,
    out_stride: [i64; 3],
    batch: i32,
    num_qo_heads: i32,
    head_dim: i32,
    max_chunks: i32,
    out_dtype: u32,
    _pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MergeStatesParams {
    va: u64,
    vb: u64,
    lse_a: u64,
    lse_b: u64,
    out: u64,
    lse_out: u64,
    va_stride: [i64; 3],
    vb_stride: [i64; 3],
    out_stride: [i64; 3],
    n: i32,
    heads: i32,
    head_dim: i32,
    va_dtype: u32,
    vb_dtype: u32,
    out_dtype: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AppendParams {
    pub k_src: u64,
    pub v_src: u64,
    pub slot_mapping: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub k_src_stride: [i64; 3],
    pub v_src_stride: [i64; 3],
    pub k_stride: [i64; 3],
    pub v_stride: [i64; 3],
    pub n: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub page_size: i32,
    pub k_src_dtype: u32,
    pub v_src_dtype: u32,
}

/// One page's key-bound update: fold the keys of the slots set in `mask` into the page's
/// bounds, starting from the stored bounds or, with `reset`, from empty (+inf / -inf).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BoundsEntry {
    pub page: i32,
    pub reset: u32,
    pub mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct BoundsParams {
    pub k_cache: u64,
    pub bounds: u64,
    pub entries: u64,
    pub k_stride: [i64; 3],
    pub num_entries: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub _pad: i32,
}

const _: () = {
    assert!(std::mem::size_of::<DecodeParams>() == 480);
    assert!(std::mem::size_of::<DecodeMergeParams>() == 80);
    assert!(std::mem::size_of::<MergeStatesParams>() == 144);
    assert!(std::mem::size_of::<AppendParams>() == 160);
    assert!(std::mem::size_of::<BoundsEntry>() == 16);
    assert!(std::mem::size_of::<BoundsParams>() == 64);
};

/// Scratch device memory for split-K partial states, grown on demand and reused.
/// Reserve enough before capturing a CUDA graph: growing allocates. Host threads may share
/// one workspace for calls on one stream (each call holds it while it queues its kernels);
/// calls on different streams need a workspace each.
pub struct Workspace {
    dev: Arc<CudaDevice>,
    buf: Mutex<Option<Arc<DeviceBuffer>>>,
}

impl Workspace {
    pub fn new(dev: &Arc<CudaDevice>) -> Self {
        Workspace { dev: dev.clone(), buf: Mutex::new(None) }
    }

    /// Make sure at least `bytes` are allocated (see [`decode_workspace_bytes`]).
    pub fn reserve(&self, bytes: usize) -> Result<()> {
        self.get(bytes).map(|_| ())
    }

    fn get(&self, bytes: usize) -> Result<Arc<DeviceBuffer>> {
        let g = self.lock(bytes)?;
        Ok(g.as_ref().expect("lock allocates").clone())
    }

    /// The scratch, locked, with at least `bytes` allocated. A call holds the lock while it
    /// queues all its kernels: two host threads queuing on one stream would otherwise
    /// interleave their kernels over the one buffer (one's merge reading the other's
    /// partial states).
    fn lock(&self, bytes: usize) -> Result<std::sync::MutexGuard<'_, Option<Arc<DeviceBuffer>>>> {
        let mut g = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().is_none_or(|b| b.len() < bytes) {
            *g = Some(Arc::new(DeviceBuffer::alloc(&self.dev, bytes.max(256))?));
        }
        Ok(g)
    }
}

/// How a decode call is split: tokens per chunk and chunks per (sequence, KV head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub chunk: usize,
    pub max_chunks: usize,
}

impl DecodePlan {
    /// The split for lists of at most `max_len` tokens: `params.chunk_size` (rounded up to a
    /// multiple of 64) or one chosen to give the device a few blocks per SM.
    pub fn new(
        dev: &CudaDevice,
        params: &AttentionParams,
        batch: usize,
        num_qo_heads: usize,
        num_kv_heads: usize,
        max_len: usize,
    ) -> Result<Self> {
        let chunk = match params.chunk_size {
            Some(0) => return Err(Error::invalid("chunk_size", "at least 1 (or None for automatic)")),
            Some(c) => c.div_ceil(CHUNK_QUANTUM) * CHUNK_QUANTUM,
            None => {
                let g = num_qo_heads / num_kv_heads.max(1);
                let blocks_per_chunk = (batch * num_kv_heads * g.div_ceil(rows_per_block(g))).max(1);
                let want_chunks = (4 * dev.num_sms()).div_ceil(blocks_per_chunk).max(1);
                max_len.div_ceil(want_chunks).max(256).div_ceil(CHUNK_QUANTUM) * CHUNK_QUANTUM
            }
        };
        let chunk = chunk.min(1 << 30);
        Ok(DecodePlan { chunk, max_chunks: max_len.div_ceil(chunk).max(1) })
    }
}

/// Bytes of workspace a decode with this plan needs.
pub fn decode_workspace_bytes(plan: &DecodePlan, batch: usize, num_qo_heads: usize, head_dim: usize) -> usize {
    let rows = batch * num_qo_heads * plan.max_chunks;
    let o = rows * head_dim * 4;
    o.div_ceil(256) * 256 + rows * 4
}

fn rows_per_block(group: usize) -> usize {
    match group {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

fn decode_kernel(dtype: DType, d: usize, rows: usize) -> &'static str {
    const NAMES: [[[&str; 4]; 2]; 2] = [
        [
            [
                "kvsieve_decode_f16_d64_r1",
                "kvsieve_decode_f16_d64_r2",
                "kvsieve_decode_f16_d64_r4",
                "kvsieve_decode_f16_d64_r8",
            ],
            [
                "kvsieve_decode_f16_d128_r1",
                "kvsieve_decode_f16_d128_r2",
                "kvsieve_decode_f16_d128_r4",
                "kvsieve_decode_f16_d128_r8",
            ],
        ],
        [
            [
                "kvsieve_decode_bf16_d64_r1",
                "kvsieve_decode_bf16_d64_r2",
                "kvsieve_decode_bf16_d64_r4",
                "kvsieve_decode_bf16_d64_r8",
            ],
            [
                "kvsieve_decode_bf16_d128_r1",
                "kvsieve_decode_bf16_d128_r2",
                "kvsieve_decode_bf16_d128_r4",
                "kvsieve_decode_bf16_d128_r8",
            ],
        ],
    ];
    let t = usize::from(dtype == DType::BF16);
    let di = usize::from(d == 128);
    let ri = match rows {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    NAMES[t][di][ri]
}

/// Check that a view's memory fits the decode kernels (see the module docs).
pub(crate) fn check_kv_for_device(kv: &CudaPagedKv) -> Result<()> {
    let l = kv.layout();
    if !matches!(l.dtype, DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!("CUDA attention over {} pages: the kernels read f16 or bf16", l.dtype)));
    }
    if l.head_dim != 64 && l.head_dim != 128 {
        return Err(Error::Unsupported(format!(
            "CUDA attention with head_dim {}: the kernels take 64 or 128",
            l.head_dim
        )));
    }
    if !l.page_size.is_power_of_two() {
        return Err(Error::Unsupported(format!(
            "CUDA attention with page_size {}: the kernels need a power of two",
            l.page_size
        )));
    }
    for (name, s) in [("k_strides", l.k_strides), ("v_strides", l.v_strides)] {
        if s.iter().any(|&x| x % 8 != 0 || x > i64::MAX as usize) {
            return Err(Error::Unsupported(format!(
                "{name} {s:?}: the CUDA kernels need strides that are multiples of 8 elements"
            )));
        }
    }
    let (k, v) = kv.kv_ptrs();
    for (name, p) in [("k", k), ("v", v)] {
        if p % 16 != 0 {
            return Err(Error::invalid(name, "a device address aligned to 16 bytes"));
        }
    }
    Ok(())
}

fn strides3(t: &DeviceTensor) -> [i64; 3] {
    [t.strides[0] as i64, t.strides[1] as i64, t.strides[2] as i64]
}

/// Dense decode on the device: like [`crate::attention::decode`] for every sequence of the
/// view's table. `q` and `out` are `[batch, num_qo_heads, head_dim]` device tensors (f32,
/// f16 or bf16, any strides); `lse`, if given, an f32 `[batch, num_qo_heads]` contiguous
/// device tensor. Queued on `stream`; graph-capturable (see the module docs).
///
/// # Safety
/// 1. `q`, `out` and `lse` are valid device memory on the view's device for their shapes and
///    strides, and `out`/`lse` are not read or written by others until the work completes;
/// 2. the view's safety contract holds until the work completes.
pub unsafe fn decode(
    kv: &CudaPagedKv,
    q: &DeviceTensor,
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    params: &AttentionParams,
    ws: &Workspace,
    stream: &Stream,
) -> Result<()> {
    run_decode(kv, q, None, out, lse, params, ws, stream)
}

/// Sparse decode on the device: like [`crate::attention::decode_sparse`]; KV head `h` of
/// sequence `b` reads the tokens of `selections`' list `(b, h)`. Graph-capturable.
///
/// # Safety
/// As [`decode`]; the selections' contract (lists ascending, in range) holds too.
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_sparse(
    kv: &CudaPagedKv,
    q: &DeviceTensor,
    selections: &CudaSelections,
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    params: &AttentionParams,
    ws: &Workspace,
    stream: &Stream,
) -> Result<()> {
    run_decode(kv, q, Some(selections), out, lse, params, ws, stream)
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_decode(
    kv: &CudaPagedKv,
    q: &DeviceTensor,
    sel: Option<&CudaSelections>,
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    params: &AttentionParams,
    ws: &Workspace,
    stream: &Stream,
) -> Result<()> {
    let dev = &ws.dev;
    if kv.device() != dev.ordinal() {
        return Err(Error::invalid(
            "kv",
            format!("a view on CUDA device {}, got device {}", dev.ordinal(), kv.device()),
        ));
    }
    check_kv_for_device(kv)?;
    let l = *kv.layout();
    let (d, hk) = (l.head_dim, l.num_kv_heads);
    let batch = kv.batch_size();
    let all = [DType::F32, DType::F16, DType::BF16];
    q.expect("q", &[Some(batch), None, Some(d)], &all, dev.ordinal())?;
    let hq = q.shape[1];
    if hq == 0 || !hq.is_multiple_of(hk) {
        return Err(Error::shape(
            "q",
            format!("num_qo_heads a positive multiple of num_kv_heads {hk}"),
            format!("{hq} query heads"),
        ));
    }
    out.expect("out", &[Some(batch), Some(hq), Some(d)], &all, dev.ordinal())?;
    if let Some(t) = lse {
        t.expect("lse", &[Some(batch), Some(hq)], &[DType::F32], dev.ordinal())?;
        if t.strides != [hq, 1] && batch * hq > 0 {
            return Err(Error::invalid("lse", "a contiguous [batch, num_qo_heads] tensor"));
        }
    }
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::invalid("scale", format!("a finite value, got {scale}")));
    }
    let soft_cap = match params.logit_soft_cap {
        Some(c) if !(c.is_finite() && c > 0.0) => {
            return Err(Error::invalid("logit_soft_cap", format!("a finite value > 0, got {c}")))
        }
        Some(c) => c,
        None => 0.0,
    };
    let rope = match (kv.key_rope(), params.rope) {
        (KeyRope::PreRope, None) => {
            return Err(Error::invalid("rope", "a RopeConfig: the keys are stored before RoPE"))
        }
        (KeyRope::PreRope, Some(r)) => {
            r.validate(d)?;
            Some(r)
        }
        (KeyRope::PostRope, _) => None,
    };
    if rope.is_none() && params.positions != PositionMode::Original {
        return Err(Error::invalid(
            "positions",
            "PositionMode::Original for keys stored after RoPE (Contiguous and Capped re-rotate keys, which needs KeyRope::PreRope and a RopeConfig)",
        ));
    }
    let mut inv_freq = [0f32; MAX_HALF_ROTARY];
    let (mut rope_mode, mut rope_style, mut rotary_dim, mut position_scale, mut max_distance) =
        (0u32, 0u32, 0i32, 1f32, 0i32);
    if let Some(r) = rope {
        let rd = r.rotary_dim_for(d);
        if r.style == RopeStyle::HalfSplit && rd % 16 != 0 {
            return Err(Error::Unsupported(format!(
                "CUDA RoPE at read with half-split pairs and rotary_dim {rd}: needs a multiple of 16"
            )));
        }
        for (i, f) in r.inv_freq(d).into_iter().enumerate() {
            inv_freq[i] = f;
        }
        rope_style = match r.style {
            RopeStyle::HalfSplit => 0,
            RopeStyle::AdjacentPairs => 1,
        };
        rotary_dim = rd as i32;
        position_scale = r.position_scale;
        rope_mode = match params.positions {
            PositionMode::Original => 1,
            PositionMode::Contiguous => 2,
            PositionMode::Capped { max_distance: 0 } => {
                return Err(Error::invalid("positions.max_distance", "at least 1"))
            }
            PositionMode::Capped { max_distance: m } => {
                max_distance = m.min(i32::MAX as u32) as i32;
                3
            }
        };
    }
    let (sel_indptr, sel_indices, max_len) = match sel {
        Some(s) => {
            if s.batch_size() != batch {
                return Err(Error::shape(
                    "selections",
                    format!("{batch} sequences (batch of the page table)"),
                    format!("{}", s.batch_size()),
                ));
            }
            if s.num_kv_heads() != hk {
                return Err(Error::shape("selections", format!("{hk} KV heads"), format!("{}", s.num_kv_heads())));
            }
            if s.device() != dev.ordinal() {
                return Err(Error::invalid("selections", format!("lists on CUDA device {}", dev.ordinal())));
            }
            let (a, b) = s.device_ptrs();
            (a, b, s.max_per_head().min(kv.table().max_seq_len()))
        }
        None => (0, 0, kv.table().max_seq_len()),
    };
    if batch == 0 {
        return Ok(());
    }
    let plan = DecodePlan::new(dev, params, batch, hq, hk, max_len)?;
    if plan.max_chunks > 65535 {
        return Err(Error::invalid(
            "chunk_size",
            format!("at most 65535 chunks per sequence ({} needed)", plan.max_chunks),
        ));
    }
    let g = hq / hk;
    let rows = rows_per_block(g);
    let row_groups = g.div_ceil(rows);
    let locked = ws.lock(decode_workspace_bytes(&plan, batch, hq, d))?;
    let wsb = locked.as_ref().expect("lock allocates").clone();
    let o_part = wsb.ptr();
    let lse_part = o_part + ((batch * hq * plan.max_chunks * d * 4).div_ceil(256) * 256) as u64;
    let (ip, ix, lp) = kv.table().device_ptrs();
    let (kp, vp) = kv.kv_ptrs();
    let ks = l.k_strides.map(|x| x as i64);
    let vs = l.v_strides.map(|x| x as i64);
    let p = DecodeParams {
        k: kp,
        v: vp,
        indptr: ip,
        indices: ix,
        last_page_len: lp,
        positions: kv.positions_ptr().unwrap_or(0),
        sel_indptr,
        sel_indices,
        q: q.ptr,
        o_part,
        lse_part,
        k_stride: ks,
        v_stride: vs,
        q_stride: strides3(q),
        batch: batch as i32,
        num_qo_heads: hq as i32,
        num_kv_heads: hk as i32,
        group: g as i32,
        row_groups: row_groups as i32,
        page_shift: l.page_size.trailing_zeros() as i32,
        chunk: plan.chunk as i32,
        max_chunks: plan.max_chunks as i32,
        q_dtype: q.dtype as u32,
        q_scale: if soft_cap > 0.0 { scale } else { scale * std::f32::consts::LOG2_E },
        soft_cap,
        rope_mode,
        rope_style,
        rotary_dim,
        position_scale,
        max_distance,
        inv_freq,
    };
    if batch > 65535 {
        return Err(Error::invalid("batch", "at most 65535 sequences per call"));
    }
    let grid = (plan.max_chunks as u32, (hk * row_groups) as u32, batch as u32);
    launch(
        dev,
        stream,
        ModuleId::Attention,
        decode_kernel(l.dtype, d, rows),
        LaunchDims::new(grid, DECODE_THREADS),
        &p,
    )?;
    let m = DecodeMergeParams {
        o_part,
        lse_part,
        out: out.ptr,
        lse: lse.map_or(0, |t| t.ptr),
        out_stride: strides3(out),
        batch: batch as i32,
        num_qo_heads: hq as i32,
        head_dim: d as i32,
        max_chunks: plan.max_chunks as i32,
        out_dtype: out.dtype as u32,
        _pad: 0,
    };
    launch(
        dev,
        stream,
        ModuleId::Attention,
        "kvsieve_decode_merge",
        LaunchDims::new(((batch * hq) as u32, 1, 1), d as u32),
        &m,
    )?;
    // Keep the workspace alive at least until the queued work has been ordered after any
    // later growth (DeviceBuffer's drop frees with cuMemFree, which waits for the device),
    // and locked until both kernels are queued.
    drop(wsb);
    drop(locked);
    Ok(())
}

/// `merge_states` on the device: like [`crate::attention::merge_states`]. `v_a`, `v_b`,
/// `out` are `[n, heads, head_dim]` (f32, f16 or bf16, any strides); `lse_a`, `lse_b`,
/// `lse_out` contiguous f32 `[n, heads]`. Queued on `stream`; graph-capturable.
///
/// # Safety
/// Every tensor is valid device memory on `dev` for its shape and strides until the work
/// completes; `out` and `lse_out` are not read or written by others meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn merge_states(
    dev: &CudaDevice,
    v_a: &DeviceTensor,
    lse_a: &DeviceTensor,
    v_b: &DeviceTensor,
    lse_b: &DeviceTensor,
    out: &DeviceTensor,
    lse_out: &DeviceTensor,
    stream: &Stream,
) -> Result<()> {
    let all = [DType::F32, DType::F16, DType::BF16];
    if v_a.shape.len() != 3 {
        return Err(Error::shape("v_a", "[n, heads, head_dim]", format!("{:?}", v_a.shape)));
    }
    let (n, h, d) = (v_a.shape[0], v_a.shape[1], v_a.shape[2]);
    let o = dev.ordinal();
    v_a.expect("v_a", &[Some(n), Some(h), Some(d)], &all, o)?;
    v_b.expect("v_b", &[Some(n), Some(h), Some(d)], &all, o)?;
    out.expect("out", &[Some(n), Some(h), Some(d)], &all, o)?;
    for (name, t) in [("lse_a", lse_a), ("lse_b", lse_b), ("lse_out", lse_out)] {
        t.expect(name, &[Some(n), Some(h)], &[DType::F32], o)?;
        if t.strides != [h, 1] && n * h > 0 {
            return Err(Error::invalid(name, "a contiguous [n, heads] tensor"));
        }
    }
    if n * h == 0 {
        return Ok(());
    }
    if n * h > u32::MAX as usize || n > i32::MAX as usize || d > i32::MAX as usize {
        return Err(Error::invalid("v_a", "fewer than 2^31 rows"));
    }
    let p = MergeStatesParams {
        va: v_a.ptr,
        vb: v_b.ptr,
        lse_a: lse_a.ptr,
        lse_b: lse_b.ptr,
        out: out.ptr,
        lse_out: lse_out.ptr,
        va_stride: strides3(v_a),
        vb_stride: strides3(v_b),
        out_stride: strides3(out),
        n: n as i32,
        heads: h as i32,
        head_dim: d as i32,
        va_dtype: v_a.dtype as u32,
        vb_dtype: v_b.dtype as u32,
        out_dtype: out.dtype as u32,
    };
    let threads = d.clamp(32, 256) as u32;
    launch(
        dev,
        stream,
        ModuleId::Attention,
        "kvsieve_merge_states",
        LaunchDims::new(((n * h) as u32, 1, 1), threads),
        &p,
    )
}

/// Paged append on the device (the engine-owned-cache form, like vLLM's
/// `reshape_and_cache`): write `k[i]`, `v[i]` (`[n, num_kv_heads, head_dim]`, f32, f16 or
/// bf16, any strides) into slot `slot_mapping[i]` (device address of `n` contiguous int64,
/// `page * page_size + slot`; negative entries are skipped) of the view's memory, converting
/// to the cache dtype (round to nearest even). Key bounds are not touched: see
/// [`update_key_bounds`]. Graph-capturable.
///
/// # Safety
/// 1. `kv`'s K/V memory may be written (the view is over memory the caller owns and nobody
///    reads the written slots until the work completes);
/// 2. `k`, `v`, `slot_mapping` are valid device memory for their shapes; every non-negative
///    slot is below `num_pages * page_size`.
pub unsafe fn append(
    dev: &CudaDevice,
    kv: &CudaPagedKv,
    k: &DeviceTensor,
    v: &DeviceTensor,
    slot_mapping: u64,
    stream: &Stream,
) -> Result<()> {
    let l = *kv.layout();
    let all = [DType::F32, DType::F16, DType::BF16];
    let o = dev.ordinal();
    if k.shape.len() != 3 {
        return Err(Error::shape("k", format!("[n, {}, {}]", l.num_kv_heads, l.head_dim), format!("{:?}", k.shape)));
    }
    let n = k.shape[0];
    k.expect("k", &[Some(n), Some(l.num_kv_heads), Some(l.head_dim)], &all, o)?;
    v.expect("v", &[Some(n), Some(l.num_kv_heads), Some(l.head_dim)], &all, o)?;
    if slot_mapping == 0 && n > 0 {
        return Err(Error::NullPointer { param: "slot_mapping".into() });
    }
    if !slot_mapping.is_multiple_of(8) {
        return Err(Error::invalid("slot_mapping", "int64 values at an address aligned to 8 bytes"));
    }
    let (kp, vp) = kv.kv_ptrs();
    launch_append(dev, stream, &l, kp, vp, k, v, slot_mapping, n)
}

/// Queue the append kernel (arguments checked by the caller).
///
/// # Safety
/// As [`append`], with `slots` the device address of `n` int64 slot ids.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_append(
    dev: &CudaDevice,
    stream: &Stream,
    l: &PagedKvLayout,
    k_cache: u64,
    v_cache: u64,
    k: &DeviceTensor,
    v: &DeviceTensor,
    slots: u64,
    n: usize,
) -> Result<()> {
    if !matches!(l.dtype, DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!("CUDA append into {} pages: f16 or bf16 only", l.dtype)));
    }
    if n > i32::MAX as usize {
        return Err(Error::invalid("k", "fewer than 2^31 tokens per call"));
    }
    let p = AppendParams {
        k_src: k.ptr,
        v_src: v.ptr,
        slot_mapping: slots,
        k_cache,
        v_cache,
        k_src_stride: strides3(k),
        v_src_stride: strides3(v),
        k_stride: l.k_strides.map(|x| x as i64),
        v_stride: l.v_strides.map(|x| x as i64),
        n: n as i32,
        num_kv_heads: l.num_kv_heads as i32,
        head_dim: l.head_dim as i32,
        page_size: l.page_size as i32,
        k_src_dtype: k.dtype as u32,
        v_src_dtype: v.dtype as u32,
    };
    let name = if l.dtype == DType::F16 { "kvsieve_append_f16" } else { "kvsieve_append_bf16" };
    let threads = l.head_dim.clamp(32, 256) as u32;
    launch(dev, stream, ModuleId::Append, name, LaunchDims::new((n as u32, l.num_kv_heads as u32, 1), threads), &p)
}

/// Update key bounds (`[page][head][min | max][head_dim]` of the cache dtype at `bounds`)
/// from the keys of `kv`: one [`BoundsEntry`] per page (`entries`: a device array of
/// `num_entries`, distinct pages). Graph-capturable.
///
/// # Safety
/// 1. `bounds` is valid device memory for every page of the view's pool;
/// 2. `entries` holds `num_entries` [`BoundsEntry`] with distinct pages below `num_pages`
///    and masks of slots below `page_size` (at most 64 slots per page).
pub unsafe fn update_key_bounds(
    dev: &CudaDevice,
    kv: &CudaPagedKv,
    bounds: u64,
    entries: u64,
    num_entries: usize,
    stream: &Stream,
) -> Result<()> {
    if num_entries == 0 {
        return Ok(());
    }
    if bounds == 0 {
        return Err(Error::NullPointer { param: "bounds".into() });
    }
    if entries == 0 {
        return Err(Error::NullPointer { param: "entries".into() });
    }
    if kv.page_size() > 64 {
        return Err(Error::Unsupported(format!("CUDA key bounds with page_size {}: at most 64", kv.page_size())));
    }
    let (kp, _) = kv.kv_ptrs();
    launch_key_bounds(dev, stream, kv.layout(), kp, bounds, entries, num_entries)
}

/// Queue the key-bounds kernel (arguments checked by the caller).
///
/// # Safety
/// As [`update_key_bounds`].
pub(crate) unsafe fn launch_key_bounds(
    dev: &CudaDevice,
    stream: &Stream,
    l: &PagedKvLayout,
    k_cache: u64,
    bounds: u64,
    entries: u64,
    num_entries: usize,
) -> Result<()> {
    if !matches!(l.dtype, DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!("CUDA key bounds of {} pages: f16 or bf16 only", l.dtype)));
    }
    if num_entries == 0 {
        return Ok(());
    }
    let p = BoundsParams {
        k_cache,
        bounds,
        entries,
        k_stride: l.k_strides.map(|x| x as i64),
        num_entries: num_entries as i32,
        num_kv_heads: l.num_kv_heads as i32,
        head_dim: l.head_dim as i32,
        _pad: 0,
    };
    let name = if l.dtype == DType::F16 { "kvsieve_key_bounds_f16" } else { "kvsieve_key_bounds_bf16" };
    let threads = l.head_dim.clamp(32, 256) as u32;
    launch(
        dev,
        stream,
        ModuleId::Append,
        name,
        LaunchDims::new((num_entries as u32, l.num_kv_heads as u32, 1), threads),
        &p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::CudaPageTable;
    use crate::config::PageLayout;

    /// Every kernel name the host side launches exists in the compiled modules (checked
    /// against nvcc's report, so no GPU is needed).
    #[test]
    fn launched_kernels_exist_in_the_modules() {
        let attention = ModuleId::Attention.ptxas_report();
        let append = ModuleId::Append.ptxas_report();
        let has = |report: &str, name: &str| {
            report.contains(&format!("Compiling entry function '{name}' for 'sm_80'"))
                && report.contains(&format!("Compiling entry function '{name}' for 'sm_90'"))
        };
        for dtype in [DType::F16, DType::BF16] {
            for d in [64, 128] {
                for g in 1..=16 {
                    let name = decode_kernel(dtype, d, rows_per_block(g));
                    assert!(has(attention, name), "{name} missing from cuda/attention.cu");
                }
            }
        }
        for name in ["kvsieve_decode_merge", "kvsieve_merge_states"] {
            assert!(has(attention, name), "{name}");
        }
        for name in ["kvsieve_append_f16", "kvsieve_append_bf16", "kvsieve_key_bounds_f16", "kvsieve_key_bounds_bf16"] {
            assert!(has(append, name), "{name}");
        }
    }

    #[test]
    fn rows_per_block_covers_every_group() {
        for g in 1..=64 {
            let r = rows_per_block(g);
            assert!(matches!(r, 1 | 2 | 4 | 8));
            assert!(g.div_ceil(r) * r >= g);
            assert!(r <= g.next_power_of_two().max(1));
        }
    }

    /// Views the kernels cannot read are refused before any device work (no GPU needed:
    /// nothing here touches the device).
    #[test]
    fn views_outside_the_kernel_limits_are_refused() {
        // SAFETY: a table of an empty batch; its (null) addresses are never read.
        let table = unsafe { CudaPageTable::from_device(0, 0, 0, 0, 0, 0).unwrap() };
        let view = |dtype: DType, page_size: usize, d: usize, layout: PageLayout, k: u64| {
            let l = PagedKvLayout::packed(dtype, 4, page_size, 2, d, layout);
            // SAFETY: only validated, never read.
            unsafe { CudaPagedKv::from_raw(k, 0x2000, l, &table).unwrap() }
        };
        assert!(check_kv_for_device(&view(DType::F16, 16, 128, PageLayout::Nhd, 0x1000)).is_ok());
        assert!(check_kv_for_device(&view(DType::BF16, 64, 64, PageLayout::Hnd, 0x1000)).is_ok());
        assert!(matches!(
            check_kv_for_device(&view(DType::F32, 16, 128, PageLayout::Nhd, 0x1000)),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check_kv_for_device(&view(DType::F16, 16, 96, PageLayout::Nhd, 0x1000)),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check_kv_for_device(&view(DType::F16, 24, 128, PageLayout::Nhd, 0x1000)),
            Err(Error::Unsupported(_))
        ));
        let e = check_kv_for_device(&view(DType::F16, 16, 128, PageLayout::Nhd, 0x1008)).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument { param, .. } if param == "k"), "{e}");
        let mut l = PagedKvLayout::packed(DType::F16, 4, 16, 2, 64, PageLayout::Nhd);
        l.k_strides[2] = 68;
        // SAFETY: only validated.
        let v = unsafe { CudaPagedKv::from_raw(0x1000, 0x2000, l, &table).unwrap() };
        assert!(matches!(check_kv_for_device(&v), Err(Error::Unsupported(_))));
    }

    #[test]
    fn parameter_structs_have_the_kernel_layouts() {
        assert_eq!(std::mem::offset_of!(DecodeParams, k_stride), 88);
        assert_eq!(std::mem::offset_of!(DecodeParams, batch), 160);
        assert_eq!(std::mem::offset_of!(DecodeParams, q_dtype), 192);
        assert_eq!(std::mem::offset_of!(DecodeParams, inv_freq), 224);
        assert_eq!(std::mem::offset_of!(AppendParams, n), 136);
        assert_eq!(std::mem::offset_of!(BoundsParams, num_entries), 48);
        assert_eq!(std::mem::offset_of!(MergeStatesParams, n), 120);
        assert_eq!(std::mem::offset_of!(DecodeMergeParams, batch), 56);
    }
}
