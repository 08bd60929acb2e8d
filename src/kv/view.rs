//! `PagedKv`: a read-only view of one layer's paged K and V plus a CSR page table.
//! It is what attention reads. A [`crate::KvCache`] hands one out over its own pages;
//! an engine that owns its KV memory (vLLM-style) builds one over its buffers, with no copy.

use std::marker::PhantomData;

use crate::config::{validate_head_dim, validate_page_size, KeyRope, PageLayout};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kv::table::PageTableRef;

/// Shape and element strides of external paged KV memory for one layer.
///
/// Element `(page, slot, head, channel)` of K lives at
/// `k + (page * k_strides[0] + slot * k_strides[1] + head * k_strides[2] + channel) * dtype.size()`
/// bytes (likewise V with `v_strides`). The channel stride is 1.
#[derive(Debug, Clone, Copy)]
pub struct PagedKvLayout {
    pub dtype: DType,
    /// Pages in the memory (page ids in the table must be below this).
    pub num_pages: usize,
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `[page, slot, head]` strides of K, in elements.
    pub k_strides: [usize; 3],
    /// `[page, slot, head]` strides of V, in elements.
    pub v_strides: [usize; 3],
}

impl PagedKvLayout {
    /// Dense packing in the given in-page layout, K and V in separate buffers.
    pub fn packed(
        dtype: DType,
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        layout: PageLayout,
    ) -> Self {
        let (h, d, p) = (num_kv_heads, head_dim, page_size);
        let s = match layout {
            PageLayout::Nhd => [p * h * d, h * d, d],
            PageLayout::Hnd => [p * h * d, d, p * d],
        };
        PagedKvLayout { dtype, num_pages, page_size, num_kv_heads, head_dim, k_strides: s, v_strides: s }
    }

    /// Elements a buffer must hold for this layout with the given strides (`None` if that
    /// overflows `usize`).
    fn extent(&self, s: [usize; 3]) -> Option<usize> {
        if self.num_pages == 0 {
            return Some(0);
        }
        let parts = [(self.num_pages - 1, s[0]), (self.page_size - 1, s[1]), (self.num_kv_heads - 1, s[2])];
        parts.iter().try_fold(self.head_dim, |acc, &(n, st)| n.checked_mul(st).and_then(|x| acc.checked_add(x)))
    }

    fn validate(&self) -> Result<()> {
        validate_page_size(self.page_size)?;
        validate_head_dim(self.head_dim)?;
        if self.num_kv_heads == 0 {
            return Err(Error::invalid("num_kv_heads", "at least 1"));
        }
        Ok(())
    }
}

/// A validated, read-only view of one layer's paged KV memory and a batch's page table.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    k: *const u8,
    v: *const u8,
    layout: PagedKvLayout,
    table: PageTableRef<'a>,
    /// Original position of each slot, indexed `page * page_size + slot`.
    positions: Option<&'a [i32]>,
    key_rope: KeyRope,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a PagedKv only reads memory that its constructor's contract keeps alive and
// unwritten for 'a; reading from several threads at once is fine.
unsafe impl Send for PagedKv<'_> {}
unsafe impl Sync for PagedKv<'_> {}

impl<'a> PagedKv<'a> {
    /// A view over K and V held in slices (checked against the layout's extent).
    pub fn new<T: Element>(k: &'a [T], v: &'a [T], layout: PagedKvLayout, table: PageTableRef<'a>) -> Result<Self> {
        if layout.dtype != T::DTYPE {
            return Err(Error::DType {
                param: "k".into(),
                expected: layout.dtype.name().into(),
                got: T::DTYPE.name().into(),
            });
        }
        layout.validate()?;
        for (name, buf, s) in [("k", k.len(), layout.k_strides), ("v", v.len(), layout.v_strides)] {
            let need = layout.extent(s).ok_or_else(|| Error::invalid(name, "a layout whose extent fits in memory"))?;
            if buf < need {
                return Err(Error::shape(name, format!("at least {need} elements for the layout"), format!("{buf}")));
            }
        }
        // SAFETY: extents checked above; the slices are borrowed for 'a.
        unsafe { Self::from_raw(k.as_ptr() as *const u8, v.as_ptr() as *const u8, layout, table) }
    }

    /// A view over engine-owned memory given by raw pointers.
    ///
    /// # Safety
    /// 1. `k` and `v` are valid for reads of every element the layout reaches
    ///    (pages `0..num_pages`, all slots, heads and channels) for `'a`;
    /// 2. nobody writes the slots this view's table reaches while the view lives;
    /// 3. the pointers are aligned to the dtype's size.
    pub unsafe fn from_raw(k: *const u8, v: *const u8, layout: PagedKvLayout, table: PageTableRef<'a>) -> Result<Self> {
        layout.validate()?;
        if layout.num_pages > 0 {
            if k.is_null() {
                return Err(Error::NullPointer { param: "k".into() });
            }
            if v.is_null() {
                return Err(Error::NullPointer { param: "v".into() });
            }
            let align = layout.dtype.size();
            for (name, p) in [("k", k), ("v", v)] {
                if !(p as usize).is_multiple_of(align) {
                    return Err(Error::invalid(name, format!("a pointer aligned to {align} bytes")));
                }
            }
            for (name, s) in [("k_strides", layout.k_strides), ("v_strides", layout.v_strides)] {
                if layout.extent(s).and_then(|e| e.checked_mul(align)).is_none_or(|b| b > isize::MAX as usize) {
                    return Err(Error::invalid(name, "strides whose extent fits in memory"));
                }
            }
        }
        table.validate(layout.page_size, layout.num_pages)?;
        Ok(PagedKv { k, v, layout, table, positions: None, key_rope: KeyRope::PostRope, _borrow: PhantomData })
    }

    /// Attach the original position of every slot (`page * page_size + slot` indexing).
    /// Without them, a token's position is its index in the sequence.
    pub fn with_positions(mut self, positions: &'a [i32]) -> Result<Self> {
        let need = self.layout.num_pages * self.layout.page_size;
        if positions.len() < need {
            return Err(Error::shape(
                "positions",
                format!("at least num_pages * page_size = {need} entries"),
                format!("{}", positions.len()),
            ));
        }
        self.positions = Some(positions);
        Ok(self)
    }

    /// Declare whether keys are stored before or after RoPE.
    pub fn with_key_rope(mut self, key_rope: KeyRope) -> Self {
        self.key_rope = key_rope;
        self
    }

    pub fn layout(&self) -> &PagedKvLayout {
        &self.layout
    }
    pub fn table(&self) -> PageTableRef<'a> {
        self.table
    }
    pub fn dtype(&self) -> DType {
        self.layout.dtype
    }
    pub fn page_size(&self) -> usize {
        self.layout.page_size
    }
    pub fn num_kv_heads(&self) -> usize {
        self.layout.num_kv_heads
    }
    pub fn head_dim(&self) -> usize {
        self.layout.head_dim
    }
    pub fn key_rope(&self) -> KeyRope {
        self.key_rope
    }
    pub fn has_positions(&self) -> bool {
        self.positions.is_some()
    }
    pub fn batch_size(&self) -> usize {
        self.table.batch_size()
    }

    /// Tokens held by sequence `b`.
    pub fn seq_len(&self, b: usize) -> usize {
        self.table.seq_len(b, self.layout.page_size)
    }

    /// Page id and slot of token `t` of sequence `b` (t < seq_len(b)).
    #[inline(always)]
    pub fn locate(&self, b: usize, t: usize) -> (usize, usize) {
        let ps = self.layout.page_size;
        let page = self.table.indices[self.table.indptr[b] as usize + t / ps] as usize;
        (page, t % ps)
    }

    /// Original position of token `t` of sequence `b`.
    #[inline(always)]
    pub fn position(&self, b: usize, t: usize) -> i32 {
        match self.positions {
            Some(p) => {
                let (page, slot) = self.locate(b, t);
                p[page * self.layout.page_size + slot]
            }
            None => t as i32,
        }
    }

    /// Pointer to the first channel of K at (page, slot, head).
    #[inline(always)]
    pub(crate) fn k_ptr(&self, page: usize, slot: usize, head: usize) -> *const u8 {
        let s = self.layout.k_strides;
        // SAFETY: in bounds for any page < num_pages, slot < page_size, head < num_kv_heads
        // by the constructor's contract; pointer arithmetic only.
        unsafe { self.k.add((page * s[0] + slot * s[1] + head * s[2]) * self.layout.dtype.size()) }
    }

    /// Pointer to the first channel of V at (page, slot, head).
    #[inline(always)]
    pub(crate) fn v_ptr(&self, page: usize, slot: usize, head: usize) -> *const u8 {
        let s = self.layout.v_strides;
        // SAFETY: as for k_ptr.
        unsafe { self.v.add((page * s[0] + slot * s[1] + head * s[2]) * self.layout.dtype.size()) }
    }

    /// Key of token `t` of sequence `b`, head `h`, as f32 (slow path, for tests and tools).
    pub fn key(&self, b: usize, t: usize, h: usize) -> Vec<f32> {
        let (page, slot) = self.locate(b, t);
        read_row(self.k_ptr(page, slot, h), self.layout.dtype, self.layout.head_dim)
    }

    /// Value of token `t` of sequence `b`, head `h`, as f32 (slow path, for tests and tools).
    pub fn value(&self, b: usize, t: usize, h: usize) -> Vec<f32> {
        let (page, slot) = self.locate(b, t);
        read_row(self.v_ptr(page, slot, h), self.layout.dtype, self.layout.head_dim)
    }
}

fn read_row(p: *const u8, dtype: DType, n: usize) -> Vec<f32> {
    // SAFETY: p points at n valid elements of `dtype` (PagedKv contract).
    let bytes = unsafe { std::slice::from_raw_parts(p, n * dtype.size()) };
    let mut out = vec![0f32; n];
    crate::cpu::convert::load_row(bytes, dtype, &mut out);
    out
}
