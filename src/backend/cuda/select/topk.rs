//! Device top-k over segments of f32 scores (`cuda/topk.cu`): per segment the `k` best
//! entries (higher score first, ties to the lower index, NaN as `-inf`, as
//! [`crate::select::top_k`]), indices relative to the segment start, ascending.
//!
//! The kernel is a block-wide radix select (four 8-bit passes over an order-preserving
//! integer key) followed by an index-order compaction; one block per segment.

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::DeviceBuffer;
use crate::backend::cuda::select::{buffer, to_u32};
use crate::backend::cuda::{CudaDevice, ModuleId, Stream};
use crate::error::{Error, Result};

pub(crate) const TOPK_BLOCK: u32 = 512;

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct TopkParams {
    pub scores: u64,
    pub seg_indptr: u64,
    pub out: u64,
    pub out_count: u64,
    pub k: u32,
}

/// Queue the top-k of `num_segments` segments (graph-capturable): segment `s` is
/// `scores[seg_indptr[s] .. seg_indptr[s + 1]]`; its `min(k, len)` best indices go to
/// `out[s * k ..]` ascending, their number to `out_count[s]`.
///
/// # Safety
/// Device addresses on `dev`: `seg_indptr` holds `num_segments + 1` non-decreasing u32,
/// `scores` at least `seg_indptr[num_segments]` f32, `out` `num_segments * k` u32 and
/// `out_count` `num_segments` u32.
#[allow(clippy::too_many_arguments)]
pub unsafe fn top_k_segments_raw(
    dev: &CudaDevice,
    stream: &Stream,
    scores: u64,
    seg_indptr: u64,
    num_segments: usize,
    k: u32,
    out: u64,
    out_count: u64,
) -> Result<()> {
    let p = TopkParams { scores, seg_indptr, out, out_count, k };
    let grid = to_u32("num_segments", num_segments)?;
    launch(dev, stream, ModuleId::Topk, "kvs_topk_segments", LaunchDims::new((grid, 1, 1), TOPK_BLOCK), &p)
}

/// Top-k of each segment of `scores` (f32 on the device), segments given by their lengths
/// (uploaded; not graph-capturable). Returns per segment the kept indices, ascending.
///
/// Errors: `scores` shorter than the segments, `k` 0 or above u32.
pub fn top_k_segments(
    dev: &Arc<CudaDevice>,
    stream: &Stream,
    scores: &DeviceBuffer,
    seg_lens: &[usize],
    k: usize,
) -> Result<Vec<Vec<u32>>> {
    if k == 0 {
        return Err(Error::invalid("k", "at least 1"));
    }
    let k32 = to_u32("k", k)?;
    let mut indptr = vec![0u32];
    for &l in seg_lens {
        let next = *indptr.last().expect("starts with 0") as usize + l;
        indptr.push(to_u32("seg_lens", next)?);
    }
    let total = *indptr.last().expect("starts with 0") as usize;
    if scores.len() < total * 4 {
        return Err(Error::shape(
            "scores",
            format!("at least {total} f32 (the segments' total length)"),
            format!("{} bytes", scores.len()),
        ));
    }
    let ns = seg_lens.len();
    let ip = DeviceBuffer::from_slice(dev, &indptr, stream)?;
    let out = buffer::<u32>(dev, ns * k)?;
    let cnt = buffer::<u32>(dev, ns)?;
    // SAFETY: sizes as required above.
    unsafe { top_k_segments_raw(dev, stream, scores.ptr(), ip.ptr(), ns, k32, out.ptr(), cnt.ptr())? };
    let all: Vec<u32> = out.to_vec(stream)?;
    let counts: Vec<u32> = cnt.to_vec(stream)?;
    Ok((0..ns).map(|s| all[s * k..s * k + counts[s] as usize].to_vec()).collect())
}
