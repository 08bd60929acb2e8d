//! Stored rows (f32, f16, bf16, native endian) converted to f32 in bulk. Single elements go
//! through [`crate::dtype::load_f32`] / [`crate::dtype::store_f32`].

use half::{bf16, f16};

use crate::dtype::{load_f32, DType};

/// Read the first `out.len()` elements of a byte buffer holding `dtype` values as f32 (the
/// half crate's converters, which use F16C where the CPU has it, for aligned f16 / bf16).
#[inline]
pub(crate) fn load_row(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = out.len();
    match dtype {
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(&bytes[..n * 2]) {
            Ok(h) => h.convert_to_f32_slice(out),
            Err(_) => out.iter_mut().enumerate().for_each(|(i, o)| *o = load_f32(bytes, dtype, i)),
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(&bytes[..n * 2]) {
            Ok(h) => h.convert_to_f32_slice(out),
            Err(_) => out.iter_mut().enumerate().for_each(|(i, o)| *o = load_f32(bytes, dtype, i)),
        },
        DType::F32 => out.iter_mut().enumerate().for_each(|(i, o)| *o = load_f32(bytes, dtype, i)),
    }
}
