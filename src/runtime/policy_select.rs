//! Running a [`Policy`] on a cache: the tokens each KV head of a layer reads for a decode
//! query, from the policy's sinks, window, page bounds and centroid retrieval.

use crate::error::{Error, Result};
use crate::kv::{KvCache, SeqId};
use crate::runtime::ClusterIndexSet;
use crate::select::cluster::{CoarseRetrieve, Retrieve};
use crate::select::{
    first_and_last, hits_to_tokens, merge_union, ranked_top, raw_scores, read_query, score_sequence, topk_tokens,
    ClusterRank, Policy, Selection, SeqPageScores, Spec, HIER_OPEN_MULTIPLE,
};
use crate::tensor::TensorView;

impl Policy {
    /// The tokens each KV head of `layer` reads for the decode query `q` of sequence `seq`
    /// (`[num_qo_heads, head_dim]` or `[1, num_qo_heads, head_dim]`): per head, every
    /// token if its spec is dense, else the union of its sinks, window, page-bound and
    /// `topk=` parts (grown into spans with `span=`). Page scores are computed once per call, for every head that needs them.
    /// A policy with `clusters=` needs its cluster indexes: use [`Policy::select_with_clusters`].
    ///
    /// Errors: the policy fails [`Policy::validate`] for the cache's shape (clauses, and
    /// the position modes of this layer); an unknown sequence or layer; a badly shaped
    /// `q`; page bounds on a cache without key bounds or with pre-RoPE keys; `clusters=`
    /// at this layer.
    pub fn select(&self, cache: &KvCache, seq: SeqId, layer: usize, q: &TensorView) -> Result<Selection> {
        Ok(self.select_inner(cache, seq, layer, q, None, None)?.selection)
    }

    /// [`Policy::select`] with centroid retrieval: a head with `clusters=N` also reads the
    /// best clusters of `indexes`' entry for (`seq`, `layer`) up to N tokens (flat, or
    /// through the coarse level with `hier=`), plus every token the index does not cover
    /// yet (past its [`ClusterIndex::clustered_len`](crate::select::cluster::ClusterIndex::clustered_len):
    /// the recent tokens, which a `window=` at least as large as the index's left-out
    /// window reads anyway). `q` is the query as the index's keys need it: after RoPE at
    /// its position for an index of post-RoPE keys, rotated to `max_distance` for an index
    /// of raw pre-RoPE keys under capped positions, unrotated under contiguous positions
    /// ([`crate::KvCache::decode_with_clusters`] does this). With `span=`, the retrieved
    /// tokens are ranked by `q` against this cache's keys.
    ///
    /// Errors, beyond `select`'s: no index for (`seq`, `layer`) in `indexes` (build one with
    /// [`ClusterIndexSet::build`]); an index longer than the sequence (truncated or
    /// compacted since: build again) or of another shape.
    pub fn select_with_clusters(
        &self,
        cache: &KvCache,
        seq: SeqId,
        layer: usize,
        q: &TensorView,
        indexes: &ClusterIndexSet,
    ) -> Result<PolicySelection> {
        self.select_inner(cache, seq, layer, q, Some(indexes), None)
    }

    pub(crate) fn select_inner(
        &self,
        cache: &KvCache,
        seq: SeqId,
        layer: usize,
        q: &TensorView,
        indexes: Option<&ClusterIndexSet>,
        raw_q: Option<&TensorView>,
    ) -> Result<PolicySelection> {
        let c = cache.config();
        self.validate_clauses(c.num_layers, c.num_kv_heads)?;
        if layer >= c.num_layers {
            return Err(Error::out_of_range("layer", layer as i64, format!("0..{}", c.num_layers)));
        }
        self.validate_layer_positions(layer, c.num_kv_heads)?;
        self.validate_layer_clusters(layer, c.num_kv_heads)?;
        let (_, hq) = read_query(q, c.head_dim)?;
        if hq == 0 || hq % c.num_kv_heads != 0 {
            return Err(Error::invalid(
                "q",
                format!(
                    "a number of query heads that is a positive multiple of num_kv_heads ({}), got {hq}",
                    c.num_kv_heads
                ),
            ));
        }
        let seq_len = cache.seq_len(seq)?;
        if seq_len > u32::MAX as usize {
            return Err(Error::out_of_range(
                "seq_len",
                seq_len as i64,
                format!("0..={} (token indices are u32)", u32::MAX),
            ));
        }
        let specs: Vec<&Spec> = (0..c.num_kv_heads).map(|h| self.spec(layer, h)).collect();
        // Page scores are only needed when some head's budget is below the sequence length.
        let smallest_budget = specs.iter().filter(|s| !s.dense).filter_map(|s| s.pages).min();
        let scores: Option<SeqPageScores> = match smallest_budget {
            Some(b) => Some(score_sequence(cache, seq, layer, q, b)?),
            None => None,
        };
        let retrieved = match specs.iter().position(|s| s.clusters.is_some()) {
            None => None,
            Some(h0) => Some(self.retrieve(cache, seq, layer, q, indexes, specs[h0], seq_len)?),
        };
        // Top-k and span ranking read the keys themselves, through one view of the layer.
        let needs_keys =
            specs.iter().any(|s| !s.dense && (s.topk.is_some() || (s.span.is_some() && s.clusters.is_some())));
        let table = if needs_keys { Some(cache.page_table(&[seq])?) } else { None };
        let view = match &table {
            Some(t) => Some(cache.layer_view(layer, t)?),
            None => None,
        };
        let rows = if needs_keys { read_query(q, c.head_dim)?.0 } else { Vec::new() };
        // `topk=` scores the query as the caller passed it, even when centroid retrieval
        // scores a rotated copy (`raw_q`).
        let raw_rows = match raw_q {
            Some(r) if needs_keys => read_query(r, c.head_dim)?.0,
            _ => Vec::new(),
        };
        let group = hq / c.num_kv_heads;
        let span_of = |h: usize| h * group * c.head_dim..(h + 1) * group * c.head_dim;
        let head_rows = |h: usize| &rows[span_of(h)];
        let topk_rows = |h: usize| if raw_rows.is_empty() { &rows[span_of(h)] } else { &raw_rows[span_of(h)] };
        let mut heads = Vec::with_capacity(specs.len());
        let mut total = 0usize;
        let mut centroids_scored = 0usize;
        let mut radii_read = 0usize;
        for (h, spec) in specs.iter().enumerate() {
            let tokens = if spec.dense {
                crate::alloc::collect_n(seq_len, 0..seq_len as u32, "selection indices")?
            } else {
                let base = first_and_last(seq_len, spec.sinks.unwrap_or(0), spec.window.unwrap_or(0))?;
                let mut tokens = crate::alloc::copy_of(&base, "selection indices")?;
                let mut add = |part: &[u32]| -> Result<()> {
                    let mut out = crate::alloc::vec_with_capacity(tokens.len() + part.len(), "selection indices")?;
                    merge_union(&tokens, part, &mut out);
                    tokens = out;
                    Ok(())
                };
                if let (Some(cfg), Some(s)) = (spec.page_bounds_config(), &scores) {
                    match spec.span {
                        Some(_) if s.seq_len > cfg.budget_tokens => {
                            add(&hits_to_tokens(s.ranked_page_hits(h)?, spec.span, cfg.budget_tokens, seq_len, &base)?)?
                        }
                        _ => add(&s.keep_tokens(h, &cfg))?,
                    }
                }
                if let (Some(budget), Some(r)) = (spec.clusters, &retrieved) {
                    match (spec.span, &view) {
                        (Some(_), Some(kv)) => {
                            // Rank the retrieved (clustered) tokens by their own logits, grow them
                            // into spans, and keep the tokens the index does not cover yet.
                            // Tokens the head reads anyway (sinks, window, uncovered tail) do
                            // not count against the budget.
                            let covered = r.clustered_len as u32;
                            let split = r.tokens[h].partition_point(|&t| t < covered);
                            let (cand, tail) = r.tokens[h].split_at(split);
                            let scores = raw_scores(kv, 0, h, head_rows(h), cand)?;
                            let hits = ranked_top(cand, &scores, cand.len())?;
                            let mut anyway =
                                crate::alloc::vec_with_capacity(base.len() + tail.len(), "span exclusions")?;
                            merge_union(&base, tail, &mut anyway);
                            add(&hits_to_tokens(hits, spec.span, budget, seq_len, &anyway)?)?;
                            add(tail)?;
                        }
                        _ => add(&r.tokens[h])?,
                    }
                    centroids_scored += r.centroids_scored[h];
                    radii_read += r.radii_read[h];
                }
                if let (Some(budget), Some(kv)) = (spec.topk, &view) {
                    add(&topk_tokens(kv, 0, h, topk_rows(h), budget, spec.span, &base)?)?;
                }
                tokens
            };
            total += tokens.len();
            heads.push(tokens);
        }
        if total > u32::MAX as usize {
            return Err(Error::invalid("policy", "selections whose tokens over all heads fit u32 offsets"));
        }
        Ok(PolicySelection {
            selection: Selection::from_heads_unchecked(seq_len, &heads)?,
            centroids_scored,
            radii_read,
        })
    }

    /// Centroid retrieval for every head of `layer` with the budget of `spec`, each head's
    /// tokens united with the ones the index does not cover.
    #[allow(clippy::too_many_arguments)]
    fn retrieve(
        &self,
        cache: &KvCache,
        seq: SeqId,
        layer: usize,
        q: &TensorView,
        indexes: Option<&ClusterIndexSet>,
        spec: &Spec,
        seq_len: usize,
    ) -> Result<Retrieved> {
        let c = cache.config();
        let budget = spec.clusters.expect("a clusters spec");
        let Some(set) = indexes else {
            return Err(Error::invalid(
                "policy",
                format!(
                    "no `clusters=` at layer {layer} here: centroid retrieval needs the cluster indexes, so build a ClusterIndexSet after prefill and decode with it"
                ),
            ));
        };
        let Some(index) = set.get(seq, layer) else {
            return Err(Error::invalid(
                "clusters",
                format!("a cluster index for sequence {seq} at layer {layer} (its policy uses `clusters=`): build the ClusterIndexSet for the sequence after prefill"),
            ));
        };
        if index.num_kv_heads() != c.num_kv_heads || index.head_dim() != c.head_dim {
            return Err(Error::shape(
                "clusters",
                format!("an index of num_kv_heads {} and head_dim {} (as the cache)", c.num_kv_heads, c.head_dim),
                format!(
                    "num_kv_heads {} and head_dim {} (sequence {seq}, layer {layer})",
                    index.num_kv_heads(),
                    index.head_dim()
                ),
            ));
        }
        if index.seq_len() > seq_len {
            return Err(Error::invalid(
                "clusters",
                format!(
                    "an index of sequence {seq} at layer {layer} covering at most its {seq_len} tokens, but it was built or updated at {} tokens (truncated or compacted since: build it again)",
                    index.seq_len()
                ),
            ));
        }
        let how = spec.rank.unwrap_or(ClusterRank::Estimate).retrieve(budget);
        let r = match spec.hier {
            Some(_) => {
                index.retrieve_hierarchical(q, CoarseRetrieve::BudgetMultiple(HIER_OPEN_MULTIPLE), &how, seq_len)?
            }
            None => index.retrieve(q, &how, seq_len)?,
        };
        let tail: Vec<u32> = (index.clustered_len() as u32..seq_len as u32).collect();
        let hk = c.num_kv_heads;
        let coarse = index.num_coarse_clusters();
        let mut tokens = Vec::with_capacity(hk);
        let mut centroids_scored = Vec::with_capacity(hk);
        let mut radii_read = Vec::with_capacity(hk);
        let mixed = matches!(how, Retrieve::MixedBudget(_));
        for h in 0..hk {
            let mut out = Vec::new();
            merge_union(r.selection.head(h), &tail, &mut out);
            tokens.push(out);
            let coarse_rows = if spec.hier.is_some() { coarse } else { 0 };
            centroids_scored.push(r.stats.clusters_scored[h] + coarse_rows);
            radii_read.push(if mixed { r.stats.clusters_scored[h] } else { 0 });
        }
        Ok(Retrieved { tokens, centroids_scored, radii_read, clustered_len: index.clustered_len() })
    }
}

/// What [`Policy::select_with_clusters`] chose, and what choosing cost.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySelection {
    /// The tokens each KV head reads.
    pub selection: Selection,
    /// Centroid rows scored by centroid retrieval, summed over the KV heads that use it
    /// (fine clusters scored, plus every coarse centroid under `hier=`); 0 without
    /// `clusters=`. Each is `head_dim` f32 values read.
    pub centroids_scored: usize,
    /// Cluster radii read by `rank=mixed` (one f32 per fine cluster scored), summed over
    /// the KV heads that use it; 0 otherwise.
    pub radii_read: usize,
}

/// Per-head retrieval result inside `select_inner`.
struct Retrieved {
    tokens: Vec<Vec<u32>>,
    /// Tokens below this are the index's; the rest are the uncovered tail.
    clustered_len: usize,
    centroids_scored: Vec<usize>,
    radii_read: Vec<usize>,
}
