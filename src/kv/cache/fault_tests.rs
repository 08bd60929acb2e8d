//! Failure injection (SQLite's method): every mutating operation is run with its `n`-th
//! fallible allocation failing, for every `n` up to the number it makes, and must then leave
//! the cache bit for bit as it was; and with its `n`-th commit step panicking, after which
//! the cache must refuse every call rather than show a half-made change.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::*;
use crate::alloc::{fail_after, panic_after};
use crate::attention::AttentionParams;
use crate::error::ErrorCode;
use crate::tensor::TensorViewMut;

const D: usize = 8;
const HK: usize = 2;
const LAYERS: usize = 2;

fn rows(n: usize, seed: u32) -> Vec<f32> {
    (0..n * HK * D)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5)
        .collect()
}

/// A cache with two sequences sharing pages: A (10 tokens, written), B forked from A.
fn setup(layout: crate::config::PageLayout) -> (KvCache, SeqId, SeqId) {
    let cfg = CacheConfig::new(LAYERS, HK, D, 4, 16).with_layout(layout);
    let mut c = KvCache::new(cfg).unwrap();
    let a = c.create_sequence();
    c.append(a, 10, None).unwrap();
    for layer in 0..LAYERS {
        let k = rows(10, 1 + layer as u32);
        let v = rows(10, 7 + layer as u32);
        c.write(a, layer, 0, &TensorView::new(&k, &[10, HK, D]).unwrap(), &TensorView::new(&v, &[10, HK, D]).unwrap())
            .unwrap();
    }
    let b = c.fork(a).unwrap();
    (c, a, b)
}

/// Everything an operation could change: sequences, pool, stored bytes, and a decode.
fn fingerprint(c: &KvCache, a: SeqId) -> (String, u64, Vec<u32>) {
    let mut h = DefaultHasher::new();
    for buf in c.k.iter().chain(c.v.iter()) {
        buf.bytes().hash(&mut h);
    }
    c.positions.hash(&mut h);
    if let Some(b) = &c.bounds {
        b.fingerprint(&mut h);
    }
    let state = format!("{:?} {:?} {:?}", c.seqs, c.pool, c.stats());
    let q = rows(4, 99);
    let mut out = vec![0f32; 4 * D];
    let q = TensorView::new(&q[..4 * D], &[1, 4, D]).unwrap();
    c.decode(0, &[a], &q, &mut TensorViewMut::new(&mut out, &[1, 4, D]).unwrap(), None, &AttentionParams::default())
        .unwrap();
    (state, h.finish(), out.iter().map(|x| x.to_bits()).collect())
}

type Op = fn(&mut KvCache, SeqId, SeqId) -> Result<()>;

fn ops() -> Vec<(&'static str, Op)> {
    vec![
        ("append into a shared page", |c, _, b| c.append(b, 7, None).map(drop)),
        ("write over shared pages", |c, _, b| {
            let k = rows(10, 3);
            c.write(b, 1, 0, &TensorView::new(&k, &[10, HK, D])?, &TensorView::new(&k, &[10, HK, D])?)
        }),
        ("write_slots", |c, a, _| {
            let k = rows(2, 5);
            let slots = [c.seq_pages(a)?[0] as i64 * 4 + 1, c.seq_pages(a)?[2] as i64 * 4];
            c.write_slots(a, 0, &slots, &TensorView::new(&k, &[2, HK, D])?, &TensorView::new(&k, &[2, HK, D])?)
        }),
        ("truncate into a shared page", |c, _, b| c.truncate(b, 5)),
        ("evict", |c, a, _| c.evict_pages(a, &[0, 2])),
        ("compact", |c, a, _| c.compact(a, KeepTokens::All(&vec![0, 3, 4, 8, 9]))),
        ("fork", |c, a, _| c.fork(a).map(drop)),
        ("free", |c, _, b| c.free_sequence(b)),
    ]
}

#[test]
fn a_failed_allocation_changes_nothing() {
    for layout in [crate::config::PageLayout::Nhd, crate::config::PageLayout::Hnd] {
        for (name, op) in ops() {
            let (mut c, a, b) = setup(layout);
            let before = fingerprint(&c, a);
            let mut failures = 0;
            loop {
                fail_after(Some(failures));
                let r = op(&mut c, a, b);
                fail_after(None);
                match r {
                    Err(e) => {
                        assert_eq!(e.code(), ErrorCode::OutOfMemory, "{name}: {e}");
                        assert!(e.to_string().contains("injected"), "{name}: {e}");
                        assert!(!c.is_poisoned(), "{name}");
                        c.check_invariants().unwrap_or_else(|m| panic!("{name}, allocation {failures}: {m}"));
                        assert!(
                            fingerprint(&c, a) == before,
                            "{name}: allocation {failures} failed and the cache changed"
                        );
                        failures += 1;
                    }
                    Ok(()) => break,
                }
            }
            c.check_invariants().unwrap();
            assert!(fingerprint(&c, a) != before, "{name}: the operation did nothing");
        }
    }
}

#[test]
fn a_panic_inside_a_change_poisons_the_cache() {
    for (name, op) in ops() {
        let mut steps = 0;
        loop {
            let (mut c, a, b) = setup(crate::config::PageLayout::Nhd);
            panic_after(Some(steps));
            let r = catch_unwind(AssertUnwindSafe(|| op(&mut c, a, b)));
            panic_after(None);
            match r {
                Err(_) => {
                    assert!(c.is_poisoned(), "{name}: step {steps}");
                    let refused = [
                        c.seq_len(a).map(drop),
                        c.append(a, 1, None).map(drop),
                        c.page_table(&[a]).map(drop),
                        c.truncate(a, 1),
                        c.fork(a).map(drop),
                    ];
                    for e in refused {
                        let e = e.expect_err("a poisoned cache refuses every call");
                        assert_eq!(e.code(), ErrorCode::Internal, "{name}: {e}");
                        assert!(e.to_string().contains("half-changed"), "{name}: {e}");
                    }
                    steps += 1;
                }
                Ok(r) => {
                    r.unwrap();
                    assert!(!c.is_poisoned(), "{name}");
                    c.check_invariants().unwrap();
                    break;
                }
            }
        }
        let has_steps = !matches!(name, "fork" | "free" | "evict");
        assert!(!has_steps || steps > 0, "{name}: no commit step was reached");
    }
}

#[test]
fn unwritten_slots_never_show_another_sequences_data() {
    // A page freed by one sequence and handed to another reads as zeros until written.
    let (mut c, a, b) = setup(crate::config::PageLayout::Nhd);
    c.free_sequence(b).unwrap();
    c.free_sequence(a).unwrap();
    let s = c.create_sequence();
    c.append(s, 9, None).unwrap();
    let table = c.page_table(&[s]).unwrap();
    let view = c.layer_view(0, &table).unwrap();
    for t in 0..9 {
        for h in 0..HK {
            assert!(
                view.key(0, t, h).iter().chain(view.value(0, t, h).iter()).all(|&x| x == 0.0),
                "token {t} head {h}"
            );
        }
    }
    // Slots a truncation dropped from a page the sequence keeps are cleared too: appended
    // again, they read as zeros, not as the tokens truncated away.
    let (mut c, a, b) = setup(crate::config::PageLayout::Hnd);
    c.free_sequence(b).unwrap();
    c.truncate(a, 9).unwrap();
    c.append(a, 1, None).unwrap();
    let table = c.page_table(&[a]).unwrap();
    let view = c.layer_view(0, &table).unwrap();
    for h in 0..HK {
        assert!(view.key(0, 9, h).iter().chain(view.value(0, 9, h).iter()).all(|&x| x == 0.0), "head {h}");
        assert!(view.key(0, 8, h).iter().any(|&x| x != 0.0), "the kept token keeps its K");
    }
    // A fork's copy of a shared last page keeps only the slots it holds: slots it appends
    // next read as zeros, not as the other sequence's tokens there.
    for layout in [crate::config::PageLayout::Nhd, crate::config::PageLayout::Hnd] {
        let (mut c, a, b) = setup(layout);
        c.truncate(b, 9).unwrap();
        c.append(b, 1, None).unwrap();
        let table = c.page_table(&[b, a]).unwrap();
        let view = c.layer_view(1, &table).unwrap();
        for h in 0..HK {
            assert!(view.key(0, 9, h).iter().all(|&x| x == 0.0), "{layout:?} head {h}: {:?}", view.key(0, 9, h));
            assert!(view.key(1, 9, h).iter().any(|&x| x != 0.0), "the other sequence keeps its token");
        }
    }
}
