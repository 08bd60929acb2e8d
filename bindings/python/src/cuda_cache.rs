//! `CudaKvCache`: kvsieve-owned paged K/V on a CUDA device (the backend's `CudaKvCache`)
//! behind a reader-writer lock: decodes from several Python threads run at once, changes
//! are serialised, and the lock is only taken with the GIL released. Host rows come as
//! numpy arrays, device rows and decode arguments as `__dlpack__` arrays (torch, cupy, jax).

use kvsieve::{DType, Error, KeepTokens};
use parking_lot::RwLock;
use pyo3::prelude::*;

use crate::arrays::{i32_vec, seq_id, seq_ids, to_numpy, usize_arg, usize_vec, FloatArray};
use crate::cache::cache_config;
use crate::cuda::backend::attention;
use crate::cuda::backend::{CudaDevice, CudaKvCache, CudaSelections, DeviceTensor};
use crate::cuda::{
    bad_shape, decode_workspace, dlpack, f32_contiguous, invalid, stream_handle, stream_on, token_lists,
};
use crate::cuda_select::device_ordinal;
use crate::errors::{detach, KvResultExt};
use crate::options::AttentionKw;
use crate::sparse::{keep_lists, parse_keep_per, KeepPer};

#[doc = doc!(CudaKvCache)]
#[pyclass(name = "CudaKvCache", module = "kvsieve", frozen)]
pub struct PyCudaKvCache {
    inner: RwLock<CudaKvCache>,
}

impl PyCudaKvCache {
    /// Run `f` on the cache under the read lock, with the GIL released.
    fn with_read<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&CudaKvCache) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        detach(py, || f(&self.inner.read()))
    }

    /// Run `f` on the cache under the write lock, with the GIL released.
    fn with_write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut CudaKvCache) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        detach(py, || f(&mut self.inner.write()))
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
        let cfg = cache_config(
            num_layers,
            num_kv_heads,
            head_dim,
            page_size,
            capacity_pages,
            dtype,
            layout,
            key_rope,
            track_key_bounds,
        )?;
        let ordinal = device_ordinal(device)?;
        let cache = detach(py, move || CudaKvCache::new(&CudaDevice::get(ordinal)?, cfg))?;
        Ok(PyCudaKvCache { inner: RwLock::new(cache) })
    }

    #[doc = doc!(CudaKvCache.create_sequence)]
    fn create_sequence(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_write(py, |c| Ok(c.create_sequence()))
    }

    #[doc = doc!(CudaKvCache.fork)]
    fn fork(&self, py: Python<'_>, seq: i64) -> PyResult<u64> {
        let seq = seq_id(seq, "seq")?;
        self.with_write(py, |c| c.fork(seq))
    }

    #[doc = doc!(CudaKvCache.free_sequence)]
    fn free_sequence(&self, py: Python<'_>, seq: i64) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        self.with_write(py, |c| c.free_sequence(seq))
    }

    #[doc = doc!(CudaKvCache.seq_len)]
    fn seq_len(&self, py: Python<'_>, seq: i64) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        self.with_read(py, |c| c.seq_len(seq))
    }

    #[doc = doc!(CudaKvCache.append)]
    #[pyo3(signature = (seq, n, positions = None))]
    fn append<'py>(
        &self,
        py: Python<'py>,
        seq: i64,
        n: i64,
        positions: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (seq, n) = (seq_id(seq, "seq")?, usize_arg(n, "n")?);
        let pos: Option<Vec<i32>> = positions.map(|p| i32_vec(p, "positions")).transpose()?;
        if let Some(p) = &pos {
            if p.len() != n {
                return Err(bad_shape("positions", format!("[{n}] (n)"), format!("[{}]", p.len()))).kv();
            }
        }
        let slots = self.with_write(py, |c| c.append(seq, n, pos.as_deref()))?;
        to_numpy(py, slots, &[n])
    }

    #[doc = doc!(CudaKvCache.write)]
    #[pyo3(signature = (seq, layer, start, k, v))]
    fn write<'py>(
        &self,
        py: Python<'py>,
        seq: i64,
        layer: i64,
        start: i64,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
    ) -> PyResult<()> {
        let (seq, layer, start) = (seq_id(seq, "seq")?, usize_arg(layer, "layer")?, usize_arg(start, "start")?);
        let dims = ["n", "num_kv_heads", "head_dim"];
        let np = py.import("numpy")?;
        if k.is_instance(&np.getattr("ndarray")?)? {
            let as_f32 = |x: &Bound<'py, PyAny>, name: &str| -> PyResult<FloatArray<'py>> {
                let a = np.call_method1("ascontiguousarray", (x, "float32"))?;
                FloatArray::extract(&a, name, false)
            };
            let (ka, va) = (as_f32(k, "k")?, as_f32(v, "v")?);
            let (kv, vv) = (ka.view().kv()?, va.view().kv()?);
            for (x, name) in [(&kv, "k"), (&vv, "v")] {
                if x.shape().len() != dims.len() {
                    return Err(bad_shape(
                        name,
                        format!("[{}]", dims.join(", ")),
                        format!("{} dimensions", x.shape().len()),
                    ))
                    .kv();
                }
            }
            return self.with_write(py, |c| c.write(seq, layer, start, &kv, &vv));
        }
        let kd = dlpack(k, "k", None)?;
        let vd = dlpack(v, "v", None)?;
        if !kd.on_device() {
            // SAFETY: the capsules keep the host arrays alive, unwritten during the call.
            let (kv, vv) = unsafe { (kd.host_view(&dims).kv()?, vd.host_view(&dims).kv()?) };
            return self.with_write(py, |c| c.write(seq, layer, start, &kv, &vv));
        }
        let (kt, vt) = (kd.device_tensor(&dims).kv()?, vd.device_tensor(&dims).kv()?);
        self.with_write(py, |c| {
            let ordinal = c.device().ordinal();
            if kt.device != ordinal {
                return Err(invalid(
                    "k",
                    format!("memory on the cache's CUDA device {ordinal}, got device {}", kt.device),
                ));
            }
            // SAFETY: the capsules keep the device arrays alive, unwritten during the call.
            unsafe { c.write_device(seq, layer, start, &kt, &vt) }
        })
    }

    #[doc = doc!(CudaKvCache.truncate)]
    fn truncate(&self, py: Python<'_>, seq: i64, new_len: i64) -> PyResult<()> {
        let (seq, n) = (seq_id(seq, "seq")?, usize_arg(new_len, "new_len")?);
        self.with_write(py, |c| c.truncate(seq, n))
    }

    #[doc = doc!(CudaKvCache.evict_pages)]
    fn evict_pages(&self, py: Python<'_>, seq: i64, page_indices: &Bound<'_, PyAny>) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let idx = usize_vec(page_indices, "page_indices")?;
        self.with_write(py, |c| c.evict_pages(seq, &idx))
    }

    #[doc = doc!(CudaKvCache.compact)]
    #[pyo3(signature = (seq, keep, per = "all"))]
    fn compact(&self, py: Python<'_>, seq: i64, keep: &Bound<'_, PyAny>, per: &str) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let per = parse_keep_per(per).kv()?;
        let lists = keep_lists(keep, per)?;
        self.with_write(py, |c| {
            let cfg = c.config();
            let want = match per {
                KeepPer::All => 1,
                KeepPer::Layer => cfg.num_layers,
                KeepPer::Head => cfg.num_layers * cfg.num_kv_heads,
            };
            if lists.len() != want {
                return Err(invalid(
                    "keep",
                    format!("{want} token lists for per=\"{}\", got {}", per_name(per), lists.len()),
                ));
            }
            c.compact(
                seq,
                match per {
                    KeepPer::All => KeepTokens::All(&lists[0]),
                    KeepPer::Layer => KeepTokens::PerLayer(&lists),
                    KeepPer::Head => KeepTokens::PerHead(&lists),
                },
            )
        })
    }

    #[doc = doc!(CudaKvCache.decode)]
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
        let ld = lse.map(|l| dlpack(l, "lse", stream)).transpose()?;
        let lse = ld
            .as_ref()
            .map(|l| f32_contiguous(l, &[ids.len() as i64, qd.shape().get(1).copied().unwrap_or(0)]))
            .transpose()?;
        let lists = token_lists(sel_indptr, sel_indices, max_per_head, stream)?;
        let sel = lists.as_ref().map(|l| l.raw);
        let params = AttentionKw { scale, logit_soft_cap, ..Default::default() }.cuda_params().kv()?;
        let dims = ["batch", "num_qo_heads", "head_dim"];
        // Checked after the cache's view is made, as they go with it.
        let (q, out) = (qd.device_tensor(&dims), od.device_tensor(&dims));
        let st = stream_handle(stream);
        self.with_read(py, |c| {
            let table = c.page_table(&ids)?;
            let view = c.layer_view(layer, &table)?;
            let (q, out) = (q?, out?);
            let dev = c.device();
            let lse = lse.map(|p| DeviceTensor::contiguous(p, DType::F32, &[ids.len(), q.shape[1]], view.device()));
            // SAFETY: q, out, lse and the token lists come from DLPack capsules held until
            // this call returns (the lists' contents are the caller's promise, as
            // documented); the view reads the cache, which the read lock keeps unchanged.
            // Dropping the table at the end (cuMemFree) waits for the queued decode.
            unsafe {
                let s = stream_on(dev, st);
                let ws = decode_workspace(dev, st)?;
                match sel {
                    None => attention::decode(&view, &q, &out, lse.as_ref(), &params, &ws, &s),
                    Some((ip, ix, mp)) => {
                        let sels =
                            CudaSelections::from_device(ip, ix, ids.len(), view.num_kv_heads(), mp, view.device())?;
                        attention::decode_sparse(&view, &q, &sels, &out, lse.as_ref(), &params, &ws, &s)
                    }
                }
            }
        })
    }

    fn __repr__(&self) -> String {
        format!("CudaKvCache(handle={:#x})", &self.inner as *const RwLock<CudaKvCache> as usize)
    }
}

fn per_name(per: KeepPer) -> &'static str {
    match per {
        KeepPer::All => "all",
        KeepPer::Layer => "layer",
        KeepPer::Head => "head",
    }
}
