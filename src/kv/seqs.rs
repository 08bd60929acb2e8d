//! The sequence table shared by the host cache ([`crate::KvCache`]) and the device cache:
//! each sequence's pages in token order and its length, ids handed out in increasing
//! order, and the page reference counts that creating, forking and freeing move.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::kv::pool::PagePool;
use crate::kv::table::PageTable;

/// Identifier of a sequence in a [`KvCache`](crate::KvCache). Never reused within one cache.
pub type SeqId = u64;

/// One sequence: page ids in token order (every page but the last is full) and its length.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sequence {
    pub pages: Vec<u32>,
    pub len: usize,
}

impl Sequence {
    /// Tokens in the last page (0 for an empty sequence).
    pub fn last_len(&self, page_size: usize) -> usize {
        match self.pages.len() {
            0 => 0,
            n => self.len - (n - 1) * page_size,
        }
    }
}

/// The live sequences of one cache, by id (ascending).
#[derive(Debug, Default)]
pub(crate) struct Sequences {
    map: BTreeMap<SeqId, Sequence>,
    next_id: SeqId,
}

impl Sequences {
    pub fn get(&self, id: SeqId) -> Result<&Sequence> {
        self.map.get(&id).ok_or(Error::UnknownSequence(id))
    }

    /// A new empty sequence.
    pub fn create(&mut self) -> SeqId {
        self.insert_new(Sequence::default())
    }

    /// A new sequence holding all of `src`'s pages, each page's reference count raised.
    pub fn fork(&mut self, pool: &mut PagePool, src: SeqId) -> Result<SeqId> {
        let from = self.get(src)?;
        let mut pages = crate::alloc::vec_with_capacity(from.pages.len(), "forked page list")?;
        pages.extend_from_slice(&from.pages);
        let s = Sequence { pages, len: from.len };
        for &p in &s.pages {
            pool.incref(p);
        }
        Ok(self.insert_new(s))
    }

    /// Drop a sequence; pages no other sequence shares go back to `pool`.
    pub fn free(&mut self, pool: &mut PagePool, id: SeqId) -> Result<()> {
        let s = self.map.remove(&id).ok_or(Error::UnknownSequence(id))?;
        for p in s.pages {
            pool.decref(p);
        }
        Ok(())
    }

    /// Remove whole pages of sequence `id` (pages of `page_size` slots): `page_indices`
    /// index its page list, strictly increasing (checked before anything changes). Each
    /// removed page loses one reference in `pool`; later token indices shift down.
    pub fn evict_pages(
        &mut self,
        pool: &mut PagePool,
        id: SeqId,
        page_indices: &[usize],
        page_size: usize,
    ) -> Result<()> {
        let s = self.map.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        let np = s.pages.len();
        for (i, &pi) in page_indices.iter().enumerate() {
            if pi >= np {
                return Err(Error::out_of_range(
                    format!("page_indices[{i}]"),
                    pi as i64,
                    format!("0..{np} (pages of sequence {id})"),
                ));
            }
            if i > 0 && page_indices[i - 1] >= pi {
                return Err(Error::invalid("page_indices", "strictly increasing page indices"));
            }
        }
        let last_len = if np == 0 { 0 } else { s.len - (np - 1) * page_size };
        for &pi in page_indices.iter().rev() {
            s.len -= if pi + 1 == np { last_len } else { page_size };
            pool.decref(s.pages.remove(pi));
        }
        Ok(())
    }

    /// The CSR page table of a batch of sequences, in the given order.
    pub fn page_table(&self, ids: &[SeqId], page_size: usize) -> Result<PageTable> {
        let mut t = PageTable { indptr: vec![0], ..Default::default() };
        for &id in ids {
            let s = self.get(id)?;
            t.indices.extend(s.pages.iter().map(|&p| p as i32));
            t.indptr.push(t.indices.len() as i32);
            t.last_page_len.push(s.last_len(page_size) as i32);
        }
        Ok(t)
    }

    fn insert_new(&mut self, s: Sequence) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.map.insert(id, s);
        id
    }

    /// Room for `n` more pages in sequence `id`'s page list (nothing else changes).
    pub fn reserve_pages(&mut self, id: SeqId, n: usize) -> Result<()> {
        let s = self.map.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        crate::alloc::reserve(&mut s.pages, n, "page list")
    }

    /// Take a sequence out to change it; the caller has checked that `id` exists and puts
    /// the sequence back with [`Sequences::put`].
    pub fn take(&mut self, id: SeqId) -> Sequence {
        self.map.remove(&id).expect("sequence checked by the caller")
    }

    pub fn put(&mut self, id: SeqId, s: Sequence) {
        self.map.insert(id, s);
    }

    pub fn ids(&self) -> Vec<SeqId> {
        self.map.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SeqId, &Sequence)> {
        self.map.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &Sequence> {
        self.map.values()
    }
}
