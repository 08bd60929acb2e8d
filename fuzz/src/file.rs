//! The cluster index loader: valid files (flat and with a coarse level) are mutated three
//! ways: random bytes changed, inserted or cut (the container and the checksum must catch
//! them); metadata fields rewritten and tensor values changed with the checksum recomputed
//! by the documented rule (so the loader's own checks must catch what contradicts). A file
//! must load or give an `Io` error; a loaded index must serve lookups and save back to the
//! same bytes.

use std::collections::HashMap;

use kvsieve::select::cluster::{ClusterConfig, ClusterCount, ClusterIndex, CoarseRetrieve, KeySource, Retrieve};
use kvsieve::{ErrorCode, TensorView};
use safetensors::tensor::TensorView as StView;
use safetensors::SafeTensors;

use crate::rng::Rng;

/// Valid files to start from: (bytes, head_dim).
pub fn seeds() -> Vec<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    for (n, hk, d, coarse) in [(64usize, 1usize, 8usize, false), (90, 2, 16, true), (40, 3, 8, true)] {
        let mut r = Rng(n as u64);
        let keys: Vec<f32> = (0..n * hk * d).map(|_| (r.below(2000) as f32 / 1000.0) - 1.0).collect();
        let t = TensorView::new(&keys, &[n, hk, d]).expect("shape");
        let mut cfg = ClusterConfig::new(ClusterCount::Absolute(n / 6)).with_exclude_window(4).with_max_iter(3);
        if coarse {
            cfg = cfg.with_coarse(ClusterCount::Absolute(3));
        }
        let ix = ClusterIndex::build(KeySource::Tensor(&t), &cfg).expect("build");
        out.push((ix.to_bytes().expect("save"), d));
    }
    out
}

/// The documented checksum: FNV-1a 64 over every metadata entry but `checksum`
/// (`key=value\n`, keys sorted), then every tensor in the file's table order (name, shape
/// as u64 LE, data).
fn checksum(meta: &HashMap<String, String>, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> String {
    const ORDER: [&str; 13] = [
        "centroids",
        "centroids_normalized",
        "sizes",
        "member_offsets",
        "members",
        "inertia",
        "iterations",
        "converged",
        "radii",
        "coarse_centroids",
        "coarse_sizes",
        "coarse_child_offsets",
        "coarse_children",
    ];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "checksum").collect();
    keys.sort();
    for k in keys {
        feed(format!("{k}={}\n", meta[k]).as_bytes());
    }
    for name in ORDER {
        if let Some((_, shape, data)) = tensors.iter().find(|t| t.0 == name) {
            feed(name.as_bytes());
            for &s in shape {
                feed(&(s as u64).to_le_bytes());
            }
            feed(data);
        }
    }
    format!("{h:016x}")
}

/// Rewrite a file's metadata and tensors and seal it with a recomputed checksum.
fn reseal(bytes: &[u8], r: &mut Rng) -> Option<Vec<u8>> {
    let st = SafeTensors::deserialize(bytes).ok()?;
    let (_, header) = SafeTensors::read_metadata(bytes).ok()?;
    let mut meta = header.metadata().clone()?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
    let dtypes: HashMap<String, safetensors::Dtype> = st.tensors().into_iter().map(|(n, t)| (n, t.dtype())).collect();
    for _ in 0..1 + r.below(3) {
        if r.chance(0.5) {
            let keys: Vec<String> = meta.keys().filter(|k| *k != "checksum").cloned().collect();
            let k = r.pick(&keys).clone();
            let v = match r.below(4) {
                0 => r.size().to_string(),
                1 => format!("absolute:{}", r.size()),
                2 => format!("fraction:{}", r.below(3000) as f64 / 1000.0),
                _ => meta[&k].chars().rev().collect(),
            };
            meta.insert(k, v);
        } else {
            let i = r.below(tensors.len() as u64) as usize;
            let data = &mut tensors[i].2;
            if !data.is_empty() {
                let at = r.below(data.len() as u64) as usize & !3;
                let word = match r.below(4) {
                    0 => 0u32,
                    1 => u32::MAX,
                    2 => r.below(300) as u32,
                    _ => r.next_u64() as u32,
                };
                let end = (at + 4).min(data.len());
                data[at..end].copy_from_slice(&word.to_le_bytes()[..end - at]);
            }
        }
    }
    meta.insert("checksum".into(), checksum(&meta, &tensors));
    let views: Vec<(String, StView)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), StView::new(dtypes[n], s.clone(), d).expect("same sizes")))
        .collect();
    safetensors::serialize(views, Some(meta)).ok()
}

/// One mutant of `base`.
pub fn mutate(base: &[u8], r: &mut Rng) -> Vec<u8> {
    if r.chance(0.6) {
        if let Some(b) = reseal(base, r) {
            return b;
        }
    }
    let mut b = base.to_vec();
    for _ in 0..1 + r.below(4) {
        let at = r.below(b.len() as u64 + 1) as usize;
        match r.below(4) {
            0 if at < b.len() => b[at] ^= 1 << r.below(8),
            1 if at < b.len() => b[at] = r.next_u64() as u8,
            2 => b.truncate(at),
            _ => b.splice(at..at, (0..r.below(16)).map(|_| r.next_u64() as u8)).for_each(drop),
        }
    }
    b
}

/// Check one file (see the module docs).
pub fn check(bytes: &[u8], head_dim: usize) -> Result<(), String> {
    let ix = match ClusterIndex::from_bytes(bytes) {
        Err(e) if e.code() == ErrorCode::Io => return Ok(()),
        Err(e) => return Err(format!("load failed with {:?}, expected an Io error: {e}", e.code())),
        Ok(ix) => ix,
    };
    let d = ix.head_dim();
    if d != head_dim && d > 512 {
        return Err(format!("loaded a head_dim of {d}"));
    }
    let q = vec![0.25f32; ix.num_kv_heads() * d];
    let q = TensorView::new(&q, &[ix.num_kv_heads(), d]).map_err(|e| e.to_string())?;
    for how in [Retrieve::Budget(16), Retrieve::Threshold(1e-3), Retrieve::MixedBudget(16)] {
        let _ = ix.retrieve(&q, &how, ix.seq_len());
    }
    if ix.num_coarse_clusters() > 0 {
        let _ = ix.retrieve_hierarchical(&q, CoarseRetrieve::BudgetMultiple(2.0), &Retrieve::Budget(16), ix.seq_len());
    }
    let again = ix.to_bytes().map_err(|e| format!("a loaded index does not save: {e}"))?;
    let back = ClusterIndex::from_bytes(&again)
        .map_err(|e| format!("a loaded index saves to a file that does not load: {e}"))?;
    // The same metadata and tensors (the container's JSON header may order keys differently).
    if contents(&back.to_bytes().map_err(|e| e.to_string())?) != contents(&again) {
        return Err("save, load, save gives another file".into());
    }
    Ok(())
}

type Contents = (Option<HashMap<String, String>>, Vec<(String, Vec<usize>, Vec<u8>)>);

fn contents(bytes: &[u8]) -> Contents {
    let st = SafeTensors::deserialize(bytes).expect("saved by kvsieve");
    let (_, header) = SafeTensors::read_metadata(bytes).expect("saved by kvsieve");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
    tensors.sort();
    (header.metadata().clone(), tensors)
}
