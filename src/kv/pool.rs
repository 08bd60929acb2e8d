//! The page pool: reference counts and a free list. Page ids are shared by all layers.

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub(crate) struct PagePool {
    refcount: Vec<u32>,
    /// Free page ids; allocation pops from the end, so the lowest ids are used first.
    free: Vec<u32>,
    /// Pages handed out at least once: their memory may hold an earlier owner's K/V and is
    /// cleared before it is handed out again. The others are still zero from allocation.
    used: Vec<bool>,
}

impl PagePool {
    pub fn new(capacity: usize) -> Result<Self> {
        let refcount = crate::alloc::zeroed_vec(capacity, "page pool reference counts")?;
        let mut free = crate::alloc::vec_with_capacity(capacity, "page pool free list")?;
        free.extend((0..capacity as u32).rev());
        let used = crate::alloc::zeroed_vec(capacity, "page pool use marks")?;
        Ok(PagePool { refcount, free, used })
    }

    pub fn capacity(&self) -> usize {
        self.refcount.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn refcount(&self, page: u32) -> u32 {
        self.refcount[page as usize]
    }

    /// Fail with `OutOfPages` unless `n` pages can be allocated.
    pub fn reserve(&self, n: usize) -> Result<()> {
        if n > self.free.len() {
            return Err(Error::OutOfPages { needed: n, free: self.free.len() });
        }
        Ok(())
    }

    /// Take one page (refcount 1), and whether it was handed out before (so its memory
    /// must be cleared: it may hold another sequence's K/V). Call [`PagePool::reserve`]
    /// first; panics if empty.
    pub fn alloc(&mut self) -> (u32, bool) {
        let p = self.free.pop().expect("page pool: alloc without reserve");
        debug_assert_eq!(self.refcount[p as usize], 0);
        self.refcount[p as usize] = 1;
        let reused = std::mem::replace(&mut self.used[p as usize], true);
        (p, reused)
    }

    pub fn incref(&mut self, page: u32) {
        debug_assert!(self.refcount[page as usize] > 0);
        self.refcount[page as usize] += 1;
    }

    /// Drop one reference; returns true if the page went back to the free list.
    pub fn decref(&mut self, page: u32) -> bool {
        let rc = &mut self.refcount[page as usize];
        debug_assert!(*rc > 0);
        *rc -= 1;
        if *rc == 0 {
            self.free.push(page);
            true
        } else {
            false
        }
    }

    /// Consistency check used by tests: free pages have refcount 0, exactly once each.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut seen = vec![false; self.capacity()];
        for &p in &self.free {
            if seen[p as usize] {
                return Err(format!("page {p} twice in the free list"));
            }
            seen[p as usize] = true;
            if self.refcount[p as usize] != 0 {
                return Err(format!("free page {p} has refcount {}", self.refcount[p as usize]));
            }
        }
        for (p, &rc) in self.refcount.iter().enumerate() {
            if rc == 0 && !seen[p] {
                return Err(format!("page {p} has refcount 0 but is not free (leak)"));
            }
        }
        Ok(())
    }
}
