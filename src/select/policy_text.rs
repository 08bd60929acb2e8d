//! The parser of the policy text form (grammar in [`crate::select::policy`]'s docs):
//! a tokenizer that records byte offsets, then recursive descent. Every error is
//! [`Error::Parse`] at the offset of the offending token (the text's length at its end).

use std::fmt;

use crate::config::PositionMode;
use crate::error::{Error, Result};
use crate::select::policy::{ClusterRank, HeadOverride, LayerOverride, Policy, PositionKind, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    /// A name: an ASCII letter or `_`, then letters, digits or `_`.
    Name(&'a str),
    /// A run of ASCII digits.
    Number(&'a str),
    /// One of `; : , = - .`
    Punct(char),
    End,
}

impl Tok<'_> {
    fn describe(&self) -> String {
        match self {
            Tok::Name(s) | Tok::Number(s) => format!("`{s}`"),
            Tok::Punct(c) => format!("`{c}`"),
            Tok::End => "the end of the text".into(),
        }
    }
}

fn err(offset: usize, message: impl Into<String>) -> Error {
    Error::Parse { offset, message: message.into() }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Tok<'_>)>> {
    let bytes = text.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            toks.push((start, Tok::Name(&text[start..i])));
        } else if c.is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            toks.push((start, Tok::Number(&text[start..i])));
        } else if b";:,=-.".contains(&c) {
            toks.push((start, Tok::Punct(c as char)));
            i += 1;
        } else {
            let ch = text[start..].chars().next().expect("i is on a char boundary");
            return Err(err(start, format!("unexpected character `{ch}`: a policy holds names, numbers, whitespace and `;` `:` `,` `=` `-` `.`")));
        }
    }
    toks.push((text.len(), Tok::End));
    Ok(toks)
}

const ITEMS: &str = "`dense`, `sinks=`, `window=`, `pages=`, `min_pages=`, `clusters=`, `clusters_k=`, `cluster_size=`, `hier=`, `rank=`, `topk=`, `span=`, `global=`, `local=`, `max_distance=` or `positions=`";

/// The fields of a spec that items set, with where each was set (for conflict messages).
#[derive(Default)]
struct SpecBuilder {
    spec: Spec,
    /// (offset, key) of the item that set each field.
    dense_at: Option<(usize, &'static str)>,
    sinks_at: Option<(usize, &'static str)>,
    window_at: Option<(usize, &'static str)>,
    pages_at: Option<(usize, &'static str)>,
    min_pages_at: Option<(usize, &'static str)>,
    clusters_at: Option<(usize, &'static str)>,
    clusters_k_at: Option<(usize, &'static str)>,
    cluster_size_at: Option<(usize, &'static str)>,
    hier_at: Option<(usize, &'static str)>,
    rank_at: Option<(usize, &'static str)>,
    topk_at: Option<(usize, &'static str)>,
    span_at: Option<(usize, &'static str)>,
    max_distance_at: Option<(usize, &'static str)>,
    /// Where positions were given explicitly, and where an alias implied capped.
    positions_at: Option<(usize, &'static str)>,
    alias_at: Option<(usize, &'static str)>,
}

struct Parser<'a> {
    toks: Vec<(usize, Tok<'a>)>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> (usize, Tok<'a>) {
        self.toks[self.pos]
    }

    fn bump(&mut self) -> (usize, Tok<'a>) {
        let t = self.toks[self.pos];
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek().1 == Tok::Punct(c) {
            self.bump();
            true
        } else {
            false
        }
    }

    /// A number that fits `max`, or an error saying what was expected `after`.
    fn number(&mut self, what: &str, after: &str, max: u64) -> Result<u64> {
        match self.peek() {
            (off, Tok::Number(s)) => {
                let v = s.parse::<u64>().ok().filter(|&v| v <= max);
                let v =
                    v.ok_or_else(|| err(off, format!("expected {what} from 0 to {max} after {after}, found `{s}`")))?;
                self.bump();
                Ok(v)
            }
            (off, t) => Err(err(off, format!("expected {what} after {after}, found {}", t.describe()))),
        }
    }

    fn policy(&mut self) -> Result<Policy> {
        if self.peek().1 == Tok::End {
            return Ok(Policy::dense());
        }
        let mut default: Option<(usize, Spec)> = None;
        let mut layers = Vec::new();
        let mut heads = Vec::new();
        loop {
            let (off, t) = self.peek();
            match t {
                Tok::Name("layers") => layers.push(self.layers_clause()?),
                Tok::Name("heads") => heads.push(self.heads_clause()?),
                Tok::Punct(';') | Tok::End => {
                    return Err(err(
                        off,
                        format!("expected a clause (a spec, `layers=` or `heads=`), found {}", t.describe()),
                    ));
                }
                _ => {
                    if let Some((first, _)) = default {
                        return Err(err(
                            off,
                            format!("expected `layers=` or `heads=`: the default spec was already given at byte {first}, and there is only one"),
                        ));
                    }
                    default = Some((off, self.spec("at the start of a clause")?));
                }
            }
            match self.bump() {
                (_, Tok::End) => break,
                (_, Tok::Punct(';')) => {}
                (off, t) => {
                    return Err(err(off, format!("expected `,`, `;` or the end of the text, found {}", t.describe())))
                }
            }
        }
        Ok(Policy::from_parts(default.map_or_else(Spec::dense, |(_, s)| s), layers, heads))
    }

    fn expect_eq(&mut self, key: &str) -> Result<()> {
        if self.eat('=') {
            return Ok(());
        }
        let (off, t) = self.peek();
        Err(err(off, format!("expected `=` after `{key}`, found {}", t.describe())))
    }

    fn expect_colon(&mut self, what: &str) -> Result<()> {
        if self.eat(':') {
            return Ok(());
        }
        let (off, t) = self.peek();
        Err(err(off, format!("expected `,` or `:` after {what}, found {}", t.describe())))
    }

    fn layers_clause(&mut self) -> Result<LayerOverride> {
        self.bump();
        self.expect_eq("layers")?;
        let mut ranges = Vec::new();
        let mut after = "`layers=`";
        loop {
            let start_off = self.peek().0;
            let a = self.number("a layer number", after, usize::MAX as u64)? as usize;
            let b = if self.eat('-') { self.number("a layer number", "`-`", usize::MAX as u64)? as usize } else { a };
            if a > b {
                return Err(err(start_off, format!("expected a layer range a-b with a <= b, found {a}-{b}")));
            }
            ranges.push((a, b));
            if !self.eat(',') {
                break;
            }
            after = "`,`";
        }
        if self.peek().1 == Tok::Punct('-') {
            let off = self.peek().0;
            return Err(err(off, "expected `,` or `:` after a layer range, found `-`"));
        }
        self.expect_colon("a layer range")?;
        let spec = self.spec("after `:`")?;
        Ok(LayerOverride::new(ranges, spec))
    }

    fn heads_clause(&mut self) -> Result<HeadOverride> {
        self.bump();
        self.expect_eq("heads")?;
        let mut heads = Vec::new();
        let mut after = "`heads=`";
        loop {
            let l = self.number("a layer number (heads are written layer.head, e.g. 2.5)", after, usize::MAX as u64)?
                as usize;
            if !self.eat('.') {
                let (off, t) = self.peek();
                return Err(err(off, format!("expected `.` and a head number after layer {l} (heads are written layer.head, e.g. 2.5), found {}", t.describe())));
            }
            let h = self.number("a head number", "`.`", usize::MAX as u64)? as usize;
            heads.push((l, h));
            if !self.eat(',') {
                break;
            }
            after = "`,`";
        }
        self.expect_colon("a layer.head pair")?;
        let spec = self.spec("after `:`")?;
        Ok(HeadOverride::new(heads, spec))
    }

    /// `item {, item}`; `after` says where the first item stands, for messages
    /// ("after `:`", "at the start of a clause").
    fn spec(&mut self, after: &str) -> Result<Spec> {
        let mut b = SpecBuilder::default();
        let mut after = after.to_string();
        loop {
            self.item(&mut b, &after)?;
            if !self.eat(',') {
                break;
            }
            after = "after `,`".into();
        }
        Ok(b.spec)
    }

    fn item(&mut self, b: &mut SpecBuilder, after: &str) -> Result<()> {
        let (off, t) = self.peek();
        let name = match t {
            Tok::Name(n) => n,
            _ => return Err(err(off, format!("expected {ITEMS} {after}, found {}", t.describe()))),
        };
        let key: &'static str = match name {
            "dense" => "dense",
            "sinks" => "sinks",
            "window" => "window",
            "pages" => "pages",
            "min_pages" => "min_pages",
            "clusters" => "clusters",
            "clusters_k" => "clusters_k",
            "cluster_size" => "cluster_size",
            "hier" => "hier",
            "rank" => "rank",
            "topk" => "topk",
            "span" => "span",
            "global" => "global",
            "local" => "local",
            "max_distance" => "max_distance",
            "positions" => "positions",
            "layers" | "heads" => {
                return Err(err(
                    off,
                    format!(
                        "expected {ITEMS}, found `{name}`: `{name}=` starts a clause, so separate clauses with `;`"
                    ),
                ));
            }
            _ => return Err(err(off, format!("expected {ITEMS}, found unknown key `{name}`"))),
        };
        self.bump();
        if key == "dense" {
            if self.peek().1 == Tok::Punct('=') {
                return Err(err(
                    self.peek().0,
                    "expected `,`, `;` or the end of the text after `dense`, which takes no value, found `=`",
                ));
            }
            set_once(&mut b.dense_at, off, key, "dense")?;
            b.spec.dense = true;
            return check_dense(b, off, key);
        }
        self.expect_eq(key)?;
        let after_key = format!("`{key}=`");
        let usize_max = usize::MAX as u64;
        match key {
            "sinks" | "global" => {
                set_once(&mut b.sinks_at, off, key, "the sinks")?;
                b.spec.sinks = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "window" | "local" => {
                set_once(&mut b.window_at, off, key, "the window")?;
                b.spec.window = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "pages" => {
                set_once(&mut b.pages_at, off, key, "the page budget")?;
                b.spec.pages = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "min_pages" => {
                set_once(&mut b.min_pages_at, off, key, "the page minimum")?;
                b.spec.min_pages = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "clusters" => {
                set_once(&mut b.clusters_at, off, key, "the retrieval budget")?;
                b.spec.clusters = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "clusters_k" => {
                set_once(&mut b.clusters_k_at, off, key, "the cluster count")?;
                b.spec.clusters_k = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "cluster_size" => {
                set_once(&mut b.cluster_size_at, off, key, "the cluster size")?;
                b.spec.cluster_size = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "hier" => {
                set_once(&mut b.hier_at, off, key, "the coarse cluster count")?;
                b.spec.hier = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "topk" => {
                set_once(&mut b.topk_at, off, key, "the top-k budget")?;
                b.spec.topk = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "span" => {
                set_once(&mut b.span_at, off, key, "the span length")?;
                b.spec.span = Some(self.number("a number", &after_key, usize_max)? as usize);
            }
            "rank" => {
                set_once(&mut b.rank_at, off, key, "the cluster ranking")?;
                let (voff, vt) = self.peek();
                b.spec.rank = Some(match vt {
                    Tok::Name("estimate") => ClusterRank::Estimate,
                    Tok::Name("mixed") => ClusterRank::Mixed,
                    _ => {
                        return Err(err(
                            voff,
                            format!("expected `estimate` or `mixed` after `rank=`, found {}", vt.describe()),
                        ))
                    }
                });
                self.bump();
            }
            "max_distance" => {
                set_once(&mut b.max_distance_at, off, key, "the distance cap")?;
                b.spec.max_distance = Some(self.number("a number", &after_key, u32::MAX as u64)? as u32);
            }
            _ => {
                set_once(&mut b.positions_at, off, key, "the positions")?;
                let (voff, vt) = self.peek();
                let kind = match vt {
                    Tok::Name("original") => PositionKind::Original,
                    Tok::Name("contiguous") => PositionKind::Contiguous,
                    Tok::Name("capped") => PositionKind::Capped,
                    _ => {
                        return Err(err(
                            voff,
                            format!(
                                "expected `original`, `contiguous` or `capped` after `positions=`, found {}",
                                vt.describe()
                            ),
                        ))
                    }
                };
                self.bump();
                if kind != PositionKind::Capped {
                    if let Some((aoff, akey)) = b.alias_at {
                        return Err(err(off, format!("expected `positions=capped` or no `positions=`: `{akey}=` at byte {aoff} implies capped positions")));
                    }
                }
                b.spec.positions = Some(kind);
            }
        }
        if key == "global" || key == "local" {
            if let (Some((poff, _)), Some(kind)) = (b.positions_at, b.spec.positions) {
                if kind != PositionKind::Capped {
                    return Err(err(off, format!("expected no `{key}=` here: it implies capped positions, but `positions={}` was given at byte {poff}", kind.name())));
                }
            }
            b.alias_at.get_or_insert((off, key));
            b.spec.positions = Some(PositionKind::Capped);
        }
        check_dense(b, off, key)
    }
}

/// Record that `key` at `off` sets a field, or fail if an earlier item set it.
fn set_once(at: &mut Option<(usize, &'static str)>, off: usize, key: &'static str, field: &str) -> Result<()> {
    if let Some((prev, pkey)) = *at {
        let by = if pkey == key { format!("an earlier `{pkey}`") } else { format!("`{pkey}`") };
        return Err(err(
            off,
            format!("expected each item once per spec, but `{key}` sets {field}, already set by {by} at byte {prev}"),
        ));
    }
    *at = Some((off, key));
    Ok(())
}

/// `dense` may only be joined by `positions=` and `max_distance=`; report a conflict at
/// the later item (`key` at `off`).
fn check_dense(b: &SpecBuilder, off: usize, key: &str) -> Result<()> {
    let Some((doff, _)) = b.dense_at else { return Ok(()) };
    let others = [
        b.sinks_at,
        b.window_at,
        b.pages_at,
        b.min_pages_at,
        b.clusters_at,
        b.clusters_k_at,
        b.cluster_size_at,
        b.hier_at,
        b.rank_at,
        b.topk_at,
        b.span_at,
    ];
    let Some((ooff, okey)) = others.iter().flatten().next().copied() else { return Ok(()) };
    let message = if key == "dense" {
        format!("expected `dense` alone (with `positions=` and `max_distance=` at most), but `{okey}=` was given at byte {ooff}")
    } else {
        format!("expected `positions=` or `max_distance=` alongside `dense` (byte {doff}), found `{key}=`")
    };
    Err(err(off, message))
}

/// Parse the policy text form.
pub(crate) fn parse(text: &str) -> Result<Policy> {
    let toks = tokenize(text)?;
    Parser { toks, pos: 0 }.policy()
}

// ---- The printer: the canonical text form (see the policy module's docs).

/// A position mode as the text form writes it.
pub(crate) fn mode_text(mode: PositionMode) -> String {
    match mode {
        PositionMode::Original => "positions=original".into(),
        PositionMode::Contiguous => "positions=contiguous".into(),
        PositionMode::Capped { max_distance } => format!("positions=capped,max_distance={max_distance}"),
    }
}

impl fmt::Display for Spec {
    /// Canonical order: `dense, sinks, window, pages, min_pages, clusters, clusters_k,
    /// cluster_size, hier, rank, topk, span, positions, max_distance`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if self.dense {
            items.push("dense".into());
        }
        let numbers = [
            ("sinks", self.sinks),
            ("window", self.window),
            ("pages", self.pages),
            ("min_pages", self.min_pages),
            ("clusters", self.clusters),
            ("clusters_k", self.clusters_k),
            ("cluster_size", self.cluster_size),
            ("hier", self.hier),
        ];
        items.extend(numbers.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))));
        if let Some(r) = self.rank {
            items.push(format!("rank={}", r.name()));
        }
        items.extend(
            [("topk", self.topk), ("span", self.span)].iter().filter_map(|(k, v)| v.map(|v| format!("{k}={v}"))),
        );
        if let Some(p) = self.positions {
            items.push(format!("positions={}", p.name()));
        }
        if let Some(m) = self.max_distance {
            items.push(format!("max_distance={m}"));
        }
        f.write_str(&items.join(","))
    }
}

impl fmt::Display for LayerOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<String> =
            self.layers.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        write!(f, "layers={}:{}", ranges.join(","), self.spec)
    }
}

impl fmt::Display for HeadOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let heads: Vec<String> = self.heads.iter().map(|(l, h)| format!("{l}.{h}")).collect();
        write!(f, "heads={}:{}", heads.join(","), self.spec)
    }
}

impl fmt::Display for Policy {
    /// The canonical text form: the default spec, then layer clauses, then head clauses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.default_spec())?;
        for o in self.layer_overrides() {
            write!(f, ";{o}")?;
        }
        for o in self.head_overrides() {
            write!(f, ";{o}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Policy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Policy::parse(s)
    }
}
