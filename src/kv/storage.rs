//! Page memory: one 8-byte-aligned, zero-initialised buffer per layer for K and for V.

/// A zero-initialised byte buffer aligned to 8 bytes.
pub(crate) struct Buffer(Vec<u64>);

impl Buffer {
    pub fn zeroed(bytes: usize) -> Self {
        Buffer(vec![0u64; bytes.div_ceil(8)])
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
