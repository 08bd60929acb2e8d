//! `Selection` (which tokens each KV head reads) and the functions that make one:
//! `streaming`, `lambda_mask`, `page_bounds`, plus `top_k` and `window_pages_to_evict`.

use kvsieve::select::{self, PageBoundsConfig};
use kvsieve::{Error, Selection};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{items, seq_id, to_numpy, type_name, u32_vec, usize_arg, FloatArray};
use crate::cache::PyKvCache;
use crate::errors::{detach, KvResultExt};

#[doc = doc!(Selection)]
#[pyclass(name = "Selection", module = "kvsieve", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PySelection {
    pub inner: Selection,
}

impl From<Selection> for PySelection {
    fn from(inner: Selection) -> Self {
        PySelection { inner }
    }
}

/// Check one head's token list before it reaches the core, so errors name the Python
/// parameter (`heads[1][3]`, `tokens[0]`): strictly ascending, each below `seq_len`.
fn check_tokens(tokens: &[u32], param: &str, seq_len: usize) -> Result<(), Error> {
    for (i, &t) in tokens.iter().enumerate() {
        if i > 0 && t <= tokens[i - 1] {
            return Err(Error::InvalidArgument {
                param: format!("{param}[{i}]"),
                expected: format!("strictly ascending token indices, got {t} after {}", tokens[i - 1]),
            });
        }
        if t as usize >= seq_len {
            return Err(Error::OutOfRange {
                param: format!("{param}[{i}]"),
                value: t as i64,
                range: format!("0..{seq_len} (seq_len)"),
            });
        }
    }
    Ok(())
}

#[pymethods]
impl PySelection {
    #[doc = doc!(Selection.from_csr)]
    #[staticmethod]
    fn from_csr(
        py: Python<'_>,
        seq_len: i64,
        head_indptr: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let seq_len = usize_arg(seq_len, "seq_len")?;
        let head_indptr = u32_vec(head_indptr, "head_indptr")?;
        let indices = u32_vec(indices, "indices")?;
        detach(py, || Selection::from_csr(seq_len, head_indptr, indices)).map(Self::from)
    }

    #[doc = doc!(Selection.from_heads)]
    #[staticmethod]
    fn from_heads(py: Python<'_>, seq_len: i64, heads: &Bound<'_, PyAny>) -> PyResult<Self> {
        let seq_len = usize_arg(seq_len, "seq_len")?;
        let lists = items(heads, "heads", "1-D integer arrays (one per KV head)")?
            .iter()
            .enumerate()
            .map(|(h, obj)| {
                let param = format!("heads[{h}]");
                let tokens = u32_vec(obj, &param)?;
                check_tokens(&tokens, &param, seq_len).kv()?;
                Ok(tokens)
            })
            .collect::<PyResult<Vec<_>>>()?;
        detach(py, || Selection::from_heads(seq_len, lists)).map(Self::from)
    }

    #[doc = doc!(Selection.dense)]
    #[staticmethod]
    fn dense(py: Python<'_>, num_kv_heads: i64, seq_len: i64) -> PyResult<Self> {
        let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
        let seq_len = usize_arg(seq_len, "seq_len")?;
        detach(py, || Selection::dense(num_kv_heads, seq_len)).map(Self::from)
    }

    #[doc = doc!(Selection.same_for_all_heads)]
    #[staticmethod]
    fn same_for_all_heads(
        py: Python<'_>,
        num_kv_heads: i64,
        seq_len: i64,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
        let seq_len = usize_arg(seq_len, "seq_len")?;
        let tokens = u32_vec(tokens, "tokens")?;
        check_tokens(&tokens, "tokens", seq_len).kv()?;
        detach(py, || Selection::same_for_all_heads(num_kv_heads, seq_len, tokens)).map(Self::from)
    }

    #[doc = doc!(Selection.num_kv_heads)]
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.num_kv_heads()
    }

    #[doc = doc!(Selection.seq_len)]
    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }

    #[doc = doc!(Selection.head_indptr)]
    #[getter]
    fn head_indptr<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.head_indptr().to_vec();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(Selection.indices)]
    #[getter]
    fn indices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.indices().to_vec();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(Selection.head)]
    fn head<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        let hk = self.inner.num_kv_heads();
        let h = usize::try_from(h)
            .ok()
            .filter(|&h| h < hk)
            .ok_or_else(|| Error::OutOfRange { param: "h".into(), value: h, range: format!("0..{hk} (num_kv_heads)") })
            .kv()?;
        let v = self.inner.head(h).to_vec();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(Selection.len)]
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[doc = doc!(Selection.is_empty)]
    fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    #[doc = doc!(Selection.is_dense)]
    fn is_dense(&self) -> bool {
        self.inner.is_dense()
    }

    #[doc = doc!(Selection.union)]
    fn union(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        let other = selection_arg(other, "other")?;
        let other = &other.get().inner;
        detach(py, || self.inner.union(other)).map(Self::from)
    }

    #[doc = doc!(Selection.intersection)]
    fn intersection(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        let other = selection_arg(other, "other")?;
        let other = &other.get().inner;
        detach(py, || self.inner.intersection(other)).map(Self::from)
    }

    #[doc = doc!(Selection.stats)]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("seq_len", s.seq_len)?;
        d.set_item("per_head", s.per_head)?;
        d.set_item("total", s.total)?;
        d.set_item("density", s.density)?;
        d.set_item("min_density", s.min_density)?;
        d.set_item("max_density", s.max_density)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        let per_head: Vec<String> = (0..s.num_kv_heads()).map(|h| s.head(h).len().to_string()).collect();
        format!(
            "Selection(num_kv_heads={}, seq_len={}, per_head=[{}], density={:.4})",
            s.num_kv_heads(),
            s.seq_len(),
            per_head.join(", "),
            s.stats().density
        )
    }
}

/// A `Selection` argument, or a DType error naming the parameter.
pub fn selection_arg<'py>(obj: &Bound<'py, PyAny>, param: &str) -> PyResult<Bound<'py, PySelection>> {
    obj.cast::<PySelection>().cloned().or_else(|_| {
        Err(Error::DType {
            param: param.into(),
            expected: "a kvsieve.Selection".into(),
            got: format!("an object of type {}", type_name(obj)),
        })
        .kv()
    })
}

/// A sequence of `Selection`s (one per sequence of a batch).
pub fn selections_arg<'py>(obj: &Bound<'py, PyAny>, param: &str) -> PyResult<Vec<Bound<'py, PySelection>>> {
    items(obj, param, "kvsieve.Selection objects (one per sequence)")?
        .iter()
        .enumerate()
        .map(|(i, s)| selection_arg(s, &format!("{param}[{i}]")))
        .collect()
}

#[doc = doc!(streaming)]
#[pyfunction]
pub fn streaming(py: Python<'_>, num_kv_heads: i64, seq_len: i64, sinks: i64, window: i64) -> PyResult<PySelection> {
    let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
    let seq_len = usize_arg(seq_len, "seq_len")?;
    let sinks = usize_arg(sinks, "sinks")?;
    let window = usize_arg(window, "window")?;
    detach(py, || select::streaming(num_kv_heads, seq_len, sinks, window)).map(PySelection::from)
}

#[doc = doc!(lambda_mask)]
#[pyfunction]
pub fn lambda_mask(py: Python<'_>, num_kv_heads: i64, seq_len: i64, global_: i64, local: i64) -> PyResult<PySelection> {
    let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
    let seq_len = usize_arg(seq_len, "seq_len")?;
    let global = usize_arg(global_, "global_")?;
    let local = usize_arg(local, "local")?;
    detach(py, || select::lambda(num_kv_heads, seq_len, global, local)).map(PySelection::from)
}

#[doc = doc!(page_bounds)]
#[pyfunction]
#[pyo3(signature = (cache, seq, layer, q, budget_tokens, min_pages = 0))]
pub fn page_bounds(
    py: Python<'_>,
    cache: &Bound<'_, PyKvCache>,
    seq: i64,
    layer: i64,
    q: &Bound<'_, PyAny>,
    budget_tokens: i64,
    min_pages: i64,
) -> PyResult<PySelection> {
    let seq = seq_id(seq, "seq")?;
    let layer = usize_arg(layer, "layer")?;
    let cfg = PageBoundsConfig {
        budget_tokens: usize_arg(budget_tokens, "budget_tokens")?,
        min_pages: usize_arg(min_pages, "min_pages")?,
    };
    let q = FloatArray::extract(q, "q", true)?;
    let qv = q.view().kv()?;
    cache.get().with_read(py, |c| select::page_bounds(c, seq, layer, &qv, &cfg)).map(PySelection::from)
}

#[doc = doc!(top_k)]
#[pyfunction]
pub fn top_k<'py>(py: Python<'py>, scores: &Bound<'py, PyAny>, k: i64) -> PyResult<Bound<'py, PyAny>> {
    let k = usize_arg(k, "k")?;
    let arr = FloatArray::extract(scores, "scores", true)?;
    if arr.shape().len() != 1 {
        return Err(Error::Shape {
            param: "scores".into(),
            expected: "a 1-D array".into(),
            got: format!("{:?}", arr.shape()),
        })
        .kv();
    }
    let n = arr.shape()[0];
    if n > u32::MAX as usize {
        return Err(Error::Shape {
            param: "scores".into(),
            expected: format!("at most {} scores", u32::MAX),
            got: format!("[{n}]"),
        })
        .kv();
    }
    let values = arr.to_f32_vec();
    let idx = detach(py, || Ok(select::top_k(&values, k)))?;
    let n = idx.len();
    to_numpy(py, idx, &[n])
}

#[doc = doc!(expand_spans)]
#[pyfunction]
#[pyo3(signature = (hits, span, budget, seq_len, read_anyway = None))]
pub fn expand_spans<'py>(
    py: Python<'py>,
    hits: &Bound<'py, PyAny>,
    span: i64,
    budget: i64,
    seq_len: i64,
    read_anyway: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (span, budget, seq_len) =
        (usize_arg(span, "span")?, usize_arg(budget, "budget")?, usize_arg(seq_len, "seq_len")?);
    if span == 0 {
        return Err(Error::invalid("span", "at least 1 token")).kv();
    }
    let hits = u32_vec(hits, "hits")?;
    let anyway = match read_anyway {
        Some(a) => u32_vec(a, "read_anyway")?,
        None => Vec::new(),
    };
    if anyway.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid("read_anyway", "strictly ascending token indices")).kv();
    }
    let got = detach(py, || select::expand_spans(&hits, span, budget, seq_len, &anyway))?;
    let n = got.len();
    to_numpy(py, got, &[n])
}

#[doc = doc!(window_pages_to_evict)]
#[pyfunction]
pub fn window_pages_to_evict<'py>(
    py: Python<'py>,
    seq_len: i64,
    page_size: i64,
    sinks: i64,
    window: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let seq_len = usize_arg(seq_len, "seq_len")?;
    let page_size = usize_arg(page_size, "page_size")?;
    let sinks = usize_arg(sinks, "sinks")?;
    let window = usize_arg(window, "window")?;
    let pages = detach(py, || select::window_pages_to_evict(seq_len, page_size, sinks, window))?;
    let pages: Vec<i64> = pages.into_iter().map(|p| p as i64).collect();
    let n = pages.len();
    to_numpy(py, pages, &[n])
}
