//! `view.h`: views over engine-owned paged KV memory (`kvsieve_paged_kv_t`) and attention over them
//! (`kvsieve_paged_decode`, `kvsieve_paged_prefill`, and their sparse forms over selections).
//! Nothing is copied: the descriptor is validated into a [`PagedKv`] for the duration of one
//! call.

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

use kvsieve::attention::{decode, decode_sparse, prefill, prefill_sparse};
use kvsieve::config::{validate_head_dim, validate_page_size, KeyRope};
use kvsieve::dtype::DType;
use kvsieve::error::{Error, Result};
use kvsieve::kv::{PageTableRef, PagedKv, PagedKvLayout};

use super::args::{non_null, opt_slice, read_versioned, sizes_are_valid, slice, Region, Versioned};
use super::attention::{self, kvsieve_streaming_window_t, AttentionArgs, DECODE_DIMS, PREFILL_DIMS};
use super::cache::key_rope;
use super::error::{guard, kvsieve_error_t};
use super::params::kvsieve_attention_params_t;
use super::selection::{kvsieve_selection_t, selection_list};
use super::tensor::{check_device, kvsieve_device_t, kvsieve_dtype_t, kvsieve_tensor_t, DEVICE_CPU};

/// One layer of engine-owned paged K/V memory plus a batch's CSR page table (see
/// `kvsieve_paged_kv_t` in the header).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvsieve_paged_kv_t {
    /// Bytes of the struct as the caller compiled it.
    pub struct_size: usize,
    pub k: *const c_void,
    pub v: *const c_void,
    pub device: kvsieve_device_t,
    pub dtype: kvsieve_dtype_t,
    pub key_rope: u32,
    pub num_pages: usize,
    pub page_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub k_strides: [i64; 3],
    pub v_strides: [i64; 3],
    pub batch: usize,
    pub indptr: *const i32,
    pub indices: *const i32,
    pub last_page_len: *const i32,
    pub positions: *const i32,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<kvsieve_paged_kv_t>() == 160 && align_of::<kvsieve_paged_kv_t>() == 8);
    assert!(offset_of!(kvsieve_paged_kv_t, k) == 8);
    assert!(offset_of!(kvsieve_paged_kv_t, device) == 24);
    assert!(offset_of!(kvsieve_paged_kv_t, dtype) == 32);
    assert!(offset_of!(kvsieve_paged_kv_t, key_rope) == 36);
    assert!(offset_of!(kvsieve_paged_kv_t, num_pages) == 40);
    assert!(offset_of!(kvsieve_paged_kv_t, k_strides) == 72);
    assert!(offset_of!(kvsieve_paged_kv_t, v_strides) == 96);
    assert!(offset_of!(kvsieve_paged_kv_t, batch) == 120);
    assert!(offset_of!(kvsieve_paged_kv_t, indptr) == 128);
    assert!(offset_of!(kvsieve_paged_kv_t, positions) == 152);
};

const _: () = assert!(offset_of!(kvsieve_paged_kv_t, struct_size) == 0 && sizes_are_valid::<kvsieve_paged_kv_t>());

impl kvsieve_paged_kv_t {
    /// What the header's `kvsieve_paged_kv_init()` gives: host memory
    /// (`KVSIEVE_DEVICE_CPU`), keys after RoPE, everything else zero or NULL, `struct_size`
    /// this layout's.
    pub fn init() -> Self {
        kvsieve_paged_kv_t {
            struct_size: size_of::<Self>(),
            k: std::ptr::null(),
            v: std::ptr::null(),
            device: kvsieve_device_t { device_type: DEVICE_CPU, device_id: 0 },
            dtype: kvsieve_dtype_t { code: 0, bits: 0, lanes: 0 },
            key_rope: 0,
            num_pages: 0,
            page_size: 0,
            num_kv_heads: 0,
            head_dim: 0,
            k_strides: [0; 3],
            v_strides: [0; 3],
            batch: 0,
            indptr: std::ptr::null(),
            indices: std::ptr::null(),
            last_page_len: std::ptr::null(),
            positions: std::ptr::null(),
        }
    }
}

// SAFETY: repr(C), struct_size first, plain fields.
unsafe impl Versioned for kvsieve_paged_kv_t {
    const NAME: &'static str = "kvsieve_paged_kv_t";
    const INIT: &'static str = "kvsieve_paged_kv_init()";
    const SIZES: &'static [usize] = &[size_of::<Self>()];
    fn defaults() -> Self {
        Self::init()
    }
}

/// The page layout a descriptor states (host or device memory alike), its sizes checked.
pub(crate) fn descriptor_layout(d: &kvsieve_paged_kv_t, dtype: DType) -> Result<PagedKvLayout> {
    validate_page_size(d.page_size)?;
    validate_head_dim(d.head_dim)?;
    if d.num_kv_heads == 0 {
        return Err(Error::invalid("num_kv_heads", "at least 1"));
    }
    Ok(PagedKvLayout {
        dtype,
        num_pages: d.num_pages,
        page_size: d.page_size,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
        k_strides: strides(d.k_strides, "k_strides")?,
        v_strides: strides(d.v_strides, "v_strides")?,
    })
}

fn strides(raw: [i64; 3], param: &str) -> Result<[usize; 3]> {
    let mut s = [0usize; 3];
    for (i, &x) in raw.iter().enumerate() {
        s[i] = usize::try_from(x).map_err(|_| {
            Error::invalid(format!("{param}[{i}]"), format!("a non-negative stride in elements, got {x}"))
        })?;
    }
    Ok(s)
}

/// Bytes a buffer must span for the layout with strides `s` (0 when there are no pages).
fn extent_bytes(l: &PagedKvLayout, s: [usize; 3], ptr: *const c_void, param: &str) -> Result<usize> {
    if l.num_pages == 0 {
        return Ok(0);
    }
    let too_big =
        || Error::invalid(param, "a memory extent (from num_pages and strides) that fits in the address space");
    let terms = [(l.num_pages - 1, s[0]), (l.page_size - 1, s[1]), (l.num_kv_heads - 1, s[2])];
    let mut elems = l.head_dim;
    for (n, st) in terms {
        elems = n.checked_mul(st).and_then(|x| x.checked_add(elems)).ok_or_else(too_big)?;
    }
    let bytes = elems.checked_mul(l.dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(too_big)?;
    (ptr as usize).checked_add(bytes).ok_or_else(too_big)?;
    Ok(bytes)
}

/// A checked descriptor: the pieces of a [`PagedKv`] and the memory regions it reads.
struct View<'a> {
    k: *const u8,
    v: *const u8,
    layout: PagedKvLayout,
    key_rope: KeyRope,
    table: PageTableRef<'a>,
    positions: Option<&'a [i32]>,
    regions: Vec<Region>,
}

impl<'a> View<'a> {
    /// # Safety
    /// 1. `kv` is NULL or points at a readable descriptor whose pointers are valid as the
    ///    header documents, for `'a`.
    unsafe fn parse(kv: *const kvsieve_paged_kv_t) -> Result<Self> {
        let d = &read_versioned(kv, "kv")?;
        check_device(d.device, "device")?;
        let dtype: DType = d.dtype.to_dtype("dtype")?;
        let key_rope = key_rope(d.key_rope, "key_rope")?;
        let layout = descriptor_layout(d, dtype)?;
        let k_bytes = extent_bytes(&layout, layout.k_strides, d.k, "k_strides")?;
        let v_bytes = extent_bytes(&layout, layout.v_strides, d.v, "v_strides")?;

        let indptr_len =
            d.batch.checked_add(1).ok_or_else(|| Error::invalid("batch", "a batch size that fits in memory"))?;
        non_null(d.indptr, "indptr")?;
        let indptr = slice(d.indptr, indptr_len, "indptr")?;
        let nnz = indptr[d.batch];
        let nnz =
            usize::try_from(nnz).map_err(|_| Error::invalid("indptr", format!("indptr[batch] >= 0, got {nnz}")))?;
        let indices = slice(d.indices, nnz, "indices")?;
        let last_page_len = slice(d.last_page_len, d.batch, "last_page_len")?;
        let slots = d
            .num_pages
            .checked_mul(d.page_size)
            .ok_or_else(|| Error::invalid("num_pages", "num_pages * page_size that fits in memory"))?;
        let positions = opt_slice(d.positions, slots, "positions")?;
        let regions = vec![
            Region::new(d.k as *const u8, k_bytes, "k"),
            Region::new(d.v as *const u8, v_bytes, "v"),
            Region::of(d.indptr, indptr_len, "indptr"),
            Region::of(d.indices, nnz, "indices"),
            Region::of(d.last_page_len, d.batch, "last_page_len"),
            Region::of(d.positions, slots, "positions"),
        ];
        Ok(View {
            k: d.k as *const u8,
            v: d.v as *const u8,
            layout,
            key_rope,
            table: PageTableRef { indptr, indices, last_page_len },
            positions,
            regions,
        })
    }

    /// The validated view (the page table is checked against the memory here).
    ///
    /// # Safety
    /// As for [`View::parse`].
    unsafe fn paged(&self) -> Result<PagedKv<'a>> {
        let kv = PagedKv::from_raw(self.k, self.v, self.layout, self.table)?.with_key_rope(self.key_rope);
        match self.positions {
            Some(p) => kv.with_positions(p),
            None => Ok(kv),
        }
    }
}

/// Decode attention over engine-owned paged memory.
///
/// # Safety
/// 1. `kv` is NULL or a descriptor valid as the header documents;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_decode`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_paged_decode(
    kv: *const kvsieve_paged_kv_t,
    q: *const kvsieve_tensor_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_paged_decode", || {
        let view = View::parse(kv)?;
        let paged = view.paged()?;
        let args = AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, view.regions.clone())?;
        let (q, mut out, lse) = args.views()?;
        decode(&paged, &q, &mut out, lse, &args.params)
    })
}

/// Prefill attention over engine-owned paged memory.
///
/// # Safety
/// 1. `kv` is NULL or a descriptor valid as the header documents; `qo_indptr` is NULL or
///    readable for `kv->batch + 1` values;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_prefill`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_paged_prefill(
    kv: *const kvsieve_paged_kv_t,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    causal: bool,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_paged_prefill", || {
        let view = View::parse(kv)?;
        let paged = view.paged()?;
        let n = view.table.batch_size() + 1;
        let qo = slice(qo_indptr, n, "qo_indptr")?;
        let mut reads = view.regions.clone();
        reads.push(Region::of(qo_indptr, n, "qo_indptr"));
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        prefill(&paged, &q, qo, &mut out, lse, &args.params, causal)
    })
}

/// Sparse decode over engine-owned paged memory: KV head `h` of sequence `b` reads only
/// `selections[b]`'s head `h`.
///
/// # Safety
/// 1. `kv` is NULL or a descriptor valid as the header documents; `selections` is NULL or
///    readable for `kv->batch` handles, each NULL or live;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_decode`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_paged_decode_sparse(
    kv: *const kvsieve_paged_kv_t,
    q: *const kvsieve_tensor_t,
    selections: *const *const kvsieve_selection_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_paged_decode_sparse", || {
        let view = View::parse(kv)?;
        let paged = view.paged()?;
        let batch = view.table.batch_size();
        let sels = selection_list(selections, batch, "selections")?;
        let mut reads = view.regions.clone();
        reads.push(Region::of(selections, batch, "selections"));
        let args = AttentionArgs::parse(q, out, lse, params, &DECODE_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        decode_sparse(&paged, &q, &sels, &mut out, lse, &args.params)
    })
}

/// Sparse causal prefill over engine-owned paged memory, with optional per-KV-head windows.
///
/// # Safety
/// 1. `kv` is NULL or a descriptor valid as the header documents; `qo_indptr` is NULL or
///    readable for `kv->batch + 1` values; `selections` is NULL or readable for `kv->batch`
///    handles, each NULL or live; `windows` is NULL or readable for `num_windows` entries;
/// 2. `q`, `out`, `lse` and `params` as for `kvsieve_cache_prefill`.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_paged_prefill_sparse(
    kv: *const kvsieve_paged_kv_t,
    q: *const kvsieve_tensor_t,
    qo_indptr: *const i32,
    selections: *const *const kvsieve_selection_t,
    windows: *const kvsieve_streaming_window_t,
    num_windows: usize,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_paged_prefill_sparse", || {
        let view = View::parse(kv)?;
        let paged = view.paged()?;
        let batch = view.table.batch_size();
        let qo = slice(qo_indptr, batch + 1, "qo_indptr")?;
        let sels = selection_list(selections, batch, "selections")?;
        let (wins, wins_region) = attention::windows(windows, num_windows)?;
        let mut reads = view.regions.clone();
        reads.push(Region::of(qo_indptr, batch + 1, "qo_indptr"));
        reads.push(Region::of(selections, batch, "selections"));
        reads.push(wins_region);
        let args = AttentionArgs::parse(q, out, lse, params, &PREFILL_DIMS, reads)?;
        let (q, mut out, lse) = args.views()?;
        prefill_sparse(&paged, &q, qo, &sels, &wins, &mut out, lse, &args.params)
    })
}
