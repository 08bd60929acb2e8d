//! Borrowed, strided tensor views: the DLPack-style descriptors (data, dtype, shape,
//! strides in elements) that every surface hands to kvsieve. Strides are non-negative;
//! the innermost dimension may have any stride, so row-sliced inputs need no copy.

use crate::dtype::{load_f32, store_f32, DType, Element};
use crate::error::{Error, Result};

fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Number of elements the view must be able to reach: 1 + the largest offset, 0 if empty;
/// `None` if that does not fit in `usize`.
fn extent(shape: &[usize], strides: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().zip(strides).try_fold(1usize, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)))
}

/// Row-major strides of a contiguous tensor.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn check_layout(param: &str, len_bytes: usize, dtype: DType, shape: &[usize], strides: &[usize]) -> Result<()> {
    if shape.len() != strides.len() {
        return Err(Error::shape(
            format!("{param}.strides"),
            format!("{} strides (one per dimension)", shape.len()),
            format!("{} strides", strides.len()),
        ));
    }
    let need = extent(shape, strides)
        .and_then(|e| e.checked_mul(dtype.size()))
        .ok_or_else(|| Error::invalid(param, "a tensor whose extent fits in memory"))?;
    if need > len_bytes {
        return Err(Error::shape(
            param,
            format!("a buffer of at least {need} bytes for shape {} and strides {:?}", fmt_shape(shape), strides),
            format!("{len_bytes} bytes"),
        ));
    }
    Ok(())
}

/// A read-only tensor view.
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    data: &'a [u8],
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl<'a> TensorView<'a> {
    /// A contiguous (row-major) view over typed data.
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), T::DTYPE, shape, &contiguous_strides(shape))
    }

    /// A strided view over typed data; strides are in elements.
    pub fn strided<T: Element>(data: &'a [T], shape: &[usize], strides: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), T::DTYPE, shape, strides)
    }

    /// A strided view over raw native-endian bytes holding `dtype` elements.
    pub fn from_bytes(data: &'a [u8], dtype: DType, shape: &[usize], strides: &[usize]) -> Result<Self> {
        check_layout("tensor", data.len(), dtype, shape, strides)?;
        Ok(TensorView { data, dtype, shape: shape.to_vec(), strides: strides.to_vec() })
    }

    /// A view over memory described by a raw pointer.
    ///
    /// # Safety
    /// 1. `ptr` is valid for reads of every element reachable through `shape` and `strides`
    ///    (offsets in elements of `dtype`) for the lifetime `'a`;
    /// 2. that memory is not written by anyone while the view lives.
    pub unsafe fn from_raw(ptr: *const u8, dtype: DType, shape: &[usize], strides: &[usize]) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::shape(
                "tensor.strides",
                format!("{} strides", shape.len()),
                format!("{}", strides.len()),
            ));
        }
        let n = extent(shape, strides)
            .and_then(|e| e.checked_mul(dtype.size()))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid("tensor", "a tensor whose extent fits in memory"))?;
        if n > 0 && ptr.is_null() {
            return Err(Error::NullPointer { param: "tensor.data".into() });
        }
        let data = if n == 0 { &[][..] } else { std::slice::from_raw_parts(ptr, n) };
        Self::from_bytes(data, dtype, shape, strides)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Element offset of a multi-index.
    #[inline(always)]
    pub fn offset(&self, index: &[usize]) -> usize {
        index.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
    }

    /// The sub-tensor at index `i` of the first dimension, keeping that dimension (size 1).
    pub fn narrow0(&self, i: usize) -> Result<TensorView<'a>> {
        let n = self.shape.first().copied().unwrap_or(0);
        if i >= n {
            return Err(Error::out_of_range("index", i as i64, format!("0..{n}")));
        }
        let start = i * self.strides[0] * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = 1;
        TensorView::from_bytes(&self.data[start..], self.dtype, &shape, &self.strides)
    }

    /// Element at a multi-index, converted to f32.
    #[inline(always)]
    pub fn get(&self, index: &[usize]) -> f32 {
        load_f32(self.data, self.dtype, self.offset(index))
    }

    /// Element at an element offset, converted to f32.
    #[inline(always)]
    pub fn get_at(&self, offset: usize) -> f32 {
        load_f32(self.data, self.dtype, offset)
    }

    /// Check the shape, naming the parameter. `None` in `expected` accepts any size.
    pub fn expect_shape(&self, param: &str, expected: &[Option<usize>]) -> Result<()> {
        let ok = self.shape.len() == expected.len()
            && self.shape.iter().zip(expected).all(|(&got, want)| want.is_none_or(|w| w == got));
        if ok {
            return Ok(());
        }
        let exp: Vec<String> = expected.iter().map(|e| e.map_or("*".to_string(), |v| v.to_string())).collect();
        Err(Error::shape(param, format!("[{}]", exp.join(", ")), fmt_shape(&self.shape)))
    }

    /// Copy the innermost row at `index` (all but the last dimension) into `out` as f32.
    pub fn read_row(&self, index: &[usize], out: &mut [f32]) {
        let base = self.offset(index);
        let s = *self.strides.last().unwrap_or(&1);
        for (j, o) in out.iter_mut().enumerate() {
            *o = load_f32(self.data, self.dtype, base + j * s);
        }
    }
}

/// A writable tensor view.
#[derive(Debug)]
pub struct TensorViewMut<'a> {
    data: &'a mut [u8],
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl<'a> TensorViewMut<'a> {
    pub fn new<T: Element>(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice_mut(data), T::DTYPE, shape, &contiguous_strides(shape))
    }

    pub fn strided<T: Element>(data: &'a mut [T], shape: &[usize], strides: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice_mut(data), T::DTYPE, shape, strides)
    }

    pub fn from_bytes(data: &'a mut [u8], dtype: DType, shape: &[usize], strides: &[usize]) -> Result<Self> {
        check_layout("tensor", data.len(), dtype, shape, strides)?;
        Ok(TensorViewMut { data, dtype, shape: shape.to_vec(), strides: strides.to_vec() })
    }

    /// # Safety
    /// 1. `ptr` is valid for reads and writes of every element reachable through `shape`
    ///    and `strides` for the lifetime `'a`;
    /// 2. nothing else reads or writes that memory while the view lives.
    pub unsafe fn from_raw(ptr: *mut u8, dtype: DType, shape: &[usize], strides: &[usize]) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::shape(
                "tensor.strides",
                format!("{} strides", shape.len()),
                format!("{}", strides.len()),
            ));
        }
        let n = extent(shape, strides)
            .and_then(|e| e.checked_mul(dtype.size()))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| Error::invalid("tensor", "a tensor whose extent fits in memory"))?;
        if n > 0 && ptr.is_null() {
            return Err(Error::NullPointer { param: "tensor.data".into() });
        }
        let data = if n == 0 { &mut [][..] } else { std::slice::from_raw_parts_mut(ptr, n) };
        Self::from_bytes(data, dtype, shape, strides)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView { data: self.data, dtype: self.dtype, shape: self.shape.clone(), strides: self.strides.clone() }
    }

    #[inline(always)]
    pub fn offset(&self, index: &[usize]) -> usize {
        index.iter().zip(&self.strides).map(|(i, s)| i * s).sum()
    }

    #[inline(always)]
    pub fn set(&mut self, index: &[usize], x: f32) {
        let o = self.offset(index);
        store_f32(self.data, self.dtype, o, x);
    }

    /// Write `row` into the innermost row at `index` (all but the last dimension).
    pub fn write_row(&mut self, index: &[usize], row: &[f32]) {
        let base = self.offset(index);
        let s = *self.strides.last().unwrap_or(&1);
        for (j, &x) in row.iter().enumerate() {
            store_f32(self.data, self.dtype, base + j * s, x);
        }
    }

    pub fn expect_shape(&self, param: &str, expected: &[Option<usize>]) -> Result<()> {
        self.as_view().expect_shape(param, expected)
    }
}
