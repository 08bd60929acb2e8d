//! Fallible allocation for every buffer whose size comes from a caller or a file: out of
//! memory is [`Error::OutOfMemory`], never the process-wide abort of Rust's default
//! allocation-failure handler.
//!
//! Tests can make the `n`-th fallible allocation of the current thread fail (`fail_after`),
//! to check that an operation failing there changes nothing, and make the `n`-th commit
//! step panic (`panic_after`), to check that the cache then refuses every later call.

use std::alloc::{alloc_zeroed, Layout};

use crate::error::{Error, Result};

/// A zero-filled vector of `n` elements. The memory comes zeroed from the allocator (calloc
/// for large sizes), so pages the system hands out lazily stay uncommitted until written.
pub(crate) fn zeroed_vec<T: bytemuck::Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    let oom = || Error::OutOfMemory { what: what.into(), bytes: n.saturating_mul(size_of::<T>()) };
    injected(what)?;
    if n == 0 || size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = Layout::array::<T>(n).map_err(|_| oom())?;
    // SAFETY: the layout has a non-zero size (n > 0 and T is not zero-sized).
    let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(oom());
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[T; n]`, which
    // is what a Vec<T> of capacity n uses; all n elements are initialised, since all-zero
    // bytes are a valid T (Zeroable).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// An empty vector with room for `n` elements.
pub(crate) fn vec_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    injected(what)?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::OutOfMemory { what: what.into(), bytes: n.saturating_mul(size_of::<T>()) })?;
    Ok(v)
}

/// Room for `n` more elements in `v` (unchanged on failure).
pub(crate) fn reserve<T>(v: &mut Vec<T>, n: usize, what: &str) -> Result<()> {
    injected(what)?;
    v.try_reserve(n).map_err(|_| Error::OutOfMemory { what: what.into(), bytes: n.saturating_mul(size_of::<T>()) })
}

/// A vector of `n` copies of `value`.
pub(crate) fn filled_vec<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = vec_with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// A copy of `s` in a new vector.
pub(crate) fn copy_of<T: Copy>(s: &[T], what: &str) -> Result<Vec<T>> {
    let mut v = vec_with_capacity(s.len(), what)?;
    v.extend_from_slice(s);
    Ok(v)
}

/// The items of an iterator of known length `n`, collected into a vector allocated
/// fallibly (at most `n` items are taken).
pub(crate) fn collect_n<T>(n: usize, it: impl IntoIterator<Item = T>, what: &str) -> Result<Vec<T>> {
    let mut v = vec_with_capacity(n, what)?;
    v.extend(it.into_iter().take(n));
    Ok(v)
}

/// `a * b`, or an error naming `what` (the product of sizes it is) when it overflows.
pub(crate) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::invalid(what, format!("a size that fits in memory, but {a} x {b} overflows")))
}

#[cfg(test)]
thread_local! {
    /// Fallible allocations left before one fails (`None`: never).
    static FAIL_AFTER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    /// Commit steps left before one panics (`None`: never).
    static PANIC_AFTER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// A step inside the commit of a change, where a test can make the operation panic
/// ([`panic_after`]) to check what a bug there would leave behind. Nothing in other builds.
#[cfg(test)]
pub(crate) fn step(what: &str) {
    PANIC_AFTER.with(|c| match c.get() {
        Some(0) => {
            c.set(None);
            panic!("injected panic at {what}");
        }
        Some(n) => c.set(Some(n - 1)),
        None => {}
    })
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn step(_: &str) {}

/// Make the commit step after the next `n` of this thread panic (`None`: stop). Test
/// builds only.
#[cfg(test)]
pub(crate) fn panic_after(n: Option<usize>) {
    PANIC_AFTER.with(|c| c.set(n));
}

/// Make the fallible allocation after the next `n` of this thread fail (`None`: stop
/// failing). Test builds only.
#[cfg(test)]
pub(crate) fn fail_after(n: Option<usize>) {
    FAIL_AFTER.with(|c| c.set(n));
}

/// Run `op` on `state` with its first, second, ... fallible allocation failing, until it
/// succeeds. After each failure the error must be an injected [`Error::OutOfMemory`], and
/// `unchanged(state, n)` checks that the failure at allocation `n` changed nothing.
/// Returns the successful result and the number of allocation points tried.
#[cfg(test)]
pub(crate) fn fail_each<S, T>(
    name: &str,
    state: &mut S,
    mut op: impl FnMut(&mut S) -> Result<T>,
    mut unchanged: impl FnMut(&S, usize),
) -> (T, usize) {
    let mut n = 0;
    loop {
        fail_after(Some(n));
        let r = op(state);
        fail_after(None);
        match r {
            Ok(v) => return (v, n),
            Err(e) => {
                assert_eq!(e.code(), crate::error::ErrorCode::OutOfMemory, "{name}, allocation {n}: {e}");
                assert!(e.to_string().contains("injected"), "{name}, allocation {n}: {e}");
                unchanged(state, n);
                n += 1;
            }
        }
    }
}

#[cfg(test)]
fn injected(what: &str) -> Result<()> {
    FAIL_AFTER.with(|c| match c.get() {
        Some(0) => {
            c.set(None);
            Err(Error::OutOfMemory { what: format!("{what} (injected failure)"), bytes: 0 })
        }
        Some(n) => {
            c.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

#[cfg(not(test))]
#[inline(always)]
fn injected(_: &str) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn huge_requests_are_errors_not_aborts() {
        let e = zeroed_vec::<u64>(usize::MAX / 4, "pool").unwrap_err();
        assert_eq!(e.code(), ErrorCode::OutOfMemory);
        assert!(e.to_string().contains("pool"), "{e}");
        assert_eq!(vec_with_capacity::<u32>(usize::MAX / 2, "indices").unwrap_err().code(), ErrorCode::OutOfMemory);
        let mut v = vec![1u8];
        assert_eq!(reserve(&mut v, usize::MAX, "v").unwrap_err().code(), ErrorCode::OutOfMemory);
        assert_eq!(v, [1]);
    }

    #[test]
    fn zeroed_vectors_are_zero_and_sized() {
        for n in [0usize, 1, 7, 4096, 1 << 20] {
            let v = zeroed_vec::<u32>(n, "v").unwrap();
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn injected_failures_hit_the_requested_allocation() {
        fail_after(Some(2));
        assert!(zeroed_vec::<u8>(4, "a").is_ok());
        assert!(vec_with_capacity::<u8>(4, "b").is_ok());
        let e = zeroed_vec::<u8>(4, "c").unwrap_err();
        assert!(e.to_string().contains("c (injected failure)"), "{e}");
        assert!(zeroed_vec::<u8>(4, "d").is_ok(), "one failure, then normal again");
        fail_after(None);
    }
}
