//! Dense attention against the f64 reference on fresh random data: GQA ratios, head dims,
//! page sizes, dtypes, ragged batches, kvsieve-owned and engine-owned memory.

mod common;
use common::*;
use kvsieve::attention::{
    apply_rope, decode, merge_states, prefill, reference, AttentionParams, PositionMode, RopeConfig, RopeStyle,
};
use kvsieve::{
    CacheConfig, DType, KeyRope, KvCache, PageLayout, PageTable, PagedKv, PagedKvLayout, TensorView, TensorViewMut,
};
use proptest::prelude::*;

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// Ragged batch in a fresh cache; output and LSE poisoned with NaN before the run.
#[allow(clippy::too_many_arguments)]
fn run_decode(
    dtype: DType,
    group: usize,
    head_dim: usize,
    page_size: usize,
    lens: &[usize],
    seed: u64,
    soft_cap: Option<f32>,
    chunk: Option<usize>,
    layout: PageLayout,
) -> (f64, f64) {
    let hk = 2;
    let hq = hk * group;
    let pages: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum::<usize>() + 1;
    let cfg = CacheConfig::new(1, hk, head_dim, page_size, pages).with_dtype(dtype).with_layout(layout);
    let mut cache = KvCache::new(cfg).unwrap();
    let mut rng = Rng(seed);
    let ids: Vec<_> = lens.iter().map(|&n| fill_sequence(&mut cache, n, &mut rng, 2.0)).collect();
    let b = lens.len();
    let q = rng.vec(b * hq * head_dim, 1.0);
    let qv = TensorView::new(&q, &[b, hq, head_dim]).unwrap();
    let mut out = vec![f32::NAN; b * hq * head_dim];
    let mut lse = vec![f32::NAN; b * hq];
    let p = AttentionParams { logit_soft_cap: soft_cap, chunk_size: chunk, ..Default::default() };
    cache
        .decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[b, hq, head_dim]).unwrap(), Some(&mut lse), &p)
        .unwrap();
    let table = cache.page_table(&ids).unwrap();
    let kv = cache.layer_view(0, &table).unwrap();
    max_err(&out, &lse, &reference::decode(&kv, &qv, &p).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn decode_matches_reference(
        dtype in dtype_strategy(),
        group in prop_oneof![Just(1usize), Just(3), Just(4), Just(8)],
        head_dim in prop_oneof![Just(64usize), Just(128)],
        page_size in prop_oneof![Just(1usize), Just(16), Just(64)],
        lens in proptest::collection::vec(0usize..300, 1..4),
        seed in any::<u64>(),
        chunk in prop_oneof![Just(None), Just(Some(7usize)), Just(Some(64))],
        soft_cap in prop_oneof![Just(None), Just(Some(5.0f32))],
        hnd in any::<bool>(),
    ) {
        let layout = if hnd { PageLayout::Hnd } else { PageLayout::Nhd };
        let (eo, el) = run_decode(dtype, group, head_dim, page_size, &lens, seed, soft_cap, chunk, layout);
        prop_assert!(eo < 2e-5 && el < 2e-5, "out err {eo}, lse err {el}");
    }

    /// Keys stored before RoPE and rotated at read, under each position mode, against the
    /// reference: ragged batches (empty sequences included), stored positions with gaps (so
    /// original and contiguous numbering differ), inside and across the end of the shared
    /// rotation table (65,536 positions), both pair styles, small chunks.
    #[test]
    fn pre_rope_decode_matches_reference(
        dtype in dtype_strategy(),
        group in prop_oneof![Just(1usize), Just(4)],
        head_dim in prop_oneof![Just(64usize), Just(128)],
        lens in proptest::collection::vec(0usize..200, 1..4),
        seed in any::<u64>(),
        chunk in prop_oneof![Just(None), Just(Some(7usize)), Just(Some(64))],
        mode in prop_oneof![Just(PositionMode::Original), Just(PositionMode::Contiguous), (1u32..90).prop_map(|m| PositionMode::Capped { max_distance: m })],
        half_split in any::<bool>(),
        far in any::<bool>(),
    ) {
        let (hk, ps) = (2, 16);
        let hq = hk * group;
        let base = if far { 65_300 } else { 0 };
        let pages: usize = lens.iter().map(|l| l.div_ceil(ps)).sum::<usize>() + 1;
        let cfg = CacheConfig::new(1, hk, head_dim, ps, pages).with_dtype(dtype).with_key_rope(KeyRope::PreRope);
        let mut cache = KvCache::new(cfg).unwrap();
        let mut rng = Rng(seed);
        let ids: Vec<_> = lens.iter().map(|&n| {
            let id = cache.create_sequence();
            let positions: Vec<i32> = (0..n as i32).map(|i| base + 3 * i + (i % 5)).collect();
            cache.append(id, n, Some(&positions)).unwrap();
            let (k, v) = (rng.vec(n * hk * head_dim, 2.0), rng.vec(n * hk * head_dim, 1.0));
            cache.write(id, 0, 0, &TensorView::new(&k, &[n, hk, head_dim]).unwrap(), &TensorView::new(&v, &[n, hk, head_dim]).unwrap()).unwrap();
            id
        }).collect();
        let b = lens.len();
        let q = rng.vec(b * hq * head_dim, 1.0);
        let qv = TensorView::new(&q, &[b, hq, head_dim]).unwrap();
        let mut out = vec![f32::NAN; b * hq * head_dim];
        let mut lse = vec![f32::NAN; b * hq];
        let style = if half_split { RopeStyle::HalfSplit } else { RopeStyle::AdjacentPairs };
        let p = AttentionParams { rope: Some(RopeConfig::new(10_000.0, style)), positions: mode, chunk_size: chunk, ..Default::default() };
        cache.decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[b, hq, head_dim]).unwrap(), Some(&mut lse), &p).unwrap();
        let table = cache.page_table(&ids).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let (eo, el) = max_err(&out, &lse, &reference::decode(&kv, &qv, &p).unwrap());
        prop_assert!(eo < 5e-5 && el < 5e-5, "{mode:?}: out err {eo}, lse err {el}");
    }

    #[test]
    fn prefill_matches_reference(
        dtype in dtype_strategy(),
        group in prop_oneof![Just(1usize), Just(3), Just(4), Just(8)],
        head_dim in prop_oneof![Just(64usize), Just(128)],
        page_size in prop_oneof![Just(1usize), Just(16), Just(64)],
        seqs in proptest::collection::vec((1usize..120, 0usize..50), 1..3),
        causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let hk = 2;
        let hq = hk * group;
        let mut rng = Rng(seed);
        let lens: Vec<usize> = seqs.iter().map(|&(n, extra)| n + extra).collect();
        let pages: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum::<usize>() + 1;
        let mut cache = KvCache::new(CacheConfig::new(1, hk, head_dim, page_size, pages).with_dtype(dtype)).unwrap();
        let ids: Vec<_> = lens.iter().map(|&n| fill_sequence(&mut cache, n, &mut rng, 2.0)).collect();
        let mut qo_indptr = vec![0i32];
        for &(n, _) in &seqs {
            qo_indptr.push(qo_indptr.last().unwrap() + n as i32);
        }
        let total = *qo_indptr.last().unwrap() as usize;
        let q = rng.vec(total * hq * head_dim, 1.0);
        let qv = TensorView::new(&q, &[total, hq, head_dim]).unwrap();
        let mut out = vec![f32::NAN; total * hq * head_dim];
        let mut lse = vec![f32::NAN; total * hq];
        let p = AttentionParams::default();
        cache.prefill(0, &ids, &qv, &qo_indptr, &mut TensorViewMut::new(&mut out, &[total, hq, head_dim]).unwrap(), Some(&mut lse), &p, causal).unwrap();
        let table = cache.page_table(&ids).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let (eo, el) = max_err(&out, &lse, &reference::prefill(&kv, &qv, &qo_indptr, &p, causal).unwrap());
        prop_assert!(eo < 2e-5 && el < 2e-5, "out err {eo}, lse err {el}");
    }

    #[test]
    fn merge_states_equals_attention_over_the_union(len_a in 1usize..100, len_b in 1usize..100, seed in any::<u64>()) {
        // Attention over the first len_a tokens and over the rest, merged, equals attention over all.
        let (hk, hq, d) = (2, 4, 64);
        let mut rng = Rng(seed);
        let mut cache = KvCache::new(CacheConfig::new(1, hk, d, 16, 32).with_dtype(DType::F32)).unwrap();
        let id = fill_sequence(&mut cache, len_a + len_b, &mut rng, 2.0);
        let q = rng.vec(hq * d, 1.0);
        let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
        let table = cache.page_table(&[id]).unwrap();
        let kv = cache.layer_view(0, &table).unwrap();
        let p = AttentionParams::default();
        let mut qrow = vec![0f32; hq * d];
        qv.read_row(&[0, 0], &mut qrow[..d]);
        for h in 0..hq { qv.read_row(&[0, h], &mut qrow[h * d..(h + 1) * d]); }
        let last = len_a + len_b - 1;
        let a = reference::attend_one(&kv, 0, &qrow, hq, &p, last, &|_, t| t < len_a, &|_, _| true);
        let b = reference::attend_one(&kv, 0, &qrow, hq, &p, last, &|_, t| t >= len_a, &|_, _| true);
        let all = reference::attend_one(&kv, 0, &qrow, hq, &p, last, &|_, _| true, &|_, _| true);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (va, vb, la, lb) = (f(&a.out), f(&b.out), f(&a.lse), f(&b.lse));
        let mut out = vec![f32::NAN; hq * d];
        let mut lse = vec![f32::NAN; hq];
        merge_states(
            &TensorView::new(&va, &[1, hq, d]).unwrap(), &la,
            &TensorView::new(&vb, &[1, hq, d]).unwrap(), &lb,
            &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), &mut lse,
        ).unwrap();
        let (eo, el) = max_err(&out, &lse, &[all]);
        prop_assert!(eo < 1e-5 && el < 1e-5, "{eo} {el}");
    }
}

#[test]
fn engine_owned_memory_through_a_view_matches_reference() {
    // An engine-owned buffer [num_pages, 2 (K|V), page_size, heads, dim] with a shuffled table.
    let (np, ps, hk, d, hq) = (12, 16, 2, 64, 8);
    let mut rng = Rng(3);
    let mem: Vec<kvsieve::f16> = rng.vec(np * 2 * ps * hk * d, 1.0).into_iter().map(kvsieve::f16::from_f32).collect();
    let page = 2 * ps * hk * d;
    let layout = PagedKvLayout {
        dtype: DType::F16,
        num_pages: np,
        page_size: ps,
        num_kv_heads: hk,
        head_dim: d,
        k_strides: [page, hk * d, d],
        v_strides: [page, hk * d, d],
    };
    let table = PageTable { indptr: vec![0, 3, 7], indices: vec![5, 0, 9, 1, 2, 11, 4], last_page_len: vec![7, 16] };
    let kv = PagedKv::new(&mem[..], &mem[ps * hk * d..], layout, table.as_ref()).unwrap();
    assert_eq!(kv.seq_len(0), 39);
    assert_eq!(kv.seq_len(1), 64);
    let q = rng.vec(2 * hq * d, 1.0);
    let qv = TensorView::new(&q, &[2, hq, d]).unwrap();
    let mut out = vec![f32::NAN; 2 * hq * d];
    let mut lse = vec![f32::NAN; 2 * hq];
    let p = AttentionParams::default();
    decode(&kv, &qv, &mut TensorViewMut::new(&mut out, &[2, hq, d]).unwrap(), Some(&mut lse), &p).unwrap();
    let (eo, el) = max_err(&out, &lse, &reference::decode(&kv, &qv, &p).unwrap());
    assert!(eo < 2e-5 && el < 2e-5, "{eo} {el}");

    // Prefill of the last 10 tokens of each sequence through the same view, with f16 output.
    let qo = [0, 10, 20];
    let qp = rng.vec(20 * hq * d, 1.0);
    let qpv = TensorView::new(&qp, &[20, hq, d]).unwrap();
    let mut out16 = vec![kvsieve::f16::NAN; 20 * hq * d];
    let mut lse = vec![f32::NAN; 20 * hq];
    prefill(&kv, &qpv, &qo, &mut TensorViewMut::new(&mut out16, &[20, hq, d]).unwrap(), Some(&mut lse), &p, true)
        .unwrap();
    let out: Vec<f32> = out16.iter().map(|x| x.to_f32()).collect();
    let (eo, el) = max_err(&out, &lse, &reference::prefill(&kv, &qpv, &qo, &p, true).unwrap());
    assert!(eo < 2e-3 && el < 2e-5, "{eo} {el}");

    // A table that points past the memory is refused.
    let bad = PageTable { indptr: vec![0, 1], indices: vec![12], last_page_len: vec![3] };
    let e = PagedKv::new(&mem[..], &mem[ps * hk * d..], layout, bad.as_ref()).err().unwrap();
    assert!(e.to_string().contains("indices[0]"), "{e}");
    // Memory smaller than the layout says is refused.
    let e = PagedKv::new(&mem[..mem.len() / 2], &mem[ps * hk * d..], layout, table.as_ref()).err().unwrap();
    assert!(e.to_string().contains("`k`"), "{e}");
}

#[test]
fn pre_rope_keys_are_rotated_at_read_time() {
    // Raw keys and queries in a pre-RoPE cache must give what rotated keys and a query rotated
    // by its own position give in a post-RoPE cache.
    let (hk, hq, d, n) = (2, 4, 64, 150);
    let rope = RopeConfig::new(10000.0, RopeStyle::AdjacentPairs);
    let mut rng = Rng(11);
    let k = rng.vec(n * hk * d, 1.0);
    let v = rng.vec(n * hk * d, 1.0);
    let positions: Vec<i32> = (0..n as i32).map(|i| 5 + 2 * i).collect();
    let mut rotated = k.clone();
    apply_rope(&mut TensorViewMut::new(&mut rotated, &[n, hk, d]).unwrap(), &positions, &rope).unwrap();
    let mk = |key_rope, keys: &[f32]| {
        let mut c =
            KvCache::new(CacheConfig::new(1, hk, d, 16, 16).with_dtype(DType::F32).with_key_rope(key_rope)).unwrap();
        let id = c.create_sequence();
        c.append(id, n, Some(&positions)).unwrap();
        c.write(id, 0, 0, &TensorView::new(keys, &[n, hk, d]).unwrap(), &TensorView::new(&v, &[n, hk, d]).unwrap())
            .unwrap();
        (c, id)
    };
    let (pre, a) = mk(KeyRope::PreRope, &k);
    let (post, b) = mk(KeyRope::PostRope, &rotated);
    let q = rng.vec(hq * d, 1.0);
    let mut q_rot = q.clone();
    apply_rope(&mut TensorViewMut::new(&mut q_rot, &[1, hq, d]).unwrap(), &[positions[n - 1]], &rope).unwrap();
    let run = |c: &KvCache, id, q: &[f32], p: &AttentionParams| {
        let mut out = vec![f32::NAN; hq * d];
        let qv = TensorView::new(q, &[1, hq, d]).unwrap();
        c.decode(0, &[id], &qv, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), None, p).map(|_| out)
    };
    let e = run(&pre, a, &q, &AttentionParams::default()).unwrap_err();
    assert!(e.to_string().contains("rope"), "{e}");
    let with_rope = AttentionParams { rope: Some(rope), ..Default::default() };
    let x = run(&pre, a, &q, &with_rope).unwrap();
    let y = run(&post, b, &q_rot, &AttentionParams::default()).unwrap();
    let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "{err}");
}

#[test]
fn rope_styles_follow_their_definitions() {
    let d = 16;
    let mut rng = Rng(5);
    let x = rng.vec(d, 1.0);
    for style in [RopeStyle::HalfSplit, RopeStyle::AdjacentPairs] {
        for rotary in [0usize, 8] {
            let cfg = RopeConfig::new(500.0, style).with_rotary_dim(rotary);
            let mut y = x.clone();
            apply_rope(&mut TensorViewMut::new(&mut y, &[1, 1, d]).unwrap(), &[37], &cfg).unwrap();
            let r = if rotary == 0 { d } else { rotary };
            for i in 0..r / 2 {
                let ang = 37.0f64 * 500f64.powf(-2.0 * i as f64 / r as f64);
                let (a, b) = if style == RopeStyle::HalfSplit { (i, i + r / 2) } else { (2 * i, 2 * i + 1) };
                let ea = x[a] as f64 * ang.cos() - x[b] as f64 * ang.sin();
                let eb = x[a] as f64 * ang.sin() + x[b] as f64 * ang.cos();
                assert!((y[a] as f64 - ea).abs() < 1e-5 && (y[b] as f64 - eb).abs() < 1e-5, "{style:?} pair {i}");
            }
            assert_eq!(&y[r..], &x[r..], "channels past rotary_dim are untouched");
        }
    }
    let bad = RopeConfig::new(500.0, RopeStyle::HalfSplit).with_rotary_dim(7);
    let mut y = x.clone();
    assert!(apply_rope(&mut TensorViewMut::new(&mut y, &[1, 1, d]).unwrap(), &[1], &bad)
        .unwrap_err()
        .to_string()
        .contains("rotary_dim"));
}

#[test]
fn attention_bad_input_is_reported_by_name() {
    let mut rng = Rng(9);
    let mut cache = KvCache::new(CacheConfig::new(1, 2, 64, 16, 8)).unwrap();
    let id = fill_sequence(&mut cache, 20, &mut rng, 1.0);
    let q = rng.vec(6 * 64, 1.0);
    let mut out = vec![0f32; 6 * 64];
    let p = AttentionParams::default();
    let qv = TensorView::new(&q, &[1, 6, 64]).unwrap();
    // 6 query heads is not a multiple of 4? it is a multiple of 2: fine. 5 heads is not.
    let q5 = TensorView::new(&q[..5 * 64], &[1, 5, 64]).unwrap();
    let e = cache
        .decode(0, &[id], &q5, &mut TensorViewMut::new(&mut out[..5 * 64], &[1, 5, 64]).unwrap(), None, &p)
        .unwrap_err();
    assert!(e.to_string().contains("`q`"), "{e}");
    let e = cache
        .decode(0, &[id], &qv, &mut TensorViewMut::new(&mut out[..3 * 64], &[1, 3, 64]).unwrap(), None, &p)
        .unwrap_err();
    assert!(e.to_string().contains("`out`"), "{e}");
    let mut lse = vec![0f32; 2];
    let e = cache
        .decode(0, &[id], &qv, &mut TensorViewMut::new(&mut out, &[1, 6, 64]).unwrap(), Some(&mut lse), &p)
        .unwrap_err();
    assert!(e.to_string().contains("`lse`"), "{e}");
    let e = cache.decode(1, &[id], &qv, &mut TensorViewMut::new(&mut out, &[1, 6, 64]).unwrap(), None, &p).unwrap_err();
    assert!(e.to_string().contains("layer"), "{e}");
    let e =
        cache.decode(0, &[id, id], &qv, &mut TensorViewMut::new(&mut out, &[1, 6, 64]).unwrap(), None, &p).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let e = cache
        .prefill(0, &[id], &qv, &[0, 2], &mut TensorViewMut::new(&mut out, &[1, 6, 64]).unwrap(), None, &p, true)
        .unwrap_err();
    assert!(e.to_string().contains("qo_indptr"), "{e}");
    let e = cache
        .decode(
            0,
            &[id],
            &qv,
            &mut TensorViewMut::new(&mut out, &[1, 6, 64]).unwrap(),
            None,
            &AttentionParams { chunk_size: Some(0), ..p },
        )
        .unwrap_err();
    assert!(e.to_string().contains("chunk_size"), "{e}");
}
