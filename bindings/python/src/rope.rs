//! `RopeConfig` and `apply_rope`.

use kvsieve::attention::{self, RopeConfig};
use pyo3::prelude::*;

use crate::arrays::{i32_vec, usize_arg, writable_copy, FloatArray, FloatArrayMut};
use crate::errors::{detach, KvResultExt};
use crate::options::{parse_style, style_name};

#[doc = doc!(RopeConfig)]
#[pyclass(name = "RopeConfig", module = "kvsieve", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PyRopeConfig {
    pub inner: RopeConfig,
}

impl PyRopeConfig {
    pub fn build(theta: f32, style: &str, rotary_dim: i64, position_scale: f32) -> PyResult<Self> {
        let style = parse_style("style", style).kv()?;
        let rotary_dim = usize_arg(rotary_dim, "rotary_dim")?;
        let inner = RopeConfig { theta, rotary_dim, style, position_scale };
        // theta and position_scale are checked here; rotary_dim against each call's head_dim.
        RopeConfig { rotary_dim: 0, ..inner }.validate(2).kv()?;
        Ok(PyRopeConfig { inner })
    }
}

#[pymethods]
impl PyRopeConfig {
    #[new]
    #[pyo3(signature = (theta, style = "half_split", rotary_dim = 0, position_scale = 1.0))]
    fn new(theta: f32, style: &str, rotary_dim: i64, position_scale: f32) -> PyResult<Self> {
        Self::build(theta, style, rotary_dim, position_scale)
    }

    #[doc = doc!(RopeConfig.theta)]
    #[getter]
    fn theta(&self) -> f32 {
        self.inner.theta
    }

    #[doc = doc!(RopeConfig.style)]
    #[getter]
    fn style(&self) -> &'static str {
        style_name(self.inner.style)
    }

    #[doc = doc!(RopeConfig.rotary_dim)]
    #[getter]
    fn rotary_dim(&self) -> usize {
        self.inner.rotary_dim
    }

    #[doc = doc!(RopeConfig.position_scale)]
    #[getter]
    fn position_scale(&self) -> f32 {
        self.inner.position_scale
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "RopeConfig(theta={}, style={:?}, rotary_dim={}, position_scale={})",
            r.theta,
            style_name(r.style),
            r.rotary_dim,
            r.position_scale
        )
    }
}

#[doc = doc!(apply_rope)]
#[pyfunction]
#[pyo3(signature = (x, positions, theta, style = "half_split", rotary_dim = 0, position_scale = 1.0, *, inplace = false))]
#[allow(clippy::too_many_arguments)]
pub fn apply_rope<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    positions: &Bound<'py, PyAny>,
    theta: f32,
    style: &str,
    rotary_dim: i64,
    position_scale: f32,
    inplace: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = PyRopeConfig::build(theta, style, rotary_dim, position_scale)?.inner;
    let positions = i32_vec(positions, "positions")?;
    let target = if inplace {
        x.clone()
    } else {
        // Check that x is a float array first, so the error names it; the copy is C-ordered
        // (and float32 for a float64 x).
        FloatArray::extract(x, "x", true)?;
        writable_copy(x)?
    };
    {
        let mut arr = FloatArrayMut::extract(&target, "x")?;
        let mut view = arr.view_mut().kv()?;
        detach(py, || attention::apply_rope(&mut view, &positions, &cfg))?;
    }
    Ok(target)
}
