//! CPU kernel of the reduction primitive (sum, mean, max, min over any set of axes, keeping
//! them with size 1). Trailing-axis reductions (LayerNorm, Softmax) reduce contiguous blocks
//! in parallel; other axis sets accumulate row by row into the broadcast output.

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::Real;
use crate::engine::program::broadcast_strides;

/// Rows per block of a leading-axes reduction.
const LEAD_ROWS: usize = 128;

/// Reduction into a keepdims output: `out[broadcast index] op= x[i]` for every element.
pub fn reduce<T: Real>(op: crate::engine::program::ReduceOp, x: &[T], x_shape: &[usize], axes: &[usize]) -> Vec<T> {
    use crate::engine::program::ReduceOp;
    let mut out_shape = x_shape.to_vec();
    for &a in axes {
        out_shape[a] = 1;
    }
    let n_out: usize = out_shape.iter().product();
    let count: usize = axes.iter().map(|&a| x_shape[a]).product();
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => T::zero(),
        ReduceOp::Max => T::neg_infinity(),
        ReduceOp::Min => T::infinity(),
    };
    let r = x_shape.len();
    let trailing = !axes.is_empty() && {
        let mut s = axes.to_vec();
        s.sort();
        s.iter().enumerate().all(|(i, &a)| a == r - s.len() + i)
    };
    let fold = |acc: T, v: T| match op {
        ReduceOp::Sum | ReduceOp::Mean => acc + v,
        ReduceOp::Max => acc.max(v),
        ReduceOp::Min => acc.min(v),
    };
    let leading = !axes.is_empty() && {
        let mut s = axes.to_vec();
        s.sort();
        s.iter().enumerate().all(|(i, &a)| a == i)
    };
    let mut out = if leading && !trailing && count > 0 && n_out > 0 {
        // x is [count, n_out] (a bias gradient): rows summed into the output, in blocks of
        // LEAD_ROWS rows whose partial results are then folded in order, so the result does
        // not depend on the thread count.
        let partial = |rows: &[T]| -> Vec<T> {
            let mut acc = vec![init; n_out];
            for r in rows.chunks(n_out) {
                for (a, &v) in acc.iter_mut().zip(r) {
                    *a = fold(*a, v);
                }
            }
            acc
        };
        let block = LEAD_ROWS * n_out;
        let parts: Vec<Vec<T>> = if x.len() >= PAR_MIN {
            x.par_chunks(block).map(partial).collect()
        } else {
            x.chunks(block).map(partial).collect()
        };
        let mut out = vec![init; n_out];
        for p in parts {
            for (a, v) in out.iter_mut().zip(p) {
                *a = fold(*a, v);
            }
        }
        out
    } else if trailing && count > 0 {
        let blocks: Vec<T> = if x.len() >= PAR_MIN {
            x.par_chunks(count).map(|c| c.iter().fold(init, |a, &v| fold(a, v))).collect()
        } else {
            x.chunks(count).map(|c| c.iter().fold(init, |a, &v| fold(a, v))).collect()
        };
        blocks
    } else {
        let mut out = vec![init; n_out];
        let so = broadcast_strides(&out_shape, x_shape);
        // Sequential: different input rows may hit the same output element.
        let inner = if r == 0 { 1 } else { x_shape[r - 1] };
        let is = if r == 0 { 0 } else { so[r - 1] };
        if inner > 0 {
            for (row, xr) in x.chunks(inner).enumerate() {
                let mut off = 0;
                let mut rem = row;
                for ax in (0..r.saturating_sub(1)).rev() {
                    off += (rem % x_shape[ax]) * so[ax];
                    rem /= x_shape[ax];
                }
                for (j, &v) in xr.iter().enumerate() {
                    let o = &mut out[off + j * is];
                    *o = fold(*o, v);
                }
            }
        }
        out
    };
    if op == ReduceOp::Mean && count > 0 {
        let inv = T::one() / T::c(count as f64);
        out.iter_mut().for_each(|v| *v = *v * inv);
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::engine::program::ReduceOp;

    /// The leading-axes path (blocks folded in order) against a plain loop over every
    /// element, for each op, below and above the parallel threshold.
    #[test]
    fn leading_axes_match_plain_loop() {
        for (shape, axes) in
            [(vec![3usize, 5, 7], vec![0usize]), (vec![4, 300, 40], vec![0, 1]), (vec![2, 9, 130, 3], vec![1, 0])]
        {
            let n: usize = shape.iter().product();
            let x: Vec<f64> = (0..n).map(|i| ((i * 7919) % 1013) as f64 / 97.0 - 5.0).collect();
            let inner: usize = shape[axes.len()..].iter().product();
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                let got = super::reduce(op, &x, &shape, &axes);
                let mut want = vec![
                    match op {
                        ReduceOp::Max => f64::NEG_INFINITY,
                        ReduceOp::Min => f64::INFINITY,
                        _ => 0.0,
                    };
                    inner
                ];
                for (i, &v) in x.iter().enumerate() {
                    let w = &mut want[i % inner];
                    *w = match op {
                        ReduceOp::Max => w.max(v),
                        ReduceOp::Min => w.min(v),
                        _ => *w + v,
                    };
                }
                if op == ReduceOp::Mean {
                    want.iter_mut().for_each(|w| *w /= (n / inner) as f64);
                }
                assert_eq!(got.len(), inner, "{shape:?} {axes:?}");
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-9 * (1.0 + w.abs()), "{op:?} {shape:?} {axes:?}: {g} vs {w}");
                }
            }
        }
    }
}
