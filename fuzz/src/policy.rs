//! The policy text parser: grammar-shaped texts with random numbers (boundaries and huge
//! values included), mutated texts and random bytes. A text must parse or give a parse
//! error inside the text; a parsed policy must print a form that parses back to itself, and
//! validating it against any model shape must answer quickly.

use kvsieve::{ErrorCode, Policy};

use crate::rng::Rng;

const KEYS: [&str; 15] = [
    "sinks",
    "window",
    "pages",
    "min_pages",
    "clusters",
    "clusters_k",
    "cluster_size",
    "hier",
    "global",
    "local",
    "max_distance",
    "positions",
    "rank",
    "topk",
    "span",
];
const NOISE: [&str; 12] = [";", ":", ",", "=", "-", ".", " ", "layers=", "heads=", "dense", "\u{e9}", "\t"];

fn number(r: &mut Rng) -> String {
    r.size().to_string()
}

fn item(r: &mut Rng) -> String {
    if r.chance(0.1) {
        return "dense".into();
    }
    let k = *r.pick(&KEYS);
    match k {
        "positions" => format!("positions={}", r.pick(&["original", "contiguous", "capped", "other"])),
        "rank" => format!("rank={}", r.pick(&["estimate", "mixed", "x"])),
        _ => format!("{k}={}", number(r)),
    }
}

fn spec(r: &mut Rng) -> String {
    (0..1 + r.below(4)).map(|_| item(r)).collect::<Vec<_>>().join(",")
}

fn clause(r: &mut Rng) -> String {
    match r.below(4) {
        0 => {
            let ranges: Vec<String> = (0..1 + r.below(3))
                .map(|_| if r.chance(0.5) { number(r) } else { format!("{}-{}", number(r), number(r)) })
                .collect();
            format!("layers={}:{}", ranges.join(","), spec(r))
        }
        1 => {
            let heads: Vec<String> = (0..1 + r.below(3)).map(|_| format!("{}.{}", number(r), number(r))).collect();
            format!("heads={}:{}", heads.join(","), spec(r))
        }
        _ => spec(r),
    }
}

/// One input from a seed.
pub fn generate(r: &mut Rng) -> String {
    let mut text = (0..1 + r.below(4)).map(|_| clause(r)).collect::<Vec<_>>().join(";");
    match r.below(5) {
        0 => {
            // Random edits of a well-formed text.
            for _ in 0..1 + r.below(4) {
                let mut chars: Vec<char> = text.chars().collect();
                let at = r.below(chars.len() as u64 + 1) as usize;
                match r.below(3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => chars.splice(at..at, r.pick(&NOISE).chars()).for_each(drop),
                    _ => chars.truncate(at),
                }
                text = chars.into_iter().collect();
            }
        }
        1 => {
            let bytes: Vec<u8> = (0..r.below(40)).map(|_| r.next_u64() as u8).collect();
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        _ => {}
    }
    text
}

/// Check one text (see the module docs).
pub fn check(text: &str, layers: usize, heads: usize) -> Result<(), String> {
    let p = match Policy::parse(text) {
        Err(e) => {
            return match e {
                kvsieve::Error::Parse { offset, .. } if offset <= text.len() => Ok(()),
                other => Err(format!("{text:?}: parse failed with {other:?} (expected a parse error inside the text)")),
            }
        }
        Ok(p) => p,
    };
    let printed = p.to_string();
    match Policy::parse(&printed) {
        Ok(back) if back == p => {}
        Ok(back) => return Err(format!("{text:?} printed as {printed:?}, which parses to another policy: {back:?}")),
        Err(e) => return Err(format!("{text:?} printed as {printed:?}, which does not parse: {e}")),
    }
    match p.validate(layers, heads) {
        Ok(()) => {
            for layer in [0, layers / 2, layers - 1] {
                let _ = (
                    p.position_mode(layer),
                    p.is_dense(layer),
                    p.uses_clusters(layer, heads),
                    p.cluster_plan(layer, heads),
                );
            }
            p.window_pages_to_evict(layers, heads, 1 << 20, 16)
                .map_err(|e| format!("{text:?}: valid, but eviction planning failed: {e}"))?;
        }
        Err(e) if matches!(e.code(), ErrorCode::InvalidArgument | ErrorCode::OutOfRange) => {}
        Err(e) => return Err(format!("{text:?}: validate({layers}, {heads}) failed with an unexpected kind: {e}")),
    }
    Ok(())
}

/// A model shape to validate against: usually realistic, sometimes at the bounds.
pub fn shape(r: &mut Rng) -> (usize, usize) {
    match r.below(8) {
        0 => (kvsieve::config::MAX_LAYERS, kvsieve::config::MAX_KV_HEADS),
        1 => (1 + r.below(1 << 16) as usize, 1 + r.below(1 << 16) as usize),
        _ => (1 + r.below(64) as usize, 1 + r.below(16) as usize),
    }
}
