//! kvsieve errors as Python exceptions: one base class, `KvsieveError`, and one subclass
//! per error kind. Every class carries the stable numeric `code` of `kvsieve::ErrorCode`
//! (as a member of the `ErrorCode` IntEnum) and its `code_name`; a `ParseError` instance
//! also carries the byte `offset` where parsing failed.
//!
//! Kinds with a natural built-in counterpart also derive from it, so `except ValueError`
//! and the like catch them: invalid argument and shape errors are `ValueError`s, dtype
//! errors `TypeError`s, unknown sequences `KeyError`s, out-of-range indices `IndexError`s,
//! and a full page pool or a failed allocation `MemoryError`s. The classes need multiple
//! inheritance, so they are made with `type(name, bases, namespace)` when the module is
//! first imported, once per interpreter.
//!
//! Calls into the core go through [`detach`] (or [`guard`] for the few quick ones made with
//! the GIL held): a panic in kvsieve becomes an `InternalError` carrying the panic's
//! message, never a `pyo3_runtime.PanicException` (which `except Exception` misses).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvsieve::{Error, ErrorCode};
use pyo3::exceptions::{PyException, PyIndexError, PyKeyError, PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// Python class name, docstring and built-in base (besides `KvsieveError`) of a kind.
fn class_spec(py: Python<'_>, code: ErrorCode) -> (&'static str, &'static str, Option<Bound<'_, PyType>>) {
    match code {
        ErrorCode::InvalidArgument => {
            ("InvalidArgumentError", doc!(InvalidArgumentError), Some(py.get_type::<PyValueError>()))
        }
        ErrorCode::Shape => ("ShapeError", doc!(ShapeError), Some(py.get_type::<PyValueError>())),
        ErrorCode::DType => ("DTypeError", doc!(DTypeError), Some(py.get_type::<PyTypeError>())),
        ErrorCode::NullPointer => ("NullPointerError", doc!(NullPointerError), None),
        ErrorCode::UnknownSequence => {
            ("UnknownSequenceError", doc!(UnknownSequenceError), Some(py.get_type::<PyKeyError>()))
        }
        ErrorCode::OutOfRange => ("OutOfRangeError", doc!(OutOfRangeError), Some(py.get_type::<PyIndexError>())),
        ErrorCode::OutOfPages => ("OutOfPagesError", doc!(OutOfPagesError), Some(py.get_type::<PyMemoryError>())),
        ErrorCode::Unsupported => ("UnsupportedError", doc!(UnsupportedError), None),
        ErrorCode::CudaUnavailable => ("CudaUnavailableError", doc!(CudaUnavailableError), None),
        ErrorCode::Io => ("IoError", doc!(IoError), None),
        ErrorCode::Parse => ("ParseError", doc!(ParseError), None),
        ErrorCode::Internal => ("InternalError", doc!(InternalError), None),
        ErrorCode::OutOfMemory => ("OutOfMemoryError", doc!(OutOfMemoryError), Some(py.get_type::<PyMemoryError>())),
    }
}

/// The `ErrorCode` enum, `KvsieveError` and its subclasses (in `ErrorCode::ALL` order).
struct Classes {
    error_code: Py<PyAny>,
    base: Py<PyType>,
    kinds: Vec<(ErrorCode, &'static str, Py<PyType>)>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

/// `type(name, bases, namespace)` with `__module__ = "kvsieve"` and `__doc__ = doc`.
fn new_class<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: Vec<Bound<'py, PyType>>,
    namespace: Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyType>> {
    namespace.set_item("__module__", "kvsieve")?;
    namespace.set_item("__doc__", doc)?;
    let cls = py.get_type::<PyType>().call1((name, PyTuple::new(py, bases)?, namespace))?;
    Ok(cls.cast_into::<PyType>()?)
}

fn make_classes(py: Python<'_>) -> PyResult<Classes> {
    let members: Vec<(String, u32)> =
        ErrorCode::ALL.iter().map(|&c| (c.name().to_ascii_uppercase(), c as u32)).collect();
    let int_enum = py.import("enum")?.getattr("IntEnum")?;
    let error_code = int_enum.call1(("ErrorCode", members))?;
    error_code.setattr("__module__", "kvsieve")?;
    error_code.setattr("__doc__", doc!(ErrorCode))?;

    let base = new_class(py, "KvsieveError", doc!(KvsieveError), vec![py.get_type::<PyException>()], PyDict::new(py))?;
    let mut kinds = Vec::with_capacity(ErrorCode::ALL.len());
    for &code in ErrorCode::ALL.iter() {
        let (name, doc, builtin) = class_spec(py, code);
        let ns = PyDict::new(py);
        ns.set_item("code", error_code.call1((code as u32,))?)?;
        ns.set_item("code_name", code.name())?;
        if code == ErrorCode::UnknownSequence {
            // KeyError's own str() shows the message in quotes (the repr of its argument);
            // an error message reads better as plain text.
            ns.set_item("__str__", py.get_type::<pyo3::exceptions::PyBaseException>().getattr("__str__")?)?;
        }
        let mut bases = vec![base.clone()];
        bases.extend(builtin);
        let cls = new_class(py, name, doc, bases, ns)?;
        kinds.push((code, name, cls.unbind()));
    }
    Ok(Classes { error_code: error_code.unbind(), base: base.unbind(), kinds })
}

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || make_classes(py))
}

/// The Python exception for a kvsieve error: its kind's class, with the core's message.
/// A `ParseError` also carries the byte `offset` of the offending token as an attribute.
pub fn to_py_err(err: Error) -> PyErr {
    Python::attach(|py| {
        let classes = match classes(py) {
            Ok(c) => c,
            Err(e) => return e,
        };
        let code = err.code();
        let Some((_, _, cls)) = classes.kinds.iter().find(|k| k.0 == code) else {
            return PyErr::from_type(classes.base.bind(py).clone(), err.to_string());
        };
        let e = PyErr::from_type(cls.bind(py).clone(), err.to_string());
        if let Error::Parse { offset, .. } = err {
            if let Err(set_failed) = e.value(py).setattr("offset", offset) {
                return set_failed;
            }
        }
        e
    })
}

/// `result.kv()?` turns a kvsieve error into its Python exception.
pub trait KvResultExt<T> {
    fn kv(self) -> PyResult<T>;
}

impl<T> KvResultExt<T> for Result<T, Error> {
    fn kv(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// The message of a panic's payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Run core code, turning a panic into `Error::Internal` (raised as `InternalError`)
/// with the panic's message.
pub fn guard<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    // AssertUnwindSafe: after a panic nothing `f` touched is used to answer this call, and
    // the message asks for a bug report; the locks around kvsieve's state do not poison.
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(Error::Internal(format!("panic: {}", panic_message(&*payload)))))
}

/// Run core code with the GIL released (`Python::detach`), through [`guard`]; an error or a
/// panic becomes the matching Python exception. Every call into kvsieve that does real
/// work goes through here.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Send + FnOnce() -> Result<T, Error>,
    T: Send,
{
    py.detach(|| guard(f)).kv()
}

/// A panic inside the extension, through [`detach`], for the tests that check a panic
/// raises `kvsieve.InternalError`. Not part of the API (it is in no stub or `__all__`).
#[pyfunction]
#[pyo3(name = "_panic_for_tests")]
pub fn panic_for_tests(py: Python<'_>, message: String) -> PyResult<()> {
    detach(py, move || -> Result<(), Error> { panic!("{message}") })
}

/// Add `ErrorCode` (an `enum.IntEnum`), `KvsieveError` and its subclasses to the module;
/// each subclass has class attributes `code` (an `ErrorCode` member) and `code_name`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("ErrorCode", c.error_code.bind(py))?;
    m.add("KvsieveError", c.base.bind(py))?;
    for (_, name, cls) in &c.kinds {
        m.add(*name, cls.bind(py))?;
    }
    m.add_function(wrap_pyfunction!(panic_for_tests, m)?)?;
    Ok(())
}
