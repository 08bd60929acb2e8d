//! `merge_states`: combine two partial attention results over disjoint key sets by their LSEs.

use crate::attention::kernel::merge_into;
use crate::error::{Error, Result};
use crate::tensor::{TensorView, TensorViewMut};

/// Merge `(v_a, lse_a)` and `(v_b, lse_b)` into `(out, lse_out)`. The values are
/// `[n, heads, head_dim]` normalised attention outputs; the LSEs `[n, heads]` (natural log).
/// The result equals attention over the union of the two key sets. A state with LSE `-inf`
/// (no keys) contributes nothing.
pub fn merge_states(
    v_a: &TensorView,
    lse_a: &[f32],
    v_b: &TensorView,
    lse_b: &[f32],
    out: &mut TensorViewMut,
    lse_out: &mut [f32],
) -> Result<()> {
    if v_a.shape().len() != 3 {
        return Err(Error::shape("v_a", "[n, heads, head_dim]", format!("{:?}", v_a.shape())));
    }
    let (n, h, d) = (v_a.shape()[0], v_a.shape()[1], v_a.shape()[2]);
    let want = [Some(n), Some(h), Some(d)];
    v_b.expect_shape("v_b", &want)?;
    out.expect_shape("out", &want)?;
    for (name, l) in [("lse_a", lse_a.len()), ("lse_b", lse_b.len()), ("lse_out", lse_out.len())] {
        if l != n * h {
            return Err(Error::shape(name, format!("[{n}, {h}] ({} values)", n * h), format!("{l} values")));
        }
    }
    let mut a = vec![0f32; d];
    let mut b = vec![0f32; d];
    for i in 0..n {
        for j in 0..h {
            v_a.read_row(&[i, j], &mut a);
            v_b.read_row(&[i, j], &mut b);
            let mut l = lse_a[i * h + j];
            if l == f32::NEG_INFINITY {
                a.fill(0.0);
            }
            merge_into(&mut a, &mut l, &b, lse_b[i * h + j]);
            out.write_row(&[i, j], &a);
            lse_out[i * h + j] = l;
        }
    }
    Ok(())
}
