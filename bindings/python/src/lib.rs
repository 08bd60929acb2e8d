//! `kvsieve._kvsieve`: the Python surface of kvsieve. It translates numpy arrays, strings
//! and errors to and from the core crate and releases the GIL around the work; it holds no
//! logic of its own.

mod arrays;
mod attention;
mod cache;
mod errors;
mod options;
mod rope;

use pyo3::prelude::*;

/// The SIMD instruction set the CPU kernels use on this machine.
#[pyfunction]
fn isa() -> &'static str {
    kvsieve::attention::isa()
}

#[pymodule]
fn _kvsieve(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", kvsieve::VERSION)?;
    m.add("MAX_HEAD_DIM", kvsieve::config::MAX_HEAD_DIM)?;
    m.add("MAX_PAGE_SIZE", kvsieve::config::MAX_PAGE_SIZE)?;
    errors::register(m)?;
    m.add_class::<cache::PyKvCache>()?;
    m.add_class::<cache::PyCacheConfig>()?;
    m.add_class::<rope::PyRopeConfig>()?;
    m.add_function(wrap_pyfunction!(isa, m)?)?;
    m.add_function(wrap_pyfunction!(rope::apply_rope, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_decode, m)?)?;
    m.add_function(wrap_pyfunction!(attention::paged_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(attention::merge_states, m)?)?;
    Ok(())
}
