//! Calls that change a cache's sequences: create, fork, free, append, write, truncate,
//! evict (pages, or what a policy no longer reads), compact. Each takes the cache's write lock.

use kvsieve::error::{Error, Result};
use kvsieve::kv::KeepTokens;

use super::args::{check_disjoint, non_null, opt_slice, opt_slice_mut, slice, write_out, Region};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, kvsieve_error_t};
use super::policy::{kvsieve_policy_t, policy_ref};
use super::tensor::Tensor;

const KV_DIMS: [&str; 3] = ["n", "num_kv_heads", "head_dim"];

/// Create an empty sequence; `*out_seq` receives its id.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out_seq` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_create_sequence(cache: *mut kvsieve_cache_t, out_seq: *mut u64) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_create_sequence", || {
        let c = cache_ref(cache)?;
        non_null(out_seq, "out_seq")?;
        let id = c.write().create_sequence();
        write_out(out_seq, id);
        Ok(())
    })
}

/// Fork a sequence (the new one shares all of `seq`'s pages); `*out_seq` receives its id.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out_seq` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_fork(cache: *mut kvsieve_cache_t, seq: u64, out_seq: *mut u64) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_fork", || {
        let c = cache_ref(cache)?;
        non_null(out_seq, "out_seq")?;
        let id = c.write().fork(seq)?;
        write_out(out_seq, id);
        Ok(())
    })
}

/// Drop a sequence.
///
/// # Safety
/// 1. `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_free_sequence(cache: *mut kvsieve_cache_t, seq: u64) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_free_sequence", || cache_ref(cache)?.write().free_sequence(seq))
}

/// Append `n` token slots to a sequence, with optional positions and slot mapping.
///
/// # Safety
/// 1. `cache` is NULL or a live handle;
/// 2. `positions` is NULL or readable for `n` values; `out_slots` is NULL or writable for `n`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_append(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    n: usize,
    positions: *const i32,
    out_slots: *mut i64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_append", || {
        let c = cache_ref(cache)?;
        check_disjoint(&[Region::of(out_slots, n, "out_slots")], &[Region::of(positions, n, "positions")])?;
        let positions = opt_slice(positions, n, "positions")?;
        let out_slots = opt_slice_mut(out_slots, n, "out_slots")?;
        let slots = c.write().append(seq, n, positions)?;
        if let Some(o) = out_slots {
            o.copy_from_slice(&slots);
        }
        Ok(())
    })
}

/// Write K and V of one layer for tokens `start..start + n` of a sequence.
///
/// # Safety
/// 1. `cache` is NULL or a live handle;
/// 2. `k` and `v` are NULL or valid descriptors whose data is readable and not written
///    during the call.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_write(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    layer: usize,
    start: usize,
    k: *const super::kvsieve_tensor_t,
    v: *const super::kvsieve_tensor_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_write", || {
        let c = cache_ref(cache)?;
        let (k, v) = (Tensor::parse(k, "k", &KV_DIMS)?, Tensor::parse(v, "v", &KV_DIMS)?);
        let (k, v) = (k.view()?, v.view()?);
        c.write().write(seq, layer, start, &k, &v)
    })
}

/// Write K and V of one layer into slots returned by `kvsieve_cache_append`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `slots` is NULL or readable for `num_slots` values;
/// 2. `k` and `v` are NULL or valid descriptors whose data is readable and not written
///    during the call.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_write_slots(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    layer: usize,
    slots: *const i64,
    num_slots: usize,
    k: *const super::kvsieve_tensor_t,
    v: *const super::kvsieve_tensor_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_write_slots", || {
        let c = cache_ref(cache)?;
        let slots = slice(slots, num_slots, "slots")?;
        let (k, v) = (Tensor::parse(k, "k", &KV_DIMS)?, Tensor::parse(v, "v", &KV_DIMS)?);
        let (k, v) = (k.view()?, v.view()?);
        c.write().write_slots(seq, layer, slots, &k, &v)
    })
}

/// Keep the first `new_len` tokens of a sequence.
///
/// # Safety
/// 1. `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_truncate(cache: *mut kvsieve_cache_t, seq: u64, new_len: usize) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_truncate", || cache_ref(cache)?.write().truncate(seq, new_len))
}

/// Evict whole pages (indices into the sequence's page list, strictly increasing).
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `page_indices` is NULL or readable for
///    `num_page_indices` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_evict_pages(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    page_indices: *const usize,
    num_page_indices: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_evict_pages", || {
        let c = cache_ref(cache)?;
        let pages = slice(page_indices, num_page_indices, "page_indices")?;
        c.write().evict_pages(seq, pages)
    })
}

/// `KVSIEVE_KEEP_ALL`: one token list for every layer and KV head.
pub const KEEP_ALL: u32 = 0;
/// `KVSIEVE_KEEP_PER_LAYER`: one token list per layer.
pub const KEEP_PER_LAYER: u32 = 1;
/// `KVSIEVE_KEEP_PER_HEAD`: one token list per (layer, KV head), layer-major.
pub const KEEP_PER_HEAD: u32 = 2;

/// Evict the pages of a sequence that a policy never reads again; `*out_pages_evicted`
/// (optional) receives their number.
///
/// # Safety
/// 1. `cache` and `policy` are NULL or live handles; `out_pages_evicted` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_evict_for_policy(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    policy: *const kvsieve_policy_t,
    out_pages_evicted: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_evict_for_policy", || {
        let c = cache_ref(cache)?;
        let p = policy_ref(policy)?;
        let n = c.write().evict_for_policy(seq, p)?;
        if !out_pages_evicted.is_null() {
            write_out(out_pages_evicted, n);
        }
        Ok(())
    })
}

/// The token lists of `kvsieve_cache_compact`: list `i` is
/// `keep[keep_indptr[i]..keep_indptr[i + 1]]`.
pub(crate) fn keep_lists(indptr: &[u32], keep: &[u32]) -> Result<Vec<Vec<u32>>> {
    if indptr[0] != 0 {
        return Err(Error::invalid("keep_indptr", format!("keep_indptr[0] == 0, got {}", indptr[0])));
    }
    for i in 1..indptr.len() {
        if indptr[i] < indptr[i - 1] {
            return Err(Error::invalid(
                "keep_indptr",
                format!("non-decreasing offsets, but keep_indptr[{i}] = {} is less than keep_indptr[{}] = {}", indptr[i], i - 1, indptr[i - 1]),
            ));
        }
    }
    let last = indptr.len() - 1;
    if indptr[last] as usize != keep.len() {
        return Err(Error::invalid("keep_indptr", format!("keep_indptr[{last}] == keep_len = {}, got {}", keep.len(), indptr[last])));
    }
    Ok(indptr.windows(2).map(|w| keep[w[0] as usize..w[1] as usize].to_vec()).collect())
}

/// Keep only the listed tokens of a sequence, moved into fresh pages.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `keep_indptr` is NULL or readable for
///    `num_lists + 1` values; `keep` is NULL or readable for `keep_len` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_compact(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    kind: u32,
    keep_indptr: *const u32,
    num_lists: usize,
    keep: *const u32,
    keep_len: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_compact", || {
        let c = cache_ref(cache)?;
        let lists = compact_lists(kind, keep_indptr, num_lists, keep, keep_len)?;
        let mut g = c.write();
        let cfg = *g.config();
        let keep = keep_tokens(kind, &lists, &cfg)?;
        g.compact(seq, keep)
    })
}

/// The token lists of a compaction call (`kind` checked, the CSR read and checked).
///
/// # Safety
/// `keep_indptr` NULL or readable for `num_lists + 1` values; `keep` NULL or readable for
/// `keep_len` values.
pub(crate) unsafe fn compact_lists(kind: u32, keep_indptr: *const u32, num_lists: usize, keep: *const u32, keep_len: usize) -> Result<Vec<Vec<u32>>> {
    if kind > KEEP_PER_HEAD {
        return Err(Error::invalid("kind", format!("KVSIEVE_KEEP_ALL (0), KVSIEVE_KEEP_PER_LAYER (1) or KVSIEVE_KEEP_PER_HEAD (2), got {kind}")));
    }
    non_null(keep_indptr, "keep_indptr")?;
    let indptr_len = num_lists.checked_add(1).ok_or_else(|| Error::invalid("num_lists", "a count that fits in memory"))?;
    let indptr = slice(keep_indptr, indptr_len, "keep_indptr")?;
    keep_lists(indptr, slice(keep, keep_len, "keep")?)
}

/// `lists` as the `KeepTokens` of `kind` for a cache of `cfg` (the list count checked).
pub(crate) fn keep_tokens<'a>(kind: u32, lists: &'a [Vec<u32>], cfg: &kvsieve::CacheConfig) -> Result<KeepTokens<'a>> {
    let (want, what) = match kind {
        KEEP_ALL => (1, "1 (KVSIEVE_KEEP_ALL)".to_string()),
        KEEP_PER_LAYER => (cfg.num_layers, format!("num_layers = {} (KVSIEVE_KEEP_PER_LAYER)", cfg.num_layers)),
        _ => {
            let n = cfg.num_layers * cfg.num_kv_heads;
            (n, format!("num_layers * num_kv_heads = {n} (KVSIEVE_KEEP_PER_HEAD)"))
        }
    };
    if lists.len() != want {
        return Err(Error::invalid("num_lists", format!("{what}, got {}", lists.len())));
    }
    Ok(match kind {
        KEEP_ALL => KeepTokens::All(&lists[0]),
        KEEP_PER_LAYER => KeepTokens::PerLayer(lists),
        _ => KeepTokens::PerHead(lists),
    })
}
