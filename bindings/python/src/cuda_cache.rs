//! `CudaKvCache`: kvsieve-owned paged K/V on a CUDA device, through the C ABI's
//! `kvsieve_cuda_cache_*` calls. Host rows come as numpy arrays, device rows and decode
//! arguments as `__dlpack__` arrays (torch, cupy, jax).

use std::ffi::c_void;
use std::ptr;

use kvsieve::ffi::{self as c, kvsieve_cache_config_t, kvsieve_paged_kv_t, kvsieve_tensor_t};
use kvsieve::Error;
use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{seq_id, seq_ids, to_numpy, usize_arg, usize_vec};
use crate::cache::cache_config;
use crate::cuda::{call_detached, check, dlpack};
use crate::errors::KvResultExt;
use crate::sparse::{keep_lists, parse_keep_per, KeepPer};

/// Paged K/V resident on a CUDA device. See the stub.
#[pyclass(name = "CudaKvCache", module = "kvsieve", frozen)]
pub struct PyCudaKvCache {
    handle: usize,
}

impl Drop for PyCudaKvCache {
    fn drop(&mut self) {
        // SAFETY: the handle came from kvsieve_cuda_cache_new and is freed once, here.
        unsafe { c::kvsieve_cuda_cache_free(self.handle as *mut c::kvsieve_cuda_cache_t) };
    }
}

impl PyCudaKvCache {
    fn h(&self) -> *mut c::kvsieve_cuda_cache_t {
        self.handle as *mut c::kvsieve_cuda_cache_t
    }

    /// Run a C call with the GIL released.
    fn call(&self, py: Python<'_>, f: impl FnOnce(usize) -> usize + Send) -> PyResult<()> {
        call_detached(py, None, self.handle, move |h, _| f(h) as *mut c::kvsieve_error_t)
    }
}

/// A host float32 array's descriptor (the array must stay alive and unchanged while used).
fn host_tensor(a: &Bound<'_, numpy::PyArrayDyn<f32>>, shape: &mut Vec<i64>) -> kvsieve_tensor_t {
    *shape = a.shape().iter().map(|&d| d as i64).collect();
    kvsieve_tensor_t {
        data: a.data() as *mut c_void,
        device: c::kvsieve_device_t { device_type: c::DEVICE_CPU, device_id: 0 },
        ndim: shape.len() as i32,
        dtype: c::kvsieve_dtype_t { code: c::DTYPE_CODE_FLOAT, bits: 32, lanes: 1 },
        shape: shape.as_ptr(),
        strides: ptr::null(),
        byte_offset: 0,
    }
}

#[pymethods]
impl PyCudaKvCache {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, page_size, capacity_pages, dtype = "f16", layout = "nhd", key_rope = "post", track_key_bounds = true, *, device = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
        page_size: i64,
        capacity_pages: i64,
        dtype: &str,
        layout: &str,
        key_rope: &str,
        track_key_bounds: bool,
        device: i32,
    ) -> PyResult<Self> {
        let cfg = cache_config(num_layers, num_kv_heads, head_dim, page_size, capacity_pages, dtype, layout, key_rope, track_key_bounds)?;
        let cc = kvsieve_cache_config_t::from_core(&cfg);
        let (e, h) = py.detach(move || {
            let mut out: *mut c::kvsieve_cuda_cache_t = ptr::null_mut();
            // SAFETY: a readable config and a writable out-parameter.
            let e = unsafe { c::kvsieve_cuda_cache_new(&cc, device, &mut out) };
            (e as usize, out as usize)
        });
        check(e as *mut c::kvsieve_error_t)?;
        Ok(PyCudaKvCache { handle: h })
    }

    /// A new empty sequence; returns its id.
    fn create_sequence(&self) -> PyResult<u64> {
        let mut id = 0u64;
        // SAFETY: a live handle; `id` is writable.
        check(unsafe { c::kvsieve_cuda_cache_create_sequence(self.h(), &mut id) })?;
        Ok(id)
    }

    /// Fork ``seq`` (prefix sharing, copy on write); returns the new id.
    fn fork(&self, seq: i64) -> PyResult<u64> {
        let mut id = 0u64;
        // SAFETY: as above.
        check(unsafe { c::kvsieve_cuda_cache_fork(self.h(), seq_id(seq, "seq")?, &mut id) })?;
        Ok(id)
    }

    fn free_sequence(&self, seq: i64) -> PyResult<()> {
        // SAFETY: a live handle.
        check(unsafe { c::kvsieve_cuda_cache_free_sequence(self.h(), seq_id(seq, "seq")?) })
    }

    fn seq_len(&self, seq: i64) -> PyResult<usize> {
        let mut n = 0usize;
        // SAFETY: as above.
        check(unsafe { c::kvsieve_cuda_cache_seq_len(self.h(), seq_id(seq, "seq")?, &mut n) })?;
        Ok(n)
    }

    /// Reserve ``n`` slots at the end of ``seq``; returns their slot numbers (int64).
    #[pyo3(signature = (seq, n, positions = None))]
    fn append<'py>(&self, py: Python<'py>, seq: i64, n: i64, positions: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let (seq, n) = (seq_id(seq, "seq")?, usize_arg(n, "n")?);
        let pos: Option<Vec<i32>> = positions.map(|p| crate::arrays::i32_vec(p, "positions")).transpose()?;
        if let Some(p) = &pos {
            if p.len() != n {
                return Err(Error::Shape { param: "positions".into(), expected: format!("[{n}] (n)"), got: format!("[{}]", p.len()) }).kv();
            }
        }
        let mut slots = vec![0i64; n];
        let sp = slots.as_mut_ptr() as usize;
        self.call(py, move |h| {
            let pp = pos.as_ref().map_or(ptr::null(), |p| p.as_ptr());
            // SAFETY: a live handle; `pos` and `slots` hold n values and outlive the call.
            unsafe { c::kvsieve_cuda_cache_append(h as *mut _, seq, n, pp, sp as *mut i64, n) as usize }
        })?;
        to_numpy(py, slots, &[n])
    }

    /// Write K and V of tokens ``start .. start + n`` of ``layer``: numpy arrays (host,
    /// converted to float32) or ``__dlpack__`` device arrays, ``[n, num_kv_heads, head_dim]``.
    #[pyo3(signature = (seq, layer, start, k, v))]
    fn write<'py>(&self, py: Python<'py>, seq: i64, layer: i64, start: i64, k: &Bound<'py, PyAny>, v: &Bound<'py, PyAny>) -> PyResult<()> {
        let (seq, layer, start) = (seq_id(seq, "seq")?, usize_arg(layer, "layer")?, usize_arg(start, "start")?);
        let np = py.import("numpy")?;
        let is_host = k.is_instance(&np.getattr("ndarray")?)?;
        if is_host {
            let as_f32 = |x: &Bound<'py, PyAny>, name: &str| -> PyResult<Bound<'py, numpy::PyArrayDyn<f32>>> {
                let a = np.call_method1("ascontiguousarray", (x, "float32"))?;
                a.cast_into::<numpy::PyArrayDyn<f32>>().map_err(|_| Error::DType { param: name.into(), expected: "a float array".into(), got: "another object".into() }).kv()
            };
            let (ka, va) = (as_f32(k, "k")?, as_f32(v, "v")?);
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            let (kt, vt) = (host_tensor(&ka, &mut ks), host_tensor(&va, &mut vs));
            let h = self.handle;
            call_detached(py, None, (kt, vt), move |(kt, vt), _| {
                let _keep = (&ks, &vs);
                // SAFETY: a live handle; the arrays and shapes live until the call returns.
                unsafe { c::kvsieve_cuda_cache_write(h as *mut _, seq, layer, start, &kt, &vt) }
            })
        } else {
            let kd = dlpack(k, "k", None)?;
            let vd = dlpack(v, "v", None)?;
            let h = self.handle;
            call_detached(py, None, (kd.t, vd.t), move |(kt, vt), _| {
                // SAFETY: a live handle; the capsules keep the device arrays alive.
                unsafe { c::kvsieve_cuda_cache_write(h as *mut _, seq, layer, start, &kt, &vt) }
            })
        }
    }

    fn truncate(&self, py: Python<'_>, seq: i64, new_len: i64) -> PyResult<()> {
        let (seq, n) = (seq_id(seq, "seq")?, usize_arg(new_len, "new_len")?);
        // SAFETY: a live handle.
        self.call(py, move |h| unsafe { c::kvsieve_cuda_cache_truncate(h as *mut _, seq, n) as usize })
    }

    /// Evict whole pages (indices into the sequence's page list, strictly increasing).
    fn evict_pages(&self, py: Python<'_>, seq: i64, page_indices: &Bound<'_, PyAny>) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let idx = usize_vec(page_indices, "page_indices")?;
        // SAFETY: a live handle; `idx` outlives the call.
        self.call(py, move |h| unsafe { c::kvsieve_cuda_cache_evict_pages(h as *mut _, seq, idx.as_ptr(), idx.len()) as usize })
    }

    /// Keep only the tokens ``keep`` of ``seq`` (as :meth:`KvCache.compact`).
    #[pyo3(signature = (seq, keep, per = "all"))]
    fn compact(&self, py: Python<'_>, seq: i64, keep: &Bound<'_, PyAny>, per: &str) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let per = parse_keep_per(per).kv()?;
        let lists = keep_lists(keep, per)?;
        let kind = match per {
            KeepPer::All => c::KEEP_ALL,
            KeepPer::Layer => c::KEEP_PER_LAYER,
            KeepPer::Head => c::KEEP_PER_HEAD,
        };
        let mut indptr = vec![0u32];
        let mut flat = Vec::new();
        for l in &lists {
            flat.extend_from_slice(l);
            indptr.push(u32::try_from(flat.len()).map_err(|_| Error::InvalidArgument { param: "keep".into(), expected: "fewer than 2^32 tokens".into() }).kv()?);
        }
        // SAFETY: a live handle; `indptr` and `flat` outlive the call.
        self.call(py, move |h| unsafe { c::kvsieve_cuda_cache_compact(h as *mut _, seq, kind, indptr.as_ptr(), lists.len(), flat.as_ptr(), flat.len()) as usize })
    }

    /// Dense (or, with ``sel_indptr``/``sel_indices``, sparse) decode of ``layer`` for the
    /// sequences ``seqs``: ``q`` and ``out`` device arrays ``[len(seqs), num_qo_heads,
    /// head_dim]``; ``lse`` optional float32 ``[len(seqs), num_qo_heads]``. Waits for the
    /// decode (the page table it reads is freed at the end).
    #[pyo3(signature = (layer, seqs, q, out, *, lse = None, sel_indptr = None, sel_indices = None, max_per_head = None, scale = None, logit_soft_cap = None, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        lse: Option<&Bound<'py, PyAny>>,
        sel_indptr: Option<&Bound<'py, PyAny>>,
        sel_indices: Option<&Bound<'py, PyAny>>,
        max_per_head: Option<usize>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        stream: Option<i64>,
    ) -> PyResult<()> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let qd = dlpack(q, "q", stream)?;
        let od = dlpack(out, "out", stream)?;
        let lse_ptr = match lse {
            Some(l) => {
                let l = dlpack(l, "lse", stream)?;
                crate::cuda::f32_contiguous(&l, &[ids.len() as i64, qd.shape().get(1).copied().unwrap_or(0)])? as usize
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
        let pc = c::kvsieve_attention_params_t {
            scale: scale.unwrap_or(0.0),
            logit_soft_cap: logit_soft_cap.unwrap_or(0.0),
            rope: ptr::null(),
            chunk_size: 0,
            position_mode: c::POSITIONS_ORIGINAL,
            max_distance: 0,
        };
        let h = self.handle;
        call_detached(py, stream, (qd.t, od.t, pc), move |(qt, ot, pc), st| {
            let mut table: *mut c::kvsieve_cuda_table_t = ptr::null_mut();
            // SAFETY: all-zero is a valid (empty) descriptor value; the call fills it.
            let mut view: kvsieve_paged_kv_t = unsafe { std::mem::zeroed() };
            let mut max_len = 0usize;
            // SAFETY: a live handle; `ids` outlives the call; the out-parameters are writable.
            let e = unsafe { c::kvsieve_cuda_cache_layer_view(h as *const _, layer, ids.as_ptr(), ids.len(), &mut table, &mut view, ptr::null_mut(), &mut max_len) };
            if !e.is_null() {
                return e;
            }
            // SAFETY: the view and table are live; the capsules keep q, out, lse and the lists.
            let e = unsafe {
                match lists {
                    None => c::kvsieve_cuda_paged_decode(&view, max_len, &qt, &ot, lse_ptr as *mut f32, &pc, st),
                    Some((a, b, mp)) => c::kvsieve_cuda_paged_decode_sparse(&view, max_len, a as *const i32, b as *const i32, mp, &qt, &ot, lse_ptr as *mut f32, &pc, st),
                }
            };
            // SAFETY: freed once; cuMemFree waits for the queued decode that reads it.
            unsafe { c::kvsieve_cuda_table_free(table) };
            e
        })
    }

    fn __repr__(&self) -> String {
        format!("CudaKvCache(handle={:#x})", self.handle)
    }
}
