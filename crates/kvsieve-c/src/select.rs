//! Selection methods that read a cache: page-bound selection (`kvsieve_selection_page_bounds`)
//! and a policy's selection for a decode query (`kvsieve_policy_select`). Both take the
//! cache's read lock and return a new selection handle.

use std::mem::{align_of, offset_of, size_of};

use kvsieve::error::Result;
use kvsieve::select::{page_bounds, PageBoundsConfig};

use super::args::{non_null, read_struct, write_out};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, kvsieve_error_t};
use super::policy::{kvsieve_policy_t, policy_ref};
use super::selection::{into_handle, kvsieve_selection_t};
use super::tensor::{kvsieve_tensor_t, Tensor};

/// Settings of page-bound selection (see `kvsieve_page_bounds_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_page_bounds_config_t {
    pub budget_tokens: usize,
    pub min_pages: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_page_bounds_config_t>() == 16 && align_of::<kvsieve_page_bounds_config_t>() == 8);
    assert!(offset_of!(kvsieve_page_bounds_config_t, min_pages) == 8);
};

/// A decode query of one sequence named `name`: `[num_qo_heads, head_dim]` or
/// `[1, num_qo_heads, head_dim]`.
///
/// # Safety
/// As for [`Tensor::parse`].
pub(crate) unsafe fn parse_query(q: *const kvsieve_tensor_t, name: &str) -> Result<Tensor> {
    let ndim = read_struct(q, name)?.ndim;
    if ndim == 2 {
        Tensor::parse(q, name, &["num_qo_heads", "head_dim"])
    } else {
        Tensor::parse(q, name, &["1", "num_qo_heads", "head_dim"])
    }
}

/// Page-bound (Quest) selection for the decode query `q` of sequence `seq` at `layer`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `config` is NULL or readable;
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
        let cfg = read_struct(config, "config")?;
        non_null(out, "out")?;
        let q = parse_query(q, "q")?.view()?;
        let cfg = PageBoundsConfig { budget_tokens: cfg.budget_tokens, min_pages: cfg.min_pages };
        let sel = page_bounds(&c.read(), seq, layer, &q, &cfg)?;
        write_out(out, into_handle(sel));
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
