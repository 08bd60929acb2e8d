//! CUDA calls on device arrays given through the DLPack protocol (`__dlpack__`: torch,
//! cupy, jax). Each array's `DLTensor` is read from its capsule, which stays alive (and
//! owned by its producer) for the call; the work goes through the C ABI's `kvsieve_cuda_*`
//! entry points, so the checks and errors are the C ones. Results are written in place into
//! the output arrays the caller passes, on the given stream.
//!
//! A wheel built without kvsieve's `cuda` feature raises `CudaUnavailableError`.

use std::ffi::{c_void, CStr};

use kvsieve::attention::{PositionMode, RopeStyle};
use kvsieve::ffi::{self as c, kvsieve_attention_params_t, kvsieve_paged_kv_t, kvsieve_rope_config_t, kvsieve_tensor_t};
use kvsieve::{Error, ErrorCode, PageLayout};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{from_code, KvResultExt};
use crate::options::{parse_key_rope, parse_layout, AttentionKw};
use crate::rope::PyRopeConfig;

/// DLPack `kDLInt`.
const DL_INT: u8 = 0;

/// One array's DLTensor, with the capsule that keeps it valid.
pub(crate) struct Dl<'py> {
    _capsule: Bound<'py, PyAny>,
    pub(crate) t: kvsieve_tensor_t,
    pub(crate) name: &'static str,
}

impl<'py> Dl<'py> {
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
    /// A contiguous 1-D int32 / int64 device array of at least `min_len` values.
    pub(crate) fn int_array(&self, bits: u8) -> PyResult<u64> {
        let t = &self.t;
        let shape = self.shape();
        if t.dtype.code != DL_INT || t.dtype.bits != bits || t.dtype.lanes != 1 {
            return Err(Error::DType {
                param: self.name.into(),
                expected: format!("int{bits}"),
                got: format!("DLPack code {}, bits {}", t.dtype.code, t.dtype.bits),
            })
            .kv();
        }
        if shape.len() != 1 || self.strides().is_some_and(|s| s[0] != 1 && shape[0] > 1) {
            return Err(Error::Shape { param: self.name.into(), expected: "a contiguous 1-D array".into(), got: format!("{shape:?}") }).kv();
        }
        Ok(self.addr())
    }
}

/// `obj.__dlpack__()` (with `stream=` when given) and the DLTensor inside the capsule.
pub(crate) fn dlpack<'py>(obj: &Bound<'py, PyAny>, name: &'static str, stream: Option<i64>) -> PyResult<Dl<'py>> {
    let py = obj.py();
    if !obj.hasattr("__dlpack__")? {
        return Err(Error::InvalidArgument { param: name.into(), expected: "an array with __dlpack__ (torch, cupy, jax)".into() }).kv();
    }
    let kwargs = PyDict::new(py);
    if let Some(s) = stream {
        kwargs.set_item("stream", s)?;
    }
    let capsule = obj.call_method("__dlpack__", (), Some(&kwargs))?;
    // SAFETY: PyCapsule_GetPointer checks the type and the name ("dltensor", an unconsumed
    // DLManagedTensor, whose first member is the DLTensor kvsieve_tensor_t mirrors).
    let p = unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr()) };
    if p.is_null() {
        let _ = PyErr::take(py);
        return Err(Error::InvalidArgument { param: name.into(), expected: "a __dlpack__ capsule named \"dltensor\"".into() }).kv();
    }
    // SAFETY: `p` points at a live DLManagedTensor while the capsule lives.
    let t = unsafe { *(p as *const kvsieve_tensor_t) };
    Ok(Dl { _capsule: capsule, t, name })
}

/// The C call's error as the Python exception of its kind.
pub(crate) fn check(e: *mut c::kvsieve_error_t) -> PyResult<()> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a live error object from the C ABI, freed here once.
    unsafe {
        let code = c::kvsieve_error_code(e);
        let msg = CStr::from_ptr(c::kvsieve_error_message(e)).to_string_lossy().into_owned();
        c::kvsieve_error_free(e);
        let code = ErrorCode::ALL.iter().copied().find(|k| *k as u32 == code).unwrap_or(ErrorCode::Internal);
        Err(from_code(code, msg))
    }
}

/// Build the C paged-K/V descriptor from page arrays `[num_pages, page_size, heads, dim]`
/// (`nhd`) or `[num_pages, heads, page_size, dim]` (`hnd`) and the page table arrays.
#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_kv(
    k: &Dl,
    v: &Dl,
    layout: &str,
    key_rope: &str,
    table: Option<(&Dl, &Dl, &Dl)>,
    positions: Option<&Dl>,
) -> PyResult<kvsieve_paged_kv_t> {
    let layout = parse_layout("layout", layout).kv()?;
    let key_rope = parse_key_rope("key_rope", key_rope).kv()?;
    let ks = k.shape();
    if ks.len() != 4 || v.shape() != ks {
        return Err(Error::Shape {
            param: "k_pages".into(),
            expected: "4-D page arrays of one shape ([num_pages, page_size, num_kv_heads, head_dim] for nhd, [num_pages, num_kv_heads, page_size, head_dim] for hnd)".into(),
            got: format!("k {:?}, v {:?}", ks, v.shape()),
        })
        .kv();
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
            return Err(Error::Shape { param: name.into(), expected: "a channel stride of 1".into(), got: format!("strides {s:?}") }).kv();
        }
    }
    // Page, slot, head strides in the descriptor's order.
    let hnd = layout == PageLayout::Hnd;
    let (page_size, heads) = if hnd { (ks[2], ks[1]) } else { (ks[1], ks[2]) };
    let psh = |s: [i64; 4]| if hnd { [s[0], s[2], s[1]] } else { [s[0], s[1], s[2]] };
    if k.t.device != v.t.device || k.t.dtype != v.t.dtype {
        return Err(Error::InvalidArgument { param: "v_pages".into(), expected: "the device and dtype of k_pages".into() }).kv();
    }
    let (batch, indptr, indices, last) = match table {
        Some((ip, ix, lp)) => {
            let b = lp.shape().first().copied().unwrap_or(0).max(0) as usize;
            (b, ip.int_array(32)? as *const i32, ix.int_array(32)? as *const i32, lp.int_array(32)? as *const i32)
        }
        None => (0, std::ptr::null(), std::ptr::null(), std::ptr::null()),
    };
    let positions = match positions {
        Some(p) => p.int_array(32)? as *const i32,
        None => std::ptr::null(),
    };
    Ok(kvsieve_paged_kv_t {
        k: k.addr() as *const c_void,
        v: v.addr() as *const c_void,
        device: k.t.device,
        dtype: k.t.dtype,
        key_rope: key_rope as u32,
        num_pages: ks[0].max(0) as usize,
        page_size: page_size.max(0) as usize,
        num_kv_heads: heads.max(0) as usize,
        head_dim: ks[3].max(0) as usize,
        k_strides: psh(kst),
        v_strides: psh(vst),
        batch,
        indptr,
        indices,
        last_page_len: last,
        positions,
    })
}

/// Number of CUDA devices (raises `CudaUnavailableError` without a driver or CUDA support).
#[pyfunction]
pub fn cuda_device_count() -> PyResult<usize> {
    let mut n = 0usize;
    // SAFETY: `n` is writable.
    check(unsafe { c::kvsieve_cuda_device_count(&mut n) })?;
    Ok(n)
}

/// Decode on the GPU over engine-owned device pages (dense, or sparse with a device CSR of
/// token lists per (sequence, KV head)); writes ``out`` (and ``lse``) in place on ``stream``.
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
    let params = AttentionKw { scale, logit_soft_cap, rope, position_mode, max_distance, chunk_size }.params().kv()?;
    let k = dlpack(k_pages, "k_pages", stream)?;
    let v = dlpack(v_pages, "v_pages", stream)?;
    let ip = dlpack(indptr, "indptr", stream)?;
    let ix = dlpack(indices, "indices", stream)?;
    let lp = dlpack(last_page_len, "last_page_len", stream)?;
    let pos = positions.map(|p| dlpack(p, "positions", stream)).transpose()?;
    let qd = dlpack(q, "q", stream)?;
    let od = dlpack(out, "out", stream)?;
    let ld = lse.map(|l| dlpack(l, "lse", stream)).transpose()?;
    let desc = paged_kv(&k, &v, layout, key_rope, Some((&ip, &ix, &lp)), pos.as_ref())?;
    let qs = qd.shape();
    let lse_ptr = match &ld {
        Some(l) if qs.len() == 3 => f32_contiguous(l, &qs[..2])? as usize,
        _ => 0usize,
    };
    let rope_c = params.rope.map(|r| kvsieve_rope_config_t {
        theta: r.theta,
        rotary_dim: r.rotary_dim as u32,
        style: match r.style {
            RopeStyle::HalfSplit => 0,
            RopeStyle::AdjacentPairs => 1,
        },
        position_scale: r.position_scale,
    });
    let (mode, maxd) = match params.positions {
        PositionMode::Original => (c::POSITIONS_ORIGINAL, 0),
        PositionMode::Contiguous => (c::POSITIONS_CONTIGUOUS, 0),
        PositionMode::Capped { max_distance } => (c::POSITIONS_CAPPED, max_distance),
    };
    let pc = kvsieve_attention_params_t {
        scale: params.scale.unwrap_or(0.0),
        logit_soft_cap: params.logit_soft_cap.unwrap_or(0.0),
        rope: rope_c.as_ref().map_or(std::ptr::null(), |r| r as *const _),
        chunk_size: params.chunk_size.unwrap_or(0),
        position_mode: mode,
        max_distance: maxd,
    };
    let sel = match (sel_indptr, sel_indices) {
        (None, None) => None,
        (Some(a), Some(b)) => {
            let a = dlpack(a, "sel_indptr", stream)?;
            let b = dlpack(b, "sel_indices", stream)?;
            let mp = max_per_head.ok_or_else(|| Error::InvalidArgument { param: "max_per_head".into(), expected: "an upper bound on every list's length (with sel_indptr)".into() }).kv()?;
            Some((a.int_array(32)?, b.int_array(32)?, mp, a, b))
        }
        _ => return Err(Error::InvalidArgument { param: "sel_indices".into(), expected: "sel_indptr and sel_indices together".into() }).kv(),
    };
    let lists = sel.as_ref().map(|(a, b, mp, _, _)| (*a, *b, *mp));
    let r = call_detached(py, stream, (desc, qd.t, od.t, pc, rope_c), move |(desc, qt, ot, mut pc, rope_c), st| {
        if let Some(r) = rope_c.as_ref() {
            pc.rope = r;
        }
        // SAFETY: every pointer comes from a live DLPack capsule held until the call returns;
        // the device memory's contents are the caller's promise, as the C header documents.
        unsafe {
            match lists {
                None => c::kvsieve_cuda_paged_decode(&desc, max_seq_len, &qt, &ot, lse_ptr as *mut f32, &pc, st),
                Some((a, b, mp)) => c::kvsieve_cuda_paged_decode_sparse(&desc, max_seq_len, a as *const i32, b as *const i32, mp, &qt, &ot, lse_ptr as *mut f32, &pc, st),
            }
        }
    });
    drop(sel);
    r
}

/// Paged append on the GPU: row ``i`` of ``k``/``v`` into slot ``slot_mapping[i]`` (int64,
/// ``page * page_size + slot``; negative = skip) of the device pages, on ``stream``.
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
    let desc = paged_kv(&kp, &vp, layout, "post", None, None)?;
    let slots = sd.int_array(64)? as usize;
    call_detached(py, stream, (desc, kd.t, vd.t), move |(desc, kt, vt), st| {
        // SAFETY: as in cuda_paged_decode.
        unsafe { c::kvsieve_cuda_paged_append(&desc, &kt, &vt, slots as *const i64, st) }
    })
}

/// merge_states on the GPU: writes ``out`` and ``lse_out`` in place on ``stream``.
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
        (f32_contiguous(&la, &vs[..2])? as usize, f32_contiguous(&lb, &vs[..2])? as usize, f32_contiguous(&lo, &vs[..2])? as usize)
    } else {
        (0, 0, 0)
    };
    call_detached(py, stream, (a.t, b.t, o.t), move |(at, bt, ot), st| {
        // SAFETY: as in cuda_paged_decode.
        unsafe { c::kvsieve_cuda_merge_states(&at, pa as *const f32, &bt, pb as *const f32, &ot, po as *mut f32, st) }
    })
}

/// Run one C call with the GIL released: `args` (descriptors, which only carry addresses)
/// move into `call` with the stream (`stream`, null for the default stream); the C error it
/// returns comes back as its Python exception.
pub(crate) fn call_detached<T>(py: Python<'_>, stream: Option<i64>, args: T, call: impl FnOnce(T, *mut c_void) -> *mut c::kvsieve_error_t + Send) -> PyResult<()> {
    let raw = Raw(args);
    let st = stream.unwrap_or(0) as usize;
    let r = py.detach(move || {
        let raw = raw;
        call(raw.0, st as *mut c_void) as usize
    });
    check(r as *mut c::kvsieve_error_t)
}

/// Raw descriptors moved into the GIL-free section (they only carry addresses).
pub(crate) struct Raw<T>(pub(crate) T);
// SAFETY: the wrapped descriptors hold plain addresses that the call only passes on.
unsafe impl<T> Send for Raw<T> {}

/// An f32 array of exactly `shape`, contiguous (for LSEs the C call reads as plain arrays).
pub(crate) fn f32_contiguous(d: &Dl, shape: &[i64]) -> PyResult<u64> {
    if d.t.dtype.code != c::DTYPE_CODE_FLOAT || d.t.dtype.bits != 32 || d.t.dtype.lanes != 1 {
        return Err(Error::DType { param: d.name.into(), expected: "float32".into(), got: format!("DLPack code {}, bits {}", d.t.dtype.code, d.t.dtype.bits) }).kv();
    }
    let got = d.shape();
    let contiguous = match d.strides() {
        None => true,
        Some(s) => s.len() == 2 && (shape[1] <= 1 || s[1] == 1) && (shape[0] <= 1 || s[0] == shape[1]),
    };
    if got != shape || !contiguous {
        return Err(Error::Shape { param: d.name.into(), expected: format!("a contiguous {shape:?} array"), got: format!("{got:?} with strides {:?}", d.strides()) }).kv();
    }
    Ok(d.addr())
}
