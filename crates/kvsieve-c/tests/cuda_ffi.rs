//! The `kvsieve_cuda_*` C entry points: argument checks and the no-driver answer run
//! everywhere (with or without the `cuda` feature); with a GPU, append, dense and sparse
//! decode through the C ABI on a borrowed stream against the host calls.

use std::ffi::{c_void, CStr};
use std::ptr;

use capi::*;
use kvsieve::ErrorCode;

/// The C API's Rust side (its `#[repr(C)]` structs, constants and entry points), compiled
/// into this test from the crate's source: the crate builds only a cdylib and a staticlib,
/// which a Rust test cannot link against.
#[allow(dead_code, unused_imports)]
#[path = "../src/lib.rs"]
mod capi;

/// (code, message) of an error, freed; None for success.
unsafe fn take(e: *mut kvsieve_error_t) -> Option<(u32, String)> {
    if e.is_null() {
        return None;
    }
    let r = (kvsieve_error_code(e), CStr::from_ptr(kvsieve_error_message(e)).to_string_lossy().into_owned());
    kvsieve_error_free(e);
    Some(r)
}

fn tensor(data: *mut c_void, device_type: i32, shape: &[i64], bits: u8) -> kvsieve_tensor_t {
    kvsieve_tensor_t {
        data,
        device: kvsieve_device_t { device_type, device_id: 0 },
        ndim: shape.len() as i32,
        dtype: kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits, lanes: 1 },
        shape: shape.as_ptr(),
        strides: ptr::null(),
        byte_offset: 0,
    }
}

#[test]
fn cuda_entry_points_check_arguments_and_never_panic() {
    unsafe {
        // Device count and check: success only with a driver and the feature.
        let mut n = 0usize;
        match take(kvsieve_cuda_device_count(&mut n)) {
            None => {
                let built_with_cuda = cfg!(feature = "cuda");
                assert!(built_with_cuda, "a device count without the feature");
            }
            Some((code, msg)) => {
                assert_eq!(code, ErrorCode::CudaUnavailable as u32, "{msg}");
                assert_eq!(n, 0, "out_count written on failure");
            }
        }
        let (code, msg) = take(kvsieve_cuda_device_count(ptr::null_mut())).expect("NULL out_count");
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("out_count"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_check(-1)).expect("negative id");
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("device_id"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_check(1 << 20)).expect("no such device");
        assert_eq!(code, ErrorCode::CudaUnavailable as u32, "{msg}");

        // Descriptors are checked before the device is touched.
        let shape = [1i64, 4, 64];
        let mut host = vec![0f32; 256];
        let q_host = tensor(host.as_mut_ptr() as *mut c_void, DEVICE_CPU, &shape, 32);
        let (code, msg) = take(kvsieve_cuda_paged_decode(
            ptr::null(),
            16,
            &q_host,
            &q_host,
            ptr::null_mut(),
            ptr::null(),
            ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("kv"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_merge_states(
            &q_host,
            ptr::null(),
            &q_host,
            ptr::null(),
            &q_host,
            ptr::null_mut(),
            ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("v_a.device"), "{msg}");
        let bad_rank = tensor(0x1000 as *mut c_void, DEVICE_CUDA, &shape[..2], 32);
        let (code, msg) = take(kvsieve_cuda_merge_states(
            &bad_rank,
            ptr::null(),
            &bad_rank,
            ptr::null(),
            &bad_rank,
            ptr::null_mut(),
            ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::Shape as u32, "{msg}");
        assert!(msg.contains("v_a"), "{msg}");
        let (code, msg) =
            take(kvsieve_cuda_paged_append(ptr::null(), ptr::null(), ptr::null(), ptr::null(), ptr::null_mut()))
                .unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        // The host functions refuse device memory with a pointer to the CUDA ones.
        let q_dev = tensor(0x1000 as *mut c_void, DEVICE_CUDA, &shape, 32);
        let mut lse = [0f32; 4];
        let (code, msg) =
            take(kvsieve_merge_states(&q_dev, lse.as_ptr(), &q_dev, lse.as_ptr(), &q_dev, lse.as_mut_ptr())).unwrap();
        assert_eq!(code, ErrorCode::Unsupported as u32, "{msg}");
        assert!(msg.contains("kvsieve_cuda_"), "{msg}");
    }
}

/// A device descriptor of f16 pages at fake addresses (never dereferenced: every call below
/// fails in its host-side checks or, without a driver, before touching the device).
fn fake_kv(batch: usize) -> kvsieve_paged_kv_t {
    kvsieve_paged_kv_t {
        struct_size: std::mem::size_of::<kvsieve_paged_kv_t>(),
        k: 0x10000 as *const c_void,
        v: 0x20000 as *const c_void,
        device: kvsieve_device_t { device_type: DEVICE_CUDA, device_id: 0 },
        dtype: kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 16, lanes: 1 },
        key_rope: 0,
        num_pages: 8,
        page_size: 16,
        num_kv_heads: 2,
        head_dim: 64,
        k_strides: [2048, 128, 64],
        v_strides: [2048, 128, 64],
        batch,
        indptr: 0x30000 as *const i32,
        indices: 0x40000 as *const i32,
        last_page_len: 0x50000 as *const i32,
        positions: ptr::null(),
    }
}

/// A call that passes every host-side check, made only where no CUDA device is reachable
/// (no `cuda` feature or no driver), where it must answer CUDA_UNAVAILABLE. With a device
/// it is not made: its addresses are fake, and a kernel reading them would leave the
/// context faulted for the rest of the process.
unsafe fn expect_unavailable_without_device(what: &str, call: impl FnOnce() -> *mut kvsieve_error_t) {
    let mut n = 0usize;
    if take(kvsieve_cuda_device_count(&mut n)).is_none() && n > 0 {
        eprintln!("{what}: not called on fake addresses with a device present");
        return;
    }
    let (code, msg) = take(call()).unwrap_or_else(|| panic!("{what}: fake device addresses accepted"));
    assert_eq!(code, ErrorCode::CudaUnavailable as u32, "{what}: {msg}");
    assert!(msg.to_lowercase().contains("cuda"), "{what}: {msg}");
}

#[test]
fn cuda_selection_entry_points_check_arguments_first() {
    unsafe {
        let kv = fake_kv(1);
        let qshape = [1i64, 4, 64];
        let q_dev = tensor(0x60000 as *mut c_void, DEVICE_CUDA, &qshape, 32);
        let mut host = vec![0f32; 256];
        let q_host = tensor(host.as_mut_ptr() as *mut c_void, DEVICE_CPU, &qshape, 32);
        let cfg =
            kvsieve_page_bounds_config_t { budget_tokens: 32, min_pages: 1, ..kvsieve_page_bounds_config_t::init() };
        let (ip, ix) = (0x70000 as *mut i32, 0x80000 as *mut i32);
        let bounds = 0x90000 as *mut c_void;
        let s = ptr::null_mut();

        // Key bounds: NULL descriptor, NULL bounds with entries, nothing to do otherwise.
        let (code, msg) = take(kvsieve_cuda_update_key_bounds(ptr::null(), bounds, ptr::null(), 1, s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("kv"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_update_key_bounds(&kv, ptr::null_mut(), ptr::null(), 3, s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("key_bounds"), "{msg}");
        // Versioned structs: a struct_size this library does not know is refused by name.
        for size in [0, std::mem::size_of::<kvsieve_paged_kv_t>() - 8, std::mem::size_of::<kvsieve_paged_kv_t>() + 8] {
            let bad = kvsieve_paged_kv_t { struct_size: size, ..fake_kv(1) };
            let (code, msg) = take(kvsieve_cuda_update_key_bounds(&bad, bounds, ptr::null(), 0, s)).unwrap();
            assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
            assert!(msg.contains("`kv.struct_size`"), "{msg}");
            let bad_cfg = kvsieve_page_bounds_config_t { struct_size: size, ..cfg };
            let (code, msg) = take(kvsieve_cuda_page_bounds(&kv, 64, bounds, &q_dev, &bad_cfg, ip, ix, s)).unwrap();
            assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
            assert!(msg.contains("`config.struct_size`"), "{msg}");
        }
        let mut bad_ps = fake_kv(1);
        bad_ps.page_size = 0;
        let (code, msg) = take(kvsieve_cuda_update_key_bounds(&bad_ps, bounds, ptr::null(), 0, s)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("page_size"), "{msg}");

        // Page bounds: host query, zero budget, missing outputs, then the device step.
        let (code, msg) = take(kvsieve_cuda_page_bounds(&kv, 64, bounds, &q_host, &cfg, ip, ix, s)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("q.device"), "{msg}");
        let zero = kvsieve_page_bounds_config_t::init();
        let (code, msg) = take(kvsieve_cuda_page_bounds(&kv, 64, bounds, &q_dev, &zero, ip, ix, s)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("budget_tokens"), "{msg}");
        let (code, msg) =
            take(kvsieve_cuda_page_bounds(&kv, 64, bounds, &q_dev, &cfg, ip, ptr::null_mut(), s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("sel_indices"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_page_bounds(&kv, 64, ptr::null(), &q_dev, &cfg, ip, ix, s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("key_bounds"), "{msg}");
        expect_unavailable_without_device("page bounds", || {
            kvsieve_cuda_page_bounds(&kv, 64, bounds, &q_dev, &cfg, ip, ix, s)
        });

        // Prefill: qo_indptr is host memory of batch + 1 values; windows one per KV head.
        let pshape = [5i64, 4, 64];
        let pq = tensor(0x60000 as *mut c_void, DEVICE_CUDA, &pshape, 16);
        let po = tensor(0xA0000 as *mut c_void, DEVICE_CUDA, &pshape, 16);
        let qo = [0i32, 5];
        let (code, msg) = take(kvsieve_cuda_paged_prefill(
            &kv,
            &pq,
            ptr::null(),
            true,
            ptr::null(),
            0,
            ptr::null(),
            ptr::null(),
            0,
            &po,
            ptr::null_mut(),
            ptr::null(),
            s,
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("qo_indptr"), "{msg}");
        let win = [kvsieve_streaming_window_t { sinks: 4, window: 16, ..kvsieve_streaming_window_t::init() }];
        let (code, msg) = take(kvsieve_cuda_paged_prefill(
            &kv,
            &pq,
            qo.as_ptr(),
            true,
            win.as_ptr(),
            1,
            ptr::null(),
            ptr::null(),
            0,
            &po,
            ptr::null_mut(),
            ptr::null(),
            s,
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::Shape as u32, "{msg}");
        assert!(msg.contains("windows"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_paged_prefill(
            &kv,
            &pq,
            qo.as_ptr(),
            true,
            ptr::null(),
            0,
            ip,
            ptr::null(),
            8,
            &po,
            ptr::null_mut(),
            ptr::null(),
            s,
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("sel_indptr"), "{msg}");
        let bad_out = tensor(0xA0000 as *mut c_void, DEVICE_CUDA, &pshape[..2], 16);
        let (code, msg) = take(kvsieve_cuda_paged_prefill(
            &kv,
            &pq,
            qo.as_ptr(),
            true,
            ptr::null(),
            0,
            ptr::null(),
            ptr::null(),
            0,
            &bad_out,
            ptr::null_mut(),
            ptr::null(),
            s,
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::Shape as u32, "{msg}");
        assert!(msg.contains("out"), "{msg}");
        let wins = [
            kvsieve_streaming_window_t { sinks: 4, window: 16, ..kvsieve_streaming_window_t::init() },
            kvsieve_streaming_window_t::init(),
        ];
        let unsized_wins = [kvsieve_streaming_window_t { struct_size: 0, ..wins[0] }, wins[1]];
        let (code, msg) = take(kvsieve_cuda_paged_prefill(
            &kv,
            &pq,
            qo.as_ptr(),
            true,
            unsized_wins.as_ptr(),
            2,
            ptr::null(),
            ptr::null(),
            0,
            &po,
            ptr::null_mut(),
            ptr::null(),
            s,
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("`windows[0].struct_size`"), "{msg}");
        expect_unavailable_without_device("prefill", || {
            kvsieve_cuda_paged_prefill(
                &kv,
                &pq,
                qo.as_ptr(),
                true,
                wins.as_ptr(),
                2,
                ip,
                ix,
                8,
                &po,
                ptr::null_mut(),
                ptr::null(),
                s,
            )
        });

        // Device cluster index: upload needs a host index and an out-parameter; build checks
        // the key tensor and the configuration's fields by name.
        let mut out_dev: *mut kvsieve_cuda_cluster_index_t = ptr::null_mut();
        let (code, msg) = take(kvsieve_cuda_cluster_index_upload(ptr::null(), 0, s, &mut out_dev)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("index"), "{msg}");
        let kshape = [64i64, 2, 64];
        let keys_dev = tensor(0x60000 as *mut c_void, DEVICE_CUDA, &kshape, 16);
        let keys_host = tensor(host.as_mut_ptr() as *mut c_void, DEVICE_CPU, &kshape, 32);
        let ccfg = kvsieve_cluster_config_default(8);
        let (code, msg) =
            take(kvsieve_cuda_cluster_index_build(&keys_host, &ccfg, s, ptr::null_mut(), &mut out_dev)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("keys.device"), "{msg}");
        let both = kvsieve_cluster_config_t { cluster_fraction: 0.5, ..ccfg };
        let (code, msg) =
            take(kvsieve_cuda_cluster_index_build(&keys_dev, &both, s, ptr::null_mut(), &mut out_dev)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("cluster_fraction"), "{msg}");
        let (code, msg) =
            take(kvsieve_cuda_cluster_index_build(&keys_dev, &ccfg, s, ptr::null_mut(), ptr::null_mut())).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("out"), "{msg}");
        expect_unavailable_without_device("index build", || {
            kvsieve_cuda_cluster_index_build(&keys_dev, &ccfg, s, ptr::null_mut(), &mut out_dev)
        });
        assert!(out_dev.is_null(), "out written on failure");
        let rcfg = kvsieve_retrieve_config_default(32);
        let (code, msg) = take(kvsieve_cuda_cluster_index_retrieve(ptr::null(), &q_dev, &rcfg, ip, ix, s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("index"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_cluster_index_info(
            ptr::null(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        kvsieve_cuda_cluster_index_free(ptr::null_mut());

        // GemFilter: device query and keys, a configuration, an output.
        let gcfg = kvsieve_gemfilter_config_default(16);
        let q2 = [4i64, 64];
        let gq = tensor(0x60000 as *mut c_void, DEVICE_CUDA, &q2, 32);
        let (code, msg) = take(kvsieve_cuda_gemfilter_select(&gq, &keys_host, &gcfg, ix, s)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("keys.device"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_gemfilter_select(&gq, &keys_dev, ptr::null(), ix, s)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("config"), "{msg}");
        expect_unavailable_without_device("gemfilter", || kvsieve_cuda_gemfilter_select(&gq, &keys_dev, &gcfg, ix, s));
    }
}

#[test]
fn cuda_cache_entry_points_check_arguments_first() {
    unsafe {
        let mut cfg = kvsieve_cache_config_default(2, 2, 64, 16, 8);
        cfg.dtype = kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 16, lanes: 1 };
        let mut out: *mut kvsieve_cuda_cache_t = ptr::null_mut();
        let (code, msg) = take(kvsieve_cuda_cache_new(ptr::null(), 0, &mut out)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("config"), "{msg}");
        let (code, msg) = take(kvsieve_cuda_cache_new(&cfg, -1, &mut out)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("device_id"), "{msg}");
        let mut bad = cfg;
        bad.page_size = 0;
        let (code, msg) = take(kvsieve_cuda_cache_new(&bad, 0, &mut out)).unwrap();
        assert!(msg.contains("page_size"), "{msg} ({code})");
        let (code, msg) = take(kvsieve_cuda_cache_new(&cfg, 0, ptr::null_mut())).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        let unknown = kvsieve_cache_config_t { struct_size: 0, ..cfg };
        let (code, msg) = take(kvsieve_cuda_cache_new(&unknown, 0, &mut out)).unwrap();
        assert_eq!(code, ErrorCode::InvalidArgument as u32, "{msg}");
        assert!(msg.contains("`config.struct_size`"), "{msg}");
        match take(kvsieve_cuda_cache_new(&cfg, 0, &mut out)) {
            None => kvsieve_cuda_cache_free(out),
            Some((code, msg)) => {
                assert_eq!(code, ErrorCode::CudaUnavailable as u32, "{msg}");
                assert!(out.is_null(), "out written on failure");
            }
        }
        // Every call on a handle refuses NULL by name.
        let mut id = 0u64;
        let (code, msg) = take(kvsieve_cuda_cache_create_sequence(ptr::null_mut(), &mut id)).unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
        assert!(msg.contains("cache"), "{msg}");
        for e in [
            kvsieve_cuda_cache_fork(ptr::null_mut(), 0, &mut id),
            kvsieve_cuda_cache_free_sequence(ptr::null_mut(), 0),
            kvsieve_cuda_cache_truncate(ptr::null_mut(), 0, 0),
            kvsieve_cuda_cache_append(ptr::null_mut(), 0, 1, ptr::null(), ptr::null_mut(), 0),
            kvsieve_cuda_cache_evict_pages(ptr::null_mut(), 0, ptr::null(), 0),
            kvsieve_cuda_cache_compact(ptr::null_mut(), 0, 0, ptr::null(), 1, ptr::null(), 0),
            kvsieve_cuda_cache_write(ptr::null_mut(), 0, 0, 0, ptr::null(), ptr::null()),
        ] {
            let (code, msg) = take(e).unwrap();
            assert_eq!(code, ErrorCode::NullPointer as u32, "{msg}");
            assert!(msg.contains("cache"), "{msg}");
        }
        let mut table: *mut kvsieve_cuda_table_t = ptr::null_mut();
        let mut view = kvsieve_paged_kv_t::init();
        let (code, _) = take(kvsieve_cuda_cache_layer_view(
            ptr::null(),
            0,
            &id,
            1,
            &mut table,
            &mut view,
            ptr::null_mut(),
            ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(code, ErrorCode::NullPointer as u32);
        kvsieve_cuda_table_free(ptr::null_mut());
        kvsieve_cuda_cache_free(ptr::null_mut());
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use kvsieve::attention::{decode, decode_sparse, AttentionParams};
    use kvsieve::backend::cuda::{CudaDevice, DeviceBuffer};
    use kvsieve::{f16, DType, PageLayout, PageTable, PagedKv, PagedKvLayout, Selection, TensorView, TensorViewMut};
    use std::io::Write;

    fn dev_or_skip(test: &str) -> Option<std::sync::Arc<CudaDevice>> {
        match CudaDevice::get(0) {
            Ok(d) => {
                let _ = writeln!(std::io::stderr(), "ran on {}: {test}", d.name());
                Some(d)
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "skipped: {test}: {e}");
                None
            }
        }
    }

    fn rand(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Append through the C ABI, then dense and sparse decode on a borrowed stream, against
    /// the CPU functions over the same pages.
    #[test]
    fn c_abi_append_and_decode_match_cpu() {
        let Some(dev) = dev_or_skip("c_abi_append_and_decode_match_cpu") else { return };
        let s = dev.stream();
        let mut seed = 7u64;
        let (num_pages, ps, hk, d, hq) = (12usize, 16usize, 2usize, 64usize, 6usize);
        let layout = PagedKvLayout::packed(DType::F16, num_pages, ps, hk, d, PageLayout::Nhd);
        let elems = num_pages * ps * hk * d;
        let kb = DeviceBuffer::zeroed(&dev, elems * 2, s).unwrap();
        let vb = DeviceBuffer::zeroed(&dev, elems * 2, s).unwrap();
        let table = PageTable { indptr: vec![0, 3, 5], indices: vec![7, 2, 9, 0, 11], last_page_len: vec![5, 16] };
        let lens = [37usize, 32];
        let mut slots: Vec<i64> = Vec::new();
        for (b, &n) in lens.iter().enumerate() {
            for t in 0..n {
                slots.push(table.indices[table.indptr[b] as usize + t / ps] as i64 * ps as i64 + (t % ps) as i64);
            }
        }
        let total = slots.len();
        let rows = rand(total * hk * d, &mut seed);
        let rows_b = DeviceBuffer::from_slice(&dev, &rows, s).unwrap();
        let slots_b = DeviceBuffer::from_slice(&dev, &slots, s).unwrap();
        let ip = DeviceBuffer::from_slice(&dev, &table.indptr, s).unwrap();
        let ix = DeviceBuffer::from_slice(&dev, &table.indices, s).unwrap();
        let lp = DeviceBuffer::from_slice(&dev, &table.last_page_len, s).unwrap();
        let st = layout.k_strides.map(|x| x as i64);
        let desc = kvsieve_paged_kv_t {
            struct_size: std::mem::size_of::<kvsieve_paged_kv_t>(),
            k: kb.ptr() as *const c_void,
            v: vb.ptr() as *const c_void,
            device: kvsieve_device_t { device_type: DEVICE_CUDA, device_id: dev.ordinal() as i32 },
            dtype: kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 16, lanes: 1 },
            key_rope: 0,
            num_pages,
            page_size: ps,
            num_kv_heads: hk,
            head_dim: d,
            k_strides: st,
            v_strides: st,
            batch: 2,
            indptr: ip.ptr() as *const i32,
            indices: ix.ptr() as *const i32,
            last_page_len: lp.ptr() as *const i32,
            positions: ptr::null(),
        };
        let raw_stream = s.raw() as *mut c_void;
        let kshape = [total as i64, hk as i64, d as i64];
        let mut rt = tensor(rows_b.ptr() as *mut c_void, DEVICE_CUDA, &kshape, 32);
        rt.device.device_id = dev.ordinal() as i32;
        unsafe {
            assert_eq!(take(kvsieve_cuda_paged_append(&desc, &rt, &rt, slots_b.ptr() as *const i64, raw_stream)), None);
        }
        s.synchronize().unwrap();
        let k_host: Vec<f16> = kb.to_vec(s).unwrap();
        let v_host: Vec<f16> = vb.to_vec(s).unwrap();
        let cpu = PagedKv::new(&k_host, &v_host, layout, table.as_ref()).unwrap();

        let q = rand(2 * hq * d, &mut seed);
        let qb = DeviceBuffer::from_slice(&dev, &q, s).unwrap();
        let qshape = [2i64, hq as i64, d as i64];
        let qt = tensor(qb.ptr() as *mut c_void, DEVICE_CUDA, &qshape, 32);
        let ob = DeviceBuffer::alloc(&dev, 2 * hq * d * 4).unwrap();
        ob.memset(0xFF, s).unwrap();
        let ot = tensor(ob.ptr() as *mut c_void, DEVICE_CUDA, &qshape, 32);
        let lb = DeviceBuffer::alloc(&dev, 2 * hq * 4).unwrap();
        lb.memset(0xFF, s).unwrap();
        let qv = TensorView::new(&q, &[2, hq, d]).unwrap();
        let check = |want: &[f32], want_lse: &[f32], what: &str| {
            s.synchronize().unwrap();
            let got: Vec<f32> = ob.to_vec(s).unwrap();
            let got_lse: Vec<f32> = lb.to_vec(s).unwrap();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 2e-4 + 2e-3 * w.abs(), "{what} out[{i}]: {g} vs {w}");
            }
            for (i, (g, w)) in got_lse.iter().zip(want_lse).enumerate() {
                assert!((g - w).abs() <= 1e-3, "{what} lse[{i}]: {g} vs {w}");
            }
        };
        let mut want = vec![0f32; 2 * hq * d];
        let mut want_lse = vec![0f32; 2 * hq];
        decode(
            &cpu,
            &qv,
            &mut TensorViewMut::new(&mut want, &[2, hq, d]).unwrap(),
            Some(&mut want_lse),
            &AttentionParams::default(),
        )
        .unwrap();
        unsafe {
            assert_eq!(
                take(kvsieve_cuda_paged_decode(&desc, 64, &qt, &ot, lb.ptr() as *mut f32, ptr::null(), raw_stream)),
                None
            );
        }
        check(&want, &want_lse, "C dense decode");

        // Sparse: every other token for head 0, the first 10 for head 1.
        let sels: Vec<Selection> = lens
            .iter()
            .map(|&n| {
                Selection::from_heads(n, vec![(0..n as u32).step_by(2).collect(), (0..10.min(n) as u32).collect()])
                    .unwrap()
            })
            .collect();
        let mut indptr = vec![0i32];
        let mut indices: Vec<i32> = Vec::new();
        for sel in &sels {
            for h in 0..hk {
                indices.extend(sel.head(h).iter().map(|&t| t as i32));
                indptr.push(indices.len() as i32);
            }
        }
        let sip = DeviceBuffer::from_slice(&dev, &indptr, s).unwrap();
        let six = DeviceBuffer::from_slice(&dev, &indices, s).unwrap();
        let refs: Vec<&Selection> = sels.iter().collect();
        decode_sparse(
            &cpu,
            &qv,
            &refs,
            &mut TensorViewMut::new(&mut want, &[2, hq, d]).unwrap(),
            Some(&mut want_lse),
            &AttentionParams::default(),
        )
        .unwrap();
        ob.memset(0xFF, s).unwrap();
        lb.memset(0xFF, s).unwrap();
        unsafe {
            let e = kvsieve_cuda_paged_decode_sparse(
                &desc,
                64,
                sip.ptr() as *const i32,
                six.ptr() as *const i32,
                32,
                &qt,
                &ot,
                lb.ptr() as *mut f32,
                ptr::null(),
                raw_stream,
            );
            assert_eq!(take(e), None);
        }
        check(&want, &want_lse, "C sparse decode");
    }

    /// Centroid retrieval (an uploaded host index and a device build) and GemFilter through
    /// the C ABI against the host functions on the same keys.
    #[test]
    fn c_abi_retrieval_and_gemfilter_match_cpu() {
        use kvsieve::select::cluster::{ClusterConfig, ClusterCount, ClusterIndex, KeySource, Retrieve};
        use kvsieve::select::gemfilter::{select as gem_select, GemFilterConfig};
        let Some(dev) = dev_or_skip("c_abi_retrieval_and_gemfilter_match_cpu") else { return };
        let s = dev.stream();
        let raw_stream = s.raw() as *mut c_void;
        let mut seed = 19u64;
        let (n, hk, d, hq) = (300usize, 2usize, 64usize, 6usize);
        let keys = rand(n * hk * d, &mut seed);
        let q = rand(hq * d, &mut seed);
        let kv = TensorView::new(&keys, &[n, hk, d]).unwrap();
        let qv = TensorView::new(&q, &[hq, d]).unwrap();
        let kb = DeviceBuffer::from_slice(&dev, &keys, s).unwrap();
        let qb = DeviceBuffer::from_slice(&dev, &q, s).unwrap();
        let kshape = [n as i64, hk as i64, d as i64];
        let qshape = [hq as i64, d as i64];
        let mut kt = tensor(kb.ptr() as *mut c_void, DEVICE_CUDA, &kshape, 32);
        let mut qt = tensor(qb.ptr() as *mut c_void, DEVICE_CUDA, &qshape, 32);
        kt.device.device_id = dev.ordinal() as i32;
        qt.device.device_id = dev.ordinal() as i32;
        let ip = DeviceBuffer::alloc(&dev, (hk + 1) * 4).unwrap();
        let ix = DeviceBuffer::alloc(&dev, hk * n * 4).unwrap();
        let lists = |what: &str| -> Vec<Vec<u32>> {
            s.synchronize().unwrap();
            let p: Vec<i32> = ip.to_vec(s).unwrap();
            let x: Vec<i32> = ix.to_vec(s).unwrap();
            (0..hk)
                .map(|h| x[p[h] as usize..p[h + 1] as usize].iter().map(|&t| u32::try_from(t).expect(what)).collect())
                .collect()
        };

        let cfg = ClusterConfig::new(ClusterCount::Absolute(24)).with_coarse(ClusterCount::Absolute(5)).with_seed(2);
        let index = ClusterIndex::build(KeySource::Tensor(&kv), &cfg).unwrap();
        let want = index.retrieve(&qv, &Retrieve::Budget(50), n).unwrap().selection;
        unsafe {
            let host = cluster_index_into_handle(index.clone());
            let mut dix: *mut kvsieve_cuda_cluster_index_t = ptr::null_mut();
            assert_eq!(take(kvsieve_cuda_cluster_index_upload(host, dev.ordinal() as i32, raw_stream, &mut dix)), None);
            kvsieve_cluster_index_free(host);
            let mut m = 0usize;
            assert_eq!(
                take(kvsieve_cuda_cluster_index_info(
                    dix,
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    &mut m
                )),
                None
            );
            assert_eq!(m, n);
            let rc = kvsieve_retrieve_config_default(50);
            assert_eq!(
                take(kvsieve_cuda_cluster_index_retrieve(
                    dix,
                    &qt,
                    &rc,
                    ip.ptr() as *mut i32,
                    ix.ptr() as *mut i32,
                    raw_stream
                )),
                None
            );
            let got = lists("uploaded index");
            for (h, l) in got.iter().enumerate() {
                assert_eq!(l.as_slice(), want.head(h), "uploaded index, head {h}");
            }
            // The mixed ranking (the uploaded index carries the host build's radii).
            let want_mixed = index.retrieve(&qv, &Retrieve::MixedBudget(50), n).unwrap().selection;
            let rm = kvsieve_retrieve_config_t { mode: RETRIEVE_BUDGET_MIXED, ..rc };
            assert_eq!(
                take(kvsieve_cuda_cluster_index_retrieve(
                    dix,
                    &qt,
                    &rm,
                    ip.ptr() as *mut i32,
                    ix.ptr() as *mut i32,
                    raw_stream
                )),
                None
            );
            let got = lists("uploaded index, mixed ranking");
            for (h, l) in got.iter().enumerate() {
                assert_eq!(l.as_slice(), want_mixed.head(h), "uploaded index, mixed ranking, head {h}");
            }
            kvsieve_cuda_cluster_index_free(dix);

            // A device build: its host copy and its device copy retrieve the same tokens.
            let cc = kvsieve_cluster_config_default(24);
            let mut host_out: *mut kvsieve_cluster_index_t = ptr::null_mut();
            let mut built: *mut kvsieve_cuda_cluster_index_t = ptr::null_mut();
            assert_eq!(take(kvsieve_cuda_cluster_index_build(&kt, &cc, raw_stream, &mut host_out, &mut built)), None);
            let host_index = cluster_index_from_handle(host_out).unwrap();
            assert_eq!(
                (0..hk).map(|h| host_index.head(h).sizes().iter().sum::<u32>() as usize).collect::<Vec<_>>(),
                vec![n; hk]
            );
            let want = host_index.retrieve(&qv, &Retrieve::Budget(50), n).unwrap().selection;
            assert_eq!(
                take(kvsieve_cuda_cluster_index_retrieve(
                    built,
                    &qt,
                    &rc,
                    ip.ptr() as *mut i32,
                    ix.ptr() as *mut i32,
                    raw_stream
                )),
                None
            );
            let got = lists("device build");
            for (h, l) in got.iter().enumerate() {
                assert_eq!(l.as_slice(), want.head(h), "device build, head {h}");
            }
            kvsieve_cuda_cluster_index_free(built);

            // GemFilter.
            let gcfg = GemFilterConfig { k: 40, pool_kernel: 5, keep_first: 2, keep_last: 3 };
            let want = gem_select(&qv, KeySource::Tensor(&kv), &gcfg).unwrap();
            let c = kvsieve_gemfilter_config_t {
                k: 40,
                pool_kernel: 5,
                keep_first: 2,
                keep_last: 3,
                ..kvsieve_gemfilter_config_default(0)
            };
            assert_eq!(take(kvsieve_cuda_gemfilter_select(&qt, &kt, &c, ix.ptr() as *mut i32, raw_stream)), None);
            s.synchronize().unwrap();
            let got: Vec<i32> = ix.to_vec(s).unwrap();
            assert_eq!(got[..40].iter().map(|&t| t as u32).collect::<Vec<_>>(), want);
        }
    }

    /// A device cache driven through the C ABI (append, host and device writes, fork with
    /// copy on write, compaction) and decoded through its layer view, against a host
    /// `KvCache` given the same calls.
    #[test]
    fn c_abi_device_cache_matches_host_cache() {
        use kvsieve::{CacheConfig, KeepTokens, KvCache};
        let Some(dev) = dev_or_skip("c_abi_device_cache_matches_host_cache") else { return };
        let s = dev.stream();
        let raw_stream = s.raw() as *mut c_void;
        let mut seed = 23u64;
        let (layers, hk, d, ps, hq) = (2usize, 2usize, 64usize, 16usize, 4usize);
        let mut ccfg = kvsieve_cache_config_default(layers, hk, d, ps, 32);
        ccfg.dtype = kvsieve_dtype_t { code: DTYPE_CODE_FLOAT, bits: 16, lanes: 1 };
        let mut host = KvCache::new(CacheConfig::new(layers, hk, d, ps, 32).with_dtype(DType::F16)).unwrap();
        unsafe {
            let mut cache: *mut kvsieve_cuda_cache_t = ptr::null_mut();
            assert_eq!(take(kvsieve_cuda_cache_new(&ccfg, dev.ordinal() as i32, &mut cache)), None);
            let mut a = 0u64;
            assert_eq!(take(kvsieve_cuda_cache_create_sequence(cache, &mut a)), None);
            let ha = host.create_sequence();
            assert_eq!(a, ha);
            let n = 45usize;
            let mut slots = vec![0i64; n];
            assert_eq!(take(kvsieve_cuda_cache_append(cache, a, n, ptr::null(), slots.as_mut_ptr(), n)), None);
            assert_eq!(slots, host.append(ha, n, None).unwrap());
            let shape = [n as i64, hk as i64, d as i64];
            for layer in 0..layers {
                let k = rand(n * hk * d, &mut seed);
                let v = rand(n * hk * d, &mut seed);
                let (kv, vv) = (TensorView::new(&k, &[n, hk, d]).unwrap(), TensorView::new(&v, &[n, hk, d]).unwrap());
                host.write(ha, layer, 0, &kv, &vv).unwrap();
                if layer == 0 {
                    let kt = tensor(k.as_ptr() as *mut c_void, DEVICE_CPU, &shape, 32);
                    let vt = tensor(v.as_ptr() as *mut c_void, DEVICE_CPU, &shape, 32);
                    assert_eq!(take(kvsieve_cuda_cache_write(cache, a, layer, 0, &kt, &vt)), None);
                } else {
                    let kb = DeviceBuffer::from_slice(&dev, &k, s).unwrap();
                    let vb = DeviceBuffer::from_slice(&dev, &v, s).unwrap();
                    let mut kt = tensor(kb.ptr() as *mut c_void, DEVICE_CUDA, &shape, 32);
                    let mut vt = tensor(vb.ptr() as *mut c_void, DEVICE_CUDA, &shape, 32);
                    kt.device.device_id = dev.ordinal() as i32;
                    vt.device.device_id = dev.ordinal() as i32;
                    assert_eq!(take(kvsieve_cuda_cache_write(cache, a, layer, 0, &kt, &vt)), None);
                }
            }
            // Fork, compact the fork to every third token.
            let mut b = 0u64;
            assert_eq!(take(kvsieve_cuda_cache_fork(cache, a, &mut b)), None);
            let hb = host.fork(ha).unwrap();
            let keep: Vec<u32> = (0..n as u32).step_by(3).collect();
            let indptr = [0u32, keep.len() as u32];
            assert_eq!(
                take(kvsieve_cuda_cache_compact(cache, b, 0, indptr.as_ptr(), 1, keep.as_ptr(), keep.len())),
                None
            );
            host.compact(hb, KeepTokens::All(&keep)).unwrap();
            let mut len = 0usize;
            assert_eq!(take(kvsieve_cuda_cache_seq_len(cache, b, &mut len)), None);
            assert_eq!(len, keep.len());
            // Decode both sequences through the view of each layer against the host cache.
            let ids = [a, b];
            let q = rand(2 * hq * d, &mut seed);
            let qb = DeviceBuffer::from_slice(&dev, &q, s).unwrap();
            let qshape = [2i64, hq as i64, d as i64];
            let mut qt = tensor(qb.ptr() as *mut c_void, DEVICE_CUDA, &qshape, 32);
            qt.device.device_id = dev.ordinal() as i32;
            let ob = DeviceBuffer::alloc(&dev, 2 * hq * d * 4).unwrap();
            let mut ot = tensor(ob.ptr() as *mut c_void, DEVICE_CUDA, &qshape, 32);
            ot.device.device_id = dev.ordinal() as i32;
            for layer in 0..layers {
                let mut table: *mut kvsieve_cuda_table_t = ptr::null_mut();
                let mut view = kvsieve_paged_kv_t::init();
                let mut max_len = 0usize;
                let e = kvsieve_cuda_cache_layer_view(
                    cache,
                    layer,
                    ids.as_ptr(),
                    2,
                    &mut table,
                    &mut view,
                    ptr::null_mut(),
                    &mut max_len,
                );
                assert_eq!(take(e), None);
                assert_eq!(max_len, n);
                ob.memset(0xFF, s).unwrap();
                assert_eq!(
                    take(kvsieve_cuda_paged_decode(&view, max_len, &qt, &ot, ptr::null_mut(), ptr::null(), raw_stream)),
                    None
                );
                s.synchronize().unwrap();
                kvsieve_cuda_table_free(table);
                let got: Vec<f32> = ob.to_vec(s).unwrap();
                let t = host.page_table(&[ha, hb]).unwrap();
                let hv = host.layer_view(layer, &t).unwrap();
                let mut want = vec![0f32; 2 * hq * d];
                decode(
                    &hv,
                    &TensorView::new(&q, &[2, hq, d]).unwrap(),
                    &mut TensorViewMut::new(&mut want, &[2, hq, d]).unwrap(),
                    None,
                    &AttentionParams::default(),
                )
                .unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 2e-4 + 2e-3 * w.abs(), "layer {layer} out[{i}]: {g} vs {w}");
                }
            }
            assert_eq!(take(kvsieve_cuda_cache_free_sequence(cache, b)), None);
            kvsieve_cuda_cache_free(cache);
        }
    }
}
