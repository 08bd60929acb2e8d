//! The paged KV store under random operation sequences, checked against a plain model
//! after every step: reference counts, free list, page tables, positions, stored K/V and
//! per-page key bounds. Failed operations must leave everything as it was.

mod common;
use common::Rng;
use kvsieve::{CacheConfig, DType, Error, KvCache, PageLayout, SeqId, TensorView};
use proptest::prelude::*;

const LAYERS: usize = 2;
const HEADS: usize = 2;
const DIM: usize = 8;
const ROW: usize = HEADS * DIM;

#[derive(Clone, Debug)]
struct Tok {
    pos: i32,
    k: [Option<Vec<f32>>; LAYERS],
    v: [Option<Vec<f32>>; LAYERS],
}

#[derive(Clone, Debug)]
enum Op {
    Create,
    Fork(usize),
    Append(usize, usize, bool),
    Write(usize, usize, usize, usize, u64),
    WriteSlots(usize, usize, u64),
    Truncate(usize, usize),
    Evict(usize, u32),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Fork),
        3 => (any::<usize>(), 0usize..40, any::<bool>()).prop_map(|(a, b, c)| Op::Append(a, b, c)),
        3 => (any::<usize>(), 0..LAYERS, any::<usize>(), 1usize..30, any::<u64>()).prop_map(|(a, b, c, d, e)| Op::Write(a, b, c, d, e)),
        1 => (any::<usize>(), 0..LAYERS, any::<u64>()).prop_map(|(a, b, c)| Op::WriteSlots(a, b, c)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Truncate(a, b)),
        1 => (any::<usize>(), any::<u32>()).prop_map(|(a, b)| Op::Evict(a, b)),
        1 => any::<usize>().prop_map(Op::Free),
    ]
}

struct Harness {
    cache: KvCache,
    model: Vec<(SeqId, Vec<Tok>)>,
}

/// Everything observable about the cache, to show a failed call changed nothing.
fn snapshot(c: &KvCache) -> String {
    let mut s = format!("{:?}", c.stats());
    for id in c.sequences() {
        s += &format!("|{id}:{:?}:{:?}", c.positions(id).unwrap(), c.seq_pages(id).unwrap());
        for l in 0..c.config().num_layers {
            s += &format!(":{:?}:{:?}", c.read_keys(id, l).unwrap(), c.read_values(id, l).unwrap());
        }
    }
    s
}

impl Harness {
    fn pick(&self, i: usize) -> Option<usize> {
        (!self.model.is_empty()).then(|| i % self.model.len())
    }

    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match *op {
            Op::Create => {
                let id = self.cache.create_sequence();
                self.model.push((id, Vec::new()));
            }
            Op::Fork(i) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let id = self.cache.fork(self.model[i].0)?;
                let toks = self.model[i].1.clone();
                self.model.push((id, toks));
            }
            Op::Append(i, n, explicit) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, toks) = &mut self.model[i];
                let start = toks.last().map_or(0, |t| t.pos + 1);
                let pos: Vec<i32> = if explicit {
                    (0..n as i32).map(|j| 1000 + 3 * j).collect()
                } else {
                    (0..n as i32).map(|j| start + j).collect()
                };
                let slots = self.cache.append(*id, n, explicit.then_some(&pos[..]))?;
                assert_eq!(slots.len(), n);
                toks.extend(pos.iter().map(|&p| Tok { pos: p, k: Default::default(), v: Default::default() }));
            }
            Op::Write(i, layer, start, n, seed) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, toks) = &mut self.model[i];
                if toks.is_empty() {
                    return Ok(());
                }
                let start = start % toks.len();
                let n = n.min(toks.len() - start);
                let mut rng = Rng(seed);
                let k = rng.vec(n * ROW, 2.0);
                let v = rng.vec(n * ROW, 1.0);
                // Write through a strided view (every other row of a larger buffer) half the time.
                if seed % 2 == 0 {
                    let mut big = vec![0f32; 2 * n * ROW];
                    for t in 0..n {
                        big[2 * t * ROW..(2 * t + 1) * ROW].copy_from_slice(&k[t * ROW..(t + 1) * ROW]);
                    }
                    let kv = TensorView::strided(&big, &[n, HEADS, DIM], &[2 * ROW, DIM, 1]).unwrap();
                    self.cache.write(*id, layer, start, &kv, &TensorView::new(&v, &[n, HEADS, DIM]).unwrap())?;
                } else {
                    self.cache.write(
                        *id,
                        layer,
                        start,
                        &TensorView::new(&k, &[n, HEADS, DIM]).unwrap(),
                        &TensorView::new(&v, &[n, HEADS, DIM]).unwrap(),
                    )?;
                }
                for t in 0..n {
                    toks[start + t].k[layer] = Some(k[t * ROW..(t + 1) * ROW].to_vec());
                    toks[start + t].v[layer] = Some(v[t * ROW..(t + 1) * ROW].to_vec());
                }
            }
            Op::WriteSlots(i, layer, seed) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, toks) = &mut self.model[i];
                let n = toks.len().min(5);
                if n == 0 {
                    return Ok(());
                }
                let mut rng = Rng(seed);
                let ps = self.cache.config().page_size;
                let pages = self.cache.seq_pages(*id).unwrap();
                let tokens: Vec<usize> = (0..n).map(|_| rng.below(toks.len())).collect();
                let slots: Vec<i64> = tokens.iter().map(|&t| (pages[t / ps] as usize * ps + t % ps) as i64).collect();
                let k = rng.vec(n * ROW, 2.0);
                let v = rng.vec(n * ROW, 1.0);
                self.cache.write_slots(
                    *id,
                    layer,
                    &slots,
                    &TensorView::new(&k, &[n, HEADS, DIM]).unwrap(),
                    &TensorView::new(&v, &[n, HEADS, DIM]).unwrap(),
                )?;
                for (j, &t) in tokens.iter().enumerate() {
                    toks[t].k[layer] = Some(k[j * ROW..(j + 1) * ROW].to_vec());
                    toks[t].v[layer] = Some(v[j * ROW..(j + 1) * ROW].to_vec());
                }
            }
            Op::Truncate(i, frac) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, toks) = &mut self.model[i];
                let new_len = frac % (toks.len() + 1);
                self.cache.truncate(*id, new_len)?;
                toks.truncate(new_len);
            }
            Op::Evict(i, mask) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, toks) = &mut self.model[i];
                let ps = self.cache.config().page_size;
                let np = toks.len().div_ceil(ps);
                let idx: Vec<usize> = (0..np.min(32)).filter(|p| mask >> p & 1 == 1).collect();
                self.cache.evict_pages(*id, &idx)?;
                for &p in idx.iter().rev() {
                    toks.drain(p * ps..((p + 1) * ps).min(toks.len()));
                }
            }
            Op::Free(i) => {
                let Some(i) = self.pick(i) else { return Ok(()) };
                let (id, _) = self.model.remove(i);
                self.cache.free_sequence(id)?;
            }
        }
        Ok(())
    }

    fn check(&self) {
        self.cache.check_invariants().unwrap();
        let ps = self.cache.config().page_size;
        let ids: Vec<SeqId> = self.model.iter().map(|m| m.0).collect();
        let table = self.cache.page_table(&ids).unwrap();
        table.as_ref().validate(ps, self.cache.config().capacity_pages).unwrap();
        let mut pages_used = std::collections::HashSet::new();
        for (b, (id, toks)) in self.model.iter().enumerate() {
            assert_eq!(self.cache.seq_len(*id).unwrap(), toks.len());
            assert_eq!(table.as_ref().seq_len(b, ps), toks.len());
            let pages = self.cache.seq_pages(*id).unwrap();
            let tp: Vec<u32> = table.indices[table.indptr[b] as usize..table.indptr[b + 1] as usize]
                .iter()
                .map(|&p| p as u32)
                .collect();
            assert_eq!(pages, tp);
            pages_used.extend(pages.iter().copied());
            let pos: Vec<i32> = toks.iter().map(|t| t.pos).collect();
            assert_eq!(self.cache.positions(*id).unwrap(), pos);
            for layer in 0..LAYERS {
                let keys = self.cache.read_keys(*id, layer).unwrap();
                let vals = self.cache.read_values(*id, layer).unwrap();
                for (t, tok) in toks.iter().enumerate() {
                    if let Some(k) = &tok.k[layer] {
                        assert_eq!(&keys[t * ROW..(t + 1) * ROW], &k[..], "seq {id} layer {layer} token {t} key");
                        assert_eq!(&vals[t * ROW..(t + 1) * ROW], &tok.v[layer].as_ref().unwrap()[..]);
                    }
                }
                for (pi, _) in pages.iter().enumerate() {
                    let (min, max) = self.cache.page_key_bounds(*id, layer, pi).unwrap();
                    let mut emin = vec![f32::INFINITY; ROW];
                    let mut emax = vec![f32::NEG_INFINITY; ROW];
                    for tok in &toks[pi * ps..((pi + 1) * ps).min(toks.len())] {
                        if let Some(k) = &tok.k[layer] {
                            for c in 0..ROW {
                                emin[c] = emin[c].min(k[c]);
                                emax[c] = emax[c].max(k[c]);
                            }
                        }
                    }
                    assert_eq!(min, emin, "seq {id} layer {layer} page {pi} min");
                    assert_eq!(max, emax, "seq {id} layer {layer} page {pi} max");
                }
            }
        }
        let st = self.cache.stats();
        assert_eq!(st.pages_used, pages_used.len());
        assert_eq!(st.pages_used + st.pages_free, st.pages_total);
        assert_eq!(st.num_sequences, self.model.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_keep_every_invariant(
        ops in proptest::collection::vec(op(), 1..60),
        page_size in prop_oneof![Just(1usize), Just(4), Just(16)],
        hnd in any::<bool>(),
    ) {
        let layout = if hnd { PageLayout::Hnd } else { PageLayout::Nhd };
        let cfg = CacheConfig::new(LAYERS, HEADS, DIM, page_size, 24).with_dtype(DType::F32).with_layout(layout);
        let mut h = Harness { cache: KvCache::new(cfg).unwrap(), model: Vec::new() };
        for op in &ops {
            let before = snapshot(&h.cache);
            match h.apply(op) {
                Ok(()) => {}
                Err(Error::OutOfPages { .. }) => prop_assert_eq!(&before, &snapshot(&h.cache), "failed {:?} changed the cache", op),
                Err(e) => panic!("{op:?}: unexpected error {e}"),
            }
            h.check();
        }
    }
}

#[test]
fn fork_shares_full_pages_and_copies_partial_last_page_on_write() {
    let cfg = CacheConfig::new(1, 1, 8, 4, 16).with_dtype(DType::F32);
    let mut c = KvCache::new(cfg).unwrap();
    let mut rng = Rng(7);
    let a = c.create_sequence();
    c.append(a, 6, None).unwrap();
    let k = rng.vec(6 * 8, 1.0);
    c.write(a, 0, 0, &TensorView::new(&k, &[6, 1, 8]).unwrap(), &TensorView::new(&k, &[6, 1, 8]).unwrap()).unwrap();
    let b = c.fork(a).unwrap();
    assert_eq!(c.stats().pages_used, 2);
    assert_eq!(c.seq_pages(a).unwrap(), c.seq_pages(b).unwrap());
    c.append(b, 1, None).unwrap();
    // The partial last page was copied; the full first page is still shared.
    let (pa, pb) = (c.seq_pages(a).unwrap(), c.seq_pages(b).unwrap());
    assert_eq!(pa[0], pb[0]);
    assert_ne!(pa[1], pb[1]);
    assert_eq!(c.page_refcount(pa[0]).unwrap(), 2);
    assert_eq!(c.stats().pages_used, 3);
    assert_eq!(c.read_keys(b, 0).unwrap()[..6 * 8], k[..]);
    assert_eq!(c.positions(b).unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
}

#[test]
fn out_of_pages_leaves_cache_unchanged() {
    let cfg = CacheConfig::new(1, 1, 8, 4, 3).with_dtype(DType::F16);
    let mut c = KvCache::new(cfg).unwrap();
    let a = c.create_sequence();
    c.append(a, 10, None).unwrap();
    let before = snapshot(&c);
    let err = c.append(a, 3, None).unwrap_err();
    assert!(matches!(err, Error::OutOfPages { needed: 1, free: 0 }), "{err}");
    assert_eq!(err.code(), kvsieve::ErrorCode::OutOfPages);
    assert_eq!(before, snapshot(&c));
}

#[test]
fn bad_input_names_the_parameter_and_changes_nothing() {
    let cfg = CacheConfig::new(2, 2, 8, 4, 8);
    assert!(KvCache::new(CacheConfig { page_size: 0, ..cfg }).unwrap_err().to_string().contains("page_size"));
    let e = KvCache::new(CacheConfig { head_dim: 12, ..cfg }).unwrap_err();
    assert_eq!(e.code(), kvsieve::ErrorCode::Unsupported);
    assert!(e.to_string().contains("head_dim"));
    let mut c = KvCache::new(cfg).unwrap();
    let a = c.create_sequence();
    c.append(a, 5, None).unwrap();
    let before = snapshot(&c);
    let k = vec![0.5f32; 5 * 2 * 8];
    let good = TensorView::new(&k, &[5, 2, 8]).unwrap();
    let bad = TensorView::new(&k[..5 * 2 * 4], &[5, 2, 4]).unwrap();
    let e = c.write(a, 0, 0, &bad, &good).unwrap_err();
    assert!(e.to_string().contains("`k`") && e.to_string().contains("[5, 2, 8]"), "{e}");
    let e = c.write(a, 0, 0, &good, &bad).unwrap_err();
    assert!(e.to_string().contains("`v`"), "{e}");
    assert!(c.write(a, 2, 0, &good, &good).unwrap_err().to_string().contains("layer"));
    assert!(c.write(a, 0, 1, &good, &good).unwrap_err().to_string().contains("start"));
    assert_eq!(c.write(99, 0, 0, &good, &good).unwrap_err(), Error::UnknownSequence(99));
    assert!(c.write_slots(a, 0, &[0, 1, 2, 3, 1000], &good, &good).unwrap_err().to_string().contains("slots[4]"));
    assert!(c.truncate(a, 6).unwrap_err().to_string().contains("new_len"));
    assert!(c.evict_pages(a, &[2]).unwrap_err().to_string().contains("page_indices[0]"));
    assert!(c.evict_pages(a, &[1, 0]).unwrap_err().to_string().contains("page_indices"));
    assert!(c.append(a, 2, Some(&[1])).unwrap_err().to_string().contains("positions"));
    assert!(TensorView::new(&k, &[5, 2, 9]).unwrap_err().to_string().contains("bytes"));
    assert_eq!(before, snapshot(&c));
}

mod compaction {
    use super::common::{fill_sequence, max_err, Rng};
    use kvsieve::attention::{reference, AttentionParams};
    use kvsieve::{CacheConfig, DType, Error, KeepTokens, KvCache, TensorView, TensorViewMut};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn attention_after_compaction_equals_reference_over_kept_tokens(
            len in 1usize..200, density in 0.05f32..1.0, per_head in any::<bool>(), seed in any::<u64>(),
        ) {
            let (layers, hk, d, hq) = (2, 2, 64, 4);
            let mut rng = Rng(seed);
            let mut cache = KvCache::new(CacheConfig::new(layers, hk, d, 16, 2 * len.div_ceil(16) + 1).with_dtype(DType::F16)).unwrap();
            let id = fill_sequence(&mut cache, len, &mut rng, 2.0);
            let other = cache.fork(id).unwrap();
            let k = ((len as f32 * density) as usize).clamp(1, len);
            let pick = |rng: &mut Rng| -> Vec<u32> {
                let mut all: Vec<u32> = (0..len as u32).collect();
                for i in 0..k { let j = i + rng.below(len - i); all.swap(i, j); }
                let mut v = all[..k].to_vec(); v.sort_unstable(); v
            };
            let lists: Vec<Vec<u32>> = if per_head { (0..layers * hk).map(|_| pick(&mut rng)).collect() } else { vec![pick(&mut rng)] };
            let q = rng.vec(hq * d, 1.0);
            let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
            let p = AttentionParams::default();
            let table = cache.page_table(&[id]).unwrap();
            let want: Vec<_> = (0..layers).map(|layer| {
                let kv = cache.layer_view(layer, &table).unwrap();
                let list = |h: usize| if per_head { &lists[layer * hk + h] } else { &lists[0] };
                reference::decode_selected(&kv, &qv, &p, &|_, h, t| list(h).binary_search(&(t as u32)).is_ok()).unwrap()
            }).collect();
            let positions_before = cache.positions(id).unwrap();
            let keep = if per_head { KeepTokens::PerHead(&lists) } else { KeepTokens::All(&lists[0]) };
            cache.compact(id, keep).unwrap();
            cache.check_invariants().unwrap();
            prop_assert_eq!(cache.seq_len(id).unwrap(), k);
            let expect_pos: Vec<i32> = lists[0].iter().map(|&t| positions_before[t as usize]).collect();
            prop_assert_eq!(cache.positions(id).unwrap(), expect_pos);
            prop_assert_eq!(cache.seq_len(other).unwrap(), len);
            for (layer, want) in want.iter().enumerate().take(layers) {
                let mut out = vec![f32::NAN; hq * d];
                let mut lse = vec![f32::NAN; hq];
                // The query token of the reference is the original last token; after compaction
                // decode attends every kept token, which is the same set.
                cache.decode(layer, &[id], &qv, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), Some(&mut lse), &p).unwrap();
                let (eo, el) = max_err(&out, &lse, want);
                prop_assert!(eo < 5e-5 && el < 5e-5, "layer {layer}: {eo} {el}");
                for pi in 0..k.div_ceil(16) {
                    let (mn, mx) = cache.page_key_bounds(id, layer, pi).unwrap();
                    let keys = cache.read_keys(id, layer).unwrap();
                    for c in 0..hk * d {
                        let col: Vec<f32> = (pi * 16..((pi + 1) * 16).min(k)).map(|t| keys[t * hk * d + c]).collect();
                        prop_assert_eq!(mn[c], col.iter().cloned().fold(f32::INFINITY, f32::min));
                        prop_assert_eq!(mx[c], col.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
                    }
                }
            }
        }
    }

    #[test]
    fn compaction_errors_change_nothing() {
        let mut rng = Rng(2);
        let mut cache = KvCache::new(CacheConfig::new(1, 1, 8, 4, 4)).unwrap();
        let id = fill_sequence(&mut cache, 12, &mut rng, 1.0);
        let before = super::snapshot(&cache);
        let e = cache.compact(id, KeepTokens::All(&vec![3, 2])).unwrap_err();
        assert!(e.to_string().contains("keep[0][1]"), "{e}");
        let e = cache.compact(id, KeepTokens::All(&vec![12])).unwrap_err();
        assert!(e.to_string().contains("keep[0][0]"), "{e}");
        let e = cache.compact(id, KeepTokens::PerLayer(&[vec![1], vec![2]])).unwrap_err();
        assert!(e.to_string().contains("keep"), "{e}");
        // 12 tokens fill 3 pages of 4; keeping 5 needs 2 free pages, the pool has 1.
        let e = cache.compact(id, KeepTokens::All(&vec![0, 1, 2, 3, 4])).unwrap_err();
        assert!(matches!(e, Error::OutOfPages { needed: 2, free: 1 }), "{e}");
        assert_eq!(before, super::snapshot(&cache));
    }
}
