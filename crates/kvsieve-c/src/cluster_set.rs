//! `cluster.h`, centroid retrieval in policies: the cluster index set
//! (`kvsieve_cluster_set_t`), the per-(sequence, layer) cluster indexes that a policy with
//! `clusters=` reads, built from a cache after prefill, updated as tokens arrive, and passed
//! to `kvsieve_cache_decode_with_clusters`.
//!
//! The set lives behind a reader-writer lock: decoding takes the read lock (any number at
//! once); building, updating and removing take the write lock. The cache's read lock is
//! always taken after the set's lock.

use parking_lot::RwLock;

use kvsieve::error::{Error, Result};
use kvsieve::runtime::ClusterIndexSet;

use super::args::{check_disjoint, non_null, opt_slice_mut, slice, write_out, Region};
use super::attention::{AttentionArgs, DECODE_DIMS};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, guard_value, kvsieve_error_t};
use super::params::kvsieve_attention_params_t;
use super::policy::{kvsieve_policy_t, policy_ref};
use super::selection::{into_handle, kvsieve_selection_t};
use super::tensor::kvsieve_tensor_t;

/// Cluster indexes keyed by (sequence, layer) (see `kvsieve_cluster_set_t` in the header).
#[allow(non_camel_case_types)]
pub struct kvsieve_cluster_set_t {
    inner: RwLock<ClusterIndexSet>,
}

/// # Safety
/// 1. `set` is NULL or a live handle from `kvsieve_cluster_set_new`, not freed while `'a` lasts.
unsafe fn set_ref<'a>(set: *const kvsieve_cluster_set_t) -> Result<&'a kvsieve_cluster_set_t> {
    non_null(set, "set")?;
    if !(set as usize).is_multiple_of(std::mem::align_of::<kvsieve_cluster_set_t>()) {
        return Err(Error::invalid("set", "a handle returned by kvsieve_cluster_set_new"));
    }
    Ok(&*set)
}

/// A new, empty set whose indexes use k-means++ seed `seed`.
///
/// # Safety
/// 1. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_new(
    seed: u64,
    out: *mut *mut kvsieve_cluster_set_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_set_new", || {
        non_null(out, "out")?;
        write_out(
            out,
            Box::into_raw(Box::new(kvsieve_cluster_set_t { inner: RwLock::new(ClusterIndexSet::with_seed(seed)) })),
        );
        Ok(())
    })
}

/// Free a set. NULL is ignored.
///
/// # Safety
/// 1. `set` is NULL or a live handle, freed once, with no call on it running or to come.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_free(set: *mut kvsieve_cluster_set_t) {
    guard_value((), || {
        if !set.is_null() {
            drop(Box::from_raw(set));
        }
    })
}

/// Build the indexes of `seq` for every layer where `policy` uses `clusters=`;
/// `*out_layers` (optional) receives the number of layers indexed.
///
/// # Safety
/// 1. `set`, `cache` and `policy` are NULL or live handles; `out_layers` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_build(
    set: *mut kvsieve_cluster_set_t,
    cache: *const kvsieve_cache_t,
    seq: u64,
    policy: *const kvsieve_policy_t,
    out_layers: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_set_build", || {
        let s = set_ref(set)?;
        let c = cache_ref(cache)?;
        let p = policy_ref(policy)?;
        let mut guard = s.inner.write();
        let n = guard.build(&c.read(), seq, p)?;
        if !out_layers.is_null() {
            write_out(out_layers, n);
        }
        Ok(())
    })
}

/// Assign the tokens of `seq` that arrived and left the window since the last build or
/// update; `*out_assigned` (optional) receives the tokens assigned per head, summed over
/// layers. All layers or none.
///
/// # Safety
/// 1. `set` and `cache` are NULL or live handles; `out_assigned` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_update(
    set: *mut kvsieve_cluster_set_t,
    cache: *const kvsieve_cache_t,
    seq: u64,
    out_assigned: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_set_update", || {
        let s = set_ref(set)?;
        let c = cache_ref(cache)?;
        let mut guard = s.inner.write();
        let n = guard.update(&c.read(), seq)?;
        if !out_assigned.is_null() {
            write_out(out_assigned, n);
        }
        Ok(())
    })
}

/// Drop every index of `seq`; `*out_removed` (optional) receives how many there were.
///
/// # Safety
/// 1. `set` is NULL or a live handle; `out_removed` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_remove_sequence(
    set: *mut kvsieve_cluster_set_t,
    seq: u64,
    out_removed: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_set_remove_sequence", || {
        let s = set_ref(set)?;
        let n = s.inner.write().remove_sequence(seq);
        if !out_removed.is_null() {
            write_out(out_removed, n);
        }
        Ok(())
    })
}

/// Indexes held and, for (`seq`, `layer`), whether one is built, its covered length
/// (`clustered_len`, 0 when none) and fine clusters per head (0 when none).
///
/// # Safety
/// 1. `set` is NULL or a live handle; each `out_*` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_set_info(
    set: *const kvsieve_cluster_set_t,
    seq: u64,
    layer: usize,
    out_len: *mut usize,
    out_clustered_len: *mut usize,
    out_num_clusters: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_set_info", || {
        let s = set_ref(set)?;
        check_disjoint(
            &[
                Region::of(out_len, 1, "out_len"),
                Region::of(out_clustered_len, 1, "out_clustered_len"),
                Region::of(out_num_clusters, 1, "out_num_clusters"),
            ],
            &[],
        )?;
        let g = s.inner.read();
        let idx = g.get(seq, layer);
        for (ptr, v) in [
            (out_len, g.len()),
            (out_clustered_len, idx.map_or(0, |i| i.clustered_len())),
            (out_num_clusters, idx.map_or(0, |i| i.num_clusters())),
        ] {
            if !ptr.is_null() {
                write_out(ptr, v);
            }
        }
        Ok(())
    })
}

/// Decode under a policy with centroid retrieval from `set`.
///
/// # Safety
/// 1. `cache`, `policy` and `set` are NULL or live handles; `seq_ids` is NULL or readable
///    for `batch` ids; `out_selections` is NULL or writable for `batch` pointers;
///    `out_centroids_scored` and `out_radii_read` are NULL or writable for `batch` values;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_decode`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_decode_with_clusters(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    policy: *const kvsieve_policy_t,
    set: *const kvsieve_cluster_set_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
    out_selections: *mut *mut kvsieve_selection_t,
    out_centroids_scored: *mut usize,
    out_radii_read: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_decode_with_clusters", || {
        let c = cache_ref(cache)?;
        let p = policy_ref(policy)?;
        let s = set_ref(set)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let ids_region = Region::of(seq_ids, batch, "seq_ids");
        let args = AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, vec![ids_region.clone()])?;
        let mut others = args.regions();
        others.push(ids_region);
        check_disjoint(
            &[
                Region::of(out_selections, batch, "out_selections"),
                Region::of(out_centroids_scored, batch, "out_centroids_scored"),
                Region::of(out_radii_read, batch, "out_radii_read"),
            ],
            &others,
        )?;
        let slots = opt_slice_mut(out_selections, batch, "out_selections")?;
        let counts = opt_slice_mut(out_centroids_scored, batch, "out_centroids_scored")?;
        let radii = opt_slice_mut(out_radii_read, batch, "out_radii_read")?;
        let (q, mut out, lse) = args.views()?;
        let set_guard = s.inner.read();
        let sels = c.read().decode_with_clusters(layer, ids, &q, p, &set_guard, &mut out, lse, &args.params)?;
        if let Some(counts) = counts {
            for (b, slot) in counts.iter_mut().enumerate() {
                *slot = sels.get(b).map_or(0, |s| s.centroids_scored);
            }
        }
        if let Some(radii) = radii {
            for (b, slot) in radii.iter_mut().enumerate() {
                *slot = sels.get(b).map_or(0, |s| s.radii_read);
            }
        }
        if let Some(slots) = slots {
            let mut sels = sels.into_iter();
            for slot in slots.iter_mut() {
                *slot = sels.next().map_or(std::ptr::null_mut(), |s| into_handle(s.selection));
            }
        }
        Ok(())
    })
}
