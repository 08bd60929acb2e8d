//! K-means clustering of keys and centroid retrieval (`kvsieve::select::cluster`,
//! Squeezed Attention): `ClusterIndex` (build, inspect, retrieve flat or hierarchically,
//! calibrate thresholds, assign new tokens, rebuild, save and load), `ClusterThresholds`,
//! and one head's K-means on its own (`kmeans`, `kmeans_seeds`). Keys come from a numpy array or from a `KvCache` (`cache=`,
//! `seq=`, `layer=`), exactly one of the two, as for GemFilter.

use std::path::PathBuf;

use kvsieve::select::cluster::{self, ClusterConfig, ClusterCount, ClusterIndex, CoarseRetrieve, Retrieve, Thresholds};
use kvsieve::Error;
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyList, PyTuple};

use crate::arrays::{to_numpy, type_name, usize_arg, FloatArray};
use crate::errors::{detach, KvResultExt};
use crate::gemfilter::{key_source, with_keys, Keys};
use crate::selection::PySelection;

/// A cluster count: an int (absolute) or a float (fraction of the tokens clustered).
pub(crate) fn cluster_count(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<ClusterCount> {
    let wrong = || Error::DType {
        param: param.into(),
        expected: "an int (clusters per KV head) or a float (a fraction of the tokens clustered, in (0, 1])".into(),
        got: format!("an object of type {}", type_name(obj)),
    };
    if obj.is_instance_of::<PyBool>() {
        return Err(wrong()).kv();
    }
    if obj.is_instance_of::<PyFloat>() {
        return Ok(ClusterCount::Fraction(obj.extract::<f64>()?));
    }
    match obj.extract::<i64>() {
        Ok(k) => Ok(ClusterCount::Absolute(usize_arg(k, param)?)),
        Err(_) => Err(wrong()).kv(),
    }
}

fn count_to_py<'py>(py: Python<'py>, c: ClusterCount) -> PyResult<Bound<'py, PyAny>> {
    Ok(match c {
        ClusterCount::Absolute(k) => k.into_pyobject(py)?.into_any(),
        ClusterCount::Fraction(f) => f.into_pyobject(py)?.into_any(),
    })
}

/// The build options of `ClusterIndex.build` and `CudaClusterIndex.build`, checked.
pub(crate) fn cluster_config(
    clusters: &Bound<'_, PyAny>,
    max_iter: i64,
    seed: i128,
    exclude_window: i64,
    coarse: Option<&Bound<'_, PyAny>>,
) -> PyResult<ClusterConfig> {
    Ok(ClusterConfig {
        clusters: cluster_count(clusters, "clusters")?,
        exclude_window: usize_arg(exclude_window, "exclude_window")?,
        max_iter: usize_arg(max_iter, "max_iter")?,
        seed: seed_arg(seed)?,
        coarse: coarse.map(|c| cluster_count(c, "coarse")).transpose()?,
    })
}

/// A seed: an int in `0 ..= 2**64 - 1`.
pub(crate) fn seed_arg(seed: i128) -> PyResult<u64> {
    u64::try_from(seed)
        .map_err(|_| Error::OutOfRange {
            param: "seed".into(),
            value: seed.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            range: "0..=2**64-1".into(),
        })
        .kv()
}

/// A file path: `str` or `os.PathLike`.
fn path_arg(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<PathBuf> {
    obj.extract::<PathBuf>().or_else(|_| {
        Err(Error::DType {
            param: param.into(),
            expected: "a str or os.PathLike path".into(),
            got: format!("an object of type {}", type_name(obj)),
        })
        .kv()
    })
}

/// Check `(num_kv_heads, head_dim)` of a key source against an index, naming the Python
/// argument the keys came from.
fn check_same_heads(
    index: (usize, usize),
    param: &'static str,
) -> impl Fn(usize, usize) -> Result<(), Error> + Send + Sync {
    move |hk, d| {
        if (hk, d) != index {
            return Err(Error::Shape {
                param: param.into(),
                expected: format!("keys with num_kv_heads {} and head_dim {} (as the index)", index.0, index.1),
                got: format!("num_kv_heads {hk} and head_dim {d}"),
            });
        }
        Ok(())
    }
}

fn source_param(keys: &Keys<'_>) -> &'static str {
    match keys {
        Keys::Array(_) => "keys",
        Keys::Cache { .. } => "cache",
    }
}

#[doc = doc!(ClusterThresholds)]
#[pyclass(name = "ClusterThresholds", module = "kvsieve", frozen)]
#[derive(Clone)]
pub struct PyClusterThresholds {
    inner: Thresholds,
}

#[pymethods]
impl PyClusterThresholds {
    #[doc = doc!(ClusterThresholds.per_head)]
    #[getter]
    fn per_head<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.per_head.clone();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(ClusterThresholds.kept_fraction)]
    #[getter]
    fn kept_fraction<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.kept_fraction.clone();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(ClusterThresholds.target)]
    #[getter]
    fn target(&self) -> f64 {
        self.inner.target
    }

    #[doc = doc!(ClusterThresholds.per_head_mode)]
    #[getter]
    fn per_head_mode(&self) -> bool {
        self.inner.per_head_mode
    }

    #[doc = doc!(ClusterThresholds.mean_kept_fraction)]
    fn mean_kept_fraction(&self) -> f64 {
        self.inner.mean_kept_fraction()
    }

    fn __len__(&self) -> usize {
        self.inner.per_head.len()
    }

    fn __repr__(&self) -> String {
        let taus: Vec<String> = self.inner.per_head.iter().map(|t| format!("{t:.6e}")).collect();
        format!(
            "ClusterThresholds(per_head=[{}], target={}, mean_kept_fraction={:.4}, per_head_mode={})",
            taus.join(", "),
            self.inner.target,
            self.inner.mean_kept_fraction(),
            if self.inner.per_head_mode { "True" } else { "False" }
        )
    }
}

/// The fine retrieval rule from `threshold=` / `budget=` (exactly one).
pub(crate) fn fine_rule(
    threshold: Option<&Bound<'_, PyAny>>,
    budget: Option<i64>,
    hk: usize,
    rank: &str,
) -> PyResult<Retrieve> {
    let mixed = match rank {
        "estimate" => false,
        "mixed" => true,
        _ => {
            return Err(Error::InvalidArgument {
                param: "rank".into(),
                expected: format!("\"estimate\" or \"mixed\", got {rank:?}"),
            })
            .kv()
        }
    };
    if mixed && budget.is_none() {
        return Err(Error::InvalidArgument {
            param: "rank".into(),
            expected: "\"estimate\" unless budget= is given (rank orders clusters to fill a budget)".into(),
        })
        .kv();
    }
    match (threshold, budget) {
        (None, Some(b)) if mixed => Ok(Retrieve::MixedBudget(usize_arg(b, "budget")?)),
        (None, None) => Err(Error::InvalidArgument {
            param: "threshold".into(),
            expected: "a threshold= or a budget= (neither was given)".into(),
        })
        .kv(),
        (Some(_), Some(_)) => Err(Error::InvalidArgument {
            param: "budget".into(),
            expected: "None when threshold= is given (keep clusters by a threshold or by a token budget, not both)"
                .into(),
        })
        .kv(),
        (None, Some(b)) => Ok(Retrieve::Budget(usize_arg(b, "budget")?)),
        (Some(t), None) => {
            let wrong = || Error::DType {
                param: "threshold".into(),
                expected: "a float, a ClusterThresholds, or one float per KV head (a sequence or 1-D array)".into(),
                got: format!("an object of type {}", type_name(t)),
            };
            let per_head = t.is_instance_of::<PyList>()
                || t.is_instance_of::<PyTuple>()
                || t.cast::<PyUntypedArray>().is_ok_and(|a| a.ndim() > 0);
            let taus: Vec<f64> = if let Ok(th) = t.cast::<PyClusterThresholds>() {
                th.get().inner.per_head.clone()
            } else if per_head {
                let list = match t.cast::<PyUntypedArray>() {
                    Ok(a) if a.ndim() == 1 => {
                        a.call_method1("astype", ("float64",)).and_then(|a| a.call_method0("tolist")).ok()
                    }
                    Ok(a) => {
                        return Err(Error::Shape {
                            param: "threshold".into(),
                            expected: format!("[{hk}] (one threshold per KV head)"),
                            got: format!("{:?}", a.shape()),
                        })
                        .kv()
                    }
                    Err(_) => Some(t.clone()),
                };
                list.and_then(|l| l.extract::<Vec<f64>>().ok()).ok_or_else(wrong).kv()?
            } else {
                if t.is_instance_of::<PyBool>() {
                    return Err(wrong()).kv();
                }
                let v = t.extract::<f64>().map_err(|_| wrong()).kv()?;
                if v.is_nan() {
                    return Err(Error::InvalidArgument {
                        param: "threshold".into(),
                        expected: "a threshold that is not NaN".into(),
                    })
                    .kv();
                }
                return Ok(Retrieve::Threshold(v));
            };
            if taus.len() != hk {
                return Err(Error::Shape {
                    param: "threshold".into(),
                    expected: format!("[{hk}] (one threshold per KV head)"),
                    got: format!("[{}]", taus.len()),
                })
                .kv();
            }
            if let Some(h) = taus.iter().position(|t| t.is_nan()) {
                return Err(Error::InvalidArgument {
                    param: format!("threshold[{h}]"),
                    expected: "a threshold that is not NaN".into(),
                })
                .kv();
            }
            Ok(Retrieve::PerHeadThreshold(taus))
        }
    }
}

/// The coarse rule from `coarse_threshold=` / `coarse_budget=` / `coarse_budget_multiple=`
/// (exactly one, with `hierarchical=True`; none otherwise).
pub(crate) fn coarse_rule(
    hierarchical: bool,
    threshold: Option<f64>,
    budget: Option<i64>,
    multiple: Option<f64>,
    fine: &Retrieve,
) -> PyResult<Option<CoarseRetrieve>> {
    let given: Vec<&str> = [
        ("coarse_threshold", threshold.is_some()),
        ("coarse_budget", budget.is_some()),
        ("coarse_budget_multiple", multiple.is_some()),
    ]
    .iter()
    .filter(|g| g.1)
    .map(|g| g.0)
    .collect();
    if !hierarchical {
        if let Some(&param) = given.first() {
            return Err(Error::InvalidArgument {
                param: param.into(),
                expected: "None unless hierarchical=True".into(),
            })
            .kv();
        }
        return Ok(None);
    }
    if given.len() > 1 {
        return Err(Error::InvalidArgument {
            param: given[1].into(),
            expected: format!(
                "None when {} is given (one coarse rule: coarse_threshold, coarse_budget or coarse_budget_multiple)",
                given[0]
            ),
        })
        .kv();
    }
    if let Some(t) = threshold {
        if t.is_nan() {
            return Err(Error::InvalidArgument {
                param: "coarse_threshold".into(),
                expected: "a threshold that is not NaN".into(),
            })
            .kv();
        }
        return Ok(Some(CoarseRetrieve::Threshold(t)));
    }
    if let Some(b) = budget {
        let b = usize_arg(b, "coarse_budget")?;
        if b == 0 {
            return Err(Error::InvalidArgument { param: "coarse_budget".into(), expected: "at least 1 token".into() })
                .kv();
        }
        return Ok(Some(CoarseRetrieve::Budget(b)));
    }
    if let Some(m) = multiple {
        if !(m > 0.0 && m.is_finite()) {
            return Err(Error::InvalidArgument {
                param: "coarse_budget_multiple".into(),
                expected: format!("a positive finite multiple, got {m}"),
            })
            .kv();
        }
        if !matches!(fine, Retrieve::Budget(_) | Retrieve::MixedBudget(_)) {
            return Err(Error::InvalidArgument {
                param: "coarse_budget_multiple".into(),
                expected: "a fine budget= to multiply (with threshold=, use coarse_threshold= or coarse_budget=)"
                    .into(),
            })
            .kv();
        }
        return Ok(Some(CoarseRetrieve::BudgetMultiple(m)));
    }
    Err(Error::InvalidArgument {
        param: "hierarchical".into(),
        expected: "a coarse rule with hierarchical=True: coarse_threshold=, coarse_budget= or coarse_budget_multiple="
            .into(),
    })
    .kv()
}

#[doc = doc!(ClusterIndex)]
#[pyclass(name = "ClusterIndex", module = "kvsieve", frozen)]
pub struct PyClusterIndex {
    inner: RwLock<ClusterIndex>,
}

impl From<ClusterIndex> for PyClusterIndex {
    fn from(index: ClusterIndex) -> Self {
        PyClusterIndex { inner: RwLock::new(index) }
    }
}

impl PyClusterIndex {
    /// A copy of the index as it is now.
    pub(crate) fn snapshot(&self) -> ClusterIndex {
        self.inner.read().clone()
    }

    /// Run `f` on the index under the read lock, with the GIL released.
    fn with_read<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&ClusterIndex) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        detach(py, || f(&self.inner.read()))
    }

    /// `h` checked against the index's KV heads.
    fn head_arg(&self, h: i64) -> PyResult<usize> {
        let hk = self.inner.read().num_kv_heads();
        usize::try_from(h)
            .ok()
            .filter(|&h| h < hk)
            .ok_or_else(|| Error::OutOfRange { param: "h".into(), value: h, range: format!("0..{hk} (num_kv_heads)") })
            .kv()
    }

    /// One head's `[num_clusters, head_dim]` f32 rows.
    fn head_rows<'py>(
        &self,
        py: Python<'py>,
        h: i64,
        f: impl Fn(&cluster::Clustering) -> &[f32],
    ) -> PyResult<Bound<'py, PyAny>> {
        let h = self.head_arg(h)?;
        let (v, k, d) = {
            let index = self.inner.read();
            (f(index.head(h)).to_vec(), index.num_clusters(), index.head_dim())
        };
        to_numpy(py, v, &[k, d])
    }

    /// One head's u32 vector.
    fn head_u32<'py>(
        &self,
        py: Python<'py>,
        h: i64,
        f: impl Fn(&cluster::Clustering) -> &[u32],
    ) -> PyResult<Bound<'py, PyAny>> {
        let h = self.head_arg(h)?;
        let v = f(self.inner.read().head(h)).to_vec();
        let n = v.len();
        to_numpy(py, v, &[n])
    }
}

#[pymethods]
impl PyClusterIndex {
    #[doc = doc!(ClusterIndex.build)]
    #[staticmethod]
    #[pyo3(signature = (keys = None, *, cache = None, seq = None, layer = None, clusters, max_iter = 20, seed = 0, exclude_window = 0, coarse = None))]
    #[allow(clippy::too_many_arguments)]
    fn build(
        py: Python<'_>,
        keys: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
        seq: Option<i64>,
        layer: Option<i64>,
        clusters: &Bound<'_, PyAny>,
        max_iter: i64,
        seed: i128,
        exclude_window: i64,
        coarse: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cfg = cluster_config(clusters, max_iter, seed, exclude_window, coarse)?;
        let keys = key_source(keys, cache, seq, layer)?;
        with_keys(py, &keys, true, |_, _| Ok(()), |src| ClusterIndex::build(src, &cfg)).map(Self::from)
    }

    #[doc = doc!(ClusterIndex.load)]
    #[staticmethod]
    fn load(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Self> {
        let path = path_arg(path, "path")?;
        detach(py, || ClusterIndex::load(&path)).map(Self::from)
    }

    #[doc = doc!(ClusterIndex.load_for)]
    #[staticmethod]
    #[pyo3(signature = (path, keys = None, *, cache = None, seq = None, layer = None))]
    fn load_for(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        keys: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
        seq: Option<i64>,
        layer: Option<i64>,
    ) -> PyResult<Self> {
        let path = path_arg(path, "path")?;
        let keys = key_source(keys, cache, seq, layer)?;
        with_keys(py, &keys, false, |_, _| Ok(()), |src| ClusterIndex::load_for(&path, src)).map(Self::from)
    }

    #[doc = doc!(ClusterIndex.from_bytes)]
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Self> {
        let data = data
            .cast::<PyBytes>()
            .map_err(|_| Error::DType {
                param: "data".into(),
                expected: "bytes".into(),
                got: format!("an object of type {}", type_name(data)),
            })
            .kv()?;
        let bytes = data.as_bytes();
        detach(py, || ClusterIndex::from_bytes(bytes)).map(Self::from)
    }

    #[doc = doc!(ClusterIndex.save)]
    fn save(&self, py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<()> {
        let path = path_arg(path, "path")?;
        self.with_read(py, |i| i.save(&path))
    }

    #[doc = doc!(ClusterIndex.to_bytes)]
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.with_read(py, |i| i.to_bytes())?;
        Ok(PyBytes::new(py, &bytes))
    }

    #[doc = doc!(ClusterIndex.num_kv_heads)]
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.read().num_kv_heads()
    }

    #[doc = doc!(ClusterIndex.head_dim)]
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.read().head_dim()
    }

    #[doc = doc!(ClusterIndex.num_clusters)]
    #[getter]
    fn num_clusters(&self) -> usize {
        self.inner.read().num_clusters()
    }

    #[doc = doc!(ClusterIndex.num_coarse_clusters)]
    #[getter]
    fn num_coarse_clusters(&self) -> usize {
        self.inner.read().num_coarse_clusters()
    }

    #[doc = doc!(ClusterIndex.seq_len_at_build)]
    #[getter]
    fn seq_len_at_build(&self) -> usize {
        self.inner.read().seq_len_at_build()
    }

    #[doc = doc!(ClusterIndex.seq_len)]
    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.read().seq_len()
    }

    #[doc = doc!(ClusterIndex.clustered_len)]
    #[getter]
    fn clustered_len(&self) -> usize {
        self.inner.read().clustered_len()
    }

    #[doc = doc!(ClusterIndex.config)]
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = *self.inner.read().config();
        let d = PyDict::new(py);
        d.set_item("clusters", count_to_py(py, c.clusters)?)?;
        d.set_item("coarse", c.coarse.map(|x| count_to_py(py, x)).transpose()?)?;
        d.set_item("exclude_window", c.exclude_window)?;
        d.set_item("max_iter", c.max_iter)?;
        d.set_item("seed", c.seed)?;
        Ok(d)
    }

    #[doc = doc!(ClusterIndex.centroids)]
    fn centroids<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        self.head_rows(py, h, |c| c.centroids())
    }

    #[doc = doc!(ClusterIndex.centroids_normalized)]
    fn centroids_normalized<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        self.head_rows(py, h, |c| c.centroids_normalized())
    }

    #[doc = doc!(ClusterIndex.radii)]
    fn radii<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        let h = self.head_arg(h)?;
        let v = self.inner.read().head(h).radii().to_vec();
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(ClusterIndex.sizes)]
    fn sizes<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        self.head_u32(py, h, |c| c.sizes())
    }

    #[doc = doc!(ClusterIndex.member_offsets)]
    fn member_offsets<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        self.head_u32(py, h, |c| c.member_offsets())
    }

    #[doc = doc!(ClusterIndex.members)]
    #[pyo3(signature = (h, c = None))]
    fn members<'py>(&self, py: Python<'py>, h: i64, c: Option<i64>) -> PyResult<Bound<'py, PyAny>> {
        let Some(c) = c else {
            return self.head_u32(py, h, |cl| cl.all_members());
        };
        let h = self.head_arg(h)?;
        let v = {
            let index = self.inner.read();
            let k = index.num_clusters();
            let c = usize::try_from(c)
                .ok()
                .filter(|&c| c < k)
                .ok_or_else(|| Error::OutOfRange {
                    param: "c".into(),
                    value: c,
                    range: format!("0..{k} (num_clusters)"),
                })
                .kv()?;
            index.head(h).members(c).to_vec()
        };
        let n = v.len();
        to_numpy(py, v, &[n])
    }

    #[doc = doc!(ClusterIndex.assignment)]
    fn assignment<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyAny>> {
        self.head_u32(py, h, |c| c.assignment())
    }

    #[doc = doc!(ClusterIndex.diagnostics)]
    fn diagnostics<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Bound<'py, PyDict>> {
        let h = self.head_arg(h)?;
        let (inertia, history, iterations, converged, seeds) = {
            let index = self.inner.read();
            let c = index.head(h);
            (c.inertia(), c.inertia_history().to_vec(), c.iterations(), c.converged(), c.seeds().to_vec())
        };
        let d = PyDict::new(py);
        d.set_item("inertia", inertia)?;
        d.set_item("inertia_history", PyList::new(py, history)?)?;
        d.set_item("iterations", iterations)?;
        d.set_item("converged", converged)?;
        let n = seeds.len();
        d.set_item("seeds", to_numpy(py, seeds, &[n])?)?;
        Ok(d)
    }

    #[doc = doc!(ClusterIndex.coarse_level)]
    fn coarse_level<'py>(&self, py: Python<'py>, h: i64) -> PyResult<Option<Bound<'py, PyDict>>> {
        let h = self.head_arg(h)?;
        let (level, d) = {
            let index = self.inner.read();
            (index.coarse(h).cloned(), index.head_dim())
        };
        let Some(level) = level else { return Ok(None) };
        let k1 = level.num_clusters();
        let out = PyDict::new(py);
        out.set_item("centroids", to_numpy(py, level.centroids().to_vec(), &[k1, d])?)?;
        out.set_item("sizes", to_numpy(py, level.sizes().to_vec(), &[k1])?)?;
        out.set_item("child_offsets", to_numpy(py, level.child_offsets().to_vec(), &[k1 + 1])?)?;
        let children = level.all_children().to_vec();
        let n = children.len();
        out.set_item("children", to_numpy(py, children, &[n])?)?;
        Ok(Some(out))
    }

    #[doc = doc!(ClusterIndex.cluster_estimates)]
    fn cluster_estimates<'py>(&self, py: Python<'py>, q: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let q = FloatArray::extract(q, "q", true)?;
        let qv = q.view().kv()?;
        let est = self.with_read(py, |i| i.cluster_estimates(&qv))?;
        let (hk, k) = (est.len(), est.first().map_or(0, |e| e.len()));
        to_numpy(py, est.into_iter().flatten().collect(), &[hk, k])
    }

    #[doc = doc!(ClusterIndex.retrieve)]
    #[pyo3(signature = (q, *, threshold = None, budget = None, seq_len = None, hierarchical = false, coarse_threshold = None, coarse_budget = None, coarse_budget_multiple = None, rank = "estimate"))]
    #[allow(clippy::too_many_arguments)]
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        threshold: Option<&Bound<'py, PyAny>>,
        budget: Option<i64>,
        seq_len: Option<i64>,
        hierarchical: bool,
        coarse_threshold: Option<f64>,
        coarse_budget: Option<i64>,
        coarse_budget_multiple: Option<f64>,
        rank: &str,
    ) -> PyResult<(PySelection, Bound<'py, PyDict>)> {
        let (hk, has_coarse, covered) = {
            let i = self.inner.read();
            (i.num_kv_heads(), i.num_coarse_clusters() > 0, i.seq_len())
        };
        let fine = fine_rule(threshold, budget, hk, rank)?;
        let coarse = coarse_rule(hierarchical, coarse_threshold, coarse_budget, coarse_budget_multiple, &fine)?;
        if hierarchical && !has_coarse {
            return Err(Error::InvalidArgument {
                param: "hierarchical".into(),
                expected: "False for an index built without coarse= (it has no coarse level)".into(),
            })
            .kv();
        }
        let seq_len = match seq_len {
            Some(n) => usize_arg(n, "seq_len")?,
            None => covered,
        };
        let q = FloatArray::extract(q, "q", true)?;
        let qv = q.view().kv()?;
        let r = self.with_read(py, |i| match coarse {
            Some(c) => i.retrieve_hierarchical(&qv, c, &fine, seq_len),
            None => i.retrieve(&qv, &fine, seq_len),
        })?;
        let s = r.stats;
        let d = PyDict::new(py);
        d.set_item("centroid_evals", s.centroid_evals)?;
        d.set_item("coarse_evals", s.coarse_evals)?;
        d.set_item("fine_evals", s.fine_evals)?;
        d.set_item("clusters_scored", s.clusters_scored)?;
        d.set_item("clusters_kept", s.clusters_kept)?;
        d.set_item("coarse_kept", s.coarse_kept)?;
        d.set_item("tokens_kept", s.tokens_kept)?;
        Ok((PySelection::from(r.selection), d))
    }

    #[doc = doc!(ClusterIndex.calibrate)]
    #[pyo3(signature = (queries, target_fraction, per_head = false))]
    fn calibrate(
        &self,
        py: Python<'_>,
        queries: &Bound<'_, PyAny>,
        target_fraction: f64,
        per_head: bool,
    ) -> PyResult<PyClusterThresholds> {
        let q = FloatArray::extract(queries, "queries", true)?;
        let qv = q.view().kv()?;
        self.with_read(py, |i| cluster::calibrate(i, &qv, target_fraction, per_head))
            .map(|inner| PyClusterThresholds { inner })
    }

    #[doc = doc!(ClusterIndex.assign_new)]
    #[pyo3(signature = (keys = None, *, cache = None, seq = None, layer = None))]
    fn assign_new(
        &self,
        py: Python<'_>,
        keys: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
        seq: Option<i64>,
        layer: Option<i64>,
    ) -> PyResult<usize> {
        let keys = key_source(keys, cache, seq, layer)?;
        let heads = (self.num_kv_heads(), self.head_dim());
        with_keys(py, &keys, false, check_same_heads(heads, source_param(&keys)), |src| {
            self.inner.write().assign_new(src)
        })
    }

    #[doc = doc!(ClusterIndex.rebuild)]
    #[pyo3(signature = (keys = None, *, cache = None, seq = None, layer = None))]
    fn rebuild(
        &self,
        py: Python<'_>,
        keys: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
        seq: Option<i64>,
        layer: Option<i64>,
    ) -> PyResult<()> {
        let keys = key_source(keys, cache, seq, layer)?;
        let heads = (self.num_kv_heads(), self.head_dim());
        with_keys(py, &keys, true, check_same_heads(heads, source_param(&keys)), |src| self.inner.write().rebuild(src))
    }

    fn __repr__(&self) -> String {
        let i = self.inner.read();
        format!(
            "ClusterIndex(num_kv_heads={}, head_dim={}, num_clusters={}, num_coarse_clusters={}, seq_len={}, clustered_len={})",
            i.num_kv_heads(),
            i.head_dim(),
            i.num_clusters(),
            i.num_coarse_clusters(),
            i.seq_len(),
            i.clustered_len()
        )
    }
}

/// One head's clustering as a dict of numpy arrays and numbers.
fn clustering_dict<'py>(py: Python<'py>, c: cluster::Clustering) -> PyResult<Bound<'py, PyDict>> {
    let (k, d, n) = (c.num_clusters(), c.head_dim(), c.num_points());
    let out = PyDict::new(py);
    out.set_item("centroids", to_numpy(py, c.centroids().to_vec(), &[k, d])?)?;
    out.set_item("centroids_normalized", to_numpy(py, c.centroids_normalized().to_vec(), &[k, d])?)?;
    out.set_item("sizes", to_numpy(py, c.sizes().to_vec(), &[k])?)?;
    out.set_item("member_offsets", to_numpy(py, c.member_offsets().to_vec(), &[k + 1])?)?;
    out.set_item("members", to_numpy(py, c.all_members().to_vec(), &[n])?)?;
    out.set_item("assignment", to_numpy(py, c.assignment().to_vec(), &[n])?)?;
    out.set_item("inertia", c.inertia())?;
    out.set_item("inertia_history", PyList::new(py, c.inertia_history())?)?;
    out.set_item("iterations", c.iterations())?;
    out.set_item("converged", c.converged())?;
    let seeds = c.seeds().to_vec();
    let s = seeds.len();
    out.set_item("seeds", to_numpy(py, seeds, &[s])?)?;
    Ok(out)
}

/// Rows `[n, d]` of a 2-D float array, as f32 in C order, with `d`.
fn rows_arg(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<(Vec<f32>, usize)> {
    let a = FloatArray::extract(obj, param, true)?;
    let &[_, d] = a.shape() else {
        return Err(Error::Shape {
            param: param.into(),
            expected: "a 2-D array [rows, head_dim]".into(),
            got: format!("{:?}", a.shape()),
        })
        .kv();
    };
    Ok((a.to_f32_vec(), d))
}

#[doc = doc!(kmeans)]
#[pyfunction]
#[pyo3(signature = (keys, clusters = None, *, init = None, max_iter = 20, seed = 0))]
pub fn kmeans<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    clusters: Option<&Bound<'py, PyAny>>,
    init: Option<&Bound<'py, PyAny>>,
    max_iter: i64,
    seed: i128,
) -> PyResult<Bound<'py, PyDict>> {
    let max_iter = usize_arg(max_iter, "max_iter")?;
    let seed = seed_arg(seed)?;
    let (rows, d) = rows_arg(keys, "keys")?;
    let cl = match (clusters, init) {
        (Some(c), None) => {
            let cfg = cluster::KMeansConfig { clusters: cluster_count(c, "clusters")?, max_iter, seed };
            detach(py, || cluster::kmeans(&rows, d, &cfg))?
        }
        (None, Some(i)) => {
            let (init, di) = rows_arg(i, "init")?;
            if di != d {
                return Err(Error::Shape {
                    param: "init".into(),
                    expected: format!("[k, {d}] (head_dim of the keys)"),
                    got: format!("[.., {di}]"),
                })
                .kv();
            }
            detach(py, || cluster::kmeans_from_centroids(&rows, d, &init, max_iter))?
        }
        (None, None) => {
            return Err(Error::InvalidArgument {
                param: "clusters".into(),
                expected: "a cluster count, or initial centroids as init= (neither was given)".into(),
            })
            .kv()
        }
        (Some(_), Some(_)) => {
            return Err(Error::InvalidArgument {
                param: "init".into(),
                expected: "None when clusters= is given (start from k-means++ seeds or from given centroids, not both)"
                    .into(),
            })
            .kv()
        }
    };
    clustering_dict(py, cl)
}

#[doc = doc!(kmeans_seeds)]
#[pyfunction]
#[pyo3(signature = (keys, k, seed = 0))]
pub fn kmeans_seeds<'py>(py: Python<'py>, keys: &Bound<'py, PyAny>, k: i64, seed: i128) -> PyResult<Bound<'py, PyAny>> {
    let k = usize_arg(k, "k")?;
    let seed = seed_arg(seed)?;
    let (rows, d) = rows_arg(keys, "keys")?;
    let seeds = detach(py, || cluster::seed_plus_plus(&rows, d, k, seed))?;
    let n = seeds.len();
    to_numpy(py, seeds, &[n])
}
