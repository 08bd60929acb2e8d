//! `cuda.h`, device caches: the C surface of `CudaKvCache` (`kvsieve_cuda_cache_*`): kvsieve-owned pages resident on
//! a CUDA device, with the host cache's bookkeeping (sequences, fork with copy on write,
//! append, write from host or device tensors, truncate, page eviction, compaction), and a
//! layer view (`kvsieve_cuda_cache_layer_view`) that fills a `kvsieve_paged_kv_t` device
//! descriptor, so every `kvsieve_cuda_*` attention and selection call runs over the cache.
//!
//! The handle holds the cache behind a mutex: calls are serialised, and each change returns
//! when its device work is done (it synchronises the cache's stream). A build without the
//! `cuda` feature checks the arguments it can and answers `KVSIEVE_ERROR_CUDA_UNAVAILABLE`.

use std::ffi::c_void;

use kvsieve::error::{Error, Result};

use super::args::{non_null, read_struct, read_versioned, slice, slice_mut, write_out, VersionedOut};
use super::cache::{compact_lists, keep_tokens, kvsieve_cache_config_t};
use super::error::{guard, kvsieve_error_t};
use super::tensor::kvsieve_tensor_t;
use super::view::kvsieve_paged_kv_t;

/// A device-resident cache (see `kvsieve_cuda_cache_t` in the header).
#[allow(non_camel_case_types)]
pub struct kvsieve_cuda_cache_t {
    #[cfg(feature = "cuda")]
    inner: std::sync::Mutex<kvsieve::backend::cuda::CudaKvCache>,
    #[cfg(not(feature = "cuda"))]
    _never: std::convert::Infallible,
}

/// A device page table made by `kvsieve_cuda_cache_layer_view` (see the header).
#[allow(non_camel_case_types)]
pub struct kvsieve_cuda_table_t {
    #[cfg(feature = "cuda")]
    _table: kvsieve::backend::cuda::CudaPageTable,
    #[cfg(not(feature = "cuda"))]
    _never: std::convert::Infallible,
}

/// The handle behind a pointer.
///
/// # Safety
/// `cache` NULL or a live handle.
unsafe fn cache_ref<'a>(cache: *const kvsieve_cuda_cache_t) -> Result<&'a kvsieve_cuda_cache_t> {
    non_null(cache, "cache")?;
    if !(cache as usize).is_multiple_of(std::mem::align_of::<kvsieve_cuda_cache_t>()) {
        return Err(Error::invalid("cache", "a device cache handle returned by kvsieve"));
    }
    Ok(&*cache)
}

/// Run `f` on the cache under its lock.
#[cfg(feature = "cuda")]
fn with<T>(
    c: &kvsieve_cuda_cache_t,
    f: impl FnOnce(&mut kvsieve::backend::cuda::CudaKvCache) -> Result<T>,
) -> Result<T> {
    let mut g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

#[cfg(not(feature = "cuda"))]
fn with<T>(c: &kvsieve_cuda_cache_t, _f: impl FnOnce(&mut imp::NoCache) -> Result<T>) -> Result<T> {
    match c._never {}
}

/// A cache of `config` on CUDA device `device_id`.
///
/// # Safety
/// `config` NULL or readable; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_new(
    config: *const kvsieve_cache_config_t,
    device_id: i32,
    out: *mut *mut kvsieve_cuda_cache_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_new", || {
        let cfg = read_versioned(config, "config")?.to_core()?;
        non_null(out, "out")?;
        let ordinal = usize::try_from(device_id)
            .map_err(|_| Error::invalid("device_id", format!("a CUDA device ordinal >= 0, got {device_id}")))?;
        #[cfg(feature = "cuda")]
        {
            let dev = kvsieve::backend::cuda::CudaDevice::get(ordinal)?;
            let cache = kvsieve::backend::cuda::CudaKvCache::new(&dev, cfg)?;
            write_out(out, Box::into_raw(Box::new(kvsieve_cuda_cache_t { inner: std::sync::Mutex::new(cache) })));
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cfg, ordinal);
            Err(super::cuda::unavailable())
        }
    })
}

/// Free a device cache (its device memory). NULL is ignored.
///
/// # Safety
/// `cache` NULL or a live handle, freed once, no call on it running and no queued work
/// reading its pages.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_free(cache: *mut kvsieve_cuda_cache_t) {
    if !cache.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(cache))));
    }
}

/// A new empty sequence, into `*out_seq`.
///
/// # Safety
/// `cache` NULL or a live handle; `out_seq` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_create_sequence(
    cache: *mut kvsieve_cuda_cache_t,
    out_seq: *mut u64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_create_sequence", || {
        let c = cache_ref(cache)?;
        non_null(out_seq, "out_seq")?;
        let id = with(c, |g| Ok(g.create_sequence()))?;
        write_out(out_seq, id);
        Ok(())
    })
}

/// Fork `src` (prefix sharing, copy on write), the new id into `*out_seq`.
///
/// # Safety
/// `cache` NULL or a live handle; `out_seq` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_fork(
    cache: *mut kvsieve_cuda_cache_t,
    src: u64,
    out_seq: *mut u64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_fork", || {
        let c = cache_ref(cache)?;
        non_null(out_seq, "out_seq")?;
        let id = with(c, |g| g.fork(src))?;
        write_out(out_seq, id);
        Ok(())
    })
}

/// Drop a sequence; pages no other sequence shares go back to the pool.
///
/// # Safety
/// `cache` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_free_sequence(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_free_sequence", || with(cache_ref(cache)?, |g| g.free_sequence(seq)))
}

/// Length of a sequence, into `*out_len`.
///
/// # Safety
/// `cache` NULL or a live handle; `out_len` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_seq_len(
    cache: *const kvsieve_cuda_cache_t,
    seq: u64,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_seq_len", || {
        let c = cache_ref(cache)?;
        non_null(out_len, "out_len")?;
        let n = with(c, |g| g.seq_len(seq))?;
        write_out(out_len, n);
        Ok(())
    })
}

/// Reserve `n` slots at the end of a sequence (positions optional); their slot numbers
/// optionally into `slots`.
///
/// # Safety
/// `cache` NULL or a live handle; `positions` NULL or readable for `n` values; `slots` NULL
/// or writable for `slots_capacity` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_append(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
    n: usize,
    positions: *const i32,
    slots: *mut i64,
    slots_capacity: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_append", || {
        let c = cache_ref(cache)?;
        let pos = if positions.is_null() { None } else { Some(slice(positions, n, "positions")?) };
        let out = if slots.is_null() { None } else { Some(slice_mut(slots, slots_capacity, "slots")?) };
        if out.as_ref().is_some_and(|o| o.len() < n) {
            return Err(Error::invalid("slots_capacity", format!("at least n = {n}, got {slots_capacity}")));
        }
        let got = with(c, |g| g.append(seq, n, pos))?;
        if let Some(o) = out {
            o[..got.len()].copy_from_slice(&got);
        }
        Ok(())
    })
}

/// Write K and V of tokens `start..start + n` of one layer, from host or device tensors
/// `[n, num_kv_heads, head_dim]`.
///
/// # Safety
/// `cache` NULL or a live handle; `k`, `v` NULL or valid descriptors (host memory readable,
/// device memory valid on the cache's device) not written during the call.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_write(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
    layer: usize,
    start: usize,
    k: *const kvsieve_tensor_t,
    v: *const kvsieve_tensor_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_write", || {
        let c = cache_ref(cache)?;
        let kd = read_struct(k, "k")?;
        let on_device = kd.device.device_type == super::cuda::DEVICE_CUDA
            || kd.device.device_type == super::cuda::DEVICE_CUDA_MANAGED;
        let dims = ["n", "num_kv_heads", "head_dim"];
        if on_device {
            let kt = super::cuda::device_tensor(k, "k", &dims)?;
            let vt = super::cuda::device_tensor(v, "v", &dims)?;
            imp::write_device(c, seq, layer, start, &kt, &vt)
        } else {
            let kt = super::tensor::Tensor::parse(k, "k", &dims)?;
            let vt = super::tensor::Tensor::parse(v, "v", &dims)?;
            let (kv, vv) = (kt.view()?, vt.view()?);
            with(c, |g| imp::write_host(g, seq, layer, start, &kv, &vv))
        }
    })
}

/// Keep the first `new_len` tokens of a sequence.
///
/// # Safety
/// `cache` NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_truncate(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
    new_len: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_truncate", || with(cache_ref(cache)?, |g| g.truncate(seq, new_len)))
}

/// Evict whole pages (indices into the sequence's page list, strictly increasing).
///
/// # Safety
/// `cache` NULL or a live handle; `page_indices` NULL or readable for `n` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_evict_pages(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
    page_indices: *const usize,
    n: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_evict_pages", || {
        let c = cache_ref(cache)?;
        let idx = slice(page_indices, n, "page_indices")?;
        with(c, |g| g.evict_pages(seq, idx))
    })
}

/// Keep only the listed tokens, as `kvsieve_cache_compact` (same arguments).
///
/// # Safety
/// `cache` NULL or a live handle; `keep_indptr` NULL or readable for `num_lists + 1`
/// values; `keep` NULL or readable for `keep_len` values.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cache_compact(
    cache: *mut kvsieve_cuda_cache_t,
    seq: u64,
    kind: u32,
    keep_indptr: *const u32,
    num_lists: usize,
    keep: *const u32,
    keep_len: usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_compact", || {
        let c = cache_ref(cache)?;
        let lists = compact_lists(kind, keep_indptr, num_lists, keep, keep_len)?;
        with(c, |g| {
            let cfg = *g.config();
            g.compact(seq, keep_tokens(kind, &lists, &cfg)?)
        })
    })
}

/// A device descriptor of one layer of the cache for a batch of sequences, with a new device
/// page table (freed with `kvsieve_cuda_table_free`).
///
/// # Safety
/// `cache` NULL or a live handle; `seqs` NULL or readable for `num_seqs` values; the
/// out-parameters NULL or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvsieve_cuda_cache_layer_view(
    cache: *const kvsieve_cuda_cache_t,
    layer: usize,
    seqs: *const u64,
    num_seqs: usize,
    out_table: *mut *mut kvsieve_cuda_table_t,
    out_view: *mut kvsieve_paged_kv_t,
    out_key_bounds: *mut *const c_void,
    out_max_seq_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cache_layer_view", || {
        let c = cache_ref(cache)?;
        let ids = slice(seqs, num_seqs, "seqs")?;
        non_null(out_table, "out_table")?;
        let out_view = VersionedOut::new(out_view, "out_view")?;
        let (table, view, bounds, max_len) = with(c, |g| imp::layer_view(g, layer, ids))?;
        out_view.write(view);
        if !out_key_bounds.is_null() {
            write_out(out_key_bounds, bounds as *const c_void);
        }
        if !out_max_seq_len.is_null() {
            write_out(out_max_seq_len, max_len);
        }
        write_out(out_table, table);
        Ok(())
    })
}

/// Free a page table from `kvsieve_cuda_cache_layer_view`. NULL is ignored.
///
/// # Safety
/// `table` NULL or a live handle, freed once, no queued work still reading it.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_table_free(table: *mut kvsieve_cuda_table_t) {
    if !table.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(table))));
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use kvsieve::backend::cuda::{CudaKvCache, DeviceTensor};
    use kvsieve::error::{Error, Result};
    use kvsieve::tensor::TensorView;

    use super::super::cuda::DevTensor;
    use super::super::tensor::{kvsieve_device_t, kvsieve_dtype_t};
    use super::super::view::kvsieve_paged_kv_t;
    use super::{kvsieve_cuda_cache_t, kvsieve_cuda_table_t};

    pub(super) fn write_host(
        g: &mut CudaKvCache,
        seq: u64,
        layer: usize,
        start: usize,
        k: &TensorView,
        v: &TensorView,
    ) -> Result<()> {
        g.write(seq, layer, start, k, v)
    }

    /// # Safety
    /// The tensors' memory is valid device memory for their shapes and strides.
    pub(super) unsafe fn write_device(
        c: &kvsieve_cuda_cache_t,
        seq: u64,
        layer: usize,
        start: usize,
        k: &DevTensor,
        v: &DevTensor,
    ) -> Result<()> {
        let t = |x: &DevTensor| DeviceTensor {
            ptr: x.ptr,
            dtype: x.dtype,
            shape: x.shape.clone(),
            strides: x.strides.clone(),
            device: x.device,
        };
        super::with(c, |g| {
            if k.device != g.device().ordinal() {
                return Err(Error::invalid(
                    "k",
                    format!("memory on the cache's CUDA device {}, got device {}", g.device().ordinal(), k.device),
                ));
            }
            g.write_device(seq, layer, start, &t(k), &t(v))
        })
    }

    pub(super) fn layer_view(
        g: &mut CudaKvCache,
        layer: usize,
        ids: &[u64],
    ) -> Result<(*mut kvsieve_cuda_table_t, kvsieve_paged_kv_t, u64, usize)> {
        let table = g.page_table(ids)?;
        let max_len = table.max_seq_len();
        let (view, bounds) = {
            let v = g.layer_view(layer, &table)?;
            let l = v.layout();
            let (k, vp) = v.kv_ptrs();
            let (ip, ix, lp) = table.device_ptrs();
            let desc = kvsieve_paged_kv_t {
                struct_size: std::mem::size_of::<kvsieve_paged_kv_t>(),
                k: k as *const std::ffi::c_void,
                v: vp as *const std::ffi::c_void,
                device: kvsieve_device_t { device_type: super::super::cuda::DEVICE_CUDA, device_id: v.device() as i32 },
                dtype: kvsieve_dtype_t::from_dtype(l.dtype),
                key_rope: g.config().key_rope as u32,
                num_pages: l.num_pages,
                page_size: l.page_size,
                num_kv_heads: l.num_kv_heads,
                head_dim: l.head_dim,
                k_strides: l.k_strides.map(|x| x as i64),
                v_strides: l.v_strides.map(|x| x as i64),
                batch: ids.len(),
                indptr: ip as *const i32,
                indices: ix as *const i32,
                last_page_len: lp as *const i32,
                positions: v.positions_ptr().unwrap_or(0) as *const i32,
            };
            (desc, v.key_bounds().map_or(0, |b| b.ptr))
        };
        Ok((Box::into_raw(Box::new(kvsieve_cuda_table_t { _table: table })), view, bounds, max_len))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Without the `cuda` feature no cache handle can exist: `NoCache` has no values, so
    //! these bodies never run; they let the entry points type-check in every build.
    use kvsieve::error::Result;
    use kvsieve::tensor::TensorView;
    use kvsieve::KeepTokens;

    use super::super::cuda::DevTensor;
    use super::super::view::kvsieve_paged_kv_t;
    use super::{kvsieve_cuda_cache_t, kvsieve_cuda_table_t};

    pub(crate) enum NoCache {}

    impl NoCache {
        pub fn create_sequence(&mut self) -> u64 {
            match *self {}
        }
        pub fn fork(&mut self, _: u64) -> Result<u64> {
            match *self {}
        }
        pub fn free_sequence(&mut self, _: u64) -> Result<()> {
            match *self {}
        }
        pub fn seq_len(&self, _: u64) -> Result<usize> {
            match *self {}
        }
        pub fn append(&mut self, _: u64, _: usize, _: Option<&[i32]>) -> Result<Vec<i64>> {
            match *self {}
        }
        pub fn truncate(&mut self, _: u64, _: usize) -> Result<()> {
            match *self {}
        }
        pub fn evict_pages(&mut self, _: u64, _: &[usize]) -> Result<()> {
            match *self {}
        }
        pub fn compact(&mut self, _: u64, _: KeepTokens) -> Result<()> {
            match *self {}
        }
        pub fn config(&self) -> &kvsieve::CacheConfig {
            match *self {}
        }
    }

    pub(super) fn write_host(
        g: &mut NoCache,
        _: u64,
        _: usize,
        _: usize,
        _: &TensorView,
        _: &TensorView,
    ) -> Result<()> {
        match *g {}
    }

    pub(super) unsafe fn write_device(
        c: &kvsieve_cuda_cache_t,
        _: u64,
        _: usize,
        _: usize,
        _: &DevTensor,
        _: &DevTensor,
    ) -> Result<()> {
        match c._never {}
    }

    pub(super) fn layer_view(
        g: &mut NoCache,
        _: usize,
        _: &[u64],
    ) -> Result<(*mut kvsieve_cuda_table_t, kvsieve_paged_kv_t, u64, usize)> {
        match *g {}
    }
}
