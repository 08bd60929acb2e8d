//! Centroid retrieval on the device (`cuda/cluster.cu`), with the semantics of
//! [`ClusterIndex::retrieve`] and [`ClusterIndex::retrieve_hierarchical`]: estimated
//! attention per key of each cluster averaged over the GQA group, clusters above a
//! threshold or the best ones up to a token budget (the crossing cluster giving its lowest
//! token indices), and, hierarchically, only the children of the coarse clusters opened.
//!
//! [`CudaClusterIndex::retrieve`] and [`CudaClusterIndex::retrieve_hierarchical`] are
//! graph-capturable once their thresholds are in the workspace: a threshold different from
//! the previous call's is uploaded (a host copy), so capture a call whose thresholds
//! repeat the previous call's, or use budgets.

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::select::{buffer, check_query, query_f32, to_u32};
use crate::backend::cuda::{CudaDevice, CudaSelections, ModuleId, Stream};
use crate::error::{Error, Result};
use crate::select::cluster::{ClusterIndex, CoarseRetrieve, RetrievalStats, Retrieve};

const LOGIT_WARPS: u32 = 8;
const EST_BLOCK: u32 = 512;
const GATHER_BLOCK: u32 = 512;
const MIX_BLOCK: u32 = 512;
/// Query heads per KV head the estimate kernel holds (its shared arrays).
const MAX_GROUP: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct LogitsParams {
    q: u64,
    cent: u64,
    parent: u64,
    open: u64,
    logits: u64,
    k: u32,
    d: u32,
    g: u32,
    scale: f32,
    k1: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct EstimateParams {
    logits: u64,
    sizes: u64,
    parent: u64,
    open: u64,
    clogits: u64,
    csizes: u64,
    thresholds: u64,
    est: u64,
    take: u64,
    stats: u64,
    k: u32,
    g: u32,
    k1: u32,
    mode: u32,
    budget: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MixedParams {
    logits: u64,
    q: u64,
    radii: u64,
    sizes: u64,
    parent: u64,
    open: u64,
    est: u64,
    bound: u64,
    take: u64,
    stats: u64,
    cand: u64,
    k: u32,
    g: u32,
    d: u32,
    k1: u32,
    budget: u32,
    cap: u32,
    scale: f32,
}

/// Bytes of one ranked cluster in the mixed ranking's scratch (`KvsRanked`).
const RANKED_BYTES: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct GatherParams {
    take: u64,
    assign: u64,
    rank: u64,
    stats: u64,
    head_indptr: u64,
    out: u64,
    k: u32,
    m: u32,
}

/// A [`ClusterIndex`] copied to the device: raw centroids, sizes, each clustered token's
/// cluster and rank among its members, the clusters' radii when the index has them (for
/// [`Retrieve::MixedBudget`]), and the coarse level (centroids, sizes, parents).
pub struct CudaClusterIndex {
    dev: Arc<CudaDevice>,
    num_kv_heads: usize,
    head_dim: usize,
    k: usize,
    k1: usize,
    clustered_len: usize,
    seq_len: usize,
    cent: DeviceBuffer,
    sizes: DeviceBuffer,
    assign: DeviceBuffer,
    rank: DeviceBuffer,
    radii: Option<DeviceBuffer>,
    coarse: Option<(DeviceBuffer, DeviceBuffer, DeviceBuffer)>,
}

impl CudaClusterIndex {
    /// Copy `index` to the device (not graph-capturable: it uploads). Call again after
    /// [`ClusterIndex::assign_new`] or a rebuild.
    pub fn upload(dev: &Arc<CudaDevice>, index: &ClusterIndex, stream: &Stream) -> Result<Self> {
        let (hk, d, k, m) = (index.num_kv_heads(), index.head_dim(), index.num_clusters(), index.clustered_len());
        to_u32("clustered_len", m * hk)?;
        let mut cent = Vec::with_capacity(hk * k * d);
        let mut sizes = Vec::with_capacity(hk * k);
        let mut assign = Vec::with_capacity(hk * m);
        let mut rank = vec![0u32; hk * m];
        let has_radii = (0..hk).all(|h| index.head(h).radii().len() == k);
        let mut radii = Vec::with_capacity(if has_radii { hk * k } else { 0 });
        for h in 0..hk {
            let c = index.head(h);
            cent.extend_from_slice(c.centroids());
            sizes.extend_from_slice(c.sizes());
            if has_radii {
                radii.extend_from_slice(c.radii());
            }
            assign.extend_from_slice(&c.assignment()[..m]);
            for cl in 0..k {
                for (r, &t) in c.members(cl).iter().enumerate() {
                    rank[h * m + t as usize] = r as u32;
                }
            }
        }
        let k1 = index.num_coarse_clusters();
        let coarse = if k1 > 0 {
            let mut cc = Vec::with_capacity(hk * k1 * d);
            let mut cs = Vec::with_capacity(hk * k1);
            let mut parent = vec![0u32; hk * k];
            for h in 0..hk {
                let lv = index.coarse(h).expect("k1 > 0: every head has a coarse level");
                cc.extend_from_slice(lv.centroids());
                cs.extend_from_slice(lv.sizes());
                for c in 0..k1 {
                    for &f in lv.children(c) {
                        parent[h * k + f as usize] = c as u32;
                    }
                }
            }
            Some((
                DeviceBuffer::from_slice(dev, &cc, stream)?,
                DeviceBuffer::from_slice(dev, &cs, stream)?,
                DeviceBuffer::from_slice(dev, &parent, stream)?,
            ))
        } else {
            None
        };
        Ok(CudaClusterIndex {
            dev: dev.clone(),
            num_kv_heads: hk,
            head_dim: d,
            k,
            k1,
            clustered_len: m,
            seq_len: index.seq_len(),
            cent: DeviceBuffer::from_slice(dev, &cent, stream)?,
            sizes: DeviceBuffer::from_slice(dev, &sizes, stream)?,
            assign: DeviceBuffer::from_slice(dev, if assign.is_empty() { &[0u32][..] } else { &assign }, stream)?,
            rank: DeviceBuffer::from_slice(dev, if rank.is_empty() { &[0u32][..] } else { &rank }, stream)?,
            radii: if has_radii && !radii.is_empty() {
                Some(DeviceBuffer::from_slice(dev, &radii, stream)?)
            } else {
                None
            },
            coarse,
        })
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn num_clusters(&self) -> usize {
        self.k
    }
    pub fn num_coarse_clusters(&self) -> usize {
        self.k1
    }
    /// Tokens in clusters (the length of every retrieved list is at most this).
    pub fn clustered_len(&self) -> usize {
        self.clustered_len
    }
    /// Whether the index carries cluster radii (needed by [`Retrieve::MixedBudget`]).
    pub fn has_radii(&self) -> bool {
        self.radii.is_some()
    }
    /// Sequence length the index covered when uploaded.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Selections (one sequence, `num_kv_heads` lists) with room for every clustered token.
    pub fn alloc_selections(&self, stream: &Stream) -> Result<CudaSelections> {
        CudaSelections::alloc(&self.dev, 1, self.num_kv_heads, self.clustered_len, stream)
    }

    fn check_out(&self, out: &CudaSelections) -> Result<()> {
        if out.batch_size() != 1
            || out.num_kv_heads() != self.num_kv_heads
            || out.max_per_head() < self.clustered_len
            || out.device() != self.dev.ordinal()
        {
            return Err(Error::shape(
                "out",
                format!(
                    "selections for 1 sequence, {} KV heads, room for {} tokens per list",
                    self.num_kv_heads, self.clustered_len
                ),
                format!("batch {}, {} KV heads, room for {}", out.batch_size(), out.num_kv_heads(), out.max_per_head()),
            ));
        }
        Ok(())
    }

    /// Check `q` and the workspace; returns the group size.
    fn prepare(&self, q: &DeviceTensor, ws: &ClusterWorkspace) -> Result<usize> {
        let qi = check_query(&self.dev, q, "q", 1, self.num_kv_heads, self.head_dim)?;
        let g = qi.num_qo_heads / self.num_kv_heads;
        if g > MAX_GROUP {
            return Err(Error::Unsupported(format!(
                "centroid retrieval on the device with more than {MAX_GROUP} query heads per KV head (got {g})"
            )));
        }
        if ws.num_qo_heads != qi.num_qo_heads
            || ws.hk != self.num_kv_heads
            || ws.k < self.k
            || ws.k1 < self.k1
            || ws.d != self.head_dim
        {
            return Err(Error::invalid(
                "workspace",
                format!("a workspace made by ClusterWorkspace::new for this index and {} query heads", qi.num_qo_heads),
            ));
        }
        Ok(g)
    }

    #[allow(clippy::too_many_arguments)]
    fn logits(
        &self,
        stream: &Stream,
        q: u64,
        cent: u64,
        k: usize,
        g: usize,
        open: Option<(u64, u64)>,
        out: u64,
    ) -> Result<()> {
        let (parent, open_ptr) = open.unwrap_or((0, 0));
        let p = LogitsParams {
            q,
            cent,
            parent,
            open: open_ptr,
            logits: out,
            k: k as u32,
            d: self.head_dim as u32,
            g: g as u32,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            k1: self.k1 as u32,
        };
        let grid = ((k as u32).div_ceil(LOGIT_WARPS), self.num_kv_heads as u32, 1);
        // SAFETY: q holds hq * d f32, cent hk * k * d, out hk * g * k (workspace checked);
        // parent / open (when given) hk * k and hk * k1.
        unsafe {
            launch(
                &self.dev,
                stream,
                ModuleId::Cluster,
                "kvs_cluster_logits",
                LaunchDims::new(grid, 32 * LOGIT_WARPS),
                &p,
            )
        }
    }

    /// Queue one estimate-and-select pass (see `cuda/cluster.cu`).
    fn estimate(&self, stream: &Stream, p: EstimateParams) -> Result<()> {
        // SAFETY: every array holds hk rows of its size (workspace and index checked).
        unsafe {
            launch(
                &self.dev,
                stream,
                ModuleId::Cluster,
                "kvs_cluster_estimate_select",
                LaunchDims::new((self.num_kv_heads as u32, 1, 1), EST_BLOCK),
                &p,
            )
        }
    }

    fn gather(&self, stream: &Stream, ws: &ClusterWorkspace, out: &CudaSelections) -> Result<()> {
        let (oi, ox) = out.device_ptrs();
        let p = GatherParams {
            take: ws.take.ptr(),
            assign: self.assign.ptr(),
            rank: self.rank.ptr(),
            stats: ws.stats.ptr(),
            head_indptr: oi,
            out: ox,
            k: self.k as u32,
            m: self.clustered_len as u32,
        };
        // SAFETY: `out` holds hk + 1 offsets and hk * clustered_len tokens (checked).
        unsafe {
            launch(
                &self.dev,
                stream,
                ModuleId::Cluster,
                "kvs_cluster_gather",
                LaunchDims::new((self.num_kv_heads as u32, 1, 1), GATHER_BLOCK),
                &p,
            )
        }
    }

    /// Queue the mixed ranking's choice after estimates of mode 2 (see `cuda/cluster.cu`);
    /// `open` = (parents, opened coarse clusters) for a hierarchical retrieval.
    fn mixed(
        &self,
        stream: &Stream,
        ws: &ClusterWorkspace,
        q: u64,
        g: usize,
        budget: u32,
        open: Option<(u64, u64)>,
    ) -> Result<()> {
        let radii = self
            .radii
            .as_ref()
            .ok_or_else(|| Error::Internal("mixed ranking without radii (checked by check_how)".into()))?;
        let (parent, open_ptr) = open.unwrap_or((0, 0));
        let p = MixedParams {
            logits: ws.logits.ptr(),
            q,
            radii: radii.ptr(),
            sizes: self.sizes.ptr(),
            parent,
            open: open_ptr,
            est: ws.est.ptr(),
            bound: ws.bound.ptr(),
            take: ws.take.ptr(),
            stats: ws.stats.ptr(),
            cand: ws.cand.ptr(),
            k: self.k as u32,
            g: g as u32,
            d: self.head_dim as u32,
            k1: self.k1 as u32,
            budget,
            cap: ws.cap as u32,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        // SAFETY: logits hk * g * k, q hk * g * d, radii / sizes / est / bound / take hk * k,
        // stats hk * 3, cand hk * 2 * cap ranked entries with cap >= k (workspace checked).
        unsafe {
            launch(
                &self.dev,
                stream,
                ModuleId::Cluster,
                "kvs_cluster_mixed_select",
                LaunchDims::new((self.num_kv_heads as u32, 1, 1), MIX_BLOCK),
                &p,
            )
        }
    }

    /// `how` is valid and this index can answer it (radii for the mixed ranking).
    fn check_how(&self, how: &Retrieve) -> Result<()> {
        validate_retrieve(how, self.num_kv_heads)?;
        if matches!(how, Retrieve::MixedBudget(_)) && self.radii.is_none() {
            return Err(Error::invalid(
                "how",
                "an index with cluster radii for MixedBudget (any build, or a version 2 file; rebuild an index loaded from a version 1 file)",
            ));
        }
        Ok(())
    }

    /// Mode, threshold address and budget of a fine or coarse choice.
    fn mode(
        &self,
        how: &Retrieve,
        ws: &mut ClusterWorkspace,
        stream: &Stream,
        coarse: bool,
    ) -> Result<(u32, u64, u32)> {
        let hk = self.num_kv_heads;
        let t = match how {
            Retrieve::Threshold(t) => vec![*t; hk],
            Retrieve::PerHeadThreshold(v) => v.clone(),
            Retrieve::Budget(b) => return Ok((1, 0, (*b).min(u32::MAX as usize) as u32)),
            Retrieve::MixedBudget(b) => return Ok((2, 0, (*b).min(u32::MAX as usize) as u32)),
        };
        let (buf, last) = if coarse {
            (&ws.cthresholds, &mut ws.last_cthresholds)
        } else {
            (&ws.thresholds, &mut ws.last_thresholds)
        };
        if last.as_deref() != Some(&t[..]) {
            // The driver reads pageable host memory before the call returns.
            buf.upload(0, bytemuck::cast_slice(&t), stream)?;
            *last = Some(t);
        }
        Ok((0, buf.ptr(), 0))
    }

    /// Flat retrieval for the decode query `q` (`[num_qo_heads, head_dim]` or
    /// `[1, num_qo_heads, head_dim]`, f32 / f16 / bf16, contiguous, after RoPE) into `out`
    /// (one sequence, `num_kv_heads` lists, room for [`CudaClusterIndex::clustered_len`]
    /// tokens each). Graph-capturable (see the module docs for thresholds).
    ///
    /// Errors: as [`ClusterIndex::retrieve`] (bad `q`, NaN threshold, budget 0, per-head
    /// thresholds of the wrong length), a workspace or `out` of other sizes.
    pub fn retrieve(
        &self,
        stream: &Stream,
        q: &DeviceTensor,
        how: &Retrieve,
        ws: &mut ClusterWorkspace,
        out: &CudaSelections,
    ) -> Result<()> {
        self.check_how(how)?;
        self.check_out(out)?;
        let g = self.prepare(q, ws)?;
        let qp = query_f32(&self.dev, stream, q, &ws.q)?;
        self.logits(stream, qp, self.cent.ptr(), self.k, g, None, ws.logits.ptr())?;
        let (mode, thresholds, budget) = self.mode(how, ws, stream, false)?;
        self.estimate(
            stream,
            EstimateParams {
                logits: ws.logits.ptr(),
                sizes: self.sizes.ptr(),
                parent: 0,
                open: 0,
                clogits: 0,
                csizes: 0,
                thresholds,
                est: ws.est.ptr(),
                take: ws.take.ptr(),
                stats: ws.stats.ptr(),
                k: self.k as u32,
                g: g as u32,
                k1: 0,
                mode,
                budget,
            },
        )?;
        if mode == 2 {
            self.mixed(stream, ws, qp, g, budget, None)?;
        }
        ws.last = Some((g, false));
        self.gather(stream, ws, out)
    }

    /// Hierarchical retrieval (see [`ClusterIndex::retrieve_hierarchical`]): coarse
    /// centroids scored, coarse clusters opened by `coarse`, only their children scored
    /// and kept by `fine`. Graph-capturable (see the module docs for thresholds).
    pub fn retrieve_hierarchical(
        &self,
        stream: &Stream,
        q: &DeviceTensor,
        coarse: CoarseRetrieve,
        fine: &Retrieve,
        ws: &mut ClusterWorkspace,
        out: &CudaSelections,
    ) -> Result<()> {
        let Some((ccent, csizes, parent)) = &self.coarse else {
            return Err(Error::invalid("coarse", "an index built with a coarse level (ClusterConfig::coarse)"));
        };
        self.check_how(fine)?;
        let coarse_how = match coarse {
            CoarseRetrieve::Threshold(t) => {
                if t.is_nan() {
                    return Err(Error::invalid("coarse threshold", "a threshold that is not NaN"));
                }
                Retrieve::Threshold(t)
            }
            CoarseRetrieve::Budget(0) => return Err(Error::invalid("coarse budget", "at least 1 token")),
            CoarseRetrieve::Budget(b) => Retrieve::Budget(b),
            CoarseRetrieve::BudgetMultiple(m) => match fine {
                Retrieve::Budget(b) if m > 0.0 && m.is_finite() => {
                    Retrieve::Budget(((m * *b as f64).ceil() as usize).max(1))
                }
                Retrieve::Budget(_) => {
                    return Err(Error::invalid(
                        "coarse budget multiple",
                        format!("a positive finite multiple, got {m}"),
                    ))
                }
                _ => {
                    return Err(Error::invalid(
                        "coarse",
                        "a fine Retrieve::Budget to multiply (BudgetMultiple), or a coarse Threshold/Budget",
                    ))
                }
            },
        };
        self.check_out(out)?;
        let g = self.prepare(q, ws)?;
        let qp = query_f32(&self.dev, stream, q, &ws.q)?;
        // Coarse level: every coarse centroid scored; its `take` marks the opened ones.
        self.logits(stream, qp, ccent.ptr(), self.k1, g, None, ws.clogits.ptr())?;
        let (cmode, cthr, cbudget) = self.mode(&coarse_how, ws, stream, true)?;
        self.estimate(
            stream,
            EstimateParams {
                logits: ws.clogits.ptr(),
                sizes: csizes.ptr(),
                parent: 0,
                open: 0,
                clogits: 0,
                csizes: 0,
                thresholds: cthr,
                est: ws.cest.ptr(),
                take: ws.ctake.ptr(),
                stats: ws.cstats.ptr(),
                k: self.k1 as u32,
                g: g as u32,
                k1: 0,
                mode: cmode,
                budget: cbudget,
            },
        )?;
        self.logits(stream, qp, self.cent.ptr(), self.k, g, Some((parent.ptr(), ws.ctake.ptr())), ws.logits.ptr())?;
        let (mode, thresholds, budget) = self.mode(fine, ws, stream, false)?;
        self.estimate(
            stream,
            EstimateParams {
                logits: ws.logits.ptr(),
                sizes: self.sizes.ptr(),
                parent: parent.ptr(),
                open: ws.ctake.ptr(),
                clogits: ws.clogits.ptr(),
                csizes: csizes.ptr(),
                thresholds,
                est: ws.est.ptr(),
                take: ws.take.ptr(),
                stats: ws.stats.ptr(),
                k: self.k as u32,
                g: g as u32,
                k1: self.k1 as u32,
                mode,
                budget,
            },
        )?;
        if mode == 2 {
            self.mixed(stream, ws, qp, g, budget, Some((parent.ptr(), ws.ctake.ptr())))?;
        }
        ws.last = Some((g, true));
        self.gather(stream, ws, out)
    }
}

fn validate_retrieve(how: &Retrieve, hk: usize) -> Result<()> {
    let check = |param: &str, t: f64| {
        if t.is_nan() {
            Err(Error::invalid(param, "a threshold that is not NaN"))
        } else {
            Ok(())
        }
    };
    match how {
        Retrieve::Threshold(t) => check("threshold", *t),
        Retrieve::PerHeadThreshold(v) => {
            if v.len() != hk {
                return Err(Error::shape("thresholds", format!("[{hk}] (one per KV head)"), format!("[{}]", v.len())));
            }
            v.iter().try_for_each(|&t| check("thresholds", t))
        }
        Retrieve::Budget(0) | Retrieve::MixedBudget(0) => {
            Err(Error::invalid("budget", "at least 1 token (a budget of 0 keeps nothing)"))
        }
        Retrieve::Budget(_) | Retrieve::MixedBudget(_) => Ok(()),
    }
}

/// Device scratch of centroid retrieval for one index shape and query head count.
pub struct ClusterWorkspace {
    num_qo_heads: usize,
    hk: usize,
    d: usize,
    k: usize,
    k1: usize,
    q: DeviceBuffer,
    logits: DeviceBuffer,
    clogits: DeviceBuffer,
    est: DeviceBuffer,
    bound: DeviceBuffer,
    cest: DeviceBuffer,
    take: DeviceBuffer,
    ctake: DeviceBuffer,
    stats: DeviceBuffer,
    cstats: DeviceBuffer,
    thresholds: DeviceBuffer,
    cthresholds: DeviceBuffer,
    /// Ranked clusters of the mixed ranking: 2 * cap per KV head, cap a power of two >= k.
    cand: DeviceBuffer,
    cap: usize,
    last_thresholds: Option<Vec<f64>>,
    last_cthresholds: Option<Vec<f64>>,
    /// Group size and whether the last retrieval was hierarchical.
    last: Option<(usize, bool)>,
}

impl ClusterWorkspace {
    /// Scratch for retrievals from `index` with `num_qo_heads` query heads.
    pub fn new(index: &CudaClusterIndex, num_qo_heads: usize) -> Result<Self> {
        let (hk, k, k1) = (index.num_kv_heads, index.k, index.k1);
        if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(hk) {
            return Err(Error::invalid(
                "num_qo_heads",
                format!("a positive multiple of num_kv_heads ({hk}), got {num_qo_heads}"),
            ));
        }
        let g = num_qo_heads / hk;
        let dev = &index.dev;
        let cap = k.max(1).next_power_of_two();
        Ok(ClusterWorkspace {
            num_qo_heads,
            hk,
            d: index.head_dim,
            k,
            k1,
            q: buffer::<f32>(dev, num_qo_heads * index.head_dim)?,
            logits: buffer::<f32>(dev, hk * g * k)?,
            clogits: buffer::<f32>(dev, hk * g * k1)?,
            est: buffer::<f64>(dev, hk * k)?,
            bound: buffer::<f64>(dev, hk * k)?,
            cest: buffer::<f64>(dev, hk * k1)?,
            take: buffer::<u32>(dev, hk * k)?,
            ctake: buffer::<u32>(dev, hk * k1)?,
            stats: buffer::<u32>(dev, hk * 3)?,
            cstats: buffer::<u32>(dev, hk * 3)?,
            thresholds: buffer::<f64>(dev, hk)?,
            cthresholds: buffer::<f64>(dev, hk)?,
            cand: buffer::<u8>(dev, hk * 2 * cap * RANKED_BYTES)?,
            cap,
            last_thresholds: None,
            last_cthresholds: None,
            last: None,
        })
    }

    /// Group-averaged estimates of the last retrieval, per KV head (0 for clusters not
    /// scored); waits for `stream`.
    pub fn estimates(&self, stream: &Stream) -> Result<Vec<Vec<f64>>> {
        let all: Vec<f64> = self.est.to_vec(stream)?;
        Ok((0..self.hk).map(|h| all[h * self.k..(h + 1) * self.k].to_vec()).collect())
    }

    /// Upper bounds `b_c` of the last [`Retrieve::MixedBudget`] retrieval, per KV head (0 for
    /// clusters not scored; stale after other retrievals); waits for `stream`.
    pub fn bounds(&self, stream: &Stream) -> Result<Vec<Vec<f64>>> {
        let all: Vec<f64> = self.bound.to_vec(stream)?;
        Ok((0..self.hk).map(|h| all[h * self.k..(h + 1) * self.k].to_vec()).collect())
    }

    /// Group-averaged estimates of the coarse clusters in the last hierarchical retrieval,
    /// per KV head; waits for `stream`.
    pub fn coarse_estimates(&self, stream: &Stream) -> Result<Vec<Vec<f64>>> {
        let all: Vec<f64> = self.cest.to_vec(stream)?;
        Ok((0..self.hk).map(|h| all[h * self.k1..(h + 1) * self.k1].to_vec()).collect())
    }

    /// Cost and size of the last retrieval, as [`RetrievalStats`] (waits for `stream`).
    pub fn stats(&self, stream: &Stream) -> Result<RetrievalStats> {
        let Some((g, hier)) = self.last else {
            return Err(Error::invalid("workspace", "a workspace that has run a retrieval"));
        };
        let f: Vec<u32> = self.stats.to_vec(stream)?;
        let c: Vec<u32> = if hier { self.cstats.to_vec(stream)? } else { vec![0; self.hk * 3] };
        let mut s = RetrievalStats::default();
        for h in 0..self.hk {
            let scored = f[h * 3] as usize;
            s.fine_evals += g * scored;
            if hier {
                s.coarse_evals += g * self.k1;
            }
            s.clusters_scored.push(scored);
            s.clusters_kept.push(f[h * 3 + 1] as usize);
            s.coarse_kept.push(if hier { c[h * 3 + 1] as usize } else { 0 });
            s.tokens_kept.push(f[h * 3 + 2] as usize);
        }
        s.centroid_evals = s.coarse_evals + s.fine_evals;
        Ok(s)
    }
}

/// Build a [`ClusterIndex`] with the K-means on the device: the keys `[n, num_kv_heads,
/// head_dim]` (device memory, channels contiguous) are clustered per head as
/// [`ClusterIndex::build`] does (k-means++ with `cfg.seed`, Lloyd up to `cfg.max_iter`,
/// the last `cfg.exclude_window` tokens left out), with `assignment` choosing the
/// assignment path; the coarse level (a K-means over the fine centroids) runs on the CPU.
/// Returns the index and its device copy. Waits for `stream`; keys must be finite (the
/// device does not check them).
///
/// Errors: as [`ClusterIndex::build`] (empty context, `exclude_window` leaving no token,
/// bad cluster counts, bad `head_dim`), a bad key tensor or assignment path.
pub fn build_index(
    dev: &Arc<CudaDevice>,
    keys: &DeviceTensor,
    cfg: &crate::select::cluster::ClusterConfig,
    assignment: crate::backend::cuda::select::kmeans::Assignment,
    stream: &Stream,
) -> Result<(ClusterIndex, CudaClusterIndex)> {
    use crate::backend::cuda::select::kmeans::CudaKMeans;
    use crate::select::cluster::CoarseLevel;
    let [n, hk, d] = keys.shape[..] else {
        return Err(Error::shape("keys", "[n, num_kv_heads, head_dim]", format!("{:?}", keys.shape)));
    };
    let (m, k, k1) = cfg.counts(n)?;
    let head = DeviceTensor { shape: vec![m, hk, d], ..keys.clone() };
    let km = CudaKMeans::new(dev, &head, k, cfg.max_iter, assignment)?;
    km.seed_plus_plus(cfg.seed, stream)?;
    km.run(stream)?;
    let heads = km.results(stream)?;
    let coarse = match k1 {
        Some(k1) => {
            heads.iter().map(|fine| CoarseLevel::build(fine, k1, cfg.seed, cfg.max_iter)).collect::<Result<_>>()?
        }
        None => Vec::new(),
    };
    let index = ClusterIndex {
        config: *cfg,
        num_kv_heads: hk,
        head_dim: d,
        seq_len_at_build: n,
        seq_len: n,
        clustered_len: m,
        heads,
        coarse,
    };
    let dindex = CudaClusterIndex::upload(dev, &index, stream)?;
    Ok((index, dindex))
}
