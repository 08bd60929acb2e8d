//! K-means clustering and centroid retrieval against plain f64 references on random data.
#![allow(clippy::needless_range_loop)]

mod common;
use common::Rng;
use kvsieve::select::cluster::{
    calibrate, kmeans, kmeans_from_centroids, seed_plus_plus, ClusterConfig, ClusterCount, ClusterIndex, Clustering,
    CoarseRetrieve, KMeansConfig, KeySource, Retrieve, SplitMix64,
};
use kvsieve::select::streaming;
use kvsieve::{CacheConfig, DType, ErrorCode, KeyRope, KvCache, Selection, TensorView};
use proptest::prelude::*;

// ---------- references ----------

fn unit(keys: &[f32], d: usize) -> Vec<Vec<f64>> {
    keys.chunks(d)
        .map(|r| {
            let n = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            r.iter().map(|&v| if n > 0.0 { v as f64 / n } else { 0.0 }).collect()
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ exactly as documented, in f64, without the triangle-inequality pruning.
fn ref_seeds(keys: &[f32], d: usize, k: usize, seed: u64) -> Vec<u32> {
    let x = unit(keys, d);
    let n = x.len();
    let mut rng = SplitMix64::new(seed);
    let first = rng.below(n);
    let mut chosen = vec![first as u32];
    let mut d2: Vec<f64> = x.iter().map(|p| dist2(p, &x[first])).collect();
    d2[first] = 0.0;
    for _ in 1..k {
        let total: f64 = d2.iter().sum();
        let u = rng.next_f64() * total;
        let p = if total > 0.0 {
            let (mut cum, mut last, mut pick) = (0.0, 0, None);
            for (i, &v) in d2.iter().enumerate() {
                if v > 0.0 {
                    cum += v;
                    last = i;
                    if cum > u {
                        pick = Some(i);
                        break;
                    }
                }
            }
            pick.unwrap_or(last)
        } else {
            (0..n).find(|i| !chosen.contains(&(*i as u32))).unwrap()
        };
        for i in 0..n {
            d2[i] = d2[i].min(dist2(&x[i], &x[p]));
        }
        d2[p] = 0.0;
        chosen.push(p as u32);
    }
    chosen
}

struct RefLloyd {
    assignment: Vec<u32>,
    iterations: usize,
    converged: bool,
    inertia: f64,
}

fn ref_assign(x: &[Vec<f64>], c: &[Vec<f64>]) -> (Vec<u32>, Vec<f64>) {
    x.iter()
        .map(|p| {
            let (mut bi, mut bv) = (0, f64::NEG_INFINITY);
            for (j, cj) in c.iter().enumerate() {
                let v = dot(p, cj);
                if v > bv {
                    bv = v;
                    bi = j;
                }
            }
            (bi as u32, bv)
        })
        .unzip()
}

fn ref_repair(x: &[Vec<f64>], a: &mut [u32], best: &mut [f64], c: &mut [Vec<f64>]) -> bool {
    let k = c.len();
    let mut sizes = vec![0usize; k];
    a.iter().for_each(|&j| sizes[j as usize] += 1);
    let mut any = false;
    for e in 0..k {
        if sizes[e] != 0 {
            continue;
        }
        any = true;
        let l = (0..k).fold(0, |m, j| if sizes[j] > sizes[m] { j } else { m });
        let p = (0..x.len()).filter(|&i| a[i] as usize == l).fold(None, |m: Option<usize>, i| match m {
            Some(q) if best[q] <= best[i] => Some(q),
            _ => Some(i),
        });
        let p = p.unwrap();
        a[p] = e as u32;
        sizes[l] -= 1;
        sizes[e] = 1;
        c[e] = x[p].clone();
        best[p] = 1.0;
    }
    any
}

fn ref_inertia(x: &[Vec<f64>], c: &[Vec<f64>], a: &[u32]) -> f64 {
    x.iter().zip(a).map(|(p, &j)| dist2(p, &c[j as usize])).sum()
}

/// Lloyd iterations with the documented repair and stopping rule, in f64.
fn ref_lloyd(keys: &[f32], d: usize, init: &[Vec<f64>], max_iter: usize) -> RefLloyd {
    let x = unit(keys, d);
    let mut c = init.to_vec();
    let (mut a, mut best) = ref_assign(&x, &c);
    ref_repair(&x, &mut a, &mut best, &mut c);
    let (mut iterations, mut converged) = (0, false);
    while iterations < max_iter {
        for (j, cj) in c.iter_mut().enumerate() {
            let mut s = vec![0f64; d];
            for (p, _) in x.iter().zip(&a).filter(|(_, &aj)| aj as usize == j) {
                s.iter_mut().zip(p).for_each(|(o, v)| *o += v);
            }
            let n = dot(&s, &s).sqrt();
            if n > 1e-12 {
                *cj = s.iter().map(|v| v / n).collect();
            }
        }
        let (mut a2, mut b2) = ref_assign(&x, &c);
        let rep = ref_repair(&x, &mut a2, &mut b2, &mut c);
        let changed = a2 != a;
        a = a2;
        iterations += 1;
        if !changed && !rep {
            converged = true;
            break;
        }
    }
    let inertia = ref_inertia(&x, &c, &a);
    RefLloyd { assignment: a, iterations, converged, inertia }
}

/// Sizes, CSR members and assignment agree; raw centroids are the members' means.
fn check_consistent(cl: &Clustering, keys: &[f32], d: usize) {
    let (k, n) = (cl.num_clusters(), cl.num_points());
    assert_eq!(cl.member_offsets().len(), k + 1);
    assert_eq!(cl.member_offsets()[k] as usize, n);
    let mut seen = vec![false; n];
    for c in 0..k {
        let m = cl.members(c);
        assert_eq!(m.len(), cl.sizes()[c] as usize);
        assert!(!m.is_empty(), "cluster {c} empty");
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        let mut mean = vec![0f64; d];
        for &t in m {
            assert_eq!(cl.assignment()[t as usize] as usize, c);
            assert!(!seen[t as usize]);
            seen[t as usize] = true;
            mean.iter_mut().zip(&keys[t as usize * d..(t as usize + 1) * d]).for_each(|(o, &v)| *o += v as f64);
        }
        for (a, b) in cl.centroid(c).iter().zip(&mean) {
            assert!((*a as f64 - b / m.len() as f64).abs() < 1e-4, "raw centroid of {c}");
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// Clustered keys `[n, hk, d]`: `centers` random directions with noise, scaled randomly.
fn clustered_keys(rng: &mut Rng, n: usize, hk: usize, d: usize, centers: usize, noise: f32) -> Vec<f32> {
    let cs: Vec<Vec<f32>> = (0..hk * centers).map(|_| rng.vec(d, 1.0)).collect();
    let mut out = Vec::with_capacity(n * hk * d);
    for _ in 0..n {
        for h in 0..hk {
            let c = &cs[h * centers + rng.below(centers)];
            let s = 0.5 + rng.uniform().abs() * 2.0;
            out.extend(c.iter().map(|&v| s * (v + noise * rng.uniform())));
        }
    }
    out
}

fn head_rows(keys: &[f32], n: usize, hk: usize, d: usize, h: usize) -> Vec<f32> {
    (0..n).flat_map(|t| keys[(t * hk + h) * d..(t * hk + h + 1) * d].iter().copied()).collect()
}

/// Group-averaged estimates of head `h` in f64.
fn ref_estimates(q: &[f32], hq: usize, index: &ClusterIndex, h: usize) -> Vec<f64> {
    let (d, hk) = (index.head_dim(), index.num_kv_heads());
    let g = hq / hk;
    let cl = index.head(h);
    let k = cl.num_clusters();
    let mut s = vec![0f64; k];
    for j in h * g..(h + 1) * g {
        let qj: Vec<f64> = q[j * d..(j + 1) * d].iter().map(|&v| v as f64).collect();
        let l: Vec<f64> = (0..k)
            .map(|c| dot(&qj, &cl.centroid(c).iter().map(|&v| v as f64).collect::<Vec<_>>()) / (d as f64).sqrt())
            .collect();
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let den: f64 = l.iter().zip(cl.sizes()).map(|(&x, &n)| n as f64 * (x - m).exp()).sum();
        for c in 0..k {
            s[c] += (l[c] - m).exp() / den / g as f64;
        }
    }
    s
}

/// Tokens kept by the documented rules, from given estimates.
fn ref_select(cl: &Clustering, s: &[f64], how: &Retrieve, h: usize) -> Vec<u32> {
    let k = cl.num_clusters();
    let mut out: Vec<u32> = match how {
        Retrieve::Threshold(t) => (0..k).filter(|&c| s[c] > *t).flat_map(|c| cl.members(c).to_vec()).collect(),
        Retrieve::PerHeadThreshold(v) => (0..k).filter(|&c| s[c] > v[h]).flat_map(|c| cl.members(c).to_vec()).collect(),
        Retrieve::Budget(b) => {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap().then(a.cmp(&b)));
            let mut left = *b;
            let mut out = Vec::new();
            for c in order {
                let take = left.min(cl.sizes()[c] as usize);
                out.extend_from_slice(&cl.members(c)[..take]);
                left -= take;
            }
            out
        }
        Retrieve::MixedBudget(_) => unreachable!("the mixed rule has its own reference, ref_select_mixed"),
    };
    out.sort();
    out
}

/// Radius of every cluster of `cl` in f64: the largest distance of a member's raw key
/// (rows of `rows`, `[n][d]`) to the raw centroid.
fn ref_radii(cl: &Clustering, rows: &[f32], d: usize) -> Vec<f64> {
    (0..cl.num_clusters())
        .map(|c| {
            let cen: Vec<f64> = cl.centroid(c).iter().map(|&v| v as f64).collect();
            cl.members(c)
                .iter()
                .map(|&t| {
                    dist2(
                        &rows[t as usize * d..(t as usize + 1) * d].iter().map(|&v| v as f64).collect::<Vec<_>>(),
                        &cen,
                    )
                    .sqrt()
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Upper bounds `max_j (q_j·C_c + |q_j| r_c) / √d` of head `h` in f64, from the index's radii.
fn ref_bounds(q: &[f32], hq: usize, index: &ClusterIndex, h: usize) -> Vec<f64> {
    let (d, g) = (index.head_dim(), hq / index.num_kv_heads());
    let cl = index.head(h);
    (0..cl.num_clusters())
        .map(|c| {
            let cen: Vec<f64> = cl.centroid(c).iter().map(|&v| v as f64).collect();
            (h * g..(h + 1) * g)
                .map(|j| {
                    let qj: Vec<f64> = q[j * d..(j + 1) * d].iter().map(|&v| v as f64).collect();
                    (dot(&qj, &cen) + dot(&qj, &qj).sqrt() * cl.radii()[c] as f64) / (d as f64).sqrt()
                })
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// Tokens kept by the mixed rule: clusters alternately from the estimate ranking and the
/// bound ranking (ties to the lower index), each once, whole, until `budget` tokens.
fn ref_select_mixed(cl: &Clustering, s: &[f64], b: &[f64], budget: usize) -> Vec<u32> {
    let k = cl.num_clusters();
    let rank = |v: &[f64]| {
        let mut o: Vec<usize> = (0..k).collect();
        o.sort_by(|&x, &y| v[y].partial_cmp(&v[x]).unwrap().then(x.cmp(&y)));
        o
    };
    let (r1, r2) = (rank(s), rank(b));
    let mut order = Vec::new();
    let (mut i1, mut i2) = (0, 0);
    while order.len() < k {
        while i1 < k && order.contains(&r1[i1]) {
            i1 += 1;
        }
        if i1 < k {
            order.push(r1[i1]);
        }
        while i2 < k && order.contains(&r2[i2]) {
            i2 += 1;
        }
        if i2 < k {
            order.push(r2[i2]);
        }
    }
    let mut left = budget;
    let mut out = Vec::new();
    for c in order {
        let take = left.min(cl.sizes()[c] as usize);
        out.extend_from_slice(&cl.members(c)[..take]);
        left -= take;
    }
    out.sort();
    out
}

fn build(keys: &[f32], n: usize, hk: usize, d: usize, cfg: &ClusterConfig) -> ClusterIndex {
    let t = TensorView::new(keys, &[n, hk, d]).unwrap();
    ClusterIndex::build(KeySource::Tensor(&t), cfg).unwrap()
}

// ---------- k-means ----------

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn seeding_and_lloyd_match_reference(n in 8usize..160, d in prop_oneof![Just(8usize), Just(16), Just(32)], kf in 0.02f64..0.5, seed in any::<u64>(), structured in any::<bool>()) {
        let mut rng = Rng(seed);
        let keys = if structured { clustered_keys(&mut rng, n, 1, d, 5, 0.3) } else { rng.vec(n * d, 1.0) };
        let k = ((kf * n as f64) as usize).max(1);
        let seeds = seed_plus_plus(&keys, d, k, seed).unwrap();
        prop_assert_eq!(&seeds, &ref_seeds(&keys, d, k, seed));
        let cl = kmeans(&keys, d, &KMeansConfig { clusters: ClusterCount::Absolute(k), max_iter: 15, seed }).unwrap();
        prop_assert_eq!(cl.seeds(), &seeds[..]);
        let x = unit(&keys, d);
        let init: Vec<Vec<f64>> = seeds.iter().map(|&s| x[s as usize].clone()).collect();
        let r = ref_lloyd(&keys, d, &init, 15);
        prop_assert_eq!(cl.assignment(), &r.assignment[..]);
        prop_assert_eq!(cl.iterations(), r.iterations);
        prop_assert_eq!(cl.converged(), r.converged);
        prop_assert!((cl.inertia() - r.inertia).abs() <= 1e-4 * (1.0 + r.inertia), "inertia {} vs {}", cl.inertia(), r.inertia);
        check_consistent(&cl, &keys, d);
    }

    #[test]
    fn lloyd_monotone_and_nearest_at_convergence(n in 50usize..400, kf in 0.02f64..0.3, seed in any::<u64>()) {
        let d = 16;
        let mut rng = Rng(seed ^ 7);
        let keys = clustered_keys(&mut rng, n, 1, d, 8, 0.5);
        let k = ((kf * n as f64) as usize).max(1);
        let cl = kmeans(&keys, d, &KMeansConfig { clusters: ClusterCount::Absolute(k), max_iter: 100, seed }).unwrap();
        let h = cl.inertia_history();
        prop_assert_eq!(h.len(), cl.iterations() + 1);
        for w in h.windows(2) {
            prop_assert!(w[1] <= w[0] + 1e-5 * (1.0 + w[0]), "inertia rose: {:?}", h);
        }
        check_consistent(&cl, &keys, d);
        // Inertia as defined: squared L2 between unit keys and unit centroids.
        let x = unit(&keys, d);
        let cn: Vec<Vec<f64>> = cl.centroids_normalized().chunks(d).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
        let inertia = ref_inertia(&x, &cn, cl.assignment());
        prop_assert!((inertia - cl.inertia()).abs() < 1e-3 * (1.0 + inertia));
        if cl.converged() {
            for (i, p) in x.iter().enumerate() {
                let own = dot(p, &cn[cl.assignment()[i] as usize]);
                let best = cn.iter().map(|c| dot(p, c)).fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(own >= best - 1e-5, "point {} not at its nearest centroid: {} < {}", i, own, best);
            }
        }
    }
}

#[test]
fn seeding_over_many_chunks_matches_reference() {
    // More points than one bookkeeping chunk (2048), with structure so pruning kicks in.
    let (n, d) = (5000, 16);
    for seed in [1u64, 2, 3] {
        let mut rng = Rng(seed);
        let keys = clustered_keys(&mut rng, n, 1, d, 30, 0.2);
        let k = 60;
        assert_eq!(seed_plus_plus(&keys, d, k, seed).unwrap(), ref_seeds(&keys, d, k, seed), "seed {seed}");
    }
}

#[test]
fn empty_clusters_are_repaired_like_the_reference() {
    let (n, d) = (60, 16);
    let mut rng = Rng(11);
    let keys = rng.vec(n * d, 1.0);
    // Centroids 1 and 2 duplicate centroid 0, and 3 points nowhere: the first pass leaves
    // clusters empty.
    let mut init = keys[..d].repeat(3);
    init.extend(vec![0.0; d]);
    init.extend_from_slice(&keys[5 * d..6 * d]);
    let cl = kmeans_from_centroids(&keys, d, &init, 10).unwrap();
    check_consistent(&cl, &keys, d);
    let x = unit(&keys, d);
    let cinit: Vec<Vec<f64>> = unit(&init, d);
    let r = ref_lloyd(&keys, d, &cinit, 10);
    assert_eq!(cl.assignment(), &r.assignment[..]);
    assert!(cl.sizes().iter().all(|&s| s >= 1));
    let _ = x;
}

#[test]
fn kmeans_is_deterministic_across_thread_counts() {
    let (n, d) = (3000, 64);
    let mut rng = Rng(5);
    let keys = clustered_keys(&mut rng, n, 1, d, 40, 0.4);
    let cfg = KMeansConfig { clusters: ClusterCount::Fraction(0.03), max_iter: 10, seed: 99 };
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| kmeans(&keys, d, &cfg).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_eq!(one, run(2));
    assert_eq!(one.num_clusters(), 90);
    let other = kmeans(&keys, d, &KMeansConfig { seed: 100, ..cfg }).unwrap();
    assert_ne!(one.seeds(), other.seeds());
}

// ---------- index and retrieval ----------

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

    #[test]
    fn estimates_and_selection_match_reference(
        n in 40usize..300, hk in 1usize..3, group in prop_oneof![Just(1usize), Just(4)], seed in any::<u64>(),
        qscale in 0.5f32..8.0, budget_frac in 0.01f64..1.2, tq in 0.0f64..1.0, window in 0usize..10,
    ) {
        let d = 32;
        let hq = hk * group;
        let mut rng = Rng(seed);
        let keys = clustered_keys(&mut rng, n, hk, d, 6, 0.6);
        let k = (n - window) / 6 + 1;
        let index = build(&keys, n, hk, d, &ClusterConfig::new(ClusterCount::Absolute(k)).with_exclude_window(window).with_seed(seed).with_max_iter(8));
        prop_assert_eq!(index.clustered_len(), n - window);
        let q = rng.vec(hq * d, qscale);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let est = index.cluster_estimates(&qv).unwrap();
        for h in 0..hk {
            let r = ref_estimates(&q, hq, &index, h);
            let total: f64 = est[h].iter().zip(index.head(h).sizes()).map(|(s, &n)| s * n as f64).sum();
            prop_assert!((total - 1.0).abs() < 1e-5, "estimates times sizes sum to {}", total);
            for (a, b) in est[h].iter().zip(&r) {
                prop_assert!((a - b).abs() <= 1e-5 * b.max(1e-30) + 1e-12, "estimate {} vs reference {}", a, b);
            }
        }
        // A threshold between two observed estimates (so rounding cannot flip a cluster).
        let mut all: Vec<f64> = est.iter().flatten().copied().collect();
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let i = ((tq * (all.len() - 1) as f64) as usize).min(all.len() - 2);
        let tau = if all[i + 1] > all[i] * (1.0 + 1e-9) { 0.5 * (all[i] + all[i + 1]) } else { all[i + 1] * 1.5 };
        let budget = ((budget_frac * (n - window) as f64) as usize).max(1);
        for how in [Retrieve::Threshold(tau), Retrieve::Budget(budget), Retrieve::PerHeadThreshold(vec![tau; hk])] {
            let r = index.retrieve(&qv, &how, n).unwrap();
            prop_assert_eq!(r.selection.seq_len(), n);
            prop_assert_eq!(r.stats.centroid_evals, hq * k);
            for h in 0..hk {
                let want = ref_select(index.head(h), &est[h], &how, h);
                prop_assert_eq!(r.selection.head(h), &want[..], "head {} {:?}", h, how);
                prop_assert_eq!(r.stats.tokens_kept[h], want.len());
                // Window tokens are in no cluster.
                prop_assert!(want.iter().all(|&t| (t as usize) < n - window));
            }
            if let Retrieve::Budget(b) = how {
                prop_assert!(r.stats.tokens_kept.iter().all(|&t| t == b.min(n - window)));
            }
            // Composes with a sinks + window selection.
            let u = r.selection.union(&streaming(hk, n, 2, window.max(1)).unwrap()).unwrap();
            prop_assert!(u.len() >= r.selection.len());
        }
    }

    #[test]
    fn hierarchical_with_every_coarse_cluster_open_equals_flat(n in 100usize..500, seed in any::<u64>(), budget_frac in 0.02f64..0.9, tq in 0.0f64..1.0) {
        let (hk, hq, d) = (2, 4, 16);
        let mut rng = Rng(seed);
        let keys = clustered_keys(&mut rng, n, hk, d, 10, 0.5);
        let k = n / 5;
        let cfg = ClusterConfig::new(ClusterCount::Absolute(k)).with_coarse(ClusterCount::Fraction(0.2)).with_seed(seed).with_max_iter(8);
        let index = build(&keys, n, hk, d, &cfg);
        let k1 = index.num_coarse_clusters();
        prop_assert_eq!(k1, (0.2 * k as f64).round() as usize);
        let q = rng.vec(hq * d, 3.0);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let est = index.cluster_estimates(&qv).unwrap();
        let mut all: Vec<f64> = est.iter().flatten().copied().collect();
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let i = ((tq * (all.len() - 1) as f64) as usize).min(all.len() - 2);
        let tau = if all[i + 1] > all[i] * (1.0 + 1e-9) { 0.5 * (all[i] + all[i + 1]) } else { all[i + 1] * 1.5 };
        let budget = ((budget_frac * n as f64) as usize).max(1);
        for fine in [Retrieve::Threshold(tau), Retrieve::Budget(budget)] {
            let flat = index.retrieve(&qv, &fine, n).unwrap();
            for coarse in [CoarseRetrieve::Threshold(-1.0), CoarseRetrieve::Budget(n)] {
                let hier = index.retrieve_hierarchical(&qv, coarse, &fine, n).unwrap();
                prop_assert_eq!(&hier.selection, &flat.selection);
                prop_assert_eq!(hier.stats.coarse_evals, hq * k1);
                prop_assert_eq!(hier.stats.fine_evals, hq * k);
                prop_assert_eq!(hier.stats.centroid_evals, hq * (k + k1));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, ..ProptestConfig::default() })]

    /// Radii against a plain computation; mixed selection against the reference rule, flat
    /// and (with every coarse cluster open) hierarchical; a planted outlier key is found by
    /// the mixed rule at a budget where its cluster's estimate ranks it out.
    #[test]
    fn mixed_budget_matches_reference(
        n in 60usize..300, hk in 1usize..3, group in prop_oneof![Just(1usize), Just(3)], seed in any::<u64>(),
        qscale in 0.5f32..6.0, budget_frac in 0.01f64..1.1,
    ) {
        let d = 16;
        let hq = hk * group;
        let mut rng = Rng(seed);
        let keys = clustered_keys(&mut rng, n, hk, d, 6, 0.6);
        let k = n / 6 + 1;
        let cfg = ClusterConfig::new(ClusterCount::Absolute(k)).with_coarse(ClusterCount::Absolute(3)).with_seed(seed).with_max_iter(8);
        let index = build(&keys, n, hk, d, &cfg);
        for h in 0..hk {
            let want = ref_radii(index.head(h), &head_rows(&keys, n, hk, d, h), d);
            prop_assert_eq!(index.head(h).radii().len(), k);
            for (a, b) in index.head(h).radii().iter().zip(&want) {
                prop_assert!((*a as f64 - b).abs() <= 1e-4 * b.max(1.0), "radius {} vs {}", a, b);
            }
        }
        let q = rng.vec(hq * d, qscale);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let budget = ((budget_frac * n as f64) as usize).max(1);
        let est = index.cluster_estimates(&qv).unwrap();
        let r = index.retrieve(&qv, &Retrieve::MixedBudget(budget), n).unwrap();
        for h in 0..hk {
            let want = ref_select_mixed(index.head(h), &est[h], &ref_bounds(&q, hq, &index, h), budget);
            prop_assert_eq!(r.selection.head(h), &want[..], "head {}", h);
            prop_assert_eq!(r.stats.tokens_kept[h], budget.min(n));
        }
        let hier = index.retrieve_hierarchical(&qv, CoarseRetrieve::Threshold(-1.0), &Retrieve::MixedBudget(budget), n).unwrap();
        prop_assert_eq!(&hier.selection, &r.selection);
    }
}

/// One key that matches the query strongly, in a cluster of keys that do not: the estimate
/// ranking leaves its cluster out at a small budget, the mixed ranking keeps it.
#[test]
fn mixed_budget_finds_an_outlier_the_estimate_misses() {
    let (n, d) = (400usize, 16usize);
    let mut rng = Rng(12);
    let mut keys = clustered_keys(&mut rng, n, 1, d, 8, 0.3);
    let q: Vec<f32> = (0..d).map(|i| if i == 0 { 4.0 } else { 0.0 }).collect();
    // Token 123 points along the query, moderately: close enough to its cluster-mates'
    // direction to stay in their cluster, far enough to carry the largest logit.
    let host: Vec<f32> = keys[123 * d..124 * d].to_vec();
    let norm = host.iter().map(|v| v * v).sum::<f32>().sqrt();
    for i in 0..d {
        keys[123 * d + i] = host[i] + if i == 0 { 1.5 * norm } else { 0.0 };
    }
    let index = build(&keys, n, 1, d, &ClusterConfig::new(ClusterCount::Absolute(40)).with_seed(3).with_max_iter(10));
    let qv = TensorView::new(&q, &[1, d]).unwrap();
    let logit = |t: usize| (0..d).map(|i| q[i] * keys[t * d + i]).sum::<f32>();
    let best = (0..n).max_by(|&a, &b| logit(a).partial_cmp(&logit(b)).unwrap()).unwrap();
    assert_eq!(best, 123, "the planted key has the largest logit");
    let c = index.head(0).assignment()[123] as usize;
    let size = index.head(0).sizes()[c] as usize;
    assert!(size > 1, "the planted key shares its cluster");
    let budget = 20;
    let est = index.retrieve(&qv, &Retrieve::Budget(budget), n).unwrap();
    let mixed = index.retrieve(&qv, &Retrieve::MixedBudget(budget), n).unwrap();
    assert!(mixed.selection.head(0).contains(&123), "mixed ranking keeps the planted key");
    assert!(
        !est.selection.head(0).contains(&123),
        "the estimate ranking hides the planted key in its cluster of {size}"
    );
}

#[test]
fn hierarchical_counts_what_it_scores() {
    let (n, hk, hq, d) = (2000, 2, 6, 32);
    let mut rng = Rng(21);
    let keys = clustered_keys(&mut rng, n, hk, d, 30, 0.3);
    let index = build(
        &keys,
        n,
        hk,
        d,
        &ClusterConfig::new(ClusterCount::Absolute(100)).with_coarse(ClusterCount::Absolute(10)).with_max_iter(10),
    );
    let q = rng.vec(hq * d, 4.0);
    let qv = TensorView::new(&q, &[hq, d]).unwrap();
    let g = hq / hk;
    for coarse in
        [CoarseRetrieve::Budget(300), CoarseRetrieve::BudgetMultiple(2.0), CoarseRetrieve::Threshold(1.0 / n as f64)]
    {
        let r = index.retrieve_hierarchical(&qv, coarse, &Retrieve::Budget(150), n).unwrap();
        let s = &r.stats;
        assert_eq!(s.coarse_evals, hq * 10);
        assert_eq!(s.fine_evals, g * s.clusters_scored.iter().sum::<usize>());
        assert_eq!(s.centroid_evals, s.coarse_evals + s.fine_evals);
        for h in 0..hk {
            let level = index.coarse(h).unwrap();
            // Every kept token's cluster is a child of an opened coarse cluster, and the
            // opened clusters' children are exactly the clusters scored.
            let cl = index.head(h);
            let parent = |c: u32| (0..10).find(|&p| level.children(p).contains(&c)).unwrap();
            let opened: std::collections::BTreeSet<usize> =
                r.selection.head(h).iter().map(|&t| parent(cl.assignment()[t as usize])).collect();
            assert!(opened.len() <= s.coarse_kept[h]);
            assert!(s.clusters_scored[h] < 100, "coarse level opened everything");
            if let CoarseRetrieve::Budget(b) = coarse {
                assert!(s.tokens_kept[h] == 150);
                let _ = b;
            }
        }
        assert!(s.centroid_evals < hq * 100, "{coarse:?}: {} evals", s.centroid_evals);
    }
}

#[test]
fn calibration_hits_the_target_fraction() {
    let (n, hk, hq, d, m) = (3000, 2, 4, 32, 24);
    let mut rng = Rng(3);
    let keys = clustered_keys(&mut rng, n, hk, d, 40, 0.4);
    let index = build(&keys, n, hk, d, &ClusterConfig::new(ClusterCount::Absolute(150)).with_max_iter(10));
    let qs = rng.vec(m * hq * d, 3.0);
    let qv = TensorView::new(&qs, &[m, hq, d]).unwrap();
    for per_head in [false, true] {
        for target in [0.05, 0.125, 0.3, 0.7] {
            let th = calibrate(&index, &qv, target, per_head).unwrap();
            let achieved = th.mean_kept_fraction();
            println!("calibrate per_head={per_head} target {target}: kept {achieved:.4}, tau {:?}", th.per_head);
            assert!((achieved - target).abs() < 0.02, "target {target}, achieved {achieved}");
            if per_head {
                for &f in &th.kept_fraction {
                    assert!((f - target).abs() < 0.03, "per-head {f} vs {target}");
                }
            }
            // Applying the thresholds to the calibration queries keeps what was reported.
            let how = th.retrieve();
            let mut kept = vec![0f64; hk];
            for i in 0..m {
                let qi = qv.narrow0(i).unwrap();
                let r = index.retrieve(&qi, &how, n).unwrap();
                for h in 0..hk {
                    kept[h] += r.stats.tokens_kept[h] as f64 / (n * m) as f64;
                }
            }
            for h in 0..hk {
                assert!((kept[h] - th.kept_fraction[h]).abs() < 1e-9);
            }
        }
    }
    assert_eq!(calibrate(&index, &qv, 0.0, false).unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(calibrate(&index, &qv, 1.5, true).unwrap_err().code(), ErrorCode::InvalidArgument);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn incremental_assignment_matches_brute_force(n0 in 30usize..200, extra in 0usize..150, window in 0usize..8, seed in any::<u64>(), coarse in any::<bool>()) {
        let (hk, d) = (2, 16);
        let n = n0 + extra;
        let mut rng = Rng(seed);
        let keys = clustered_keys(&mut rng, n, hk, d, 6, 0.5);
        let mut cfg = ClusterConfig::new(ClusterCount::Fraction(0.1)).with_exclude_window(window).with_seed(seed).with_max_iter(6);
        if coarse {
            cfg = cfg.with_coarse(ClusterCount::Absolute(2));
        }
        let mut index = build(&keys[..n0 * hk * d], n0, hk, d, &cfg);
        let before = index.clone();
        let full = TensorView::new(&keys, &[n, hk, d]).unwrap();
        let added = index.assign_new(KeySource::Tensor(&full)).unwrap();
        let end = n - window;
        prop_assert_eq!(added, end - (n0 - window));
        prop_assert_eq!(index.clustered_len(), end);
        prop_assert_eq!(index.seq_len(), n);
        prop_assert_eq!(index.seq_len_at_build(), n0);
        for h in 0..hk {
            let (cl, old) = (index.head(h), before.head(h));
            prop_assert_eq!(cl.centroids(), old.centroids());
            prop_assert_eq!(&cl.assignment()[..n0 - window], old.assignment());
            let cn: Vec<Vec<f64>> = cl.centroids_normalized().chunks(d).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
            let x = unit(&head_rows(&keys, n, hk, d, h), d);
            for t in n0 - window..end {
                let own = dot(&x[t], &cn[cl.assignment()[t] as usize]);
                let best = cn.iter().map(|c| dot(&x[t], c)).fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(own >= best - 1e-5, "token {} not at its nearest centroid", t);
            }
            // Sizes, members and assignment agree (members ascending, each token once).
            let k = cl.num_clusters();
            let mut seen = vec![0u32; end];
            for c in 0..k {
                let m = cl.members(c);
                prop_assert_eq!(m.len(), cl.sizes()[c] as usize);
                prop_assert!(m.windows(2).all(|w| w[0] < w[1]));
                for &t in m {
                    prop_assert_eq!(cl.assignment()[t as usize] as usize, c);
                    seen[t as usize] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&s| s == 1));
            // Radii still bound every member's distance to the (unmoved) centroid.
            let rows = head_rows(&keys, n, hk, d, h);
            for (c, (&r, want)) in cl.radii().iter().zip(ref_radii(cl, &rows, d)).enumerate() {
                prop_assert!((r as f64 - want).abs() <= 1e-4 * want.max(1.0), "cluster {} radius {} vs {}", c, r, want);
            }
            if let Some(level) = index.coarse(h) {
                for c in 0..level.num_clusters() {
                    let total: u32 = level.children(c).iter().map(|&f| cl.sizes()[f as usize]).sum();
                    prop_assert_eq!(level.sizes()[c], total);
                }
            }
        }
        // Nothing new: a second call assigns nothing. A shorter sequence is refused.
        prop_assert_eq!(index.assign_new(KeySource::Tensor(&full)).unwrap(), 0);
        let short = TensorView::new(&keys[..(n - 1) * hk * d], &[n - 1, hk, d]).unwrap();
        prop_assert!(index.assign_new(KeySource::Tensor(&short)).is_err());
        // Rebuild clusters everything again.
        index.rebuild(KeySource::Tensor(&full)).unwrap();
        prop_assert_eq!(index.seq_len_at_build(), n);
        prop_assert_eq!(index.clustered_len(), n - window);
    }
}

#[test]
fn cache_and_tensor_sources_agree() {
    let (hk, d, n) = (2, 64, 333);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut cache = KvCache::new(CacheConfig::new(2, hk, d, 16, 32).with_dtype(dtype)).unwrap();
        let mut rng = Rng(17);
        let id = common::fill_sequence(&mut cache, n, &mut rng, 1.0);
        let cfg = ClusterConfig::new(ClusterCount::Absolute(20))
            .with_coarse(ClusterCount::Absolute(4))
            .with_exclude_window(16)
            .with_max_iter(5);
        let from_cache = ClusterIndex::build(KeySource::Cache { cache: &cache, seq: id, layer: 1 }, &cfg).unwrap();
        let keys = cache.read_keys(id, 1).unwrap();
        let from_tensor = build(&keys, n, hk, d, &cfg);
        assert_eq!(from_cache, from_tensor, "{dtype:?}");
        // Append tokens to the cache and assign them incrementally.
        cache.append(id, 40, None).unwrap();
        let more = rng.vec(40 * hk * d, 1.0);
        let t = TensorView::new(&more, &[40, hk, d]).unwrap();
        cache.write(id, 1, n, &t, &t).unwrap();
        let mut index = from_cache.clone();
        assert_eq!(index.assign_new(KeySource::Cache { cache: &cache, seq: id, layer: 1 }).unwrap(), 40);
        assert_eq!(index.clustered_len(), n + 40 - 16);
    }
    let pre = KvCache::new(CacheConfig::new(1, hk, d, 16, 8).with_key_rope(KeyRope::PreRope)).unwrap();
    let mut pre = pre;
    let id = common::fill_sequence(&mut pre, 50, &mut Rng(1), 1.0);
    let e = ClusterIndex::build(
        KeySource::Cache { cache: &pre, seq: id, layer: 0 },
        &ClusterConfig::new(ClusterCount::Absolute(4)),
    )
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument);
}

// ---------- files ----------

fn sample_index(coarse: bool) -> (ClusterIndex, Vec<f32>, usize, usize, usize) {
    let (n, hk, d) = (300, 2, 16);
    let mut rng = Rng(77);
    let keys = clustered_keys(&mut rng, n, hk, d, 8, 0.4);
    let mut cfg =
        ClusterConfig::new(ClusterCount::Fraction(0.05)).with_exclude_window(12).with_seed(9).with_max_iter(6);
    if coarse {
        cfg = cfg.with_coarse(ClusterCount::Absolute(3));
    }
    (build(&keys, n, hk, d, &cfg), keys, n, hk, d)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvsieve-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Same index apart from build-time diagnostics (inertia history, seeds).
fn same_index(a: &ClusterIndex, b: &ClusterIndex) -> bool {
    let same_head = |x: &Clustering, y: &Clustering| {
        x.centroids() == y.centroids()
            && x.centroids_normalized() == y.centroids_normalized()
            && x.sizes() == y.sizes()
            && x.member_offsets() == y.member_offsets()
            && x.all_members() == y.all_members()
            && x.assignment() == y.assignment()
            && x.inertia() == y.inertia()
            && x.iterations() == y.iterations()
            && x.converged() == y.converged()
            && x.radii() == y.radii()
    };
    a.config() == b.config()
        && (a.num_kv_heads(), a.head_dim(), a.seq_len(), a.seq_len_at_build(), a.clustered_len())
            == (b.num_kv_heads(), b.head_dim(), b.seq_len(), b.seq_len_at_build(), b.clustered_len())
        && (0..a.num_kv_heads()).all(|h| same_head(a.head(h), b.head(h)) && a.coarse(h) == b.coarse(h))
}

#[test]
fn save_load_round_trip() {
    for coarse in [false, true] {
        let (index, keys, n, hk, d) = sample_index(coarse);
        let path = tmp(&format!("round{coarse}.safetensors"));
        index.save(&path).unwrap();
        let back = ClusterIndex::load(&path).unwrap();
        assert!(same_index(&index, &back));
        assert_eq!(back.config(), index.config());
        assert_eq!(back.head(1).inertia(), index.head(1).inertia());
        let mut rng = Rng(4);
        let q = rng.vec(4 * d, 2.0);
        let qv = TensorView::new(&q, &[4, d]).unwrap();
        assert_eq!(
            index.retrieve(&qv, &Retrieve::Budget(40), n).unwrap(),
            back.retrieve(&qv, &Retrieve::Budget(40), n).unwrap()
        );
        if coarse {
            let a = index.retrieve_hierarchical(&qv, CoarseRetrieve::Budget(80), &Retrieve::Budget(40), n).unwrap();
            assert_eq!(
                a,
                back.retrieve_hierarchical(&qv, CoarseRetrieve::Budget(80), &Retrieve::Budget(40), n).unwrap()
            );
        }
        // Assigning new tokens works the same after a load.
        let full = TensorView::new(&keys, &[n, hk, d]).unwrap();
        let mut a = index.clone();
        let mut b = back.clone();
        let more: Vec<f32> = keys.iter().chain(rng.vec(20 * hk * d, 1.0).iter()).copied().collect();
        let longer = TensorView::new(&more, &[n + 20, hk, d]).unwrap();
        a.assign_new(KeySource::Tensor(&longer)).unwrap();
        b.assign_new(KeySource::Tensor(&longer)).unwrap();
        assert!(same_index(&a, &b));
        ClusterIndex::load_for(&path, KeySource::Tensor(&full)).unwrap();
        // A source with another head_dim or fewer tokens is refused as Io.
        let other = vec![0.5f32; n * hk * 32];
        let ov = TensorView::new(&other, &[n, hk, 32]).unwrap();
        let e = ClusterIndex::load_for(&path, KeySource::Tensor(&ov)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.to_string().contains("head_dim"), "{e}");
        let shorter = TensorView::new(&keys[..100 * hk * d], &[100, hk, d]).unwrap();
        assert_eq!(ClusterIndex::load_for(&path, KeySource::Tensor(&shorter)).unwrap_err().code(), ErrorCode::Io);
        // A query with another head_dim is a shape error.
        let q32 = vec![0.1f32; 4 * 32];
        assert_eq!(
            back.retrieve(&TensorView::new(&q32, &[4, 32]).unwrap(), &Retrieve::Budget(4), n).unwrap_err().code(),
            ErrorCode::Shape
        );
        std::fs::remove_file(&path).unwrap();
    }
    let missing = ClusterIndex::load(tmp("does-not-exist.safetensors")).unwrap_err();
    assert_eq!(missing.code(), ErrorCode::Io);
}

#[test]
fn truncated_and_corrupted_files_are_io_errors() {
    let (index, ..) = sample_index(true);
    let bytes = index.to_bytes().unwrap();
    // Every truncation length in the header, then a spread of lengths through the data.
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    let lens: Vec<usize> = (0..header.min(bytes.len())).chain((header..bytes.len()).step_by(7)).collect();
    for len in lens {
        let e = ClusterIndex::from_bytes(&bytes[..len]).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Io, "length {len}: {e}");
    }
    let mut extended = bytes.clone();
    extended.extend_from_slice(&[0; 8]);
    assert_eq!(ClusterIndex::from_bytes(&extended).unwrap_err().code(), ErrorCode::Io);
    // Flipped bytes: an error, or (whitespace in the JSON header) the same index.
    let mut rng = Rng(1234);
    let (mut errors, mut total) = (0, 0);
    let extra: Vec<usize> = (0..400).map(|_| rng.below(bytes.len())).collect();
    for pos in (0..bytes.len()).step_by(3).chain(extra) {
        let mut b = bytes.clone();
        b[pos] ^= 1 + rng.below(255) as u8;
        total += 1;
        match ClusterIndex::from_bytes(&b) {
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::Io, "byte {pos}: {e}");
                errors += 1;
            }
            Ok(back) => assert!(same_index(&index, &back), "byte {pos} changed the index without an error"),
        }
    }
    println!("flipped bytes: {errors} of {total} refused, the rest harmless");
    assert!(errors * 10 >= total * 9);
    // A flipped data byte is named a checksum mismatch.
    let mut b = bytes.clone();
    let last = b.len() - 5;
    b[last] ^= 0x40;
    let e = ClusterIndex::from_bytes(&b).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

/// Rewrite the metadata of a saved index (keeping its tensors).
fn with_meta(bytes: &[u8], edit: impl Fn(&mut std::collections::HashMap<String, String>)) -> Vec<u8> {
    use safetensors::SafeTensors;
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit(&mut meta);
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    safetensors::serialize(tensors, Some(meta)).unwrap()
}

#[test]
fn mismatched_files_are_io_errors_with_reasons() {
    let (index, ..) = sample_index(false);
    let bytes = index.to_bytes().unwrap();
    type Edit = Box<dyn Fn(&mut std::collections::HashMap<String, String>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "version",
            Box::new(|m| {
                m.insert("format_version".into(), "3".into());
            }),
        ),
        (
            "radii",
            Box::new(|m| {
                m.insert("format_version".into(), "1".into());
            }),
        ),
        (
            "format",
            Box::new(|m| {
                m.insert("format".into(), "something.else".into());
            }),
        ),
        (
            "tensor `centroids`",
            Box::new(|m| {
                m.insert("num_clusters".into(), "15".into());
                m.insert("config.clusters".into(), "absolute:15".into());
            }),
        ),
        // Fields that each parse but contradict each other.
        (
            "`num_clusters` 15",
            Box::new(|m| {
                m.insert("num_clusters".into(), "15".into());
            }),
        ),
        (
            "disagree",
            Box::new(|m| {
                m.insert("config.clusters".into(), "absolute:0".into());
            }),
        ),
        (
            "`clustered_len` 288",
            Box::new(|m| {
                m.insert("config.exclude_window".into(), "20".into());
            }),
        ),
        (
            "checksum",
            Box::new(|m| {
                m.insert("config.seed".into(), "10".into());
            }),
        ),
        (
            "head_dim",
            Box::new(|m| {
                m.insert("head_dim".into(), "12".into());
            }),
        ),
        (
            "missing",
            Box::new(|m| {
                m.remove("seq_len");
            }),
        ),
        (
            "inconsistent",
            Box::new(|m| {
                m.insert("seq_len".into(), "5".into());
            }),
        ),
    ];
    for (word, edit) in cases {
        let e =
            ClusterIndex::from_bytes(&with_meta(&bytes, edit)).err().unwrap_or_else(|| panic!("case `{word}` loaded"));
        assert_eq!(e.code(), ErrorCode::Io);
        assert!(e.to_string().contains(word), "expected `{word}` in: {e}");
    }
    // No metadata at all, and a file of other tensors.
    let plain = safetensors::serialize(Vec::<(String, safetensors::tensor::TensorView)>::new(), None).unwrap();
    assert_eq!(ClusterIndex::from_bytes(&plain).unwrap_err().code(), ErrorCode::Io);
}

// ---------- bad input ----------

#[test]
fn bad_inputs_are_clear_errors() {
    let (n, hk, d) = (50, 2, 16);
    let mut rng = Rng(8);
    let mut keys = rng.vec(n * hk * d, 1.0);
    fn t(k: &[f32], n: usize) -> TensorView<'_> {
        TensorView::new(k, &[n, 2, 16]).unwrap()
    }
    let kv = t(&keys, n);
    let err = |cfg: ClusterConfig, src: &TensorView| ClusterIndex::build(KeySource::Tensor(src), &cfg).unwrap_err();
    assert_eq!(err(ClusterConfig::new(ClusterCount::Absolute(0)), &kv).code(), ErrorCode::InvalidArgument);
    let e = err(ClusterConfig::new(ClusterCount::Absolute(51)), &kv);
    assert!(e.to_string().contains("at most one cluster per key"), "{e}");
    assert_eq!(err(ClusterConfig::new(ClusterCount::Fraction(0.0)), &kv).code(), ErrorCode::InvalidArgument);
    assert_eq!(err(ClusterConfig::new(ClusterCount::Fraction(0.001)), &kv).code(), ErrorCode::InvalidArgument);
    assert_eq!(err(ClusterConfig::new(ClusterCount::Fraction(f64::NAN)), &kv).code(), ErrorCode::InvalidArgument);
    assert_eq!(
        err(ClusterConfig::new(ClusterCount::Absolute(4)).with_exclude_window(50), &kv).code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        err(ClusterConfig::new(ClusterCount::Absolute(4)).with_coarse(ClusterCount::Absolute(5)), &kv).code(),
        ErrorCode::InvalidArgument
    );
    let empty: Vec<f32> = Vec::new();
    let ev = TensorView::new(&empty, &[0, hk, d]).unwrap();
    let e = err(ClusterConfig::new(ClusterCount::Absolute(1)), &ev);
    assert!(e.to_string().contains("non-empty"), "{e}");
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        keys[(17 * hk + 1) * d + 5] = bad;
        let e = err(ClusterConfig::new(ClusterCount::Absolute(4)), &t(&keys, n));
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(e.to_string().contains("token 17, KV head 1"), "{e}");
    }
    keys[(17 * hk + 1) * d + 5] = 0.5;
    let odd = vec![0.5f32; n * hk * 12];
    assert_eq!(
        err(ClusterConfig::new(ClusterCount::Absolute(4)), &TensorView::new(&odd, &[n, hk, 12]).unwrap()).code(),
        ErrorCode::Unsupported
    );
    // kmeans on rows.
    assert!(kmeans(&keys[..d * 3], d, &KMeansConfig::new(ClusterCount::Absolute(4))).is_err());
    assert!(kmeans(&keys[..d * 3 + 1], d, &KMeansConfig::new(ClusterCount::Absolute(1))).is_err());
    assert!(kmeans(&[], d, &KMeansConfig::new(ClusterCount::Absolute(1))).is_err());
    // Retrieval.
    let index =
        build(&keys, n, hk, d, &ClusterConfig::new(ClusterCount::Absolute(5)).with_coarse(ClusterCount::Absolute(2)));
    let flat = build(&keys, n, hk, d, &ClusterConfig::new(ClusterCount::Absolute(5)));
    let q = rng.vec(4 * d, 1.0);
    let qv = TensorView::new(&q, &[4, d]).unwrap();
    assert_eq!(index.retrieve(&qv, &Retrieve::Budget(0), n).unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(index.retrieve(&qv, &Retrieve::Threshold(f64::NAN), n).unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(index.retrieve(&qv, &Retrieve::PerHeadThreshold(vec![0.1]), n).unwrap_err().code(), ErrorCode::Shape);
    assert_eq!(index.retrieve(&qv, &Retrieve::Budget(3), n - 1).unwrap_err().code(), ErrorCode::OutOfRange);
    assert_eq!(
        index.retrieve(&TensorView::new(&q[..3 * d], &[3, d]).unwrap(), &Retrieve::Budget(3), n).unwrap_err().code(),
        ErrorCode::Shape
    );
    let q8 = vec![0.1f32; 4 * 8];
    assert_eq!(
        index.retrieve(&TensorView::new(&q8, &[4, 8]).unwrap(), &Retrieve::Budget(3), n).unwrap_err().code(),
        ErrorCode::Shape
    );
    let mut qn = q.clone();
    qn[3] = f32::NAN;
    assert_eq!(
        index.retrieve(&TensorView::new(&qn, &[4, d]).unwrap(), &Retrieve::Budget(3), n).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        flat.retrieve_hierarchical(&qv, CoarseRetrieve::Budget(10), &Retrieve::Budget(3), n).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        index.retrieve_hierarchical(&qv, CoarseRetrieve::Budget(0), &Retrieve::Budget(3), n).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    let e = index
        .retrieve_hierarchical(&qv, CoarseRetrieve::BudgetMultiple(2.0), &Retrieve::Threshold(0.1), n)
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument);
    // Mismatched sources for assign_new.
    let mut idx = index.clone();
    let other = vec![0.5f32; n * 3 * d];
    assert_eq!(
        idx.assign_new(KeySource::Tensor(&TensorView::new(&other, &[n, 3, d]).unwrap())).unwrap_err().code(),
        ErrorCode::Shape
    );
    let mut longer = keys.clone();
    longer.extend(std::iter::repeat_n(f32::NAN, hk * d));
    let e = idx.assign_new(KeySource::Tensor(&TensorView::new(&longer, &[n + 1, hk, d]).unwrap())).unwrap_err();
    assert!(e.to_string().contains("token 50"), "{e}");
    assert_eq!(idx, index, "a failed assign_new changed the index");
}

// ---------- planted structure ----------

#[test]
fn planted_group_recall_at_one_eighth_budget() {
    let (n, d, hq) = (2048, 64, 4);
    let mut rng = Rng(2024);
    let mut keys = clustered_keys(&mut rng, n, 1, d, 48, 0.5);
    // A direction u; 40 tokens scattered through the context point along it.
    let u: Vec<f32> = {
        let v = rng.vec(d, 1.0);
        let nrm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / nrm).collect()
    };
    let planted: Vec<usize> = (0..40).map(|i| 17 + i * 50).collect();
    for &t in &planted {
        let s = 2.0 + rng.uniform().abs();
        for c in 0..d {
            keys[t * d + c] = s * u[c] * 4.0 + 0.3 * rng.uniform();
        }
    }
    let index =
        build(&keys, n, 1, d, &ClusterConfig::new(ClusterCount::Fraction(1.0 / 32.0)).with_max_iter(12).with_seed(1));
    let budget = n / 8;
    let (mut recall, mut oracle) = (0f64, 0f64);
    let trials = 8;
    for _ in 0..trials {
        let q: Vec<f32> =
            (0..hq).flat_map(|_| u.iter().map(|&x| x * 6.0 + 1.5 * rng.uniform()).collect::<Vec<_>>()).collect();
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let sel = index.retrieve(&qv, &Retrieve::Budget(budget), n).unwrap().selection;
        // True softmax mass, averaged over the query heads.
        let mut mass = vec![0f64; n];
        for j in 0..hq {
            let l: Vec<f64> = (0..n)
                .map(|t| (0..d).map(|c| q[j * d + c] as f64 * keys[t * d + c] as f64).sum::<f64>() / (d as f64).sqrt())
                .collect();
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
            for t in 0..n {
                mass[t] += (l[t] - m).exp() / z / hq as f64;
            }
        }
        recall += sel.head(0).iter().map(|&t| mass[t as usize]).sum::<f64>() / trials as f64;
        let mut sorted = mass.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        oracle += sorted[..budget].iter().sum::<f64>() / trials as f64;
        let planted_kept = planted.iter().filter(|&&t| sel.head(0).binary_search(&(t as u32)).is_ok()).count();
        assert!(planted_kept >= 36, "only {planted_kept} of 40 planted tokens kept");
    }
    println!("planted structure, budget n/8: retrieval mass recall {recall:.4}, oracle top-k mass {oracle:.4}");
    assert!(recall > 0.8, "recall {recall}");
    assert!(recall <= oracle + 1e-9);
}

#[test]
fn selection_from_retrieval_is_a_valid_selection() {
    let (index, _keys, n, hk, d) = sample_index(true);
    let q = Rng(3).vec(2 * hk * d, 1.0);
    let r = index.retrieve(&TensorView::new(&q, &[2 * hk, d]).unwrap(), &Retrieve::Threshold(0.0), n + 5).unwrap();
    let (seq_len, indptr, indices) = r.selection.clone().into_parts();
    assert_eq!(Selection::from_csr(seq_len, indptr, indices).unwrap(), r.selection);
    assert_eq!(seq_len, n + 5);
}
