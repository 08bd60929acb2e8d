//! The cache handle: a [`KvCache`] behind a reader-writer lock, its configuration and
//! statistics structs, and `kvsieve_cache_new` / `kvsieve_cache_free`.

use std::mem::{align_of, offset_of, size_of};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use kvsieve::config::{CacheConfig, KeyRope, PageLayout};
use kvsieve::error::{Error, Result};
use kvsieve::kv::{KvCache, MemoryStats};

use super::args::{non_null, read_struct, write_out};
use super::error::{guard, guard_value, kvsieve_error_t};
use super::tensor::kvsieve_dtype_t;

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
    assert!(size_of::<kvsieve_cache_config_t>() == 56 && align_of::<kvsieve_cache_config_t>() == 8);
    assert!(offset_of!(kvsieve_cache_config_t, capacity_pages) == 32);
    assert!(offset_of!(kvsieve_cache_config_t, dtype) == 40);
    assert!(offset_of!(kvsieve_cache_config_t, layout) == 44);
    assert!(offset_of!(kvsieve_cache_config_t, key_rope) == 48);
    assert!(offset_of!(kvsieve_cache_config_t, track_key_bounds) == 52);
    assert!(size_of::<kvsieve_cache_stats_t>() == 64 && align_of::<kvsieve_cache_stats_t>() == 8);
    assert!(offset_of!(kvsieve_cache_stats_t, num_tokens) == 56);
};

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

/// A configuration with f16 storage, NHD layout, post-RoPE keys and key bounds on.
#[no_mangle]
pub extern "C" fn kvsieve_cache_config_default(
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    capacity_pages: usize,
) -> kvsieve_cache_config_t {
    let make = |n, h, d, p, c| kvsieve_cache_config_t::from_core(&CacheConfig::new(n, h, d, p, c));
    guard_value(make(0, 0, 0, 0, 0), || make(num_layers, num_kv_heads, head_dim, page_size, capacity_pages))
}

/// Create a cache; `*out` receives the handle on success.
///
/// # Safety
/// 1. `config` is NULL or points at a readable config; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_new(config: *const kvsieve_cache_config_t, out: *mut *mut kvsieve_cache_t) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_new", || {
        let config = read_struct(config, "config")?;
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
/// 1. `cache` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_get_config(cache: *const kvsieve_cache_t, out: *mut kvsieve_cache_config_t) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_get_config", || {
        let c = cache_ref(cache)?;
        non_null(out, "out")?;
        let cfg = kvsieve_cache_config_t::from_core(c.read().config());
        write_out(out, cfg);
        Ok(())
    })
}

/// Memory statistics.
///
/// # Safety
/// 1. `cache` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cache_stats(cache: *const kvsieve_cache_t, out: *mut kvsieve_cache_stats_t) -> *mut kvsieve_error_t {
    guard("kvsieve_cache_stats", || {
        let c = cache_ref(cache)?;
        non_null(out, "out")?;
        let stats = kvsieve_cache_stats_t::from_core(&c.read().stats());
        write_out(out, stats);
        Ok(())
    })
}
