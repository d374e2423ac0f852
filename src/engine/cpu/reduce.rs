//! CPU kernel of the reduction primitive (sum, mean, max, min over any set of axes, keeping
//! them with size 1). Trailing-axis reductions (LayerNorm, Softmax) reduce contiguous blocks
//! in parallel; other axis sets accumulate row by row into the broadcast output.

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::Real;
use crate::engine::program::broadcast_strides;

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
    let mut out = if trailing && count > 0 {
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
