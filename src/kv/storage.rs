//! Page memory: one zero-initialised buffer per layer for K and for V, starting on a cache
//! line.

use crate::error::Result;

/// Bytes of a cache line: buffers start on one, so that rows whose size is a multiple of it
/// (a 128-channel f16 head is 256 bytes) never straddle lines and their vector loads never
/// split across two.
const LINE: usize = 64;

/// A zero-initialised byte buffer starting on a 64-byte boundary. The memory comes from a
/// zeroed `Vec<u64>` (calloc: the system hands out zero pages lazily, so capacity is not
/// committed up front) with up to 56 bytes skipped at the start.
pub(crate) struct Buffer {
    words: Vec<u64>,
    /// Bytes skipped at the start of `words` to reach the line boundary.
    skip: usize,
    len: usize,
}

impl Buffer {
    /// `bytes` zeroed bytes; out of memory is an error naming `what`.
    pub fn zeroed(bytes: usize, what: &str) -> Result<Self> {
        let words = crate::alloc::zeroed_vec::<u64>(bytes.saturating_add(LINE).div_ceil(8), what)?;
        let skip = (LINE - words.as_ptr() as usize % LINE) % LINE;
        let buf = Buffer { words, skip, len: bytes };
        advise_huge_pages(buf.as_ptr(), bytes);
        Ok(buf)
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[self.skip..self.skip + self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[self.skip..self.skip + self.len]
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes().as_ptr()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_on_a_line_are_zeroed_and_sized() {
        for bytes in [0usize, 1, 7, 8, 63, 64, 65, 4096, 3 << 20, (9 << 20) + 24] {
            let mut b = Buffer::zeroed(bytes, "test").unwrap();
            assert_eq!(b.as_ptr() as usize % LINE, 0, "{bytes} bytes");
            assert_eq!(b.bytes().len(), bytes);
            assert!(b.bytes().iter().all(|&x| x == 0), "{bytes} bytes");
            if bytes > 0 {
                b.bytes_mut()[bytes - 1] = 7;
                assert_eq!(b.bytes()[bytes - 1], 7);
                assert_eq!(b.bytes().as_ptr(), b.as_ptr());
            }
        }
    }
}
