//! Saving and loading a [`ClusterIndex`]: a safetensors file of little-endian tensors plus
//! string metadata, versioned and checksummed.
//!
//! Tensors (`hk` KV heads, `C` fine clusters, `C1` coarse clusters, `m` clustered tokens,
//! `d` head_dim):
//!
//! | name | dtype | shape |
//! |---|---|---|
//! | `centroids` (raw-key means) | F32 | `[hk, C, d]` |
//! | `centroids_normalized` | F32 | `[hk, C, d]` |
//! | `sizes` | U32 | `[hk, C]` |
//! | `member_offsets` | U32 | `[hk, C + 1]` |
//! | `members` | U32 | `[hk, m]` |
//! | `inertia` | F64 | `[hk]` |
//! | `iterations` | U32 | `[hk]` |
//! | `converged` | U8 | `[hk]` |
//! | `radii` (version 2, when known: each cluster's largest member distance to its raw centroid) | F32 | `[hk, C]` |
//! | `coarse_centroids` (only with a coarse level) | F32 | `[hk, C1, d]` |
//! | `coarse_sizes` | U32 | `[hk, C1]` |
//! | `coarse_child_offsets` | U32 | `[hk, C1 + 1]` |
//! | `coarse_children` | U32 | `[hk, C]` |
//!
//! Metadata: `format` = `kvsieve.cluster_index`, `format_version` = `2`, `num_kv_heads`,
//! `head_dim`, `num_clusters`, `num_coarse_clusters` (0 without a coarse level), `seq_len`,
//! `seq_len_at_build`, `clustered_len`, `config.clusters` / `config.coarse`
//! (`absolute:N`, `fraction:F` or `none`), `config.exclude_window`, `config.max_iter`,
//! `config.seed`, and `checksum`: FNV-1a 64 (16 hex digits) over every other metadata entry
//! (`key=value\n`, keys sorted) and then every tensor in the order of the table above (name,
//! shape as u64 LE, data bytes).
//!
//! Version 1 files (no `radii`) still load; their index has no radii, so
//! [`crate::select::cluster::Retrieve::MixedBudget`] needs a rebuild.
//!
//! Loading checks the container, the format and version, every field, every tensor's dtype
//! and shape, the checksum, and the index's invariants (offsets, members forming each
//! token exactly once and ascending per cluster, sizes, finite centroids, the coarse
//! children forming each fine cluster once); any failure is [`Error::Io`] naming the file and
//! what is wrong, except memory running out while the arrays are copied
//! ([`Error::OutOfMemory`]).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView as StView};

use crate::alloc::{collect_n, copy_of, filled_vec, vec_with_capacity};
use crate::config::validate_head_dim;
use crate::error::{Error, Result};
use crate::select::cluster::index::{ClusterConfig, ClusterIndex, CoarseLevel};
use crate::select::cluster::keys::with_keys;
use crate::select::cluster::kmeans::{ClusterCount, Clustering};
use crate::select::KeySource;

const FORMAT: &str = "kvsieve.cluster_index";
const VERSION: u32 = 2;
/// Versions this build reads.
const READS: [u32; 2] = [1, 2];

/// FNV-1a, 64 bits.
struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn count_text(c: Option<ClusterCount>) -> String {
    match c {
        None => "none".into(),
        Some(ClusterCount::Absolute(n)) => format!("absolute:{n}"),
        Some(ClusterCount::Fraction(f)) => format!("fraction:{f}"),
    }
}

fn parse_count(s: &str) -> Option<Option<ClusterCount>> {
    if s == "none" {
        return Some(None);
    }
    if let Some(n) = s.strip_prefix("absolute:") {
        return n.parse().ok().map(|n| Some(ClusterCount::Absolute(n)));
    }
    s.strip_prefix("fraction:").and_then(|f| f.parse().ok()).map(|f| Some(ClusterCount::Fraction(f)))
}

/// One named tensor, owned, little-endian.
struct Tensor {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn checksum(meta: &HashMap<String, String>, tensors: &[(&str, Vec<usize>, &[u8])]) -> String {
    let mut h = Fnv::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.as_str() != "checksum").collect();
    keys.sort();
    for k in keys {
        h.write(format!("{k}={}\n", meta[k]).as_bytes());
    }
    for (name, shape, data) in tensors {
        h.write(name.as_bytes());
        for &s in shape {
            h.write(&(s as u64).to_le_bytes());
        }
        h.write(data);
    }
    format!("{:016x}", h.0)
}

const FINE: [&str; 8] =
    ["centroids", "centroids_normalized", "sizes", "member_offsets", "members", "inertia", "iterations", "converged"];
const COARSE: [&str; 4] = ["coarse_centroids", "coarse_sizes", "coarse_child_offsets", "coarse_children"];

impl ClusterIndex {
    fn tensors(&self) -> Vec<Tensor> {
        let (hk, k, d, m) = (self.num_kv_heads, self.num_clusters(), self.head_dim, self.clustered_len);
        let cat_f32 = |f: &dyn Fn(&Clustering) -> &[f32]| {
            le(&self.heads.iter().flat_map(|c| f(c).iter().copied()).collect::<Vec<_>>(), f32::to_le_bytes)
        };
        let cat_u32 = |f: &dyn Fn(&Clustering) -> &[u32]| {
            le(&self.heads.iter().flat_map(|c| f(c).iter().copied()).collect::<Vec<_>>(), u32::to_le_bytes)
        };
        let mut t = vec![
            Tensor { name: "centroids", dtype: Dtype::F32, shape: vec![hk, k, d], data: cat_f32(&|c| &c.centroids) },
            Tensor {
                name: "centroids_normalized",
                dtype: Dtype::F32,
                shape: vec![hk, k, d],
                data: cat_f32(&|c| &c.centroids_normalized),
            },
            Tensor { name: "sizes", dtype: Dtype::U32, shape: vec![hk, k], data: cat_u32(&|c| &c.sizes) },
            Tensor {
                name: "member_offsets",
                dtype: Dtype::U32,
                shape: vec![hk, k + 1],
                data: cat_u32(&|c| &c.member_offsets),
            },
            Tensor { name: "members", dtype: Dtype::U32, shape: vec![hk, m], data: cat_u32(&|c| &c.members) },
            Tensor {
                name: "inertia",
                dtype: Dtype::F64,
                shape: vec![hk],
                data: le(&self.heads.iter().map(|c| c.inertia).collect::<Vec<_>>(), f64::to_le_bytes),
            },
            Tensor {
                name: "iterations",
                dtype: Dtype::U32,
                shape: vec![hk],
                data: le(&self.heads.iter().map(|c| c.iterations as u32).collect::<Vec<_>>(), u32::to_le_bytes),
            },
            Tensor {
                name: "converged",
                dtype: Dtype::U8,
                shape: vec![hk],
                data: self.heads.iter().map(|c| c.converged as u8).collect(),
            },
        ];
        if self.heads.iter().all(|c| c.radii.len() == k) {
            t.push(Tensor { name: "radii", dtype: Dtype::F32, shape: vec![hk, k], data: cat_f32(&|c| &c.radii) });
        }
        if !self.coarse.is_empty() {
            let k1 = self.num_coarse_clusters();
            let cat = |f: &dyn Fn(&CoarseLevel) -> &[u32]| {
                le(&self.coarse.iter().flat_map(|c| f(c).iter().copied()).collect::<Vec<_>>(), u32::to_le_bytes)
            };
            t.push(Tensor {
                name: "coarse_centroids",
                dtype: Dtype::F32,
                shape: vec![hk, k1, d],
                data: le(
                    &self.coarse.iter().flat_map(|c| c.centroids.iter().copied()).collect::<Vec<_>>(),
                    f32::to_le_bytes,
                ),
            });
            t.push(Tensor { name: "coarse_sizes", dtype: Dtype::U32, shape: vec![hk, k1], data: cat(&|c| &c.sizes) });
            t.push(Tensor {
                name: "coarse_child_offsets",
                dtype: Dtype::U32,
                shape: vec![hk, k1 + 1],
                data: cat(&|c| &c.child_offsets),
            });
            t.push(Tensor {
                name: "coarse_children",
                dtype: Dtype::U32,
                shape: vec![hk, k],
                data: cat(&|c| &c.children),
            });
        }
        t
    }

    /// The index as safetensors bytes (see the module docs for the layout).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let c = &self.config;
        let mut meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", VERSION.to_string()),
            ("num_kv_heads", self.num_kv_heads.to_string()),
            ("head_dim", self.head_dim.to_string()),
            ("num_clusters", self.num_clusters().to_string()),
            ("num_coarse_clusters", self.num_coarse_clusters().to_string()),
            ("seq_len", self.seq_len.to_string()),
            ("seq_len_at_build", self.seq_len_at_build.to_string()),
            ("clustered_len", self.clustered_len.to_string()),
            ("config.clusters", count_text(Some(c.clusters))),
            ("config.coarse", count_text(c.coarse)),
            ("config.exclude_window", c.exclude_window.to_string()),
            ("config.max_iter", c.max_iter.to_string()),
            ("config.seed", c.seed.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tensors = self.tensors();
        let parts: Vec<(&str, Vec<usize>, &[u8])> =
            tensors.iter().map(|t| (t.name, t.shape.clone(), &t.data[..])).collect();
        meta.insert("checksum".into(), checksum(&meta, &parts));
        let views = tensors
            .iter()
            .map(|t| StView::new(t.dtype, t.shape.clone(), &t.data).map(|v| (t.name, v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(format!("cluster index tensor: {e}")))?;
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Io(format!("serializing the cluster index: {e}")))
    }

    /// Write the index to `path` (see the module docs for the format).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::Io(format!("writing cluster index {}: {e}", path.display())))
    }

    /// Read an index written by [`ClusterIndex::save`], verifying everything (see the module
    /// docs). Every failure is [`Error::Io`], except memory running out
    /// ([`Error::OutOfMemory`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io(format!("reading cluster index {}: {e}", path.display())))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::Io(m) => Error::Io(format!("cluster index {}: {m}", path.display())),
            other => other,
        })
    }

    /// [`ClusterIndex::load`], then check that the index fits `src`: same `num_kv_heads`
    /// and `head_dim`, and a sequence at least as long as the index covers. A mismatch is
    /// [`Error::Io`] too (the file is for another cache or sequence).
    pub fn load_for(path: impl AsRef<Path>, src: KeySource<'_>) -> Result<Self> {
        let path = path.as_ref();
        let index = Self::load(path)?;
        with_keys(src, |keys| {
            if keys.hk != index.num_kv_heads || keys.d != index.head_dim {
                return Err(Error::Io(format!(
                    "cluster index {} has num_kv_heads {} and head_dim {}, the keys have num_kv_heads {} and head_dim {}",
                    path.display(),
                    index.num_kv_heads,
                    index.head_dim,
                    keys.hk,
                    keys.d
                )));
            }
            if keys.n < index.seq_len {
                return Err(Error::Io(format!(
                    "cluster index {} covers {} tokens, the sequence holds only {}",
                    path.display(),
                    index.seq_len,
                    keys.n
                )));
            }
            Ok(())
        })?;
        Ok(index)
    }

    /// Parse and verify safetensors bytes (see [`ClusterIndex::load`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let io = |m: String| Error::Io(m);
        let st = SafeTensors::deserialize(bytes).map_err(|e| io(format!("not a valid safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| io(format!("not a valid safetensors file: {e}")))?;
        let meta = header.metadata().clone().ok_or_else(|| io("no metadata (not a kvsieve cluster index)".into()))?;
        let field = |k: &str| meta.get(k).ok_or_else(|| io(format!("metadata field `{k}` missing")));
        if field("format")? != FORMAT {
            return Err(io(format!("format `{}`, expected `{FORMAT}`", field("format")?)));
        }
        let version = field("format_version")?;
        if !READS.iter().any(|v| version == &v.to_string()) {
            return Err(io(format!("format version {version}, this build reads versions {READS:?}")));
        }
        let has_radii = st.tensor("radii").is_ok();
        if has_radii && version == "1" {
            return Err(io("tensor `radii` in a version 1 file".into()));
        }
        let num = |k: &str| -> Result<usize> {
            field(k)?.parse::<usize>().map_err(|_| io(format!("metadata field `{k}` is not a count: `{}`", meta[k])))
        };
        let (hk, d, k, k1) =
            (num("num_kv_heads")?, num("head_dim")?, num("num_clusters")?, num("num_coarse_clusters")?);
        let (seq_len, seq_len_at_build, m) = (num("seq_len")?, num("seq_len_at_build")?, num("clustered_len")?);
        let clusters = parse_count(field("config.clusters")?)
            .flatten()
            .ok_or_else(|| io("metadata field `config.clusters` malformed".into()))?;
        let coarse_cfg = parse_count(field("config.coarse")?)
            .ok_or_else(|| io("metadata field `config.coarse` malformed".into()))?;
        let config = ClusterConfig {
            clusters,
            exclude_window: num("config.exclude_window")?,
            max_iter: num("config.max_iter")?,
            seed: field("config.seed")?.parse().map_err(|_| io("metadata field `config.seed` malformed".into()))?,
            coarse: coarse_cfg,
        };
        validate_head_dim(d).map_err(|e| io(format!("head_dim: {e}")))?;
        if hk == 0
            || k == 0
            || k > m
            || m > seq_len
            || seq_len > u32::MAX as usize
            || seq_len_at_build > seq_len
            || k1 > k
            || (k1 > 0) != coarse_cfg.is_some()
        {
            return Err(io(format!(
                "inconsistent sizes: num_kv_heads {hk}, num_clusters {k}, num_coarse_clusters {k1}, clustered_len {m}, seq_len {seq_len}, seq_len_at_build {seq_len_at_build}"
            )));
        }
        // The configuration must give these counts for the context it was built over, and
        // updates only ever cluster more tokens, up to the window the configuration leaves out.
        let (m0, k0, k10) = config
            .counts(seq_len_at_build)
            .map_err(|e| io(format!("metadata `config.*` and `seq_len_at_build` {seq_len_at_build} disagree: {e}")))?;
        if (k0, k10.unwrap_or(0)) != (k, k1) {
            return Err(io(format!(
                "metadata `num_clusters` {k} / `num_coarse_clusters` {k1}: the configuration gives {k0} / {} for `seq_len_at_build` {seq_len_at_build}",
                k10.unwrap_or(0)
            )));
        }
        if m < m0 || (m > m0 && m > seq_len.saturating_sub(config.exclude_window)) {
            return Err(io(format!(
                "metadata `clustered_len` {m}: expected {m0} tokens clustered at build (`seq_len_at_build` {seq_len_at_build} less `config.exclude_window` {}), or more after updates up to {} (`seq_len` {seq_len} less the window)",
                config.exclude_window,
                seq_len.saturating_sub(config.exclude_window).max(m0)
            )));
        }
        if hk > crate::config::MAX_KV_HEADS {
            return Err(io(format!("metadata `num_kv_heads` {hk}: at most {}", crate::config::MAX_KV_HEADS)));
        }
        let mut shapes: Vec<(&str, Dtype, Vec<usize>)> = vec![
            ("centroids", Dtype::F32, vec![hk, k, d]),
            ("centroids_normalized", Dtype::F32, vec![hk, k, d]),
            ("sizes", Dtype::U32, vec![hk, k]),
            ("member_offsets", Dtype::U32, vec![hk, k + 1]),
            ("members", Dtype::U32, vec![hk, m]),
            ("inertia", Dtype::F64, vec![hk]),
            ("iterations", Dtype::U32, vec![hk]),
            ("converged", Dtype::U8, vec![hk]),
        ];
        if has_radii {
            shapes.push(("radii", Dtype::F32, vec![hk, k]));
        }
        if k1 > 0 {
            shapes.push(("coarse_centroids", Dtype::F32, vec![hk, k1, d]));
            shapes.push(("coarse_sizes", Dtype::U32, vec![hk, k1]));
            shapes.push(("coarse_child_offsets", Dtype::U32, vec![hk, k1 + 1]));
            shapes.push(("coarse_children", Dtype::U32, vec![hk, k]));
        }
        let expected: Vec<&str> = FINE
            .iter()
            .chain(if has_radii { &["radii"][..] } else { &[] })
            .chain(if k1 > 0 { &COARSE[..] } else { &[] })
            .copied()
            .collect();
        if st.len() != expected.len() {
            let mut names = st.names();
            names.sort();
            return Err(io(format!("tensors {names:?}, expected {expected:?}")));
        }
        let mut data: HashMap<&str, &[u8]> = HashMap::new();
        for (name, dtype, shape) in &shapes {
            let t = st.tensor(name).map_err(|_| io(format!("tensor `{name}` missing")))?;
            if t.dtype() != *dtype || t.shape() != &shape[..] {
                return Err(io(format!(
                    "tensor `{name}`: expected {dtype:?} {shape:?}, got {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            data.insert(name, t.data());
        }
        let parts: Vec<(&str, Vec<usize>, &[u8])> = shapes.iter().map(|(n, _, s)| (*n, s.clone(), data[n])).collect();
        let stored = field("checksum")?;
        let computed = checksum(&meta, &parts);
        if *stored != computed {
            return Err(io(format!("checksum mismatch (stored {stored}, computed {computed}): the file is corrupted")));
        }
        // Every array is as long as its tensor in the file, but is allocated fallibly all
        // the same: a file can be large.
        let f32s = |n: &str| -> Result<Vec<f32>> {
            let b = data[n];
            collect_n(b.len() / 4, b.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])), n)
        };
        let u32s = |n: &str| -> Result<Vec<u32>> {
            let b = data[n];
            collect_n(b.len() / 4, b.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])), n)
        };
        let (cents, cnorm, sizes, offs, mems) = (
            f32s("centroids")?,
            f32s("centroids_normalized")?,
            u32s("sizes")?,
            u32s("member_offsets")?,
            u32s("members")?,
        );
        let inertia: Vec<f64> = collect_n(
            hk,
            data["inertia"].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            "inertia",
        )?;
        let iters = u32s("iterations")?;
        let conv = data["converged"];
        if let Some(i) = cents.iter().chain(&cnorm).position(|v| !v.is_finite()) {
            return Err(io(format!("non-finite centroid value at flat position {i}")));
        }
        let radii = if has_radii { f32s("radii")? } else { Vec::new() };
        if let Some(i) = radii.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(io(format!("radius at flat position {i} is {}, expected a finite value >= 0", radii[i])));
        }
        let mut heads = vec_with_capacity(hk, "cluster index heads")?;
        for h in 0..hk {
            let off = copy_of(&offs[h * (k + 1)..(h + 1) * (k + 1)], "member_offsets")?;
            let members = copy_of(&mems[h * m..(h + 1) * m], "members")?;
            let hsizes = copy_of(&sizes[h * k..(h + 1) * k], "sizes")?;
            let group = filled_vec(m, u32::MAX, "cluster assignment")?;
            let assignment =
                check_csr(&off, &members, &hsizes, group).map_err(|e| io(format!("head {h}: members: {e}")))?;
            if conv[h] > 1 || !inertia[h].is_finite() || inertia[h] < 0.0 {
                return Err(io(format!("head {h}: bad inertia {} or converged flag {}", inertia[h], conv[h])));
            }
            if iters[h] as usize > config.max_iter {
                return Err(io(format!(
                    "tensor `iterations`: head {h} ran {} iterations, above `config.max_iter` {}",
                    iters[h], config.max_iter
                )));
            }
            heads.push(Clustering {
                d,
                centroids: copy_of(&cents[h * k * d..(h + 1) * k * d], "centroids")?,
                centroids_normalized: copy_of(&cnorm[h * k * d..(h + 1) * k * d], "centroids_normalized")?,
                sizes: hsizes,
                member_offsets: off,
                members,
                assignment,
                inertia: inertia[h],
                inertia_history: vec![inertia[h]],
                iterations: iters[h] as usize,
                converged: conv[h] == 1,
                seeds: Vec::new(),
                radii: if has_radii { copy_of(&radii[h * k..(h + 1) * k], "radii")? } else { Vec::new() },
            });
        }
        let mut coarse = vec_with_capacity(if k1 > 0 { hk } else { 0 }, "cluster index heads")?;
        if k1 > 0 {
            let (cc, cs, co, ch) = (
                f32s("coarse_centroids")?,
                u32s("coarse_sizes")?,
                u32s("coarse_child_offsets")?,
                u32s("coarse_children")?,
            );
            if let Some(i) = cc.iter().position(|v| !v.is_finite()) {
                return Err(io(format!("non-finite coarse centroid value at flat position {i}")));
            }
            for h in 0..hk {
                let off = copy_of(&co[h * (k1 + 1)..(h + 1) * (k1 + 1)], "coarse_child_offsets")?;
                let children = copy_of(&ch[h * k..(h + 1) * k], "coarse_children")?;
                let csizes = copy_of(&cs[h * k1..(h + 1) * k1], "coarse_sizes")?;
                let child_counts = collect_n(k1, off.windows(2).map(|w| w[1].wrapping_sub(w[0])), "coarse_sizes")?;
                let group = filled_vec(k, u32::MAX, "coarse children")?;
                check_csr(&off, &children, &child_counts, group)
                    .map_err(|e| io(format!("head {h}: coarse children: {e}")))?;
                for c in 0..k1 {
                    let total: u64 = children[off[c] as usize..off[c + 1] as usize]
                        .iter()
                        .map(|&f| heads[h].sizes[f as usize] as u64)
                        .sum();
                    if total != csizes[c] as u64 {
                        return Err(io(format!(
                            "head {h}: coarse cluster {c} has size {}, its children hold {total}",
                            csizes[c]
                        )));
                    }
                }
                coarse.push(CoarseLevel {
                    centroids: copy_of(&cc[h * k1 * d..(h + 1) * k1 * d], "coarse_centroids")?,
                    sizes: csizes,
                    child_offsets: off,
                    children,
                });
            }
        }
        Ok(ClusterIndex {
            config,
            num_kv_heads: hk,
            head_dim: d,
            seq_len_at_build,
            seq_len,
            clustered_len: m,
            heads,
            coarse,
        })
    }
}

/// Check a CSR grouping of the items `0..n` into `sizes.len()` groups: offsets from 0 to
/// `n`, non-decreasing, group sizes equal to `sizes`, items ascending within a group, every
/// item exactly once. `group` is `n` entries of `u32::MAX`; returns it holding each item's
/// group.
fn check_csr(
    offsets: &[u32],
    items: &[u32],
    sizes: &[u32],
    mut group: Vec<u32>,
) -> std::result::Result<Vec<u32>, String> {
    let (k, n) = (sizes.len(), group.len());
    if offsets[0] != 0 || offsets[k] as usize != n {
        return Err(format!("offsets run from {} to {}, expected 0 to {n}", offsets[0], offsets[k]));
    }
    for c in 0..k {
        let (a, b) = (offsets[c] as usize, offsets[c + 1] as usize);
        if b < a || b > n || (b - a) as u64 != sizes[c] as u64 || sizes[c] == 0 {
            return Err(format!("group {c}: offsets {a}..{b} and size {} disagree (or the group is empty)", sizes[c]));
        }
        for (j, &t) in items[a..b].iter().enumerate() {
            if t as usize >= n || group[t as usize] != u32::MAX || (j > 0 && t <= items[a + j - 1]) {
                return Err(format!("group {c}: item {t} out of range, repeated or out of order"));
            }
            group[t as usize] = c as u32;
        }
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::cluster::Retrieve;
    use crate::tensor::TensorView;

    fn index() -> ClusterIndex {
        let (n, d) = (120, 16);
        let keys: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let t = TensorView::new(&keys, &[n, 1, d]).unwrap();
        ClusterIndex::build(KeySource::Tensor(&t), &ClusterConfig::new(ClusterCount::Absolute(12)).with_max_iter(4))
            .unwrap()
    }

    /// An index without radii (as a GPU build makes) saves without the tensor; a version 1
    /// file (no radii) still loads; both refuse the mixed rule with a reason, and serve the
    /// estimate rule.
    #[test]
    fn files_without_radii_load_and_refuse_the_mixed_rule() {
        let mut ix = index();
        for h in &mut ix.heads {
            h.radii.clear();
        }
        let bytes = ix.to_bytes().unwrap();
        let back = ClusterIndex::from_bytes(&bytes).unwrap();
        assert!(back.head(0).radii().is_empty());
        // The same file labelled version 1, with its checksum redone.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        meta.insert("format_version".into(), "1".into());
        meta.remove("checksum");
        let tensors = back.tensors();
        let parts: Vec<(&str, Vec<usize>, &[u8])> =
            tensors.iter().map(|t| (t.name, t.shape.clone(), &t.data[..])).collect();
        meta.insert("checksum".into(), checksum(&meta, &parts));
        let v1 = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
        let old = ClusterIndex::from_bytes(&v1).unwrap();
        let q = vec![0.3f32; 16];
        let qv = TensorView::new(&q, &[1, 16]).unwrap();
        for ix in [&back, &old] {
            let e = ix.retrieve(&qv, &Retrieve::MixedBudget(10), 120).unwrap_err();
            assert!(e.to_string().contains("radii"), "{e}");
            assert_eq!(ix.retrieve(&qv, &Retrieve::Budget(10), 120).unwrap().stats.tokens_kept, vec![10]);
        }
        // With radii, the current version keeps them.
        let full = index();
        let again = ClusterIndex::from_bytes(&full.to_bytes().unwrap()).unwrap();
        assert_eq!(again.head(0).radii(), full.head(0).radii());
        assert_eq!(
            again.retrieve(&qv, &Retrieve::MixedBudget(10), 120).unwrap(),
            full.retrieve(&qv, &Retrieve::MixedBudget(10), 120).unwrap()
        );
    }

    /// Metadata that contradicts itself is refused with the field named, even when whoever
    /// edited it also recomputed the checksum (the checksum only catches accidents).
    #[test]
    fn contradictory_metadata_is_refused_even_with_a_valid_checksum() {
        let ix = index();
        let bytes = ix.to_bytes().unwrap();
        let tensors = ix.tensors();
        let parts: Vec<(&str, Vec<usize>, &[u8])> =
            tensors.iter().map(|t| (t.name, t.shape.clone(), &t.data[..])).collect();
        let resealed = |edit: &dyn Fn(&mut HashMap<String, String>)| {
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            let mut meta = header.metadata().clone().unwrap();
            edit(&mut meta);
            meta.remove("checksum");
            meta.insert("checksum".into(), checksum(&meta, &parts));
            ClusterIndex::from_bytes(&safetensors::serialize(st.tensors(), Some(meta)).unwrap())
        };
        assert!(resealed(&|_| {}).is_ok(), "an unedited file resealed loads");
        type Edit<'a> = &'a dyn Fn(&mut HashMap<String, String>);
        let cases: [(&str, Edit); 5] = [
            ("seq_len_at_build 150", &|m| drop(m.insert("seq_len_at_build".into(), "150".into()))),
            ("disagree", &|m| drop(m.insert("config.clusters".into(), "absolute:0".into()))),
            ("`num_clusters` 12", &|m| drop(m.insert("config.clusters".into(), "absolute:6".into()))),
            ("`config.max_iter` 1", &|m| drop(m.insert("config.max_iter".into(), "1".into()))),
            ("`clustered_len` 120", &|m| drop(m.insert("config.exclude_window".into(), "10".into()))),
        ];
        for (word, edit) in cases {
            let e = resealed(edit).expect_err(word);
            assert_eq!(e.code(), crate::error::ErrorCode::Io);
            assert!(e.to_string().contains(word), "expected `{word}` in: {e}");
        }
    }
}
