//! Selection policies: which tokens each (layer, KV head) reads, and how positions are
//! numbered, composed from the selection methods, with a compact text form.
//!
//! A [`Spec`] composes methods for one head: `dense`, or any of attention sinks, a recent
//! window, page bounds, centroid retrieval and position-free top-k (the head reads the
//! union of their tokens; retrieved tokens optionally grown into spans), plus a position
//! mode. A [`Policy`] holds a default spec, layer overrides and
//! (layer, head) overrides.
//!
//! # Text form
//!
//! ```text
//! sinks=4,window=1024,pages=2048;layers=0-1:dense;heads=2.0,2.5:sinks=4,window=256
//! ```
//! reads: every head keeps 4 sink tokens, the last 1024 tokens and the pages of the best
//! bounds up to 2048 tokens; layers 0 and 1 are dense; heads 0 and 5 of layer 2 keep only
//! 4 sinks and the last 256 tokens.
//!
//! Grammar (EBNF; `ws` is any run of spaces, tabs and newlines, allowed between any two
//! tokens and at both ends):
//! ```text
//! policy      = [ clause , { ";" , clause } ] ;            (* empty text = "dense" *)
//! clause      = layers-clause | heads-clause | spec ;
//! layers-clause = "layers" , "=" , layer-range , { "," , layer-range } , ":" , spec ;
//! layer-range = number , [ "-" , number ] ;               (* a or a-b, inclusive, a <= b *)
//! heads-clause = "heads" , "=" , head , { "," , head } , ":" , spec ;
//! head        = number , "." , number ;                   (* layer.head *)
//! spec        = item , { "," , item } ;
//! item        = "dense"
//!             | ( "sinks" | "window" | "pages" | "min_pages"
//!               | "clusters" | "clusters_k" | "cluster_size" | "hier"
//!               | "global" | "local" | "max_distance" ) , "=" , number
//!             | "positions" , "=" , ( "original" | "contiguous" | "capped" )
//!             | "rank" , "=" , ( "estimate" | "mixed" )
//!             | ( "topk" | "span" ) , "=" , number ;
//! number      = digit , { digit } ;
//! ```
//!
//! Meaning of the items:
//! - `dense`: every token. May only be joined by `positions=` and `max_distance=`.
//! - `sinks=N`: the first N tokens (StreamingLLM's attention sinks). `window=N`: the last
//!   N tokens. `pages=N`: page-bound selection ([`crate::select::page_bounds`]) to a budget
//!   of N tokens per KV head; `min_pages=N`: keep at least N pages.
//! - `clusters=N`: centroid retrieval (Squeezed Attention, [`crate::select::cluster`]) to a
//!   budget of N tokens per KV head: the best clusters of the (sequence, layer)'s K-means
//!   index by estimated attention, plus every token the index does not cover yet. The
//!   index lives in a [`ClusterIndexSet`] the engine owns (built after prefill, kept
//!   current by [`ClusterIndexSet::update`]; see there for the staleness rule) and passes
//!   to [`crate::KvCache::decode_with_clusters`]. Options, only with `clusters=`:
//!   `clusters_k=K` fine clusters per KV head, or `cluster_size=S` one cluster per S tokens
//!   clustered (default [`DEFAULT_CLUSTER_SIZE`]); `hier=C`: hierarchical lookup through
//!   C coarse clusters per head, opening the best coarse clusters until they hold
//!   [`HIER_OPEN_MULTIPLE`] times the budget; `rank=estimate|mixed`: which clusters fill
//!   the budget ([`ClusterRank`]; default `estimate`). The index leaves out the smallest `window=`
//!   of the layer's cluster heads (those tokens are read anyway). All heads of a layer
//!   that use `clusters=` share its value and options.
//! - `topk=N`: position-free top-k (ReAttention): per KV head, the N tokens outside the
//!   sinks and the window whose stored keys score highest against the query as passed
//!   (raw `q·k` for keys stored before RoPE; the best score among the GQA group's query
//!   heads). It reads every key of the sequence once per step, so it finds what a budget
//!   can hold exactly but costs a pass over the keys.
//! - `span=S`: with any retrieval item (`topk=`, `pages=`, `clusters=`), each retrieved
//!   token grows into the S tokens around it ([`crate::select::expand_spans`]): hits are
//!   taken best first (top-k and cluster hits by their raw `q·k`, page hits in page rank
//!   order) and their spans added until the item's budget is reached, so the item still
//!   reads at most its budget. Retrieved text stays readable when positions are renumbered
//!   contiguously (the digits of a key keep their neighbours).
//! - `global=N` / `local=N`: LM-Infinite's Λ-mask, aliases of `sinks=` / `window=` that
//!   also set `positions=capped`.
//! - `positions=original|contiguous|capped` ([`PositionMode`]); `max_distance=N` is the cap
//!   of `capped`, which requires it.
//!
//! Rules: the clause without a `layers=` / `heads=` prefix is the default spec (at most
//! one; without one the default is `dense`). An override replaces the whole spec of the
//! layers or heads it names; among clauses of one kind later ones win, and a head override
//! beats any layer override. An item may be given once per spec (`global=` counts as
//! `sinks=`, `local=` as `window=`). Parse errors are [`Error::Parse`] with the byte
//! offset of the offending token and what was expected there, e.g.
//! `window=x` → offset 7, "expected a number after `window=`".
//!
//! More examples:
//! ```text
//! dense
//! sinks=4,window=2048,positions=contiguous
//! global=4,local=4096,max_distance=4096
//! window=512;layers=0-1,30-31:dense;heads=5.1:pages=4096,min_pages=2
//! sinks=4,window=64,clusters=512,cluster_size=16
//! sinks=4,window=64,clusters=512,clusters_k=256,hier=16;layers=0-1:dense
//! sinks=32,window=256,topk=1024,span=32,positions=contiguous
//! ```
//!
//! `Display` prints a canonical form (items in the order `dense, sinks, window, pages,
//! min_pages, clusters, clusters_k, cluster_size, hier, rank, topk, span, positions,
//! max_distance`; the
//! default first, then layer clauses, then head clauses; ranges sorted and merged) that
//! parses back to an equal policy.
//!
//! # Checks
//! Parsing checks syntax only. [`Policy::validate`] checks a policy against a model:
//! layers and heads in range, `window`/`pages`/`clusters`/`max_distance` at least 1, a
//! spec that selects something, `topk` and `span` at least 1, `span` only with `topk`,
//! `pages` or `clusters` and not with `min_pages`, `min_pages` only with `pages`, `clusters_k`,
//! `cluster_size` (not both, each at least 1) and `hier` (at least 1) only with
//! `clusters`, `capped` with `max_distance` and `max_distance` only with `capped`, one
//! position mode for all heads of a layer (attention applies one position mode per layer
//! call), and one set of cluster options for the heads of a layer that use `clusters=`.
//! That page bounds need a cache with key bounds and post-RoPE keys is checked by
//! [`Policy::select`]; that centroid retrieval has an index, by
//! [`Policy::select_with_clusters`].

use crate::config::PositionMode;
use crate::error::{Error, Result};
use crate::select::cluster::{ClusterBuild, ClusterSizing, Retrieve, DEFAULT_CLUSTER_SIZE};
use crate::select::pages::PageBoundsConfig;

/// The position numbering a spec asks for, as written in `positions=`. With `Capped`, the
/// cap comes from [`Spec::max_distance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PositionKind {
    /// Positions as stored ([`PositionMode::Original`]).
    Original,
    /// Kept tokens renumbered 0, 1, ... ([`PositionMode::Contiguous`]).
    Contiguous,
    /// Relative distances capped at `max_distance` ([`PositionMode::Capped`]).
    Capped,
}

impl PositionKind {
    /// The word used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            PositionKind::Original => "original",
            PositionKind::Contiguous => "contiguous",
            PositionKind::Capped => "capped",
        }
    }
}

/// How centroid retrieval (`clusters=`) ranks clusters to fill its budget (`rank=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterRank {
    /// By estimated attention per key (Squeezed Attention): [`Retrieve::Budget`].
    Estimate,
    /// Alternately by the estimate and by an upper bound of the best member's logit, which
    /// finds a strongly matching key hidden in a cluster of weak ones:
    /// [`Retrieve::MixedBudget`].
    Mixed,
}

impl ClusterRank {
    /// The word used in the text form.
    pub fn name(self) -> &'static str {
        match self {
            ClusterRank::Estimate => "estimate",
            ClusterRank::Mixed => "mixed",
        }
    }

    /// The retrieval rule for a budget of `tokens`.
    pub fn retrieve(self, tokens: usize) -> Retrieve {
        match self {
            ClusterRank::Estimate => Retrieve::Budget(tokens),
            ClusterRank::Mixed => Retrieve::MixedBudget(tokens),
        }
    }
}

/// What one KV head reads: every token (`dense`), or the union of the parts that are set.
/// Fields mirror the text keys (see the module docs); `Default` sets nothing, which
/// [`Policy::validate`] rejects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Spec {
    /// Read every token.
    pub dense: bool,
    /// The first `sinks` tokens.
    pub sinks: Option<usize>,
    /// The last `window` tokens (at least 1).
    pub window: Option<usize>,
    /// Page-bound selection to this many tokens per KV head (at least 1).
    pub pages: Option<usize>,
    /// With `pages`: keep at least this many pages.
    pub min_pages: Option<usize>,
    /// Centroid retrieval to this many tokens per KV head (at least 1), from the layer's
    /// entry in a [`ClusterIndexSet`](crate::runtime::ClusterIndexSet).
    pub clusters: Option<usize>,
    /// With `clusters`: this many fine clusters per KV head (capped at the tokens
    /// clustered). Exclusive with `cluster_size`.
    pub clusters_k: Option<usize>,
    /// With `clusters`: one fine cluster per this many tokens clustered (rounded up);
    /// the default when neither `clusters_k` nor `cluster_size` is given is
    /// [`DEFAULT_CLUSTER_SIZE`].
    pub cluster_size: Option<usize>,
    /// With `clusters`: hierarchical lookup through this many coarse clusters per KV head
    /// (capped at the fine clusters).
    pub hier: Option<usize>,
    /// With `clusters`: how clusters fill the budget; `None` means [`ClusterRank::Estimate`].
    pub rank: Option<ClusterRank>,
    /// Position-free top-k: the tokens (outside the sinks and the window) whose stored key
    /// scores highest against the query as it is passed (raw `q·k`, the best of the GQA
    /// group's query heads), to this many tokens per KV head (at least 1).
    pub topk: Option<usize>,
    /// With a retrieval item (`topk`, `pages`, `clusters`): each retrieved token grows into
    /// the span of this many tokens around it (at least 1); see [`crate::select::expand_spans`].
    pub span: Option<usize>,
    /// Position numbering; `None` means original positions.
    pub positions: Option<PositionKind>,
    /// The cap of `positions = Capped` (at least 1).
    pub max_distance: Option<u32>,
}

impl Spec {
    /// Every token, original positions.
    pub fn dense() -> Spec {
        Spec { dense: true, ..Spec::default() }
    }

    /// StreamingLLM: `sinks` first tokens and the last `window`, renumbered contiguously.
    pub fn streaming(sinks: usize, window: usize) -> Spec {
        Spec { sinks: Some(sinks), window: Some(window), positions: Some(PositionKind::Contiguous), ..Spec::default() }
    }

    /// LM-Infinite: `global` first tokens and the last `local`, distances capped at
    /// `max_distance`.
    pub fn lambda(global: usize, local: usize, max_distance: u32) -> Spec {
        Spec {
            sinks: Some(global),
            window: Some(local),
            positions: Some(PositionKind::Capped),
            max_distance: Some(max_distance),
            ..Spec::default()
        }
    }

    /// Page-bound selection to `budget_tokens` tokens per KV head.
    pub fn page_bounds(budget_tokens: usize) -> Spec {
        Spec { pages: Some(budget_tokens), ..Spec::default() }
    }

    /// The same spec, also keeping the first `sinks` tokens.
    pub fn with_sinks(mut self, sinks: usize) -> Spec {
        self.sinks = Some(sinks);
        self
    }

    /// The same spec, also keeping the last `window` tokens.
    pub fn with_window(mut self, window: usize) -> Spec {
        self.window = Some(window);
        self
    }

    /// The same spec, also keeping page-bound selected pages to `budget_tokens`.
    pub fn with_pages(mut self, budget_tokens: usize) -> Spec {
        self.pages = Some(budget_tokens);
        self
    }

    /// The same spec, keeping at least `min_pages` pages under page bounds.
    pub fn with_min_pages(mut self, min_pages: usize) -> Spec {
        self.min_pages = Some(min_pages);
        self
    }

    /// The same spec, also keeping centroid-retrieved tokens to `budget_tokens` per KV head.
    pub fn with_clusters(mut self, budget_tokens: usize) -> Spec {
        self.clusters = Some(budget_tokens);
        self
    }

    /// The same spec with `k` fine clusters per KV head (see [`Spec::clusters_k`]).
    pub fn with_clusters_k(mut self, k: usize) -> Spec {
        self.clusters_k = Some(k);
        self
    }

    /// The same spec with one fine cluster per `tokens` tokens (see [`Spec::cluster_size`]).
    pub fn with_cluster_size(mut self, tokens: usize) -> Spec {
        self.cluster_size = Some(tokens);
        self
    }

    /// The same spec with hierarchical lookup through `coarse` coarse clusters per head.
    pub fn with_rank(mut self, rank: ClusterRank) -> Spec {
        self.rank = Some(rank);
        self
    }
    pub fn with_hier(mut self, coarse: usize) -> Spec {
        self.hier = Some(coarse);
        self
    }

    /// The same spec, also keeping the `budget_tokens` best tokens by raw `q·k` per KV head.
    pub fn with_topk(mut self, budget_tokens: usize) -> Spec {
        self.topk = Some(budget_tokens);
        self
    }

    /// The same spec with every retrieved token grown into a span of `tokens` tokens.
    pub fn with_span(mut self, tokens: usize) -> Spec {
        self.span = Some(tokens);
        self
    }

    /// The same spec with position numbering `mode`.
    pub fn with_position_mode(mut self, mode: PositionMode) -> Spec {
        match mode {
            PositionMode::Original => {
                self.positions = Some(PositionKind::Original);
                self.max_distance = None;
            }
            PositionMode::Contiguous => {
                self.positions = Some(PositionKind::Contiguous);
                self.max_distance = None;
            }
            PositionMode::Capped { max_distance } => {
                self.positions = Some(PositionKind::Capped);
                self.max_distance = Some(max_distance);
            }
        }
        self
    }

    /// The position mode attention should use. `Capped` without a `max_distance` (which
    /// [`Policy::validate`] rejects) reads as no cap, `u32::MAX`.
    pub fn position_mode(&self) -> PositionMode {
        match self.positions {
            None | Some(PositionKind::Original) => PositionMode::Original,
            Some(PositionKind::Contiguous) => PositionMode::Contiguous,
            Some(PositionKind::Capped) => PositionMode::Capped { max_distance: self.max_distance.unwrap_or(u32::MAX) },
        }
    }

    /// Whether the spec selects no token at all (no `dense`, window or pages, and no sinks).
    pub fn is_empty(&self) -> bool {
        !self.dense
            && self.window.is_none()
            && self.pages.is_none()
            && self.clusters.is_none()
            && self.topk.is_none()
            && self.sinks.unwrap_or(0) == 0
    }

    /// Whether the spec is made of sinks and a window alone (no `dense`, `pages`,
    /// `clusters` or `topk`): the tokens it reads depend only on the sequence length.
    pub fn is_window_only(&self) -> bool {
        !self.dense && self.pages.is_none() && self.clusters.is_none() && self.topk.is_none()
    }

    /// Whether the spec has a retrieval item (`topk`, `pages` or `clusters`), the items
    /// `span=` applies to.
    pub fn retrieves(&self) -> bool {
        self.topk.is_some() || self.pages.is_some() || self.clusters.is_some()
    }

    /// The options that shape a layer's cluster index (`clusters_k`, `cluster_size`,
    /// `hier`), when `clusters` is set.
    pub fn cluster_build(&self) -> Option<ClusterBuild> {
        self.clusters.map(|_| ClusterBuild {
            count: match (self.clusters_k, self.cluster_size) {
                (Some(k), _) => ClusterSizing::Count(k),
                (None, s) => ClusterSizing::TokensPerCluster(s.unwrap_or(DEFAULT_CLUSTER_SIZE)),
            },
            coarse: self.hier,
        })
    }

    /// The page-bound settings, when `pages` is set.
    pub fn page_bounds_config(&self) -> Option<PageBoundsConfig> {
        self.pages.map(|b| PageBoundsConfig { budget_tokens: b, min_pages: self.min_pages.unwrap_or(0) })
    }

    /// Semantic problems, as what was expected.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.dense
            && (self.sinks.is_some()
                || self.window.is_some()
                || self.pages.is_some()
                || self.min_pages.is_some()
                || self.clusters.is_some()
                || self.topk.is_some()
                || self.span.is_some())
        {
            return Some("`dense` alone, or with only `positions=` and `max_distance=`".into());
        }
        if self.is_empty() {
            return Some("a spec that selects tokens: `dense` or at least one of `sinks=` (above 0), `window=`, `pages=`, `clusters=`, `topk=`".into());
        }
        if self.window == Some(0) {
            return Some("window=N with N >= 1 (window=0 hides the query's own recent context)".into());
        }
        if self.pages == Some(0) {
            return Some("pages=N with a token budget N >= 1".into());
        }
        if self.topk == Some(0) {
            return Some("topk=N with a token budget N >= 1".into());
        }
        if self.span == Some(0) {
            return Some("span=N with N >= 1 tokens per span".into());
        }
        if self.span.is_some() && !self.retrieves() {
            return Some("`span=` only together with a retrieval item: `topk=`, `pages=` or `clusters=`".into());
        }
        if self.min_pages.is_some() && self.span.is_some() {
            return Some("no `min_pages=` with `span=`: spans fill the page budget token by token".into());
        }
        if self.min_pages.is_some() && self.pages.is_none() {
            return Some("`min_pages=` only together with `pages=`".into());
        }
        if self.clusters == Some(0) {
            return Some("clusters=N with a token budget N >= 1".into());
        }
        if self.clusters.is_none() {
            for (key, v) in [("clusters_k", self.clusters_k), ("cluster_size", self.cluster_size), ("hier", self.hier)]
            {
                if v.is_some() {
                    return Some(format!("`{key}=` only together with `clusters=`"));
                }
            }
            if self.rank.is_some() {
                return Some("`rank=` only together with `clusters=`".into());
            }
        }
        if self.clusters_k.is_some() && self.cluster_size.is_some() {
            return Some(
                "one of `clusters_k=` (clusters per head) and `cluster_size=` (tokens per cluster), not both".into(),
            );
        }
        for (key, v) in [("clusters_k", self.clusters_k), ("cluster_size", self.cluster_size), ("hier", self.hier)] {
            if v == Some(0) {
                return Some(format!("{key}=N with N >= 1"));
            }
        }
        match (self.positions, self.max_distance) {
            (Some(PositionKind::Capped), None) => {
                Some("`max_distance=N` with `positions=capped` (or `global=`/`local=`)".into())
            }
            (Some(PositionKind::Capped), Some(0)) => Some("max_distance=N with N >= 1".into()),
            (Some(PositionKind::Capped), Some(_)) => None,
            (_, Some(_)) => Some(
                "`positions=capped` (or `global=`/`local=`) with `max_distance=`, which only caps capped positions"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// A layer override: `layers=a-b,...:spec`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerOverride {
    /// Inclusive `(first, last)` layer ranges, sorted, disjoint and not adjacent.
    pub layers: Vec<(usize, usize)>,
    pub spec: Spec,
}

/// A head override: `heads=layer.head,...:spec`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeadOverride {
    /// `(layer, kv_head)` pairs, sorted, without duplicates.
    pub heads: Vec<(usize, usize)>,
    pub spec: Spec,
}

impl LayerOverride {
    /// An override of the given inclusive ranges (normalised: sorted, overlapping or
    /// adjacent ranges merged; a range with `first > last` is empty and dropped).
    pub fn new(layers: impl IntoIterator<Item = (usize, usize)>, spec: Spec) -> Self {
        let mut r: Vec<(usize, usize)> = layers.into_iter().filter(|&(a, b)| a <= b).collect();
        r.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(r.len());
        for (a, b) in r {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        LayerOverride { layers: merged, spec }
    }

    /// Whether the override names `layer`.
    pub fn contains(&self, layer: usize) -> bool {
        self.layers.iter().any(|&(a, b)| a <= layer && layer <= b)
    }
}

impl HeadOverride {
    /// An override of the given `(layer, kv_head)` pairs (sorted, duplicates removed).
    pub fn new(heads: impl IntoIterator<Item = (usize, usize)>, spec: Spec) -> Self {
        let mut h: Vec<(usize, usize)> = heads.into_iter().collect();
        h.sort_unstable();
        h.dedup();
        HeadOverride { heads: h, spec }
    }

    /// Whether the override names (`layer`, `head`).
    pub fn contains(&self, layer: usize, head: usize) -> bool {
        self.heads.binary_search(&(layer, head)).is_ok()
    }
}

/// Which clause gave a (layer, head) its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Default,
    Layer(usize),
    Head(usize),
}

/// A selection policy for every (layer, KV head) of a model. See the module docs for the
/// text form; build one with [`Policy::parse`] (or `str::parse`) or with
/// [`Policy::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    default: Spec,
    layers: Vec<LayerOverride>,
    heads: Vec<HeadOverride>,
}

impl Default for Policy {
    /// Dense everywhere.
    fn default() -> Self {
        Policy::dense()
    }
}

impl Policy {
    /// `default` for every layer and head, no overrides.
    pub fn new(default: Spec) -> Self {
        Policy { default, layers: Vec::new(), heads: Vec::new() }
    }

    /// Dense everywhere.
    pub fn dense() -> Self {
        Policy::new(Spec::dense())
    }

    /// Parse the text form (see the module docs). Checks syntax only; see [`Policy::validate`].
    pub fn parse(text: &str) -> Result<Self> {
        crate::select::policy_text::parse(text)
    }

    /// Add a layer override (applied after the existing ones) for inclusive layer ranges.
    pub fn with_layers(mut self, layers: impl IntoIterator<Item = (usize, usize)>, spec: Spec) -> Self {
        self.layers.push(LayerOverride::new(layers, spec));
        self
    }

    /// Add a head override (applied after the existing ones) for `(layer, kv_head)` pairs.
    pub fn with_heads(mut self, heads: impl IntoIterator<Item = (usize, usize)>, spec: Spec) -> Self {
        self.heads.push(HeadOverride::new(heads, spec));
        self
    }

    pub(crate) fn from_parts(default: Spec, layers: Vec<LayerOverride>, heads: Vec<HeadOverride>) -> Self {
        Policy { default, layers, heads }
    }

    /// The default spec.
    pub fn default_spec(&self) -> &Spec {
        &self.default
    }

    /// Layer overrides, in the order they apply (later wins).
    pub fn layer_overrides(&self) -> &[LayerOverride] {
        &self.layers
    }

    /// Head overrides, in the order they apply (later wins).
    pub fn head_overrides(&self) -> &[HeadOverride] {
        &self.heads
    }

    pub(crate) fn source(&self, layer: usize, head: usize) -> Source {
        if let Some(i) = self.heads.iter().rposition(|o| o.contains(layer, head)) {
            return Source::Head(i);
        }
        if let Some(i) = self.layers.iter().rposition(|o| o.contains(layer)) {
            return Source::Layer(i);
        }
        Source::Default
    }

    pub(crate) fn spec_of(&self, src: Source) -> &Spec {
        match src {
            Source::Default => &self.default,
            Source::Layer(i) => &self.layers[i].spec,
            Source::Head(i) => &self.heads[i].spec,
        }
    }

    /// The clause's canonical text, to name it in messages.
    pub(crate) fn clause_text(&self, src: Source) -> String {
        match src {
            Source::Default => self.default.to_string(),
            Source::Layer(i) => self.layers[i].to_string(),
            Source::Head(i) => self.heads[i].to_string(),
        }
    }

    /// The spec of KV head `head` in `layer`: the last head override naming it, else the
    /// last layer override naming the layer, else the default.
    pub fn spec(&self, layer: usize, head: usize) -> &Spec {
        self.spec_of(self.source(layer, head))
    }

    /// The position mode of `layer` (that of its head 0; [`Policy::validate`] makes sure
    /// all heads of a layer agree).
    pub fn position_mode(&self, layer: usize) -> PositionMode {
        self.spec(layer, 0).position_mode()
    }

    /// Whether every head of `layer` is dense, so attention can skip selection. Judged
    /// without the head count: a layer whose spec is sparse is reported not dense even if
    /// head overrides make every head dense (then a dense selection is simply computed).
    pub fn is_dense(&self, layer: usize) -> bool {
        let layer_spec =
            self.spec_of(self.layers.iter().rposition(|o| o.contains(layer)).map_or(Source::Default, Source::Layer));
        layer_spec.dense && self.heads.iter().all(|o| o.spec.dense || !o.heads.iter().any(|&(l, _)| l == layer))
    }

    /// Whether some KV head of `layer` uses centroid retrieval (`clusters=`).
    pub fn uses_clusters(&self, layer: usize, num_kv_heads: usize) -> bool {
        self.boundary_heads(layer, num_kv_heads).into_iter().any(|h| self.spec(layer, h).clusters.is_some())
    }

    /// What the cluster index of `layer` is built with, when some head uses `clusters=`:
    /// the heads' shared index options, and as the trailing window left out of the
    /// clustering the smallest `window=` among those heads (0 if one has none). Assumes a
    /// validated policy.
    pub fn cluster_plan(&self, layer: usize, num_kv_heads: usize) -> Option<(ClusterBuild, usize)> {
        let specs: Vec<&Spec> = self
            .boundary_heads(layer, num_kv_heads)
            .into_iter()
            .map(|h| self.spec(layer, h))
            .filter(|s| s.clusters.is_some())
            .collect();
        let build = specs.first()?.cluster_build()?;
        let exclude = specs.iter().map(|s| s.window.unwrap_or(0)).min().unwrap_or(0);
        Some((build, exclude))
    }

    /// Pages of a sequence that no (layer, head) of the policy reads again, so a cache can
    /// evict them ([`crate::KvCache::evict_pages`]): only when every spec in use is made of
    /// sinks and a window alone (no `dense`, no `pages`), the pages outside the largest
    /// sinks and the largest window (see [`crate::select::window_pages_to_evict`]);
    /// otherwise none. Page ids are shared by all layers, so every layer must agree.
    ///
    /// Errors: the policy fails [`Policy::validate`]; `page_size` 0.
    pub fn window_pages_to_evict(
        &self,
        num_layers: usize,
        num_kv_heads: usize,
        seq_len: usize,
        page_size: usize,
    ) -> Result<Vec<usize>> {
        self.validate(num_layers, num_kv_heads)?;
        let (mut sinks, mut window) = (0usize, 0usize);
        for layer in self.boundary_layers(num_layers) {
            for h in self.boundary_heads(layer, num_kv_heads) {
                let s = self.spec(layer, h);
                match s.window {
                    Some(w) if s.is_window_only() => {
                        window = window.max(w);
                        sinks = sinks.max(s.sinks.unwrap_or(0));
                    }
                    _ => {
                        if page_size == 0 {
                            return Err(Error::invalid("page_size", "at least 1"));
                        }
                        return Ok(Vec::new());
                    }
                }
            }
        }
        crate::select::window::window_pages_to_evict(seq_len, page_size, sinks, window)
    }
}

/// Under `hier=`, hierarchical lookup opens coarse clusters (best first) until the tokens
/// beneath them reach this multiple of the `clusters=` budget.
pub const HIER_OPEN_MULTIPLE: f64 = 2.0;
