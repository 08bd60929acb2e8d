//! Spherical K-means over the keys of one KV head: k-means++ seeding, Lloyd iterations,
//! empty-cluster repair, with the retrieval centroid taken as the mean of raw keys.
//!
//! Definitions (every function here follows them):
//! - **Normalised space**: each key `x` becomes `x̂ = x / ‖x‖` (a zero key stays zero).
//!   Assignment is by the largest `x̂ · ĉ`, that is the nearest unit centroid (cosine).
//! - **Normalised centroid** `ĉ`: the mean of its members' `x̂`, scaled to unit length (the
//!   minimiser of the cluster's squared distances among unit vectors); a mean of length 0
//!   keeps the previous centroid.
//! - **Raw centroid** `C`: the mean of its members' raw keys; it is what retrieval scores
//!   queries against.
//! - **Inertia**: `Σ_i ‖x̂_i − ĉ_{a(i)}‖² = Σ_i (‖x̂_i‖² + ‖ĉ‖² − 2 x̂_i·ĉ)`, summed in f64 over
//!   the final assignment `a` and normalised centroids (squared L2 in normalised space; for
//!   unit vectors `2 − 2 cos`).
//! - **k-means++** with a [`SplitMix64`] seeded by `seed`: the first seed is point
//!   `below(n)`; each further seed draws `u = next_f64() · Σ D²` and takes the first point
//!   (ascending index, among those with `D² > 0`) at which the running f64 sum of `D²`
//!   exceeds `u` (summed per chunk of 2048 points, then over chunks in order), `D²` being the squared distance to the nearest seed so far. If every
//!   `D²` is 0 (fewer distinct keys than clusters) the lowest-index point not yet a seed is
//!   taken. Distances are only recomputed for points the triangle inequality cannot rule
//!   out (`‖s_new − s_near‖ < 2·D`) and, of those, exactly only for points that an f16 copy
//!   of the row with its rounding error bound cannot rule out; neither changes a result.
//! - **Lloyd**: assign; then up to `max_iter` times: update the normalised centroids,
//!   assign again; stop when an assignment pass changes nothing and needed no repair.
//!   Assignment ties go to the lowest cluster index.
//! - **Empty-cluster repair** after every assignment pass: for each empty cluster in
//!   ascending order, the largest cluster (lowest index on ties) gives up its member
//!   farthest from its normalised centroid (lowest index on ties); that key becomes the
//!   empty cluster's normalised centroid and its only member. Repair never raises the
//!   inertia, and the loop does not stop on a repaired pass.
//!
//! Assignment and updates run in parallel (rayon) and the result is the same for every
//! thread count: each point's dot products and each cluster's sums are computed in a fixed
//! order.

use rayon::prelude::*;

use crate::alloc::{collect_n, copy_of, filled_vec, mul, vec_with_capacity, zeroed_vec};
use crate::config::validate_head_dim;
use crate::cpu;
use crate::cpu::assign::{nearest, PackedCentroids};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::select::cluster::rng::SplitMix64;

/// How many clusters: a number, or a fraction of the keys clustered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClusterCount {
    /// Exactly this many (1 ..= the number of keys).
    Absolute(usize),
    /// `round(f * n)` clusters for `n` keys, `0 < f <= 1`; must come to at least 1.
    Fraction(f64),
}

impl ClusterCount {
    /// The number of clusters for `n` keys. Errors: `n` 0, zero clusters, more clusters than
    /// keys, a fraction outside `(0, 1]` or one that rounds to 0 clusters.
    pub fn resolve(&self, n: usize, param: &str) -> Result<usize> {
        if n == 0 {
            return Err(Error::invalid(param, "at least one key to cluster (the context is empty)"));
        }
        let k = match *self {
            ClusterCount::Absolute(k) => k,
            ClusterCount::Fraction(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::invalid(param, format!("a fraction of the keys in (0, 1], got {f}")));
                }
                (f * n as f64).round() as usize
            }
        };
        if k == 0 {
            return Err(Error::invalid(param, format!("at least 1 cluster, got 0 ({self:?} of {n} keys)")));
        }
        if k > n {
            return Err(Error::invalid(param, format!("at most one cluster per key ({n} keys), got {k} clusters")));
        }
        Ok(k)
    }
}

/// Options of [`kmeans`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansConfig {
    pub clusters: ClusterCount,
    /// Centroid updates at most (each followed by an assignment pass). Default 20.
    pub max_iter: usize,
    /// Seed of the k-means++ draws.
    pub seed: u64,
}

impl KMeansConfig {
    pub fn new(clusters: ClusterCount) -> Self {
        KMeansConfig { clusters, max_iter: 20, seed: 0 }
    }
}

/// The K-means clustering of one head's keys.
///
/// Invariants: `sizes[c] = member_offsets[c + 1] - member_offsets[c] >= 1` at build time
/// (after [`crate::select::cluster::ClusterIndex::assign_new`] still >= 1); each cluster's
/// members are ascending token indices; every token `0..num_points` is a member of exactly
/// the cluster `assignment[token]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    pub(crate) d: usize,
    pub(crate) centroids: Vec<f32>,
    pub(crate) centroids_normalized: Vec<f32>,
    pub(crate) sizes: Vec<u32>,
    pub(crate) member_offsets: Vec<u32>,
    pub(crate) members: Vec<u32>,
    pub(crate) assignment: Vec<u32>,
    pub(crate) inertia: f64,
    pub(crate) inertia_history: Vec<f64>,
    pub(crate) iterations: usize,
    pub(crate) converged: bool,
    pub(crate) seeds: Vec<u32>,
    /// Per cluster, the largest distance of a member's raw key to the raw centroid (empty
    /// when unknown).
    pub(crate) radii: Vec<f32>,
}

impl Clustering {
    pub fn num_clusters(&self) -> usize {
        self.sizes.len()
    }
    pub fn head_dim(&self) -> usize {
        self.d
    }
    /// Keys clustered (tokens `0..num_points`).
    pub fn num_points(&self) -> usize {
        self.assignment.len()
    }
    /// Raw-key means, `[num_clusters][head_dim]` row-major.
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }
    /// Raw-key mean of cluster `c`.
    pub fn centroid(&self, c: usize) -> &[f32] {
        &self.centroids[c * self.d..(c + 1) * self.d]
    }
    /// Unit centroids used for assignment, `[num_clusters][head_dim]`.
    pub fn centroids_normalized(&self) -> &[f32] {
        &self.centroids_normalized
    }
    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }
    /// CSR offsets into [`Clustering::all_members`], `num_clusters + 1` long.
    pub fn member_offsets(&self) -> &[u32] {
        &self.member_offsets
    }
    /// Every cluster's members, concatenated in cluster order.
    pub fn all_members(&self) -> &[u32] {
        &self.members
    }
    /// Members (token indices, ascending) of cluster `c`.
    pub fn members(&self, c: usize) -> &[u32] {
        &self.members[self.member_offsets[c] as usize..self.member_offsets[c + 1] as usize]
    }
    /// Cluster of each token `0..num_points`.
    pub fn assignment(&self) -> &[u32] {
        &self.assignment
    }
    /// Inertia of the final assignment (see the module docs).
    pub fn inertia(&self) -> f64 {
        self.inertia
    }
    /// Inertia after the first assignment and after each iteration (build-time diagnostics;
    /// a loaded index holds only the final value).
    pub fn inertia_history(&self) -> &[f64] {
        &self.inertia_history
    }
    /// Centroid updates done.
    pub fn iterations(&self) -> usize {
        self.iterations
    }
    /// Whether the last assignment pass changed nothing (then every key is assigned to a
    /// nearest normalised centroid).
    pub fn converged(&self) -> bool {
        self.converged
    }
    /// Point indices picked by k-means++ (empty when the clustering started from given
    /// centroids or was loaded from a file).
    pub fn seeds(&self) -> &[u32] {
        &self.seeds
    }
    /// Per cluster, the largest Euclidean distance of a member's raw key to the raw
    /// centroid: `q·k <= q·C_c + |q|·r_c` for every member `k` of cluster `c`, the bound that
    /// [`crate::select::cluster::Retrieve::MixedBudget`] ranks clusters by. Empty when
    /// unknown: indexes loaded from version-1 files.
    pub fn radii(&self) -> &[f32] {
        &self.radii
    }
}

/// Cluster `keys` (`[n][head_dim]` row-major, raw) with k-means++ and Lloyd iterations.
///
/// Errors: `head_dim` not a multiple of 8 in `8..=512`, `keys.len()` not a multiple of it,
/// no keys, a bad cluster count, a NaN or infinite key (named by index).
pub fn kmeans(keys: &[f32], head_dim: usize, cfg: &KMeansConfig) -> Result<Clustering> {
    let n = check_keys(keys, head_dim)?;
    let k = cfg.clusters.resolve(n, "clusters")?;
    let (x, xsq) = normalize_rows(keys, head_dim)?;
    cluster_normalized(keys, &x, &xsq, head_dim, k, cfg.seed, cfg.max_iter)
}

/// Lloyd iterations from given initial centroids (`[k][head_dim]`, any length; scaled to
/// unit length, zero rows kept), with the same repair and stopping rule as [`kmeans`].
pub fn kmeans_from_centroids(keys: &[f32], head_dim: usize, init: &[f32], max_iter: usize) -> Result<Clustering> {
    let n = check_keys(keys, head_dim)?;
    if init.is_empty() || !init.len().is_multiple_of(head_dim) {
        return Err(Error::shape("init", format!("[k >= 1, {head_dim}]"), format!("{} values", init.len())));
    }
    let k = init.len() / head_dim;
    ClusterCount::Absolute(k).resolve(n, "init")?;
    if let Some(i) = init.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "init",
            format!("finite centroids, but centroid {} holds {}", i / head_dim, init[i]),
        ));
    }
    let (x, xsq) = normalize_rows(keys, head_dim)?;
    let (cn, _) = normalize_rows(init, head_dim)?;
    lloyd(keys, &x, &xsq, head_dim, cn, max_iter)
}

/// The k-means++ seeds (point indices, in the order drawn) that [`kmeans`] starts from.
pub fn seed_plus_plus(keys: &[f32], head_dim: usize, k: usize, seed: u64) -> Result<Vec<u32>> {
    let n = check_keys(keys, head_dim)?;
    ClusterCount::Absolute(k).resolve(n, "k")?;
    let (x, xsq) = normalize_rows(keys, head_dim)?;
    plus_plus(&x, &xsq, head_dim, k, seed)
}

fn check_keys(keys: &[f32], d: usize) -> Result<usize> {
    validate_head_dim(d)?;
    if !keys.len().is_multiple_of(d) {
        return Err(Error::shape(
            "keys",
            format!("[n, {d}]"),
            format!("{} values (not a multiple of {d})", keys.len()),
        ));
    }
    if let Some(i) = keys.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "keys",
            format!("finite values, but key {} holds {} at channel {}", i / d, keys[i], i % d),
        ));
    }
    Ok(keys.len() / d)
}

/// Unit rows and their squared norms (1, or 0 for a zero row).
pub(crate) fn normalize_rows(keys: &[f32], d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = keys.len() / d;
    let mut x = zeroed_vec(keys.len(), "normalised keys")?;
    let mut xsq = zeroed_vec(n, "key norms")?;
    x.par_chunks_mut(d).zip(xsq.par_iter_mut()).zip(keys.par_chunks(d)).for_each(|((o, s), r)| {
        let norm = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if norm > 0.0 {
            for (o, &v) in o.iter_mut().zip(r) {
                *o = (v as f64 / norm) as f32;
            }
            *s = 1.0;
        }
    });
    Ok((x, xsq))
}

/// `out[j] = q · x[idx[j]]` for rows of `x` (`[n][d]`), in parallel for long lists.
pub(crate) fn dots(x: &[f32], d: usize, q: &[f32], idx: &[u32], out: &mut [f32]) {
    const CHUNK: usize = 1024;
    let run = |idx: &[u32], out: &mut [f32]| {
        let ptrs: Vec<*const u8> = idx.iter().map(|&i| x[i as usize * d..].as_ptr() as *const u8).collect();
        // SAFETY: every pointer addresses a full row of d f32 inside `x`; d is a multiple of 8.
        unsafe { cpu::scores(q, 1, d, &ptrs, DType::F32, out) };
    };
    if idx.len() <= CHUNK {
        run(idx, &mut out[..idx.len()]);
    } else {
        out[..idx.len()].par_chunks_mut(CHUNK).zip(idx.par_chunks(CHUNK)).for_each(|(o, i)| run(i, o));
    }
}

/// Points per chunk of the k-means++ bookkeeping (fixed, so sums do not depend on threads).
const SEED_CHUNK: usize = 2048;

/// Half-precision copies of the unit rows that screen k-means++ candidates: the rows as
/// f16 (`[n][d]`, native-endian bits) and per row an upper bound on `‖x − f16(x)‖`.
struct HalfRows {
    rows: Vec<half::f16>,
    err: Vec<f32>,
}

impl HalfRows {
    fn new(x: &[f32], d: usize) -> Result<Self> {
        use half::slice::HalfFloatSliceExt;
        let n = x.len() / d;
        let mut rows = filled_vec(x.len(), half::f16::ZERO, "k-means++ screening rows")?;
        let mut err = zeroed_vec::<f32>(n, "k-means++ screening rows")?;
        rows.par_chunks_mut(d).zip(err.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((h, e), r)| {
            h.convert_from_f32_slice(r);
            let sq: f64 = h.iter().zip(r).map(|(&a, &b)| (a.to_f64() - b as f64).powi(2)).sum();
            // Rounded up, so that it stays a bound in f32.
            *e = (sq.sqrt() * (1.0 + 1e-6)) as f32;
        });
        Ok(HalfRows { rows, err })
    }
}

/// One chunk's share of a k-means++ step: lower `d2` / update `near` for the points the new
/// seed `p` (index `s`) is nearer to, and return the chunk's f64 sum of `d2` (`prev`, the
/// sum before, if known and nothing changed).
///
/// Points the triangle inequality rules out are skipped; the rest are screened with their
/// f16 copies (`half`): `|x·s − f16(x)·s| <= ‖x − f16(x)‖ ‖s‖`, so where even the largest
/// dot product that allows leaves the distance at or above `d2`, the exact one would too.
/// Only the others are computed exactly, so every `d2` and `near` is what computing every
/// distance exactly gives.
#[allow(clippy::too_many_arguments)]
fn seed_update(
    x: &[f32],
    half: &HalfRows,
    xsq: &[f32],
    d: usize,
    p: usize,
    s: u32,
    ss2: &[f32],
    base: usize,
    d2: &mut [f32],
    near: &mut [u32],
    prev: Option<f64>,
) -> f64 {
    let xp = &x[p * d..(p + 1) * d];
    // Candidates, written without a branch per point (about a fifth pass, in no pattern).
    let mut idx = vec![0usize; d2.len()];
    let mut count = 0;
    for (j, (&v, &m)) in d2.iter().zip(near.iter()).enumerate() {
        // ‖s_new − s_near‖ >= 2·D means the new seed cannot be nearer (triangle inequality);
        // a small margin keeps rounding on the safe side.
        idx[count] = j;
        count += ((v > 0.0) & (ss2[m as usize] < 4.0 * v * (1.0 + 1e-4) + 1e-6)) as usize;
    }
    idx.truncate(count);
    let mut ptrs: Vec<*const u8> = idx.iter().map(|&j| half.rows[(base + j) * d..].as_ptr() as *const u8).collect();
    let mut approx = vec![0f32; idx.len()];
    // SAFETY: every pointer addresses a full row of d f16 inside `half.rows`; d is a multiple of 8.
    unsafe { cpu::scores(xp, 1, d, &ptrs, DType::F16, &mut approx) };
    // Both dot products also carry f32 rounding: at most about d·2⁻²⁴ of ‖x‖‖s‖ <= 1 each.
    let (ns, slack) = (xsq[p].sqrt(), 4.0 * d as f32 * f32::EPSILON + 1e-6);
    ptrs.clear();
    let mut exact = Vec::with_capacity(idx.len());
    for (&j, &a) in idx.iter().zip(&approx) {
        let i = base + j;
        let least = xsq[i] + xsq[p] - 2.0 * (a + half.err[i] * ns + slack);
        // Distances are at most 4: 4e-6 covers the rounding of the exact distance below.
        if least - 4e-6 >= d2[j] {
            continue;
        }
        ptrs.push(x[i * d..].as_ptr() as *const u8);
        exact.push(j);
    }
    let mut dots = vec![0f32; exact.len()];
    // SAFETY: every pointer addresses a full row of d f32 inside `x`; d is a multiple of 8.
    unsafe { cpu::scores(xp, 1, d, &ptrs, DType::F32, &mut dots) };
    let mut changed = false;
    for (&j, &dp) in exact.iter().zip(&dots) {
        let nd = (xsq[base + j] + xsq[p] - 2.0 * dp).max(0.0);
        if nd < d2[j] {
            d2[j] = nd;
            near[j] = s;
            changed = true;
        }
    }
    if (base..base + d2.len()).contains(&p) {
        d2[p - base] = 0.0;
        near[p - base] = s;
        changed = true;
    }
    match prev {
        Some(sum) if !changed => sum,
        _ => d2.iter().map(|&v| v as f64).sum(),
    }
}

/// k-means++ over unit rows (see the module docs for the exact draws). The squared
/// distances are kept per chunk of [`SEED_CHUNK`] points with the chunk's f64 sum, so a
/// step updates the chunks in parallel and a draw walks the chunk sums, then one chunk.
fn plus_plus(x: &[f32], xsq: &[f32], d: usize, k: usize, seed: u64) -> Result<Vec<u32>> {
    let n = xsq.len();
    let mut rng = SplitMix64::new(seed);
    let first = rng.below(n);
    let mut chosen = vec_with_capacity(k, "k-means++ seeds")?;
    chosen.push(first as u32);
    let mut is_chosen = filled_vec(n, false, "k-means++ seeds")?;
    is_chosen[first] = true;
    // Before the first seed every point is "infinitely" far: all are evaluated against it.
    let mut d2 = filled_vec(n, f32::INFINITY, "k-means++ distances")?;
    let mut near = zeroed_vec::<u32>(n, "k-means++ distances")?;
    // The first step compares with no earlier seed: nothing is pruned.
    let mut ss2 = zeroed_vec::<f32>(k, "k-means++ seed distances")?;
    let half = HalfRows::new(x, d)?;
    let step = |p: usize, s: u32, ss2: &[f32], d2: &mut [f32], near: &mut [u32], prev: Option<&[f64]>| -> Vec<f64> {
        d2.par_chunks_mut(SEED_CHUNK)
            .zip(near.par_chunks_mut(SEED_CHUNK))
            .enumerate()
            .map(|(c, (d2, near))| {
                seed_update(x, &half, xsq, d, p, s, ss2, c * SEED_CHUNK, d2, near, prev.map(|sums| sums[c]))
            })
            .collect()
    };
    let mut sums = step(first, 0, &ss2, &mut d2, &mut near, None);
    for s in 1..k {
        let total: f64 = sums.iter().sum();
        let u = rng.next_f64() * total;
        let p = if total > 0.0 {
            let (mut cum, mut last, mut pick) = (0f64, None, None);
            for (c, &cs) in sums.iter().enumerate() {
                if cum + cs <= u {
                    cum += cs;
                    if cs > 0.0 {
                        last = Some(c);
                    }
                    continue;
                }
                for (j, &v) in d2[c * SEED_CHUNK..((c + 1) * SEED_CHUNK).min(n)].iter().enumerate() {
                    if v > 0.0 {
                        cum += v as f64;
                        last = Some(c);
                        if cum > u {
                            pick = Some(c * SEED_CHUNK + j);
                            break;
                        }
                    }
                }
                if pick.is_some() {
                    break;
                }
            }
            // Rounding can leave u beyond the running sum: take the last point with D² > 0.
            pick.unwrap_or_else(|| {
                let c = last.expect("total > 0");
                let chunk = &d2[c * SEED_CHUNK..((c + 1) * SEED_CHUNK).min(n)];
                c * SEED_CHUNK + chunk.iter().rposition(|&v| v > 0.0).expect("chunk sum > 0")
            })
        } else {
            (0..n).find(|&i| !is_chosen[i]).expect("k <= n leaves a point that is not a seed")
        };
        dots(x, d, &x[p * d..(p + 1) * d], &chosen, &mut ss2[..s]);
        for (j, v) in ss2[..s].iter_mut().enumerate() {
            *v = (xsq[chosen[j] as usize] + xsq[p] - 2.0 * *v).max(0.0);
        }
        sums = step(p, s as u32, &ss2, &mut d2, &mut near, Some(&sums));
        is_chosen[p] = true;
        chosen.push(p as u32);
    }
    Ok(chosen)
}

/// k-means++ then Lloyd, on keys already normalised (`x`, `xsq`) with `raw` for the means.
pub(crate) fn cluster_normalized(
    raw: &[f32],
    x: &[f32],
    xsq: &[f32],
    d: usize,
    k: usize,
    seed: u64,
    max_iter: usize,
) -> Result<Clustering> {
    let seeds = plus_plus(x, xsq, d, k, seed)?;
    let mut init = vec_with_capacity(mul(k, d, "clusters")?, "centroids")?;
    for &s in &seeds {
        init.extend_from_slice(&x[s as usize * d..(s as usize + 1) * d]);
    }
    let mut c = lloyd(raw, x, xsq, d, init, max_iter)?;
    c.seeds = seeds;
    Ok(c)
}

/// Members of each cluster in CSR form (counting sort; ascending within a cluster).
pub(crate) fn members_csr(a: &[u32], k: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut offsets = zeroed_vec::<u32>(k + 1, "cluster member offsets")?;
    for &c in a {
        offsets[c as usize + 1] += 1;
    }
    for c in 0..k {
        offsets[c + 1] += offsets[c];
    }
    let mut fill = copy_of(&offsets[..k], "cluster member offsets")?;
    let mut members = zeroed_vec::<u32>(a.len(), "cluster members")?;
    for (i, &c) in a.iter().enumerate() {
        members[fill[c as usize] as usize] = i as u32;
        fill[c as usize] += 1;
    }
    Ok((offsets, members))
}

fn row_sq(cn: &[f32], d: usize) -> Result<Vec<f32>> {
    collect_n(cn.len() / d, cn.chunks_exact(d).map(|r| r.iter().map(|&v| v * v).sum()), "centroid norms")
}

fn inertia(xsq: &[f32], csq: &[f32], a: &[u32], best: &[f32]) -> f64 {
    a.iter().zip(best).zip(xsq).map(|((&c, &b), &s)| ((s + csq[c as usize] - 2.0 * b) as f64).max(0.0)).sum()
}

/// Normalised means of the members of each cluster; a cluster with no members or a mean
/// of length 0 keeps its centroid.
fn update(x: &[f32], d: usize, a: &[u32], cn: &mut [f32]) -> Result<()> {
    let k = cn.len() / d;
    let (offsets, members) = members_csr(a, k)?;
    cn.par_chunks_mut(d).enumerate().for_each(|(c, row)| {
        let m = &members[offsets[c] as usize..offsets[c + 1] as usize];
        if m.is_empty() {
            return;
        }
        let mut s = vec![0f32; d];
        for &i in m {
            for (acc, &v) in s.iter_mut().zip(&x[i as usize * d..(i as usize + 1) * d]) {
                *acc += v;
            }
        }
        let norm = s.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if norm > 1e-12 {
            for (o, &v) in row.iter_mut().zip(&s) {
                *o = (v as f64 / norm) as f32;
            }
        }
    });
    Ok(())
}

/// Refill empty clusters (see the module docs). Returns whether anything moved.
fn repair(
    x: &[f32],
    xsq: &[f32],
    d: usize,
    a: &mut [u32],
    best: &mut [f32],
    cn: &mut [f32],
    csq: &mut [f32],
) -> Result<bool> {
    let k = csq.len();
    let mut sizes = zeroed_vec::<usize>(k, "cluster sizes")?;
    for &c in a.iter() {
        sizes[c as usize] += 1;
    }
    if !sizes.contains(&0) {
        return Ok(false);
    }
    for e in 0..k {
        if sizes[e] != 0 {
            continue;
        }
        let mut l = 0;
        for c in 1..k {
            if sizes[c] > sizes[l] {
                l = c;
            }
        }
        // n >= k and an empty cluster exist, so the largest has at least 2 members.
        let (mut p, mut far) = (usize::MAX, f32::NEG_INFINITY);
        for (i, &c) in a.iter().enumerate() {
            if c as usize == l {
                let dist = xsq[i] - 2.0 * best[i];
                if dist > far {
                    far = dist;
                    p = i;
                }
            }
        }
        a[p] = e as u32;
        sizes[l] -= 1;
        sizes[e] = 1;
        cn[e * d..(e + 1) * d].copy_from_slice(&x[p * d..(p + 1) * d]);
        csq[e] = xsq[p];
        best[p] = xsq[p];
    }
    Ok(true)
}

/// Lloyd iterations from unit centroids `cn` (see the module docs).
fn lloyd(raw: &[f32], x: &[f32], xsq: &[f32], d: usize, mut cn: Vec<f32>, max_iter: usize) -> Result<Clustering> {
    let n = xsq.len();
    let k = cn.len() / d;
    let mut csq = row_sq(&cn, d)?;
    let mut a = zeroed_vec::<u32>(n, "cluster assignment")?;
    let mut a2 = zeroed_vec::<u32>(n, "cluster assignment")?;
    let mut best = zeroed_vec::<f32>(n, "cluster assignment")?;
    nearest(x, d, &PackedCentroids::new(&cn, k, d), &mut a, &mut best);
    repair(x, xsq, d, &mut a, &mut best, &mut cn, &mut csq)?;
    let mut history = vec![inertia(xsq, &csq, &a, &best)];
    let (mut iterations, mut converged) = (0, false);
    while iterations < max_iter {
        update(x, d, &a, &mut cn)?;
        csq = row_sq(&cn, d)?;
        nearest(x, d, &PackedCentroids::new(&cn, k, d), &mut a2, &mut best);
        let repaired = repair(x, xsq, d, &mut a2, &mut best, &mut cn, &mut csq)?;
        let changed = a != a2;
        std::mem::swap(&mut a, &mut a2);
        iterations += 1;
        history.push(inertia(xsq, &csq, &a, &best));
        if !changed && !repaired {
            converged = true;
            break;
        }
    }
    let (member_offsets, members) = members_csr(&a, k)?;
    let sizes = collect_n(k, member_offsets.windows(2).map(|w| w[1] - w[0]), "cluster sizes")?;
    let centroids = raw_means(raw, d, &member_offsets, &members)?;
    let radii = radii(raw, d, &centroids, &a)?;
    Ok(Clustering {
        d,
        centroids,
        centroids_normalized: cn,
        sizes,
        member_offsets,
        members,
        assignment: a,
        inertia: *history.last().expect("one pass at least"),
        inertia_history: history,
        iterations,
        converged,
        seeds: Vec::new(),
        radii,
    })
}

/// Per cluster, the largest distance of a point (raw rows `[n][d]`) to its cluster's
/// centroid (`[k][d]`), for the points' assignment `a`.
pub(crate) fn radii(raw: &[f32], d: usize, centroids: &[f32], a: &[u32]) -> Result<Vec<f32>> {
    let mut r = zeroed_vec(centroids.len() / d, "cluster radii")?;
    grow_radii(&mut r, raw, d, centroids, a);
    Ok(r)
}

/// Fold more points (rows of `raw`, assigned by `a`) into the radii `r`.
pub(crate) fn grow_radii(r: &mut [f32], raw: &[f32], d: usize, centroids: &[f32], a: &[u32]) {
    for (row, &c) in raw.chunks_exact(d).zip(a) {
        let cen = &centroids[c as usize * d..(c as usize + 1) * d];
        let dist = row.iter().zip(cen).map(|(&x, &m)| ((x - m) as f64).powi(2)).sum::<f64>().sqrt() as f32;
        r[c as usize] = r[c as usize].max(dist);
    }
}

/// Mean of each cluster's raw keys (f64 sums), `[k][d]`. A cluster with no members gets
/// a zero centroid.
pub(crate) fn raw_means(raw: &[f32], d: usize, offsets: &[u32], members: &[u32]) -> Result<Vec<f32>> {
    let k = offsets.len() - 1;
    let mut out = zeroed_vec(mul(k, d, "clusters")?, "centroids")?;
    out.par_chunks_mut(d).enumerate().for_each(|(c, row)| {
        let m = &members[offsets[c] as usize..offsets[c + 1] as usize];
        if m.is_empty() {
            return;
        }
        let mut s = vec![0f64; d];
        for &i in m {
            for (acc, &v) in s.iter_mut().zip(&raw[i as usize * d..(i as usize + 1) * d]) {
                *acc += v as f64;
            }
        }
        for (o, v) in row.iter_mut().zip(s) {
            *o = (v / m.len() as f64) as f32;
        }
    });
    Ok(out)
}
