//! [`Selection`]: which cached tokens each KV head of one (sequence, layer) reads.
//!
//! Every selection method produces one and sparse attention consumes one. The format is
//! CSR over KV heads: head `h` reads tokens `indices[head_indptr[h]..head_indptr[h + 1]]`,
//! strictly ascending, each below `seq_len`. Token indices count the sequence's tokens in
//! cache order (token `t` lives in page `t / page_size`, slot `t % page_size`). Query heads
//! of a GQA group share their KV head's tokens.

use crate::error::{Error, Result};

/// Tokens read by each KV head of one (sequence, layer), in CSR form over heads.
///
/// Invariants (checked by every public constructor):
/// - `head_indptr.len() == num_kv_heads + 1` with `num_kv_heads >= 1`, `head_indptr[0] == 0`,
///   non-decreasing, `head_indptr[num_kv_heads] == indices.len()`;
/// - within each head the indices are strictly ascending;
/// - every index is below `seq_len`, and `seq_len <= u32::MAX`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Selection {
    seq_len: usize,
    head_indptr: Vec<u32>,
    indices: Vec<u32>,
}

/// How much of a sequence a [`Selection`] keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionStats {
    /// Tokens in the sequence.
    pub seq_len: usize,
    /// Tokens kept per KV head.
    pub per_head: Vec<usize>,
    /// Tokens kept, summed over heads.
    pub total: usize,
    /// `total / (num_kv_heads * seq_len)`; 0 when `seq_len` is 0.
    pub density: f64,
    /// Smallest per-head density (`per_head[h] / seq_len`); 0 when `seq_len` is 0.
    pub min_density: f64,
    /// Largest per-head density; 0 when `seq_len` is 0.
    pub max_density: f64,
}

fn check_seq_len(seq_len: usize) -> Result<()> {
    if seq_len > u32::MAX as usize {
        return Err(Error::out_of_range(
            "seq_len",
            seq_len as i64,
            format!("0..={} (token indices are u32)", u32::MAX),
        ));
    }
    Ok(())
}

fn check_num_kv_heads(num_kv_heads: usize) -> Result<()> {
    if num_kv_heads == 0 || num_kv_heads > crate::config::MAX_KV_HEADS {
        return Err(Error::invalid(
            "num_kv_heads",
            format!("1 to {}, got {num_kv_heads}", crate::config::MAX_KV_HEADS),
        ));
    }
    Ok(())
}

/// Check that `total` selected tokens fit the u32 `head_indptr`.
fn check_total(total: usize) -> Result<()> {
    if total > u32::MAX as usize {
        return Err(Error::invalid(
            "indices",
            format!("at most {} selected tokens over all heads (head_indptr is u32), got {total}", u32::MAX),
        ));
    }
    Ok(())
}

/// Check one head's indices: strictly ascending and below `seq_len`. `base` is the
/// position of `head[0]` in the flat `indices` array, for messages.
fn check_head(head: &[u32], h: usize, base: usize, seq_len: usize) -> Result<()> {
    for (i, &t) in head.iter().enumerate() {
        if i > 0 && t <= head[i - 1] {
            return Err(Error::invalid(
                "indices",
                format!(
                    "strictly ascending token indices within each head, but indices[{}] = {t} is not greater than the previous index {} in head {h}",
                    base + i,
                    head[i - 1]
                ),
            ));
        }
        if t as usize >= seq_len {
            return Err(Error::out_of_range(
                format!("indices[{}]", base + i),
                t as i64,
                format!("0..{seq_len} (seq_len; head {h})"),
            ));
        }
    }
    Ok(())
}

/// Append the union of two strictly ascending lists to `out`, in one linear pass.
pub(crate) fn merge_union(a: &[u32], b: &[u32], out: &mut Vec<u32>) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        out.push(x.min(y));
        i += usize::from(x <= y);
        j += usize::from(y <= x);
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
}

/// Append the intersection of two strictly ascending lists to `out`, in one linear pass.
fn merge_intersection(a: &[u32], b: &[u32], out: &mut Vec<u32>) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        if x == y {
            out.push(x);
        }
        i += usize::from(x <= y);
        j += usize::from(y <= x);
    }
}

impl Selection {
    /// A selection from one strictly ascending token list per KV head.
    ///
    /// Errors: no heads, `seq_len` above `u32::MAX`, a head not strictly ascending or an
    /// index `>= seq_len` (the message names the flat position in `indices` and the head).
    pub fn from_heads(seq_len: usize, heads: Vec<Vec<u32>>) -> Result<Self> {
        check_seq_len(seq_len)?;
        check_num_kv_heads(heads.len())?;
        let total: usize = heads.iter().map(Vec::len).sum();
        check_total(total)?;
        let mut base = 0;
        for (h, head) in heads.iter().enumerate() {
            check_head(head, h, base, seq_len)?;
            base += head.len();
        }
        Self::from_heads_unchecked(seq_len, &heads)
    }

    /// A selection from its CSR arrays, validated: `head_indptr` has `num_kv_heads + 1 >= 2`
    /// entries, starts at 0, never decreases and ends at `indices.len()`; each head's
    /// indices are strictly ascending and below `seq_len`. Errors name the parameter and
    /// the first offending position.
    pub fn from_csr(seq_len: usize, head_indptr: Vec<u32>, indices: Vec<u32>) -> Result<Self> {
        check_seq_len(seq_len)?;
        if head_indptr.len() < 2 {
            return Err(Error::shape(
                "head_indptr",
                "[num_kv_heads + 1] with num_kv_heads >= 1",
                format!("[{}]", head_indptr.len()),
            ));
        }
        if head_indptr[0] != 0 {
            return Err(Error::invalid("head_indptr", format!("head_indptr[0] == 0, got {}", head_indptr[0])));
        }
        for h in 1..head_indptr.len() {
            if head_indptr[h] < head_indptr[h - 1] {
                return Err(Error::invalid(
                    "head_indptr",
                    format!(
                        "non-decreasing offsets, but head_indptr[{h}] = {} is less than head_indptr[{}] = {}",
                        head_indptr[h],
                        h - 1,
                        head_indptr[h - 1]
                    ),
                ));
            }
        }
        let last = *head_indptr.last().expect("len >= 2") as usize;
        if last != indices.len() {
            return Err(Error::invalid(
                "head_indptr",
                format!("head_indptr[{}] == indices.len() = {}, got {last}", head_indptr.len() - 1, indices.len()),
            ));
        }
        for h in 0..head_indptr.len() - 1 {
            let (s, e) = (head_indptr[h] as usize, head_indptr[h + 1] as usize);
            check_head(&indices[s..e], h, s, seq_len)?;
        }
        Ok(Selection { seq_len, head_indptr, indices })
    }

    /// Every token for every head.
    ///
    /// Errors: `num_kv_heads` 0, `seq_len` above `u32::MAX`, or `num_kv_heads * seq_len`
    /// above `u32::MAX` (the CSR offsets are u32).
    pub fn dense(num_kv_heads: usize, seq_len: usize) -> Result<Self> {
        check_seq_len(seq_len)?;
        check_num_kv_heads(num_kv_heads)?;
        check_total(num_kv_heads.saturating_mul(seq_len))?;
        let mut tokens = crate::alloc::vec_with_capacity(seq_len, "selection indices")?;
        tokens.extend(0..seq_len as u32);
        Self::same_for_all_heads_unchecked(num_kv_heads, seq_len, tokens)
    }

    /// The same strictly ascending token list for every head (validated as in
    /// [`Selection::from_heads`]).
    pub fn same_for_all_heads(num_kv_heads: usize, seq_len: usize, tokens: Vec<u32>) -> Result<Self> {
        check_seq_len(seq_len)?;
        check_head(&tokens, 0, 0, seq_len)?;
        Self::same_for_all_heads_unchecked(num_kv_heads, seq_len, tokens)
    }

    /// `tokens` must already be strictly ascending and below `seq_len <= u32::MAX`.
    pub(crate) fn same_for_all_heads_unchecked(num_kv_heads: usize, seq_len: usize, tokens: Vec<u32>) -> Result<Self> {
        check_num_kv_heads(num_kv_heads)?;
        let total = num_kv_heads.saturating_mul(tokens.len());
        check_total(total)?;
        let n = tokens.len() as u32;
        let mut head_indptr = crate::alloc::vec_with_capacity(num_kv_heads + 1, "selection head_indptr")?;
        head_indptr.extend((0..=num_kv_heads as u32).map(|h| h * n));
        let indices = if num_kv_heads == 1 {
            tokens
        } else {
            let mut all = crate::alloc::vec_with_capacity(total, "selection indices")?;
            (0..num_kv_heads).for_each(|_| all.extend_from_slice(&tokens));
            all
        };
        Ok(Selection { seq_len, head_indptr, indices })
    }

    /// Build from per-head lists that are known to satisfy the invariants (at least one
    /// head, each strictly ascending and below `seq_len <= u32::MAX`, total within u32).
    /// Errors only when the arrays cannot be allocated.
    pub(crate) fn from_heads_unchecked(seq_len: usize, heads: &[Vec<u32>]) -> Result<Self> {
        let total: usize = heads.iter().map(Vec::len).sum();
        let mut indices = crate::alloc::vec_with_capacity(total, "selection indices")?;
        let mut head_indptr = crate::alloc::vec_with_capacity(heads.len() + 1, "selection head_indptr")?;
        head_indptr.push(0);
        for head in heads {
            debug_assert!(head.windows(2).all(|w| w[0] < w[1]) && head.last().is_none_or(|&t| (t as usize) < seq_len));
            indices.extend_from_slice(head);
            head_indptr.push(indices.len() as u32);
        }
        Ok(Selection { seq_len, head_indptr, indices })
    }

    /// Number of KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.head_indptr.len() - 1
    }

    /// Tokens in the sequence the selection was made for.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Token indices read by KV head `h`, strictly ascending. Panics if `h >= num_kv_heads()`.
    pub fn head(&self, h: usize) -> &[u32] {
        &self.indices[self.head_indptr[h] as usize..self.head_indptr[h + 1] as usize]
    }

    /// The CSR offsets, `num_kv_heads + 1` long.
    pub fn head_indptr(&self) -> &[u32] {
        &self.head_indptr
    }

    /// Every head's token indices, concatenated in head order.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Selected tokens summed over heads.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether no head reads any token.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Whether every head reads every token.
    pub fn is_dense(&self) -> bool {
        self.indices.len() == self.num_kv_heads() * self.seq_len
    }

    /// The CSR arrays `(seq_len, head_indptr, indices)`, giving up ownership.
    pub fn into_parts(self) -> (usize, Vec<u32>, Vec<u32>) {
        (self.seq_len, self.head_indptr, self.indices)
    }

    fn check_same_shape(&self, other: &Selection) -> Result<()> {
        if self.num_kv_heads() != other.num_kv_heads() || self.seq_len != other.seq_len {
            return Err(Error::invalid(
                "other",
                format!(
                    "a selection with the same num_kv_heads ({}) and seq_len ({}), got num_kv_heads {} and seq_len {}",
                    self.num_kv_heads(),
                    self.seq_len,
                    other.num_kv_heads(),
                    other.seq_len
                ),
            ));
        }
        Ok(())
    }

    fn combine(&self, other: &Selection, merge: fn(&[u32], &[u32], &mut Vec<u32>)) -> Result<Selection> {
        self.check_same_shape(other)?;
        // At most the two lists together: merging then never grows the vector.
        let most = self.indices.len() + other.indices.len();
        let mut indices = crate::alloc::vec_with_capacity(most, "selection indices")?;
        let mut head_indptr = crate::alloc::vec_with_capacity(self.head_indptr.len(), "selection head_indptr")?;
        head_indptr.push(0);
        for h in 0..self.num_kv_heads() {
            merge(self.head(h), other.head(h), &mut indices);
            head_indptr.push(indices.len() as u32);
        }
        check_total(indices.len())?;
        Ok(Selection { seq_len: self.seq_len, head_indptr, indices })
    }

    /// Per head, the tokens read by either selection (a linear merge). Errors if the two
    /// differ in `num_kv_heads` or `seq_len`.
    pub fn union(&self, other: &Selection) -> Result<Selection> {
        self.combine(other, merge_union)
    }

    /// Per head, the tokens read by both selections (a linear merge). Errors if the two
    /// differ in `num_kv_heads` or `seq_len`.
    pub fn intersection(&self, other: &Selection) -> Result<Selection> {
        self.combine(other, merge_intersection)
    }

    /// Kept-token counts and densities.
    pub fn stats(&self) -> SelectionStats {
        let per_head: Vec<usize> = (0..self.num_kv_heads()).map(|h| self.head(h).len()).collect();
        let total = self.indices.len();
        let (density, min_density, max_density) = if self.seq_len == 0 {
            (0.0, 0.0, 0.0)
        } else {
            let n = self.seq_len as f64;
            let min = per_head.iter().copied().min().unwrap_or(0) as f64 / n;
            let max = per_head.iter().copied().max().unwrap_or(0) as f64 / n;
            (total as f64 / (per_head.len() as f64 * n), min, max)
        };
        SelectionStats { seq_len: self.seq_len, per_head, total, density, min_density, max_density }
    }
}

/// Sparse attention reads a selection's per-head token lists.
impl crate::attention::HeadTokens for Selection {
    fn num_kv_heads(&self) -> usize {
        Selection::num_kv_heads(self)
    }
    fn seq_len(&self) -> usize {
        Selection::seq_len(self)
    }
    fn head(&self, h: usize) -> &[u32] {
        Selection::head(self, h)
    }
}
