//! AVX-512F versions of [`super::scores`] and [`super::accumulate_ahead`] for head dims that
//! are multiples of 16.

use super::avx2::{size, F16, F32};
use std::arch::x86_64::*;

/// Loads 16 consecutive elements of storage type `L` as f32.
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn load16<const L: u8>(p: *const u8) -> __m512 {
    match L {
        F32 => _mm512_loadu_ps(p as *const f32),
        F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        _ => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
        }
    }
}

/// Pairs 512-bit items into 256-bit partial sums: blocks [x0+x2, x1+x3, y0+y2, y1+y3].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold256(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y))
}

/// Pairs two [`fold256`] results into 128-bit partial sums, one block per item.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold128(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
}

/// Within each block: two items interleaved in 64-bit pairs, then summed to one lane each.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold32(v0: __m512, v1: __m512, v2: __m512, v3: __m512) -> __m512 {
    let p = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1)));
    let q = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3)));
    _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)))
}

/// Lane sums of 16 vectors at once: lane `4i + k` of the result is the sum of `a[4k + i]`.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
pub unsafe fn reduce16(a: [__m512; 16]) -> __m512 {
    let v0 = fold128(fold256(a[0], a[1]), fold256(a[2], a[3]));
    let v1 = fold128(fold256(a[4], a[5]), fold256(a[6], a[7]));
    let v2 = fold128(fold256(a[8], a[9]), fold256(a[10], a[11]));
    let v3 = fold128(fold256(a[12], a[13]), fold256(a[14], a[15]));
    fold32(v0, v1, v2, v3)
}

/// Lane order that undoes [`reduce16`]'s transpose: lane `l` then holds the sum of `a[l]`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn untranspose(v: __m512) -> __m512 {
    _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v)
}

/// `$acc = fma($a, $b, $acc)` for each listed triple (the tiles below are written out so
/// that their 16 accumulators stay in registers).
macro_rules! fmas {
    ($($a:expr, $b:expr => $acc:ident);* $(;)?) => { $( $acc = _mm512_fmadd_ps($a, $b, $acc); )* };
}

/// Channels `c..c + 16` of a key row; with `ROPE` and adjacent pairs (`c < rot`) rotated
/// as `avx2::load_key` rotates 8: lane `2i` is `x_2i cos_i - x_2i+1 sin_i`, lane `2i + 1`
/// is `x_2i+1 cos_i + x_2i sin_i`, separate multiplies then a subtract or an add, the bits
/// `RopeConfig::rotate` gives.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_key<const L: u8, const ROPE: bool>(k: *const u8, c: usize, cs: *const f32, rot: usize) -> __m512 {
    let x = load16::<L>(k.add(c * size::<L>()));
    if !ROPE || c >= rot {
        return x;
    }
    // Pairs c/2 .. c/2 + 8: their cos and sin, each repeated for the pair's two lanes.
    let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let cos = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(cs.add(c / 2))));
    let sin = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(cs.add(rot / 2 + c / 2))));
    let (xc, ys) = (_mm512_mul_ps(x, cos), _mm512_mul_ps(_mm512_permute_ps::<0b10_11_00_01>(x), sin));
    // Even lanes subtract, odd lanes add.
    _mm512_mask_sub_ps(_mm512_add_ps(xc, ys), 0x5555, xc, ys)
}

/// Half-split pairs `c..c + 16`: channels `c..c + 16` and `h + c..h + c + 16` of a key row
/// (`h = rot / 2`) rotated, `x_i cos - x_h+i sin` and `x_i sin + x_h+i cos`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load_half_pair<const L: u8>(k: *const u8, c: usize, cs: *const f32, h: usize) -> (__m512, __m512) {
    let lo = load16::<L>(k.add(c * size::<L>()));
    let hi = load16::<L>(k.add((h + c) * size::<L>()));
    let (cos, sin) = (_mm512_loadu_ps(cs.add(c)), _mm512_loadu_ps(cs.add(h + c)));
    (
        _mm512_sub_ps(_mm512_mul_ps(lo, cos), _mm512_mul_ps(hi, sin)),
        _mm512_add_ps(_mm512_mul_ps(lo, sin), _mm512_mul_ps(hi, cos)),
    )
}

/// Dot products of 4 query rows (stride `qs`) with 4 keys; accumulator `4c + r` holds row
/// r with key c, so in [`reduce16`]'s order lanes `4r..4r+4` are row r's four scores. With
/// `ROPE`, key `c` is rotated in registers by the rotation at `cs[c]` (`rope`: rotary dim
/// and whether pairs are half split; see `avx2::Rope`), half-split pairs' two halves
/// summed together.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn tile4x4<const L: u8, const ROPE: bool>(
    q: *const f32,
    qs: usize,
    d: usize,
    k: [*const u8; 4],
    cs: [*const f32; 4],
    rope: (usize, bool),
) -> __m512 {
    let [k0, k1, k2, k3] = k;
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
    let (mut a8, mut a9, mut a10, mut a11, mut a12, mut a13, mut a14, mut a15) = (z, z, z, z, z, z, z, z);
    let mut ch = 0;
    if ROPE && rope.1 {
        let h = rope.0 / 2;
        while ch < h {
            let (l0, h0) = load_half_pair::<L>(k0, ch, cs[0], h);
            let (l1, h1) = load_half_pair::<L>(k1, ch, cs[1], h);
            let (l2, h2) = load_half_pair::<L>(k2, ch, cs[2], h);
            let (l3, h3) = load_half_pair::<L>(k3, ch, cs[3], h);
            let ql = |r: usize| _mm512_loadu_ps(q.add(r * qs + ch));
            let qh = |r: usize| _mm512_loadu_ps(q.add(r * qs + h + ch));
            let (q0, p0) = (ql(0), qh(0));
            fmas!(q0, l0 => a0; q0, l1 => a4; q0, l2 => a8; q0, l3 => a12);
            fmas!(p0, h0 => a0; p0, h1 => a4; p0, h2 => a8; p0, h3 => a12);
            let (q1, p1) = (ql(1), qh(1));
            fmas!(q1, l0 => a1; q1, l1 => a5; q1, l2 => a9; q1, l3 => a13);
            fmas!(p1, h0 => a1; p1, h1 => a5; p1, h2 => a9; p1, h3 => a13);
            let (q2, p2) = (ql(2), qh(2));
            fmas!(q2, l0 => a2; q2, l1 => a6; q2, l2 => a10; q2, l3 => a14);
            fmas!(p2, h0 => a2; p2, h1 => a6; p2, h2 => a10; p2, h3 => a14);
            let (q3, p3) = (ql(3), qh(3));
            fmas!(q3, l0 => a3; q3, l1 => a7; q3, l2 => a11; q3, l3 => a15);
            fmas!(p3, h0 => a3; p3, h1 => a7; p3, h2 => a11; p3, h3 => a15);
            ch += 16;
        }
        ch = rope.0;
    }
    while ch < d {
        let (x0, x1, x2, x3) = (
            load_key::<L, ROPE>(k0, ch, cs[0], rope.0),
            load_key::<L, ROPE>(k1, ch, cs[1], rope.0),
            load_key::<L, ROPE>(k2, ch, cs[2], rope.0),
            load_key::<L, ROPE>(k3, ch, cs[3], rope.0),
        );
        let q0 = _mm512_loadu_ps(q.add(ch));
        fmas!(q0, x0 => a0; q0, x1 => a4; q0, x2 => a8; q0, x3 => a12);
        let q1 = _mm512_loadu_ps(q.add(qs + ch));
        fmas!(q1, x0 => a1; q1, x1 => a5; q1, x2 => a9; q1, x3 => a13);
        let q2 = _mm512_loadu_ps(q.add(2 * qs + ch));
        fmas!(q2, x0 => a2; q2, x1 => a6; q2, x2 => a10; q2, x3 => a14);
        let q3 = _mm512_loadu_ps(q.add(3 * qs + ch));
        fmas!(q3, x0 => a3; q3, x1 => a7; q3, x2 => a11; q3, x3 => a15);
        ch += 16;
    }
    reduce16([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15])
}

/// Stores a [`tile4x4`] result: row `i`'s scores (lanes `4i..4i+4`) at `out + i * stride`,
/// the first `n` (at most 4) of each.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_tile(v: __m512, out: *mut f32, stride: usize, n: usize) {
    if n == 4 {
        _mm_storeu_ps(out, _mm512_extractf32x4_ps::<0>(v));
        _mm_storeu_ps(out.add(stride), _mm512_extractf32x4_ps::<1>(v));
        _mm_storeu_ps(out.add(2 * stride), _mm512_extractf32x4_ps::<2>(v));
        _mm_storeu_ps(out.add(3 * stride), _mm512_extractf32x4_ps::<3>(v));
        return;
    }
    let mut s = [0f32; 16];
    _mm512_storeu_ps(s.as_mut_ptr(), v);
    for i in 0..4 {
        for c in 0..n {
            *out.add(i * stride + c) = s[4 * i + c];
        }
    }
}

/// Dot products of one query row with 16 keys, in key order.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn tile1x16<const L: u8>(q: *const f32, d: usize, k: &[*const u8]) -> __m512 {
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
    let (mut a8, mut a9, mut a10, mut a11, mut a12, mut a13, mut a14, mut a15) = (z, z, z, z, z, z, z, z);
    let mut ch = 0;
    while ch < d {
        let (x, o) = (_mm512_loadu_ps(q.add(ch)), ch * size::<L>());
        let kl = |c: usize| load16::<L>(k[c].add(o));
        fmas!(x, kl(0) => a0; x, kl(1) => a1; x, kl(2) => a2; x, kl(3) => a3; x, kl(4) => a4; x, kl(5) => a5; x, kl(6) => a6; x, kl(7) => a7);
        fmas!(x, kl(8) => a8; x, kl(9) => a9; x, kl(10) => a10; x, kl(11) => a11; x, kl(12) => a12; x, kl(13) => a13; x, kl(14) => a14; x, kl(15) => a15);
        ch += 16;
    }
    untranspose(reduce16([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15]))
}

/// Dot products of 16 query rows (stride `d`) with one key, in row order.
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn tile16x1<const L: u8>(q: *const f32, d: usize, k: *const u8) -> __m512 {
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
    let (mut a8, mut a9, mut a10, mut a11, mut a12, mut a13, mut a14, mut a15) = (z, z, z, z, z, z, z, z);
    let mut ch = 0;
    while ch < d {
        let x = load16::<L>(k.add(ch * size::<L>()));
        let ql = |r: usize| _mm512_loadu_ps(q.add(r * d + ch));
        fmas!(ql(0), x => a0; ql(1), x => a1; ql(2), x => a2; ql(3), x => a3; ql(4), x => a4; ql(5), x => a5; ql(6), x => a6; ql(7), x => a7);
        fmas!(ql(8), x => a8; ql(9), x => a9; ql(10), x => a10; ql(11), x => a11; ql(12), x => a12; ql(13), x => a13; ql(14), x => a14; ql(15), x => a15);
        ch += 16;
    }
    untranspose(reduce16([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15]))
}

/// One dot product, its lanes summed in [`reduce16`]'s order, so that a score does not
/// depend on which tile or tail computed it.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot<const L: u8>(q: *const f32, d: usize, k: *const u8) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut ch = 0;
    while ch < d {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(ch)), load16::<L>(k.add(ch * size::<L>())), acc);
        ch += 16;
    }
    let (lo, hi) = (_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))));
    super::avx2::hsum(_mm256_add_ps(lo, hi))
}

/// See [`super::scores`]; `d` is a multiple of 16.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores<const L: u8>(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    out: &mut [f32],
    ahead: &[*const u8],
) {
    let t = k_rows.len();
    let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
    let mut ahead = super::Ahead::new(ahead, d * size::<L>());
    let mut r = 0;
    if t == 1 {
        // Many rows against one key (K-means distances): 16 rows per tile.
        while r + 16 <= rows {
            _mm512_storeu_ps(op.add(r), tile16x1::<L>(qp.add(r * d), d, k_rows[0]));
            r += 16;
        }
    }
    while r + 4 <= rows {
        let mut j = 0;
        while j + 4 <= t {
            ahead.upto(j + 4);
            let k = [k_rows[j], k_rows[j + 1], k_rows[j + 2], k_rows[j + 3]];
            let v = tile4x4::<L, false>(qp.add(r * d), d, d, k, [std::ptr::null(); 4], (0, false));
            store_tile(v, op.add(r * t + j), t, 4);
            j += 4;
        }
        for (j, &k) in k_rows.iter().enumerate().skip(j) {
            for i in 0..4 {
                *op.add((r + i) * t + j) = dot::<L>(qp.add((r + i) * d), d, k);
            }
        }
        r += 4;
    }
    for r in r..rows {
        let mut j = 0;
        while j + 16 <= t {
            ahead.upto(j + 16);
            _mm512_storeu_ps(op.add(r * t + j), tile1x16::<L>(qp.add(r * d), d, &k_rows[j..j + 16]));
            j += 16;
        }
        for (j, &k) in k_rows.iter().enumerate().skip(j) {
            *op.add(r * t + j) = dot::<L>(qp.add(r * d), d, k);
        }
    }
    ahead.upto(usize::MAX);
}

/// [`scores`] of keys stored before RoPE, each rotated in registers as the tile loads it
/// (`rope.cs[j]` for key `j`; see `avx2::Rope`), for `rows` a multiple of 4, `d` of 16 and
/// `rope.rot` of 16 (adjacent pairs) or 32 (half split). Keys go four at a time, a short
/// last group repeating its last key (those results dropped), so every score comes from
/// the same tile.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores_rope<const L: u8>(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    rope: super::avx2::Rope,
    out: &mut [f32],
    ahead: &[*const u8],
) {
    debug_assert!(rows.is_multiple_of(4) && rope.cs.len() == k_rows.len());
    let t = k_rows.len();
    let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
    let mut ahead = super::Ahead::new(ahead, d * size::<L>());
    let how = (rope.rot, rope.half_split);
    for r in (0..rows).step_by(4) {
        let mut j = 0;
        while j < t {
            ahead.upto(j + 4);
            let at = |i: usize| (j + i).min(t - 1);
            let k = [k_rows[at(0)], k_rows[at(1)], k_rows[at(2)], k_rows[at(3)]];
            let cs = [rope.cs[at(0)], rope.cs[at(1)], rope.cs[at(2)], rope.cs[at(3)]];
            let v = tile4x4::<L, true>(qp.add(r * d), d, d, k, cs, how);
            store_tile(v, op.add(r * t + j), t, (t - j).min(4));
            j += 4;
        }
    }
    ahead.upto(usize::MAX);
}

/// o[g][c..c+16*W] += sum_j p[g][j] * v_j[c..c+16*W] for G rows, accumulating in
/// registers; row `ahead[j]` is prefetched alongside `v_j`. Not inlined: inlined into its
/// callers, the accumulators spilled to the stack.
#[target_feature(enable = "avx512f")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn acc_block<const L: u8, const G: usize, const W: usize>(
    o: *mut f32,
    d: usize,
    c: usize,
    v_rows: &[*const u8],
    p: *const f32,
    t: usize,
    ahead: &[*const u8],
) {
    let mut acc = [[_mm512_setzero_ps(); W]; G];
    let mut ahead = super::Ahead::new(ahead, d * size::<L>());
    for (j, &v) in v_rows.iter().enumerate() {
        ahead.upto(j + 1);
        let mut vv = [_mm512_setzero_ps(); W];
        for (w, x) in vv.iter_mut().enumerate() {
            *x = load16::<L>(v.add((c + 16 * w) * size::<L>()));
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let pw = _mm512_set1_ps(*p.add(g * t + j));
            for w in 0..W {
                a[w] = _mm512_fmadd_ps(pw, vv[w], a[w]);
            }
        }
    }
    ahead.upto(usize::MAX);
    for (g, a) in acc.iter().enumerate() {
        for (w, x) in a.iter().enumerate() {
            let dst = o.add(g * d + c + 16 * w);
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *x));
        }
    }
}

/// G rows over all channels, 64 at a time; the first pass prefetches `ahead`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn acc_rows<const L: u8, const G: usize>(
    o: *mut f32,
    d: usize,
    v_rows: &[*const u8],
    p: *const f32,
    t: usize,
    mut ahead: &[*const u8],
) {
    let mut c = 0;
    while c + 64 <= d {
        acc_block::<L, G, 4>(o, d, c, v_rows, p, t, std::mem::take(&mut ahead));
        c += 64;
    }
    match (d - c) / 16 {
        3 => acc_block::<L, G, 3>(o, d, c, v_rows, p, t, ahead),
        2 => acc_block::<L, G, 2>(o, d, c, v_rows, p, t, ahead),
        1 => acc_block::<L, G, 1>(o, d, c, v_rows, p, t, ahead),
        _ => {}
    }
}

accumulate_by_row_groups!("avx512f");
