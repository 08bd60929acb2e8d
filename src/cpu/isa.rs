//! Which instruction set the CPU kernels use: detected once per process, lowerable by the
//! `KVSIEVE_ISA` environment variable.

/// The instruction-set levels the CPU kernels have, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F on top of the AVX2 set (kernels for head dims that are multiples of 16).
    Avx512,
}

/// The level the kernels use: the best this CPU has, lowered by the environment variable
/// `KVSIEVE_ISA` (`portable`, `avx2` or `avx512`; it never raises it, and other values are
/// ignored). Read once per process.
pub(crate) fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("KVSIEVE_ISA").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    use std::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma") && has!("f16c")) {
        Level::Portable
    } else if has!("avx512f") {
        Level::Avx512
    } else {
        Level::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Portable
}

/// Whether the AVX2 + FMA + F16C kernels are in use.
pub(crate) fn has_avx2() -> bool {
    level() >= Level::Avx2
}

/// Whether the AVX-512 kernels are in use (for head dims that are multiples of 16).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_avx512() -> bool {
    level() >= Level::Avx512
}

/// Name of the instruction set the kernels use on this machine.
pub fn isa() -> &'static str {
    match level() {
        Level::Avx512 => "avx512f+avx2+fma+f16c",
        Level::Avx2 => "avx2+fma+f16c",
        Level::Portable => "portable",
    }
}
