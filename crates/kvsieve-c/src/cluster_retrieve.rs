//! `cluster.h`, retrieval: how a retrieval keeps clusters (`kvsieve_retrieve_config_t` and
//! the `KVSIEVE_RETRIEVE_*` and `KVSIEVE_COARSE_*` modes) and what it cost
//! (`kvsieve_retrieve_stats_t`); the per-cluster estimates for a decode query
//! (`kvsieve_cluster_index_estimates`), flat and hierarchical centroid retrieval into a
//! selection handle (`kvsieve_cluster_index_retrieve`) and threshold calibration
//! (`kvsieve_cluster_index_calibrate`). Each takes the index's read lock. The index itself
//! is in `cluster`.

use std::mem::{align_of, offset_of, size_of};

use kvsieve::error::{Error, Result};
use kvsieve::select::cluster::{calibrate, CoarseRetrieve, RetrievalStats, Retrieve};

use super::args::{
    check_capacity, check_disjoint, copy_array, non_null, opt_slice_mut, read_versioned, rename, sizes_are_valid,
    slice, slice_mut, write_out, Region, Versioned, VersionedOut,
};
use super::cluster::{copy_out, index_ref, kvsieve_cluster_index_t};
use super::error::{guard, kvsieve_error_t};
use super::selection::{into_handle, kvsieve_selection_t};
use super::tensor::{kvsieve_tensor_t, parse_query, Tensor};

/// `KVSIEVE_RETRIEVE_THRESHOLD`: keep clusters whose estimate exceeds `threshold`.
pub const RETRIEVE_THRESHOLD: u32 = 0;

/// `KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD`: as above with one threshold per KV head.
pub const RETRIEVE_PER_HEAD_THRESHOLD: u32 = 1;

/// `KVSIEVE_RETRIEVE_BUDGET`: exactly `budget` tokens per head, best clusters first.
pub const RETRIEVE_BUDGET: u32 = 2;

/// `KVSIEVE_RETRIEVE_BUDGET_MIXED`: `budget` tokens per head, clusters taken alternately by
/// estimate and by the upper bound of their best member's logit.
pub const RETRIEVE_BUDGET_MIXED: u32 = 3;

/// `KVSIEVE_COARSE_THRESHOLD`: open coarse clusters whose estimate exceeds `coarse_threshold`.
pub const COARSE_THRESHOLD: u32 = 0;

/// `KVSIEVE_COARSE_BUDGET`: open the best coarse clusters until `coarse_budget` tokens.
pub const COARSE_BUDGET: u32 = 1;

/// `KVSIEVE_COARSE_BUDGET_MULTIPLE`: a coarse budget of `coarse_budget_multiple` times the
/// fine budget.
pub const COARSE_BUDGET_MULTIPLE: u32 = 2;

/// How `kvsieve_cluster_index_retrieve` keeps clusters (see `kvsieve_retrieve_config_t` in
/// the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvsieve_retrieve_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    /// `KVSIEVE_RETRIEVE_*`.
    pub mode: u32,
    pub threshold: f64,
    pub thresholds: *const f64,
    pub num_thresholds: usize,
    pub budget: usize,
    /// Length of the sequence the selection is for; 0 means the index's `seq_len`.
    pub seq_len: usize,
    pub hierarchical: bool,
    /// `KVSIEVE_COARSE_*`, with `hierarchical`.
    pub coarse_mode: u32,
    pub coarse_threshold: f64,
    pub coarse_budget: usize,
    pub coarse_budget_multiple: f64,
}

/// What a retrieval cost and kept, summed over KV heads (see `kvsieve_retrieve_stats_t`
/// in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_retrieve_stats_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub centroid_evals: usize,
    pub coarse_evals: usize,
    pub fine_evals: usize,
    pub clusters_scored: usize,
    pub clusters_kept: usize,
    pub coarse_kept: usize,
    pub tokens_kept: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_retrieve_config_t>() == 88 && align_of::<kvsieve_retrieve_config_t>() == 8);
    assert!(offset_of!(kvsieve_retrieve_config_t, mode) == 8);
    assert!(offset_of!(kvsieve_retrieve_config_t, threshold) == 16);
    assert!(offset_of!(kvsieve_retrieve_config_t, thresholds) == 24);
    assert!(offset_of!(kvsieve_retrieve_config_t, num_thresholds) == 32);
    assert!(offset_of!(kvsieve_retrieve_config_t, budget) == 40);
    assert!(offset_of!(kvsieve_retrieve_config_t, seq_len) == 48);
    assert!(offset_of!(kvsieve_retrieve_config_t, hierarchical) == 56);
    assert!(offset_of!(kvsieve_retrieve_config_t, coarse_mode) == 60);
    assert!(offset_of!(kvsieve_retrieve_config_t, coarse_threshold) == 64);
    assert!(offset_of!(kvsieve_retrieve_config_t, coarse_budget) == 72);
    assert!(offset_of!(kvsieve_retrieve_config_t, coarse_budget_multiple) == 80);
    assert!(size_of::<kvsieve_retrieve_stats_t>() == 64 && align_of::<kvsieve_retrieve_stats_t>() == 8);
    assert!(offset_of!(kvsieve_retrieve_stats_t, centroid_evals) == 8);
    assert!(offset_of!(kvsieve_retrieve_stats_t, coarse_evals) == 16);
    assert!(offset_of!(kvsieve_retrieve_stats_t, fine_evals) == 24);
    assert!(offset_of!(kvsieve_retrieve_stats_t, clusters_scored) == 32);
    assert!(offset_of!(kvsieve_retrieve_stats_t, clusters_kept) == 40);
    assert!(offset_of!(kvsieve_retrieve_stats_t, coarse_kept) == 48);
    assert!(offset_of!(kvsieve_retrieve_stats_t, tokens_kept) == 56);
};

const _: () = {
    assert!(offset_of!(kvsieve_retrieve_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_retrieve_config_t>());
    assert!(offset_of!(kvsieve_retrieve_stats_t, struct_size) == 0 && sizes_are_valid::<kvsieve_retrieve_stats_t>());
};

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_retrieve_config_t {
    const NAME: &'static str = "kvsieve_retrieve_config_t";
    const INIT: &'static str = "kvsieve_retrieve_config_init() or kvsieve_retrieve_config_default()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        kvsieve_retrieve_config_default(0)
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_retrieve_stats_t {
    const NAME: &'static str = "kvsieve_retrieve_stats_t";
    const INIT: &'static str = "kvsieve_retrieve_stats_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

impl kvsieve_retrieve_stats_t {
    /// What the header's `kvsieve_retrieve_stats_init()` gives: zeros, `struct_size` this
    /// layout's.
    pub fn init() -> Self {
        kvsieve_retrieve_stats_t {
            struct_size: size_of::<Self>(),
            centroid_evals: 0,
            coarse_evals: 0,
            fine_evals: 0,
            clusters_scored: 0,
            clusters_kept: 0,
            coarse_kept: 0,
            tokens_kept: 0,
        }
    }

    fn from_core(s: &RetrievalStats) -> Self {
        kvsieve_retrieve_stats_t {
            struct_size: size_of::<Self>(),
            centroid_evals: s.centroid_evals,
            coarse_evals: s.coarse_evals,
            fine_evals: s.fine_evals,
            clusters_scored: s.clusters_scored.iter().sum(),
            clusters_kept: s.clusters_kept.iter().sum(),
            coarse_kept: s.coarse_kept.iter().sum(),
            tokens_kept: s.tokens_kept.iter().sum(),
        }
    }
}

/// A retrieval configuration keeping `budget` tokens per head, flat, for the index's
/// sequence length; coarse settings that open every coarse cluster. What the header's
/// `static inline` function of this name gives. Not exported (C programs compile the
/// header's); Rust code that calls the entry points directly (the tests) uses it.
pub fn kvsieve_retrieve_config_default(budget: usize) -> kvsieve_retrieve_config_t {
    kvsieve_retrieve_config_t {
        struct_size: size_of::<kvsieve_retrieve_config_t>(),
        mode: RETRIEVE_BUDGET,
        threshold: 0.0,
        thresholds: std::ptr::null(),
        num_thresholds: 0,
        budget,
        seq_len: 0,
        hierarchical: false,
        coarse_mode: COARSE_THRESHOLD,
        coarse_threshold: -1.0,
        coarse_budget: 0,
        coarse_budget_multiple: 0.0,
    }
}

/// Group-averaged estimated attention per key of every fine cluster, head-major
/// (`[num_kv_heads][num_clusters]`).
///
/// # Safety
/// 1. `index` is NULL or a live handle; `q` is NULL or a valid descriptor whose data is not
///    written during the call;
/// 2. `estimates` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_estimates(
    index: *const kvsieve_cluster_index_t,
    q: *const kvsieve_tensor_t,
    estimates: *mut f64,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_estimates", || {
        let ix = index_ref(index, "index")?;
        let q = parse_query(q, "q")?;
        check_disjoint(
            &[Region::of(estimates, capacity, "estimates"), Region::of(out_len, 1, "out_len")],
            &[q.region()],
        )?;
        slice_mut(estimates, capacity, "estimates")?;
        let g = ix.inner.read();
        let qv = q.view()?;
        let est: Vec<f64> = g.cluster_estimates(&qv)?.into_iter().flatten().collect();
        copy_out(&est, estimates, "estimates", capacity, out_len, "num_kv_heads * num_clusters")
    })
}

/// The retrieval rule of `c` for an index with `num_coarse` coarse clusters per head (0:
/// none), and the coarse rule when `c` asks for hierarchical lookup.
///
/// # Safety
/// 1. `c.thresholds` is NULL or readable for `c.num_thresholds` values.
pub(crate) unsafe fn retrieval_rule(
    c: &kvsieve_retrieve_config_t,
    num_coarse: usize,
) -> Result<(Retrieve, Option<CoarseRetrieve>)> {
    let fine = match c.mode {
        RETRIEVE_THRESHOLD => Retrieve::Threshold(c.threshold),
        RETRIEVE_PER_HEAD_THRESHOLD => {
            non_null(c.thresholds, "thresholds")?;
            Retrieve::PerHeadThreshold(copy_array(slice(c.thresholds, c.num_thresholds, "thresholds")?, "thresholds")?)
        }
        RETRIEVE_BUDGET => Retrieve::Budget(c.budget),
        RETRIEVE_BUDGET_MIXED => Retrieve::MixedBudget(c.budget),
        m => {
            return Err(Error::invalid(
                "mode",
                format!("KVSIEVE_RETRIEVE_THRESHOLD (0), KVSIEVE_RETRIEVE_PER_HEAD_THRESHOLD (1), KVSIEVE_RETRIEVE_BUDGET (2) or KVSIEVE_RETRIEVE_BUDGET_MIXED (3), got {m}"),
            ))
        }
    };
    if !c.hierarchical {
        return Ok((fine, None));
    }
    if num_coarse == 0 {
        return Err(Error::invalid(
            "hierarchical",
            "an index built with a coarse level (`num_coarse_clusters` or `coarse_fraction` set)",
        ));
    }
    let coarse = match c.coarse_mode {
        COARSE_THRESHOLD => CoarseRetrieve::Threshold(c.coarse_threshold),
        COARSE_BUDGET => CoarseRetrieve::Budget(c.coarse_budget),
        COARSE_BUDGET_MULTIPLE if c.mode != RETRIEVE_BUDGET && c.mode != RETRIEVE_BUDGET_MIXED => {
            return Err(Error::invalid("coarse_mode", "KVSIEVE_COARSE_BUDGET_MULTIPLE only with a fine KVSIEVE_RETRIEVE_BUDGET or KVSIEVE_RETRIEVE_BUDGET_MIXED"))
        }
        COARSE_BUDGET_MULTIPLE => CoarseRetrieve::BudgetMultiple(c.coarse_budget_multiple),
        m => {
            return Err(Error::invalid(
                "coarse_mode",
                format!("KVSIEVE_COARSE_THRESHOLD (0), KVSIEVE_COARSE_BUDGET (1) or KVSIEVE_COARSE_BUDGET_MULTIPLE (2), got {m}"),
            ))
        }
    };
    Ok((fine, Some(coarse)))
}

/// The core names the coarse options with spaces; the C fields have underscores.
pub(crate) fn rename_coarse(e: Error) -> Error {
    let e = rename(e, "coarse threshold", "coarse_threshold");
    let e = rename(e, "coarse budget", "coarse_budget");
    rename(rename(e, "coarse budget multiple", "coarse_budget_multiple"), "coarse", "coarse_mode")
}

/// Centroid retrieval for the decode query `q`, as a new selection.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `q` is NULL or a valid descriptor whose data is not
///    written during the call; `config` is NULL or readable, its `thresholds` NULL or
///    readable for `num_thresholds` values;
/// 2. `out` is NULL or writable; `stats` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_retrieve(
    index: *const kvsieve_cluster_index_t,
    q: *const kvsieve_tensor_t,
    config: *const kvsieve_retrieve_config_t,
    out: *mut *mut kvsieve_selection_t,
    stats: *mut kvsieve_retrieve_stats_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_retrieve", || {
        let ix = index_ref(index, "index")?;
        let q = parse_query(q, "q")?;
        let c = read_versioned(config, "config")?;
        non_null(out, "out")?;
        let stats = VersionedOut::optional(stats, "stats")?;
        let mut reads = vec![q.region()];
        if c.mode == RETRIEVE_PER_HEAD_THRESHOLD {
            reads.push(Region::of(c.thresholds, c.num_thresholds, "thresholds"));
        }
        let stats_region =
            stats.as_ref().map_or_else(|| Region::of(std::ptr::null::<u8>(), 0, "stats"), |s| s.region("stats"));
        check_disjoint(&[Region::of(out, 1, "out"), stats_region], &reads)?;
        let g = ix.inner.read();
        let (fine, coarse) = retrieval_rule(&c, g.num_coarse_clusters())?;
        let seq_len = if c.seq_len == 0 { g.seq_len() } else { c.seq_len };
        let qv = q.view()?;
        let res = match coarse {
            None => g.retrieve(&qv, &fine, seq_len),
            Some(coarse) => g.retrieve_hierarchical(&qv, coarse, &fine, seq_len).map_err(rename_coarse),
        }?;
        if let Some(stats) = stats {
            stats.write(kvsieve_retrieve_stats_t::from_core(&res.stats));
        }
        write_out(out, into_handle(res.selection));
        Ok(())
    })
}

/// Thresholds that keep `target_fraction` of the clustered keys on calibration queries.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `queries` is NULL or a valid descriptor whose data
///    is not written during the call;
/// 2. `thresholds` is NULL or writable for `capacity` values; `kept_fractions` is NULL or
///    writable for `capacity` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_calibrate(
    index: *const kvsieve_cluster_index_t,
    queries: *const kvsieve_tensor_t,
    target_fraction: f64,
    per_head: bool,
    thresholds: *mut f64,
    capacity: usize,
    kept_fractions: *mut f64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_calibrate", || {
        let ix = index_ref(index, "index")?;
        let qs = Tensor::parse(queries, "queries", &["m", "num_qo_heads", "head_dim"])?;
        check_disjoint(
            &[Region::of(thresholds, capacity, "thresholds"), Region::of(kept_fractions, capacity, "kept_fractions")],
            &[qs.region()],
        )?;
        slice_mut(thresholds, capacity, "thresholds")?;
        let g = ix.inner.read();
        let hk = g.num_kv_heads();
        check_capacity("capacity", capacity, hk, "num_kv_heads")?;
        let out = slice_mut(thresholds, hk, "thresholds")?;
        let kept = opt_slice_mut(kept_fractions, hk, "kept_fractions")?;
        let qv = qs.view()?;
        let t = calibrate(&g, &qv, target_fraction, per_head)?;
        out.copy_from_slice(&t.per_head);
        if let Some(k) = kept {
            k.copy_from_slice(&t.kept_fraction);
        }
        Ok(())
    })
}
