//! Page memory: one 8-byte-aligned, zero-initialised buffer per layer for K and for V.

/// A zero-initialised byte buffer aligned to 8 bytes.
pub(crate) struct Buffer(Vec<u64>);

impl Buffer {
    pub fn zeroed(bytes: usize) -> Self {
        let v = vec![0u64; bytes.div_ceil(8)];
        advise_huge_pages(v.as_ptr() as *const u8, v.len() * 8);
        Buffer(v)
    }
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr() as *const u8
    }
}

/// Ask the kernel to back a large buffer with transparent huge pages, where the system
/// leaves that to each program: attention sweeps hundreds of megabytes of pages, and 4 KiB
/// pages would cost a TLB miss every few rows. Only a hint; nothing changes if refused.
fn advise_huge_pages(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if len < 4 * HUGE {
            return;
        }
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the live allocation; MADV_HUGEPAGE changes no
            // contents and only affects how the kernel backs the memory.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}
