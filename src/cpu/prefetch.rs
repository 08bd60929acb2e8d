//! Software prefetch of the rows a kernel will read next.

/// Ask for the cache lines holding the `bytes` bytes at `p` ahead of their use (a hint:
/// never faults). `prefetcht2`: into the outer caches (L2 on current x86 cores), not L1;
/// the kernels reach the lines a few microseconds later. On a 2-core Xeon with AVX-512,
/// batch-8 decode at 32K tokens (1 GB of K/V per step) ran 6-8% faster than with
/// prefetches into L1 (48-50 against 52-53 ms; batch 1 and page selection unchanged).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        // From the start of p's line, so that a row straddling a line boundary is covered.
        let mut o = -((p as usize % 64) as isize);
        while o < bytes as isize {
            // SAFETY: prefetch is only a hint and never faults, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T2 }>(p.wrapping_offset(o) as *const i8)
            };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Rows to prefetch, `bytes` each, issued in order a few at a time by the kernels' loops.
pub(crate) struct Ahead<'a> {
    rows: &'a [*const u8],
    bytes: usize,
    done: usize,
}

impl<'a> Ahead<'a> {
    pub fn new(rows: &'a [*const u8], bytes: usize) -> Self {
        Ahead { rows, bytes, done: 0 }
    }

    /// Prefetch the rows below index `end` not yet asked for.
    #[inline(always)]
    pub fn upto(&mut self, end: usize) {
        let end = end.min(self.rows.len());
        while self.done < end {
            prefetch(self.rows[self.done], self.bytes);
            self.done += 1;
        }
    }
}
