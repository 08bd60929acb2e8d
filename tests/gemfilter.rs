//! GemFilter and SnapKV scoring against plain f64 references on random data.

mod common;
use common::{fill_sequence, Rng};
use kvsieve::select::gemfilter::{
    avg_pool, calibrate_layers, select, snapkv, token_scores, GemFilterConfig, KeySource, SnapKvConfig,
};
use kvsieve::{CacheConfig, DType, ErrorCode, KvCache, TensorView};
use proptest::prelude::*;

fn ref_scores(q: &[f32], hq: usize, keys: &[f32], hk: usize, d: usize) -> Vec<f64> {
    let n = keys.len() / (hk * d);
    let g = hq / hk;
    (0..n)
        .map(|t| {
            (0..hq)
                .map(|h| (0..d).map(|c| q[h * d + c] as f64 * keys[(t * hk + h / g) * d + c] as f64).sum::<f64>())
                .sum()
        })
        .collect()
}

fn ref_pool(x: &[f64], kernel: usize) -> Vec<f64> {
    let r = kernel / 2;
    (0..x.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(r), (i + r + 1).min(x.len()));
            x[a..b].iter().sum::<f64>() / (b - a) as f64
        })
        .collect()
}

/// `kept` (ascending, size k) holds the forced tokens and otherwise only tokens scoring at
/// least as high (within `eps`) as every token left out.
fn check_topk(kept: &[u32], score: &[f64], k: usize, forced: &dyn Fn(usize) -> bool, eps: f64) {
    assert_eq!(kept.len(), k);
    assert!(kept.windows(2).all(|w| w[0] < w[1]), "not ascending: {kept:?}");
    let set: std::collections::HashSet<usize> = kept.iter().map(|&t| t as usize).collect();
    let n = score.len();
    for t in (0..n).filter(|&t| forced(t)) {
        assert!(set.contains(&t), "forced token {t} missing");
    }
    let worst_kept = set.iter().filter(|&&t| !forced(t)).map(|&t| score[t]).fold(f64::INFINITY, f64::min);
    let best_left = (0..n).filter(|t| !set.contains(t)).map(|t| score[t]).fold(f64::NEG_INFINITY, f64::max);
    assert!(worst_kept >= best_left - eps, "kept {worst_kept} < left out {best_left}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn gemfilter_scores_pooling_and_selection_match_reference(
        n in 1usize..400, group in prop_oneof![Just(1usize), Just(3), Just(4)], kernel in prop_oneof![Just(1usize), Just(5), Just(7)],
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16)], from_cache in any::<bool>(), seed in any::<u64>(),
        kfrac in 0.0f64..1.0, first in 0usize..4, last in 0usize..4,
    ) {
        let (hk, d) = (2, 64);
        let hq = hk * group;
        let mut rng = Rng(seed);
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, 16, n.div_ceil(16)).with_dtype(dtype)).unwrap();
        let id = fill_sequence(&mut cache, n, &mut rng, 1.0);
        let keys = cache.read_keys(id, 0).unwrap();
        // The tensor source sees every other row of a wider buffer (strided, f32).
        let mut wide = vec![0f32; 2 * n * hk * d];
        for t in 0..n { wide[2 * t * hk * d..(2 * t + 1) * hk * d].copy_from_slice(&keys[t * hk * d..(t + 1) * hk * d]); }
        let tv = TensorView::strided(&wide, &[n, hk, d], &[2 * hk * d, d, 1]).unwrap();
        let src = if from_cache { KeySource::Cache { cache: &cache, seq: id, layer: 0 } } else { KeySource::Tensor(&tv) };
        let want = ref_scores(&q, hq, &keys, hk, d);
        let got = token_scores(&qv, src).unwrap();
        for (a, b) in got.iter().zip(&want) { prop_assert!((*a as f64 - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} {b}"); }
        let pooled = avg_pool(&got, kernel).unwrap();
        for (a, b) in pooled.iter().zip(ref_pool(&want, kernel)) { prop_assert!((*a as f64 - b).abs() < 1e-3 * (1.0 + b.abs())); }
        let k = ((n as f64 * kfrac) as usize).clamp((first + last).min(n), n).max(1);
        let cfg = GemFilterConfig { k, pool_kernel: kernel, keep_first: first.min(n), keep_last: last.min(n) };
        if cfg.keep_first + cfg.keep_last > k { return Ok(()); }
        let kept = select(&qv, src, &cfg).unwrap();
        let forced = |t: usize| t < cfg.keep_first || t + cfg.keep_last >= n;
        check_topk(&kept, &ref_pool(&want, kernel), k, &forced, 1e-3);
    }

    #[test]
    fn snapkv_keeps_the_most_attended_prefix_tokens(n in 2usize..200, w in 1usize..16, kfrac in 0.0f64..1.0, seed in any::<u64>()) {
        let (hk, group, d) = (2, 2, 64);
        let hq = hk * group;
        let w = w.min(n);
        let k = w + ((n - w) as f64 * kfrac) as usize;
        let mut rng = Rng(seed);
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, 16, n.div_ceil(16)).with_dtype(DType::F32)).unwrap();
        let id = fill_sequence(&mut cache, n, &mut rng, 2.0);
        let keys = cache.read_keys(id, 0).unwrap();
        let qw = rng.vec(w * hq * d, 1.0);
        let cfg = SnapKvConfig { k, pool_kernel: 7, scale: None };
        let res = snapkv(&TensorView::new(&qw, &[w, hq, d]).unwrap(), KeySource::Cache { cache: &cache, seq: id, layer: 0 }, &cfg).unwrap();
        let prefix = n - w;
        let scale = 1.0 / (d as f64).sqrt();
        for h in 0..hk {
            let mut votes = vec![0f64; prefix];
            for i in 0..w {
                for j in 0..group {
                    let qh = &qw[(i * hq + h * group + j) * d..(i * hq + h * group + j + 1) * d];
                    let logits: Vec<f64> = (0..=prefix + i).map(|t| scale * (0..d).map(|c| qh[c] as f64 * keys[(t * hk + h) * d + c] as f64).sum::<f64>()).collect();
                    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                    for t in 0..prefix { votes[t] += (logits[t] - m).exp() / z; }
                }
            }
            let mut score = ref_pool(&votes, 7);
            score.extend(std::iter::repeat_n(f64::INFINITY, w));
            check_topk(res.per_head.head(h), &score, k, &|t| t >= prefix, 1e-5);
        }
        let mut union: Vec<u32> = (0..hk).flat_map(|h| res.per_head.head(h).to_vec()).collect();
        union.sort_unstable(); union.dedup();
        prop_assert_eq!(res.union, union);
    }
}

#[test]
fn calibration_finds_the_layer_that_sees_the_needle() {
    // Two "layers": in layer 1 the needle's keys align with the last query, in layer 0 not.
    let (n, hk, hq, d) = (300, 2, 4, 64);
    let needle = 120..130;
    let mut rng = Rng(5);
    let q = rng.vec(hq * d, 1.0);
    let mut layers = Vec::new();
    for layer in 0..2 {
        let mut keys = rng.vec(n * hk * d, 0.3);
        if layer == 1 {
            for t in needle.clone() {
                for h in 0..hk {
                    for c in 0..d {
                        keys[(t * hk + h) * d + c] += q[(h * 2) * d + c] + q[(h * 2 + 1) * d + c];
                    }
                }
            }
        }
        layers.push(keys);
    }
    let cfg = GemFilterConfig::new(32);
    let views: Vec<TensorView> = layers.iter().map(|k| TensorView::new(k, &[n, hk, d]).unwrap()).collect();
    let qv = TensorView::new(&q, &[hq, d]).unwrap();
    let res =
        calibrate_layers(2, needle.clone(), &cfg, &mut |l| Ok((qv.clone(), KeySource::Tensor(&views[l])))).unwrap();
    assert_eq!(res[1].recall, 1.0, "{res:?}");
    assert!(res[0].recall < 0.5, "{res:?}");
}

#[test]
fn gemfilter_bad_input() {
    let mut rng = Rng(1);
    let mut cache = KvCache::new(CacheConfig::new(1, 2, 64, 16, 4)).unwrap();
    let id = fill_sequence(&mut cache, 50, &mut rng, 1.0);
    let q = rng.vec(4 * 64, 1.0);
    let qv = TensorView::new(&q, &[4, 64]).unwrap();
    let src = KeySource::Cache { cache: &cache, seq: id, layer: 0 };
    let e = select(&qv, src, &GemFilterConfig::new(0)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfRange);
    assert!(e.to_string().contains("`k`"));
    assert!(select(&qv, src, &GemFilterConfig::new(51)).unwrap_err().to_string().contains("`k`"));
    for kernel in [0, 4] {
        let e = select(&qv, src, &GemFilterConfig { pool_kernel: kernel, ..GemFilterConfig::new(5) }).unwrap_err();
        assert!(e.to_string().contains("pool_kernel"), "{e}");
    }
    let q3 = TensorView::new(&q[..3 * 64], &[3, 64]).unwrap();
    assert!(select(&q3, src, &GemFilterConfig::new(5)).unwrap_err().to_string().contains("`q`"));
    let e = select(&qv, src, &GemFilterConfig { keep_first: 4, keep_last: 4, ..GemFilterConfig::new(5) }).unwrap_err();
    assert!(e.to_string().contains("keep_first"), "{e}");
    // Key tensors the kernels cannot read are refused, not read past their rows.
    let odd = vec![0.5f32; 10 * 2 * 12];
    let ov = TensorView::new(&odd, &[10, 2, 12]).unwrap();
    let q12 = vec![0.5f32; 4 * 12];
    let e = select(&TensorView::new(&q12, &[4, 12]).unwrap(), KeySource::Tensor(&ov), &GemFilterConfig::new(2))
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unsupported, "{e}");
    let none: Vec<f32> = Vec::new();
    let nv = TensorView::new(&none, &[10, 0, 64]).unwrap();
    assert!(select(&qv, KeySource::Tensor(&nv), &GemFilterConfig::new(2)).unwrap_err().to_string().contains("keys"));
    let qw = TensorView::new(&q, &[1, 4, 64]).unwrap();
    let e = snapkv(&qw, src, &SnapKvConfig { k: 0, pool_kernel: 7, scale: None }).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = snapkv(&qw, src, &SnapKvConfig { k: 10, pool_kernel: 2, scale: None }).unwrap_err();
    assert!(e.to_string().contains("pool_kernel"), "{e}");
}
