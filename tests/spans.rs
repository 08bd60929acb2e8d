//! Spans, position-free top-k and contiguous positions over [sinks | spans | window]:
//! span expansion against a plain re-statement of its rule, `topk=`/`span=` selections
//! against brute-force ranking, and decode and chunked prefill under such policies against
//! the f64 reference over exactly the tokens the rule names, on fresh random inputs.

mod common;
use common::Rng;
use kvsieve::attention::{reference, AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::runtime::ClusterIndexSet;
use kvsieve::select::{expand_spans, page_scores, span_range, ClusterRank, Policy, Spec};
use kvsieve::{CacheConfig, DType, KeyRope, KvCache, SeqId, TensorView, TensorViewMut};
use proptest::prelude::*;

/// The span rule stated plainly: per hit, its span's tokens not taken yet and not read
/// anyway, ordered by distance to the hit (then by index), appended while under budget.
fn spans_reference(hits: &[u32], span: usize, budget: usize, len: usize, anyway: &[u32]) -> Vec<u32> {
    let mut taken: Vec<u32> = Vec::new();
    for &t in hits {
        if (t as usize) >= len {
            continue;
        }
        let lo = t as i64 - ((span as i64 - 1) / 2);
        let hi = t as i64 + span as i64 / 2;
        let mut cand: Vec<u32> = (lo.max(0)..=hi.min(len as i64 - 1))
            .map(|c| c as u32)
            .filter(|c| !taken.contains(c) && !anyway.contains(c))
            .collect();
        cand.sort_by_key(|&c| ((c as i64 - t as i64).abs(), c));
        for c in cand {
            if taken.len() < budget {
                taken.push(c);
            }
        }
    }
    taken.sort_unstable();
    taken
}

/// Keys of head `h` of `seq` at layer 0 as f32 rows.
fn keys(cache: &KvCache, seq: SeqId, h: usize) -> Vec<Vec<f32>> {
    let table = cache.page_table(&[seq]).unwrap();
    let kv = cache.layer_view(0, &table).unwrap();
    (0..kv.seq_len(0)).map(|t| kv.key(0, t, h)).collect()
}

/// Brute-force `topk=budget,span=span` for one head: score every token outside `base` by
/// the best `q_r·k` over `rows`, rank (score desc, index asc), grow into spans.
fn topk_reference(keys: &[Vec<f32>], rows: &[Vec<f32>], base: &[u32], budget: usize, span: Option<usize>) -> Vec<u32> {
    let mut cand: Vec<(f32, u32)> = (0..keys.len() as u32)
        .filter(|t| !base.contains(t))
        .map(|t| {
            let s = rows
                .iter()
                .map(|q| q.iter().zip(&keys[t as usize]).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max);
            (s, t)
        })
        .collect();
    cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let hits: Vec<u32> = cand.iter().take(budget).map(|c| c.1).collect();
    match span {
        Some(s) => spans_reference(&hits, s, budget, keys.len(), base),
        None => {
            let mut h = hits;
            h.sort_unstable();
            h
        }
    }
}

fn first_and_last(len: usize, sinks: usize, window: usize) -> Vec<u32> {
    (0..len as u32).filter(|&t| (t as usize) < sinks || len - (t as usize) <= window).collect()
}

fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = a.iter().chain(b).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// `sinks=..,window=..,topk=..[,span=..],positions=contiguous`.
fn topk_policy(sinks: usize, window: usize, budget: usize, span: Option<usize>) -> Policy {
    let span_text = span.map_or(String::new(), |s| format!(",span={s}"));
    Policy::parse(&format!("sinks={sinks},window={window},topk={budget}{span_text},positions=contiguous")).unwrap()
}

fn pre_rope_cache(len: usize, hk: usize, d: usize, ps: usize, rng: &mut Rng) -> (KvCache, SeqId) {
    let cfg = CacheConfig::new(1, hk, d, ps, len.div_ceil(ps) + 2)
        .with_dtype(DType::F32)
        .with_key_rope(KeyRope::PreRope)
        .with_key_bounds(false);
    let mut cache = KvCache::new(cfg).unwrap();
    let id = common::fill_sequence(&mut cache, len, rng, 2.0);
    (cache, id)
}

#[test]
fn span_text_round_trips_and_validates() {
    let p = Policy::parse("sinks=24,window=128,topk=512,span=33,positions=contiguous").unwrap();
    assert_eq!(
        *p.spec(0, 0),
        Spec::default()
            .with_sinks(24)
            .with_window(128)
            .with_topk(512)
            .with_span(33)
            .with_position_mode(PositionMode::Contiguous)
    );
    assert_eq!(p.to_string(), "sinks=24,window=128,topk=512,span=33,positions=contiguous");
    assert_eq!(Policy::parse(&p.to_string()).unwrap(), p);
    p.validate(2, 2).unwrap();
    Policy::parse("sinks=4,window=64,pages=256,span=32").unwrap().validate(1, 1).unwrap();
    Policy::parse("sinks=4,window=64,clusters=256,span=32").unwrap().validate(1, 1).unwrap();
    let bad = |t: &str, want: &str| {
        let e = Policy::parse(t).unwrap().validate(1, 1).unwrap_err().to_string();
        assert!(e.contains(want), "{t}: {e}");
    };
    bad("window=8,span=4", "`span=` only together with a retrieval item");
    bad("topk=0", "topk=N with a token budget N >= 1");
    bad("topk=8,span=0", "span=N with N >= 1");
    let e = Policy::parse("topk=x").unwrap_err().to_string();
    assert!(e.contains("expected a number after `topk=`"), "{e}");
    let e = Policy::parse("dense,topk=4").unwrap_err().to_string();
    assert!(e.contains("expected `positions=` or `max_distance=` alongside `dense`"), "{e}");
    let e = Policy::parse("span=4,span=8").unwrap_err().to_string();
    assert!(e.contains("already set by an earlier `span`"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn expand_spans_follows_its_rule(
        len in 1usize..120,
        hits in proptest::collection::vec(0u32..130, 0..12),
        span in 1usize..20,
        budget in 0usize..80,
        anyway in proptest::collection::btree_set(0u32..120, 0..20),
    ) {
        let anyway: Vec<u32> = anyway.into_iter().collect();
        let got = expand_spans(&hits, span, budget, len, &anyway).unwrap();
        prop_assert_eq!(&got, &spans_reference(&hits, span, budget, len, &anyway));
        prop_assert!(got.len() <= budget);
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]));
        for &t in &got {
            prop_assert!(!anyway.contains(&t));
            prop_assert!(hits.iter().any(|&h| (h as usize) < len && span_range(h, span, len).contains(&t)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Decode under `topk=` (with or without `span=`) and contiguous positions selects what
    /// brute-force ranking selects, and attends as the reference over exactly those tokens,
    /// numbered contiguously.
    #[test]
    fn topk_span_decode_matches_reference(
        len in 2usize..300,
        sinks in 0usize..6,
        window in 1usize..24,
        budget in 1usize..60,
        span in proptest::option::of(1usize..12),
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps) = (2, 2, 16, 8);
        let hq = hk * g;
        let mut rng = Rng(seed);
        let (cache, id) = pre_rope_cache(len, hk, d, ps, &mut rng);
        let policy = topk_policy(sinks, window, budget, span);
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
        let sel = policy.select(&cache, id, 0, &qv).unwrap();
        let base = first_and_last(len, sinks, window);
        let mut want = Vec::new();
        for h in 0..hk {
            let rows: Vec<Vec<f32>> = (0..g).map(|r| q[(h * g + r) * d..(h * g + r + 1) * d].to_vec()).collect();
            let w = union(&base, &topk_reference(&keys(&cache, id, h), &rows, &base, budget, span));
            prop_assert_eq!(sel.head(h), &w[..], "head {}", h);
            want.push(w);
        }
        let rope = RopeConfig::new(500.0, RopeStyle::AdjacentPairs);
        let params = AttentionParams { rope: Some(rope), ..Default::default() };
        let mut out = vec![f32::NAN; hq * d];
        let mut lse = vec![f32::NAN; hq];
        cache.decode_with_policy(0, &[id], &qv, &policy, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), Some(&mut lse), &params).unwrap();
        let table = cache.page_table(&[id]).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let rparams = AttentionParams { positions: PositionMode::Contiguous, ..params };
        let r = reference::decode_selected(&kv, &qv, &rparams, &|_, h, t| want[h].binary_search(&(t as u32)).is_ok()).unwrap();
        let (eo, el) = common::max_err(&out, &lse, &r);
        prop_assert!(eo < 5e-5 && el < 5e-5, "out err {}, lse err {}", eo, el);
    }

    /// Chunked prefill under contiguous positions: each chunk reads the sinks, the
    /// `window - 1` tokens before it, itself (causally) and the `topk=` tokens of the
    /// chunk's queries (per query head the mean over the chunk, the best of the group), in
    /// spans, numbered contiguously over that list.
    #[test]
    fn contiguous_chunked_prefill_matches_reference(
        len in 8usize..160,
        chunk in 1usize..40,
        sinks in 0usize..5,
        window in 1usize..24,
        topk in proptest::option::of((1usize..30, proptest::option::of(1usize..9))),
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps) = (2, 2, 16, 8);
        let hq = hk * g;
        let mut rng = Rng(seed);
        let cfg = CacheConfig::new(1, hk, d, ps, len.div_ceil(ps) + 1).with_dtype(DType::F32).with_key_rope(KeyRope::PreRope).with_key_bounds(false);
        let mut cache = KvCache::new(cfg).unwrap();
        let id = cache.create_sequence();
        let retrieval = match topk {
            Some((b, Some(s))) => format!(",topk={b},span={s}"),
            Some((b, None)) => format!(",topk={b}"),
            None => String::new(),
        };
        let policy = Policy::parse(&format!("sinks={sinks},window={window}{retrieval},positions=contiguous")).unwrap();
        let rope = RopeConfig::new(500.0, RopeStyle::AdjacentPairs);
        let params = AttentionParams { rope: Some(rope), ..Default::default() };
        let rparams = AttentionParams { positions: PositionMode::Contiguous, ..params };
        let k = rng.vec(len * hk * d, 2.0);
        let v = rng.vec(len * hk * d, 1.0);
        let q = rng.vec(len * hq * d, 1.0);
        for s in (0..len).step_by(chunk) {
            let e = (s + chunk).min(len);
            let m = e - s;
            cache.append(id, m, None).unwrap();
            let shape = [m, hk, d];
            cache.write(id, 0, s, &TensorView::new(&k[s * hk * d..e * hk * d], &shape).unwrap(), &TensorView::new(&v[s * hk * d..e * hk * d], &shape).unwrap()).unwrap();
            let qs = &q[s * hq * d..e * hq * d];
            let qv = TensorView::new(qs, &[m, hq, d]).unwrap();
            let mut out = vec![f32::NAN; m * hq * d];
            let mut lse = vec![f32::NAN; m * hq];
            cache.prefill_with_policy(0, &[id], &qv, &[0, m as i32], &policy, &mut TensorViewMut::new(&mut out, &[m, hq, d]).unwrap(), Some(&mut lse), &params).unwrap();
            let base = first_and_last(e, sinks, window + m - 1);
            let lists: Vec<Vec<u32>> = (0..hk)
                .map(|h| match topk {
                    None => base.clone(),
                    Some((b, sp)) => {
                        let means: Vec<Vec<f32>> = (0..g)
                            .map(|r| {
                                (0..d).map(|c| (0..m).map(|i| qs[(i * hq + h * g + r) * d + c]).sum::<f32>() / m as f32).collect()
                            })
                            .collect();
                        union(&base, &topk_reference(&keys(&cache, id, h), &means, &base, b, sp))
                    }
                })
                .collect();
            let table = cache.page_table(&[id]).unwrap();
            let kv = cache.layer_view(0, &table).unwrap();
            let keep = |_: usize, h: usize, t: usize| lists[h].binary_search(&(t as u32)).is_ok();
            let r = reference::prefill_selected(&kv, &qv, &[0, m as i32], &rparams, &keep, &|_, _, qt, t| t <= qt).unwrap();
            let (eo, el) = common::max_err(&out, &lse, &r);
            prop_assert!(eo < 5e-5 && el < 5e-5, "chunk {}..{}: out err {}, lse err {}", s, e, eo, el);
        }
    }

    /// A one-token prefill chunk reads exactly what decode reads (GQA groups of 2).
    #[test]
    fn one_token_prefill_equals_decode(
        len in 2usize..200,
        sinks in 0usize..6,
        window in 1usize..20,
        budget in 1usize..40,
        span in proptest::option::of(1usize..10),
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps) = (2, 2, 16, 8);
        let hq = hk * g;
        let mut rng = Rng(seed);
        let (cache, id) = pre_rope_cache(len, hk, d, ps, &mut rng);
        let policy = topk_policy(sinks, window, budget, span);
        let q = rng.vec(hq * d, 1.0);
        let params = AttentionParams { rope: Some(RopeConfig::new(500.0, RopeStyle::AdjacentPairs)), ..Default::default() };
        let (mut o1, mut l1) = (vec![f32::NAN; hq * d], vec![f32::NAN; hq]);
        let (mut o2, mut l2) = (vec![f32::NAN; hq * d], vec![f32::NAN; hq]);
        let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
        cache.decode_with_policy(0, &[id], &qv, &policy, &mut TensorViewMut::new(&mut o1, &[1, hq, d]).unwrap(), Some(&mut l1), &params).unwrap();
        cache.prefill_with_policy(0, &[id], &qv, &[0, 1], &policy, &mut TensorViewMut::new(&mut o2, &[1, hq, d]).unwrap(), Some(&mut l2), &params).unwrap();
        for (a, b) in o1.iter().zip(&o2).chain(l1.iter().zip(&l2)) {
            prop_assert!((a - b).abs() < 1e-5, "decode {} vs prefill {}", a, b);
        }
    }

    /// `pages=` with `span=`: pages ranked by their bounds, their tokens as hits in that
    /// order, grown into spans outside the sinks and window, to the page budget.
    #[test]
    fn page_spans_follow_the_page_ranking(
        len in 40usize..300,
        budget in 1usize..80,
        span in 1usize..12,
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps, sinks, window) = (2, 2, 16, 8, 2, 6);
        let hq = hk * g;
        let mut rng = Rng(seed);
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, len.div_ceil(ps) + 2).with_dtype(DType::F32)).unwrap();
        let id = common::fill_sequence(&mut cache, len, &mut rng, 2.0);
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let policy = Policy::parse(&format!("sinks={sinks},window={window},pages={budget},span={span}")).unwrap();
        let sel = policy.select(&cache, id, 0, &qv).unwrap();
        let pages = cache.seq_pages(id).unwrap();
        let scores = page_scores(cache.key_bounds(0).unwrap(), &pages, &q, hq).unwrap();
        let base = first_and_last(len, sinks, window);
        for h in 0..hk {
            let want = if len <= budget {
                (0..len as u32).collect::<Vec<u32>>()
            } else {
                let sc = &scores[h * pages.len()..(h + 1) * pages.len()];
                let mut order: Vec<usize> = (0..pages.len()).collect();
                order.sort_by(|&a, &b| sc[b].partial_cmp(&sc[a]).unwrap().then(a.cmp(&b)));
                let hits: Vec<u32> = order.iter().flat_map(|&p| (p * ps..((p + 1) * ps).min(len)).map(|t| t as u32)).collect();
                union(&base, &spans_reference(&hits, span, budget, len, &base))
            };
            prop_assert_eq!(sel.head(h), &want[..], "head {}", h);
        }
    }

    /// `clusters=` with `span=` under contiguous positions (an index of raw pre-RoPE keys,
    /// scored with the raw query): the retrieved tokens (those of the same policy without
    /// `span=`) ranked by raw q·k, grown into spans outside the sinks, window and
    /// uncovered tail, to the budget; the tail kept.
    #[test]
    fn cluster_spans_rank_the_retrieved_tokens(
        len in 60usize..300,
        budget in 4usize..60,
        span in 1usize..10,
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps, sinks, window) = (2, 2, 16, 8, 2, 8);
        let hq = hk * g;
        let mut rng = Rng(seed);
        let (mut cache, id) = pre_rope_cache(len, hk, d, ps, &mut rng);
        let plain = format!("sinks={sinks},window={window},clusters={budget},cluster_size=4,positions=contiguous");
        let with_span = Policy::parse(&format!("{plain},span={span}")).unwrap();
        let plain = Policy::parse(&plain).unwrap();
        let mut set = ClusterIndexSet::new();
        set.build(&cache, id, &with_span).unwrap();
        // Two tokens appended after the build stay uncovered.
        cache.append(id, 2, None).unwrap();
        let shape = [2, hk, d];
        cache.write(id, 0, len, &TensorView::new(&rng.vec(2 * hk * d, 2.0), &shape).unwrap(), &TensorView::new(&rng.vec(2 * hk * d, 1.0), &shape).unwrap()).unwrap();
        let n = len + 2;
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let got = with_span.select_with_clusters(&cache, id, 0, &qv, &set).unwrap().selection;
        let index = set.get(id, 0).unwrap();
        let retrieved = index.retrieve(&qv, &ClusterRank::Estimate.retrieve(budget), n).unwrap().selection;
        // The policy without span= reads exactly base ∪ retrieved ∪ tail.
        let covered = index.clustered_len() as u32;
        let base = first_and_last(n, sinks, window);
        let tail: Vec<u32> = (covered..n as u32).collect();
        let no_span = plain.select_with_clusters(&cache, id, 0, &qv, &set).unwrap().selection;
        for h in 0..hk {
            prop_assert_eq!(no_span.head(h), &union(&union(&base, retrieved.head(h)), &tail)[..]);
            let cand: Vec<u32> = retrieved.head(h).to_vec();
            let ks = keys(&cache, id, h);
            let rows: Vec<&[f32]> = (0..g).map(|r| &q[(h * g + r) * d..(h * g + r + 1) * d]).collect();
            let mut ranked: Vec<(f32, u32)> = cand
                .iter()
                .map(|&t| (rows.iter().map(|r| r.iter().zip(&ks[t as usize]).map(|(a, b)| a * b).sum::<f32>()).fold(f32::NEG_INFINITY, f32::max), t))
                .collect();
            ranked.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let hits: Vec<u32> = ranked.iter().map(|x| x.1).collect();
            let anyway = union(&base, &tail);
            let want = union(&anyway, &spans_reference(&hits, span, budget, n, &anyway));
            prop_assert_eq!(got.head(h), &want[..], "head {}", h);
        }
    }
}
