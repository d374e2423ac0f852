//! CPU kernels of the row-wise primitives (`Prim::Rows`, `Prim::RowsGrad`): LayerNorm's
//! normalisation and Softmax over the last axis, each row read and written in one pass
//! (WGSL twin: shaders/rows.wgsl, all four ops). Rows are independent and each
//! is computed by one thread in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::elementwise::{wide1, wide1_self, wide2, wide2_self, PAR_MIN};
use super::Real;
use crate::engine::program::RowOp;

/// `f(out_row, row index)` over the rows of `len` elements, in parallel for large outputs.
fn each_row<T: Real>(n: usize, len: usize, f: impl Fn(&mut [T], usize) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); n];
    if len == 0 {
        return out;
    }
    if n >= PAR_MIN {
        out.par_chunks_mut(len).enumerate().for_each(|(r, o)| f(o, r));
    } else {
        out.chunks_mut(len).enumerate().for_each(|(r, o)| f(o, r));
    }
    out
}

/// Σ f(a[i], b[i]) with 8 interleaved partial sums (so the loop vectorises), combined in a
/// fixed order: the same value whatever the thread or CPU.
#[inline(always)]
fn sum2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[k] += f(x, y);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// 1 / sqrt(var + eps) of a row; `d` receives x − mean.
fn centre<T: Real>(x: &[T], d: &mut [T], eps: f32) -> T {
    let n = T::c(x.len() as f64);
    let mean = sum2(x, x, |v, _| v) / n;
    wide1::<true, _>(d, x, &|v| v - mean);
    let var = sum2(d, d, |a, b| a * b) / n;
    T::one() / (var + T::c(eps as f64)).sqrt()
}

/// The op over each row of `len` elements of `x`.
pub fn rows<T: Real>(op: RowOp, x: &[T], len: usize) -> Vec<T> {
    each_row(x.len(), len, |o, r| {
        let x = &x[r * len..(r + 1) * len];
        match op {
            RowOp::Normalize(eps) => {
                let inv = centre(x, o, eps);
                wide1_self::<true, _>(o, &|d| d * inv);
            }
            RowOp::Softmax => {
                let m = x.iter().copied().fold(T::neg_infinity(), T::max);
                wide1::<true, _>(o, x, &|v| (v - m).exp_fast());
                let s = sum2(o, o, |e, _| e);
                wide1_self::<true, _>(o, &|e| e / s);
            }
        }
    })
}

/// dx from `a` (Normalize: its input x; Softmax: its output y) and dy, row by row:
/// Normalize: inv · (dy − mean(dy) − x̂ · mean(dy · x̂)); Softmax: y · (dy − Σ dy · y).
pub fn rows_grad<T: Real>(op: RowOp, a: &[T], dy: &[T], len: usize) -> Vec<T> {
    each_row(a.len(), len, |o, r| {
        let (a, dy) = (&a[r * len..(r + 1) * len], &dy[r * len..(r + 1) * len]);
        match op {
            RowOp::Normalize(eps) => {
                // o holds x − mean, then x̂, then dx.
                let inv = centre(a, o, eps);
                wide1_self::<true, _>(o, &|d| d * inv);
                let n = T::c(len as f64);
                let g = sum2(dy, dy, |d, _| d) / n;
                let gx = sum2(dy, o, |d, h| d * h) / n;
                wide2_self::<true, _>(o, dy, &|h, d| inv * (d - g - h * gx));
            }
            RowOp::Softmax => {
                let dot = sum2(a, dy, |y, d| y * d);
                wide2::<true, _>(o, a, dy, &|y, d| y * (d - dot));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernels against the formulas they fuse, in f64 on rows of several lengths
    /// (one and two elements included), and the derivatives against central differences.
    #[test]
    fn rows_match_their_definitions_and_finite_differences() {
        for len in [1usize, 2, 7, 64, 300] {
            let x: Vec<f64> = (0..3 * len).map(|i| ((i * 7919) % 101) as f64 / 17.0 - 2.9).collect();
            let dy: Vec<f64> = (0..3 * len).map(|i| ((i * 31) % 53) as f64 / 11.0 - 2.4).collect();
            for op in [RowOp::Normalize(1e-5), RowOp::Softmax] {
                let y = rows(op, &x, len);
                for r in 0..3 {
                    let row = &x[r * len..(r + 1) * len];
                    let want: Vec<f64> = match op {
                        RowOp::Normalize(eps) => {
                            let mean = row.iter().sum::<f64>() / len as f64;
                            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
                            row.iter().map(|v| (v - mean) / (var + eps as f64).sqrt()).collect()
                        }
                        RowOp::Softmax => {
                            let s: f64 = row.iter().map(|v| v.exp()).sum();
                            row.iter().map(|v| v.exp() / s).collect()
                        }
                    };
                    for (j, w) in want.iter().enumerate() {
                        assert!((y[r * len + j] - w).abs() < 1e-12, "{op:?} len {len}: {} vs {w}", y[r * len + j]);
                    }
                }
                // ⟨dy, f(x)⟩ differentiated numerically, element by element.
                let a = if op == RowOp::Softmax { y.clone() } else { x.clone() };
                let dx = rows_grad(op, &a, &dy, len);
                let loss = |x: &[f64]| -> f64 { rows(op, x, len).iter().zip(&dy).map(|(a, b)| a * b).sum() };
                for i in 0..3 * len {
                    let h = 1e-6;
                    let (mut xp, mut xm) = (x.clone(), x.clone());
                    xp[i] += h;
                    xm[i] -= h;
                    let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
                    assert!(
                        (dx[i] - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                        "{op:?}' len {len} at {i}: {} vs {fd}",
                        dx[i]
                    );
                }
            }
        }
    }
}
