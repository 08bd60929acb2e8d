//! Stand-in for `kvsieve::backend::cuda` in a wheel built without the `cuda` feature: the
//! part of the backend's API the bindings call, at the same paths with the same
//! signatures. [`CudaDevice::get`] and the other constructors fail with the core's
//! `CudaUnavailable` error, so the device types have no values and their methods (one
//! line each) never run; the bindings' host-side checks before them run as with CUDA.

#![allow(clippy::too_many_arguments, clippy::missing_safety_doc)]

use std::convert::Infallible;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use kvsieve::{CacheConfig, DType, Device, Error, KeepTokens, KeyRope, PagedKvLayout, Result, TensorView};

/// The core's error for a CUDA call in a build without the feature.
fn unavailable<T>() -> Result<T> {
    Err(Device::Cuda(0)
        .check()
        .err()
        .unwrap_or_else(|| Error::CudaUnavailable("kvsieve was built without the `cuda` cargo feature".into())))
}

/// As the backend's: a strided tensor in device memory that kvsieve does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTensor {
    pub ptr: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub device: usize,
}

impl DeviceTensor {
    pub fn contiguous(ptr: u64, dtype: DType, shape: &[usize], device: usize) -> Self {
        DeviceTensor { ptr, dtype, shape: shape.to_vec(), strides: kvsieve::tensor::contiguous_strides(shape), device }
    }
}

/// As the backend's: where a layer's key bounds live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBoundsLayout {
    pub ptr: u64,
}

pub struct CudaDevice(Infallible);
pub struct Stream(Infallible);
pub struct CudaPageTable(Infallible);
pub struct CudaPagedKv<'a>(Infallible, PhantomData<&'a ()>);
pub struct CudaSelections(Infallible);
pub struct CudaKvCache(Infallible);

#[rustfmt::skip]
impl CudaDevice {
    pub fn get(_ordinal: usize) -> Result<Arc<CudaDevice>> { unavailable() }
    pub fn ordinal(&self) -> usize { match self.0 {} }
    pub unsafe fn borrow_stream(&self, _raw: *mut c_void) -> Stream { match self.0 {} }
}

#[rustfmt::skip]
impl CudaPageTable {
    pub unsafe fn from_device(_indptr: u64, _indices: u64, _last_page_len: u64, _batch: usize, _max_seq_len: usize, _device: usize) -> Result<Self> { unavailable() }
}

#[rustfmt::skip]
impl<'a> CudaPagedKv<'a> {
    pub unsafe fn from_raw(_k: u64, _v: u64, _layout: PagedKvLayout, table: &'a CudaPageTable) -> Result<Self> { match table.0 {} }
    pub unsafe fn with_positions(self, _positions: u64) -> Result<Self> { match self.0 {} }
    pub unsafe fn with_key_bounds(self, _bounds: KeyBoundsLayout) -> Result<Self> { match self.0 {} }
    pub fn with_key_rope(self, _key_rope: KeyRope) -> Self { match self.0 {} }
    pub fn num_kv_heads(&self) -> usize { match self.0 {} }
    pub fn device(&self) -> usize { match self.0 {} }
}

#[rustfmt::skip]
impl CudaSelections {
    pub unsafe fn from_device(_indptr: u64, _indices: u64, _batch: usize, _num_kv_heads: usize, _max_per_head: usize, _device: usize) -> Result<Self> { unavailable() }
}

#[rustfmt::skip]
impl CudaKvCache {
    pub fn new(dev: &Arc<CudaDevice>, _cfg: CacheConfig) -> Result<Self> { match dev.0 {} }
    pub fn config(&self) -> &CacheConfig { match self.0 {} }
    pub fn device(&self) -> &Arc<CudaDevice> { match self.0 {} }
    pub fn create_sequence(&mut self) -> u64 { match self.0 {} }
    pub fn fork(&mut self, _src: u64) -> Result<u64> { match self.0 {} }
    pub fn free_sequence(&mut self, _id: u64) -> Result<()> { match self.0 {} }
    pub fn seq_len(&self, _id: u64) -> Result<usize> { match self.0 {} }
    pub fn append(&mut self, _id: u64, _n: usize, _positions: Option<&[i32]>) -> Result<Vec<i64>> { match self.0 {} }
    pub fn write(&mut self, _id: u64, _layer: usize, _start: usize, _k: &TensorView, _v: &TensorView) -> Result<()> { match self.0 {} }
    pub unsafe fn write_device(&mut self, _id: u64, _layer: usize, _start: usize, _k: &DeviceTensor, _v: &DeviceTensor) -> Result<()> { match self.0 {} }
    pub fn truncate(&mut self, _id: u64, _new_len: usize) -> Result<()> { match self.0 {} }
    pub fn evict_pages(&mut self, _id: u64, _page_indices: &[usize]) -> Result<()> { match self.0 {} }
    pub fn compact(&mut self, _id: u64, _keep: KeepTokens) -> Result<()> { match self.0 {} }
    pub fn page_table(&self, _ids: &[u64]) -> Result<CudaPageTable> { match self.0 {} }
    pub fn layer_view<'a>(&'a self, _layer: usize, _table: &'a CudaPageTable) -> Result<CudaPagedKv<'a>> { match self.0 {} }
}

#[rustfmt::skip]
pub mod attention {
    use std::sync::Arc;

    use kvsieve::attention::AttentionParams;
    use kvsieve::Result;

    use super::{CudaDevice, CudaPagedKv, CudaSelections, DeviceTensor, Stream};

    pub struct Workspace(());

    impl Workspace {
        pub fn new(_dev: &Arc<CudaDevice>) -> Self { Workspace(()) }
    }

    pub unsafe fn decode(kv: &CudaPagedKv, _q: &DeviceTensor, _out: &DeviceTensor, _lse: Option<&DeviceTensor>, _params: &AttentionParams, _ws: &Workspace, _stream: &Stream) -> Result<()> { match kv.0 {} }
    pub unsafe fn decode_sparse(kv: &CudaPagedKv, _q: &DeviceTensor, _selections: &CudaSelections, _out: &DeviceTensor, _lse: Option<&DeviceTensor>, _params: &AttentionParams, _ws: &Workspace, _stream: &Stream) -> Result<()> { match kv.0 {} }
    pub unsafe fn merge_states(dev: &CudaDevice, _v_a: &DeviceTensor, _lse_a: &DeviceTensor, _v_b: &DeviceTensor, _lse_b: &DeviceTensor, _out: &DeviceTensor, _lse_out: &DeviceTensor, _stream: &Stream) -> Result<()> { match dev.0 {} }
    pub unsafe fn append(dev: &CudaDevice, _kv: &CudaPagedKv, _k: &DeviceTensor, _v: &DeviceTensor, _slot_mapping: u64, _stream: &Stream) -> Result<()> { match dev.0 {} }
    pub unsafe fn update_key_bounds(dev: &CudaDevice, _kv: &CudaPagedKv, _bounds: u64, _entries: u64, _num_entries: usize, _stream: &Stream) -> Result<()> { match dev.0 {} }
}

#[rustfmt::skip]
pub mod prefill {
    use std::convert::Infallible;
    use std::sync::Arc;

    use kvsieve::attention::{AttentionParams, StreamingWindow};
    use kvsieve::Result;

    use super::{CudaDevice, CudaPageTable, CudaPagedKv, CudaSelections, DeviceTensor, Stream};

    pub struct PrefillQueries(Infallible);
    pub struct PrefillMasks(Infallible);

    impl PrefillQueries {
        pub fn upload(dev: &Arc<CudaDevice>, _qo_indptr: &[i32], _table: &CudaPageTable, _stream: &Stream) -> Result<Self> { match dev.0 {} }
        pub fn total(&self) -> usize { match self.0 {} }
    }

    impl PrefillMasks {
        pub fn upload(dev: &Arc<CudaDevice>, _windows: &[Option<StreamingWindow>], _stream: &Stream) -> Result<Self> { match dev.0 {} }
    }

    pub fn prefill(stream: &Stream, _kv: &CudaPagedKv, _q: &DeviceTensor, _queries: &PrefillQueries, _masks: Option<&PrefillMasks>, _selections: Option<&CudaSelections>, _out: &DeviceTensor, _lse: Option<&DeviceTensor>, _params: &AttentionParams, _causal: bool) -> Result<()> { match stream.0 {} }
}

#[rustfmt::skip]
pub mod select {
    pub mod cluster {
        use std::convert::Infallible;
        use std::sync::Arc;

        use kvsieve::select::cluster::{ClusterConfig, ClusterIndex, CoarseRetrieve, Retrieve};
        use kvsieve::Result;

        use super::super::{CudaDevice, CudaSelections, DeviceTensor, Stream};
        use super::kmeans::Assignment;

        pub struct CudaClusterIndex(Infallible);
        pub struct ClusterWorkspace(Infallible);

        impl CudaClusterIndex {
            pub fn upload(dev: &Arc<CudaDevice>, _index: &ClusterIndex, _stream: &Stream) -> Result<Self> { match dev.0 {} }
            pub fn num_kv_heads(&self) -> usize { match self.0 {} }
            pub fn head_dim(&self) -> usize { match self.0 {} }
            pub fn num_clusters(&self) -> usize { match self.0 {} }
            pub fn num_coarse_clusters(&self) -> usize { match self.0 {} }
            pub fn clustered_len(&self) -> usize { match self.0 {} }
            pub fn retrieve(&self, _stream: &Stream, _q: &DeviceTensor, _how: &Retrieve, _ws: &mut ClusterWorkspace, _out: &CudaSelections) -> Result<()> { match self.0 {} }
            pub fn retrieve_hierarchical(&self, _stream: &Stream, _q: &DeviceTensor, _coarse: CoarseRetrieve, _fine: &Retrieve, _ws: &mut ClusterWorkspace, _out: &CudaSelections) -> Result<()> { match self.0 {} }
        }

        impl ClusterWorkspace {
            pub fn new(index: &CudaClusterIndex, _num_qo_heads: usize) -> Result<Self> { match index.0 {} }
        }

        pub fn build_index(dev: &Arc<CudaDevice>, _keys: &DeviceTensor, _cfg: &ClusterConfig, _assignment: Assignment, _stream: &Stream) -> Result<(ClusterIndex, CudaClusterIndex)> { match dev.0 {} }
    }

    pub mod gemfilter {
        use std::convert::Infallible;
        use std::sync::Arc;

        use kvsieve::select::gemfilter::GemFilterConfig;
        use kvsieve::Result;

        use super::super::{CudaDevice, DeviceTensor, Stream};

        pub struct GemFilterWorkspace(Infallible);

        impl GemFilterWorkspace {
            pub fn new(dev: &Arc<CudaDevice>, _n: usize, _num_qo_heads: usize, _head_dim: usize, _max_k: usize, _stream: &Stream) -> Result<Self> { match dev.0 {} }
            pub unsafe fn copy_selected_to(&self, _dst: u64, _stream: &Stream) -> Result<()> { match self.0 {} }
        }

        pub fn gemfilter_select(stream: &Stream, _q: &DeviceTensor, _keys: &DeviceTensor, _cfg: &GemFilterConfig, _ws: &mut GemFilterWorkspace) -> Result<()> { match stream.0 {} }
    }

    pub mod kmeans {
        /// As the backend's: how K-means assigns keys to centroids (one way here).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Assignment;

        impl Assignment {
            pub fn default_for(_dtype: kvsieve::DType, _head_dim: usize) -> Self { Assignment }
        }
    }

    pub mod pages {
        use std::convert::Infallible;
        use std::sync::Arc;

        use kvsieve::select::PageBoundsConfig;
        use kvsieve::Result;

        use super::super::{CudaDevice, CudaPagedKv, CudaSelections, DeviceTensor, Stream};

        pub struct PageBoundsWorkspace(Infallible);

        impl PageBoundsWorkspace {
            pub fn for_view(dev: &Arc<CudaDevice>, _kv: &CudaPagedKv, _num_qo_heads: usize) -> Result<Self> { match dev.0 {} }
        }

        pub fn page_bounds(stream: &Stream, _kv: &CudaPagedKv, _q: &DeviceTensor, _cfg: &PageBoundsConfig, _ws: &mut PageBoundsWorkspace, _out: &CudaSelections) -> Result<()> { match stream.0 {} }
    }
}
