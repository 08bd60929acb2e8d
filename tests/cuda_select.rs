//! The CUDA selection kernels against the CPU backend on fresh random inputs (seeded,
//! several shapes, f32 / f16 / bf16), outputs poisoned before each run. Without a GPU or
//! driver every test prints `skipped: <test>: <reason>` and passes.
#![cfg(feature = "cuda")]

mod cuda_util;

use std::sync::Arc;

use cuda_util::{assert_close, device_or_skip, Rng, POISON_BYTE};
use kvsieve::backend::cuda::select::cluster::{build_index, ClusterWorkspace, CudaClusterIndex};
use kvsieve::backend::cuda::select::gemfilter::{gemfilter_select, GemFilterWorkspace};
use kvsieve::backend::cuda::select::kmeans::{Assignment, CudaKMeans};
use kvsieve::backend::cuda::select::pages::{page_bounds, PageBoundsWorkspace};
use kvsieve::backend::cuda::select::topk::top_k_segments;
use kvsieve::backend::cuda::{
    CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceBuffer, DeviceTensor, KeyBoundsLayout, Stream,
};
use kvsieve::select::cluster::{
    kmeans as cpu_kmeans, kmeans_from_centroids, seed_plus_plus, ClusterConfig, ClusterCount, ClusterIndex,
    CoarseRetrieve, KMeansConfig, KeySource, Retrieve,
};
use kvsieve::select::gemfilter::{avg_pool, select as gem_select, token_scores, GemFilterConfig};
use kvsieve::select::{
    page_bounds as cpu_page_bounds, page_scores as cpu_page_scores, top_k, PageBoundsConfig, Selection,
};
use kvsieve::{bf16, f16, CacheConfig, DType, KvCache, PageLayout, PagedKvLayout, TensorView};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Values rounded to `dtype` (as f32) and their device bytes.
fn rounded(v: &[f32], dtype: DType) -> (Vec<f32>, Vec<u8>) {
    match dtype {
        DType::F32 => (v.to_vec(), bytemuck::cast_slice(v).to_vec()),
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            (h.iter().map(|x| x.to_f32()).collect(), bytemuck::cast_slice(&h).to_vec())
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            (h.iter().map(|x| x.to_f32()).collect(), bytemuck::cast_slice(&h).to_vec())
        }
    }
}

fn upload_bytes(dev: &Arc<CudaDevice>, bytes: &[u8], stream: &Stream) -> DeviceBuffer {
    DeviceBuffer::from_slice(dev, if bytes.is_empty() { &[0u8][..] } else { bytes }, stream).unwrap()
}

/// Selections whose every byte is poison, for `lists` lists of up to `cap` tokens.
fn poisoned_selections(
    dev: &Arc<CudaDevice>,
    stream: &Stream,
    batch: usize,
    hk: usize,
    cap: usize,
) -> (CudaSelections, Vec<DeviceBuffer>) {
    let ip = DeviceBuffer::alloc(dev, (batch * hk + 1) * 4).unwrap();
    let ix = DeviceBuffer::alloc(dev, (batch * hk * cap).max(1) * 4).unwrap();
    ip.memset(POISON_BYTE, stream).unwrap();
    ix.memset(POISON_BYTE, stream).unwrap();
    // SAFETY: both buffers live as long as the returned selections (returned together).
    let s = unsafe { CudaSelections::from_device(ip.ptr(), ix.ptr(), batch, hk, cap, dev.ordinal()) }.unwrap();
    (s, vec![ip, ix])
}

#[test]
fn topk_segments_match_cpu() {
    let Some(dev) = device_or_skip("topk_segments_match_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x70b);
    for &k in &[1usize, 7, 64, 1500] {
        let lens = [0usize, 1, 5, 100, 1000, 4097, 20000];
        let mut scores = Vec::new();
        for &l in &lens {
            for i in 0..l {
                // Coarse values so ties are common, with NaN, infinities and signed zeros.
                let x = match rng.below(40) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    3 => -0.0,
                    4 => 0.0,
                    _ => (rng.below(200) as f32 - 100.0) * if i % 3 == 0 { 0.5 } else { 1.0 },
                };
                scores.push(x);
            }
        }
        let buf = DeviceBuffer::from_slice(&dev, &scores, stream).unwrap();
        let got = top_k_segments(&dev, stream, &buf, &lens, k).unwrap();
        let mut start = 0;
        for (s, &l) in lens.iter().enumerate() {
            let want = top_k(&scores[start..start + l], k);
            assert_eq!(got[s], want, "segment {s} (len {l}), k {k}");
            start += l;
        }
    }
}

/// A cache with one layer holding `lens` sequences of random keys.
fn random_cache(
    rng: &mut Rng,
    dtype: DType,
    ps: usize,
    hk: usize,
    d: usize,
    lens: &[usize],
) -> (KvCache, Vec<kvsieve::SeqId>) {
    let capacity: usize = lens.iter().map(|l| l.div_ceil(ps)).sum::<usize>() + 3;
    let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, capacity).with_dtype(dtype)).unwrap();
    let mut ids = Vec::new();
    for &l in lens {
        let id = cache.create_sequence();
        cache.append(id, l, None).unwrap();
        let k = rng.vec(l * hk * d, 2.0);
        let v = rng.vec(l * hk * d, 1.0);
        cache
            .write(id, 0, 0, &TensorView::new(&k, &[l, hk, d]).unwrap(), &TensorView::new(&v, &[l, hk, d]).unwrap())
            .unwrap();
        ids.push(id);
    }
    (cache, ids)
}

/// Tokens of `sel`'s head `h` as pages (token / ps), deduplicated.
fn pages_of(sel: &Selection, h: usize, ps: usize) -> Vec<usize> {
    let mut p: Vec<usize> = sel.head(h).iter().map(|&t| t as usize / ps).collect();
    p.dedup();
    p
}

/// The device's page selection equals the CPU's, or differs only in pages whose CPU
/// scores are within rounding of the cut (the page count agreeing).
fn assert_pages_match(
    what: &str,
    got: &Selection,
    want: &Selection,
    want_scores: &[f32],
    np: usize,
    hk: usize,
    ps: usize,
) {
    if got == want {
        return;
    }
    for h in 0..hk {
        let (g, w) = (pages_of(got, h, ps), pages_of(want, h, ps));
        if g == w {
            continue;
        }
        let s = &want_scores[h * np..(h + 1) * np];
        let cut = w.iter().map(|&p| s[p]).fold(f32::INFINITY, f32::min);
        for p in g.iter().filter(|p| !w.contains(p)).chain(w.iter().filter(|p| !g.contains(p))) {
            assert!(
                (s[*p] - cut).abs() <= 4e-3 + 1e-3 * cut.abs(),
                "{what} head {h}: page {p} (score {}) differs from the CPU's pages {w:?} (cut {cut}), got {g:?}",
                s[*p]
            );
        }
        assert_eq!(g.len(), w.len(), "{what} head {h}: page count");
    }
}

#[test]
fn page_bounds_match_cpu() {
    let Some(dev) = device_or_skip("page_bounds_match_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x9a6e);
    let shapes = [(16usize, 64usize, 2usize, 4usize), (32, 128, 2, 8), (64, 64, 1, 3), (16, 128, 4, 4)];
    for dtype in DTYPES {
        for &(ps, d, hk, hq) in &shapes {
            let lens = [1usize, 37, 300, 1000, 64];
            let (cache, ids) = random_cache(&mut rng, dtype, ps, hk, d, &lens);
            let cap = cache.config().capacity_pages;
            let bounds = cache.key_bounds(0).unwrap();
            let bounds_dev = upload_bytes(&dev, bounds.bytes, stream);
            let table = cache.page_table(&ids).unwrap();
            let dtable = CudaPageTable::upload(&dev, table.as_ref(), ps, cap, stream).unwrap();
            let bytes = cap * ps * hk * d * dtype.size();
            let kbuf = DeviceBuffer::zeroed(&dev, bytes, stream).unwrap();
            let vbuf = DeviceBuffer::zeroed(&dev, bytes, stream).unwrap();
            let layout = PagedKvLayout::packed(dtype, cap, ps, hk, d, PageLayout::Nhd);
            // SAFETY: K and V cover the layout; the bounds cover every page of the pool.
            let kv = unsafe {
                CudaPagedKv::from_raw(kbuf.ptr(), vbuf.ptr(), layout, &dtable)
                    .unwrap()
                    .with_key_bounds(KeyBoundsLayout { ptr: bounds_dev.ptr() })
                    .unwrap()
            };
            let b = lens.len();
            let (qf, qbytes) = rounded(&rng.vec(b * hq * d, 1.5), dtype);
            let qdev = upload_bytes(&dev, &qbytes, stream);
            let qt = DeviceTensor::contiguous(qdev.ptr(), dtype, &[b, hq, d], dev.ordinal());
            let mut ws = PageBoundsWorkspace::for_view(&dev, &kv, hq).unwrap();
            for cfg in [
                PageBoundsConfig::new(128),
                PageBoundsConfig::new(100).with_min_pages(5),
                PageBoundsConfig::new(1),
                PageBoundsConfig::new(5000),
            ] {
                let (out, _keep) = poisoned_selections(&dev, stream, b, hk, dtable.max_seq_len());
                page_bounds(stream, &kv, &qt, &cfg, &mut ws, &out).unwrap();
                ws.check_status(stream).unwrap();
                let got = out.to_host(&lens, stream).unwrap();
                let pages_per_seq: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
                let scores = ws.scores_to_host(&pages_per_seq, stream).unwrap();
                for (i, &id) in ids.iter().enumerate() {
                    let what = format!("{dtype} ps {ps} d {d} hk {hk} hq {hq} seq {i} cfg {cfg:?}");
                    let pages = cache.seq_pages(id).unwrap();
                    let qrow = &qf[i * hq * d..(i + 1) * hq * d];
                    let want_scores = cpu_page_scores(bounds, &pages, qrow, hq).unwrap();
                    assert_close(&format!("scores {what}"), &scores[i], &want_scores, 2e-3, 1e-4);
                    let qv = TensorView::new(qrow, &[hq, d]).unwrap();
                    let want = cpu_page_bounds(&cache, id, 0, &qv, &cfg).unwrap();
                    assert_pages_match(&what, &got[i], &want, &want_scores, pages.len(), hk, ps);
                }
            }
        }
    }
}

/// Host rule of centroid selection applied to given estimates (ranking by the f32 value
/// of the estimate, as the device does; the mixed ranking by the f64 estimates and upper
/// `bounds`): `(cluster, tokens taken)`.
fn choose(
    est: &[f64],
    bounds: &[f64],
    scored: &[bool],
    sizes: &[u32],
    how: &Retrieve,
    h: usize,
) -> Vec<(usize, usize)> {
    let ids: Vec<usize> = (0..est.len()).filter(|&c| scored[c]).collect();
    match how {
        Retrieve::Threshold(t) => ids.into_iter().filter(|&c| est[c] > *t).map(|c| (c, sizes[c] as usize)).collect(),
        Retrieve::PerHeadThreshold(v) => {
            ids.into_iter().filter(|&c| est[c] > v[h]).map(|c| (c, sizes[c] as usize)).collect()
        }
        Retrieve::Budget(b) => {
            let mut order = ids;
            order.sort_by(|&a, &c| (est[c] as f32).total_cmp(&(est[a] as f32)).then(a.cmp(&c)));
            let mut left = *b;
            let mut out = Vec::new();
            for c in order {
                if left == 0 {
                    break;
                }
                let take = (sizes[c] as usize).min(left);
                out.push((c, take));
                left -= take;
            }
            out
        }
        Retrieve::MixedBudget(b) => {
            let rank = |v: &[f64]| {
                let mut o = ids.clone();
                o.sort_by(|&a, &c| v[c].total_cmp(&v[a]).then(a.cmp(&c)));
                o
            };
            let (by_est, by_bound) = (rank(est), rank(bounds));
            let mut seen = vec![false; est.len()];
            let (mut i, mut j, mut left) = (0, 0, *b);
            let mut out = Vec::new();
            while left > 0 {
                let mut any = false;
                for (list, at) in [(&by_est, &mut i), (&by_bound, &mut j)] {
                    while *at < list.len() && seen[list[*at]] {
                        *at += 1;
                    }
                    if left > 0 && *at < list.len() {
                        let c = list[*at];
                        seen[c] = true;
                        let take = (sizes[c] as usize).min(left);
                        out.push((c, take));
                        left -= take;
                        any = true;
                    }
                }
                if !any {
                    break;
                }
            }
            out
        }
    }
}

/// Upper bounds `max_j (q_j·C_c + |q_j|·r_c)/√d` in f64 of the scored clusters (0 elsewhere),
/// for unscaled query rows `q` (`[g][d]`).
fn ref_bounds(q: &[f32], g: usize, d: usize, cents: &[f32], radii: &[f32], scored: &[bool]) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    (0..radii.len())
        .map(|c| {
            if !scored[c] {
                return 0.0;
            }
            (0..g)
                .map(|j| {
                    let qj = &q[j * d..(j + 1) * d];
                    let dot: f64 = qj.iter().zip(&cents[c * d..(c + 1) * d]).map(|(&x, &y)| x as f64 * y as f64).sum();
                    let norm = qj.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                    (dot + norm * radii[c] as f64) * scale
                })
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// Whether sorted `v` has two values within a relative 1e-4 (a near tie the device and the
/// CPU may order differently).
fn near_tie(v: &[f64]) -> bool {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.windows(2).any(|w| (w[1] - w[0]).abs() <= 1e-4 * w[1].abs())
}

fn gather(index: &ClusterIndex, h: usize, kept: &[(usize, usize)]) -> Vec<u32> {
    let mut t: Vec<u32> = kept.iter().flat_map(|&(c, take)| index.head(h).members(c)[..take].iter().copied()).collect();
    t.sort_unstable();
    t
}

/// Estimates in f64 for query rows `q` (`[g][d]`, unscaled): scored fine clusters plus the
/// closed coarse clusters in the denominator.
fn ref_estimates(
    q: &[f32],
    g: usize,
    d: usize,
    cents: &[f32],
    sizes: &[u32],
    scored: &[bool],
    extra: &[(Vec<f32>, u32)],
) -> Vec<f64> {
    let k = sizes.len();
    let scale = 1.0 / (d as f64).sqrt();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * scale;
    let mut s = vec![0f64; k];
    for j in 0..g {
        let qj = &q[j * d..(j + 1) * d];
        let l: Vec<f64> =
            (0..k).map(|c| if scored[c] { dot(qj, &cents[c * d..(c + 1) * d]) } else { f64::NEG_INFINITY }).collect();
        let le: Vec<f64> = extra.iter().map(|(c, _)| dot(qj, c)).collect();
        let m = l.iter().chain(le.iter()).fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let den: f64 = (0..k).filter(|&c| scored[c]).map(|c| (l[c] - m).exp() * sizes[c] as f64).sum::<f64>()
            + le.iter().zip(extra).map(|(&x, (_, n))| (x - m).exp() * *n as f64).sum::<f64>();
        for c in 0..k {
            if scored[c] {
                s[c] += (l[c] - m).exp() / den;
            }
        }
    }
    s.iter().map(|v| v / g as f64).collect()
}

fn assert_close64(what: &str, got: &[f64], want: &[f64], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= rtol * w.abs() + 1e-12, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn cluster_retrieval_matches_cpu() {
    let Some(dev) = device_or_skip("cluster_retrieval_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0xc105);
    for &(n, hk, g, d, k, k1) in
        &[(600usize, 2usize, 2usize, 64usize, 40usize, 6usize), (1500, 1, 4, 128, 97, 9), (900, 3, 1, 64, 64, 8)]
    {
        let keys = rng.vec(n * hk * d, 1.0);
        let kv = TensorView::new(&keys, &[n, hk, d]).unwrap();
        let cfg = ClusterConfig::new(ClusterCount::Absolute(k))
            .with_coarse(ClusterCount::Absolute(k1))
            .with_max_iter(6)
            .with_seed(3);
        let index = ClusterIndex::build(KeySource::Tensor(&kv), &cfg).unwrap();
        let cidx = CudaClusterIndex::upload(&dev, &index, stream).unwrap();
        let hq = hk * g;
        let mut ws = ClusterWorkspace::new(&cidx, hq).unwrap();
        for dtype in DTYPES {
            let what = format!("n {n} hk {hk} g {g} d {d} k {k} {dtype}");
            let (qf, qbytes) = rounded(&rng.vec(hq * d, 3.0), dtype);
            let qdev = upload_bytes(&dev, &qbytes, stream);
            let qt = DeviceTensor::contiguous(qdev.ptr(), dtype, &[hq, d], dev.ordinal());
            let qv = TensorView::new(&qf, &[hq, d]).unwrap();
            let cpu_est = index.cluster_estimates(&qv).unwrap();
            let mut sorted = cpu_est[0].clone();
            sorted.sort_by(f64::total_cmp);
            let tau = sorted[k / 2];
            let per_head: Vec<f64> = (0..hk).map(|h| cpu_est[h][k / 3]).collect();
            let all = vec![true; k];
            for how in [
                Retrieve::Threshold(tau),
                Retrieve::PerHeadThreshold(per_head.clone()),
                Retrieve::Budget(150),
                Retrieve::Budget(n + 5),
                Retrieve::Threshold(-1.0),
                Retrieve::MixedBudget(150),
                Retrieve::MixedBudget(37),
                Retrieve::MixedBudget(n + 5),
            ] {
                let mixed = matches!(how, Retrieve::MixedBudget(_));
                let (out, _keep) = poisoned_selections(&dev, stream, 1, hk, n);
                cidx.retrieve(stream, &qt, &how, &mut ws, &out).unwrap();
                let sel = out.to_host(&[n], stream).unwrap().remove(0);
                let est = ws.estimates(stream).unwrap();
                let stats = ws.stats(stream).unwrap();
                let cpu = index.retrieve(&qv, &how, n).unwrap();
                let bounds = if mixed { ws.bounds(stream).unwrap() } else { vec![Vec::new(); hk] };
                for h in 0..hk {
                    assert_close64(&format!("{what} estimates head {h}"), &est[h], &cpu_est[h], 2e-4);
                    if mixed {
                        let qh = &qf[h * g * d..(h + 1) * g * d];
                        let want = ref_bounds(qh, g, d, index.head(h).centroids(), index.head(h).radii(), &all);
                        assert_close64(&format!("{what} bounds head {h}"), &bounds[h], &want, 2e-4);
                    }
                    let kept = choose(&est[h], &bounds[h], &all, index.head(h).sizes(), &how, h);
                    assert_eq!(
                        sel.head(h),
                        &gather(&index, h, &kept)[..],
                        "{what} {how:?} head {h}: tokens against the device estimates"
                    );
                    assert_eq!(stats.clusters_kept[h], kept.len(), "{what} {how:?} head {h}: clusters kept");
                    assert_eq!(stats.tokens_kept[h], sel.head(h).len(), "{what} {how:?} head {h}: tokens kept");
                    assert_eq!(stats.clusters_scored[h], k);
                    // Against the CPU itself unless the CPU has a near tie at the cut.
                    let near = match &how {
                        Retrieve::Threshold(t) => cpu_est[h].iter().any(|e| (e - t).abs() <= 1e-4 * t.abs()),
                        Retrieve::PerHeadThreshold(v) => {
                            cpu_est[h].iter().any(|e| (e - v[h]).abs() <= 1e-4 * v[h].abs())
                        }
                        Retrieve::Budget(_) => near_tie(&cpu_est[h]),
                        Retrieve::MixedBudget(_) => near_tie(&cpu_est[h]) || near_tie(&bounds[h]),
                    };
                    if !near {
                        assert_eq!(
                            sel.head(h),
                            cpu.selection.head(h),
                            "{what} {how:?} head {h}: tokens against the CPU"
                        );
                    }
                }
                assert_eq!(stats.fine_evals, cpu.stats.fine_evals, "{what}: evaluations");
                assert_eq!(stats.centroid_evals, cpu.stats.centroid_evals);
            }
            // Hierarchical: coarse estimates against f64, opened set and children by rule,
            // fine estimates with the closed coarse terms.
            for (coarse, fine) in [
                (CoarseRetrieve::Threshold(-1.0), Retrieve::Budget(200)),
                (CoarseRetrieve::Budget(300), Retrieve::Budget(120)),
                (CoarseRetrieve::BudgetMultiple(2.0), Retrieve::Budget(100)),
                (CoarseRetrieve::Threshold(1.0 / n as f64), Retrieve::Threshold(tau)),
                (CoarseRetrieve::Budget(300), Retrieve::MixedBudget(120)),
                (CoarseRetrieve::Threshold(-1.0), Retrieve::MixedBudget(90)),
            ] {
                let mixed = matches!(fine, Retrieve::MixedBudget(_));
                let (out, _keep) = poisoned_selections(&dev, stream, 1, hk, n);
                cidx.retrieve_hierarchical(stream, &qt, coarse, &fine, &mut ws, &out).unwrap();
                let sel = out.to_host(&[n], stream).unwrap().remove(0);
                let est = ws.estimates(stream).unwrap();
                let cest = ws.coarse_estimates(stream).unwrap();
                let stats = ws.stats(stream).unwrap();
                let cpu = index.retrieve_hierarchical(&qv, coarse, &fine, n).unwrap();
                let bounds = if mixed { ws.bounds(stream).unwrap() } else { vec![Vec::new(); hk] };
                let mut evals = 0;
                for h in 0..hk {
                    let lv = index.coarse(h).unwrap();
                    let qh = &qf[h * g * d..(h + 1) * g * d];
                    let want_c = ref_estimates(qh, g, d, lv.centroids(), lv.sizes(), &vec![true; k1], &[]);
                    assert_close64(&format!("{what} coarse estimates head {h}"), &cest[h], &want_c, 2e-4);
                    let coarse_how = match coarse {
                        CoarseRetrieve::Threshold(t) => Retrieve::Threshold(t),
                        CoarseRetrieve::Budget(b) => Retrieve::Budget(b),
                        CoarseRetrieve::BudgetMultiple(m) => match fine {
                            Retrieve::Budget(b) => Retrieve::Budget((m * b as f64).ceil() as usize),
                            _ => unreachable!(),
                        },
                    };
                    let open: Vec<usize> = choose(&cest[h], &[], &vec![true; k1], lv.sizes(), &coarse_how, h)
                        .into_iter()
                        .map(|x| x.0)
                        .collect();
                    let mut scored = vec![false; k];
                    for &c in &open {
                        for &f in lv.children(c) {
                            scored[f as usize] = true;
                        }
                    }
                    let extra: Vec<(Vec<f32>, u32)> = (0..k1)
                        .filter(|c| !open.contains(c))
                        .map(|c| (lv.centroids()[c * d..(c + 1) * d].to_vec(), lv.sizes()[c]))
                        .collect();
                    let want_f =
                        ref_estimates(qh, g, d, index.head(h).centroids(), index.head(h).sizes(), &scored, &extra);
                    assert_close64(&format!("{what} {coarse:?} fine estimates head {h}"), &est[h], &want_f, 2e-4);
                    if mixed {
                        let want = ref_bounds(qh, g, d, index.head(h).centroids(), index.head(h).radii(), &scored);
                        assert_close64(&format!("{what} {coarse:?} bounds head {h}"), &bounds[h], &want, 2e-4);
                    }
                    let kept = choose(&est[h], &bounds[h], &scored, index.head(h).sizes(), &fine, h);
                    assert_eq!(sel.head(h), &gather(&index, h, &kept)[..], "{what} {coarse:?} {fine:?} head {h}");
                    let nscored = scored.iter().filter(|&&s| s).count();
                    assert_eq!(stats.clusters_scored[h], nscored);
                    assert_eq!(stats.coarse_kept[h], open.len());
                    assert_eq!(stats.clusters_kept[h], kept.len());
                    evals += g * (k1 + nscored);
                    if matches!(coarse, CoarseRetrieve::Threshold(t) if t < 0.0) {
                        // Every coarse cluster open: the flat answer (up to near ties).
                        assert_eq!(stats.coarse_kept[h], cpu.stats.coarse_kept[h]);
                        assert_eq!(sel.head(h).len(), cpu.selection.head(h).len());
                    }
                }
                assert_eq!(stats.centroid_evals, evals, "{what} {coarse:?}: evaluations");
                assert_eq!(stats.coarse_evals, cpu.stats.coarse_evals);
            }
        }
    }
}

/// Keys around `k` well separated directions (tight noise), `[n, hk, d]`, rounded to `dtype`.
fn clustered_keys(rng: &mut Rng, n: usize, hk: usize, d: usize, k: usize, dtype: DType) -> (Vec<f32>, Vec<u8>) {
    let centers: Vec<Vec<f32>> = (0..hk * k).map(|_| rng.vec(d, 1.0)).collect();
    let mut v = vec![0f32; n * hk * d];
    for t in 0..n {
        for h in 0..hk {
            let c = &centers[h * k + (t * 7 + h) % k];
            let scale = 0.5 + rng.unit().abs() * 2.0;
            for i in 0..d {
                v[(t * hk + h) * d + i] = (c[i] + rng.unit() * 0.05) * scale;
            }
        }
    }
    rounded(&v, dtype)
}

#[test]
fn kmeans_matches_cpu() {
    let Some(dev) = device_or_skip("kmeans_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x4eaa5);
    for &(n, hk, d, k) in &[(700usize, 2usize, 64usize, 12usize), (1300, 1, 128, 33), (500, 3, 128, 71)] {
        for dtype in DTYPES {
            let paths: &[Assignment] = if dtype == DType::F32 {
                &[Assignment::CudaCore]
            } else {
                &[Assignment::Split, Assignment::TensorCore, Assignment::CudaCore]
            };
            let (keys, bytes) = clustered_keys(&mut rng, n, hk, d, k, dtype);
            let kdev = upload_bytes(&dev, &bytes, stream);
            let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
            // Initial centroids: the first k keys of each head (one per true cluster).
            let mut init = Vec::with_capacity(hk * k * d);
            for h in 0..hk {
                for t in 0..k {
                    init.extend_from_slice(&keys[(t * hk + h) * d..(t * hk + h + 1) * d]);
                }
            }
            for &path in paths {
                let what = format!("n {n} hk {hk} d {d} k {k} {dtype} {path:?}");
                let km = CudaKMeans::new(&dev, &kt, k, 20, path).unwrap();
                km.set_centroids(&init, stream).unwrap();
                km.run(stream).unwrap();
                let got = km.results(stream).unwrap();
                for h in 0..hk {
                    let head: Vec<f32> =
                        (0..n).flat_map(|t| keys[(t * hk + h) * d..(t * hk + h + 1) * d].iter().copied()).collect();
                    let want = kmeans_from_centroids(&head, d, &init[h * k * d..(h + 1) * k * d], 20).unwrap();
                    let g = &got[h];
                    assert_eq!(g.assignment(), want.assignment(), "{what} head {h}: assignment");
                    assert_eq!(g.sizes(), want.sizes(), "{what} head {h}: sizes");
                    assert_eq!(g.all_members(), want.all_members(), "{what} head {h}: members");
                    assert_eq!(g.converged(), want.converged(), "{what} head {h}: converged");
                    assert_eq!(g.iterations(), want.iterations(), "{what} head {h}: iterations");
                    assert_close(
                        &format!("{what} head {h}: unit centroids"),
                        g.centroids_normalized(),
                        want.centroids_normalized(),
                        2e-5,
                        1e-4,
                    );
                    assert_close(
                        &format!("{what} head {h}: raw centroids"),
                        g.centroids(),
                        want.centroids(),
                        2e-5,
                        1e-4,
                    );
                    assert!(
                        (g.inertia() - want.inertia()).abs() <= 1e-3 * want.inertia().abs() + 1e-3,
                        "{what} head {h}: inertia {} vs {}",
                        g.inertia(),
                        want.inertia()
                    );
                }
            }
        }
    }
}

#[test]
fn kmeans_plus_plus_matches_cpu() {
    let Some(dev) = device_or_skip("kmeans_plus_plus_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x5eed5);
    for &(n, hk, d, k, seed) in
        &[(5000usize, 2usize, 64usize, 40usize, 7u64), (900, 1, 128, 31, 0), (64, 3, 64, 64, 11)]
    {
        for dtype in DTYPES {
            let what = format!("n {n} hk {hk} d {d} k {k} seed {seed} {dtype}");
            let (keys, bytes) = rounded(&rng.vec(n * hk * d, 1.0), dtype);
            let kdev = upload_bytes(&dev, &bytes, stream);
            let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
            let km = CudaKMeans::new(&dev, &kt, k, 0, Assignment::default_for(dtype, d)).unwrap();
            km.seed_plus_plus(seed, stream).unwrap();
            let got = km.seeds(stream).unwrap();
            for h in 0..hk {
                let head: Vec<f32> =
                    (0..n).flat_map(|t| keys[(t * hk + h) * d..(t * hk + h + 1) * d].iter().copied()).collect();
                let want = seed_plus_plus(&head, d, k, seed).unwrap();
                assert_eq!(got[h], want, "{what} head {h}: seeds");
            }
        }
    }
    // A whole K-means on the device against the CPU's, on well separated clusters.
    for &(n, hk, d, k) in &[(3000usize, 2usize, 128usize, 24usize), (800, 1, 64, 10)] {
        for dtype in DTYPES {
            let what = format!("full n {n} hk {hk} d {d} k {k} {dtype}");
            let (keys, bytes) = clustered_keys(&mut rng, n, hk, d, k, dtype);
            let kdev = upload_bytes(&dev, &bytes, stream);
            let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
            let km = CudaKMeans::new(&dev, &kt, k, 20, Assignment::default_for(dtype, d)).unwrap();
            km.seed_plus_plus(5, stream).unwrap();
            km.run(stream).unwrap();
            let got = km.results(stream).unwrap();
            for h in 0..hk {
                let head: Vec<f32> =
                    (0..n).flat_map(|t| keys[(t * hk + h) * d..(t * hk + h + 1) * d].iter().copied()).collect();
                let cfg = KMeansConfig { clusters: ClusterCount::Absolute(k), max_iter: 20, seed: 5 };
                let want = cpu_kmeans(&head, d, &cfg).unwrap();
                assert_eq!(got[h].seeds(), want.seeds(), "{what} head {h}: seeds");
                assert_eq!(got[h].assignment(), want.assignment(), "{what} head {h}: assignment");
                assert_eq!(got[h].iterations(), want.iterations(), "{what} head {h}: iterations");
                assert_close(
                    &format!("{what} head {h}: raw centroids"),
                    got[h].centroids(),
                    want.centroids(),
                    2e-5,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn cluster_index_built_on_device_matches_cpu() {
    let Some(dev) = device_or_skip("cluster_index_built_on_device_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0xb1d);
    for &(n, hk, d, k, k1) in &[(2000usize, 2usize, 64usize, 20usize, 4usize), (1200, 1, 128, 13, 3)] {
        for dtype in DTYPES {
            let what = format!("n {n} hk {hk} d {d} k {k} {dtype}");
            let (keys, bytes) = clustered_keys(&mut rng, n, hk, d, k, dtype);
            let kdev = upload_bytes(&dev, &bytes, stream);
            let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
            let cfg = ClusterConfig::new(ClusterCount::Absolute(k))
                .with_coarse(ClusterCount::Absolute(k1))
                .with_exclude_window(50)
                .with_max_iter(10)
                .with_seed(9);
            let (got, dindex) = build_index(&dev, &kt, &cfg, Assignment::default_for(dtype, d), stream).unwrap();
            let kv = TensorView::new(&keys, &[n, hk, d]).unwrap();
            let want = ClusterIndex::build(KeySource::Tensor(&kv), &cfg).unwrap();
            assert_eq!(got.clustered_len(), want.clustered_len());
            assert_eq!(dindex.clustered_len(), n - 50);
            // The device K-means keeps the radii, so its index serves the mixed ranking: the
            // same tokens as its host copy (same estimates up to rounding, away from ties).
            assert!(dindex.has_radii());
            let qf = Rng(0x51).vec(hk * d, 1.0); // its own draws: the keys above stay as they were
            let qb = upload_bytes(&dev, bytemuck::cast_slice(&qf), stream);
            let qt = DeviceTensor::contiguous(qb.ptr(), DType::F32, &[hk, d], dev.ordinal());
            let mut ws = ClusterWorkspace::new(&dindex, hk).unwrap();
            let (out, _keep) = poisoned_selections(&dev, stream, 1, hk, n);
            dindex.retrieve(stream, &qt, &Retrieve::MixedBudget(40), &mut ws, &out).unwrap();
            let sel = out.to_host(&[n], stream).unwrap().remove(0);
            let est = ws.estimates(stream).unwrap();
            let bounds = ws.bounds(stream).unwrap();
            for h in 0..hk {
                let kept =
                    choose(&est[h], &bounds[h], &vec![true; k], got.head(h).sizes(), &Retrieve::MixedBudget(40), h);
                assert_eq!(
                    sel.head(h),
                    &gather(&got, h, &kept)[..],
                    "{what} head {h}: mixed ranking on the device-built index"
                );
            }
            for h in 0..hk {
                assert_eq!(got.head(h).seeds(), want.head(h).seeds(), "{what} head {h}: seeds");
                assert_eq!(got.head(h).assignment(), want.head(h).assignment(), "{what} head {h}: assignment");
                assert_eq!(got.head(h).all_members(), want.head(h).all_members(), "{what} head {h}: members");
                assert_close(
                    &format!("{what} head {h}: centroids"),
                    got.head(h).centroids(),
                    want.head(h).centroids(),
                    2e-5,
                    1e-4,
                );
                assert_close(&format!("{what} head {h}: radii"), got.head(h).radii(), want.head(h).radii(), 2e-5, 1e-4);
                let (gc, wc) = (got.coarse(h).unwrap(), want.coarse(h).unwrap());
                assert_eq!(gc.all_children(), wc.all_children(), "{what} head {h}: coarse children");
                assert_eq!(gc.sizes(), wc.sizes(), "{what} head {h}: coarse sizes");
            }
        }
    }
}

#[test]
fn kmeans_repairs_empty_clusters() {
    let Some(dev) = device_or_skip("kmeans_repairs_empty_clusters") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0xe3);
    // Two identical initial centroids: one starts empty and must be refilled.
    let (n, hk, d, k) = (300usize, 1usize, 64usize, 5usize);
    for dtype in [DType::F32, DType::F16] {
        let (keys, bytes) = clustered_keys(&mut rng, n, hk, d, k, dtype);
        let kdev = upload_bytes(&dev, &bytes, stream);
        let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
        let mut init: Vec<f32> = keys[..k * d].to_vec();
        init.copy_within(0..d, d);
        let km = CudaKMeans::new(&dev, &kt, k, 20, Assignment::default_for(dtype, d)).unwrap();
        km.set_centroids(&init, stream).unwrap();
        km.run(stream).unwrap();
        let got = km.results(stream).unwrap().remove(0);
        let want = kmeans_from_centroids(&keys, d, &init, 20).unwrap();
        assert!(got.sizes().iter().all(|&s| s > 0), "{dtype}: an empty cluster survived: {:?}", got.sizes());
        assert_eq!(got.assignment(), want.assignment(), "{dtype}: assignment after repair");
        assert_eq!(got.iterations(), want.iterations(), "{dtype}: iterations");
    }
}

#[test]
fn gemfilter_matches_cpu() {
    let Some(dev) = device_or_skip("gemfilter_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x9e3f);
    for &(n, hk, g, d) in &[(1usize, 1usize, 1usize, 64usize), (777, 2, 3, 64), (4000, 4, 2, 128), (20000, 1, 8, 128)] {
        for dtype in DTYPES {
            let what = format!("n {n} hk {hk} g {g} d {d} {dtype}");
            let hq = hk * g;
            let (kf, kbytes) = rounded(&rng.vec(n * hk * d, 1.0), dtype);
            let (qf, qbytes) = rounded(&rng.vec(hq * d, 1.0), dtype);
            let kdev = upload_bytes(&dev, &kbytes, stream);
            let qdev = upload_bytes(&dev, &qbytes, stream);
            let kt = DeviceTensor::contiguous(kdev.ptr(), dtype, &[n, hk, d], dev.ordinal());
            let qt = DeviceTensor::contiguous(qdev.ptr(), dtype, &[hq, d], dev.ordinal());
            let kv = TensorView::new(&kf, &[n, hk, d]).unwrap();
            let qv = TensorView::new(&qf, &[hq, d]).unwrap();
            let kmax = n.min(300);
            let mut ws = GemFilterWorkspace::new(&dev, n, hq, d, kmax, stream).unwrap();
            for cfg in [
                GemFilterConfig { k: kmax, pool_kernel: 5, keep_first: 0, keep_last: 0 },
                GemFilterConfig { k: kmax.min(64), pool_kernel: 1, keep_first: 1.min(n), keep_last: 0 },
                GemFilterConfig { k: kmax, pool_kernel: 7, keep_first: 0, keep_last: kmax.min(10) },
            ] {
                gemfilter_select(stream, &qt, &kt, &cfg, &mut ws).unwrap();
                let scores = ws.scores_to_host(stream).unwrap();
                let want_scores = token_scores(&qv, KeySource::Tensor(&kv)).unwrap();
                let scale = want_scores.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1.0);
                assert_close(&format!("{what} scores"), &scores, &want_scores, 1e-5 * scale * (d as f32), 1e-4);
                let pooled = ws.pooled_to_host(stream).unwrap();
                let mut want_pooled = avg_pool(&want_scores, cfg.pool_kernel).unwrap();
                for (t, s) in want_pooled.iter_mut().enumerate() {
                    if t < cfg.keep_first || t + cfg.keep_last >= n {
                        *s = f32::INFINITY;
                    }
                }
                assert_close(&format!("{what} pooled"), &pooled, &want_pooled, 1e-5 * scale * (d as f32), 1e-4);
                let got = ws.selected(stream).unwrap();
                assert_eq!(got, top_k(&pooled, cfg.k), "{what} {cfg:?}: selection against the device's pooled scores");
                let want = gem_select(&qv, KeySource::Tensor(&kv), &cfg).unwrap();
                assert_eq!(got.len(), want.len());
                // Against the CPU unless the CPU's pooled scores have a near tie at the cut.
                let mut sorted = want_pooled.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let cut = sorted[cfg.k - 1];
                let near = sorted.iter().filter(|&&s| s.is_finite() && (s - cut).abs() <= 1e-4 * scale).count() > 1;
                if !near {
                    assert_eq!(got, want, "{what} {cfg:?}: selection against the CPU");
                }
            }
        }
    }
}

#[test]
fn bad_input_names_the_parameter() {
    let Some(dev) = device_or_skip("bad_input_names_the_parameter") else { return };
    let stream = dev.stream();
    let keys = DeviceBuffer::zeroed(&dev, 64 * 2 * 64 * 2, stream).unwrap();
    let kt = DeviceTensor::contiguous(keys.ptr(), DType::F16, &[64, 2, 64], dev.ordinal());
    let e = CudaKMeans::new(&dev, &kt, 0, 5, Assignment::Split).err().unwrap();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = CudaKMeans::new(&dev, &kt, 65, 5, Assignment::Split).err().unwrap();
    assert!(e.to_string().contains("`k`"), "{e}");
    let k32 = DeviceTensor::contiguous(keys.ptr(), DType::F32, &[32, 2, 64], dev.ordinal());
    let e = CudaKMeans::new(&dev, &k32, 4, 5, Assignment::TensorCore).err().unwrap();
    assert!(e.to_string().contains("`assignment`"), "{e}");
    let mut ws = GemFilterWorkspace::new(&dev, 64, 4, 64, 8, stream).unwrap();
    let q = DeviceTensor::contiguous(keys.ptr(), DType::F16, &[3, 64], dev.ordinal());
    let e = gemfilter_select(stream, &q, &kt, &GemFilterConfig::new(4), &mut ws).unwrap_err();
    assert!(e.to_string().contains("`q`"), "{e}");
    let q = DeviceTensor::contiguous(keys.ptr(), DType::F16, &[4, 64], dev.ordinal());
    let e = gemfilter_select(stream, &q, &kt, &GemFilterConfig::new(65), &mut ws).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let e = gemfilter_select(
        stream,
        &q,
        &kt,
        &GemFilterConfig { k: 4, pool_kernel: 4, keep_first: 0, keep_last: 0 },
        &mut ws,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`pool_kernel`"), "{e}");
}

/// Page-bound selection, centroid retrieval and GemFilter captured once in a CUDA graph
/// and replayed with new queries give the CPU's answers (the calls queue kernels only).
#[test]
fn selection_replays_from_a_cuda_graph() {
    use cudarc::driver::sys;
    let Some(dev) = device_or_skip("selection_replays_from_a_cuda_graph") else { return };
    let stream = dev.new_stream().unwrap();
    let mut rng = Rng(0x62a9);
    let (dtype, ps, d, hk, hq) = (DType::F16, 16usize, 64usize, 2usize, 4usize);
    // Page bounds over a two-sequence cache.
    let lens = [300usize, 41];
    let (cache, ids) = random_cache(&mut rng, dtype, ps, hk, d, &lens);
    let cap = cache.config().capacity_pages;
    let bounds = cache.key_bounds(0).unwrap();
    let bounds_dev = upload_bytes(&dev, bounds.bytes, &stream);
    let table = cache.page_table(&ids).unwrap();
    let dtable = CudaPageTable::upload(&dev, table.as_ref(), ps, cap, &stream).unwrap();
    let kvbuf = DeviceBuffer::zeroed(&dev, cap * ps * hk * d * 2, &stream).unwrap();
    let layout = PagedKvLayout::packed(dtype, cap, ps, hk, d, PageLayout::Nhd);
    // SAFETY: K and V cover the layout; the bounds cover every page of the pool.
    let kv = unsafe {
        CudaPagedKv::from_raw(kvbuf.ptr(), kvbuf.ptr(), layout, &dtable)
            .unwrap()
            .with_key_bounds(KeyBoundsLayout { ptr: bounds_dev.ptr() })
            .unwrap()
    };
    let pq = DeviceBuffer::zeroed(&dev, lens.len() * hq * d * 2, &stream).unwrap();
    let pqt = DeviceTensor::contiguous(pq.ptr(), dtype, &[lens.len(), hq, d], dev.ordinal());
    let mut pws = PageBoundsWorkspace::for_view(&dev, &kv, hq).unwrap();
    let pcfg = PageBoundsConfig::new(64).with_min_pages(2);
    let (pout, pbufs) = poisoned_selections(&dev, &stream, lens.len(), hk, dtable.max_seq_len());
    // Centroid retrieval.
    let n = 800;
    let keys = rng.vec(n * hk * d, 1.0);
    let kview = TensorView::new(&keys, &[n, hk, d]).unwrap();
    let index = ClusterIndex::build(
        KeySource::Tensor(&kview),
        &ClusterConfig::new(ClusterCount::Absolute(50)).with_max_iter(5),
    )
    .unwrap();
    let cidx = CudaClusterIndex::upload(&dev, &index, &stream).unwrap();
    let mut cws = ClusterWorkspace::new(&cidx, hq).unwrap();
    let cq = DeviceBuffer::zeroed(&dev, hq * d * 4, &stream).unwrap();
    let cqt = DeviceTensor::contiguous(cq.ptr(), DType::F32, &[hq, d], dev.ordinal());
    let (cout, cbufs) = poisoned_selections(&dev, &stream, 1, hk, n);
    let how = Retrieve::Budget(120);
    // GemFilter over the same keys as f16.
    let (gkeys, gbytes) = rounded(&keys, dtype);
    let gk = upload_bytes(&dev, &gbytes, &stream);
    let gkt = DeviceTensor::contiguous(gk.ptr(), dtype, &[n, hk, d], dev.ordinal());
    let gq = DeviceBuffer::zeroed(&dev, hq * d * 2, &stream).unwrap();
    let gqt = DeviceTensor::contiguous(gq.ptr(), dtype, &[hq, d], dev.ordinal());
    let gcfg = GemFilterConfig { k: 40, pool_kernel: 5, keep_first: 2, keep_last: 3 };
    let mut gws = GemFilterWorkspace::new(&dev, n, hq, d, gcfg.k, &stream).unwrap();

    let queue = |pws: &mut PageBoundsWorkspace,
                 cws: &mut ClusterWorkspace,
                 gws: &mut GemFilterWorkspace|
     -> kvsieve::Result<()> {
        page_bounds(&stream, &kv, &pqt, &pcfg, pws, &pout)?;
        cidx.retrieve(&stream, &cqt, &how, cws, &cout)?;
        gemfilter_select(&stream, &gqt, &gkt, &gcfg, gws)
    };
    // One call outside the capture loads the kernel modules.
    queue(&mut pws, &mut cws, &mut gws).unwrap();
    stream.synchronize().unwrap();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    unsafe {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        assert_eq!(sys::cuStreamBeginCapture_v2(stream.raw(), mode), sys::CUresult::CUDA_SUCCESS);
        let r = queue(&mut pws, &mut cws, &mut gws);
        assert_eq!(sys::cuStreamEndCapture(stream.raw(), &mut graph), sys::CUresult::CUDA_SUCCESS);
        r.unwrap();
        assert_eq!(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), sys::CUresult::CUDA_SUCCESS);
    }
    for round in 0..2 {
        let (pqf, pqb) = rounded(&rng.vec(lens.len() * hq * d, 1.5), dtype);
        let cqf = rng.vec(hq * d, 3.0);
        let (gqf, gqb) = rounded(&rng.vec(hq * d, 1.0), dtype);
        pq.upload(0, &pqb, &stream).unwrap();
        cq.upload(0, bytemuck::cast_slice(&cqf), &stream).unwrap();
        gq.upload(0, &gqb, &stream).unwrap();
        for b in pbufs.iter().chain(&cbufs) {
            b.memset(POISON_BYTE, &stream).unwrap();
        }
        unsafe { assert_eq!(sys::cuGraphLaunch(exec, stream.raw()), sys::CUresult::CUDA_SUCCESS) };
        stream.synchronize().unwrap();
        let what = format!("graph replay {round}");
        // Pages.
        let got = pout.to_host(&lens, &stream).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let qrow = &pqf[i * hq * d..(i + 1) * hq * d];
            let pages = cache.seq_pages(id).unwrap();
            let want_scores = cpu_page_scores(bounds, &pages, qrow, hq).unwrap();
            let want = cpu_page_bounds(&cache, id, 0, &TensorView::new(qrow, &[hq, d]).unwrap(), &pcfg).unwrap();
            assert_pages_match(&format!("{what} pages seq {i}"), &got[i], &want, &want_scores, pages.len(), hk, ps);
        }
        // Clusters: estimates against the CPU, tokens by rule from the device estimates.
        let sel = cout.to_host(&[n], &stream).unwrap().remove(0);
        let est = cws.estimates(&stream).unwrap();
        let cpu_est = index.cluster_estimates(&TensorView::new(&cqf, &[hq, d]).unwrap()).unwrap();
        for h in 0..hk {
            assert_close64(&format!("{what} estimates head {h}"), &est[h], &cpu_est[h], 2e-4);
            let kept = choose(&est[h], &[], &[true; 50], index.head(h).sizes(), &how, h);
            assert_eq!(sel.head(h), &gather(&index, h, &kept)[..], "{what} cluster tokens head {h}");
        }
        // GemFilter: pooled scores against the CPU, selection by the device's pooled scores.
        let gv = TensorView::new(&gkeys, &[n, hk, d]).unwrap();
        let want_scores = token_scores(&TensorView::new(&gqf, &[hq, d]).unwrap(), KeySource::Tensor(&gv)).unwrap();
        let scale = want_scores.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1.0);
        assert_close(
            &format!("{what} gemfilter scores"),
            &gws.scores_to_host(&stream).unwrap(),
            &want_scores,
            1e-5 * scale * d as f32,
            1e-4,
        );
        let pooled = gws.pooled_to_host(&stream).unwrap();
        assert_eq!(gws.selected(&stream).unwrap(), top_k(&pooled, gcfg.k), "{what} gemfilter selection");
    }
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
    }
}
