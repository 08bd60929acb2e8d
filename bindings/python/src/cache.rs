//! `KvCache`: the kvsieve-owned paged cache behind a reader-writer lock. Reads (attention,
//! page tables, statistics) from several Python threads run at once; writes are serialised.
//! The lock is only taken with the GIL released, so a thread waiting for it never blocks
//! the interpreter. Sparse and policy-driven attention, eviction and compaction are methods
//! here too; their argument types live in `selection`, `policy` and `sparse`.

use kvsieve::attention::AttentionParams;
use kvsieve::{CacheConfig, Error, KeepTokens, KvCache, Selection, TensorView, TensorViewMut};
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{
    filled, i32_vec, int_vec, numel, seq_id, seq_ids, to_numpy, usize_arg, usize_vec, FloatArray, OutBuf,
};
use crate::cluster_set::PyClusterIndexSet;
use crate::errors::{detach, KvResultExt};
use crate::options::{
    check_position_mode, key_rope_name, layout_name, parse_dtype, parse_key_rope, parse_layout, query_shape,
    AttentionKw,
};
use crate::policy::policy_arg;
use crate::rope::PyRopeConfig;
use crate::selection::{selections_arg, PySelection};
use crate::sparse::{keep_lists, parse_keep_per, windows_arg, KeepPer};

#[doc = doc!(CacheConfig)]
#[pyclass(name = "CacheConfig", module = "kvsieve", frozen, get_all)]
#[derive(Clone)]
pub struct PyCacheConfig {
    #[doc = doc!(CacheConfig.num_layers)]
    num_layers: usize,
    #[doc = doc!(CacheConfig.num_kv_heads)]
    num_kv_heads: usize,
    #[doc = doc!(CacheConfig.head_dim)]
    head_dim: usize,
    #[doc = doc!(CacheConfig.page_size)]
    page_size: usize,
    #[doc = doc!(CacheConfig.capacity_pages)]
    capacity_pages: usize,
    #[doc = doc!(CacheConfig.dtype)]
    dtype: &'static str,
    #[doc = doc!(CacheConfig.layout)]
    layout: &'static str,
    #[doc = doc!(CacheConfig.key_rope)]
    key_rope: &'static str,
    #[doc = doc!(CacheConfig.track_key_bounds)]
    track_key_bounds: bool,
}

#[pymethods]
impl PyCacheConfig {
    fn __repr__(&self) -> String {
        format!(
            "CacheConfig(num_layers={}, num_kv_heads={}, head_dim={}, page_size={}, capacity_pages={}, dtype={:?}, layout={:?}, key_rope={:?}, track_key_bounds={})",
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            self.capacity_pages,
            self.dtype,
            self.layout,
            self.key_rope,
            if self.track_key_bounds { "True" } else { "False" }
        )
    }
}

/// A cache configuration from the constructor arguments of `KvCache` and `CudaKvCache`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cache_config(
    num_layers: i64,
    num_kv_heads: i64,
    head_dim: i64,
    page_size: i64,
    capacity_pages: i64,
    dtype: &str,
    layout: &str,
    key_rope: &str,
    track_key_bounds: bool,
) -> PyResult<CacheConfig> {
    Ok(CacheConfig {
        num_layers: usize_arg(num_layers, "num_layers")?,
        num_kv_heads: usize_arg(num_kv_heads, "num_kv_heads")?,
        head_dim: usize_arg(head_dim, "head_dim")?,
        page_size: usize_arg(page_size, "page_size")?,
        capacity_pages: usize_arg(capacity_pages, "capacity_pages")?,
        dtype: parse_dtype("dtype", dtype).kv()?,
        layout: parse_layout("layout", layout).kv()?,
        key_rope: parse_key_rope("key_rope", key_rope).kv()?,
        track_key_bounds,
    })
}

impl From<&CacheConfig> for PyCacheConfig {
    fn from(c: &CacheConfig) -> Self {
        PyCacheConfig {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            page_size: c.page_size,
            capacity_pages: c.capacity_pages,
            dtype: c.dtype.name(),
            layout: layout_name(c.layout),
            key_rope: key_rope_name(c.key_rope),
            track_key_bounds: c.track_key_bounds,
        }
    }
}

#[doc = doc!(KvCache)]
#[pyclass(name = "KvCache", module = "kvsieve", frozen)]
pub struct PyKvCache {
    inner: RwLock<KvCache>,
}

impl PyKvCache {
    /// Run `f` on the cache under the read lock, with the GIL released.
    pub(crate) fn with_read<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&KvCache) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        detach(py, || f(&self.inner.read()))
    }

    /// Run `f` on the cache under the write lock, with the GIL released.
    fn with_write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut KvCache) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        detach(py, || f(&mut self.inner.write()))
    }
}

#[pymethods]
impl PyKvCache {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, page_size, capacity_pages, dtype = "f16", layout = "nhd", key_rope = "post", track_key_bounds = true))]
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
        let cache = detach(py, || KvCache::new(cfg))?;
        Ok(PyKvCache { inner: RwLock::new(cache) })
    }

    #[doc = doc!(KvCache.config)]
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<PyCacheConfig> {
        self.with_read(py, |c| Ok(PyCacheConfig::from(c.config())))
    }

    #[doc = doc!(KvCache.create_sequence)]
    fn create_sequence(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_write(py, |c| Ok(c.create_sequence()))
    }

    #[doc = doc!(KvCache.fork)]
    fn fork(&self, py: Python<'_>, seq: i64) -> PyResult<u64> {
        let seq = seq_id(seq, "seq")?;
        self.with_write(py, |c| c.fork(seq))
    }

    #[doc = doc!(KvCache.free_sequence)]
    fn free_sequence(&self, py: Python<'_>, seq: i64) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        self.with_write(py, |c| c.free_sequence(seq))
    }

    #[doc = doc!(KvCache.sequences)]
    fn sequences(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        self.with_read(py, |c| Ok(c.sequences()))
    }

    #[doc = doc!(KvCache.append)]
    #[pyo3(signature = (seq, n, positions = None))]
    fn append<'py>(
        &self,
        py: Python<'py>,
        seq: i64,
        n: i64,
        positions: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let seq = seq_id(seq, "seq")?;
        let n = usize_arg(n, "n")?;
        let positions = positions.map(|p| i32_vec(p, "positions")).transpose()?;
        let slots = self.with_write(py, |c| c.append(seq, n, positions.as_deref()))?;
        let len = slots.len();
        to_numpy(py, slots, &[len])
    }

    #[doc = doc!(KvCache.write)]
    fn write(
        &self,
        py: Python<'_>,
        seq: i64,
        layer: i64,
        start: i64,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        let start = usize_arg(start, "start")?;
        let (k, v) = (FloatArray::extract(k, "k", true)?, FloatArray::extract(v, "v", true)?);
        let (kv, vv) = (k.view().kv()?, v.view().kv()?);
        self.with_write(py, |c| c.write(seq, layer, start, &kv, &vv))
    }

    #[doc = doc!(KvCache.write_slots)]
    fn write_slots(
        &self,
        py: Python<'_>,
        seq: i64,
        layer: i64,
        slots: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        let slots = int_vec(slots, "slots")?;
        let (k, v) = (FloatArray::extract(k, "k", true)?, FloatArray::extract(v, "v", true)?);
        let (kv, vv) = (k.view().kv()?, v.view().kv()?);
        self.with_write(py, |c| c.write_slots(seq, layer, &slots, &kv, &vv))
    }

    #[doc = doc!(KvCache.truncate)]
    fn truncate(&self, py: Python<'_>, seq: i64, new_len: i64) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let new_len = usize_arg(new_len, "new_len")?;
        self.with_write(py, |c| c.truncate(seq, new_len))
    }

    #[doc = doc!(KvCache.evict_pages)]
    fn evict_pages(&self, py: Python<'_>, seq: i64, page_indices: &Bound<'_, PyAny>) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let pages = usize_vec(page_indices, "page_indices")?;
        self.with_write(py, |c| c.evict_pages(seq, &pages))
    }

    #[doc = doc!(KvCache.seq_len)]
    fn seq_len(&self, py: Python<'_>, seq: i64) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        self.with_read(py, |c| c.seq_len(seq))
    }

    #[doc = doc!(KvCache.positions)]
    fn positions<'py>(&self, py: Python<'py>, seq: i64) -> PyResult<Bound<'py, PyAny>> {
        let seq = seq_id(seq, "seq")?;
        let p = self.with_read(py, |c| c.positions(seq))?;
        let n = p.len();
        to_numpy(py, p, &[n])
    }

    #[doc = doc!(KvCache.seq_pages)]
    fn seq_pages<'py>(&self, py: Python<'py>, seq: i64) -> PyResult<Bound<'py, PyAny>> {
        let seq = seq_id(seq, "seq")?;
        let pages: Vec<i32> = self.with_read(py, |c| c.seq_pages(seq))?.into_iter().map(|p| p as i32).collect();
        let n = pages.len();
        to_numpy(py, pages, &[n])
    }

    #[doc = doc!(KvCache.page_refcount)]
    fn page_refcount(&self, py: Python<'_>, page: i64) -> PyResult<u32> {
        let page = u32::try_from(page)
            .map_err(|_| Error::OutOfRange { param: "page".into(), value: page, range: "page ids 0..2^32".into() })
            .kv()?;
        self.with_read(py, |c| c.page_refcount(page))
    }

    #[doc = doc!(KvCache.page_table)]
    fn page_table<'py>(
        &self,
        py: Python<'py>,
        seqs: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let ids = seq_ids(seqs, "seqs")?;
        let t = self.with_read(py, |c| c.page_table(&ids))?;
        let (a, b, c) = (t.indptr.len(), t.indices.len(), t.last_page_len.len());
        Ok((to_numpy(py, t.indptr, &[a])?, to_numpy(py, t.indices, &[b])?, to_numpy(py, t.last_page_len, &[c])?))
    }

    #[doc = doc!(KvCache.page_key_bounds)]
    fn page_key_bounds<'py>(
        &self,
        py: Python<'py>,
        seq: i64,
        layer: i64,
        page_index: i64,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        let page_index = usize_arg(page_index, "page_index")?;
        let (min, max, h, d) = self.with_read(py, |c| {
            let (min, max) = c.page_key_bounds(seq, layer, page_index)?;
            Ok((min, max, c.config().num_kv_heads, c.config().head_dim))
        })?;
        Ok((to_numpy(py, min, &[h, d])?, to_numpy(py, max, &[h, d])?))
    }

    #[doc = doc!(KvCache.read_keys)]
    fn read_keys<'py>(&self, py: Python<'py>, seq: i64, layer: i64) -> PyResult<Bound<'py, PyAny>> {
        self.read_kv(py, seq, layer, true)
    }

    #[doc = doc!(KvCache.read_values)]
    fn read_values<'py>(&self, py: Python<'py>, seq: i64, layer: i64) -> PyResult<Bound<'py, PyAny>> {
        self.read_kv(py, seq, layer, false)
    }

    #[doc = doc!(KvCache.stats)]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with_read(py, |c| Ok(c.stats()))?;
        let d = PyDict::new(py);
        d.set_item("pages_total", s.pages_total)?;
        d.set_item("pages_used", s.pages_used)?;
        d.set_item("pages_free", s.pages_free)?;
        d.set_item("bytes_per_page", s.bytes_per_page)?;
        d.set_item("bytes_used", s.bytes_used)?;
        d.set_item("bytes_reserved", s.bytes_reserved)?;
        d.set_item("num_sequences", s.num_sequences)?;
        d.set_item("num_tokens", s.num_tokens)?;
        Ok(d)
    }

    #[doc = doc!(KvCache.check_invariants)]
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.with_read(py, |c| {
            c.check_invariants().map_err(|m| Error::Internal(format!("cache invariant violated: {m}")))
        })
    }

    #[doc = doc!(KvCache.decode)]
    #[pyo3(signature = (layer, seqs, q, *, scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        position_mode: &str,
        max_distance: Option<i64>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let params =
            AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let (out, lse, ()) = self.attend(py, &params, &q, "batch", out_dtype, |c, qv, out, lse| {
            c.decode(layer, &ids, qv, out, Some(lse), &params)
        })?;
        Ok((out, lse))
    }

    #[doc = doc!(KvCache.prefill)]
    #[pyo3(signature = (layer, seqs, q, qo_indptr, *, causal = true, scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn prefill<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        qo_indptr: &Bound<'py, PyAny>,
        causal: bool,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        position_mode: &str,
        max_distance: Option<i64>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let qo_indptr = i32_vec(qo_indptr, "qo_indptr")?;
        let params =
            AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let (out, lse, ()) = self.attend(py, &params, &q, "total", out_dtype, |c, qv, out, lse| {
            c.prefill(layer, &ids, qv, &qo_indptr, out, Some(lse), &params, causal)
        })?;
        Ok((out, lse))
    }

    #[doc = doc!(KvCache.decode_sparse)]
    #[pyo3(signature = (layer, seqs, q, selections, *, scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn decode_sparse<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        selections: &Bound<'py, PyAny>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        position_mode: &str,
        max_distance: Option<i64>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let sels = selections_arg(selections, "selections")?;
        let sels: Vec<&Selection> = sels.iter().map(|s| &s.get().inner).collect();
        let params =
            AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let (out, lse, ()) = self.attend(py, &params, &q, "batch", out_dtype, |c, qv, out, lse| {
            c.decode_sparse(layer, &ids, qv, &sels, out, Some(lse), &params)
        })?;
        Ok((out, lse))
    }

    #[doc = doc!(KvCache.prefill_sparse)]
    #[pyo3(signature = (layer, seqs, q, qo_indptr, selections, windows = None, *, scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn prefill_sparse<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        qo_indptr: &Bound<'py, PyAny>,
        selections: &Bound<'py, PyAny>,
        windows: Option<&Bound<'py, PyAny>>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        position_mode: &str,
        max_distance: Option<i64>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let qo_indptr = i32_vec(qo_indptr, "qo_indptr")?;
        let sels = selections_arg(selections, "selections")?;
        let sels: Vec<&Selection> = sels.iter().map(|s| &s.get().inner).collect();
        let windows = windows_arg(windows)?;
        let params =
            AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let (out, lse, ()) = self.attend(py, &params, &q, "total", out_dtype, |c, qv, out, lse| {
            c.prefill_sparse(layer, &ids, qv, &qo_indptr, &sels, &windows, out, Some(lse), &params)
        })?;
        Ok((out, lse))
    }

    #[doc = doc!(KvCache.decode_with_policy)]
    #[pyo3(signature = (layer, seqs, q, policy, *, clusters = None, scale = None, logit_soft_cap = None, rope = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn decode_with_policy<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyAny>,
        clusters: Option<&Bound<'py, PyClusterIndexSet>>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Vec<PySelection>)> {
        let kw = AttentionKw { scale, logit_soft_cap, rope, chunk_size, ..Default::default() };
        let (out, lse, sels) = self.policy_decode(py, layer, seqs, q, policy, clusters, kw, out_dtype)?;
        Ok((out, lse, sels.into_iter().map(|s| PySelection::from(s.selection)).collect()))
    }

    #[doc = doc!(KvCache.decode_with_clusters)]
    #[pyo3(signature = (layer, seqs, q, policy, clusters, *, scale = None, logit_soft_cap = None, rope = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn decode_with_clusters<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyAny>,
        clusters: &Bound<'py, PyClusterIndexSet>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Vec<PySelection>, Vec<usize>, Vec<usize>)> {
        let kw = AttentionKw { scale, logit_soft_cap, rope, chunk_size, ..Default::default() };
        let (out, lse, sels) = self.policy_decode(py, layer, seqs, q, policy, Some(clusters), kw, out_dtype)?;
        let scored = sels.iter().map(|s| s.centroids_scored).collect();
        let radii = sels.iter().map(|s| s.radii_read).collect();
        Ok((out, lse, sels.into_iter().map(|s| PySelection::from(s.selection)).collect(), scored, radii))
    }

    #[doc = doc!(KvCache.prefill_with_policy)]
    #[pyo3(signature = (layer, seqs, q, qo_indptr, policy, *, scale = None, logit_soft_cap = None, rope = None, chunk_size = None, out_dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn prefill_with_policy<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        qo_indptr: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyAny>,
        scale: Option<f32>,
        logit_soft_cap: Option<f32>,
        rope: Option<PyRef<'py, PyRopeConfig>>,
        chunk_size: Option<i64>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let qo_indptr = i32_vec(qo_indptr, "qo_indptr")?;
        let policy = policy_arg(policy)?;
        let params = AttentionKw { scale, logit_soft_cap, rope, chunk_size, ..Default::default() }.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let (out, lse, ()) = self.attend(py, &params, &q, "total", out_dtype, |c, qv, out, lse| {
            c.prefill_with_policy(layer, &ids, qv, &qo_indptr, &policy, out, Some(lse), &params)
        })?;
        Ok((out, lse))
    }

    #[doc = doc!(KvCache.evict_for_policy)]
    fn evict_for_policy(&self, py: Python<'_>, seq: i64, policy: &Bound<'_, PyAny>) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        let policy = policy_arg(policy)?;
        self.with_write(py, |c| c.evict_for_policy(seq, &policy))
    }

    #[doc = doc!(KvCache.compact)]
    #[pyo3(signature = (seq, keep, per = "all"))]
    fn compact(&self, py: Python<'_>, seq: i64, keep: &Bound<'_, PyAny>, per: &str) -> PyResult<()> {
        let seq = seq_id(seq, "seq")?;
        let per = parse_keep_per(per).kv()?;
        let lists = keep_lists(keep, per)?;
        self.with_write(py, |c| {
            let keep = match per {
                KeepPer::All => KeepTokens::All(&lists[0]),
                KeepPer::Layer => KeepTokens::PerLayer(&lists),
                KeepPer::Head => KeepTokens::PerHead(&lists),
            };
            c.compact(seq, keep)
        })
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let (cfg, s) = self.with_read(py, |c| Ok((PyCacheConfig::from(c.config()), c.stats())))?;
        Ok(format!(
            "KvCache({}, sequences={}, pages_used={}/{})",
            cfg.__repr__(),
            s.num_sequences,
            s.pages_used,
            s.pages_total
        ))
    }
}

impl PyKvCache {
    /// Decode under a policy, with centroid retrieval from `clusters` when given; the
    /// policy's selections and what they cost (empty for a dense layer without clusters).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn policy_decode<'py>(
        &self,
        py: Python<'py>,
        layer: i64,
        seqs: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyAny>,
        clusters: Option<&Bound<'py, PyClusterIndexSet>>,
        kw: AttentionKw<'_, 'py>,
        out_dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Vec<kvsieve::runtime::PolicySelection>)> {
        let layer = usize_arg(layer, "layer")?;
        let ids = seq_ids(seqs, "seqs")?;
        let policy = policy_arg(policy)?;
        // The policy sets the position mode of the layer (`kw` has none).
        let params = kw.params().kv()?;
        let q = FloatArray::extract(q, "q", true)?;
        let set = clusters.map(|s| &s.get().inner);
        self.attend(py, &params, &q, "batch", out_dtype, |c, qv, out, lse| match set {
            Some(set) => c.decode_with_clusters(layer, &ids, qv, &policy, &set.read(), out, Some(lse), &params),
            None => Ok(c
                .decode_with_policy(layer, &ids, qv, &policy, out, Some(lse), &params)?
                .into_iter()
                .map(|selection| kvsieve::runtime::PolicySelection { selection, centroids_scored: 0, radii_read: 0 })
                .collect()),
        })
    }

    /// Run an attention call `f` on the cache (read lock, GIL released) with output buffers
    /// shaped like `q` (`[tokens, num_qo_heads, head_dim]`); returns `(out, lse, f's result)`.
    /// `params` is checked against the cache's key storage first.
    fn attend<'py, T: Send>(
        &self,
        py: Python<'py>,
        params: &AttentionParams,
        q: &FloatArray<'_>,
        tokens: &str,
        out_dtype: &str,
        f: impl FnOnce(&KvCache, &TensorView, &mut TensorViewMut, &mut [f32]) -> Result<T, Error> + Send,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, T)> {
        let shape = query_shape(q.shape(), tokens).kv()?;
        let qv = q.view().kv()?;
        let mut out = OutBuf::new(out_dtype, "q", &shape).kv()?;
        let mut lse = filled("q", numel("q", &shape[..2]).kv()?, 0f32).kv()?;
        let res = self.with_read(py, |c| {
            check_position_mode(c.config().key_rope, params)?;
            f(c, &qv, &mut out.view_mut(&shape)?, &mut lse)
        })?;
        Ok((out.into_numpy(py, &shape)?, to_numpy(py, lse, &shape[..2])?, res))
    }

    fn read_kv<'py>(&self, py: Python<'py>, seq: i64, layer: i64, keys: bool) -> PyResult<Bound<'py, PyAny>> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        let (data, h, d) = self.with_read(py, |c| {
            let data = if keys { c.read_keys(seq, layer)? } else { c.read_values(seq, layer)? };
            Ok((data, c.config().num_kv_heads, c.config().head_dim))
        })?;
        let n = data.len() / (h * d);
        to_numpy(py, data, &[n, h, d])
    }
}
