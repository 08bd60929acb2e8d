//! `cluster.h`, the index: K-means clusters of keys (`kvsieve::select::cluster`, Squeezed
//! Attention) in a handle (`kvsieve_cluster_index_t`) built from a key source with a
//! `kvsieve_cluster_config_t`; its inspection (shape, per-head sizes, centroids and member
//! lists, the coarse level), incremental assignment, rebuilding, and saving and loading.
//! Retrieval over an index is in `cluster_retrieve`, the index set a policy reads in
//! `cluster_set`.
//!
//! The index lives behind a reader-writer lock: inspection, retrieval, calibration and
//! saving take the read lock and run concurrently; `kvsieve_cluster_index_assign_new` and
//! `kvsieve_cluster_index_rebuild` take the write lock. A key source that is a cache takes
//! that cache's read lock inside the call (always after the index's lock).

use std::ffi::{c_char, CStr};
use std::mem::{align_of, offset_of, size_of};
use std::path::PathBuf;

use parking_lot::RwLock;

use kvsieve::error::{Error, Result};
use kvsieve::select::cluster::{ClusterConfig, ClusterCount, ClusterIndex};

use super::args::{
    check_capacity, check_disjoint, non_null, read_versioned, rename, sizes_are_valid, slice_mut, write_out, Region,
    Versioned, VersionedOut,
};
use super::cache::{key_source, kvsieve_key_source_t};
use super::error::{guard, guard_value, kvsieve_error_t};

/// The K-means clusters of one (sequence, layer) (see `kvsieve_cluster_index_t` in the
/// header), behind a reader-writer lock.
#[allow(non_camel_case_types)]
pub struct kvsieve_cluster_index_t {
    pub(crate) inner: RwLock<ClusterIndex>,
}

/// Options of `kvsieve_cluster_index_build` (see `kvsieve_cluster_config_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct kvsieve_cluster_config_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    /// Fine clusters per KV head, or 0 to use `cluster_fraction`.
    pub num_clusters: usize,
    /// Fine clusters as a fraction of the clustered tokens (with `num_clusters` 0).
    pub cluster_fraction: f64,
    pub exclude_window: usize,
    pub max_iter: usize,
    pub seed: u64,
    /// Coarse clusters per KV head, or 0 (then `coarse_fraction`, or no coarse level).
    pub num_coarse_clusters: usize,
    /// Coarse clusters as a fraction of the fine clusters (with `num_coarse_clusters` 0).
    pub coarse_fraction: f64,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_cluster_config_t>() == 64 && align_of::<kvsieve_cluster_config_t>() == 8);
    assert!(offset_of!(kvsieve_cluster_config_t, num_clusters) == 8);
    assert!(offset_of!(kvsieve_cluster_config_t, cluster_fraction) == 16);
    assert!(offset_of!(kvsieve_cluster_config_t, exclude_window) == 24);
    assert!(offset_of!(kvsieve_cluster_config_t, max_iter) == 32);
    assert!(offset_of!(kvsieve_cluster_config_t, seed) == 40);
    assert!(offset_of!(kvsieve_cluster_config_t, num_coarse_clusters) == 48);
    assert!(offset_of!(kvsieve_cluster_config_t, coarse_fraction) == 56);
};

const _: () =
    assert!(offset_of!(kvsieve_cluster_config_t, struct_size) == 0 && sizes_are_valid::<kvsieve_cluster_config_t>());

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_cluster_config_t {
    const NAME: &'static str = "kvsieve_cluster_config_t";
    const INIT: &'static str = "kvsieve_cluster_config_init() or kvsieve_cluster_config_default()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        kvsieve_cluster_config_default(0)
    }
}

/// A count given as a number or a fraction, from the two C fields that may hold it, and
/// the name of the field in use (the core names both `clusters` / `coarse`).
fn count(n: usize, n_name: &str, f: f64, f_name: &str) -> Result<Option<(ClusterCount, String)>> {
    match (n, f == 0.0) {
        (0, true) => Ok(None),
        (n, true) => Ok(Some((ClusterCount::Absolute(n), n_name.into()))),
        (0, false) => Ok(Some((ClusterCount::Fraction(f), f_name.into()))),
        (_, false) => Err(Error::invalid(
            f_name,
            format!("0 when `{n_name}` is set (give the count or the fraction, not both), got {f}"),
        )),
    }
}

impl kvsieve_cluster_config_t {
    /// The core configuration, and a renaming of the core's parameter names to the fields.
    pub(crate) fn to_core(self) -> Result<(ClusterConfig, impl Fn(Error) -> Error)> {
        let (clusters, c_name) = count(self.num_clusters, "num_clusters", self.cluster_fraction, "cluster_fraction")?
            .unwrap_or((ClusterCount::Absolute(0), "num_clusters".into()));
        let coarse = count(self.num_coarse_clusters, "num_coarse_clusters", self.coarse_fraction, "coarse_fraction")?;
        let coarse_name = coarse.as_ref().map_or_else(|| "num_coarse_clusters".to_string(), |c| c.1.clone());
        let cfg = ClusterConfig {
            clusters,
            exclude_window: self.exclude_window,
            max_iter: self.max_iter,
            seed: self.seed,
            coarse: coarse.map(|c| c.0),
        };
        Ok((cfg, move |e| rename(rename(e, "clusters", &c_name), "coarse", &coarse_name)))
    }

    /// The C form of a core configuration.
    pub fn from_core(c: &ClusterConfig) -> Self {
        let split = |c: Option<ClusterCount>| match c {
            None => (0, 0.0),
            Some(ClusterCount::Absolute(n)) => (n, 0.0),
            Some(ClusterCount::Fraction(f)) => (0, f),
        };
        let (num_clusters, cluster_fraction) = split(Some(c.clusters));
        let (num_coarse_clusters, coarse_fraction) = split(c.coarse);
        kvsieve_cluster_config_t {
            struct_size: size_of::<Self>(),
            num_clusters,
            cluster_fraction,
            exclude_window: c.exclude_window,
            max_iter: c.max_iter,
            seed: c.seed,
            num_coarse_clusters,
            coarse_fraction,
        }
    }
}

/// The handle behind a pointer, or `NullPointer` naming `param`.
///
/// # Safety
/// 1. `index` is NULL or a live handle returned by kvsieve, not freed while `'a` lasts.
pub(crate) unsafe fn index_ref<'a>(
    index: *const kvsieve_cluster_index_t,
    param: &str,
) -> Result<&'a kvsieve_cluster_index_t> {
    non_null(index, param)?;
    if !(index as usize).is_multiple_of(align_of::<kvsieve_cluster_index_t>()) {
        return Err(Error::invalid(param, "a cluster index handle returned by kvsieve"));
    }
    Ok(&*index)
}

pub(crate) fn into_index_handle(index: ClusterIndex) -> *mut kvsieve_cluster_index_t {
    Box::into_raw(Box::new(kvsieve_cluster_index_t { inner: RwLock::new(index) }))
}

/// A C handle owning `index` (release it with `kvsieve_cluster_index_free`), for Rust code
/// that holds indexes and calls the entry points directly (the tests).
pub fn cluster_index_into_handle(index: ClusterIndex) -> *mut kvsieve_cluster_index_t {
    into_index_handle(index)
}

/// The index a C handle owns, taking the handle (which is freed).
///
/// # Safety
/// `handle` is a live handle returned by kvsieve, with no call on it running or to come.
pub unsafe fn cluster_index_from_handle(handle: *mut kvsieve_cluster_index_t) -> Result<ClusterIndex> {
    non_null(handle, "index")?;
    Ok(Box::from_raw(handle).inner.into_inner())
}

/// A file path from NUL-terminated bytes (any bytes on Unix; UTF-8 elsewhere).
///
/// # Safety
/// 1. `path` is NULL or a readable NUL-terminated string.
unsafe fn path_arg(path: *const c_char) -> Result<PathBuf> {
    non_null(path, "path")?;
    let bytes = CStr::from_ptr(path).to_bytes();
    if bytes.is_empty() {
        return Err(Error::invalid("path", "a non-empty file path"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        std::str::from_utf8(bytes).map(PathBuf::from).map_err(|_| Error::invalid("path", "a UTF-8 file path"))
    }
}

/// A build configuration with `num_clusters` fine clusters per head: no excluded window,
/// 20 Lloyd iterations, seed 0, no coarse level; what the header's `static inline` function
/// of this name gives. Not exported (C programs compile the header's); Rust code that calls
/// the entry points directly (the tests) uses it.
pub fn kvsieve_cluster_config_default(num_clusters: usize) -> kvsieve_cluster_config_t {
    kvsieve_cluster_config_t::from_core(&ClusterConfig::new(ClusterCount::Absolute(num_clusters)))
}

/// Cluster every KV head of the keys in `keys` into a new index.
///
/// # Safety
/// 1. `keys` is NULL or a readable key source (see `key_source`); `config` is NULL or
///    readable for its `struct_size`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_build(
    keys: *const kvsieve_key_source_t,
    config: *const kvsieve_cluster_config_t,
    out: *mut *mut kvsieve_cluster_index_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_build", || {
        let src = key_source(keys, "keys")?;
        let (cfg, names) = read_versioned(config, "config")?.to_core()?;
        non_null(out, "out")?;
        let index = src.run(|k| ClusterIndex::build(k, &cfg)).map_err(names)?;
        write_out(out, into_index_handle(index));
        Ok(())
    })
}

/// Free an index. NULL is ignored.
///
/// # Safety
/// 1. `index` is NULL or a live handle, freed once, with no call on it running or to come.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_free(index: *mut kvsieve_cluster_index_t) {
    guard_value((), || {
        if !index.is_null() {
            drop(Box::from_raw(index));
        }
    })
}

/// The configuration the index was built with.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_get_config(
    index: *const kvsieve_cluster_index_t,
    out: *mut kvsieve_cluster_config_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_get_config", || {
        let ix = index_ref(index, "index")?;
        let out = VersionedOut::new(out, "out")?;
        let cfg = kvsieve_cluster_config_t::from_core(ix.inner.read().config());
        out.write(cfg);
        Ok(())
    })
}

/// Read one number of an index into `out`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
unsafe fn get(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
    f: impl FnOnce(&ClusterIndex) -> usize,
) -> Result<()> {
    let ix = index_ref(index, "index")?;
    non_null(out, "out")?;
    let v = f(&ix.inner.read());
    write_out(out, v);
    Ok(())
}

/// KV heads of the index.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_num_kv_heads(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_num_kv_heads", || get(index, out, ClusterIndex::num_kv_heads))
}

/// Channels per key.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_head_dim(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_head_dim", || get(index, out, ClusterIndex::head_dim))
}

/// Fine clusters per head.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_num_clusters(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_num_clusters", || get(index, out, ClusterIndex::num_clusters))
}

/// Coarse clusters per head (0 without a coarse level).
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_num_coarse_clusters(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_num_coarse_clusters", || get(index, out, ClusterIndex::num_coarse_clusters))
}

/// Sequence length when the index was built.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_seq_len_at_build(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_seq_len_at_build", || get(index, out, ClusterIndex::seq_len_at_build))
}

/// Sequence length when the index was built or last updated.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_seq_len(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_seq_len", || get(index, out, ClusterIndex::seq_len))
}

/// Tokens `0..clustered_len` are in clusters.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_clustered_len(
    index: *const kvsieve_cluster_index_t,
    out: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_clustered_len", || get(index, out, ClusterIndex::clustered_len))
}

/// Which per-head array of an index to copy out.
#[derive(Clone, Copy)]
enum Part {
    Sizes,
    MemberOffsets,
    Members,
    CoarseSizes,
    CoarseChildOffsets,
    CoarseChildren,
}

#[derive(Clone, Copy)]
enum FloatPart {
    Centroids,
    CentroidsNormalized,
    CoarseCentroids,
    Radii,
}

/// Check `head` and, for a coarse part, that the index has a coarse level.
fn check_head(ix: &ClusterIndex, head: usize, coarse: bool) -> Result<()> {
    let hk = ix.num_kv_heads();
    if head >= hk {
        return Err(Error::out_of_range("head", head as i64, format!("0..{hk} (the index's KV heads)")));
    }
    if coarse && ix.num_coarse_clusters() == 0 {
        return Err(Error::invalid(
            "index",
            "an index built with a coarse level (`num_coarse_clusters` or `coarse_fraction` set)",
        ));
    }
    Ok(())
}

/// Copy `values` into the caller buffer `buf` (named `name`) of `capacity` values (too small:
/// an error naming `capacity`, nothing written), and their count into `out_len` if given.
///
/// # Safety
/// 1. `buf` is NULL or writable for `capacity` values; `out_len` is NULL or writable.
pub(crate) unsafe fn copy_out<T: Copy>(
    values: &[T],
    buf: *mut T,
    name: &str,
    capacity: usize,
    out_len: *mut usize,
    what: &str,
) -> Result<()> {
    check_disjoint(&[Region::of(buf, capacity, name), Region::of(out_len, 1, "out_len")], &[])?;
    check_capacity("capacity", capacity, values.len(), what)?;
    slice_mut(buf, values.len(), name)?.copy_from_slice(values);
    if !out_len.is_null() {
        write_out(out_len, values.len());
    }
    Ok(())
}

/// # Safety
/// As for [`copy_out`]; `index` is NULL or a live handle.
unsafe fn copy_part(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    part: Part,
    buf: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> Result<()> {
    let ix = index_ref(index, "index")?;
    let g = ix.inner.read();
    let coarse = matches!(part, Part::CoarseSizes | Part::CoarseChildOffsets | Part::CoarseChildren);
    check_head(&g, head, coarse)?;
    let (h, c) = (g.head(head), g.coarse(head));
    let (values, name, what): (&[u32], &str, &str) = match (part, c) {
        (Part::Sizes, _) => (h.sizes(), "sizes", "num_clusters"),
        (Part::MemberOffsets, _) => (h.member_offsets(), "offsets", "num_clusters + 1"),
        (Part::Members, _) => (h.all_members(), "members", "clustered_len"),
        (Part::CoarseSizes, Some(c)) => (c.sizes(), "sizes", "num_coarse_clusters"),
        (Part::CoarseChildOffsets, Some(c)) => (c.child_offsets(), "offsets", "num_coarse_clusters + 1"),
        (Part::CoarseChildren, Some(c)) => (c.all_children(), "children", "num_clusters"),
        (_, None) => return Err(Error::Internal("coarse level checked but absent".into())),
    };
    copy_out(values, buf, name, capacity, out_len, what)
}

/// # Safety
/// As for [`copy_out`]; `index` is NULL or a live handle.
unsafe fn copy_float_part(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    part: FloatPart,
    buf: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> Result<()> {
    let ix = index_ref(index, "index")?;
    let g = ix.inner.read();
    check_head(&g, head, matches!(part, FloatPart::CoarseCentroids))?;
    let values = match part {
        FloatPart::Centroids => g.head(head).centroids(),
        FloatPart::CentroidsNormalized => g.head(head).centroids_normalized(),
        FloatPart::CoarseCentroids => g.coarse(head).map_or(&[][..], |c| c.centroids()),
        FloatPart::Radii => g.head(head).radii(),
    };
    let (name, what) = match part {
        FloatPart::CoarseCentroids => ("centroids", "num_coarse_clusters * head_dim"),
        FloatPart::Radii => ("radii", "num_clusters (0 for an index without radii)"),
        _ => ("centroids", "num_clusters * head_dim"),
    };
    copy_out(values, buf, name, capacity, out_len, what)
}

/// Cluster sizes of KV head `head`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `sizes` is NULL or writable for `capacity` values;
///    `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_sizes(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    sizes: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_sizes", || copy_part(index, head, Part::Sizes, sizes, capacity, out_len))
}

/// Raw-key mean of every cluster of KV head `head`, `[num_clusters][head_dim]`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `centroids` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_centroids(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    centroids: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_centroids", || {
        copy_float_part(index, head, FloatPart::Centroids, centroids, capacity, out_len)
    })
}

/// Unit-norm centroids of KV head `head` (what keys are assigned by), `[num_clusters][head_dim]`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `centroids` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_centroids_normalized(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    centroids: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_centroids_normalized", || {
        copy_float_part(index, head, FloatPart::CentroidsNormalized, centroids, capacity, out_len)
    })
}

/// Cluster radii of KV head `head` (`num_clusters` values, or none for an index without
/// radii).
///
/// # Safety
/// 1. `index` is NULL or a live handle; `radii` is NULL or writable for `capacity` values;
///    `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_radii(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    radii: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_radii", || copy_float_part(index, head, FloatPart::Radii, radii, capacity, out_len))
}

/// CSR offsets of the member lists of KV head `head`, `num_clusters + 1` values.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `offsets` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_member_offsets(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    offsets: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_member_offsets", || {
        copy_part(index, head, Part::MemberOffsets, offsets, capacity, out_len)
    })
}

/// Members (token indices, ascending per cluster) of every cluster of KV head `head`,
/// concatenated in cluster order.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `members` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_members(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    members: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_members", || copy_part(index, head, Part::Members, members, capacity, out_len))
}

/// Sizes (tokens beneath) of the coarse clusters of KV head `head`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `sizes` is NULL or writable for `capacity` values;
///    `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_coarse_sizes(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    sizes: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_coarse_sizes", || copy_part(index, head, Part::CoarseSizes, sizes, capacity, out_len))
}

/// Coarse centroids of KV head `head` (size-weighted means of their children's raw
/// centroids), `[num_coarse_clusters][head_dim]`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `centroids` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_coarse_centroids(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    centroids: *mut f32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_coarse_centroids", || {
        copy_float_part(index, head, FloatPart::CoarseCentroids, centroids, capacity, out_len)
    })
}

/// CSR offsets of the coarse clusters' children of KV head `head`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `offsets` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_coarse_child_offsets(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    offsets: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_coarse_child_offsets", || {
        copy_part(index, head, Part::CoarseChildOffsets, offsets, capacity, out_len)
    })
}

/// Children (fine cluster ids, ascending per coarse cluster) of every coarse cluster of KV
/// head `head`, concatenated.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `children` is NULL or writable for `capacity`
///    values; `out_len` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_coarse_children(
    index: *const kvsieve_cluster_index_t,
    head: usize,
    children: *mut u32,
    capacity: usize,
    out_len: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_coarse_children", || {
        copy_part(index, head, Part::CoarseChildren, children, capacity, out_len)
    })
}

/// Assign the tokens that arrived since the last update to their nearest centroids.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `keys` is NULL or a readable key source;
///    `out_added` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_assign_new(
    index: *mut kvsieve_cluster_index_t,
    keys: *const kvsieve_key_source_t,
    out_added: *mut usize,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_assign_new", || {
        let ix = index_ref(index, "index")?;
        let src = key_source(keys, "keys")?;
        let reads: Vec<Region> = src.region().into_iter().collect();
        check_disjoint(&[Region::of(out_added, 1, "out_added")], &reads)?;
        let mut g = ix.inner.write();
        let added = src.run(|k| g.assign_new(k))?;
        if !out_added.is_null() {
            write_out(out_added, added);
        }
        Ok(())
    })
}

/// Cluster again from scratch with the same configuration over the source's current keys.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `keys` is NULL or a readable key source.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_rebuild(
    index: *mut kvsieve_cluster_index_t,
    keys: *const kvsieve_key_source_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_rebuild", || {
        let ix = index_ref(index, "index")?;
        let src = key_source(keys, "keys")?;
        let mut g = ix.inner.write();
        let names = kvsieve_cluster_config_t::from_core(g.config()).to_core()?.1;
        src.run(|k| g.rebuild(k)).map_err(names)
    })
}

/// Write the index to the file `path`.
///
/// # Safety
/// 1. `index` is NULL or a live handle; `path` is NULL or a readable NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_save(
    index: *const kvsieve_cluster_index_t,
    path: *const c_char,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_save", || {
        let ix = index_ref(index, "index")?;
        let p = path_arg(path)?;
        ix.inner.read().save(p)
    })
}

/// Read an index written by `kvsieve_cluster_index_save`.
///
/// # Safety
/// 1. `path` is NULL or a readable NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_load(
    path: *const c_char,
    out: *mut *mut kvsieve_cluster_index_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_load", || {
        let p = path_arg(path)?;
        non_null(out, "out")?;
        let index = ClusterIndex::load(p)?;
        write_out(out, into_index_handle(index));
        Ok(())
    })
}

/// Read an index and check that it fits the keys of `keys`.
///
/// # Safety
/// 1. `path` is NULL or a readable NUL-terminated string; `keys` is NULL or a readable key
///    source; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cluster_index_load_for(
    path: *const c_char,
    keys: *const kvsieve_key_source_t,
    out: *mut *mut kvsieve_cluster_index_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cluster_index_load_for", || {
        let p = path_arg(path)?;
        let src = key_source(keys, "keys")?;
        non_null(out, "out")?;
        let index = src.run(|k| ClusterIndex::load_for(&p, k))?;
        write_out(out, into_index_handle(index));
        Ok(())
    })
}
