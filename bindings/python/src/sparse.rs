//! Arguments of sparse attention and compaction: prefill row windows and the token lists
//! `KvCache.compact` keeps.

use kvsieve::attention::StreamingWindow;
use kvsieve::Error;
use pyo3::prelude::*;

use crate::arrays::{int_vec, items, u32_vec, usize_arg};
use crate::errors::KvResultExt;

/// `windows=`: None (no row mask), or one entry per KV head, each None or a
/// `(sinks, window)` pair of ints.
pub fn windows_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Option<StreamingWindow>>> {
    let Some(obj) = obj else { return Ok(Vec::new()) };
    items(obj, "windows", "None or (sinks, window) pairs, one per KV head")?
        .iter()
        .enumerate()
        .map(|(h, w)| {
            if w.is_none() {
                return Ok(None);
            }
            let param = format!("windows[{h}]");
            let pair = int_vec(w, &param).ok().filter(|p| p.len() == 2).ok_or_else(|| Error::InvalidArgument {
                param: param.clone(),
                expected: "None or a (sinks, window) pair of ints".into(),
            });
            let pair = pair.kv()?;
            let sinks = usize_arg(pair[0], &format!("{param}.sinks"))?;
            let window = usize_arg(pair[1], &format!("{param}.window"))?;
            Ok(Some(StreamingWindow { sinks, window }))
        })
        .collect()
}

/// How `keep=` of `KvCache.compact` is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KeepPer {
    /// One token list for every layer and head.
    All,
    /// One list per layer.
    Layer,
    /// One list per (layer, KV head), layer-major.
    Head,
}

pub fn parse_keep_per(per: &str) -> Result<KeepPer, Error> {
    match per.to_ascii_lowercase().as_str() {
        "all" => Ok(KeepPer::All),
        "layer" => Ok(KeepPer::Layer),
        "head" => Ok(KeepPer::Head),
        _ => Err(Error::InvalidArgument {
            param: "per".into(),
            expected: format!(
                "\"all\" (one list), \"layer\" (one per layer) or \"head\" (one per (layer, KV head), layer-major), got {per:?}"
            ),
        }),
    }
}

/// The token lists of `keep=`: one list for `per="all"`, else one per item of `keep`.
pub fn keep_lists(keep: &Bound<'_, PyAny>, per: KeepPer) -> PyResult<Vec<Vec<u32>>> {
    match per {
        KeepPer::All => Ok(vec![u32_vec(keep, "keep")?]),
        KeepPer::Layer | KeepPer::Head => items(keep, "keep", "1-D integer arrays")?
            .iter()
            .enumerate()
            .map(|(i, l)| u32_vec(l, &format!("keep[{i}]")))
            .collect(),
    }
}
