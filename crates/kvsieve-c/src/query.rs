//! Read-only queries on a cache: sequence length and positions, the CSR page table, page
//! key bounds, stored keys and values. Each takes the cache's read lock, so they run
//! concurrently with each other and with attention.

use kvsieve::error::{Error, Result};

use super::args::{check_disjoint, non_null, slice, slice_mut, write_out, Region};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, kvsieve_error_t};

fn check_capacity(param: &str, capacity: usize, need: usize, what: &str) -> Result<()> {
    if capacity < need {
        return Err(Error::invalid(param, format!("room for at least {need} values ({what}), got {capacity}")));
    }
    Ok(())
}

/// Tokens held by a sequence.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_seq_len(cache: *const kvsieve_cache_t, seq: u64, out_len: *mut usize) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_seq_len", || {
        let c = cache_ref(cache)?;
        non_null(out_len, "out_len")?;
        let n = c.read().seq_len(seq)?;
        write_out(out_len, n);
        Ok(())
    })
}

/// Original positions of a sequence's tokens, into a caller buffer of `capacity` values.
///
/// # Safety
/// 1. `cache` is NULL or a live handle;
/// 2. `positions` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_positions(
    cache: *const kvsieve_cache_t,
    seq: u64,
    positions: *mut i32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_positions", || {
        let c = cache_ref(cache)?;
        check_disjoint(&[Region::of(positions, capacity, "positions"), Region::of(out_len, 1, "out_len")], &[])?;
        let p = c.read().positions(seq)?;
        check_capacity("capacity", capacity, p.len(), "the sequence's length")?;
        slice_mut(positions, p.len(), "positions")?.copy_from_slice(&p);
        if !out_len.is_null() {
            write_out(out_len, p.len());
        }
        Ok(())
    })
}

/// Number of page ids the page table of a batch holds (`indptr[batch]`).
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
///    `out_num_indices` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_page_table_size(
    cache: *const kvsieve_cache_t,
    seq_ids: *const u64,
    batch: usize,
    out_num_indices: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_page_table_size", || {
        let c = cache_ref(cache)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        non_null(out_num_indices, "out_num_indices")?;
        let t = c.read().page_table(ids)?;
        write_out(out_num_indices, t.indices.len());
        Ok(())
    })
}

/// The CSR page table of a batch of sequences, into caller buffers.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
/// 2. `indptr` is NULL or writable for `batch + 1` values, `last_page_len` for `batch`,
///    `indices` for `indices_capacity`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_page_table(
    cache: *const kvsieve_cache_t,
    seq_ids: *const u64,
    batch: usize,
    indptr: *mut i32,
    indices: *mut i32,
    indices_capacity: usize,
    last_page_len: *mut i32,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_page_table", || {
        let c = cache_ref(cache)?;
        non_null(indptr, "indptr")?;
        let writes = [
            Region::of(indptr, batch.saturating_add(1), "indptr"),
            Region::of(indices, indices_capacity, "indices"),
            Region::of(last_page_len, batch, "last_page_len"),
        ];
        check_disjoint(&writes, &[Region::of(seq_ids, batch, "seq_ids")])?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let t = c.read().page_table(ids)?;
        check_capacity("indices_capacity", indices_capacity, t.indices.len(), "indptr[batch] page ids")?;
        let out_indptr = slice_mut(indptr, t.indptr.len(), "indptr")?;
        let out_indices = slice_mut(indices, t.indices.len(), "indices")?;
        let out_last = slice_mut(last_page_len, t.last_page_len.len(), "last_page_len")?;
        out_indptr.copy_from_slice(&t.indptr);
        out_indices.copy_from_slice(&t.indices);
        out_last.copy_from_slice(&t.last_page_len);
        Ok(())
    })
}

/// Per-channel key min and max of one page of a sequence at a layer.
///
/// # Safety
/// 1. `cache` is NULL or a live handle;
/// 2. `min` and `max` are NULL or writable for `capacity` floats each.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_page_key_bounds(
    cache: *const kvsieve_cache_t,
    seq: u64,
    layer: usize,
    page_index: usize,
    min: *mut f32,
    max: *mut f32,
    capacity: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_page_key_bounds", || {
        let c = cache_ref(cache)?;
        non_null(min, "min")?;
        non_null(max, "max")?;
        check_disjoint(&[Region::of(min, capacity, "min"), Region::of(max, capacity, "max")], &[])?;
        let (lo, hi) = c.read().page_key_bounds(seq, layer, page_index)?;
        check_capacity("capacity", capacity, lo.len(), "num_kv_heads * head_dim")?;
        let (out_min, out_max) = (slice_mut(min, lo.len(), "min")?, slice_mut(max, hi.len(), "max")?);
        out_min.copy_from_slice(&lo);
        out_max.copy_from_slice(&hi);
        Ok(())
    })
}

/// Stored keys and/or values of a sequence at a layer, as f32.
///
/// # Safety
/// 1. `cache` is NULL or a live handle;
/// 2. `keys` and `values` are NULL or writable for `capacity` floats each.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_read(
    cache: *const kvsieve_cache_t,
    seq: u64,
    layer: usize,
    keys: *mut f32,
    values: *mut f32,
    capacity: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_read", || {
        let c = cache_ref(cache)?;
        if keys.is_null() && values.is_null() {
            return Err(Error::NullPointer { param: "keys".into() });
        }
        check_disjoint(&[Region::of(keys, capacity, "keys"), Region::of(values, capacity, "values")], &[])?;
        let (k, v) = {
            let guard = c.read();
            let k = if keys.is_null() { None } else { Some(guard.read_keys(seq, layer)?) };
            let v = if values.is_null() { None } else { Some(guard.read_values(seq, layer)?) };
            (k, v)
        };
        let need = k.as_ref().or(v.as_ref()).map_or(0, |x| x.len());
        check_capacity("capacity", capacity, need, "seq_len * num_kv_heads * head_dim")?;
        let out_k = if keys.is_null() { None } else { Some(slice_mut(keys, need, "keys")?) };
        let out_v = if values.is_null() { None } else { Some(slice_mut(values, need, "values")?) };
        if let (Some(o), Some(k)) = (out_k, k) {
            o.copy_from_slice(&k);
        }
        if let (Some(o), Some(v)) = (out_v, v) {
            o.copy_from_slice(&v);
        }
        Ok(())
    })
}
