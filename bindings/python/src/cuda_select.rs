//! CUDA selection and prefill on device arrays given through DLPack: page key bounds and
//! page-bound selection, prefill with masks and token lists, a K-means index on the device
//! (`CudaClusterIndex`) with centroid retrieval, and GemFilter. As in `cuda.rs`, each call
//! goes through the C ABI's `kvsieve_cuda_*` entry points and writes its results in place
//! into arrays the caller passes, on the given stream.

use std::ffi::c_void;
use std::ptr;

use kvsieve::ffi::{self as c, kvsieve_attention_params_t, kvsieve_cluster_config_t, kvsieve_retrieve_config_t, kvsieve_streaming_window_t};
use kvsieve::select::cluster::{CoarseRetrieve, Retrieve};
use kvsieve::Error;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::arrays::i32_vec;
use crate::cluster::{cluster_config, coarse_rule, fine_rule, PyClusterIndex};
use crate::cuda::{call_detached, check, dlpack, paged_kv, Raw};
use crate::errors::KvResultExt;
use crate::sparse::windows_arg;

/// Update page key bounds kept in a device array (`[num_pages, num_kv_heads, 2, head_dim]`
/// of the page dtype) from the keys in the slots ``entries`` names: an int32 device array
/// ``[n, 4]`` of (page, reset, slot mask low 32 bits, slot mask high 32 bits).
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
    let desc = paged_kv(&kp, &vp, layout, "post", None, None)?;
    let es = en.shape();
    let row_major = en.strides().is_none_or(|s| s.len() == 2 && (s[1] == 1 || es[1] <= 1) && (s[0] == 4 || es[0] <= 1));
    if en.t.dtype.code != 0 || en.t.dtype.bits != 32 || es.len() != 2 || es[1] != 4 || !row_major {
        return Err(Error::Shape {
            param: "entries".into(),
            expected: "a contiguous int32 [n, 4] array (page, reset, mask low, mask high)".into(),
            got: format!("shape {es:?}, DLPack code {} bits {}", en.t.dtype.code, en.t.dtype.bits),
        })
        .kv();
    }
    let n = es[0].max(0) as usize;
    let (bounds, ents) = (kb.addr() as usize, en.addr() as usize);
    call_detached(py, stream, desc, move |desc, st| {
        // SAFETY: every pointer comes from a live DLPack capsule held until the call returns;
        // the device memory's contents are the caller's promise, as the C header documents.
        unsafe { c::kvsieve_cuda_update_key_bounds(&desc, bounds as *mut c_void, ents as *const c::kvsieve_key_bounds_entry_t, n, st) }
    })
}

/// Page-bound (Quest) selection on the GPU for every sequence of the page table, written
/// into device int32 arrays ``sel_indptr`` (``batch * num_kv_heads + 1``) and
/// ``sel_indices`` (room for ``batch * num_kv_heads * max_seq_len``).
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
    let desc = paged_kv(&kp, &vp, layout, "post", Some((&ip, &ix, &lp)), None)?;
    let (sip, six) = (si.int_array(32)? as usize, sx.int_array(32)? as usize);
    let bounds = kb.addr() as usize;
    let cfg = c::kvsieve_page_bounds_config_t { budget_tokens, min_pages };
    call_detached(py, stream, (desc, qd.t), move |(desc, qt), st| {
        // SAFETY: as in cuda_update_key_bounds.
        unsafe { c::kvsieve_cuda_page_bounds(&desc, max_seq_len, bounds as *const c_void, &qt, &cfg, sip as *mut i32, six as *mut i32, st) }
    })
}

/// Prefill attention on the GPU (tensor cores) over device pages with keys after RoPE:
/// ``qo_indptr`` is a host sequence, ``windows`` optional (sinks, window) pairs per KV head,
/// ``sel_indptr``/``sel_indices`` optional device token lists; writes ``out`` (and ``lse``).
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
    let wins: Vec<kvsieve_streaming_window_t> = windows_arg(windows)?
        .into_iter()
        .map(|w| w.map_or(kvsieve_streaming_window_t { sinks: 0, window: 0 }, |w| kvsieve_streaming_window_t { sinks: w.sinks, window: w.window }))
        .collect();
    let kp = dlpack(k_pages, "k_pages", stream)?;
    let vp = dlpack(v_pages, "v_pages", stream)?;
    let ip = dlpack(indptr, "indptr", stream)?;
    let ix = dlpack(indices, "indices", stream)?;
    let lp = dlpack(last_page_len, "last_page_len", stream)?;
    let qd = dlpack(q, "q", stream)?;
    let od = dlpack(out, "out", stream)?;
    let desc = paged_kv(&kp, &vp, layout, "post", Some((&ip, &ix, &lp)), None)?;
    if qo.len() != desc.batch + 1 {
        return Err(Error::Shape { param: "qo_indptr".into(), expected: format!("[{}] (batch + 1)", desc.batch + 1), got: format!("[{}]", qo.len()) }).kv();
    }
    let lse_ptr = match lse {
        Some(l) => {
            let l = dlpack(l, "lse", stream)?;
            let qs = qd.shape();
            if qs.len() != 3 {
                return Err(Error::Shape { param: "q".into(), expected: "[total, num_qo_heads, head_dim]".into(), got: format!("{qs:?}") }).kv();
            }
            crate::cuda::f32_contiguous(&l, &qs[..2])? as usize
        }
        None => 0,
    };
    let lists = match (sel_indptr, sel_indices) {
        (None, None) => None,
        (Some(a), Some(b)) => {
            let a = dlpack(a, "sel_indptr", stream)?;
            let b = dlpack(b, "sel_indices", stream)?;
            let mp = max_per_head
                .ok_or_else(|| Error::InvalidArgument { param: "max_per_head".into(), expected: "an upper bound on every list's length (with sel_indptr)".into() })
                .kv()?;
            Some((a.int_array(32)? as usize, b.int_array(32)? as usize, mp))
        }
        _ => return Err(Error::InvalidArgument { param: "sel_indices".into(), expected: "sel_indptr and sel_indices together".into() }).kv(),
    };
    let pc = kvsieve_attention_params_t {
        scale: scale.unwrap_or(0.0),
        logit_soft_cap: logit_soft_cap.unwrap_or(0.0),
        rope: ptr::null(),
        chunk_size: 0,
        position_mode: c::POSITIONS_ORIGINAL,
        max_distance: 0,
    };
    call_detached(py, stream, (desc, qd.t, od.t, pc), move |(desc, qt, ot, pc), st| {
        let (sip, six, mp) = lists.unwrap_or((0, 0, 0));
        let wp = if wins.is_empty() { ptr::null() } else { wins.as_ptr() };
        // SAFETY: as in cuda_update_key_bounds; `qo` and `wins` are host memory read during the call.
        unsafe {
            c::kvsieve_cuda_paged_prefill(
                &desc,
                &qt,
                qo.as_ptr(),
                causal,
                wp,
                wins.len(),
                sip as *const i32,
                six as *const i32,
                mp,
                &ot,
                lse_ptr as *mut f32,
                &pc,
                st,
            )
        }
    })
}

/// GemFilter on the GPU: the ``k`` tokens the last query points at, ascending, written to
/// the device int32 array ``indices`` (``k`` values).
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
    let out = id.int_array(32)? as usize;
    if id.shape().first().copied().unwrap_or(0) < k as i64 {
        return Err(Error::Shape { param: "indices".into(), expected: format!("room for k = {k} int32"), got: format!("{:?}", id.shape()) }).kv();
    }
    let cfg = c::kvsieve_gemfilter_config_t { k, pool_kernel, keep_first, keep_last };
    call_detached(py, stream, (qd.t, kd.t), move |(qt, kt), st| {
        // SAFETY: as in cuda_update_key_bounds.
        unsafe { c::kvsieve_cuda_gemfilter_select(&qt, &kt, &cfg, out as *mut i32, st) }
    })
}

/// A K-means index on a CUDA device for centroid retrieval on the GPU. See the stub.
#[pyclass(name = "CudaClusterIndex", module = "kvsieve", frozen)]
pub struct PyCudaClusterIndex {
    handle: usize,
}

impl Drop for PyCudaClusterIndex {
    fn drop(&mut self) {
        // SAFETY: the handle came from the C ABI and is freed once, here.
        unsafe { c::kvsieve_cuda_cluster_index_free(self.handle as *mut c::kvsieve_cuda_cluster_index_t) };
    }
}

impl PyCudaClusterIndex {
    fn info(&self) -> PyResult<[usize; 5]> {
        let mut v = [0usize; 5];
        let [a, b, cc, d, e] = &mut v;
        // SAFETY: a live handle; the out-parameters are writable.
        check(unsafe { c::kvsieve_cuda_cluster_index_info(self.handle as *const _, a, b, cc, d, e) })?;
        Ok(v)
    }
}

/// The C form of a retrieval rule (thresholds point into `taus`, which must outlive it).
fn retrieve_config(fine: &Retrieve, coarse: Option<CoarseRetrieve>, taus: &[f64]) -> kvsieve_retrieve_config_t {
    let mut c = c::kvsieve_retrieve_config_default(1);
    match fine {
        Retrieve::Threshold(t) => {
            c.mode = c::RETRIEVE_THRESHOLD;
            c.threshold = *t;
        }
        Retrieve::PerHeadThreshold(_) => {
            c.mode = c::RETRIEVE_PER_HEAD_THRESHOLD;
            c.thresholds = taus.as_ptr();
            c.num_thresholds = taus.len();
        }
        Retrieve::Budget(b) => {
            c.mode = c::RETRIEVE_BUDGET;
            c.budget = *b;
        }
        Retrieve::MixedBudget(b) => {
            c.mode = c::RETRIEVE_BUDGET_MIXED;
            c.budget = *b;
        }
    }
    if let Some(cr) = coarse {
        c.hierarchical = true;
        match cr {
            CoarseRetrieve::Threshold(t) => {
                c.coarse_mode = c::COARSE_THRESHOLD;
                c.coarse_threshold = t;
            }
            CoarseRetrieve::Budget(b) => {
                c.coarse_mode = c::COARSE_BUDGET;
                c.coarse_budget = b;
            }
            CoarseRetrieve::BudgetMultiple(m) => {
                c.coarse_mode = c::COARSE_BUDGET_MULTIPLE;
                c.coarse_budget_multiple = m;
            }
        }
    }
    c
}

#[pymethods]
impl PyCudaClusterIndex {
    /// Copy a host :class:`ClusterIndex` to CUDA device ``device``.
    #[staticmethod]
    #[pyo3(signature = (index, *, device = 0, stream = None))]
    fn upload(py: Python<'_>, index: PyRef<'_, PyClusterIndex>, device: i32, stream: Option<i64>) -> PyResult<Self> {
        let host = c::cluster_index_into_handle(index.snapshot());
        let (h, st) = (host as usize, stream.unwrap_or(0) as usize);
        let r = py.detach(move || {
            let mut out: *mut c::kvsieve_cuda_cluster_index_t = ptr::null_mut();
            // SAFETY: `host` is a live handle made above and freed below; `out` is writable.
            let e = unsafe { c::kvsieve_cuda_cluster_index_upload(h as *const _, device, st as *mut c_void, &mut out) };
            // SAFETY: freed once; nothing else holds it.
            unsafe { c::kvsieve_cluster_index_free(h as *mut _) };
            (e as usize, out as usize)
        });
        check(r.0 as *mut c::kvsieve_error_t)?;
        Ok(PyCudaClusterIndex { handle: r.1 })
    }

    /// Cluster device keys ``[n, num_kv_heads, head_dim]`` on their GPU; returns
    /// ``(ClusterIndex, CudaClusterIndex)``: the same index on the host and on the device.
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
        let cc = kvsieve_cluster_config_t::from_core(&cfg);
        let kd = dlpack(keys, "keys", stream)?;
        let raw = Raw(kd.t);
        let st = stream.unwrap_or(0) as usize;
        let (e, host, dev) = py.detach(move || {
            let raw = raw;
            let mut host: *mut c::kvsieve_cluster_index_t = ptr::null_mut();
            let mut dev: *mut c::kvsieve_cuda_cluster_index_t = ptr::null_mut();
            // SAFETY: as in cuda_update_key_bounds; the out-parameters are writable.
            let e = unsafe { c::kvsieve_cuda_cluster_index_build(&raw.0, &cc, st as *mut c_void, &mut host, &mut dev) };
            (e as usize, host as usize, dev as usize)
        });
        check(e as *mut c::kvsieve_error_t)?;
        let dev = PyCudaClusterIndex { handle: dev };
        // SAFETY: a live handle the build returned, taken once.
        let host = unsafe { c::cluster_index_from_handle(host as *mut _) }.kv()?;
        PyTuple::new(py, [Bound::new(py, PyClusterIndex::from(host))?.into_any(), Bound::new(py, dev)?.into_any()])
    }

    #[getter]
    fn num_kv_heads(&self) -> PyResult<usize> {
        Ok(self.info()?[0])
    }
    #[getter]
    fn head_dim(&self) -> PyResult<usize> {
        Ok(self.info()?[1])
    }
    #[getter]
    fn num_clusters(&self) -> PyResult<usize> {
        Ok(self.info()?[2])
    }
    #[getter]
    fn num_coarse_clusters(&self) -> PyResult<usize> {
        Ok(self.info()?[3])
    }
    /// Tokens clustered per KV head: ``sel_indices`` needs ``num_kv_heads * clustered_len``.
    #[getter]
    fn clustered_len(&self) -> PyResult<usize> {
        Ok(self.info()?[4])
    }

    /// Centroid retrieval on the GPU for the decode query ``q`` (device, after RoPE) into
    /// device int32 arrays ``sel_indptr`` (``num_kv_heads + 1``) and ``sel_indices``.
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
        let [hk, _, _, _, m] = self.info()?;
        let fine = fine_rule(threshold, budget, hk, rank)?;
        let coarse = coarse_rule(hierarchical, coarse_threshold, coarse_budget, coarse_budget_multiple, &fine)?;
        let taus = match &fine {
            Retrieve::PerHeadThreshold(t) => t.clone(),
            _ => Vec::new(),
        };
        let qd = dlpack(q, "q", stream)?;
        let si = dlpack(sel_indptr, "sel_indptr", stream)?;
        let sx = dlpack(sel_indices, "sel_indices", stream)?;
        let (sip, six) = (si.int_array(32)? as usize, sx.int_array(32)? as usize);
        if si.shape()[0] < (hk + 1) as i64 || sx.shape()[0] < (hk * m) as i64 {
            return Err(Error::Shape {
                param: "sel_indices".into(),
                expected: format!("sel_indptr of at least {} and sel_indices of at least {} int32", hk + 1, hk * m),
                got: format!("{:?} and {:?}", si.shape(), sx.shape()),
            })
            .kv();
        }
        let h = self.handle;
        call_detached(py, stream, qd.t, move |qt, st| {
            let cfg = retrieve_config(&fine, coarse, &taus);
            // SAFETY: a live handle; as in cuda_update_key_bounds; `taus` outlives the call.
            unsafe { c::kvsieve_cuda_cluster_index_retrieve(h as *const _, &qt, &cfg, sip as *mut i32, six as *mut i32, st) }
        })
    }

    fn __repr__(&self) -> PyResult<String> {
        let [hk, d, k, k1, m] = self.info()?;
        Ok(format!("CudaClusterIndex(num_kv_heads={hk}, head_dim={d}, num_clusters={k}, num_coarse_clusters={k1}, clustered_len={m})"))
    }
}
