//! `tensor.h`: tensor descriptors laid out exactly like DLPack's `DLTensor`, `DLDevice` and
//! `DLDataType`, so that a `DLManagedTensor`'s `dl_tensor` can be passed as is, and their
//! validation into [`TensorView`]s.

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

use kvsieve::dtype::DType;
use kvsieve::error::{Error, Result};
use kvsieve::tensor::{contiguous_strides, TensorView, TensorViewMut};

use super::args::{non_null, read_struct, slice, Region};

/// DLPack `kDLCPU`.
pub const DEVICE_CPU: i32 = 1;

/// DLPack `kDLFloat`.
pub const DTYPE_CODE_FLOAT: u8 = 2;

/// DLPack `kDLBfloat`.
pub const DTYPE_CODE_BFLOAT: u8 = 4;

/// DLPack's `DLDevice`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_device_t {
    pub device_type: i32,
    pub device_id: i32,
}

/// DLPack's `DLDataType`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvsieve_dtype_t {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

/// DLPack's `DLTensor`. Shape and strides count elements; NULL strides mean row-major.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvsieve_tensor_t {
    pub data: *mut c_void,
    pub device: kvsieve_device_t,
    pub ndim: i32,
    pub dtype: kvsieve_dtype_t,
    pub shape: *const i64,
    pub strides: *const i64,
    pub byte_offset: u64,
}

const _: () = {
    assert!(size_of::<kvsieve_device_t>() == 8 && align_of::<kvsieve_device_t>() == 4);
    assert!(size_of::<kvsieve_dtype_t>() == 4 && align_of::<kvsieve_dtype_t>() == 2);
    assert!(offset_of!(kvsieve_dtype_t, bits) == 1 && offset_of!(kvsieve_dtype_t, lanes) == 2);
    assert!(offset_of!(kvsieve_device_t, device_id) == 4);
};

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_tensor_t>() == 48 && align_of::<kvsieve_tensor_t>() == 8);
    assert!(offset_of!(kvsieve_tensor_t, data) == 0);
    assert!(offset_of!(kvsieve_tensor_t, device) == 8);
    assert!(offset_of!(kvsieve_tensor_t, ndim) == 16);
    assert!(offset_of!(kvsieve_tensor_t, dtype) == 20);
    assert!(offset_of!(kvsieve_tensor_t, shape) == 24);
    assert!(offset_of!(kvsieve_tensor_t, strides) == 32);
    assert!(offset_of!(kvsieve_tensor_t, byte_offset) == 40);
};

impl kvsieve_dtype_t {
    /// The DLPack description of a kvsieve dtype.
    pub fn from_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 32, lanes: 1 },
            DType::F16 => kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 16, lanes: 1 },
            DType::BF16 => kvsieve_dtype_t { code: DTYPE_CODE_BFLOAT, bits: 16, lanes: 1 },
        }
    }

    /// The kvsieve dtype this describes; `DType` error naming `param` otherwise.
    pub(crate) fn to_dtype(self, param: &str) -> Result<DType> {
        match (self.code, self.bits, self.lanes) {
            (DTYPE_CODE_FLOAT, 32, 1) => Ok(DType::F32),
            (DTYPE_CODE_FLOAT, 16, 1) => Ok(DType::F16),
            (DTYPE_CODE_BFLOAT, 16, 1) => Ok(DType::BF16),
            (code, bits, lanes) => Err(Error::DType {
                param: param.into(),
                expected:
                    "float32, float16 or bfloat16 (DLPack code 2 with bits 32 or 16, or code 4 with bits 16; lanes 1)"
                        .into(),
                got: format!("code {code}, bits {bits}, lanes {lanes}"),
            }),
        }
    }
}

/// Fail unless the device is the CPU, naming `param`.
pub(crate) fn check_device(device: kvsieve_device_t, param: &str) -> Result<()> {
    if device.device_type != DEVICE_CPU {
        return Err(Error::Unsupported(format!(
            "`{param}`: device_type {} (this function takes host memory, kDLCPU = 1; device memory goes to the kvsieve_cuda_* functions)",
            device.device_type
        )));
    }
    Ok(())
}

/// A validated tensor descriptor.
#[derive(Debug)]
pub(crate) struct Tensor {
    ptr: *mut u8,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    bytes: usize,
    name: String,
}

fn fmt_i64s(v: &[i64]) -> String {
    let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl Tensor {
    /// Validate a descriptor named `name` whose dimensions are named `dims` (their count is
    /// the required `ndim`): device, dtype, shape and strides (non-negative), the data
    /// pointer (NULL only for an empty tensor), and an extent that fits in memory.
    ///
    /// # Safety
    /// 1. `t` is NULL or points at a readable descriptor;
    /// 2. when `ndim` equals `dims.len()`, `shape` (and `strides`, unless NULL) point at
    ///    `ndim` readable values.
    pub unsafe fn parse(t: *const kvsieve_tensor_t, name: &str, dims: &[&str]) -> Result<Tensor> {
        let t = read_struct(t, name)?;
        check_device(t.device, &format!("{name}.device"))?;
        let dtype = t.dtype.to_dtype(name)?;
        let want = format!("[{}]", dims.join(", "));
        if t.ndim < 0 || t.ndim as usize != dims.len() {
            return Err(Error::shape(name, want, format!("{} dimensions", t.ndim)));
        }
        let nd = dims.len();
        let raw_shape: &[i64] = if nd == 0 {
            &[]
        } else {
            non_null(t.shape, &format!("{name}.shape"))?;
            slice(t.shape, nd, &format!("{name}.shape"))?
        };
        if raw_shape.iter().any(|&d| d < 0) {
            return Err(Error::shape(name, want, fmt_i64s(raw_shape)));
        }
        let shape: Vec<usize> = raw_shape.iter().map(|&d| d as usize).collect();
        let strides = if t.strides.is_null() {
            contiguous_strides(&shape)
        } else {
            let raw = slice(t.strides, nd, &format!("{name}.strides"))?;
            if raw.iter().any(|&s| s < 0) {
                return Err(Error::shape(
                    format!("{name}.strides"),
                    "non-negative strides (in elements)",
                    fmt_i64s(raw),
                ));
            }
            raw.iter().map(|&s| s as usize).collect()
        };
        let too_big = || Error::invalid(name, "a tensor whose extent fits in memory");
        let elems = if shape.contains(&0) {
            0
        } else {
            let mut last = 0usize;
            for (&d, &s) in shape.iter().zip(&strides) {
                last = (d - 1).checked_mul(s).and_then(|x| x.checked_add(last)).ok_or_else(too_big)?;
            }
            last.checked_add(1).ok_or_else(too_big)?
        };
        let bytes = elems.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(too_big)?;
        if bytes > 0 && t.data.is_null() {
            return Err(Error::NullPointer { param: format!("{name}.data") });
        }
        let offset = usize::try_from(t.byte_offset)
            .map_err(|_| Error::invalid(format!("{name}.byte_offset"), "an offset that fits in memory"))?;
        let start = (t.data as usize).checked_add(offset);
        if bytes > 0 && start.and_then(|s| s.checked_add(bytes)).is_none() {
            return Err(Error::invalid(format!("{name}.byte_offset"), "an offset that fits in memory"));
        }
        let ptr = if bytes == 0 { std::ptr::null_mut() } else { (t.data as *mut u8).add(offset) };
        Ok(Tensor { ptr, dtype, shape, strides, bytes, name: name.to_string() })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The bytes the tensor spans, for overlap checks.
    pub fn region(&self) -> Region {
        Region::new(self.ptr, self.bytes, self.name.clone())
    }

    /// A read-only view.
    ///
    /// # Safety
    /// 1. the memory the descriptor reaches is readable and not written for `'a`.
    pub unsafe fn view<'a>(&self) -> Result<TensorView<'a>> {
        TensorView::from_raw(self.ptr, self.dtype, &self.shape, &self.strides)
    }

    /// A writable view.
    ///
    /// # Safety
    /// 1. the memory the descriptor reaches is readable and writable, and used by nothing
    ///    else, for `'a`.
    pub unsafe fn view_mut<'a>(&self) -> Result<TensorViewMut<'a>> {
        TensorViewMut::from_raw(self.ptr, self.dtype, &self.shape, &self.strides)
    }
}

/// A decode query of one sequence named `name`: `[num_qo_heads, head_dim]` or
/// `[1, num_qo_heads, head_dim]`.
///
/// # Safety
/// As for [`Tensor::parse`].
pub(crate) unsafe fn parse_query(q: *const kvsieve_tensor_t, name: &str) -> Result<Tensor> {
    let ndim = read_struct(q, name)?.ndim;
    if ndim == 2 {
        Tensor::parse(q, name, &["num_qo_heads", "head_dim"])
    } else {
        Tensor::parse(q, name, &["1", "num_qo_heads", "head_dim"])
    }
}
