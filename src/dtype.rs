//! Storage element types. Accumulation is always f32.

use half::{bf16, f16};

/// Element type of stored keys and values, queries and outputs.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parse "f32", "float32", "f16", "float16", "half", "bf16", "bfloat16".
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type kvsieve can read and write.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Read element `i` of a byte buffer holding `dtype` values (native endian) as f32.
#[inline(always)]
pub(crate) fn load_f32(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => {
            let b = &bytes[i * 4..i * 4 + 4];
            f32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        }
        DType::F16 => f16::from_bits(u16::from_ne_bytes([bytes[i * 2], bytes[i * 2 + 1]])).to_f32(),
        DType::BF16 => bf16::from_bits(u16::from_ne_bytes([bytes[i * 2], bytes[i * 2 + 1]])).to_f32(),
    }
}

/// Write `x` as element `i` of a byte buffer holding `dtype` values (round to nearest even).
#[inline(always)]
pub(crate) fn store_f32(bytes: &mut [u8], dtype: DType, i: usize, x: f32) {
    match dtype {
        DType::F32 => bytes[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes()),
        DType::F16 => bytes[i * 2..i * 2 + 2].copy_from_slice(&f16::from_f32(x).to_bits().to_ne_bytes()),
        DType::BF16 => bytes[i * 2..i * 2 + 2].copy_from_slice(&bf16::from_f32(x).to_bits().to_ne_bytes()),
    }
}
