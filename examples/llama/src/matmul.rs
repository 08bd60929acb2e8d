//! Dense f32 matrix products for the linear layers: `y = x · Wᵀ` with `W` row-major
//! `[out, in]` (GGUF's layout: each output's weights contiguous), split over rayon threads
//! by output columns. Few rows (decode) use dot products, which read each weight once;
//! more rows use matrixmultiply's blocked sgemm.

use rayon::prelude::*;

/// A row-major `[rows, cols]` f32 matrix: `rows` outputs of `cols` inputs each.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix { rows, cols, data }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Rows at or below this use dot products instead of sgemm.
const GEMV_ROWS: usize = 4;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: threads write disjoint column ranges of the output through it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y[n, w.rows] = x[n, w.cols] · wᵀ`, overwriting `y`.
pub fn matmul(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    assert_eq!(x.len(), n * k, "matmul: x is [n, in]");
    assert_eq!(y.len(), n * m, "matmul: y is [n, out]");
    if n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if n <= GEMV_ROWS {
        let block = m.div_ceil(threads * 8).max(16);
        let out = SendPtr(y.as_mut_ptr());
        (0..m.div_ceil(block)).into_par_iter().for_each(|b| {
            // The whole wrapper is captured (a closure would otherwise take the raw field).
            #[allow(clippy::redundant_locals)]
            let out = out;
            for j in b * block..((b + 1) * block).min(m) {
                let wr = w.row(j);
                for i in 0..n {
                    // SAFETY: (i, j) is in bounds and column j belongs to this task only.
                    unsafe { *out.0.add(i * m + j) = dot(&x[i * k..(i + 1) * k], wr) };
                }
            }
        });
        return;
    }
    let block = m.div_ceil(threads * 2).max(64).next_multiple_of(16);
    let out = SendPtr(y.as_mut_ptr());
    (0..m.div_ceil(block)).into_par_iter().for_each(|b| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        let j0 = b * block;
        let cols = block.min(m - j0);
        // SAFETY: A is x ([n, k], row stride k); B is wᵀ restricted to columns j0..j0+cols
        // (element (p, j) = w[j0 + j][p]: row stride 1, column stride k); C is y's columns
        // j0..j0+cols (row stride m), written by this task only.
        unsafe {
            matrixmultiply::sgemm(
                n,
                k,
                cols,
                1.0,
                x.as_ptr(),
                k as isize,
                1,
                w.data.as_ptr().add(j0 * k),
                1,
                k as isize,
                0.0,
                out.0.add(j0),
                m as isize,
                1,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &Matrix) -> Vec<f32> {
        let mut y = vec![0f32; n * w.rows];
        for i in 0..n {
            for j in 0..w.rows {
                y[i * w.rows + j] =
                    (0..w.cols).map(|p| x[i * w.cols + p] as f64 * w.row(j)[p] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_naive_for_gemv_and_gemm_shapes() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(n, k, m) in &[(1, 70, 33), (3, 64, 200), (17, 130, 301), (64, 576, 192)] {
            let x: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let w = Matrix::new(m, k, (0..m * k).map(|_| rnd()).collect());
            let mut y = vec![f32::NAN; n * m];
            matmul(&x, n, &w, &mut y);
            for (a, b) in y.iter().zip(naive(&x, n, &w)) {
                assert!((a - b).abs() < 1e-4, "{n}x{k}x{m}: {a} vs {b}");
            }
        }
    }
}
