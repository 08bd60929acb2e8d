//! Criterion benches of appending tokens and writing their K/V (f32 input into f16 pages,
//! key bounds on), as a prefill chunk and as single decode tokens.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvsieve::{CacheConfig, DType, KvCache, TensorView};

/// Append `total` tokens to a new sequence in chunks of `chunk`, writing every layer's K/V
/// from `t` after each append.
fn fill(cache: &mut KvCache, layers: usize, total: usize, chunk: usize, t: &TensorView) -> kvsieve::SeqId {
    let id = cache.create_sequence();
    for start in (0..total).step_by(chunk) {
        cache.append(id, chunk, None).unwrap();
        for layer in 0..layers {
            cache.write(id, layer, start, t, t).unwrap();
        }
    }
    id
}

fn append(c: &mut Criterion) {
    let (layers, hk, d, ps) = (4, 8, 128, 16);
    let mut g = c.benchmark_group("append_write_f16");
    g.sample_size(10);
    for &chunk in &[1usize, 512] {
        let data: Vec<f32> = (0..chunk * hk * d).map(|i| (i % 101) as f32 / 50.0 - 1.0).collect();
        let total = 8192;
        g.throughput(Throughput::Elements(total as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("chunk{chunk}")), &(), |b, _| {
            b.iter(|| {
                let mut cache =
                    KvCache::new(CacheConfig::new(layers, hk, d, ps, total / ps).with_dtype(DType::F16)).unwrap();
                fill(&mut cache, layers, total, chunk, &TensorView::new(&data, &[chunk, hk, d]).unwrap());
            })
        });
    }
    g.finish();
}

/// The same on pages that other sequences used before: each page handed out again is
/// cleared first (so slots appended but not yet written never show an earlier owner's K/V);
/// this group shows what that costs against `append_write_f16`.
fn append_reused(c: &mut Criterion) {
    let (layers, hk, d, ps) = (4, 8, 128, 16);
    let mut g = c.benchmark_group("append_write_f16_reused_pages");
    g.sample_size(10);
    let total = 8192;
    let mut cache = KvCache::new(CacheConfig::new(layers, hk, d, ps, total / ps).with_dtype(DType::F16)).unwrap();
    let id = cache.create_sequence();
    cache.append(id, total, None).unwrap();
    cache.free_sequence(id).unwrap();
    for &chunk in &[1usize, 512] {
        let data: Vec<f32> = (0..chunk * hk * d).map(|i| (i % 101) as f32 / 50.0 - 1.0).collect();
        g.throughput(Throughput::Elements(total as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("chunk{chunk}")), &(), |b, _| {
            b.iter(|| {
                let id = fill(&mut cache, layers, total, chunk, &TensorView::new(&data, &[chunk, hk, d]).unwrap());
                cache.free_sequence(id).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, append, append_reused);
criterion_main!(benches);
