//! CPU kernels of the layout primitives: transpose, slice, embed (the adjoint of slice and
//! constant padding) and concat. All are strided copies: output element i reads the input
//! at `base + Σ index_k · stride_k`, with signed strides for negative slice steps.

use rayon::prelude::*;

use super::elementwise::PAR_MIN;
use super::Real;
use crate::engine::program::strides;

/// out[idx] = x[base + Σ idx_k · st_k] for every idx of `out_shape`.
pub fn strided_read<T: Real>(x: &[T], base: isize, st: &[isize], out_shape: &[usize]) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let r = out_shape.len();
    if n == 0 {
        return Vec::new();
    }
    // Every element is written below, so the output is not zeroed first.
    let mut out: Vec<T> = Vec::with_capacity(n);
    let inner = if r == 0 { 1 } else { out_shape[r - 1] };
    let is = if r == 0 { 0 } else { st[r - 1] };
    let row_base = |row: usize| -> isize {
        let mut off = base;
        let mut rem = row;
        for ax in (0..r.saturating_sub(1)).rev() {
            off += (rem % out_shape[ax]) as isize * st[ax];
            rem /= out_shape[ax];
        }
        off
    };
    let body = |(row, o): (usize, &mut [std::mem::MaybeUninit<T>])| {
        let b = row_base(row);
        if is == 1 {
            let src = &x[b as usize..b as usize + inner];
            assert_eq!(o.len(), src.len());
            // SAFETY: `o` and `src` have the same length (checked) and do not overlap (`o` is
            // the output's fresh allocation); T is Copy. What `write_copy_of_slice` does, which
            // needs Rust 1.93 (the crate's MSRV is 1.85).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), o.as_mut_ptr() as *mut T, src.len()) };
        } else {
            for (j, v) in o.iter_mut().enumerate() {
                v.write(x[(b + j as isize * is) as usize]);
            }
        }
    };
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PAR_MIN {
        spare.par_chunks_mut(inner).enumerate().for_each(body);
    } else {
        spare.chunks_mut(inner).enumerate().for_each(body);
    }
    // SAFETY: each of the n / inner rows of `inner` elements was written above.
    unsafe { out.set_len(n) };
    out
}

pub fn transpose<T: Real>(x: &[T], x_shape: &[usize], perm: &[usize]) -> Vec<T> {
    let xs = strides(x_shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| x_shape[p]).collect();
    let st: Vec<isize> = perm.iter().map(|&p| xs[p] as isize).collect();
    strided_read(x, 0, &st, &out_shape)
}

pub fn slice<T: Real>(x: &[T], x_shape: &[usize], starts: &[usize], steps: &[isize], out_shape: &[usize]) -> Vec<T> {
    let xs = strides(x_shape);
    let base: isize = starts.iter().zip(&xs).map(|(&s, &t)| (s * t) as isize).sum();
    let st: Vec<isize> = steps.iter().zip(&xs).map(|(&p, &t)| p * t as isize).collect();
    strided_read(x, base, &st, out_shape)
}

/// out = fill, then out[start + i·step] = x[i].
pub fn embed<T: Real>(
    x: &[T],
    x_shape: &[usize],
    starts: &[usize],
    steps: &[isize],
    fill: T,
    out_shape: &[usize],
) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut out = vec![fill; n];
    let os = strides(out_shape);
    let r = x_shape.len();
    let base: isize = starts.iter().zip(&os).map(|(&s, &t)| (s * t) as isize).sum();
    let st: Vec<isize> = steps.iter().zip(&os).map(|(&p, &t)| p * t as isize).collect();
    let inner = if r == 0 { 1 } else { x_shape[r - 1] };
    if x.is_empty() || inner == 0 {
        return out;
    }
    let is = if r == 0 { 0 } else { st[r - 1] };
    for (row, xr) in x.chunks(inner).enumerate() {
        let mut off = base;
        let mut rem = row;
        for ax in (0..r.saturating_sub(1)).rev() {
            off += (rem % x_shape[ax]) as isize * st[ax];
            rem /= x_shape[ax];
        }
        for (j, &v) in xr.iter().enumerate() {
            out[(off + j as isize * is) as usize] = v;
        }
    }
    out
}

pub fn concat<T: Real>(parts: &[(&[T], &[usize])], axis: usize, out_shape: &[usize]) -> Vec<T> {
    let outer: usize = out_shape[..axis].iter().product();
    let inner: usize = out_shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for o in 0..outer {
        for (x, s) in parts {
            let row = s[axis] * inner;
            out.extend_from_slice(&x[o * row..(o + 1) * row]);
        }
    }
    out
}
