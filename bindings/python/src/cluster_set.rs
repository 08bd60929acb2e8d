//! `ClusterIndexSet`: the per-(sequence, layer) cluster indexes a policy with `clusters=`
//! reads, passed to `KvCache.decode_with_policy(..., clusters=)`.

use kvsieve::runtime::ClusterIndexSet;
use parking_lot::RwLock;
use pyo3::prelude::*;

use crate::arrays::{seq_id, usize_arg};
use crate::cache::PyKvCache;
use crate::cluster::{seed_arg, PyClusterIndex};
use crate::policy::policy_arg;

#[doc = doc!(ClusterIndexSet)]
#[pyclass(name = "ClusterIndexSet", module = "kvsieve", frozen)]
pub struct PyClusterIndexSet {
    pub(crate) inner: RwLock<ClusterIndexSet>,
}

#[pymethods]
impl PyClusterIndexSet {
    #[new]
    #[pyo3(signature = (seed = 0))]
    fn new(seed: i128) -> PyResult<Self> {
        Ok(PyClusterIndexSet { inner: RwLock::new(ClusterIndexSet::with_seed(seed_arg(seed)?)) })
    }

    #[doc = doc!(ClusterIndexSet.build)]
    fn build(
        &self,
        py: Python<'_>,
        cache: &Bound<'_, PyKvCache>,
        seq: i64,
        policy: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        let policy = policy_arg(policy)?;
        let set = &self.inner;
        cache.get().with_read(py, |c| set.write().build(c, seq, &policy))
    }

    #[doc = doc!(ClusterIndexSet.update)]
    fn update(&self, py: Python<'_>, cache: &Bound<'_, PyKvCache>, seq: i64) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        let set = &self.inner;
        cache.get().with_read(py, |c| set.write().update(c, seq))
    }

    #[doc = doc!(ClusterIndexSet.remove_sequence)]
    fn remove_sequence(&self, seq: i64) -> PyResult<usize> {
        let seq = seq_id(seq, "seq")?;
        Ok(self.inner.write().remove_sequence(seq))
    }

    #[doc = doc!(ClusterIndexSet.get)]
    fn get(&self, seq: i64, layer: i64) -> PyResult<Option<PyClusterIndex>> {
        let seq = seq_id(seq, "seq")?;
        let layer = usize_arg(layer, "layer")?;
        Ok(self.inner.read().get(seq, layer).cloned().map(PyClusterIndex::from))
    }

    #[doc = doc!(ClusterIndexSet.keys)]
    fn keys(&self) -> Vec<(u64, usize)> {
        self.inner.read().keys().collect()
    }

    fn __len__(&self) -> usize {
        self.inner.read().len()
    }

    fn __repr__(&self) -> String {
        format!("ClusterIndexSet({} indexes)", self.inner.read().len())
    }
}
