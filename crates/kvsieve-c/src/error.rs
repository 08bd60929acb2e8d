//! `error.h`: error objects handed to C, and the guards that run every entry point: a panic never
//! crosses the boundary, it becomes an `Internal` error (or a fallback value).

use std::any::Any;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use kvsieve::error::{Error, ErrorCode, Result};

/// An error returned to C: its stable code, a message that starts with the name of the
/// function that failed, and for a parse error the byte offset where parsing stopped.
/// Owned by the caller until `kvsieve_error_free`.
#[allow(non_camel_case_types)]
pub struct kvsieve_error_t {
    code: ErrorCode,
    message: CString,
    parse_offset: Option<usize>,
}

impl kvsieve_error_t {
    fn new(func: &str, err: &Error) -> Self {
        let text = format!("{func}: {err}").replace('\0', "\\0");
        let message = CString::new(text).unwrap_or_default();
        let parse_offset = match err {
            Error::Parse { offset, .. } => Some(*offset),
            _ => None,
        };
        kvsieve_error_t { code: err.code(), message, parse_offset }
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn message(&self) -> &CStr {
        &self.message
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// Run one fallible entry point: NULL on success, otherwise a new error object owned by the
/// caller. A panic inside `f` becomes an `Internal` error.
pub(crate) fn guard(func: &'static str, f: impl FnOnce() -> Result<()>) -> *mut kvsieve_error_t {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err(e)) => e,
        Err(payload) => Error::Internal(format!("caught a panic: {}", panic_text(payload.as_ref()))),
    };
    // Building the error object allocates; should even that panic, report nothing rather
    // than unwind into C.
    catch_unwind(|| Box::into_raw(Box::new(kvsieve_error_t::new(func, &err)))).unwrap_or(std::ptr::null_mut())
}

/// Run one infallible entry point, returning `fallback` if it panics.
pub(crate) fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// The message of an error, as a NUL-terminated UTF-8 string borrowed from the error.
///
/// # Safety
/// 1. `error` is NULL or a live error returned by kvsieve, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_error_message(error: *const kvsieve_error_t) -> *const c_char {
    guard_value(c"".as_ptr(), || match error.as_ref() {
        Some(e) => e.message.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// The stable numeric code of an error (`KVSIEVE_OK`, 0, for NULL).
///
/// # Safety
/// 1. `error` is NULL or a live error returned by kvsieve, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_error_code(error: *const kvsieve_error_t) -> u32 {
    guard_value(ErrorCode::Internal as u32, || error.as_ref().map_or(0, |e| e.code as u32))
}

/// The byte offset of a parse error in the text that was parsed; -1 for NULL and for
/// every other kind of error.
///
/// # Safety
/// 1. `error` is NULL or a live error returned by kvsieve, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_error_parse_offset(error: *const kvsieve_error_t) -> i64 {
    guard_value(-1, || match error.as_ref().and_then(|e| e.parse_offset) {
        Some(offset) => i64::try_from(offset).unwrap_or(i64::MAX),
        None => -1,
    })
}

/// Free an error. NULL is ignored.
///
/// # Safety
/// 1. `error` is NULL or a live error returned by kvsieve, freed at most once.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_error_free(error: *mut kvsieve_error_t) {
    guard_value((), || {
        if !error.is_null() {
            drop(Box::from_raw(error));
        }
    })
}

fn code_names() -> &'static [CString] {
    static NAMES: OnceLock<Vec<CString>> = OnceLock::new();
    NAMES.get_or_init(|| ErrorCode::ALL.iter().map(|c| CString::new(c.name()).unwrap_or_default()).collect())
}

/// Short lowercase name of an error code: "ok" for 0, "unknown" for a value kvsieve does
/// not define. The string is static.
#[no_mangle]
pub extern "C" fn kvsieve_error_code_name(code: u32) -> *const c_char {
    guard_value(c"unknown".as_ptr(), || {
        if code == 0 {
            return c"ok".as_ptr();
        }
        match ErrorCode::ALL.iter().position(|&c| c as u32 == code) {
            Some(i) => code_names()[i].as_ptr(),
            None => c"unknown".as_ptr(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let err = guard("kvsieve_test", || panic!("boom {}", 42));
        assert!(!err.is_null());
        // SAFETY: a live error from guard, freed once below.
        unsafe {
            assert_eq!(kvsieve_error_code(err), ErrorCode::Internal as u32);
            let msg = CStr::from_ptr(kvsieve_error_message(err)).to_str().unwrap();
            assert_eq!(msg, "kvsieve_test: internal error: caught a panic: boom 42");
            kvsieve_error_free(err);
        }
        assert_eq!(guard_value(7, || -> i32 { panic!("no") }), 7);
    }

    #[test]
    fn errors_carry_code_and_message() {
        let err = guard("kvsieve_test", || Err(Error::NullPointer { param: "q".into() }));
        // SAFETY: a live error from guard, freed once below.
        unsafe {
            assert_eq!(kvsieve_error_code(err), ErrorCode::NullPointer as u32);
            assert_eq!(
                CStr::from_ptr(kvsieve_error_message(err)).to_str().unwrap(),
                "kvsieve_test: `q` is a null pointer"
            );
            kvsieve_error_free(err);
        }
        assert!(guard("kvsieve_test", || Ok(())).is_null());
    }

    #[test]
    fn parse_errors_carry_their_offset() {
        let parse = guard("kvsieve_test", || Err(Error::Parse { offset: 7, message: "expected a number".into() }));
        let other = guard("kvsieve_test", || Err(Error::invalid("x", "y")));
        // SAFETY: live errors from guard, each freed once below.
        unsafe {
            assert_eq!(kvsieve_error_parse_offset(parse), 7);
            assert_eq!(kvsieve_error_parse_offset(other), -1);
            assert_eq!(kvsieve_error_parse_offset(std::ptr::null()), -1);
            kvsieve_error_free(parse);
            kvsieve_error_free(other);
        }
    }
}
