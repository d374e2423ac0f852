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
        UnaryOp::Gelu => gelu(x),
    }
}

/// GELU(x) = x Φ(x), with erf.
#[inline(always)]
fn gelu<T: Real>(x: T) -> T {
    T::c(0.5) * x * (T::one() + (x * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// dy · GELU'(x) = dy (Φ(x) + x φ(x)).
#[inline(always)]
fn gelu_grad<T: Real>(x: T, dy: T) -> T {
    let cdf = T::c(0.5) * (T::one() + (x * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = T::c(0.398_942_280_401_432_7) * (T::c(-0.5) * x * x).exp_fast();
    dy * (cdf + x * pdf)
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
        UnaryOp::Gelu => gelu_grad(x, dy),
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

/// Elements per parallel task of the elementwise maps.
const CHUNK: usize = 1 << 14;

/// `f` over `x`, in parallel for large tensors. Generic over the closure so that each op's
/// loop is compiled on its own, and written as plain loops over slice chunks (not rayon
/// iterator adaptors) so that loop vectorises where the op allows.
fn map1<T: Real>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let body = |(o, xi): (&mut [T], &[T])| {
        for (o, &v) in o.iter_mut().zip(xi) {
            *o = f(v);
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(body);
    } else {
        body((&mut out, x));
    }
    out
}

fn map2<T: Real>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let body = |((o, xi), yi): ((&mut [T], &[T]), &[T])| {
        for ((o, &a), &b) in o.iter_mut().zip(xi).zip(yi) {
            *o = f(a, b);
        }
    };
    if x.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(y.par_chunks(CHUNK)).for_each(body);
    } else {
        body(((&mut out, x), y));
    }
    out
}

pub fn unary<T: Real>(op: UnaryOp, x: &[T]) -> Vec<T> {
    match op {
        UnaryOp::Neg => map1(x, |v| -v),
        UnaryOp::Exp => map1(x, |v| v.exp_fast()),
        UnaryOp::Relu => map1(x, |v| if v > T::zero() { v } else { T::zero() }),
        UnaryOp::Affine(a, b) => {
            let (a, b) = (T::c(a as f64), T::c(b as f64));
            map1(x, move |v| v * a + b)
        }
        UnaryOp::Gelu => map1(x, gelu),
        UnaryOp::Erf => map1(x, |v| v.erf()),
        _ => map1(x, move |v| unary_f(op, v)),
    }
}

pub fn unary_grad<T: Real>(op: UnaryOp, x: &[T], dy: &[T]) -> Vec<T> {
    match op {
        UnaryOp::Gelu => map2(x, dy, gelu_grad),
        UnaryOp::Exp => map2(x, dy, |v, d| d * v.exp_fast()),
        UnaryOp::Relu => map2(x, dy, |v, d| if v > T::zero() { d } else { T::zero() }),
        _ => map2(x, dy, move |v, d| unary_grad_f(op, v, d)),
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
    let args = (a, a_shape, b, b_shape, out_shape);
    match op {
        BinaryOp::Add => binary_with(args, |x, y| x + y),
        BinaryOp::Sub => binary_with(args, |x, y| x - y),
        BinaryOp::Mul => binary_with(args, |x, y| x * y),
        BinaryOp::Div => binary_with(args, |x, y| x / y),
        _ => binary_with(args, move |x, y| binary_f(op, x, y)),
    }
}

type BinaryArgs<'a, T> = (&'a [T], &'a [usize], &'a [T], &'a [usize], &'a [usize]);

/// Broadcasting binary op with `f` inlined: equal shapes are one zipped pass; otherwise the
/// output is walked row by row, with the inner loop specialised for the strides that occur
/// (both contiguous, or one operand constant along the row).
fn binary_with<T: Real>((a, a_shape, b, b_shape, out_shape): BinaryArgs<T>, f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let n: usize = out_shape.iter().product();
    if a_shape == out_shape && b_shape == out_shape {
        return map2(a, b, f);
    }
    let mut out = vec![T::zero(); n];
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    rows(&mut out, out_shape, [&sa, &sb], |o, [oa, ob], [ia, ib]| {
        let w = o.len();
        match (ia, ib) {
            (1, 1) => {
                for ((v, &x), &y) in o.iter_mut().zip(&a[oa..oa + w]).zip(&b[ob..ob + w]) {
                    *v = f(x, y);
                }
            }
            (1, 0) => {
                let y = b[ob];
                for (v, &x) in o.iter_mut().zip(&a[oa..oa + w]) {
                    *v = f(x, y);
                }
            }
            (0, 1) => {
                let x = a[oa];
                for (v, &y) in o.iter_mut().zip(&b[ob..ob + w]) {
                    *v = f(x, y);
                }
            }
            _ => {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = f(a[oa + j * ia], b[ob + j * ib]);
                }
            }
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
