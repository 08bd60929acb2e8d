//! Sparse attention on a cache: decode and prefill over caller selections
//! (`kvsieve_cache_decode_sparse`, `kvsieve_cache_prefill_sparse`) and under a policy
//! (`kvsieve_cache_decode_with_policy`, `kvsieve_cache_prefill_with_policy`), plus the
//! per-KV-head prefill windows (`kvsieve_streaming_window_t`) they share with the views.
//! Each takes the cache's read lock.

use std::mem::{align_of, offset_of, size_of};

use kvsieve::attention::StreamingWindow;
use kvsieve::error::{Error, Result};

use super::args::{check_disjoint, opt_slice_mut, slice, Region};
use super::attention::{AttentionArgs, DECODE_DIMS, PREFILL_DIMS};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, kvsieve_error_t};
use super::params::kvsieve_attention_params_t;
use super::policy::{kvsieve_policy_t, policy_ref};
use super::selection::{into_handle, kvsieve_selection_t, selection_list};
use super::tensor::kvsieve_tensor_t;

/// Row mask of one KV head in sparse prefill (see `kvsieve_streaming_window_t` in the
/// header); all zero means no window for that head.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_streaming_window_t {
    pub sinks: usize,
    pub window: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_streaming_window_t>() == 16 && align_of::<kvsieve_streaming_window_t>() == 8);
    assert!(offset_of!(kvsieve_streaming_window_t, window) == 8);
};

/// Per-KV-head windows from a caller array of `n` entries (NULL only when `n` is 0): an
/// entry with `window` 0 is no window for its head, and then `sinks` must be 0 too.
///
/// # Safety
/// 1. `ptr` is NULL or readable for `n` entries during the call.
pub(crate) unsafe fn windows(ptr: *const kvsieve_streaming_window_t, n: usize) -> Result<Vec<Option<StreamingWindow>>> {
    let entries = slice(ptr, n, "windows")?;
    entries
        .iter()
        .enumerate()
        .map(|(h, w)| match (w.sinks, w.window) {
            (0, 0) => Ok(None),
            (s, 0) => Err(Error::invalid(
                format!("windows[{h}].sinks"),
                format!("0 when windows[{h}].window is 0 (an entry with window 0 means no window for that KV head), got {s}"),
            )),
            (sinks, window) => Ok(Some(StreamingWindow { sinks, window })),
        })
        .collect()
}

/// Sparse decode: KV head `h` of `seq_ids[b]` reads only `selections[b]`'s head `h`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
///    `selections` is NULL or readable for `batch` handles, each NULL or live;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_decode`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_decode_sparse(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    selections: *const *const kvsieve_selection_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_decode_sparse", || {
        let c = cache_ref(cache)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let sels = selection_list(selections, batch, "selections")?;
        let reads = vec![Region::of(seq_ids, batch, "seq_ids"), Region::of(selections, batch, "selections")];
        let args = AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        c.read().decode_sparse(layer, ids, &q, &sels, &mut out, lse, &args.params)
    })
}

/// Sparse causal prefill: as `kvsieve_cache_prefill`, each KV head reading only its
/// selection, further limited per query row by `windows`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
///    `qo_indptr` is NULL or readable for `batch + 1` values; `selections` is NULL or
///    readable for `batch` handles, each NULL or live; `windows` is NULL or readable for
///    `num_windows` entries;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_prefill`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_prefill_sparse(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    selections: *const *const kvsieve_selection_t,
    windows: *const kvsieve_streaming_window_t,
    num_windows: usize,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_prefill_sparse", || {
        let c = cache_ref(cache)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let indptr_len = batch.saturating_add(1);
        let qo = slice(qo_indptr, indptr_len, "qo_indptr")?;
        let sels = selection_list(selections, batch, "selections")?;
        let wins = self::windows(windows, num_windows)?;
        let reads = vec![
            Region::of(seq_ids, batch, "seq_ids"),
            Region::of(qo_indptr, indptr_len, "qo_indptr"),
            Region::of(selections, batch, "selections"),
            Region::of(windows, num_windows, "windows"),
        ];
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        c.read().prefill_sparse(layer, ids, &q, qo, &sels, &wins, &mut out, lse, &args.params)
    })
}

/// Decode under a policy; `out_selections`, if given, receives one new selection handle per
/// sequence (all NULL for a layer whose heads are all dense).
///
/// # Safety
/// 1. `cache` and `policy` are NULL or live handles; `seq_ids` is NULL or readable for
///    `batch` ids; `out_selections` is NULL or writable for `batch` pointers;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_decode`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_decode_with_policy(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    policy: *const kvsieve_policy_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
    out_selections: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_decode_with_policy", || {
        let c = cache_ref(cache)?;
        let p = policy_ref(policy)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let ids_region = Region::of(seq_ids, batch, "seq_ids");
        let args = AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, vec![ids_region.clone()])?;
        let mut others = args.regions();
        others.push(ids_region);
        check_disjoint(&[Region::of(out_selections, batch, "out_selections")], &others)?;
        let slots = opt_slice_mut(out_selections, batch, "out_selections")?;
        let (q, mut out, lse) = args.views()?;
        let sels = c.read().decode_with_policy(layer, ids, &q, p, &mut out, lse, &args.params)?;
        if let Some(slots) = slots {
            let mut sels = sels.into_iter();
            for slot in slots.iter_mut() {
                *slot = sels.next().map_or(std::ptr::null_mut(), into_handle);
            }
        }
        Ok(())
    })
}

/// Causal prefill under a policy.
///
/// # Safety
/// 1. `cache` and `policy` are NULL or live handles; `seq_ids` is NULL or readable for
///    `batch` ids; `qo_indptr` is NULL or readable for `batch + 1` values;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_prefill`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_prefill_with_policy(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    policy: *const kvsieve_policy_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_prefill_with_policy", || {
        let c = cache_ref(cache)?;
        let p = policy_ref(policy)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let indptr_len = batch.saturating_add(1);
        let qo = slice(qo_indptr, indptr_len, "qo_indptr")?;
        let reads = vec![Region::of(seq_ids, batch, "seq_ids"), Region::of(qo_indptr, indptr_len, "qo_indptr")];
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        c.read().prefill_with_policy(layer, ids, &q, qo, p, &mut out, lse, &args.params)
    })
}
