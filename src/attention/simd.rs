//! The inner loops of CPU attention, with AVX-512F (head dims that are multiples of 16) and
//! AVX2 + FMA + F16C paths chosen at run time ([`level`]) and a portable fallback. K and V
//! rows are read in their storage dtype and converted to f32 in registers.
//!
//! Shapes: `q` holds `rows` query vectors of `d` channels; `k_rows` / `v_rows` point at
//! `t = k_rows.len()` key / value rows of `d` elements of `dtype`; scores and weights are
//! `[rows][t]` row-major.

use crate::dtype::DType;

/// The instruction-set levels the CPU kernels have, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F on top of the AVX2 set (kernels for head dims that are multiples of 16).
    Avx512,
}

/// The level the kernels use: the best this CPU has, lowered by the environment variable
/// `KVSIEVE_ISA` (`portable`, `avx2` or `avx512`; it never raises it, and other values are
/// ignored). Read once per process.
pub(crate) fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("KVSIEVE_ISA").as_deref() {
            Ok("portable") => Level::Portable,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Level {
    use std::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma") && has!("f16c")) {
        Level::Portable
    } else if has!("avx512f") {
        Level::Avx512
    } else {
        Level::Avx2
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Level {
    Level::Portable
}

/// Whether the AVX2 + FMA + F16C kernels are in use.
pub(crate) fn has_avx2() -> bool {
    level() >= Level::Avx2
}

/// Whether the AVX-512 kernels are in use (for head dims that are multiples of 16).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_avx512() -> bool {
    level() >= Level::Avx512
}

/// Name of the instruction set the kernels use on this machine.
pub fn isa() -> &'static str {
    match level() {
        Level::Avx512 => "avx512f+avx2+fma+f16c",
        Level::Avx2 => "avx2+fma+f16c",
        Level::Portable => "portable",
    }
}

/// Ask for the cache lines holding the `bytes` bytes at `p` ahead of their use (a hint:
/// never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // From the start of p's line, so that a row straddling a line boundary is covered.
        let mut o = -((p as usize % 64) as isize);
        while o < bytes as isize {
            // SAFETY: prefetch is only a hint and never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_offset(o) as *const i8) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Rows to prefetch, `bytes` each, issued in order a few at a time by the kernels' loops.
pub(crate) struct Ahead<'a> {
    rows: &'a [*const u8],
    bytes: usize,
    done: usize,
}

impl<'a> Ahead<'a> {
    pub fn new(rows: &'a [*const u8], bytes: usize) -> Self {
        Ahead { rows, bytes, done: 0 }
    }

    /// Prefetch the rows below index `end` not yet asked for.
    #[inline(always)]
    pub fn upto(&mut self, end: usize) {
        let end = end.min(self.rows.len());
        while self.done < end {
            prefetch(self.rows[self.done], self.bytes);
            self.done += 1;
        }
    }
}

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
pub(crate) unsafe fn scores_ahead(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], dtype: DType, out: &mut [f32], ahead: &[*const u8]) {
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

/// `o[r] += sum_j p[r][j] * v_rows[j]`, prefetching the rows `ahead` as [`scores_ahead`] does.
///
/// # Safety
/// 1. every pointer in `v_rows` is valid for reads of `d` elements of `dtype`;
/// 2. `o.len() >= rows * d` and `p.len() >= rows * v_rows.len()`; `d` is a multiple of 8.
pub(crate) unsafe fn accumulate_ahead(o: &mut [f32], rows: usize, d: usize, v_rows: &[*const u8], dtype: DType, p: &[f32], ahead: &[*const u8]) {
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

/// Defines a SIMD module's `accumulate` (see [`accumulate_ahead`]): its `acc_rows` over groups
/// of four query rows, then the last three, two or one; the first group prefetches `ahead`.
#[cfg(target_arch = "x86_64")]
macro_rules! accumulate_by_row_groups {
    ($features:literal) => {
        /// See [`super::accumulate_ahead`].
        #[target_feature(enable = $features)]
        pub unsafe fn accumulate<const L: u8>(o: &mut [f32], rows: usize, d: usize, v_rows: &[*const u8], p: &[f32], mut ahead: &[*const u8]) {
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

mod portable {
    use crate::dtype::{load_f32, DType};

    unsafe fn row<'a>(p: *const u8, d: usize, dtype: DType) -> &'a [u8] {
        std::slice::from_raw_parts(p, d * dtype.size())
    }

    pub unsafe fn scores(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], dtype: DType, out: &mut [f32]) {
        let t = k_rows.len();
        let mut k = vec![0f32; d];
        for (j, &kp) in k_rows.iter().enumerate() {
            let kb = row(kp, d, dtype);
            for (c, x) in k.iter_mut().enumerate() {
                *x = load_f32(kb, dtype, c);
            }
            for r in 0..rows {
                out[r * t + j] = q[r * d..(r + 1) * d].iter().zip(&k).map(|(a, b)| a * b).sum();
            }
        }
    }

    pub unsafe fn accumulate(o: &mut [f32], rows: usize, d: usize, v_rows: &[*const u8], dtype: DType, p: &[f32]) {
        let t = v_rows.len();
        let mut v = vec![0f32; d];
        for (j, &vp) in v_rows.iter().enumerate() {
            let vb = row(vp, d, dtype);
            for (c, x) in v.iter_mut().enumerate() {
                *x = load_f32(vb, dtype, c);
            }
            for r in 0..rows {
                let w = p[r * t + j];
                for (oc, vc) in o[r * d..(r + 1) * d].iter_mut().zip(&v) {
                    *oc += w * vc;
                }
            }
        }
    }
}

/// AVX2 building blocks, shared with the other SIMD kernels of the crate.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
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

    /// Dot products of G query rows with one key row.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_rows<const L: u8, const G: usize>(q: *const f32, d: usize, k: *const u8, out: *mut f32, out_stride: usize) {
        let mut acc = [_mm256_setzero_ps(); G];
        let mut c = 0;
        while c < d {
            let kv = load8::<L>(k.add(c * size::<L>()));
            for (g, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), kv, *a);
            }
            c += 8;
        }
        for (g, a) in acc.iter().enumerate() {
            *out.add(g * out_stride) = hsum(*a);
        }
    }

    /// Dot products of 2 query rows with 2 key rows, reduced together:
    /// out[0][0], out[0][1] for row 0 and out[1][0], out[1][1] for row 1 (row stride `os`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_2x2<const L: u8>(q: *const f32, d: usize, k0: *const u8, k1: *const u8, out: *mut f32, os: usize) {
        let (mut a00, mut a01, mut a10, mut a11) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        while c < d {
            let x0 = load8::<L>(k0.add(c * size::<L>()));
            let x1 = load8::<L>(k1.add(c * size::<L>()));
            let q0 = _mm256_loadu_ps(q.add(c));
            let q1 = _mm256_loadu_ps(q.add(d + c));
            a00 = _mm256_fmadd_ps(q0, x0, a00);
            a01 = _mm256_fmadd_ps(q0, x1, a01);
            a10 = _mm256_fmadd_ps(q1, x0, a10);
            a11 = _mm256_fmadd_ps(q1, x1, a11);
            c += 8;
        }
        // [r0t0, r0t1, r1t0, r1t1] in one vector by three horizontal adds.
        let w = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a10, a11));
        let s = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps::<1>(w));
        _mm_storel_pd(out as *mut f64, _mm_castps_pd(s));
        _mm_storeh_pd(out.add(os) as *mut f64, _mm_castps_pd(s));
    }

    /// Dot products of 4 query rows with 2 key rows (two 2x2 tiles sharing the key loads).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_4x2<const L: u8>(q: *const f32, d: usize, k0: *const u8, k1: *const u8, out: *mut f32, os: usize) {
        let mut a = [_mm256_setzero_ps(); 8];
        let mut c = 0;
        while c < d {
            let x0 = load8::<L>(k0.add(c * size::<L>()));
            let x1 = load8::<L>(k1.add(c * size::<L>()));
            for r in 0..4 {
                let qr = _mm256_loadu_ps(q.add(r * d + c));
                a[2 * r] = _mm256_fmadd_ps(qr, x0, a[2 * r]);
                a[2 * r + 1] = _mm256_fmadd_ps(qr, x1, a[2 * r + 1]);
            }
            c += 8;
        }
        for r in (0..4).step_by(2) {
            let w = _mm256_hadd_ps(_mm256_hadd_ps(a[2 * r], a[2 * r + 1]), _mm256_hadd_ps(a[2 * r + 2], a[2 * r + 3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps::<1>(w));
            _mm_storel_pd(out.add(r * os) as *mut f64, _mm_castps_pd(s));
            _mm_storeh_pd(out.add((r + 1) * os) as *mut f64, _mm_castps_pd(s));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<const L: u8>(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], out: &mut [f32], ahead: &[*const u8]) {
        let t = k_rows.len();
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        let mut ahead = super::Ahead::new(ahead, d * size::<L>());
        let mut j = 0;
        while j + 2 <= t {
            ahead.upto(j + 2);
            let (k0, k1) = (k_rows[j], k_rows[j + 1]);
            let mut r = 0;
            while r + 4 <= rows {
                dot_4x2::<L>(qp.add(r * d), d, k0, k1, op.add(r * t + j), t);
                r += 4;
            }
            if r + 2 <= rows {
                dot_2x2::<L>(qp.add(r * d), d, k0, k1, op.add(r * t + j), t);
                r += 2;
            }
            if r < rows {
                dot_rows::<L, 1>(qp.add(r * d), d, k0, op.add(r * t + j), t);
                dot_rows::<L, 1>(qp.add(r * d), d, k1, op.add(r * t + j + 1), t);
            }
            j += 2;
        }
        ahead.upto(usize::MAX);
        if j < t {
            let k = k_rows[j];
            let mut r = 0;
            while r + 4 <= rows {
                dot_rows::<L, 4>(qp.add(r * d), d, k, op.add(r * t + j), t);
                r += 4;
            }
            while r < rows {
                dot_rows::<L, 1>(qp.add(r * d), d, k, op.add(r * t + j), t);
                r += 1;
            }
        }
    }

    /// o[g][c..c+8*W] += sum_j p[g][j] * v_j[c..c+8*W] for G rows, with the accumulators in
    /// registers; row `ahead[j]` is prefetched alongside `v_j`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn acc_block<const L: u8, const G: usize, const W: usize>(o: *mut f32, d: usize, c: usize, v_rows: &[*const u8], p: *const f32, t: usize, ahead: &[*const u8]) {
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
    unsafe fn acc_rows<const L: u8, const G: usize>(o: *mut f32, d: usize, v_rows: &[*const u8], p: *const f32, t: usize, mut ahead: &[*const u8]) {
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
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
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
}

/// AVX-512 versions of [`scores`] and [`accumulate_ahead`] for head dims that are multiples of 16.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::avx2::{size, F16, F32};
    use std::arch::x86_64::*;

    /// Loads 16 consecutive elements of storage type `L` as f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const L: u8>(p: *const u8) -> __m512 {
        match L {
            F32 => _mm512_loadu_ps(p as *const f32),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)))),
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
    unsafe fn reduce16(a: [__m512; 16]) -> __m512 {
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

    /// Dot products of 4 query rows (stride `qs`) with 4 keys; accumulator `4c + r` holds row
    /// r with key c, so in [`reduce16`]'s order lanes `4r..4r+4` are row r's four scores.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn tile4x4<const L: u8>(q: *const f32, qs: usize, d: usize, k: &[*const u8]) -> __m512 {
        let (k0, k1, k2, k3) = (k[0], k[1], k[2], k[3]);
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5, mut a6, mut a7) = (z, z, z, z, z, z, z, z);
        let (mut a8, mut a9, mut a10, mut a11, mut a12, mut a13, mut a14, mut a15) = (z, z, z, z, z, z, z, z);
        let mut ch = 0;
        while ch < d {
            let o = ch * size::<L>();
            let (x0, x1, x2, x3) = (load16::<L>(k0.add(o)), load16::<L>(k1.add(o)), load16::<L>(k2.add(o)), load16::<L>(k3.add(o)));
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
    pub unsafe fn scores<const L: u8>(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], out: &mut [f32], ahead: &[*const u8]) {
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
                // Lanes 4i..4i+4 are row r+i's scores with keys j..j+4.
                let v = tile4x4::<L>(qp.add(r * d), d, d, &k_rows[j..j + 4]);
                _mm_storeu_ps(op.add(r * t + j), _mm512_extractf32x4_ps::<0>(v));
                _mm_storeu_ps(op.add((r + 1) * t + j), _mm512_extractf32x4_ps::<1>(v));
                _mm_storeu_ps(op.add((r + 2) * t + j), _mm512_extractf32x4_ps::<2>(v));
                _mm_storeu_ps(op.add((r + 3) * t + j), _mm512_extractf32x4_ps::<3>(v));
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

    /// o[g][c..c+16*W] += sum_j p[g][j] * v_j[c..c+16*W] for G rows, accumulating in
    /// registers; row `ahead[j]` is prefetched alongside `v_j`. Not inlined: inlined into its
    /// callers, the accumulators spilled to the stack.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn acc_block<const L: u8, const G: usize, const W: usize>(o: *mut f32, d: usize, c: usize, v_rows: &[*const u8], p: *const f32, t: usize, ahead: &[*const u8]) {
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
    unsafe fn acc_rows<const L: u8, const G: usize>(o: *mut f32, d: usize, v_rows: &[*const u8], p: *const f32, t: usize, mut ahead: &[*const u8]) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{load_f32, store_f32};
    use proptest::prelude::*;

    type ScoresFn = unsafe fn(&[f32], usize, usize, &[*const u8], DType, &mut [f32], &[*const u8]);
    type AccFn = unsafe fn(&mut [f32], usize, usize, &[*const u8], DType, &[f32], &[*const u8]);

    /// Every implementation this CPU can run for `dtype` and `d`, named; each is called with
    /// `dtype` (the SIMD ones carry it as their const tag).
    fn kernels(dtype: DType, d: usize) -> Vec<(&'static str, ScoresFn, AccFn)> {
        let mut v: Vec<(&'static str, ScoresFn, AccFn)> = vec![(
            "portable",
            |q, r, d, k, dt, o, _| unsafe { portable::scores(q, r, d, k, dt, o) },
            |o, r, d, v, dt, p, _| unsafe { portable::accumulate(o, r, d, v, dt, p) },
        )];
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            macro_rules! level {
                ($name:literal, $m:ident, $($dt:ident => $tag:path),*) => {
                    match dtype {
                        $(DType::$dt => v.push((
                            $name,
                            |q, r, d, k, _, o, a| unsafe { $m::scores::<{ $tag }>(q, r, d, k, o, a) },
                            |o, r, d, vr, _, p, a| unsafe { $m::accumulate::<{ $tag }>(o, r, d, vr, p, a) },
                        )),)*
                    }
                };
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                level!("avx2", avx2, F32 => avx2::F32, F16 => avx2::F16, BF16 => avx2::BF16);
                if has!("avx512f") && d.is_multiple_of(16) {
                    level!("avx512", avx512, F32 => avx2::F32, F16 => avx2::F16, BF16 => avx2::BF16);
                }
            }
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Scores and weighted sums of every kernel against f64 sums over the stored values,
        /// for row counts and key counts that reach every tile shape and tail, and with
        /// prefetch lists shorter than, equal to and longer than the block.
        #[test]
        fn kernels_match_f64_reference(
            seed in any::<u64>(), rows in 1usize..21, t in 1usize..41,
            d in prop_oneof![Just(8usize), Just(16), Just(24), Just(32), Just(48), Just(64), Just(80), Just(96), Just(128)],
            dt in 0usize..3, ahead_len in 0usize..45,
        ) {
            let dtype = [DType::F32, DType::F16, DType::BF16][dt];
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 20_001) as f32 / 10_000.0 - 1.0 };
            let q: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let p: Vec<f32> = (0..rows * t).map(|_| next().abs()).collect();
            let es = dtype.size();
            let (mut kb, mut vb) = (vec![0u8; t * d * es], vec![0u8; t * d * es]);
            for i in 0..t * d {
                store_f32(&mut kb, dtype, i, next());
                store_f32(&mut vb, dtype, i, next());
            }
            let k_rows: Vec<*const u8> = (0..t).map(|j| kb[j * d * es..].as_ptr()).collect();
            let v_rows: Vec<*const u8> = (0..t).map(|j| vb[j * d * es..].as_ptr()).collect();
            let ahead: Vec<*const u8> = (0..ahead_len).map(|j| vb[(j % t) * d * es..].as_ptr()).collect();
            let o0: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let (mut want_s, mut want_o) = (vec![0f64; rows * t], o0.iter().map(|&x| x as f64).collect::<Vec<_>>());
            for r in 0..rows {
                for j in 0..t {
                    want_s[r * t + j] = (0..d).map(|c| q[r * d + c] as f64 * load_f32(&kb, dtype, j * d + c) as f64).sum();
                    for c in 0..d {
                        want_o[r * d + c] += p[r * t + j] as f64 * load_f32(&vb, dtype, j * d + c) as f64;
                    }
                }
            }
            for (name, scores, acc) in kernels(dtype, d) {
                let mut s = vec![f32::NAN; rows * t];
                let mut o = o0.clone();
                // SAFETY: every row pointer covers d elements of dtype; the buffers are sized as required.
                unsafe {
                    scores(&q, rows, d, &k_rows, dtype, &mut s, &ahead);
                    acc(&mut o, rows, d, &v_rows, dtype, &p, &ahead);
                }
                for (i, (&got, &want)) in s.iter().zip(&want_s).enumerate() {
                    prop_assert!((got as f64 - want).abs() <= 1e-5 * (d as f64), "{} {:?} scores[{}]: {} vs {}", name, dtype, i, got, want);
                }
                for (i, (&got, &want)) in o.iter().zip(&want_o).enumerate() {
                    prop_assert!((got as f64 - want).abs() <= 1e-5 * (t as f64 + 1.0), "{} {:?} o[{}]: {} vs {}", name, dtype, i, got, want);
                }
            }
        }

        /// One row against many keys and many rows against one key give the same bits for
        /// the same pair (K-means relies on this to be independent of how it batches its
        /// candidates); in the AVX-512 kernel, so do all the tiles and tails in between.
        #[test]
        fn scores_do_not_depend_on_the_tiling(seed in any::<u64>(), rows in 1usize..21, t in 1usize..41, d in prop_oneof![Just(16usize), Just(64), Just(128)]) {
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 20_001) as f32 / 10_000.0 - 1.0 };
            let q: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let k: Vec<f32> = (0..t * d).map(|_| next()).collect();
            let k_rows: Vec<*const u8> = (0..t).map(|j| k[j * d..].as_ptr() as *const u8).collect();
            for (name, scores, _) in kernels(DType::F32, d) {
                let mut all = vec![0f32; rows * t];
                // SAFETY: as in kernels_match_f64_reference.
                unsafe { scores(&q, rows, d, &k_rows, DType::F32, &mut all, &[]) };
                // Each row against every key, and every row against each key.
                let (mut by_row, mut by_key) = (vec![0f32; rows * t], vec![0f32; rows * t]);
                for r in 0..rows {
                    // SAFETY: as above, one row at a time.
                    unsafe { scores(&q[r * d..(r + 1) * d], 1, d, &k_rows, DType::F32, &mut by_row[r * t..(r + 1) * t], &[]) };
                }
                for j in 0..t {
                    let mut col = vec![0f32; rows];
                    // SAFETY: as above, one key at a time.
                    unsafe { scores(&q, rows, d, &k_rows[j..j + 1], DType::F32, &mut col, &[]) };
                    for r in 0..rows {
                        by_key[r * t + j] = col[r];
                    }
                }
                for i in 0..rows * t {
                    prop_assert_eq!(by_row[i].to_bits(), by_key[i].to_bits(), "{} row {} key {}", name, i / t, i % t);
                    if name == "avx512" {
                        prop_assert_eq!(all[i].to_bits(), by_row[i].to_bits(), "{} row {} key {}", name, i / t, i % t);
                    }
                }
            }
        }

        /// max against a plain fold, with -inf and repeated values.
        #[test]
        fn max_matches_fold(x in prop::collection::vec(prop_oneof![Just(f32::NEG_INFINITY), -100f32..100.0], 0..70)) {
            prop_assert_eq!(max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        }
    }
}
