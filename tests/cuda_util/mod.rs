//! Shared by the CUDA integration tests (`tests/cuda_*.rs`, `mod cuda_util;`): the device
//! or a printed skip, seeded random data, poisoned outputs, tolerance checks.
#![allow(dead_code)]

use std::io::Write;
use std::sync::Arc;

use kvsieve::backend::cuda::CudaDevice;

/// Device 0 after printing `ran on <device>: <test>`, or `None` after printing
/// `skipped: <test>: <reason>` (written straight to stderr, so it shows even when the test
/// harness captures output). The device is "kvsieve CUDA emulator (CPU)" under
/// scripts/cuda-emu.sh.
pub fn device_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::get(0) {
        Ok(d) => {
            let _ = writeln!(std::io::stderr(), "ran on {}: {test}", d.name());
            Some(d)
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: {test}: {e}");
            None
        }
    }
}

/// A small deterministic generator (SplitMix64), so failures reproduce from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

/// Bytes written into outputs before a kernel runs: a NaN in f32, f16 and bf16 alike
/// (0xFFFF halves are NaN), so any element a kernel leaves unwritten fails the comparison.
pub const POISON_BYTE: u8 = 0xFF;

/// Assert `got` is close to `want`: |got - want| <= atol + rtol * |want|, element-wise,
/// naming the first bad index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() { g == w } else { (g - w).abs() <= atol + rtol * w.abs() };
        assert!(ok, "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})");
    }
}
