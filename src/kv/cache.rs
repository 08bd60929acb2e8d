//! `KvCache`: kvsieve-owned paged KV storage for many sequences.
//!
//! # Threads
//! `KvCache` is `Send + Sync`. Calls taking `&self` (views, page tables, attention,
//! statistics, positions, bounds) may run from any number of threads at once. Calls that
//! change the cache take `&mut self` and need exclusive access. To share one cache between
//! threads, wrap it in a reader-writer lock ([`SharedKvCache`]); the C and Python handles do
//! exactly that, so their readers run concurrently and writers are serialised.
//!
//! # Failure
//! Every call that changes the cache first plans: it validates its arguments, reserves the
//! pages and allocates the buffers it needs, and only then commits, in steps that cannot
//! fail. So a call that returns an error (bad input, out of pages, out of memory) leaves
//! the cache exactly as it was, bit for bit.
//!
//! A panic inside a commit (a bug in kvsieve) would leave it half-changed. The cache is
//! then *poisoned*: every later call on it, reads included, returns [`Error::Internal`]
//! saying so, and the cache should be dropped. It is never silently inconsistent.

use std::sync::Arc;

use crate::config::{CacheConfig, KeyRope};
use crate::dtype::{load_f32, store_f32};
use crate::error::{Error, Result};
use crate::kv::bounds::KeyBounds;
use crate::kv::plan::{self, KeepTokens, Truncate};
use crate::kv::pool::PagePool;
use crate::kv::seqs::{SeqId, Sequence, Sequences};
use crate::kv::storage::Buffer;
use crate::kv::table::PageTable;
use crate::kv::view::{PagedKv, PagedKvLayout};
use crate::tensor::TensorView;

/// A cache shared between threads: readers run concurrently, writers exclusively.
pub type SharedKvCache = Arc<parking_lot::RwLock<KvCache>>;

/// Memory statistics of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub pages_total: usize,
    pub pages_used: usize,
    pub pages_free: usize,
    /// Bytes of K and V per page, all layers.
    pub bytes_per_page: usize,
    /// Bytes of K and V in used pages.
    pub bytes_used: usize,
    /// Bytes allocated for K, V, positions and key bounds.
    pub bytes_reserved: usize,
    pub num_sequences: usize,
    /// Tokens held by all sequences (shared tokens counted once per sequence).
    pub num_tokens: usize,
}

/// Per-page key bounds of one layer, borrowed from a [`KvCache`].
///
/// Layout: `[page][head][min | max][head_dim]` elements of `dtype` (native endian), for
/// every page of the pool. A page with no written slot has min = +inf and max = -inf.
#[derive(Clone, Copy)]
pub struct KeyBoundsRef<'a> {
    pub bytes: &'a [u8],
    pub dtype: crate::dtype::DType,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> KeyBoundsRef<'a> {
    /// Bytes of (min, max) for one page and KV head, each `head_dim` elements of `dtype`.
    #[inline]
    pub fn page_head(&self, page: usize, head: usize) -> (&'a [u8], &'a [u8]) {
        let row = self.head_dim * self.dtype.size();
        let base = (page * self.num_kv_heads + head) * 2 * row;
        (&self.bytes[base..base + row], &self.bytes[base + row..base + 2 * row])
    }
}

/// Paged KV storage owned by kvsieve. See the module docs for threading and failure rules.
pub struct KvCache {
    cfg: CacheConfig,
    pool: PagePool,
    k: Vec<Buffer>,
    v: Vec<Buffer>,
    /// Original position of each slot, `[page][slot]`.
    positions: Vec<i32>,
    bounds: Option<KeyBounds>,
    seqs: Sequences,
    /// Set while a change commits; still set after a panic in the middle of one.
    poisoned: bool,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").field("config", &self.cfg).field("stats", &self.stats()).finish()
    }
}

impl KvCache {
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        cfg.validate()?;
        // validate() checked that every size below fits in memory's address range.
        let layer_bytes = cfg.capacity_pages * cfg.page_elems() * cfg.dtype.size();
        let pages = |what| (0..cfg.num_layers).map(|_| Buffer::zeroed(layer_bytes, what)).collect::<Result<Vec<_>>>();
        Ok(KvCache {
            pool: PagePool::new(cfg.capacity_pages)?,
            k: pages("K pages")?,
            v: pages("V pages")?,
            positions: crate::alloc::zeroed_vec(cfg.capacity_pages * cfg.page_size, "slot positions")?,
            bounds: if cfg.track_key_bounds { Some(KeyBounds::new(&cfg)?) } else { None },
            seqs: Sequences::default(),
            poisoned: false,
            cfg,
        })
    }

    /// Run a change: refused on a poisoned cache; poisons the cache if `op` panics. `op`
    /// returns its errors before it changes anything (see the module docs).
    fn change<R>(&mut self, op: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.check_usable()?;
        self.poisoned = true;
        let r = op(self);
        self.poisoned = false;
        r
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Internal(
                "this cache was left half-changed by an internal error (a panic) in an earlier call; drop it".into(),
            ));
        }
        Ok(())
    }

    /// Whether an internal error (a panic) in an earlier call left this cache unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(id)
    }

    /// A sequence for a public read: refused on a poisoned cache.
    fn read_seq(&self, id: SeqId) -> Result<&Sequence> {
        self.check_usable()?;
        self.seqs.get(id)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::out_of_range("layer", layer as i64, format!("0..{}", self.cfg.num_layers)));
        }
        Ok(())
    }

    /// Create an empty sequence.
    pub fn create_sequence(&mut self) -> SeqId {
        self.seqs.create()
    }

    /// A new sequence sharing all of `src`'s pages (prefix sharing). Shared pages are
    /// copied on the first write to them by either side, so the two then diverge safely.
    pub fn fork(&mut self, src: SeqId) -> Result<SeqId> {
        self.change(|c| c.seqs.fork(&mut c.pool, src))
    }

    /// Drop a sequence; pages no other sequence shares go back to the pool.
    pub fn free_sequence(&mut self, id: SeqId) -> Result<()> {
        self.change(|c| c.seqs.free(&mut c.pool, id))
    }

    /// Ids of all live sequences, ascending.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.seqs.ids()
    }

    /// Tokens held by a sequence.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.read_seq(id)?.len)
    }

    /// Original position of every token of a sequence, in token order.
    pub fn positions(&self, id: SeqId) -> Result<Vec<i32>> {
        let s = self.read_seq(id)?;
        let ps = self.cfg.page_size;
        Ok((0..s.len).map(|t| self.positions[s.pages[t / ps] as usize * ps + t % ps]).collect())
    }

    /// Page ids of a sequence, in token order.
    pub fn seq_pages(&self, id: SeqId) -> Result<Vec<u32>> {
        Ok(self.read_seq(id)?.pages.clone())
    }

    /// Copy the first `keep` slots of page `src` into a freshly allocated page (all
    /// layers, positions, bounds); the copy's other slots are zero, as a fresh page's (they
    /// belong to the other holders of `src`). The caller reserved the page.
    fn copy_page(&mut self, src: u32, keep: usize) -> u32 {
        let (dst, _) = self.pool.alloc();
        let n = self.cfg.page_elems() * self.cfg.dtype.size();
        let (s, d) = (src as usize, dst as usize);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.bytes_mut().copy_within(s * n..(s + 1) * n, d * n);
        }
        let ps = self.cfg.page_size;
        self.positions.copy_within(s * ps..(s + 1) * ps, d * ps);
        self.clear_tail(d, keep);
        if let Some(b) = self.bounds.as_mut() {
            b.copy_page(&self.cfg, s, d);
            if keep < ps {
                b.truncate_page(&self.cfg, d, keep, &self.k);
            }
        }
        self.pool.decref(src);
        dst
    }

    /// Zero slots `keep..page_size` of `page` (K and V of every layer, and positions).
    fn clear_tail(&mut self, page: usize, keep: usize) {
        let n = self.cfg.page_elems() * self.cfg.dtype.size();
        let es = self.cfg.dtype.size();
        let tail = plan::tail_rows(&self.cfg, keep);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let bytes = buf.bytes_mut();
            for &(off, len) in &tail {
                bytes[page * n + off * es..page * n + (off + len) * es].fill(0);
            }
        }
        let ps = self.cfg.page_size;
        self.positions[page * ps + keep.min(ps)..(page + 1) * ps].fill(0);
    }

    fn alloc_fresh(&mut self) -> u32 {
        let (p, reused) = self.pool.alloc();
        if reused {
            // An earlier owner's K/V must not show through slots appended but not yet written.
            let n = self.cfg.page_elems() * self.cfg.dtype.size();
            let i = p as usize;
            for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
                buf.bytes_mut()[i * n..(i + 1) * n].fill(0);
            }
            let ps = self.cfg.page_size;
            self.positions[i * ps..(i + 1) * ps].fill(0);
        }
        if let Some(b) = self.bounds.as_mut() {
            b.clear_page(&self.cfg, p as usize);
        }
        p
    }

    /// Append `n` token slots to a sequence and record their original positions
    /// (`positions`, or by default one past the last stored position, 0 for an empty
    /// sequence). Returns the slot mapping: slot `page * page_size + offset` of each new
    /// token. K and V of the new tokens must then be written for every layer (see
    /// [`KvCache::write`]) before attention reads them.
    pub fn append(&mut self, id: SeqId, n: usize, positions: Option<&[i32]>) -> Result<Vec<i64>> {
        self.change(|c| c.append_inner(id, n, positions))
    }

    fn append_inner(&mut self, id: SeqId, n: usize, positions: Option<&[i32]>) -> Result<Vec<i64>> {
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
            self.positions[*s.pages.last().unwrap() as usize * ps + last_len - 1].wrapping_add(1)
        };
        let mut slots = crate::alloc::vec_with_capacity(n, "slot mapping")?;
        self.seqs.reserve_pages(id, fresh)?;
        let mut s = self.seqs.take(id);
        crate::alloc::step("append: sequence taken out");
        if cow == 1 {
            let last = s.pages.pop().unwrap();
            let copy = self.copy_page(last, last_len);
            s.pages.push(copy);
            crate::alloc::step("append: shared last page copied");
        }
        for _ in 0..fresh {
            let p = self.alloc_fresh();
            s.pages.push(p);
            crate::alloc::step("append: page allocated");
        }
        for i in 0..n {
            let t = s.len + i;
            let slot = s.pages[t / ps] as usize * ps + t % ps;
            self.positions[slot] = positions.map_or(next_pos.wrapping_add(i as i32), |p| p[i]);
            slots.push(slot as i64);
        }
        s.len += n;
        self.seqs.put(id, s);
        Ok(slots)
    }

    /// Write K and V of one layer for tokens `start..start + n` of a sequence.
    /// `k` and `v` have shape `[n, num_kv_heads, head_dim]`, any dtype (converted to the
    /// cache dtype, rounding to nearest), any non-negative strides. Pages shared with
    /// another sequence are copied first. Key bounds are updated.
    pub fn write(&mut self, id: SeqId, layer: usize, start: usize, k: &TensorView, v: &TensorView) -> Result<()> {
        let n = k.shape().first().copied().unwrap_or(0);
        let s = self.seq(id)?;
        if start.checked_add(n).is_none_or(|e| e > s.len) {
            return Err(Error::out_of_range(
                "start",
                start as i64,
                format!("0..={} so that start + n (n = {n}) <= seq_len {}", s.len.saturating_sub(n), s.len),
            ));
        }
        let ps = self.cfg.page_size;
        let mut tokens = crate::alloc::vec_with_capacity(n, "token list")?;
        tokens.extend(start..start + n);
        self.change(|c| c.write_tokens(id, layer, &tokens, k, v, ps))
    }

    /// Write K and V of one layer into slots from a slot mapping returned by
    /// [`KvCache::append`] (each slot must hold a token of sequence `id`).
    pub fn write_slots(
        &mut self,
        id: SeqId,
        layer: usize,
        slots: &[i64],
        k: &TensorView,
        v: &TensorView,
    ) -> Result<()> {
        let s = self.seq(id)?;
        let ps = self.cfg.page_size;
        let page_index: std::collections::HashMap<u32, usize> =
            s.pages.iter().enumerate().map(|(i, &p)| (p, i)).collect();
        let mut tokens = crate::alloc::vec_with_capacity(slots.len(), "token list")?;
        for (i, &slot) in slots.iter().enumerate() {
            let t = (slot >= 0)
                .then(|| page_index.get(&((slot as usize / ps) as u32)).map(|&pi| pi * ps + slot as usize % ps))
                .flatten()
                .filter(|&t| t < s.len);
            match t {
                Some(t) => tokens.push(t),
                None => {
                    return Err(Error::out_of_range(
                        format!("slots[{i}]"),
                        slot,
                        format!("the slots of sequence {id}'s {} tokens", s.len),
                    ))
                }
            }
        }
        self.change(|c| c.write_tokens(id, layer, &tokens, k, v, ps))
    }

    fn write_tokens(
        &mut self,
        id: SeqId,
        layer: usize,
        tokens: &[usize],
        k: &TensorView,
        v: &TensorView,
        ps: usize,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let want = [Some(tokens.len()), Some(h), Some(d)];
        k.expect_shape("k", &want)?;
        v.expect_shape("v", &want)?;
        let s = self.seq(id)?;
        // Shared pages touched by the write are copied first: count them before changing anything.
        let mut touched = crate::alloc::vec_with_capacity(tokens.len(), "pages touched")?;
        touched.extend(tokens.iter().map(|&t| t / ps));
        touched.sort_unstable();
        touched.dedup();
        let shared: Vec<usize> = touched.iter().copied().filter(|&pi| self.pool.refcount(s.pages[pi]) > 1).collect();
        self.pool.reserve(shared.len())?;
        let mut recompute = crate::alloc::vec_with_capacity(tokens.len(), "pages to recompute")?;

        let mut s = self.seqs.take(id);
        crate::alloc::step("write: sequence taken out");
        for &pi in &shared {
            let keep = if pi + 1 == s.pages.len() { s.last_len(self.cfg.page_size) } else { ps };
            s.pages[pi] = self.copy_page(s.pages[pi], keep);
        }
        let cfg = self.cfg;
        let strides = cfg.strides();
        let dt = cfg.dtype;
        let mut offs = vec![0usize; h];
        for (i, &t) in tokens.iter().enumerate() {
            let page = s.pages[t / ps] as usize;
            let slot = t % ps;
            for (head, off) in offs.iter_mut().enumerate() {
                *off = page * strides[0] + slot * strides[1] + head * strides[2];
                store_row(self.k[layer].bytes_mut(), dt, *off, k, &[i, head], d);
                store_row(self.v[layer].bytes_mut(), dt, *off, v, &[i, head], d);
            }
            if let Some(b) = self.bounds.as_mut() {
                if !b.note_write(&cfg, layer, page, slot, self.k[layer].bytes(), &offs)
                    && recompute.last() != Some(&page)
                {
                    recompute.push(page);
                }
            }
            crate::alloc::step("write: row stored");
        }
        if let Some(b) = self.bounds.as_mut() {
            recompute.sort_unstable();
            recompute.dedup();
            for page in recompute {
                b.recompute(&cfg, layer, page, self.k[layer].bytes());
            }
        }
        self.seqs.put(id, s);
        Ok(())
    }

    /// Keep the first `new_len` tokens of a sequence. Pages past the end go back to the
    /// pool and the key bounds of a partly kept page are recomputed. A partly kept page that
    /// is shared with another sequence is copied first (so it can fail with `OutOfPages`,
    /// changing nothing): every holder of a page always holds the same slots of it.
    pub fn truncate(&mut self, id: SeqId, new_len: usize) -> Result<()> {
        self.change(|c| c.truncate_inner(id, new_len))
    }

    fn truncate_inner(&mut self, id: SeqId, new_len: usize) -> Result<()> {
        let plan = Truncate::plan(self.seq(id)?, &self.pool, new_len, self.cfg.page_size)?;
        self.pool.reserve(usize::from(plan.cow))?;

        let mut s = self.seqs.take(id);
        crate::alloc::step("truncate: sequence taken out");
        plan.drop_pages(&mut s, &mut self.pool);
        crate::alloc::step("truncate: pages dropped");
        if plan.cow {
            let last = s.pages.pop().unwrap();
            let copy = self.copy_page(last, plan.keep_last);
            s.pages.push(copy);
        } else if plan.partial {
            let last = *s.pages.last().unwrap() as usize;
            // The dropped slots are cleared: slots appended there later read as zeros until
            // written, not as the tokens truncated away.
            self.clear_tail(last, plan.keep_last);
            if let Some(b) = self.bounds.as_mut() {
                b.truncate_page(&self.cfg, last, plan.keep_last, &self.k);
            }
        }
        self.seqs.put(id, s);
        Ok(())
    }

    /// Evict whole pages from anywhere in a sequence (for example pages that left a
    /// sliding window). `page_indices` index the sequence's page list and must be strictly
    /// increasing. Remaining tokens keep their original positions; token indices after an
    /// evicted page shift down.
    pub fn evict_pages(&mut self, id: SeqId, page_indices: &[usize]) -> Result<()> {
        let ps = self.cfg.page_size;
        self.change(|c| c.seqs.evict_pages(&mut c.pool, id, page_indices, ps))
    }

    /// Keep only some tokens of a sequence, moved into fresh pages in order (with their
    /// original positions); the old pages go back to the pool (or stay with the sequences
    /// they are shared with). Needs `ceil(k / page_size)` free pages for `k` kept tokens,
    /// checked before anything changes.
    ///
    /// `keep` is one list for every layer and head, or one per layer
    /// (`KeepTokens::PerLayer`) or per (layer, KV head) (`KeepTokens::PerHead`, layer-major),
    /// all of the same length: slot `i` then holds each list's `i`-th token. Slot positions
    /// come from the first list, so lists that differ need keys stored after RoPE.
    pub fn compact(&mut self, id: SeqId, keep: KeepTokens) -> Result<()> {
        self.change(|c| c.compact_inner(id, keep))
    }

    fn compact_inner(&mut self, id: SeqId, keep: KeepTokens) -> Result<()> {
        let s = self.seq(id)?;
        let c = self.cfg;
        let (lists, k) = keep.checked(&c, s.len)?;
        let ps = c.page_size;
        let new_pages = k.div_ceil(ps);
        self.pool.reserve(new_pages)?;
        let mut pages = crate::alloc::vec_with_capacity(new_pages, "compacted page list")?;

        let old = self.seqs.take(id);
        crate::alloc::step("compact: sequence taken out");
        pages.extend((0..new_pages).map(|_| self.alloc_fresh()));
        crate::alloc::step("compact: pages allocated");
        let (es, n) = (c.dtype.size(), c.head_dim * c.dtype.size());
        plan::compact_positions(&mut self.positions, &old.pages, &pages, &lists[0], ps);
        let mut offs = vec![0usize; c.num_kv_heads];
        for layer in 0..c.num_layers {
            let (k_buf, v_buf, bounds) = (&mut self.k[layer], &mut self.v[layer], &mut self.bounds);
            plan::compact_rows(&c, &old.pages, &pages, keep, layer, k, |i, h, src, dst| {
                offs[h] = dst;
                for buf in [&mut *k_buf, &mut *v_buf] {
                    buf.bytes_mut().copy_within(src * es..src * es + n, dst * es);
                }
                // The slot's heads are all written: its key bounds take them in.
                if h + 1 == c.num_kv_heads {
                    if let Some(b) = bounds.as_mut() {
                        b.note_write(&c, layer, pages[i / ps] as usize, i % ps, k_buf.bytes(), &offs);
                    }
                }
            });
        }
        crate::alloc::step("compact: rows moved");
        for p in old.pages {
            self.pool.decref(p);
        }
        self.seqs.put(id, Sequence { pages, len: k });
        Ok(())
    }

    /// The CSR page table of a batch of sequences, in the given order.
    pub fn page_table(&self, ids: &[SeqId]) -> Result<PageTable> {
        self.check_usable()?;
        self.seqs.page_table(ids, self.cfg.page_size)
    }

    /// A read-only view of one layer over a page table from [`KvCache::page_table`],
    /// with slot positions attached. Attention reads through it.
    pub fn layer_view<'a>(&'a self, layer: usize, table: &'a PageTable) -> Result<PagedKv<'a>> {
        self.check_layer(layer)?;
        let c = &self.cfg;
        let s = c.strides();
        let layout = PagedKvLayout {
            dtype: c.dtype,
            num_pages: c.capacity_pages,
            page_size: c.page_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            k_strides: s,
            v_strides: s,
        };
        // SAFETY: the buffers hold capacity_pages pages in this layout, are aligned to 8 bytes,
        // and cannot be written while `self` is borrowed immutably for 'a.
        let view =
            unsafe { PagedKv::from_raw(self.k[layer].as_ptr(), self.v[layer].as_ptr(), layout, table.as_ref())? };
        Ok(view.with_positions(&self.positions)?.with_key_rope(c.key_rope))
    }

    /// Key bounds (per-channel min, max; each `[num_kv_heads * head_dim]`, head-major) of
    /// page `page_index` of a sequence at a layer. Empty pages give +inf / -inf.
    pub fn page_key_bounds(&self, id: SeqId, layer: usize, page_index: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let s = self.seq(id)?;
        let b = self
            .bounds
            .as_ref()
            .ok_or_else(|| Error::invalid("track_key_bounds", "a cache created with key bounds on"))?;
        let page = *s
            .pages
            .get(page_index)
            .ok_or_else(|| Error::out_of_range("page_index", page_index as i64, format!("0..{}", s.pages.len())))?
            as usize;
        let (mut min, mut max) = (Vec::new(), Vec::new());
        for h in 0..self.cfg.num_kv_heads {
            let (a, b2) = b.get(&self.cfg, layer, page, h);
            min.extend(a);
            max.extend(b2);
        }
        Ok((min, max))
    }

    /// Key bounds of every page of the pool at one layer, for page-bound scoring.
    pub fn key_bounds(&self, layer: usize) -> Result<KeyBoundsRef<'_>> {
        self.check_layer(layer)?;
        let b = self
            .bounds
            .as_ref()
            .ok_or_else(|| Error::invalid("track_key_bounds", "a cache created with key bounds on"))?;
        Ok(KeyBoundsRef {
            bytes: b.layer_bytes(layer),
            dtype: self.cfg.dtype,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        })
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
        let buf = if keys { self.k[layer].bytes() } else { self.v[layer].bytes() };
        let mut out = Vec::with_capacity(s.len * c.num_kv_heads * c.head_dim);
        for t in 0..s.len {
            let page = s.pages[t / c.page_size] as usize;
            for h in 0..c.num_kv_heads {
                let base = page * st[0] + (t % c.page_size) * st[1] + h * st[2];
                out.extend((0..c.head_dim).map(|i| load_f32(buf, c.dtype, base + i)));
            }
        }
        Ok(out)
    }

    /// Whether stored keys carry RoPE.
    pub fn key_rope(&self) -> KeyRope {
        self.cfg.key_rope
    }

    pub fn stats(&self) -> MemoryStats {
        let c = &self.cfg;
        let used = self.pool.capacity() - self.pool.free_count();
        let bytes_per_page = c.page_bytes();
        MemoryStats {
            pages_total: self.pool.capacity(),
            pages_used: used,
            pages_free: self.pool.free_count(),
            bytes_per_page,
            bytes_used: used * bytes_per_page,
            bytes_reserved: c.capacity_pages * bytes_per_page
                + self.positions.len() * 4
                + self.bounds.as_ref().map_or(0, |b| b.bytes()),
            num_sequences: self.seqs.len(),
            num_tokens: self.seqs.values().map(|s| s.len).sum(),
        }
    }

    /// Reference count of a page (0 = free). For diagnostics and tests.
    pub fn page_refcount(&self, page: u32) -> Result<u32> {
        if page as usize >= self.pool.capacity() {
            return Err(Error::out_of_range("page", page as i64, format!("0..{}", self.pool.capacity())));
        }
        Ok(self.pool.refcount(page))
    }

    /// Check every internal invariant: each page's reference count equals the number of
    /// sequences holding it, free pages are free exactly once, sequence lengths match their
    /// pages. Returns a description of the first violation. Meant for tests and debugging.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check()?;
        let mut counts = vec![0u32; self.pool.capacity()];
        let ps = self.cfg.page_size;
        for (id, s) in self.seqs.iter() {
            for &p in &s.pages {
                counts[p as usize] += 1;
            }
            let ok = if s.pages.is_empty() {
                s.len == 0
            } else {
                s.len > (s.pages.len() - 1) * ps && s.len <= s.pages.len() * ps
            };
            if !ok {
                return Err(format!("sequence {id}: len {} does not fit {} pages of {ps}", s.len, s.pages.len()));
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

/// Store row `src[index, :]` (d elements) at element offset `off` of `dst`.
fn store_row(dst: &mut [u8], dt: crate::dtype::DType, off: usize, src: &TensorView, index: &[usize], d: usize) {
    use crate::dtype::DType;
    use half::slice::HalfFloatSliceExt;
    let inner = src.strides()[2];
    let sz = dt.size();
    let out = &mut dst[off * sz..(off + d) * sz];
    if inner == 1 {
        let from = src.offset(index) * src.dtype().size();
        let bytes = &src.bytes()[from..from + d * src.dtype().size()];
        if src.dtype() == dt {
            out.copy_from_slice(bytes);
            return;
        }
        // f32 rows into half-precision pages: convert the whole row with SIMD where aligned.
        if let (DType::F32, Ok(row)) = (src.dtype(), bytemuck::try_cast_slice::<u8, f32>(bytes)) {
            match dt {
                DType::F16 => {
                    if let Ok(o) = bytemuck::try_cast_slice_mut::<u8, half::f16>(out) {
                        return o.convert_from_f32_slice(row);
                    }
                }
                DType::BF16 => {
                    if let Ok(o) = bytemuck::try_cast_slice_mut::<u8, half::bf16>(out) {
                        return o.convert_from_f32_slice(row);
                    }
                }
                DType::F32 => {}
            }
        }
    }
    let base = src.offset(index);
    for c in 0..d {
        store_f32(out, dt, c, src.get_at(base + c * inner));
    }
}

#[cfg(test)]
mod fault_tests;
