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

/// Reorder `idx` (indices into `scores`) so that its first `k` entries are the `k`
/// best-ranked ones, in no particular order. Expected linear time.
pub(crate) fn partition_top(scores: &[f32], idx: &mut [u32], k: usize) {
    if k == 0 || k >= idx.len() {
        return;
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| rank_cmp(scores, a, b));
}

/// Indices of the `k` largest scores, sorted ascending by index.
///
/// Ties are broken by the lower index; NaN counts as `-inf`. A `k` of at least
/// `scores.len()` returns every index. Runs in expected `O(n + k log k)` time
/// (`select_nth_unstable_by`, then a sort of the `k` kept indices).
///
/// Panics if `scores.len()` exceeds `u32::MAX`.
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    assert!(scores.len() <= u32::MAX as usize, "top_k: more than u32::MAX scores");
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    if k >= idx.len() {
        return idx;
    }
    partition_top(scores, &mut idx, k);
    idx.truncate(k);
    idx.sort_unstable();
    idx
}
