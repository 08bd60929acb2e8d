//! `kvsieve_apply_rope`: rotary position embedding in place on a caller tensor.

use kvsieve::attention::apply_rope;

use super::args::{check_disjoint, slice, Region};
use super::error::{guard, kvsieve_error_t};
use super::params::{kvsieve_rope_config_t, rope_config};
use super::tensor::{kvsieve_tensor_t, Tensor};

/// Rotate `x` (`[n, heads, head_dim]`) in place, token `i` at `positions[i]`.
///
/// # Safety
/// 1. `x` is NULL or a valid descriptor whose data is readable and writable;
/// 2. `positions` is NULL or readable for `num_positions` values; `rope` is NULL or readable.
#[no_mangle]
pub unsafe extern "C" fn kvsieve_apply_rope(
    x: *const kvsieve_tensor_t,
    positions: *const i32,
    num_positions: usize,
    rope: *const kvsieve_rope_config_t,
) -> *mut kvsieve_error_t {
    guard("kvsieve_apply_rope", || {
        let x = Tensor::parse(x, "x", &["n", "heads", "head_dim"])?;
        let cfg = rope_config(rope, "rope")?;
        check_disjoint(&[x.region()], &[Region::of(positions, num_positions, "positions")])?;
        let positions = slice(positions, num_positions, "positions")?;
        apply_rope(&mut x.view_mut()?, positions, &cfg)
    })
}
