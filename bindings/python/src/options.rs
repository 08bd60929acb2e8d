//! String options and keyword arguments translated to the core's types.

use kvsieve::attention::{AttentionParams, PositionMode, RopeStyle};
use kvsieve::{DType, Error, KeyRope, PageLayout};
use pyo3::PyRef;

use crate::rope::PyRopeConfig;

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

/// `position_mode="original"|"contiguous"|"capped"` and its `max_distance`, which capped
/// positions require and the other modes refuse.
pub fn parse_position_mode(mode: &str, max_distance: Option<i64>) -> Result<PositionMode, Error> {
    let mode = match mode.to_ascii_lowercase().as_str() {
        "original" => PositionMode::Original,
        "contiguous" => PositionMode::Contiguous,
        "capped" => {
            let Some(m) = max_distance else {
                return Err(Error::InvalidArgument {
                    param: "max_distance".into(),
                    expected: "an int >= 1 with position_mode=\"capped\", got None".into(),
                });
            };
            let max_distance = u32::try_from(m).ok().filter(|&m| m >= 1).ok_or_else(|| Error::OutOfRange {
                param: "max_distance".into(),
                value: m,
                range: format!("1..={}", u32::MAX),
            })?;
            return Ok(PositionMode::Capped { max_distance });
        }
        _ => return Err(invalid("position_mode", "\"original\", \"contiguous\" or \"capped\"", mode)),
    };
    match max_distance {
        None => Ok(mode),
        Some(m) => Err(Error::InvalidArgument {
            param: "max_distance".into(),
            expected: format!("None unless position_mode=\"capped\" (it only caps capped distances), got {m}"),
        }),
    }
}

/// Position modes other than "original" re-rotate keys, so they need keys stored before
/// RoPE; checked here so that the error names the Python parameter.
pub fn check_position_mode(key_rope: KeyRope, params: &AttentionParams) -> Result<(), Error> {
    if key_rope == KeyRope::PostRope && params.positions != PositionMode::Original {
        let (name, _) = position_mode_parts(params.positions);
        return Err(Error::InvalidArgument {
            param: "position_mode".into(),
            expected: format!(
                "\"original\" for keys stored after RoPE (key_rope=\"post\"), got {name:?}: \"contiguous\" and \"capped\" re-rotate keys, which needs key_rope=\"pre\" and rope="
            ),
        });
    }
    Ok(())
}

/// The name and cap of a position mode, as `position_mode=` and `max_distance=` take them.
pub fn position_mode_parts(mode: PositionMode) -> (&'static str, Option<u32>) {
    match mode {
        PositionMode::Original => ("original", None),
        PositionMode::Contiguous => ("contiguous", None),
        PositionMode::Capped { max_distance } => ("capped", Some(max_distance)),
    }
}

/// The attention keywords of one call: `scale=`, `logit_soft_cap=`, `rope=`,
/// `position_mode=`, `max_distance=` and `chunk_size=`, as Python passed them. Every
/// attention entry point (host and CUDA) translates them here and nowhere else; a call
/// that takes only some of them leaves the rest at their defaults (`..Default::default()`:
/// "original" positions, everything else None).
pub struct AttentionKw<'a, 'py> {
    pub scale: Option<f32>,
    pub logit_soft_cap: Option<f32>,
    pub rope: Option<PyRef<'py, PyRopeConfig>>,
    pub position_mode: &'a str,
    pub max_distance: Option<i64>,
    pub chunk_size: Option<i64>,
}

impl Default for AttentionKw<'_, '_> {
    fn default() -> Self {
        AttentionKw {
            scale: None,
            logit_soft_cap: None,
            rope: None,
            position_mode: "original",
            max_distance: None,
            chunk_size: None,
        }
    }
}

impl AttentionKw<'_, '_> {
    /// The parameters of a host (CPU) call.
    pub fn params(&self) -> Result<AttentionParams, Error> {
        let positions = parse_position_mode(self.position_mode, self.max_distance)?;
        let chunk_size = match self.chunk_size {
            None => None,
            Some(c) => Some(usize::try_from(c).map_err(|_| Error::InvalidArgument {
                param: "chunk_size".into(),
                expected: format!("at least 1 (or None for automatic), got {c}"),
            })?),
        };
        let rope = self.rope.as_ref().map(|r| r.inner);
        Ok(AttentionParams { scale: self.scale, logit_soft_cap: self.logit_soft_cap, rope, chunk_size, positions })
    }

    /// The parameters of a CUDA call: as [`AttentionKw::params`], except that 0 means the
    /// default for `scale=`, `logit_soft_cap=` and `chunk_size=` (the CUDA entry points
    /// have always read them that way).
    pub fn cuda_params(&self) -> Result<AttentionParams, Error> {
        let p = self.params()?;
        Ok(AttentionParams {
            scale: p.scale.filter(|&s| s != 0.0),
            logit_soft_cap: p.logit_soft_cap.filter(|&c| c != 0.0),
            chunk_size: p.chunk_size.filter(|&c| c != 0),
            ..p
        })
    }
}

/// Shape of an attention query: `[tokens, num_qo_heads, head_dim]`.
pub fn query_shape(q: &[usize], tokens: &str) -> Result<[usize; 3], Error> {
    match q {
        &[n, h, d] => Ok([n, h, d]),
        _ => Err(Error::Shape {
            param: "q".into(),
            expected: format!("[{tokens}, num_qo_heads, head_dim]"),
            got: format!("{q:?}"),
        }),
    }
}
