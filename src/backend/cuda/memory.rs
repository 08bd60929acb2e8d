//! Device memory: owned buffers ([`DeviceBuffer`]) and borrowed strided tensors in device
//! memory ([`DeviceTensor`], what an engine passes: pointer, dtype, shape, strides).

use std::sync::Arc;

use cudarc::driver::result as cu;

use crate::backend::cuda::device::{driver_err, CudaDevice, Stream};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// An owned, uninitialised allocation of device memory (bytes), freed on drop.
pub struct DeviceBuffer {
    dev: Arc<CudaDevice>,
    ptr: u64,
    len: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes, device {})", self.ptr, self.len, self.dev.ordinal())
    }
}

// SAFETY: the buffer is a plain device address; access is ordered by streams.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// Allocate `len` bytes (at least 256-byte aligned). Contents are undefined.
    pub fn alloc(dev: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        dev.bind()?;
        let ptr = if len == 0 {
            0
        } else {
            // SAFETY: the context is current; the result is checked.
            unsafe { cu::malloc_sync(len) }.map_err(|e| match e.0 {
                cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::invalid(
                    "capacity",
                    format!("an allocation that fits in device memory ({len} bytes failed: out of memory)"),
                ),
                _ => Error::CudaUnavailable(format!("cuMemAlloc of {len} bytes: {e}")),
            })?
        };
        Ok(DeviceBuffer { dev: dev.clone(), ptr, len })
    }

    /// Allocate and fill with zero bytes (ordered on `stream`).
    pub fn zeroed(dev: &Arc<CudaDevice>, len: usize, stream: &Stream) -> Result<Self> {
        let b = Self::alloc(dev, len)?;
        b.memset(0, stream)?;
        Ok(b)
    }

    /// Allocate and copy `data` in (the copy is complete when this returns).
    pub fn from_slice<T: bytemuck::Pod>(dev: &Arc<CudaDevice>, data: &[T], stream: &Stream) -> Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let b = Self::alloc(dev, bytes.len())?;
        b.upload(0, bytes, stream)?;
        stream.synchronize()?;
        Ok(b)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_range(&self, param: &str, offset: usize, n: usize) -> Result<()> {
        if offset.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(Error::out_of_range(
                param,
                offset as i64,
                format!("offsets with offset + {n} <= {} bytes of the buffer", self.len),
            ));
        }
        Ok(())
    }

    /// Copy `src` to byte `offset`, queued on `stream`. The host data is read before this
    /// returns (pageable memory is staged by the driver).
    pub fn upload(&self, offset: usize, src: &[u8], stream: &Stream) -> Result<()> {
        self.check_range("offset", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        stream.bind()?;
        // SAFETY: range checked; the driver copies pageable host memory before returning.
        unsafe { cu::memcpy_htod_async(self.ptr + offset as u64, src, stream.raw()) }
            .map_err(driver_err("copying to the device"))
    }

    /// Copy bytes from `offset` into `dst`; waits for `stream` (so for earlier work on it).
    pub fn download(&self, offset: usize, dst: &mut [u8], stream: &Stream) -> Result<()> {
        self.check_range("offset", offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        stream.bind()?;
        // SAFETY: range checked; synchronized before `dst` is released.
        unsafe { cu::memcpy_dtoh_async(dst, self.ptr + offset as u64, stream.raw()) }
            .map_err(driver_err("copying from the device"))?;
        stream.synchronize()
    }

    /// The whole buffer as a vector of `T` (waits for `stream`).
    pub fn to_vec<T: bytemuck::Pod + Default>(&self, stream: &Stream) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len / std::mem::size_of::<T>()];
        self.download(0, bytemuck::cast_slice_mut(&mut v), stream)?;
        Ok(v)
    }

    /// Set every byte to `value` (queued on `stream`).
    pub fn memset(&self, value: u8, stream: &Stream) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        stream.bind()?;
        // SAFETY: the whole allocation.
        unsafe { cu::memset_d8_async(self.ptr, value, self.len, stream.raw()) }.map_err(driver_err("cuMemsetD8"))
    }

    /// Set `n` bytes from `offset` to `value` (queued on `stream`).
    pub fn memset_range(&self, offset: usize, n: usize, value: u8, stream: &Stream) -> Result<()> {
        self.check_range("offset", offset, n)?;
        if n == 0 {
            return Ok(());
        }
        stream.bind()?;
        // SAFETY: range checked.
        unsafe { cu::memset_d8_async(self.ptr + offset as u64, value, n, stream.raw()) }
            .map_err(driver_err("cuMemsetD8"))
    }

    /// Copy `n` bytes from `src_offset` of `src` to `dst_offset` of this buffer (queued).
    pub fn copy_from(
        &self,
        dst_offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        n: usize,
        stream: &Stream,
    ) -> Result<()> {
        self.check_range("dst_offset", dst_offset, n)?;
        src.check_range("src_offset", src_offset, n)?;
        if n == 0 {
            return Ok(());
        }
        stream.bind()?;
        // SAFETY: both ranges checked.
        unsafe { cu::memcpy_dtod_async(self.ptr + dst_offset as u64, src.ptr + src_offset as u64, n, stream.raw()) }
            .map_err(driver_err("device-to-device copy"))
    }

    /// A tensor view of this buffer (contiguous, row-major).
    pub fn tensor(&self, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        let n: usize = shape.iter().product();
        if n * dtype.size() > self.len {
            return Err(Error::shape(
                "tensor",
                format!("at most {} bytes", self.len),
                format!("{shape:?} of {dtype} ({} bytes)", n * dtype.size()),
            ));
        }
        Ok(DeviceTensor::contiguous(self.ptr, dtype, shape, self.dev.ordinal()))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 && self.dev.bind().is_ok() {
            // SAFETY: allocated by cuMemAlloc in this context; cuMemFree waits for work using it.
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
    }
}

/// A strided tensor in device memory that kvsieve does not own (DLPack-like): address,
/// dtype, shape and strides in elements. Building one is safe; the functions that read or
/// write through it are `unsafe` and state what the memory must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTensor {
    pub ptr: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    /// Ordinal of the device holding the memory.
    pub device: usize,
}

impl DeviceTensor {
    /// A contiguous (row-major) tensor at `ptr`.
    pub fn contiguous(ptr: u64, dtype: DType, shape: &[usize], device: usize) -> Self {
        DeviceTensor { ptr, dtype, shape: shape.to_vec(), strides: crate::tensor::contiguous_strides(shape), device }
    }

    /// A strided tensor at `ptr` (strides in elements).
    pub fn strided(ptr: u64, dtype: DType, shape: &[usize], strides: &[usize], device: usize) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::shape(
                "tensor.strides",
                format!("{} strides (one per dimension)", shape.len()),
                format!("{}", strides.len()),
            ));
        }
        Ok(DeviceTensor { ptr, dtype, shape: shape.to_vec(), strides: strides.to_vec(), device })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Check shape (`None` = any size), dtype set, device, non-null and element alignment.
    #[allow(dead_code)]
    pub(crate) fn expect(&self, param: &str, shape: &[Option<usize>], dtypes: &[DType], device: usize) -> Result<()> {
        let ok =
            self.shape.len() == shape.len() && self.shape.iter().zip(shape).all(|(&a, b)| b.is_none_or(|b| a == b));
        if !ok {
            let want: Vec<String> = shape.iter().map(|d| d.map_or("_".into(), |d| d.to_string())).collect();
            return Err(Error::shape(param, format!("[{}]", want.join(", ")), format!("{:?}", self.shape)));
        }
        if !dtypes.contains(&self.dtype) {
            let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
            return Err(Error::DType {
                param: param.into(),
                expected: names.join(" or "),
                got: self.dtype.name().into(),
            });
        }
        if self.device != device {
            return Err(Error::invalid(param, format!("memory on CUDA device {device}, got device {}", self.device)));
        }
        if self.numel() > 0 && self.ptr == 0 {
            return Err(Error::NullPointer { param: param.into() });
        }
        if !self.ptr.is_multiple_of(self.dtype.size() as u64) {
            return Err(Error::invalid(param, format!("an address aligned to {} bytes", self.dtype.size())));
        }
        Ok(())
    }
}
