//! Figures for K-means clustering and centroid retrieval (`select::cluster`). Prints a table
//! and, with `--json PATH`, writes a flat JSON object of named figures:
//!
//! - `kmeans_time_vs_faiss`: kvsieve's K-means time over faiss-cpu's on the same keys
//!   (below 1: kvsieve is faster; target ≤ 1.0), and `kmeans_inertia_vs_faiss`: kvsieve's
//!   inertia over faiss's (below 1: kvsieve's clusters are tighter; target ≤ 1.01). Keys: 8 KV heads × 32,768 tokens
//!   × head_dim 128 of synthetic clustered keys (below), 1,638 clusters per head (5%), 20
//!   iterations, both spherical on L2-normalised keys, same thread count. This bench writes
//!   the keys to `target/bench/kmeans_keys.npy` (`[heads, tokens, 128]` f32), clusters them,
//!   then runs `benches/kmeans_faiss.py` with `.venv/bin/python` (or `$KVSIEVE_PYTHON`)
//!   on that file and reads its JSON. Inertia has one definition on both sides:
//!   `Σ_i ‖x̂_i − ĉ‖²` over unit keys and their nearest final unit centroid. Time is the
//!   whole clustering of all heads: for kvsieve normalisation, k-means++ seeding, 20
//!   update+assign iterations after a first assignment; for faiss `Kmeans.train` (random
//!   initialisation, 20 assign+update iterations). If Python or faiss is missing, the two
//!   figures are left out and the reason printed.
//! - `retrieval_mass_recall`: planted structure, 32,768 tokens, 2 KV heads × 4 query heads,
//!   head_dim 128, 1,638 clusters: background keys from 256 directions, plus 1% of the
//!   tokens (scattered) aligned with a direction that the decode queries also follow.
//!   Flat retrieval keeps 1/8 of the tokens (budget 4,096); the figure is the true softmax
//!   attention mass (exact, over all keys, averaged over query heads and 16 queries) that
//!   the kept tokens carry. `retrieval_oracle_topk_mass` is the mass of the best 4,096
//!   tokens per query head chosen by their true attention (the ceiling).
//! - `hier_lookup_fraction`: 131,072 tokens, 1 KV head × 4 query heads, head_dim 128, 4,096
//!   fine clusters (8 Lloyd iterations) and 64 coarse clusters; keys from 1,024 directions
//!   in 64 families of 16 related directions; 32 queries, each aimed at one direction. Flat retrieval at a budget of 1/8 of the
//!   tokens gives a mass recall `R` at `4 × 4,096` centroid evaluations per query.
//!   Hierarchical retrieval (`CoarseRetrieve::BudgetMultiple(m)`, same fine budget) is run
//!   for m = 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 12, 16 and the first m whose mean recall is at
//!   least `R − 0.01` is taken; the figure is its mean centroid evaluations (coarse + fine,
//!   counted by `RetrievalStats`) over the flat ones. `hier_lookup_recall_gap` is flat recall
//!   minus the hierarchical recall at that m.
//!
//! Options: `--json PATH`, `--quick` (smaller shapes: figures not comparable), `--no-faiss`.

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use kvsieve::select::cluster::{
    kmeans, ClusterConfig, ClusterCount, ClusterIndex, CoarseRetrieve, KMeansConfig, KeySource, Retrieve,
};
use kvsieve::TensorView;
use rayon::prelude::*;

/// Decode queries: `QUERY_GAIN` times a unit direction plus noise of expected norm `QUERY_NOISE`.
const QUERY_GAIN: f32 = 20.0;
const QUERY_NOISE: f32 = 8.0;

/// SplitMix64 for the synthetic data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    /// Roughly normal (sum of 4 uniforms, unit variance).
    fn normal(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.866
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn unit(&mut self, d: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..d).map(|_| self.normal()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }
}

/// Keys `[n][d]` of one head: a shared offset (keys of real models have a large mean), plus
/// one of `centers` directions with a per-token norm in [2, 4], plus Gaussian-like noise of
/// expected norm `noise`. Returns keys and the
/// direction index of each token.
fn synthetic_keys(rng: &mut Rng, n: usize, d: usize, centers: &[Vec<f32>], noise: f32) -> (Vec<f32>, Vec<usize>) {
    let offset = rng.unit(d);
    let sigma = noise / (d as f32).sqrt();
    let mut keys = Vec::with_capacity(n * d);
    let mut which = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(centers.len());
        which.push(c);
        let s = 3.0 + rng.uniform();
        for j in 0..d {
            keys.push(1.5 * offset[j] + s * centers[c][j] + sigma * rng.normal());
        }
    }
    (keys, which)
}

fn write_npy(path: &str, data: &[f32], shape: &[usize]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|s| s.to_string()).collect();
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for x in data {
        f.write_all(&x.to_le_bytes())?;
    }
    f.flush()
}

/// A number from a flat JSON object written by the faiss script.
fn json_number(text: &str, key: &str) -> Option<f64> {
    let at = text.find(&format!("\"{key}\""))?;
    let rest = text[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// Exact softmax attention (f64 normalisation) of `q` (`[g][d]`, unscaled) over keys `[n][d]`,
/// averaged over the `g` rows.
fn attention_mass(q: &[f32], g: usize, keys: &[f32], d: usize) -> Vec<f64> {
    let n = keys.len() / d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut mass = vec![0f64; n];
    for j in 0..g {
        let qj = &q[j * d..(j + 1) * d];
        let l: Vec<f32> =
            keys.par_chunks(d).map(|k| k.iter().zip(qj).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
        let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
        for (o, &x) in mass.iter_mut().zip(&l) {
            *o += ((x - m) as f64).exp() / z / g as f64;
        }
    }
    mass
}

fn top_mass(mass: &[f64], k: usize) -> f64 {
    let mut s = mass.to_vec();
    s.sort_unstable_by(|a, b| b.total_cmp(a));
    s[..k.min(s.len())].iter().sum()
}

struct KmeansFigures {
    secs: f64,
    inertia: f64,
}

fn bench_kmeans(heads: usize, n: usize, d: usize, k: usize, iters: usize, seed: u64, npy: &str) -> KmeansFigures {
    let mut rng = Rng(0xC1u64);
    let mut all = Vec::with_capacity(heads * n * d);
    for _ in 0..heads {
        let centers: Vec<Vec<f32>> = (0..256).map(|_| rng.unit(d)).collect();
        all.extend(synthetic_keys(&mut rng, n, d, &centers, 1.5).0);
    }
    std::fs::create_dir_all("target/bench").expect("create target/bench");
    write_npy(npy, &all, &[heads, n, d]).expect("write the keys .npy");
    let cfg = KMeansConfig { clusters: ClusterCount::Absolute(k), max_iter: iters, seed };
    let t = Instant::now();
    let mut inertia = 0.0;
    for h in 0..heads {
        let cl = kmeans(&all[h * n * d..(h + 1) * n * d], d, &cfg).expect("kmeans");
        inertia += cl.inertia();
    }
    let secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    kmeans(&all[..n * d], d, &KMeansConfig { max_iter: 0, ..cfg }).expect("kmeans");
    println!(
        "  (one head: normalisation + k-means++ + one assignment pass {:.3} s of {:.3} s)",
        t.elapsed().as_secs_f64(),
        secs / heads as f64
    );
    KmeansFigures { secs, inertia }
}

fn run_faiss(npy: &str, k: usize, iters: usize, seed: u64, out: &str) -> Result<(f64, f64), String> {
    let python = std::env::var("KVSIEVE_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let threads = rayon::current_num_threads().to_string();
    let status = Command::new(&python)
        .args(["benches/kmeans_faiss.py", "--keys", npy, "--clusters", &k.to_string(), "--iters", &iters.to_string()])
        .args(["--seed", &seed.to_string(), "--threads", &threads, "--json", out])
        .status()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    if !status.success() {
        return Err(format!("{python} benches/kmeans_faiss.py failed ({status}); is faiss-cpu installed (.venv/bin/pip install faiss-cpu)?"));
    }
    let text = std::fs::read_to_string(out).map_err(|e| format!("reading {out}: {e}"))?;
    let secs = json_number(&text, "faiss_seconds").ok_or("faiss_seconds missing")?;
    let inertia = json_number(&text, "faiss_inertia").ok_or("faiss_inertia missing")?;
    Ok((secs, inertia))
}

/// Planted structure: (mass recall at 1/8 budget, oracle top-k mass).
fn bench_planted(n: usize, d: usize, k: usize) -> (f64, f64) {
    let (hk, g) = (2, 4);
    let mut rng = Rng(0x9A);
    let mut keys = vec![0f32; n * hk * d];
    let mut dirs = Vec::new();
    for h in 0..hk {
        let centers: Vec<Vec<f32>> = (0..256).map(|_| rng.unit(d)).collect();
        let (kh, _) = synthetic_keys(&mut rng, n, d, &centers, 1.0);
        let u = rng.unit(d);
        let sigma = 1.0 / (d as f32).sqrt();
        for t in 0..n {
            let planted = rng.below(100) == 0;
            for c in 0..d {
                keys[(t * hk + h) * d + c] =
                    if planted { (3.0 + rng.uniform()) * u[c] + sigma * rng.normal() } else { kh[t * d + c] };
            }
        }
        dirs.push(u);
    }
    let cfg = ClusterConfig::new(ClusterCount::Absolute(k)).with_max_iter(20);
    let kv = TensorView::new(&keys, &[n, hk, d]).unwrap();
    let index = ClusterIndex::build(KeySource::Tensor(&kv), &cfg).expect("build");
    let head_keys: Vec<Vec<f32>> =
        (0..hk).map(|h| (0..n).flat_map(|t| keys[(t * hk + h) * d..(t * hk + h + 1) * d].to_vec()).collect()).collect();
    let budget = n / 8;
    let (mut recall, mut oracle) = (0f64, 0f64);
    let queries = 16;
    for _ in 0..queries {
        let q: Vec<f32> = (0..hk * g)
            .flat_map(|j| {
                dirs[j / g]
                    .iter()
                    .map(|&x| QUERY_GAIN * x + QUERY_NOISE / (d as f32).sqrt() * rng.normal())
                    .collect::<Vec<_>>()
            })
            .collect();
        let sel = index
            .retrieve(&TensorView::new(&q, &[hk * g, d]).unwrap(), &Retrieve::Budget(budget), n)
            .unwrap()
            .selection;
        for h in 0..hk {
            let mass = attention_mass(&q[h * g * d..(h + 1) * g * d], g, &head_keys[h], d);
            recall += sel.head(h).iter().map(|&t| mass[t as usize]).sum::<f64>() / (queries * hk) as f64;
            oracle += top_mass(&mass, budget) / (queries * hk) as f64;
        }
    }
    (recall, oracle)
}

struct HierFigures {
    fraction: f64,
    multiple: f64,
    flat_recall: f64,
    hier_recall: f64,
}

fn bench_hier(n: usize, d: usize, k: usize, k1: usize) -> HierFigures {
    let g = 4;
    let mut rng = Rng(0x41E5);
    // 1,024 directions in 64 families (a family's members share a direction), as keys of
    // real models sit near a few subspaces: what a coarse level can exploit.
    let families: Vec<Vec<f32>> = (0..64).map(|_| rng.unit(d)).collect();
    let centers: Vec<Vec<f32>> = (0..1024)
        .map(|i| {
            let v: Vec<f32> = families[i / 16].iter().zip(rng.unit(d)).map(|(a, b)| a + 0.8 * b).collect();
            let nv = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / nv).collect()
        })
        .collect();
    let (keys, _) = synthetic_keys(&mut rng, n, d, &centers, 1.5);
    let cfg = ClusterConfig::new(ClusterCount::Absolute(k)).with_coarse(ClusterCount::Absolute(k1)).with_max_iter(8);
    let t = Instant::now();
    let index =
        ClusterIndex::build(KeySource::Tensor(&TensorView::new(&keys, &[n, 1, d]).unwrap()), &cfg).expect("build");
    println!("  (clustered {n} tokens into {k} + {k1} clusters in {:.1} s)", t.elapsed().as_secs_f64());
    let budget = n / 8;
    let queries: Vec<Vec<f32>> = (0..32)
        .map(|_| {
            let c = &centers[rng.below(centers.len())];
            (0..g)
                .flat_map(|_| {
                    c.iter()
                        .map(|&x| QUERY_GAIN * x + QUERY_NOISE / (d as f32).sqrt() * rng.normal())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    let masses: Vec<Vec<f64>> = queries.iter().map(|q| attention_mass(q, g, &keys, d)).collect();
    let recall_of = |sel: &kvsieve::Selection, mass: &[f64]| sel.head(0).iter().map(|&t| mass[t as usize]).sum::<f64>();
    let (mut flat_recall, mut flat_evals) = (0f64, 0f64);
    for (q, m) in queries.iter().zip(&masses) {
        let r = index.retrieve(&TensorView::new(q, &[g, d]).unwrap(), &Retrieve::Budget(budget), n).unwrap();
        flat_recall += recall_of(&r.selection, m) / queries.len() as f64;
        flat_evals += r.stats.centroid_evals as f64 / queries.len() as f64;
    }
    let mut last = None;
    for mult in [1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0] {
        let (mut rec, mut evals) = (0f64, 0f64);
        for (q, m) in queries.iter().zip(&masses) {
            let r = index
                .retrieve_hierarchical(
                    &TensorView::new(q, &[g, d]).unwrap(),
                    CoarseRetrieve::BudgetMultiple(mult),
                    &Retrieve::Budget(budget),
                    n,
                )
                .unwrap();
            rec += recall_of(&r.selection, m) / queries.len() as f64;
            evals += r.stats.centroid_evals as f64 / queries.len() as f64;
        }
        println!(
            "  coarse budget x{mult:<5}: recall {rec:.4} (flat {flat_recall:.4}), centroid evals {:.3} of flat",
            evals / flat_evals
        );
        last = Some(HierFigures { fraction: evals / flat_evals, multiple: mult, flat_recall, hier_recall: rec });
        if rec >= flat_recall - 0.01 {
            break;
        }
    }
    last.expect("at least one multiple")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let no_faiss = args.iter().any(|a| a == "--no-faiss");
    let (heads, n, d, iters, seed) = if quick { (2, 8192, 128, 20, 7) } else { (8, 32768, 128, 20, 7) };
    let k = (n as f64 * 0.05) as usize;
    let threads = rayon::current_num_threads();
    let mut figures: Vec<(&str, f64)> = Vec::new();

    println!("== K-means: {heads} heads x {n} keys x {d}, {k} clusters, {iters} iterations, {threads} threads");
    let npy = "target/bench/kmeans_keys.npy";
    let ours = bench_kmeans(heads, n, d, k, iters, seed, npy);
    println!("  kvsieve: {:.2} s, inertia {:.2}", ours.secs, ours.inertia);
    if no_faiss {
        println!("  faiss: skipped (--no-faiss)");
    } else {
        match run_faiss(npy, k, iters, seed, "target/bench/kmeans_faiss_raw.json") {
            Ok((secs, inertia)) => {
                println!("  faiss:   {secs:.2} s, inertia {inertia:.2}");
                figures.push(("kmeans_time_vs_faiss", ours.secs / secs));
                figures.push(("kmeans_inertia_vs_faiss", ours.inertia / inertia));
            }
            Err(e) => println!("  faiss: not measured: {e}"),
        }
    }

    let pn = if quick { 8192 } else { 32768 };
    println!("== planted structure: {pn} tokens, budget 1/8");
    let (recall, oracle) = bench_planted(pn, d, (pn as f64 * 0.05) as usize);
    println!("  mass recall {recall:.4}, oracle top-k mass {oracle:.4}");
    figures.push(("retrieval_mass_recall", recall));
    figures.push(("retrieval_oracle_topk_mass", oracle));

    let (hn, hk_fine, hk_coarse) = if quick { (16384, 512, 16) } else { (131072, 4096, 64) };
    println!("== hierarchical lookup: {hn} tokens, {hk_fine} fine / {hk_coarse} coarse clusters, budget 1/8");
    let h = bench_hier(hn, d, hk_fine, hk_coarse);
    println!(
        "  at coarse budget x{}: {:.3} of the flat centroid evaluations, recall {:.4} vs flat {:.4}",
        h.multiple, h.fraction, h.hier_recall, h.flat_recall
    );
    figures.push(("hier_lookup_fraction", h.fraction));
    figures.push(("hier_lookup_recall_gap", h.flat_recall - h.hier_recall));

    println!("\n{:<30} {:>10}", "figure", "value");
    for (name, v) in &figures {
        println!("{name:<30} {v:>10.4}");
    }
    if let Some(path) = arg("--json") {
        let body: Vec<String> = figures.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
        std::fs::write(&path, format!("{{\n{}\n}}\n", body.join(",\n"))).expect("write --json file");
        println!("written: {path}");
    }
}
