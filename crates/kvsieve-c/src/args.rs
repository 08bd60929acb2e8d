//! Checks of raw arguments: pointers to handles and out-parameters, caller buffers turned
//! into slices, versioned structs read and written by the size the caller compiled them
//! with, the rule that a buffer kvsieve writes never overlaps one it reads, room in caller
//! buffers, and the parameter an error names.

use std::mem::{size_of, MaybeUninit};

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

// Versioned structs ------------------------------------------------------------------------

/// A struct of the C API that begins with `size_t struct_size`: the size of the struct as the
/// caller's header declared it, set by the header's `kvsieve_X_init()` / `kvsieve_X_default()`.
/// A later minor version may append fields; a program built against an older header passes
/// the older, smaller size, and the library reads (and writes) only that many bytes, the new
/// fields taking their defaults. Every access goes through [`read_versioned`],
/// [`read_versioned_opt`], [`read_versioned_array`] and [`VersionedOut`].
///
/// Adding a field: append it after the last one, in the header and here; keep the previous
/// layout as a private `#[repr(C)]` copy and put its size in front of `size_of::<Self>()` in
/// [`Versioned::SIZES`]; give the field its default in [`Versioned::defaults`] and in the
/// header's initialiser. Each layout must be strictly larger than the one before (a field
/// that fits in the tail padding of the previous layout could not be told apart by size):
/// [`sizes_are_valid`], asserted at compile time for every implementor, checks it.
///
/// # Safety
/// Implementors are `#[repr(C)]` and have `struct_size: usize` at offset 0; every field is an
/// integer, a float, a bool, a raw pointer or a struct of those, so that a value whose first
/// bytes come from a caller's struct of an accepted size and whose other bytes come from
/// [`Versioned::defaults`] is as valid as the caller's fields are.
pub(crate) unsafe trait Versioned: Copy {
    /// The C name, for messages (`kvsieve_cache_config_t`).
    const NAME: &'static str;
    /// How a caller initialises one, for messages (`kvsieve_cache_config_init()`).
    const INIT: &'static str;
    /// The size of every layout released so far, oldest first; the last is `size_of::<Self>()`.
    /// A caller's `struct_size` must be one of them: not just any size between the first and
    /// the last, since one that ends inside a field would hand the library half a field.
    const SIZES: &'static [usize];
    /// What the header's `kvsieve_X_init()` gives: the values of the fields an older
    /// caller's struct does not reach.
    fn defaults() -> Self;
}

/// Whether `T::SIZES` is a valid list: not empty, each size holding `struct_size`, strictly
/// increasing, the last `size_of::<T>()`. Asserted at compile time for every implementor.
pub(crate) const fn sizes_are_valid<T: Versioned>() -> bool {
    let sizes = T::SIZES;
    if sizes.is_empty() || sizes[0] < size_of::<usize>() || sizes[sizes.len() - 1] != size_of::<T>() {
        return false;
    }
    let mut i = 1;
    while i < sizes.len() {
        if sizes[i] <= sizes[i - 1] {
            return false;
        }
        i += 1;
    }
    true
}

/// `InvalidArgument` naming `param.struct_size`, for a caller's `got`.
fn struct_size_error<T: Versioned>(param: &str, got: usize) -> Error {
    let own = size_of::<T>();
    let want = match T::SIZES {
        [_] => format!("sizeof({}) = {own}", T::NAME),
        sizes => {
            let list: Vec<String> = sizes.iter().map(usize::to_string).collect();
            format!(
                "one of {} (the sizes of the layouts of {} up to this library's, sizeof = {own})",
                list.join(", "),
                T::NAME
            )
        }
    };
    let newer = if got > own {
        " (a larger size comes from a newer kvsieve header than this library: use the library of that version)"
    } else {
        ""
    };
    Error::invalid(format!("{param}.struct_size"), format!("{want}, as {} sets it, got {got}{newer}", T::INIT))
}

/// The `struct_size` a caller's struct states, checked: one of `T::SIZES`. `NullPointer`
/// naming `param` for NULL; reads the leading `size_t` only.
///
/// # Safety
/// 1. `ptr` is NULL or valid for a read of one `usize` (any alignment).
pub(crate) unsafe fn caller_struct_size<T: Versioned>(ptr: *const T, param: &str) -> Result<usize> {
    non_null(ptr, param)?;
    let size = ptr.cast::<usize>().read_unaligned();
    if T::SIZES.contains(&size) {
        Ok(size)
    } else {
        Err(struct_size_error::<T>(param, size))
    }
}

/// The first `size` bytes at `src` over `T::defaults()`.
///
/// # Safety
/// 1. `size` is one of `T::SIZES`; `src` is valid for reads of `size` bytes (any alignment).
unsafe fn read_prefix<T: Versioned>(src: *const u8, size: usize) -> T {
    let mut value = MaybeUninit::new(T::defaults());
    std::ptr::copy_nonoverlapping(src, value.as_mut_ptr().cast::<u8>(), size.min(size_of::<T>()));
    value.assume_init()
}

/// Copy a caller's versioned struct (any alignment): its `struct_size` is checked first
/// (`InvalidArgument` naming `param.struct_size` unless one of `T::SIZES`), then exactly
/// that many bytes are read; fields past them take `T::defaults()`. `NullPointer` naming
/// `param` for NULL.
///
/// # Safety
/// 1. `ptr` is NULL or points at a struct of the size its `struct_size` states, or at least
///    at one `usize` (a wrong `struct_size` is refused before anything else is read).
pub(crate) unsafe fn read_versioned<T: Versioned>(ptr: *const T, param: &str) -> Result<T> {
    let size = caller_struct_size(ptr, param)?;
    Ok(read_prefix(ptr.cast::<u8>(), size))
}

/// As [`read_versioned`] for an optional struct: NULL gives `None`.
///
/// # Safety
/// As for [`read_versioned`].
pub(crate) unsafe fn read_versioned_opt<T: Versioned>(ptr: *const T, param: &str) -> Result<Option<T>> {
    if ptr.is_null() {
        return Ok(None);
    }
    read_versioned(ptr, param).map(Some)
}

/// A copy of a caller's array, or [`Error::OutOfMemory`] naming `param` (a plain
/// `to_vec` would abort the process when memory runs out).
pub(crate) fn copy_array<T: Copy>(s: &[T], param: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(s.len())
        .map_err(|_| Error::OutOfMemory { what: param.into(), bytes: std::mem::size_of_val(s) })?;
    v.extend_from_slice(s);
    Ok(v)
}

/// A caller array of `n` versioned structs (NULL accepted when `n` is 0), laid out as the
/// caller compiled them: entry `i` at byte `i * struct_size`, where `struct_size` is entry
/// 0's, checked as [`read_versioned`] does; every entry must state the same size
/// (`InvalidArgument` naming `param[i].struct_size`). Also returns the bytes the array spans.
///
/// # Safety
/// 1. `ptr` is NULL or points at `n` structs of the size the first states (at least one
///    `usize` each, read before anything past it).
pub(crate) unsafe fn read_versioned_array<T: Versioned>(
    ptr: *const T,
    n: usize,
    param: &str,
) -> Result<(Vec<T>, Region)> {
    if n == 0 {
        return Ok((Vec::new(), Region::new(ptr.cast::<u8>(), 0, param)));
    }
    non_null(ptr, param)?;
    let stride = caller_struct_size(ptr, &format!("{param}[0]"))?;
    let bytes = n.checked_mul(stride).filter(|&b| b <= isize::MAX as usize);
    let bytes = bytes.ok_or_else(|| Error::invalid(param, format!("a length that fits in memory, got {n}")))?;
    let base = ptr.cast::<u8>();
    let mut items = Vec::new();
    items.try_reserve_exact(n).map_err(|_| Error::OutOfMemory { what: param.into(), bytes })?;
    for i in 0..n {
        let at = base.add(i * stride);
        let size = at.cast::<usize>().read_unaligned();
        if size != stride {
            return Err(Error::invalid(
                format!("{param}[{i}].struct_size"),
                format!("{stride}, the struct_size of `{param}[0]` (the entries of an array share one layout; {} sets it), got {size}", T::INIT),
            ));
        }
        items.push(read_prefix(at, stride));
    }
    Ok((items, Region::new(base, bytes, param)))
}

/// A caller's versioned out-parameter, its `struct_size` checked (as for [`read_versioned`])
/// before anything is computed; [`VersionedOut::write`] then writes only the bytes the
/// caller's layout has.
pub(crate) struct VersionedOut<T> {
    ptr: *mut T,
    size: usize,
}

impl<T: Versioned> VersionedOut<T> {
    /// A required out-parameter: `NullPointer` naming `param` for NULL.
    ///
    /// # Safety
    /// 1. `ptr` is NULL or points at a struct of the size its `struct_size` states (at least
    ///    one readable `usize`).
    pub unsafe fn new(ptr: *mut T, param: &str) -> Result<Self> {
        let size = caller_struct_size(ptr, param)?;
        Ok(VersionedOut { ptr, size })
    }

    /// An optional out-parameter: NULL gives `None`.
    ///
    /// # Safety
    /// As for [`VersionedOut::new`].
    pub unsafe fn optional(ptr: *mut T, param: &str) -> Result<Option<Self>> {
        if ptr.is_null() {
            return Ok(None);
        }
        Self::new(ptr, param).map(Some)
    }

    /// The caller's bytes, for the overlap check.
    pub fn region(&self, name: &str) -> Region {
        Region::new(self.ptr.cast::<u8>(), self.size, name)
    }

    /// Write `value`'s fields into the caller's struct, up to its `struct_size` (which is left
    /// as the caller set it). Called only once nothing can fail.
    ///
    /// # Safety
    /// 1. the caller's struct is valid for writes of its `struct_size` bytes.
    pub unsafe fn write(self, value: T) {
        let skip = size_of::<usize>();
        let len = self.size.min(size_of::<T>()) - skip;
        let src = (&value as *const T).cast::<u8>().add(skip);
        std::ptr::copy_nonoverlapping(src, self.ptr.cast::<u8>().add(skip), len);
    }
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
        Error::InvalidArgument { param, expected } if param == from => {
            Error::InvalidArgument { param: to.into(), expected }
        }
        Error::Shape { param, expected, got } if param == from => Error::Shape { param: to.into(), expected, got },
        Error::DType { param, expected, got } if param == from => Error::DType { param: to.into(), expected, got },
        Error::NullPointer { param } if param == from => Error::NullPointer { param: to.into() },
        Error::OutOfRange { param, value, range } if param == from => {
            Error::OutOfRange { param: to.into(), value, range }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first release of a versioned struct.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct V1 {
        struct_size: usize,
        a: u32,
        b: f32,
    }

    /// The next one: V1 and a trailing field.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct V2 {
        struct_size: usize,
        a: u32,
        b: f32,
        c: u64,
    }

    const C_DEFAULT: u64 = 0x0123_4567_89ab_cdef;

    // SAFETY: repr(C), struct_size first, plain fields.
    unsafe impl Versioned for V2 {
        const NAME: &'static str = "test_v2_t";
        const INIT: &'static str = "test_v2_init()";
        const SIZES: &'static [usize] = &[size_of::<V1>(), size_of::<V2>()];
        fn defaults() -> Self {
            V2 { struct_size: size_of::<V2>(), a: 0, b: 0.0, c: C_DEFAULT }
        }
    }

    const _: () = assert!(sizes_are_valid::<V2>());

    fn v1(a: u32, b: f32) -> V1 {
        V1 { struct_size: size_of::<V1>(), a, b }
    }

    /// A V1 struct followed by bytes a reader must not look at.
    #[repr(C)]
    struct V1ThenCanary {
        v1: V1,
        canary: [u8; 32],
    }

    fn invalid_param(e: Error) -> String {
        match e {
            Error::InvalidArgument { param, expected } => {
                assert!(expected.contains("test_v2_init()"), "{expected}");
                param
            }
            e => panic!("expected InvalidArgument, got {e:?}"),
        }
    }

    #[test]
    fn an_older_struct_reads_with_defaults_past_its_size() {
        let buf = V1ThenCanary { v1: v1(7, 1.5), canary: [0xa5; 32] };
        // SAFETY: the V1 struct is readable; its struct_size states its own size.
        let got = unsafe { read_versioned(&buf.v1 as *const V1 as *const V2, "p") }.unwrap();
        // The canary bytes would have given `c` 0xa5a5...: it has its default.
        assert_eq!(got, V2 { struct_size: size_of::<V1>(), a: 7, b: 1.5, c: C_DEFAULT });
    }

    #[test]
    fn an_older_struct_on_the_heap_is_read_within_its_bytes() {
        // Exactly V1's bytes on the heap: a read past them is a heap overrun (which valgrind or
        // a sanitizer reports); the guard page below makes it a crash everywhere.
        let boxed = Box::new(v1(3, -2.0));
        // SAFETY: as above.
        let got = unsafe { read_versioned(&*boxed as *const V1 as *const V2, "p") }.unwrap();
        assert_eq!((got.a, got.b, got.c), (3, -2.0, C_DEFAULT));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_older_struct_before_a_guard_page_is_read_within_its_bytes() {
        // Two pages, the second inaccessible; the V1 struct ends where the first page ends, so
        // reading one byte past it faults.
        // SAFETY: plain anonymous mappings, unmapped at the end; the struct lies inside the
        // readable page.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            let map = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mprotect(map.cast::<u8>().add(page).cast(), page, libc::PROT_NONE), 0);
            let at = map.cast::<u8>().add(page - size_of::<V1>()).cast::<V1>();
            at.write(v1(11, 0.25));
            let got = read_versioned(at as *const V2, "p").unwrap();
            assert_eq!((got.struct_size, got.a, got.b, got.c), (size_of::<V1>(), 11, 0.25, C_DEFAULT));
            let (items, region) = read_versioned_array(at as *const V2, 1, "arr").unwrap();
            assert_eq!(items, vec![got]);
            assert_eq!(region.end - region.start, size_of::<V1>());
            assert_eq!(libc::munmap(map, 2 * page), 0);
        }
    }

    #[test]
    fn the_current_layout_reads_every_field() {
        let v = V2 { struct_size: size_of::<V2>(), a: 1, b: 2.0, c: 3 };
        // SAFETY: a readable V2.
        assert_eq!(unsafe { read_versioned(&v, "p") }.unwrap(), v);
    }

    #[test]
    fn other_sizes_are_refused_naming_struct_size() {
        // Below the first layout, between the two, past the library's own, and unset (0).
        for size in [0, size_of::<usize>(), size_of::<V1>() - 4, size_of::<V1>() + 4, size_of::<V2>() + 8, usize::MAX] {
            let v = V2 { struct_size: size, a: 1, b: 2.0, c: 3 };
            // SAFETY: a readable V2.
            let e = unsafe { read_versioned(&v, "params") }.unwrap_err();
            let msg = e.to_string();
            assert_eq!(invalid_param(e), "params.struct_size", "{size}");
            assert!(msg.contains(&format!("got {size}")) && msg.contains("16, 24"), "{msg}");
            assert_eq!(msg.contains("newer kvsieve header"), size > size_of::<V2>(), "{msg}");
        }
        // SAFETY: NULL is checked before any read.
        let e = unsafe { read_versioned::<V2>(std::ptr::null(), "params") }.unwrap_err();
        assert_eq!(e, Error::NullPointer { param: "params".into() });
        // SAFETY: as above.
        assert!(unsafe { read_versioned_opt::<V2>(std::ptr::null(), "params") }.unwrap().is_none());
    }

    #[test]
    fn an_older_struct_is_written_within_its_bytes() {
        let mut buf = V1ThenCanary { v1: v1(0, 0.0), canary: [0x5a; 32] };
        let value = V2 { struct_size: size_of::<V2>(), a: 9, b: 4.5, c: 0xffff_ffff_ffff_ffff };
        // SAFETY: the V1 struct is writable for its struct_size bytes.
        unsafe {
            let out = VersionedOut::new(&mut buf.v1 as *mut V1 as *mut V2, "out").unwrap();
            let r = out.region("out");
            assert_eq!(r.end - r.start, size_of::<V1>());
            out.write(value);
        }
        // The caller's struct_size is its own; nothing past its bytes changed.
        assert_eq!(buf.v1, V1 { struct_size: size_of::<V1>(), a: 9, b: 4.5 });
        assert_eq!(buf.canary, [0x5a; 32]);

        let mut full = V2 { struct_size: size_of::<V2>(), a: 0, b: 0.0, c: 0 };
        // SAFETY: a writable V2.
        unsafe { VersionedOut::new(&mut full, "out").unwrap().write(value) };
        assert_eq!(full, value);
    }

    #[test]
    fn an_out_struct_of_another_size_is_refused_untouched() {
        for size in [0, size_of::<V1>() + 4, size_of::<V2>() + 8] {
            let before = V2 { struct_size: size, a: 1, b: 2.0, c: 3 };
            let mut out = before;
            // SAFETY: a writable V2.
            let e = unsafe { VersionedOut::new(&mut out, "stats") }.err().expect("refused");
            assert_eq!(invalid_param(e), "stats.struct_size");
            assert_eq!(out, before);
        }
        // SAFETY: NULL is checked first.
        assert!(unsafe { VersionedOut::<V2>::optional(std::ptr::null_mut(), "stats") }.unwrap().is_none());
    }

    #[test]
    fn arrays_are_strided_by_the_callers_struct_size() {
        let old = [v1(1, 1.0), v1(2, 2.0), v1(3, 3.0)];
        // SAFETY: three readable V1 structs.
        let (items, region) = unsafe { read_versioned_array(old.as_ptr() as *const V2, 3, "windows") }.unwrap();
        assert_eq!(
            items.iter().map(|v| (v.a, v.c)).collect::<Vec<_>>(),
            vec![(1, C_DEFAULT), (2, C_DEFAULT), (3, C_DEFAULT)]
        );
        assert_eq!(region.end - region.start, 3 * size_of::<V1>());

        let mut mixed = old;
        mixed[1].struct_size = size_of::<V2>();
        // SAFETY: as above; entry 1 is refused before it is read past its first usize.
        let e = unsafe { read_versioned_array(mixed.as_ptr() as *const V2, 3, "windows") }.unwrap_err();
        assert_eq!(invalid_param(e), "windows[1].struct_size");
        let mut bad = old;
        bad[0].struct_size = 0;
        // SAFETY: as above.
        let e = unsafe { read_versioned_array(bad.as_ptr() as *const V2, 3, "windows") }.unwrap_err();
        assert_eq!(invalid_param(e), "windows[0].struct_size");
        // SAFETY: an empty array may be NULL.
        let (none, _) = unsafe { read_versioned_array::<V2>(std::ptr::null(), 0, "windows") }.unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn size_lists_must_grow() {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Padded {
            struct_size: usize,
            a: u32,
        }
        // SAFETY: repr(C), struct_size first, plain fields.
        unsafe impl Versioned for Padded {
            const NAME: &'static str = "padded_t";
            const INIT: &'static str = "padded_init()";
            // A field added into the tail padding: both layouts have the same size.
            const SIZES: &'static [usize] = &[size_of::<Padded>(), size_of::<Padded>()];
            fn defaults() -> Self {
                Padded { struct_size: size_of::<Padded>(), a: 0 }
            }
        }
        assert!(!sizes_are_valid::<Padded>());
        assert!(sizes_are_valid::<V2>());
    }
}
