//! Linear-time top-k over scores, shared by the selection methods that rank tokens, pages
//! or clusters.
//!
//! Order: a higher score ranks first; equal scores rank by lower index; NaN counts as
//! `-inf` (so it ranks last, among the `-inf` scores, by index).

use std::cmp::Ordering;

/// The score with NaN mapped to `-inf`.
#[inline]
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// `Less` when index `a` ranks before index `b` (higher score, then lower index).
#[inline]
pub(crate) fn rank_cmp(scores: &[f32], a: u32, b: u32) -> Ordering {
    let (sa, sb) = (key(scores[a as usize]), key(scores[b as usize]));
    // Neither is NaN, so partial_cmp always answers.
    sb.partial_cmp(&sa).unwrap_or(Ordering::Equal).then(a.cmp(&b))
}

/// One integer whose ascending order is the rank order of `(score, index)`: the score
/// (NaN as `-inf`, `-0.0` as `0.0`) mapped to an order-preserving `u32` and inverted in the
/// high half, the index in the low half.
#[inline]
fn rank_key(score: f32, index: u32) -> u64 {
    let s = if score.is_nan() { f32::NEG_INFINITY } else { score + 0.0 };
    let b = s.to_bits();
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    ((!ascending as u64) << 32) | index as u64
}

/// Reorder `idx` (indices into `scores`) so that its first `k` entries are the `k`
/// best-ranked ones, in no particular order. Expected linear time: a selection over
/// [`rank_key`]s, which compares plain integers instead of looking scores up through the
/// indices (about a third of page-bound selection's time at 8,192 pages per head before).
pub(crate) fn partition_top(scores: &[f32], idx: &mut [u32], k: usize) {
    if k == 0 || k >= idx.len() {
        return;
    }
    let mut keys: Vec<u64> = idx.iter().map(|&i| rank_key(scores[i as usize], i)).collect();
    keys.select_nth_unstable(k - 1);
    for (i, &key) in idx.iter_mut().zip(&keys) {
        *i = key as u32;
    }
}

/// Indices of the `k` largest scores, sorted ascending by index.
///
/// Ties are broken by the lower index; NaN counts as `-inf`. A `k` of at least
/// `scores.len()` returns every index. Runs in expected `O(n + k log k)` time
/// (a partition around the `k`-th best, then a sort of the `k` kept indices).
///
/// Panics if `scores.len()` exceeds `u32::MAX` or its buffers cannot be allocated.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    assert!(scores.len() <= u32::MAX as usize, "top_k: more than u32::MAX scores");
    try_top_k(scores, k).unwrap_or_else(|e| panic!("top_k: {e}"))
}

/// [`top_k`] with its buffers allocated fallibly ([`crate::Error::OutOfMemory`]), for
/// score lists as long as a caller's context. `scores.len()` must fit u32.
pub(crate) fn try_top_k(scores: &[f32], k: usize) -> crate::error::Result<Vec<u32>> {
    let n = scores.len();
    debug_assert!(n <= u32::MAX as usize);
    if k == 0 {
        return Ok(Vec::new());
    }
    let mut idx = crate::alloc::collect_n(n, 0..n as u32, "top-k indices")?;
    if k >= n {
        return Ok(idx);
    }
    let mut keys = crate::alloc::vec_with_capacity(n, "top-k keys")?;
    keys.extend(idx.iter().map(|&i| rank_key(scores[i as usize], i)));
    keys.select_nth_unstable(k - 1);
    for (i, &key) in idx.iter_mut().zip(&keys) {
        *i = key as u32;
    }
    idx.truncate(k);
    idx.sort_unstable();
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `k` best by a full sort (higher score first, NaN as -inf, ties by index),
    /// ascending by index.
    fn naive(scores: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
        idx.sort_by(|&a, &b| rank_cmp(scores, a, b));
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let mut x = 0x9E37_79B9u32;
        for n in [0usize, 1, 2, 7, 64, 1000] {
            let scores: Vec<f32> = (0..n)
                .map(|i| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    match i % 11 {
                        0 => f32::NAN,
                        1 => 0.5,
                        _ => (x >> 16) as f32 / 65536.0 - 0.5,
                    }
                })
                .collect();
            for k in [0, 1, 2, n / 3, n.saturating_sub(1), n, n + 5] {
                assert_eq!(top_k(&scores, k), naive(&scores, k), "n {n}, k {k}");
                assert_eq!(try_top_k(&scores, k).unwrap(), naive(&scores, k), "n {n}, k {k}");
            }
        }
    }
}
