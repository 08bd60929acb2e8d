//! Figures for `scripts/bench.sh`: dense decode time against memory-read bandwidth measured
//! in the same process with the same thread count. Prints a table and, with
//! `--json PATH`, writes a flat JSON object of named figures.
//!
//! Shape (f16, head_dim 128, 8 KV heads, 32 query heads, page size 16, 32K tokens, batch 1
//! and batch 8) can be changed with `--tokens N` for a quick run.

use std::time::Instant;

use kvsieve::attention::AttentionParams;
use kvsieve::{CacheConfig, DType, KvCache, TensorView, TensorViewMut};
use rayon::prelude::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Bytes per second for reading `buf` once with all threads (median of several passes).
fn read_bandwidth(buf: &[u64]) -> f64 {
    let chunk = buf.len().div_ceil(rayon::current_num_threads() * 8);
    let mut times = Vec::new();
    let mut sink = 0u64;
    for _ in 0..7 {
        let t = Instant::now();
        sink ^=
            buf.par_chunks(chunk).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).reduce(|| 0, |a, b| a ^ b);
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (buf.len() * 8) as f64 / median(times)
}

struct DecodeFigures {
    secs: f64,
    kv_bytes: f64,
}

/// Dense decode of `batch` sequences of `tokens`; with `pre_rope`, keys stored before RoPE
/// and rotated at read under contiguous positions (StreamingLLM's renumbering).
fn bench_decode(batch: usize, tokens: usize, pre_rope: bool) -> DecodeFigures {
    let (hk, hq, d, ps) = (8, 32, 128, 16);
    let pages = batch * tokens.div_ceil(ps);
    let mut cfg = CacheConfig::new(1, hk, d, ps, pages).with_dtype(DType::F16).with_key_bounds(false);
    if pre_rope {
        cfg = cfg.with_key_rope(kvsieve::KeyRope::PreRope);
    }
    let mut cache = KvCache::new(cfg).unwrap();
    // Random-ish K/V written in slabs so the pages hold real data.
    let slab = 1024;
    let mut x = 0x1234_5678u32;
    let mut data = vec![0f32; slab * hk * d];
    let ids: Vec<u64> = (0..batch)
        .map(|_| {
            let id = cache.create_sequence();
            cache.append(id, tokens, None).unwrap();
            for s in (0..tokens).step_by(slab) {
                let n = slab.min(tokens - s);
                for v in data.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *v = (x as f32 / u32::MAX as f32) * 2.0 - 1.0;
                }
                let t = TensorView::new(&data[..n * hk * d], &[n, hk, d]).unwrap();
                cache.write(id, 0, s, &t, &t).unwrap();
            }
            id
        })
        .collect();
    let q: Vec<f32> = (0..batch * hq * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let qv = TensorView::new(&q, &[batch, hq, d]).unwrap();
    let mut out = vec![0f32; batch * hq * d];
    let mut lse = vec![0f32; batch * hq];
    let mut p = AttentionParams::default();
    if pre_rope {
        p.rope = Some(kvsieve::attention::RopeConfig::new(10_000.0, kvsieve::attention::RopeStyle::HalfSplit));
        p.positions = kvsieve::attention::PositionMode::Contiguous;
    }
    let mut times = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        cache
            .decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[batch, hq, d]).unwrap(), Some(&mut lse), &p)
            .unwrap();
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let kv_bytes = (batch * tokens * hk * d * 2 * 2) as f64;
    DecodeFigures { secs: median(times), kv_bytes }
}

struct SparseFigures {
    dense_secs: f64,
    sparse_secs: f64,
    select_secs: f64,
    selected_tokens: usize,
    gemfilter_secs: f64,
}

/// Dense decode against policy-driven sparse decode (selection included) at one long context.
fn bench_sparse(tokens: usize, policy_text: &str) -> SparseFigures {
    let (hk, hq, d, ps) = (8, 32, 128, 16);
    let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, tokens.div_ceil(ps)).with_dtype(DType::F16)).unwrap();
    let id = cache.create_sequence();
    cache.append(id, tokens, None).unwrap();
    let slab = 1024;
    let mut x = 0x9e37_79b9u32;
    let mut data = vec![0f32; slab * hk * d];
    for s in (0..tokens).step_by(slab) {
        let n = slab.min(tokens - s);
        for v in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *v = (x as f32 / u32::MAX as f32) * 2.0 - 1.0;
        }
        let t = TensorView::new(&data[..n * hk * d], &[n, hk, d]).unwrap();
        cache.write(id, 0, s, &t, &t).unwrap();
    }
    let policy = kvsieve::Policy::parse(policy_text).unwrap();
    let q: Vec<f32> = (0..hq * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let mut out = vec![0f32; hq * d];
    let p = AttentionParams::default();
    let time = |f: &mut dyn FnMut()| {
        let mut v = Vec::new();
        for i in 0..12 {
            let t = Instant::now();
            f();
            if i >= 2 {
                v.push(t.elapsed().as_secs_f64());
            }
        }
        median(v)
    };
    let dense_secs = time(&mut || {
        cache.decode(0, &[id], &qv, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), None, &p).unwrap()
    });
    let mut selected_tokens = 0;
    let sparse_secs = time(&mut || {
        let sels = cache
            .decode_with_policy(
                0,
                &[id],
                &qv,
                &policy,
                &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(),
                None,
                &p,
            )
            .unwrap();
        selected_tokens = sels[0].len() / hk;
    });
    let select_secs = time(&mut || {
        std::hint::black_box(policy.select(&cache, id, 0, &qv).unwrap());
    });
    let gcfg = kvsieve::select::gemfilter::GemFilterConfig::new(2048);
    let src = kvsieve::select::gemfilter::KeySource::Cache { cache: &cache, seq: id, layer: 0 };
    let gemfilter_secs = time(&mut || {
        std::hint::black_box(kvsieve::select::gemfilter::select(&qv, src, &gcfg).unwrap());
    });
    SparseFigures { dense_secs, sparse_secs, select_secs, selected_tokens, gemfilter_secs }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let tokens: usize = arg("--tokens").map_or(32768, |s| s.parse().expect("--tokens N"));
    let threads = rayon::current_num_threads();

    // Backed by huge pages like the cache's page pool, so both are read the same way.
    let mut buf: Vec<u64> = vec![0; (512usize << 20) / 8];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (p, len) = (buf.as_ptr() as usize, buf.len() * 8);
        let start = p.div_ceil(HUGE) * HUGE;
        // SAFETY: the range is inside the allocation; the advice changes no contents.
        unsafe { libc::madvise(start as *mut libc::c_void, (p + len) / HUGE * HUGE - start, libc::MADV_HUGEPAGE) };
    }
    buf.iter_mut().enumerate().for_each(|(i, x)| *x = i as u64);
    let bw = read_bandwidth(&buf);
    drop(buf);

    let b1 = bench_decode(1, tokens, false);
    let b8 = bench_decode(8, tokens, false);
    let b1_pre = bench_decode(1, tokens, true);
    let frac1 = b1.kv_bytes / b1.secs / bw;
    let frac8 = b8.kv_bytes / b8.secs / bw;
    let sparse_tokens: usize = arg("--sparse-tokens").map_or(131072, |s| s.parse().expect("--sparse-tokens N"));
    // Budget 2048 of 128K (1/64): sinks 64 + window 512 + page bounds for the rest.
    let sp = bench_sparse(sparse_tokens, "sinks=64,window=512,pages=1472");

    println!("kvsieve dense decode, f16, head_dim 128, 8 KV / 32 query heads, page 16, {tokens} tokens, {threads} threads, isa {}", kvsieve::cpu::isa());
    println!("{:<34} {:>12}", "memory read bandwidth (GB/s)", format!("{:.2}", bw / 1e9));
    for (name, f, fr) in [("batch 1", &b1, frac1), ("batch 8", &b8, frac8)] {
        println!(
            "{:<34} {:>9.3} ms  {:>7.2} GB/s  {:.3} of bandwidth",
            format!("decode {name}"),
            f.secs * 1e3,
            f.kv_bytes / f.secs / 1e9,
            fr
        );
    }
    println!(
        "{:<34} {:>9.3} ms  {:.2}x the post-RoPE decode",
        "decode batch 1, RoPE at read",
        b1_pre.secs * 1e3,
        b1_pre.secs / b1.secs
    );
    println!(
        "{:<34} dense {:.3} ms, sparse {:.3} ms (selection {:.3} ms), {} tokens per head of {sparse_tokens}",
        "sparse decode (sinks+window+pages)",
        sp.dense_secs * 1e3,
        sp.sparse_secs * 1e3,
        sp.select_secs * 1e3,
        sp.selected_tokens
    );
    println!(
        "{:<34} {:.2}x, selection {:.3} of the sparse step",
        "",
        sp.dense_secs / sp.sparse_secs,
        sp.select_secs / sp.sparse_secs
    );
    println!(
        "{:<34} {:.3} ms = {:.3} dense decode steps",
        "GemFilter select (k 2048)",
        sp.gemfilter_secs * 1e3,
        sp.gemfilter_secs / sp.dense_secs
    );
    if let Some(path) = arg("--json") {
        let json = format!(
            "{{\n  \"memory_read_gbps\": {:.4},\n  \"decode_dense_b1_ms\": {:.4},\n  \"decode_dense_b8_ms\": {:.4},\n  \"decode_dense_bw_fraction_b1\": {:.4},\n  \"decode_dense_bw_fraction\": {:.4},\n  \"decode_tokens\": {tokens},\n  \"threads\": {threads},\n  \"decode_sparse_speedup_128k\": {:.4},\n  \"selection_overhead_fraction\": {:.4},\n  \"decode_sparse_selected_tokens\": {},\n  \"decode_sparse_context_tokens\": {sparse_tokens},\n  \"gemfilter_vs_dense_decode_128k\": {:.4},\n  \"decode_pre_rope_vs_post_rope\": {:.4}\n}}\n",
            bw / 1e9, b1.secs * 1e3, b8.secs * 1e3, frac1, frac8,
            sp.dense_secs / sp.sparse_secs, sp.select_secs / sp.sparse_secs, sp.selected_tokens,
            sp.gemfilter_secs / sp.dense_secs,
            b1_pre.secs / b1.secs
        );
        std::fs::write(&path, json).expect("write --json file");
    }
}
