//! GPU figures for `scripts/gpu-check.sh`: dense paged decode against the device-to-device
//! copy bandwidth measured in the same run, and sparse decode at a 1/64 token budget
//! against dense, on f16 pages (8 KV heads, 32 query heads, head_dim 128, page size 16,
//! pages of each sequence scattered over the pool).
//!
//! - `gpu_decode_bw_fraction_32k_b16`, `gpu_decode_bw_fraction_128k_b1`: K/V bytes read per
//!   second by decode, over the copy bandwidth (bytes read plus written per second by
//!   `cuMemcpyDtoD` of 1 GiB);
//! - `gpu_sparse_speedup_128k`: dense decode time over sparse decode time at 128K tokens,
//!   batch 1, each KV head reading 1/64 of the tokens (random whole pages).
//!
//! `--dump DIR` also writes the 128K case's query, keys, values (token order), kvsieve's
//! output and its time for `scripts/gpu_sdpa.py` (torch's scaled_dot_product_attention on
//! the same data); `--json PATH` writes the figures as a flat JSON object.
//! Without a GPU it prints `skipped: <reason>` and exits 0. `KVSIEVE_GPU_REPORT_SCALE=S`
//! divides the token counts, the copy size and the repetitions by S (a dry run of the
//! script on the CUDA emulator; the figures then mean nothing).
//!
//! `cargo bench --features cuda --bench gpu_report -- [--dump DIR] [--json PATH]`

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use kvsieve::attention::AttentionParams;
use kvsieve::backend::cuda::attention::{decode, decode_sparse, Workspace};
use kvsieve::backend::cuda::{
    CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceBuffer, DeviceTensor, Stream,
};
use kvsieve::{f16, DType, PageLayout, PageTableRef, PagedKvLayout, Selection};

const HK: usize = 8;
const HQ: usize = 32;
const D: usize = 128;
const PS: usize = 16;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The divisor of sizes and repetitions (`KVSIEVE_GPU_REPORT_SCALE`, default 1).
fn scale() -> usize {
    std::env::var("KVSIEVE_GPU_REPORT_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1usize).max(1)
}

/// Seconds per call of `f` (median of 5 timings of `reps` back-to-back calls each).
fn time(stream: &Stream, reps: usize, mut f: impl FnMut()) -> f64 {
    let reps = reps.div_ceil(scale());
    for _ in 0..3 {
        f();
    }
    stream.synchronize().unwrap();
    let mut t = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        for _ in 0..reps {
            f();
        }
        stream.synchronize().unwrap();
        t.push(s.elapsed().as_secs_f64() / reps as f64);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[2]
}

/// Copy bandwidth: bytes read plus written per second by a 1 GiB device-to-device copy.
fn copy_bandwidth(dev: &Arc<CudaDevice>) -> f64 {
    let n = (1usize << 30) / scale();
    let stream = dev.stream();
    let a = DeviceBuffer::zeroed(dev, n, stream).unwrap();
    let b = DeviceBuffer::zeroed(dev, n, stream).unwrap();
    let s = time(stream, 10, || b.copy_from(0, &a, 0, n, stream).unwrap());
    2.0 * n as f64 / s
}

/// K and V pages for `batch` sequences of `tokens` each, pages shuffled over the pool.
/// Returns (k, v, host table, token-order host K and V of sequence 0 when `keep_host`).
struct Paged {
    k: DeviceBuffer,
    v: DeviceBuffer,
    indptr: Vec<i32>,
    indices: Vec<i32>,
    last: Vec<i32>,
    host_kv: Option<(Vec<f16>, Vec<f16>)>,
    layout: PagedKvLayout,
}

fn build(dev: &Arc<CudaDevice>, batch: usize, tokens: usize, rng: &mut Rng, keep_host: bool) -> Paged {
    let stream = dev.stream();
    let pages_per_seq = tokens.div_ceil(PS);
    let num_pages = batch * pages_per_seq;
    let page_elems = PS * HK * D;
    // A random slab of 1024 tokens, laid out cyclically into token order per sequence.
    let slab_tokens = 1024;
    let slab_k: Vec<f16> = (0..slab_tokens * HK * D).map(|_| f16::from_f32(rng.unit())).collect();
    let slab_v: Vec<f16> = (0..slab_tokens * HK * D).map(|_| f16::from_f32(rng.unit())).collect();
    let sk = DeviceBuffer::from_slice(dev, &slab_k, stream).unwrap();
    let sv = DeviceBuffer::from_slice(dev, &slab_v, stream).unwrap();
    let k = DeviceBuffer::alloc(dev, num_pages * page_elems * 2).unwrap();
    let v = DeviceBuffer::alloc(dev, num_pages * page_elems * 2).unwrap();
    let mut perm: Vec<i32> = (0..num_pages as i32).collect();
    for i in (1..perm.len()).rev() {
        let j = rng.below(i + 1);
        perm.swap(i, j);
    }
    let page_bytes = page_elems * 2;
    let slab_pages = slab_tokens / PS;
    for (i, &p) in perm.iter().enumerate() {
        let src = (i % slab_pages) * page_bytes;
        k.copy_from(p as usize * page_bytes, &sk, src, page_bytes, stream).unwrap();
        v.copy_from(p as usize * page_bytes, &sv, src, page_bytes, stream).unwrap();
    }
    stream.synchronize().unwrap();
    let indptr: Vec<i32> = (0..=batch).map(|b| (b * pages_per_seq) as i32).collect();
    let last = vec![(tokens - (pages_per_seq - 1) * PS) as i32; batch];
    let host_kv = keep_host.then(|| {
        let per_tok = HK * D;
        let kk: Vec<f16> = (0..tokens)
            .flat_map(|t| slab_k[(t % slab_tokens) * per_tok..(t % slab_tokens + 1) * per_tok].to_vec())
            .collect();
        let vv: Vec<f16> = (0..tokens)
            .flat_map(|t| slab_v[(t % slab_tokens) * per_tok..(t % slab_tokens + 1) * per_tok].to_vec())
            .collect();
        (kk, vv)
    });
    let layout = PagedKvLayout::packed(DType::F16, num_pages, PS, HK, D, PageLayout::Nhd);
    Paged { k, v, indptr, indices: perm, last, host_kv, layout }
}

struct Figures {
    secs: f64,
    kv_bytes: f64,
}

fn dense(dev: &Arc<CudaDevice>, pk: &Paged, batch: usize, tokens: usize, rng: &mut Rng, dump: Option<&str>) -> Figures {
    let stream = dev.stream();
    let table = CudaPageTable::upload(
        dev,
        PageTableRef { indptr: &pk.indptr, indices: &pk.indices, last_page_len: &pk.last },
        PS,
        pk.layout.num_pages,
        stream,
    )
    .unwrap();
    // SAFETY: the buffers hold the layout and outlive every launch (synchronised in `time`).
    let view = unsafe { CudaPagedKv::from_raw(pk.k.ptr(), pk.v.ptr(), pk.layout, &table).unwrap() };
    let q: Vec<f32> = (0..batch * HQ * D).map(|_| rng.unit()).collect();
    let qb = DeviceBuffer::from_slice(dev, &q, stream).unwrap();
    let ob = DeviceBuffer::alloc(dev, batch * HQ * D * 4).unwrap();
    let qt = qb.tensor(DType::F32, &[batch, HQ, D]).unwrap();
    let ot = ob.tensor(DType::F32, &[batch, HQ, D]).unwrap();
    let ws = Workspace::new(dev);
    let p = AttentionParams::default();
    let secs = time(stream, 20, || unsafe { decode(&view, &qt, &ot, None, &p, &ws, stream).unwrap() });
    if let Some(dir) = dump {
        let out: Vec<f32> = ob.to_vec(stream).unwrap();
        let (kk, vv) = pk.host_kv.as_ref().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(format!("{dir}/q.bin"), bytemuck::cast_slice(&q)).unwrap();
        std::fs::write(format!("{dir}/k.bin"), bytemuck::cast_slice(kk)).unwrap();
        std::fs::write(format!("{dir}/v.bin"), bytemuck::cast_slice(vv)).unwrap();
        std::fs::write(format!("{dir}/out.bin"), bytemuck::cast_slice(&out)).unwrap();
        let meta = format!(
            "{{\"tokens\": {tokens}, \"num_qo_heads\": {HQ}, \"num_kv_heads\": {HK}, \"head_dim\": {D}, \"kvsieve_ms\": {}}}\n",
            secs * 1e3
        );
        std::fs::write(format!("{dir}/meta.json"), meta).unwrap();
    }
    Figures { secs, kv_bytes: (batch * tokens * HK * D * 2 * 2) as f64 }
}

/// Dense and sparse (1/64 of the tokens per KV head, whole random pages) decode times.
fn sparse(dev: &Arc<CudaDevice>, pk: &Paged, tokens: usize, rng: &mut Rng) -> (f64, f64) {
    let stream = dev.stream();
    let table = CudaPageTable::upload(
        dev,
        PageTableRef { indptr: &pk.indptr, indices: &pk.indices, last_page_len: &pk.last },
        PS,
        pk.layout.num_pages,
        stream,
    )
    .unwrap();
    // SAFETY: as in `dense`.
    let view = unsafe { CudaPagedKv::from_raw(pk.k.ptr(), pk.v.ptr(), pk.layout, &table).unwrap() };
    let pages = tokens / PS;
    let keep = (pages / 64).max(1);
    let heads: Vec<Vec<u32>> = (0..HK)
        .map(|_| {
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < keep {
                let p = rng.below(pages);
                if !chosen.contains(&p) {
                    chosen.push(p);
                }
            }
            chosen.sort_unstable();
            chosen.iter().flat_map(|&p| (p * PS) as u32..((p + 1) * PS) as u32).collect()
        })
        .collect();
    let sel = Selection::from_heads(tokens, heads).unwrap();
    let sels = CudaSelections::upload(dev, &[&sel], HK, stream).unwrap();
    let q: Vec<f32> = (0..HQ * D).map(|_| rng.unit()).collect();
    let qb = DeviceBuffer::from_slice(dev, &q, stream).unwrap();
    let ob = DeviceBuffer::alloc(dev, HQ * D * 4).unwrap();
    let qt = qb.tensor(DType::F32, &[1, HQ, D]).unwrap();
    let ot: DeviceTensor = ob.tensor(DType::F32, &[1, HQ, D]).unwrap();
    let ws = Workspace::new(dev);
    let p = AttentionParams::default();
    let t_dense = time(stream, 50, || unsafe { decode(&view, &qt, &ot, None, &p, &ws, stream).unwrap() });
    let t_sparse =
        time(stream, 50, || unsafe { decode_sparse(&view, &qt, &sels, &ot, None, &p, &ws, stream).unwrap() });
    (t_dense, t_sparse)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let dump = opt("--dump");
    let json = opt("--json");
    let dev = match CudaDevice::get(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: gpu_report: {e}");
            return;
        }
    };
    println!(
        "device: {} (sm_{}{}, {} SMs)",
        dev.name(),
        dev.compute_capability().0,
        dev.compute_capability().1,
        dev.num_sms()
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let bw = copy_bandwidth(&dev);
    println!("copy bandwidth (read + write): {:.1} GB/s", bw / 1e9);
    let mut figures: Vec<(String, f64)> = vec![("gpu_copy_bandwidth_gbs".into(), bw / 1e9)];

    let (t32k, t128k) = (32768 / scale(), 131072 / scale());
    let pk = build(&dev, 16, t32k, &mut rng, false);
    let f = dense(&dev, &pk, 16, t32k, &mut rng, None);
    drop(pk);
    let frac = f.kv_bytes / f.secs / bw;
    println!(
        "dense decode 32K x 16: {:.3} ms, {:.1} GB/s of K/V, {:.3} of copy bandwidth",
        f.secs * 1e3,
        f.kv_bytes / f.secs / 1e9,
        frac
    );
    figures.push(("gpu_decode_ms_32k_b16".into(), f.secs * 1e3));
    figures.push(("gpu_decode_bw_fraction_32k_b16".into(), frac));

    let pk = build(&dev, 1, t128k, &mut rng, dump.is_some());
    let f = dense(&dev, &pk, 1, t128k, &mut rng, dump.as_deref());
    let frac = f.kv_bytes / f.secs / bw;
    println!(
        "dense decode 128K x 1: {:.3} ms, {:.1} GB/s of K/V, {:.3} of copy bandwidth",
        f.secs * 1e3,
        f.kv_bytes / f.secs / 1e9,
        frac
    );
    figures.push(("gpu_decode_ms_128k_b1".into(), f.secs * 1e3));
    figures.push(("gpu_decode_bw_fraction_128k_b1".into(), frac));

    let (td, ts) = sparse(&dev, &pk, t128k, &mut rng);
    println!("sparse decode 128K x 1 at 1/64: {:.4} ms vs dense {:.4} ms: {:.1}x", ts * 1e3, td * 1e3, td / ts);
    figures.push(("gpu_sparse_speedup_128k".into(), td / ts));

    for (k, v) in &figures {
        println!("{k} = {v:.4}");
    }
    if let Some(path) = json {
        let body: Vec<String> = figures.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{{\n{}\n}}", body.join(",\n")).unwrap();
    }
}
