//! Token selection on the device, with the semantics of the CPU functions in
//! [`crate::select`] (answers equal within float tolerance: scores are summed in another
//! order, and near-ties may rank differently):
//!
//! - [`topk`]: a block-wide radix select (top-k of segments of f32 scores, indices
//!   ascending), the ranking every selection kernel shares;
//! - [`pages`]: page-bound (Quest) scores over the device key bounds and the top pages to a
//!   token budget with a minimum page count, as [`crate::select::page_bounds`];
//! - [`cluster`]: centroid retrieval, flat and hierarchical, with threshold or budget, as
//!   [`crate::select::cluster::ClusterIndex::retrieve`] (including its evaluation counts);
//! - [`kmeans`]: Lloyd iterations on the device (tensor-core assignment for f16 / bf16
//!   keys) as [`crate::select::cluster::kmeans_from_centroids`];
//! - [`gemfilter`]: GemFilter token scores, average pooling and top-k, as
//!   [`crate::select::gemfilter::select`].
//!
//! # CUDA graphs
//! The calls marked "graph-capturable" queue kernels (and `cuMemsetD8Async`) only: no
//! allocation, no host copy, no synchronisation, launch sizes from host-known sizes. Their
//! workspaces are allocated beforehand; reading results back (`*_to_host`, `stats`,
//! `check_status`) synchronises and is not capturable. Make one call outside the capture
//! first: it loads the kernel modules (as for decode). [`prefill`](crate::backend::cuda::prefill)
//! follows the same rules.

pub mod cluster;
pub mod gemfilter;
pub mod kmeans;
pub mod pages;
pub mod topk;

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::{CudaDevice, ModuleId, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy)]
struct ToF32Params {
    input: u64,
    out: u64,
    n: u64,
    dtype: u32,
}

/// Queue `out[i] = in[i] as f32` for `n` elements of `dtype` at `input` (graph-capturable).
///
/// # Safety
/// `input` holds `n` elements of `dtype` and `out` room for `n` f32, on `dev`.
pub(crate) unsafe fn to_f32(
    dev: &CudaDevice,
    stream: &Stream,
    input: u64,
    dtype: DType,
    n: usize,
    out: u64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(256).min(4096) as u32;
    let p = ToF32Params { input, out, n: n as u64, dtype: dtype as u32 };
    launch(dev, stream, ModuleId::Topk, "kvs_to_f32", LaunchDims::new((blocks, 1, 1), 256), &p)
}

/// Whether a tensor is contiguous row-major.
pub(crate) fn is_contiguous(t: &DeviceTensor) -> bool {
    t.strides == crate::tensor::contiguous_strides(&t.shape)
}

/// A query tensor checked against its expected shape and made f32 on the device.
pub(crate) struct QueryF32 {
    /// Query heads per row (per sequence).
    pub num_qo_heads: usize,
}

/// Check a decode query `q` (`[rows, num_qo_heads, head_dim]`, or `[num_qo_heads, head_dim]`
/// when `rows == 1`), contiguous, f32 / f16 / bf16 on `dev`, with `num_qo_heads` a positive
/// multiple of `num_kv_heads`.
pub(crate) fn check_query(
    dev: &CudaDevice,
    q: &DeviceTensor,
    param: &str,
    rows: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<QueryF32> {
    let hq = match *q.shape.as_slice() {
        [r, hq, d] if r == rows && d == head_dim => hq,
        [hq, d] if rows == 1 && d == head_dim => hq,
        _ => {
            let want = if rows == 1 {
                format!("[num_qo_heads, {head_dim}] or [1, num_qo_heads, {head_dim}]")
            } else {
                format!("[{rows}, num_qo_heads, {head_dim}]")
            };
            return Err(Error::shape(param, want, format!("{:?}", q.shape)));
        }
    };
    q.expect(
        param,
        &q.shape.iter().map(|&x| Some(x)).collect::<Vec<_>>(),
        &[DType::F32, DType::F16, DType::BF16],
        dev.ordinal(),
    )?;
    if !is_contiguous(q) {
        return Err(Error::shape(param, "a contiguous (row-major) tensor", format!("strides {:?}", q.strides)));
    }
    if hq == 0 || hq % num_kv_heads != 0 {
        return Err(Error::shape(
            param,
            format!("a number of query heads that is a positive multiple of num_kv_heads {num_kv_heads}"),
            format!("{hq}"),
        ));
    }
    Ok(QueryF32 { num_qo_heads: hq })
}

/// Queue the conversion of a checked query into `buf` (f32, `numel` values) and return the
/// address of the f32 query: `q` itself when it is f32 already. Graph-capturable.
pub(crate) fn query_f32(dev: &CudaDevice, stream: &Stream, q: &DeviceTensor, buf: &DeviceBuffer) -> Result<u64> {
    if q.dtype == DType::F32 {
        return Ok(q.ptr);
    }
    let n = q.numel();
    if buf.len() < n * 4 {
        return Err(Error::shape(
            "q",
            format!("at most {} elements (the workspace's query size)", buf.len() / 4),
            format!("{n}"),
        ));
    }
    // SAFETY: `q` was checked (shape, dtype, device, alignment) and holds n elements;
    // `buf` holds at least n f32.
    unsafe { to_f32(dev, stream, q.ptr, q.dtype, n, buf.ptr())? };
    Ok(buf.ptr())
}

/// `n` values of `T` on the device (at least one element, so kernels may form addresses).
pub(crate) fn buffer<T>(dev: &Arc<CudaDevice>, n: usize) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(dev, n.max(1) * std::mem::size_of::<T>())
}

/// Check that `x` fits the u32 the kernels use.
pub(crate) fn to_u32(param: &str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::out_of_range(param, x as i64, format!("0..={}", u32::MAX)))
}
