//! Criterion benches of dense decode (f16, head_dim 128, 8 KV / 32 query heads, page 16).
//! Throughput is reported in KV bytes read per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvsieve::attention::AttentionParams;
use kvsieve::{CacheConfig, DType, KvCache, TensorView, TensorViewMut};

fn filled_cache(batch: usize, tokens: usize) -> (KvCache, Vec<u64>) {
    let (hk, d, ps) = (8, 128, 16);
    let mut cache =
        KvCache::new(CacheConfig::new(1, hk, d, ps, batch * tokens.div_ceil(ps)).with_dtype(DType::F16)).unwrap();
    let data: Vec<f32> = (0..tokens * hk * d).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let ids = (0..batch)
        .map(|_| {
            let id = cache.create_sequence();
            cache.append(id, tokens, None).unwrap();
            let t = TensorView::new(&data, &[tokens, hk, d]).unwrap();
            cache.write(id, 0, 0, &t, &t).unwrap();
            id
        })
        .collect();
    (cache, ids)
}

fn decode(c: &mut Criterion) {
    let (hq, d) = (32, 128);
    let mut g = c.benchmark_group("decode_dense_f16");
    g.sample_size(10);
    for &(batch, tokens) in &[(1usize, 4096usize), (1, 32768), (8, 4096)] {
        let (cache, ids) = filled_cache(batch, tokens);
        let q: Vec<f32> = (0..batch * hq * d).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
        let mut out = vec![0f32; batch * hq * d];
        g.throughput(Throughput::Bytes((batch * tokens * 8 * d * 2 * 2) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("b{batch}_t{tokens}")), &(), |bch, _| {
            bch.iter(|| {
                let qv = TensorView::new(&q, &[batch, hq, d]).unwrap();
                let mut ov = TensorViewMut::new(&mut out, &[batch, hq, d]).unwrap();
                cache.decode(0, &ids, &qv, &mut ov, None, &AttentionParams::default()).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
