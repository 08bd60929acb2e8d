//! Centroid retrieval inside a policy (`clusters=`): the text form (round trip, parse and
//! validation errors with offsets), the per-(sequence, layer) index set (build, update,
//! staleness), and sparse decode under a clusters policy against the f64 reference over
//! exactly the retrieved ∪ sinks ∪ window ∪ not-yet-indexed tokens, on fresh random inputs.

mod common;
use common::Rng;
use kvsieve::attention::{apply_rope, reference, AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::runtime::{ClusterIndexSet, IndexedKeys};
use kvsieve::select::cluster::{CoarseRetrieve, Retrieve};
use kvsieve::select::{streaming, Policy, Spec, HIER_OPEN_MULTIPLE};
use kvsieve::{CacheConfig, DType, Error, KeyRope, KvCache, SeqId, TensorView, TensorViewMut};
use proptest::prelude::*;

#[test]
fn clusters_text_round_trips_and_reads_as_documented() {
    let p = Policy::parse("sinks=4,window=64,clusters=512,cluster_size=16;layers=0-1:dense").unwrap();
    assert_eq!(*p.spec(3, 0), Spec::default().with_sinks(4).with_window(64).with_clusters(512).with_cluster_size(16));
    assert_eq!(p.to_string(), "sinks=4,window=64,clusters=512,cluster_size=16;layers=0-1:dense");
    let h = Policy::parse(" hier = 8 , clusters_k = 100 , clusters = 256 , window = 32 ").unwrap();
    assert_eq!(h.to_string(), "window=32,clusters=256,clusters_k=100,hier=8");
    assert_eq!(Policy::parse(&h.to_string()).unwrap(), h);
    assert!(h.uses_clusters(0, 2) && !Policy::parse("window=8").unwrap().uses_clusters(0, 2));
    h.validate(2, 2).unwrap();
    // Capped positions with retrieval.
    let l = Policy::parse("global=4,local=256,max_distance=256,clusters=1024").unwrap();
    assert_eq!(l.to_string(), "sinks=4,window=256,clusters=1024,positions=capped,max_distance=256");
    assert_eq!(l.position_mode(0), PositionMode::Capped { max_distance: 256 });
}

#[test]
fn clusters_parse_errors_give_offset_and_expectation() {
    let cases: &[(&str, usize, &str)] = &[
        ("clusters=x", 9, "expected a number after `clusters=`, found `x`"),
        ("window=8,clusters=", 18, "expected a number after `clusters=`, found the end of the text"),
        (
            "clusters=8,clusters=4",
            11,
            "`clusters` sets the retrieval budget, already set by an earlier `clusters` at byte 0",
        ),
        (
            "clusters=8,hier=2,hier=3",
            18,
            "`hier` sets the coarse cluster count, already set by an earlier `hier` at byte 11",
        ),
        ("clusters=8,cluster_size 4", 24, "expected `=` after `cluster_size`, found `4`"),
        ("clusters_k=-1", 11, "expected a number after `clusters_k=`, found `-`"),
        (
            "dense,clusters=8",
            6,
            "expected `positions=` or `max_distance=` alongside `dense` (byte 0), found `clusters=`",
        ),
        (
            "hier=4,dense",
            7,
            "expected `dense` alone (with `positions=` and `max_distance=` at most), but `hier=` was given at byte 0",
        ),
        ("cluster=8", 0, "found unknown key `cluster`"),
        ("clusters=99999999999999999999999", 9, "expected a number from 0 to"),
    ];
    for &(text, offset, part) in cases {
        match Policy::parse(text) {
            Err(Error::Parse { offset: got, message }) => {
                assert_eq!(got, offset, "offset for {text:?}: {message}");
                assert!(message.contains(part), "message for {text:?}: {message:?} lacks {part:?}");
            }
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }
    // The list of items names the new keys.
    let Err(Error::Parse { message, .. }) = Policy::parse("4") else { panic!() };
    assert!(message.contains("`clusters=`") && message.contains("`hier=`"), "{message}");
}

#[test]
fn clusters_validate_names_the_clause() {
    let check = |text: &str, param: &str, part: &str| {
        let e = Policy::parse(text).unwrap().validate(4, 2).unwrap_err();
        let Error::InvalidArgument { param: p, expected } = &e else { panic!("{text}: {e:?}") };
        assert_eq!(p, param, "{text}: {e}");
        assert!(expected.contains(part), "{text}: {expected:?} lacks {part:?}");
    };
    check("clusters=0", "clusters=0", "clusters=N with a token budget N >= 1");
    check("window=8,clusters_k=4", "window=8,clusters_k=4", "`clusters_k=` only together with `clusters=`");
    check("window=8,hier=4", "window=8,hier=4", "`hier=` only together with `clusters=`");
    check("clusters=8,clusters_k=4,cluster_size=2", "clusters=8,clusters_k=4,cluster_size=2", "not both");
    check("clusters=8,cluster_size=0", "clusters=8,cluster_size=0", "cluster_size=N with N >= 1");
    check("clusters=8,hier=0", "clusters=8,hier=0", "hier=N with N >= 1");
    check(
        "clusters=8;heads=1.1:clusters=16",
        "heads=1.1:clusters=16",
        "for every head of layer 1 that uses centroid retrieval",
    );
    check(
        "clusters=8;heads=2.0:clusters=8,hier=2",
        "clusters=8",
        "head 1 differs from head 0, which gets them from `heads=2.0:clusters=8,hier=2`",
    );
    // Heads without retrieval may sit beside heads with it; windows may differ.
    Policy::parse("sinks=4,window=8,clusters=8;heads=1.1:window=16;heads=2.0:window=4,clusters=8")
        .unwrap()
        .validate(4, 2)
        .unwrap();
    // Eviction never drops what retrieval may read.
    assert!(Policy::parse("sinks=4,window=8,clusters=16")
        .unwrap()
        .window_pages_to_evict(4, 2, 200, 4)
        .unwrap()
        .is_empty());
}

/// A cache (post-RoPE keys) and, with `pre`, a twin storing the same keys before RoPE, both
/// holding one sequence of `len` random tokens in every layer.
struct Twin {
    post: KvCache,
    pre: Option<KvCache>,
    seq: SeqId,
}

#[allow(clippy::too_many_arguments)]
fn twin(
    layers: usize,
    hk: usize,
    d: usize,
    ps: usize,
    len: usize,
    cap: usize,
    dtype: DType,
    pre: bool,
    rope: &RopeConfig,
    rng: &mut Rng,
) -> Twin {
    let cfg = CacheConfig::new(layers, hk, d, ps, cap.div_ceil(ps) + 1).with_dtype(dtype);
    let mut post = KvCache::new(cfg).unwrap();
    let mut pre = pre.then(|| KvCache::new(cfg.with_key_rope(KeyRope::PreRope).with_key_bounds(false)).unwrap());
    let seq = post.create_sequence();
    if let Some(p) = pre.as_mut() {
        assert_eq!(p.create_sequence(), seq);
    }
    let mut t = Twin { post, pre, seq };
    append(&mut t, len, rope, rng);
    t
}

fn append(t: &mut Twin, n: usize, rope: &RopeConfig, rng: &mut Rng) {
    let c = *t.post.config();
    let start = t.post.seq_len(t.seq).unwrap();
    t.post.append(t.seq, n, None).unwrap();
    if let Some(p) = t.pre.as_mut() {
        p.append(t.seq, n, None).unwrap();
    }
    let positions: Vec<i32> = (start as i32..(start + n) as i32).collect();
    let shape = [n, c.num_kv_heads, c.head_dim];
    for layer in 0..c.num_layers {
        let mut k = rng.vec(n * c.num_kv_heads * c.head_dim, 2.0);
        let v = rng.vec(k.len(), 1.0);
        if let Some(p) = t.pre.as_mut() {
            p.write(t.seq, layer, start, &TensorView::new(&k, &shape).unwrap(), &TensorView::new(&v, &shape).unwrap())
                .unwrap();
        }
        apply_rope(&mut TensorViewMut::new(&mut k, &shape).unwrap(), &positions, rope).unwrap();
        t.post
            .write(t.seq, layer, start, &TensorView::new(&k, &shape).unwrap(), &TensorView::new(&v, &shape).unwrap())
            .unwrap();
    }
}

fn union(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = a.iter().chain(b).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Per head: the index's own retrieval ∪ sinks ∪ window ∪ tokens the index does not
    /// cover; decode output equals the f64 reference over exactly those tokens (post-RoPE
    /// cache, or a pre-RoPE twin with capped distances and the index of the post-RoPE keys).
    #[test]
    fn decode_under_clusters_equals_reference_over_retrieved_sinks_window(
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        group in prop_oneof![Just(1usize), Just(3)],
        ps in 1usize..20,
        len in 2usize..260,
        grow in 0usize..40,
        update in any::<bool>(),
        sinks in 0usize..6,
        window in 1usize..48,
        budget in 1usize..120,
        size in 1usize..20,
        hier in proptest::option::of(1usize..8),
        mode in 0usize..3,
        seed in any::<u64>(),
    ) {
        // 0: post-RoPE cache; 1: pre-RoPE cache, capped positions, index of the twin's
        // post-RoPE keys; 2: pre-RoPE cache, capped positions, index of its raw keys.
        let pre = mode > 0;
        let (layers, hk, d) = (2, 2, 16);
        let hq = hk * group;
        let rope = RopeConfig::new(1000.0, RopeStyle::AdjacentPairs);
        let mut rng = Rng(seed);
        let mut t = twin(layers, hk, d, ps, len, len + grow, dtype, pre, &rope, &mut rng);
        let cap = (window as u32).max(1);
        let positions = if pre { format!(",positions=capped,max_distance={cap}") } else { String::new() };
        let hier_text = hier.map_or(String::new(), |c| format!(",hier={c}"));
        let text = format!("sinks={sinks},window={window},clusters={budget},cluster_size={size}{hier_text}{positions};layers=0:dense{positions}");
        let policy = Policy::parse(&text).unwrap();
        let mut set = ClusterIndexSet::with_seed(seed);
        let source = if mode == 2 { t.pre.as_ref().unwrap() } else { &t.post };
        prop_assert_eq!(set.build(source, t.seq, &policy).unwrap(), 1);
        let frame = if mode == 2 { IndexedKeys::PreRope } else { IndexedKeys::PostRope };
        prop_assert_eq!(set.indexed_keys(t.seq, 1), Some(frame));
        prop_assert!(set.get(t.seq, 0).is_none() && set.get(t.seq, 1).is_some());
        if grow > 0 {
            append(&mut t, grow, &rope, &mut rng);
            if update {
                let source = if mode == 2 { t.pre.as_ref().unwrap() } else { &t.post };
                set.update(source, t.seq).unwrap();
            }
        }
        let n = len + grow;
        let index = set.get(t.seq, 1).unwrap();
        prop_assert!(index.clustered_len() <= n);
        // The index leaves out the window (at least one token clustered); an update assigns
        // what has left it since.
        let excluded = window.min(len - 1);
        let covered = if update { n } else { len };
        prop_assert_eq!(index.clustered_len(), covered - excluded);
        // The query after RoPE at position n - 1 (what a post-RoPE cache gets and an index of
        // post-RoPE keys scores), or at the cap (what an index of raw keys scores); a
        // pre-RoPE cache gets it before RoPE.
        let raw = rng.vec(hq * d, 1.0);
        let mut rotated = raw.clone();
        apply_rope(&mut TensorViewMut::new(&mut rotated, &[1, hq, d]).unwrap(), &[n as i32 - 1], &rope).unwrap();
        let mut at_cap = raw.clone();
        apply_rope(&mut TensorViewMut::new(&mut at_cap, &[1, hq, d]).unwrap(), &[cap as i32], &rope).unwrap();
        let scored = if mode == 2 { &at_cap } else { &rotated };
        let qr = TensorView::new(scored, &[hq, d]).unwrap();
        let how = Retrieve::Budget(budget);
        let r = match hier {
            Some(_) => index.retrieve_hierarchical(&qr, CoarseRetrieve::BudgetMultiple(HIER_OPEN_MULTIPLE), &how, n).unwrap(),
            None => index.retrieve(&qr, &how, n).unwrap(),
        };
        let win = streaming(hk, n, sinks, window).unwrap();
        let tail: Vec<u32> = (index.clustered_len() as u32..n as u32).collect();
        let want: Vec<Vec<u32>> = (0..hk).map(|h| union(&union(r.selection.head(h), win.head(h)), &tail)).collect();
        let (cache, qdata, params) = match &t.pre {
            Some(p) => (p, &raw, AttentionParams { rope: Some(rope), ..Default::default() }),
            None => (&t.post, &rotated, AttentionParams::default()),
        };
        let qv = TensorView::new(qdata, &[1, hq, d]).unwrap();
        let mut out = vec![f32::NAN; hq * d];
        let mut lse = vec![f32::NAN; hq];
        let got = cache.decode_with_clusters(1, &[t.seq], &qv, &policy, &set, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), Some(&mut lse), &params).unwrap();
        for (h, w) in want.iter().enumerate() {
            prop_assert_eq!(got[0].selection.head(h), &w[..], "head {}", h);
        }
        let coarse = if hier.is_some() { index.num_coarse_clusters() } else { 0 };
        let scored: usize = r.stats.clusters_scored.iter().map(|c| c + coarse).sum();
        prop_assert_eq!(got[0].centroids_scored, scored);
        let table = cache.page_table(&[t.seq]).unwrap();
        let kv = cache.layer_view(1, &table).unwrap();
        let rparams = AttentionParams { positions: policy.position_mode(1), ..params };
        let refs = reference::decode_selected(&kv, &qv, &rparams, &|_, h, tok| want[h].binary_search(&(tok as u32)).is_ok()).unwrap();
        let (eo, el) = common::max_err(&out, &lse, &refs);
        let tol = if dtype == DType::F32 { 5e-5 } else { 2e-3 };
        prop_assert!(eo < tol && el < tol, "out err {eo}, lse err {el}");
        // The dense layer ignores the set; decode_with_policy refuses the clusters layer.
        cache.decode_with_clusters(0, &[t.seq], &qv, &policy, &set, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), None, &params).unwrap();
        let mut poisoned = vec![f32::NAN; hq * d];
        let e = cache.decode_with_policy(1, &[t.seq], &qv, &policy, &mut TensorViewMut::new(&mut poisoned, &[1, hq, d]).unwrap(), None, &params).unwrap_err();
        prop_assert!(e.to_string().contains("build a ClusterIndexSet"), "{}", e);
        prop_assert!(poisoned.iter().all(|v| v.is_nan()));
    }
}

#[test]
fn index_set_errors_and_staleness() {
    let rope = RopeConfig::new(1000.0, RopeStyle::AdjacentPairs);
    let mut rng = Rng(5);
    let (hk, d, hq) = (2, 16, 4);
    let mut t = twin(2, hk, d, 4, 100, 200, DType::F32, true, &rope, &mut rng);
    let policy = Policy::parse("sinks=2,window=16,clusters=24,clusters_k=10,hier=3").unwrap();
    let mut set = ClusterIndexSet::new();
    // Raw pre-RoPE keys score capped or contiguous positions only; such an index does not serve a
    // post-RoPE cache either.
    let pre = t.pre.as_ref().unwrap();
    assert_eq!(set.build(pre, t.seq, &policy).unwrap(), 2);
    assert_eq!(set.indexed_keys(t.seq, 0), Some(IndexedKeys::PreRope));
    {
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
        let mut out = vec![f32::NAN; hq * d];
        let rp = AttentionParams { rope: Some(rope), ..Default::default() };
        let e = pre
            .decode_with_clusters(
                0,
                &[t.seq],
                &qv,
                &policy,
                &set,
                &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
                None,
                &rp,
            )
            .unwrap_err();
        assert!(e.to_string().contains("scores capped or contiguous positions only"), "{e}");
        let e = t
            .post
            .decode_with_clusters(
                0,
                &[t.seq],
                &qv,
                &policy,
                &set,
                &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
                None,
                &rp,
            )
            .unwrap_err();
        assert!(e.to_string().contains("built from keys before RoPE"), "{e}");
        assert!(out.iter().all(|v| v.is_nan()));
        let e = set.update(&t.post, t.seq).unwrap_err();
        assert!(e.to_string().contains("a cache storing keys before RoPE"), "{e}");
    }
    assert_eq!(set.build(&t.post, t.seq, &policy).unwrap(), 2);
    let index = set.get(t.seq, 0).unwrap();
    assert_eq!((index.num_clusters(), index.num_coarse_clusters(), index.clustered_len()), (10, 3, 84));
    // Growth: the tail is read until an update assigns what left the window.
    append(&mut t, 30, &rope, &mut rng);
    let q = rng.vec(hq * d, 1.0);
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let mut out = vec![f32::NAN; hq * d];
    let before = t
        .post
        .decode_with_clusters(
            0,
            &[t.seq],
            &qv,
            &policy,
            &set,
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
            None,
            &AttentionParams::default(),
        )
        .unwrap();
    assert!((84..130u32).all(|tok| before[0].selection.head(0).binary_search(&tok).is_ok()));
    assert_eq!(set.update(&t.post, t.seq).unwrap(), 2 * 30);
    assert_eq!(set.get(t.seq, 1).unwrap().clustered_len(), 130 - 16);
    // Pre-RoPE decode needs the RoPE configuration to score the query.
    let e = t
        .pre
        .as_ref()
        .unwrap()
        .decode_with_clusters(
            0,
            &[t.seq],
            &qv,
            &policy,
            &set,
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
            None,
            &AttentionParams::default(),
        )
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { param, .. } if param == "params.rope"), "{e}");
    // A missing index names what to call.
    let other = t.post.create_sequence();
    t.post.append(other, 20, None).unwrap();
    let mut poisoned = vec![f32::NAN; hq * d];
    let e = t
        .post
        .decode_with_clusters(
            0,
            &[other],
            &qv,
            &policy,
            &set,
            &mut TensorViewMut::new(&mut poisoned, &[1, hq, d]).unwrap(),
            None,
            &AttentionParams::default(),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!("a cluster index for sequence {other} at layer 0"))
            && e.to_string().contains("build the ClusterIndexSet"),
        "{e}"
    );
    assert!(poisoned.iter().all(|v| v.is_nan()));
    // An index longer than its sequence (truncated since) is refused; update fails and
    // leaves the set as it was.
    let snapshot = set.get(t.seq, 1).unwrap().clone();
    t.post.truncate(t.seq, 60).unwrap();
    let e = t
        .post
        .decode_with_clusters(
            1,
            &[t.seq],
            &qv,
            &policy,
            &set,
            &mut TensorViewMut::new(&mut poisoned, &[1, hq, d]).unwrap(),
            None,
            &AttentionParams::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("truncated or compacted since: build it again"), "{e}");
    assert!(poisoned.iter().all(|v| v.is_nan()));
    assert!(set.update(&t.post, t.seq).is_err());
    assert_eq!(set.get(t.seq, 1).unwrap(), &snapshot);
    // Building again fixes it; removing drops both layers.
    assert_eq!(set.build(&t.post, t.seq, &policy).unwrap(), 2);
    assert_eq!(set.get(t.seq, 1).unwrap().clustered_len(), 60 - 16);
    assert_eq!(set.remove_sequence(t.seq), 2);
    assert!(set.is_empty());
    // An empty sequence, and a policy without clusters.
    let empty = t.post.create_sequence();
    assert!(set.build(&t.post, empty, &policy).unwrap_err().to_string().contains("prefill first"));
    assert_eq!(set.build(&t.post, empty, &Policy::parse("window=4").unwrap()).unwrap(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Prefill under a Λ-mask policy, chunk by chunk (windowed heads read only what their
    /// new queries can see), equals the f64 reference with the row mask.
    #[test]
    fn windowed_prefill_in_chunks_matches_reference(
        len in 20usize..200,
        chunk in 1usize..64,
        sinks in 0usize..5,
        window in 1usize..40,
        capped in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (hk, g, d, ps) = (2, 2, 16, 8);
        let hq = hk * g;
        let rope = RopeConfig::new(500.0, RopeStyle::AdjacentPairs);
        let mut rng = Rng(seed);
        let cfg = CacheConfig::new(1, hk, d, ps, len.div_ceil(ps) + 1).with_dtype(DType::F32).with_key_rope(KeyRope::PreRope).with_key_bounds(false);
        let mut cache = KvCache::new(cfg).unwrap();
        let id = cache.create_sequence();
        let text = if capped { format!("global={sinks},local={window},max_distance={}", window + 3) } else { format!("sinks={sinks},window={window};heads=0.1:dense") };
        let policy = Policy::parse(&text).unwrap();
        let params = AttentionParams { rope: Some(rope), ..Default::default() };
        let k = rng.vec(len * hk * d, 2.0);
        let v = rng.vec(len * hk * d, 1.0);
        let q = rng.vec(len * hq * d, 1.0);
        let mut out = vec![f32::NAN; len * hq * d];
        let mut lse = vec![f32::NAN; len * hq];
        for s in (0..len).step_by(chunk) {
            let e = (s + chunk).min(len);
            let m = e - s;
            cache.append(id, m, None).unwrap();
            let shape = [m, hk, d];
            cache.write(id, 0, s, &TensorView::new(&k[s * hk * d..e * hk * d], &shape).unwrap(), &TensorView::new(&v[s * hk * d..e * hk * d], &shape).unwrap()).unwrap();
            let qv = TensorView::new(&q[s * hq * d..e * hq * d], &[m, hq, d]).unwrap();
            let mut o = TensorViewMut::new(&mut out[s * hq * d..e * hq * d], &[m, hq, d]).unwrap();
            cache.prefill_with_policy(0, &[id], &qv, &[0, m as i32], &policy, &mut o, Some(&mut lse[s * hq..e * hq]), &params).unwrap();
        }
        let table = cache.page_table(&[id]).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let qv = TensorView::new(&q, &[len, hq, d]).unwrap();
        let rparams = AttentionParams { positions: policy.position_mode(0), ..params };
        let windowed = |h: usize| capped || h == 0;
        let visible = |_: usize, h: usize, qt: usize, t: usize| t <= qt && (!windowed(h) || t < sinks || qt - t < window);
        let want = reference::prefill_selected(&kv, &qv, &[0, len as i32], &rparams, &|_, _, _| true, &visible).unwrap();
        let (eo, el) = common::max_err(&out, &lse, &want);
        prop_assert!(eo < 5e-5 && el < 5e-5, "out err {eo}, lse err {el}");
    }
}
