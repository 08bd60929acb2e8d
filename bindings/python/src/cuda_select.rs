//! CUDA selection and prefill on device arrays given through DLPack: page key bounds and
//! page-bound selection, prefill with masks and token lists, a K-means index on the device
//! (`CudaClusterIndex`) with centroid retrieval, and GemFilter. As in `cuda.rs`, each call
//! checks its arguments on the host, runs kvsieve's CUDA backend with the GIL released and
//! writes its results in place into arrays the caller passes, on the given stream.

use std::sync::{Mutex, OnceLock};

use kvsieve::attention::StreamingWindow;
use kvsieve::select::gemfilter::GemFilterConfig;
use kvsieve::select::PageBoundsConfig;
use kvsieve::{DType, Error};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::i32_vec;
use crate::cluster::{cluster_config, coarse_rule, fine_rule, PyClusterIndex};
use crate::cuda::backend::attention::update_key_bounds;
use crate::cuda::backend::prefill::{prefill, PrefillMasks, PrefillQueries};
use crate::cuda::backend::select::cluster::{build_index, ClusterWorkspace, CudaClusterIndex};
use crate::cuda::backend::select::gemfilter::{gemfilter_select, GemFilterWorkspace};
use crate::cuda::backend::select::kmeans::Assignment;
use crate::cuda::backend::select::pages::{page_bounds, PageBoundsWorkspace};
use crate::cuda::backend::{CudaDevice, CudaSelections, DeviceTensor, KeyBoundsLayout};
use crate::cuda::{
    bad_shape, dlpack, f32_contiguous, invalid, non_null, paged_kv, shared, stream_handle, stream_on, token_lists,
    Shared,
};
use crate::errors::{detach, KvResultExt};
use crate::options::AttentionKw;
use crate::sparse::windows_arg;

#[doc = doc!(cuda_update_key_bounds)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, key_bounds, entries, *, layout = "nhd", stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_update_key_bounds<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    key_bounds: &Bound<'py, PyAny>,
    entries: &Bound<'py, PyAny>,
    layout: &str,
    stream: Option<i64>,
) -> PyResult<()> {
    let kp = dlpack(k_pages, "k_pages", stream)?;
    let vp = dlpack(v_pages, "v_pages", stream)?;
    let kb = dlpack(key_bounds, "key_bounds", stream)?;
    let en = dlpack(entries, "entries", stream)?;
    let pages = paged_kv(&kp, &vp, layout, "post", None, None)?;
    en.int_rows(4, "a contiguous int32 [n, 4] array (page, reset, mask low, mask high)").kv()?;
    let n = en.shape()[0].max(0) as usize;
    let (bounds, ents) = (kb.addr(), en.addr());
    let kv = pages.checked().kv()?;
    if n > 0 {
        non_null(bounds, "key_bounds").kv()?;
        non_null(ents, "entries").kv()?;
    }
    if n > i32::MAX as usize {
        return Err(Error::OutOfRange {
            param: "num_entries".into(),
            value: n as i64,
            range: format!("0..={}", i32::MAX),
        })
        .kv();
    }
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(kv.device)?;
        // SAFETY: every address comes from a DLPack capsule held until this call returns;
        // that the device memory holds what it claims (entries naming distinct pages of the
        // pool, bounds for every page) is the caller's promise, as documented.
        unsafe {
            let table = kv.table(0)?;
            let view = kv.view(&table)?;
            update_key_bounds(&dev, &view, bounds, ents, n, &stream_on(&dev, st))
        }
    })
}

#[doc = doc!(cuda_page_bounds)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, key_bounds, q, sel_indptr, sel_indices, *, max_seq_len, budget_tokens, min_pages = 0, layout = "nhd", stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_page_bounds<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    key_bounds: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    sel_indptr: &Bound<'py, PyAny>,
    sel_indices: &Bound<'py, PyAny>,
    max_seq_len: usize,
    budget_tokens: usize,
    min_pages: usize,
    layout: &str,
    stream: Option<i64>,
) -> PyResult<()> {
    let kp = dlpack(k_pages, "k_pages", stream)?;
    let vp = dlpack(v_pages, "v_pages", stream)?;
    let ip = dlpack(indptr, "indptr", stream)?;
    let ix = dlpack(indices, "indices", stream)?;
    let lp = dlpack(last_page_len, "last_page_len", stream)?;
    let kb = dlpack(key_bounds, "key_bounds", stream)?;
    let qd = dlpack(q, "q", stream)?;
    let si = dlpack(sel_indptr, "sel_indptr", stream)?;
    let sx = dlpack(sel_indices, "sel_indices", stream)?;
    let pages = paged_kv(&kp, &vp, layout, "post", Some((&ip, &ix, &lp)), None)?;
    let (sip, six) = (si.int_array(32)?, sx.int_array(32)?);
    let bounds = kb.addr();
    let cfg = PageBoundsConfig { budget_tokens, min_pages };
    let kv = pages.checked().kv()?;
    let q = qd.device_tensor(&["batch", "num_qo_heads", "head_dim"]).kv()?;
    cfg.validate().kv()?;
    for (addr, name) in [(bounds, "key_bounds"), (sip, "sel_indptr"), (six, "sel_indices")] {
        non_null(addr, name).kv()?;
    }
    let st = stream_handle(stream);
    // Scratch per (device, stream, batch shape): calls on one stream are ordered.
    static WORKSPACES: Shared<(usize, usize, [usize; 6]), Mutex<PageBoundsWorkspace>> = OnceLock::new();
    detach(py, move || {
        let dev = CudaDevice::get(kv.device)?;
        let (l, hq) = (kv.layout, q.shape[1]);
        // SAFETY: as in cuda_update_key_bounds; the key bounds are those
        // cuda_update_key_bounds keeps for these pages, the lists have the documented sizes.
        unsafe {
            let table = kv.table(max_seq_len)?;
            let view = kv.view(&table)?.with_key_bounds(KeyBoundsLayout { ptr: bounds })?;
            let shape = [kv.batch, max_seq_len, l.page_size, hq, l.num_kv_heads, l.head_dim];
            let ws = shared(&WORKSPACES, (kv.device, st, shape), || {
                PageBoundsWorkspace::for_view(&dev, &view, hq).map(Mutex::new)
            })?;
            let out = CudaSelections::from_device(sip, six, kv.batch, l.num_kv_heads, max_seq_len, kv.device)?;
            let mut ws = ws.lock().unwrap_or_else(|e| e.into_inner());
            page_bounds(&stream_on(&dev, st), &view, &q, &cfg, &mut ws, &out)
        }
    })
}

#[doc = doc!(cuda_paged_prefill)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, qo_indptr, out, *, causal = true, windows = None, sel_indptr = None, sel_indices = None, max_per_head = None, lse = None, layout = "nhd", scale = None, logit_soft_cap = None, stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_paged_prefill<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    qo_indptr: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    causal: bool,
    windows: Option<&Bound<'py, PyAny>>,
    sel_indptr: Option<&Bound<'py, PyAny>>,
    sel_indices: Option<&Bound<'py, PyAny>>,
    max_per_head: Option<usize>,
    lse: Option<&Bound<'py, PyAny>>,
    layout: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    stream: Option<i64>,
) -> PyResult<()> {
    let qo = i32_vec(qo_indptr, "qo_indptr")?;
    let wins = windows_arg(windows)?;
    let kp = dlpack(k_pages, "k_pages", stream)?;
    let vp = dlpack(v_pages, "v_pages", stream)?;
    let ip = dlpack(indptr, "indptr", stream)?;
    let ix = dlpack(indices, "indices", stream)?;
    let lp = dlpack(last_page_len, "last_page_len", stream)?;
    let qd = dlpack(q, "q", stream)?;
    let od = dlpack(out, "out", stream)?;
    let pages = paged_kv(&kp, &vp, layout, "post", Some((&ip, &ix, &lp)), None)?;
    let batch = pages.batch;
    if qo.len() != batch + 1 {
        return Err(bad_shape("qo_indptr", format!("[{}] (batch + 1)", batch + 1), format!("[{}]", qo.len()))).kv();
    }
    let ld = lse.map(|l| dlpack(l, "lse", stream)).transpose()?;
    let lse = match &ld {
        Some(l) => {
            let qs = qd.shape();
            if qs.len() != 3 {
                return Err(bad_shape("q", "[total, num_qo_heads, head_dim]", format!("{qs:?}"))).kv();
            }
            Some(f32_contiguous(l, &qs[..2])?)
        }
        None => None,
    };
    let lists = token_lists(sel_indptr, sel_indices, max_per_head, stream)?;
    let sel = lists.as_ref().map(|l| l.raw);
    let params = AttentionKw { scale, logit_soft_cap, ..Default::default() }.cuda_params().kv()?;
    let kv = pages.checked().kv()?;
    let wins = head_windows(&wins, kv.layout.num_kv_heads).kv()?;
    let dims = ["total", "num_qo_heads", "head_dim"];
    let q = qd.device_tensor(&dims).kv()?;
    let out = od.device_tensor(&dims).kv()?;
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(kv.device)?;
        // SAFETY: as in cuda_update_key_bounds; the token lists are ascending and in range.
        unsafe {
            // The prefill kernel bounds every sequence by its own table row, not by a maximum.
            let table = kv.table(i32::MAX as usize)?;
            let view = kv.view(&table)?;
            let s = stream_on(&dev, st);
            let queries = PrefillQueries::upload(&dev, &qo, &table, &s)?;
            let masks = if wins.is_empty() { None } else { Some(PrefillMasks::upload(&dev, &wins, &s)?) };
            let sels = match sel {
                Some((ip, ix, mp)) => {
                    Some(CudaSelections::from_device(ip, ix, kv.batch, kv.layout.num_kv_heads, mp, kv.device)?)
                }
                None => None,
            };
            let lse = lse.map(|p| DeviceTensor::contiguous(p, DType::F32, &[queries.total(), q.shape[1]], kv.device));
            prefill(&s, &view, &q, &queries, masks.as_ref(), sels.as_ref(), &out, lse.as_ref(), &params, causal)
        }
    })
}

/// `windows=` for the device prefill: none, or one per KV head, where a window of 0 tokens
/// means no window for its head (and then takes no sinks).
fn head_windows(
    windows: &[Option<StreamingWindow>],
    num_kv_heads: usize,
) -> Result<Vec<Option<StreamingWindow>>, Error> {
    let wins = windows
        .iter()
        .enumerate()
        .map(|(h, w)| match *w {
            Some(StreamingWindow { sinks: 0, window: 0 }) | None => Ok(None),
            Some(StreamingWindow { sinks, window: 0 }) => Err(invalid(
                format!("windows[{h}].sinks"),
                format!("0 when windows[{h}].window is 0 (an entry with window 0 means no window for that KV head), got {sinks}"),
            )),
            Some(w) => Ok(Some(w)),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    if !wins.is_empty() && wins.len() != num_kv_heads {
        return Err(bad_shape(
            "windows",
            format!("[{num_kv_heads}] (one per KV head) or none"),
            format!("[{}]", wins.len()),
        ));
    }
    Ok(wins)
}

#[doc = doc!(cuda_gemfilter_select)]
#[pyfunction]
#[pyo3(signature = (q, keys, indices, *, k, pool_kernel = 5, keep_first = 0, keep_last = 0, stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_gemfilter_select<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    k: usize,
    pool_kernel: usize,
    keep_first: usize,
    keep_last: usize,
    stream: Option<i64>,
) -> PyResult<()> {
    let qd = dlpack(q, "q", stream)?;
    let kd = dlpack(keys, "keys", stream)?;
    let id = dlpack(indices, "indices", stream)?;
    let dst = id.int_array(32)?;
    if id.shape().first().copied().unwrap_or(0) < k as i64 {
        return Err(bad_shape("indices", format!("room for k = {k} int32"), format!("{:?}", id.shape()))).kv();
    }
    let cfg = GemFilterConfig { k, pool_kernel, keep_first, keep_last };
    let q = qd.device_query().kv()?;
    let keys = kd.device_tensor(&["n", "num_kv_heads", "head_dim"]).kv()?;
    non_null(dst, "indices").kv()?;
    if q.device != keys.device {
        return Err(invalid("q", format!("memory on the keys' CUDA device {}, got device {}", keys.device, q.device)))
            .kv();
    }
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(keys.device)?;
        // SAFETY: `stream` as documented (see cuda_paged_decode).
        let s = unsafe { stream_on(&dev, st) };
        let (n, hq, d) = (keys.shape[0], q.shape[q.shape.len() - 2], keys.shape[2]);
        let mut ws = GemFilterWorkspace::new(&dev, n, hq, d, cfg.k.clamp(1, n.max(1)), &s)?;
        gemfilter_select(&s, &q, &keys, &cfg, &mut ws)?;
        // SAFETY: `dst` holds room for k int32 (checked above) on the keys' device; the
        // workspace's drop (cuMemFree) waits for the queued copy.
        unsafe { ws.copy_selected_to(dst, &s) }
    })
}

#[doc = doc!(CudaClusterIndex)]
#[pyclass(name = "CudaClusterIndex", module = "kvsieve", frozen)]
pub struct PyCudaClusterIndex {
    index: CudaClusterIndex,
    /// Retrieval scratch, made for one query head count (remade when another comes).
    ws: Mutex<Option<(usize, ClusterWorkspace)>>,
}

impl From<CudaClusterIndex> for PyCudaClusterIndex {
    fn from(index: CudaClusterIndex) -> Self {
        PyCudaClusterIndex { index, ws: Mutex::new(None) }
    }
}

/// The core names the coarse rules with spaces; the keywords have underscores.
fn rename_coarse(e: Error) -> Error {
    match e {
        Error::InvalidArgument { param, expected } if param.starts_with("coarse ") => {
            Error::InvalidArgument { param: param.replace(' ', "_"), expected }
        }
        e => e,
    }
}

/// A CUDA device ordinal (`device=`).
pub(crate) fn device_ordinal(device: i32) -> PyResult<usize> {
    usize::try_from(device).map_err(|_| invalid("device", format!("a CUDA device ordinal >= 0, got {device}"))).kv()
}

#[pymethods]
impl PyCudaClusterIndex {
    #[doc = doc!(CudaClusterIndex.upload)]
    #[staticmethod]
    #[pyo3(signature = (index, *, device = 0, stream = None))]
    fn upload(py: Python<'_>, index: PyRef<'_, PyClusterIndex>, device: i32, stream: Option<i64>) -> PyResult<Self> {
        let host = index.snapshot();
        let ordinal = device_ordinal(device)?;
        let st = stream_handle(stream);
        detach(py, move || {
            let dev = CudaDevice::get(ordinal)?;
            // SAFETY: `stream` as documented (see cuda_paged_decode).
            CudaClusterIndex::upload(&dev, &host, &unsafe { stream_on(&dev, st) })
        })
        .map(Self::from)
    }

    #[doc = doc!(CudaClusterIndex.build)]
    #[staticmethod]
    #[pyo3(signature = (keys, *, clusters, max_iter = 20, seed = 0, exclude_window = 0, coarse = None, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn build<'py>(
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        clusters: &Bound<'py, PyAny>,
        max_iter: i64,
        seed: i128,
        exclude_window: i64,
        coarse: Option<&Bound<'py, PyAny>>,
        stream: Option<i64>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let cfg = cluster_config(clusters, max_iter, seed, exclude_window, coarse)?;
        let kd = dlpack(keys, "keys", stream)?;
        let keys = kd.device_tensor(&["n", "num_kv_heads", "head_dim"]).kv()?;
        let st = stream_handle(stream);
        let (host, dev) = detach(py, move || {
            let dev = CudaDevice::get(keys.device)?;
            // SAFETY: the keys are device memory as their capsule describes, held until
            // this call returns; `stream` as documented (see cuda_paged_decode).
            let s = unsafe { stream_on(&dev, st) };
            build_index(&dev, &keys, &cfg, Assignment::default_for(keys.dtype, keys.shape[2]), &s)
        })?;
        PyTuple::new(
            py,
            [Bound::new(py, PyClusterIndex::from(host))?.into_any(), Bound::new(py, Self::from(dev))?.into_any()],
        )
    }

    #[doc = doc!(CudaClusterIndex.num_kv_heads)]
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.index.num_kv_heads()
    }
    #[doc = doc!(CudaClusterIndex.head_dim)]
    #[getter]
    fn head_dim(&self) -> usize {
        self.index.head_dim()
    }
    #[doc = doc!(CudaClusterIndex.num_clusters)]
    #[getter]
    fn num_clusters(&self) -> usize {
        self.index.num_clusters()
    }
    #[doc = doc!(CudaClusterIndex.num_coarse_clusters)]
    #[getter]
    fn num_coarse_clusters(&self) -> usize {
        self.index.num_coarse_clusters()
    }
    #[doc = doc!(CudaClusterIndex.clustered_len)]
    #[getter]
    fn clustered_len(&self) -> usize {
        self.index.clustered_len()
    }

    #[doc = doc!(CudaClusterIndex.retrieve)]
    #[pyo3(signature = (q, sel_indptr, sel_indices, *, threshold = None, budget = None, hierarchical = false, coarse_threshold = None, coarse_budget = None, coarse_budget_multiple = None, rank = "estimate", stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        sel_indptr: &Bound<'py, PyAny>,
        sel_indices: &Bound<'py, PyAny>,
        threshold: Option<&Bound<'py, PyAny>>,
        budget: Option<i64>,
        hierarchical: bool,
        coarse_threshold: Option<f64>,
        coarse_budget: Option<i64>,
        coarse_budget_multiple: Option<f64>,
        rank: &str,
        stream: Option<i64>,
    ) -> PyResult<()> {
        let (hk, m) = (self.index.num_kv_heads(), self.index.clustered_len());
        let fine = fine_rule(threshold, budget, hk, rank)?;
        let coarse = coarse_rule(hierarchical, coarse_threshold, coarse_budget, coarse_budget_multiple, &fine)?;
        let qd = dlpack(q, "q", stream)?;
        let si = dlpack(sel_indptr, "sel_indptr", stream)?;
        let sx = dlpack(sel_indices, "sel_indices", stream)?;
        let (sip, six) = (si.int_array(32)?, sx.int_array(32)?);
        if si.shape()[0] < (hk + 1) as i64 || sx.shape()[0] < (hk * m) as i64 {
            return Err(bad_shape(
                "sel_indices",
                format!("sel_indptr of at least {} and sel_indices of at least {} int32", hk + 1, hk * m),
                format!("{:?} and {:?}", si.shape(), sx.shape()),
            ))
            .kv();
        }
        let q = qd.device_query().kv()?;
        non_null(sip, "sel_indptr").kv()?;
        non_null(six, "sel_indices").kv()?;
        if coarse.is_some() && self.index.num_coarse_clusters() == 0 {
            return Err(invalid("hierarchical", "False for an index built without coarse= (it has no coarse level)"))
                .kv();
        }
        let st = stream_handle(stream);
        detach(py, || {
            let dev = CudaDevice::get(q.device)?;
            let hq = q.shape[q.shape.len() - 2];
            // SAFETY: the lists have the sizes checked above, on the query's device; `stream`
            // as documented (see cuda_paged_decode).
            let (out, s) = unsafe { (CudaSelections::from_device(sip, six, 1, hk, m, q.device)?, stream_on(&dev, st)) };
            let mut guard = self.ws.lock().unwrap_or_else(|e| e.into_inner());
            if guard.as_ref().is_none_or(|(n, _)| *n != hq) {
                *guard = Some((hq, ClusterWorkspace::new(&self.index, hq)?));
            }
            let ws = &mut guard.as_mut().expect("set above").1;
            match coarse {
                None => self.index.retrieve(&s, &q, &fine, ws, &out),
                Some(c) => self.index.retrieve_hierarchical(&s, &q, c, &fine, ws, &out).map_err(rename_coarse),
            }
        })
    }

    fn __repr__(&self) -> String {
        let i = &self.index;
        format!(
            "CudaClusterIndex(num_kv_heads={}, head_dim={}, num_clusters={}, num_coarse_clusters={}, clustered_len={})",
            i.num_kv_heads(),
            i.head_dim(),
            i.num_clusters(),
            i.num_coarse_clusters(),
            i.clustered_len()
        )
    }
}
