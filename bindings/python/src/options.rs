//! String options and keyword arguments translated to the core's types.

use kvsieve::attention::{AttentionParams, RopeStyle};
use kvsieve::{DType, Error, KeyRope, PageLayout};

fn invalid(param: &str, expected: &str, got: &str) -> Error {
    Error::InvalidArgument { param: param.into(), expected: format!("{expected}, got {got:?}") }
}

pub fn parse_dtype(param: &str, s: &str) -> Result<DType, Error> {
    DType::parse(s).ok_or_else(|| invalid(param, "\"f32\", \"f16\" or \"bf16\"", s))
}

pub fn parse_layout(param: &str, s: &str) -> Result<PageLayout, Error> {
    match s.to_ascii_lowercase().as_str() {
        "nhd" => Ok(PageLayout::Nhd),
        "hnd" => Ok(PageLayout::Hnd),
        _ => Err(invalid(param, "\"nhd\" or \"hnd\"", s)),
    }
}

pub fn layout_name(l: PageLayout) -> &'static str {
    match l {
        PageLayout::Nhd => "nhd",
        PageLayout::Hnd => "hnd",
    }
}

pub fn parse_key_rope(param: &str, s: &str) -> Result<KeyRope, Error> {
    match s.to_ascii_lowercase().as_str() {
        "post" => Ok(KeyRope::PostRope),
        "pre" => Ok(KeyRope::PreRope),
        _ => Err(invalid(param, "\"post\" (keys stored after RoPE) or \"pre\" (before RoPE)", s)),
    }
}

pub fn key_rope_name(k: KeyRope) -> &'static str {
    match k {
        KeyRope::PostRope => "post",
        KeyRope::PreRope => "pre",
    }
}

pub fn parse_style(param: &str, s: &str) -> Result<RopeStyle, Error> {
    match s.to_ascii_lowercase().as_str() {
        "half_split" => Ok(RopeStyle::HalfSplit),
        "adjacent_pairs" => Ok(RopeStyle::AdjacentPairs),
        _ => Err(invalid(param, "\"half_split\" (GPT-NeoX) or \"adjacent_pairs\" (GPT-J / GGUF)", s)),
    }
}

pub fn style_name(s: RopeStyle) -> &'static str {
    match s {
        RopeStyle::HalfSplit => "half_split",
        RopeStyle::AdjacentPairs => "adjacent_pairs",
    }
}

/// The keyword arguments shared by every attention call.
#[allow(clippy::needless_update)]
pub fn attention_params(
    scale: Option<f32>,
    logit_soft_cap: Option<f32>,
    rope: Option<&crate::rope::PyRopeConfig>,
    chunk_size: Option<i64>,
) -> Result<AttentionParams, Error> {
    let chunk_size = match chunk_size {
        None => None,
        Some(c) => Some(usize::try_from(c).map_err(|_| Error::InvalidArgument {
            param: "chunk_size".into(),
            expected: format!("at least 1 (or None for automatic), got {c}"),
        })?),
    };
    // Fields the Python surface does not expose yet keep the core's defaults.
    Ok(AttentionParams { scale, logit_soft_cap, rope: rope.map(|r| r.inner), chunk_size, ..Default::default() })
}

/// Shape of an attention query: `[tokens, num_qo_heads, head_dim]`.
pub fn query_shape(q: &[usize], tokens: &str) -> Result<[usize; 3], Error> {
    match q {
        &[n, h, d] => Ok([n, h, d]),
        _ => Err(Error::Shape { param: "q".into(), expected: format!("[{tokens}, num_qo_heads, head_dim]"), got: format!("{q:?}") }),
    }
}
