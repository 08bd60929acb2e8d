//! [`Policy::validate`] and the checks decode runs per layer: a policy against a model's
//! numbers of layers and KV heads (see the policy module's docs for the rules). Each check
//! visits only the layers and heads where a clause starts or ends, so its cost follows the
//! clauses, not the model's size.

use crate::config::{MAX_KV_HEADS, MAX_LAYERS};
use crate::error::{Error, Result};
use crate::select::policy::{Policy, Source};
use crate::select::policy_text::mode_text;

impl Policy {
    /// Every check that needs no per-layer walk: each clause's spec and its layer and head
    /// numbers. Messages name the clause.
    pub(crate) fn validate_clauses(&self, num_layers: usize, num_kv_heads: usize) -> Result<()> {
        let mut sources = vec![Source::Default];
        sources.extend((0..self.layer_overrides().len()).map(Source::Layer));
        sources.extend((0..self.head_overrides().len()).map(Source::Head));
        for src in sources {
            if let Some(problem) = self.spec_of(src).problem() {
                return Err(Error::invalid(self.clause_text(src), problem));
            }
            match src {
                Source::Default => {}
                Source::Layer(i) => {
                    if let Some(&(_, last)) = self.layer_overrides()[i].layers.last() {
                        if last >= num_layers {
                            return Err(Error::out_of_range(
                                self.clause_text(src),
                                last as i64,
                                format!("0..{num_layers} (the model's layers)"),
                            ));
                        }
                    }
                }
                Source::Head(i) => {
                    for &(l, h) in &self.head_overrides()[i].heads {
                        if l >= num_layers {
                            return Err(Error::out_of_range(
                                self.clause_text(src),
                                l as i64,
                                format!("0..{num_layers} (the model's layers)"),
                            ));
                        }
                        if h >= num_kv_heads {
                            return Err(Error::out_of_range(
                                self.clause_text(src),
                                h as i64,
                                format!("0..{num_kv_heads} (KV heads of layer {l})"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The layers a check must visit: every layer where the clause in force may change
    /// (starts and ends of layer ranges, layers named by head clauses, and the layer after
    /// each), ascending. Any other layer is configured exactly like the nearest one below it
    /// in the list, so checks cost O(clauses), not O(layers).
    pub(crate) fn boundary_layers(&self, num_layers: usize) -> Vec<usize> {
        let mut v = vec![0];
        for o in self.layer_overrides() {
            for &(a, b) in &o.layers {
                v.extend([a, b.saturating_add(1)]);
            }
        }
        for o in self.head_overrides() {
            for &(l, _) in &o.heads {
                v.extend([l, l.saturating_add(1)]);
            }
        }
        v.retain(|&l| l < num_layers);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The heads of `layer` a check must visit, as [`Policy::boundary_layers`] for heads.
    pub(crate) fn boundary_heads(&self, layer: usize, num_kv_heads: usize) -> Vec<usize> {
        let mut v = vec![0];
        for o in self.head_overrides() {
            for &(l, h) in &o.heads {
                if l == layer {
                    v.extend([h, h.saturating_add(1)]);
                }
            }
        }
        v.retain(|&h| h < num_kv_heads);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Check that all heads of `layer` use one position mode.
    pub(crate) fn validate_layer_positions(&self, layer: usize, num_kv_heads: usize) -> Result<()> {
        let first = self.source(layer, 0);
        let mode = self.spec_of(first).position_mode();
        for h in self.boundary_heads(layer, num_kv_heads).into_iter().skip(1) {
            let src = self.source(layer, h);
            let m = self.spec_of(src).position_mode();
            if m != mode {
                return Err(Error::invalid(
                    self.clause_text(src),
                    format!(
                        "one position mode for all heads of layer {layer} (attention applies one per layer call): head {h} gets {} here, head 0 gets {} from `{}`",
                        mode_text(m),
                        mode_text(mode),
                        self.clause_text(first)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check that the heads of `layer` that use `clusters=` agree on the budget and the
    /// index options (one index and one retrieval serve the layer).
    pub(crate) fn validate_layer_clusters(&self, layer: usize, num_kv_heads: usize) -> Result<()> {
        let mut first: Option<(usize, Source)> = None;
        for h in self.boundary_heads(layer, num_kv_heads) {
            let src = self.source(layer, h);
            let s = self.spec_of(src);
            if s.clusters.is_none() {
                continue;
            }
            match first {
                None => first = Some((h, src)),
                Some((h0, src0)) => {
                    let s0 = self.spec_of(src0);
                    if (s0.clusters, s0.cluster_build(), s0.rank) != (s.clusters, s.cluster_build(), s.rank) {
                        return Err(Error::invalid(
                            self.clause_text(src),
                            format!(
                                "the same `clusters=`, `clusters_k=`/`cluster_size=`, `hier=` and `rank=` for every head of layer {layer} that uses centroid retrieval (one index per layer): head {h} differs from head {h0}, which gets them from `{}`",
                                self.clause_text(src0)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Check the policy against a model of `num_layers` layers and `num_kv_heads` KV heads
    /// (see the module docs for the list). Errors name the clause at fault.
    pub fn validate(&self, num_layers: usize, num_kv_heads: usize) -> Result<()> {
        if num_layers == 0 || num_layers > MAX_LAYERS {
            return Err(Error::invalid("num_layers", format!("1 to {MAX_LAYERS}, got {num_layers}")));
        }
        if num_kv_heads == 0 || num_kv_heads > MAX_KV_HEADS {
            return Err(Error::invalid("num_kv_heads", format!("1 to {MAX_KV_HEADS}, got {num_kv_heads}")));
        }
        self.validate_clauses(num_layers, num_kv_heads)?;
        for layer in self.boundary_layers(num_layers) {
            self.validate_layer_positions(layer, num_kv_heads)?;
            self.validate_layer_clusters(layer, num_kv_heads)?;
        }
        Ok(())
    }
}
