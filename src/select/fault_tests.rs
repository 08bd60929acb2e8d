//! Failure injection for the selection layer: selections built from caller counts, cluster
//! index building, updating and loading, GemFilter and SnapKV. Every allocation point of
//! each operation is made to fail in turn: the error must be `OutOfMemory` and nothing the
//! operation was given may change. Requests that are valid but far too large must come back
//! as errors, never abort the process.

use crate::alloc::{fail_after, fail_each};
use crate::error::ErrorCode;
use crate::select::cluster::{calibrate, ClusterConfig, ClusterCount, ClusterIndex};
use crate::select::gemfilter::{self, GemFilterConfig, SnapKvConfig};
use crate::select::{lambda, streaming, window_pages_to_evict, KeySource, Selection};
use crate::tensor::TensorView;

const D: usize = 16;
const HK: usize = 2;

fn keys(n: usize, seed: u32) -> Vec<f32> {
    (0..n * HK * D)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5)
        .collect()
}

#[test]
fn selections_from_caller_counts_fail_cleanly() {
    let a = Selection::from_heads(50, vec![vec![1, 5, 9], vec![0, 49]]).unwrap();
    let b = Selection::from_heads(50, vec![vec![2, 5], vec![7]]).unwrap();
    type Make<'a> = Box<dyn Fn() -> crate::Result<Selection> + 'a>;
    let cases: Vec<(&str, Make)> = vec![
        ("dense", Box::new(|| Selection::dense(HK, 40))),
        ("streaming", Box::new(|| streaming(HK, 40, 4, 8))),
        ("lambda", Box::new(|| lambda(HK, 40, 4, 8))),
        ("from_heads", Box::new(|| Selection::from_heads(50, vec![vec![1, 2], vec![3]]))),
        ("same_for_all_heads", Box::new(|| Selection::same_for_all_heads(HK, 50, vec![1, 2, 3]))),
        ("union", Box::new(|| a.union(&b))),
        ("intersection", Box::new(|| a.intersection(&b))),
    ];
    for (name, op) in cases {
        let expected = op().unwrap();
        let (got, points) = fail_each(name, &mut (), |_| op(), |_, _| {});
        assert!(points >= 1, "{name}: no fallible allocation");
        assert_eq!(got, expected, "{name}");
    }
    let (pages, points) =
        fail_each("window_pages_to_evict", &mut (), |_| window_pages_to_evict(100, 4, 4, 8), |_, _| {});
    assert!(points >= 1);
    assert_eq!(pages, window_pages_to_evict(100, 4, 4, 8).unwrap());
}

/// Valid requests too large to allocate are errors: a dense selection of `u32::MAX` tokens
/// (its allocation made to fail rather than really exhausting memory), one past the u32
/// offsets (a named parameter), and the pages of a `usize::MAX`-token window.
#[test]
fn huge_selections_are_errors_not_aborts() {
    fail_after(Some(0));
    let e = Selection::dense(1, u32::MAX as usize).unwrap_err();
    fail_after(None);
    assert_eq!(e.code(), ErrorCode::OutOfMemory, "{e}");
    assert!(e.to_string().contains("selection indices"), "{e}");
    let e = Selection::dense(2, u32::MAX as usize).unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    assert!(e.to_string().contains("indices"), "{e}");
    fail_after(Some(0));
    let e = streaming(1, u32::MAX as usize, 4, u32::MAX as usize).unwrap_err();
    fail_after(None);
    assert_eq!(e.code(), ErrorCode::OutOfMemory, "{e}");
    let e = window_pages_to_evict(usize::MAX, 1, 0, 1).unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfMemory, "{e}");
    assert!(e.to_string().contains("pages"), "{e}");
}

fn index(n: usize, exclude: usize, coarse: bool) -> (Vec<f32>, ClusterConfig) {
    let mut cfg = ClusterConfig::new(ClusterCount::Absolute(6)).with_exclude_window(exclude).with_max_iter(5);
    if coarse {
        cfg = cfg.with_coarse(ClusterCount::Absolute(2));
    }
    (keys(n, 3), cfg)
}

#[test]
fn cluster_index_build_fails_cleanly() {
    for coarse in [false, true] {
        let (k, cfg) = index(80, 8, coarse);
        let t = TensorView::new(&k, &[80, HK, D]).unwrap();
        let expected = ClusterIndex::build(KeySource::Tensor(&t), &cfg).unwrap();
        let (got, points) =
            fail_each("ClusterIndex::build", &mut (), |_| ClusterIndex::build(KeySource::Tensor(&t), &cfg), |_, _| {});
        assert!(points >= 10, "only {points} allocation points");
        assert!(got == expected, "a build after failures equals a clean one");
    }
}

#[test]
fn cluster_index_update_is_all_or_nothing() {
    for coarse in [false, true] {
        let (k, cfg) = index(120, 8, coarse);
        let first = TensorView::new(&k[..80 * HK * D], &[80, HK, D]).unwrap();
        let all = TensorView::new(&k, &[120, HK, D]).unwrap();
        let mut ix = ClusterIndex::build(KeySource::Tensor(&first), &cfg).unwrap();
        let copy = ix.clone();
        let (assigned, points) = fail_each(
            "assign_new",
            &mut ix,
            |ix| ix.assign_new(KeySource::Tensor(&all)),
            |ix, n| assert!(*ix == copy, "allocation {n} failed and the index changed"),
        );
        assert_eq!(assigned, 40);
        assert!(points >= 5, "only {points} allocation points");
        assert_eq!(ix.clustered_len(), 112);
        let mut clean = copy.clone();
        clean.assign_new(KeySource::Tensor(&all)).unwrap();
        assert!(ix == clean);
        assert!(ix != copy);

        // A copy made fallibly equals the original.
        let (c, points) = fail_each("try_clone", &mut (), |_| ix.try_clone(), |_, _| {});
        assert!(points >= 5);
        assert!(c == ix);
    }
}

#[test]
fn cluster_index_rebuild_and_calibration_fail_cleanly() {
    let (k, cfg) = index(120, 8, true);
    let first = TensorView::new(&k[..80 * HK * D], &[80, HK, D]).unwrap();
    let all = TensorView::new(&k, &[120, HK, D]).unwrap();
    let mut ix = ClusterIndex::build(KeySource::Tensor(&first), &cfg).unwrap();
    let copy = ix.clone();
    let ((), points) = fail_each(
        "rebuild",
        &mut ix,
        |ix| ix.rebuild(KeySource::Tensor(&all)),
        |ix, n| assert!(*ix == copy, "rebuild: allocation {n} failed and the index changed"),
    );
    assert!(points >= 10, "only {points} allocation points");
    assert!(ix == ClusterIndex::build(KeySource::Tensor(&all), &cfg).unwrap());

    let q = keys(6, 5);
    let qv = TensorView::new(&q[..3 * 4 * D], &[3, 4, D]).unwrap();
    for per_head in [false, true] {
        let expected = calibrate(&ix, &qv, 0.3, per_head).unwrap();
        let (got, points) = fail_each("calibrate", &mut (), |_| calibrate(&ix, &qv, 0.3, per_head), |_, _| {});
        assert!(points >= 3, "only {points} allocation points");
        assert_eq!(got, expected);
    }
}

#[test]
fn cluster_index_loading_fails_cleanly() {
    for coarse in [false, true] {
        let (k, cfg) = index(80, 0, coarse);
        let t = TensorView::new(&k, &[80, HK, D]).unwrap();
        let ix = ClusterIndex::build(KeySource::Tensor(&t), &cfg).unwrap();
        let bytes = ix.to_bytes().unwrap();
        let (back, points) = fail_each("from_bytes", &mut (), |_| ClusterIndex::from_bytes(&bytes), |_, _| {});
        assert!(points >= 8, "only {points} allocation points");
        // Loading keeps no k-means++ seeds nor inertia history: compare what a file holds.
        let mut want = ix.clone();
        for h in &mut want.heads {
            h.seeds.clear();
            h.inertia_history = vec![h.inertia];
        }
        assert!(back == want, "the index loaded after failures differs");
    }
}

/// A key tensor of 2^50 rows (stride 0 over one row: valid, and tiny in memory) asks
/// for petabytes of work space: an error, not an abort.
#[test]
fn huge_key_tensors_are_errors_not_aborts() {
    let row = keys(1, 1);
    let n = 1usize << 50;
    let t = TensorView::strided(&row[..D], &[n, 1, D], &[0, 0, 1]).unwrap();
    let cfg = ClusterConfig::new(ClusterCount::Absolute(n / 2));
    let e = ClusterIndex::build(KeySource::Tensor(&t), &cfg).unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfMemory, "{e}");
    let e = ClusterIndex::build(KeySource::Tensor(&t), &ClusterConfig::new(ClusterCount::Absolute(n + 1))).unwrap_err();
    assert!(e.to_string().contains("clusters"), "{e}");
    let q = vec![0.5f32; D];
    let qv = TensorView::new(&q, &[1, D]).unwrap();
    let e = gemfilter::token_scores(&qv, KeySource::Tensor(&t)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::OutOfMemory, "{e}");
    let qw = TensorView::new(&q, &[1, 1, D]).unwrap();
    let cfg = SnapKvConfig { k: 4, pool_kernel: 1, scale: None };
    let e = gemfilter::snapkv(&qw, KeySource::Tensor(&t), &cfg).unwrap_err();
    assert!(matches!(e.code(), ErrorCode::OutOfMemory | ErrorCode::InvalidArgument), "{e}");
}

#[test]
fn gemfilter_and_snapkv_fail_cleanly() {
    let n = 300;
    let k = keys(n, 9);
    let t = TensorView::new(&k, &[n, HK, D]).unwrap();
    let q = keys(2, 4);
    let qv = TensorView::new(&q[..4 * D], &[4, D]).unwrap();
    let cfg = GemFilterConfig { k: 40, pool_kernel: 5, keep_first: 2, keep_last: 4 };
    let expected = gemfilter::select(&qv, KeySource::Tensor(&t), &cfg).unwrap();
    let (got, points) =
        fail_each("gemfilter::select", &mut (), |_| gemfilter::select(&qv, KeySource::Tensor(&t), &cfg), |_, _| {});
    assert!(points >= 4, "only {points} allocation points");
    assert_eq!(got, expected);

    let qw = TensorView::new(&q[..2 * HK * D], &[2, HK, D]).unwrap();
    let cfg = SnapKvConfig { k: 30, pool_kernel: 3, scale: None };
    let expected = gemfilter::snapkv(&qw, KeySource::Tensor(&t), &cfg).unwrap();
    let (got, points) =
        fail_each("snapkv", &mut (), |_| gemfilter::snapkv(&qw, KeySource::Tensor(&t), &cfg), |_, _| {});
    assert!(points >= 2, "only {points} allocation points");
    assert_eq!((got.per_head, got.union), (expected.per_head, expected.union));
    // k equal to the window keeps just the window (top-k of zero prefix tokens).
    let cfg = SnapKvConfig { k: 2, pool_kernel: 3, scale: None };
    let only = gemfilter::snapkv(&qw, KeySource::Tensor(&t), &cfg).unwrap();
    assert_eq!(only.union, vec![n as u32 - 2, n as u32 - 1]);
}
