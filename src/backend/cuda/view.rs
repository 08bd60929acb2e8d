//! Device twins of the CPU views: the CSR page table ([`CudaPageTable`]), one layer's paged
//! K/V ([`CudaPagedKv`]) and per-(sequence, KV head) token lists ([`CudaSelections`]).
//! Layouts and conventions are exactly the CPU ones (see `crate::kv::PageTable`,
//! `crate::kv::PagedKvLayout`, `crate::select::Selection`).

use std::sync::Arc;

use crate::attention::HeadTokens;
use crate::backend::cuda::device::{CudaDevice, Stream};
use crate::backend::cuda::memory::DeviceBuffer;
use crate::config::{validate_head_dim, validate_page_size, KeyRope};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv::{PageTableRef, PagedKvLayout};
use crate::select::Selection;

/// A batch's CSR page table in device memory (int32 `indptr[batch+1]`, `indices[nnz]`,
/// `last_page_len[batch]`, FlashInfer's convention), with `max_seq_len`, an upper bound on
/// any sequence's length that sizes split-K grids without reading the table back.
pub struct CudaPageTable {
    indptr: u64,
    indices: u64,
    last_page_len: u64,
    batch: usize,
    max_seq_len: usize,
    device: usize,
    /// Per-sequence lengths when the table came from the host.
    seq_lens: Option<Vec<usize>>,
    /// (page_size, num_pages) the table was validated against on upload.
    validated_for: Option<(usize, usize)>,
    _owned: Vec<DeviceBuffer>,
}

impl std::fmt::Debug for CudaPageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPageTable").field("batch", &self.batch).field("max_seq_len", &self.max_seq_len).finish()
    }
}

impl CudaPageTable {
    /// Validate a host table against a pool of `num_pages` pages of `page_size` and copy it
    /// to the device (not graph-capturable: it uploads).
    pub fn upload(
        dev: &Arc<CudaDevice>,
        table: PageTableRef,
        page_size: usize,
        num_pages: usize,
        stream: &Stream,
    ) -> Result<Self> {
        table.validate(page_size, num_pages)?;
        let batch = table.batch_size();
        let seq_lens: Vec<usize> = (0..batch).map(|b| table.seq_len(b, page_size)).collect();
        let ip = DeviceBuffer::from_slice(dev, table.indptr, stream)?;
        // Never a zero-length allocation: kernels may form (unread) addresses into it.
        let ix =
            DeviceBuffer::from_slice(dev, if table.indices.is_empty() { &[0i32][..] } else { table.indices }, stream)?;
        let lp = DeviceBuffer::from_slice(
            dev,
            if table.last_page_len.is_empty() { &[0i32][..] } else { table.last_page_len },
            stream,
        )?;
        Ok(CudaPageTable {
            indptr: ip.ptr(),
            indices: ix.ptr(),
            last_page_len: lp.ptr(),
            batch,
            max_seq_len: seq_lens.iter().copied().max().unwrap_or(0),
            device: dev.ordinal(),
            seq_lens: Some(seq_lens),
            validated_for: Some((page_size, num_pages)),
            _owned: vec![ip, ix, lp],
        })
    }

    /// A table the engine keeps in device memory (int32 arrays, CSR invariants as above).
    ///
    /// # Safety
    /// 1. `indptr` (batch + 1 entries), `indices` (`indptr[batch]` entries) and `last_page_len`
    ///    (batch entries) are device addresses of int32 arrays on device `device`, valid and
    ///    unchanged while kernels reading them run;
    /// 2. the arrays satisfy the CSR invariants of `crate::kv::PageTable` for the pool of the
    ///    view they are used with (page ids below its `num_pages`);
    /// 3. no sequence holds more than `max_seq_len` tokens.
    pub unsafe fn from_device(
        indptr: u64,
        indices: u64,
        last_page_len: u64,
        batch: usize,
        max_seq_len: usize,
        device: usize,
    ) -> Result<Self> {
        if batch > 0 {
            for (name, p) in [("indptr", indptr), ("indices", indices), ("last_page_len", last_page_len)] {
                if p == 0 {
                    return Err(Error::NullPointer { param: name.into() });
                }
                if p % 4 != 0 {
                    return Err(Error::invalid(name, "an address aligned to 4 bytes"));
                }
            }
        }
        if max_seq_len > i32::MAX as usize {
            return Err(Error::out_of_range("max_seq_len", max_seq_len as i64, format!("0..={}", i32::MAX)));
        }
        Ok(CudaPageTable {
            indptr,
            indices,
            last_page_len,
            batch,
            max_seq_len,
            device,
            seq_lens: None,
            validated_for: None,
            _owned: Vec::new(),
        })
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }
    /// Upper bound on any sequence's length.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
    /// Sequence lengths, when the table was uploaded from the host.
    pub fn seq_lens(&self) -> Option<&[usize]> {
        self.seq_lens.as_deref()
    }
    pub fn device(&self) -> usize {
        self.device
    }
    /// Device addresses (indptr, indices, last_page_len).
    pub fn device_ptrs(&self) -> (u64, u64, u64) {
        (self.indptr, self.indices, self.last_page_len)
    }
}

/// Where one layer's key bounds live: `[page][head][min | max][head_dim]` elements of the
/// cache dtype (the CPU `KeyBoundsRef` layout), for every page of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBoundsLayout {
    pub ptr: u64,
}

/// One layer's paged K/V in device memory plus a device page table: what decode reads.
/// The device twin of [`crate::PagedKv`], with the same layout (`PagedKvLayout`) and
/// position conventions (`positions[page * page_size + slot]`, int32; without them a
/// token's position is its index).
#[derive(Clone, Copy)]
pub struct CudaPagedKv<'a> {
    k: u64,
    v: u64,
    layout: PagedKvLayout,
    table: &'a CudaPageTable,
    positions: Option<u64>,
    key_bounds: Option<KeyBoundsLayout>,
    key_rope: KeyRope,
    device: usize,
}

impl<'a> CudaPagedKv<'a> {
    /// A view over device memory.
    ///
    /// # Safety
    /// 1. `k` and `v` are device addresses on device `table.device()` valid for every element
    ///    the layout reaches (pages `0..num_pages`, all slots, heads, channels);
    /// 2. nobody writes slots this view's table reaches while kernels reading them run
    ///    (ordering by stream is the caller's job).
    pub unsafe fn from_raw(k: u64, v: u64, layout: PagedKvLayout, table: &'a CudaPageTable) -> Result<Self> {
        validate_page_size(layout.page_size)?;
        validate_head_dim(layout.head_dim)?;
        if layout.num_kv_heads == 0 {
            return Err(Error::invalid("num_kv_heads", "at least 1"));
        }
        if layout.num_pages > 0 {
            for (name, p) in [("k", k), ("v", v)] {
                if p == 0 {
                    return Err(Error::NullPointer { param: name.into() });
                }
                if p % layout.dtype.size() as u64 != 0 {
                    return Err(Error::invalid(name, format!("an address aligned to {} bytes", layout.dtype.size())));
                }
            }
        }
        if layout.num_pages > i32::MAX as usize {
            return Err(Error::out_of_range("num_pages", layout.num_pages as i64, format!("0..={}", i32::MAX)));
        }
        if let Some((ps, np)) = table.validated_for {
            if ps != layout.page_size || np > layout.num_pages {
                return Err(Error::invalid(
                    "table",
                    format!(
                        "a page table checked for this memory (page_size {}, {} pages); it was checked for page_size {ps} and {np} pages",
                        layout.page_size, layout.num_pages
                    ),
                ));
            }
        }
        Ok(CudaPagedKv {
            k,
            v,
            layout,
            table,
            positions: None,
            key_bounds: None,
            key_rope: KeyRope::PostRope,
            device: table.device(),
        })
    }

    /// Attach slot positions: int32 `[num_pages * page_size]` in device memory.
    ///
    /// # Safety
    /// `positions` is a device address valid for `num_pages * page_size` int32 values while
    /// kernels reading this view run.
    pub unsafe fn with_positions(mut self, positions: u64) -> Result<Self> {
        if positions == 0 {
            return Err(Error::NullPointer { param: "positions".into() });
        }
        self.positions = Some(positions);
        Ok(self)
    }

    /// Attach the layer's key bounds (see [`KeyBoundsLayout`]).
    ///
    /// # Safety
    /// `bounds.ptr` is valid for `num_pages * num_kv_heads * 2 * head_dim` elements of the
    /// cache dtype.
    pub unsafe fn with_key_bounds(mut self, bounds: KeyBoundsLayout) -> Result<Self> {
        if bounds.ptr == 0 {
            return Err(Error::NullPointer { param: "key_bounds".into() });
        }
        self.key_bounds = Some(bounds);
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
    pub fn table(&self) -> &'a CudaPageTable {
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
    pub fn batch_size(&self) -> usize {
        self.table.batch_size()
    }
    pub fn key_rope(&self) -> KeyRope {
        self.key_rope
    }
    pub fn device(&self) -> usize {
        self.device
    }
    /// Device addresses of K and V.
    pub fn kv_ptrs(&self) -> (u64, u64) {
        (self.k, self.v)
    }
    /// Device address of the slot positions, if attached.
    pub fn positions_ptr(&self) -> Option<u64> {
        self.positions
    }
    /// The layer's key bounds, if attached.
    pub fn key_bounds(&self) -> Option<KeyBoundsLayout> {
        self.key_bounds
    }
}

/// Token lists per (sequence, KV head) in device memory: CSR over `batch * num_kv_heads`
/// lists, `indptr[b * num_kv_heads + h] .. indptr[b * num_kv_heads + h + 1]` indexing
/// `indices` (int32, strictly ascending token indices of sequence `b`). The batched device
/// form of [`Selection`]; selection kernels write it, sparse decode reads it.
/// `max_per_head` bounds every list's length (it sizes split-K grids).
pub struct CudaSelections {
    indptr: u64,
    indices: u64,
    batch: usize,
    num_kv_heads: usize,
    max_per_head: usize,
    device: usize,
    _owned: Vec<DeviceBuffer>,
}

impl std::fmt::Debug for CudaSelections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaSelections")
            .field("batch", &self.batch)
            .field("num_kv_heads", &self.num_kv_heads)
            .field("max_per_head", &self.max_per_head)
            .finish()
    }
}

impl CudaSelections {
    /// Copy per-sequence selections (all with `num_kv_heads` heads) to the device
    /// (not graph-capturable: it uploads).
    pub fn upload<S: HeadTokens>(
        dev: &Arc<CudaDevice>,
        selections: &[S],
        num_kv_heads: usize,
        stream: &Stream,
    ) -> Result<Self> {
        let mut indptr = vec![0i32];
        let mut indices: Vec<i32> = Vec::new();
        let mut max_per_head = 0;
        for (b, s) in selections.iter().enumerate() {
            if s.num_kv_heads() != num_kv_heads {
                return Err(Error::shape(
                    format!("selections[{b}]"),
                    format!("{num_kv_heads} KV heads"),
                    format!("{}", s.num_kv_heads()),
                ));
            }
            for h in 0..num_kv_heads {
                let l = s.head(h);
                max_per_head = max_per_head.max(l.len());
                indices.extend(l.iter().map(|&t| t as i32));
                if indices.len() > i32::MAX as usize {
                    return Err(Error::invalid("selections", "fewer than 2^31 selected tokens in all"));
                }
                indptr.push(indices.len() as i32);
            }
        }
        if indices.is_empty() {
            indices.push(0);
        }
        let ip = DeviceBuffer::from_slice(dev, &indptr, stream)?;
        let ix = DeviceBuffer::from_slice(dev, &indices, stream)?;
        Ok(CudaSelections {
            indptr: ip.ptr(),
            indices: ix.ptr(),
            batch: selections.len(),
            num_kv_heads,
            max_per_head,
            device: dev.ordinal(),
            _owned: vec![ip, ix],
        })
    }

    /// Room for `batch * num_kv_heads` lists of at most `capacity_per_head` tokens each,
    /// for a selection kernel to fill: it writes `indptr` (CSR: the lists lie back to back)
    /// and `indices`. `indptr` starts zeroed, so every list starts empty.
    pub fn alloc(
        dev: &Arc<CudaDevice>,
        batch: usize,
        num_kv_heads: usize,
        capacity_per_head: usize,
        stream: &Stream,
    ) -> Result<Self> {
        let lists = batch * num_kv_heads;
        let total = lists.checked_mul(capacity_per_head).filter(|&n| n <= i32::MAX as usize).ok_or_else(|| {
            Error::invalid("capacity_per_head", "batch * num_kv_heads * capacity_per_head below 2^31")
        })?;
        let ip = DeviceBuffer::zeroed(dev, (lists + 1) * 4, stream)?;
        let ix = DeviceBuffer::alloc(dev, total.max(1) * 4)?;
        Ok(CudaSelections {
            indptr: ip.ptr(),
            indices: ix.ptr(),
            batch,
            num_kv_heads,
            max_per_head: capacity_per_head,
            device: dev.ordinal(),
            _owned: vec![ip, ix],
        })
    }

    /// Lists the engine keeps in device memory.
    ///
    /// # Safety
    /// 1. `indptr` (`batch * num_kv_heads + 1` int32, non-decreasing, from 0) and `indices`
    ///    (int32) are valid device addresses on `device` while kernels reading them run;
    /// 2. each list is strictly ascending with tokens below its sequence's length, and no
    ///    list is longer than `max_per_head`.
    pub unsafe fn from_device(
        indptr: u64,
        indices: u64,
        batch: usize,
        num_kv_heads: usize,
        max_per_head: usize,
        device: usize,
    ) -> Result<Self> {
        for (name, p) in [("indptr", indptr), ("indices", indices)] {
            if p == 0 {
                return Err(Error::NullPointer { param: name.into() });
            }
            if p % 4 != 0 {
                return Err(Error::invalid(name, "an address aligned to 4 bytes"));
            }
        }
        Ok(CudaSelections { indptr, indices, batch, num_kv_heads, max_per_head, device, _owned: Vec::new() })
    }

    pub fn batch_size(&self) -> usize {
        self.batch
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Upper bound on every list's length.
    pub fn max_per_head(&self) -> usize {
        self.max_per_head
    }
    pub fn device(&self) -> usize {
        self.device
    }
    /// Device addresses (indptr, indices).
    pub fn device_ptrs(&self) -> (u64, u64) {
        (self.indptr, self.indices)
    }

    /// Read the lists back as one [`Selection`] per sequence (`seq_lens[b]` tokens each);
    /// waits for `stream`.
    pub fn to_host(&self, seq_lens: &[usize], stream: &Stream) -> Result<Vec<Selection>> {
        if seq_lens.len() != self.batch {
            return Err(Error::shape("seq_lens", format!("[{}]", self.batch), format!("[{}]", seq_lens.len())));
        }
        let lists = self.batch * self.num_kv_heads;
        let mut indptr = vec![0i32; lists + 1];
        stream.bind()?;
        let copy = |dst: &mut [i32], src: u64| -> Result<()> {
            if dst.is_empty() {
                return Ok(());
            }
            // SAFETY: the addresses hold at least these many values (constructor contracts).
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, stream.raw()) }
                .map_err(crate::backend::cuda::device::driver_err("copying selections from the device"))?;
            stream.synchronize()
        };
        copy(&mut indptr, self.indptr)?;
        let total = indptr[lists].max(0) as usize;
        let mut indices = vec![0i32; total];
        copy(&mut indices, self.indices)?;
        (0..self.batch)
            .map(|b| {
                let h = self.num_kv_heads;
                let base = indptr[b * h];
                let ip: Vec<u32> = (0..=h).map(|i| (indptr[b * h + i] - base) as u32).collect();
                let ix: Vec<u32> =
                    indices[base as usize..indptr[(b + 1) * h] as usize].iter().map(|&t| t as u32).collect();
                Selection::from_csr(seq_lens[b], ip, ix)
            })
            .collect()
    }
}
