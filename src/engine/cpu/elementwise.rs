//! CPU kernels of the elementwise primitives: unary ops and their derivatives, binary ops
//! with numpy broadcasting, and Where. Broadcasting walks the output row by row (the last
//! axis is the inner loop, with stride 0 for a broadcast operand); rows are split across
//! threads when the tensor is large.

use rayon::prelude::*;

use super::Real;
use crate::engine::program::{broadcast_strides, BinaryOp, UnaryOp};

/// Tensors at least this large are processed in parallel.
pub const PAR_MIN: usize = 1 << 15;

pub fn unary_f<T: Real>(op: UnaryOp, x: T) -> T {
    let zero = T::zero();
    let one = T::one();
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Recip => one / x,
        UnaryOp::Erf => x.erf(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => one / (one + (-x).exp()),
        UnaryOp::Relu => {
            if x > zero {
                x
            } else {
                zero
            }
        }
        UnaryOp::Abs => x.abs(),
        UnaryOp::Floor => x.floor(),
        UnaryOp::Ceil => x.ceil(),
        UnaryOp::Trunc => x.trunc(),
        UnaryOp::NonZero => T::from_bool(x != zero),
        UnaryOp::Not => T::from_bool(x == zero),
        UnaryOp::Affine(a, b) => x * T::c(a as f64) + T::c(b as f64),
        UnaryOp::Clip(lo, hi) => x.max(T::c(lo as f64)).min(T::c(hi as f64)),
        UnaryOp::HardSigmoid(a, b) => (x * T::c(a as f64) + T::c(b as f64)).max(zero).min(one),
    }
}

/// dy · f'(x).
pub fn unary_grad_f<T: Real>(op: UnaryOp, x: T, dy: T) -> T {
    let zero = T::zero();
    let one = T::one();
    match op {
        UnaryOp::Neg => -dy,
        UnaryOp::Exp => dy * x.exp(),
        UnaryOp::Log => dy / x,
        UnaryOp::Sqrt => dy / (T::c(2.0) * x.sqrt()),
        UnaryOp::Recip => -dy / (x * x),
        UnaryOp::Erf => dy * T::c(std::f64::consts::FRAC_2_SQRT_PI) * (-(x * x)).exp(),
        UnaryOp::Tanh => {
            let t = x.tanh();
            dy * (one - t * t)
        }
        UnaryOp::Sigmoid => {
            let s = one / (one + (-x).exp());
            dy * s * (one - s)
        }
        UnaryOp::Relu => {
            if x > zero {
                dy
            } else {
                zero
            }
        }
        UnaryOp::Abs => {
            if x > zero {
                dy
            } else if x < zero {
                -dy
            } else {
                zero
            }
        }
        UnaryOp::Affine(a, _) => dy * T::c(a as f64),
        UnaryOp::Clip(lo, hi) => {
            if x >= T::c(lo as f64) && x <= T::c(hi as f64) {
                dy
            } else {
                zero
            }
        }
        UnaryOp::HardSigmoid(a, b) => {
            let v = x * T::c(a as f64) + T::c(b as f64);
            if v > zero && v < one {
                dy * T::c(a as f64)
            } else {
                zero
            }
        }
        UnaryOp::Floor | UnaryOp::Ceil | UnaryOp::Trunc | UnaryOp::NonZero | UnaryOp::Not => zero,
    }
}

pub fn binary_f<T: Real>(op: BinaryOp, a: T, b: T) -> T {
    let zero = T::zero();
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Pow => {
            if b == T::c(2.0) {
                a * a
            } else {
                a.powf(b)
            }
        }
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Equal => T::from_bool(a == b),
        BinaryOp::Less => T::from_bool(a < b),
        BinaryOp::Greater => T::from_bool(a > b),
        BinaryOp::LessEq => T::from_bool(a <= b),
        BinaryOp::GreaterEq => T::from_bool(a >= b),
        BinaryOp::And => T::from_bool(a != zero && b != zero),
        BinaryOp::Or => T::from_bool(a != zero || b != zero),
        BinaryOp::Xor => T::from_bool((a != zero) != (b != zero)),
        BinaryOp::PowGrad => {
            if b == T::c(2.0) {
                T::c(2.0) * a
            } else {
                b * a.powf(b - T::one())
            }
        }
    }
}

pub fn unary<T: Real>(op: UnaryOp, x: &[T]) -> Vec<T> {
    if x.len() >= PAR_MIN {
        x.par_iter().map(|&v| unary_f(op, v)).collect()
    } else {
        x.iter().map(|&v| unary_f(op, v)).collect()
    }
}

pub fn unary_grad<T: Real>(op: UnaryOp, x: &[T], dy: &[T]) -> Vec<T> {
    if x.len() >= PAR_MIN {
        x.par_iter().zip(dy.par_iter()).map(|(&v, &d)| unary_grad_f(op, v, d)).collect()
    } else {
        x.iter().zip(dy).map(|(&v, &d)| unary_grad_f(op, v, d)).collect()
    }
}

/// Calls `f(out_row, offsets of row start per operand, inner strides per operand)` for each
/// row of `out` (last axis), in parallel for large outputs.
pub(crate) fn rows<T: Real, const K: usize>(
    out: &mut [T],
    out_shape: &[usize],
    strides: [&[usize]; K],
    f: impl Fn(&mut [T], [usize; K], [usize; K]) + Sync,
) {
    let r = out_shape.len();
    let inner = if r == 0 { 1 } else { out_shape[r - 1] };
    if inner == 0 || out.is_empty() {
        return;
    }
    let inner_st: [usize; K] = std::array::from_fn(|k| if r == 0 { 0 } else { strides[k][r - 1] });
    let base = |row: usize| -> [usize; K] {
        let mut off = [0usize; K];
        let mut rem = row;
        for ax in (0..r.saturating_sub(1)).rev() {
            let i = rem % out_shape[ax];
            rem /= out_shape[ax];
            for k in 0..K {
                off[k] += i * strides[k][ax];
            }
        }
        off
    };
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(inner).enumerate().for_each(|(row, o)| f(o, base(row), inner_st));
    } else {
        for (row, o) in out.chunks_mut(inner).enumerate() {
            f(o, base(row), inner_st);
        }
    }
}

pub fn binary<T: Real>(
    op: BinaryOp,
    a: &[T],
    a_shape: &[usize],
    b: &[T],
    b_shape: &[usize],
    out_shape: &[usize],
) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    if a_shape == out_shape && b_shape == out_shape {
        return if n >= PAR_MIN {
            a.par_iter().zip(b.par_iter()).map(|(&x, &y)| binary_f(op, x, y)).collect()
        } else {
            a.iter().zip(b).map(|(&x, &y)| binary_f(op, x, y)).collect()
        };
    }
    let mut out = vec![T::zero(); n];
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    rows(&mut out, out_shape, [&sa, &sb], |o, [oa, ob], [ia, ib]| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = binary_f(op, a[oa + j * ia], b[ob + j * ib]);
        }
    });
    out
}

pub fn where_<T: Real>(c: (&[T], &[usize]), a: (&[T], &[usize]), b: (&[T], &[usize]), out_shape: &[usize]) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut out = vec![T::zero(); n];
    let sc = broadcast_strides(c.1, out_shape);
    let sa = broadcast_strides(a.1, out_shape);
    let sb = broadcast_strides(b.1, out_shape);
    rows(&mut out, out_shape, [&sc, &sa, &sb], |o, [oc, oa, ob], [ic, ia, ib]| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = if c.0[oc + j * ic] != T::zero() { a.0[oa + j * ia] } else { b.0[ob + j * ib] };
        }
    });
    out
}

/// Expand: `x` broadcast to `out_shape`.
pub fn broadcast<T: Real>(x: &[T], x_shape: &[usize], out_shape: &[usize]) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    let mut out = vec![T::zero(); n];
    let sx = broadcast_strides(x_shape, out_shape);
    rows(&mut out, out_shape, [&sx], |o, [ox], [ix]| {
        for (j, v) in o.iter_mut().enumerate() {
            *v = x[ox + j * ix];
        }
    });
    out
}
