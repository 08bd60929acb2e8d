//! Cache configuration.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Order of the elements inside one page of one layer.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// `[page_size, num_kv_heads, head_dim]` (tokens outermost; vLLM, FlashInfer default).
    Nhd = 0,
    /// `[num_kv_heads, page_size, head_dim]` (heads outermost).
    Hnd = 1,
}

/// Whether stored keys already carry rotary position embedding.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRope {
    /// The engine applied RoPE before writing keys (the usual case).
    PostRope = 0,
    /// Keys are stored without RoPE; attention applies it when reading, from each slot's
    /// stored position (remapped by the position mode, where one is given).
    PreRope = 1,
}

/// Largest head_dim kvsieve accepts.
pub const MAX_HEAD_DIM: usize = 512;
/// Largest page size kvsieve accepts.
pub const MAX_PAGE_SIZE: usize = 1024;
/// Most layers a cache or a policy accepts (models have a few hundred at most).
pub const MAX_LAYERS: usize = 65_536;
/// Most KV heads a cache or a policy accepts.
pub const MAX_KV_HEADS: usize = 65_536;

/// Shape and storage of a [`crate::KvCache`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheConfig {
    /// 1 to [`MAX_LAYERS`].
    pub num_layers: usize,
    /// 1 to [`MAX_KV_HEADS`].
    pub num_kv_heads: usize,
    /// Elements per head; a multiple of 8 from 8 to [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    /// Token slots per page, 1 to [`MAX_PAGE_SIZE`].
    pub page_size: usize,
    pub dtype: DType,
    pub layout: PageLayout,
    /// Pages in the pool (shared by all sequences; each page spans every layer).
    pub capacity_pages: usize,
    pub key_rope: KeyRope,
    /// Keep per-page key min/max (needed by page-bound selection). On by default.
    pub track_key_bounds: bool,
}

impl CacheConfig {
    /// A configuration with f16 storage, NHD layout, post-RoPE keys and key bounds on.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        capacity_pages: usize,
    ) -> Self {
        CacheConfig {
            num_layers,
            num_kv_heads,
            head_dim,
            page_size,
            dtype: DType::F16,
            layout: PageLayout::Nhd,
            capacity_pages,
            key_rope: KeyRope::PostRope,
            track_key_bounds: true,
        }
    }

    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    pub fn with_layout(mut self, layout: PageLayout) -> Self {
        self.layout = layout;
        self
    }
    pub fn with_key_rope(mut self, key_rope: KeyRope) -> Self {
        self.key_rope = key_rope;
        self
    }
    pub fn with_key_bounds(mut self, on: bool) -> Self {
        self.track_key_bounds = on;
        self
    }

    /// Check every field; the error names the first field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return Err(Error::invalid("num_layers", format!("1 to {MAX_LAYERS}, got {}", self.num_layers)));
        }
        if self.num_kv_heads == 0 || self.num_kv_heads > MAX_KV_HEADS {
            return Err(Error::invalid("num_kv_heads", format!("1 to {MAX_KV_HEADS}, got {}", self.num_kv_heads)));
        }
        validate_head_dim(self.head_dim)?;
        validate_page_size(self.page_size)?;
        if self.capacity_pages == 0 || self.capacity_pages > i32::MAX as usize {
            return Err(Error::invalid("capacity_pages", format!("1 to {}, got {}", i32::MAX, self.capacity_pages)));
        }
        // Every factor is bounded above, so this product cannot overflow u128; the sizes the
        // cache computes in usize from them are then below isize::MAX.
        let page_elems = self.page_size as u128 * self.num_kv_heads as u128 * self.head_dim as u128;
        let bytes = page_elems * self.capacity_pages as u128 * self.num_layers as u128 * 2 * self.dtype.size() as u128;
        if bytes > isize::MAX as u128 / 2 {
            return Err(Error::invalid(
                "capacity_pages",
                format!("a pool that fits in the address space ({bytes} bytes of K/V asked for)"),
            ));
        }
        Ok(())
    }

    /// Elements of K (or V) in one page of one layer.
    pub fn page_elems(&self) -> usize {
        self.page_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes of one page across all layers, K and V (bounds excluded).
    pub fn page_bytes(&self) -> usize {
        2 * self.num_layers * self.page_elems() * self.dtype.size()
    }

    /// Bytes of key bounds for one page across all layers (0 when bounds are off).
    pub fn bounds_bytes_per_page(&self) -> usize {
        if self.track_key_bounds {
            self.num_layers * self.num_kv_heads * 2 * self.head_dim * self.dtype.size()
        } else {
            0
        }
    }

    /// Element strides `[page, token, head]` of the in-page layout (the channel stride is 1).
    pub fn strides(&self) -> [usize; 3] {
        let (h, d, p) = (self.num_kv_heads, self.head_dim, self.page_size);
        match self.layout {
            PageLayout::Nhd => [p * h * d, h * d, d],
            PageLayout::Hnd => [p * h * d, d, p * d],
        }
    }
}

/// `Unsupported` unless `head_dim` is a multiple of 8 from 8 to [`MAX_HEAD_DIM`].
#[doc(hidden)]
pub fn validate_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(8) || head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {head_dim}: expected a multiple of 8 from 8 to {MAX_HEAD_DIM}"
        )));
    }
    Ok(())
}

/// `InvalidArgument` (naming `page_size`) unless it is 1 to [`MAX_PAGE_SIZE`].
#[doc(hidden)]
pub fn validate_page_size(page_size: usize) -> Result<()> {
    if page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(Error::invalid("page_size", format!("1 to {MAX_PAGE_SIZE}, got {page_size}")));
    }
    Ok(())
}

/// How key and query positions are numbered when RoPE is applied at read time (keys stored
/// before RoPE). With post-RoPE keys only `Original` is meaningful.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PositionMode {
    /// Each token at the position stored in its slot; the query at its own stored position.
    #[default]
    Original,
    /// StreamingLLM: the tokens a KV head reads are renumbered 0, 1, ... in cache order,
    /// so the query (the last token read) sits right after its predecessors, whatever was
    /// evicted or skipped in between.
    Contiguous,
    /// LM-Infinite: the relative distance between query and key is capped:
    /// `min(q_pos - k_pos, max_distance)`, so no distance exceeds what training saw.
    Capped { max_distance: u32 },
}
