//! The inputs the selection methods read: keys of one (sequence, layer) from a cache or a
//! tensor ([`KeySource`]), and a decode query as f32 rows ([`read_query`]).

use crate::error::{Error, Result};
use crate::kv::{KvCache, SeqId};
use crate::tensor::TensorView;

/// Where the keys of one (sequence, layer) come from, for GemFilter, SnapKV and clustering.
#[derive(Clone, Copy)]
pub enum KeySource<'a> {
    /// Keys of `seq` at `layer` in a cache (stored after RoPE).
    Cache { cache: &'a KvCache, seq: SeqId, layer: usize },
    /// A tensor `[n, num_kv_heads, head_dim]` of keys (after RoPE), any dtype and strides.
    Tensor(&'a TensorView<'a>),
}

/// A decode query as f32 `[num_qo_heads * head_dim]`, from a `[num_qo_heads, head_dim]` or
/// `[1, num_qo_heads, head_dim]` view. Returns the values and `num_qo_heads`.
pub(crate) fn read_query(q: &TensorView, head_dim: usize) -> Result<(Vec<f32>, usize)> {
    let shape = q.shape();
    let (lead, hq) = match *shape {
        [hq, d] if d == head_dim => (vec![], hq),
        [1, hq, d] if d == head_dim => (vec![0], hq),
        _ => {
            let got: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
            return Err(Error::shape(
                "q",
                format!("[num_qo_heads, {head_dim}] or [1, num_qo_heads, {head_dim}]"),
                format!("[{}]", got.join(", ")),
            ));
        }
    };
    let mut out = vec![0f32; hq * head_dim];
    let mut index = lead;
    index.push(0);
    for (h, row) in out.chunks_exact_mut(head_dim).enumerate() {
        *index.last_mut().expect("pushed") = h;
        q.read_row(&index, row);
    }
    Ok((out, hq))
}
