//! Attention over engine-owned paged KV memory (`paged_decode`, `paged_prefill` and their
//! sparse forms over `Selection`s) and `merge_states`. The page arrays are read in place through their own strides.

use kvsieve::attention::{self, AttentionParams};
use kvsieve::{Error, PageLayout, PageTableRef, PagedKv, PagedKvLayout, Selection};
use pyo3::prelude::*;

use crate::arrays::{filled, i32_vec, numel, to_numpy, FloatArray, OutBuf};
use crate::errors::{detach, KvResultExt};
use crate::options::{check_position_mode, parse_key_rope, parse_layout, query_shape, AttentionKw};
use crate::rope::PyRopeConfig;
use crate::selection::selections_arg;
use crate::sparse::windows_arg;

/// The layout of an engine's K and V page arrays, read from their shapes and strides.
fn pages_layout(k: &FloatArray, v: &FloatArray, layout: PageLayout) -> Result<PagedKvLayout, Error> {
    let expected = match layout {
        PageLayout::Nhd => "[num_pages, page_size, num_kv_heads, head_dim] (layout \"nhd\")",
        PageLayout::Hnd => "[num_pages, num_kv_heads, page_size, head_dim] (layout \"hnd\")",
    };
    let shape = k.shape();
    if shape.len() != 4 {
        return Err(Error::Shape { param: "k_pages".into(), expected: expected.into(), got: format!("{shape:?}") });
    }
    if v.shape() != shape {
        return Err(Error::Shape {
            param: "v_pages".into(),
            expected: format!("k_pages' shape {shape:?}"),
            got: format!("{:?}", v.shape()),
        });
    }
    if v.dtype() != k.dtype() {
        return Err(Error::DType {
            param: "v_pages".into(),
            expected: format!("k_pages' dtype {}", k.dtype()),
            got: v.dtype().to_string(),
        });
    }
    let (ks, vs) = (k.strides(), v.strides());
    // numpy gives empty arrays all-zero strides; nothing of them is ever read.
    let empty = shape.contains(&0);
    for (param, s) in [("k_pages", &ks), ("v_pages", &vs)] {
        if !empty && shape[3] > 1 && s[3] != 1 {
            return Err(Error::Shape {
                param: param.into(),
                expected: "contiguous head_dim (innermost stride of 1 element)".into(),
                got: format!("element strides {s:?}"),
            });
        }
    }
    let (num_pages, head_dim) = (shape[0], shape[3]);
    let (page_size, num_kv_heads, k_strides, v_strides) = match layout {
        PageLayout::Nhd => (shape[1], shape[2], [ks[0], ks[1], ks[2]], [vs[0], vs[1], vs[2]]),
        PageLayout::Hnd => (shape[2], shape[1], [ks[0], ks[2], ks[1]], [vs[0], vs[2], vs[1]]),
    };
    Ok(PagedKvLayout { dtype: k.dtype(), num_pages, page_size, num_kv_heads, head_dim, k_strides, v_strides })
}

/// The engine's memory and page table, borrowed for one call.
struct EnginePages<'py> {
    k: FloatArray<'py>,
    v: FloatArray<'py>,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    last_page_len: Vec<i32>,
    positions: Option<Vec<i32>>,
    layout: PageLayout,
    key_rope: kvsieve::KeyRope,
}

impl<'py> EnginePages<'py> {
    #[allow(clippy::too_many_arguments)]
    fn extract(
        k_pages: &Bound<'py, PyAny>,
        v_pages: &Bound<'py, PyAny>,
        indptr: &Bound<'py, PyAny>,
        indices: &Bound<'py, PyAny>,
        last_page_len: &Bound<'py, PyAny>,
        layout: &str,
        positions: Option<&Bound<'py, PyAny>>,
        key_rope: &str,
    ) -> PyResult<Self> {
        Ok(EnginePages {
            k: FloatArray::extract(k_pages, "k_pages", false)?,
            v: FloatArray::extract(v_pages, "v_pages", false)?,
            indptr: i32_vec(indptr, "indptr")?,
            indices: i32_vec(indices, "indices")?,
            last_page_len: i32_vec(last_page_len, "last_page_len")?,
            positions: positions.map(|p| i32_vec(p, "positions")).transpose()?,
            layout: parse_layout("layout", layout).kv()?,
            key_rope: parse_key_rope("key_rope", key_rope).kv()?,
        })
    }

    /// A validated view over the arrays.
    fn view(&self) -> Result<PagedKv<'_>, Error> {
        let layout = pages_layout(&self.k, &self.v, self.layout)?;
        let table = PageTableRef { indptr: &self.indptr, indices: &self.indices, last_page_len: &self.last_page_len };
        // SAFETY: 1. the layout comes from the arrays' own shapes and strides, so every
        // element it reaches lies inside them, and the read-only numpy borrows held by
        // `self` keep them alive for the view's lifetime; 2. no other kvsieve call can
        // write them meanwhile (the caller must not write them from Python during the call,
        // as documented); 3. from_raw checks the alignment itself.
        let kv = unsafe { PagedKv::from_raw(self.k.data_ptr(), self.v.data_ptr(), layout, table)? };
        let kv = match &self.positions {
            Some(p) => kv.with_positions(p)?,
            None => kv,
        };
        Ok(kv.with_key_rope(self.key_rope))
    }
}

#[doc = doc!(paged_decode)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, *, layout = "nhd", positions = None, key_rope = "post", scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    layout: &str,
    positions: Option<&Bound<'py, PyAny>>,
    key_rope: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<PyRef<'py, PyRopeConfig>>,
    position_mode: &str,
    max_distance: Option<i64>,
    chunk_size: Option<i64>,
    out_dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let pages = EnginePages::extract(k_pages, v_pages, indptr, indices, last_page_len, layout, positions, key_rope)?;
    let params = AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
    let q = FloatArray::extract(q, "q", true)?;
    let shape = query_shape(q.shape(), "batch").kv()?;
    run(py, &pages, &params, &q, shape, out_dtype, |kv, qv, out, lse| {
        attention::decode(kv, qv, out, Some(lse), &params)
    })
}

#[doc = doc!(paged_prefill)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, qo_indptr, *, causal = true, layout = "nhd", positions = None, key_rope = "post", scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    qo_indptr: &Bound<'py, PyAny>,
    causal: bool,
    layout: &str,
    positions: Option<&Bound<'py, PyAny>>,
    key_rope: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<PyRef<'py, PyRopeConfig>>,
    position_mode: &str,
    max_distance: Option<i64>,
    chunk_size: Option<i64>,
    out_dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let pages = EnginePages::extract(k_pages, v_pages, indptr, indices, last_page_len, layout, positions, key_rope)?;
    let qo_indptr = i32_vec(qo_indptr, "qo_indptr")?;
    let params = AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
    let q = FloatArray::extract(q, "q", true)?;
    let shape = query_shape(q.shape(), "total").kv()?;
    run(py, &pages, &params, &q, shape, out_dtype, |kv, qv, out, lse| {
        attention::prefill(kv, qv, &qo_indptr, out, Some(lse), &params, causal)
    })
}

#[doc = doc!(paged_decode_sparse)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, selections, *, layout = "nhd", positions = None, key_rope = "post", scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_sparse<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    selections: &Bound<'py, PyAny>,
    layout: &str,
    positions: Option<&Bound<'py, PyAny>>,
    key_rope: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<PyRef<'py, PyRopeConfig>>,
    position_mode: &str,
    max_distance: Option<i64>,
    chunk_size: Option<i64>,
    out_dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let pages = EnginePages::extract(k_pages, v_pages, indptr, indices, last_page_len, layout, positions, key_rope)?;
    let sels = selections_arg(selections, "selections")?;
    let sels: Vec<&Selection> = sels.iter().map(|s| &s.get().inner).collect();
    let params = AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
    let q = FloatArray::extract(q, "q", true)?;
    let shape = query_shape(q.shape(), "batch").kv()?;
    run(py, &pages, &params, &q, shape, out_dtype, |kv, qv, out, lse| {
        attention::decode_sparse(kv, qv, &sels, out, Some(lse), &params)
    })
}

#[doc = doc!(paged_prefill_sparse)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, qo_indptr, selections, windows = None, *, layout = "nhd", positions = None, key_rope = "post", scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, out_dtype = "f32"))]
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill_sparse<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    qo_indptr: &Bound<'py, PyAny>,
    selections: &Bound<'py, PyAny>,
    windows: Option<&Bound<'py, PyAny>>,
    layout: &str,
    positions: Option<&Bound<'py, PyAny>>,
    key_rope: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<PyRef<'py, PyRopeConfig>>,
    position_mode: &str,
    max_distance: Option<i64>,
    chunk_size: Option<i64>,
    out_dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let pages = EnginePages::extract(k_pages, v_pages, indptr, indices, last_page_len, layout, positions, key_rope)?;
    let qo_indptr = i32_vec(qo_indptr, "qo_indptr")?;
    let sels = selections_arg(selections, "selections")?;
    let sels: Vec<&Selection> = sels.iter().map(|s| &s.get().inner).collect();
    let windows = windows_arg(windows)?;
    let params = AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
    let q = FloatArray::extract(q, "q", true)?;
    let shape = query_shape(q.shape(), "total").kv()?;
    run(py, &pages, &params, &q, shape, out_dtype, |kv, qv, out, lse| {
        attention::prefill_sparse(kv, qv, &qo_indptr, &sels, &windows, out, Some(lse), &params)
    })
}

/// Build the view, run `f` with the GIL released, and return `(out, lse)` as numpy arrays.
fn run<'py>(
    py: Python<'py>,
    pages: &EnginePages<'_>,
    params: &AttentionParams,
    q: &FloatArray<'_>,
    shape: [usize; 3],
    out_dtype: &str,
    f: impl FnOnce(&PagedKv, &kvsieve::TensorView, &mut kvsieve::TensorViewMut, &mut [f32]) -> Result<(), Error> + Send,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let kv = pages.view().kv()?;
    check_position_mode(pages.key_rope, params).kv()?;
    let qv = q.view().kv()?;
    let mut out = OutBuf::new(out_dtype, "q", &shape).kv()?;
    let mut lse = filled("q", numel("q", &shape[..2]).kv()?, 0f32).kv()?;
    detach(py, || f(&kv, &qv, &mut out.view_mut(&shape)?, &mut lse))?;
    Ok((out.into_numpy(py, &shape)?, to_numpy(py, lse, &shape[..2])?))
}

#[doc = doc!(merge_states)]
#[pyfunction]
#[pyo3(signature = (v_a, lse_a, v_b, lse_b, *, out_dtype = "f32"))]
pub fn merge_states<'py>(
    py: Python<'py>,
    v_a: &Bound<'py, PyAny>,
    lse_a: &Bound<'py, PyAny>,
    v_b: &Bound<'py, PyAny>,
    lse_b: &Bound<'py, PyAny>,
    out_dtype: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (va, vb) = (FloatArray::extract(v_a, "v_a", true)?, FloatArray::extract(v_b, "v_b", true)?);
    let shape: [usize; 3] = va
        .shape()
        .try_into()
        .map_err(|_| Error::Shape {
            param: "v_a".into(),
            expected: "[n, heads, head_dim]".into(),
            got: format!("{:?}", va.shape()),
        })
        .kv()?;
    let la = FloatArray::extract(lse_a, "lse_a", true)?.to_f32_vec();
    let lb = FloatArray::extract(lse_b, "lse_b", true)?.to_f32_vec();
    let (av, bv) = (va.view().kv()?, vb.view().kv()?);
    let mut out = OutBuf::new(out_dtype, "v_a", &shape).kv()?;
    let mut lse = filled("v_a", numel("v_a", &shape[..2]).kv()?, 0f32).kv()?;
    detach(py, || attention::merge_states(&av, &la, &bv, &lb, &mut out.view_mut(&shape)?, &mut lse))?;
    Ok((out.into_numpy(py, &shape)?, to_numpy(py, lse, &shape[..2])?))
}
