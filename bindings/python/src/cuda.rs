//! CUDA calls on device arrays given through the DLPack protocol (`__dlpack__`: torch,
//! cupy, jax), over kvsieve's CUDA backend (`kvsieve::backend::cuda`). Each array's
//! `DLTensor` is read from its capsule, which stays alive (and owned by its producer) for
//! the call, and becomes a backend [`DeviceTensor`]; page arrays and their page table
//! become a [`CudaPagedKv`] over a [`CudaPageTable`]. The host-side checks run first, then
//! the device work runs with the GIL released. Results are written in place into the
//! output arrays the caller passes, on the given stream.
//!
//! A wheel built without kvsieve's `cuda` feature compiles the same calls against
//! `cuda_stub.rs`: the host-side checks are the same, and opening the device raises
//! `CudaUnavailableError`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};

use kvsieve::tensor::contiguous_strides;
use kvsieve::{DType, Error, KeyRope, PageLayout, PagedKvLayout, TensorView};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{detach, KvResultExt};
use crate::options::{parse_key_rope, parse_layout, AttentionKw};
use crate::rope::PyRopeConfig;

#[cfg(feature = "cuda")]
pub(crate) use kvsieve::backend::cuda as backend;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub(crate) mod backend;

use backend::attention::{self, Workspace};
use backend::{CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceTensor, Stream};

/// DLPack `kDLCPU`.
const DL_CPU: i32 = 1;
/// DLPack `kDLCUDA`: memory on a CUDA device.
const DL_CUDA: i32 = 2;
/// DLPack `kDLCUDAManaged`: unified memory, also readable by kernels.
const DL_CUDA_MANAGED: i32 = 13;
/// DLPack `kDLInt`.
const DL_INT: u8 = 0;
/// DLPack `kDLFloat`.
const DL_FLOAT: u8 = 2;
/// DLPack `kDLBfloat`.
const DL_BFLOAT: u8 = 4;

/// DLPack's `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

/// DLPack's `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

impl DlDataType {
    /// The kvsieve dtype this describes; a `DType` error naming `param` otherwise.
    fn dtype(self, param: &str) -> Result<DType, Error> {
        match (self.code, self.bits, self.lanes) {
            (DL_FLOAT, 32, 1) => Ok(DType::F32),
            (DL_FLOAT, 16, 1) => Ok(DType::F16),
            (DL_BFLOAT, 16, 1) => Ok(DType::BF16),
            (code, bits, lanes) => Err(Error::DType {
                param: param.into(),
                expected:
                    "float32, float16 or bfloat16 (DLPack code 2 with bits 32 or 16, or code 4 with bits 16; lanes 1)"
                        .into(),
                got: format!("code {code}, bits {bits}, lanes {lanes}"),
            }),
        }
    }
}

/// DLPack's `DLTensor`, the first member of the `DLManagedTensor` a capsule holds.
#[repr(C)]
#[derive(Clone, Copy)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// One array's DLTensor, with the capsule that keeps it valid.
pub(crate) struct Dl<'py> {
    _capsule: Bound<'py, PyAny>,
    t: DlTensor,
    pub(crate) name: &'static str,
}

impl Dl<'_> {
    pub(crate) fn shape(&self) -> Vec<i64> {
        if self.t.ndim <= 0 || self.t.shape.is_null() {
            return Vec::new();
        }
        // SAFETY: the producer keeps `ndim` shape values alive with the capsule.
        unsafe { std::slice::from_raw_parts(self.t.shape, self.t.ndim as usize).to_vec() }
    }

    pub(crate) fn strides(&self) -> Option<Vec<i64>> {
        if self.t.strides.is_null() || self.t.ndim <= 0 {
            return None;
        }
        // SAFETY: as for the shape.
        Some(unsafe { std::slice::from_raw_parts(self.t.strides, self.t.ndim as usize).to_vec() })
    }

    /// Address of the first element.
    pub(crate) fn addr(&self) -> u64 {
        (self.t.data as u64).wrapping_add(self.t.byte_offset)
    }

    /// Whether the array is in CUDA device memory (`kDLCUDA` or `kDLCUDAManaged`).
    pub(crate) fn on_device(&self) -> bool {
        matches!(self.t.device.device_type, DL_CUDA | DL_CUDA_MANAGED)
    }

    /// A contiguous 1-D int32 / int64 array (of `bits`); its address.
    pub(crate) fn int_array(&self, bits: u8) -> PyResult<u64> {
        let d = self.t.dtype;
        if d.code != DL_INT || d.bits != bits || d.lanes != 1 {
            return Err(Error::DType {
                param: self.name.into(),
                expected: format!("int{bits}"),
                got: format!("DLPack code {}, bits {}", d.code, d.bits),
            })
            .kv();
        }
        let shape = self.shape();
        if shape.len() != 1 || self.strides().is_some_and(|s| s[0] != 1 && shape[0] > 1) {
            return Err(bad_shape(self.name, "a contiguous 1-D array", format!("{shape:?}"))).kv();
        }
        Ok(self.addr())
    }

    /// Check that the array is a contiguous int32 `[n, cols]` array (`expected` says what for).
    pub(crate) fn int_rows(&self, cols: i64, expected: &str) -> Result<(), Error> {
        let (s, d) = (self.shape(), self.t.dtype);
        let row_major =
            self.strides().is_none_or(|st| st.len() == 2 && (st[1] == 1 || s[1] <= 1) && (st[0] == cols || s[0] <= 1));
        if d.code != DL_INT || d.bits != 32 || s.len() != 2 || s[1] != cols || !row_major {
            return Err(bad_shape(self.name, expected, format!("shape {s:?}, DLPack code {} bits {}", d.code, d.bits)));
        }
        Ok(())
    }

    /// Dtype, shape and strides (in elements), checked: `dims` names the dimensions, whose
    /// count is the number required.
    fn layout(&self, dims: &[&str]) -> Result<(DType, Vec<usize>, Vec<usize>), Error> {
        let name = self.name;
        let dtype = self.t.dtype.dtype(name)?;
        let want = || format!("[{}]", dims.join(", "));
        if self.t.ndim < 0 || self.t.ndim as usize != dims.len() {
            return Err(bad_shape(name, want(), format!("{} dimensions", self.t.ndim)));
        }
        if !dims.is_empty() && self.t.shape.is_null() {
            return Err(Error::NullPointer { param: format!("{name}.shape") });
        }
        let raw = self.shape();
        if raw.iter().any(|&d| d < 0) {
            return Err(bad_shape(name, want(), format!("{raw:?}")));
        }
        let shape: Vec<usize> = raw.iter().map(|&d| d as usize).collect();
        let strides = match self.strides() {
            None => contiguous_strides(&shape),
            Some(s) if s.iter().any(|&x| x < 0) => {
                return Err(bad_shape(
                    format!("{name}.strides"),
                    "non-negative strides (in elements)",
                    format!("{s:?}"),
                ))
            }
            Some(s) => s.iter().map(|&x| x as usize).collect(),
        };
        Ok((dtype, shape, strides))
    }

    /// The array as a tensor in CUDA device memory; `dims` as for [`Dl::layout`].
    pub(crate) fn device_tensor(&self, dims: &[&str]) -> Result<DeviceTensor, Error> {
        let name = self.name;
        let device = self.t.device;
        if !self.on_device() {
            return Err(invalid(
                format!("{name}.device"),
                format!("device memory (kDLCUDA = 2 or kDLCUDAManaged = 13), got device_type {}", device.device_type),
            ));
        }
        let device = usize::try_from(device.device_id)
            .map_err(|_| invalid(format!("{name}.device.device_id"), "a device ordinal >= 0"))?;
        let (dtype, shape, strides) = self.layout(dims)?;
        if shape.iter().product::<usize>() > 0 && self.t.data.is_null() {
            return Err(Error::NullPointer { param: format!("{name}.data") });
        }
        let ptr = (self.t.data as u64)
            .checked_add(self.t.byte_offset)
            .ok_or_else(|| invalid(format!("{name}.byte_offset"), "an offset that fits in memory"))?;
        Ok(DeviceTensor { ptr, dtype, shape, strides, device })
    }

    /// A decode query of one sequence in device memory: `[num_qo_heads, head_dim]` or
    /// `[1, num_qo_heads, head_dim]`.
    pub(crate) fn device_query(&self) -> Result<DeviceTensor, Error> {
        let dims = ["1", "num_qo_heads", "head_dim"];
        self.device_tensor(if self.t.ndim == 2 { &dims[1..] } else { &dims })
    }

    /// The array as a view of host memory (`kDLCPU`); `dims` as for [`Dl::layout`].
    ///
    /// # Safety
    /// The memory the DLTensor describes is readable and not written while the view lives
    /// (the producer's promise; the capsule, held by `self`, keeps it allocated).
    pub(crate) unsafe fn host_view(&self, dims: &[&str]) -> Result<TensorView<'_>, Error> {
        let name = self.name;
        if self.t.device.device_type != DL_CPU {
            return Err(Error::Unsupported(format!(
                "`{name}.device`: device_type {} (host memory is kDLCPU = 1, CUDA device memory kDLCUDA = 2 or kDLCUDAManaged = 13)",
                self.t.device.device_type
            )));
        }
        let (dtype, shape, strides) = self.layout(dims)?;
        if shape.iter().product::<usize>() > 0 && self.t.data.is_null() {
            return Err(Error::NullPointer { param: format!("{name}.data") });
        }
        let offset = usize::try_from(self.t.byte_offset)
            .map_err(|_| invalid(format!("{name}.byte_offset"), "an offset that fits in memory"))?;
        let ptr =
            if self.t.data.is_null() { std::ptr::null() } else { (self.t.data as *const u8).wrapping_add(offset) };
        TensorView::from_raw(ptr, dtype, &shape, &strides)
    }
}

/// `obj.__dlpack__()` (with `stream=` when given) and the DLTensor inside the capsule.
pub(crate) fn dlpack<'py>(obj: &Bound<'py, PyAny>, name: &'static str, stream: Option<i64>) -> PyResult<Dl<'py>> {
    let py = obj.py();
    if !obj.hasattr("__dlpack__")? {
        return Err(invalid(name, "an array with __dlpack__ (torch, cupy, jax)")).kv();
    }
    let kwargs = PyDict::new(py);
    if let Some(s) = stream {
        kwargs.set_item("stream", s)?;
    }
    let capsule = obj.call_method("__dlpack__", (), Some(&kwargs))?;
    // SAFETY: PyCapsule_GetPointer checks the type and the name ("dltensor", an unconsumed
    // DLManagedTensor, whose first member is the DLTensor `DlTensor` mirrors).
    let p = unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr()) };
    if p.is_null() {
        let _ = PyErr::take(py);
        return Err(invalid(name, "a __dlpack__ capsule named \"dltensor\"")).kv();
    }
    // SAFETY: `p` points at a live DLManagedTensor while the capsule lives.
    let t = unsafe { *(p as *const DlTensor) };
    Ok(Dl { _capsule: capsule, t, name })
}

/// An f32 array of exactly `shape`, contiguous (an LSE the kernels read as a plain array);
/// its address.
pub(crate) fn f32_contiguous(d: &Dl, shape: &[i64]) -> PyResult<u64> {
    let dt = d.t.dtype;
    if dt.code != DL_FLOAT || dt.bits != 32 || dt.lanes != 1 {
        return Err(Error::DType {
            param: d.name.into(),
            expected: "float32".into(),
            got: format!("DLPack code {}, bits {}", dt.code, dt.bits),
        })
        .kv();
    }
    let got = d.shape();
    let contiguous = match d.strides() {
        None => true,
        Some(s) => s.len() == 2 && (shape[1] <= 1 || s[1] == 1) && (shape[0] <= 1 || s[0] == shape[1]),
    };
    if got != shape || !contiguous {
        return Err(bad_shape(
            d.name,
            format!("a contiguous {shape:?} array"),
            format!("{got:?} with strides {:?}", d.strides()),
        ))
        .kv();
    }
    Ok(d.addr())
}

/// An `InvalidArgument` error.
pub(crate) fn invalid(param: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::InvalidArgument { param: param.into(), expected: expected.into() }
}

/// A `Shape` error.
pub(crate) fn bad_shape(param: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Error {
    Error::Shape { param: param.into(), expected: expected.into(), got: got.into() }
}

/// `NullPointer` naming `param` for a missing device address.
pub(crate) fn non_null(addr: u64, param: &str) -> Result<(), Error> {
    if addr == 0 {
        return Err(Error::NullPointer { param: param.into() });
    }
    Ok(())
}

/// Device token lists per (sequence, KV head) given as `sel_indptr=` / `sel_indices=`
/// (int32 device arrays, both or neither) with `max_per_head=`.
pub(crate) struct TokenLists<'py> {
    _arrays: [Dl<'py>; 2],
    /// Addresses of `sel_indptr` and `sel_indices`, and `max_per_head`.
    pub(crate) raw: (u64, u64, usize),
}

pub(crate) fn token_lists<'py>(
    sel_indptr: Option<&Bound<'py, PyAny>>,
    sel_indices: Option<&Bound<'py, PyAny>>,
    max_per_head: Option<usize>,
    stream: Option<i64>,
) -> PyResult<Option<TokenLists<'py>>> {
    match (sel_indptr, sel_indices) {
        (None, None) => Ok(None),
        (Some(a), Some(b)) => {
            let a = dlpack(a, "sel_indptr", stream)?;
            let b = dlpack(b, "sel_indices", stream)?;
            let mp = max_per_head
                .ok_or_else(|| invalid("max_per_head", "an upper bound on every list's length (with sel_indptr)"))
                .kv()?;
            let raw = (a.int_array(32)?, b.int_array(32)?, mp);
            Ok(Some(TokenLists { _arrays: [a, b], raw }))
        }
        _ => Err(invalid("sel_indices", "sel_indptr and sel_indices together")).kv(),
    }
}

/// Engine-owned page arrays (`[num_pages, page_size, heads, dim]` for `nhd`,
/// `[num_pages, heads, page_size, dim]` for `hnd`) with their page table and positions.
/// Their Python-side checks raise at once; their checks as device memory are kept for
/// [`Pages::checked`], which each call makes after its own argument checks.
pub(crate) struct Pages {
    /// Sequences in the page table (0 without one).
    pub(crate) batch: usize,
    kv: Result<Kv, Error>,
}

impl Pages {
    /// The pages checked as device memory, without touching the device (page size,
    /// head_dim and alignment are checked when the view is made).
    pub(crate) fn checked(self) -> Result<Kv, Error> {
        self.kv
    }
}

/// The pages of the arrays `k` and `v`, with the page table `(indptr, indices,
/// last_page_len)` and the slot positions (int32 arrays), both optional.
pub(crate) fn paged_kv(
    k: &Dl,
    v: &Dl,
    layout: &str,
    key_rope: &str,
    table: Option<(&Dl, &Dl, &Dl)>,
    positions: Option<&Dl>,
) -> PyResult<Pages> {
    let layout = parse_layout("layout", layout).kv()?;
    let key_rope = parse_key_rope("key_rope", key_rope).kv()?;
    let ks = k.shape();
    if ks.len() != 4 || v.shape() != ks {
        let expected = "4-D page arrays of one shape ([num_pages, page_size, num_kv_heads, head_dim] for nhd, [num_pages, num_kv_heads, page_size, head_dim] for hnd)";
        return Err(bad_shape("k_pages", expected, format!("k {ks:?}, v {:?}", v.shape()))).kv();
    }
    let strides = |d: &Dl| -> [i64; 4] {
        match d.strides() {
            Some(s) => [s[0], s[1], s[2], s[3]],
            None => [ks[1] * ks[2] * ks[3], ks[2] * ks[3], ks[3], 1],
        }
    };
    let (kst, vst) = (strides(k), strides(v));
    for (name, s) in [("k_pages", kst), ("v_pages", vst)] {
        if s[3] != 1 {
            return Err(bad_shape(name, "a channel stride of 1", format!("strides {s:?}"))).kv();
        }
    }
    // Page, slot, head strides (the order of `PagedKvLayout`).
    let hnd = layout == PageLayout::Hnd;
    let (page_size, heads) = if hnd { (ks[2], ks[1]) } else { (ks[1], ks[2]) };
    let psh = |s: [i64; 4]| if hnd { [s[0], s[2], s[1]] } else { [s[0], s[1], s[2]] };
    if k.t.device != v.t.device || k.t.dtype != v.t.dtype {
        return Err(invalid("v_pages", "the device and dtype of k_pages")).kv();
    }
    let (batch, indptr, indices, last_page_len) = match table {
        Some((ip, ix, lp)) => (
            lp.shape().first().copied().unwrap_or(0).max(0) as usize,
            ip.int_array(32)?,
            ix.int_array(32)?,
            lp.int_array(32)?,
        ),
        None => (0, 0, 0, 0),
    };
    let positions = positions.map(|p| p.int_array(32)).transpose()?.unwrap_or(0);
    let device = k.t.device;
    let kv = (|| {
        if !k.on_device() {
            return Err(invalid(
                "kv.device",
                format!("device memory (kDLCUDA = 2), got device_type {}", device.device_type),
            ));
        }
        let ordinal =
            usize::try_from(device.device_id).map_err(|_| invalid("kv.device.device_id", "a device ordinal >= 0"))?;
        let dtype = k.t.dtype.dtype("dtype")?;
        let strides = |s: [i64; 4], param: &str| -> Result<[usize; 3], Error> {
            let mut out = [0; 3];
            for (i, x) in psh(s).into_iter().enumerate() {
                out[i] = usize::try_from(x).map_err(|_| {
                    invalid(format!("{param}[{i}]"), format!("a non-negative stride in elements, got {x}"))
                })?;
            }
            Ok(out)
        };
        let layout = PagedKvLayout {
            dtype,
            num_pages: ks[0].max(0) as usize,
            page_size: page_size.max(0) as usize,
            num_kv_heads: heads.max(0) as usize,
            head_dim: ks[3].max(0) as usize,
            k_strides: strides(kst, "k_strides")?,
            v_strides: strides(vst, "v_strides")?,
        };
        Ok(Kv {
            k: k.addr(),
            v: v.addr(),
            layout,
            key_rope,
            batch,
            indptr,
            indices,
            last_page_len,
            positions,
            device: ordinal,
        })
    })();
    Ok(Pages { batch, kv })
}

/// Checked [`Pages`]: what a [`CudaPagedKv`] is made of.
#[derive(Clone, Copy)]
pub(crate) struct Kv {
    k: u64,
    v: u64,
    pub(crate) layout: PagedKvLayout,
    key_rope: KeyRope,
    pub(crate) batch: usize,
    indptr: u64,
    indices: u64,
    last_page_len: u64,
    positions: u64,
    /// Ordinal of the CUDA device holding the pages.
    pub(crate) device: usize,
}

impl Kv {
    /// The page table the arrays hold (empty without one), for sequences of at most
    /// `max_seq_len` tokens.
    ///
    /// # Safety
    /// As [`CudaPageTable::from_device`]: the arrays hold a valid table for these pages.
    pub(crate) unsafe fn table(&self, max_seq_len: usize) -> Result<CudaPageTable, Error> {
        CudaPageTable::from_device(self.indptr, self.indices, self.last_page_len, self.batch, max_seq_len, self.device)
    }

    /// The pages over `table`, with their RoPE convention and positions (when given).
    ///
    /// # Safety
    /// As [`CudaPagedKv::from_raw`] and [`CudaPagedKv::with_positions`]: the arrays are the
    /// device memory they describe, and nobody writes what the kernels read meanwhile.
    pub(crate) unsafe fn view<'t>(&self, table: &'t CudaPageTable) -> Result<CudaPagedKv<'t>, Error> {
        let view = CudaPagedKv::from_raw(self.k, self.v, self.layout, table)?.with_key_rope(self.key_rope);
        if self.positions == 0 {
            return Ok(view);
        }
        view.with_positions(self.positions)
    }
}

/// The engine's stream (`stream=`: a `cudaStream_t` as an int; None is the legacy default
/// stream), as an address that may cross into the GIL-free section.
pub(crate) fn stream_handle(stream: Option<i64>) -> usize {
    stream.unwrap_or(0) as usize
}

/// The stream `handle` names on `dev`.
///
/// # Safety
/// `handle` is 0 or a live stream of the device's primary context (the caller's promise,
/// as documented), alive while work queued on it runs.
pub(crate) unsafe fn stream_on(dev: &CudaDevice, handle: usize) -> Stream {
    dev.borrow_stream(handle as *mut c_void)
}

/// A process-wide map of values made on first use (workspaces per device and stream).
pub(crate) type Shared<K, V> = OnceLock<Mutex<HashMap<K, Arc<V>>>>;

/// The value of `key` in `map`, made by `make` the first time.
pub(crate) fn shared<K: Eq + Hash, V>(
    map: &Shared<K, V>,
    key: K,
    make: impl FnOnce() -> Result<V, Error>,
) -> Result<Arc<V>, Error> {
    let mut m = map.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = m.get(&key) {
        return Ok(v.clone());
    }
    let v = Arc::new(make()?);
    m.insert(key, v.clone());
    Ok(v)
}

/// The decode workspace of a (device, stream): calls on one stream are ordered, so they may
/// share it.
pub(crate) fn decode_workspace(dev: &Arc<CudaDevice>, stream: usize) -> Result<Arc<Workspace>, Error> {
    static MAP: Shared<(usize, usize), Workspace> = OnceLock::new();
    shared(&MAP, (dev.ordinal(), stream), || Ok(Workspace::new(dev)))
}

#[doc = doc!(cuda_device_count)]
#[pyfunction]
pub fn cuda_device_count() -> PyResult<usize> {
    kvsieve::backend::cuda_device_count().kv()
}

#[doc = doc!(cuda_paged_decode)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, indptr, indices, last_page_len, q, out, *, max_seq_len, lse = None, layout = "nhd", positions = None, key_rope = "post", scale = None, logit_soft_cap = None, rope = None, position_mode = "original", max_distance = None, chunk_size = None, sel_indptr = None, sel_indices = None, max_per_head = None, stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_paged_decode<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    last_page_len: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    max_seq_len: usize,
    lse: Option<&Bound<'py, PyAny>>,
    layout: &str,
    positions: Option<&Bound<'py, PyAny>>,
    key_rope: &str,
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<PyRef<'py, PyRopeConfig>>,
    position_mode: &str,
    max_distance: Option<i64>,
    chunk_size: Option<i64>,
    sel_indptr: Option<&Bound<'py, PyAny>>,
    sel_indices: Option<&Bound<'py, PyAny>>,
    max_per_head: Option<usize>,
    stream: Option<i64>,
) -> PyResult<()> {
    let params =
        AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.cuda_params().kv()?;
    let k = dlpack(k_pages, "k_pages", stream)?;
    let v = dlpack(v_pages, "v_pages", stream)?;
    let ip = dlpack(indptr, "indptr", stream)?;
    let ix = dlpack(indices, "indices", stream)?;
    let lp = dlpack(last_page_len, "last_page_len", stream)?;
    let pos = positions.map(|p| dlpack(p, "positions", stream)).transpose()?;
    let qd = dlpack(q, "q", stream)?;
    let od = dlpack(out, "out", stream)?;
    let ld = lse.map(|l| dlpack(l, "lse", stream)).transpose()?;
    let pages = paged_kv(&k, &v, layout, key_rope, Some((&ip, &ix, &lp)), pos.as_ref())?;
    let qs = qd.shape();
    let lse = match &ld {
        Some(l) if qs.len() == 3 => Some(f32_contiguous(l, &qs[..2])?),
        _ => None,
    };
    let lists = token_lists(sel_indptr, sel_indices, max_per_head, stream)?;
    let sel = lists.as_ref().map(|l| l.raw);
    let kv = pages.checked().kv()?;
    let dims = ["batch", "num_qo_heads", "head_dim"];
    let q = qd.device_tensor(&dims).kv()?;
    let out = od.device_tensor(&dims).kv()?;
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(kv.device)?;
        let lse = lse.map(|p| DeviceTensor::contiguous(p, DType::F32, &[kv.batch, q.shape[1]], kv.device));
        // SAFETY: every address comes from a DLPack capsule held until this call returns;
        // that the device memory holds what it claims (a valid page table, in-range token
        // lists, no concurrent writers) is the caller's promise, as documented.
        unsafe {
            let table = kv.table(max_seq_len)?;
            let view = kv.view(&table)?;
            let s = stream_on(&dev, st);
            let ws = decode_workspace(&dev, st)?;
            match sel {
                None => attention::decode(&view, &q, &out, lse.as_ref(), &params, &ws, &s),
                Some((ip, ix, mp)) => {
                    let sels = CudaSelections::from_device(ip, ix, kv.batch, kv.layout.num_kv_heads, mp, kv.device)?;
                    attention::decode_sparse(&view, &q, &sels, &out, lse.as_ref(), &params, &ws, &s)
                }
            }
        }
    })
}

#[doc = doc!(cuda_paged_append)]
#[pyfunction]
#[pyo3(signature = (k_pages, v_pages, k, v, slot_mapping, *, layout = "nhd", stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_paged_append<'py>(
    py: Python<'py>,
    k_pages: &Bound<'py, PyAny>,
    v_pages: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    slot_mapping: &Bound<'py, PyAny>,
    layout: &str,
    stream: Option<i64>,
) -> PyResult<()> {
    let kp = dlpack(k_pages, "k_pages", stream)?;
    let vp = dlpack(v_pages, "v_pages", stream)?;
    let kd = dlpack(k, "k", stream)?;
    let vd = dlpack(v, "v", stream)?;
    let sd = dlpack(slot_mapping, "slot_mapping", stream)?;
    let pages = paged_kv(&kp, &vp, layout, "post", None, None)?;
    let slots = sd.int_array(64)?;
    let kv = pages.checked().kv()?;
    let dims = ["n", "num_kv_heads", "head_dim"];
    let k = kd.device_tensor(&dims).kv()?;
    let v = vd.device_tensor(&dims).kv()?;
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(kv.device)?;
        // SAFETY: as in cuda_paged_decode.
        unsafe {
            let table = kv.table(0)?;
            let view = kv.view(&table)?;
            attention::append(&dev, &view, &k, &v, slots, &stream_on(&dev, st))
        }
    })
}

#[doc = doc!(cuda_merge_states)]
#[pyfunction]
#[pyo3(signature = (v_a, lse_a, v_b, lse_b, out, lse_out, *, stream = None))]
#[allow(clippy::too_many_arguments)]
pub fn cuda_merge_states<'py>(
    py: Python<'py>,
    v_a: &Bound<'py, PyAny>,
    lse_a: &Bound<'py, PyAny>,
    v_b: &Bound<'py, PyAny>,
    lse_b: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse_out: &Bound<'py, PyAny>,
    stream: Option<i64>,
) -> PyResult<()> {
    let a = dlpack(v_a, "v_a", stream)?;
    let la = dlpack(lse_a, "lse_a", stream)?;
    let b = dlpack(v_b, "v_b", stream)?;
    let lb = dlpack(lse_b, "lse_b", stream)?;
    let o = dlpack(out, "out", stream)?;
    let lo = dlpack(lse_out, "lse_out", stream)?;
    let vs = a.shape();
    let (pa, pb, po) = if vs.len() == 3 {
        (f32_contiguous(&la, &vs[..2])?, f32_contiguous(&lb, &vs[..2])?, f32_contiguous(&lo, &vs[..2])?)
    } else {
        (0, 0, 0)
    };
    let dims = ["n", "heads", "head_dim"];
    let at = a.device_tensor(&dims).kv()?;
    let bt = b.device_tensor(&dims).kv()?;
    let ot = o.device_tensor(&dims).kv()?;
    let (n, h, device) = (at.shape[0], at.shape[1], at.device);
    if n * h > 0 {
        for (name, p) in [("lse_a", pa), ("lse_b", pb), ("lse_out", po)] {
            non_null(p, name).kv()?;
        }
    }
    let st = stream_handle(stream);
    detach(py, move || {
        let dev = CudaDevice::get(device)?;
        let lse = |p: u64| DeviceTensor::contiguous(p, DType::F32, &[n, h], device);
        // SAFETY: as in cuda_paged_decode.
        unsafe { attention::merge_states(&dev, &at, &lse(pa), &bt, &lse(pb), &ot, &lse(po), &stream_on(&dev, st)) }
    })
}
