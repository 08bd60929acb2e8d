//! Kernel launches: one `#[repr(C)]` parameter struct per kernel, passed by value.

use cudarc::driver::result as cu;

use crate::backend::cuda::device::{driver_err, CudaDevice, Stream};
use crate::backend::cuda::ModuleId;
use crate::error::Result;

/// Grid, block and dynamic shared memory of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchDims {
    pub fn new(grid: (u32, u32, u32), block: u32) -> Self {
        LaunchDims { grid, block: (block, 1, 1), shared_bytes: 0 }
    }
}

/// Launch kernel `name` of `module` on `stream` with one by-value argument `params`.
/// A grid with a zero dimension launches nothing. Asynchronous: errors in the kernel itself
/// surface at the next synchronisation.
///
/// # Safety
/// 1. the kernel's single parameter has exactly the layout of `P` (`#[repr(C)]` on both sides);
/// 2. every device address in `params` is valid for what the kernel reads and writes with
///    these dimensions, until the kernel completes;
/// 3. `stream` belongs to `dev`.
pub unsafe fn launch<P: Copy>(
    dev: &CudaDevice,
    stream: &Stream,
    module: ModuleId,
    name: &'static str,
    dims: LaunchDims,
    params: &P,
) -> Result<()> {
    if dims.grid.0 == 0 || dims.grid.1 == 0 || dims.grid.2 == 0 {
        return Ok(());
    }
    let f = dev.function(module, name)?;
    dev.bind()?;
    let mut p = *params;
    let mut args = [&mut p as *mut P as *mut std::ffi::c_void];
    cu::launch_kernel(f.cu_function(), dims.grid, dims.block, dims.shared_bytes, stream.raw(), &mut args)
        .map_err(driver_err(name))
}
