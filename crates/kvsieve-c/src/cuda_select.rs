//! `cuda.h`, key bounds, selection, prefill, clusters and GemFilter: the CUDA entry points
//! for selection and prefill, over device memory the engine owns, queued on its
//! `cudaStream_t`:
//! - `kvsieve_cuda_update_key_bounds`, `kvsieve_cuda_page_bounds`: Quest page bounds kept
//!   in an engine buffer and page-bound selection into a device CSR;
//! - `kvsieve_cuda_paged_prefill`: tensor-core prefill with sink / window / Λ masks and
//!   per-head token lists;
//! - `kvsieve_cuda_cluster_index_*`: a K-means index on the device (uploaded from a host
//!   index, or clustered on the device) and centroid retrieval into a device CSR;
//! - `kvsieve_cuda_gemfilter_select`: GemFilter's token choice on the device.
//!
//! As in `cuda`, every argument that lives on the host is checked before the device
//! is touched, and a build without the `cuda` feature answers `KVSIEVE_ERROR_CUDA_UNAVAILABLE`
//! after those checks.

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

use kvsieve::error::{Error, Result};

use super::args::{non_null, read_struct, read_versioned, slice, write_out};
use super::attention::{self, kvsieve_streaming_window_t};
use super::cluster::{index_ref, kvsieve_cluster_config_t, kvsieve_cluster_index_t};
use super::cluster_retrieve::kvsieve_retrieve_config_t;
use super::cuda::{device_tensor, parse_kv, DevTensor};
use super::error::{guard, kvsieve_error_t};
use super::gemfilter::kvsieve_gemfilter_config_t;
use super::params::{attention_params, kvsieve_attention_params_t};
use super::selection::kvsieve_page_bounds_config_t;
use super::tensor::kvsieve_tensor_t;
use super::view::kvsieve_paged_kv_t;

/// One page's key-bound update (see `kvsieve_key_bounds_entry_t` in the header): fold the
/// keys in the slots set in `slot_mask` into the bounds of `page`, starting from the stored
/// bounds, or from empty when `reset` is non-zero.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_key_bounds_entry_t {
    pub page: i32,
    pub reset: u32,
    pub slot_mask: u64,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_key_bounds_entry_t>() == 16 && align_of::<kvsieve_key_bounds_entry_t>() == 8);
    assert!(offset_of!(kvsieve_key_bounds_entry_t, reset) == 4);
    assert!(offset_of!(kvsieve_key_bounds_entry_t, slot_mask) == 8);
};

/// A K-means index resident on one CUDA device (see `kvsieve_cuda_cluster_index_t` in the
/// header). Built only by a library with the `cuda` feature.
#[allow(non_camel_case_types)]
pub struct kvsieve_cuda_cluster_index_t {
    #[cfg(feature = "cuda")]
    inner: imp::DeviceIndex,
    #[cfg(not(feature = "cuda"))]
    _never: std::convert::Infallible,
}

/// A decode query of one sequence in device memory: `[num_qo_heads, head_dim]` or
/// `[1, num_qo_heads, head_dim]`.
///
/// # Safety
/// As for [`device_tensor`].
unsafe fn device_query(q: *const kvsieve_tensor_t, name: &str) -> Result<DevTensor> {
    if read_struct(q, name)?.ndim == 2 {
        device_tensor(q, name, &["num_qo_heads", "head_dim"])
    } else {
        device_tensor(q, name, &["1", "num_qo_heads", "head_dim"])
    }
}

/// Update Quest key bounds kept in engine device memory.
///
/// # Safety
/// As the header documents: `kv` a readable descriptor of device pages; `key_bounds` device
/// memory for the bounds of every page of the pool; `entries` device memory for
/// `num_entries` entries with distinct pages.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_update_key_bounds(
    kv: *const kvsieve_paged_kv_t,
    key_bounds: *mut c_void,
    entries: *const kvsieve_key_bounds_entry_t,
    num_entries: usize,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_update_key_bounds", || {
        let d = parse_kv(kv)?;
        if num_entries > 0 {
            non_null(key_bounds, "key_bounds")?;
            non_null(entries, "entries")?;
        }
        if num_entries > i32::MAX as usize {
            return Err(Error::out_of_range("num_entries", num_entries as i64, format!("0..={}", i32::MAX)));
        }
        imp::update_key_bounds(&d, key_bounds as u64, entries as u64, num_entries, stream)
    })
}

/// Page-bound (Quest) selection on the device into an engine CSR.
///
/// # Safety
/// As the header documents: `kv`, `q` readable descriptors of device memory; `key_bounds`
/// the bounds `kvsieve_cuda_update_key_bounds` keeps; `sel_indptr` and `sel_indices`
/// writable device memory of the documented sizes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvsieve_cuda_page_bounds(
    kv: *const kvsieve_paged_kv_t,
    max_seq_len: usize,
    key_bounds: *const c_void,
    q: *const kvsieve_tensor_t,
    config: *const kvsieve_page_bounds_config_t,
    sel_indptr: *mut i32,
    sel_indices: *mut i32,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_page_bounds", || {
        let d = parse_kv(kv)?;
        let q = device_tensor(q, "q", &["batch", "num_qo_heads", "head_dim"])?;
        let c = read_versioned(config, "config")?;
        non_null(key_bounds, "key_bounds")?;
        non_null(sel_indptr, "sel_indptr")?;
        non_null(sel_indices, "sel_indices")?;
        let cfg = kvsieve::select::PageBoundsConfig { budget_tokens: c.budget_tokens, min_pages: c.min_pages };
        cfg.validate()?;
        imp::page_bounds(&d, max_seq_len, key_bounds as u64, &q, &cfg, (sel_indptr as u64, sel_indices as u64), stream)
    })
}

/// Prefill attention on the GPU over engine-owned pages, with optional per-KV-head windows
/// and per-(sequence, KV head) token lists.
///
/// # Safety
/// As the header documents: `kv`, `q`, `out` readable descriptors of device memory;
/// `qo_indptr` host memory for `kv->batch + 1` values; `windows` host memory for
/// `num_windows` entries; `sel_indptr`, `sel_indices` NULL or device lists; `lse` NULL or
/// device memory for `total * num_qo_heads` floats.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvsieve_cuda_paged_prefill(
    kv: *const kvsieve_paged_kv_t,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    causal: bool,
    windows: *const kvsieve_streaming_window_t,
    num_windows: usize,
    sel_indptr: *const i32,
    sel_indices: *const i32,
    max_per_head: usize,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_paged_prefill", || {
        let d = parse_kv(kv)?;
        let qo = slice(qo_indptr, d.batch + 1, "qo_indptr")?.to_vec();
        let (wins, _) = attention::windows(windows, num_windows)?;
        if !wins.is_empty() && wins.len() != d.layout.num_kv_heads {
            return Err(Error::shape(
                "windows",
                format!("[{}] (one per KV head) or none", d.layout.num_kv_heads),
                format!("[{}]", wins.len()),
            ));
        }
        let sel = match (sel_indptr.is_null(), sel_indices.is_null()) {
            (true, true) => None,
            (false, false) => Some((sel_indptr as u64, sel_indices as u64, max_per_head)),
            _ => return Err(Error::invalid("sel_indptr", "sel_indptr and sel_indices both set or both NULL")),
        };
        let q = device_tensor(q, "q", &["total", "num_qo_heads", "head_dim"])?;
        let out = device_tensor(out, "out", &["total", "num_qo_heads", "head_dim"])?;
        let params = attention_params(params)?;
        imp::prefill(&d, &q, &qo, causal, &wins, sel, &out, lse as u64, &params, stream)
    })
}

/// Copy a host K-means index to CUDA device `device_id`.
///
/// # Safety
/// `index` NULL or a live host index handle; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cluster_index_upload(
    index: *const kvsieve_cluster_index_t,
    device_id: i32,
    stream: *mut c_void,
    out: *mut *mut kvsieve_cuda_cluster_index_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cluster_index_upload", || {
        let ix = index_ref(index, "index")?;
        non_null(out, "out")?;
        let ordinal = usize::try_from(device_id)
            .map_err(|_| Error::invalid("device_id", format!("a CUDA device ordinal >= 0, got {device_id}")))?;
        let h = imp::upload(&ix.inner.read(), ordinal, stream)?;
        write_out(out, h);
        Ok(())
    })
}

/// Cluster keys held in device memory on the device (k-means++ and Lloyd iterations).
///
/// # Safety
/// `keys` a readable descriptor of device memory; `config` NULL or readable; `out_host` NULL
/// or writable; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cluster_index_build(
    keys: *const kvsieve_tensor_t,
    config: *const kvsieve_cluster_config_t,
    stream: *mut c_void,
    out_host: *mut *mut kvsieve_cluster_index_t,
    out: *mut *mut kvsieve_cuda_cluster_index_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cluster_index_build", || {
        let keys = device_tensor(keys, "keys", &["n", "num_kv_heads", "head_dim"])?;
        let (cfg, names) = read_versioned(config, "config")?.to_core()?;
        non_null(out, "out")?;
        let (host, dev) = imp::build(&keys, &cfg, stream).map_err(names)?;
        if !out_host.is_null() {
            write_out(out_host, super::cluster::into_index_handle(host));
        }
        write_out(out, dev);
        Ok(())
    })
}

/// Free a device index. NULL is ignored.
///
/// # Safety
/// `index` NULL or a live handle, freed once, with no call on it running and no queued work
/// still reading it.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cluster_index_free(index: *mut kvsieve_cuda_cluster_index_t) {
    if !index.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(index))));
    }
}

/// Shape of a device index: KV heads, head_dim, fine and coarse clusters per head, and the
/// clustered tokens (what sizes retrieval's output). Each out-parameter may be NULL.
///
/// # Safety
/// `index` NULL or a live handle; each out-parameter NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cluster_index_info(
    index: *const kvsieve_cuda_cluster_index_t,
    num_kv_heads: *mut usize,
    head_dim: *mut usize,
    num_clusters: *mut usize,
    num_coarse_clusters: *mut usize,
    clustered_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cluster_index_info", || {
        let ix = cuda_index_ref(index)?;
        let vals = imp::info(ix);
        for (p, v) in [num_kv_heads, head_dim, num_clusters, num_coarse_clusters, clustered_len].into_iter().zip(vals) {
            if !p.is_null() {
                write_out(p, v);
            }
        }
        Ok(())
    })
}

/// Centroid retrieval on the device into an engine CSR over KV heads.
///
/// # Safety
/// `index` NULL or a live handle; `q` a readable descriptor of device memory; `config` NULL
/// or readable (its `thresholds` host memory); `sel_indptr`, `sel_indices` writable device
/// memory of the documented sizes.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_cluster_index_retrieve(
    index: *const kvsieve_cuda_cluster_index_t,
    q: *const kvsieve_tensor_t,
    config: *const kvsieve_retrieve_config_t,
    sel_indptr: *mut i32,
    sel_indices: *mut i32,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_cluster_index_retrieve", || {
        let ix = cuda_index_ref(index)?;
        let q = device_query(q, "q")?;
        let c = read_versioned(config, "config")?;
        non_null(sel_indptr, "sel_indptr")?;
        non_null(sel_indices, "sel_indices")?;
        imp::retrieve(ix, &q, &c, (sel_indptr as u64, sel_indices as u64), stream)
    })
}

/// GemFilter on the device: the `config->k` tokens the query points at, ascending, written
/// to device memory.
///
/// # Safety
/// `q`, `keys` readable descriptors of device memory; `config` NULL or readable; `indices`
/// writable device memory for `config->k` int32.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_gemfilter_select(
    q: *const kvsieve_tensor_t,
    keys: *const kvsieve_tensor_t,
    config: *const kvsieve_gemfilter_config_t,
    indices: *mut i32,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_gemfilter_select", || {
        let q = device_query(q, "q")?;
        let keys = device_tensor(keys, "keys", &["n", "num_kv_heads", "head_dim"])?;
        let cfg = read_versioned(config, "config")?.to_core();
        non_null(indices, "indices")?;
        imp::gemfilter_select(&q, &keys, &cfg, indices as u64, stream)
    })
}

/// The handle behind a pointer.
///
/// # Safety
/// `index` NULL or a live handle.
unsafe fn cuda_index_ref<'a>(index: *const kvsieve_cuda_cluster_index_t) -> Result<&'a kvsieve_cuda_cluster_index_t> {
    non_null(index, "index")?;
    if !(index as usize).is_multiple_of(align_of::<kvsieve_cuda_cluster_index_t>()) {
        return Err(Error::invalid("index", "a device cluster index handle returned by kvsieve"));
    }
    Ok(&*index)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    use kvsieve::attention::{AttentionParams, StreamingWindow};
    use kvsieve::backend::cuda::attention::update_key_bounds as update_bounds;
    use kvsieve::backend::cuda::prefill::{prefill as device_prefill, PrefillMasks, PrefillQueries};
    use kvsieve::backend::cuda::select::cluster::{build_index, ClusterWorkspace, CudaClusterIndex};
    use kvsieve::backend::cuda::select::gemfilter::{gemfilter_select as device_gemfilter, GemFilterWorkspace};
    use kvsieve::backend::cuda::select::kmeans::Assignment;
    use kvsieve::backend::cuda::select::pages::{page_bounds as device_page_bounds, PageBoundsWorkspace};
    use kvsieve::backend::cuda::{
        CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceTensor, KeyBoundsLayout, Stream,
    };
    use kvsieve::dtype::DType;
    use kvsieve::error::{Error, Result};
    use kvsieve::select::cluster::{ClusterConfig, ClusterIndex};
    use kvsieve::select::gemfilter::GemFilterConfig;
    use kvsieve::select::PageBoundsConfig;

    use super::super::cluster_retrieve::{kvsieve_retrieve_config_t, rename_coarse, retrieval_rule};
    use super::super::cuda::{DevTensor, Kv};
    use super::kvsieve_cuda_cluster_index_t;

    fn tensor(t: &DevTensor) -> DeviceTensor {
        DeviceTensor {
            ptr: t.ptr,
            dtype: t.dtype,
            shape: t.shape.clone(),
            strides: t.strides.clone(),
            device: t.device,
        }
    }

    /// The engine's stream on `dev`.
    ///
    /// # Safety
    /// `raw` NULL or a live stream of the device's primary context.
    unsafe fn stream_of(dev: &CudaDevice, raw: *mut c_void) -> Stream {
        dev.borrow_stream(raw)
    }

    /// A view of the descriptor's pages with the table it names (device arrays).
    ///
    /// # Safety
    /// The descriptor's pointers are device memory as the header documents.
    unsafe fn table(d: &Kv, max_seq_len: usize) -> Result<CudaPageTable> {
        CudaPageTable::from_device(d.indptr, d.indices, d.last_page_len, d.batch, max_seq_len, d.device)
    }

    pub(super) unsafe fn update_key_bounds(
        d: &Kv,
        bounds: u64,
        entries: u64,
        n: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        let dev = CudaDevice::get(d.device)?;
        let t = CudaPageTable::from_device(0, 0, 0, 0, 0, d.device)?;
        let view = CudaPagedKv::from_raw(d.k, d.v, d.layout, &t)?;
        let s = stream_of(&dev, stream);
        update_bounds(&dev, &view, bounds, entries, n, &s)
    }

    /// Page-bound scratch per (device, stream, batch shape): calls on one stream are ordered.
    type PageWorkspaces = Mutex<HashMap<(usize, usize, [usize; 6]), Arc<Mutex<PageBoundsWorkspace>>>>;

    pub(super) unsafe fn page_bounds(
        d: &Kv,
        max_seq_len: usize,
        bounds: u64,
        q: &DevTensor,
        cfg: &PageBoundsConfig,
        sel: (u64, u64),
        stream: *mut c_void,
    ) -> Result<()> {
        let dev = CudaDevice::get(d.device)?;
        let t = table(d, max_seq_len)?;
        let view = CudaPagedKv::from_raw(d.k, d.v, d.layout, &t)?
            .with_key_rope(d.key_rope)
            .with_key_bounds(KeyBoundsLayout { ptr: bounds })?;
        let hq = q.shape[1];
        let shape = [d.batch, max_seq_len, d.layout.page_size, hq, d.layout.num_kv_heads, d.layout.head_dim];
        static MAP: OnceLock<PageWorkspaces> = OnceLock::new();
        let ws = {
            let mut m = MAP.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&(d.device, stream as usize, shape)) {
                Some(w) => w.clone(),
                None => {
                    let w = Arc::new(Mutex::new(PageBoundsWorkspace::for_view(&dev, &view, hq)?));
                    m.insert((d.device, stream as usize, shape), w.clone());
                    w
                }
            }
        };
        let out = CudaSelections::from_device(sel.0, sel.1, d.batch, d.layout.num_kv_heads, max_seq_len, d.device)?;
        let s = stream_of(&dev, stream);
        let mut ws = ws.lock().unwrap_or_else(|e| e.into_inner());
        device_page_bounds(&s, &view, &tensor(q), cfg, &mut ws, &out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn prefill(
        d: &Kv,
        q: &DevTensor,
        qo: &[i32],
        causal: bool,
        windows: &[Option<StreamingWindow>],
        sel: Option<(u64, u64, usize)>,
        out: &DevTensor,
        lse: u64,
        params: &AttentionParams,
        stream: *mut c_void,
    ) -> Result<()> {
        let dev = CudaDevice::get(d.device)?;
        // The prefill kernel bounds every sequence by its own table row, not by max_seq_len.
        let t = table(d, i32::MAX as usize)?;
        let mut view = CudaPagedKv::from_raw(d.k, d.v, d.layout, &t)?.with_key_rope(d.key_rope);
        if d.positions != 0 {
            view = view.with_positions(d.positions)?;
        }
        let s = stream_of(&dev, stream);
        let queries = PrefillQueries::upload(&dev, qo, &t, &s)?;
        let masks = if windows.is_empty() { None } else { Some(PrefillMasks::upload(&dev, windows, &s)?) };
        let sels = match sel {
            Some((ip, ix, m)) => {
                Some(CudaSelections::from_device(ip, ix, d.batch, d.layout.num_kv_heads, m, d.device)?)
            }
            None => None,
        };
        let lse_t =
            (lse != 0).then(|| DeviceTensor::contiguous(lse, DType::F32, &[queries.total(), q.shape[1]], d.device));
        device_prefill(
            &s,
            &view,
            &tensor(q),
            &queries,
            masks.as_ref(),
            sels.as_ref(),
            &tensor(out),
            lse_t.as_ref(),
            params,
            causal,
        )
    }

    /// A device index and its retrieval scratch (made for one query head count, remade when
    /// another comes).
    pub(crate) struct DeviceIndex {
        index: CudaClusterIndex,
        ws: Mutex<Option<(usize, ClusterWorkspace)>>,
    }

    fn handle(index: CudaClusterIndex) -> *mut kvsieve_cuda_cluster_index_t {
        Box::into_raw(Box::new(kvsieve_cuda_cluster_index_t { inner: DeviceIndex { index, ws: Mutex::new(None) } }))
    }

    pub(super) unsafe fn upload(
        ix: &ClusterIndex,
        ordinal: usize,
        stream: *mut c_void,
    ) -> Result<*mut kvsieve_cuda_cluster_index_t> {
        let dev = CudaDevice::get(ordinal)?;
        let s = stream_of(&dev, stream);
        Ok(handle(CudaClusterIndex::upload(&dev, ix, &s)?))
    }

    pub(super) unsafe fn build(
        keys: &DevTensor,
        cfg: &ClusterConfig,
        stream: *mut c_void,
    ) -> Result<(ClusterIndex, *mut kvsieve_cuda_cluster_index_t)> {
        let dev = CudaDevice::get(keys.device)?;
        let s = stream_of(&dev, stream);
        let assignment = Assignment::default_for(keys.dtype, keys.shape[2]);
        let (host, device) = build_index(&dev, &tensor(keys), cfg, assignment, &s)?;
        Ok((host, handle(device)))
    }

    pub(super) fn info(h: &kvsieve_cuda_cluster_index_t) -> [usize; 5] {
        let ix = &h.inner.index;
        [ix.num_kv_heads(), ix.head_dim(), ix.num_clusters(), ix.num_coarse_clusters(), ix.clustered_len()]
    }

    pub(super) unsafe fn retrieve(
        h: &kvsieve_cuda_cluster_index_t,
        q: &DevTensor,
        c: &kvsieve_retrieve_config_t,
        sel: (u64, u64),
        stream: *mut c_void,
    ) -> Result<()> {
        let ix = &h.inner.index;
        let (fine, coarse) = retrieval_rule(c, ix.num_coarse_clusters())?;
        let dev = CudaDevice::get(q.device)?;
        let hq = q.shape[q.shape.len() - 2];
        let out = CudaSelections::from_device(sel.0, sel.1, 1, ix.num_kv_heads(), ix.clustered_len(), q.device)?;
        let s = stream_of(&dev, stream);
        let mut guard = h.inner.ws.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|(n, _)| *n != hq) {
            *guard = Some((hq, ClusterWorkspace::new(ix, hq)?));
        }
        let ws = &mut guard.as_mut().expect("set above").1;
        let qt = tensor(q);
        match coarse {
            None => ix.retrieve(&s, &qt, &fine, ws, &out),
            Some(c) => ix.retrieve_hierarchical(&s, &qt, c, &fine, ws, &out).map_err(rename_coarse),
        }
    }

    pub(super) unsafe fn gemfilter_select(
        q: &DevTensor,
        keys: &DevTensor,
        cfg: &GemFilterConfig,
        indices: u64,
        stream: *mut c_void,
    ) -> Result<()> {
        if q.device != keys.device {
            return Err(Error::invalid(
                "q",
                format!("memory on the keys' CUDA device {}, got device {}", keys.device, q.device),
            ));
        }
        let dev = CudaDevice::get(keys.device)?;
        let s = stream_of(&dev, stream);
        let (n, hq, d) = (keys.shape[0], q.shape[q.shape.len() - 2], keys.shape[2]);
        let mut ws = GemFilterWorkspace::new(&dev, n, hq, d, cfg.k.clamp(1, n.max(1)), &s)?;
        device_gemfilter(&s, &tensor(q), &tensor(keys), cfg, &mut ws)?;
        // cuMemFree (the workspace's drop) waits for the queued copy.
        ws.copy_selected_to(indices, &s)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! Without the `cuda` feature every call ends here, after its host-side checks.
    use std::ffi::c_void;

    use kvsieve::attention::{AttentionParams, StreamingWindow};
    use kvsieve::error::Result;
    use kvsieve::select::cluster::{ClusterConfig, ClusterIndex};
    use kvsieve::select::gemfilter::GemFilterConfig;
    use kvsieve::select::PageBoundsConfig;

    use super::super::cluster_retrieve::kvsieve_retrieve_config_t;
    use super::super::cuda::{unavailable, DevTensor, Kv};
    use super::kvsieve_cuda_cluster_index_t;

    pub(super) unsafe fn update_key_bounds(_: &Kv, _: u64, _: u64, _: usize, _: *mut c_void) -> Result<()> {
        Err(unavailable())
    }

    pub(super) unsafe fn page_bounds(
        _: &Kv,
        _: usize,
        _: u64,
        _: &DevTensor,
        _: &PageBoundsConfig,
        _: (u64, u64),
        _: *mut c_void,
    ) -> Result<()> {
        Err(unavailable())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn prefill(
        _: &Kv,
        _: &DevTensor,
        _: &[i32],
        _: bool,
        _: &[Option<StreamingWindow>],
        _: Option<(u64, u64, usize)>,
        _: &DevTensor,
        _: u64,
        _: &AttentionParams,
        _: *mut c_void,
    ) -> Result<()> {
        Err(unavailable())
    }

    pub(super) unsafe fn upload(
        _: &ClusterIndex,
        _: usize,
        _: *mut c_void,
    ) -> Result<*mut kvsieve_cuda_cluster_index_t> {
        Err(unavailable())
    }

    pub(super) unsafe fn build(
        _: &DevTensor,
        _: &ClusterConfig,
        _: *mut c_void,
    ) -> Result<(ClusterIndex, *mut kvsieve_cuda_cluster_index_t)> {
        Err(unavailable())
    }

    pub(super) fn info(h: &kvsieve_cuda_cluster_index_t) -> [usize; 5] {
        match h._never {}
    }

    pub(super) unsafe fn retrieve(
        h: &kvsieve_cuda_cluster_index_t,
        _: &DevTensor,
        _: &kvsieve_retrieve_config_t,
        _: (u64, u64),
        _: *mut c_void,
    ) -> Result<()> {
        match h._never {}
    }

    pub(super) unsafe fn gemfilter_select(
        _: &DevTensor,
        _: &DevTensor,
        _: &GemFilterConfig,
        _: u64,
        _: *mut c_void,
    ) -> Result<()> {
        Err(unavailable())
    }
}
