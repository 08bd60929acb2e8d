//! Tensor-core prefill against the CPU prefill on fresh random inputs (f16 / bf16, head_dim
//! 64 / 128, page sizes 16 / 32 / 64, GQA, causal or not, soft cap, sinks + window masks),
//! outputs poisoned first. Without a GPU or driver every test prints `skipped: <reason>`.
#![cfg(feature = "cuda")]

mod cuda_util;

use cuda_util::{assert_close, device_or_skip, Rng, POISON_BYTE};
use kvsieve::attention::{prefill as cpu_prefill, prefill_sparse, AttentionParams, StreamingWindow};
use kvsieve::backend::cuda::prefill::{prefill, PrefillMasks, PrefillQueries};
use kvsieve::backend::cuda::{CudaPageTable, CudaPagedKv, CudaSelections, DeviceBuffer, DeviceTensor};
use kvsieve::select::Selection;
use kvsieve::{bf16, f16, CacheConfig, DType, KvCache, PageLayout, PagedKvLayout, TensorView, TensorViewMut};

fn to_bytes(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => bytemuck::cast_slice(&v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
    }
}

fn from_bytes(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => b.chunks_exact(2).map(|c| f16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect(),
        DType::F32 => bytemuck::cast_slice(b).to_vec(),
    }
}

#[test]
fn prefill_matches_cpu() {
    let Some(dev) = device_or_skip("prefill_matches_cpu") else { return };
    let stream = dev.stream();
    let mut rng = Rng(0x9f111);
    let shapes = [(16usize, 64usize, 2usize, 4usize), (64, 128, 2, 6), (32, 128, 1, 1), (16, 64, 4, 8)];
    for dtype in [DType::F16, DType::BF16] {
        for (si, &(ps, d, hk, hq)) in shapes.iter().enumerate() {
            // Both page layouts: [page][token][head][dim] and [page][head][token][dim].
            let page_layout = if si % 2 == 0 { PageLayout::Nhd } else { PageLayout::Hnd };
            let lens = [1usize, 70, 200, 129];
            let qlens = [1usize, 70, 33, 64];
            let cap: usize = lens.iter().map(|l| l.div_ceil(ps)).sum::<usize>() + 2;
            let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, cap).with_dtype(dtype)).unwrap();
            let mut kdev = vec![0f32; cap * ps * hk * d];
            let mut vdev = vec![0f32; cap * ps * hk * d];
            let mut ids = Vec::new();
            for &l in &lens {
                let id = cache.create_sequence();
                cache.append(id, l, None).unwrap();
                let k = rng.vec(l * hk * d, 1.0);
                let v = rng.vec(l * hk * d, 1.0);
                cache
                    .write(
                        id,
                        0,
                        0,
                        &TensorView::new(&k, &[l, hk, d]).unwrap(),
                        &TensorView::new(&v, &[l, hk, d]).unwrap(),
                    )
                    .unwrap();
                let pages = cache.seq_pages(id).unwrap();
                for t in 0..l {
                    let (page, pos) = (pages[t / ps] as usize, t % ps);
                    for h in 0..hk {
                        let at = match page_layout {
                            PageLayout::Nhd => ((page * ps + pos) * hk + h) * d,
                            PageLayout::Hnd => ((page * hk + h) * ps + pos) * d,
                        };
                        let from = (t * hk + h) * d;
                        kdev[at..at + d].copy_from_slice(&k[from..from + d]);
                        vdev[at..at + d].copy_from_slice(&v[from..from + d]);
                    }
                }
                ids.push(id);
            }
            let table = cache.page_table(&ids).unwrap();
            let kb = DeviceBuffer::from_slice(&dev, &to_bytes(&kdev, dtype), stream).unwrap();
            let vb = DeviceBuffer::from_slice(&dev, &to_bytes(&vdev, dtype), stream).unwrap();
            let dtable = CudaPageTable::upload(&dev, table.as_ref(), ps, cap, stream).unwrap();
            let layout = PagedKvLayout::packed(dtype, cap, ps, hk, d, page_layout);
            // SAFETY: K and V cover every page of the layout.
            let kv = unsafe { CudaPagedKv::from_raw(kb.ptr(), vb.ptr(), layout, &dtable).unwrap() };
            let mut qo = vec![0i32];
            for &n in &qlens {
                qo.push(qo.last().unwrap() + n as i32);
            }
            let total = *qo.last().unwrap() as usize;
            let queries = PrefillQueries::upload(&dev, &qo, &dtable, stream).unwrap();
            let qbytes = to_bytes(&rng.vec(total * hq * d, 1.5), dtype);
            let qf = from_bytes(&qbytes, dtype);
            let qdev = DeviceBuffer::from_slice(&dev, &qbytes, stream).unwrap();
            let qt = DeviceTensor::contiguous(qdev.ptr(), dtype, &[total, hq, d], dev.ordinal());
            let qv = TensorView::new(&qf, &[total, hq, d]).unwrap();
            let view = cache.layer_view(0, &table).unwrap();
            let windows: Vec<Option<StreamingWindow>> = (0..hk)
                .map(|h| if h % 2 == 0 { Some(StreamingWindow { sinks: 4, window: 50 }) } else { None })
                .collect();
            let masks = PrefillMasks::upload(&dev, &windows, stream).unwrap();
            // Random per-head selections: every token with probability 1/3, in blocks of 8
            // for odd heads (a block-sparse pattern), plus the last token.
            let sparse: Vec<Selection> = lens
                .iter()
                .map(|&l| {
                    let heads: Vec<Vec<u32>> = (0..hk)
                        .map(|h| {
                            (0..l as u32)
                                .filter(|&t| {
                                    t + 1 == l as u32
                                        || if h % 2 == 1 {
                                            (t / 8 * 7 + h as u32).is_multiple_of(3)
                                        } else {
                                            rng.below(3) == 0
                                        }
                                })
                                .collect()
                        })
                        .collect();
                    let mut ip = vec![0u32];
                    let mut ix = Vec::new();
                    for x in &heads {
                        ix.extend_from_slice(x);
                        ip.push(ix.len() as u32);
                    }
                    Selection::from_csr(l, ip, ix).unwrap()
                })
                .collect();
            let sparse_refs: Vec<&Selection> = sparse.iter().collect();
            let sparse_dev = CudaSelections::upload(&dev, &sparse_refs, hk, stream).unwrap();
            for (causal, cap_logits, windowed, selected) in [
                (true, None, false, false),
                (false, None, false, false),
                (true, Some(20.0f32), false, false),
                (true, None, true, false),
                (true, None, false, true),
                (true, None, true, true),
            ] {
                let what = format!("{dtype} {page_layout:?} ps {ps} d {d} hk {hk} hq {hq} causal {causal} cap {cap_logits:?} windows {windowed} selections {selected}");
                let params = AttentionParams { logit_soft_cap: cap_logits, ..AttentionParams::default() };
                let mut want = vec![0f32; total * hq * d];
                let mut want_lse = vec![0f32; total * hq];
                {
                    let mut ov = TensorViewMut::new(&mut want, &[total, hq, d]).unwrap();
                    if windowed || selected {
                        let sels: Vec<Selection> = lens.iter().map(|&l| Selection::dense(hk, l).unwrap()).collect();
                        let refs: Vec<&Selection> =
                            if selected { sparse.iter().collect() } else { sels.iter().collect() };
                        let none: Vec<Option<StreamingWindow>> = vec![None; hk];
                        prefill_sparse(
                            &view,
                            &qv,
                            &qo,
                            &refs,
                            if windowed { &windows } else { &none },
                            &mut ov,
                            Some(&mut want_lse),
                            &params,
                        )
                        .unwrap();
                    } else {
                        cpu_prefill(&view, &qv, &qo, &mut ov, Some(&mut want_lse), &params, causal).unwrap();
                    }
                }
                let out = DeviceBuffer::alloc(&dev, total * hq * d * dtype.size()).unwrap();
                let lse = DeviceBuffer::alloc(&dev, total * hq * 4).unwrap();
                out.memset(POISON_BYTE, stream).unwrap();
                lse.memset(POISON_BYTE, stream).unwrap();
                let ot = DeviceTensor::contiguous(out.ptr(), dtype, &[total, hq, d], dev.ordinal());
                let masks_arg = if windowed { Some(&masks) } else { None };
                let sel_arg = if selected { Some(&sparse_dev) } else { None };
                let lt = DeviceTensor::contiguous(lse.ptr(), DType::F32, &[total, hq], dev.ordinal());
                prefill(stream, &kv, &qt, &queries, masks_arg, sel_arg, &ot, Some(&lt), &params, causal).unwrap();
                let mut bytes = vec![0u8; out.len()];
                out.download(0, &mut bytes, stream).unwrap();
                let got = from_bytes(&bytes, dtype);
                let got_lse: Vec<f32> = lse.to_vec(stream).unwrap();
                let tol = if dtype == DType::BF16 { 2.5e-2 } else { 4e-3 };
                assert_close(&format!("{what}: out"), &got, &want, tol, tol);
                assert_close(&format!("{what}: lse"), &got_lse, &want_lse, 2e-3, 1e-3);
            }
        }
    }
}

#[test]
fn prefill_refuses_bad_input() {
    let Some(dev) = device_or_skip("prefill_refuses_bad_input") else { return };
    let stream = dev.stream();
    let (ps, hk, d, cap) = (16usize, 2usize, 64usize, 4usize);
    let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, cap).with_dtype(DType::F16)).unwrap();
    let id = cache.create_sequence();
    cache.append(id, 20, None).unwrap();
    let table = cache.page_table(&[id]).unwrap();
    let dtable = CudaPageTable::upload(&dev, table.as_ref(), ps, cap, stream).unwrap();
    let e = PrefillQueries::upload(&dev, &[0, 21], &dtable, stream).err().unwrap();
    assert!(e.to_string().contains("`qo_indptr`"), "{e}");
    let kb = DeviceBuffer::zeroed(&dev, cap * ps * hk * d * 2, stream).unwrap();
    let layout = PagedKvLayout::packed(DType::F16, cap, ps, hk, d, PageLayout::Nhd);
    // SAFETY: K and V cover the layout.
    let kv = unsafe { CudaPagedKv::from_raw(kb.ptr(), kb.ptr(), layout, &dtable).unwrap() };
    let queries = PrefillQueries::upload(&dev, &[0, 4], &dtable, stream).unwrap();
    let q = DeviceBuffer::zeroed(&dev, 4 * 4 * d * 2, stream).unwrap();
    let qt = DeviceTensor::contiguous(q.ptr(), DType::F16, &[4, 3, d], dev.ordinal());
    let e = prefill(stream, &kv, &qt, &queries, None, None, &qt, None, &AttentionParams::default(), true).unwrap_err();
    assert!(e.to_string().contains("`q`"), "{e}");
    let qt = DeviceTensor::contiguous(q.ptr(), DType::F16, &[4, 4, d], dev.ordinal());
    let params = AttentionParams { logit_soft_cap: Some(-1.0), ..AttentionParams::default() };
    let e = prefill(stream, &kv, &qt, &queries, None, None, &qt, None, &params, true).unwrap_err();
    assert!(e.to_string().contains("`logit_soft_cap`"), "{e}");
    let masks = PrefillMasks::upload(&dev, &[None], stream).unwrap();
    let e = prefill(stream, &kv, &qt, &queries, Some(&masks), None, &qt, None, &AttentionParams::default(), true)
        .unwrap_err();
    assert!(e.to_string().contains("`masks`"), "{e}");
}
