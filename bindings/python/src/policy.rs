//! `Policy`: per-layer and per-head compositions of selection methods, from their text form.

use kvsieve::{Error, Policy};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::arrays::{seq_id, to_numpy, type_name, usize_arg, FloatArray};
use crate::cache::PyKvCache;
use crate::errors::{detach, guard, KvResultExt};
use crate::options::position_mode_parts;
use crate::selection::PySelection;

#[doc = doc!(Policy)]
#[pyclass(name = "Policy", module = "kvsieve", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyPolicy {
    pub inner: Policy,
}

impl PyPolicy {
    fn parse_text(text: &str) -> PyResult<Self> {
        guard(|| Policy::parse(text)).kv().map(|inner| PyPolicy { inner })
    }
}

/// A `policy=` argument: a `Policy`, or its text form (parsed here).
pub fn policy_arg(obj: &Bound<'_, PyAny>) -> PyResult<Policy> {
    if let Ok(p) = obj.cast::<PyPolicy>() {
        return Ok(p.get().inner.clone());
    }
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(PyPolicy::parse_text(&text.to_cow()?)?.inner);
    }
    Err(Error::DType {
        param: "policy".into(),
        expected: "a kvsieve.Policy or its text form (str)".into(),
        got: format!("an object of type {}", type_name(obj)),
    })
    .kv()
}

#[pymethods]
impl PyPolicy {
    #[new]
    fn new(text: &str) -> PyResult<Self> {
        Self::parse_text(text)
    }

    #[doc = doc!(Policy.parse)]
    #[staticmethod]
    fn parse(text: &str) -> PyResult<Self> {
        Self::parse_text(text)
    }

    #[doc = doc!(Policy.validate)]
    fn validate(&self, py: Python<'_>, num_layers: i64, num_kv_heads: i64) -> PyResult<()> {
        let num_layers = usize_arg(num_layers, "num_layers")?;
        let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
        detach(py, || self.inner.validate(num_layers, num_kv_heads))
    }

    #[doc = doc!(Policy.select)]
    fn select(
        &self,
        py: Python<'_>,
        cache: &Bound<'_, PyKvCache>,
        seq: i64,
        layer: i64,
        q: &Bound<'_, PyAny>,
    ) -> PyResult<PySelection> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        let q = FloatArray::extract(q, "q", true)?;
        let qv = q.view().kv()?;
        let policy = &self.inner;
        cache.get().with_read(py, |c| policy.select(c, seq, layer, &qv)).map(PySelection::from)
    }

    #[doc = doc!(Policy.position_mode)]
    fn position_mode(&self, layer: i64) -> PyResult<(&'static str, Option<u32>)> {
        let layer = usize_arg(layer, "layer")?;
        Ok(position_mode_parts(self.inner.position_mode(layer)))
    }

    #[doc = doc!(Policy.is_dense)]
    fn is_dense(&self, layer: i64) -> PyResult<bool> {
        let layer = usize_arg(layer, "layer")?;
        Ok(self.inner.is_dense(layer))
    }

    #[doc = doc!(Policy.spec)]
    fn spec(&self, layer: i64, head: i64) -> PyResult<String> {
        let layer = usize_arg(layer, "layer")?;
        let head = usize_arg(head, "head")?;
        Ok(self.inner.spec(layer, head).to_string())
    }

    #[doc = doc!(Policy.window_pages_to_evict)]
    fn window_pages_to_evict<'py>(
        &self,
        py: Python<'py>,
        num_layers: i64,
        num_kv_heads: i64,
        seq_len: i64,
        page_size: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let num_layers = usize_arg(num_layers, "num_layers")?;
        let num_kv_heads = usize_arg(num_kv_heads, "num_kv_heads")?;
        let seq_len = usize_arg(seq_len, "seq_len")?;
        let page_size = usize_arg(page_size, "page_size")?;
        let pages = detach(py, || self.inner.window_pages_to_evict(num_layers, num_kv_heads, seq_len, page_size))?;
        let pages: Vec<i64> = pages.into_iter().map(|p| p as i64).collect();
        let n = pages.len();
        to_numpy(py, pages, &[n])
    }

    fn __str__(&self) -> String {
        self.inner.to_string()
    }

    fn __repr__(&self) -> String {
        // The canonical text holds no quotes or backslashes.
        format!("Policy('{}')", self.inner)
    }
}
