//! CUDA attention against the CPU backend on seeded random inputs: paged append and key
//! bounds (through `CudaKvCache`, including fork / copy-on-write / truncate), dense and
//! sparse decode over f16 and bf16 pages, page sizes 16/32/64, head_dim 64/128, GQA groups,
//! NHD and HND layouts, RoPE at read in every position mode, soft cap, several output
//! dtypes, an engine-owned view, and merge_states. Outputs are poisoned (NaN bytes) before
//! every run. Without a GPU every test prints `skipped: <reason>` and passes.
#![cfg(feature = "cuda")]

mod cuda_util;

use std::sync::Arc;

use cuda_util::{assert_close, device_or_skip, Rng, POISON_BYTE};
use kvsieve::attention::{self, AttentionParams, PositionMode, RopeConfig, RopeStyle};
use kvsieve::backend::cuda::attention::{self as gpu, Workspace};
use kvsieve::backend::cuda::{
    CudaDevice, CudaKvCache, CudaPageTable, CudaPagedKv, CudaSelections, DeviceBuffer, DeviceTensor,
};
use kvsieve::{
    CacheConfig, DType, Error, KeepTokens, KeyRope, KvCache, PageLayout, PagedKv, PagedKvLayout, Selection, SeqId,
    TensorView, TensorViewMut,
};

/// The same operations on a CPU cache and a CUDA cache.
struct Pair {
    cpu: KvCache,
    gpu: CudaKvCache,
    ids: Vec<SeqId>,
}

impl Pair {
    fn new(dev: &Arc<CudaDevice>, cfg: CacheConfig) -> Pair {
        Pair { cpu: KvCache::new(cfg).unwrap(), gpu: CudaKvCache::new(dev, cfg).unwrap(), ids: Vec::new() }
    }

    fn create(&mut self) -> SeqId {
        let a = self.cpu.create_sequence();
        let b = self.gpu.create_sequence();
        assert_eq!(a, b);
        self.ids.push(a);
        a
    }

    fn fork(&mut self, src: SeqId) -> SeqId {
        let a = self.cpu.fork(src).unwrap();
        let b = self.gpu.fork(src).unwrap();
        assert_eq!(a, b);
        self.ids.push(a);
        a
    }

    fn append(&mut self, id: SeqId, n: usize, positions: Option<&[i32]>) {
        let a = self.cpu.append(id, n, positions).unwrap();
        let b = self.gpu.append(id, n, positions).unwrap();
        assert_eq!(a, b, "slot mappings");
    }

    /// Write random K/V for tokens start..start+n of every layer.
    fn write(&mut self, rng: &mut Rng, id: SeqId, start: usize, n: usize) {
        let c = *self.cpu.config();
        let m = n * c.num_kv_heads * c.head_dim;
        for layer in 0..c.num_layers {
            let k = rng.vec(m, 2.0);
            let v = rng.vec(m, 1.0);
            let shape = [n, c.num_kv_heads, c.head_dim];
            let (kt, vt) = (TensorView::new(&k, &shape).unwrap(), TensorView::new(&v, &shape).unwrap());
            self.cpu.write(id, layer, start, &kt, &vt).unwrap();
            self.gpu.write(id, layer, start, &kt, &vt).unwrap();
        }
    }

    fn truncate(&mut self, id: SeqId, len: usize) {
        self.cpu.truncate(id, len).unwrap();
        self.gpu.truncate(id, len).unwrap();
    }

    /// Everything the two caches hold must agree exactly.
    fn check_same(&self) {
        self.gpu.check_invariants().unwrap();
        let c = *self.cpu.config();
        for &id in &self.ids {
            assert_eq!(self.cpu.seq_len(id).unwrap(), self.gpu.seq_len(id).unwrap());
            assert_eq!(self.cpu.seq_pages(id).unwrap(), self.gpu.seq_pages(id).unwrap());
            assert_eq!(self.cpu.positions(id).unwrap(), self.gpu.positions(id).unwrap());
            for layer in 0..c.num_layers {
                assert_eq!(
                    self.cpu.read_keys(id, layer).unwrap(),
                    self.gpu.read_keys(id, layer).unwrap(),
                    "keys of seq {id} layer {layer}"
                );
                assert_eq!(
                    self.cpu.read_values(id, layer).unwrap(),
                    self.gpu.read_values(id, layer).unwrap(),
                    "values of seq {id} layer {layer}"
                );
                if c.track_key_bounds {
                    for pi in 0..self.cpu.seq_pages(id).unwrap().len() {
                        let want = self.cpu.page_key_bounds(id, layer, pi).unwrap();
                        let got = self.gpu.page_key_bounds(id, layer, pi).unwrap();
                        assert_eq!(got, want, "key bounds of seq {id} layer {layer} page {pi}");
                    }
                }
            }
        }
    }
}

/// A poisoned device buffer for `n` elements of `dtype`.
fn poisoned(dev: &Arc<CudaDevice>, n: usize, dtype: DType) -> DeviceBuffer {
    let b = DeviceBuffer::alloc(dev, (n * dtype.size()).max(1)).unwrap();
    b.memset(POISON_BYTE, dev.stream()).unwrap();
    b
}

fn to_dtype_bytes(x: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = vec![0u8; x.len() * dtype.size()];
    let mut t = TensorViewMut::from_bytes(&mut out, dtype, &[x.len()], &[1]).unwrap();
    for (i, &v) in x.iter().enumerate() {
        t.set(&[i], v);
    }
    out
}

fn from_dtype_bytes(b: &[u8], dtype: DType) -> Vec<f32> {
    let n = b.len() / dtype.size();
    let t = TensorView::from_bytes(b, dtype, &[n], &[1]).unwrap();
    (0..n).map(|i| t.get(&[i])).collect()
}

fn cfg(dtype: DType, page_size: usize, hk: usize, d: usize, layout: PageLayout, pages: usize) -> CacheConfig {
    CacheConfig::new(2, hk, d, page_size, pages).with_dtype(dtype).with_layout(layout)
}

#[test]
fn append_and_key_bounds_match_cpu() {
    let Some(dev) = device_or_skip("append_and_key_bounds_match_cpu") else { return };
    let mut seed = 1u64;
    for dtype in [DType::F16, DType::BF16] {
        for page_size in [16, 32, 64] {
            for (d, layout) in [(64, PageLayout::Nhd), (128, PageLayout::Hnd)] {
                seed += 1;
                let mut rng = Rng(seed);
                let mut p = Pair::new(&dev, cfg(dtype, page_size, 2, d, layout, 64));
                let a = p.create();
                let n0 = 2 * page_size + 5;
                p.append(a, n0, None);
                p.write(&mut rng, a, 0, n0);
                p.check_same();
                // Overwrite a few slots (bounds recomputed), extend, fork and diverge (copy on write).
                p.write(&mut rng, a, 3, 4);
                let b = p.fork(a);
                p.append(b, 7, Some(&[100, 101, 102, 200, 201, 202, 300]));
                p.write(&mut rng, b, n0, 7);
                p.write(&mut rng, a, page_size + 1, 2);
                p.append(a, 1, None);
                p.write(&mut rng, a, n0, 1);
                p.check_same();
                // Truncate into a shared page, then one page boundary exactly.
                let c = p.fork(b);
                p.truncate(c, page_size + 3);
                p.truncate(b, page_size);
                p.append(b, 3, None);
                p.write(&mut rng, b, page_size, 3);
                p.check_same();
                // Device-side rows: f16 device tensors written with write_device.
                let hk = 2;
                let rows = rng.vec(3 * hk * d, 1.5);
                let kb = DeviceBuffer::from_slice(&dev, &to_dtype_bytes(&rows, DType::F16), dev.stream()).unwrap();
                let vb = DeviceBuffer::from_slice(&dev, &to_dtype_bytes(&rows, DType::F16), dev.stream()).unwrap();
                let kt = kb.tensor(DType::F16, &[3, hk, d]).unwrap();
                let vt = vb.tensor(DType::F16, &[3, hk, d]).unwrap();
                let len = p.cpu.seq_len(c).unwrap();
                p.append(c, 3, None);
                let host = to_dtype_bytes(&rows, DType::F16);
                let ht = TensorView::from_bytes(&host, DType::F16, &[3, hk, d], &[hk * d, d, 1]).unwrap();
                for layer in 0..2 {
                    p.cpu.write(c, layer, len, &ht, &ht).unwrap();
                    // SAFETY: kb/vb hold [3, hk, d] f16 and live through the call.
                    unsafe { p.gpu.write_device(c, layer, len, &kt, &vt).unwrap() };
                }
                p.check_same();
            }
        }
    }
}

/// Eviction and compaction (one list, per layer, per head; from a shared page) leave the
/// device cache equal to the host cache: pages, positions, K/V and key bounds.
#[test]
fn evict_and_compact_match_cpu() {
    let Some(dev) = device_or_skip("evict_and_compact_match_cpu") else { return };
    let mut seed = 40u64;
    for dtype in [DType::F16, DType::BF16] {
        for (page_size, layout) in [(16, PageLayout::Nhd), (32, PageLayout::Hnd)] {
            seed += 1;
            let mut rng = Rng(seed);
            let mut p = Pair::new(&dev, cfg(dtype, page_size, 2, 64, layout, 96));
            let a = p.create();
            let n = 5 * page_size + 7;
            let pos: Vec<i32> = (0..n as i32).map(|t| 3 * t + 1).collect();
            p.append(a, n, Some(&pos));
            p.write(&mut rng, a, 0, n);
            let b = p.fork(a);
            // Evict the second and the last page of the fork (shared pages just lose a reference).
            p.cpu.evict_pages(b, &[1, 5]).unwrap();
            p.gpu.evict_pages(b, &[1, 5]).unwrap();
            p.check_same();
            let bad = p.gpu.evict_pages(b, &[2, 2]).unwrap_err();
            assert!(bad.to_string().contains("page_indices"), "{bad}");
            // Compact: the same tokens everywhere, then per layer, then per head.
            let len = p.cpu.seq_len(a).unwrap() as u32;
            let all: Vec<u32> = (0..len).filter(|t| t % 3 != 1).collect();
            let c = p.fork(a);
            p.cpu.compact(c, KeepTokens::All(&all)).unwrap();
            p.gpu.compact(c, KeepTokens::All(&all)).unwrap();
            p.check_same();
            let k = 40usize;
            let per_layer: Vec<Vec<u32>> = (0..2).map(|l| (0..k as u32).map(|i| i * 2 + l).collect()).collect();
            let d = p.fork(a);
            p.cpu.compact(d, KeepTokens::PerLayer(&per_layer)).unwrap();
            p.gpu.compact(d, KeepTokens::PerLayer(&per_layer)).unwrap();
            p.check_same();
            let per_head: Vec<Vec<u32>> =
                (0..4).map(|j| (0..k as u32).map(|i| len - 1 - (k as u32 - 1 - i) * (1 + j % 2)).collect()).collect();
            p.cpu.compact(a, KeepTokens::PerHead(&per_head)).unwrap();
            p.gpu.compact(a, KeepTokens::PerHead(&per_head)).unwrap();
            p.check_same();
            // Checks come first: a descending list changes nothing.
            let before = p.gpu.seq_pages(b).unwrap();
            let e = p.gpu.compact(b, KeepTokens::All(&vec![3, 2])).unwrap_err();
            assert!(e.to_string().contains("keep[0][1]"), "{e}");
            assert_eq!(p.gpu.seq_pages(b).unwrap(), before);
            // The compacted sequence grows on as usual.
            p.append(c, 3, None);
            let l = p.cpu.seq_len(c).unwrap();
            p.write(&mut rng, c, l - 3, 3);
            p.check_same();
        }
    }
}

/// A filled pair of caches: `lens` sequences with random contents in every layer.
fn filled(dev: &Arc<CudaDevice>, c: CacheConfig, lens: &[usize], rng: &mut Rng, positions: bool) -> Pair {
    let mut p = Pair::new(dev, c);
    for &n in lens {
        let id = p.create();
        if n == 0 {
            continue;
        }
        // Positions with gaps (as after eviction) when asked, else 0..n.
        let pos: Vec<i32> = if positions {
            let mut x = rng.below(50) as i32;
            (0..n)
                .map(|_| {
                    x += 1 + rng.below(3) as i32;
                    x
                })
                .collect()
        } else {
            (0..n as i32).collect()
        };
        p.append(id, n, Some(&pos));
        p.write(rng, id, 0, n);
    }
    p
}

struct Case {
    dtype: DType,
    page_size: usize,
    d: usize,
    hk: usize,
    group: usize,
    layout: PageLayout,
    lens: Vec<usize>,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut i = 0;
    for dtype in [DType::F16, DType::BF16] {
        for page_size in [16, 32, 64] {
            for d in [64, 128] {
                let group = [1, 3, 4, 8, 2, 16][i % 6];
                let layout = if i % 2 == 0 { PageLayout::Nhd } else { PageLayout::Hnd };
                let hk = 1 + i % 3;
                let lens = vec![1 + (i * 37) % 300, 0, 700 + i * 13, page_size];
                v.push(Case { dtype, page_size, d, hk, group, layout, lens });
                i += 1;
            }
        }
    }
    // The kernels are instantiated per (dtype, head_dim, query rows per block: 1, 2, 4 or 8
    // for GQA groups 1, 2, 3-4 and 5+): add a case for each instantiation not reached above.
    let rows = |g: usize| match g {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    };
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for group in [1, 2, 4, 8] {
                if !v.iter().any(|c| c.dtype == dtype && c.d == d && rows(c.group) == group) {
                    let layout = if i % 2 == 0 { PageLayout::Nhd } else { PageLayout::Hnd };
                    v.push(Case { dtype, page_size: 16, d, hk: 2, group, layout, lens: vec![45 + i, 0, 130 + 7 * i] });
                    i += 1;
                }
            }
        }
    }
    v
}

/// Run CPU and GPU decode (dense, or sparse over `sels`) and compare outputs and LSEs.
#[allow(clippy::too_many_arguments)]
fn compare_decode(
    dev: &Arc<CudaDevice>,
    p: &Pair,
    hq: usize,
    params: &AttentionParams,
    sels: Option<&[Selection]>,
    out_dtype: DType,
    rng: &mut Rng,
    what: &str,
) {
    let c = *p.cpu.config();
    let d = c.head_dim;
    let batch = p.ids.len();
    let q = rng.vec(batch * hq * d, 1.0);
    let layer = 1;

    // CPU reference.
    let table = p.cpu.page_table(&p.ids).unwrap();
    let view = p.cpu.layer_view(layer, &table).unwrap();
    let qt = TensorView::new(&q, &[batch, hq, d]).unwrap();
    let mut want_bytes = vec![0u8; batch * hq * d * out_dtype.size()];
    let mut want_lse = vec![0f32; batch * hq];
    {
        let mut ot = TensorViewMut::from_bytes(&mut want_bytes, out_dtype, &[batch, hq, d], &[hq * d, d, 1]).unwrap();
        match sels {
            None => attention::decode(&view, &qt, &mut ot, Some(&mut want_lse), params).unwrap(),
            Some(s) => {
                let refs: Vec<&Selection> = s.iter().collect();
                attention::decode_sparse(&view, &qt, &refs, &mut ot, Some(&mut want_lse), params).unwrap()
            }
        }
    }
    let want = from_dtype_bytes(&want_bytes, out_dtype);

    // GPU; the query goes up as f16 one time in three to exercise the query dtypes.
    let q_dtype = [DType::F32, DType::F16, DType::F32][rng.below(3)];
    let q_host = to_dtype_bytes(&q, q_dtype);
    let q_cpu_round = from_dtype_bytes(&q_host, q_dtype);
    let qb = DeviceBuffer::from_slice(dev, &q_host, dev.stream()).unwrap();
    let qd = qb.tensor(q_dtype, &[batch, hq, d]).unwrap();
    let ob = poisoned(dev, batch * hq * d, out_dtype);
    let lb = poisoned(dev, batch * hq, DType::F32);
    let od = ob.tensor(out_dtype, &[batch, hq, d]).unwrap();
    let ld = lb.tensor(DType::F32, &[batch, hq]).unwrap();
    let gt = p.gpu.page_table(&p.ids).unwrap();
    let gv = p.gpu.layer_view(layer, &gt).unwrap();
    let ws = Workspace::new(dev);
    let stream = dev.stream();
    let gsel = sels.map(|s| {
        let refs: Vec<&Selection> = s.iter().collect();
        CudaSelections::upload(dev, &refs, c.num_kv_heads, stream).unwrap()
    });
    // SAFETY: every buffer lives until the stream is synchronised below.
    unsafe {
        match &gsel {
            None => gpu::decode(&gv, &qd, &od, Some(&ld), params, &ws, stream).unwrap(),
            Some(s) => gpu::decode_sparse(&gv, &qd, s, &od, Some(&ld), params, &ws, stream).unwrap(),
        }
    }
    stream.synchronize().unwrap();
    let got = from_dtype_bytes(&ob.to_vec::<u8>(stream).unwrap(), out_dtype);
    let got_lse: Vec<f32> = lb.to_vec(stream).unwrap();

    // The GPU may have read a rounded query: recompute the reference with it when so.
    let (want, want_lse) = if q_dtype == DType::F32 {
        (want, want_lse)
    } else {
        let qt = TensorView::new(&q_cpu_round, &[batch, hq, d]).unwrap();
        let mut wb = vec![0u8; batch * hq * d * out_dtype.size()];
        let mut wl = vec![0f32; batch * hq];
        let mut ot = TensorViewMut::from_bytes(&mut wb, out_dtype, &[batch, hq, d], &[hq * d, d, 1]).unwrap();
        match sels {
            None => attention::decode(&view, &qt, &mut ot, Some(&mut wl), params).unwrap(),
            Some(s) => {
                let refs: Vec<&Selection> = s.iter().collect();
                attention::decode_sparse(&view, &qt, &refs, &mut ot, Some(&mut wl), params).unwrap()
            }
        }
        (from_dtype_bytes(&wb, out_dtype), wl)
    };
    let (atol, rtol) = match out_dtype {
        DType::F32 => (2e-4, 2e-3),
        DType::F16 => (2e-3, 2e-3),
        DType::BF16 => (1e-2, 1e-2),
    };
    assert_close(&format!("{what}: out"), &got, &want, atol, rtol);
    assert_close(&format!("{what}: lse"), &got_lse, &want_lse, 1e-3, 1e-4);
}

#[test]
fn dense_decode_matches_cpu() {
    let Some(dev) = device_or_skip("dense_decode_matches_cpu") else { return };
    for (i, cs) in cases().into_iter().enumerate() {
        let mut rng = Rng(100 + i as u64);
        let c = cfg(cs.dtype, cs.page_size, cs.hk, cs.d, cs.layout, 128);
        let p = filled(&dev, c, &cs.lens, &mut rng, false);
        let hq = cs.hk * cs.group;
        let what = format!(
            "dense {:?} ps {} d {} hk {} group {} {:?}",
            cs.dtype, cs.page_size, cs.d, cs.hk, cs.group, cs.layout
        );
        // Automatic split, a forced split into many chunks, and soft cap with a custom scale.
        compare_decode(&dev, &p, hq, &AttentionParams::default(), None, DType::F32, &mut rng, &what);
        let split = AttentionParams { chunk_size: Some(64), ..Default::default() };
        compare_decode(&dev, &p, hq, &split, None, DType::F32, &mut rng, &format!("{what}, chunk 64"));
        let capped = AttentionParams {
            scale: Some(0.3),
            logit_soft_cap: Some(5.0),
            chunk_size: Some(128),
            ..Default::default()
        };
        let out_dtype = [DType::F16, DType::BF16][i % 2];
        compare_decode(&dev, &p, hq, &capped, None, out_dtype, &mut rng, &format!("{what}, soft cap, out {out_dtype}"));
    }
}

/// Random per-head selections: some empty, some dense, some with the last token missing.
fn random_selections(p: &Pair, rng: &mut Rng) -> Vec<Selection> {
    let hk = p.cpu.config().num_kv_heads;
    p.ids
        .iter()
        .map(|&id| {
            let n = p.cpu.seq_len(id).unwrap();
            let heads: Vec<Vec<u32>> = (0..hk)
                .map(|h| match (h + rng.below(5)) % 5 {
                    0 => Vec::new(),
                    1 => (0..n as u32).collect(),
                    _ => {
                        let keep = 1 + rng.below(8);
                        (0..n as u32).filter(|_| rng.below(keep + 1) != 0).collect()
                    }
                })
                .collect();
            Selection::from_heads(n, heads).unwrap()
        })
        .collect()
}

#[test]
fn sparse_decode_matches_cpu() {
    let Some(dev) = device_or_skip("sparse_decode_matches_cpu") else { return };
    for (i, cs) in cases().into_iter().enumerate() {
        let mut rng = Rng(200 + i as u64);
        let c = cfg(cs.dtype, cs.page_size, cs.hk, cs.d, cs.layout, 128);
        let p = filled(&dev, c, &cs.lens, &mut rng, false);
        let hq = cs.hk * cs.group;
        let sels = random_selections(&p, &mut rng);
        let what = format!("sparse {:?} ps {} d {} hk {} group {}", cs.dtype, cs.page_size, cs.d, cs.hk, cs.group);
        compare_decode(&dev, &p, hq, &AttentionParams::default(), Some(&sels), DType::F32, &mut rng, &what);
        let split = AttentionParams { chunk_size: Some(64), ..Default::default() };
        compare_decode(&dev, &p, hq, &split, Some(&sels), DType::F32, &mut rng, &format!("{what}, chunk 64"));
    }
}

#[test]
fn rope_at_read_matches_cpu() {
    let Some(dev) = device_or_skip("rope_at_read_matches_cpu") else { return };
    let mut i = 0u64;
    for dtype in [DType::F16, DType::BF16] {
        for (d, style, rotary_dim) in [
            (64, RopeStyle::AdjacentPairs, 0),
            (128, RopeStyle::HalfSplit, 0),
            (64, RopeStyle::HalfSplit, 32),
            (128, RopeStyle::AdjacentPairs, 96),
        ] {
            i += 1;
            let mut rng = Rng(300 + i);
            let page_size = [16, 32, 64][i as usize % 3];
            let c = cfg(dtype, page_size, 2, d, PageLayout::Nhd, 128).with_key_rope(KeyRope::PreRope);
            let p = filled(&dev, c, &[900, 37, 0, 300], &mut rng, true);
            let mut rope = RopeConfig::new(10000.0, style).with_rotary_dim(rotary_dim);
            if i.is_multiple_of(2) {
                rope.position_scale = 2.0;
            }
            let sels = random_selections(&p, &mut rng);
            for positions in
                [PositionMode::Original, PositionMode::Contiguous, PositionMode::Capped { max_distance: 100 }]
            {
                let params =
                    AttentionParams { rope: Some(rope), positions, chunk_size: Some(128), ..Default::default() };
                let what = format!("rope {dtype} d {d} {style:?} rotary {rotary_dim} {positions:?}");
                compare_decode(&dev, &p, 6, &params, None, DType::F32, &mut rng, &format!("{what}, dense"));
                compare_decode(&dev, &p, 6, &params, Some(&sels), DType::F32, &mut rng, &format!("{what}, sparse"));
            }
        }
    }
}

/// An engine-owned view (HND pages with padded strides, device page table) written with
/// `attention::append` and read by decode, against the CPU over the same host arrays.
#[test]
fn engine_view_append_and_decode_match_cpu() {
    let Some(dev) = device_or_skip("engine_view_append_and_decode_match_cpu") else { return };
    let stream = dev.stream();
    for (i, dtype) in [DType::F16, DType::BF16].into_iter().enumerate() {
        let mut rng = Rng(400 + i as u64);
        let (num_pages, page_size, hk, d) = (24, 16, 2, 128);
        // HND with 8 spare elements after each head row block: strides [page, slot, head].
        let head_stride = page_size * d + 8;
        let page_stride = hk * head_stride;
        let layout = PagedKvLayout {
            dtype,
            num_pages,
            page_size,
            num_kv_heads: hk,
            head_dim: d,
            k_strides: [page_stride, d, head_stride],
            v_strides: [page_stride, d, head_stride],
        };
        let elems = num_pages * page_stride;
        let kb = DeviceBuffer::zeroed(&dev, elems * 2, stream).unwrap();
        let vb = DeviceBuffer::zeroed(&dev, elems * 2, stream).unwrap();
        // Two sequences on scattered pages.
        let lens = [70usize, 33];
        let mut free: Vec<i32> = (0..num_pages as i32).rev().collect();
        let mut indices = Vec::new();
        let mut indptr = vec![0i32];
        let mut last = Vec::new();
        for &n in &lens {
            for _ in 0..n.div_ceil(page_size) {
                let at = rng.below(free.len());
                indices.push(free.remove(at));
            }
            indptr.push(indices.len() as i32);
            last.push((n - (n.div_ceil(page_size) - 1) * page_size) as i32);
        }
        // Slot mapping and rows for every token of both sequences.
        let mut slots = Vec::new();
        for (b, &n) in lens.iter().enumerate() {
            for t in 0..n {
                slots.push(
                    (indices[indptr[b] as usize + t / page_size] as i64) * page_size as i64 + (t % page_size) as i64,
                );
            }
        }
        slots.push(-1); // a padded token: skipped
        let total = slots.len();
        let k_rows = rng.vec(total * hk * d, 1.0);
        let v_rows = rng.vec(total * hk * d, 1.0);
        let kr = DeviceBuffer::from_slice(&dev, &k_rows, stream).unwrap();
        let vr = DeviceBuffer::from_slice(&dev, &v_rows, stream).unwrap();
        let sb = DeviceBuffer::from_slice(&dev, &slots, stream).unwrap();
        let table = CudaPageTable::upload(
            &dev,
            kvsieve::PageTableRef { indptr: &indptr, indices: &indices, last_page_len: &last },
            page_size,
            num_pages,
            stream,
        )
        .unwrap();
        // SAFETY: kb/vb hold `elems` elements in this layout; all buffers outlive the work.
        let view = unsafe { CudaPagedKv::from_raw(kb.ptr(), vb.ptr(), layout, &table).unwrap() };
        unsafe {
            gpu::append(
                &dev,
                &view,
                &kr.tensor(DType::F32, &[total, hk, d]).unwrap(),
                &vr.tensor(DType::F32, &[total, hk, d]).unwrap(),
                sb.ptr(),
                stream,
            )
            .unwrap();
        }
        stream.synchronize().unwrap();
        // The CPU view over the downloaded pages must hold the rows, rounded to the dtype.
        let k_host: Vec<u8> = kb.to_vec(stream).unwrap();
        let v_host: Vec<u8> = vb.to_vec(stream).unwrap();
        let cpu_table =
            kvsieve::PageTable { indptr: indptr.clone(), indices: indices.clone(), last_page_len: last.clone() };
        // SAFETY: the host copies hold the whole layout.
        let cpu_view =
            unsafe { PagedKv::from_raw(k_host.as_ptr(), v_host.as_ptr(), layout, cpu_table.as_ref()).unwrap() };
        let mut row = 0;
        for (b, &n) in lens.iter().enumerate() {
            for t in 0..n {
                for h in 0..hk {
                    let want: Vec<f32> = k_rows[(row * hk + h) * d..(row * hk + h + 1) * d]
                        .iter()
                        .map(|&x| round_to(x, dtype))
                        .collect();
                    assert_eq!(cpu_view.key(b, t, h), want, "appended key seq {b} token {t} head {h}");
                    let want: Vec<f32> = v_rows[(row * hk + h) * d..(row * hk + h + 1) * d]
                        .iter()
                        .map(|&x| round_to(x, dtype))
                        .collect();
                    assert_eq!(cpu_view.value(b, t, h), want, "appended value seq {b} token {t} head {h}");
                }
                row += 1;
            }
        }
        // Decode with 8 query heads, output bf16 with a padded head stride.
        let hq = 8;
        let q = rng.vec(2 * hq * d, 1.0);
        let qt = TensorView::new(&q, &[2, hq, d]).unwrap();
        let mut want = vec![0f32; 2 * hq * d];
        let mut want_lse = vec![0f32; 2 * hq];
        attention::decode(
            &cpu_view,
            &qt,
            &mut TensorViewMut::new(&mut want, &[2, hq, d]).unwrap(),
            Some(&mut want_lse),
            &AttentionParams::default(),
        )
        .unwrap();
        let qb = DeviceBuffer::from_slice(&dev, &q, stream).unwrap();
        let ob = poisoned(&dev, 2 * hq * (d + 16), DType::F32);
        let od = DeviceTensor::strided(ob.ptr(), DType::F32, &[2, hq, d], &[hq * (d + 16), d + 16, 1], dev.ordinal())
            .unwrap();
        let ws = Workspace::new(&dev);
        unsafe {
            gpu::decode(
                &view,
                &qb.tensor(DType::F32, &[2, hq, d]).unwrap(),
                &od,
                None,
                &AttentionParams::default(),
                &ws,
                stream,
            )
            .unwrap()
        };
        let all: Vec<f32> = ob.to_vec(stream).unwrap();
        let got: Vec<f32> = (0..2 * hq).flat_map(|r| all[r * (d + 16)..r * (d + 16) + d].to_vec()).collect();
        assert_close("engine view decode", &got, &want, 2e-4, 2e-3);
    }
}

fn round_to(x: f32, dtype: DType) -> f32 {
    from_dtype_bytes(&to_dtype_bytes(&[x], dtype), dtype)[0]
}

#[test]
fn merge_states_matches_cpu() {
    let Some(dev) = device_or_skip("merge_states_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(500);
    for (n, h, d, dtype) in [(3, 4, 64, DType::F32), (5, 2, 128, DType::F16), (1, 7, 64, DType::BF16)] {
        let va = rng.vec(n * h * d, 1.0);
        let vb = rng.vec(n * h * d, 1.0);
        let mut la: Vec<f32> = rng.vec(n * h, 4.0);
        let mut lb: Vec<f32> = rng.vec(n * h, 4.0);
        la[0] = f32::NEG_INFINITY;
        lb[1.min(n * h - 1)] = f32::NEG_INFINITY;
        if n * h > 2 {
            la[2] = f32::NEG_INFINITY;
            lb[2] = f32::NEG_INFINITY;
        }
        let (va_b, vb_b) = (to_dtype_bytes(&va, dtype), to_dtype_bytes(&vb, dtype));
        let mut want = vec![0f32; n * h * d];
        let mut want_lse = vec![0f32; n * h];
        let sh = [n, h, d];
        let st = [h * d, d, 1];
        attention::merge_states(
            &TensorView::from_bytes(&va_b, dtype, &sh, &st).unwrap(),
            &la,
            &TensorView::from_bytes(&vb_b, dtype, &sh, &st).unwrap(),
            &lb,
            &mut TensorViewMut::new(&mut want, &sh).unwrap(),
            &mut want_lse,
        )
        .unwrap();
        let bufs: Vec<DeviceBuffer> =
            [&va_b, &vb_b].iter().map(|b| DeviceBuffer::from_slice(&dev, b, stream).unwrap()).collect();
        let lab = DeviceBuffer::from_slice(&dev, &la, stream).unwrap();
        let lbb = DeviceBuffer::from_slice(&dev, &lb, stream).unwrap();
        let ob = poisoned(&dev, n * h * d, DType::F32);
        let lo = poisoned(&dev, n * h, DType::F32);
        unsafe {
            gpu::merge_states(
                &dev,
                &bufs[0].tensor(dtype, &sh).unwrap(),
                &lab.tensor(DType::F32, &[n, h]).unwrap(),
                &bufs[1].tensor(dtype, &sh).unwrap(),
                &lbb.tensor(DType::F32, &[n, h]).unwrap(),
                &ob.tensor(DType::F32, &sh).unwrap(),
                &lo.tensor(DType::F32, &[n, h]).unwrap(),
                stream,
            )
            .unwrap();
        }
        assert_close("merge_states out", &ob.to_vec::<f32>(stream).unwrap(), &want, 1e-5, 1e-5);
        assert_close("merge_states lse", &lo.to_vec::<f32>(stream).unwrap(), &want_lse, 1e-5, 1e-5);
    }
}

/// Bad input is a clear error naming the parameter, before anything runs.
#[test]
fn decode_rejects_bad_input() {
    let Some(dev) = device_or_skip("decode_rejects_bad_input") else { return };
    let mut rng = Rng(600);
    let c = cfg(DType::F16, 16, 2, 64, PageLayout::Nhd, 16);
    let p = filled(&dev, c, &[20], &mut rng, false);
    let t = p.gpu.page_table(&p.ids).unwrap();
    let v = p.gpu.layer_view(0, &t).unwrap();
    let ws = Workspace::new(&dev);
    let qb = DeviceBuffer::zeroed(&dev, 4 * 4 * 64 * 4, dev.stream()).unwrap();
    let ok_out = qb.tensor(DType::F32, &[1, 4, 64]).unwrap();
    let bad_q = qb.tensor(DType::F32, &[1, 3, 64]).unwrap();
    let e =
        unsafe { gpu::decode(&v, &bad_q, &ok_out, None, &AttentionParams::default(), &ws, dev.stream()) }.unwrap_err();
    assert!(matches!(&e, Error::Shape { param, .. } if param == "q"), "{e}");
    let bad_out = qb.tensor(DType::F32, &[1, 4, 32]).unwrap();
    let e = unsafe { gpu::decode(&v, &ok_out, &bad_out, None, &AttentionParams::default(), &ws, dev.stream()) }
        .unwrap_err();
    assert!(matches!(&e, Error::Shape { param, .. } if param == "out"), "{e}");
    let e = unsafe {
        gpu::decode(
            &v,
            &ok_out,
            &ok_out,
            None,
            &AttentionParams { positions: PositionMode::Contiguous, ..Default::default() },
            &ws,
            dev.stream(),
        )
    }
    .unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument { param, .. } if param == "positions"), "{e}");
    let e = CudaKvCache::new(&dev, cfg(DType::F32, 16, 2, 64, PageLayout::Nhd, 4)).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}

/// Decode captured once in a CUDA graph and replayed with new queries gives the CPU's
/// answers (no allocation, host copy or synchronisation inside the call).
#[test]
fn decode_replays_from_a_cuda_graph() {
    use cudarc::driver::sys;
    let Some(dev) = device_or_skip("decode_replays_from_a_cuda_graph") else { return };
    let mut rng = Rng(700);
    let c = cfg(DType::BF16, 32, 2, 128, PageLayout::Nhd, 128);
    let p = filled(&dev, c, &[300, 41], &mut rng, false);
    let (batch, hq, d) = (2, 8, 128);
    let stream = dev.new_stream().unwrap();
    let gt = p.gpu.page_table(&p.ids).unwrap();
    let gv = p.gpu.layer_view(1, &gt).unwrap();
    let qb = DeviceBuffer::zeroed(&dev, batch * hq * d * 4, &stream).unwrap();
    let ob = DeviceBuffer::alloc(&dev, batch * hq * d * 4).unwrap();
    let lb = DeviceBuffer::alloc(&dev, batch * hq * 4).unwrap();
    let (qd, od, ld) = (
        qb.tensor(DType::F32, &[batch, hq, d]).unwrap(),
        ob.tensor(DType::F32, &[batch, hq, d]).unwrap(),
        lb.tensor(DType::F32, &[batch, hq]).unwrap(),
    );
    let ws = Workspace::new(&dev);
    let params = AttentionParams { chunk_size: Some(64), ..Default::default() };
    // One call outside the capture loads the kernels and sizes the workspace.
    unsafe { gpu::decode(&gv, &qd, &od, Some(&ld), &params, &ws, &stream).unwrap() };
    stream.synchronize().unwrap();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    unsafe {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        assert_eq!(sys::cuStreamBeginCapture_v2(stream.raw(), mode), sys::CUresult::CUDA_SUCCESS);
        let r = gpu::decode(&gv, &qd, &od, Some(&ld), &params, &ws, &stream);
        assert_eq!(sys::cuStreamEndCapture(stream.raw(), &mut graph), sys::CUresult::CUDA_SUCCESS);
        r.unwrap();
        assert_eq!(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), sys::CUresult::CUDA_SUCCESS);
    }
    let table = p.cpu.page_table(&p.ids).unwrap();
    let view = p.cpu.layer_view(1, &table).unwrap();
    for round in 0..2 {
        let q = rng.vec(batch * hq * d, 1.0);
        qb.upload(0, bytemuck::cast_slice(&q), &stream).unwrap();
        ob.memset(POISON_BYTE, &stream).unwrap();
        lb.memset(POISON_BYTE, &stream).unwrap();
        unsafe { assert_eq!(sys::cuGraphLaunch(exec, stream.raw()), sys::CUresult::CUDA_SUCCESS) };
        stream.synchronize().unwrap();
        let mut want = vec![0f32; batch * hq * d];
        let mut want_lse = vec![0f32; batch * hq];
        let qt = TensorView::new(&q, &[batch, hq, d]).unwrap();
        attention::decode(
            &view,
            &qt,
            &mut TensorViewMut::new(&mut want, &[batch, hq, d]).unwrap(),
            Some(&mut want_lse),
            &params,
        )
        .unwrap();
        assert_close(&format!("graph replay {round}: out"), &ob.to_vec::<f32>(&stream).unwrap(), &want, 2e-4, 2e-3);
        assert_close(&format!("graph replay {round}: lse"), &lb.to_vec::<f32>(&stream).unwrap(), &want_lse, 1e-3, 1e-4);
    }
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
    }
}

/// Host threads decoding on one stream through one workspace get their own answers: a call
/// queues its split-K kernels and their merge without another call's kernels between them.
#[test]
fn decode_from_threads_sharing_a_stream_and_workspace() {
    let Some(dev) = device_or_skip("decode_from_threads_sharing_a_stream_and_workspace") else { return };
    let mut rng = Rng(900);
    let c = cfg(DType::F16, 16, 2, 64, PageLayout::Nhd, 128);
    let p = filled(&dev, c, &[400, 250], &mut rng, false);
    let (batch, hq, d) = (2, 8, 64);
    // Small chunks: several partial states per row, held in the shared workspace.
    let params = AttentionParams { chunk_size: Some(64), ..Default::default() };
    let ws = Workspace::new(&dev);
    let stream = dev.stream();
    let table = p.cpu.page_table(&p.ids).unwrap();
    let view = p.cpu.layer_view(1, &table).unwrap();
    let gt = p.gpu.page_table(&p.ids).unwrap();
    let gv = p.gpu.layer_view(1, &gt).unwrap();
    let queries: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(batch * hq * d, 1.0)).collect();
    std::thread::scope(|s| {
        for (i, q) in queries.iter().enumerate() {
            let (dev, ws, gv, view, params) = (&dev, &ws, &gv, &view, &params);
            s.spawn(move || {
                let mut want = vec![0f32; batch * hq * d];
                let qt = TensorView::new(q, &[batch, hq, d]).unwrap();
                attention::decode(
                    view,
                    &qt,
                    &mut TensorViewMut::new(&mut want, &[batch, hq, d]).unwrap(),
                    None,
                    params,
                )
                .unwrap();
                let qb = DeviceBuffer::from_slice(dev, q, stream).unwrap();
                let ob = DeviceBuffer::alloc(dev, batch * hq * d * 4).unwrap();
                let (qd, od) =
                    (qb.tensor(DType::F32, &[batch, hq, d]).unwrap(), ob.tensor(DType::F32, &[batch, hq, d]).unwrap());
                for round in 0..12 {
                    ob.memset(POISON_BYTE, stream).unwrap();
                    // SAFETY: the buffers live until the stream is synchronised below.
                    unsafe { gpu::decode(gv, &qd, &od, None, params, ws, stream).unwrap() };
                    stream.synchronize().unwrap();
                    assert_close(
                        &format!("thread {i} round {round}"),
                        &ob.to_vec::<f32>(stream).unwrap(),
                        &want,
                        2e-4,
                        2e-3,
                    );
                }
            });
        }
    });
}
