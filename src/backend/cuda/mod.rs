//! The CUDA backend (cargo feature `cuda`).
//!
//! Kernels live in `cuda/*.cu`; `build.rs` compiles each file with nvcc into a fatbin
//! (sm_80 and sm_90 cubins, compute_80 PTX) embedded in the library, listed by [`ModuleId`].
//! A module is loaded on a device the first time one of its kernels runs there
//! (`CudaDevice::function`). The driver is loaded at run time (cudarc's dynamic loading):
//! a build with the feature runs anywhere and reports [`crate::Error::CudaUnavailable`]
//! where there is no driver or device.
//!
//! The pieces:
//! - [`CudaDevice`], [`Stream`]: context, kernel modules, kvsieve's stream or the engine's;
//! - [`DeviceBuffer`], [`DeviceTensor`]: owned device memory, borrowed strided device tensors;
//! - [`CudaPagedKv`], [`CudaPageTable`], [`CudaSelections`]: paged K/V, the CSR page table and
//!   per-head token lists in device memory (the device twins of `PagedKv`, `PageTable`, `Selection`);
//! - [`CudaKvCache`]: kvsieve-owned pages resident on the device (page bookkeeping on the host);
//! - [`attention`]: paged append with key-bound updates, dense and sparse decode, `merge_states`.
//!
//! # CUDA graphs
//! Calls that only queue kernels, read no device memory back and allocate nothing can be
//! captured in a CUDA graph: they are marked "graph-capturable" in their docs.
//! Everything uploading host data (building a page table or selections from host arrays,
//! `CudaKvCache` bookkeeping) is not.

mod device;
mod launch;
mod memory;
mod modules;

pub mod attention;
mod cache;
pub mod prefill;
pub mod select;
mod view;

pub use cache::CudaKvCache;
pub use device::{device_count, CudaDevice, Stream};
pub use launch::{launch, LaunchDims};
pub use memory::{DeviceBuffer, DeviceTensor};
pub use modules::ModuleId;
pub use view::{CudaPageTable, CudaPagedKv, CudaSelections, KeyBoundsLayout};
