//! Spherical K-means on the device (`cuda/kmeans.cu`), every KV head of a key tensor at
//! once, with the semantics of [`crate::select::cluster::kmeans`] (k-means++ seeding with
//! the CPU's draws, [`CudaKMeans::seed_plus_plus`]) and
//! [`crate::select::cluster::kmeans_from_centroids`] (given centroids,
//! [`CudaKMeans::set_centroids`]): Lloyd iterations from unit centroids, assignment to the nearest unit
//! centroid (ties to the lowest index), normalised-mean update, empty-cluster repair,
//! stop when a pass changes nothing and needed no repair; raw-key means at the end.
//!
//! Assignment runs on tensor cores for f16 / bf16 keys with head_dim 64 or 128
//! ([`Assignment::TensorCore`]: centroids rounded to the key dtype; [`Assignment::Split`]:
//! centroids as the sum of two key-dtype parts, close to f32 dot products, half the
//! speed), else on CUDA cores in f32 ([`Assignment::CudaCore`]). Rounded centroids can
//! send a key whose two best centroids are nearly tied to the other one.
//!
//! [`CudaKMeans::run`] queues a whole clustering (up to `max_iter` iterations: heads that
//! converged skip the rest on the device) without reading anything back: it is
//! graph-capturable. [`CudaKMeans::results`] reads the clusterings back.
//!
//! Update sums are 64-bit fixed point (steps of 2^-40) added with integer atomics, so the
//! normalised centroids do not depend on the order points arrive in; the final raw means
//! are f64 sums (their last bits may vary between runs).

use std::sync::Arc;

use crate::backend::cuda::launch::{launch, LaunchDims};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::select::{buffer, to_u32};
use crate::backend::cuda::{CudaDevice, ModuleId, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::select::cluster::Clustering;

/// How keys are assigned to centroids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assignment {
    /// Tensor cores, centroids rounded to the key dtype (f16 / bf16 keys, head_dim 64 or 128).
    TensorCore,
    /// Tensor cores, centroids as hi + lo parts in the key dtype (f16 / bf16, head_dim 64 or 128).
    Split,
    /// CUDA cores, f32 products (any dtype, head_dim a multiple of 8 up to 512).
    CudaCore,
}

impl Assignment {
    /// The fastest exact-enough path for keys of `dtype` and `head_dim`: `Split` where the
    /// tensor cores apply, else `CudaCore`.
    pub fn default_for(dtype: DType, head_dim: usize) -> Self {
        if dtype != DType::F32 && (head_dim == 64 || head_dim == 128) {
            Assignment::Split
        } else {
            Assignment::CudaCore
        }
    }
}

/// Control word per head (see `cuda/kmeans.cu`): done, iterations, changed, repaired, converged.
const CTL: usize = 8;
const MMA_ROWS: usize = 256;
/// Positions in `CudaKMeans::_bufs` (the order `new` pushes them).
const BUF_CTL: usize = 5;
const BUF_ASSIGN: usize = 6;
const BUF_RAW: usize = 8;
const BUF_CENTROIDS: usize = 9;
const BUF_SEEDS: usize = 14;
const BUF_RADII: usize = 17;
/// Points per k-means++ chunk (as the CPU).
const PP_CHUNK: usize = 2048;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Params {
    keys: u64,
    inv_norm: u64,
    xsq: u64,
    cn: u64,
    csq: u64,
    sizes: u64,
    sums: u64,
    ctl: u64,
    chi: u64,
    clo: u64,
    assign: u64,
    best: u64,
    raw: u64,
    centroids: u64,
    inertia: u64,
    d2: u64,
    chunk_sums: u64,
    rng: u64,
    chosen: u64,
    seeds: u64,
    near: u64,
    ss2: u64,
    radii: u64,
    stride_t: u64,
    stride_h: u64,
    seed: u64,
    n: u32,
    d: u32,
    k: u32,
    kp: u32,
    hk: u32,
    count: u32,
    step: u32,
}

/// Device state of a K-means over the keys `[n, num_kv_heads, head_dim]` of one tensor,
/// `k` clusters per head.
pub struct CudaKMeans {
    dev: Arc<CudaDevice>,
    dtype: DType,
    n: usize,
    hk: usize,
    d: usize,
    k: usize,
    kp: usize,
    assignment: Assignment,
    max_iter: usize,
    p: Params,
    _bufs: Vec<DeviceBuffer>,
    inertia: DeviceBuffer,
    cn: DeviceBuffer,
    /// Whether initial centroids were set.
    seeded: std::sync::atomic::AtomicBool,
    /// Whether they came from [`CudaKMeans::seed_plus_plus`].
    plus_plus: std::sync::atomic::AtomicBool,
}

impl CudaKMeans {
    /// State for clustering `keys` (`[n, num_kv_heads, head_dim]` on the device, channels
    /// contiguous, any token and head strides) into `k` clusters per head with up to
    /// `max_iter` iterations. The keys must stay valid and unchanged until the last queued
    /// run completes.
    ///
    /// Errors: a bad shape or dtype, `k` 0 or above `n`, `head_dim` not a multiple of 8 in
    /// `8..=512`, an assignment path the keys do not allow.
    pub fn new(
        dev: &Arc<CudaDevice>,
        keys: &DeviceTensor,
        k: usize,
        max_iter: usize,
        assignment: Assignment,
    ) -> Result<Self> {
        let [n, hk, d] = keys.shape[..] else {
            return Err(Error::shape("keys", "[n, num_kv_heads, head_dim]", format!("{:?}", keys.shape)));
        };
        keys.expect("keys", &[None, None, None], &[DType::F32, DType::F16, DType::BF16], dev.ordinal())?;
        if hk == 0 {
            return Err(Error::shape("keys", "[n, num_kv_heads >= 1, head_dim]", format!("{:?}", keys.shape)));
        }
        crate::config::validate_head_dim(d)?;
        if keys.strides[2] != 1 {
            return Err(Error::shape(
                "keys",
                "contiguous channels (last stride 1)",
                format!("strides {:?}", keys.strides),
            ));
        }
        if n == 0 {
            return Err(Error::invalid("keys", "at least one key to cluster (the context is empty)"));
        }
        if k == 0 || k > n {
            return Err(Error::invalid("k", format!("1..={n} clusters (at most one per key), got {k}")));
        }
        to_u32("keys", n * hk)?;
        if hk > 1024 {
            return Err(Error::Unsupported(format!("device K-means over more than 1024 KV heads at once (got {hk})")));
        }
        let tensor = matches!(assignment, Assignment::TensorCore | Assignment::Split);
        if tensor {
            if keys.dtype == DType::F32 || !(d == 64 || d == 128) {
                return Err(Error::invalid(
                    "assignment",
                    format!("Assignment::CudaCore for {} keys of head_dim {d} (tensor cores need f16 / bf16 keys of head_dim 64 or 128)", keys.dtype),
                ));
            }
            if !keys.ptr.is_multiple_of(4) || !keys.strides[0].is_multiple_of(2) || !keys.strides[1].is_multiple_of(2) {
                return Err(Error::invalid(
                    "keys",
                    "4-byte aligned key rows (even token and head strides) for the tensor-core assignment",
                ));
            }
        }
        let nt = if assignment == Assignment::Split { 32 } else { 64 };
        let kp = k.div_ceil(nt) * nt;
        let f4 = |x: usize| buffer::<f32>(dev, x);
        let inv_norm = f4(hk * n)?;
        let xsq = f4(hk * n)?;
        let cn = f4(hk * k * d)?;
        let csq = f4(hk * k)?;
        let sizes = buffer::<u32>(dev, hk * k)?;
        let sums = buffer::<i64>(dev, hk * k * d)?;
        let ctl = buffer::<u32>(dev, hk * CTL)?;
        let assign = buffer::<u32>(dev, hk * n)?;
        let best = f4(hk * n)?;
        let raw = buffer::<f64>(dev, hk * k * d)?;
        let centroids = f4(hk * k * d)?;
        let inertia = buffer::<f64>(dev, hk * (max_iter + 1))?;
        let d2 = f4(hk * n)?;
        let chunk_sums = buffer::<f64>(dev, hk * n.div_ceil(PP_CHUNK))?;
        let rng = buffer::<u64>(dev, hk)?;
        let chosen = buffer::<u32>(dev, hk * n)?;
        let seeds = buffer::<u32>(dev, hk * k)?;
        let near = buffer::<u32>(dev, hk * n)?;
        let ss2 = f4(hk * k)?;
        let radii = buffer::<u32>(dev, hk * k)?;
        let (chi, clo) = if tensor {
            let chi = buffer::<u16>(dev, hk * kp * d)?;
            let clo = if assignment == Assignment::Split { Some(buffer::<u16>(dev, hk * kp * d)?) } else { None };
            (Some(chi), clo)
        } else {
            (None, None)
        };
        let p = Params {
            keys: keys.ptr,
            inv_norm: inv_norm.ptr(),
            xsq: xsq.ptr(),
            cn: cn.ptr(),
            csq: csq.ptr(),
            sizes: sizes.ptr(),
            sums: sums.ptr(),
            ctl: ctl.ptr(),
            chi: chi.as_ref().map_or(0, |b| b.ptr()),
            clo: clo.as_ref().map_or(0, |b| b.ptr()),
            assign: assign.ptr(),
            best: best.ptr(),
            raw: raw.ptr(),
            centroids: centroids.ptr(),
            inertia: inertia.ptr(),
            d2: d2.ptr(),
            chunk_sums: chunk_sums.ptr(),
            rng: rng.ptr(),
            chosen: chosen.ptr(),
            seeds: seeds.ptr(),
            near: near.ptr(),
            ss2: ss2.ptr(),
            radii: radii.ptr(),
            stride_t: keys.strides[0] as u64,
            stride_h: keys.strides[1] as u64,
            seed: 0,
            n: n as u32,
            d: d as u32,
            k: to_u32("k", k)?,
            kp: to_u32("k", kp)?,
            hk: to_u32("num_kv_heads", hk)?,
            count: 0,
            step: 0,
        };
        // Order matters: see the BUF_* positions.
        let mut bufs = vec![
            inv_norm, xsq, csq, sizes, sums, ctl, assign, best, raw, centroids, d2, chunk_sums, rng, chosen, seeds,
            near, ss2, radii,
        ];
        bufs.extend(chi);
        bufs.extend(clo);
        Ok(CudaKMeans {
            dev: dev.clone(),
            dtype: keys.dtype,
            n,
            hk,
            d,
            k,
            kp,
            assignment,
            max_iter,
            p,
            _bufs: bufs,
            inertia,
            cn,
            seeded: false.into(),
            plus_plus: false.into(),
        })
    }

    /// Upload the initial centroids, `[num_kv_heads][k][head_dim]` f32 (any length; scaled
    /// to unit length by [`CudaKMeans::run`], zero rows kept). Not graph-capturable.
    pub fn set_centroids(&self, init: &[f32], stream: &Stream) -> Result<()> {
        let want = self.hk * self.k * self.d;
        if init.len() != want {
            return Err(Error::shape(
                "init",
                format!("[{}, {}, {}] = {want} values", self.hk, self.k, self.d),
                format!("{} values", init.len()),
            ));
        }
        if let Some(i) = init.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "init",
                format!(
                    "finite centroids, but head {} centroid {} holds {}",
                    i / (self.k * self.d),
                    i / self.d % self.k,
                    init[i]
                ),
            ));
        }
        self.cn.upload(0, bytemuck::cast_slice(init), stream)?;
        self.seeded.store(true, std::sync::atomic::Ordering::Relaxed);
        self.plus_plus.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Queue k-means++ seeding on the device with the draws of
    /// [`crate::select::cluster::seed_plus_plus`] (the same SplitMix64 stream from `seed`
    /// for every head, D² sums in the same order; only dot products round differently),
    /// and take the seeds' unit keys as the initial centroids. Graph-capturable
    /// (`3 * (k - 1) + 3` launches). As on the CPU, a step evaluates only the keys the new
    /// seed may be nearest to (triangle inequality), and only changed chunks are re-summed.
    pub fn seed_plus_plus(&self, seed: u64, stream: &Stream) -> Result<()> {
        let (n, hk) = (self.n as u32, self.hk as u32);
        let p = Params { seed, ..self.p };
        self.go(stream, self.norms_name(), (n.div_ceil(8), hk, 1), 256, 0, &p)?;
        self.go(stream, "kvs_kmeans_pp_begin", (n.div_ceil(256).min(1024), hk, 1), 256, 0, &p)?;
        let chunks = self.n.div_ceil(PP_CHUNK) as u32;
        let (ss2, update, gather) = match self.dtype {
            DType::F32 => ("kvs_kmeans_pp_ss2_f32", "kvs_kmeans_pp_update_f32", "kvs_kmeans_pp_gather_f32"),
            DType::F16 => ("kvs_kmeans_pp_ss2_f16", "kvs_kmeans_pp_update_f16", "kvs_kmeans_pp_gather_f16"),
            DType::BF16 => ("kvs_kmeans_pp_ss2_bf16", "kvs_kmeans_pp_update_bf16", "kvs_kmeans_pp_gather_bf16"),
        };
        for s in 0..self.k.saturating_sub(1) {
            let ps = Params { step: s as u32, ..p };
            if s > 0 {
                self.go(stream, ss2, ((s as u32).div_ceil(8), hk, 1), 256, 0, &ps)?;
            }
            self.go(stream, update, (chunks, hk, 1), 256, 0, &ps)?;
            self.go(stream, "kvs_kmeans_pp_draw", (hk, 1, 1), 32, 0, &ps)?;
        }
        self.go(stream, gather, (self.k as u32, hk, 1), 32, 0, &p)?;
        self.seeded.store(true, std::sync::atomic::Ordering::Relaxed);
        self.plus_plus.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The k-means++ seeds per head (point indices in the order drawn) of the last
    /// [`CudaKMeans::seed_plus_plus`]; waits for `stream`.
    pub fn seeds(&self, stream: &Stream) -> Result<Vec<Vec<u32>>> {
        if !self.plus_plus.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::invalid("seeds", "centroids seeded by CudaKMeans::seed_plus_plus"));
        }
        let all: Vec<u32> = self._bufs[BUF_SEEDS].to_vec(stream)?;
        Ok((0..self.hk).map(|h| all[h * self.k..(h + 1) * self.k].to_vec()).collect())
    }

    fn norms_name(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "kvs_kmeans_norms_f32",
            DType::F16 => "kvs_kmeans_norms_f16",
            DType::BF16 => "kvs_kmeans_norms_bf16",
        }
    }

    fn go(
        &self,
        stream: &Stream,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        p: &Params,
    ) -> Result<()> {
        let dims = LaunchDims { grid, block: (block, 1, 1), shared_bytes: shared };
        // SAFETY: every address in `p` was allocated by `new` with the sizes the kernels
        // index (hk * n, hk * k * d, hk * kp * d, ...); the keys tensor was checked.
        unsafe { launch(&self.dev, stream, ModuleId::Kmeans, name, dims, p) }
    }

    fn suffix(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    fn assign_pass(&self, stream: &Stream, it: usize) -> Result<()> {
        let (n, hk, kp) = (self.n as u32, self.hk as u32, self.kp as u32);
        let tensor = self.assignment != Assignment::CudaCore;
        let p = self.p;
        if tensor {
            let prep = if self.dtype == DType::F16 { "kvs_kmeans_prep_f16" } else { "kvs_kmeans_prep_bf16" };
            self.go(stream, prep, (kp, hk, 1), 32, 0, &p)?;
            let name = match (self.assignment, self.dtype, self.d) {
                (Assignment::TensorCore, DType::F16, 64) => "kvs_kmeans_assign_mma_f16_d64",
                (Assignment::TensorCore, DType::F16, _) => "kvs_kmeans_assign_mma_f16_d128",
                (Assignment::TensorCore, _, 64) => "kvs_kmeans_assign_mma_bf16_d64",
                (Assignment::TensorCore, _, _) => "kvs_kmeans_assign_mma_bf16_d128",
                (_, DType::F16, 64) => "kvs_kmeans_assign_mma_split_f16_d64",
                (_, DType::F16, _) => "kvs_kmeans_assign_mma_split_f16_d128",
                (_, _, 64) => "kvs_kmeans_assign_mma_split_bf16_d64",
                (_, _, _) => "kvs_kmeans_assign_mma_split_bf16_d128",
            };
            let (nt, parts) = if self.assignment == Assignment::Split { (32, 2) } else { (64, 1) };
            let shared = (2 * parts * nt * (self.d + 8) * 2) as u32;
            self.go(stream, name, ((self.n.div_ceil(MMA_ROWS)) as u32, hk, 1), MMA_ROWS as u32, shared, &p)?;
        } else {
            let name = match self.dtype {
                DType::F32 => "kvs_kmeans_assign_simt_f32",
                DType::F16 => "kvs_kmeans_assign_simt_f16",
                DType::BF16 => "kvs_kmeans_assign_simt_bf16",
            };
            self.go(stream, name, (n.div_ceil(8), hk, 1), 256, 0, &p)?;
        }
        let repair = match self.dtype {
            DType::F32 => "kvs_kmeans_repair_f32",
            DType::F16 => "kvs_kmeans_repair_f16",
            DType::BF16 => "kvs_kmeans_repair_bf16",
        };
        self.go(stream, repair, (hk, 1, 1), 1024, 0, &p)?;
        let pi = Params { inertia: self.p.inertia + (it * self.hk * 8) as u64, ..p };
        self.go(stream, "kvs_kmeans_inertia", (hk, 1, 1), 1024, 0, &pi)
    }

    /// Queue a whole clustering from the centroids last set (graph-capturable): norms,
    /// initial assignment and repair, then up to `max_iter` update + assignment passes
    /// (converged heads skip them on the device), then the raw means. After a run the
    /// centroids are the result: call [`CudaKMeans::set_centroids`] again to restart.
    ///
    /// Errors: no centroids set yet (`init`).
    pub fn run(&self, stream: &Stream) -> Result<()> {
        if !self.seeded.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::invalid("init", "initial centroids set by CudaKMeans::set_centroids before run"));
        }
        let (n, hk, k) = (self.n as u32, self.hk as u32, self.k as u32);
        let p = self.p;
        let s = self.suffix();
        self.go(stream, self.norms_name(), (n.div_ceil(8), hk, 1), 256, 0, &p)?;
        self.go(stream, "kvs_kmeans_begin", (k, hk, 1), 32, 0, &p)?;
        self.assign_pass(stream, 0)?;
        let (acc, raw): (&'static str, &'static str) = match s {
            "f32" => ("kvs_kmeans_update_accumulate_f32", "kvs_kmeans_raw_sums_f32"),
            "f16" => ("kvs_kmeans_update_accumulate_f16", "kvs_kmeans_raw_sums_f16"),
            _ => ("kvs_kmeans_update_accumulate_bf16", "kvs_kmeans_raw_sums_bf16"),
        };
        let end = Params { count: 1, ..p };
        for it in 1..=self.max_iter {
            self.go(stream, acc, (n.div_ceil(8), hk, 1), 256, 0, &p)?;
            self.go(stream, "kvs_kmeans_update_finalize", (k, hk, 1), 32, 0, &p)?;
            self.assign_pass(stream, it)?;
            self.go(stream, "kvs_kmeans_iter_end", (1, 1, 1), hk.div_ceil(32) * 32, 0, &end)?;
        }
        self.raw_means(stream, raw)
    }

    fn raw_means(&self, stream: &Stream, raw: &'static str) -> Result<()> {
        let (n, hk, k) = (self.n as u32, self.hk as u32, self.k as u32);
        let p = self.p;
        // Zero the f64 sums.
        self._bufs[BUF_RAW].memset(0, stream)?;
        self.go(stream, raw, (n.div_ceil(8), hk, 1), 256, 0, &p)?;
        self.go(stream, "kvs_kmeans_raw_finish", (k, hk, 1), 32, 0, &p)?;
        // The radii about the raw means (for the mixed ranking of centroid retrieval).
        self._bufs[BUF_RADII].memset(0, stream)?;
        let radii = match self.dtype {
            DType::F32 => "kvs_kmeans_radii_f32",
            DType::F16 => "kvs_kmeans_radii_f16",
            DType::BF16 => "kvs_kmeans_radii_bf16",
        };
        self.go(stream, radii, (n.div_ceil(8), hk, 1), 256, 0, &p)
    }

    /// Read the clusterings back, one per KV head (waits for `stream`): assignment, unit
    /// and raw centroids, sizes, members (CSR, ascending), inertia and its history,
    /// iterations, convergence, and the k-means++ seeds when [`CudaKMeans::seed_plus_plus`] chose them.
    pub fn results(&self, stream: &Stream) -> Result<Vec<Clustering>> {
        let (n, hk, k, d) = (self.n, self.hk, self.k, self.d);
        let assign: Vec<u32> = self._bufs[BUF_ASSIGN].to_vec(stream)?;
        let cn: Vec<f32> = self.cn.to_vec(stream)?;
        let raw: Vec<f32> = self._bufs[BUF_CENTROIDS].to_vec(stream)?;
        let ctl: Vec<u32> = self._bufs[BUF_CTL].to_vec(stream)?;
        let inertia: Vec<f64> = self.inertia.to_vec(stream)?;
        let radii: Vec<u32> = self._bufs[BUF_RADII].to_vec(stream)?;
        let seeds = if self.plus_plus.load(std::sync::atomic::Ordering::Relaxed) {
            self.seeds(stream)?
        } else {
            vec![Vec::new(); hk]
        };
        let mut out = Vec::with_capacity(hk);
        for h in 0..hk {
            let a = assign[h * n..(h + 1) * n].to_vec();
            let mut offsets = vec![0u32; k + 1];
            for &c in &a {
                if c as usize >= k {
                    return Err(Error::Internal(format!("device k-means assigned a key to cluster {c} of {k}")));
                }
                offsets[c as usize + 1] += 1;
            }
            for c in 0..k {
                offsets[c + 1] += offsets[c];
            }
            let mut fill = offsets[..k].to_vec();
            let mut members = vec![0u32; n];
            for (i, &c) in a.iter().enumerate() {
                members[fill[c as usize] as usize] = i as u32;
                fill[c as usize] += 1;
            }
            let sizes: Vec<u32> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
            let iterations = ctl[h * CTL + 1] as usize;
            let history: Vec<f64> = (0..=iterations.min(self.max_iter)).map(|it| inertia[it * hk + h]).collect();
            out.push(Clustering {
                d,
                centroids: raw[h * k * d..(h + 1) * k * d].to_vec(),
                centroids_normalized: cn[h * k * d..(h + 1) * k * d].to_vec(),
                sizes,
                member_offsets: offsets,
                members,
                assignment: a,
                inertia: *history.last().expect("one pass at least"),
                inertia_history: history,
                iterations,
                converged: ctl[h * CTL + 4] != 0,
                seeds: seeds[h].clone(),
                radii: radii[h * k..(h + 1) * k].iter().map(|&b| f32::from_bits(b)).collect(),
            });
        }
        Ok(out)
    }
}
