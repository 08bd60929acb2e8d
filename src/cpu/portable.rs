//! The portable kernels: plain loops, for CPUs without AVX2 and as the reference the SIMD
//! kernels are tested against.

use super::convert::load_row;
use crate::dtype::DType;

unsafe fn row<'a>(p: *const u8, d: usize, dtype: DType) -> &'a [u8] {
    std::slice::from_raw_parts(p, d * dtype.size())
}

pub unsafe fn scores(q: &[f32], rows: usize, d: usize, k_rows: &[*const u8], dtype: DType, out: &mut [f32]) {
    let t = k_rows.len();
    let mut k = vec![0f32; d];
    for (j, &kp) in k_rows.iter().enumerate() {
        let kb = row(kp, d, dtype);
        load_row(kb, dtype, &mut k);
        for r in 0..rows {
            out[r * t + j] = q[r * d..(r + 1) * d].iter().zip(&k).map(|(a, b)| a * b).sum();
        }
    }
}

pub unsafe fn accumulate(o: &mut [f32], rows: usize, d: usize, v_rows: &[*const u8], dtype: DType, p: &[f32]) {
    let t = v_rows.len();
    let mut v = vec![0f32; d];
    for (j, &vp) in v_rows.iter().enumerate() {
        let vb = row(vp, d, dtype);
        load_row(vb, dtype, &mut v);
        for r in 0..rows {
            let w = p[r * t + j];
            for (oc, vc) in o[r * d..(r + 1) * d].iter_mut().zip(&v) {
                *oc += w * vc;
            }
        }
    }
}
