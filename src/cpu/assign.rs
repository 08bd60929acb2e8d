//! Nearest-centroid assignment: for every point, the centroid with the largest dot product
//! (the nearest one when points and centroids are unit vectors), as a blocked
//! `[n × d] · [d × C]` product fused with a running argmax.
//!
//! Centroids are packed into panels of [`PANEL`] centroids stored channel-major
//! (`panel[c][j]` = channel `c` of centroid `panel_index * PANEL + j`), so the inner loop
//! loads two 8-wide vectors of one channel for 16 centroids and broadcasts that channel of
//! six points against them: 12 FMAs per 8 loads. Points are taken in blocks of [`BLOCK`]
//! rows; each block runs over groups of [`GROUP`] panels (128 KiB at head_dim 128, held in
//! L2 while every micro-tile of the block uses it). Each row keeps, per lane, the best
//! value and its centroid index; ties keep the earlier (lower) index, and the lanes reduce
//! to the first maximum, so the answer is the lowest-index argmax whatever the tiling and
//! thread count.

use rayon::prelude::*;

/// Centroids per packed panel (two AVX2 vectors).
pub(crate) const PANEL: usize = 16;
/// Points per micro-tile.
const MR: usize = 6;
/// Points per parallel task (a multiple of `MR`).
const BLOCK: usize = 8 * MR;
/// Panels scored by one block before it moves on.
const GROUP: usize = 16;

/// Centroids `[k][d]` repacked into channel-major panels of [`PANEL`], zero-padded.
pub(crate) struct PackedCentroids {
    data: Vec<f32>,
    k: usize,
    d: usize,
}

impl PackedCentroids {
    pub(crate) fn new(centroids: &[f32], k: usize, d: usize) -> Self {
        debug_assert_eq!(centroids.len(), k * d);
        let panels = k.div_ceil(PANEL);
        let mut data = vec![0f32; panels * d * PANEL];
        for (i, row) in centroids.chunks_exact(d).enumerate() {
            let (p, j) = (i / PANEL, i % PANEL);
            let panel = &mut data[p * d * PANEL..(p + 1) * d * PANEL];
            for (c, &x) in row.iter().enumerate() {
                panel[c * PANEL + j] = x;
            }
        }
        PackedCentroids { data, k, d }
    }

    fn panels(&self) -> usize {
        self.k.div_ceil(PANEL)
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.d * PANEL..(p + 1) * self.d * PANEL]
    }

    /// Centroids in the last panel that are real (not padding).
    fn valid(&self, p: usize) -> usize {
        (self.k - p * PANEL).min(PANEL)
    }
}

/// For each row of `points` (`[n][d]`, row-major): `idx[i]` = the centroid with the largest
/// dot product (lowest index on ties) and `best[i]` = that dot product. Parallel over blocks
/// of rows; the result does not depend on the thread count.
pub(crate) fn nearest(points: &[f32], d: usize, cents: &PackedCentroids, idx: &mut [u32], best: &mut [f32]) {
    assert_eq!(cents.d, d);
    let n = idx.len();
    assert!(points.len() == n * d && best.len() == n && cents.k >= 1);
    #[cfg(target_arch = "x86_64")]
    let simd = crate::cpu::has_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    idx.par_chunks_mut(BLOCK).zip(best.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (idx, best))| {
        let rows = idx.len();
        let x = &points[b * BLOCK * d..(b * BLOCK + rows) * d];
        block(x, rows, d, cents, idx, best, simd);
    });
}

/// One block of up to [`BLOCK`] rows; `simd` only where the CPU has AVX2 and FMA.
fn block(x: &[f32], rows: usize, d: usize, cents: &PackedCentroids, idx: &mut [u32], best: &mut [f32], simd: bool) {
    let padded = rows.div_ceil(MR) * MR;
    // Rows padded with zeros to whole micro-tiles (their results are dropped).
    let mut buf;
    let x = if padded == rows {
        x
    } else {
        buf = vec![0f32; padded * d];
        buf[..rows * d].copy_from_slice(x);
        &buf[..]
    };
    let mut bv = [f32::NEG_INFINITY; BLOCK * PANEL];
    let mut bi = [0i32; BLOCK * PANEL];
    let panels = cents.panels();
    for g0 in (0..panels).step_by(GROUP) {
        for t in 0..padded / MR {
            let xt = &x[t * MR * d..(t + 1) * MR * d];
            let (tv, ti) =
                (&mut bv[t * MR * PANEL..(t + 1) * MR * PANEL], &mut bi[t * MR * PANEL..(t + 1) * MR * PANEL]);
            for p in g0..(g0 + GROUP).min(panels) {
                let (panel, valid, col0) = (cents.panel(p), cents.valid(p), (p * PANEL) as i32);
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has AVX2 and FMA (the caller checked); `xt` holds MR rows of d,
                    // `panel` d * PANEL values, `tv`/`ti` MR * PANEL entries.
                    unsafe { avx2::tile(xt, d, panel, valid, col0, tv, ti) };
                    continue;
                }
                portable_tile(xt, d, panel, valid, col0, tv, ti);
            }
        }
    }
    for r in 0..rows {
        let (v, i) = (&bv[r * PANEL..(r + 1) * PANEL], &bi[r * PANEL..(r + 1) * PANEL]);
        let (mut bvv, mut bii) = (v[0], i[0]);
        for j in 1..PANEL {
            if v[j] > bvv || (v[j] == bvv && i[j] < bii) {
                bvv = v[j];
                bii = i[j];
            }
        }
        idx[r] = bii as u32;
        best[r] = bvv;
    }
}

/// Scalar micro-tile: the same arithmetic order as the SIMD one (channel by channel),
/// without fused multiply-adds.
fn portable_tile(x: &[f32], d: usize, panel: &[f32], valid: usize, col0: i32, bv: &mut [f32], bi: &mut [i32]) {
    for r in 0..MR {
        let mut acc = [0f32; PANEL];
        let xr = &x[r * d..(r + 1) * d];
        for (c, &a) in xr.iter().enumerate() {
            let b = &panel[c * PANEL..(c + 1) * PANEL];
            for j in 0..PANEL {
                acc[j] += a * b[j];
            }
        }
        for j in 0..valid {
            if acc[j] > bv[r * PANEL + j] {
                bv[r * PANEL + j] = acc[j];
                bi[r * PANEL + j] = col0 + j as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, PANEL};
    use std::arch::x86_64::*;

    /// Dot products of MR rows with one panel of PANEL centroids, merged into the per-lane
    /// running maxima `bv` / indices `bi` (`[MR][PANEL]`). Lanes at or past `valid` are
    /// padding and never win.
    ///
    /// # Safety
    /// 1. the CPU supports AVX2 and FMA;
    /// 2. `x.len() >= MR * d`, `panel.len() >= d * PANEL`, `bv.len() >= MR * PANEL`,
    ///    `bi.len() >= MR * PANEL`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        x: &[f32],
        d: usize,
        panel: &[f32],
        valid: usize,
        col0: i32,
        bv: &mut [f32],
        bi: &mut [i32],
    ) {
        debug_assert!(
            x.len() >= MR * d && panel.len() >= d * PANEL && bv.len() >= MR * PANEL && bi.len() >= MR * PANEL
        );
        let (xp, bp) = (x.as_ptr(), panel.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for c in 0..d {
            let b0 = _mm256_loadu_ps(bp.add(c * PANEL));
            let b1 = _mm256_loadu_ps(bp.add(c * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xp.add(r * d + c));
                a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
            }
        }
        let lane0 = _mm256_add_epi32(_mm256_set1_epi32(col0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let lanes = [lane0, _mm256_add_epi32(lane0, _mm256_set1_epi32(8))];
        if valid < PANEL {
            let limit = _mm256_set1_epi32(col0 + valid as i32);
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            for a in acc.iter_mut() {
                for (h, v) in a.iter_mut().enumerate() {
                    let pad = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                        _mm256_add_epi32(lanes[h], _mm256_set1_epi32(1)),
                        limit,
                    ));
                    *v = _mm256_blendv_ps(*v, ninf, pad);
                }
            }
        }
        let (vp, ip) = (bv.as_mut_ptr(), bi.as_mut_ptr() as *mut __m256i);
        for (r, a) in acc.iter().enumerate() {
            for (h, v) in a.iter().enumerate() {
                let o = r * PANEL + h * 8;
                let cur = _mm256_loadu_ps(vp.add(o));
                let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(*v, cur);
                _mm256_storeu_ps(vp.add(o), _mm256_blendv_ps(cur, *v, gt));
                let ci = _mm256_loadu_si256(ip.add(o / 8));
                _mm256_storeu_si256(ip.add(o / 8), _mm256_blendv_epi8(ci, lanes[h], _mm256_castps_si256(gt)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths against a plain argmax over f64 dot products, on shapes with partial
    /// micro-tiles, partial panels and several panel groups.
    #[test]
    fn portable_and_simd_match_plain_argmax() {
        let mut state = 0x1234_5678_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for &(n, k, d) in
            &[(1usize, 1usize, 8usize), (7, 5, 16), (48, 16, 8), (53, 17, 24), (100, 300, 32), (13, 257, 64)]
        {
            let x: Vec<f32> = (0..n * d).map(|_| next()).collect();
            let c: Vec<f32> = (0..k * d).map(|_| next()).collect();
            let packed = PackedCentroids::new(&c, k, d);
            let want: Vec<(u32, f64)> = x
                .chunks(d)
                .map(|p| {
                    let dots = c.chunks(d).map(|q| p.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>());
                    dots.enumerate().fold(
                        (0u32, f64::NEG_INFINITY),
                        |(bi, bv), (i, v)| if v > bv { (i as u32, v) } else { (bi, bv) },
                    )
                })
                .collect();
            #[cfg(target_arch = "x86_64")]
            let simd_ok = crate::cpu::has_avx2();
            #[cfg(not(target_arch = "x86_64"))]
            let simd_ok = false;
            for simd in [false, true] {
                if simd && !simd_ok {
                    continue;
                }
                let (mut idx, mut best) = (vec![0u32; n], vec![0f32; n]);
                for b in 0..n.div_ceil(BLOCK) {
                    let rows = (n - b * BLOCK).min(BLOCK);
                    let r = b * BLOCK..b * BLOCK + rows;
                    block(&x[r.start * d..r.end * d], rows, d, &packed, &mut idx[r.clone()], &mut best[r], simd);
                }
                for i in 0..n {
                    let (wi, wv) = want[i];
                    assert!(
                        (best[i] as f64 - wv).abs() < 1e-4,
                        "n {n} k {k} d {d} simd {simd}: best {} vs {wv}",
                        best[i]
                    );
                    if idx[i] != wi {
                        // Only a near tie may pick another centroid.
                        let other: f64 = x[i * d..(i + 1) * d]
                            .iter()
                            .zip(&c[idx[i] as usize * d..])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        assert!(
                            (other - wv).abs() < 1e-5,
                            "n {n} k {k} d {d} simd {simd}: point {i} got {} not {wi}",
                            idx[i]
                        );
                    }
                }
            }
        }
    }
}
