//! Spans, position-free top-k and contiguous positions over [sinks | spans | window]:
//! span expansion against a plain re-statement of its rule, `topk=`/`span=` selections
//! against brute-force ranking, and decode and chunked prefill under such policies against
//! the f64 reference over exactly the tokens the rule names, on fresh random inputs.

mod common;
use common::Rng;
use kvsieve::attention::{reference, AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::select::{expand_spans, span_range, Policy, Spec};
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
        let span_text = span.map_or(String::new(), |s| format!(",span={s}"));
        let policy = Policy::parse(&format!("sinks={sinks},window={window},topk={budget}{span_text},positions=contiguous")).unwrap();
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
    /// chunk's mean query (in spans), numbered contiguously over that list.
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
        // Head 1 is dense: it reads everything, numbered as its index.
        let policy = Policy::parse(&format!("sinks={sinks},window={window}{retrieval},positions=contiguous;heads=0.1:dense,positions=contiguous")).unwrap();
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
            // The chunk's list for head 0; head 1 reads all.
            let reach = (window + m - 1).max(m);
            let base = first_and_last(e, sinks, reach);
            let list0 = match topk {
                None => base.clone(),
                Some((b, sp)) => {
                    let mut mean = vec![0f32; d];
                    for i in 0..m {
                        for r in 0..g {
                            for c in 0..d {
                                mean[c] += qs[(i * hq + r) * d + c];
                            }
                        }
                    }
                    mean.iter_mut().for_each(|x| *x /= (m * g) as f32);
                    union(&base, &topk_reference(&keys(&cache, id, 0), &[mean], &base, b, sp))
                }
            };
            let table = cache.page_table(&[id]).unwrap();
            let kv = cache.layer_view(0, &table).unwrap();
            let keep = |_: usize, h: usize, t: usize| h == 1 || list0.binary_search(&(t as u32)).is_ok();
            let r = reference::prefill_selected(&kv, &qv, &[0, m as i32], &rparams, &keep, &|_, _, qt, t| t <= qt).unwrap();
            let (eo, el) = common::max_err(&out, &lse, &r);
            prop_assert!(eo < 5e-5 && el < 5e-5, "chunk {}..{}: out err {}, lse err {}", s, e, eo, el);
        }
    }
}
