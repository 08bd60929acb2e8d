//! `policy.h`: the policy handle (`kvsieve_policy_t`), a [`Policy`] parsed from its text
//! form, printed back in canonical form, checked against a model, asked for a layer's
//! position mode and for the tokens it selects on a cache (`kvsieve_policy_select`);
//! attention under a policy (`kvsieve_cache_decode_with_policy`,
//! `kvsieve_cache_prefill_with_policy`, under the cache's read lock); and eviction of what
//! a policy never reads again (`kvsieve_cache_evict_for_policy`, under its write lock).
//! A policy never changes after it is parsed, so one handle may be read from any number of
//! threads at once.

use std::ffi::{c_char, CStr};

use kvsieve::attention::PositionMode;
use kvsieve::error::{Error, Result};
use kvsieve::select::Policy;

use super::args::{check_disjoint, non_null, opt_slice_mut, slice, slice_mut, write_out, Region};
use super::attention::{AttentionArgs, DECODE_DIMS, PREFILL_DIMS};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, guard_value, kvsieve_error_t};
use super::params::{kvsieve_attention_params_t, POSITIONS_CAPPED, POSITIONS_CONTIGUOUS, POSITIONS_ORIGINAL};
use super::selection::{into_handle, kvsieve_selection_t};
use super::tensor::{kvsieve_tensor_t, parse_query};

/// A selection policy for every (layer, KV head) of a model (see `kvsieve_policy_t` in the
/// header). Immutable once parsed.
#[allow(non_camel_case_types)]
pub struct kvsieve_policy_t {
    inner: Policy,
}

/// The policy behind a handle, or `NullPointer` naming `policy`.
///
/// # Safety
/// 1. `policy` is NULL or a live handle from `kvsieve_policy_parse`, not freed while `'a` lasts.
pub(crate) unsafe fn policy_ref<'a>(policy: *const kvsieve_policy_t) -> Result<&'a Policy> {
    non_null(policy, "policy")?;
    if !(policy as usize).is_multiple_of(std::mem::align_of::<kvsieve_policy_t>()) {
        return Err(Error::invalid("policy", "a handle returned by kvsieve_policy_parse"));
    }
    Ok(&(*policy).inner)
}

/// Parse a policy from NUL-terminated UTF-8 text; `*out` receives the handle.
///
/// # Safety
/// 1. `text` is NULL or a readable NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_parse(
    text: *const c_char,
    out: *mut *mut kvsieve_policy_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_policy_parse", || {
        non_null(text, "text")?;
        non_null(out, "out")?;
        let bytes = CStr::from_ptr(text).to_bytes();
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Parse {
            offset: e.valid_up_to(),
            message: "expected UTF-8 text, found a byte that is not valid UTF-8 here".into(),
        })?;
        let policy = Policy::parse(text)?;
        write_out(out, Box::into_raw(Box::new(kvsieve_policy_t { inner: policy })));
        Ok(())
    })
}

/// Free a policy. NULL is ignored.
///
/// # Safety
/// 1. `policy` is NULL or a live handle, freed once, with no call on it running or to come.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_free(policy: *mut kvsieve_policy_t) {
    guard_value((), || {
        if !policy.is_null() {
            drop(Box::from_raw(policy));
        }
    })
}

/// The canonical text form into a caller buffer, NUL-terminated; `*out_size` receives the
/// bytes it needs including the NUL. With `buf` NULL, only the size is reported.
///
/// # Safety
/// 1. `policy` is NULL or a live handle;
/// 2. `buf` is NULL or writable for `capacity` bytes; `out_size` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_to_string(
    policy: *const kvsieve_policy_t,
    buf: *mut c_char,
    capacity: usize,
    out_size: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_policy_to_string", || {
        let p = policy_ref(policy)?;
        if buf.is_null() {
            non_null(out_size, "out_size")?;
        }
        let text = p.to_string();
        let size = text.len() + 1;
        if !buf.is_null() {
            check_disjoint(&[Region::of(buf, capacity, "buf"), Region::of(out_size, 1, "out_size")], &[])?;
            if capacity < size {
                return Err(Error::invalid(
                    "capacity",
                    format!("room for at least {size} bytes (the text and its NUL), got {capacity}"),
                ));
            }
            let dst = slice_mut(buf as *mut u8, size, "buf")?;
            dst[..text.len()].copy_from_slice(text.as_bytes());
            dst[text.len()] = 0;
        }
        if !out_size.is_null() {
            write_out(out_size, size);
        }
        Ok(())
    })
}

/// Check a policy against a model of `num_layers` layers and `num_kv_heads` KV heads.
///
/// # Safety
/// 1. `policy` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_validate(
    policy: *const kvsieve_policy_t,
    num_layers: usize,
    num_kv_heads: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_policy_validate", || policy_ref(policy)?.validate(num_layers, num_kv_heads))
}

/// The position mode attention uses at `layer` (`KVSIEVE_POSITIONS_*`), and its cap.
///
/// # Safety
/// 1. `policy` is NULL or a live handle; `out_mode` is NULL or writable;
///    `out_max_distance` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_position_mode(
    policy: *const kvsieve_policy_t,
    layer: usize,
    out_mode: *mut u32,
    out_max_distance: *mut u32,
) -> *mut kvsieve_error_t {
    guard("kvsieve_policy_position_mode", || {
        let p = policy_ref(policy)?;
        non_null(out_mode, "out_mode")?;
        check_disjoint(
            &[Region::of(out_mode, 1, "out_mode"), Region::of(out_max_distance, 1, "out_max_distance")],
            &[],
        )?;
        let (mode, cap) = match p.position_mode(layer) {
            PositionMode::Original => (POSITIONS_ORIGINAL, 0),
            PositionMode::Contiguous => (POSITIONS_CONTIGUOUS, 0),
            PositionMode::Capped { max_distance } => (POSITIONS_CAPPED, max_distance),
        };
        write_out(out_mode, mode);
        if !out_max_distance.is_null() {
            write_out(out_max_distance, cap);
        }
        Ok(())
    })
}

/// The tokens a policy selects for each KV head of `layer` for the decode query `q`.
///
/// # Safety
/// 1. `policy` and `cache` are NULL or live handles;
/// 2. `q` is NULL or a valid descriptor whose data is not written during the call;
/// 3. `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_policy_select(
    policy: *const kvsieve_policy_t,
    cache: *const kvsieve_cache_t,
    seq: u64,
    layer: usize,
    q: *const kvsieve_tensor_t,
    out: *mut *mut kvsieve_selection_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_policy_select", || {
        let p = policy_ref(policy)?;
        let c = cache_ref(cache)?;
        non_null(out, "out")?;
        let q = parse_query(q, "q")?.view()?;
        let sel = p.select(&c.read(), seq, layer, &q)?;
        write_out(out, into_handle(sel));
        Ok(())
    })
}

// Attention under a policy ----------------------------------------------------------------

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

// Memory under a policy -------------------------------------------------------------------

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
