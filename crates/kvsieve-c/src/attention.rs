//! `attention.h`: RoPE in place (`kvsieve_apply_rope`), `kvsieve_merge_states`, dense
//! decode and prefill on a cache (`kvsieve_cache_decode`, `kvsieve_cache_prefill`), and
//! sparse decode and prefill on a cache over caller selections
//! (`kvsieve_cache_decode_sparse`, `kvsieve_cache_prefill_sparse`) with the per-KV-head
//! prefill windows (`kvsieve_streaming_window_t`); plus the argument checks they share with
//! the views, the policy calls and the CUDA calls. The calls on a cache take its read lock.
//! The parameter structs are in `params`.

use std::mem::{align_of, offset_of, size_of};

use kvsieve::attention::{apply_rope, merge_states, AttentionParams, StreamingWindow};
use kvsieve::error::{Error, Result};
use kvsieve::tensor::{TensorView, TensorViewMut};

use super::args::{
    check_disjoint, opt_slice_mut, read_versioned_array, sizes_are_valid, slice, slice_mut, Region, Versioned,
};
use super::cache::{cache_ref, kvsieve_cache_t};
use super::error::{guard, kvsieve_error_t};
use super::params::{attention_params, kvsieve_attention_params_t, kvsieve_rope_config_t, rope_config};
use super::selection::{kvsieve_selection_t, selection_list};
use super::tensor::{kvsieve_tensor_t, Tensor};

/// Row mask of one KV head in sparse prefill (see `kvsieve_streaming_window_t` in the
/// header); `sinks` and `window` 0 mean no window for that head.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_streaming_window_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub sinks: usize,
    pub window: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_streaming_window_t>() == 24 && align_of::<kvsieve_streaming_window_t>() == 8);
    assert!(offset_of!(kvsieve_streaming_window_t, sinks) == 8);
    assert!(offset_of!(kvsieve_streaming_window_t, window) == 16);
};

const _: () = assert!(
    offset_of!(kvsieve_streaming_window_t, struct_size) == 0 && sizes_are_valid::<kvsieve_streaming_window_t>()
);

impl kvsieve_streaming_window_t {
    /// What the header's `kvsieve_streaming_window_init()` gives: no window, `struct_size`
    /// this layout's.
    pub fn init() -> Self {
        kvsieve_streaming_window_t { struct_size: size_of::<Self>(), sinks: 0, window: 0 }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_streaming_window_t {
    const NAME: &'static str = "kvsieve_streaming_window_t";
    const INIT: &'static str = "kvsieve_streaming_window_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

pub(crate) const DECODE_DIMS: [&str; 3] = ["batch", "num_qo_heads", "head_dim"];

pub(crate) const PREFILL_DIMS: [&str; 3] = ["total", "num_qo_heads", "head_dim"];

/// The query, output and LSE of one attention call, checked.
pub(crate) struct AttentionArgs {
    q: Tensor,
    out: Tensor,
    lse: *mut f32,
    pub params: AttentionParams,
}

impl AttentionArgs {
    /// Check `q`, `out` (3-D, `dims`), `lse` (`q.shape[0] * q.shape[1]` floats or NULL) and
    /// `params`; `out` and `lse` may overlap neither each other, nor `q`, nor `reads`.
    ///
    /// # Safety
    /// 1. `q` and `out` are NULL or valid descriptors; `params` is NULL or readable;
    /// 2. `lse` is NULL or writable for `q.shape[0] * q.shape[1]` floats.
    pub unsafe fn parse(
        q: *const kvsieve_tensor_t,
        out: *const kvsieve_tensor_t,
        lse: *mut f32,
        params: *const kvsieve_attention_params_t,
        dims: &[&str],
        mut reads: Vec<Region>,
    ) -> Result<Self> {
        let q = Tensor::parse(q, "q", dims)?;
        let out = Tensor::parse(out, "out", dims)?;
        let params = attention_params(params)?;
        let lse_len = q.shape()[0].saturating_mul(q.shape()[1]);
        reads.push(q.region());
        check_disjoint(&[out.region(), Region::of(lse, lse_len, "lse")], &reads)?;
        Ok(AttentionArgs { q, out, lse, params })
    }

    /// The regions of `q`, `out` and `lse`, for overlap checks against further buffers.
    pub fn regions(&self) -> Vec<Region> {
        let lse_len = self.q.shape()[0].saturating_mul(self.q.shape()[1]);
        vec![self.q.region(), self.out.region(), Region::of(self.lse, lse_len, "lse")]
    }

    /// Views over the caller's memory.
    ///
    /// # Safety
    /// As for [`AttentionArgs::parse`], for the lifetime `'a`.
    pub unsafe fn views<'a>(&self) -> Result<(TensorView<'a>, TensorViewMut<'a>, Option<&'a mut [f32]>)> {
        let lse_len = self.q.shape()[0].saturating_mul(self.q.shape()[1]);
        Ok((self.q.view()?, self.out.view_mut()?, opt_slice_mut(self.lse, lse_len, "lse")?))
    }
}

/// Per-KV-head windows from a caller array of `n` entries (NULL only when `n` is 0), laid
/// out with the caller's `struct_size`: an entry with `window` 0 is no window for its head,
/// and then `sinks` must be 0 too. Also returns the bytes the array spans.
///
/// # Safety
/// 1. `ptr` is NULL or readable for `n` entries of their `struct_size` during the call.
pub(crate) unsafe fn windows(
    ptr: *const kvsieve_streaming_window_t,
    n: usize,
) -> Result<(Vec<Option<StreamingWindow>>, Region)> {
    let (entries, region) = read_versioned_array(ptr, n, "windows")?;
    let wins = entries
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
        .collect::<Result<_>>()?;
    Ok((wins, region))
}

/// Rotate `x` (`[n, heads, head_dim]`) in place, token `i` at `positions[i]`.
///
/// # Safety
/// 1. `x` is NULL or a valid descriptor whose data is readable and writable;
/// 2. `positions` is NULL or readable for `num_positions` values; `rope` is NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_apply_rope(
    x: *const kvsieve_tensor_t,
    positions: *const i32,
    num_positions: usize,
    rope: *const kvsieve_rope_config_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_apply_rope", || {
        let x = Tensor::parse(x, "x", &["n", "heads", "head_dim"])?;
        let cfg = rope_config(rope, "rope")?;
        check_disjoint(&[x.region()], &[Region::of(positions, num_positions, "positions")])?;
        let positions = slice(positions, num_positions, "positions")?;
        apply_rope(&mut x.view_mut()?, positions, &cfg)
    })
}

/// Merge two partial attention states by their LSEs.
///
/// # Safety
/// 1. `v_a`, `v_b` and `out` are NULL or valid descriptors;
/// 2. `lse_a`, `lse_b` are NULL or readable, `lse_out` NULL or writable, for
///    `v_a.shape[0] * v_a.shape[1]` floats each.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_merge_states(
    v_a: *const kvsieve_tensor_t,
    lse_a: *const f32,
    v_b: *const kvsieve_tensor_t,
    lse_b: *const f32,
    out: *const kvsieve_tensor_t,
    lse_out: *mut f32,
) -> *mut kvsieve_error_t {
    guard("kvsieve_merge_states", || {
        let dims = ["n", "heads", "head_dim"];
        let a = Tensor::parse(v_a, "v_a", &dims)?;
        let b = Tensor::parse(v_b, "v_b", &dims)?;
        let o = Tensor::parse(out, "out", &dims)?;
        let n = a.shape()[0].saturating_mul(a.shape()[1]);
        let reads = [a.region(), Region::of(lse_a, n, "lse_a"), b.region(), Region::of(lse_b, n, "lse_b")];
        check_disjoint(&[o.region(), Region::of(lse_out, n, "lse_out")], &reads)?;
        let (la, lb) = (slice(lse_a, n, "lse_a")?, slice(lse_b, n, "lse_b")?);
        let lo = slice_mut(lse_out, n, "lse_out")?;
        let (a, b, mut o) = (a.view()?, b.view()?, o.view_mut()?);
        merge_states(&a, la, &b, lb, &mut o, lo)
    })
}

// Attention on the cache ------------------------------------------------------------------

/// Decode attention of one query token per sequence of `seq_ids` at `layer`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
/// 2. `q`, `out`, `lse` and `params` as in `AttentionArgs::parse`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_decode(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_decode", || {
        let c = cache_ref(cache)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let args =
            AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, vec![Region::of(seq_ids, batch, "seq_ids")])?;
        let (q, mut out, lse) = args.views()?;
        c.read().decode(layer, ids, &q, &mut out, lse, &args.params)
    })
}

/// Prefill attention of the last tokens of each sequence of `seq_ids` at `layer`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `seq_ids` is NULL or readable for `batch` ids;
///    `qo_indptr` is NULL or readable for `batch + 1` values;
/// 2. `q`, `out`, `lse` and `params` as in `AttentionArgs::parse`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_prefill(
    cache: *const kvsieve_cache_t,
    layer: usize,
    seq_ids: *const u64,
    batch: usize,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    causal: bool,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_prefill", || {
        let c = cache_ref(cache)?;
        let ids = slice(seq_ids, batch, "seq_ids")?;
        let indptr_len = batch.saturating_add(1);
        let qo = slice(qo_indptr, indptr_len, "qo_indptr")?;
        let reads = vec![Region::of(seq_ids, batch, "seq_ids"), Region::of(qo_indptr, indptr_len, "qo_indptr")];
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        c.read().prefill(layer, ids, &q, qo, &mut out, lse, &args.params, causal)
    })
}

// Sparse attention on the cache -----------------------------------------------------------

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
        let (wins, wins_region) = self::windows(windows, num_windows)?;
        let reads = vec![
            Region::of(seq_ids, batch, "seq_ids"),
            Region::of(qo_indptr, indptr_len, "qo_indptr"),
            Region::of(selections, batch, "selections"),
            wins_region,
        ];
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        c.read().prefill_sparse(layer, ids, &q, qo, &sels, &wins, &mut out, lse, &args.params)
    })
}
