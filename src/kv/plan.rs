//! Page planning for truncating and compacting a sequence, shared by the host cache
//! ([`crate::KvCache`]) and the device cache: which pages stay, whether the last kept page
//! must be copied first (it is shared), and where each kept row moves. The caches then do
//! the copies their own way (host memory moves, device copies merged into runs).

use crate::config::{CacheConfig, KeyRope};
use crate::error::{Error, Result};
use crate::kv::pool::PagePool;
use crate::kv::seqs::Sequence;

/// What truncating a sequence to `new_len` tokens does to its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Truncate {
    pub new_len: usize,
    /// Pages kept from the front of the page list.
    pub keep_pages: usize,
    /// Tokens kept in the last kept page.
    pub keep_last: usize,
    /// The last kept page loses some of its tokens.
    pub partial: bool,
    /// ... and it is shared with another sequence, so it is copied first (one free page).
    pub cow: bool,
}

impl Truncate {
    /// Plan the truncation of `s` (checked: `new_len <= s.len`); nothing changes.
    pub fn plan(s: &Sequence, pool: &PagePool, new_len: usize, page_size: usize) -> Result<Truncate> {
        if new_len > s.len {
            return Err(Error::out_of_range("new_len", new_len as i64, format!("0..={}", s.len)));
        }
        let keep_pages = new_len.div_ceil(page_size);
        let keep_last = new_len - keep_pages.saturating_sub(1) * page_size;
        let partial = keep_pages > 0 && keep_last < page_size && new_len < s.len;
        let cow = partial && pool.refcount(s.pages[keep_pages - 1]) > 1;
        Ok(Truncate { new_len, keep_pages, keep_last, partial, cow })
    }

    /// Drop the pages past the kept ones (each loses a reference in `pool`) and set the
    /// length. When [`Truncate::cow`], the caller then replaces the last page by its copy.
    pub fn drop_pages(&self, s: &mut Sequence, pool: &mut PagePool) {
        for p in s.pages.drain(self.keep_pages..) {
            pool.decref(p);
        }
        s.len = self.new_len;
    }
}

/// Slot of token `t` of a sequence whose pages are `pages`: `page * page_size + offset`.
#[inline]
pub(crate) fn slot(pages: &[u32], page_size: usize, t: usize) -> usize {
    pages[t / page_size] as usize * page_size + t % page_size
}

/// The element ranges `(offset, len)` within one page of one layer that hold slots
/// `keep..page_size` (every head), in the layout of `c`: one range for token-major pages,
/// one per head for head-major ones.
pub(crate) fn tail_rows(c: &CacheConfig, keep: usize) -> Vec<(usize, usize)> {
    let (ps, st) = (c.page_size, c.strides());
    if keep >= ps {
        return Vec::new();
    }
    if st[1] == c.num_kv_heads * c.head_dim {
        return vec![(keep * st[1], (ps - keep) * st[1])];
    }
    (0..c.num_kv_heads).map(|h| (h * st[2] + keep * st[1], (ps - keep) * c.head_dim)).collect()
}

/// Positions of a compaction: slot `i` of the new pages takes the position of the `i`-th
/// token of `first` (the first keep list) in the old pages.
pub(crate) fn compact_positions(positions: &mut [i32], old: &[u32], new: &[u32], first: &[u32], page_size: usize) {
    for (i, &t) in first.iter().enumerate() {
        positions[slot(new, page_size, i)] = positions[slot(old, page_size, t as usize)];
    }
}

/// The K/V rows one layer of a compaction moves to `new` pages, in destination order: for
/// kept slot `i` and KV head `h`, `f(i, h, src, dst)` with the element offsets (into the
/// layer's buffer, strides of `c`) of the source row in `old` and the destination row.
pub(crate) fn compact_rows(
    c: &CacheConfig,
    old: &[u32],
    new: &[u32],
    keep: KeepTokens,
    layer: usize,
    k: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let (ps, st) = (c.page_size, c.strides());
    for i in 0..k {
        let (dp, ds) = (new[i / ps] as usize, i % ps);
        for h in 0..c.num_kv_heads {
            let t = keep.list(layer, h, c.num_kv_heads)[i] as usize;
            let (sp, ss) = (old[t / ps] as usize, t % ps);
            f(i, h, sp * st[0] + ss * st[1] + h * st[2], dp * st[0] + ds * st[1] + h * st[2]);
        }
    }
}

/// Which tokens [`KvCache::compact`](crate::KvCache::compact) keeps.
#[derive(Debug, Clone, Copy)]
pub enum KeepTokens<'a> {
    /// One ascending list for every layer and head.
    All(&'a Vec<u32>),
    /// One ascending list per layer, all the same length.
    PerLayer(&'a [Vec<u32>]),
    /// One ascending list per (layer, KV head), layer-major, all the same length.
    PerHead(&'a [Vec<u32>]),
}

impl<'a> KeepTokens<'a> {
    /// The lists, checked for a cache of config `c` and a sequence of `seq_len` tokens: the
    /// right count, one length, strictly ascending tokens below `seq_len`, and one list for
    /// every layer and head when keys are stored before RoPE. Returns the lists and their
    /// common length.
    pub(crate) fn checked(&self, c: &CacheConfig, seq_len: usize) -> Result<(&'a [Vec<u32>], usize)> {
        let (lists, want): (&[Vec<u32>], usize) = match *self {
            KeepTokens::All(l) => (std::slice::from_ref(l), 1),
            KeepTokens::PerLayer(l) => (l, c.num_layers),
            KeepTokens::PerHead(l) => (l, c.num_layers * c.num_kv_heads),
        };
        if lists.len() != want {
            return Err(Error::shape("keep", format!("{want} token lists"), format!("{}", lists.len())));
        }
        let k = lists[0].len();
        for (li, l) in lists.iter().enumerate() {
            if l.len() != k {
                return Err(Error::shape(
                    format!("keep[{li}]"),
                    format!("{k} tokens (as keep[0])"),
                    format!("{}", l.len()),
                ));
            }
            if let Some(i) = (0..l.len()).find(|&i| l[i] as usize >= seq_len || (i > 0 && l[i] <= l[i - 1])) {
                return Err(Error::invalid(
                    format!("keep[{li}][{i}]"),
                    format!("strictly ascending token indices below seq_len {seq_len}, got {}", l[i]),
                ));
            }
        }
        if c.key_rope == KeyRope::PreRope && lists.iter().any(|l| l != &lists[0]) {
            return Err(Error::invalid(
                "keep",
                "the same tokens in every list: keys stored before RoPE need one position per slot",
            ));
        }
        Ok((lists, k))
    }

    /// The list slot `i` of (`layer`, KV head `head`) is filled from.
    pub(crate) fn list(&self, layer: usize, head: usize, num_kv_heads: usize) -> &'a [u32] {
        match *self {
            KeepTokens::All(l) => l,
            KeepTokens::PerLayer(l) => &l[layer],
            KeepTokens::PerHead(l) => &l[layer * num_kv_heads + head],
        }
    }
}
