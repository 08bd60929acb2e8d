//! `gemfilter.h`: GemFilter and SnapKV (`kvsieve::select::gemfilter`): token scores of a
//! filter layer's last query (`kvsieve_gemfilter_scores`), their centred average pool
//! (`kvsieve_avg_pool`), GemFilter's selection (`kvsieve_gemfilter_select`), SnapKV's
//! per-head selection (`kvsieve_snapkv`) and filter-layer calibration
//! (`kvsieve_gemfilter_calibrate_layers`).
//!
//! Keys come from a `kvsieve_key_source_t` (see `cache`): a key tensor, or a (cache,
//! sequence, layer) of a cache handle, whose read lock the call takes.

use std::mem::{align_of, offset_of, size_of};

use parking_lot::RwLockReadGuard;

use kvsieve::error::{Error, Result};
use kvsieve::kv::KvCache;
use kvsieve::select::gemfilter::{
    avg_pool, calibrate_layers, select, snapkv, token_scores, GemFilterConfig, KeySource, SnapKvConfig,
};
use kvsieve::tensor::TensorView;

use super::args::{
    check_capacity, check_disjoint, non_null, opt_slice_mut, read_versioned, read_versioned_array, rename,
    sizes_are_valid, slice, slice_mut, write_out, Region, Versioned,
};
use super::cache::{key_source, key_source_of, kvsieve_cache_t, kvsieve_key_source_t, Source};
use super::error::{guard, kvsieve_error_t};
use super::selection::{into_handle, kvsieve_selection_t};
use super::tensor::{kvsieve_tensor_t, parse_query, Tensor};

/// Options of GemFilter's selection (see `kvsieve_gemfilter_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_gemfilter_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub k: usize,
    pub pool_kernel: usize,
    pub keep_first: usize,
    pub keep_last: usize,
}

/// Options of SnapKV (see `kvsieve_snapkv_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kvsieve_snapkv_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub k: usize,
    pub pool_kernel: usize,
    /// Multiplier of q·k before softmax; 0 means 1/sqrt(head_dim).
    pub scale: f32,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_gemfilter_config_t>() == 40 && align_of::<kvsieve_gemfilter_config_t>() == 8);
    assert!(offset_of!(kvsieve_gemfilter_config_t, k) == 8);
    assert!(offset_of!(kvsieve_gemfilter_config_t, pool_kernel) == 16);
    assert!(offset_of!(kvsieve_gemfilter_config_t, keep_first) == 24);
    assert!(offset_of!(kvsieve_gemfilter_config_t, keep_last) == 32);
    assert!(size_of::<kvsieve_snapkv_config_t>() == 32 && align_of::<kvsieve_snapkv_config_t>() == 8);
    assert!(offset_of!(kvsieve_snapkv_config_t, k) == 8);
    assert!(offset_of!(kvsieve_snapkv_config_t, pool_kernel) == 16);
    assert!(offset_of!(kvsieve_snapkv_config_t, scale) == 24);
};

const _: () = {
    assert!(
        offset_of!(kvsieve_gemfilter_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_gemfilter_config_t>()
    );
    assert!(offset_of!(kvsieve_snapkv_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_snapkv_config_t>());
};

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_gemfilter_config_t {
    const NAME: &'static str = "kvsieve_gemfilter_config_t";
    const INIT: &'static str = "kvsieve_gemfilter_config_init() or kvsieve_gemfilter_config_default()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        kvsieve_gemfilter_config_default(0)
    }
}

impl kvsieve_snapkv_config_t {
    /// What the header's `kvsieve_snapkv_config_init()` gives: `k` 0 (to be set), the pool
    /// width SnapKV uses (7), `scale` 0 (1/sqrt(head_dim)), `struct_size` this layout's.
    pub fn init() -> Self {
        kvsieve_snapkv_config_t { struct_size: size_of::<Self>(), k: 0, pool_kernel: 7, scale: 0.0 }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_snapkv_config_t {
    const NAME: &'static str = "kvsieve_snapkv_config_t";
    const INIT: &'static str = "kvsieve_snapkv_config_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

impl kvsieve_gemfilter_config_t {
    pub(crate) fn to_core(self) -> GemFilterConfig {
        GemFilterConfig {
            k: self.k,
            pool_kernel: self.pool_kernel,
            keep_first: self.keep_first,
            keep_last: self.keep_last,
        }
    }

    fn from_core(c: &GemFilterConfig) -> Self {
        kvsieve_gemfilter_config_t {
            struct_size: size_of::<Self>(),
            k: c.k,
            pool_kernel: c.pool_kernel,
            keep_first: c.keep_first,
            keep_last: c.keep_last,
        }
    }
}

/// A configuration keeping `k` tokens: pool kernel 5, no forced tokens; what the header's
/// `static inline` function of this name gives. Not exported (C programs compile the
/// header's); Rust code that calls the entry points directly (the tests) uses it.
pub fn kvsieve_gemfilter_config_default(k: usize) -> kvsieve_gemfilter_config_t {
    kvsieve_gemfilter_config_t::from_core(&GemFilterConfig::new(k))
}

/// GemFilter's token scores: for every token, the sum over query heads of `q_h · k_t`.
///
/// # Safety
/// 1. `q` is NULL or a valid descriptor whose data is not written during the call;
/// 2. `keys` is NULL or a readable key source (see `cache::key_source`);
/// 3. `scores` is NULL or writable for `capacity` floats; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_gemfilter_scores(
    q: *const kvsieve_tensor_t,
    keys: *const kvsieve_key_source_t,
    scores: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_gemfilter_scores", || {
        let q = parse_query(q, "q")?;
        let src = key_source(keys, "keys")?;
        let reads: Vec<Region> = [Some(q.region()), src.region()].into_iter().flatten().collect();
        check_disjoint(&[Region::of(scores, capacity, "scores"), Region::of(out_len, 1, "out_len")], &reads)?;
        let buf = slice_mut(scores, capacity, "scores")?;
        let qv = q.view()?;
        let s = src.run(|k| token_scores(&qv, k))?;
        check_capacity("capacity", capacity, s.len(), "the context length")?;
        buf[..s.len()].copy_from_slice(&s);
        if !out_len.is_null() {
            write_out(out_len, s.len());
        }
        Ok(())
    })
}

/// Centred 1-D average pool of `n` scores into `out`.
///
/// # Safety
/// 1. `scores` is NULL or readable for `n` floats; `out` is NULL or writable for `n` floats.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_avg_pool(
    scores: *const f32,
    n: usize,
    kernel: usize,
    out: *mut f32,
) -> *mut kvsieve_error_t {
    guard("kvsieve_avg_pool", || {
        check_disjoint(&[Region::of(out, n, "out")], &[Region::of(scores, n, "scores")])?;
        let x = slice(scores, n, "scores")?;
        let o = slice_mut(out, n, "out")?;
        let pooled = avg_pool(x, kernel).map_err(|e| rename(e, "pool_kernel", "kernel"))?;
        o.copy_from_slice(&pooled);
        Ok(())
    })
}

/// GemFilter: the `config->k` tokens the query points at, ascending.
///
/// # Safety
/// 1. `q`, `keys` as for [`kvsieve_gemfilter_scores`]; `config` is NULL or readable;
/// 2. `indices` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_gemfilter_select(
    q: *const kvsieve_tensor_t,
    keys: *const kvsieve_key_source_t,
    config: *const kvsieve_gemfilter_config_t,
    indices: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_gemfilter_select", || {
        let q = parse_query(q, "q")?;
        let src = key_source(keys, "keys")?;
        let cfg = read_versioned(config, "config")?.to_core();
        let reads: Vec<Region> = [Some(q.region()), src.region()].into_iter().flatten().collect();
        check_disjoint(&[Region::of(indices, capacity, "indices"), Region::of(out_len, 1, "out_len")], &reads)?;
        let buf = slice_mut(indices, capacity, "indices")?;
        let qv = q.view()?;
        let kept = src.run(|k| select(&qv, k, &cfg))?;
        check_capacity("capacity", capacity, kept.len(), "k")?;
        buf[..kept.len()].copy_from_slice(&kept);
        if !out_len.is_null() {
            write_out(out_len, kept.len());
        }
        Ok(())
    })
}

/// SnapKV: per KV head, the `config->k` tokens the observation window attends to most
/// (the window included), as a new selection; the union over heads optionally copied out.
///
/// # Safety
/// 1. `q_window` is NULL or a valid descriptor whose data is not written during the call;
/// 2. `keys` as for [`kvsieve_gemfilter_scores`]; `config` is NULL or readable;
/// 3. `out` is NULL or writable; `union_indices` is NULL or writable for `union_capacity`
///    values; `out_union_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_snapkv(
    q_window: *const kvsieve_tensor_t,
    keys: *const kvsieve_key_source_t,
    config: *const kvsieve_snapkv_config_t,
    out: *mut *mut kvsieve_selection_t,
    union_indices: *mut u32,
    union_capacity: usize,
    out_union_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_snapkv", || {
        let q = Tensor::parse(q_window, "q_window", &["w", "num_qo_heads", "head_dim"])?;
        let src = key_source(keys, "keys")?;
        let c = read_versioned(config, "config")?;
        if !c.scale.is_finite() {
            return Err(Error::invalid(
                "scale",
                format!("a finite multiplier (0 means 1/sqrt(head_dim)), got {}", c.scale),
            ));
        }
        non_null(out, "out")?;
        let reads: Vec<Region> = [Some(q.region()), src.region()].into_iter().flatten().collect();
        let writes = [
            Region::of(out, 1, "out"),
            Region::of(union_indices, union_capacity, "union_indices"),
            Region::of(out_union_len, 1, "out_union_len"),
        ];
        check_disjoint(&writes, &reads)?;
        let union_buf = opt_slice_mut(union_indices, union_capacity, "union_indices")?;
        let cfg = SnapKvConfig { k: c.k, pool_kernel: c.pool_kernel, scale: (c.scale != 0.0).then_some(c.scale) };
        let qv = q.view()?;
        let res = src.run(|k| snapkv(&qv, k, &cfg))?;
        let union_len = res.union.len();
        if union_buf.is_some() {
            check_capacity(
                "union_capacity",
                union_capacity,
                union_len,
                "the union's length; the context length always suffices",
            )?;
        }
        if let Some(buf) = union_buf {
            buf[..union_len].copy_from_slice(&res.union);
        }
        if !out_union_len.is_null() {
            write_out(out_union_len, union_len);
        }
        write_out(out, into_handle(res.per_head));
        Ok(())
    })
}

/// Filter-layer calibration: per layer, the share of the needle `needle_start..needle_end`
/// that GemFilter keeps from that layer's query and keys.
///
/// # Safety
/// 1. `queries` is NULL or readable for `num_layers` descriptors, each valid, whose data is
///    not written during the call; `keys` is NULL or readable for `num_layers` key sources
///    (see `cache::key_source`); `config` is NULL or readable;
/// 2. `recalls` is NULL or writable for `num_layers` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_gemfilter_calibrate_layers(
    num_layers: usize,
    queries: *const kvsieve_tensor_t,
    keys: *const kvsieve_key_source_t,
    needle_start: usize,
    needle_end: usize,
    config: *const kvsieve_gemfilter_config_t,
    recalls: *mut f64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_gemfilter_calibrate_layers", || {
        let cfg = read_versioned(config, "config")?.to_core();
        if needle_end <= needle_start {
            return Err(Error::invalid(
                "needle_end",
                format!("an end past needle_start = {needle_start} (the needle is a non-empty token range), got {needle_end}"),
            ));
        }
        let descs = slice(queries, num_layers, "queries")?;
        let (srcs, keys_region) = read_versioned_array(keys, num_layers, "keys")?;
        let q_tensors: Vec<Tensor> =
            descs.iter().enumerate().map(|(l, d)| parse_query(d, &format!("queries[{l}]"))).collect::<Result<_>>()?;
        let sources: Vec<Source> =
            srcs.iter().enumerate().map(|(l, s)| key_source_of(*s, &format!("keys[{l}]"))).collect::<Result<_>>()?;
        let mut reads = vec![Region::of(queries, num_layers, "queries"), keys_region];
        reads.extend(q_tensors.iter().map(Tensor::region));
        reads.extend(sources.iter().filter_map(Source::region));
        check_disjoint(&[Region::of(recalls, num_layers, "recalls")], &reads)?;
        let out = slice_mut(recalls, num_layers, "recalls")?;

        let q_views: Vec<TensorView> = q_tensors.iter().map(|t| t.view()).collect::<Result<_>>()?;
        let key_views: Vec<Option<TensorView>> = sources
            .iter()
            .map(|s| match s {
                Source::Tensor(t) => t.view().map(Some),
                Source::Cache { .. } => Ok(None),
            })
            .collect::<Result<_>>()?;
        // One read lock per distinct cache, taken in address order so that two calls never
        // wait on each other's caches.
        let mut caches: Vec<&kvsieve_cache_t> = sources
            .iter()
            .filter_map(|s| match s {
                Source::Cache { cache, .. } => Some(*cache),
                Source::Tensor(_) => None,
            })
            .collect();
        caches.sort_by_key(|c| *c as *const kvsieve_cache_t as usize);
        caches.dedup_by_key(|c| *c as *const kvsieve_cache_t as usize);
        let guards: Vec<RwLockReadGuard<KvCache>> = caches.iter().map(|c| c.read()).collect();
        let inputs: Vec<KeySource> = sources
            .iter()
            .zip(&key_views)
            .map(|(s, v)| match (s, v) {
                (Source::Cache { cache, seq, layer, .. }, _) => {
                    let i =
                        caches.iter().position(|c| std::ptr::eq(*c, *cache)).expect("every cache source was locked");
                    KeySource::Cache { cache: &guards[i], seq: *seq, layer: *layer }
                }
                (Source::Tensor(_), v) => KeySource::Tensor(v.as_ref().expect("every tensor source has a view")),
            })
            .collect();
        let mut current = 0;
        let res = calibrate_layers(num_layers, needle_start..needle_end, &cfg, &mut |l| {
            current = l;
            Ok((q_views[l].clone(), inputs[l]))
        });
        // The core names its own arguments; say which layer's query or keys were at fault.
        let res = res.map_err(|e| {
            let e = rename(e, "q", &format!("queries[{current}]"));
            rename(rename(e, "keys", &format!("keys[{current}]")), "layer", &format!("keys[{current}].layer"))
        })?;
        for (o, r) in out.iter_mut().zip(&res) {
            *o = r.recall;
        }
        Ok(())
    })
}
