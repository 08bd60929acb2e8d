//! Figures for `scripts/bench.sh`: dense decode time against memory-read bandwidth measured
//! in the same process with the same thread count (five rounds alternating the two; each
//! figure the median of the rounds' ratios, printed with the lowest and highest), and
//! against ggml's CPU flash attention
//! (the peer, run as a subprocess alternating with kvsieve). Prints a table and, with
//! `--json PATH`, writes a flat JSON object of named figures.
//!
//! Shape (f16, head_dim 128, 8 KV heads, 32 query heads, page size 16, 32K tokens, batch 1
//! and batch 8) can be changed with `--tokens N` for a quick run. `--ggml-fa PATH` names the
//! peer program (benches/ggml_fa, built by scripts/build-ggml-peer.sh); `--ggml-fa-only`
//! measures that comparison alone.
//!
//! Also: sparse decode at 128K tokens (`--sparse-tokens N`) with its selection's share of
//! the step, decode with keys rotated at read against post-RoPE keys, GemFilter's select,
//! and causal prefill attention at 8K and 32K tokens as a fraction of the FLOP rate of
//! matrixmultiply's sgemm measured in the same run (`prefill_vs_sgemm_8k`, `_32k`;
//! `--no-prefill` skips them).

use std::path::Path;
use std::process::Command;
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

/// A dense decode, set up once and timed in every round: the filled cache, the query and
/// the output buffers of `batch` sequences of `tokens`.
struct DecodeRun {
    cache: KvCache,
    ids: Vec<u64>,
    q: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    params: AttentionParams,
    batch: usize,
    /// K and V bytes one step reads.
    kv_bytes: f64,
}

impl DecodeRun {
    /// With `pre_rope`, keys stored before RoPE and rotated at read under contiguous
    /// positions (StreamingLLM's renumbering).
    fn new(batch: usize, tokens: usize, pre_rope: bool) -> DecodeRun {
        let (hk, hq, d) = (8, 32, 128);
        let (cache, ids) = filled_cache(batch, tokens, pre_rope);
        let mut params = AttentionParams::default();
        if pre_rope {
            params.rope = Some(kvsieve::attention::RopeConfig::new(10_000.0, kvsieve::attention::RopeStyle::HalfSplit));
            params.positions = kvsieve::attention::PositionMode::Contiguous;
        }
        DecodeRun {
            cache,
            ids,
            q: decode_query(batch),
            out: vec![0f32; batch * hq * d],
            lse: vec![0f32; batch * hq],
            params,
            batch,
            kv_bytes: (batch * tokens * hk * d * 2 * 2) as f64,
        }
    }

    /// Median seconds of one decode step (see [`time_median`]).
    fn time(&mut self) -> f64 {
        let (b, hq, d) = (self.batch, 32, 128);
        let qv = TensorView::new(&self.q, &[b, hq, d]).unwrap();
        let (cache, ids, out, lse, p) = (&self.cache, &self.ids, &mut self.out, &mut self.lse, &self.params);
        time_median(&mut || {
            cache.decode(0, ids, &qv, &mut TensorViewMut::new(out, &[b, hq, d]).unwrap(), Some(lse), p).unwrap();
        })
    }
}

/// Rounds of the dense decode figures. Each round times the read bandwidth and then each
/// decode, so that a change of load on a shared machine moves both sides of a round's
/// ratios alike; figures are medians over the rounds.
const DECODE_ROUNDS: usize = 5;

/// One round: read bandwidth (bytes/s), then seconds of batch 1, batch 8 and batch 1 with
/// RoPE at read.
struct DecodeRound {
    bw: f64,
    b1: f64,
    b8: f64,
    b1_pre: f64,
}

/// The next value of an xorshift32 stream mapped to [-1, 1) (benches/ggml_fa/ggml_fa_bench.c
/// draws the same stream).
fn uniform(x: &mut u32) -> f32 {
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    (*x as f32 / u32::MAX as f32) * 2.0 - 1.0
}

/// A cache holding `batch` sequences of `tokens` of random-ish K/V (the same values for K and
/// V), written in slabs of 1024 tokens laid out [token, kv_head, dim]: an xorshift32 stream
/// from 0x12345678 mapped to [-1, 1). benches/ggml_fa/ggml_fa_bench.c draws the same stream.
fn filled_cache(batch: usize, tokens: usize, pre_rope: bool) -> (KvCache, Vec<u64>) {
    let (hk, d, ps) = (8, 128, 16);
    let pages = batch * tokens.div_ceil(ps);
    let mut cfg = CacheConfig::new(1, hk, d, ps, pages).with_dtype(DType::F16).with_key_bounds(false);
    if pre_rope {
        cfg = cfg.with_key_rope(kvsieve::KeyRope::PreRope);
    }
    let mut cache = KvCache::new(cfg).unwrap();
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
                    *v = uniform(&mut x);
                }
                let t = TensorView::new(&data[..n * hk * d], &[n, hk, d]).unwrap();
                cache.write(id, 0, s, &t, &t).unwrap();
            }
            id
        })
        .collect();
    (cache, ids)
}

/// The decode query of `batch` sequences, [batch, 32, 128]: q[i] = ((i * 7919) % 1000) / 1000 - 0.5.
fn decode_query(batch: usize) -> Vec<f32> {
    (0..batch * 32 * 128).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Median seconds of 10 calls of `f` after 2 warm-up calls.
fn time_median(f: &mut dyn FnMut()) -> f64 {
    let mut v = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        f();
        if i >= 2 {
            v.push(t.elapsed().as_secs_f64());
        }
    }
    median(v)
}

/// The two layouts the peer program times (its `--layout`).
const GGML_LAYOUTS: [&str; 2] = ["contiguous", "llama"];

struct PeerFigures {
    /// Per round: kvsieve's median step, then ggml's on each of `GGML_LAYOUTS`, in seconds.
    rounds: Vec<[f64; 3]>,
    /// The output checks: (tokens, [kvsieve, ggml per layout]).
    checks: Vec<(usize, [OutputCheck; 3])>,
}

impl PeerFigures {
    /// Median over rounds of column `i` (0: kvsieve, 1 and 2: ggml per layout).
    fn median_secs(&self, i: usize) -> f64 {
        median(self.rounds.iter().map(|r| r[i]).collect())
    }
}

/// An output against kvsieve's f64 reference (`attention::reference`) for the same K/V and query.
#[derive(Clone, Copy, Default)]
struct OutputCheck {
    /// Largest |out - reference| over the [32, 128] output, relative to the largest |reference|.
    max_rel: f64,
    /// ||out - reference|| / ||reference|| (L2 over the whole output).
    rel_l2: f64,
}

impl OutputCheck {
    fn new(got: &[f32], want: &[f64]) -> OutputCheck {
        let max_abs = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff: Vec<f64> = got.iter().zip(want).map(|(&g, &w)| f64::from(g) - w).collect();
        OutputCheck {
            max_rel: diff.iter().fold(0f64, |m, x| if x.is_nan() || m.is_nan() { f64::NAN } else { m.max(x.abs()) })
                / max_abs,
            rel_l2: diff.iter().map(|x| x * x).sum::<f64>().sqrt() / norm,
        }
    }
}

/// The query scale of the output checks: the bench's query gives scores of standard deviation
/// ~0.17, a near-uniform softmax that would hide score errors; times 8 spreads the weights
/// over e^±4 or so.
const CHECK_Q_SCALE: f32 = 8.0;

/// The checks, as (tokens, tolerance on ggml's `max_rel`); `None` stands for the bench's own
/// token count. ggml's decode accumulates the weighted V sum in f16 (VKQ16 in its ops.cpp),
/// which rounds off 1.0e-2 of the largest output at 4K tokens and 4.1e-2 at 32K, as much as a
/// 5% error in the query scale would; wrong data, heads or tokens give differences of order 1.
/// So the check at the bench's length catches those, and a short one bounds the rest tightly.
const CHECKS: [(Option<usize>, f64); 2] = [(None, 0.1), (Some(1024), 0.02)];

/// One run of the peer program with `extra` arguments; returns its median step in seconds.
fn run_ggml_fa(bin: &Path, tokens: usize, threads: usize, layout: &str, extra: &[&std::ffi::OsStr]) -> f64 {
    let mut cmd = Command::new(bin);
    cmd.args(["--tokens", &tokens.to_string(), "--threads", &threads.to_string(), "--layout", layout]);
    cmd.args(extra);
    let res = cmd.output().unwrap_or_else(|e| panic!("--ggml-fa {}: cannot run: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "--ggml-fa {} --layout {layout}: {}\n{stdout}{}",
        bin.display(),
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    let ms = stdout
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("median_ms="))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("--ggml-fa {}: no median_ms= in its output: {stdout}", bin.display()));
    ms * 1e-3
}

/// kvsieve's and ggml's outputs (both layouts) at `tokens` against the f64 reference, with the
/// query scaled by `CHECK_Q_SCALE`. Panics when kvsieve is off by more than 1e-3 or ggml by
/// more than `ggml_tol` (as `max_rel`): a ratio between different computations means nothing.
fn check_vs_ggml(bin: &Path, tokens: usize, threads: usize, ggml_tol: f64) -> [OutputCheck; 3] {
    let (hq, d) = (32, 128);
    let (cache, ids) = filled_cache(1, tokens, false);
    let q: Vec<f32> = decode_query(1).iter().map(|x| x * CHECK_Q_SCALE).collect();
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let p = AttentionParams::default();
    let table = cache.page_table(&ids).unwrap();
    let want = kvsieve::attention::reference::decode(&cache.layer_view(0, &table).unwrap(), &qv, &p).unwrap();
    let want = &want[0].out;
    let mut out = vec![f32::NAN; hq * d];
    cache.decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), None, &p).unwrap();
    let mut checks = [OutputCheck::new(&out, want); 3];
    assert!(
        checks[0].max_rel <= 1e-3,
        "kvsieve's decode at {tokens} tokens differs from its f64 reference by {:.3e}",
        checks[0].max_rel
    );
    for (i, layout) in GGML_LAYOUTS.iter().enumerate() {
        let path = std::env::temp_dir().join(format!("kvsieve-ggml-fa-{}-{layout}.bin", std::process::id()));
        let scale = CHECK_Q_SCALE.to_string();
        let extra = [
            "--q-scale".as_ref(),
            scale.as_ref(),
            "--warmup".as_ref(),
            "0".as_ref(),
            "--reps".as_ref(),
            "1".as_ref(),
            "--out".as_ref(),
            path.as_os_str(),
        ];
        run_ggml_fa(bin, tokens, threads, layout, &extra);
        let bytes = std::fs::read(&path).expect("read the peer's output");
        std::fs::remove_file(&path).ok();
        assert_eq!(bytes.len(), hq * d * 4, "--ggml-fa --layout {layout}: output size");
        let got: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        checks[i + 1] = OutputCheck::new(&got, want);
        assert!(
            checks[i + 1].max_rel <= ggml_tol,
            "--ggml-fa --layout {layout}: output at {tokens} tokens differs from the f64 reference by {:.3e} of its \
             largest value (tolerance {ggml_tol})",
            checks[i + 1].max_rel
        );
    }
    checks
}

/// kvsieve's dense decode (batch 1) against ggml's flash attention on the same K/V and query,
/// after the output checks (`CHECKS`): `rounds` times in alternation, kvsieve, ggml on
/// contiguous K/V, ggml on llama.cpp's cache layout, each the median of its own steps.
fn bench_vs_ggml(bin: &Path, tokens: usize, threads: usize, rounds: usize) -> PeerFigures {
    let checks = CHECKS
        .iter()
        .map(|&(n, tol)| {
            let n = n.unwrap_or(tokens);
            (n, check_vs_ggml(bin, n, threads, tol))
        })
        .collect();
    let (hq, d) = (32, 128);
    let (cache, ids) = filled_cache(1, tokens, false);
    let q = decode_query(1);
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let p = AttentionParams::default();
    let mut out = vec![0f32; hq * d];
    let rounds = (0..rounds)
        .map(|_| {
            let ks = time_median(&mut || {
                cache.decode(0, &ids, &qv, &mut TensorViewMut::new(&mut out, &[1, hq, d]).unwrap(), None, &p).unwrap()
            });
            let mut row = [ks, 0.0, 0.0];
            for (i, layout) in GGML_LAYOUTS.iter().enumerate() {
                row[i + 1] = run_ggml_fa(bin, tokens, threads, layout, &[]);
            }
            row
        })
        .collect();
    PeerFigures { rounds, checks }
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
            *v = uniform(&mut x);
        }
        let t = TensorView::new(&data[..n * hk * d], &[n, hk, d]).unwrap();
        cache.write(id, 0, s, &t, &t).unwrap();
    }
    let policy = kvsieve::Policy::parse(policy_text).unwrap();
    let q: Vec<f32> = (0..hq * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let qv = TensorView::new(&q, &[1, hq, d]).unwrap();
    let mut out = vec![0f32; hq * d];
    let p = AttentionParams::default();
    let time = time_median;
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

/// Causal prefill attention of one sequence of `tokens` (f16 K/V, 1 KV head, 4 query heads,
/// head_dim 128, one call for the whole prompt): seconds and FLOP (QK and PV, 2 per
/// multiply-add, over the causal triangle including the diagonal).
fn bench_prefill(tokens: usize) -> (f64, f64) {
    let (hk, hq, d, ps) = (1, 4, 128, 16);
    let mut cache = KvCache::new(CacheConfig::new(1, hk, d, ps, tokens.div_ceil(ps)).with_dtype(DType::F16)).unwrap();
    let id = cache.create_sequence();
    cache.append(id, tokens, None).unwrap();
    let mut x = 0x2545_f491u32;
    let kv: Vec<f32> = (0..tokens * hk * d).map(|_| uniform(&mut x)).collect();
    let t = TensorView::new(&kv, &[tokens, hk, d]).unwrap();
    cache.write(id, 0, 0, &t, &t).unwrap();
    let q: Vec<f32> = (0..tokens * hq * d).map(|_| uniform(&mut x)).collect();
    let qv = TensorView::new(&q, &[tokens, hq, d]).unwrap();
    let mut out = vec![0f32; tokens * hq * d];
    let p = AttentionParams::default();
    let indptr = [0, tokens as i32];
    let mut run = || {
        let mut o = TensorViewMut::new(&mut out, &[tokens, hq, d]).unwrap();
        cache.prefill(0, &[id], &qv, &indptr, &mut o, None, &p, true).unwrap();
    };
    run();
    // One timed call at long contexts (32K takes seconds), the median of three below.
    let reps = if tokens > 8192 { 1 } else { 3 };
    let secs = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let pairs = tokens as f64 * (tokens as f64 + 1.0) / 2.0;
    (secs, pairs * hq as f64 * d as f64 * 2.0 * 2.0)
}

/// The FLOP rate of matrixmultiply's sgemm with its threads (C = A B, 2048 x 2048 x 2048,
/// row-major), the best of three calls after a warm-up.
fn sgemm_flops() -> f64 {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut c = vec![0f32; n * n];
    let mut run = || {
        // SAFETY: a, b and c hold n x n row-major matrices (row stride n, column stride 1).
        unsafe {
            matrixmultiply::sgemm(
                n,
                n,
                n,
                1.0,
                a.as_ptr(),
                n as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }
    };
    run();
    let best = (0..3)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (n * n * n) as f64 / best
}

/// Prints the peer comparison and adds its figures to `json`.
fn report_peer(peer: &PeerFigures, json: &mut Vec<(&'static str, String)>) {
    let ks = peer.median_secs(0);
    let (contiguous, llama) = (peer.median_secs(1), peer.median_secs(2));
    println!(
        "{:<34} {} rounds of kvsieve, ggml contiguous, ggml llama layout (median ms):",
        "ggml flash attention (peer)",
        peer.rounds.len()
    );
    for r in &peer.rounds {
        println!("{:<34} {:>9.3} {:>9.3} {:>9.3}", "", r[0] * 1e3, r[1] * 1e3, r[2] * 1e3);
    }
    println!(
        "{:<34} {:.3} of ggml's time on contiguous K/V, {:.3} on llama.cpp's cache layout",
        "kvsieve decode batch 1",
        ks / contiguous,
        ks / llama
    );
    for (n, checks) in &peer.checks {
        for (name, c) in ["kvsieve", "ggml contiguous", "ggml llama layout"].iter().zip(checks) {
            println!(
                "{:<34} {name}: max |out - f64 reference| {:.2e} of max |reference|, relative L2 {:.2e}",
                format!("output check, {n} tokens, q x{CHECK_Q_SCALE}"),
                c.max_rel,
                c.rel_l2
            );
        }
    }
    json.push(("decode_vs_ggml_fa", format!("{:.4}", ks / contiguous)));
    json.push(("decode_vs_ggml_fa_llama_layout", format!("{:.4}", ks / llama)));
    json.push(("ggml_fa_ms", format!("{:.4}", contiguous * 1e3)));
    json.push(("ggml_fa_llama_layout_ms", format!("{:.4}", llama * 1e3)));
    json.push(("ggml_fa_kvsieve_ms", format!("{:.4}", ks * 1e3)));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let tokens: usize = arg("--tokens").map_or(32768, |s| s.parse().expect("--tokens N"));
    let threads = rayon::current_num_threads();
    let mut json: Vec<(&'static str, String)> =
        vec![("decode_tokens", tokens.to_string()), ("threads", threads.to_string())];
    let peer = arg("--ggml-fa").map(|bin| {
        let rounds = arg("--ggml-fa-rounds").map_or(5, |s| s.parse().expect("--ggml-fa-rounds N"));
        bench_vs_ggml(Path::new(&bin), tokens, threads, rounds)
    });
    if args.iter().any(|a| a == "--ggml-fa-only") {
        let peer = peer.expect("--ggml-fa-only needs --ggml-fa PATH");
        println!("kvsieve dense decode against ggml, f16, head_dim 128, 8 KV / 32 query heads, {tokens} tokens, {threads} threads, isa {}", kvsieve::cpu::isa());
        report_peer(&peer, &mut json);
        if let Some(path) = arg("--json") {
            write_json(&path, &json);
        }
        return;
    }
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
    let mut runs =
        [DecodeRun::new(1, tokens, false), DecodeRun::new(8, tokens, false), DecodeRun::new(1, tokens, true)];
    let rounds: Vec<DecodeRound> = (0..DECODE_ROUNDS)
        .map(|_| DecodeRound {
            bw: read_bandwidth(&buf),
            b1: runs[0].time(),
            b8: runs[1].time(),
            b1_pre: runs[2].time(),
        })
        .collect();
    drop(buf);
    let (kv1, kv8) = (runs[0].kv_bytes, runs[1].kv_bytes);
    drop(runs);
    let over_rounds = |f: &dyn Fn(&DecodeRound) -> f64| {
        let v: Vec<f64> = rounds.iter().map(f).collect();
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        (median(v), lo, hi)
    };
    let bw = over_rounds(&|r| r.bw);
    let b1 = over_rounds(&|r| r.b1);
    let b8 = over_rounds(&|r| r.b8);
    let frac1 = over_rounds(&|r| kv1 / r.b1 / r.bw);
    let frac8 = over_rounds(&|r| kv8 / r.b8 / r.bw);
    let pre = over_rounds(&|r| r.b1_pre / r.b1);
    let b1_pre = over_rounds(&|r| r.b1_pre);
    let sparse_tokens: usize = arg("--sparse-tokens").map_or(131072, |s| s.parse().expect("--sparse-tokens N"));
    // Budget 2048 of 128K (1/64): sinks 64 + window 512 + page bounds for the rest.
    let sp = bench_sparse(sparse_tokens, "sinks=64,window=512,pages=1472");
    // Prefill attention against sgemm, both on the pool's thread count (`--no-prefill` skips
    // it: the 32K prompt alone takes tens of seconds on 2 cores).
    let prefill = if args.iter().any(|a| a == "--no-prefill") {
        None
    } else {
        if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
            std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
        }
        let gemm = sgemm_flops();
        let runs: Vec<(usize, f64, f64)> = [8192usize, 32768]
            .into_iter()
            .map(|n| {
                let (secs, flop) = bench_prefill(n);
                (n, secs, flop)
            })
            .collect();
        Some((gemm, runs))
    };

    println!("kvsieve dense decode, f16, head_dim 128, 8 KV / 32 query heads, page 16, {tokens} tokens, {threads} threads, isa {}", kvsieve::cpu::isa());
    println!("{DECODE_ROUNDS} rounds, each the read bandwidth then every decode; medians (lowest-highest round)");
    println!("{:<34} {:>9.2}       ({:.2}-{:.2})", "memory read bandwidth (GB/s)", bw.0 / 1e9, bw.1 / 1e9, bw.2 / 1e9);
    for (name, t, fr) in [("batch 1", b1, frac1), ("batch 8", b8, frac8)] {
        println!(
            "{:<34} {:>9.3} ms  {:.3} of bandwidth ({:.3}-{:.3})",
            format!("decode {name}"),
            t.0 * 1e3,
            fr.0,
            fr.1,
            fr.2
        );
    }
    println!(
        "{:<34} {:>9.3} ms  {:.2}x the post-RoPE decode ({:.2}-{:.2})",
        "decode batch 1, RoPE at read",
        b1_pre.0 * 1e3,
        pre.0,
        pre.1,
        pre.2
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
    if let Some((gemm, runs)) = &prefill {
        println!("{:<34} {:>9.2} GFLOP/s (matrixmultiply, 2048^3)", "sgemm", gemm / 1e9);
        for &(n, secs, flop) in runs {
            let name = if n == 8192 { "prefill_vs_sgemm_8k" } else { "prefill_vs_sgemm_32k" };
            println!(
                "{:<34} {:>9.3} s  {:>7.2} GFLOP/s  {:.3} of sgemm's rate",
                format!("causal prefill, {n} tokens"),
                secs,
                flop / secs / 1e9,
                flop / secs / gemm
            );
            json.push((name, format!("{:.4}", flop / secs / gemm)));
        }
        json.push(("sgemm_gflops", format!("{:.4}", gemm / 1e9)));
    }
    if let Some(peer) = &peer {
        report_peer(peer, &mut json);
    }
    json.extend([
        ("memory_read_gbps", format!("{:.4}", bw.0 / 1e9)),
        ("decode_dense_b1_ms", format!("{:.4}", b1.0 * 1e3)),
        ("decode_dense_b8_ms", format!("{:.4}", b8.0 * 1e3)),
        ("decode_dense_bw_fraction_b1", format!("{:.4}", frac1.0)),
        ("decode_dense_bw_fraction", format!("{:.4}", frac8.0)),
        ("decode_sparse_speedup_128k", format!("{:.4}", sp.dense_secs / sp.sparse_secs)),
        ("selection_overhead_fraction", format!("{:.4}", sp.select_secs / sp.sparse_secs)),
        ("decode_sparse_selected_tokens", sp.selected_tokens.to_string()),
        ("decode_sparse_context_tokens", sparse_tokens.to_string()),
        ("gemfilter_vs_dense_decode_128k", format!("{:.4}", sp.gemfilter_secs / sp.dense_secs)),
        ("decode_pre_rope_vs_post_rope", format!("{:.4}", pre.0)),
    ]);
    if let Some(path) = arg("--json") {
        write_json(&path, &json);
    }
}

/// Writes `figures` as a flat JSON object of numbers.
fn write_json(path: &str, figures: &[(&str, String)]) {
    let body: Vec<String> = figures.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
    std::fs::write(path, format!("{{\n{}\n}}\n", body.join(",\n"))).expect("write --json file");
}
