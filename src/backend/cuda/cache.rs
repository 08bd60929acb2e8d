//! `CudaKvCache`: kvsieve-owned paged KV storage resident on a CUDA device.
//!
//! Page memory, slot positions and key bounds live on the device; the bookkeeping (page
//! pool with reference counts, sequences, copy-on-write of shared pages, which slots of each
//! page were written) stays on the host and follows [`crate::KvCache`] rule for rule, so
//! the same calls give the same page tables, positions and bounds. Page tables handed out
//! are uploaded copies ([`CudaPageTable`]); attention reads through [`CudaKvCache::layer_view`].
//!
//! Every mutating call validates its arguments before changing anything and returns when
//! its device work is done (it synchronises kvsieve's stream), so none of them is
//! graph-capturable; the attention calls over its views are. A call refused by validation
//! (bad input, out of pages) changes nothing. A device error (or a panic) after the change
//! began leaves the cache *poisoned*: every later call returns [`Error::Internal`] saying
//! so, and the cache should be dropped; it is never silently half-changed.

use std::sync::Arc;

use crate::backend::cuda::attention::{launch_append, launch_key_bounds, BoundsEntry};
use crate::backend::cuda::device::{CudaDevice, Stream};
use crate::backend::cuda::memory::{DeviceBuffer, DeviceTensor};
use crate::backend::cuda::view::{CudaPageTable, CudaPagedKv, KeyBoundsLayout};
use crate::config::CacheConfig;
use crate::dtype::{load_f32, DType};
use crate::error::{Error, Result};
use crate::kv::plan::{self, Truncate};
use crate::kv::pool::PagePool;
use crate::kv::seqs::{Sequence, Sequences};
use crate::kv::{KeepTokens, PageTable, PagedKvLayout, SeqId};
use crate::tensor::TensorView;

/// Paged K/V on a CUDA device, owned by kvsieve (see the module docs).
pub struct CudaKvCache {
    dev: Arc<CudaDevice>,
    stream: Stream,
    cfg: CacheConfig,
    pool: PagePool,
    k: Vec<DeviceBuffer>,
    v: Vec<DeviceBuffer>,
    /// Per layer `[page][head][min | max][head_dim]` (empty when bounds are off).
    bounds: Vec<DeviceBuffer>,
    /// Per layer, per page: written-slot bits (page_size <= 64 when bounds are on).
    written: Vec<Vec<u64>>,
    positions_host: Vec<i32>,
    positions: DeviceBuffer,
    seqs: Sequences,
    /// Device staging memory for uploads (slot mappings, rows, bound entries), reused:
    /// copies and kernels on the cache's stream run in order, so a later upload cannot
    /// overwrite what an earlier queued kernel still reads.
    staging: Option<DeviceBuffer>,
    /// Set while a change commits; still set if a device error or a panic interrupted one.
    poisoned: bool,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache").field("config", &self.cfg).field("device", &self.dev.ordinal()).finish()
    }
}

/// Where the K/V rows of a write come from.
enum Source<'a> {
    Host(&'a TensorView<'a>, &'a TensorView<'a>),
    Device(&'a DeviceTensor, &'a DeviceTensor),
}

impl CudaKvCache {
    /// A cache on `dev` (f16 or bf16 pages; page_size a power of two, at most 64 when key
    /// bounds are kept). Allocates all pages up front.
    pub fn new(dev: &Arc<CudaDevice>, cfg: CacheConfig) -> Result<Self> {
        cfg.validate()?;
        if !matches!(cfg.dtype, DType::F16 | DType::BF16) {
            return Err(Error::Unsupported(format!("a CUDA cache of {} pages: f16 or bf16 only", cfg.dtype)));
        }
        if !cfg.page_size.is_power_of_two() {
            return Err(Error::Unsupported(format!(
                "a CUDA cache with page_size {}: a power of two is needed",
                cfg.page_size
            )));
        }
        if cfg.track_key_bounds && cfg.page_size > 64 {
            return Err(Error::Unsupported(format!(
                "a CUDA cache with key bounds and page_size {}: at most 64",
                cfg.page_size
            )));
        }
        let stream = dev.stream().clone();
        let layer_bytes = cfg.capacity_pages * cfg.page_elems() * cfg.dtype.size();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..cfg.num_layers {
            k.push(DeviceBuffer::zeroed(dev, layer_bytes, &stream)?);
            v.push(DeviceBuffer::zeroed(dev, layer_bytes, &stream)?);
        }
        let bounds = if cfg.track_key_bounds {
            let b = cfg.capacity_pages * cfg.num_kv_heads * 2 * cfg.head_dim * cfg.dtype.size();
            (0..cfg.num_layers).map(|_| DeviceBuffer::zeroed(dev, b, &stream)).collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let positions = DeviceBuffer::zeroed(dev, cfg.capacity_pages * cfg.page_size * 4, &stream)?;
        stream.synchronize()?;
        Ok(CudaKvCache {
            dev: dev.clone(),
            stream,
            pool: PagePool::new(cfg.capacity_pages)?,
            k,
            v,
            bounds,
            written: (0..cfg.num_layers)
                .map(|_| crate::alloc::zeroed_vec(cfg.capacity_pages, "key bound slot masks"))
                .collect::<Result<_>>()?,
            positions_host: crate::alloc::zeroed_vec(cfg.capacity_pages * cfg.page_size, "slot positions")?,
            positions,
            seqs: Sequences::default(),
            staging: None,
            poisoned: false,
            cfg,
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
    /// The stream the cache's own work runs on (kvsieve's stream of the device).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.check_usable()?;
        self.seqs.get(id)
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Internal(
                "this device cache was left half-changed by a device error or a panic in an earlier call; drop it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether a device error or a panic in an earlier call left this cache unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Commit a change whose arguments were checked: an error or a panic part-way through
    /// leaves the cache poisoned (see the module docs).
    fn commit<R>(&mut self, change: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.check_usable()?;
        self.poisoned = true;
        let r = change(self)?;
        self.poisoned = false;
        Ok(r)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::out_of_range("layer", layer as i64, format!("0..{}", self.cfg.num_layers)));
        }
        Ok(())
    }

    fn page_bytes(&self) -> usize {
        self.cfg.page_elems() * self.cfg.dtype.size()
    }

    fn bounds_page_bytes(&self) -> usize {
        self.cfg.num_kv_heads * 2 * self.cfg.head_dim * self.cfg.dtype.size()
    }

    fn layout(&self) -> PagedKvLayout {
        let c = &self.cfg;
        let s = c.strides();
        PagedKvLayout {
            dtype: c.dtype,
            num_pages: c.capacity_pages,
            page_size: c.page_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            k_strides: s,
            v_strides: s,
        }
    }

    /// Wait for the queued work.
    fn flush(&mut self) -> Result<()> {
        self.stream.synchronize()
    }

    /// Copy `parts` (byte slices) to the staging memory, back to back at 256-byte aligned
    /// offsets; returns their device addresses. Growing waits for the queued work first.
    fn stage(&mut self, parts: &[&[u8]]) -> Result<Vec<u64>> {
        let offsets: Vec<usize> = parts
            .iter()
            .scan(0usize, |at, p| {
                let o = *at;
                *at += p.len().div_ceil(256) * 256;
                Some(o)
            })
            .collect();
        let need = offsets.last().map_or(0, |&o| o) + parts.last().map_or(0, |p| p.len());
        if self.staging.as_ref().is_none_or(|b| b.len() < need) {
            self.stream.synchronize()?;
            let size = need.max(self.staging.as_ref().map_or(0, |b| 2 * b.len())).max(4096);
            self.staging = Some(DeviceBuffer::alloc(&self.dev, size)?);
        }
        let buf = self.staging.as_ref().expect("allocated above");
        for (p, &o) in parts.iter().zip(&offsets) {
            buf.upload(o, p, &self.stream)?;
        }
        Ok(offsets.iter().map(|&o| buf.ptr() + o as u64).collect())
    }

    fn upload_positions(&mut self, page: usize) -> Result<()> {
        let ps = self.cfg.page_size;
        let bytes: &[u8] = bytemuck::cast_slice(&self.positions_host[page * ps..(page + 1) * ps]);
        self.positions.upload(page * ps * 4, bytes, &self.stream)
    }

    /// Queue the bound updates of one layer.
    fn run_bounds(&mut self, layer: usize, entries: &[BoundsEntry]) -> Result<()> {
        if entries.is_empty() || self.bounds.is_empty() {
            return Ok(());
        }
        let at = self.stage(&[bytemuck::cast_slice(entries)])?[0];
        // SAFETY: the entries name distinct pages of this pool with masks below page_size;
        // the bounds and key buffers cover the pool.
        unsafe {
            launch_key_bounds(
                &self.dev,
                &self.stream,
                &self.layout(),
                self.k[layer].ptr(),
                self.bounds[layer].ptr(),
                at,
                entries.len(),
            )
        }
    }

    /// Take `n` fresh pages: empty bounds and no written slot in every layer.
    fn alloc_fresh(&mut self, n: usize) -> Result<Vec<u32>> {
        let taken: Vec<(u32, bool)> = (0..n).map(|_| self.pool.alloc()).collect();
        let pages: Vec<u32> = taken.iter().map(|&(p, _)| p).collect();
        // A page handed out before may hold an earlier owner's K/V: clear it, so slots
        // appended but not yet written never show another sequence's data.
        let n = self.page_bytes();
        for &(p, reused) in &taken {
            if reused {
                for layer in 0..self.cfg.num_layers {
                    self.k[layer].memset_range(p as usize * n, n, 0, &self.stream)?;
                    self.v[layer].memset_range(p as usize * n, n, 0, &self.stream)?;
                }
            }
        }
        let entries: Vec<BoundsEntry> =
            pages.iter().map(|&p| BoundsEntry { page: p as i32, reset: 1, mask: 0 }).collect();
        for layer in 0..self.cfg.num_layers {
            for &p in &pages {
                self.written[layer][p as usize] = 0;
            }
            self.run_bounds(layer, &entries)?;
        }
        Ok(pages)
    }

    /// Zero slots `keep..page_size` of `page` (K and V of every layer, and positions; the
    /// caller uploads the positions).
    fn clear_tail(&mut self, page: usize, keep: usize) -> Result<()> {
        let (n, es) = (self.page_bytes(), self.cfg.dtype.size());
        let tail = plan::tail_rows(&self.cfg, keep);
        for layer in 0..self.cfg.num_layers {
            for buf in [&self.k[layer], &self.v[layer]] {
                for &(off, len) in &tail {
                    buf.memset_range(page * n + off * es, len * es, 0, &self.stream)?;
                }
            }
        }
        let ps = self.cfg.page_size;
        self.positions_host[page * ps + keep.min(ps)..(page + 1) * ps].fill(0);
        Ok(())
    }

    /// Copy page `src` into a fresh page keeping the first `keep` slots (the caller
    /// reserved it), dropping one reference to `src`.
    fn copy_page(&mut self, src: u32, keep: usize) -> Result<u32> {
        let (dst, _) = self.pool.alloc();
        let (s, d) = (src as usize, dst as usize);
        let n = self.page_bytes();
        for layer in 0..self.cfg.num_layers {
            for buf in [&self.k[layer], &self.v[layer]] {
                buf.copy_from(d * n, buf, s * n, n, &self.stream)?;
            }
        }
        let ps = self.cfg.page_size;
        self.positions_host.copy_within(s * ps..(s + 1) * ps, d * ps);
        // Slots past `keep` belong to the other holders of `src`: the copy's are zero.
        self.clear_tail(d, keep)?;
        self.upload_positions(d)?;
        if !self.bounds.is_empty() {
            let bn = self.bounds_page_bytes();
            let keep_mask = if keep >= 64 { u64::MAX } else { (1u64 << keep) - 1 };
            for layer in 0..self.cfg.num_layers {
                self.bounds[layer].copy_from(d * bn, &self.bounds[layer], s * bn, bn, &self.stream)?;
                let w = self.written[layer][s];
                self.written[layer][d] = w & keep_mask;
                if keep < ps {
                    let mask = self.written[layer][d];
                    self.run_bounds(layer, &[BoundsEntry { page: dst as i32, reset: 1, mask }])?;
                }
            }
        }
        self.pool.decref(src);
        Ok(dst)
    }

    /// Create an empty sequence.
    pub fn create_sequence(&mut self) -> SeqId {
        self.seqs.create()
    }

    /// A new sequence sharing all of `src`'s pages (copied on the first write by either side).
    pub fn fork(&mut self, src: SeqId) -> Result<SeqId> {
        self.check_usable()?;
        self.seqs.fork(&mut self.pool, src)
    }

    /// Drop a sequence; pages no other sequence shares go back to the pool.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.check_usable()?;
        self.seqs.free(&mut self.pool, id)
    }

    /// Ids of all live sequences, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.seqs.ids()
    }

    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// Page ids of a sequence, in token order.
    pub fn seq_pages(&self, id: SeqId) -> Result<Vec<u32>> {
        Ok(self.seq(id)?.pages.clone())
    }

    /// Original position of every token of a sequence.
    pub fn positions(&self, id: SeqId) -> Result<Vec<i32>> {
        let s = self.seq(id)?;
        let ps = self.cfg.page_size;
        Ok((0..s.len).map(|t| self.positions_host[s.pages[t / ps] as usize * ps + t % ps]).collect())
    }

    /// Append `n` token slots with their positions (as [`crate::KvCache::append`]); returns
    /// the slot mapping (`page * page_size + slot`).
    pub fn append(&mut self, id: SeqId, n: usize, positions: Option<&[i32]>) -> Result<Vec<i64>> {
        let s = self.seq(id)?;
        if let Some(p) = positions {
            if p.len() != n {
                return Err(Error::shape(
                    "positions",
                    format!("[{n}] (one per appended token)"),
                    format!("[{}]", p.len()),
                ));
            }
        }
        let ps = self.cfg.page_size;
        let last_len = s.last_len(self.cfg.page_size);
        let room = if s.pages.is_empty() { 0 } else { ps - last_len };
        let cow = usize::from(n > 0 && room > 0 && self.pool.refcount(*s.pages.last().unwrap()) > 1);
        let fresh = (n - n.min(room)).div_ceil(ps);
        self.pool.reserve(cow + fresh)?;
        let next_pos = if s.len == 0 {
            0
        } else {
            self.positions_host[*s.pages.last().unwrap() as usize * ps + last_len - 1].wrapping_add(1)
        };

        self.commit(|c| {
            let mut s = c.seqs.take(id);
            let r = c.append_inner(&mut s, n, positions, next_pos, cow == 1, fresh);
            c.seqs.put(id, s);
            let slots = r?;
            c.flush()?;
            Ok(slots)
        })
    }

    fn append_inner(
        &mut self,
        s: &mut Sequence,
        n: usize,
        positions: Option<&[i32]>,
        next_pos: i32,
        cow: bool,
        fresh: usize,
    ) -> Result<Vec<i64>> {
        let ps = self.cfg.page_size;
        if cow {
            let last_len = s.last_len(self.cfg.page_size);
            let last = s.pages.pop().unwrap();
            let copy = self.copy_page(last, last_len)?;
            s.pages.push(copy);
        }
        let pages = self.alloc_fresh(fresh)?;
        s.pages.extend(pages);
        let mut slots = Vec::with_capacity(n);
        let mut touched = Vec::new();
        for i in 0..n {
            let t = s.len + i;
            let page = s.pages[t / ps] as usize;
            let slot = page * ps + t % ps;
            self.positions_host[slot] = positions.map_or(next_pos.wrapping_add(i as i32), |p| p[i]);
            slots.push(slot as i64);
            if touched.last() != Some(&page) {
                touched.push(page);
            }
        }
        for page in touched {
            self.upload_positions(page)?;
        }
        s.len += n;
        Ok(slots)
    }

    /// Write K and V of one layer for tokens `start..start + n` from host tensors
    /// `[n, num_kv_heads, head_dim]` (any dtype and strides), as [`crate::KvCache::write`]:
    /// shared pages are copied first, key bounds updated.
    pub fn write(&mut self, id: SeqId, layer: usize, start: usize, k: &TensorView, v: &TensorView) -> Result<()> {
        self.write_impl(id, layer, start, Source::Host(k, v))
    }

    /// [`CudaKvCache::write`] from device tensors `[n, num_kv_heads, head_dim]` (f32, f16
    /// or bf16, any strides) on this cache's device.
    ///
    /// # Safety
    /// `k` and `v` are valid device memory for their shapes and strides, not written by
    /// others while this call runs.
    pub unsafe fn write_device(
        &mut self,
        id: SeqId,
        layer: usize,
        start: usize,
        k: &DeviceTensor,
        v: &DeviceTensor,
    ) -> Result<()> {
        self.write_impl(id, layer, start, Source::Device(k, v))
    }

    fn write_impl(&mut self, id: SeqId, layer: usize, start: usize, src: Source) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let n = match &src {
            Source::Host(k, v) => {
                let n = k.shape().first().copied().unwrap_or(0);
                k.expect_shape("k", &[Some(n), Some(h), Some(d)])?;
                v.expect_shape("v", &[Some(n), Some(h), Some(d)])?;
                n
            }
            Source::Device(k, v) => {
                let n = k.shape.first().copied().unwrap_or(0);
                let all = [DType::F32, DType::F16, DType::BF16];
                k.expect("k", &[Some(n), Some(h), Some(d)], &all, self.dev.ordinal())?;
                v.expect("v", &[Some(n), Some(h), Some(d)], &all, self.dev.ordinal())?;
                n
            }
        };
        let s = self.seq(id)?;
        if start.checked_add(n).is_none_or(|e| e > s.len) {
            return Err(Error::out_of_range(
                "start",
                start as i64,
                format!("0..={} so that start + n (n = {n}) <= seq_len {}", s.len.saturating_sub(n), s.len),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let ps = self.cfg.page_size;
        let touched: Vec<usize> = {
            let mut t: Vec<usize> = (start..start + n).map(|t| t / ps).collect();
            t.dedup();
            t
        };
        let shared: Vec<usize> = touched.iter().copied().filter(|&pi| self.pool.refcount(s.pages[pi]) > 1).collect();
        self.pool.reserve(shared.len())?;

        self.commit(|c| {
            let mut s = c.seqs.take(id);
            let r = c.write_inner(&mut s, layer, start, n, &touched, &shared, src);
            c.seqs.put(id, s);
            r?;
            c.flush()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn write_inner(
        &mut self,
        s: &mut Sequence,
        layer: usize,
        start: usize,
        n: usize,
        touched: &[usize],
        shared: &[usize],
        src: Source,
    ) -> Result<()> {
        let ps = self.cfg.page_size;
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        for &pi in shared {
            let keep = if pi + 1 == s.pages.len() { s.last_len(self.cfg.page_size) } else { ps };
            s.pages[pi] = self.copy_page(s.pages[pi], keep)?;
        }
        let slots: Vec<i64> = (start..start + n).map(|t| (s.pages[t / ps] as usize * ps + t % ps) as i64).collect();
        let ord = self.dev.ordinal();
        let (slots_at, kt, vt) = match src {
            Source::Host(k, v) => {
                // Rows gathered as f32 and converted on the device (exact for f16/bf16 inputs,
                // round to nearest even from f32, as the CPU cache stores them).
                let gather = |t: &TensorView| {
                    let mut buf = vec![0f32; n * h * d];
                    for i in 0..n {
                        for head in 0..h {
                            t.read_row(&[i, head], &mut buf[(i * h + head) * d..(i * h + head + 1) * d]);
                        }
                    }
                    buf
                };
                let (kr, vr) = (gather(k), gather(v));
                let at =
                    self.stage(&[bytemuck::cast_slice(&slots), bytemuck::cast_slice(&kr), bytemuck::cast_slice(&vr)])?;
                (
                    at[0],
                    DeviceTensor::contiguous(at[1], DType::F32, &[n, h, d], ord),
                    DeviceTensor::contiguous(at[2], DType::F32, &[n, h, d], ord),
                )
            }
            Source::Device(k, v) => (self.stage(&[bytemuck::cast_slice(&slots)])?[0], k.clone(), v.clone()),
        };
        // SAFETY: slots are this sequence's, inside the pool; sources checked above.
        unsafe {
            launch_append(
                &self.dev,
                &self.stream,
                &self.layout(),
                self.k[layer].ptr(),
                self.v[layer].ptr(),
                &kt,
                &vt,
                slots_at,
                n,
            )?
        };
        if !self.bounds.is_empty() {
            let mut entries = Vec::with_capacity(touched.len());
            for &pi in touched {
                let page = s.pages[pi] as usize;
                let lo = start.max(pi * ps) - pi * ps;
                let hi = (start + n).min((pi + 1) * ps) - pi * ps;
                let new_mask = (lo..hi).fold(0u64, |m, slot| m | (1u64 << slot));
                let w = self.written[layer][page];
                let e = if w & new_mask != 0 {
                    BoundsEntry { page: page as i32, reset: 1, mask: w | new_mask }
                } else {
                    BoundsEntry { page: page as i32, reset: 0, mask: new_mask }
                };
                self.written[layer][page] = w | new_mask;
                entries.push(e);
            }
            self.run_bounds(layer, &entries)?;
        }
        Ok(())
    }

    /// Keep the first `new_len` tokens of a sequence (as [`crate::KvCache::truncate`]).
    pub fn truncate(&mut self, id: SeqId, new_len: usize) -> Result<()> {
        let plan = Truncate::plan(self.seq(id)?, &self.pool, new_len, self.cfg.page_size)?;
        self.pool.reserve(usize::from(plan.cow))?;

        self.commit(|c| {
            let mut s = c.seqs.take(id);
            plan.drop_pages(&mut s, &mut c.pool);
            let r = if plan.cow {
                let last = s.pages.pop().unwrap();
                c.copy_page(last, plan.keep_last).map(|copy| s.pages.push(copy))
            } else if plan.partial {
                // The dropped slots are cleared: slots appended there later read as zeros
                // until written, not as the tokens truncated away.
                let last = *s.pages.last().unwrap() as usize;
                let keep_mask = (1u64 << plan.keep_last) - 1;
                let layers = if c.bounds.is_empty() { 0 } else { c.cfg.num_layers };
                c.clear_tail(last, plan.keep_last).and_then(|()| c.upload_positions(last)).and_then(|()| {
                    (0..layers).try_for_each(|layer| {
                        c.written[layer][last] &= keep_mask;
                        let mask = c.written[layer][last];
                        c.run_bounds(layer, &[BoundsEntry { page: last as i32, reset: 1, mask }])
                    })
                })
            } else {
                Ok(())
            };
            c.seqs.put(id, s);
            r?;
            c.flush()
        })
    }

    /// Evict whole pages from anywhere in a sequence (as [`crate::KvCache::evict_pages`]):
    /// `page_indices` index its page list, strictly increasing; the remaining tokens keep
    /// their positions and later token indices shift down. Bookkeeping only: no device work.
    pub fn evict_pages(&mut self, id: SeqId, page_indices: &[usize]) -> Result<()> {
        self.check_usable()?;
        self.seqs.evict_pages(&mut self.pool, id, page_indices, self.cfg.page_size)
    }

    /// Keep only some tokens of a sequence, moved in order into fresh pages with their
    /// positions (as [`crate::KvCache::compact`], same lists and checks); the old pages go
    /// back to the pool or stay with the sequences sharing them. Rows are copied on the
    /// device (runs of rows contiguous in both places in one copy) and the new pages' key
    /// bounds recomputed.
    pub fn compact(&mut self, id: SeqId, keep: KeepTokens) -> Result<()> {
        let s = self.seq(id)?;
        let c = self.cfg;
        let (lists, k) = keep.checked(&c, s.len)?;
        let ps = c.page_size;
        let new_pages = k.div_ceil(ps);
        self.pool.reserve(new_pages)?;

        self.commit(|c| {
            let old = c.seqs.take(id);
            let pages = match c.alloc_fresh(new_pages) {
                Ok(p) => p,
                Err(e) => {
                    c.seqs.put(id, old);
                    return Err(e);
                }
            };
            let r = c.compact_into(&old, &pages, keep, lists, k);
            for &p in &old.pages {
                c.pool.decref(p);
            }
            c.seqs.put(id, Sequence { pages, len: k });
            r?;
            c.flush()
        })
    }

    fn compact_into(
        &mut self,
        old: &Sequence,
        pages: &[u32],
        keep: KeepTokens,
        lists: &[Vec<u32>],
        k: usize,
    ) -> Result<()> {
        let c = self.cfg;
        let ps = c.page_size;
        plan::compact_positions(&mut self.positions_host, &old.pages, pages, &lists[0], ps);
        for &p in pages {
            self.upload_positions(p as usize)?;
        }
        let es = c.dtype.size();
        let row = c.head_dim * es;
        for layer in 0..c.num_layers {
            // (source byte offset, destination byte offset, bytes), merged where both are contiguous.
            let mut runs: Vec<(usize, usize, usize)> = Vec::new();
            plan::compact_rows(&c, &old.pages, pages, keep, layer, k, |_, _, src, dst| {
                let (src, dst) = (src * es, dst * es);
                match runs.last_mut() {
                    Some(r) if r.0 + r.2 == src && r.1 + r.2 == dst => r.2 += row,
                    _ => runs.push((src, dst, row)),
                }
            });
            for &(src, dst, n) in &runs {
                self.k[layer].copy_from(dst, &self.k[layer], src, n, &self.stream)?;
                self.v[layer].copy_from(dst, &self.v[layer], src, n, &self.stream)?;
            }
            if !self.bounds.is_empty() {
                let entries: Vec<BoundsEntry> = pages
                    .iter()
                    .enumerate()
                    .map(|(pi, &p)| {
                        let n = (k - pi * ps).min(ps);
                        let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
                        self.written[layer][p as usize] = mask;
                        BoundsEntry { page: p as i32, reset: 1, mask }
                    })
                    .collect();
                self.run_bounds(layer, &entries)?;
            }
        }
        Ok(())
    }

    /// The CSR page table of a batch of sequences, on the host.    /// The CSR page table of a batch of sequences, on the host.
    pub fn host_page_table(&self, ids: &[SeqId]) -> Result<PageTable> {
        self.check_usable()?;
        self.seqs.page_table(ids, self.cfg.page_size)
    }

    /// The CSR page table of a batch of sequences, uploaded to the device.
    pub fn page_table(&self, ids: &[SeqId]) -> Result<CudaPageTable> {
        let t = self.host_page_table(ids)?;
        CudaPageTable::upload(&self.dev, t.as_ref(), self.cfg.page_size, self.cfg.capacity_pages, &self.stream)
    }

    /// A view of one layer over a table from [`CudaKvCache::page_table`], with positions,
    /// key bounds (when kept) and the cache's RoPE convention attached.
    pub fn layer_view<'a>(&'a self, layer: usize, table: &'a CudaPageTable) -> Result<CudaPagedKv<'a>> {
        self.check_layer(layer)?;
        if table.device() != self.dev.ordinal() {
            return Err(Error::invalid("table", format!("a page table on CUDA device {}", self.dev.ordinal())));
        }
        // SAFETY: the buffers hold capacity_pages pages in this layout and live as long as
        // `self`, which `&mut` calls cannot change while the view borrows it.
        let view = unsafe { CudaPagedKv::from_raw(self.k[layer].ptr(), self.v[layer].ptr(), self.layout(), table)? };
        // SAFETY: positions cover capacity_pages * page_size slots.
        let mut view = unsafe { view.with_positions(self.positions.ptr())? }.with_key_rope(self.cfg.key_rope);
        if let Some(b) = self.bounds.get(layer) {
            // SAFETY: the layer's bounds cover every page.
            view = unsafe { view.with_key_bounds(KeyBoundsLayout { ptr: b.ptr() })? };
        }
        Ok(view)
    }

    /// Device address of one layer's key bounds.
    pub fn key_bounds(&self, layer: usize) -> Result<KeyBoundsLayout> {
        self.check_layer(layer)?;
        let b = self
            .bounds
            .get(layer)
            .ok_or_else(|| Error::invalid("track_key_bounds", "a cache created with key bounds on"))?;
        Ok(KeyBoundsLayout { ptr: b.ptr() })
    }

    /// Key bounds (min, max; each `[num_kv_heads * head_dim]`, head-major) of page
    /// `page_index` of a sequence at a layer, read back from the device.
    pub fn page_key_bounds(&self, id: SeqId, layer: usize, page_index: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let s = self.seq(id)?;
        let b = self
            .bounds
            .get(layer)
            .ok_or_else(|| Error::invalid("track_key_bounds", "a cache created with key bounds on"))?;
        let page = *s
            .pages
            .get(page_index)
            .ok_or_else(|| Error::out_of_range("page_index", page_index as i64, format!("0..{}", s.pages.len())))?
            as usize;
        let bn = self.bounds_page_bytes();
        let mut bytes = vec![0u8; bn];
        b.download(page * bn, &mut bytes, &self.stream)?;
        let (h, d, dt) = (self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.dtype);
        let (mut min, mut max) = (Vec::with_capacity(h * d), Vec::with_capacity(h * d));
        for head in 0..h {
            min.extend((0..d).map(|c| load_f32(&bytes, dt, head * 2 * d + c)));
            max.extend((0..d).map(|c| load_f32(&bytes, dt, head * 2 * d + d + c)));
        }
        Ok((min, max))
    }

    /// Keys of a sequence at a layer as f32, `[seq_len, num_kv_heads, head_dim]` flattened.
    pub fn read_keys(&self, id: SeqId, layer: usize) -> Result<Vec<f32>> {
        self.read(id, layer, true)
    }

    /// Values of a sequence at a layer as f32, `[seq_len, num_kv_heads, head_dim]` flattened.
    pub fn read_values(&self, id: SeqId, layer: usize) -> Result<Vec<f32>> {
        self.read(id, layer, false)
    }

    fn read(&self, id: SeqId, layer: usize, keys: bool) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let s = self.seq(id)?;
        let c = &self.cfg;
        let st = c.strides();
        let buf = if keys { &self.k[layer] } else { &self.v[layer] };
        let n = self.page_bytes();
        let mut page_bytes = vec![0u8; n];
        let mut out = Vec::with_capacity(s.len * c.num_kv_heads * c.head_dim);
        for (pi, &page) in s.pages.iter().enumerate() {
            buf.download(page as usize * n, &mut page_bytes, &self.stream)?;
            let tokens = (s.len - pi * c.page_size).min(c.page_size);
            for slot in 0..tokens {
                for h in 0..c.num_kv_heads {
                    let base = slot * st[1] + h * st[2];
                    out.extend((0..c.head_dim).map(|i| load_f32(&page_bytes, c.dtype, base + i)));
                }
            }
        }
        Ok(out)
    }

    /// Pages free / in use.
    pub fn pages_free(&self) -> usize {
        self.pool.free_count()
    }

    /// Reference count of a page (0 = free).
    pub fn page_refcount(&self, page: u32) -> Result<u32> {
        if page as usize >= self.pool.capacity() {
            return Err(Error::out_of_range("page", page as i64, format!("0..{}", self.pool.capacity())));
        }
        Ok(self.pool.refcount(page))
    }

    /// Check the bookkeeping invariants (as [`crate::KvCache::check_invariants`]).
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check()?;
        let mut counts = vec![0u32; self.pool.capacity()];
        for s in self.seqs.values() {
            for &p in &s.pages {
                counts[p as usize] += 1;
            }
        }
        for (p, &c) in counts.iter().enumerate() {
            if c != self.pool.refcount(p as u32) {
                return Err(format!("page {p}: refcount {} but held by {c} sequences", self.pool.refcount(p as u32)));
            }
        }
        Ok(())
    }
}
