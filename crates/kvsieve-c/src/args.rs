//! Checks of raw arguments: pointers to handles and out-parameters, caller buffers turned
//! into slices, the rule that a buffer kvsieve writes never overlaps one it reads, room in
//! caller buffers, and the parameter an error names.

use kvsieve::error::{Error, Result};

/// Fail with `NullPointer` naming `param` if `ptr` is NULL.
pub(crate) fn non_null<T>(ptr: *const T, param: &str) -> Result<()> {
    if ptr.is_null() {
        return Err(Error::NullPointer { param: param.into() });
    }
    Ok(())
}

fn check_buffer<T>(ptr: *const T, len: usize, param: &str) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    non_null(ptr, param)?;
    let align = std::mem::align_of::<T>();
    if !(ptr as usize).is_multiple_of(align) {
        return Err(Error::invalid(param, format!("a pointer aligned to {align} bytes")));
    }
    let fits = len.checked_mul(std::mem::size_of::<T>()).is_some_and(|b| b <= isize::MAX as usize);
    if !fits {
        return Err(Error::invalid(param, format!("a length that fits in memory, got {len}")));
    }
    Ok(())
}

/// A caller buffer of `len` elements as a slice. NULL is accepted when `len` is 0.
///
/// # Safety
/// 1. if `len > 0`, `ptr` is valid for reads of `len` elements for `'a`;
/// 2. nobody writes that memory while the slice lives.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize, param: &str) -> Result<&'a [T]> {
    check_buffer(ptr, len, param)?;
    Ok(if len == 0 { &[] } else { std::slice::from_raw_parts(ptr, len) })
}

/// A caller buffer of `len` elements as a mutable slice. NULL is accepted when `len` is 0.
///
/// # Safety
/// 1. if `len > 0`, `ptr` is valid for reads and writes of `len` elements for `'a`;
/// 2. nobody else reads or writes that memory while the slice lives.
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize, param: &str) -> Result<&'a mut [T]> {
    check_buffer(ptr, len, param)?;
    Ok(if len == 0 { &mut [] } else { std::slice::from_raw_parts_mut(ptr, len) })
}

/// An optional caller buffer: NULL gives `None`.
///
/// # Safety
/// As for [`slice_mut`] when `ptr` is not NULL.
pub(crate) unsafe fn opt_slice_mut<'a, T>(ptr: *mut T, len: usize, param: &str) -> Result<Option<&'a mut [T]>> {
    if ptr.is_null() {
        return Ok(None);
    }
    slice_mut(ptr, len, param).map(Some)
}

/// An optional read-only caller buffer: NULL gives `None`.
///
/// # Safety
/// As for [`slice`] when `ptr` is not NULL.
pub(crate) unsafe fn opt_slice<'a, T>(ptr: *const T, len: usize, param: &str) -> Result<Option<&'a [T]>> {
    if ptr.is_null() {
        return Ok(None);
    }
    slice(ptr, len, param).map(Some)
}

/// Copy a caller struct passed by pointer (any alignment); `NullPointer` naming `param` if NULL.
///
/// # Safety
/// 1. `ptr` is NULL or valid for a read of one `T`.
pub(crate) unsafe fn read_struct<T: Copy>(ptr: *const T, param: &str) -> Result<T> {
    non_null(ptr, param)?;
    Ok(ptr.read_unaligned())
}

/// Write an out-parameter (already checked non-NULL). Called only once nothing can fail.
///
/// # Safety
/// 1. `ptr` is valid for a write of one `T`.
pub(crate) unsafe fn write_out<T>(ptr: *mut T, value: T) {
    ptr.write_unaligned(value);
}

/// The bytes a caller buffer spans, for the overlap check.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    start: usize,
    end: usize,
    name: String,
}

impl Region {
    pub fn new(ptr: *const u8, bytes: usize, name: impl Into<String>) -> Self {
        let start = ptr as usize;
        Region { start, end: start.saturating_add(bytes), name: name.into() }
    }

    /// The region of `len` elements of `T` at `ptr` (empty for NULL).
    pub fn of<T>(ptr: *const T, len: usize, name: impl Into<String>) -> Self {
        let bytes = if ptr.is_null() { 0 } else { len.saturating_mul(std::mem::size_of::<T>()) };
        Self::new(ptr as *const u8, bytes, name)
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.start < self.end && other.start < other.end && self.start < other.end && other.start < self.end
    }
}

/// Fail if any buffer kvsieve writes (`writes`) overlaps another buffer of the call
/// (`writes` or `reads`). Rust forbids writing memory that is also being read.
pub(crate) fn check_disjoint(writes: &[Region], reads: &[Region]) -> Result<()> {
    for (i, w) in writes.iter().enumerate() {
        let others = writes.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, r)| r).chain(reads);
        for r in others {
            if w.overlaps(r) {
                return Err(Error::invalid(w.name.clone(), format!("memory that does not overlap `{}`", r.name)));
            }
        }
    }
    Ok(())
}

/// `InvalidArgument` naming `param` unless a caller buffer of `capacity` values has room
/// for `need` (`what` says what they are).
pub(crate) fn check_capacity(param: &str, capacity: usize, need: usize, what: &str) -> Result<()> {
    if capacity < need {
        return Err(Error::invalid(param, format!("room for at least {need} values ({what}), got {capacity}")));
    }
    Ok(())
}

/// `e` naming the parameter `to` where it named `from` (a core argument that a C call
/// passes under another name); any other error unchanged.
/// `e` with its parameter renamed to `to` if it names `from` (the core names its own
/// arguments; a C parameter may be called differently).
pub(crate) fn rename(e: Error, from: &str, to: &str) -> Error {
    match e {
        Error::InvalidArgument { param, expected } if param == from => Error::InvalidArgument { param: to.into(), expected },
        Error::Shape { param, expected, got } if param == from => Error::Shape { param: to.into(), expected, got },
        Error::DType { param, expected, got } if param == from => Error::DType { param: to.into(), expected, got },
        Error::NullPointer { param } if param == from => Error::NullPointer { param: to.into() },
        Error::OutOfRange { param, value, range } if param == from => Error::OutOfRange { param: to.into(), value, range },
        e => e,
    }
}
