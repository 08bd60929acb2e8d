//! Centroid retrieval: which clusters a decode query needs, flat or through the coarse
//! level, as a [`Selection`].
//!
//! For KV head `h` and each query head `j` of its group, the estimated attention that one
//! key of cluster `c` receives is
//! `s_jc = exp(q_j·C_c/√d) / Σ_i N_i·exp(q_j·C_i/√d)`, with `C` the raw-mean centroids and
//! `N` the cluster sizes (computed with the largest logit subtracted); `s_c` is its mean over
//! the group's query heads. Multiplied by `N_c` it is the share of attention the cluster is
//! expected to take, so `Σ_c N_c·s_c = 1`.
//!
//! Hierarchical lookup scores the coarse centroids first (the same formula with coarse
//! sizes), keeps some coarse clusters, and scores only their children. The denominator then
//! uses the fine terms of the children scored plus the coarse terms of the coarse clusters
//! left out, so with every coarse cluster kept it equals the flat estimate.
//!
//! The estimate scores a cluster by its mean key, so one key that matches the query far
//! better than its cluster-mates (a rare token among common ones) is hidden by them.
//! [`Retrieve::MixedBudget`] also ranks clusters by an upper bound of their best member's
//! logit, `b_c = max_j (q_j·C_c + |q_j|·r_c)/√d` (Cauchy-Schwarz, with `r_c` the cluster's
//! radius: the largest distance of a member's raw key to `C_c`), and takes clusters from
//! the two rankings in turn: the best by estimate, the best remaining by bound, and so on.

use crate::cpu;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::select::cluster::index::ClusterIndex;
use crate::select::selection::Selection;
use crate::tensor::TensorView;

/// Which clusters to keep, given their estimates.
#[derive(Debug, Clone, PartialEq)]
pub enum Retrieve {
    /// Clusters with `s_c > τ` (a negative τ keeps every cluster). τ not NaN.
    Threshold(f64),
    /// One τ per KV head (as [`crate::select::cluster::calibrate`] returns).
    PerHeadThreshold(Vec<f64>),
    /// Exactly `min(tokens, clustered tokens)` tokens per head: clusters in rank order
    /// (higher `s_c` first, lower cluster index on ties), whole, and the first cluster that
    /// does not fit in full gives its lowest token indices. At least 1.
    Budget(usize),
    /// As `Budget`, with clusters taken alternately from the estimate ranking and from the
    /// ranking by the upper bound `b_c` (see the module docs; ties to the lower cluster
    /// index), each cluster once. Needs an index with radii ([`crate::select::cluster::Clustering::radii`]).
    MixedBudget(usize),
}

/// Which coarse clusters to open in [`ClusterIndex::retrieve_hierarchical`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CoarseRetrieve {
    /// Coarse clusters with estimate `> τ1` (a negative τ1 opens them all).
    Threshold(f64),
    /// The best coarse clusters (rank order as for [`Retrieve::Budget`]) until the tokens
    /// beneath them reach `tokens` (the last one may overshoot). At least 1.
    Budget(usize),
    /// `Budget(ceil(m * fine budget))`; needs a fine [`Retrieve::Budget`]; `m > 0`.
    BudgetMultiple(f64),
}

/// What a retrieval cost and kept. Counts are summed over KV heads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetrievalStats {
    /// Query-centroid dot products computed (each query head of a group against each
    /// centroid it scored): `coarse_evals + fine_evals`.
    pub centroid_evals: usize,
    /// Of which against coarse centroids (0 for flat retrieval).
    pub coarse_evals: usize,
    /// Of which against fine centroids.
    pub fine_evals: usize,
    /// Fine clusters scored per head.
    pub clusters_scored: Vec<usize>,
    /// Fine clusters kept per head (a partly kept cluster counts).
    pub clusters_kept: Vec<usize>,
    /// Coarse clusters opened per head (0 for flat retrieval).
    pub coarse_kept: Vec<usize>,
    /// Tokens kept per head.
    pub tokens_kept: Vec<usize>,
}

/// A retrieval's selection and its cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieval {
    pub selection: Selection,
    pub stats: RetrievalStats,
}

/// Read `q` (`[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`) as f32 rows scaled
/// by `1/√d`, checking it against the index.
pub(crate) fn scaled_query(index: &ClusterIndex, q: &TensorView, param: &str) -> Result<(usize, Vec<f32>)> {
    let (hk, d) = (index.num_kv_heads, index.head_dim);
    let sh = q.shape();
    let (lead, hq) = match sh.len() {
        2 if sh[1] == d => (None, sh[0]),
        3 if sh[0] == 1 && sh[2] == d => (Some(0), sh[1]),
        _ => {
            return Err(Error::shape(
                param,
                format!("[num_qo_heads, {d}] or [1, num_qo_heads, {d}] (head_dim {d} of the index)"),
                format!("{sh:?}"),
            ))
        }
    };
    if hq == 0 || hq % hk != 0 {
        return Err(Error::shape(
            param,
            format!("a number of query heads that is a positive multiple of num_kv_heads {hk}"),
            format!("{hq}"),
        ));
    }
    let mut rows = vec![0f32; hq * d];
    for h in 0..hq {
        let idx: Vec<usize> = lead.into_iter().chain([h]).collect();
        q.read_row(&idx, &mut rows[h * d..(h + 1) * d]);
    }
    if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            param,
            format!("finite values, but query head {} holds {} at channel {}", i / d, rows[i], i % d),
        ));
    }
    let scale = 1.0 / (d as f32).sqrt();
    rows.iter_mut().for_each(|v| *v *= scale);
    Ok((hq, rows))
}

/// Logits `[g][ids.len()]` of `g` query rows against rows `ids` of `cents` (`[k][d]`).
fn logits(q: &[f32], g: usize, d: usize, cents: &[f32], ids: &[u32]) -> Vec<f32> {
    let ptrs: Vec<*const u8> = ids.iter().map(|&c| cents[c as usize * d..].as_ptr() as *const u8).collect();
    let mut out = vec![0f32; g * ids.len()];
    // SAFETY: each pointer addresses a full row of d f32 in `cents`; d is a multiple of 8
    // (head_dim is validated); `q` holds g rows and `out` g * ids.len() entries.
    unsafe { cpu::scores(q, g, d, &ptrs, DType::F32, &mut out) };
    out
}

/// Group-averaged estimates of the scored terms (`l_sc` `[g][m]`, sizes `n_sc`), the
/// denominator also holding extra terms (`l_ex` `[g][m2]`, sizes `n_ex`).
fn estimates(g: usize, l_sc: &[f32], n_sc: &[u32], l_ex: &[f32], n_ex: &[u32]) -> Vec<f64> {
    let (m, m2) = (n_sc.len(), n_ex.len());
    let mut s = vec![0f64; m];
    let mut row = vec![0f32; m];
    let mut ex = vec![0f32; m2];
    for j in 0..g {
        row.copy_from_slice(&l_sc[j * m..(j + 1) * m]);
        ex.copy_from_slice(&l_ex[j * m2..(j + 1) * m2]);
        let mx = row.iter().chain(ex.iter()).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        cpu::exp_sub_sum(&mut row, mx);
        cpu::exp_sub_sum(&mut ex, mx);
        let denom: f64 = row.iter().zip(n_sc).map(|(&e, &n)| e as f64 * n as f64).sum::<f64>()
            + ex.iter().zip(n_ex).map(|(&e, &n)| e as f64 * n as f64).sum::<f64>();
        for (o, &e) in s.iter_mut().zip(&row) {
            *o += e as f64 / denom;
        }
    }
    s.iter_mut().for_each(|v| *v /= g as f64);
    s
}

/// Positions (into `scores`) in rank order: higher score first, then lower `ids` entry.
fn ranked(scores: &[f64], ids: &[u32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(ids[a].cmp(&ids[b])));
    order
}

fn check_threshold(param: &str, t: f64) -> Result<()> {
    if t.is_nan() {
        return Err(Error::invalid(param, "a threshold that is not NaN"));
    }
    Ok(())
}

impl Retrieve {
    fn validate(&self, hk: usize) -> Result<()> {
        match self {
            Retrieve::Threshold(t) => check_threshold("threshold", *t),
            Retrieve::PerHeadThreshold(v) => {
                if v.len() != hk {
                    return Err(Error::shape(
                        "thresholds",
                        format!("[{hk}] (one per KV head)"),
                        format!("[{}]", v.len()),
                    ));
                }
                v.iter().try_for_each(|&t| check_threshold("thresholds", t))
            }
            Retrieve::Budget(0) | Retrieve::MixedBudget(0) => {
                Err(Error::invalid("budget", "at least 1 token (a budget of 0 keeps nothing)"))
            }
            Retrieve::Budget(_) | Retrieve::MixedBudget(_) => Ok(()),
        }
    }

    /// The token budget, for the budget rules.
    pub(crate) fn budget(&self) -> Option<usize> {
        match self {
            Retrieve::Budget(b) | Retrieve::MixedBudget(b) => Some(*b),
            _ => None,
        }
    }

    /// Check that `index` can serve this rule (the mixed rule needs radii).
    fn check_index(&self, index: &ClusterIndex) -> Result<()> {
        if matches!(self, Retrieve::MixedBudget(_)) && !index.heads.iter().all(|c| c.radii.len() == c.sizes.len()) {
            return Err(Error::invalid(
                "how",
                "an index with cluster radii for MixedBudget (any build, or a version 2 file; rebuild an index loaded from a version 1 file)",
            ));
        }
        Ok(())
    }

    /// The kept `(cluster id, tokens taken from it)` among scored clusters `ids`; `bounds`
    /// (one per scored cluster) for `MixedBudget`.
    fn choose(&self, h: usize, scores: &[f64], bounds: &[f64], ids: &[u32], sizes: &[u32]) -> Vec<(u32, usize)> {
        let keep_above = |t: f64| {
            ids.iter().zip(scores).filter(|(_, &s)| s > t).map(|(&c, _)| (c, sizes[c as usize] as usize)).collect()
        };
        let fill = |order: &mut dyn Iterator<Item = usize>, budget: usize| {
            let mut left = budget;
            let mut out = Vec::new();
            for i in order {
                if left == 0 {
                    break;
                }
                let c = ids[i];
                let take = (sizes[c as usize] as usize).min(left);
                out.push((c, take));
                left -= take;
            }
            out
        };
        match self {
            Retrieve::Threshold(t) => keep_above(*t),
            Retrieve::PerHeadThreshold(v) => keep_above(v[h]),
            Retrieve::Budget(b) => fill(&mut ranked(scores, ids).into_iter(), *b),
            Retrieve::MixedBudget(b) => {
                fill(&mut interleave(&ranked(scores, ids), &ranked(bounds, ids)).into_iter(), *b)
            }
        }
    }
}

/// Positions from two rankings of the same positions, alternately (first `a`), each once.
fn interleave(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut seen = vec![false; a.len()];
    let mut out = Vec::with_capacity(a.len());
    let (mut i, mut j) = (0, 0);
    while out.len() < a.len() {
        for (list, at) in [(a, &mut i), (b, &mut j)] {
            while *at < list.len() && seen[list[*at]] {
                *at += 1;
            }
            if *at < list.len() {
                seen[list[*at]] = true;
                out.push(list[*at]);
            }
        }
    }
    out
}

/// The bound `b_c` of each scored cluster (`ids`), from the scaled query rows of the group
/// (`q`, `g` rows of `d`), their logits against those clusters (`l`, `[g][ids.len()]`) and
/// the radii.
fn upper_bounds(q: &[f32], g: usize, d: usize, l: &[f32], ids: &[u32], radii: &[f32]) -> Vec<f64> {
    let m = ids.len();
    let mut b = vec![f64::NEG_INFINITY; m];
    for j in 0..g {
        let norm = q[j * d..(j + 1) * d].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        for (i, &c) in ids.iter().enumerate() {
            b[i] = b[i].max(l[j * m + i] as f64 + norm * radii[c as usize] as f64);
        }
    }
    b
}

impl ClusterIndex {
    fn check_seq_len(&self, seq_len: usize) -> Result<()> {
        if seq_len < self.seq_len || seq_len > u32::MAX as usize {
            return Err(Error::out_of_range(
                "seq_len",
                seq_len as i64,
                format!("{}..={} (at least the length the index covers)", self.seq_len, u32::MAX),
            ));
        }
        Ok(())
    }

    /// Tokens of the kept clusters of head `h`, ascending.
    fn gather(&self, h: usize, kept: &[(u32, usize)]) -> Vec<u32> {
        let head = &self.heads[h];
        let mut tokens = Vec::with_capacity(kept.iter().map(|k| k.1).sum());
        for &(c, take) in kept {
            tokens.extend_from_slice(&head.members(c as usize)[..take]);
        }
        tokens.sort_unstable();
        tokens
    }

    /// Group-averaged estimated attention per key of each fine cluster, `[num_kv_heads]`
    /// vectors of `num_clusters` (flat scoring). `q` is `[num_qo_heads, head_dim]` or
    /// `[1, num_qo_heads, head_dim]`, after RoPE.
    pub fn cluster_estimates(&self, q: &TensorView) -> Result<Vec<Vec<f64>>> {
        let (hq, rows) = scaled_query(self, q, "q")?;
        Ok(self.estimates_rows(&rows, hq))
    }

    pub(crate) fn estimates_rows(&self, rows: &[f32], hq: usize) -> Vec<Vec<f64>> {
        (0..self.num_kv_heads).map(|h| self.head_scores(rows, hq, h, false).0).collect()
    }

    /// Head `h`'s estimates over every fine cluster, and with `bounds` their upper bounds
    /// (empty otherwise).
    fn head_scores(&self, rows: &[f32], hq: usize, h: usize, bounds: bool) -> (Vec<f64>, Vec<f64>) {
        let (d, g) = (self.head_dim, hq / self.num_kv_heads);
        let all: Vec<u32> = (0..self.num_clusters() as u32).collect();
        let head = &self.heads[h];
        let q = &rows[h * g * d..(h + 1) * g * d];
        let l = logits(q, g, d, &head.centroids, &all);
        let b = if bounds { upper_bounds(q, g, d, &l, &all, &head.radii) } else { Vec::new() };
        (estimates(g, &l, &head.sizes, &[], &[]), b)
    }

    /// Flat retrieval: score every fine centroid against the decode query `q`
    /// (`[num_qo_heads, head_dim]` or with a leading 1, after RoPE) and keep clusters by
    /// `how`. The selection is for a sequence of `seq_len` tokens (at least
    /// [`ClusterIndex::seq_len`]): tokens past [`ClusterIndex::clustered_len`] are in no
    /// cluster and not returned; union a window selection ([`crate::select::streaming`]).
    ///
    /// Errors: `q` of the wrong shape (head_dim other than the index's, query heads not a
    /// multiple of its KV heads) or not finite; a NaN threshold; a budget of 0; per-head
    /// thresholds of the wrong length; `seq_len` shorter than the index covers.
    pub fn retrieve(&self, q: &TensorView, how: &Retrieve, seq_len: usize) -> Result<Retrieval> {
        how.validate(self.num_kv_heads)?;
        how.check_index(self)?;
        self.check_seq_len(seq_len)?;
        let (hq, rows) = scaled_query(self, q, "q")?;
        let g = hq / self.num_kv_heads;
        let all: Vec<u32> = (0..self.num_clusters() as u32).collect();
        let mixed = matches!(how, Retrieve::MixedBudget(_));
        let mut stats = RetrievalStats::default();
        let mut heads = Vec::with_capacity(self.num_kv_heads);
        for h in 0..self.num_kv_heads {
            let (s, b) = self.head_scores(&rows, hq, h, mixed);
            let kept = how.choose(h, &s, &b, &all, &self.heads[h].sizes);
            let tokens = self.gather(h, &kept);
            stats.fine_evals += g * all.len();
            stats.clusters_scored.push(all.len());
            stats.clusters_kept.push(kept.len());
            stats.coarse_kept.push(0);
            stats.tokens_kept.push(tokens.len());
            heads.push(tokens);
        }
        stats.centroid_evals = stats.fine_evals;
        Ok(Retrieval { selection: Selection::from_heads_unchecked(seq_len, &heads)?, stats })
    }

    /// Hierarchical retrieval: score the coarse centroids, open the coarse clusters chosen
    /// by `coarse`, score only their children and keep those chosen by `fine` (see the
    /// module docs for the estimate). With every coarse cluster opened the result equals
    /// [`ClusterIndex::retrieve`]'s. Errors as `retrieve`, plus: no coarse level, a NaN τ1,
    /// a coarse budget of 0, a budget multiple that is not positive or without a fine budget.
    pub fn retrieve_hierarchical(
        &self,
        q: &TensorView,
        coarse: CoarseRetrieve,
        fine: &Retrieve,
        seq_len: usize,
    ) -> Result<Retrieval> {
        if self.coarse.is_empty() {
            return Err(Error::invalid("coarse", "an index built with a coarse level (ClusterConfig::coarse)"));
        }
        fine.validate(self.num_kv_heads)?;
        fine.check_index(self)?;
        let coarse_budget = match coarse {
            CoarseRetrieve::Threshold(t) => {
                check_threshold("coarse threshold", t)?;
                None
            }
            CoarseRetrieve::Budget(0) => return Err(Error::invalid("coarse budget", "at least 1 token")),
            CoarseRetrieve::Budget(b) => Some(b),
            CoarseRetrieve::BudgetMultiple(m) => match fine.budget() {
                Some(b) if m > 0.0 && m.is_finite() => Some(((m * b as f64).ceil() as usize).max(1)),
                Some(_) => {
                    return Err(Error::invalid(
                        "coarse budget multiple",
                        format!("a positive finite multiple, got {m}"),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        "coarse",
                        "a fine Retrieve::Budget to multiply (BudgetMultiple), or a coarse Threshold/Budget",
                    ))
                }
            },
        };
        self.check_seq_len(seq_len)?;
        let mixed = matches!(fine, Retrieve::MixedBudget(_));
        let (hq, rows) = scaled_query(self, q, "q")?;
        let (d, g) = (self.head_dim, hq / self.num_kv_heads);
        let mut stats = RetrievalStats::default();
        let mut heads = Vec::with_capacity(self.num_kv_heads);
        for h in 0..self.num_kv_heads {
            let (head, level) = (&self.heads[h], &self.coarse[h]);
            let qh = &rows[h * g * d..(h + 1) * g * d];
            let k1 = level.sizes.len();
            let cids: Vec<u32> = (0..k1 as u32).collect();
            let lc = logits(qh, g, d, &level.centroids, &cids);
            let s1 = estimates(g, &lc, &level.sizes, &[], &[]);
            let mut open = vec![false; k1];
            match coarse_budget {
                None => {
                    let CoarseRetrieve::Threshold(t) = coarse else { unreachable!("budget modes set coarse_budget") };
                    for c in 0..k1 {
                        open[c] = s1[c] > t;
                    }
                }
                Some(b) => {
                    let mut got = 0usize;
                    for i in ranked(&s1, &cids) {
                        if got >= b {
                            break;
                        }
                        open[i] = true;
                        got += level.sizes[i] as usize;
                    }
                }
            }
            let mut children: Vec<u32> =
                (0..k1).filter(|&c| open[c]).flat_map(|c| level.children(c).iter().copied()).collect();
            children.sort_unstable();
            let closed: Vec<usize> = (0..k1).filter(|&c| !open[c]).collect();
            let mut l_ex = Vec::with_capacity(g * closed.len());
            for j in 0..g {
                l_ex.extend(closed.iter().map(|&c| lc[j * k1 + c]));
            }
            let n_ex: Vec<u32> = closed.iter().map(|&c| level.sizes[c]).collect();
            let lf = logits(qh, g, d, &head.centroids, &children);
            let n_sc: Vec<u32> = children.iter().map(|&c| head.sizes[c as usize]).collect();
            let s = estimates(g, &lf, &n_sc, &l_ex, &n_ex);
            let b = if mixed { upper_bounds(qh, g, d, &lf, &children, &head.radii) } else { Vec::new() };
            let kept = fine.choose(h, &s, &b, &children, &head.sizes);
            let tokens = self.gather(h, &kept);
            stats.coarse_evals += g * k1;
            stats.fine_evals += g * children.len();
            stats.clusters_scored.push(children.len());
            stats.clusters_kept.push(kept.len());
            stats.coarse_kept.push(k1 - closed.len());
            stats.tokens_kept.push(tokens.len());
            heads.push(tokens);
        }
        stats.centroid_evals = stats.coarse_evals + stats.fine_evals;
        Ok(Retrieval { selection: Selection::from_heads_unchecked(seq_len, &heads)?, stats })
    }
}
