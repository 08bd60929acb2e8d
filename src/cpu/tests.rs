use super::*;
use crate::dtype::{load_f32, store_f32, DType};
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The fused RoPE score tile against rotating each stored row with `RopeConfig::rotate`
    /// first: bit for bit the scores of the same level's tile over the rotated f32 rows for
    /// adjacent pairs (same order of operations), and within f32 rounding of f64 sums over
    /// the rotated rows for half-split pairs (each pair's halves are summed together), for
    /// partial rotary dims, every dtype, tile shapes and tails, and positions inside and
    /// past the shared table.
    #[test]
    fn fused_rope_scores_equal_rotating_rows_first(
        seed in any::<u64>(), rows in 1usize..10, t in 1usize..20,
        d in prop_oneof![Just(16usize), Just(32), Just(64), Just(128)], partial in any::<bool>(),
        half_split in any::<bool>(), dt in 0usize..3,
    ) {
        use crate::attention::{RopeConfig, RopeStyle};
        let dtype = [DType::F32, DType::F16, DType::BF16][dt];
        let style = if half_split { RopeStyle::HalfSplit } else { RopeStyle::AdjacentPairs };
        let rot = if partial { d / 2 } else { d };
        let cfg = RopeConfig { theta: 10_000.0, rotary_dim: rot, style, position_scale: 1.0 };
        let inv = cfg.inv_freq(d);
        let table = cfg.table(d, 512);
        let mut state = seed | 1;
        let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
        let q: Vec<f32> = (0..rows * d).map(|_| (next() % 20_001) as f32 / 10_000.0 - 1.0).collect();
        let es = dtype.size();
        let mut kb = vec![0u8; t * d * es];
        for i in 0..t * d {
            store_f32(&mut kb, dtype, i, (next() % 20_001) as f32 / 10_000.0 - 1.0);
        }
        let positions: Vec<f32> = (0..t).map(|j| if j % 3 == 2 { 70_000.0 + j as f32 } else { (next() % 600) as f32 }).collect();
        let mut computed = vec![0f32; t * rot];
        let cs: Vec<*const f32> = positions.iter().enumerate().map(|(j, &p)| match table.row(p) {
            Some(r) => r.as_ptr(),
            None => {
                cfg.rotation_row(p, &inv, &mut computed[j * rot..(j + 1) * rot]);
                computed[j * rot..].as_ptr()
            }
        }).collect();
        let mut rotated = vec![0f32; t * d];
        for j in 0..t {
            let row = &mut rotated[j * d..(j + 1) * d];
            for (c, x) in row.iter_mut().enumerate() {
                *x = load_f32(&kb, dtype, j * d + c);
            }
            cfg.rotate(row, positions[j], &inv);
        }
        let k_rows: Vec<*const u8> = (0..t).map(|j| kb[j * d * es..].as_ptr()).collect();
        let r_rows: Vec<*const u8> = (0..t).map(|j| rotated[j * d..].as_ptr() as *const u8).collect();
        let (mut fused, mut plain) = (vec![0f32; rows * t], vec![0f32; rows * t]);
        // SAFETY: every row pointer covers d elements, every cs pointer rot floats.
        let ran = unsafe { scores_rope_ahead(&q, rows, d, &k_rows, dtype, (&cs, rot, half_split), &mut fused, &[]) };
        if ran {
            #[cfg(target_arch = "x86_64")]
            if super::attend::rope_avx512(rows, d, rot, half_split) {
                // SAFETY: as above; the AVX-512 fused tile ran, so the CPU has AVX-512F.
                unsafe { avx512::scores::<{ avx2::F32 }>(&q, rows, d, &r_rows, &mut plain, &[]) };
            } else {
                // SAFETY: as above; the fused kernel ran, so the CPU has AVX2, FMA and F16C.
                unsafe { avx2::scores::<{ avx2::F32 }>(&q, rows, d, &r_rows, &mut plain, &[]) };
            }
            if half_split {
                for r in 0..rows {
                    for j in 0..t {
                        let qr = &q[r * d..(r + 1) * d];
                        let kr = &rotated[j * d..(j + 1) * d];
                        let want: f64 = qr.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = qr.iter().zip(kr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let got = fused[r * t + j] as f64;
                        prop_assert!((got - want).abs() <= 1e-5 * mag + 1e-30, "row {} key {}: {} vs {}", r, j, got, want);
                    }
                }
            } else {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&fused), bits(&plain));
            }
        } else {
            // Only a half-split rotation of 8 channels (4 pairs, half a vector) has no fused tile.
            prop_assert!(!has_avx2() || (half_split && rot == 8), "no fused tile for rot {} half_split {}", rot, half_split);
        }
    }
}
