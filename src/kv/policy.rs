//! Cache operations driven by a selection [`Policy`]: decode and prefill that read only what
//! the policy selects, and eviction of the pages no head will read again.

use crate::attention::{decode, decode_sparse, prefill_sparse, AttentionParams, StreamingWindow};
use crate::error::{Error, Result};
use crate::kv::{KvCache, SeqId};
use crate::select::{Policy, Selection};
use crate::tensor::{TensorView, TensorViewMut};

impl KvCache {
    /// Decode under a policy: per sequence, `policy.select` chooses each KV head's tokens for
    /// that sequence's query, then sparse decode reads exactly those, with the layer's position
    /// mode. A layer whose heads are all dense runs dense decode. Returns the selections
    /// (empty for a dense layer), so an engine can inspect or log them.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_with_policy(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        policy: &Policy,
        params: &AttentionParams,
    ) -> Result<Vec<Selection>> {
        let c = self.config();
        policy.validate(c.num_layers, c.num_kv_heads)?;
        let params = AttentionParams { positions: policy.position_mode(layer), ..*params };
        if policy.is_dense(layer) {
            self.with_layer_view(layer, ids, |kv| decode(kv, q, out, lse, &params))?;
            return Ok(Vec::new());
        }
        if q.shape().first() != Some(&ids.len()) {
            return Err(Error::shape("q", format!("[{}, num_qo_heads, head_dim] (one query per sequence)", ids.len()), format!("{:?}", q.shape())));
        }
        let sels = ids.iter().enumerate().map(|(b, &id)| policy.select(self, id, layer, &q.narrow0(b)?)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Selection> = sels.iter().collect();
        self.with_layer_view(layer, ids, |kv| decode_sparse(kv, q, &refs, out, lse, &params))?;
        Ok(sels)
    }

    /// Prefill under a policy (causal). Per KV head of `layer`: a spec made of sinks and a
    /// window alone becomes a row mask (each query sees the sinks and its own last `window`
    /// tokens: the Λ-mask); any other spec (dense, or with page bounds, which choose tokens
    /// per decode query) attends every earlier token.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_with_policy(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        qo_indptr: &[i32],
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        policy: &Policy,
        params: &AttentionParams,
    ) -> Result<()> {
        let c = self.config();
        policy.validate(c.num_layers, c.num_kv_heads)?;
        if layer >= c.num_layers {
            return Err(Error::out_of_range("layer", layer as i64, format!("0..{}", c.num_layers)));
        }
        let params = AttentionParams { positions: policy.position_mode(layer), ..*params };
        let windows: Vec<Option<StreamingWindow>> = (0..c.num_kv_heads)
            .map(|h| {
                let s = policy.spec(layer, h);
                match (s.dense, s.pages, s.window) {
                    (false, None, Some(window)) => Some(StreamingWindow { sinks: s.sinks.unwrap_or(0), window }),
                    _ => None,
                }
            })
            .collect();
        let sels = ids.iter().map(|&id| Selection::dense(c.num_kv_heads, self.seq_len(id)?)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Selection> = sels.iter().collect();
        self.with_layer_view(layer, ids, |kv| prefill_sparse(kv, q, qo_indptr, &refs, &windows, out, lse, &params))
    }

    /// Evict the pages of a sequence that the policy will never read again (only a policy made
    /// of sinks and windows alone has such pages; see [`Policy::window_pages_to_evict`]).
    /// Returns the number of pages evicted. Memory then stays bounded however long the stream.
    pub fn evict_for_policy(&mut self, id: SeqId, policy: &Policy) -> Result<usize> {
        let c = *self.config();
        let pages = policy.window_pages_to_evict(c.num_layers, c.num_kv_heads, self.seq_len(id)?, c.page_size)?;
        self.evict_pages(id, &pages)?;
        Ok(pages.len())
    }
}
