//! Nearest-centroid assignment: for every point, the centroid with the largest dot product
//! (the nearest one when points and centroids are unit vectors), as a blocked
//! `[n × d] · [d × C]` product fused with a running argmax.
//!
//! Centroids are packed into panels of [`PANEL`] centroids stored channel-major
//! (`panel[c][j]` = channel `c` of centroid `panel_index * PANEL + j`). The AVX2 inner loop
//! loads two 8-wide vectors of one channel for 16 centroids and broadcasts that channel of
//! six points against them: 12 FMAs per 8 loads; points are taken in blocks of [`BLOCK`]
//! rows, each block running over groups of [`GROUP`] panels (128 KiB at head_dim 128, held
//! in L2 while every micro-tile of the block uses it). The AVX-512 inner loop loads one
//! 16-wide vector of four panels each and broadcasts six points (interleaved channel by
//! channel) against them: 24 FMAs of twice the width per 10 loads; four panels (32 KiB,
//! in L1) meet every micro-tile of the block before the next four. Each row keeps, per
//! lane, the best value and its centroid index; ties keep the earlier (lower) index, and
//! the lanes reduce to the first maximum, so the answer is the lowest-index argmax whatever
//! the tiling and thread count.

use rayon::prelude::*;

/// Centroids per packed panel (two AVX2 vectors).
pub(crate) const PANEL: usize = 16;
/// Points per micro-tile.
const MR: usize = 6;
/// Points per parallel task (a multiple of `MR`).
const BLOCK: usize = 8 * MR;

/// Panels scored by one block before it moves on.
const GROUP: usize = 16;

/// Which micro-tile a block runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Portable,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

impl Kernel {
    /// The best kernel the CPU (and `KVSIEVE_ISA`) allows.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx512() {
            return Kernel::Avx512;
        } else if crate::cpu::has_avx2() {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }
}

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
    let kernel = Kernel::best();
    idx.par_chunks_mut(BLOCK).zip(best.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (idx, best))| {
        let rows = idx.len();
        let x = &points[b * BLOCK * d..(b * BLOCK + rows) * d];
        block(x, rows, d, cents, idx, best, kernel);
    });
}

/// One block of up to [`BLOCK`] rows with `kernel` (one the CPU has).
fn block(x: &[f32], rows: usize, d: usize, cents: &PackedCentroids, idx: &mut [u32], best: &mut [f32], kernel: Kernel) {
    let padded = rows.div_ceil(MR) * MR;
    // Rows padded with zeros to whole micro-tiles (their results are dropped); for AVX-512
    // each micro-tile's rows are interleaved channel by channel (`[c][MR]`), so that its
    // broadcasts walk one pointer.
    let mut buf;
    let x = if kernel == Kernel::Avx512 {
        buf = vec![0f32; padded * d];
        for (r, row) in x.chunks_exact(d).enumerate() {
            let tile = &mut buf[(r / MR) * MR * d..];
            for (c, &v) in row.iter().enumerate() {
                tile[c * MR + r % MR] = v;
            }
        }
        &buf[..]
    } else if padded == rows {
        x
    } else {
        buf = vec![0f32; padded * d];
        buf[..rows * d].copy_from_slice(x);
        &buf[..]
    };
    let mut bv = [f32::NEG_INFINITY; BLOCK * PANEL];
    let mut bi = [0i32; BLOCK * PANEL];
    match kernel {
        // SAFETY: the CPU has AVX-512F (the caller picked the kernel); `x` holds `padded` rows
        // of d, `bv`/`bi` BLOCK * PANEL >= padded * PANEL entries.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { avx512_block(x, padded / MR, d, cents, &mut bv, &mut bi) },
        _ => by_groups(x, padded / MR, d, cents, kernel, &mut bv, &mut bi),
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

/// The AVX2 or portable tile over groups of [`GROUP`] panels, each group against all `tiles`
/// micro-tiles of `x` before the next.
fn by_groups(
    x: &[f32],
    tiles: usize,
    d: usize,
    cents: &PackedCentroids,
    kernel: Kernel,
    bv: &mut [f32],
    bi: &mut [i32],
) {
    let panels = cents.panels();
    for g0 in (0..panels).step_by(GROUP) {
        for t in 0..tiles {
            let xt = &x[t * MR * d..(t + 1) * MR * d];
            let (tv, ti) =
                (&mut bv[t * MR * PANEL..(t + 1) * MR * PANEL], &mut bi[t * MR * PANEL..(t + 1) * MR * PANEL]);
            for p in g0..(g0 + GROUP).min(panels) {
                let (panel, valid, col0) = (cents.panel(p), cents.valid(p), (p * PANEL) as i32);
                #[cfg(target_arch = "x86_64")]
                if kernel == Kernel::Avx2 {
                    // SAFETY: the CPU has AVX2 and FMA (the caller picked the kernel); `xt` holds
                    // MR rows of d, `panel` d * PANEL values, `tv`/`ti` MR * PANEL entries.
                    unsafe { avx2::tile(xt, d, panel, valid, col0, tv, ti) };
                    continue;
                }
                portable_tile(xt, d, panel, valid, col0, tv, ti);
            }
        }
    }
}

/// The AVX-512 tile over every panel, four at a time (then two, then one), each set of
/// panels (32 KiB at head_dim 128, held in L1) against all `tiles` micro-tiles of `x` before
/// the next.
///
/// # Safety
/// The CPU has AVX-512F; `x` holds `tiles * MR` rows of `cents.d` (interleaved per
/// micro-tile), `bv`/`bi` `tiles * MR * PANEL` entries.
#[cfg(target_arch = "x86_64")]
unsafe fn avx512_block(x: &[f32], tiles: usize, d: usize, cents: &PackedCentroids, bv: &mut [f32], bi: &mut [i32]) {
    let panels = cents.panels();
    // Real centroids from panel p's first on (the tile needs only whether each lane is one).
    let valid = |p: usize| cents.k - p * PANEL;
    let mut p = 0;
    while p < panels {
        let np = if p + 4 <= panels {
            4
        } else if p + 2 <= panels {
            2
        } else {
            1
        };
        for t in 0..tiles {
            let xt = &x[t * MR * d..(t + 1) * MR * d];
            let (tv, ti) =
                (&mut bv[t * MR * PANEL..(t + 1) * MR * PANEL], &mut bi[t * MR * PANEL..(t + 1) * MR * PANEL]);
            let col0 = (p * PANEL) as i32;
            match np {
                4 => {
                    let quad = [cents.panel(p), cents.panel(p + 1), cents.panel(p + 2), cents.panel(p + 3)];
                    avx512::tile::<4>(xt, d, quad, valid(p), col0, tv, ti)
                }
                2 => avx512::tile::<2>(xt, d, [cents.panel(p), cents.panel(p + 1)], valid(p), col0, tv, ti),
                _ => avx512::tile::<1>(xt, d, [cents.panel(p)], valid(p), col0, tv, ti),
            }
        }
        p += np;
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, PANEL};
    use std::arch::x86_64::*;

    /// The AVX2 tile's job for NP consecutive panels at once (`panels[i]`, their first
    /// centroid `col0 + i * PANEL`) and MR rows interleaved channel by channel (`x[c * MR + r]`),
    /// one 16-lane vector per row and panel: per channel NP
    /// loads and MR broadcasts feed MR * NP FMAs. The same FMA order per lane as the AVX2
    /// tile, so the same bits. `valid` counts the real centroids from `col0` on (more than
    /// the NP panels hold where they are not the last); panels merge into `bv` / `bi`
    /// (`[MR][PANEL]`) in order, so ties keep the lower index as one panel at a time does.
    ///
    /// # Safety
    /// 1. the CPU supports AVX-512F;
    /// 2. `x.len() >= MR * d`, each panel holds `d * PANEL` values, `bv.len() >= MR * PANEL`,
    ///    `bi.len() >= MR * PANEL`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const NP: usize>(
        x: &[f32],
        d: usize,
        panels: [&[f32]; NP],
        valid: usize,
        col0: i32,
        bv: &mut [f32],
        bi: &mut [i32],
    ) {
        debug_assert!(x.len() >= MR * d && bv.len() >= MR * PANEL && bi.len() >= MR * PANEL);
        debug_assert!(panels.iter().all(|p| p.len() >= d * PANEL));
        let xp = x.as_ptr();
        let bp = panels.map(|p| p.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for c in 0..d {
            let mut b = [_mm512_setzero_ps(); NP];
            for (v, p) in b.iter_mut().zip(bp) {
                *v = _mm512_loadu_ps(p.add(c * PANEL));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(c * MR + r));
                for (av, bv) in a.iter_mut().zip(b) {
                    *av = _mm512_fmadd_ps(xv, bv, *av);
                }
            }
        }
        let lane0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (vp, ip) = (bv.as_mut_ptr(), bi.as_mut_ptr());
        for i in 0..NP {
            let first = col0 + (i * PANEL) as i32;
            let lanes = _mm512_add_epi32(_mm512_set1_epi32(first), lane0);
            // Padding lanes (the last panel's centroids at or past `valid`) never win.
            let left = valid.saturating_sub(i * PANEL);
            let real: __mmask16 = if left >= PANEL { !0 } else { (1u16 << left) - 1 };
            for (r, a) in acc.iter().enumerate() {
                let o = r * PANEL;
                let cur = _mm512_loadu_ps(vp.add(o));
                let gt = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(real, a[i], cur);
                _mm512_storeu_ps(vp.add(o), _mm512_mask_blend_ps(gt, cur, a[i]));
                let ci = _mm512_loadu_si512(ip.add(o) as *const _);
                _mm512_storeu_si512(ip.add(o) as *mut _, _mm512_mask_blend_epi32(gt, ci, lanes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the CPU has against a plain argmax over f64 dot products, on shapes with partial
    /// micro-tiles, partial panels and several panel groups.
    #[test]
    fn every_kernel_matches_plain_argmax() {
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
            let mut kernels = vec![Kernel::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                if crate::cpu::has_avx2() {
                    kernels.push(Kernel::Avx2);
                }
                if crate::cpu::has_avx512() {
                    kernels.push(Kernel::Avx512);
                }
            }
            let mut first_simd: Option<(Vec<u32>, Vec<f32>)> = None;
            for kernel in kernels {
                let (mut idx, mut best) = (vec![0u32; n], vec![0f32; n]);
                for b in 0..n.div_ceil(BLOCK) {
                    let rows = (n - b * BLOCK).min(BLOCK);
                    let r = b * BLOCK..b * BLOCK + rows;
                    block(&x[r.start * d..r.end * d], rows, d, &packed, &mut idx[r.clone()], &mut best[r], kernel);
                }
                for i in 0..n {
                    let (wi, wv) = want[i];
                    assert!(
                        (best[i] as f64 - wv).abs() < 1e-4,
                        "n {n} k {k} d {d} {kernel:?}: best {} vs {wv}",
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
                            "n {n} k {k} d {d} {kernel:?}: point {i} got {} not {wi}",
                            idx[i]
                        );
                    }
                }
                // The SIMD kernels fuse each multiply-add in the same order: the same bits.
                if kernel != Kernel::Portable {
                    match &first_simd {
                        None => first_simd = Some((idx, best)),
                        Some((i0, b0)) => {
                            assert_eq!(&idx, i0, "n {n} k {k} d {d}: {kernel:?} indices");
                            assert!(
                                best.iter().zip(b0).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "n {n} k {k} d {d}: {kernel:?} values"
                            );
                        }
                    }
                }
            }
        }
    }
}
