//! AVX2 + FMA + F16C kernels and building blocks, shared with the other SIMD kernels of the
//! module (page bounds, K-means assignment, RoPE).

use std::arch::x86_64::*;

/// Storage types as const-generic tags (a trait method could not carry the target
/// features, and its intrinsics would then not inline).
pub const F32: u8 = 0;
pub const F16: u8 = 1;
pub const BF16: u8 = 2;

/// Bytes per element of storage type `L`.
#[inline(always)]
pub const fn size<const L: u8>() -> usize {
    if L == F32 {
        4
    } else {
        2
    }
}

/// Loads 8 consecutive elements of storage type `L` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn load8<const L: u8>(p: *const u8) -> __m256 {
    match L {
        F32 => _mm256_loadu_ps(p as *const f32),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))),
    }
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Where the fused tile finds a key's RoPE rotation: `cs[j]` points at key `j`'s rotation,
/// the cos of its `rot / 2` pairs then their sin (a row of the shared rotation table);
/// `rot` channels are rotated, paired `(i, i + rot / 2)` when `half_split`, else
/// `(2i, 2i + 1)`. `rot` is a multiple of 16 (half split) or 8.
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    pub cs: &'a [*const f32],
    pub rot: usize,
    pub half_split: bool,
}

/// Channels `c..c + 8` of a key row; with `ROPE` and adjacent pairs (`c < rot`) rotated:
/// lane `2i` is `x_2i cos_i - x_2i+1 sin_i`, lane `2i + 1` is `x_2i+1 cos_i + x_2i sin_i`,
/// separate multiplies and an add, the bits `RopeConfig::rotate` gives. (Half-split pairs
/// are rotated by [`load_half_pair`]; after them the callers start at `c = rot`.)
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_key<const L: u8, const ROPE: bool>(k: *const u8, c: usize, cs: *const f32, rot: usize) -> __m256 {
    let x = load8::<L>(k.add(c * size::<L>()));
    if !ROPE || c >= rot {
        return x;
    }
    // Pairs c/2 .. c/2 + 4: their cos and sin, each repeated for the pair's two lanes.
    let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    let cos = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs.add(c / 2))), dup);
    let sin = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs.add(rot / 2 + c / 2))), dup);
    let swapped = _mm256_permute_ps::<0b10_11_00_01>(x);
    _mm256_addsub_ps(_mm256_mul_ps(x, cos), _mm256_mul_ps(swapped, sin))
}

/// Half-split pairs `c..c + 8`: channels `c..c + 8` and `h + c..h + c + 8` of a key row
/// (`h = rot / 2`) rotated, `x_i cos - x_h+i sin` and `x_i sin + x_h+i cos` as
/// `RopeConfig::rotate` computes them.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_half_pair<const L: u8>(k: *const u8, c: usize, cs: *const f32, h: usize) -> (__m256, __m256) {
    let lo = load8::<L>(k.add(c * size::<L>()));
    let hi = load8::<L>(k.add((h + c) * size::<L>()));
    let (cos, sin) = (_mm256_loadu_ps(cs.add(c)), _mm256_loadu_ps(cs.add(h + c)));
    (
        _mm256_sub_ps(_mm256_mul_ps(lo, cos), _mm256_mul_ps(hi, sin)),
        _mm256_add_ps(_mm256_mul_ps(lo, sin), _mm256_mul_ps(hi, cos)),
    )
}

/// Dot products of G query rows with one key row (rotated by RoPE when `ROPE`, see
/// [`load_key`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rows<const L: u8, const G: usize, const ROPE: bool>(
    q: *const f32,
    d: usize,
    k: *const u8,
    cs: *const f32,
    rope: (usize, bool),
    out: *mut f32,
    out_stride: usize,
) {
    let mut acc = [_mm256_setzero_ps(); G];
    let mut c = 0;
    if ROPE && rope.1 {
        // Half-split pairs: both halves of each pair rotated together, then the rest.
        let h = rope.0 / 2;
        while c < h {
            let (lo, hi) = load_half_pair::<L>(k, c, cs, h);
            for (g, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), lo, *a);
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + h + c)), hi, *a);
            }
            c += 8;
        }
        c = rope.0;
    }
    while c < d {
        let kv = load_key::<L, ROPE>(k, c, cs, rope.0);
        for (g, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), kv, *a);
        }
        c += 8;
    }
    for (g, a) in acc.iter().enumerate() {
        *out.add(g * out_stride) = hsum(*a);
    }
}

/// Dot products of R query rows (R <= 4) with 2 key rows, each key loaded once:
/// out[r * os] and out[r * os + 1] for row r. Rows are reduced two at a time by horizontal
/// adds; an odd last row lane by lane, as `dot_rows` reduces, so that one row's scores do
/// not depend on the tiling.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_rx2<const L: u8, const R: usize, const ROPE: bool>(
    q: *const f32,
    d: usize,
    (k0, k1): (*const u8, *const u8),
    (cs0, cs1): (*const f32, *const f32),
    rope: (usize, bool),
    out: *mut f32,
    os: usize,
) {
    let mut a = [[_mm256_setzero_ps(); 2]; R];
    let mut c = 0;
    if ROPE && rope.1 {
        // Half-split pairs: both halves of each pair rotated together, then the rest.
        let h = rope.0 / 2;
        while c < h {
            let (l0, h0) = load_half_pair::<L>(k0, c, cs0, h);
            let (l1, h1) = load_half_pair::<L>(k1, c, cs1, h);
            for (r, ar) in a.iter_mut().enumerate() {
                let (ql, qh) = (_mm256_loadu_ps(q.add(r * d + c)), _mm256_loadu_ps(q.add(r * d + h + c)));
                ar[0] = _mm256_fmadd_ps(qh, h0, _mm256_fmadd_ps(ql, l0, ar[0]));
                ar[1] = _mm256_fmadd_ps(qh, h1, _mm256_fmadd_ps(ql, l1, ar[1]));
            }
            c += 8;
        }
        c = rope.0;
    }
    while c < d {
        let x0 = load_key::<L, ROPE>(k0, c, cs0, rope.0);
        let x1 = load_key::<L, ROPE>(k1, c, cs1, rope.0);
        for (r, ar) in a.iter_mut().enumerate() {
            let qr = _mm256_loadu_ps(q.add(r * d + c));
            ar[0] = _mm256_fmadd_ps(qr, x0, ar[0]);
            ar[1] = _mm256_fmadd_ps(qr, x1, ar[1]);
        }
        c += 8;
    }
    let mut r = 0;
    while r + 2 <= R {
        // [r t0, r t1, r+1 t0, r+1 t1] in one vector by three horizontal adds.
        let w = _mm256_hadd_ps(_mm256_hadd_ps(a[r][0], a[r][1]), _mm256_hadd_ps(a[r + 1][0], a[r + 1][1]));
        let s = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps::<1>(w));
        _mm_storel_pd(out.add(r * os) as *mut f64, _mm_castps_pd(s));
        _mm_storeh_pd(out.add((r + 1) * os) as *mut f64, _mm_castps_pd(s));
        r += 2;
    }
    if r < R {
        *out.add(r * os) = hsum(a[r][0]);
        *out.add(r * os + 1) = hsum(a[r][1]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores<const L: u8>(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    out: &mut [f32],
    ahead: &[*const u8],
) {
    scores_tile::<L, false>(q, rows, d, k_rows, Rope { cs: &[], rot: 0, half_split: false }, out, ahead)
}

/// [`scores`], and with `ROPE` of keys stored before RoPE, each rotated in registers as it
/// is loaded (`rope.cs[j]` for key `j`; see [`Rope`]), the same scores as rotating the rows
/// first.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub unsafe fn scores_tile<const L: u8, const ROPE: bool>(
    q: &[f32],
    rows: usize,
    d: usize,
    k_rows: &[*const u8],
    rope: Rope,
    out: &mut [f32],
    ahead: &[*const u8],
) {
    let t = k_rows.len();
    let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
    let mut ahead = super::Ahead::new(ahead, d * size::<L>());
    let cs = |j: usize| if ROPE { rope.cs[j] } else { std::ptr::null() };
    let how = (rope.rot, rope.half_split);
    let mut j = 0;
    while j + 2 <= t {
        ahead.upto(j + 2);
        let (k, c) = ((k_rows[j], k_rows[j + 1]), (cs(j), cs(j + 1)));
        let mut r = 0;
        while r + 4 <= rows {
            dot_rx2::<L, 4, ROPE>(qp.add(r * d), d, k, c, how, op.add(r * t + j), t);
            r += 4;
        }
        let (qr, or) = (qp.add(r * d), op.add(r * t + j));
        match rows - r {
            3 => dot_rx2::<L, 3, ROPE>(qr, d, k, c, how, or, t),
            2 => dot_rx2::<L, 2, ROPE>(qr, d, k, c, how, or, t),
            1 => dot_rx2::<L, 1, ROPE>(qr, d, k, c, how, or, t),
            _ => {}
        }
        j += 2;
    }
    ahead.upto(usize::MAX);
    if j < t {
        let (k, c) = (k_rows[j], cs(j));
        let mut r = 0;
        while r + 4 <= rows {
            dot_rows::<L, 4, ROPE>(qp.add(r * d), d, k, c, how, op.add(r * t + j), t);
            r += 4;
        }
        while r < rows {
            dot_rows::<L, 1, ROPE>(qp.add(r * d), d, k, c, how, op.add(r * t + j), t);
            r += 1;
        }
    }
}

/// o[g][c..c+8*W] += sum_j p[g][j] * v_j[c..c+8*W] for G rows, with the accumulators in
/// registers; row `ahead[j]` is prefetched alongside `v_j`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
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
    let mut acc = [[_mm256_setzero_ps(); W]; G];
    let mut ahead = super::Ahead::new(ahead, d * size::<L>());
    for (j, &v) in v_rows.iter().enumerate() {
        ahead.upto(j + 1);
        let mut vv = [_mm256_setzero_ps(); W];
        for (w, x) in vv.iter_mut().enumerate() {
            *x = load8::<L>(v.add((c + 8 * w) * size::<L>()));
        }
        for (g, a) in acc.iter_mut().enumerate() {
            let pw = _mm256_broadcast_ss(&*p.add(g * t + j));
            for w in 0..W {
                a[w] = _mm256_fmadd_ps(pw, vv[w], a[w]);
            }
        }
    }
    ahead.upto(usize::MAX);
    for (g, a) in acc.iter().enumerate() {
        for (w, x) in a.iter().enumerate() {
            let dst = o.add(g * d + c + 8 * w);
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *x));
        }
    }
}

/// G rows over all channels; the first pass prefetches `ahead`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    while c + 16 <= d {
        acc_block::<L, G, 2>(o, d, c, v_rows, p, t, std::mem::take(&mut ahead));
        c += 16;
    }
    if c < d {
        acc_block::<L, G, 1>(o, d, c, v_rows, p, t, ahead);
    }
}

accumulate_by_row_groups!("avx2,fma,f16c");

/// exp(x) for 8 lanes: range reduction by ln 2 and a degree-6 polynomial; relative
/// error about 2e-7 over the f32 range; inputs below -87.3 give 0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.33);
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    let x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // r = x - n ln2, ln2 split in two parts for accuracy.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut y = _mm256_set1_ps(1.0 / 720.0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0 / 120.0));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0 / 24.0));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0 / 6.0));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_andnot_ps(underflow, y)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    let mv = _mm256_set1_ps(m);
    let mut sum = _mm256_setzero_ps();
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        _mm256_storeu_ps(p.add(i), e);
        sum = _mm256_add_ps(sum, e);
        i += 8;
    }
    let mut s = hsum(sum);
    while i < n {
        let e = (*p.add(i) - m).exp();
        *p.add(i) = e;
        s += e;
        i += 1;
    }
    s
}
