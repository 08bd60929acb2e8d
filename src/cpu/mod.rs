//! CPU kernels, used by attention and selection alike: the instruction-set level chosen at
//! run time ([`isa`]), the score and weighted-sum tiles of attention (AVX-512F for head dims
//! that are multiples of 16, AVX2 + FMA + F16C, and a portable fallback), page-bound scoring,
//! the nearest-centroid tiles of K-means, prefetching, and conversion of stored rows
//! (f32, f16, bf16) to f32.
//!
//! Nothing here knows about caches, selections or policies: the kernels take rows by pointer
//! and write plain `f32` slices. Shapes: `q` holds `rows` query vectors of `d` channels;
//! `k_rows` / `v_rows` point at `t = k_rows.len()` key / value rows of `d` elements of
//! `dtype`; scores and weights are `[rows][t]` row-major.

mod attend;
mod isa;
mod prefetch;

pub(crate) mod assign;
pub(crate) mod bounds;
pub(crate) mod convert;

pub(crate) use attend::{accumulate_ahead, exp_sub_sum, max, scores, scores_ahead, scores_rope_ahead};
pub use isa::isa;
pub(crate) use isa::{has_avx2, has_avx512};
pub(crate) use prefetch::{prefetch, Ahead};

/// Defines a SIMD module's `accumulate` (see [`accumulate_ahead`]): its `acc_rows` over groups
/// of four query rows, then the last three, two or one; the first group prefetches `ahead`.
#[cfg(target_arch = "x86_64")]
macro_rules! accumulate_by_row_groups {
    ($features:literal) => {
        /// See [`super::accumulate_ahead`].
        #[target_feature(enable = $features)]
        pub unsafe fn accumulate<const L: u8>(
            o: &mut [f32],
            rows: usize,
            d: usize,
            v_rows: &[*const u8],
            p: &[f32],
            mut ahead: &[*const u8],
        ) {
            let t = v_rows.len();
            let (opp, pp) = (o.as_mut_ptr(), p.as_ptr());
            let mut r = 0;
            while r + 4 <= rows {
                acc_rows::<L, 4>(opp.add(r * d), d, v_rows, pp.add(r * t), t, std::mem::take(&mut ahead));
                r += 4;
            }
            match rows - r {
                3 => acc_rows::<L, 3>(opp.add(r * d), d, v_rows, pp.add(r * t), t, ahead),
                2 => acc_rows::<L, 2>(opp.add(r * d), d, v_rows, pp.add(r * t), t, ahead),
                1 => acc_rows::<L, 1>(opp.add(r * d), d, v_rows, pp.add(r * t), t, ahead),
                _ => {}
            }
        }
    };
}

mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

#[cfg(test)]
mod tests;
