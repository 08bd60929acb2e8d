//! Prefill attention on tensor cores (`cuda/prefill.cu`), with the semantics of
//! [`crate::attention::prefill`] (dense, causal or not) and of
//! [`crate::attention::prefill_sparse`] (per-head token selections and per-KV-head
//! sinks + window masks, [`StreamingWindow`], the Λ-mask): f16 / bf16 K, V and queries,
//! f32 accumulation, GQA, head_dim 64 or 128, keys stored after RoPE.
//!
//! [`prefill`] is graph-capturable: the query index ([`PrefillQueries`]) and the masks
//! ([`PrefillMasks`]) are uploaded beforehand.

use std::sync::Arc;

use crate::attention::{AttentionParams, StreamingWindow};
use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::{CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, ModuleId, Stream};
use crate::config::KeyRope;
use crate::dtype::DType;
use crate::error::{Error, Result};

const ROWS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    qo_indptr: u64,
    kv_indptr: u64,
    kv_indices: u64,
    last_page_len: u64,
    sinks: u64,
    windows: u64,
    sel_indptr: u64,
    sel_indices: u64,
    k_stride_page: u64,
    k_stride_slot: u64,
    k_stride_head: u64,
    v_stride_page: u64,
    v_stride_slot: u64,
    v_stride_head: u64,
    batch: u32,
    hq: u32,
    hk: u32,
    page_size: u32,
    causal: u32,
    scale: f32,
    soft_cap: f32,
}

/// The ragged query index of a prefill batch on the device: rows `qo_indptr[b] ..
/// qo_indptr[b + 1]` of `q` are the last tokens of sequence `b`.
pub struct PrefillQueries {
    indptr: DeviceBuffer,
    batch: usize,
    total: usize,
    max_q_len: usize,
}

impl PrefillQueries {
    /// Check `qo_indptr` (`batch + 1` non-decreasing values from 0) against the table's
    /// sequence lengths (when the table came from the host) and upload it.
    pub fn upload(dev: &Arc<CudaDevice>, qo_indptr: &[i32], table: &CudaPageTable, stream: &Stream) -> Result<Self> {
        let batch = table.batch_size();
        if qo_indptr.len() != batch + 1 {
            return Err(Error::shape(
                "qo_indptr",
                format!("[{}] (batch + 1)", batch + 1),
                format!("[{}]", qo_indptr.len()),
            ));
        }
        if qo_indptr[0] != 0 {
            return Err(Error::invalid("qo_indptr", "qo_indptr[0] == 0"));
        }
        let mut max_q_len = 0;
        for b in 0..batch {
            let n = qo_indptr[b + 1] - qo_indptr[b];
            if n < 0 {
                return Err(Error::invalid(
                    "qo_indptr",
                    format!("non-decreasing values, qo_indptr[{}] < qo_indptr[{b}]", b + 1),
                ));
            }
            if let Some(lens) = table.seq_lens() {
                if n as usize > lens[b] {
                    return Err(Error::invalid(
                        "qo_indptr",
                        format!(
                            "at most seq_len = {} queries for sequence {b} (queries are its last tokens), got {n}",
                            lens[b]
                        ),
                    ));
                }
            }
            max_q_len = max_q_len.max(n as usize);
        }
        Ok(PrefillQueries {
            indptr: DeviceBuffer::from_slice(dev, qo_indptr, stream)?,
            batch,
            total: qo_indptr[batch] as usize,
            max_q_len,
        })
    }

    /// Query rows in all.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Per-KV-head sinks + window masks on the device (`None`: the head attends causally to
/// every token).
pub struct PrefillMasks {
    sinks: DeviceBuffer,
    windows: DeviceBuffer,
    num_kv_heads: usize,
}

impl PrefillMasks {
    /// Upload one optional window per KV head.
    pub fn upload(dev: &Arc<CudaDevice>, windows: &[Option<StreamingWindow>], stream: &Stream) -> Result<Self> {
        let mut s = Vec::with_capacity(windows.len());
        let mut w = Vec::with_capacity(windows.len());
        for (h, x) in windows.iter().enumerate() {
            match x {
                Some(x) => {
                    let ok = |v: usize| u32::try_from(v).ok().filter(|&v| v != u32::MAX);
                    let (Some(a), Some(b)) = (ok(x.sinks), ok(x.window)) else {
                        return Err(Error::out_of_range(
                            format!("windows[{h}]"),
                            x.window.max(x.sinks) as i64,
                            format!("0..{}", u32::MAX),
                        ));
                    };
                    s.push(a);
                    w.push(b);
                }
                None => {
                    s.push(0);
                    w.push(u32::MAX);
                }
            }
        }
        if s.is_empty() {
            s.push(0);
            w.push(u32::MAX);
        }
        Ok(PrefillMasks {
            sinks: DeviceBuffer::from_slice(dev, &s, stream)?,
            windows: DeviceBuffer::from_slice(dev, &w, stream)?,
            num_kv_heads: windows.len(),
        })
    }
}

/// Queue prefill attention (graph-capturable): `q` is `[total, num_qo_heads, head_dim]`
/// (the view's dtype, f16 or bf16, contiguous), `out` the same shape and dtype, `lse`
/// (optional) `total * num_qo_heads` f32. With `causal`, query `i` of `n` of a sequence of
/// `seq_len` tokens sees tokens `0..=seq_len - n + i`; `masks` adds per-KV-head windows;
/// `selections` (one list per sequence and KV head) restricts KV head `h` of sequence `b`
/// to its listed tokens, as [`crate::attention::prefill_sparse`] (block-sparse patterns are
/// lists of whole blocks).
///
/// Errors: an f32 view or a head_dim other than 64 / 128 (`Unsupported`); keys stored
/// before RoPE or `params.rope` set; a bad soft cap or scale; shapes, dtypes or devices of
/// `q`, `out`, `lse`, `masks` or `queries` that do not match the view; K/V strides or
/// addresses not aligned to 8 elements / 16 bytes.
#[allow(clippy::too_many_arguments)]
pub fn prefill(
    stream: &Stream,
    kv: &CudaPagedKv,
    q: &DeviceTensor,
    queries: &PrefillQueries,
    masks: Option<&PrefillMasks>,
    selections: Option<&CudaSelections>,
    out: &DeviceTensor,
    lse: Option<&DeviceTensor>,
    params: &AttentionParams,
    causal: bool,
) -> Result<()> {
    let dev = CudaDevice::get(kv.device())?;
    let (dtype, hk, d) = (kv.dtype(), kv.num_kv_heads(), kv.head_dim());
    if dtype == DType::F32 || !(d == 64 || d == 128) {
        return Err(Error::Unsupported(format!(
            "tensor-core prefill of {dtype} K/V with head_dim {d} (needs f16 / bf16 and head_dim 64 or 128)"
        )));
    }
    if kv.key_rope() == KeyRope::PreRope || params.rope.is_some() {
        return Err(Error::invalid(
            "key_rope",
            "keys stored after RoPE and no RoPE at read (the device prefill does not rotate keys)",
        ));
    }
    let scale = params.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::invalid("scale", format!("a finite value, got {scale}")));
    }
    let soft_cap = match params.logit_soft_cap {
        None => 0.0,
        Some(c) if c.is_finite() && c > 0.0 => c,
        Some(c) => return Err(Error::invalid("logit_soft_cap", format!("a finite value > 0, got {c}"))),
    };
    let total = queries.total;
    let [t, hq, qd] = q.shape[..] else {
        return Err(Error::shape("q", format!("[total, num_qo_heads, {d}]"), format!("{:?}", q.shape)));
    };
    if t != total || qd != d || hq == 0 || hq % hk != 0 {
        return Err(Error::shape("q", format!("[{total}, a multiple of {hk}, {d}]"), format!("{:?}", q.shape)));
    }
    for (name, x) in [("q", q), ("out", out)] {
        x.expect(name, &[Some(total), Some(hq), Some(d)], &[dtype], dev.ordinal())?;
        if !crate::backend::cuda::select::is_contiguous(x) || x.ptr % 4 != 0 {
            return Err(Error::shape(
                name,
                "a contiguous tensor aligned to 4 bytes",
                format!("strides {:?}", x.strides),
            ));
        }
    }
    if let Some(l) = lse {
        l.expect("lse", &[Some(total), Some(hq)], &[DType::F32], dev.ordinal())?;
        if !crate::backend::cuda::select::is_contiguous(l) || l.ptr % 4 != 0 {
            return Err(Error::shape("lse", "a contiguous f32 array", format!("strides {:?}", l.strides)));
        }
    }
    if let Some(m) = masks {
        if m.num_kv_heads != hk {
            return Err(Error::shape("masks", format!("[{hk}] (one per KV head)"), format!("[{}]", m.num_kv_heads)));
        }
    }
    if let Some(sel) = selections {
        if sel.batch_size() != kv.batch_size() || sel.num_kv_heads() != hk || sel.device() != kv.device() {
            return Err(Error::shape(
                "selections",
                format!("lists for batch {} and {hk} KV heads on device {}", kv.batch_size(), kv.device()),
                format!("batch {}, {} KV heads, device {}", sel.batch_size(), sel.num_kv_heads(), sel.device()),
            ));
        }
    }
    if queries.batch != kv.batch_size() {
        return Err(Error::shape("queries", format!("batch {}", kv.batch_size()), format!("batch {}", queries.batch)));
    }
    let l = kv.layout();
    let (k, v) = kv.kv_ptrs();
    let aligned = l.k_strides.iter().chain(&l.v_strides).all(|&s| s % 8 == 0) && k % 16 == 0 && v % 16 == 0;
    if !aligned {
        return Err(Error::invalid(
            "kv",
            "K/V strides that are multiples of 8 elements and 16-byte aligned addresses (vector loads)",
        ));
    }
    let (indptr, indices, last) = kv.table().device_ptrs();
    let p = Params {
        q: q.ptr,
        k,
        v,
        out: out.ptr,
        lse: lse.map_or(0, |l| l.ptr),
        qo_indptr: queries.indptr.ptr(),
        kv_indptr: indptr,
        kv_indices: indices,
        last_page_len: last,
        sinks: masks.map_or(0, |m| m.sinks.ptr()),
        windows: masks.map_or(0, |m| m.windows.ptr()),
        sel_indptr: selections.map_or(0, |x| x.device_ptrs().0),
        sel_indices: selections.map_or(0, |x| x.device_ptrs().1),
        k_stride_page: l.k_strides[0] as u64,
        k_stride_slot: l.k_strides[1] as u64,
        k_stride_head: l.k_strides[2] as u64,
        v_stride_page: l.v_strides[0] as u64,
        v_stride_slot: l.v_strides[1] as u64,
        v_stride_head: l.v_strides[2] as u64,
        batch: kv.batch_size() as u32,
        hq: hq as u32,
        hk: hk as u32,
        page_size: kv.page_size() as u32,
        causal: causal as u32,
        scale,
        soft_cap,
    };
    let name = match (dtype, d) {
        (DType::F16, 64) => "kvs_prefill_f16_d64",
        (DType::F16, _) => "kvs_prefill_f16_d128",
        (_, 64) => "kvs_prefill_bf16_d64",
        (_, _) => "kvs_prefill_bf16_d128",
    };
    let grid = (queries.max_q_len.div_ceil(ROWS) as u32, hq as u32, kv.batch_size() as u32);
    // SAFETY: the view's contract covers K, V and the table; q, out, lse and the query
    // index were checked against total, heads and head_dim; masks hold hk entries.
    unsafe { launch(&dev, stream, ModuleId::Prefill, name, LaunchDims::new(grid, 128), &p) }
}
