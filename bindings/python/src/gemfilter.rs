//! GemFilter and SnapKV (`kvsieve::select::gemfilter`): token scores from a layer's last
//! query, their centred average pool, GemFilter's selection, SnapKV's observation-window
//! selection, and filter-layer calibration. Keys come from a numpy array or from a
//! `KvCache` (`cache=`, `seq=`, `layer=`), exactly one of the two.

use kvsieve::config::MAX_HEAD_DIM;
use kvsieve::select::gemfilter::{self, GemFilterConfig, KeySource, SnapKvConfig};
use kvsieve::{Error, KeyRope, KvCache, TensorView};
use pyo3::prelude::*;

use crate::arrays::{items, seq_id, to_numpy, type_name, usize_arg, FloatArray};
use crate::cache::PyKvCache;
use crate::errors::{detach, KvResultExt};
use crate::selection::PySelection;

/// Where a call's keys come from.
pub(crate) enum Keys<'py> {
    Array(FloatArray<'py>),
    Cache { cache: Bound<'py, PyKvCache>, seq: u64, layer: usize },
}

/// The key source from `keys=` or `cache=`, `seq=`, `layer=`: exactly one of the two.
pub(crate) fn key_source<'py>(
    keys: Option<&Bound<'py, PyAny>>,
    cache: Option<&Bound<'py, PyAny>>,
    seq: Option<i64>,
    layer: Option<i64>,
) -> PyResult<Keys<'py>> {
    let given: Vec<&str> = [("cache", cache.is_some()), ("seq", seq.is_some()), ("layer", layer.is_some())]
        .iter()
        .filter(|g| g.1)
        .map(|g| g.0)
        .collect();
    if let Some(keys) = keys {
        if let Some(&param) = given.first() {
            return Err(Error::InvalidArgument {
                param: param.into(),
                expected: "None when `keys` is given (keys come from the `keys` array or from cache=, seq= and layer=, not both)".into(),
            })
            .kv();
        }
        return Ok(Keys::Array(FloatArray::extract(keys, "keys", true)?));
    }
    let Some(cache) = cache else {
        let (param, expected) = match given.first() {
            Some(_) => ("cache", "a KvCache when seq= or layer= is given"),
            None => ("keys", "a key array [n, num_kv_heads, head_dim], or cache=, seq= and layer= (neither was given)"),
        };
        return Err(Error::InvalidArgument { param: param.into(), expected: expected.into() }).kv();
    };
    let cache = cache
        .cast::<PyKvCache>()
        .map_err(|_| Error::DType {
            param: "cache".into(),
            expected: "a kvsieve.KvCache".into(),
            got: format!("an object of type {}", type_name(cache)),
        })
        .kv()?
        .clone();
    let missing =
        |param: &str| Error::InvalidArgument { param: param.into(), expected: "an int when cache= is given".into() };
    let seq = seq_id(seq.ok_or_else(|| missing("seq")).kv()?, "seq")?;
    let layer = usize_arg(layer.ok_or_else(|| missing("layer")).kv()?, "layer")?;
    Ok(Keys::Cache { cache, seq, layer })
}

/// `(n, num_kv_heads, head_dim)` of a key array, checked so that errors name the argument
/// (the scoring kernels need a head_dim that is a multiple of 8).
fn check_keys(shape: &[usize], param: &str) -> Result<(usize, usize, usize), Error> {
    let &[n, hk, d] = shape else {
        return Err(Error::Shape {
            param: param.into(),
            expected: "[n, num_kv_heads, head_dim]".into(),
            got: format!("{shape:?}"),
        });
    };
    if hk == 0 {
        return Err(Error::Shape {
            param: param.into(),
            expected: "at least one KV head".into(),
            got: format!("{shape:?}"),
        });
    }
    if d == 0 || d % 8 != 0 || d > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "`{param}` head_dim {d}: expected a multiple of 8 from 8 to {MAX_HEAD_DIM}"
        )));
    }
    if n > u32::MAX as usize {
        return Err(Error::Shape {
            param: param.into(),
            expected: format!("at most {} tokens", u32::MAX),
            got: format!("{shape:?}"),
        });
    }
    Ok((n, hk, d))
}

/// A filter query: `[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`, with
/// `num_qo_heads` a positive multiple of the keys' `num_kv_heads`.
fn check_query(shape: &[usize], hk: usize, d: usize, param: &str) -> Result<(), Error> {
    let hq = match *shape {
        [hq, qd] if qd == d => hq,
        [1, hq, qd] if qd == d => hq,
        _ => {
            return Err(Error::Shape {
                param: param.into(),
                expected: format!("[num_qo_heads, {d}] or [1, num_qo_heads, {d}] (head_dim of the keys)"),
                got: format!("{shape:?}"),
            })
        }
    };
    if hq == 0 || hq % hk != 0 {
        return Err(Error::Shape {
            param: param.into(),
            expected: format!("a number of query heads that is a positive multiple of num_kv_heads {hk}"),
            got: format!("{hq} query heads"),
        });
    }
    Ok(())
}

/// SnapKV's window queries: `[w, num_qo_heads, head_dim]`, `w >= 1`, heads as in [`check_query`].
fn check_window(shape: &[usize], hk: usize, d: usize) -> Result<(), Error> {
    match *shape {
        [w, hq, qd] if w > 0 && qd == d && hq > 0 && hq % hk == 0 => Ok(()),
        _ => Err(Error::Shape {
            param: "q_window".into(),
            expected: format!("[w >= 1, num_qo_heads (a positive multiple of num_kv_heads {hk}), {d}]"),
            got: format!("{shape:?}"),
        }),
    }
}

/// Checks of a cache source, under the cache's lock: keys stored after RoPE, a known
/// sequence (non-empty when `non_empty`) and the query against the cache's heads.
fn check_cache(
    c: &KvCache,
    seq: u64,
    non_empty: bool,
    check_q: impl FnOnce(usize, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    let cfg = c.config();
    if cfg.key_rope == KeyRope::PreRope {
        return Err(Error::InvalidArgument {
            param: "cache".into(),
            expected: "a cache with key_rope=\"post\" (the scores are the model's logits, over keys after RoPE)".into(),
        });
    }
    if non_empty && c.seq_len(seq)? == 0 {
        return Err(Error::InvalidArgument {
            param: "seq".into(),
            expected: format!("a sequence holding at least one token (sequence {seq} is empty)"),
        });
    }
    check_q(cfg.num_kv_heads, cfg.head_dim)
}

/// Run `f` on the query view and the key source, with the GIL released (and the cache's read
/// lock held for a cache source), after checking the query with `check_q(num_kv_heads, head_dim)`.
pub(crate) fn with_keys<T: Send>(
    py: Python<'_>,
    keys: &Keys<'_>,
    non_empty: bool,
    check_q: impl Fn(usize, usize) -> Result<(), Error> + Send + Sync,
    f: impl FnOnce(KeySource) -> Result<T, Error> + Send,
) -> PyResult<T> {
    match keys {
        Keys::Array(a) => {
            let (_, hk, d) = check_keys(a.shape(), "keys").kv()?;
            check_q(hk, d).kv()?;
            let kv = a.view().kv()?;
            detach(py, || f(KeySource::Tensor(&kv)))
        }
        Keys::Cache { cache, seq, layer } => {
            let (seq, layer) = (*seq, *layer);
            cache.get().with_read(py, |c| {
                check_cache(c, seq, non_empty, check_q)?;
                f(KeySource::Cache { cache: c, seq, layer })
            })
        }
    }
}

#[doc = doc!(gemfilter_scores)]
#[pyfunction]
#[pyo3(signature = (q, keys = None, *, cache = None, seq = None, layer = None))]
pub fn gemfilter_scores<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    keys: Option<&Bound<'py, PyAny>>,
    cache: Option<&Bound<'py, PyAny>>,
    seq: Option<i64>,
    layer: Option<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let q = FloatArray::extract(q, "q", true)?;
    let keys = key_source(keys, cache, seq, layer)?;
    let qv = q.view().kv()?;
    let shape = q.shape().to_vec();
    let scores =
        with_keys(py, &keys, false, |hk, d| check_query(&shape, hk, d, "q"), |src| gemfilter::token_scores(&qv, src))?;
    let n = scores.len();
    to_numpy(py, scores, &[n])
}

#[doc = doc!(avg_pool)]
#[pyfunction]
pub fn avg_pool<'py>(py: Python<'py>, scores: &Bound<'py, PyAny>, kernel: i64) -> PyResult<Bound<'py, PyAny>> {
    let kernel = usize_arg(kernel, "kernel")?;
    if kernel % 2 == 0 {
        return Err(Error::InvalidArgument {
            param: "kernel".into(),
            expected: format!("an odd width (1 = no pooling), got {kernel}"),
        })
        .kv();
    }
    let arr = FloatArray::extract(scores, "scores", true)?;
    if arr.shape().len() != 1 {
        return Err(Error::Shape {
            param: "scores".into(),
            expected: "a 1-D array".into(),
            got: format!("{:?}", arr.shape()),
        })
        .kv();
    }
    let values = arr.to_f32_vec();
    let pooled = detach(py, || gemfilter::avg_pool(&values, kernel))?;
    let n = pooled.len();
    to_numpy(py, pooled, &[n])
}

fn gemfilter_config(k: i64, pool_kernel: i64, keep_first: i64, keep_last: i64) -> PyResult<GemFilterConfig> {
    Ok(GemFilterConfig {
        k: usize_arg(k, "k")?,
        pool_kernel: usize_arg(pool_kernel, "pool_kernel")?,
        keep_first: usize_arg(keep_first, "keep_first")?,
        keep_last: usize_arg(keep_last, "keep_last")?,
    })
}

#[doc = doc!(gemfilter_select)]
#[pyfunction]
#[pyo3(signature = (q, keys = None, *, cache = None, seq = None, layer = None, k, pool_kernel = 5, keep_first = 0, keep_last = 0))]
#[allow(clippy::too_many_arguments)]
pub fn gemfilter_select<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    keys: Option<&Bound<'py, PyAny>>,
    cache: Option<&Bound<'py, PyAny>>,
    seq: Option<i64>,
    layer: Option<i64>,
    k: i64,
    pool_kernel: i64,
    keep_first: i64,
    keep_last: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = gemfilter_config(k, pool_kernel, keep_first, keep_last)?;
    let q = FloatArray::extract(q, "q", true)?;
    let keys = key_source(keys, cache, seq, layer)?;
    let qv = q.view().kv()?;
    let shape = q.shape().to_vec();
    let kept =
        with_keys(py, &keys, true, |hk, d| check_query(&shape, hk, d, "q"), |src| gemfilter::select(&qv, src, &cfg))?;
    let n = kept.len();
    to_numpy(py, kept, &[n])
}

#[doc = doc!(snapkv)]
#[pyfunction]
#[pyo3(signature = (q_window, keys = None, *, cache = None, seq = None, layer = None, k, pool_kernel = 7, scale = None))]
#[allow(clippy::too_many_arguments)]
pub fn snapkv<'py>(
    py: Python<'py>,
    q_window: &Bound<'py, PyAny>,
    keys: Option<&Bound<'py, PyAny>>,
    cache: Option<&Bound<'py, PyAny>>,
    seq: Option<i64>,
    layer: Option<i64>,
    k: i64,
    pool_kernel: i64,
    scale: Option<f32>,
) -> PyResult<(PySelection, Bound<'py, PyAny>)> {
    let cfg = SnapKvConfig { k: usize_arg(k, "k")?, pool_kernel: usize_arg(pool_kernel, "pool_kernel")?, scale };
    if let Some(s) = scale {
        if !s.is_finite() {
            return Err(Error::InvalidArgument {
                param: "scale".into(),
                expected: format!("a finite number (or None for 1/sqrt(head_dim)), got {s}"),
            })
            .kv();
        }
    }
    let q = FloatArray::extract(q_window, "q_window", true)?;
    let keys = key_source(keys, cache, seq, layer)?;
    let qv = q.view().kv()?;
    let shape = q.shape().to_vec();
    let res = with_keys(py, &keys, true, |hk, d| check_window(&shape, hk, d), |src| gemfilter::snapkv(&qv, src, &cfg))?;
    let n = res.union.len();
    Ok((PySelection::from(res.per_head), to_numpy(py, res.union, &[n])?))
}

#[doc = doc!(calibrate_filter_layer)]
#[pyfunction]
#[pyo3(signature = (queries, keys, needle_start, needle_end, *, k, pool_kernel = 5, keep_first = 0, keep_last = 0))]
#[allow(clippy::too_many_arguments)]
pub fn calibrate_filter_layer<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
    needle_start: i64,
    needle_end: i64,
    k: i64,
    pool_kernel: i64,
    keep_first: i64,
    keep_last: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = gemfilter_config(k, pool_kernel, keep_first, keep_last)?;
    let start = usize_arg(needle_start, "needle_start")?;
    let end = usize_arg(needle_end, "needle_end")?;
    if end <= start {
        return Err(Error::InvalidArgument {
            param: "needle_end".into(),
            expected: format!("more than needle_start ({start}) (a non-empty needle), got {end}"),
        })
        .kv();
    }
    let qs = items(queries, "queries", "query arrays [num_qo_heads, head_dim] (one per layer)")?;
    let ks = items(keys, "keys", "key arrays [n, num_kv_heads, head_dim] (one per layer)")?;
    if qs.is_empty() {
        return Err(Error::InvalidArgument { param: "queries".into(), expected: "at least one layer".into() }).kv();
    }
    if ks.len() != qs.len() {
        return Err(Error::Shape {
            param: "keys".into(),
            expected: format!("{} key arrays (one per layer, as queries)", qs.len()),
            got: format!("{}", ks.len()),
        })
        .kv();
    }
    let mut arrays = Vec::with_capacity(qs.len());
    for (l, (q, kk)) in qs.iter().zip(&ks).enumerate() {
        let (qp, kp) = (format!("queries[{l}]"), format!("keys[{l}]"));
        let kk = FloatArray::extract(kk, &kp, true)?;
        let (n, hk, d) = check_keys(kk.shape(), &kp).kv()?;
        let q = FloatArray::extract(q, &qp, true)?;
        check_query(q.shape(), hk, d, &qp).kv()?;
        if end > n {
            return Err(Error::OutOfRange {
                param: "needle_end".into(),
                value: end as i64,
                range: format!("{}..={n} (`{kp}` holds {n} tokens)", start + 1),
            })
            .kv();
        }
        arrays.push((q, kk));
    }
    let views = arrays.iter().map(|(q, kk)| Ok((q.view()?, kk.view()?))).collect::<Result<Vec<_>, Error>>().kv()?;
    let res = detach(py, || {
        gemfilter::calibrate_layers(views.len(), start..end, &cfg, &mut |l| {
            let (q, kk): &(TensorView, TensorView) = &views[l];
            Ok((q.clone(), KeySource::Tensor(kk)))
        })
    })?;
    let recalls: Vec<f64> = res.iter().map(|r| r.recall).collect();
    let n = recalls.len();
    to_numpy(py, recalls, &[n])
}
