//! Failure injection at the runtime layer: cluster-set build and update complete or leave
//! the set as it was, and attention (dense, sparse, under a policy, with cluster
//! retrieval, prefill) whose work space cannot be allocated fails with `OutOfMemory`
//! before writing anything.

use crate::alloc::fail_each;
use crate::attention::AttentionParams;
use crate::config::CacheConfig;
use crate::kv::{KvCache, SeqId};
use crate::runtime::{ClusterIndexSet, IndexedKeys};
use crate::select::cluster::ClusterIndex;
use crate::select::{streaming, Policy, Selection};
use crate::tensor::{TensorView, TensorViewMut};

const D: usize = 16;
const HK: usize = 2;
const HQ: usize = 4;
const LAYERS: usize = 2;

fn rows(n: usize, width: usize, seed: u32) -> Vec<f32> {
    (0..n * width)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5)
        .collect()
}

/// Fill tokens `from..to` of `seq` (already appended) in every layer.
fn fill(c: &mut KvCache, seq: SeqId, from: usize, to: usize, seed: u32) {
    let n = to - from;
    for layer in 0..LAYERS {
        let k = rows(n, HK * D, seed + layer as u32);
        let v = rows(n, HK * D, seed + 50 + layer as u32);
        c.write(
            seq,
            layer,
            from,
            &TensorView::new(&k, &[n, HK, D]).unwrap(),
            &TensorView::new(&v, &[n, HK, D]).unwrap(),
        )
        .unwrap();
    }
}

/// A cache with sequences A (70 tokens) and B (40 tokens).
fn setup() -> (KvCache, SeqId, SeqId) {
    let mut c = KvCache::new(CacheConfig::new(LAYERS, HK, D, 4, 64)).unwrap();
    let a = c.create_sequence();
    c.append(a, 70, None).unwrap();
    fill(&mut c, a, 0, 70, 1);
    let b = c.create_sequence();
    c.append(b, 40, None).unwrap();
    fill(&mut c, b, 0, 40, 9);
    (c, a, b)
}

type SetState = Vec<((SeqId, usize), Option<IndexedKeys>, ClusterIndex)>;

/// Every index of the set, with the keys it clusters.
fn state(set: &ClusterIndexSet) -> SetState {
    set.keys().map(|(s, l)| ((s, l), set.indexed_keys(s, l), set.get(s, l).unwrap().clone())).collect()
}

fn policy() -> Policy {
    Policy::parse("sinks=2,window=8,clusters=24,clusters_k=6,hier=2").unwrap()
}

#[test]
fn cluster_set_build_and_update_are_all_or_nothing() {
    let (mut c, a, b) = setup();
    let p = policy();
    let mut set = ClusterIndexSet::with_seed(3);
    set.build(&c, b, &p).unwrap();
    set.build(&c, a, &p).unwrap();
    // A grows: update has tokens to assign in both layers.
    c.append(a, 30, None).unwrap();
    fill(&mut c, a, 70, 100, 21);

    let before = state(&set);
    let mut clean = set.clone();
    let expected = clean.update(&c, a).unwrap();
    let (assigned, points) = fail_each(
        "ClusterIndexSet::update",
        &mut set,
        |s| s.update(&c, a),
        |s, n| assert!(state(s) == before, "update: allocation {n} failed and the set changed"),
    );
    assert_eq!(assigned, expected);
    assert!(points >= 10, "only {points} allocation points");
    assert!(state(&set) == state(&clean));
    assert!(state(&set) != before, "the update did something");

    let before = state(&set);
    let mut clean = set.clone();
    clean.build(&c, a, &p).unwrap();
    let (layers, points) = fail_each(
        "ClusterIndexSet::build",
        &mut set,
        |s| s.build(&c, a, &p),
        |s, n| assert!(state(s) == before, "build: allocation {n} failed and the set changed"),
    );
    assert_eq!(layers, LAYERS);
    assert!(points >= 20, "only {points} allocation points");
    assert!(state(&set) == state(&clean));
}

/// Run `op` (writing `out`) with each of its allocations failing in turn: `out` must stay
/// NaN after a failure, and equal a clean run's bits after the success.
fn attention_fails_cleanly(name: &str, rows_out: usize, op: &dyn Fn(&mut TensorViewMut) -> crate::Result<()>) {
    let mut expected = vec![f32::NAN; rows_out * HQ * D];
    op(&mut TensorViewMut::new(&mut expected, &[rows_out, HQ, D]).unwrap()).unwrap();
    let mut out = vec![f32::NAN; rows_out * HQ * D];
    let (_, points) = fail_each(
        name,
        &mut out,
        |o| op(&mut TensorViewMut::new(o, &[rows_out, HQ, D]).unwrap()),
        |o, n| assert!(o.iter().all(|x| x.is_nan()), "{name}: allocation {n} failed after writing"),
    );
    assert!(points >= 3, "{name}: only {points} allocation points");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&expected), "{name}");
}

#[test]
fn attention_work_space_failures_write_nothing() {
    let (c, a, b) = setup();
    let ids = [a, b];
    let q = rows(2, HQ * D, 77);
    let qv = TensorView::new(&q, &[2, HQ, D]).unwrap();
    for chunk_size in [None, Some(1), Some(16)] {
        let params = AttentionParams { chunk_size, ..Default::default() };
        attention_fails_cleanly("decode", 2, &|o| c.decode(0, &ids, &qv, o, None, &params));
        let sels =
            [streaming(HK, 70, 2, 9).unwrap(), Selection::from_heads(40, vec![vec![1, 5, 39], vec![0]]).unwrap()];
        attention_fails_cleanly("decode_sparse", 2, &|o| c.decode_sparse(1, &ids, &qv, &sels, o, None, &params));
        let p = Policy::parse("sinks=2,window=8,pages=16").unwrap();
        attention_fails_cleanly("decode_with_policy", 2, &|o| {
            c.decode_with_policy(0, &ids, &qv, &p, o, None, &params).map(drop)
        });
        let p = policy();
        let mut set = ClusterIndexSet::new();
        set.build(&c, a, &p).unwrap();
        set.build(&c, b, &p).unwrap();
        attention_fails_cleanly("decode_with_clusters", 2, &|o| {
            c.decode_with_clusters(1, &ids, &qv, &p, &set, o, None, &params).map(drop)
        });
        // Prefill of the last 5 and 3 tokens.
        let qp = rows(8, HQ * D, 5);
        let qpv = TensorView::new(&qp, &[8, HQ, D]).unwrap();
        attention_fails_cleanly("prefill", 8, &|o| c.prefill(1, &ids, &qpv, &[0, 5, 8], o, None, &params, true));
        let p = Policy::parse("sinks=2,window=8").unwrap();
        attention_fails_cleanly("prefill_with_policy", 8, &|o| {
            c.prefill_with_policy(0, &ids, &qpv, &[0, 5, 8], &p, o, None, &params)
        });
    }
}
