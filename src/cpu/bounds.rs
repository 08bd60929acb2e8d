//! The inner loop of page-bound scoring: for each page and KV head, the largest upper
//! bound of `q·k` over the pages' keys among the query heads of the KV head's GQA group.
//! An AVX-512F path (head dims that are multiples of 16: four pages against four query rows
//! per tile) or an AVX2 + FMA + F16C path is chosen at run time, with a portable fallback;
//! bounds are read in their storage dtype and converted to f32 in registers. The paths
//! round differently (sums in other orders), but on one machine a page's score never
//! depends on which other pages are scored with it.
//!
//! Per channel the bound picks `max[i]` where `q[i] >= 0` and `min[i]` where `q[i] < 0`
//! (by the sign bit), which equals `max(q[i] * max[i], q[i] * min[i])` because
//! `min[i] <= max[i]`; then one FMA accumulates it.

use crate::dtype::{load_f32, DType};

#[cfg(target_arch = "x86_64")]
use crate::cpu::{has_avx2, has_avx512};

/// Geometry of one layer's bounds: `[page][head][min | max][head_dim]` elements of `dtype`.
#[derive(Clone, Copy)]
pub(crate) struct BoundsLayout<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
}

impl BoundsLayout<'_> {
    /// Bytes of one page (every head, min and max).
    fn page_bytes(&self) -> usize {
        self.num_kv_heads * 2 * self.head_dim * self.dtype.size()
    }

    /// Pages the buffer holds.
    pub fn num_pages(&self) -> usize {
        self.bytes.len() / self.page_bytes()
    }
}

/// Scores of a block of pages, written `[page][kv_head]` into `out`
/// (`out.len() == pages.len() * num_kv_heads`). `q` is `[num_kv_heads * group][head_dim]`.
/// Every page id must be below `layout.num_pages()` and `q.len()` must be
/// `num_kv_heads * group * head_dim` (both checked by the caller).
pub(crate) fn score_block(layout: &BoundsLayout, pages: &[u32], q: &[f32], out: &mut [f32]) {
    assert!(pages.iter().all(|&p| (p as usize) < layout.num_pages()));
    assert_eq!(q.len(), layout.num_kv_heads * layout.group * layout.head_dim);
    assert_eq!(out.len(), pages.len() * layout.num_kv_heads);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && layout.head_dim.is_multiple_of(16) {
        // SAFETY: the CPU supports AVX-512F (and the AVX2 set); page ids are within the buffer
        // and head_dim is a multiple of 16 (asserted and checked above), so every load is in
        // bounds.
        unsafe {
            match layout.dtype {
                DType::F32 => avx512::score_block::<{ avx2::F32 }>(layout, pages, q, out),
                DType::F16 => avx512::score_block::<{ avx2::F16 }>(layout, pages, q, out),
                DType::BF16 => avx512::score_block::<{ avx2::BF16 }>(layout, pages, q, out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && layout.head_dim.is_multiple_of(8) {
        // SAFETY: the CPU supports AVX2, FMA and F16C; page ids are within the buffer and
        // head_dim is a multiple of 8 (asserted and checked above), so every load is in bounds.
        unsafe {
            match layout.dtype {
                DType::F32 => avx2::score_block::<{ avx2::F32 }>(layout, pages, q, out),
                DType::F16 => avx2::score_block::<{ avx2::F16 }>(layout, pages, q, out),
                DType::BF16 => avx2::score_block::<{ avx2::BF16 }>(layout, pages, q, out),
            }
        }
        return;
    }
    portable::score_block(layout, pages, q, out)
}

/// Whether page `page`, head `h` has no written slot (min > max on channel 0; a written
/// slot always gives min <= max on every channel).
#[inline(always)]
fn is_empty(layout: &BoundsLayout, page: usize, h: usize) -> bool {
    let base = (page * layout.num_kv_heads + h) * 2 * layout.head_dim;
    load_f32(layout.bytes, layout.dtype, base) > load_f32(layout.bytes, layout.dtype, base + layout.head_dim)
}

mod portable {
    use super::{is_empty, BoundsLayout};
    use crate::dtype::load_f32;

    pub fn score_block(layout: &BoundsLayout, pages: &[u32], q: &[f32], out: &mut [f32]) {
        let (hk, d, g) = (layout.num_kv_heads, layout.head_dim, layout.group);
        let mut lo = vec![0f32; d];
        let mut hi = vec![0f32; d];
        for (j, &p) in pages.iter().enumerate() {
            let p = p as usize;
            for h in 0..hk {
                if is_empty(layout, p, h) {
                    out[j * hk + h] = f32::NEG_INFINITY;
                    continue;
                }
                let base = (p * hk + h) * 2 * d;
                for c in 0..d {
                    lo[c] = load_f32(layout.bytes, layout.dtype, base + c);
                    hi[c] = load_f32(layout.bytes, layout.dtype, base + d + c);
                }
                let mut best = f32::NEG_INFINITY;
                for qr in q[h * g * d..(h + 1) * g * d].chunks_exact(d) {
                    let s: f32 = qr
                        .iter()
                        .zip(lo.iter().zip(&hi))
                        .map(|(&x, (&m, &mx))| x * if x.is_sign_negative() { m } else { mx })
                        .sum();
                    best = best.max(s);
                }
                out[j * hk + h] = best;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{is_empty, BoundsLayout};
    use std::arch::x86_64::*;

    use crate::cpu::avx2::{hsum, load8, size};
    pub use crate::cpu::avx2::{BF16, F16, F32};
    use crate::cpu::prefetch;

    /// `acc += q * (q < 0 ? lo : hi)` on 8 lanes (the sign bit of q picks `lo`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn step(q: __m256, lo: __m256, hi: __m256, acc: __m256) -> __m256 {
        _mm256_fmadd_ps(q, _mm256_blendv_ps(hi, lo, q), acc)
    }

    /// Largest bound over G query rows (row stride `d`) for one page and head. Two
    /// accumulators per row keep enough FMAs in flight.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows<const L: u8, const G: usize>(q: *const f32, d: usize, lo: *const u8, hi: *const u8) -> f32 {
        let mut a0 = [_mm256_setzero_ps(); G];
        let mut a1 = [_mm256_setzero_ps(); G];
        let mut c = 0;
        while c + 16 <= d {
            let l0 = load8::<L>(lo.add(c * size::<L>()));
            let h0 = load8::<L>(hi.add(c * size::<L>()));
            let l1 = load8::<L>(lo.add((c + 8) * size::<L>()));
            let h1 = load8::<L>(hi.add((c + 8) * size::<L>()));
            for (g, (x0, x1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                *x0 = step(_mm256_loadu_ps(q.add(g * d + c)), l0, h0, *x0);
                *x1 = step(_mm256_loadu_ps(q.add(g * d + c + 8)), l1, h1, *x1);
            }
            c += 16;
        }
        if c < d {
            let l0 = load8::<L>(lo.add(c * size::<L>()));
            let h0 = load8::<L>(hi.add(c * size::<L>()));
            for (g, x0) in a0.iter_mut().enumerate() {
                *x0 = step(_mm256_loadu_ps(q.add(g * d + c)), l0, h0, *x0);
            }
        }
        let mut s = [_mm256_setzero_ps(); G];
        for (g, x) in s.iter_mut().enumerate() {
            *x = _mm256_add_ps(a0[g], a1[g]);
        }
        if G == 4 {
            max4(s[0], s[1], s[2], s[3])
        } else {
            s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(hsum(x)))
        }
    }

    /// The largest of the horizontal sums of four vectors (the four sums reduced together).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn max4(a: __m256, b: __m256, c: __m256, d: __m256) -> f32 {
        // [a01 a23 b01 b23 | a45 a67 b45 b67] and likewise for c, d; then [a b c d] partials.
        let w = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let s = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps::<1>(w));
        // A NaN sum (only from an infinite bound times a zero query) may or may not win here;
        // ranking treats a NaN score as -inf.
        let m = _mm_max_ps(_mm_movehl_ps(s, s), s);
        let m = _mm_max_ss(_mm_movehdup_ps(m), m);
        _mm_cvtss_f32(m)
    }

    /// # Safety
    /// 1. the CPU supports AVX2, FMA and F16C;
    /// 2. every page id is below `layout.num_pages()`, `head_dim` is a multiple of 8,
    ///    `q.len() == num_kv_heads * group * head_dim`, `out.len() == pages.len() * num_kv_heads`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn score_block<const L: u8>(layout: &BoundsLayout, pages: &[u32], q: &[f32], out: &mut [f32]) {
        let (hk, d, g) = (layout.num_kv_heads, layout.head_dim, layout.group);
        let row = d * size::<L>();
        let page_bytes = layout.page_bytes();
        let base = layout.bytes.as_ptr();
        let qp = q.as_ptr();
        for (j, &p) in pages.iter().enumerate() {
            let p = p as usize;
            let next = pages.get(j + 1).map(|&n| base.add(n as usize * page_bytes));
            for h in 0..hk {
                // Fetch the same head of the next page while this one computes.
                if let Some(n) = next {
                    prefetch(n.add(h * 2 * row), 2 * row);
                }
                if is_empty(layout, p, h) {
                    out[j * hk + h] = f32::NEG_INFINITY;
                    continue;
                }
                let lo = base.add(p * page_bytes + h * 2 * row);
                let hi = lo.add(row);
                let qh = qp.add(h * g * d);
                let mut best = f32::NEG_INFINITY;
                let mut r = 0;
                while r + 4 <= g {
                    best = best.max(rows::<L, 4>(qh.add(r * d), d, lo, hi));
                    r += 4;
                }
                if r + 2 <= g {
                    best = best.max(rows::<L, 2>(qh.add(r * d), d, lo, hi));
                    r += 2;
                }
                if r < g {
                    best = best.max(rows::<L, 1>(qh.add(r * d), d, lo, hi));
                }
                out[j * hk + h] = best;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{is_empty, BoundsLayout};
    use std::arch::x86_64::*;

    use crate::cpu::avx2::size;
    use crate::cpu::avx512::{load16, reduce16};
    use crate::cpu::prefetch;

    /// Bounds of four page-heads (`lo[c]` / `hi[c]`, `d` elements each) against four query
    /// rows: lane `c` of the result is page `c`'s largest bound over the rows. Per 16
    /// channels each row's sign bits pick `lo` or `hi` (a masked blend), then one FMA;
    /// accumulator `4c + r` holds page `c` with row `r`, so [`reduce16`] leaves row `r`'s
    /// four sums in 128-bit lane `r` and two shuffles take the maximum over rows. Every
    /// page's sums take the same steps whatever its position, so a page's score does not
    /// depend on the pages beside it.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn tile<const L: u8>(q: [*const f32; 4], d: usize, lo: [*const u8; 4], hi: [*const u8; 4]) -> __m128 {
        let sign = _mm512_set1_epi32(i32::MIN);
        let mut a = [_mm512_setzero_ps(); 16];
        let mut ch = 0;
        while ch < d {
            let o = ch * size::<L>();
            let l = [
                load16::<L>(lo[0].add(o)),
                load16::<L>(lo[1].add(o)),
                load16::<L>(lo[2].add(o)),
                load16::<L>(lo[3].add(o)),
            ];
            let h = [
                load16::<L>(hi[0].add(o)),
                load16::<L>(hi[1].add(o)),
                load16::<L>(hi[2].add(o)),
                load16::<L>(hi[3].add(o)),
            ];
            for (r, &qr) in q.iter().enumerate() {
                let qv = _mm512_loadu_ps(qr.add(ch));
                let neg = _mm512_test_epi32_mask(_mm512_castps_si512(qv), sign);
                for c in 0..4 {
                    a[4 * c + r] = _mm512_fmadd_ps(qv, _mm512_mask_blend_ps(neg, h[c], l[c]), a[4 * c + r]);
                }
            }
            ch += 16;
        }
        let v = reduce16(a);
        let v = _mm512_max_ps(v, _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v));
        let v = _mm512_max_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        _mm512_castps512_ps128(v)
    }

    /// # Safety
    /// 1. the CPU supports AVX-512F;
    /// 2. every page id is below `layout.num_pages()`, `head_dim` is a multiple of 16,
    ///    `q.len() == num_kv_heads * group * head_dim`, `out.len() == pages.len() * num_kv_heads`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn score_block<const L: u8>(layout: &BoundsLayout, pages: &[u32], q: &[f32], out: &mut [f32]) {
        let (hk, d, g) = (layout.num_kv_heads, layout.head_dim, layout.group);
        let row = d * size::<L>();
        let page_bytes = layout.page_bytes();
        let base = layout.bytes.as_ptr();
        let np = pages.len();
        // Four pages at a time; a short last group repeats its last page (results dropped).
        let at = |j: usize| base.add(pages[j.min(np - 1)] as usize * page_bytes);
        let mut j = 0;
        while j < np {
            let p = [at(j), at(j + 1), at(j + 2), at(j + 3)];
            let next = (j + 4 < np).then(|| [at(j + 4), at(j + 5), at(j + 6), at(j + 7)]);
            for h in 0..hk {
                if let Some(n) = next {
                    for x in n {
                        prefetch(x.add(h * 2 * row), 2 * row);
                    }
                }
                let lo = p.map(|x| x.add(h * 2 * row));
                let hi = lo.map(|x| x.add(row));
                // Rows four at a time; a short last group repeats its last row (the maximum is
                // unchanged).
                let qh = q.as_ptr().add(h * g * d);
                let qr = |r: usize| qh.add(r.min(g - 1) * d);
                let mut best = _mm_set1_ps(f32::NEG_INFINITY);
                let mut r = 0;
                while r < g {
                    let s = tile::<L>([qr(r), qr(r + 1), qr(r + 2), qr(r + 3)], d, lo, hi);
                    best = if r == 0 { s } else { _mm_max_ps(best, s) };
                    r += 4;
                }
                let mut s = [0f32; 4];
                _mm_storeu_ps(s.as_mut_ptr(), best);
                for (c, &v) in s.iter().enumerate().take(np - j) {
                    let e = is_empty(layout, pages[j + c] as usize, h);
                    out[(j + c) * hk + h] = if e { f32::NEG_INFINITY } else { v };
                }
            }
            j += 4;
        }
    }
}
