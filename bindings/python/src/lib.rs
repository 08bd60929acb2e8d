//! `kvsieve._kvsieve`: the Python surface of kvsieve. It translates numpy arrays, strings
//! and errors to and from the core crate and releases the GIL around the work; it holds no
//! logic of its own.

// `doc!`, the docstrings of the stub; declared first so every module below can use it.
#[macro_use]
mod docs;

mod arrays;
mod attention;
mod cache;
mod cluster;
mod cluster_set;
mod cuda;
mod cuda_cache;
mod cuda_select;
mod errors;
mod gemfilter;
mod options;
mod policy;
mod rope;
mod selection;
mod sparse;

use pyo3::prelude::*;

#[doc = doc!(isa)]
#[pyfunction]
fn isa() -> &'static str {
    kvsieve::cpu::isa()
}

#[doc = doc!(@module)]
#[pymodule]
fn _kvsieve(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", kvsieve::VERSION)?;
    m.add("MAX_HEAD_DIM", kvsieve::config::MAX_HEAD_DIM)?;
    m.add("MAX_PAGE_SIZE", kvsieve::config::MAX_PAGE_SIZE)?;
    errors::register(m)?;
    m.add_class::<cache::PyKvCache>()?;
    m.add_class::<cache::PyCacheConfig>()?;
    m.add_class::<rope::PyRopeConfig>()?;
    m.add_class::<selection::PySelection>()?;
    m.add_class::<policy::PyPolicy>()?;
    m.add_class::<cluster::PyClusterIndex>()?;
    m.add_class::<cluster::PyClusterThresholds>()?;
    m.add_class::<cluster_set::PyClusterIndexSet>()?;
    m.add_function(wrap_pyfunction!(isa, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_paged_decode, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_paged_append, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_merge_states, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_select::cuda_update_key_bounds, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_select::cuda_page_bounds, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_select::cuda_paged_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_select::cuda_gemfilter_select, m)?)?;
    m.add_class::<cuda_select::PyCudaClusterIndex>()?;
    m.add_class::<cuda_cache::PyCudaKvCache>()?;
    m.add_function(wrap_pyfunction!(rope::apply_rope, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_decode, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_decode_sparse, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_prefill_sparse, m)?)?;
    m.add_function(wrap_pyfunction!(attention::merge_states, m)?)?;
    m.add_function(wrap_pyfunction!(selection::streaming, m)?)?;
    m.add_function(wrap_pyfunction!(selection::lambda_mask, m)?)?;
    m.add_function(wrap_pyfunction!(selection::page_bounds, m)?)?;
    m.add_function(wrap_pyfunction!(selection::top_k, m)?)?;
    m.add_function(wrap_pyfunction!(selection::expand_spans, m)?)?;
    m.add_function(wrap_pyfunction!(selection::window_pages_to_evict, m)?)?;
    m.add_function(wrap_pyfunction!(gemfilter::gemfilter_scores, m)?)?;
    m.add_function(wrap_pyfunction!(gemfilter::avg_pool, m)?)?;
    m.add_function(wrap_pyfunction!(gemfilter::gemfilter_select, m)?)?;
    m.add_function(wrap_pyfunction!(gemfilter::snapkv, m)?)?;
    m.add_function(wrap_pyfunction!(gemfilter::calibrate_filter_layer, m)?)?;
    m.add_function(wrap_pyfunction!(cluster::kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(cluster::kmeans_seeds, m)?)?;
    Ok(())
}
