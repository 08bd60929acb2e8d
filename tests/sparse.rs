//! Sparse attention reads exactly the selected tokens: against the f64 reference with the
//! same selection, and against dense attention on a copy of the cache that holds only the
//! selected tokens (with the positions the policy gives them).

mod common;
use common::Rng;
use common::*;
use kvsieve::attention::{
    decode_sparse, prefill_sparse, reference, AttentionParams, HeadTokens, PositionMode, RopeConfig, RopeStyle,
    StreamingWindow,
};
use kvsieve::{CacheConfig, DType, KeyRope, KvCache, TensorView, TensorViewMut};
use proptest::prelude::*;

/// Per-head token lists for tests.
struct Lists {
    len: usize,
    heads: Vec<Vec<u32>>,
}

impl HeadTokens for Lists {
    fn num_kv_heads(&self) -> usize {
        self.heads.len()
    }
    fn seq_len(&self) -> usize {
        self.len
    }
    fn head(&self, h: usize) -> &[u32] {
        &self.heads[h]
    }
}

fn random_lists(rng: &mut Rng, hk: usize, len: usize, density: f32) -> Lists {
    let heads = (0..hk).map(|_| (0..len as u32).filter(|_| (rng.uniform() + 1.0) / 2.0 < density).collect()).collect();
    Lists { len, heads }
}

fn modes() -> impl Strategy<Value = PositionMode> {
    prop_oneof![
        Just(PositionMode::Original),
        Just(PositionMode::Contiguous),
        (1u32..40).prop_map(|m| PositionMode::Capped { max_distance: m }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sparse_decode_matches_reference(
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        group in prop_oneof![Just(1usize), Just(4)],
        lens in proptest::collection::vec(1usize..200, 1..3),
        density in 0.0f32..1.0,
        pre_rope in any::<bool>(),
        mode in modes(),
        seed in any::<u64>(),
        shared in any::<bool>(),
    ) {
        let (hk, d, ps) = (2, 64, 16);
        let hq = hk * group;
        let mode = if pre_rope { mode } else { PositionMode::Original };
        let key_rope = if pre_rope { KeyRope::PreRope } else { KeyRope::PostRope };
        let pages: usize = lens.iter().map(|l| l.div_ceil(ps)).sum();
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, pages).with_dtype(dtype).with_key_rope(key_rope)).unwrap();
        let mut rng = Rng(seed);
        let ids: Vec<_> = lens.iter().map(|&n| fill_sequence(&mut cache, n, &mut rng, 2.0)).collect();
        let mut sels: Vec<Lists> = lens.iter().map(|&n| random_lists(&mut rng, hk, n, density)).collect();
        if shared {
            // Every head reads the same tokens (decode then walks blocks for all heads at once).
            for s in &mut sels {
                let first = s.heads[0].clone();
                s.heads.iter_mut().for_each(|h| *h = first.clone());
            }
        }
        let refs: Vec<&Lists> = sels.iter().collect();
        let b = lens.len();
        let q = rng.vec(b * hq * d, 1.0);
        let qv = TensorView::new(&q, &[b, hq, d]).unwrap();
        let p = AttentionParams {
            rope: pre_rope.then(|| RopeConfig::new(10000.0, RopeStyle::HalfSplit)),
            positions: mode,
            chunk_size: Some(48),
            ..Default::default()
        };
        let table = cache.page_table(&ids).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let mut out = vec![f32::NAN; b * hq * d];
        let mut lse = vec![f32::NAN; b * hq];
        decode_sparse(&kv, &qv, &refs, &mut TensorViewMut::new(&mut out, &[b, hq, d]).unwrap(), Some(&mut lse), &p).unwrap();
        let want = reference::decode_selected(&kv, &qv, &p, &|bb, h, t| sels[bb].heads[h].binary_search(&(t as u32)).is_ok()).unwrap();
        let (eo, el) = max_err(&out, &lse, &want);
        prop_assert!(eo < 5e-5 && el < 5e-5, "out err {eo}, lse err {el}");
    }

    #[test]
    fn sparse_prefill_matches_reference(
        group in prop_oneof![Just(1usize), Just(3)],
        len in 20usize..150,
        nq in 1usize..40,
        density in 0.2f32..1.0,
        window in prop_oneof![Just(None), (0usize..5, 1usize..30).prop_map(|(s, w)| Some(StreamingWindow { sinks: s, window: w }))],
        pre_rope in any::<bool>(),
        mode in modes(),
        seed in any::<u64>(),
    ) {
        let (hk, d, ps) = (2, 64, 16);
        let hq = hk * group;
        let nq = nq.min(len);
        let mode = if pre_rope { mode } else { PositionMode::Original };
        let key_rope = if pre_rope { KeyRope::PreRope } else { KeyRope::PostRope };
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, len.div_ceil(ps)).with_dtype(DType::F32).with_key_rope(key_rope)).unwrap();
        let mut rng = Rng(seed);
        let id = fill_sequence(&mut cache, len, &mut rng, 2.0);
        let sel = random_lists(&mut rng, hk, len, density);
        let windows = vec![window; hk];
        let q = rng.vec(nq * hq * d, 1.0);
        let qv = TensorView::new(&q, &[nq, hq, d]).unwrap();
        let p = AttentionParams { rope: pre_rope.then(|| RopeConfig::new(500.0, RopeStyle::AdjacentPairs)), positions: mode, ..Default::default() };
        let table = cache.page_table(&[id]).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let qo = [0, nq as i32];
        let mut out = vec![f32::NAN; nq * hq * d];
        let mut lse = vec![f32::NAN; nq * hq];
        prefill_sparse(&kv, &qv, &qo, &[&sel], &windows, &mut TensorViewMut::new(&mut out, &[nq, hq, d]).unwrap(), Some(&mut lse), &p).unwrap();
        let keep = |_: usize, h: usize, t: usize| sel.heads[h].binary_search(&(t as u32)).is_ok();
        let visible = |_: usize, _: usize, qt: usize, t: usize| t <= qt && window.is_none_or(|w| t < w.sinks || qt - t < w.window);
        let want = reference::prefill_selected(&kv, &qv, &qo, &p, &keep, &visible).unwrap();
        let (eo, el) = max_err(&out, &lse, &want);
        prop_assert!(eo < 5e-5 && el < 5e-5, "out err {eo}, lse err {el}");
    }
}

/// Copy the selected tokens of one KV head into a fresh single-head cache, with the given
/// positions, and return it with the sequence id.
fn copy_selected(src: &KvCache, id: u64, head: usize, tokens: &[u32], positions: &[i32]) -> (KvCache, u64) {
    let c = *src.config();
    let d = c.head_dim;
    let cfg = CacheConfig::new(1, 1, d, c.page_size, tokens.len().div_ceil(c.page_size).max(1))
        .with_dtype(c.dtype)
        .with_key_rope(c.key_rope);
    let mut dst = KvCache::new(cfg).unwrap();
    let nid = dst.create_sequence();
    dst.append(nid, tokens.len(), Some(positions)).unwrap();
    let keys = src.read_keys(id, 0).unwrap();
    let vals = src.read_values(id, 0).unwrap();
    let hk = c.num_kv_heads;
    let pick = |a: &[f32]| -> Vec<f32> {
        tokens
            .iter()
            .flat_map(|&t| a[(t as usize * hk + head) * d..(t as usize * hk + head + 1) * d].to_vec())
            .collect()
    };
    let (k, v) = (pick(&keys), pick(&vals));
    dst.write(
        nid,
        0,
        0,
        &TensorView::new(&k, &[tokens.len(), 1, d]).unwrap(),
        &TensorView::new(&v, &[tokens.len(), 1, d]).unwrap(),
    )
    .unwrap();
    (dst, nid)
}

#[test]
fn sparse_decode_equals_dense_on_a_copy_of_the_selected_tokens() {
    let (hk, group, d, len) = (2, 4, 64, 300);
    let hq = hk * group;
    let rope = RopeConfig::new(10000.0, RopeStyle::AdjacentPairs);
    let mut rng = Rng(21);
    for (mode, key_rope) in [
        (PositionMode::Original, KeyRope::PostRope),
        (PositionMode::Original, KeyRope::PreRope),
        (PositionMode::Contiguous, KeyRope::PreRope),
    ] {
        let mut cache =
            KvCache::new(CacheConfig::new(1, hk, d, 16, 32).with_dtype(DType::F16).with_key_rope(key_rope)).unwrap();
        let id = fill_sequence(&mut cache, len, &mut rng, 2.0);
        let mut sel = random_lists(&mut rng, hk, len, 0.3);
        for h in &mut sel.heads {
            if h.last() != Some(&(len as u32 - 1)) {
                h.push(len as u32 - 1); // the query token itself, as a window would keep it
            }
        }
        let q = rng.vec(hq * d, 1.0);
        let p = AttentionParams {
            rope: (key_rope == KeyRope::PreRope).then_some(rope),
            positions: mode,
            ..Default::default()
        };
        let mut out = vec![f32::NAN; hq * d];
        let table = cache.page_table(&[id]).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        decode_sparse(
            &kv,
            &TensorView::new(&q, &[1, hq, d]).unwrap(),
            &[&sel],
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
            None,
            &p,
        )
        .unwrap();
        let stored = cache.positions(id).unwrap();
        for h in 0..hk {
            let toks = &sel.heads[h];
            let pos: Vec<i32> = match mode {
                PositionMode::Contiguous => (0..toks.len() as i32).collect(),
                _ => toks.iter().map(|&t| stored[t as usize]).collect(),
            };
            let (copy, cid) = copy_selected(&cache, id, h, toks, &pos);
            let qh = &q[h * group * d..(h + 1) * group * d];
            let mut o = vec![f32::NAN; group * d];
            let dense = AttentionParams { positions: PositionMode::Original, ..p };
            copy.decode(
                0,
                &[cid],
                &TensorView::new(qh, &[1, group, d]).unwrap(),
                &mut TensorViewMut::new(&mut o, &[1, group, d]).unwrap(),
                None,
                &dense,
            )
            .unwrap();
            let err =
                o.iter().zip(&out[h * group * d..(h + 1) * group * d]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{mode:?} {key_rope:?} head {h}: {err}");
        }
    }
}

#[test]
fn sparse_bad_selections_are_refused() {
    let mut rng = Rng(4);
    let mut cache = KvCache::new(CacheConfig::new(1, 2, 64, 16, 8)).unwrap();
    let id = fill_sequence(&mut cache, 40, &mut rng, 1.0);
    let table = cache.page_table(&[id]).unwrap();
    let kv = cache.layer_view(0, &table).unwrap();
    let q = rng.vec(4 * 64, 1.0);
    let qv = TensorView::new(&q, &[1, 4, 64]).unwrap();
    let mut out = vec![0f32; 4 * 64];
    let p = AttentionParams::default();
    let mut run = |s: &Lists| {
        decode_sparse(&kv, &qv, &[s], &mut TensorViewMut::new(&mut out, &[1, 4, 64]).unwrap(), None, &p)
            .unwrap_err()
            .to_string()
    };
    let e = run(&Lists { len: 40, heads: vec![vec![1, 5, 3], vec![]] });
    assert!(e.contains("selections[0].head(0)[2]"), "{e}");
    let e = run(&Lists { len: 40, heads: vec![vec![1, 40], vec![]] });
    assert!(e.contains("selections[0].head(0)[1]"), "{e}");
    let e = run(&Lists { len: 39, heads: vec![vec![], vec![]] });
    assert!(e.contains("selections[0]"), "{e}");
    let e = run(&Lists { len: 40, heads: vec![vec![]] });
    assert!(e.contains("KV heads"), "{e}");
    let pre = AttentionParams { positions: PositionMode::Contiguous, ..Default::default() };
    let e = decode_sparse(
        &kv,
        &qv,
        &[&Lists { len: 40, heads: vec![vec![], vec![]] }],
        &mut TensorViewMut::new(&mut out, &[1, 4, 64]).unwrap(),
        None,
        &pre,
    )
    .unwrap_err();
    assert!(e.to_string().contains("positions"), "{e}");
}

#[test]
fn streaming_with_eviction_keeps_memory_bounded_over_100k_tokens() {
    // 100,000 tokens through a cache of 64 pages of 16 tokens under sinks=4, window=512.
    use kvsieve::select::Policy;
    let (hk, hq, d, ps, pages) = (1, 2, 16, 16, 64);
    let (sinks, window) = (4usize, 512usize);
    let policy = Policy::parse(&format!("sinks={sinks},window={window}")).unwrap();
    let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, pages).with_dtype(DType::F32)).unwrap();
    let id = cache.create_sequence();
    let mut rng = Rng(99);
    // The stream's keys and values, kept only for the sinks and the window, for the check.
    let mut sink_rows: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let mut recent: std::collections::VecDeque<(Vec<f32>, Vec<f32>)> = std::collections::VecDeque::new();
    let (total, chunk) = (100_000usize, 100usize);
    // Bound: the sink page, the pages the window touches, and one chunk's worth of new pages.
    let bound = sinks.div_ceil(ps) + window.div_ceil(ps) + 1 + chunk.div_ceil(ps) + 1;
    assert!(bound <= pages);
    let mut max_used = 0;
    for start in (0..total).step_by(chunk) {
        let n = chunk.min(total - start);
        cache.append(id, n, None).unwrap();
        let k = rng.vec(n * d, 1.0);
        let v = rng.vec(n * d, 1.0);
        let len = cache.seq_len(id).unwrap();
        cache
            .write(id, 0, len - n, &TensorView::new(&k, &[n, 1, d]).unwrap(), &TensorView::new(&v, &[n, 1, d]).unwrap())
            .unwrap();
        for t in 0..n {
            let row = (k[t * d..(t + 1) * d].to_vec(), v[t * d..(t + 1) * d].to_vec());
            if start + t < sinks {
                sink_rows.push(row);
            } else {
                recent.push_back(row);
                if recent.len() > window {
                    recent.pop_front();
                }
            }
        }
        max_used = max_used.max(cache.stats().pages_used);
        cache.evict_for_policy(id, &policy).unwrap();
        cache.check_invariants().unwrap();
    }
    assert!(max_used <= bound, "pages used peaked at {max_used}, bound {bound}");
    let positions = cache.positions(id).unwrap();
    assert_eq!(&positions[..sinks], &[0, 1, 2, 3]);
    assert_eq!(*positions.last().unwrap(), total as i32 - 1);

    // Decode under the policy equals dense attention over exactly sinks + window.
    let q = rng.vec(hq * d, 1.0);
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let mut out = vec![f32::NAN; hq * d];
    let sels = cache
        .decode_with_policy(
            0,
            &[id],
            &qv,
            &policy,
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
            None,
            &AttentionParams::default(),
        )
        .unwrap();
    assert_eq!(sels[0].head(0).len(), sinks + window);
    let kept: Vec<&(Vec<f32>, Vec<f32>)> = sink_rows.iter().chain(recent.iter()).collect();
    let mut check =
        KvCache::new(CacheConfig::new(1, hk, d, ps, (sinks + window).div_ceil(ps)).with_dtype(DType::F32)).unwrap();
    let cid = check.create_sequence();
    check.append(cid, kept.len(), None).unwrap();
    let kk: Vec<f32> = kept.iter().flat_map(|r| r.0.clone()).collect();
    let vv: Vec<f32> = kept.iter().flat_map(|r| r.1.clone()).collect();
    check
        .write(
            cid,
            0,
            0,
            &TensorView::new(&kk, &[kept.len(), 1, d]).unwrap(),
            &TensorView::new(&vv, &[kept.len(), 1, d]).unwrap(),
        )
        .unwrap();
    let table = check.page_table(&[cid]).unwrap();
    let want = reference::decode(&check.layer_view(0, &table).unwrap(), &qv, &AttentionParams::default()).unwrap();
    let mut lse = vec![f32::NAN; hq];
    cache
        .decode_with_policy(
            0,
            &[id],
            &qv,
            &policy,
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
            Some(&mut lse),
            &AttentionParams::default(),
        )
        .unwrap();
    let (eo, el) = max_err(&out, &lse, &want);
    assert!(eo < 1e-5 && el < 1e-5, "{eo} {el}");
}
