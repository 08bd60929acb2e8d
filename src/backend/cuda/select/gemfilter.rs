//! GemFilter on the device (`cuda/gemfilter.cu`, `cuda/topk.cu`), with the semantics of
//! [`crate::select::gemfilter::token_scores`], [`crate::select::gemfilter::avg_pool`] and
//! [`crate::select::gemfilter::select`]: per token the sum over query heads of `q_h·k_t`
//! (GQA: each KV head's keys against the sum of its group's queries), a centred average
//! pool, the forced first / last tokens ranked first, and the `k` best tokens ascending.
//!
//! [`gemfilter_select`] is graph-capturable (three kernels); [`GemFilterWorkspace::selected`]
//! and [`GemFilterWorkspace::scores_to_host`] read back.

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::select::topk::top_k_segments_raw;
use crate::backend::cuda::select::{buffer, check_query, query_f32, to_u32};
use crate::backend::cuda::{CudaDevice, ModuleId, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::select::gemfilter::GemFilterConfig;

const SCORE_WARPS: usize = 8;
/// Tokens per warp of the scoring kernel.
const TOKENS_PER_WARP: usize = 4;
/// Shared memory of the scoring kernel: the summed queries, `num_kv_heads * head_dim` f32.
const MAX_SHARED: usize = 48 * 1024;

#[repr(C)]
#[derive(Clone, Copy)]
struct ScoresParams {
    keys: u64,
    q: u64,
    scores: u64,
    stride_t: u64,
    stride_h: u64,
    n: u32,
    hk: u32,
    d: u32,
    g: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PoolParams {
    input: u64,
    out: u64,
    n: u32,
    kernel: u32,
    keep_first: u32,
    keep_last: u32,
}

/// Device scratch of GemFilter for a context of `n` tokens and `num_qo_heads` query heads
/// of `head_dim`.
pub struct GemFilterWorkspace {
    dev: Arc<CudaDevice>,
    n: usize,
    numel_q: usize,
    q: DeviceBuffer,
    scores: DeviceBuffer,
    pooled: DeviceBuffer,
    seg: DeviceBuffer,
    out: DeviceBuffer,
    count: DeviceBuffer,
    k: usize,
}

impl GemFilterWorkspace {
    /// Scratch for `n` tokens, `num_qo_heads * head_dim` query values and up to `max_k`
    /// kept tokens.
    pub fn new(
        dev: &Arc<CudaDevice>,
        n: usize,
        num_qo_heads: usize,
        head_dim: usize,
        max_k: usize,
        stream: &Stream,
    ) -> Result<Self> {
        let n32 = to_u32("n", n)?;
        Ok(GemFilterWorkspace {
            dev: dev.clone(),
            n,
            numel_q: num_qo_heads * head_dim,
            q: buffer::<f32>(dev, num_qo_heads * head_dim)?,
            scores: buffer::<f32>(dev, n)?,
            pooled: buffer::<f32>(dev, n)?,
            seg: DeviceBuffer::from_slice(dev, &[0u32, n32], stream)?,
            out: buffer::<u32>(dev, max_k)?,
            count: buffer::<u32>(dev, 1)?,
            k: max_k,
        })
    }

    /// The unpooled scores of the last run (waits for `stream`).
    pub fn scores_to_host(&self, stream: &Stream) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = self.scores.to_vec(stream)?;
        v.truncate(self.n);
        Ok(v)
    }

    /// The pooled scores of the last [`gemfilter_select`] (forced tokens at `+inf`).
    pub fn pooled_to_host(&self, stream: &Stream) -> Result<Vec<f32>> {
        let mut v: Vec<f32> = self.pooled.to_vec(stream)?;
        v.truncate(self.n);
        Ok(v)
    }

    /// The tokens the last [`gemfilter_select`] kept, ascending (waits for `stream`).
    pub fn selected(&self, stream: &Stream) -> Result<Vec<u32>> {
        let c: Vec<u32> = self.count.to_vec(stream)?;
        let mut v: Vec<u32> = self.out.to_vec(stream)?;
        v.truncate(c[0] as usize);
        Ok(v)
    }

    /// Queue a copy of the `max_k` kept-token slots (u32 below 2^31, so also valid int32) to
    /// device memory at `dst`, on `stream` (graph-capturable).
    ///
    /// # Safety
    /// `dst` is device memory on this workspace's device for `max_k` 4-byte values, not
    /// otherwise used until the copy completes.
    pub unsafe fn copy_selected_to(&self, dst: u64, stream: &Stream) -> Result<()> {
        if dst == 0 {
            return Err(Error::NullPointer { param: "indices".into() });
        }
        self.dev.bind()?;
        cudarc::driver::result::memcpy_dtod_async(dst, self.out.ptr(), self.k * 4, stream.raw())
            .map_err(crate::backend::cuda::device::driver_err("copying the kept tokens"))
    }

    /// Device address of the kept tokens (u32, ascending) and of their count.
    pub fn selected_ptrs(&self) -> (u64, u64) {
        (self.out.ptr(), self.count.ptr())
    }
}

/// Queue the unpooled GemFilter scores of every token of `keys` (`[n, num_kv_heads,
/// head_dim]` on the device, channels contiguous) for the query `q` (`[num_qo_heads,
/// head_dim]` or with a leading 1) into the workspace. Graph-capturable.
pub fn gemfilter_scores(
    stream: &Stream,
    q: &DeviceTensor,
    keys: &DeviceTensor,
    ws: &mut GemFilterWorkspace,
) -> Result<()> {
    let dev = ws.dev.clone();
    let [n, hk, d] = keys.shape[..] else {
        return Err(Error::shape("keys", "[n, num_kv_heads, head_dim]", format!("{:?}", keys.shape)));
    };
    keys.expect("keys", &[None, None, None], &[DType::F32, DType::F16, DType::BF16], dev.ordinal())?;
    if hk == 0 {
        return Err(Error::shape("keys", "[n, num_kv_heads >= 1, head_dim]", format!("{:?}", keys.shape)));
    }
    crate::config::validate_head_dim(d)?;
    if keys.strides[2] != 1 {
        return Err(Error::shape("keys", "contiguous channels (last stride 1)", format!("strides {:?}", keys.strides)));
    }
    if hk * d * 4 > MAX_SHARED {
        return Err(Error::Unsupported(format!(
            "GemFilter on the device with num_kv_heads * head_dim above {} (got {})",
            MAX_SHARED / 4,
            hk * d
        )));
    }
    let qi = check_query(&dev, q, "q", 1, hk, d)?;
    if n != ws.n || q.numel() > ws.numel_q {
        return Err(Error::invalid("workspace", format!("a workspace for {n} tokens and {} query values", q.numel())));
    }
    let qp = query_f32(&dev, stream, q, &ws.q)?;
    let p = ScoresParams {
        keys: keys.ptr,
        q: qp,
        scores: ws.scores.ptr(),
        stride_t: keys.strides[0] as u64,
        stride_h: keys.strides[1] as u64,
        n: n as u32,
        hk: hk as u32,
        d: d as u32,
        g: (qi.num_qo_heads / hk) as u32,
    };
    let name = match keys.dtype {
        DType::F32 => "kvs_gemfilter_scores_f32",
        DType::F16 => "kvs_gemfilter_scores_f16",
        DType::BF16 => "kvs_gemfilter_scores_bf16",
    };
    let grid = to_u32("n", n.div_ceil(SCORE_WARPS * TOKENS_PER_WARP))?;
    let dims =
        LaunchDims { grid: (grid, 1, 1), block: ((32 * SCORE_WARPS) as u32, 1, 1), shared_bytes: (hk * d * 4) as u32 };
    // SAFETY: keys checked (shape, dtype, device, alignment; valid per DeviceTensor's
    // contract for its shape and strides); q f32 with hq * d values; scores n f32.
    unsafe { launch(&dev, stream, ModuleId::Gemfilter, name, dims, &p) }
}

/// Queue GemFilter selection (graph-capturable): scores, centred average pool of width
/// `cfg.pool_kernel` with the first `keep_first` and last `keep_last` tokens forced, and
/// the `cfg.k` best tokens, ascending, into the workspace ([`GemFilterWorkspace::selected`]).
///
/// Errors: as [`crate::select::gemfilter::select`] (empty context, `k` outside `1..=n`,
/// forced tokens above `k`, an even pool width), a bad `q` or `keys`, a workspace made for
/// another size or a smaller `k`.
pub fn gemfilter_select(
    stream: &Stream,
    q: &DeviceTensor,
    keys: &DeviceTensor,
    cfg: &GemFilterConfig,
    ws: &mut GemFilterWorkspace,
) -> Result<()> {
    let n = keys.shape.first().copied().unwrap_or(0);
    if n == 0 {
        return Err(Error::invalid("keys", "a non-empty context"));
    }
    if cfg.k == 0 || cfg.k > n {
        return Err(Error::out_of_range("k", cfg.k as i64, format!("1..={n} (the context length)")));
    }
    if cfg.keep_first + cfg.keep_last > cfg.k {
        return Err(Error::invalid(
            "k",
            format!("at least keep_first + keep_last = {}", cfg.keep_first + cfg.keep_last),
        ));
    }
    if cfg.pool_kernel == 0 || cfg.pool_kernel.is_multiple_of(2) {
        return Err(Error::invalid("pool_kernel", format!("an odd width (1 = no pooling), got {}", cfg.pool_kernel)));
    }
    if cfg.k > ws.k {
        return Err(Error::invalid(
            "workspace",
            format!("a workspace for at least k = {} tokens (it has room for {})", cfg.k, ws.k),
        ));
    }
    gemfilter_scores(stream, q, keys, ws)?;
    let dev = ws.dev.clone();
    let pp = PoolParams {
        input: ws.scores.ptr(),
        out: ws.pooled.ptr(),
        n: n as u32,
        kernel: to_u32("pool_kernel", cfg.pool_kernel)?,
        keep_first: cfg.keep_first.min(n) as u32,
        keep_last: cfg.keep_last.min(n) as u32,
    };
    let blocks = n.div_ceil(256).min(65535) as u32;
    // SAFETY: scores and pooled hold n f32; seg is [0, n]; out holds at least k u32.
    unsafe {
        launch(&dev, stream, ModuleId::Gemfilter, "kvs_avg_pool", LaunchDims::new((blocks, 1, 1), 256), &pp)?;
        top_k_segments_raw(&dev, stream, ws.pooled.ptr(), ws.seg.ptr(), 1, cfg.k as u32, ws.out.ptr(), ws.count.ptr())
    }
}
