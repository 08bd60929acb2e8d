//! The sequence table shared by the host cache ([`crate::KvCache`]) and the device cache:
//! each sequence's pages in token order and its length, ids handed out in increasing
//! order, and the page reference counts that creating, forking and freeing move.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::kv::pool::PagePool;
use crate::kv::SeqId;

/// One sequence: page ids in token order (every page but the last is full) and its length.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sequence {
    pub pages: Vec<u32>,
    pub len: usize,
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
        let s = self.get(src)?.clone();
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

    fn insert_new(&mut self, s: Sequence) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.map.insert(id, s);
        id
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
