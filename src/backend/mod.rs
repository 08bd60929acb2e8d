//! Compute backends. The CPU backend is the crate's default (`crate::attention`,
//! `crate::select`, `crate::kv`); the CUDA backend (`backend::cuda`, cargo feature `cuda`) runs
//! the same operations on an NVIDIA GPU over device-resident pages, with the same answers
//! within dtype tolerance.

#[cfg_attr(feature = "cuda", allow(unused_imports))]
use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
pub mod cuda;

/// Where a computation runs and its data lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory, the CPU backend.
    #[default]
    Cpu,
    /// A CUDA device, by ordinal.
    Cuda(usize),
}

impl Device {
    /// Check that the device can be used: always for the CPU; for CUDA, that kvsieve was
    /// built with the `cuda` feature and that the driver and the device are present.
    /// Never panics: a missing driver or device is [`Error::CudaUnavailable`] with the reason.
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => cuda_check(ordinal),
        }
    }
}

/// Number of CUDA devices the driver reports; `Error::CudaUnavailable` (with the reason)
/// when there is no driver or kvsieve was built without the `cuda` feature.
pub fn cuda_device_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(not_compiled())
    }
}

fn cuda_check(ordinal: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        cuda::CudaDevice::get(ordinal).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(not_compiled())
    }
}

#[cfg(not(feature = "cuda"))]
fn not_compiled() -> Error {
    Error::CudaUnavailable("kvsieve was built without the `cuda` cargo feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    /// Without a driver (or without the feature) CUDA is an error with a reason, never a panic.
    #[test]
    fn missing_cuda_is_an_error_not_a_panic() {
        let r = std::panic::catch_unwind(|| Device::Cuda(0).check()).expect("Device::check must not panic");
        match r {
            Ok(()) => {
                let built_with_cuda = cfg!(feature = "cuda");
                assert!(built_with_cuda, "CUDA reported usable without the feature");
            }
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::CudaUnavailable);
                assert!(!e.to_string().is_empty());
            }
        }
        let far = std::panic::catch_unwind(|| Device::Cuda(1 << 20).check()).expect("must not panic");
        assert!(matches!(far, Err(Error::CudaUnavailable(_))), "{far:?}");
        let count = std::panic::catch_unwind(cuda_device_count).expect("must not panic");
        if let Err(e) = count {
            assert_eq!(e.code(), ErrorCode::CudaUnavailable);
        }
        assert_eq!(Device::Cpu.check(), Ok(()));
    }
}
