use pyo3::prelude::*;
#[pymodule]
fn _kvsieve(_m: &Bound<'_, PyModule>) -> PyResult<()> { Ok(()) }
