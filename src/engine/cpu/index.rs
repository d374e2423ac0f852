//! CPU kernels of the index primitives: Gather and its adjoint (scatter-add),
//! GatherElements, ScatterElements, ArgMax and TopK indices. Indices are carried as floats;
//! negative indices count from the end, out-of-range ones are an error.

use super::Real;
use crate::engine::program::strides;

fn index<T: Real>(v: T, dim: usize) -> Result<usize, String> {
    let i = v.to_f64c() as i64;
    let j = if i < 0 { i + dim as i64 } else { i };
    if j < 0 || j as usize >= dim {
        return Err(format!("index {i} is out of range for a dimension of {dim}"));
    }
    Ok(j as usize)
}

pub fn gather<T: Real>(data: &[T], d_shape: &[usize], idx: &[T], axis: usize) -> Result<Vec<T>, String> {
    let outer: usize = d_shape[..axis].iter().product();
    let inner: usize = d_shape[axis + 1..].iter().product();
    let len = d_shape[axis];
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let j = index(i, len)?;
            let s = (o * len + j) * inner;
            out.extend_from_slice(&data[s..s + inner]);
        }
    }
    Ok(out)
}

pub fn gather_grad<T: Real>(idx: &[T], dy: &[T], d_shape: &[usize], axis: usize) -> Result<Vec<T>, String> {
    let outer: usize = d_shape[..axis].iter().product();
    let inner: usize = d_shape[axis + 1..].iter().product();
    let len = d_shape[axis];
    let mut out = vec![T::zero(); d_shape.iter().product()];
    let mut r = 0;
    for o in 0..outer {
        for &i in idx {
            let j = index(i, len)?;
            let s = (o * len + j) * inner;
            for (d, &g) in out[s..s + inner].iter_mut().zip(&dy[r..r + inner]) {
                *d += g;
            }
            r += inner;
        }
    }
    Ok(out)
}

/// For each element of `idx_shape`: (its flat index, flat index into data along `axis`).
fn element_pairs<T: Real>(
    idx: &[T],
    idx_shape: &[usize],
    d_shape: &[usize],
    axis: usize,
    mut f: impl FnMut(usize, usize),
) -> Result<(), String> {
    let ds = strides(d_shape);
    let r = idx_shape.len();
    let mut pos = vec![0usize; r];
    for (flat, &v) in idx.iter().enumerate() {
        let j = index(v, d_shape[axis])?;
        let mut off = 0;
        for ax in 0..r {
            off += if ax == axis { j } else { pos[ax] } * ds[ax];
        }
        f(flat, off);
        for ax in (0..r).rev() {
            pos[ax] += 1;
            if pos[ax] < idx_shape[ax] {
                break;
            }
            pos[ax] = 0;
        }
    }
    Ok(())
}

pub fn gather_elements<T: Real>(
    data: &[T],
    d_shape: &[usize],
    idx: &[T],
    idx_shape: &[usize],
    axis: usize,
) -> Result<Vec<T>, String> {
    let mut out = vec![T::zero(); idx.len()];
    element_pairs(idx, idx_shape, d_shape, axis, |i, o| out[i] = data[o])?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
pub fn scatter_elements<T: Real>(
    data: &[T],
    d_shape: &[usize],
    idx: &[T],
    idx_shape: &[usize],
    upd: &[T],
    axis: usize,
    add: bool,
) -> Result<Vec<T>, String> {
    let mut out = data.to_vec();
    element_pairs(idx, idx_shape, d_shape, axis, |i, o| if add { out[o] += upd[i] } else { out[o] = upd[i] })?;
    Ok(out)
}

/// (outer, len, inner) around `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

pub fn argmax<T: Real>(x: &[T], shape: &[usize], axis: usize, select_last: bool, min: bool) -> Vec<T> {
    let (outer, len, inner) = split(shape, axis);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for j in 1..len {
                let (v, b) = (x[(o * len + j) * inner + i], x[(o * len + best) * inner + i]);
                let better = if min { v < b || (select_last && v == b) } else { v > b || (select_last && v == b) };
                if better {
                    best = j;
                }
            }
            out.push(T::c(best as f64));
        }
    }
    out
}

pub fn topk_indices<T: Real>(x: &[T], shape: &[usize], axis: usize, k: usize, largest: bool) -> Vec<T> {
    let (outer, len, inner) = split(shape, axis);
    let mut out = vec![T::zero(); outer * k * inner];
    for o in 0..outer {
        for i in 0..inner {
            let mut order: Vec<usize> = (0..len).collect();
            let val = |j: usize| x[(o * len + j) * inner + i];
            // Stable sort: equal values keep the lower index first, as ONNX requires.
            order.sort_by(|&p, &q| {
                let c = val(p).partial_cmp(&val(q)).unwrap_or(std::cmp::Ordering::Equal);
                if largest {
                    c.reverse()
                } else {
                    c
                }
            });
            for (r, &j) in order.iter().take(k).enumerate() {
                out[(o * k + r) * inner + i] = T::c(j as f64);
            }
        }
    }
    out
}
