//! Attention directly on a [`KvCache`]: builds the page table and layer view, then runs
//! the same kernels as [`crate::attention::decode`] / [`crate::attention::prefill`].

use crate::attention::{decode, decode_sparse, prefill, prefill_sparse, AttentionParams, HeadTokens, StreamingWindow};
use crate::error::Result;
use crate::kv::{KvCache, SeqId};
use crate::tensor::{TensorView, TensorViewMut};

impl KvCache {
    /// Run `f` on the view of `layer` over the batch `ids`.
    pub(crate) fn with_layer_view<R>(
        &self,
        layer: usize,
        ids: &[SeqId],
        f: impl FnOnce(&crate::kv::PagedKv) -> Result<R>,
    ) -> Result<R> {
        let table = self.page_table(ids)?;
        f(&self.layer_view(layer, &table)?)
    }

    /// Decode attention of one query token per sequence in `ids` at `layer`.
    /// Shapes as in [`crate::attention::decode`].
    pub fn decode(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<()> {
        self.with_layer_view(layer, ids, |kv| decode(kv, q, out, lse, params))
    }

    /// Prefill attention of the last `qo_indptr[b+1] - qo_indptr[b]` tokens of each sequence
    /// in `ids` at `layer`. Shapes as in [`crate::attention::prefill`].
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        qo_indptr: &[i32],
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
        causal: bool,
    ) -> Result<()> {
        self.with_layer_view(layer, ids, |kv| prefill(kv, q, qo_indptr, out, lse, params, causal))
    }
}

impl KvCache {
    /// Sparse decode on the cache: KV head `h` of `ids[b]` reads `selections[b].head(h)`
    /// (`selections` holds selections or references to them). Shapes as in
    /// [`crate::attention::decode_sparse`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_sparse<S: HeadTokens>(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        selections: &[S],
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<()> {
        self.with_layer_view(layer, ids, |kv| decode_sparse(kv, q, selections, out, lse, params))
    }

    /// Sparse causal prefill on the cache, as [`crate::attention::prefill_sparse`].
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_sparse<S: HeadTokens>(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        qo_indptr: &[i32],
        selections: &[S],
        windows: &[Option<StreamingWindow>],
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<()> {
        self.with_layer_view(layer, ids, |kv| prefill_sparse(kv, q, qo_indptr, selections, windows, out, lse, params))
    }
}
