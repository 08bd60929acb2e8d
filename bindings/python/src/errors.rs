//! kvsieve errors as Python exceptions: one base class, `KvsieveError`, and one subclass
//! per error kind. Every class carries the stable numeric `code` of `kvsieve::ErrorCode`
//! (as a member of the `ErrorCode` IntEnum) and its `code_name`; a `ParseError` instance
//! also carries the byte `offset` where parsing failed.

use kvsieve::{Error, ErrorCode};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyType;

create_exception!(kvsieve, KvsieveError, PyException, "Base class of every error raised by kvsieve.");
create_exception!(kvsieve, InvalidArgumentError, KvsieveError, "An argument has a value outside what the call accepts.");
create_exception!(kvsieve, ShapeError, KvsieveError, "An array has the wrong shape or strides.");
create_exception!(kvsieve, DTypeError, KvsieveError, "An array has a dtype the call does not accept.");
create_exception!(kvsieve, NullPointerError, KvsieveError, "A required buffer was missing.");
create_exception!(kvsieve, UnknownSequenceError, KvsieveError, "A sequence id the cache does not hold.");
create_exception!(kvsieve, OutOfRangeError, KvsieveError, "An index (token, slot, page, layer, head) is out of range.");
create_exception!(kvsieve, OutOfPagesError, KvsieveError, "The page pool has too few free pages for the request.");
create_exception!(kvsieve, UnsupportedError, KvsieveError, "A configuration kvsieve does not support (for example a head_dim).");
create_exception!(kvsieve, CudaUnavailableError, KvsieveError, "The CUDA driver or device is not available.");
create_exception!(kvsieve, IoError, KvsieveError, "Reading or writing a file failed, or its contents are malformed.");
create_exception!(kvsieve, ParseError, KvsieveError, "Text (such as a policy) could not be parsed.");
create_exception!(kvsieve, InternalError, KvsieveError, "A bug inside kvsieve. Please report it.");
create_exception!(kvsieve, OutOfMemoryError, KvsieveError, "Memory for a buffer the call needs could not be allocated.");

/// The exception class of an error code.
fn class_of(py: Python<'_>, code: ErrorCode) -> Bound<'_, PyType> {
    match code {
        ErrorCode::InvalidArgument => py.get_type::<InvalidArgumentError>(),
        ErrorCode::Shape => py.get_type::<ShapeError>(),
        ErrorCode::DType => py.get_type::<DTypeError>(),
        ErrorCode::NullPointer => py.get_type::<NullPointerError>(),
        ErrorCode::UnknownSequence => py.get_type::<UnknownSequenceError>(),
        ErrorCode::OutOfRange => py.get_type::<OutOfRangeError>(),
        ErrorCode::OutOfPages => py.get_type::<OutOfPagesError>(),
        ErrorCode::Unsupported => py.get_type::<UnsupportedError>(),
        ErrorCode::CudaUnavailable => py.get_type::<CudaUnavailableError>(),
        ErrorCode::Io => py.get_type::<IoError>(),
        ErrorCode::Parse => py.get_type::<ParseError>(),
        ErrorCode::Internal => py.get_type::<InternalError>(),
        ErrorCode::OutOfMemory => py.get_type::<OutOfMemoryError>(),
    }
}

/// Python class name of an error code's exception.
fn class_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidArgument => "InvalidArgumentError",
        ErrorCode::Shape => "ShapeError",
        ErrorCode::DType => "DTypeError",
        ErrorCode::NullPointer => "NullPointerError",
        ErrorCode::UnknownSequence => "UnknownSequenceError",
        ErrorCode::OutOfRange => "OutOfRangeError",
        ErrorCode::OutOfPages => "OutOfPagesError",
        ErrorCode::Unsupported => "UnsupportedError",
        ErrorCode::CudaUnavailable => "CudaUnavailableError",
        ErrorCode::Io => "IoError",
        ErrorCode::Parse => "ParseError",
        ErrorCode::Internal => "InternalError",
        ErrorCode::OutOfMemory => "OutOfMemoryError",
    }
}

/// The Python exception for a kvsieve error: its kind's class, with the core's message.
/// A `ParseError` also carries the byte `offset` of the offending token as an attribute.
pub fn to_py_err(err: Error) -> PyErr {
    let msg = err.to_string();
    if let Error::Parse { offset, .. } = err {
        return Python::attach(|py| {
            let e = PyErr::new::<ParseError, _>(msg);
            match e.value(py).setattr("offset", offset) {
                Ok(()) => e,
                Err(set_failed) => set_failed,
            }
        });
    }
    match err.code() {
        ErrorCode::InvalidArgument => PyErr::new::<InvalidArgumentError, _>(msg),
        ErrorCode::Shape => PyErr::new::<ShapeError, _>(msg),
        ErrorCode::DType => PyErr::new::<DTypeError, _>(msg),
        ErrorCode::NullPointer => PyErr::new::<NullPointerError, _>(msg),
        ErrorCode::UnknownSequence => PyErr::new::<UnknownSequenceError, _>(msg),
        ErrorCode::OutOfRange => PyErr::new::<OutOfRangeError, _>(msg),
        ErrorCode::OutOfPages => PyErr::new::<OutOfPagesError, _>(msg),
        ErrorCode::Unsupported => PyErr::new::<UnsupportedError, _>(msg),
        ErrorCode::CudaUnavailable => PyErr::new::<CudaUnavailableError, _>(msg),
        ErrorCode::Io => PyErr::new::<IoError, _>(msg),
        ErrorCode::Parse => PyErr::new::<ParseError, _>(msg),
        ErrorCode::Internal => PyErr::new::<InternalError, _>(msg),
        ErrorCode::OutOfMemory => PyErr::new::<OutOfMemoryError, _>(msg),
    }
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

/// Add `ErrorCode` (an `enum.IntEnum`), `KvsieveError` and its subclasses to the module;
/// each subclass gets class attributes `code` (an `ErrorCode` member) and `code_name`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let members: Vec<(String, u32)> = ErrorCode::ALL.iter().map(|&c| (c.name().to_ascii_uppercase(), c as u32)).collect();
    let int_enum = py.import("enum")?.getattr("IntEnum")?;
    let error_code = int_enum.call1(("ErrorCode", members))?;
    error_code.setattr("__module__", "kvsieve")?;
    error_code.setattr("__doc__", "Stable numeric error codes, shared with the C ABI (kvsieve_error_code).")?;
    m.add("ErrorCode", &error_code)?;

    m.add("KvsieveError", py.get_type::<KvsieveError>())?;
    for &code in ErrorCode::ALL.iter() {
        let cls = class_of(py, code);
        cls.setattr("code", error_code.call1((code as u32,))?)?;
        cls.setattr("code_name", code.name())?;
        m.add(class_name(code), cls)?;
    }
    Ok(())
}
