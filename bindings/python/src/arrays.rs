//! numpy arrays in and out: float arrays become strided `TensorView`s over numpy's own
//! memory (no copy; float64 arguments become float32 copies), integer arguments become checked Rust vectors, results become new
//! numpy arrays that take ownership of Rust vectors.

use half::f16;
use kvsieve::{DType, Error, TensorView, TensorViewMut};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{
    Element, PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use crate::errors::{to_py_err, KvResultExt};

fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Python type name of an object, for messages.
pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into())
}

/// The object as a numpy array, or a DType error naming the parameter.
fn as_ndarray<'py>(obj: &Bound<'py, PyAny>, param: &str, expected: &str) -> PyResult<Bound<'py, PyUntypedArray>> {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => Ok(a.clone()),
        Err(_) => Err(Error::DType {
            param: param.into(),
            expected: format!("a numpy.ndarray of {expected}"),
            got: format!("an object of type {}", type_name(obj)),
        })
        .kv(),
    }
}

/// Whether every stride is non-negative and a whole number of elements.
fn strides_usable(a: &Bound<'_, PyUntypedArray>) -> bool {
    let item = a.dtype().itemsize() as isize;
    item > 0 && a.strides().iter().all(|&s| s >= 0 && s % item == 0)
}

fn borrow_error(param: &str, writable: bool) -> PyErr {
    let expected = if writable {
        "a writable array that no other kvsieve call is using"
    } else {
        "an array that no kvsieve call is writing"
    };
    to_py_err(Error::InvalidArgument { param: param.into(), expected: expected.into() })
}

fn float_dtype_error(param: &str, a: &Bound<'_, PyUntypedArray>, expected: &str) -> PyErr {
    to_py_err(Error::DType { param: param.into(), expected: expected.into(), got: a.dtype().to_string() })
}

/// What a read-only float argument may be.
const FLOAT_DTYPES: &str = "float32, float16 or float64";

/// Whether the array holds float64 (read-only arguments take it as a float32 copy).
fn is_float64(a: &Bound<'_, PyUntypedArray>) -> bool {
    let dt = a.dtype();
    dt.kind() == b'f' && dt.itemsize() == 8
}

/// A C-ordered float32 copy of a float64 array.
fn float64_to_f32<'py>(a: &Bound<'py, PyUntypedArray>) -> PyResult<Bound<'py, PyUntypedArray>> {
    Ok(a.call_method1("astype", ("float32", "C"))?.cast_into::<PyUntypedArray>()?)
}

/// A new array with `obj`'s values that the caller may write: a copy in C order, as
/// float32 for a float64 array. `obj` must have passed [`FloatArray::extract`].
pub fn writable_copy<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) if is_float64(a) => Ok(float64_to_f32(a)?.into_any()),
        _ => obj.call_method0("copy"),
    }
}

/// Element strides of an array whose byte strides passed [`strides_usable`].
fn elem_strides<T>(strides: &[isize]) -> Vec<usize> {
    strides.iter().map(|&s| s as usize / std::mem::size_of::<T>()).collect()
}

/// A read-only float32 or float16 numpy array, borrowed for the duration of a call (a
/// float64 argument is converted to a float32 copy, which this holds instead).
pub enum FloatArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
}

impl<'py> FloatArray<'py> {
    /// Borrow `obj` as a float array. Arrays with negative strides (reversed views) are
    /// copied to C order when `copy_if_needed`, and rejected otherwise; float64 arrays are
    /// always copied, to float32 in C order.
    pub fn extract(obj: &Bound<'py, PyAny>, param: &str, copy_if_needed: bool) -> PyResult<Self> {
        let mut arr = as_ndarray(obj, param, FLOAT_DTYPES)?;
        if is_float64(&arr) {
            arr = float64_to_f32(&arr)?;
        }
        if !strides_usable(&arr) {
            if !copy_if_needed {
                return Err(Error::Shape {
                    param: param.into(),
                    expected: "non-negative strides that are whole elements".into(),
                    got: format!("byte strides {:?}", arr.strides()),
                })
                .kv();
            }
            arr = arr.call_method0("copy")?.cast_into::<PyUntypedArray>()?;
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
            return Ok(FloatArray::F32(a.try_readonly().map_err(|_| borrow_error(param, false))?));
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f16>>() {
            return Ok(FloatArray::F16(a.try_readonly().map_err(|_| borrow_error(param, false))?));
        }
        Err(float_dtype_error(param, &arr, FLOAT_DTYPES))
    }

    pub fn dtype(&self) -> DType {
        match self {
            FloatArray::F32(_) => DType::F32,
            FloatArray::F16(_) => DType::F16,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            FloatArray::F32(a) => a.shape(),
            FloatArray::F16(a) => a.shape(),
        }
    }

    /// Strides in elements (non-negative by construction).
    pub fn strides(&self) -> Vec<usize> {
        match self {
            FloatArray::F32(a) => elem_strides::<f32>(a.strides()),
            FloatArray::F16(a) => elem_strides::<f16>(a.strides()),
        }
    }

    /// Address of the first element.
    pub fn data_ptr(&self) -> *const u8 {
        match self {
            FloatArray::F32(a) => a.data() as *const u8,
            FloatArray::F16(a) => a.data() as *const u8,
        }
    }

    /// A strided view of the array's own memory.
    pub fn view(&self) -> Result<TensorView<'_>, Error> {
        // SAFETY: shape and strides are numpy's own for this array, so every reachable
        // element lies inside its buffer; the read-only borrow held by `self` keeps the
        // array alive and stops other kvsieve calls from writing it while the view lives.
        unsafe { TensorView::from_raw(self.data_ptr(), self.dtype(), self.shape(), &self.strides()) }
    }

    /// All elements in C order, as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            FloatArray::F32(a) => a.as_array().iter().copied().collect(),
            FloatArray::F16(a) => a.as_array().iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// A writable float32 or float16 numpy array, borrowed exclusively for the duration of a call.
pub enum FloatArrayMut<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>),
    F16(PyReadwriteArrayDyn<'py, f16>),
}

impl<'py> FloatArrayMut<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, param: &str) -> PyResult<Self> {
        // float64 cannot be written in place as float32; the caller converts it first.
        let arr = as_ndarray(obj, param, "float32 or float16 (written in place)")?;
        if !strides_usable(&arr) {
            return Err(Error::Shape {
                param: param.into(),
                expected: "non-negative strides that are whole elements (for writing in place)".into(),
                got: format!("byte strides {:?}", arr.strides()),
            })
            .kv();
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
            return Ok(FloatArrayMut::F32(a.try_readwrite().map_err(|_| borrow_error(param, true))?));
        }
        if let Ok(a) = arr.cast::<PyArrayDyn<f16>>() {
            return Ok(FloatArrayMut::F16(a.try_readwrite().map_err(|_| borrow_error(param, true))?));
        }
        Err(float_dtype_error(param, &arr, "float32 or float16 (written in place)"))
    }

    /// A writable strided view of the array's own memory.
    pub fn view_mut(&mut self) -> Result<TensorViewMut<'_>, Error> {
        let (ptr, dtype, shape, strides) = match self {
            FloatArrayMut::F32(a) => {
                (a.data() as *mut u8, DType::F32, a.shape().to_vec(), elem_strides::<f32>(a.strides()))
            }
            FloatArrayMut::F16(a) => {
                (a.data() as *mut u8, DType::F16, a.shape().to_vec(), elem_strides::<f16>(a.strides()))
            }
        };
        // SAFETY: shape and strides are numpy's own, so every reachable element lies in the
        // buffer; the exclusive borrow held by `self` keeps other kvsieve calls off the array.
        unsafe { TensorViewMut::from_raw(ptr, dtype, &shape, &strides) }
    }
}

/// An integer argument given as a numpy integer array (1-D) or a sequence of Python ints.
pub fn int_vec(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<Vec<i64>> {
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let kind = arr.dtype().kind();
        if kind != b'i' && kind != b'u' {
            return Err(Error::DType {
                param: param.into(),
                expected: "an integer array".into(),
                got: arr.dtype().to_string(),
            })
            .kv();
        }
        if arr.ndim() != 1 {
            return Err(Error::Shape {
                param: param.into(),
                expected: "a 1-D array".into(),
                got: fmt_shape(arr.shape()),
            })
            .kv();
        }
        let a = arr.call_method1("astype", ("int64",))?;
        let a = a.cast::<PyArray1<i64>>()?.readonly();
        return Ok(a.as_array().iter().copied().collect());
    }
    obj.extract::<Vec<i64>>().or_else(|_| {
        Err(Error::DType {
            param: param.into(),
            expected: "a sequence of ints or a 1-D integer numpy array".into(),
            got: format!("an object of type {}", type_name(obj)),
        })
        .kv()
    })
}

/// Integers that must fit in int32 (page ids, indptr, positions).
pub fn i32_vec(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<Vec<i32>> {
    int_vec(obj, param)?
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            i32::try_from(x).map_err(|_| Error::OutOfRange {
                param: format!("{param}[{i}]"),
                value: x,
                range: format!("{}..={} (int32)", i32::MIN, i32::MAX),
            })
        })
        .collect::<Result<_, _>>()
        .kv()
}

/// Token indices, which are u32 in the core.
pub fn u32_vec(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<Vec<u32>> {
    int_vec(obj, param)?
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            u32::try_from(x).map_err(|_| Error::OutOfRange {
                param: format!("{param}[{i}]"),
                value: x,
                range: format!("0..={} (uint32)", u32::MAX),
            })
        })
        .collect::<Result<_, _>>()
        .kv()
}

/// The items of a list or tuple argument (or of any iterable but a string), or a DType
/// error naming the parameter.
pub fn items<'py>(obj: &Bound<'py, PyAny>, param: &str, expected: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let not_a_sequence = || Error::DType {
        param: param.into(),
        expected: format!("a sequence of {expected}"),
        got: format!("an object of type {}", type_name(obj)),
    };
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(not_a_sequence()).kv();
    }
    match obj.try_iter() {
        Ok(it) => it.collect(),
        Err(_) => Err(not_a_sequence()).kv(),
    }
}

/// Non-negative integers (indices).
pub fn usize_vec(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<Vec<usize>> {
    int_vec(obj, param)?.into_iter().enumerate().map(|(i, x)| usize_arg(x, &format!("{param}[{i}]"))).collect()
}

/// Sequence ids.
pub fn seq_ids(obj: &Bound<'_, PyAny>, param: &str) -> PyResult<Vec<u64>> {
    int_vec(obj, param)?.into_iter().enumerate().map(|(i, x)| seq_id(x, &format!("{param}[{i}]"))).collect()
}

/// A non-negative integer argument.
pub fn usize_arg(x: i64, param: &str) -> PyResult<usize> {
    usize::try_from(x)
        .map_err(|_| Error::OutOfRange { param: param.into(), value: x, range: "non-negative integers".into() })
        .kv()
}

/// A sequence id (sequence ids are non-negative).
pub fn seq_id(x: i64, param: &str) -> PyResult<u64> {
    u64::try_from(x)
        .map_err(|_| Error::OutOfRange { param: param.into(), value: x, range: "non-negative sequence ids".into() })
        .kv()
}

/// A new numpy array of `shape` owning `data` (C order).
pub fn to_numpy<'py, T: Element>(py: Python<'py>, data: Vec<T>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    let arr = ArrayD::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| Error::Internal(format!("result of shape {}: {e}", fmt_shape(shape))))
        .kv()?;
    Ok(numpy::PyArray::from_owned_array(py, arr).into_any())
}

/// A vector of `n` copies of `x`, or an error naming `param` when it cannot be allocated
/// (an absurd shape must not abort the interpreter).
pub fn filled<T: Clone>(param: &str, n: usize, x: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::InvalidArgument {
        param: param.into(),
        expected: format!("a shape whose result ({n} elements) fits in memory"),
    })?;
    v.resize(n, x);
    Ok(v)
}

/// Number of elements of a shape, or an error naming `param` on overflow.
pub fn numel(param: &str, shape: &[usize]) -> Result<usize, Error> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| Error::InvalidArgument {
        param: param.into(),
        expected: format!("a shape whose size fits in memory, got {}", fmt_shape(shape)),
    })
}

/// Output buffer of an attention call, in the dtype the caller asked for.
pub enum OutBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl OutBuf {
    /// `out_dtype` is "f32"/"float32" or "f16"/"float16" (numpy has no bfloat16); `param`
    /// names the input whose shape the output takes.
    pub fn new(out_dtype: &str, param: &str, shape: &[usize]) -> Result<Self, Error> {
        let n = numel(param, shape)?;
        match DType::parse(out_dtype) {
            Some(DType::F32) => Ok(OutBuf::F32(filled(param, n, 0.0)?)),
            Some(DType::F16) => Ok(OutBuf::F16(filled(param, n, f16::ZERO)?)),
            Some(DType::BF16) => {
                Err(Error::Unsupported("out_dtype bf16: numpy has no bfloat16 dtype; use \"f32\" or \"f16\"".into()))
            }
            None => Err(Error::InvalidArgument {
                param: "out_dtype".into(),
                expected: format!("\"f32\" or \"f16\", got {out_dtype:?}"),
            }),
        }
    }

    pub fn view_mut(&mut self, shape: &[usize]) -> Result<TensorViewMut<'_>, Error> {
        match self {
            OutBuf::F32(v) => TensorViewMut::new(v.as_mut_slice(), shape),
            OutBuf::F16(v) => TensorViewMut::new(v.as_mut_slice(), shape),
        }
    }

    pub fn into_numpy<'py>(self, py: Python<'py>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
        match self {
            OutBuf::F32(v) => to_numpy(py, v, shape),
            OutBuf::F16(v) => to_numpy(py, v, shape),
        }
    }
}
