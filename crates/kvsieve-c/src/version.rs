//! `version.h`: the library version and the SIMD instruction set chosen at run time.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use super::error::guard_value;

static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

fn parse_part(s: &str) -> u32 {
    s.parse().unwrap_or(0)
}

/// The library version, `"MAJOR.MINOR.PATCH"`; a static string.
#[no_mangle]
pub extern "C" fn kvsieve_version() -> *const c_char {
    VERSION.as_ptr() as *const c_char
}

/// The major version number.
#[no_mangle]
pub extern "C" fn kvsieve_version_major() -> u32 {
    guard_value(0, || parse_part(env!("CARGO_PKG_VERSION_MAJOR")))
}

/// The minor version number.
#[no_mangle]
pub extern "C" fn kvsieve_version_minor() -> u32 {
    guard_value(0, || parse_part(env!("CARGO_PKG_VERSION_MINOR")))
}

/// The patch version number.
#[no_mangle]
pub extern "C" fn kvsieve_version_patch() -> u32 {
    guard_value(0, || parse_part(env!("CARGO_PKG_VERSION_PATCH")))
}

/// The instruction set the CPU kernels use on this machine (`"avx512f+avx2+fma+f16c"`,
/// `"avx2+fma+f16c"` or `"portable"`; `KVSIEVE_ISA=avx2` or `portable` lowers it); a static
/// string.
#[no_mangle]
pub extern "C" fn kvsieve_isa() -> *const c_char {
    static ISA: OnceLock<CString> = OnceLock::new();
    guard_value(c"unknown".as_ptr(), || {
        ISA.get_or_init(|| CString::new(kvsieve::cpu::isa()).unwrap_or_default()).as_ptr()
    })
}
