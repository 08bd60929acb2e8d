//! The CSR page table (FlashInfer's convention) for a batch of sequences.

use crate::error::{Error, Result};

/// Page table of a batch in CSR form.
///
/// Invariants (checked by [`PageTableRef::validate`]):
/// - `indptr.len() == batch + 1`, `indptr[0] == 0`, non-decreasing, `indptr[batch] == indices.len()`;
/// - every `indices[i]` is a page id in `0..num_pages`;
/// - `last_page_len.len() == batch`; for a sequence with pages `1 <= last_page_len <= page_size`,
///   for a sequence without pages `last_page_len == 0`.
///
/// Sequence `b` holds `(indptr[b+1] - indptr[b] - 1) * page_size + last_page_len[b]` tokens;
/// its token `t` lives in page `indices[indptr[b] + t / page_size]`, slot `t % page_size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTable {
    pub indptr: Vec<i32>,
    pub indices: Vec<i32>,
    pub last_page_len: Vec<i32>,
}

impl PageTable {
    pub fn batch_size(&self) -> usize {
        self.last_page_len.len()
    }

    /// Borrowed form.
    pub fn as_ref(&self) -> PageTableRef<'_> {
        PageTableRef { indptr: &self.indptr, indices: &self.indices, last_page_len: &self.last_page_len }
    }
}

/// A borrowed CSR page table (for tables owned by an engine).
#[derive(Debug, Clone, Copy)]
pub struct PageTableRef<'a> {
    pub indptr: &'a [i32],
    pub indices: &'a [i32],
    pub last_page_len: &'a [i32],
}

impl<'a> PageTableRef<'a> {
    pub fn batch_size(&self) -> usize {
        self.last_page_len.len()
    }

    /// Check the CSR invariants against a pool of `num_pages` pages of `page_size` slots.
    pub fn validate(&self, page_size: usize, num_pages: usize) -> Result<()> {
        let batch = self.last_page_len.len();
        if self.indptr.len() != batch + 1 {
            return Err(Error::shape(
                "indptr",
                format!("[{}] (batch + 1, batch from last_page_len)", batch + 1),
                format!("[{}]", self.indptr.len()),
            ));
        }
        if self.indptr[0] != 0 {
            return Err(Error::invalid("indptr", format!("indptr[0] == 0, got {}", self.indptr[0])));
        }
        for b in 0..batch {
            if self.indptr[b + 1] < self.indptr[b] {
                return Err(Error::invalid(
                    "indptr",
                    format!("non-decreasing values, indptr[{}] < indptr[{b}]", b + 1),
                ));
            }
            let n = self.indptr[b + 1] - self.indptr[b];
            let last = self.last_page_len[b];
            let ok = if n == 0 { last == 0 } else { last >= 1 && last as usize <= page_size };
            if !ok {
                return Err(Error::invalid(
                    "last_page_len",
                    format!(
                        "last_page_len[{b}] in 1..={page_size} for a sequence with pages (0 without), got {last} with {n} pages"
                    ),
                ));
            }
        }
        if self.indptr[batch] as usize != self.indices.len() {
            return Err(Error::shape(
                "indices",
                format!("[{}] (indptr[batch])", self.indptr[batch]),
                format!("[{}]", self.indices.len()),
            ));
        }
        if let Some((i, &p)) = self.indices.iter().enumerate().find(|(_, &p)| p < 0 || p as usize >= num_pages) {
            return Err(Error::out_of_range(
                format!("indices[{i}]"),
                p as i64,
                format!("0..{num_pages} (pages in the KV memory)"),
            ));
        }
        Ok(())
    }

    /// Tokens held by sequence `b`.
    #[inline]
    pub fn seq_len(&self, b: usize, page_size: usize) -> usize {
        let n = (self.indptr[b + 1] - self.indptr[b]) as usize;
        if n == 0 {
            0
        } else {
            (n - 1) * page_size + self.last_page_len[b] as usize
        }
    }
}
