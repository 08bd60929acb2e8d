//! Page-bound selection (Quest) on the device (`cuda/select_pages.cu`), with the semantics
//! of [`crate::select::page_bounds`] for every sequence of a batch at once:
//!
//! - score of a page for a KV head: the largest over the group's query heads of
//!   `Σ_i max(q_i·max_i, q_i·min_i)` over the page's key bounds, `-inf` for an empty page;
//! - per (sequence, KV head): pages best first (higher score, then lower page index, NaN as
//!   `-inf`) until their tokens reach `budget_tokens` (the partial last page counts its real
//!   tokens), at least `min(min_pages, pages)` pages; a sequence within the budget is kept
//!   whole; the kept pages' tokens, ascending, into a [`CudaSelections`].
//!
//! [`page_bounds`] is graph-capturable (three kernels and a memset; sizes from the table's
//! batch size and `max_seq_len`).

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::select::{buffer, check_query, query_f32, to_u32};
use crate::backend::cuda::{CudaDevice, CudaPagedKv, CudaSelections, ModuleId, Stream};
use crate::config::KeyRope;
use crate::error::{Error, Result};
use crate::select::PageBoundsConfig;

const SCORE_WARPS: usize = 8;
const SELECT_BLOCK: u32 = 512;
const EXPAND_BLOCK: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct ScoresParams {
    bounds: u64,
    indptr: u64,
    indices: u64,
    q: u64,
    out: u64,
    status: u64,
    num_pool_pages: u64,
    batch: u32,
    hk: u32,
    d: u32,
    group: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SelectParams {
    scores: u64,
    indptr: u64,
    last_page_len: u64,
    kept: u64,
    seg_pages: u64,
    seg_tokens: u64,
    hk: u32,
    page_size: u32,
    budget_tokens: u32,
    min_pages: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ExpandParams {
    indptr: u64,
    kept: u64,
    seg_tokens: u64,
    head_indptr: u64,
    out: u64,
    hk: u32,
    page_size: u32,
}

/// Device scratch of page-bound selection for one batch shape: page scores and kept pages
/// (`batch * max_pages * num_kv_heads` each), per-list counts, the f32 query, a status word.
pub struct PageBoundsWorkspace {
    dev: Arc<CudaDevice>,
    batch: usize,
    num_qo_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    max_pages: usize,
    scores: DeviceBuffer,
    kept: DeviceBuffer,
    seg_pages: DeviceBuffer,
    seg_tokens: DeviceBuffer,
    q: DeviceBuffer,
    status: DeviceBuffer,
}

impl PageBoundsWorkspace {
    /// Scratch for `batch` sequences of at most `max_seq_len` tokens in pages of
    /// `page_size`, with `num_qo_heads` query and `num_kv_heads` KV heads of `head_dim`.
    pub fn new(
        dev: &Arc<CudaDevice>,
        batch: usize,
        max_seq_len: usize,
        page_size: usize,
        num_qo_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::invalid("page_size", "at least 1"));
        }
        if num_kv_heads == 0 || num_qo_heads == 0 || !num_qo_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::invalid(
                "num_qo_heads",
                format!("a positive multiple of num_kv_heads ({num_kv_heads}), got {num_qo_heads}"),
            ));
        }
        let max_pages = max_seq_len.div_ceil(page_size);
        let slots =
            batch.checked_mul(max_pages).and_then(|x| x.checked_mul(num_kv_heads)).filter(|&x| x <= u32::MAX as usize);
        let slots = slots.ok_or_else(|| Error::invalid("max_seq_len", "batch * pages * num_kv_heads below 2^32"))?;
        Ok(PageBoundsWorkspace {
            dev: dev.clone(),
            batch,
            num_qo_heads,
            num_kv_heads,
            head_dim,
            max_pages,
            scores: buffer::<f32>(dev, slots)?,
            kept: buffer::<u32>(dev, slots)?,
            seg_pages: buffer::<u32>(dev, batch * num_kv_heads)?,
            seg_tokens: buffer::<u32>(dev, batch * num_kv_heads)?,
            q: buffer::<f32>(dev, batch * num_qo_heads * head_dim)?,
            status: buffer::<u32>(dev, 1)?,
        })
    }

    /// Scratch sized for a view (its batch and `max_seq_len`) and `num_qo_heads`.
    pub fn for_view(dev: &Arc<CudaDevice>, kv: &CudaPagedKv, num_qo_heads: usize) -> Result<Self> {
        Self::new(
            dev,
            kv.batch_size(),
            kv.table().max_seq_len(),
            kv.page_size(),
            num_qo_heads,
            kv.num_kv_heads(),
            kv.head_dim(),
        )
    }

    /// The scores of the last run, per sequence `[num_kv_heads][pages]` row-major, given the
    /// sequences' page counts (waits for `stream`).
    pub fn scores_to_host(&self, pages_per_seq: &[usize], stream: &Stream) -> Result<Vec<Vec<f32>>> {
        if pages_per_seq.len() != self.batch {
            return Err(Error::shape(
                "pages_per_seq",
                format!("[{}]", self.batch),
                format!("[{}]", pages_per_seq.len()),
            ));
        }
        let all: Vec<f32> = self.scores.to_vec(stream)?;
        let hk = self.num_kv_heads;
        let mut start = 0;
        let mut out = Vec::with_capacity(self.batch);
        for &np in pages_per_seq {
            if np > self.max_pages || (start + np) * hk > all.len() {
                return Err(Error::out_of_range(
                    "pages_per_seq",
                    np as i64,
                    format!("0..={} pages per sequence", self.max_pages),
                ));
            }
            out.push(all[start * hk..(start + np) * hk].to_vec());
            start += np;
        }
        Ok(out)
    }

    /// Error if the last run met a page id at or past the pool (its score was `-inf`);
    /// waits for `stream`.
    pub fn check_status(&self, stream: &Stream) -> Result<()> {
        let s: Vec<u32> = self.status.to_vec(stream)?;
        if s[0] & 1 != 0 {
            return Err(Error::out_of_range(
                "indices",
                -1,
                "page ids below the pool's num_pages (a page id of the table is past the pool)",
            ));
        }
        Ok(())
    }
}

/// Check the view and the query against the workspace; returns the group size.
fn check(kv: &CudaPagedKv, q: &DeviceTensor, ws: &PageBoundsWorkspace) -> Result<(u64, usize)> {
    let bounds = kv
        .key_bounds()
        .ok_or_else(|| Error::invalid("kv", "a view with key bounds attached (CudaPagedKv::with_key_bounds)"))?;
    if kv.key_rope() == KeyRope::PreRope {
        return Err(Error::invalid(
            "key_rope",
            "keys stored after RoPE (KeyRope::PostRope): bounds over unrotated keys do not bound the rotated keys attention reads",
        ));
    }
    if kv.device() != ws.dev.ordinal() {
        return Err(Error::invalid(
            "kv",
            format!("memory on CUDA device {}, got device {}", ws.dev.ordinal(), kv.device()),
        ));
    }
    let b = kv.batch_size();
    let qi = check_query(&ws.dev, q, "q", b, kv.num_kv_heads(), kv.head_dim())?;
    let fits = b == ws.batch
        && qi.num_qo_heads == ws.num_qo_heads
        && kv.num_kv_heads() == ws.num_kv_heads
        && kv.head_dim() == ws.head_dim
        && kv.table().max_seq_len().div_ceil(kv.page_size()) <= ws.max_pages;
    if !fits {
        return Err(Error::invalid(
            "workspace",
            format!(
                "a workspace for batch {b}, {} query heads, {} KV heads, head_dim {} and {} pages per sequence",
                qi.num_qo_heads,
                kv.num_kv_heads(),
                kv.head_dim(),
                kv.table().max_seq_len().div_ceil(kv.page_size())
            ),
        ));
    }
    Ok((bounds.ptr, qi.num_qo_heads / kv.num_kv_heads()))
}

/// Queue the page-bound scores of every page of every sequence of `kv` for the decode
/// queries `q` (`[batch, num_qo_heads, head_dim]`, f32 / f16 / bf16, contiguous) into the
/// workspace (graph-capturable). Read them with [`PageBoundsWorkspace::scores_to_host`].
pub fn page_scores(stream: &Stream, kv: &CudaPagedKv, q: &DeviceTensor, ws: &mut PageBoundsWorkspace) -> Result<()> {
    let (bounds, group) = check(kv, q, ws)?;
    let dev = ws.dev.clone();
    let qp = query_f32(&dev, stream, q, &ws.q)?;
    ws.status.memset(0, stream)?;
    let (indptr, indices, _) = kv.table().device_ptrs();
    let hk = kv.num_kv_heads();
    let bound_slots = ws.batch * ws.max_pages * hk;
    let p = ScoresParams {
        bounds,
        indptr,
        indices,
        q: qp,
        out: ws.scores.ptr(),
        status: ws.status.ptr(),
        num_pool_pages: kv.layout().num_pages as u64,
        batch: to_u32("batch", ws.batch)?,
        hk: hk as u32,
        d: to_u32("head_dim", kv.head_dim())?,
        group: group as u32,
    };
    let grid = to_u32("pages", bound_slots.div_ceil(SCORE_WARPS))?;
    let name = match kv.dtype() {
        crate::DType::F32 => "kvs_page_scores_f32",
        crate::DType::F16 => "kvs_page_scores_f16",
        crate::DType::BF16 => "kvs_page_scores_bf16",
    };
    // SAFETY: the view's contracts give valid bounds and table addresses; the workspace was
    // checked to hold every page slot of this batch and the f32 query.
    unsafe {
        launch(&dev, stream, ModuleId::SelectPages, name, LaunchDims::new((grid, 1, 1), (32 * SCORE_WARPS) as u32), &p)
    }
}

/// Queue page-bound selection for every sequence of `kv` (graph-capturable): per sequence
/// `b` and KV head `h`, list `b * num_kv_heads + h` of `out` gets the tokens of the kept
/// pages (see the module docs). `out` must have the batch's size, `num_kv_heads` lists per
/// sequence and room for `max_seq_len` tokens per list.
///
/// Errors: an invalid `cfg` (or a budget above u32); a view without key bounds or storing
/// keys before RoPE; a badly shaped `q`; a workspace or `out` of other sizes.
pub fn page_bounds(
    stream: &Stream,
    kv: &CudaPagedKv,
    q: &DeviceTensor,
    cfg: &PageBoundsConfig,
    ws: &mut PageBoundsWorkspace,
    out: &CudaSelections,
) -> Result<()> {
    cfg.validate()?;
    let budget = to_u32("budget_tokens", cfg.budget_tokens)?;
    let min_pages = cfg.min_pages.min(u32::MAX as usize) as u32;
    let hk = kv.num_kv_heads();
    if out.batch_size() != kv.batch_size()
        || out.num_kv_heads() != hk
        || out.max_per_head() < kv.table().max_seq_len()
        || out.device() != kv.device()
    {
        return Err(Error::shape(
            "out",
            format!(
                "selections for batch {}, {hk} KV heads, room for {} tokens per list",
                kv.batch_size(),
                kv.table().max_seq_len()
            ),
            format!("batch {}, {} KV heads, room for {}", out.batch_size(), out.num_kv_heads(), out.max_per_head()),
        ));
    }
    page_scores(stream, kv, q, ws)?;
    let dev = ws.dev.clone();
    let (indptr, _, last) = kv.table().device_ptrs();
    let ps = to_u32("page_size", kv.page_size())?;
    let sp = SelectParams {
        scores: ws.scores.ptr(),
        indptr,
        last_page_len: last,
        kept: ws.kept.ptr(),
        seg_pages: ws.seg_pages.ptr(),
        seg_tokens: ws.seg_tokens.ptr(),
        hk: hk as u32,
        page_size: ps,
        budget_tokens: budget,
        min_pages,
    };
    let grid = (hk as u32, to_u32("batch", ws.batch)?, 1);
    let (oi, ox) = out.device_ptrs();
    let ep = ExpandParams {
        indptr,
        kept: ws.kept.ptr(),
        seg_tokens: ws.seg_tokens.ptr(),
        head_indptr: oi,
        out: ox,
        hk: hk as u32,
        page_size: ps,
    };
    // SAFETY: scratch sized for batch * max_pages * hk slots (checked); `out` holds
    // batch * hk + 1 offsets and batch * hk * max_seq_len tokens (checked above).
    unsafe {
        launch(&dev, stream, ModuleId::SelectPages, "kvs_page_select", LaunchDims::new(grid, SELECT_BLOCK), &sp)?;
        launch(&dev, stream, ModuleId::SelectPages, "kvs_page_expand", LaunchDims::new(grid, EXPAND_BLOCK), &ep)
    }
}
