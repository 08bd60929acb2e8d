//! `cuda.h`: the CUDA entry points of the C ABI (`kvsieve_cuda_*`): device checks, paged decode
//! (dense and sparse), paged append and `merge_states` over device memory, queued on the
//! engine's `cudaStream_t` (passed as `void *`; NULL is the legacy default stream).
//!
//! They are exported by every build so the header is one contract; a library built without
//! the `cuda` feature answers `KVSIEVE_ERROR_CUDA_UNAVAILABLE`. Descriptors are validated
//! before the device is touched; device memory itself cannot be checked from the host, so
//! its validity is the caller's promise (see the header).

use std::ffi::c_void;

use kvsieve::error::{Error, Result};
use kvsieve::kv::PagedKvLayout;

use super::args::{non_null, read_struct, read_versioned, write_out};
use super::cache::key_rope;
use super::error::{guard, kvsieve_error_t};
use super::params::kvsieve_attention_params_t;
use super::tensor::kvsieve_tensor_t;
use super::view::{descriptor_layout, kvsieve_paged_kv_t};

/// DLPack `kDLCUDA`: memory on a CUDA device.
pub const DEVICE_CUDA: i32 = 2;
/// DLPack `kDLCUDAManaged`: unified memory, also readable by kernels.
pub const DEVICE_CUDA_MANAGED: i32 = 13;

/// Number of CUDA devices, into `*out_count`.
///
/// # Safety
/// `out_count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_device_count(out_count: *mut usize) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_device_count", || {
        non_null(out_count, "out_count")?;
        let n = kvsieve::backend::cuda_device_count()?;
        write_out(out_count, n);
        Ok(())
    })
}

/// NULL when CUDA device `device_id` can run kvsieve's kernels.
#[no_mangle]
pub extern "C" fn kvsieve_cuda_check(device_id: i32) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_check", || {
        let ordinal = usize::try_from(device_id)
            .map_err(|_| Error::invalid("device_id", format!("a CUDA device ordinal >= 0, got {device_id}")))?;
        kvsieve::Device::Cuda(ordinal).check()
    })
}

/// Dense decode over engine-owned device pages.
///
/// # Safety
/// As the header documents: `kv`, `q`, `out`, `params` NULL or readable descriptors whose
/// pointers are valid device memory; `lse` NULL or device memory for `batch * num_qo_heads`
/// floats; `stream` NULL or a live stream of the device's primary context.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_paged_decode(
    kv: *const kvsieve_paged_kv_t,
    max_seq_len: usize,
    q: *const kvsieve_tensor_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_paged_decode", || imp::decode(kv, max_seq_len, None, q, out, lse, params, stream))
}

/// Sparse decode over engine-owned device pages and device token lists.
///
/// # Safety
/// As [`kvsieve_cuda_paged_decode`]; `sel_indptr` (`batch * num_kv_heads + 1` int32) and
/// `sel_indices` are device memory holding ascending in-range lists no longer than
/// `max_per_head`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvsieve_cuda_paged_decode_sparse(
    kv: *const kvsieve_paged_kv_t,
    max_seq_len: usize,
    sel_indptr: *const i32,
    sel_indices: *const i32,
    max_per_head: usize,
    q: *const kvsieve_tensor_t,
    out: *const kvsieve_tensor_t,
    lse: *mut f32,
    params: *const kvsieve_attention_params_t,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_paged_decode_sparse", || {
        non_null(sel_indptr, "sel_indptr")?;
        non_null(sel_indices, "sel_indices")?;
        imp::decode(
            kv,
            max_seq_len,
            Some((sel_indptr as u64, sel_indices as u64, max_per_head)),
            q,
            out,
            lse,
            params,
            stream,
        )
    })
}

/// Paged append into engine-owned device pages.
///
/// # Safety
/// As the header documents: `kv`, `k`, `v` readable descriptors of device memory; the pages
/// `kv` describes writable; `slot_mapping` device memory for `k->shape[0]` int64 slots.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_paged_append(
    kv: *const kvsieve_paged_kv_t,
    k: *const kvsieve_tensor_t,
    v: *const kvsieve_tensor_t,
    slot_mapping: *const i64,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_paged_append", || imp::append(kv, k, v, slot_mapping, stream))
}

/// merge_states on device tensors.
///
/// # Safety
/// As the header documents: tensors are readable descriptors of device memory; `lse_a`,
/// `lse_b`, `lse_out` device memory for `n * heads` floats.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_cuda_merge_states(
    v_a: *const kvsieve_tensor_t,
    lse_a: *const f32,
    v_b: *const kvsieve_tensor_t,
    lse_b: *const f32,
    out: *const kvsieve_tensor_t,
    lse_out: *mut f32,
    stream: *mut c_void,
) -> *mut kvsieve_error_t {
    guard("kvsieve_cuda_merge_states", || imp::merge_states(v_a, lse_a, v_b, lse_b, out, lse_out, stream))
}

/// A device tensor descriptor, validated without touching its memory.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DevTensor {
    pub(crate) ptr: u64,
    pub(crate) dtype: kvsieve::dtype::DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
    pub(crate) device: usize,
}

/// Check a descriptor of device memory: CUDA device type, dtype, `dims.len()` dimensions,
/// non-negative strides (NULL = row-major), a data pointer unless empty.
///
/// # Safety
/// `t` is NULL or a readable descriptor whose `shape`/`strides` (unless NULL) hold `ndim` values.
pub(crate) unsafe fn device_tensor(t: *const kvsieve_tensor_t, name: &str, dims: &[&str]) -> Result<DevTensor> {
    let t = read_struct(t, name)?;
    if t.device.device_type != DEVICE_CUDA && t.device.device_type != DEVICE_CUDA_MANAGED {
        return Err(Error::invalid(
            format!("{name}.device"),
            format!("device memory (kDLCUDA = 2 or kDLCUDAManaged = 13), got device_type {}", t.device.device_type),
        ));
    }
    let device = usize::try_from(t.device.device_id)
        .map_err(|_| Error::invalid(format!("{name}.device.device_id"), "a device ordinal >= 0"))?;
    let dtype = t.dtype.to_dtype(name)?;
    if t.ndim < 0 || t.ndim as usize != dims.len() {
        return Err(Error::shape(name, format!("[{}]", dims.join(", ")), format!("{} dimensions", t.ndim)));
    }
    let nd = dims.len();
    non_null(t.shape, &format!("{name}.shape"))?;
    let raw = std::slice::from_raw_parts(t.shape, nd);
    if raw.iter().any(|&d| d < 0) {
        return Err(Error::shape(name, format!("[{}]", dims.join(", ")), format!("{raw:?}")));
    }
    let shape: Vec<usize> = raw.iter().map(|&d| d as usize).collect();
    let strides = if t.strides.is_null() {
        kvsieve::tensor::contiguous_strides(&shape)
    } else {
        let s = std::slice::from_raw_parts(t.strides, nd);
        if s.iter().any(|&x| x < 0) {
            return Err(Error::shape(
                format!("{name}.strides"),
                "non-negative strides (in elements)",
                format!("{s:?}"),
            ));
        }
        s.iter().map(|&x| x as usize).collect()
    };
    let numel: usize = shape.iter().product();
    if numel > 0 && t.data.is_null() {
        return Err(Error::NullPointer { param: format!("{name}.data") });
    }
    let ptr = (t.data as u64)
        .checked_add(t.byte_offset)
        .ok_or_else(|| Error::invalid(format!("{name}.byte_offset"), "an offset that fits in memory"))?;
    Ok(DevTensor { ptr, dtype, shape, strides, device })
}

/// A paged-K/V descriptor of device memory, checked on the host.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Kv {
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) layout: PagedKvLayout,
    pub(crate) key_rope: kvsieve::config::KeyRope,
    pub(crate) batch: usize,
    pub(crate) indptr: u64,
    pub(crate) indices: u64,
    pub(crate) last_page_len: u64,
    pub(crate) positions: u64,
    pub(crate) device: usize,
}

/// Check a `kvsieve_paged_kv_t` of device memory without touching the device.
///
/// # Safety
/// `kv` is NULL or readable for its `struct_size`.
pub(crate) unsafe fn parse_kv(kv: *const kvsieve_paged_kv_t) -> Result<Kv> {
    let d = read_versioned(kv, "kv")?;
    if d.device.device_type != DEVICE_CUDA && d.device.device_type != DEVICE_CUDA_MANAGED {
        return Err(Error::invalid(
            "kv.device",
            format!("device memory (kDLCUDA = 2), got device_type {}", d.device.device_type),
        ));
    }
    let device = usize::try_from(d.device.device_id)
        .map_err(|_| Error::invalid("kv.device.device_id", "a device ordinal >= 0"))?;
    let dtype = d.dtype.to_dtype("dtype")?;
    let layout = descriptor_layout(&d, dtype)?;
    if d.batch > 0 {
        non_null(d.indptr, "indptr")?;
        non_null(d.indices, "indices")?;
        non_null(d.last_page_len, "last_page_len")?;
    }
    Ok(Kv {
        k: d.k as u64,
        v: d.v as u64,
        layout,
        key_rope: key_rope(d.key_rope, "key_rope")?,
        batch: d.batch,
        indptr: d.indptr as u64,
        indices: d.indices as u64,
        last_page_len: d.last_page_len as u64,
        positions: d.positions as u64,
        device,
    })
}

/// The error every `kvsieve_cuda_*` call gives in a build without the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub(crate) fn unavailable() -> Error {
    Error::CudaUnavailable("kvsieve was built without the `cuda` cargo feature".into())
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    use kvsieve::backend::cuda::attention::{self, Workspace};
    use kvsieve::backend::cuda::{CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceTensor, Stream};
    use kvsieve::dtype::DType;
    use kvsieve::error::{Error, Result};

    use super::super::args::non_null;
    use super::super::params::{attention_params, kvsieve_attention_params_t};
    use super::super::tensor::kvsieve_tensor_t;
    use super::super::view::kvsieve_paged_kv_t;
    use super::{device_tensor, parse_kv, DevTensor};

    impl DevTensor {
        fn core(&self) -> DeviceTensor {
            DeviceTensor {
                ptr: self.ptr,
                dtype: self.dtype,
                shape: self.shape.clone(),
                strides: self.strides.clone(),
                device: self.device,
            }
        }
    }

    /// One decode workspace per (device, stream): calls on one stream are ordered, so they
    /// may share it.
    type Workspaces = Mutex<HashMap<(usize, usize), Arc<Workspace>>>;

    fn workspace(dev: &Arc<CudaDevice>, stream: *mut c_void) -> Arc<Workspace> {
        static MAP: OnceLock<Workspaces> = OnceLock::new();
        let mut m = MAP.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|e| e.into_inner());
        m.entry((dev.ordinal(), stream as usize)).or_insert_with(|| Arc::new(Workspace::new(dev))).clone()
    }

    fn device_of(ordinal: usize) -> Result<Arc<CudaDevice>> {
        CudaDevice::get(ordinal)
    }

    unsafe fn stream_of(dev: &CudaDevice, stream: *mut c_void) -> Stream {
        dev.borrow_stream(stream)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode(
        kv: *const kvsieve_paged_kv_t,
        max_seq_len: usize,
        sel: Option<(u64, u64, usize)>,
        q: *const kvsieve_tensor_t,
        out: *const kvsieve_tensor_t,
        lse: *mut f32,
        params: *const kvsieve_attention_params_t,
        stream: *mut c_void,
    ) -> Result<()> {
        let d = parse_kv(kv)?;
        let q = device_tensor(q, "q", &["batch", "num_qo_heads", "head_dim"])?;
        let out = device_tensor(out, "out", &["batch", "num_qo_heads", "head_dim"])?;
        let params = attention_params(params)?;
        let dev = device_of(d.device)?;
        let table = CudaPageTable::from_device(d.indptr, d.indices, d.last_page_len, d.batch, max_seq_len, d.device)?;
        let mut view = CudaPagedKv::from_raw(d.k, d.v, d.layout, &table)?.with_key_rope(d.key_rope);
        if d.positions != 0 {
            view = view.with_positions(d.positions)?;
        }
        let hq = q.shape[1];
        let lse_t =
            (!lse.is_null()).then(|| DeviceTensor::contiguous(lse as u64, DType::F32, &[d.batch, hq], d.device));
        let s = stream_of(&dev, stream);
        let ws = workspace(&dev, stream);
        match sel {
            None => attention::decode(&view, &q.core(), &out.core(), lse_t.as_ref(), &params, &ws, &s),
            Some((ip, ix, max_per_head)) => {
                let sels = CudaSelections::from_device(ip, ix, d.batch, d.layout.num_kv_heads, max_per_head, d.device)?;
                attention::decode_sparse(&view, &q.core(), &sels, &out.core(), lse_t.as_ref(), &params, &ws, &s)
            }
        }
    }

    pub(super) unsafe fn append(
        kv: *const kvsieve_paged_kv_t,
        k: *const kvsieve_tensor_t,
        v: *const kvsieve_tensor_t,
        slot_mapping: *const i64,
        stream: *mut c_void,
    ) -> Result<()> {
        let d = parse_kv(kv)?;
        let k = device_tensor(k, "k", &["n", "num_kv_heads", "head_dim"])?;
        let v = device_tensor(v, "v", &["n", "num_kv_heads", "head_dim"])?;
        if k.shape[0] > 0 {
            non_null(slot_mapping, "slot_mapping")?;
        }
        let dev = device_of(d.device)?;
        let table = CudaPageTable::from_device(0, 0, 0, 0, 0, d.device)?;
        let view = CudaPagedKv::from_raw(d.k, d.v, d.layout, &table)?;
        let s = stream_of(&dev, stream);
        attention::append(&dev, &view, &k.core(), &v.core(), slot_mapping as u64, &s)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn merge_states(
        v_a: *const kvsieve_tensor_t,
        lse_a: *const f32,
        v_b: *const kvsieve_tensor_t,
        lse_b: *const f32,
        out: *const kvsieve_tensor_t,
        lse_out: *mut f32,
        stream: *mut c_void,
    ) -> Result<()> {
        let dims = ["n", "heads", "head_dim"];
        let a = device_tensor(v_a, "v_a", &dims)?;
        let b = device_tensor(v_b, "v_b", &dims)?;
        let o = device_tensor(out, "out", &dims)?;
        let (n, h) = (a.shape[0], a.shape[1]);
        for (name, p) in [("lse_a", lse_a as u64), ("lse_b", lse_b as u64), ("lse_out", lse_out as u64)] {
            if p == 0 && n * h > 0 {
                return Err(Error::NullPointer { param: name.into() });
            }
        }
        let dev = device_of(a.device)?;
        let s = stream_of(&dev, stream);
        let lt = |p: u64| DeviceTensor::contiguous(p, DType::F32, &[n, h], a.device);
        attention::merge_states(
            &dev,
            &a.core(),
            &lt(lse_a as u64),
            &b.core(),
            &lt(lse_b as u64),
            &o.core(),
            &lt(lse_out as u64),
            &s,
        )
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use std::ffi::c_void;

    use kvsieve::error::Result;

    use super::super::params::{attention_params, kvsieve_attention_params_t};
    use super::super::tensor::kvsieve_tensor_t;
    use super::super::view::kvsieve_paged_kv_t;
    use super::{device_tensor, parse_kv, unavailable};

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn decode(
        kv: *const kvsieve_paged_kv_t,
        _max_seq_len: usize,
        _sel: Option<(u64, u64, usize)>,
        q: *const kvsieve_tensor_t,
        out: *const kvsieve_tensor_t,
        _lse: *mut f32,
        params: *const kvsieve_attention_params_t,
        _stream: *mut c_void,
    ) -> Result<()> {
        parse_kv(kv)?;
        device_tensor(q, "q", &["batch", "num_qo_heads", "head_dim"])?;
        device_tensor(out, "out", &["batch", "num_qo_heads", "head_dim"])?;
        attention_params(params)?;
        Err(unavailable())
    }

    pub(super) unsafe fn append(
        kv: *const kvsieve_paged_kv_t,
        k: *const kvsieve_tensor_t,
        v: *const kvsieve_tensor_t,
        _slot_mapping: *const i64,
        _stream: *mut c_void,
    ) -> Result<()> {
        parse_kv(kv)?;
        device_tensor(k, "k", &["n", "num_kv_heads", "head_dim"])?;
        device_tensor(v, "v", &["n", "num_kv_heads", "head_dim"])?;
        Err(unavailable())
    }

    pub(super) unsafe fn merge_states(
        v_a: *const kvsieve_tensor_t,
        _lse_a: *const f32,
        v_b: *const kvsieve_tensor_t,
        _lse_b: *const f32,
        out: *const kvsieve_tensor_t,
        _lse_out: *mut f32,
        _stream: *mut c_void,
    ) -> Result<()> {
        let dims = ["n", "heads", "head_dim"];
        device_tensor(v_a, "v_a", &dims)?;
        device_tensor(v_b, "v_b", &dims)?;
        device_tensor(out, "out", &dims)?;
        Err(unavailable())
    }
}
