//! K-means on the device: 128K keys × 128 channels × 8 KV heads (f16 and bf16) into 5%
//! clusters per head, time per 10 Lloyd iterations (each an update and an assignment
//! pass; the run also holds the norms, the first assignment and the raw means), for the
//! tensor-core paths. Target: at most 50 ms per 10 iterations on an H100/H200-class GPU.
//!
//! `cargo bench --features cuda --bench gpu_kmeans` (prints `skipped: <reason>` without a
//! GPU). Options: `KVSIEVE_KMEANS_KEYS` (default 131072), `KVSIEVE_KMEANS_REPS` (default 3).

use std::time::Instant;

use kvsieve::backend::cuda::select::kmeans::{Assignment, CudaKMeans};
use kvsieve::backend::cuda::{CudaDevice, DeviceBuffer, DeviceTensor};
use kvsieve::{bf16, f16, DType};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let dev = match CudaDevice::get(0) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: gpu_kmeans: {e}");
            return;
        }
    };
    let stream = dev.stream();
    let (n, hk, d) = (env("KVSIEVE_KMEANS_KEYS", 131072), 8usize, 128usize);
    let k = ((n as f64) * 0.05).round() as usize;
    let reps = env("KVSIEVE_KMEANS_REPS", 3).max(1);
    let iters = 10usize;
    println!(
        "gpu_kmeans: {} ({} SMs), {n} keys x {d} dims x {hk} heads, {k} clusters per head, {iters} iterations",
        dev.name(),
        dev.num_sms()
    );
    // Random keys with some structure: a few hundred directions plus noise.
    let mut state = 0x5eed_u64;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let dirs: Vec<f32> = (0..256 * d).map(|_| next()).collect();
    let mut keys = vec![0f32; n * hk * d];
    for (r, row) in keys.chunks_exact_mut(d).enumerate() {
        let c = &dirs[(r * 37 % 256) * d..(r * 37 % 256 + 1) * d];
        for (o, &v) in row.iter_mut().zip(c) {
            *o = v + 0.3 * next();
        }
    }
    let mut init = vec![0f32; hk * k * d];
    for h in 0..hk {
        for c in 0..k {
            let t = (c * (n / k)) % n;
            init[(h * k + c) * d..(h * k + c + 1) * d].copy_from_slice(&keys[(t * hk + h) * d..(t * hk + h + 1) * d]);
        }
    }
    let flops = 2.0 * n as f64 * k as f64 * d as f64 * hk as f64;
    for dtype in [DType::F16, DType::BF16] {
        let bytes: Vec<u8> = match dtype {
            DType::F16 => bytemuck::cast_slice(&keys.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
            _ => bytemuck::cast_slice(&keys.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        };
        let buf = DeviceBuffer::from_slice(&dev, &bytes, stream).expect("upload keys");
        let kt = DeviceTensor::contiguous(buf.ptr(), dtype, &[n, hk, d], dev.ordinal());
        for path in [Assignment::TensorCore, Assignment::Split] {
            let km = match CudaKMeans::new(&dev, &kt, k, iters, path) {
                Ok(km) => km,
                Err(e) => {
                    println!("gpu_kmeans: {dtype} {path:?}: {e}");
                    continue;
                }
            };
            km.set_centroids(&init, stream).expect("init");
            km.run(stream).expect("warm-up run");
            stream.synchronize().expect("sync");
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                km.set_centroids(&init, stream).expect("init");
                stream.synchronize().expect("sync");
                let t0 = Instant::now();
                km.run(stream).expect("run");
                stream.synchronize().expect("sync");
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let res = km.results(stream).expect("results");
            let done: Vec<usize> = res.iter().map(|c| c.iterations()).collect();
            // The run holds 11 assignment passes (the first plus one per iteration).
            let passes = 1 + iters;
            let per10 = best * 1e3;
            println!(
                "gpu_kmeans: {dtype} {path:?}: {per10:.1} ms per {iters} iterations (target <= 50 ms: {}), {:.0} TFLOP/s of tensor-core work in assignment (the split path counts both parts), iterations run per head {done:?}",
                if per10 <= 50.0 { "met" } else { "missed" },
                flops * passes as f64 / best / 1e12 * if path == Assignment::Split { 2.0 } else { 1.0 },
            );
        }
    }
}
