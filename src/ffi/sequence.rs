//! Calls that change a cache's sequences: create, fork, free, append, write, truncate,
//! evict. Each takes the cache's write lock.

use crate::ffi::args::{check_disjoint, non_null, opt_slice, opt_slice_mut, slice, write_out, Region};
use crate::ffi::cache::{cache_ref, kvsieve_cache_t};
use crate::ffi::error::{guard, kvsieve_error_t};
use crate::ffi::tensor::Tensor;

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
    k: *const crate::ffi::kvsieve_tensor_t,
    v: *const crate::ffi::kvsieve_tensor_t,
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
    k: *const crate::ffi::kvsieve_tensor_t,
    v: *const crate::ffi::kvsieve_tensor_t,
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
