//! `selection.h`: the selection handle (`kvsieve_selection_t`), a [`Selection`] made from
//! CSR arrays, dense, one list for all heads, sinks + window or the Λ-mask; its inspection
//! (shape, CSR arrays, one head's tokens, statistics), union and intersection; and
//! page-bound (Quest) selection on a cache (`kvsieve_selection_page_bounds`, under the
//! cache's read lock). A selection never changes after it is made, so one handle may be
//! read from any number of threads at once.

use std::mem::{align_of, offset_of, size_of};

use kvsieve::error::{Error, Result};
use kvsieve::select::{lambda, page_bounds, streaming, PageBoundsConfig, Selection};

use super::args::{
    check_capacity, check_disjoint, copy_array, non_null, opt_slice_mut, read_versioned, sizes_are_valid, slice,
    slice_mut, write_out, Region, Versioned, VersionedOut,
};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, guard_value, kvsieve_error_t};
use super::tensor::{kvsieve_tensor_t, parse_query};

/// Tokens each KV head of one (sequence, layer) reads (see `kvsieve_selection_t` in the
/// header). Immutable once made.
#[allow(non_camel_case_types)]
pub struct kvsieve_selection_t {
    inner: Selection,
}

/// Kept-token counts of a selection (see `kvsieve_selection_stats_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kvsieve_selection_stats_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub seq_len: usize,
    pub num_kv_heads: usize,
    pub total: usize,
    pub density: f64,
    pub min_density: f64,
    pub max_density: f64,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_selection_stats_t>() == 56 && align_of::<kvsieve_selection_stats_t>() == 8);
    assert!(offset_of!(kvsieve_selection_stats_t, seq_len) == 8);
    assert!(offset_of!(kvsieve_selection_stats_t, num_kv_heads) == 16);
    assert!(offset_of!(kvsieve_selection_stats_t, total) == 24);
    assert!(offset_of!(kvsieve_selection_stats_t, density) == 32);
    assert!(offset_of!(kvsieve_selection_stats_t, min_density) == 40);
    assert!(offset_of!(kvsieve_selection_stats_t, max_density) == 48);
};

const _: () =
    assert!(offset_of!(kvsieve_selection_stats_t, struct_size) == 0 && sizes_are_valid::<kvsieve_selection_stats_t>());

impl kvsieve_selection_stats_t {
    /// What the header's `kvsieve_selection_stats_init()` gives: zeros, `struct_size` this
    /// layout's.
    pub fn init() -> Self {
        kvsieve_selection_stats_t {
            struct_size: size_of::<Self>(),
            seq_len: 0,
            num_kv_heads: 0,
            total: 0,
            density: 0.0,
            min_density: 0.0,
            max_density: 0.0,
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_selection_stats_t {
    const NAME: &'static str = "kvsieve_selection_stats_t";
    const INIT: &'static str = "kvsieve_selection_stats_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

/// Settings of page-bound selection (see `kvsieve_page_bounds_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_page_bounds_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub budget_tokens: usize,
    pub min_pages: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_page_bounds_config_t>() == 24 && align_of::<kvsieve_page_bounds_config_t>() == 8);
    assert!(offset_of!(kvsieve_page_bounds_config_t, budget_tokens) == 8);
    assert!(offset_of!(kvsieve_page_bounds_config_t, min_pages) == 16);
};

const _: () = assert!(
    offset_of!(kvsieve_page_bounds_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_page_bounds_config_t>()
);

impl kvsieve_page_bounds_config_t {
    /// What the header's `kvsieve_page_bounds_config_init()` gives: zeros (`budget_tokens`
    /// must still be set), `struct_size` this layout's.
    pub fn init() -> Self {
        kvsieve_page_bounds_config_t { struct_size: size_of::<Self>(), budget_tokens: 0, min_pages: 0 }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_page_bounds_config_t {
    const NAME: &'static str = "kvsieve_page_bounds_config_t";
    const INIT: &'static str = "kvsieve_page_bounds_config_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

/// The selection behind a handle, or `NullPointer` naming `param`.
///
/// # Safety
/// 1. `sel` is NULL or a live handle returned by kvsieve, not freed while `'a` lasts.
pub(crate) unsafe fn selection_ref<'a>(sel: *const kvsieve_selection_t, param: &str) -> Result<&'a Selection> {
    non_null(sel, param)?;
    if !(sel as usize).is_multiple_of(align_of::<kvsieve_selection_t>()) {
        return Err(Error::invalid(param, "a selection handle returned by kvsieve"));
    }
    Ok(&(*sel).inner)
}

/// An array of `n` selection handles, each required.
///
/// # Safety
/// 1. `ptr` is NULL or readable for `n` pointers, each NULL or a live handle, for `'a`.
pub(crate) unsafe fn selection_list<'a>(
    ptr: *const *const kvsieve_selection_t,
    n: usize,
    param: &str,
) -> Result<Vec<&'a Selection>> {
    non_null(ptr, param)?;
    let handles = slice(ptr, n, param)?;
    handles.iter().enumerate().map(|(i, &h)| selection_ref(h, &format!("{param}[{i}]"))).collect()
}

/// A new handle owned by the caller.
pub(crate) fn into_handle(sel: Selection) -> *mut kvsieve_selection_t {
    Box::into_raw(Box::new(kvsieve_selection_t { inner: sel }))
}

/// Run a constructor and hand its result out through `out`.
///
/// # Safety
/// 1. `out` is NULL or writable for one pointer.
unsafe fn make(out: *mut *mut kvsieve_selection_t, f: impl FnOnce() -> Result<Selection>) -> Result<()> {
    non_null(out, "out")?;
    let sel = f()?;
    write_out(out, into_handle(sel));
    Ok(())
}

/// A selection from its CSR arrays (copied).
///
/// # Safety
/// 1. `head_indptr` is NULL or readable for `head_indptr_len` values, `indices` for `nnz`;
/// 2. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_from_csr(
    seq_len: usize,
    head_indptr: *const u32,
    head_indptr_len: usize,
    indices: *const u32,
    nnz: usize,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_from_csr", || {
        non_null(head_indptr, "head_indptr")?;
        let indptr = slice(head_indptr, head_indptr_len, "head_indptr")?;
        let idx = slice(indices, nnz, "indices")?;
        make(out, || Selection::from_csr(seq_len, copy_array(indptr, "head_indptr")?, copy_array(idx, "indices")?))
    })
}

/// Every token for every head.
///
/// # Safety
/// 1. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_dense(
    num_kv_heads: usize,
    seq_len: usize,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_dense", || make(out, || Selection::dense(num_kv_heads, seq_len)))
}

/// The same token list (copied) for every head.
///
/// # Safety
/// 1. `indices` is NULL or readable for `num_indices` values; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_same_for_all_heads(
    num_kv_heads: usize,
    seq_len: usize,
    indices: *const u32,
    num_indices: usize,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_same_for_all_heads", || {
        let t = slice(indices, num_indices, "indices")?;
        make(out, || Selection::same_for_all_heads(num_kv_heads, seq_len, copy_array(t, "indices")?))
    })
}

/// StreamingLLM: the first `sinks` tokens and the last `window` for every head.
///
/// # Safety
/// 1. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_streaming(
    num_kv_heads: usize,
    seq_len: usize,
    sinks: usize,
    window: usize,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_streaming", || make(out, || streaming(num_kv_heads, seq_len, sinks, window)))
}

/// LM-Infinite's Λ-mask for the last query: the first `global` and the last `local` tokens.
///
/// # Safety
/// 1. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_lambda(
    num_kv_heads: usize,
    seq_len: usize,
    global: usize,
    local: usize,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_lambda", || make(out, || lambda(num_kv_heads, seq_len, global, local)))
}

/// Per head, the tokens of either selection.
///
/// # Safety
/// 1. `selection` and `other` are NULL or live handles; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_union(
    selection: *const kvsieve_selection_t,
    other: *const kvsieve_selection_t,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_union", || {
        let (a, b) = (selection_ref(selection, "selection")?, selection_ref(other, "other")?);
        make(out, || a.union(b))
    })
}

/// Per head, the tokens of both selections.
///
/// # Safety
/// 1. `selection` and `other` are NULL or live handles; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_intersection(
    selection: *const kvsieve_selection_t,
    other: *const kvsieve_selection_t,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_intersection", || {
        let (a, b) = (selection_ref(selection, "selection")?, selection_ref(other, "other")?);
        make(out, || a.intersection(b))
    })
}

/// Free a selection. NULL is ignored.
///
/// # Safety
/// 1. `selection` is NULL or a live handle, freed once, with no call on it running or to come.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_free(selection: *mut kvsieve_selection_t) {
    guard_value((), || {
        if !selection.is_null() {
            drop(Box::from_raw(selection));
        }
    })
}

/// Read one number of a selection into `out`.
///
/// # Safety
/// 1. `selection` is NULL or a live handle; `out` is NULL or writable.
unsafe fn get(
    selection: *const kvsieve_selection_t,
    out: *mut usize,
    f: impl FnOnce(&Selection) -> usize,
) -> Result<()> {
    let s = selection_ref(selection, "selection")?;
    non_null(out, "out")?;
    write_out(out, f(s));
    Ok(())
}

/// Number of KV heads.
///
/// # Safety
/// 1. `selection` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_num_kv_heads(
    selection: *const kvsieve_selection_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_num_kv_heads", || get(selection, out, Selection::num_kv_heads))
}

/// Tokens in the sequence the selection was made for.
///
/// # Safety
/// 1. `selection` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_seq_len(
    selection: *const kvsieve_selection_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_seq_len", || get(selection, out, Selection::seq_len))
}

/// Selected tokens summed over heads (the length of the indices array).
///
/// # Safety
/// 1. `selection` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_len(
    selection: *const kvsieve_selection_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_len", || get(selection, out, Selection::len))
}

/// Copy `values` into the caller buffer `buf` (named `name`) of `capacity` values (too
/// small: an error naming `capacity`, nothing written), and their count into `out_len` if
/// given.
///
/// # Safety
/// 1. `buf` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
unsafe fn copy_out(
    values: &[u32],
    buf: *mut u32,
    name: &str,
    capacity: usize,
    out_len: *mut usize,
    what: &str,
) -> Result<()> {
    check_disjoint(&[Region::of(buf, capacity, name), Region::of(out_len, 1, "out_len")], &[])?;
    check_capacity("capacity", capacity, values.len(), what)?;
    slice_mut(buf, values.len(), name)?.copy_from_slice(values);
    if !out_len.is_null() {
        write_out(out_len, values.len());
    }
    Ok(())
}

/// The CSR offsets, `num_kv_heads + 1` values.
///
/// # Safety
/// 1. `selection` is NULL or a live handle;
/// 2. `head_indptr` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_head_indptr(
    selection: *const kvsieve_selection_t,
    head_indptr: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_head_indptr", || {
        let s = selection_ref(selection, "selection")?;
        copy_out(s.head_indptr(), head_indptr, "head_indptr", capacity, out_len, "num_kv_heads + 1")
    })
}

/// Every head's token indices, concatenated in head order.
///
/// # Safety
/// 1. `selection` is NULL or a live handle;
/// 2. `indices` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_indices(
    selection: *const kvsieve_selection_t,
    indices: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_indices", || {
        let s = selection_ref(selection, "selection")?;
        copy_out(s.indices(), indices, "indices", capacity, out_len, "the selection's length")
    })
}

/// The token indices KV head `head` reads.
///
/// # Safety
/// 1. `selection` is NULL or a live handle;
/// 2. `indices` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_head(
    selection: *const kvsieve_selection_t,
    head: usize,
    indices: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_head", || {
        let s = selection_ref(selection, "selection")?;
        let hk = s.num_kv_heads();
        if head >= hk {
            return Err(Error::out_of_range("head", head as i64, format!("0..{hk} (the selection's KV heads)")));
        }
        copy_out(s.head(head), indices, "indices", capacity, out_len, "the head's selected tokens")
    })
}

/// Kept-token counts and densities, and optionally the count of every head.
///
/// # Safety
/// 1. `selection` is NULL or a live handle; `out` is NULL or writable for its `struct_size`;
/// 2. `per_head` is NULL or writable for `per_head_capacity` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_stats(
    selection: *const kvsieve_selection_t,
    out: *mut kvsieve_selection_stats_t,
    per_head: *mut usize,
    per_head_capacity: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_stats", || {
        let s = selection_ref(selection, "selection")?;
        let out = VersionedOut::new(out, "out")?;
        let hk = s.num_kv_heads();
        check_disjoint(&[out.region("out"), Region::of(per_head, per_head_capacity, "per_head")], &[])?;
        if !per_head.is_null() {
            check_capacity("per_head_capacity", per_head_capacity, hk, "num_kv_heads")?;
        }
        let st = s.stats();
        if let Some(buf) = opt_slice_mut(per_head, hk, "per_head")? {
            buf.copy_from_slice(&st.per_head);
        }
        out.write(kvsieve_selection_stats_t {
            struct_size: size_of::<kvsieve_selection_stats_t>(),
            seq_len: st.seq_len,
            num_kv_heads: hk,
            total: st.total,
            density: st.density,
            min_density: st.min_density,
            max_density: st.max_density,
        });
        Ok(())
    })
}

/// Page-bound (Quest) selection for the decode query `q` of sequence `seq` at `layer`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `config` is NULL or readable for its `struct_size`;
/// 2. `q` is NULL or a valid descriptor whose data is not written during the call;
/// 3. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_selection_page_bounds(
    cache: *const kvsieve_cache_t,
    seq: u64,
    layer: usize,
    q: *const kvsieve_tensor_t,
    config: *const kvsieve_page_bounds_config_t,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_selection_page_bounds", || {
        let c = cache_ref(cache)?;
        let cfg = read_versioned(config, "config")?;
        non_null(out, "out")?;
        let q = parse_query(q, "q")?.view()?;
        let cfg = PageBoundsConfig { budget_tokens: cfg.budget_tokens, min_pages: cfg.min_pages };
        let sel = page_bounds(&c.read(), seq, layer, &q, &cfg)?;
        write_out(out, into_handle(sel));
        Ok(())
    })
}

/// Spans: ranked hit tokens grown into spans of their neighbours, to a budget.
///
/// # Safety
/// `hits` readable for `num_hits` values and `read_anyway` for `num_read_anyway` (each NULL
/// only with a count of 0); `out` NULL or writable for `capacity` values; `out_len` NULL or
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvsieve_expand_spans(
    hits: *const u32,
    num_hits: usize,
    span: usize,
    budget: usize,
    seq_len: usize,
    read_anyway: *const u32,
    num_read_anyway: usize,
    out: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_expand_spans", || {
        check_disjoint(
            &[Region::of(out, capacity, "out"), Region::of(out_len, 1, "out_len")],
            &[Region::of(hits, num_hits, "hits"), Region::of(read_anyway, num_read_anyway, "read_anyway")],
        )?;
        if span == 0 {
            return Err(Error::invalid("span", "at least 1 token"));
        }
        let h = slice(hits, num_hits, "hits")?;
        let anyway = slice(read_anyway, num_read_anyway, "read_anyway")?;
        if anyway.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("read_anyway", "strictly ascending token indices"));
        }
        let buf = slice_mut(out, capacity, "out")?;
        let got = kvsieve::select::expand_spans(h, span, budget, seq_len, anyway)?;
        check_capacity("capacity", capacity, got.len(), "the tokens taken")?;
        buf[..got.len()].copy_from_slice(&got);
        if !out_len.is_null() {
            *out_len = got.len();
        }
        Ok(())
    })
}
