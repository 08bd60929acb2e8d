//! Threshold calibration: the τ that keeps a target fraction of the clustered keys on a set
//! of calibration queries.
//!
//! Every (query, head, cluster) gives a pair (estimate `s`, weight `N_c / (clustered_len ·
//! queries)`); a threshold keeps the pairs with `s > τ`, and the kept fraction averaged
//! over queries is the sum of their weights. The pairs are sorted by `s` (descending) and
//! the cut is placed at the boundary between two distinct values of `s` whose cumulative
//! weight is closest to the target (fewer kept on a tie); τ is the midpoint of the two
//! values around the cut, `s_max` when nothing is kept, and `-1` when everything is. With
//! `per_head` each head gets its own cut; otherwise one cut over all heads' pairs (weights
//! then also divided by the number of heads), repeated per head.

use crate::alloc::{collect_n, copy_of, mul, vec_with_capacity};
use crate::error::{Error, Result};
use crate::select::cluster::index::ClusterIndex;
use crate::select::cluster::retrieve::{scaled_query, Retrieve};
use crate::tensor::TensorView;

/// Thresholds from [`calibrate`], and the fractions they keep on the calibration queries.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// τ per KV head (all equal unless calibrated per head).
    pub per_head: Vec<f64>,
    /// Mean kept fraction of clustered keys per head on the calibration queries.
    pub kept_fraction: Vec<f64>,
    /// The fraction asked for.
    pub target: f64,
    /// Whether each head was calibrated on its own.
    pub per_head_mode: bool,
}

impl Thresholds {
    /// The kept fraction averaged over heads.
    pub fn mean_kept_fraction(&self) -> f64 {
        self.kept_fraction.iter().sum::<f64>() / self.kept_fraction.len() as f64
    }

    /// As a retrieval rule.
    pub fn retrieve(&self) -> Retrieve {
        Retrieve::PerHeadThreshold(self.per_head.clone())
    }
}

/// The τ for pairs `(s, weight)` whose total weight is 1 (see the module docs).
fn cut(pairs: &mut [(f64, f64)], target: f64) -> f64 {
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let (mut best_err, mut best_end) = (target, 0usize);
    let (mut cum, mut i) = (0f64, 0usize);
    while i < pairs.len() {
        let v = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == v {
            cum += pairs[i].1;
            i += 1;
        }
        let err = (cum - target).abs();
        if err < best_err {
            best_err = err;
            best_end = i;
        }
    }
    if best_end == 0 {
        pairs.first().map_or(0.0, |p| p.0)
    } else if best_end == pairs.len() {
        -1.0
    } else {
        0.5 * (pairs[best_end - 1].0 + pairs[best_end].0)
    }
}

/// Choose thresholds so that, on the calibration `queries` (`[m, num_qo_heads, head_dim]`,
/// after RoPE), retrieval by [`Retrieve::Threshold`] keeps on average `target_fraction` of
/// the clustered keys: over all heads together, or each head on its own (`per_head`).
///
/// Errors: `target_fraction` outside `(0, 1]`; `queries` of the wrong shape, empty, or not
/// finite; memory for one estimate per query, cluster and head running out
/// ([`Error::OutOfMemory`]).
pub fn calibrate(
    index: &ClusterIndex,
    queries: &TensorView,
    target_fraction: f64,
    per_head: bool,
) -> Result<Thresholds> {
    if !(target_fraction > 0.0 && target_fraction <= 1.0) {
        return Err(Error::invalid("target_fraction", format!("a fraction in (0, 1], got {target_fraction}")));
    }
    let (hk, d) = (index.num_kv_heads(), index.head_dim());
    let sh = queries.shape();
    if sh.len() != 3 || sh[0] == 0 || sh[2] != d {
        return Err(Error::shape("queries", format!("[m >= 1, num_qo_heads, {d}]"), format!("{sh:?}")));
    }
    let m = sh[0];
    let norm = index.clustered_len() as f64 * m as f64;
    // One (estimate, weight) pair per query and cluster, per head: sized by the caller's
    // query count, so allocated fallibly.
    let per_head_len = mul(m, index.num_clusters(), "queries")?;
    let mut pairs: Vec<Vec<(f64, f64)>> = vec_with_capacity(hk, "calibration estimates")?;
    for _ in 0..hk {
        pairs.push(vec_with_capacity(per_head_len, "calibration estimates")?);
    }
    for i in 0..m {
        let qi = queries.narrow0(i)?;
        let (hq, rows) = scaled_query(index, &qi, "queries")?;
        for (h, s) in index.estimates_rows(&rows, hq).into_iter().enumerate() {
            let sizes = index.head(h).sizes();
            pairs[h].extend(s.iter().zip(sizes).map(|(&s, &n)| (s, n as f64 / norm)));
        }
    }
    let per_head_tau: Vec<f64> = if per_head {
        let mut taus = Vec::with_capacity(hk);
        for p in &pairs {
            taus.push(cut(&mut copy_of(p, "calibration estimates")?, target_fraction));
        }
        taus
    } else {
        let all = pairs.iter().flatten().map(|&(s, w)| (s, w / hk as f64));
        let mut all = collect_n(mul(hk, per_head_len, "queries")?, all, "calibration estimates")?;
        vec![cut(&mut all, target_fraction); hk]
    };
    let kept_fraction =
        pairs.iter().zip(&per_head_tau).map(|(p, &t)| p.iter().filter(|x| x.0 > t).map(|x| x.1).sum()).collect();
    Ok(Thresholds { per_head: per_head_tau, kept_fraction, target: target_fraction, per_head_mode: per_head })
}
