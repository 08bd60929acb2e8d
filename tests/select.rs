//! Token selection against plain references on fresh random inputs: `Selection` set
//! operations and validation, top-k, sinks + window and the Λ-mask, page-bound scores and
//! page choice, and the policy text form (round trip, parse errors, validation, selection).

mod common;
use std::collections::BTreeSet;

use common::Rng;
use kvsieve::attention::PositionMode;
use kvsieve::select::{
    lambda, page_bounds, page_scores, pages_to_keep, streaming, top_k, window_pages_to_evict, ClusterRank,
    PageBoundsConfig, Policy, PositionKind, Selection, Spec,
};
use kvsieve::{CacheConfig, DType, Error, KeyRope, KvCache, PageLayout, SeqId, TensorView};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Selection

fn heads_strategy() -> impl Strategy<Value = (usize, Vec<BTreeSet<u32>>)> {
    (1usize..200, 1usize..5).prop_flat_map(|(seq_len, h)| {
        let head = proptest::collection::btree_set(0..seq_len as u32, 0..seq_len.min(80));
        (Just(seq_len), proptest::collection::vec(head, h))
    })
}

fn to_heads(sets: &[BTreeSet<u32>]) -> Vec<Vec<u32>> {
    sets.iter().map(|s| s.iter().copied().collect()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn union_and_intersection_match_sets((seq_len, a) in heads_strategy(), seed in any::<u64>()) {
        let mut rng = Rng(seed);
        // A second selection of the same shape, with random members.
        let b: Vec<BTreeSet<u32>> = a
            .iter()
            .map(|_| (0..seq_len as u32).filter(|_| rng.below(3) == 0).collect())
            .collect();
        let sa = Selection::from_heads(seq_len, to_heads(&a)).unwrap();
        let sb = Selection::from_heads(seq_len, to_heads(&b)).unwrap();
        let u = sa.union(&sb).unwrap();
        let i = sa.intersection(&sb).unwrap();
        prop_assert_eq!(u.num_kv_heads(), a.len());
        for h in 0..a.len() {
            let want_u: Vec<u32> = a[h].union(&b[h]).copied().collect();
            let want_i: Vec<u32> = a[h].intersection(&b[h]).copied().collect();
            prop_assert_eq!(u.head(h), &want_u[..]);
            prop_assert_eq!(i.head(h), &want_i[..]);
        }
        // CSR arrays agree with the heads; a round trip through from_csr is exact.
        let again = Selection::from_csr(seq_len, u.head_indptr().to_vec(), u.indices().to_vec()).unwrap();
        prop_assert_eq!(&again, &u);
        let st = sa.stats();
        let per: Vec<usize> = a.iter().map(|s| s.len()).collect();
        prop_assert_eq!(&st.per_head, &per);
        prop_assert_eq!(st.total, per.iter().sum::<usize>());
        prop_assert_eq!(sa.len(), st.total);
        let dens: Vec<f64> = per.iter().map(|&n| n as f64 / seq_len as f64).collect();
        prop_assert!((st.density - st.total as f64 / (a.len() * seq_len) as f64).abs() < 1e-12);
        prop_assert_eq!(st.min_density, dens.iter().cloned().fold(f64::INFINITY, f64::min));
        prop_assert_eq!(st.max_density, dens.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
    }

    /// from_csr accepts exactly the arrays a plain validator accepts.
    #[test]
    fn from_csr_matches_a_plain_validator(seq_len in 0usize..20, heads in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let mut indptr = vec![0u32];
        for _ in 0..heads {
            let last = *indptr.last().unwrap();
            indptr.push(last + rng.below(6) as u32);
        }
        if rng.below(8) == 0 {
            let i = rng.below(indptr.len());
            indptr[i] = rng.below(12) as u32;
        }
        let n = *indptr.last().unwrap() as usize + usize::from(rng.below(10) == 0);
        let mut indices: Vec<u32> = (0..n).map(|_| rng.below(seq_len + 2) as u32).collect();
        if rng.below(2) == 0 {
            indices.sort_unstable();
        }
        let plain_ok = indptr[0] == 0
            && indptr.windows(2).all(|w| w[0] <= w[1])
            && *indptr.last().unwrap() as usize == indices.len()
            && (0..heads).all(|h| {
                let s = &indices[indptr[h] as usize..indptr[h + 1] as usize];
                s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&t| (t as usize) < seq_len)
            });
        let got = Selection::from_csr(seq_len, indptr, indices);
        prop_assert_eq!(got.is_ok(), plain_ok, "{:?}", got);
    }
}

#[test]
fn from_csr_errors_name_the_first_offending_position() {
    // Head 2 holds indices[14..20]; indices[17] = 5 follows 9.
    let mut indices: Vec<u32> = (0..7).collect(); // head 0
    indices.extend(0..7); // head 1
    indices.extend([1, 3, 9, 5, 11, 12]); // head 2
    let indptr = vec![0, 7, 14, 20];
    let e = Selection::from_csr(30, indptr.clone(), indices.clone()).unwrap_err();
    assert_eq!(e.code(), kvsieve::ErrorCode::InvalidArgument);
    assert!(e.to_string().contains("indices[17] = 5 is not greater than the previous index 9 in head 2"), "{e}");
    // Equal neighbours are not strictly ascending either.
    let mut dup = indices.clone();
    dup[17] = 9;
    let e = Selection::from_csr(30, indptr.clone(), dup).unwrap_err();
    assert!(e.to_string().contains("indices[17] = 9 is not greater than the previous index 9 in head 2"), "{e}");
    // Out of range: the flat position, the value and the head.
    let e = Selection::from_csr(12, indptr.clone(), {
        let mut x = indices.clone();
        x[17] = 10;
        x
    })
    .unwrap_err();
    assert_eq!(
        e,
        Error::OutOfRange { param: "indices[19]".into(), value: 12, range: "0..12 (seq_len; head 2)".into() }
    );
    // head_indptr problems.
    let e = Selection::from_csr(30, vec![0, 7, 6, 20], indices.clone()).unwrap_err();
    assert!(e.to_string().contains("head_indptr[2] = 6 is less than head_indptr[1] = 7"), "{e}");
    let e = Selection::from_csr(30, vec![1, 7, 14, 20], indices.clone()).unwrap_err();
    assert!(e.to_string().contains("`head_indptr`") && e.to_string().contains("head_indptr[0] == 0, got 1"), "{e}");
    let e = Selection::from_csr(30, vec![0, 7, 14, 19], indices.clone()).unwrap_err();
    assert!(e.to_string().contains("head_indptr[3] == indices.len() = 20, got 19"), "{e}");
    let e = Selection::from_csr(30, vec![0], vec![]).unwrap_err();
    assert_eq!(e.code(), kvsieve::ErrorCode::Shape);
    assert!(e.to_string().contains("head_indptr"), "{e}");
    // from_heads reports flat positions too.
    let e = Selection::from_heads(30, vec![vec![0, 1], vec![4, 4]]).unwrap_err();
    assert!(e.to_string().contains("indices[3] = 4 is not greater than the previous index 4 in head 1"), "{e}");
    assert!(Selection::from_heads(30, vec![]).is_err());
    // Set operations need the same shape.
    let a = Selection::dense(2, 10).unwrap();
    let b = Selection::dense(3, 10).unwrap();
    let c = Selection::dense(2, 11).unwrap();
    assert!(a.union(&b).unwrap_err().to_string().contains("num_kv_heads"));
    assert!(a.intersection(&c).unwrap_err().to_string().contains("seq_len"));
}

#[test]
fn dense_and_same_for_all_heads() {
    let d = Selection::dense(3, 5).unwrap();
    assert!(d.is_dense());
    assert_eq!(d.head_indptr(), &[0, 5, 10, 15]);
    assert_eq!(d.head(2), &[0, 1, 2, 3, 4]);
    let st = d.stats();
    assert_eq!((st.total, st.density, st.min_density, st.max_density), (15, 1.0, 1.0, 1.0));
    let e = Selection::dense(2, 0).unwrap();
    assert!(e.is_empty() && e.stats().density == 0.0);
    let s = Selection::same_for_all_heads(2, 9, vec![1, 4, 8]).unwrap();
    assert_eq!(s.head(0), s.head(1));
    assert!(Selection::same_for_all_heads(2, 9, vec![1, 9]).is_err());
    assert!(Selection::same_for_all_heads(0, 9, vec![1]).is_err());
}

// ---------------------------------------------------------------------------------------
// top-k

fn reference_top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    idx.sort_by(|&a, &b| key(scores[b as usize]).partial_cmp(&key(scores[a as usize])).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn top_k_matches_a_full_sort(n in 0usize..300, k in 0usize..320, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        // Few distinct values so ties are common, plus NaN and infinities.
        let palette = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0, rng.uniform(), rng.uniform(), rng.uniform() * 10.0];
        let distinct = rng.below(2) == 0;
        let scores: Vec<f32> = (0..n).map(|_| if distinct { rng.uniform() } else { palette[rng.below(palette.len())] }).collect();
        prop_assert_eq!(top_k(&scores, k), reference_top_k(&scores, k));
    }
}

// ---------------------------------------------------------------------------------------
// Sinks + window, Λ-mask, eviction

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn streaming_and_lambda_match_plain_sets(heads in 1usize..4, seq_len in 0usize..120, sinks in 0usize..40, window in 1usize..130) {
        let want: Vec<u32> = (0..seq_len).filter(|&t| t < sinks || t + window >= seq_len).map(|t| t as u32).collect();
        let s = streaming(heads, seq_len, sinks, window).unwrap();
        let l = lambda(heads, seq_len, sinks, window).unwrap();
        prop_assert_eq!(s.num_kv_heads(), heads);
        for h in 0..heads {
            prop_assert_eq!(s.head(h), &want[..]);
            prop_assert_eq!(l.head(h), &want[..]);
        }
        prop_assert_eq!(s.seq_len(), seq_len);
    }

    #[test]
    fn evictable_pages_hold_only_unselected_tokens(seq_len in 0usize..300, page_size in 1usize..20, sinks in 0usize..40, window in 1usize..100) {
        let got = window_pages_to_evict(seq_len, page_size, sinks, window).unwrap();
        let kept = |t: usize| t < sinks || t + window >= seq_len;
        let want: Vec<usize> = (0..seq_len.div_ceil(page_size))
            .filter(|&p| (p * page_size..((p + 1) * page_size).min(seq_len)).all(|t| !kept(t)))
            .collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn window_errors_name_the_parameter() {
    assert!(matches!(streaming(2, 10, 4, 0), Err(Error::InvalidArgument { ref param, .. }) if param == "window"));
    assert!(matches!(lambda(2, 10, 4, 0), Err(Error::InvalidArgument { ref param, .. }) if param == "local"));
    assert!(streaming(2, 10, 0, 3).is_ok());
    assert!(
        matches!(window_pages_to_evict(10, 0, 1, 1), Err(Error::InvalidArgument { ref param, .. }) if param == "page_size")
    );
    assert!(
        matches!(window_pages_to_evict(10, 4, 1, 0), Err(Error::InvalidArgument { ref param, .. }) if param == "window")
    );
}

// ---------------------------------------------------------------------------------------
// Page bounds

struct Setup {
    cache: KvCache,
    seq: SeqId,
    /// Tokens whose keys were written (a prefix; the rest were appended only).
    written: usize,
}

/// A one-sequence cache (NHD or HND pages) with `len` tokens, the first `written` written with random keys
/// whose scale varies by channel (so bounds differ between channels and pages).
fn setup(dtype: DType, hk: usize, d: usize, ps: usize, len: usize, written: usize, rng: &mut Rng) -> Setup {
    let layers = 2;
    let layout = if rng.below(2) == 0 { PageLayout::Nhd } else { PageLayout::Hnd };
    let cfg = CacheConfig::new(layers, hk, d, ps, len.div_ceil(ps) + 3).with_dtype(dtype).with_layout(layout);
    let mut cache = KvCache::new(cfg).unwrap();
    // Burn a page so page ids are not just 0..n.
    let other = cache.create_sequence();
    cache.append(other, 1, None).unwrap();
    let seq = cache.create_sequence();
    cache.append(seq, len, None).unwrap();
    let scales: Vec<f32> = (0..hk * d).map(|_| 0.1 + 3.0 * rng.uniform().abs()).collect();
    for layer in 0..layers {
        let mut k = vec![0f32; written * hk * d];
        for (i, x) in k.iter_mut().enumerate() {
            let t = i / (hk * d);
            // A drift along the sequence so pages differ.
            *x = rng.uniform() * scales[i % (hk * d)] + 0.5 * ((t / ps) as f32 * 0.7 + (i % d) as f32).sin();
        }
        let v = rng.vec(written * hk * d, 1.0);
        let shape = [written, hk, d];
        cache
            .write(seq, layer, 0, &TensorView::new(&k, &shape).unwrap(), &TensorView::new(&v, &shape).unwrap())
            .unwrap();
    }
    Setup { cache, seq, written }
}

/// Scores in f64 from `page_key_bounds`: `[kv_head][page]`.
fn reference_scores(s: &Setup, layer: usize, q: &[f32], hq: usize) -> (Vec<f64>, Vec<f64>) {
    let c = s.cache.config();
    let (hk, d) = (c.num_kv_heads, c.head_dim);
    let g = hq / hk;
    let np = s.cache.seq_pages(s.seq).unwrap().len();
    let mut out = vec![f64::NEG_INFINITY; hk * np];
    let mut tol = vec![0f64; hk * np];
    for p in 0..np {
        let (mn, mx) = s.cache.page_key_bounds(s.seq, layer, p).unwrap();
        for h in 0..hk {
            if mn[h * d] > mx[h * d] {
                continue; // no written slot
            }
            for r in 0..g {
                let qr = &q[(h * g + r) * d..(h * g + r + 1) * d];
                let mut sum = 0f64;
                let mut mag = 0f64;
                for i in 0..d {
                    let (a, b) = (qr[i] as f64 * mn[h * d + i] as f64, qr[i] as f64 * mx[h * d + i] as f64);
                    sum += a.max(b);
                    mag += a.abs().max(b.abs());
                }
                out[h * np + p] = out[h * np + p].max(sum);
                tol[h * np + p] = tol[h * np + p].max(mag * 2e-6 + 1e-6);
            }
        }
    }
    (out, tol)
}

fn dtype_of(i: usize) -> DType {
    [DType::F32, DType::F16, DType::BF16][i]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn page_scores_match_f64_bounds(dt in 0usize..3, hk in 1usize..4, g in 1usize..6, d8 in 1usize..5, ps in 1usize..20, len in 1usize..200, unwritten in 0usize..40, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let d = d8 * 8;
        let written = len.saturating_sub(unwritten);
        let s = setup(dtype_of(dt), hk, d, ps, len, written, &mut rng);
        let hq = hk * g;
        let q = rng.vec(hq * d, 2.0);
        for layer in 0..2 {
            let pages = s.cache.seq_pages(s.seq).unwrap();
            let got = page_scores(s.cache.key_bounds(layer).unwrap(), &pages, &q, hq).unwrap();
            let (want, tol) = reference_scores(&s, layer, &q, hq);
            prop_assert_eq!(got.len(), want.len());
            for i in 0..got.len() {
                if want[i] == f64::NEG_INFINITY {
                    prop_assert_eq!(got[i], f32::NEG_INFINITY, "entry {}", i);
                } else {
                    prop_assert!((got[i] as f64 - want[i]).abs() <= tol[i], "entry {}: {} vs {}", i, got[i], want[i]);
                }
            }
            // Any subset of pages in any order scores the same.
            let np = pages.len();
            let order: Vec<usize> = (0..np).rev().filter(|_| rng.below(2) == 0).collect();
            let sub: Vec<u32> = order.iter().map(|&j| pages[j]).collect();
            let got_sub = page_scores(s.cache.key_bounds(layer).unwrap(), &sub, &q, hq).unwrap();
            for h in 0..hk {
                for (jj, &j) in order.iter().enumerate() {
                    prop_assert_eq!(got_sub[h * sub.len() + jj].to_bits(), got[h * np + j].to_bits());
                }
            }
        }
    }

    /// No logit of a written key exceeds its page's bound (max over the GQA group).
    #[test]
    fn bound_is_above_every_logit(dt in 0usize..3, hk in 1usize..3, g in 1usize..5, ps in 1usize..17, len in 1usize..150, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let d = 16;
        let s = setup(dtype_of(dt), hk, d, ps, len, len, &mut rng);
        let hq = hk * g;
        let q = rng.vec(hq * d, 3.0);
        let pages = s.cache.seq_pages(s.seq).unwrap();
        let np = pages.len();
        let scores = page_scores(s.cache.key_bounds(1).unwrap(), &pages, &q, hq).unwrap();
        let keys = s.cache.read_keys(s.seq, 1).unwrap();
        for t in 0..s.written {
            for h in 0..hk {
                let k = &keys[(t * hk + h) * d..(t * hk + h + 1) * d];
                let mut mag = 0f64;
                for r in 0..g {
                    let qr = &q[(h * g + r) * d..(h * g + r + 1) * d];
                    let logit: f64 = qr.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    mag = qr.iter().zip(k).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>().max(mag);
                    let bound = scores[h * np + t / ps] as f64;
                    prop_assert!(logit <= bound + 1e-5 * mag + 1e-6, "token {} head {} row {}: logit {} above bound {}", t, h, r, logit, bound);
                }
            }
        }
    }

    /// page_bounds keeps exactly the best pages by (score desc, page asc) until the budget
    /// is reached, at least min_pages, every token of those pages.
    #[test]
    fn page_bounds_keeps_the_best_pages(dt in 0usize..3, hk in 1usize..4, g in 1usize..4, ps in 1usize..16, len in 1usize..220, unwritten in 0usize..20, budget in 1usize..120, min_pages in 0usize..12, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let d = 16;
        let written = len.saturating_sub(unwritten);
        let s = setup(dtype_of(dt), hk, d, ps, len, written, &mut rng);
        let hq = hk * g;
        let qv = rng.vec(hq * d, 2.0);
        let q = TensorView::new(&qv, &[hq, d]).unwrap();
        let cfg = PageBoundsConfig { budget_tokens: budget, min_pages };
        let sel = page_bounds(&s.cache, s.seq, 0, &q, &cfg).unwrap();
        // The [1, hq, d] form gives the same answer.
        let q3 = TensorView::new(&qv, &[1, hq, d]).unwrap();
        prop_assert_eq!(&page_bounds(&s.cache, s.seq, 0, &q3, &cfg).unwrap(), &sel);
        prop_assert_eq!(sel.seq_len(), len);
        if len <= budget {
            prop_assert!(sel.is_dense());
            return Ok(());
        }
        let pages = s.cache.seq_pages(s.seq).unwrap();
        let np = pages.len();
        let scores = page_scores(s.cache.key_bounds(0).unwrap(), &pages, &qv, hq).unwrap();
        let tokens_of = |p: usize| ps.min(len - p * ps);
        for h in 0..hk {
            let row = &scores[h * np..(h + 1) * np];
            let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
            let mut order: Vec<usize> = (0..np).collect();
            order.sort_by(|&a, &b| key(row[b]).partial_cmp(&key(row[a])).unwrap().then(a.cmp(&b)));
            let mut kept = Vec::new();
            let mut total = 0;
            for &p in &order {
                if total >= budget && kept.len() >= min_pages.min(np) {
                    break;
                }
                kept.push(p);
                total += tokens_of(p);
            }
            kept.sort_unstable();
            let want: Vec<u32> = kept.iter().flat_map(|&p| (p * ps..p * ps + tokens_of(p)).map(|t| t as u32)).collect();
            prop_assert_eq!(sel.head(h), &want[..], "head {}", h);
            prop_assert_eq!(pages_to_keep(row, ps, len, &cfg).unwrap(), kept.iter().map(|&p| p as u32).collect::<Vec<_>>());
            // Budget reached (the sequence is longer than it), overshooting by less than a page
            // unless min_pages asked for more.
            prop_assert!(total >= budget);
            if kept.len() > min_pages {
                prop_assert!(total - tokens_of(*kept.iter().min_by(|&&a, &&b| key(row[a]).partial_cmp(&key(row[b])).unwrap().then(b.cmp(&a))).unwrap()) < budget);
            }
        }
    }
}

/// The portable kernel (taken for head_dim not a multiple of 8) against f64, on bounds
/// built by hand, including an empty page.
#[test]
fn page_scores_portable_path_and_argument_errors() {
    let mut rng = Rng(7);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (hk, d, g, pool) = (2, 12, 3, 5);
        let mut vals = vec![0f32; pool * hk * 2 * d];
        for p in 0..pool {
            for h in 0..hk {
                let base = (p * hk + h) * 2 * d;
                for c in 0..d {
                    let (a, b) = (rng.uniform() * 2.0, rng.uniform() * 2.0);
                    let (a, b) = if p == 3 { (f32::INFINITY, f32::NEG_INFINITY) } else { (a.min(b), a.max(b)) };
                    vals[base + c] = a;
                    vals[base + d + c] = b;
                }
            }
        }
        let bytes: Vec<u8> = match dt {
            DType::F32 => bytemuck_f32(&vals),
            DType::F16 => vals.iter().flat_map(|&x| kvsieve::f16::from_f32(x).to_bits().to_ne_bytes()).collect(),
            DType::BF16 => vals.iter().flat_map(|&x| kvsieve::bf16::from_f32(x).to_bits().to_ne_bytes()).collect(),
        };
        let stored: Vec<f64> = match dt {
            DType::F32 => vals.iter().map(|&x| x as f64).collect(),
            DType::F16 => vals.iter().map(|&x| kvsieve::f16::from_f32(x).to_f64()).collect(),
            DType::BF16 => vals.iter().map(|&x| kvsieve::bf16::from_f32(x).to_f64()).collect(),
        };
        let bounds = kvsieve::kv::KeyBoundsRef { bytes: &bytes, dtype: dt, num_kv_heads: hk, head_dim: d };
        let q = rng.vec(hk * g * d, 1.5);
        let pages = [4u32, 0, 3, 2];
        let got = page_scores(bounds, &pages, &q, hk * g).unwrap();
        for h in 0..hk {
            for (j, &p) in pages.iter().enumerate() {
                let base = (p as usize * hk + h) * 2 * d;
                let want = if p == 3 {
                    f64::NEG_INFINITY
                } else {
                    (0..g)
                        .map(|r| {
                            (0..d)
                                .map(|c| {
                                    let x = q[(h * g + r) * d + c] as f64;
                                    (x * stored[base + c]).max(x * stored[base + d + c])
                                })
                                .sum::<f64>()
                        })
                        .fold(f64::NEG_INFINITY, f64::max)
                };
                let v = got[h * pages.len() + j] as f64;
                assert!(v == want || (v - want).abs() < 1e-5, "{dt} head {h} page {p}: {v} vs {want}");
            }
        }
        // Argument errors.
        assert!(
            matches!(page_scores(bounds, &pages, &q, 5), Err(Error::InvalidArgument { ref param, .. }) if param == "num_qo_heads")
        );
        assert!(
            matches!(page_scores(bounds, &pages, &q[1..], hk * g), Err(Error::Shape { ref param, .. }) if param == "q")
        );
        assert!(
            matches!(page_scores(bounds, &[0, 5], &q, hk * g), Err(Error::OutOfRange { ref param, value: 5, .. }) if param == "pages[1]")
        );
    }
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

#[test]
fn page_bounds_errors() {
    let mut rng = Rng(3);
    let cfg = PageBoundsConfig::new(8);
    let q = rng.vec(4 * 16, 1.0);
    let qv = TensorView::new(&q, &[4, 16]).unwrap();
    // Pre-RoPE keys: bounds over unrotated keys do not bound the rotated ones.
    let mut pre = KvCache::new(CacheConfig::new(1, 2, 16, 4, 8).with_key_rope(KeyRope::PreRope)).unwrap();
    let s = pre.create_sequence();
    pre.append(s, 20, None).unwrap();
    let e = page_bounds(&pre, s, 0, &qv, &cfg).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref param, .. } if param == "key_rope"), "{e}");
    // No key bounds kept.
    let mut nob = KvCache::new(CacheConfig::new(1, 2, 16, 4, 8).with_key_bounds(false)).unwrap();
    let s = nob.create_sequence();
    nob.append(s, 20, None).unwrap();
    let e = page_bounds(&nob, s, 0, &qv, &cfg).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref param, .. } if param == "track_key_bounds"), "{e}");
    // Budget 0, bad q, bad layer, unknown sequence.
    let st = setup(DType::F16, 2, 16, 4, 30, 30, &mut rng);
    let e = page_bounds(&st.cache, st.seq, 0, &qv, &PageBoundsConfig::new(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref param, .. } if param == "budget_tokens"), "{e}");
    let bad = TensorView::new(&q[..48], &[3, 16]).unwrap();
    assert!(page_bounds(&st.cache, st.seq, 0, &bad, &cfg).is_err());
    let bad = TensorView::new(&q, &[2, 2, 16]).unwrap();
    assert!(
        matches!(page_bounds(&st.cache, st.seq, 0, &bad, &cfg), Err(Error::Shape { ref param, .. }) if param == "q")
    );
    assert!(
        matches!(page_bounds(&st.cache, st.seq, 2, &qv, &cfg), Err(Error::OutOfRange { ref param, .. }) if param == "layer")
    );
    assert!(matches!(page_bounds(&st.cache, 999, 0, &qv, &cfg), Err(Error::UnknownSequence(999))));
    // A budget beyond the context keeps everything; min_pages beyond the pages is capped.
    let all = page_bounds(&st.cache, st.seq, 0, &qv, &PageBoundsConfig::new(10_000)).unwrap();
    assert!(all.is_dense());
    let capped = page_bounds(&st.cache, st.seq, 0, &qv, &PageBoundsConfig::new(1).with_min_pages(100)).unwrap();
    assert!(capped.is_dense());
}

// ---------------------------------------------------------------------------------------
// Policy text form

fn positions_strategy() -> impl Strategy<Value = Option<PositionKind>> {
    prop_oneof![
        Just(None),
        Just(Some(PositionKind::Original)),
        Just(Some(PositionKind::Contiguous)),
        Just(Some(PositionKind::Capped))
    ]
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    let n = || proptest::option::of(0usize..5000);
    let dense = (positions_strategy(), proptest::option::of(0u32..100_000))
        .prop_map(|(positions, max_distance)| Spec { dense: true, positions, max_distance, ..Spec::default() });
    let rank = prop_oneof![Just(None), Just(Some(ClusterRank::Estimate)), Just(Some(ClusterRank::Mixed))];
    let sparse = (
        n(),
        n(),
        n(),
        n(),
        (n(), n(), n(), n(), rank),
        (n(), n()),
        positions_strategy(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(
                sinks,
                window,
                pages,
                min_pages,
                (clusters, clusters_k, cluster_size, hier, rank),
                (topk, span),
                positions,
                max_distance,
            )| Spec {
                dense: false,
                sinks,
                window,
                pages,
                min_pages,
                clusters,
                clusters_k,
                cluster_size,
                hier,
                rank,
                topk,
                span,
                positions,
                max_distance,
            },
        )
        .prop_filter("a spec has at least one item", |s| s.to_string() != "");
    prop_oneof![1 => dense, 3 => sparse]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    let ranges = proptest::collection::vec((0usize..40, 0usize..6), 1..4);
    let layer = (ranges, spec_strategy());
    let heads = (proptest::collection::vec((0usize..40, 0usize..16), 1..5), spec_strategy());
    (spec_strategy(), proptest::collection::vec(layer, 0..4), proptest::collection::vec(heads, 0..4)).prop_map(
        |(default, layers, heads)| {
            let mut p = Policy::new(default);
            for (r, s) in layers {
                p = p.with_layers(r.into_iter().map(|(a, n)| (a, a + n)), s);
            }
            for (h, s) in heads {
                p = p.with_heads(h, s);
            }
            p
        },
    )
}

/// Pad punctuation with random whitespace.
fn respace(text: &str, rng: &mut Rng) -> String {
    let pads = ["", " ", "  ", "\t", "\n "];
    let mut out = String::from(pads[rng.below(pads.len())]);
    for c in text.chars() {
        if ";:,=-.".contains(c) {
            out.push_str(pads[rng.below(pads.len())]);
            out.push(c);
            out.push_str(pads[rng.below(pads.len())]);
        } else {
            out.push(c);
        }
    }
    out.push_str(pads[rng.below(pads.len())]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn policy_text_round_trips(p in policy_strategy(), seed in any::<u64>()) {
        let text = p.to_string();
        let back = Policy::parse(&text).unwrap();
        prop_assert_eq!(&back, &p, "{}", text);
        prop_assert_eq!(back.to_string(), text.clone());
        let spaced = respace(&text, &mut Rng(seed));
        prop_assert_eq!(&spaced.parse::<Policy>().unwrap(), &p, "{:?}", spaced);
    }
}

#[test]
fn policy_example_parses_as_documented() {
    let p = Policy::parse("sinks=4,window=1024,pages=2048;layers=0-1:dense;heads=2.0,2.5:sinks=4,window=256").unwrap();
    assert_eq!(p.to_string(), "sinks=4,window=1024,pages=2048;layers=0-1:dense;heads=2.0,2.5:sinks=4,window=256");
    assert_eq!(*p.spec(5, 3), Spec { sinks: Some(4), window: Some(1024), pages: Some(2048), ..Spec::default() });
    assert_eq!(*p.spec(1, 7), Spec::dense());
    assert_eq!(*p.spec(2, 5), Spec { sinks: Some(4), window: Some(256), ..Spec::default() });
    assert_eq!(*p.spec(2, 1), *p.spec(5, 3));
    assert!(p.is_dense(0) && p.is_dense(1) && !p.is_dense(2));
    p.validate(32, 8).unwrap();
    // Aliases, defaults and overrides.
    let l = Policy::parse(" global = 4 , local = 4096 , max_distance = 4096 ").unwrap();
    assert_eq!(*l.default_spec(), Spec::lambda(4, 4096, 4096));
    assert_eq!(l.position_mode(0), PositionMode::Capped { max_distance: 4096 });
    assert_eq!(l.to_string(), "sinks=4,window=4096,positions=capped,max_distance=4096");
    assert_eq!(Policy::parse("").unwrap(), Policy::dense());
    assert_eq!(Policy::parse("  \n").unwrap(), Policy::dense());
    let o = Policy::parse("layers=0-3:window=8;layers=2:sinks=1,window=2;heads=3.1:dense").unwrap();
    assert_eq!(*o.default_spec(), Spec::dense());
    assert_eq!(o.spec(2, 0).window, Some(2)); // later layer clause wins
    assert_eq!(o.spec(3, 0).window, Some(8));
    assert_eq!(*o.spec(3, 1), Spec::dense()); // head beats layer
    assert_eq!(*o.spec(4, 0), Spec::dense());
    // Head overrides beat layer overrides even when written first.
    let o2 = Policy::parse("heads=3.1:dense;layers=0-3:window=8").unwrap();
    assert_eq!(*o2.spec(3, 1), Spec::dense());
    // The default clause need not come first.
    let o3 = Policy::parse("layers=0:dense;window=64").unwrap();
    assert_eq!(o3.spec(1, 0).window, Some(64));
    assert_eq!(o3.to_string(), "window=64;layers=0:dense");
    // Layer ranges are merged and sorted.
    assert_eq!(Policy::parse("layers=5,3-4,0,1-1:dense").unwrap().to_string(), "dense;layers=0-1,3-5:dense");
    assert_eq!(Policy::parse("heads=2.1,0.3,2.1:dense").unwrap().to_string(), "dense;heads=0.3,2.1:dense");
}

#[test]
fn policy_parse_errors_give_offset_and_expectation() {
    // (text, offset, a part of the message)
    let cases: &[(&str, usize, &str)] = &[
        ("window=x", 7, "expected a number after `window=`, found `x`"),
        ("sinks=4,window=", 15, "expected a number after `window=`, found the end of the text"),
        ("sinks=4;layers=0-1 dense", 19, "expected `,` or `:` after a layer range, found `dense`"),
        ("windo=4", 0, "found unknown key `windo`"),
        ("window 4", 7, "expected `=` after `window`, found `4`"),
        ("positions=capt", 10, "expected `original`, `contiguous` or `capped` after `positions=`, found `capt`"),
        ("layers=3-1:dense", 7, "expected a layer range a-b with a <= b, found 3-1"),
        ("heads=2:dense", 7, "expected `.` and a head number after layer 2"),
        ("heads=2.x:dense", 8, "expected a head number after `.`, found `x`"),
        ("window=4;;dense", 9, "expected a clause (a spec, `layers=` or `heads=`), found `;`"),
        ("window=4;", 9, "expected a clause (a spec, `layers=` or `heads=`), found the end of the text"),
        ("window=4;sinks=2", 9, "the default spec was already given at byte 0"),
        ("window=4,window=8", 9, "`window` sets the window, already set by an earlier `window` at byte 0"),
        ("sinks=4, global=2", 9, "`global` sets the sinks, already set by `sinks` at byte 0"),
        ("dense,window=8", 6, "expected `positions=` or `max_distance=` alongside `dense` (byte 0), found `window=`"),
        (
            "window=8,dense",
            9,
            "expected `dense` alone (with `positions=` and `max_distance=` at most), but `window=` was given at byte 0",
        ),
        ("global=4,positions=original", 9, "`global=` at byte 0 implies capped positions"),
        ("positions=contiguous,local=8", 21, "`positions=contiguous` was given at byte 0"),
        ("max_distance=4294967296", 13, "expected a number from 0 to 4294967295 after `max_distance=`"),
        ("window=99999999999999999999999", 7, "expected a number from 0 to"),
        ("window=4 # comment", 9, "unexpected character `#`"),
        ("window=é", 7, "unexpected character `é`"),
        ("layers=0:", 9, "after `:`, found the end of the text"),
        ("layers=0: ,dense", 10, "after `:`, found `,`"),
        ("window=4:dense", 8, "expected `,`, `;` or the end of the text, found `:`"),
        ("dense=1", 5, "takes no value"),
        ("window=4,layers=0:dense", 9, "`layers=` starts a clause, so separate clauses with `;`"),
        ("layers=:dense", 7, "expected a layer number after `layers=`, found `:`"),
        ("layers=0-:dense", 9, "expected a layer number after `-`, found `:`"),
        ("layers=0,:dense", 9, "expected a layer number after `,`, found `:`"),
        ("layers=0-1-2:dense", 10, "expected `,` or `:` after a layer range, found `-`"),
        ("heads=1.2,3.4 window=2", 14, "expected `,` or `:` after a layer.head pair, found `window`"),
        ("layers 0:dense", 7, "expected `=` after `layers`, found `0`"),
        ("window=4,", 9, "after `,`, found the end of the text"),
        ("4", 0, "at the start of a clause, found `4`"),
    ];
    for &(text, offset, part) in cases {
        match Policy::parse(text) {
            Err(Error::Parse { offset: got, message }) => {
                assert_eq!(got, offset, "offset for {text:?}: {message}");
                assert!(message.contains(part), "message for {text:?}: {message:?} lacks {part:?}");
                assert!(message.starts_with("expected") || message.starts_with("unexpected"), "{message}");
            }
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }
}

#[test]
fn policy_validate_names_the_clause() {
    let check = |text: &str, param: &str, part: &str| {
        let e = Policy::parse(text).unwrap().validate(4, 2).unwrap_err();
        let (p, m) = match &e {
            Error::InvalidArgument { param, expected } => (param.clone(), expected.clone()),
            Error::OutOfRange { param, value, range } => (param.clone(), format!("{value} not in {range}")),
            other => panic!("{text}: unexpected {other:?}"),
        };
        assert_eq!(p, param, "{text}: {e}");
        assert!(m.contains(part), "{text}: {m:?} lacks {part:?}");
    };
    check("window=0", "window=0", "window=N with N >= 1");
    check("dense;layers=1:pages=0", "layers=1:pages=0", "token budget N >= 1");
    check("layers=0-4:dense", "layers=0-4:dense", "4 not in 0..4 (the model's layers)");
    check("heads=1.2:dense", "heads=1.2:dense", "2 not in 0..2 (KV heads of layer 1)");
    check("heads=5.0:dense", "heads=5.0:dense", "5 not in 0..4");
    check("positions=capped,window=8", "window=8,positions=capped", "`max_distance=N` with `positions=capped`");
    check("window=8,max_distance=5", "window=8,max_distance=5", "only caps capped positions");
    check("min_pages=2,window=8", "window=8,min_pages=2", "`min_pages=` only together with `pages=`");
    check("positions=contiguous", "positions=contiguous", "a spec that selects tokens");
    check("sinks=0", "sinks=0", "a spec that selects tokens");
    check(
        "global=4,local=8,max_distance=0",
        "sinks=4,window=8,positions=capped,max_distance=0",
        "max_distance=N with N >= 1",
    );
    check(
        "window=8;heads=1.1:window=8,positions=contiguous",
        "heads=1.1:window=8,positions=contiguous",
        "one position mode for all heads of layer 1",
    );
    // A layer override changing the mode of every head is fine.
    Policy::parse("window=8;layers=1:sinks=4,window=8,positions=contiguous").unwrap().validate(4, 2).unwrap();
    // Programmatic empty spec.
    let e = Policy::new(Spec::default()).validate(4, 2).unwrap_err();
    assert!(e.to_string().contains("a spec that selects tokens"), "{e}");
    let e = Policy::dense()
        .with_layers([(0, 0)], Spec { dense: true, window: Some(3), ..Spec::default() })
        .validate(4, 2)
        .unwrap_err();
    assert!(e.to_string().contains("`dense` alone"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Policy::select

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Per head, the union of the spec's parts, each from the plain method.
    #[test]
    fn policy_select_is_the_union_of_its_parts(ps in 1usize..12, len in 1usize..200, sinks in 0usize..10, window in 1usize..40, budget in 1usize..80, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let (hk, g, d) = (3, 2, 16);
        let s = setup(DType::F16, hk, d, ps, len, len, &mut rng);
        let qv = rng.vec(hk * g * d, 2.0);
        let q = TensorView::new(&qv, &[hk * g, d]).unwrap();
        let text = format!("sinks={sinks},window={window},pages={budget};layers=0:dense;heads=1.2:window={window};heads=1.1:pages={budget},min_pages=2");
        let p = Policy::parse(&text).unwrap();
        p.validate(2, hk).unwrap();
        let dense = p.select(&s.cache, s.seq, 0, &q).unwrap();
        prop_assert!(dense.is_dense());
        let sel = p.select(&s.cache, s.seq, 1, &q).unwrap();
        let win = streaming(hk, len, sinks, window).unwrap();
        let pb = page_bounds(&s.cache, s.seq, 1, &q, &PageBoundsConfig::new(budget)).unwrap();
        let pb2 = page_bounds(&s.cache, s.seq, 1, &q, &PageBoundsConfig::new(budget).with_min_pages(2)).unwrap();
        let h0 = win.union(&pb).unwrap();
        prop_assert_eq!(sel.head(0), h0.head(0));
        prop_assert_eq!(sel.head(1), pb2.head(1));
        let plain_window = streaming(hk, len, 0, window).unwrap();
        prop_assert_eq!(sel.head(2), plain_window.head(2));
    }
}

#[test]
fn policy_select_errors_and_eviction() {
    let mut rng = Rng(11);
    let s = setup(DType::BF16, 2, 16, 4, 50, 50, &mut rng);
    let qv = rng.vec(4 * 16, 1.0);
    let q = TensorView::new(&qv, &[4, 16]).unwrap();
    // Invalid for this cache: layer 5 of 2.
    let e = Policy::parse("layers=5:dense").unwrap().select(&s.cache, s.seq, 0, &q).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { ref param, .. } if param == "layers=5:dense"), "{e}");
    assert!(Policy::dense().select(&s.cache, s.seq, 2, &q).is_err());
    let bad = TensorView::new(&qv[..48], &[3, 16]).unwrap();
    assert!(Policy::parse("window=4").unwrap().select(&s.cache, s.seq, 0, &bad).is_err());
    // Page bounds need post-RoPE keys and key bounds; windows do not.
    let mut pre = KvCache::new(CacheConfig::new(1, 2, 16, 4, 16).with_key_rope(KeyRope::PreRope)).unwrap();
    let id = pre.create_sequence();
    pre.append(id, 30, None).unwrap();
    let e = Policy::parse("window=4,pages=8").unwrap().select(&pre, id, 0, &q).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref param, .. } if param == "key_rope"), "{e}");
    let w = Policy::parse("sinks=2,window=4,positions=contiguous").unwrap().select(&pre, id, 0, &q).unwrap();
    assert_eq!(w.head(1), &[0, 1, 26, 27, 28, 29]);
    // Eviction: only when every head is sinks + window.
    let p = Policy::parse("sinks=4,window=8;heads=1.0:sinks=2,window=20").unwrap();
    assert_eq!(p.window_pages_to_evict(2, 2, 50, 4).unwrap(), window_pages_to_evict(50, 4, 4, 20).unwrap());
    assert!(!p.window_pages_to_evict(2, 2, 50, 4).unwrap().is_empty());
    let p = Policy::parse("sinks=4,window=8;layers=0:dense").unwrap();
    assert!(p.window_pages_to_evict(2, 2, 50, 4).unwrap().is_empty());
    let p = Policy::parse("sinks=4,window=8,pages=16").unwrap();
    assert!(p.window_pages_to_evict(2, 2, 50, 4).unwrap().is_empty());
}

/// Inputs large enough to be split across threads score exactly as small pieces do.
#[test]
fn page_scores_threaded_path_matches_small_pieces() {
    let mut rng = Rng(5);
    let (hk, g, d, ps, len) = (2, 4, 128, 1, 1100);
    let s = setup(DType::F16, hk, d, ps, len, len - 3, &mut rng);
    let hq = hk * g;
    let q = rng.vec(hq * d, 1.0);
    let pages = s.cache.seq_pages(s.seq).unwrap();
    assert!(pages.len() * hq * d >= 1 << 20);
    let bounds = s.cache.key_bounds(0).unwrap();
    let all = page_scores(bounds, &pages, &q, hq).unwrap();
    let np = pages.len();
    for (c, chunk) in pages.chunks(97).enumerate() {
        let part = page_scores(bounds, chunk, &q, hq).unwrap();
        for h in 0..hk {
            for j in 0..chunk.len() {
                assert_eq!(part[h * chunk.len() + j].to_bits(), all[h * np + c * 97 + j].to_bits());
            }
        }
    }
    assert_eq!(all[np - 1], f32::NEG_INFINITY);
    assert!(all[np - 4].is_finite());
}
