//! The attention tiles' entry points: each picks the best kernel for the dtype, the head dim
//! and the level in use ([`super::isa`]), then runs it.

#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512, has_avx512};
use super::{has_avx2, portable};
use crate::dtype::DType;

/// `out[r][j] = q[r] · k_rows[j]`.
///
/// # Safety
/// 1. every pointer in `k_rows` is valid for reads of `d` elements of `dtype`;
/// 2. `q.len() >= rows * d` and `out.len() >= rows * k_rows.len()`; `d` is a multiple of 8.
pub(crate) unsafe fn scores(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], dtype: DType, out: &mut [f32]) {
    scores_ahead(q, rows, d, k_rows, dtype, out, &[])
}

/// [`scores`], prefetching the rows `ahead` (the keys of the next call, `d` elements of
/// `dtype` each; any addresses) a few at a time between the dot products, so that reading
/// the next block overlaps with computing this one.
///
/// # Safety
/// As for [`scores`].
pub(crate) unsafe fn scores_ahead(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    dtype: DType,
    out: &mut [f32],
    ahead: &[*const u8],
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && has_avx512() {
        return match dtype {
            DType::F32 => avx512::scores::<{ avx2::F32 }>(q, rows, d, k_rows, out, ahead),
            DType::F16 => avx512::scores::<{ avx2::F16 }>(q, rows, d, k_rows, out, ahead),
            DType::BF16 => avx512::scores::<{ avx2::BF16 }>(q, rows, d, k_rows, out, ahead),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return match dtype {
            DType::F32 => avx2::scores::<{ avx2::F32 }>(q, rows, d, k_rows, out, ahead),
            DType::F16 => avx2::scores::<{ avx2::F16 }>(q, rows, d, k_rows, out, ahead),
            DType::BF16 => avx2::scores::<{ avx2::BF16 }>(q, rows, d, k_rows, out, ahead),
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    portable::scores(q, rows, d, k_rows, dtype, out)
}

/// [`scores_ahead`] of keys stored before RoPE, each rotated in registers as it is read:
/// key `j` by the `rot / 2` (cos, sin) pairs at `cs[j]`, paired `(i, i + rot / 2)` when
/// `half_split`, else `(2i, 2i + 1)`; the scores equal those of rotating each row with
/// `RopeConfig::rotate` first. The AVX-512 tile runs where [`rope_avx512`] says so, else the
/// AVX2 one. Returns false, computing nothing, where no fused kernel applies (no AVX2, or
/// `rot` not a multiple of 16 / 8); the caller then rotates rows.
///
/// # Safety
/// As for [`scores`], and every `cs[j]` is valid for reads of `rot` floats
/// (`cs.len() == k_rows.len()`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_rope_ahead(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    dtype: DType,
    (cs, rot, half_split): (&[*const f32], usize, bool),
    out: &mut [f32],
    ahead: &[*const u8],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if rope_avx512(rows, d, rot, half_split) {
        debug_assert_eq!(cs.len(), k_rows.len());
        let rope = avx2::Rope { cs, rot, half_split };
        match dtype {
            DType::F32 => avx512::scores_rope::<{ avx2::F32 }>(q, rows, d, k_rows, rope, out, ahead),
            DType::F16 => avx512::scores_rope::<{ avx2::F16 }>(q, rows, d, k_rows, rope, out, ahead),
            DType::BF16 => avx512::scores_rope::<{ avx2::BF16 }>(q, rows, d, k_rows, rope, out, ahead),
        }
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && rot <= d && rot.is_multiple_of(if half_split { 16 } else { 8 }) {
        debug_assert_eq!(cs.len(), k_rows.len());
        let rope = avx2::Rope { cs, rot, half_split };
        match dtype {
            DType::F32 => avx2::scores_tile::<{ avx2::F32 }, true>(q, rows, d, k_rows, rope, out, ahead),
            DType::F16 => avx2::scores_tile::<{ avx2::F16 }, true>(q, rows, d, k_rows, rope, out, ahead),
            DType::BF16 => avx2::scores_tile::<{ avx2::BF16 }, true>(q, rows, d, k_rows, rope, out, ahead),
        }
        return true;
    }
    let _ = (q, rows, d, k_rows, dtype, cs, rot, half_split, out, ahead);
    false
}

/// Whether [`scores_rope_ahead`] runs the AVX-512 tile (which then matches [`scores`] on
/// rotated rows computed with AVX-512 too): AVX-512 in use, rows a multiple of 4, `d` of
/// 16, and the rotary dim of 16 (adjacent pairs) or 32 (half split).
pub(crate) fn rope_avx512(rows: usize, d: usize, rot: usize, half_split: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    return has_avx512()
        && rows.is_multiple_of(4)
        && d.is_multiple_of(16)
        && rot <= d
        && rot.is_multiple_of(if half_split { 32 } else { 16 });
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, d, rot, half_split);
        false
    }
}

/// `o[r] += sum_j p[r][j] * v_rows[j]`, prefetching the rows `ahead` as [`scores_ahead`] does.
///
/// # Safety
/// 1. every pointer in `v_rows` is valid for reads of `d` elements of `dtype`;
/// 2. `o.len() >= rows * d` and `p.len() >= rows * v_rows.len()`; `d` is a multiple of 8.
pub(crate) unsafe fn accumulate_ahead(
    o: &mut [f32],
    rows: usize,
    d: usize,
    v_rows: &[*const u8],
    dtype: DType,
    p: &[f32],
    ahead: &[*const u8],
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && has_avx512() {
        return match dtype {
            DType::F32 => avx512::accumulate::<{ avx2::F32 }>(o, rows, d, v_rows, p, ahead),
            DType::F16 => avx512::accumulate::<{ avx2::F16 }>(o, rows, d, v_rows, p, ahead),
            DType::BF16 => avx512::accumulate::<{ avx2::BF16 }>(o, rows, d, v_rows, p, ahead),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return match dtype {
            DType::F32 => avx2::accumulate::<{ avx2::F32 }>(o, rows, d, v_rows, p, ahead),
            DType::F16 => avx2::accumulate::<{ avx2::F16 }>(o, rows, d, v_rows, p, ahead),
            DType::BF16 => avx2::accumulate::<{ avx2::BF16 }>(o, rows, d, v_rows, p, ahead),
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    portable::accumulate(o, rows, d, v_rows, dtype, p)
}

/// The largest element (`-inf` for an empty slice or all `-inf`).
pub(crate) fn max(x: &[f32]) -> f32 {
    // Eight independent running maxima, so the loop is not one long dependency chain.
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &b) in m.iter_mut().zip(c) {
            *a = if b > *a { b } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    m.iter().fold(tail, |a, &b| if b > a { b } else { a })
}

/// `x[i] = exp(x[i] - m)`, returning the sum. `-inf` inputs give 0.
pub(crate) fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
        return unsafe { avx2::exp_sub_sum(x, m) };
    }
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    s
}
