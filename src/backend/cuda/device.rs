//! A CUDA device: its context, a lazily loaded copy of each embedded kernel module, the
//! functions looked up in them, and streams.
//!
//! Every call that could reach the driver first checks that `libcuda` can be loaded
//! (cudarc panics when it is absent), and context creation runs under `catch_unwind`, so a
//! machine without a driver or device gets [`Error::CudaUnavailable`], never a panic.

use std::collections::HashMap;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as cu, sys, CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::backend::cuda::ModuleId;
use crate::error::{Error, Result};

/// Turn a driver error into a kvsieve error naming what was being done.
pub(crate) fn driver_err(what: &str) -> impl Fn(cu::DriverError) -> Error + '_ {
    move |e| Error::CudaUnavailable(format!("{what}: {e}"))
}

/// Check that the driver library can be loaded, before anything calls into it.
pub(crate) fn driver_present() -> Result<()> {
    static PRESENT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PRESENT
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the driver library by its usual names.
            let found = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
            if !found {
                return Err(
                    "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into()
                );
            }
            catch_unwind(cu::init)
                .map_err(|_| "the CUDA driver library could not be loaded".to_string())?
                .map_err(|e| format!("cuInit failed: {e}"))
        })
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// Number of CUDA devices the driver reports.
pub fn device_count() -> Result<usize> {
    driver_present()?;
    let n = catch_unwind(cu::device::get_count)
        .map_err(|_| Error::CudaUnavailable("cuDeviceGetCount panicked".into()))?
        .map_err(driver_err("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// One CUDA device as kvsieve uses it: the primary context, a default stream (kvsieve's
/// own non-blocking stream), and the kernel modules, each loaded on first use.
///
/// Obtain it with [`CudaDevice::get`]; it is shared (`Arc`) and `Send + Sync`.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Stream,
    modules: Mutex<HashMap<ModuleId, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(ModuleId, &'static str), CudaFunction>>,
    name: String,
    compute_capability: (i32, i32),
    num_sms: usize,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

impl CudaDevice {
    /// The device with this ordinal, created once per process and then shared.
    /// `Error::CudaUnavailable` (with the reason) when there is no driver, no such device,
    /// or the device is older than sm_80.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(Self::create(ordinal)?);
        map.insert(ordinal, d.clone());
        Ok(d)
    }

    fn create(ordinal: usize) -> Result<CudaDevice> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!(
                "no CUDA device {ordinal}: the driver reports {count} device(s)"
            )));
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::CudaUnavailable(format!("creating the context of CUDA device {ordinal} panicked")))?
            .map_err(driver_err("creating the CUDA context"))?;
        // kvsieve orders its work on explicit streams; cudarc's per-buffer event tracking
        // would add events to every launch (and break CUDA graph capture).
        // SAFETY: no cudarc buffer of this context exists yet.
        unsafe { ctx.disable_event_tracking() };
        let compute_capability = ctx.compute_capability().map_err(driver_err("querying the compute capability"))?;
        if compute_capability.0 < 8 {
            return Err(Error::CudaUnavailable(format!(
                "CUDA device {ordinal} has compute capability {}.{}; kvsieve's kernels need 8.0 (Ampere) or newer",
                compute_capability.0, compute_capability.1
            )));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let num_sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("querying the SM count"))? as usize;
        let stream = Stream { inner: ctx.new_stream().map_err(driver_err("creating a stream"))? };
        Ok(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            name,
            compute_capability,
            num_sms,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// The device's marketing name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// Streaming multiprocessors (used to size split-K grids).
    pub fn num_sms(&self) -> usize {
        self.num_sms
    }
    /// kvsieve's own stream on this device (non-blocking).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
    #[allow(dead_code)]
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Make this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the CUDA context"))
    }

    /// A new stream owned by kvsieve.
    pub fn new_stream(&self) -> Result<Stream> {
        Ok(Stream { inner: self.ctx.new_stream().map_err(driver_err("creating a stream"))? })
    }

    /// Wrap a stream created by the engine (`cudaStream_t` / `CUstream`) so that kvsieve's
    /// work is ordered with the engine's. A null pointer is the legacy default stream.
    ///
    /// # Safety
    /// 1. `raw` is a valid stream of this device's primary context (or null);
    /// 2. it stays alive while the returned `Stream` (or work queued on it) is in use.
    pub unsafe fn borrow_stream(&self, raw: *mut std::ffi::c_void) -> Stream {
        Stream { inner: self.ctx.wrap_borrowed_stream(raw as sys::CUstream) }
    }

    /// A kernel of an embedded module, loading the module on first use.
    pub(crate) fn function(&self, module: ModuleId, name: &'static str) -> Result<CudaFunction> {
        let key = (module, name);
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(name)
            .map_err(|e| Error::Internal(format!("kernel `{name}` not found in module `{}`: {e}", module.name())))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, id: ModuleId) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(&id) {
            return Ok(m.clone());
        }
        let image = cudarc::nvrtc::Ptx::from_binary(id.image().to_vec());
        let m = self.ctx.load_module(image).map_err(|e| {
            Error::CudaUnavailable(format!(
                "loading kernel module `{}` on {} (sm_{}{}): {e}",
                id.name(),
                self.name,
                self.compute_capability.0,
                self.compute_capability.1
            ))
        })?;
        mods.insert(id, m.clone());
        Ok(m)
    }

    /// Wait for all work on the device to finish.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(driver_err("synchronizing the device"))
    }
}

/// A CUDA stream kvsieve queues work on: its own, or one borrowed from the engine.
#[derive(Clone)]
pub struct Stream {
    inner: Arc<CudaStream>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:p})", self.inner.cu_stream())
    }
}

impl Stream {
    /// The raw `CUstream`.
    pub fn raw(&self) -> sys::CUstream {
        self.inner.cu_stream()
    }
    /// Wait for the work queued on this stream.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize().map_err(driver_err("synchronizing a stream"))
    }
    pub(crate) fn bind(&self) -> Result<()> {
        self.inner.context().bind_to_thread().map_err(driver_err("binding the CUDA context"))
    }
}
