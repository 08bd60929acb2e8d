//! Concurrency stress: many threads sharing read-only objects (a cache decoded through
//! `&self`, cluster indexes and a cluster set, policies, selections) must get, bit for bit,
//! what one thread gets alone; and readers of a shared cache beside a writer that appends,
//! forks, truncates, compacts and frees other sequences must keep seeing their own
//! sequences unchanged.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fill_sequence, Rng};
use kvsieve::attention::AttentionParams;
use kvsieve::select::cluster::{ClusterConfig, ClusterCount, ClusterIndex, CoarseRetrieve, Retrieve};
use kvsieve::select::gemfilter::{self, GemFilterConfig};
use kvsieve::select::{streaming, KeySource};
use kvsieve::{
    CacheConfig, ClusterIndexSet, DType, KeepTokens, KvCache, Policy, Selection, SeqId, SharedKvCache, TensorView,
    TensorViewMut,
};

const THREADS: usize = 8;
const ITERS: usize = 4;
const LAYERS: usize = 2;
const HK: usize = 2;
const HQ: usize = 8;
const D: usize = 64;
const LENS: [usize; 3] = [700, 1500, 90];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Everything the shared objects give for one set of queries.
#[derive(Debug, PartialEq)]
struct Results {
    dense: Vec<Vec<u32>>,
    sparse: Vec<u32>,
    policy: Vec<u32>,
    policy_selections: Vec<Selection>,
    clusters: Vec<u32>,
    cluster_selections: Vec<Selection>,
    prefill: Vec<u32>,
    retrieved: Vec<Selection>,
    gemfilter: Vec<u32>,
}

/// The read-only objects shared beside the cache.
struct Objects {
    ids: Vec<SeqId>,
    q: Vec<f32>,
    qp: Vec<f32>,
    policy: Policy,
    cluster_policy: Policy,
    set: ClusterIndexSet,
    index: ClusterIndex,
    selections: Vec<Selection>,
}

fn setup(dtype: DType) -> (KvCache, Objects) {
    let mut rng = Rng(41);
    let mut cache = KvCache::new(CacheConfig::new(LAYERS, HK, D, 16, 256).with_dtype(dtype)).unwrap();
    let ids: Vec<SeqId> = LENS.iter().map(|&n| fill_sequence(&mut cache, n, &mut rng, 1.0)).collect();
    let cluster_policy = Policy::parse("sinks=4,window=32,clusters=128,clusters_k=24,hier=4").unwrap();
    let mut set = ClusterIndexSet::with_seed(7);
    for &id in &ids {
        set.build(&cache, id, &cluster_policy).unwrap();
    }
    let cfg = ClusterConfig::new(ClusterCount::Absolute(32)).with_coarse(ClusterCount::Absolute(6));
    let index = ClusterIndex::build(KeySource::Cache { cache: &cache, seq: ids[1], layer: 1 }, &cfg).unwrap();
    let selections = LENS
        .iter()
        .enumerate()
        .map(|(b, &n)| if b == 1 { streaming(HK, n, 8, 100).unwrap() } else { Selection::dense(HK, n).unwrap() })
        .collect();
    let objects = Objects {
        q: rng.vec(LENS.len() * HQ * D, 1.0),
        qp: rng.vec(12 * HQ * D, 1.0),
        ids,
        policy: Policy::parse("sinks=4,window=64,pages=256;layers=1:dense").unwrap(),
        cluster_policy,
        set,
        index,
        selections,
    };
    (cache, objects)
}

/// Every read-only operation, on `cache` and the shared objects.
fn run(cache: &KvCache, s: &Objects) -> Results {
    let b = s.ids.len();
    let qv = TensorView::new(&s.q, &[b, HQ, D]).unwrap();
    let params = AttentionParams { chunk_size: Some(128), ..Default::default() };
    let mut out = vec![f32::NAN; b * HQ * D];
    let mut lse = vec![f32::NAN; b * HQ];
    let both = |out: &[f32], lse: &[f32]| [bits(out), bits(lse)].concat();
    let mut dense = Vec::new();
    for layer in 0..LAYERS {
        for p in [AttentionParams::default(), params] {
            let mut o = TensorViewMut::new(&mut out, &[b, HQ, D]).unwrap();
            cache.decode(layer, &s.ids, &qv, &mut o, Some(&mut lse), &p).unwrap();
            dense.push(both(&out, &lse));
        }
    }
    let mut o = TensorViewMut::new(&mut out, &[b, HQ, D]).unwrap();
    cache.decode_sparse(0, &s.ids, &qv, &s.selections, &mut o, Some(&mut lse), &params).unwrap();
    let sparse = both(&out, &lse);
    let mut o = TensorViewMut::new(&mut out, &[b, HQ, D]).unwrap();
    let policy_selections =
        cache.decode_with_policy(0, &s.ids, &qv, &s.policy, &mut o, Some(&mut lse), &params).unwrap();
    let policy = both(&out, &lse);
    let mut o = TensorViewMut::new(&mut out, &[b, HQ, D]).unwrap();
    let cl =
        cache.decode_with_clusters(1, &s.ids, &qv, &s.cluster_policy, &s.set, &mut o, Some(&mut lse), &params).unwrap();
    let clusters = both(&out, &lse);
    let cluster_selections = cl.into_iter().map(|p| p.selection).collect();
    // Prefill of the last 5, 4 and 3 tokens.
    let qpv = TensorView::new(&s.qp, &[12, HQ, D]).unwrap();
    let mut pout = vec![f32::NAN; 12 * HQ * D];
    let mut plse = vec![f32::NAN; 12 * HQ];
    let mut o = TensorViewMut::new(&mut pout, &[12, HQ, D]).unwrap();
    cache.prefill(1, &s.ids, &qpv, &[0, 5, 9, 12], &mut o, Some(&mut plse), &params, true).unwrap();
    let prefill = both(&pout, &plse);
    let q1 = TensorView::new(&s.q[HQ * D..2 * HQ * D], &[HQ, D]).unwrap();
    let n = LENS[1];
    let retrieved = vec![
        s.index.retrieve(&q1, &Retrieve::Budget(200), n).unwrap().selection,
        s.index.retrieve(&q1, &Retrieve::MixedBudget(150), n).unwrap().selection,
        s.index.retrieve_hierarchical(&q1, CoarseRetrieve::Budget(400), &Retrieve::Budget(200), n).unwrap().selection,
    ];
    let gem = gemfilter::select(
        &q1,
        KeySource::Cache { cache, seq: s.ids[1], layer: 0 },
        &GemFilterConfig { k: 300, pool_kernel: 5, keep_first: 4, keep_last: 16 },
    )
    .unwrap();
    Results {
        dense,
        sparse,
        policy,
        policy_selections,
        clusters,
        cluster_selections,
        prefill,
        retrieved,
        gemfilter: gem,
    }
}

#[test]
fn shared_read_only_objects_give_single_threaded_results() {
    for dtype in [DType::F32, DType::BF16] {
        let (cache, objects) = setup(dtype);
        let expected = run(&cache, &objects);
        assert!(expected.dense.iter().flatten().all(|&x| !f32::from_bits(x).is_nan()));
        let runs = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (cache, objects, expected, runs) = (&cache, &objects, &expected, &runs);
                scope.spawn(move || {
                    for i in 0..ITERS {
                        let got = run(cache, objects);
                        assert!(got == *expected, "{dtype:?}: thread {t}, round {i} differs from one thread alone");
                        runs.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(runs.into_inner(), THREADS * ITERS);
    }
}

/// Readers run every read-only operation on sequences A, B, C under the shared lock while
/// a writer, under the exclusive lock, makes, fills, forks, appends to, truncates,
/// compacts, evicts from and frees other sequences; every read equals the single-threaded
/// one and the cache ends as it began.
#[test]
fn readers_beside_a_writer_see_their_sequences_unchanged() {
    let (cache, objects) = setup(DType::F16);
    let expected = run(&cache, &objects);
    let before = cache.stats();
    let shared: SharedKvCache = std::sync::Arc::new(parking_lot::RwLock::new(cache));
    let rounds = AtomicUsize::new(0);
    let writes = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS - 1 {
            let (shared, objects, expected, rounds) = (&shared, &objects, &expected, &rounds);
            scope.spawn(move || {
                for i in 0..ITERS {
                    let got = run(&shared.read(), objects);
                    assert!(got == *expected, "reader {t}, round {i} differs from one thread alone");
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let (shared, writes) = (&shared, &writes);
        scope.spawn(move || {
            let mut rng = Rng(99);
            for _ in 0..ITERS * 3 {
                let a = fill_sequence(&mut shared.write(), 300, &mut rng, 1.0);
                let f = {
                    let mut c = shared.write();
                    let f = c.fork(a).unwrap();
                    c.append(f, 20, None).unwrap();
                    f
                };
                {
                    let mut c = shared.write();
                    c.truncate(a, 130).unwrap();
                    let keep: Vec<u32> = (0..320).step_by(3).collect();
                    c.compact(f, KeepTokens::All(&keep)).unwrap();
                    c.evict_pages(a, &[1, 3]).unwrap();
                }
                let mut c = shared.write();
                c.free_sequence(f).unwrap();
                c.free_sequence(a).unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
            }
        });
    });
    assert_eq!(rounds.into_inner(), (THREADS - 1) * ITERS);
    assert_eq!(writes.into_inner(), ITERS * 3);
    let c = shared.read();
    c.check_invariants().unwrap();
    let after = c.stats();
    assert_eq!(
        (after.num_sequences, after.pages_used, after.num_tokens),
        (before.num_sequences, before.pages_used, before.num_tokens)
    );
    for (&id, &n) in objects.ids.iter().zip(&LENS) {
        assert_eq!(c.seq_len(id).unwrap(), n);
    }
}
