//! Cache operations driven by a selection [`Policy`]: decode and prefill that read only what
//! the policy selects, and eviction of the pages no head will read again.

use crate::attention::{apply_rope, decode, decode_sparse, prefill_sparse, AttentionParams, StreamingWindow};
use crate::config::KeyRope;
use crate::config::PositionMode;
use crate::error::{Error, Result};
use crate::kv::{KvCache, SeqId};
use crate::runtime::{ClusterIndexSet, IndexedKeys, PolicySelection};
use crate::select::{first_and_last, read_query, Policy, Selection};
use crate::tensor::{TensorView, TensorViewMut};

impl KvCache {
    /// Decode under a policy: per sequence, `policy.select` chooses each KV head's tokens for
    /// that sequence's query, then sparse decode reads exactly those, with the layer's position
    /// mode. A layer whose heads are all dense runs dense decode. Returns the selections
    /// (empty for a dense layer), so an engine can inspect or log them. A policy with
    /// `clusters=` needs [`KvCache::decode_with_clusters`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_with_policy(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        policy: &Policy,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<Vec<Selection>> {
        let sels = self.decode_policy_inner(layer, ids, q, policy, None, out, lse, params)?;
        Ok(sels.into_iter().map(|s| s.selection).collect())
    }

    /// [`KvCache::decode_with_policy`] for a policy with centroid retrieval: heads with
    /// `clusters=` also read the tokens their (sequence, layer) index in `indexes` retrieves
    /// (see [`Policy::select_with_clusters`] and [`ClusterIndexSet`] for building and the
    /// staleness rule). `q` is as for decode: after RoPE when the cache stores post-RoPE
    /// keys; before RoPE when it stores pre-RoPE keys. Then `params.rope` is required and
    /// a copy of `q` is rotated for scoring: to position `max_distance` against an index
    /// of this cache's raw keys under capped positions (the logit of a token at the capped
    /// distance), not at all under contiguous positions (the raw query, position-free), or
    /// to its original position against an index built from a twin cache of post-RoPE
    /// keys. `topk=` always scores the query as passed. Returns, per sequence, the selection and the centroid rows scored
    /// (empty for a dense layer).
    ///
    /// Errors: as `decode_with_policy`, plus a missing, stale or mismatched index (an index
    /// of raw keys under original positions, or with a post-RoPE cache; `span=` with an
    /// index built from a twin cache); a
    /// pre-RoPE cache without `params.rope`. On error nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_with_clusters(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        policy: &Policy,
        indexes: &ClusterIndexSet,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<Vec<PolicySelection>> {
        self.decode_policy_inner(layer, ids, q, policy, Some(indexes), out, lse, params)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_policy_inner(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        policy: &Policy,
        indexes: Option<&ClusterIndexSet>,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<Vec<PolicySelection>> {
        let c = self.config();
        policy.validate(c.num_layers, c.num_kv_heads)?;
        let rope = params.rope;
        let params = AttentionParams { positions: policy.position_mode(layer), ..*params };
        if policy.is_dense(layer) {
            self.with_layer_view(layer, ids, |kv| decode(kv, q, out, lse, &params))?;
            return Ok(Vec::new());
        }
        if q.shape().first() != Some(&ids.len()) {
            return Err(Error::shape(
                "q",
                format!("[{}, num_qo_heads, head_dim] (one query per sequence)", ids.len()),
                format!("{:?}", q.shape()),
            ));
        }
        let clusters = policy.uses_clusters(layer, c.num_kv_heads);
        let sels = ids
            .iter()
            .enumerate()
            .map(|(b, &id)| {
                let qb = q.narrow0(b)?;
                let Some(set) = indexes.filter(|_| clusters) else {
                    return policy.select_inner(self, id, layer, &qb, indexes, None);
                };
                // The position the query is scored at (see ClusterIndexSet's docs), or none
                // when the query is already after RoPE.
                let at = match (c.key_rope, set.indexed_keys(id, layer), params.positions) {
                    (_, None, _) | (KeyRope::PostRope, Some(IndexedKeys::PostRope), _) => None,
                    (KeyRope::PostRope, Some(IndexedKeys::PreRope), _) => {
                        return Err(Error::invalid(
                            "clusters",
                            format!("an index of post-RoPE keys for sequence {id} at layer {layer} (this cache stores keys after RoPE; the index was built from keys before RoPE)"),
                        ))
                    }
                    (KeyRope::PreRope, Some(IndexedKeys::PreRope), PositionMode::Capped { max_distance }) => Some(max_distance.min(i32::MAX as u32) as i32),
                    // Contiguous positions: raw keys, scored position-free by the raw query.
                    (KeyRope::PreRope, Some(IndexedKeys::PreRope), PositionMode::Contiguous) => None,
                    (KeyRope::PreRope, Some(IndexedKeys::PreRope), _) => {
                        return Err(Error::invalid(
                            "clusters",
                            format!("an index of post-RoPE keys (built from a twin cache) for sequence {id} at layer {layer}: an index of raw pre-RoPE keys scores capped or contiguous positions only, and layer {layer} uses {:?}", params.positions),
                        ))
                    }
                    (KeyRope::PreRope, Some(IndexedKeys::PostRope), _) => {
                        if (0..c.num_kv_heads).any(|h| { let s = policy.spec(layer, h); s.clusters.is_some() && s.span.is_some() }) {
                            return Err(Error::invalid(
                                "clusters",
                                format!("an index of this cache's raw keys for sequence {id} at layer {layer}: `span=` ranks retrieved tokens by the logits of the keys the cache holds, which an index built from a twin cache of post-RoPE keys does not score"),
                            ));
                        }
                        Some(*self.positions(id)?.last().ok_or_else(|| Error::invalid("seq_ids", format!("sequence {id} holding the query's token (it is empty)")))?)
                    }
                };
                let Some(pos) = at else {
                    return policy.select_inner(self, id, layer, &qb, indexes, None);
                };
                let Some(rope) = rope.as_ref() else {
                    return Err(Error::invalid("params.rope", "a RoPE configuration: this cache stores keys before RoPE, and centroid retrieval scores the query after RoPE"));
                };
                let d = c.head_dim;
                let (mut rows, hq) = read_query(&qb, d)?;
                apply_rope(&mut TensorViewMut::new(&mut rows, &[1, hq, d])?, &[pos], rope)?;
                policy.select_inner(self, id, layer, &TensorView::new(&rows, &[hq, d])?, indexes, Some(&qb))
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Selection> = sels.iter().map(|s| &s.selection).collect();
        self.with_layer_view(layer, ids, |kv| decode_sparse(kv, q, &refs, out, lse, &params))?;
        Ok(sels)
    }

    /// Prefill under a policy (causal). Per KV head of `layer`, for the new tokens of each
    /// sequence (a chunk `[s, e)` of its last tokens):
    /// - with `positions=contiguous` (InfLLM's chunk rule): a sparse spec reads its sinks,
    ///   the `window - 1` tokens before the chunk and the chunk itself (each row causally,
    ///   so a row also sees the chunk's earlier rows), and with `topk=` the best tokens
    ///   outside those for the chunk's queries (per query head its mean over the chunk's
    ///   rows, the best of the GQA group as in decode; grown into spans with `span=`); all
    ///   numbered contiguously over that concatenation in cache order, each query at its
    ///   own rank. A one-token chunk reads exactly what decode reads; a chunk's attention
    ///   reads at most sinks + budget + window + chunk tokens, so chunked prefill does
    ///   attention work linear in the prompt (`topk=` adds a scan of the keys per chunk).
    ///   Results depend on the chunk size: keep chunks at most the window. `pages=` and
    ///   `clusters=` choose tokens per decode query (bounds scored, an index built) and add
    ///   nothing here;
    /// - otherwise, a spec made of sinks and a window alone becomes a row mask (each query
    ///   sees the sinks and its own last `window` tokens: the Λ-mask); any other spec
    ///   (dense, or with a retrieval item) attends every earlier token.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_with_policy(
        &self,
        layer: usize,
        ids: &[SeqId],
        q: &TensorView,
        qo_indptr: &[i32],
        policy: &Policy,
        out: &mut TensorViewMut,
        lse: Option<&mut [f32]>,
        params: &AttentionParams,
    ) -> Result<()> {
        let c = self.config();
        policy.validate(c.num_layers, c.num_kv_heads)?;
        if layer >= c.num_layers {
            return Err(Error::out_of_range("layer", layer as i64, format!("0..{}", c.num_layers)));
        }
        let params = AttentionParams { positions: policy.position_mode(layer), ..*params };
        let contiguous = params.positions == PositionMode::Contiguous;
        let windows: Vec<Option<StreamingWindow>> = (0..c.num_kv_heads)
            .map(|h| {
                let s = policy.spec(layer, h);
                match s.window {
                    Some(window) if s.is_window_only() && !contiguous => {
                        Some(StreamingWindow { sinks: s.sinks.unwrap_or(0), window })
                    }
                    _ => None,
                }
            })
            .collect();
        // A windowed head's new queries see only the sinks and the last `window + new - 1`
        // tokens: reading just those keeps a long windowed prefill linear in the context.
        let narrow = windows.iter().any(|w| w.is_some());
        self.with_layer_view(layer, ids, |kv| {
            let sels = ids
                .iter()
                .enumerate()
                .map(|(b, &id)| {
                    let len = self.seq_len(id)?;
                    let new = match (qo_indptr.get(b), qo_indptr.get(b + 1)) {
                        (Some(&s), Some(&e))
                            if (narrow || contiguous) && s >= 0 && e >= s && (e - s) as usize <= len =>
                        {
                            (e - s) as usize
                        }
                        _ => return Selection::dense(c.num_kv_heads, len),
                    };
                    let heads = (0..c.num_kv_heads)
                        .map(|h| {
                            let spec = policy.spec(layer, h);
                            if contiguous && !spec.dense {
                                let rows = (qo_indptr[b] as usize, qo_indptr[b + 1] as usize);
                                return contiguous_chunk_tokens(kv, b, h, q, rows, spec, len, new);
                            }
                            match windows[h] {
                                Some(w) => first_and_last(len, w.sinks, w.window.saturating_add(new).saturating_sub(1)),
                                None => crate::alloc::collect_n(len, 0..len as u32, "selection indices"),
                            }
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Selection::from_heads(len, heads)
                })
                .collect::<Result<Vec<_>>>()?;
            prefill_sparse(kv, q, qo_indptr, &sels, &windows, out, lse, &params)
        })
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

/// The tokens KV head `h` of batch entry `b` reads for a prefill chunk of its last `new`
/// tokens under contiguous positions (see [`KvCache::prefill_with_policy`]): the sinks,
/// the `window + new - 1` last tokens (the `window - 1` before the chunk and the chunk), and
/// `topk=` tokens scored, like decode's, by the best of the group's query heads, each
/// head's query being its mean over the chunk's rows (`q` rows `rows.0..rows.1`). For a
/// one-token chunk this is exactly what decode reads.
#[allow(clippy::too_many_arguments)]
fn contiguous_chunk_tokens(
    kv: &crate::kv::PagedKv,
    b: usize,
    h: usize,
    q: &TensorView,
    rows: (usize, usize),
    spec: &crate::select::Spec,
    len: usize,
    new: usize,
) -> Result<Vec<u32>> {
    let reach = spec.window.unwrap_or(0).saturating_add(new).saturating_sub(1);
    let base = first_and_last(len, spec.sinks.unwrap_or(0), reach)?;
    let Some(budget) = spec.topk else { return Ok(base) };
    let d = kv.head_dim();
    let hq = q.shape().get(1).copied().unwrap_or(0);
    let group = hq / kv.num_kv_heads();
    if new == 0 || q.shape().len() != 3 || q.shape()[2] != d || group == 0 || rows.1 > q.shape()[0] {
        // No query rows, or shapes prefill_sparse reports: nothing to rank.
        return Ok(base);
    }
    let mut mean = vec![0f32; group * d];
    let mut row = vec![0f32; d];
    for t in rows.0..rows.1 {
        for (g, m) in mean.chunks_exact_mut(d).enumerate() {
            q.read_row(&[t, h * group + g], &mut row);
            m.iter_mut().zip(&row).for_each(|(m, x)| *m += x);
        }
    }
    let n = (rows.1 - rows.0) as f32;
    mean.iter_mut().for_each(|m| *m /= n);
    let part = crate::select::topk_tokens(kv, b, h, &mean, budget, spec.span, &base)?;
    let mut out = crate::alloc::vec_with_capacity(base.len() + part.len(), "selection indices")?;
    crate::select::merge_union(&base, &part, &mut out);
    Ok(out)
}
