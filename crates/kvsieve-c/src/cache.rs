//! `cache.h`: the cache handle, a [`KvCache`] behind a reader-writer lock, with its
//! configuration and statistics structs (`kvsieve_cache_new`, `_free`, `_get_config`,
//! `_stats`); the calls that change its sequences (create, fork, free, append, write,
//! truncate, evict pages, compact), which take the write lock; the read-only queries
//! (sequence length and positions, the CSR page table, page key bounds, stored keys and
//! values), which take the read lock and so run concurrently with each other and with
//! attention; and the key source (`kvsieve_key_source_t`: a key tensor, or a (cache,
//! sequence, layer) whose read lock the call takes) that GemFilter and the cluster index
//! read keys from.

use std::mem::{align_of, offset_of, size_of};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use kvsieve::config::{CacheConfig, KeyRope, PageLayout};
use kvsieve::error::{Error, Result};
use kvsieve::kv::{KeepTokens, KvCache, MemoryStats};
use kvsieve::select::gemfilter::KeySource;

use super::args::{
    check_capacity, check_disjoint, copy_array, non_null, opt_slice, opt_slice_mut, read_versioned, rename,
    sizes_are_valid, slice, slice_mut, write_out, Region, Versioned, VersionedOut,
};
use super::error::{guard, guard_value, kvsieve_error_t};
use super::tensor::{kvsieve_dtype_t, kvsieve_tensor_t, Tensor};

/// A kvsieve-owned paged KV cache shared between threads: calls that only read take the
/// read lock and run concurrently; calls that change the cache take the write lock.
#[allow(non_camel_case_types)]
pub struct kvsieve_cache_t {
    inner: RwLock<KvCache>,
}

impl kvsieve_cache_t {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, KvCache> {
        self.inner.read()
    }
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, KvCache> {
        self.inner.write()
    }
}

/// The handle behind a pointer, or `NullPointer` naming `cache`.
///
/// # Safety
/// 1. `cache` is NULL or a live handle from `kvsieve_cache_new`, not freed while `'a` lasts.
pub(crate) unsafe fn cache_ref<'a>(cache: *const kvsieve_cache_t) -> Result<&'a kvsieve_cache_t> {
    cache_ref_named(cache, "cache")
}

/// As [`cache_ref`], naming `param` in errors (a cache passed inside a struct).
///
/// # Safety
/// As for [`cache_ref`].
pub(crate) unsafe fn cache_ref_named<'a>(cache: *const kvsieve_cache_t, param: &str) -> Result<&'a kvsieve_cache_t> {
    non_null(cache, param)?;
    if !(cache as usize).is_multiple_of(std::mem::align_of::<kvsieve_cache_t>()) {
        return Err(Error::invalid(param, "a handle returned by kvsieve_cache_new"));
    }
    Ok(&*cache)
}

/// Shape and storage of a cache (see `kvsieve_cache_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_cache_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub capacity_pages: usize,
    pub dtype: kvsieve_dtype_t,
    /// `KVSIEVE_LAYOUT_NHD` (0) or `KVSIEVE_LAYOUT_HND` (1).
    pub layout: u32,
    /// `KVSIEVE_KEYS_POST_ROPE` (0) or `KVSIEVE_KEYS_PRE_ROPE` (1).
    pub key_rope: u32,
    pub track_key_bounds: bool,
}

/// Memory statistics of a cache (see `kvsieve_cache_stats_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_cache_stats_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub pages_total: usize,
    pub pages_used: usize,
    pub pages_free: usize,
    pub bytes_per_page: usize,
    pub bytes_used: usize,
    pub bytes_reserved: usize,
    pub num_sequences: usize,
    pub num_tokens: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_cache_config_t>() == 64 && align_of::<kvsieve_cache_config_t>() == 8);
    assert!(offset_of!(kvsieve_cache_config_t, num_layers) == 8);
    assert!(offset_of!(kvsieve_cache_config_t, capacity_pages) == 40);
    assert!(offset_of!(kvsieve_cache_config_t, dtype) == 48);
    assert!(offset_of!(kvsieve_cache_config_t, layout) == 52);
    assert!(offset_of!(kvsieve_cache_config_t, key_rope) == 56);
    assert!(offset_of!(kvsieve_cache_config_t, track_key_bounds) == 60);
    assert!(size_of::<kvsieve_cache_stats_t>() == 72 && align_of::<kvsieve_cache_stats_t>() == 8);
    assert!(offset_of!(kvsieve_cache_stats_t, pages_total) == 8);
    assert!(offset_of!(kvsieve_cache_stats_t, num_tokens) == 64);
};

const _: () = {
    assert!(offset_of!(kvsieve_cache_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_cache_config_t>());
    assert!(offset_of!(kvsieve_cache_stats_t, struct_size) == 0 && sizes_are_valid::<kvsieve_cache_stats_t>());
};

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_cache_config_t {
    const NAME: &'static str = "kvsieve_cache_config_t";
    const INIT: &'static str = "kvsieve_cache_config_init() or kvsieve_cache_config_default()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        kvsieve_cache_config_default(0, 0, 0, 0, 0)
    }
}

impl kvsieve_cache_stats_t {
    /// What the header's `kvsieve_cache_stats_init()` gives: zeros, `struct_size` this
    /// layout's.
    pub fn init() -> Self {
        kvsieve_cache_stats_t {
            struct_size: size_of::<Self>(),
            pages_total: 0,
            pages_used: 0,
            pages_free: 0,
            bytes_per_page: 0,
            bytes_used: 0,
            bytes_reserved: 0,
            num_sequences: 0,
            num_tokens: 0,
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_cache_stats_t {
    const NAME: &'static str = "kvsieve_cache_stats_t";
    const INIT: &'static str = "kvsieve_cache_stats_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

pub(crate) fn page_layout(v: u32, param: &str) -> Result<PageLayout> {
    match v {
        0 => Ok(PageLayout::Nhd),
        1 => Ok(PageLayout::Hnd),
        _ => Err(Error::invalid(param, format!("KVSIEVE_LAYOUT_NHD (0) or KVSIEVE_LAYOUT_HND (1), got {v}"))),
    }
}

pub(crate) fn key_rope(v: u32, param: &str) -> Result<KeyRope> {
    match v {
        0 => Ok(KeyRope::PostRope),
        1 => Ok(KeyRope::PreRope),
        _ => Err(Error::invalid(param, format!("KVSIEVE_KEYS_POST_ROPE (0) or KVSIEVE_KEYS_PRE_ROPE (1), got {v}"))),
    }
}

impl kvsieve_cache_config_t {
    pub fn from_core(c: &CacheConfig) -> Self {
        kvsieve_cache_config_t {
            struct_size: size_of::<Self>(),
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            page_size: c.page_size,
            capacity_pages: c.capacity_pages,
            dtype: kvsieve_dtype_t::from_dtype(c.dtype),
            layout: c.layout as u32,
            key_rope: c.key_rope as u32,
            track_key_bounds: c.track_key_bounds,
        }
    }

    pub(crate) fn to_core(self) -> Result<CacheConfig> {
        let c = CacheConfig {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            page_size: self.page_size,
            dtype: self.dtype.to_dtype("dtype")?,
            layout: page_layout(self.layout, "layout")?,
            capacity_pages: self.capacity_pages,
            key_rope: key_rope(self.key_rope, "key_rope")?,
            track_key_bounds: self.track_key_bounds,
        };
        c.validate()?;
        Ok(c)
    }
}

impl kvsieve_cache_stats_t {
    fn from_core(s: &MemoryStats) -> Self {
        kvsieve_cache_stats_t {
            struct_size: size_of::<Self>(),
            pages_total: s.pages_total,
            pages_used: s.pages_used,
            pages_free: s.pages_free,
            bytes_per_page: s.bytes_per_page,
            bytes_used: s.bytes_used,
            bytes_reserved: s.bytes_reserved,
            num_sequences: s.num_sequences,
            num_tokens: s.num_tokens,
        }
    }
}

/// A configuration with f16 storage, NHD layout, post-RoPE keys and key bounds on: what the
/// header's `static inline` function of this name gives. Not exported (C programs compile
/// the header's); Rust code that calls the entry points directly (the tests) uses it.
pub fn kvsieve_cache_config_default(
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    capacity_pages: usize,
) -> kvsieve_cache_config_t {
    kvsieve_cache_config_t::from_core(&CacheConfig::new(num_layers, num_kv_heads, head_dim, page_size, capacity_pages))
}

/// Create a cache; `*out` receives the handle on success.
///
/// # Safety
/// 1. `config` is NULL or points at a readable config of its `struct_size`; `out` is NULL
///    or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_new(
    config: *const kvsieve_cache_config_t,
    out: *mut *mut kvsieve_cache_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_new", || {
        let config = read_versioned(config, "config")?;
        non_null(out, "out")?;
        let cache = KvCache::new(config.to_core()?)?;
        let handle = Box::new(kvsieve_cache_t { inner: RwLock::new(cache) });
        write_out(out, Box::into_raw(handle));
        Ok(())
    })
}

/// Free a cache. NULL is ignored.
///
/// # Safety
/// 1. `cache` is NULL or a live handle, freed once, with no call on it running or to come.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_free(cache: *mut kvsieve_cache_t) {
    guard_value((), || {
        if !cache.is_null() {
            drop(Box::from_raw(cache));
        }
    })
}

/// The configuration a cache was created with.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out` is NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_get_config(
    cache: *const kvsieve_cache_t,
    out: *mut kvsieve_cache_config_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_get_config", || {
        let c = cache_ref(cache)?;
        let out = VersionedOut::new(out, "out")?;
        let cfg = kvsieve_cache_config_t::from_core(c.read().config());
        out.write(cfg);
        Ok(())
    })
}

/// Memory statistics.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out` is NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_stats(
    cache: *const kvsieve_cache_t,
    out: *mut kvsieve_cache_stats_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_stats", || {
        let c = cache_ref(cache)?;
        let out = VersionedOut::new(out, "out")?;
        let stats = kvsieve_cache_stats_t::from_core(&c.read().stats());
        out.write(stats);
        Ok(())
    })
}

// Sequences -------------------------------------------------------------------------------

const KV_DIMS: [&str; 3] = ["n", "num_kv_heads", "head_dim"];

/// Create an empty sequence; `*out_seq` receives its id.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out_seq` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_create_sequence(
    cache: *mut kvsieve_cache_t,
    out_seq: *mut u64,
) -> *mut kvsieve_error_t {
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
pub unsafe extern "C" fn kvsieve_cache_fork(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    out_seq: *mut u64,
) -> *mut kvsieve_error_t {
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
pub unsafe extern "C" fn kvsieve_cache_truncate(
    cache: *mut kvsieve_cache_t,
    seq: u64,
    new_len: usize,
) -> *mut kvsieve_error_t {
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

// Compaction ------------------------------------------------------------------------------

/// `KVSIEVE_KEEP_ALL`: one token list for every layer and KV head.
pub const KEEP_ALL: u32 = 0;

/// `KVSIEVE_KEEP_PER_LAYER`: one token list per layer.
pub const KEEP_PER_LAYER: u32 = 1;

/// `KVSIEVE_KEEP_PER_HEAD`: one token list per (layer, KV head), layer-major.
pub const KEEP_PER_HEAD: u32 = 2;

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
pub(crate) unsafe fn compact_lists(
    kind: u32,
    keep_indptr: *const u32,
    num_lists: usize,
    keep: *const u32,
    keep_len: usize,
) -> Result<Vec<Vec<u32>>> {
    if kind > KEEP_PER_HEAD {
        return Err(Error::invalid(
            "kind",
            format!("KVSIEVE_KEEP_ALL (0), KVSIEVE_KEEP_PER_LAYER (1) or KVSIEVE_KEEP_PER_HEAD (2), got {kind}"),
        ));
    }
    non_null(keep_indptr, "keep_indptr")?;
    let indptr_len =
        num_lists.checked_add(1).ok_or_else(|| Error::invalid("num_lists", "a count that fits in memory"))?;
    let indptr = slice(keep_indptr, indptr_len, "keep_indptr")?;
    keep_lists(indptr, slice(keep, keep_len, "keep")?)
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
                format!(
                    "non-decreasing offsets, but keep_indptr[{i}] = {} is less than keep_indptr[{}] = {}",
                    indptr[i],
                    i - 1,
                    indptr[i - 1]
                ),
            ));
        }
    }
    let last = indptr.len() - 1;
    if indptr[last] as usize != keep.len() {
        return Err(Error::invalid(
            "keep_indptr",
            format!("keep_indptr[{last}] == keep_len = {}, got {}", keep.len(), indptr[last]),
        ));
    }
    indptr.windows(2).map(|w| copy_array(&keep[w[0] as usize..w[1] as usize], "keep")).collect()
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

// Queries ---------------------------------------------------------------------------------

/// Tokens held by a sequence.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_seq_len(
    cache: *const kvsieve_cache_t,
    seq: u64,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
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

// Key sources -----------------------------------------------------------------------------

/// Where the keys of a filter layer come from (see `kvsieve_key_source_t` in the header):
/// exactly one of `tensor` and `cache`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvsieve_key_source_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    /// Keys `[n, num_kv_heads, head_dim]` (after RoPE), or NULL.
    pub tensor: *const kvsieve_tensor_t,
    /// A cache holding the keys of `seq` at `layer`, or NULL.
    pub cache: *const kvsieve_cache_t,
    pub seq: u64,
    pub layer: usize,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_key_source_t>() == 40 && align_of::<kvsieve_key_source_t>() == 8);
    assert!(offset_of!(kvsieve_key_source_t, tensor) == 8);
    assert!(offset_of!(kvsieve_key_source_t, cache) == 16);
    assert!(offset_of!(kvsieve_key_source_t, seq) == 24);
    assert!(offset_of!(kvsieve_key_source_t, layer) == 32);
};

const _: () = assert!(offset_of!(kvsieve_key_source_t, struct_size) == 0 && sizes_are_valid::<kvsieve_key_source_t>());

impl kvsieve_key_source_t {
    /// What the header's `kvsieve_key_source_init()` gives: no tensor, no cache (one of
    /// them must then be set), `struct_size` this layout's.
    pub fn init() -> Self {
        kvsieve_key_source_t {
            struct_size: size_of::<Self>(),
            tensor: std::ptr::null(),
            cache: std::ptr::null(),
            seq: 0,
            layer: 0,
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_key_source_t {
    const NAME: &'static str = "kvsieve_key_source_t";
    const INIT: &'static str = "kvsieve_key_source_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

const KEY_DIMS: [&str; 3] = ["n", "num_kv_heads", "head_dim"];

/// A checked key source.
pub(crate) enum Source<'a> {
    Tensor(Tensor),
    Cache { cache: &'a kvsieve_cache_t, seq: u64, layer: usize, param: String },
}

/// The key source behind `src`, named `param` in messages (`param.tensor`, `param.cache`).
///
/// # Safety
/// 1. `src` is NULL or readable for its `struct_size`; its `tensor` is NULL or a valid
///    descriptor; its `cache` is NULL or a live handle, not freed while `'a` lasts.
pub(crate) unsafe fn key_source<'a>(src: *const kvsieve_key_source_t, param: &str) -> Result<Source<'a>> {
    key_source_of(read_versioned(src, param)?, param)
}

/// The key source `s` (already read from the caller), named `param` in messages.
///
/// # Safety
/// As for [`key_source`].
pub(crate) unsafe fn key_source_of<'a>(s: kvsieve_key_source_t, param: &str) -> Result<Source<'a>> {
    match (s.tensor.is_null(), s.cache.is_null()) {
        (false, true) => Ok(Source::Tensor(Tensor::parse(s.tensor, &format!("{param}.tensor"), &KEY_DIMS)?)),
        (true, false) => {
            Ok(Source::Cache { cache: cache_ref_named(s.cache, &format!("{param}.cache"))?, seq: s.seq, layer: s.layer, param: param.into() })
        }
        (true, true) => Err(Error::invalid(
            param,
            format!("a key tensor in `{param}.tensor` or a cache in `{param}.cache` (with `seq` and `layer`), but both are NULL"),
        )),
        (false, false) => Err(Error::invalid(param, format!("exactly one of `{param}.tensor` and `{param}.cache`, but both are set"))),
    }
}

impl Source<'_> {
    /// The bytes a key tensor spans (none for a cache, whose memory callers never see).
    pub(crate) fn region(&self) -> Option<Region> {
        match self {
            Source::Tensor(t) => Some(t.region()),
            Source::Cache { .. } => None,
        }
    }

    /// Run `f` on the keys: a view of the tensor, or the cache under its read lock.
    ///
    /// # Safety
    /// 1. a tensor's memory is readable and not written during the call.
    pub(crate) unsafe fn run<T>(&self, f: impl FnOnce(KeySource) -> Result<T>) -> Result<T> {
        match self {
            Source::Tensor(t) => {
                let v = t.view()?;
                f(KeySource::Tensor(&v))
            }
            Source::Cache { cache, seq, layer, param } => {
                let g = cache.read();
                f(KeySource::Cache { cache: &g, seq: *seq, layer: *layer })
                    .map_err(|e| rename(e, "layer", &format!("{param}.layer")))
            }
        }
    }
}
