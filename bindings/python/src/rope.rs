//! `RopeConfig` and `apply_rope`.

use kvsieve::attention::{self, RopeConfig};
use pyo3::prelude::*;

use crate::arrays::{i32_vec, usize_arg, FloatArray, FloatArrayMut};
use crate::errors::KvResultExt;
use crate::options::{parse_style, style_name};

/// Rotary position embedding parameters.
///
/// Pair ``i`` (``0 <= i < rotary_dim / 2``) rotates by
/// ``(position / position_scale) * theta ** (-2 i / rotary_dim)``; channels past
/// ``rotary_dim`` are left unchanged. ``rotary_dim=0`` means all of head_dim.
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

    /// Base of the rotation frequencies.
    #[getter]
    fn theta(&self) -> f32 {
        self.inner.theta
    }

    /// ``"half_split"`` (GPT-NeoX, HF Llama) or ``"adjacent_pairs"`` (GPT-J, GGUF Llama).
    #[getter]
    fn style(&self) -> &'static str {
        style_name(self.inner.style)
    }

    /// Rotated channels (0 = all of head_dim).
    #[getter]
    fn rotary_dim(&self) -> usize {
        self.inner.rotary_dim
    }

    /// Positions are divided by this before rotation (linear scaling).
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

/// RoPE on ``x`` (``[n, heads, head_dim]``, float32 or float16), token ``i`` at ``positions[i]``.
/// Returns a new array, or rotates ``x`` itself and returns it when ``inplace``.
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
        // Check that x is a float array first, so the error names it; the copy is C-ordered.
        FloatArray::extract(x, "x", true)?;
        x.call_method0("copy")?
    };
    {
        let mut arr = FloatArrayMut::extract(&target, "x")?;
        let mut view = arr.view_mut().kv()?;
        py.detach(|| attention::apply_rope(&mut view, &positions, &cfg)).kv()?;
    }
    Ok(target)
}
