//! CPU kernels of the elementwise primitives: unary ops and their derivatives, binary ops
//! with numpy broadcasting, and Where. Broadcasting walks the output row by row (the last
//! axis is the inner loop, with stride 0 for a broadcast operand); rows are split across
//! threads when the tensor is large.

use rayon::prelude::*;

use super::Real;
use crate::engine::program::{broadcast_strides, BinaryOp, Prim, UnaryOp};

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
        UnaryOp::IsNaN => T::from_bool(x.is_nan()),
        UnaryOp::IsInf(pos, neg) => T::from_bool(x.is_infinite() && if x > zero { pos } else { neg }),
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
        // The ops `UnaryOp::differentiable` excludes (Floor, Ceil, Trunc, NonZero, Not, IsNaN,
        // IsInf): zero almost everywhere.
        _ => {
            debug_assert!(!op.differentiable(), "{op:?} has no gradient rule");
            zero
        }
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

// Each op's scalar function is handed to a loop as a closure, so that every op's loop is
// compiled on its own and vectorises where the op allows (plain loops over slice chunks, not
// rayon iterator adaptors). The loops are the ways the executor runs an elementwise
// primitive: into a new buffer, or in place over an operand's buffer that dies at that
// instruction (no allocation, no page faults, half the memory traffic).

/// A loop over one operand.
trait Loop1<T> {
    /// `SIMD`: `f` is straight-line arithmetic that vectorises; see [`wide1`].
    fn run<const SIMD: bool>(self, f: impl Fn(T) -> T + Sync);
}

/// A loop over two operands, `f(a, b)`.
trait Loop2<T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T, T) -> T + Sync);
}

// The inner loops, each force-inlined into a plain function and an AVX2 one; the AVX2 one
// runs when the CPU has it, so the loop and the op's function (inlined into it) vectorise
// 8 lanes wide instead of SSE2's 4: GELU, exp and their derivatives are compute-bound.
// Elementwise ops have no reductions and no FMA contraction, so both give the same bits.

/// `o[i] = f(x[i])`.
#[inline(always)]
fn map1<T: Real>(o: &mut [T], x: &[T], f: &impl Fn(T) -> T) {
    for (o, &v) in o.iter_mut().zip(x) {
        *o = f(v);
    }
}

/// `o[i] = f(o[i])`.
#[inline(always)]
fn map1_self<T: Real>(o: &mut [T], f: &impl Fn(T) -> T) {
    for v in o.iter_mut() {
        *v = f(*v);
    }
}

/// `o[i] = f(x[i], y[i])`.
#[inline(always)]
fn map2<T: Real>(o: &mut [T], x: &[T], y: &[T], f: &impl Fn(T, T) -> T) {
    for ((o, &a), &b) in o.iter_mut().zip(x).zip(y) {
        *o = f(a, b);
    }
}

/// `o[i] = f(o[i], y[i])`.
#[inline(always)]
fn map2_self<T: Real>(o: &mut [T], y: &[T], f: &impl Fn(T, T) -> T) {
    for (v, &b) in o.iter_mut().zip(y) {
        *v = f(*v, b);
    }
}

/// `$name` runs `$inner` compiled for AVX2 when `SIMD` is set and the CPU has AVX2. Only
/// ops whose function is straight-line arithmetic set it: the generic fallbacks (a match
/// over every op, with libm calls) ran slower with an AVX2 copy of their loop beside the
/// plain one, so they get only the plain one.
macro_rules! wide {
    ($name:ident, $inner:ident, ($($ft:ident),*), ($($a:ident: $t:ty),*)) => {
        #[inline(always)]
        pub(crate) fn $name<const SIMD: bool, T: Real>($($a: $t,)* f: &impl Fn($($ft),*) -> T) {
            #[cfg(target_arch = "x86_64")]
            if SIMD && super::sgemm::available() {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<T: Real>($($a: $t,)* f: &impl Fn($($ft),*) -> T) {
                    $inner($($a,)* f)
                }
                // SAFETY: the CPU has AVX2 (checked at run time).
                return unsafe { avx2($($a,)* f) };
            }
            $inner($($a,)* f)
        }
    };
}
wide!(wide1, map1, (T), (o: &mut [T], x: &[T]));
wide!(wide1_self, map1_self, (T), (o: &mut [T]));
wide!(wide2, map2, (T, T), (o: &mut [T], x: &[T], y: &[T]));
wide!(wide2_self, map2_self, (T, T), (o: &mut [T], y: &[T]));

/// `f` in parallel chunks over `out` and zero, one or two same-length operands.
fn chunks<T: Real>(out: &mut [T], body: impl Fn(&mut [T], usize) + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| body(o, i * CHUNK));
    } else {
        body(out, 0);
    }
}

struct Into1<'a, T>(&'a [T], &'a mut [T]);
impl<T: Real> Loop1<T> for Into1<'_, T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T) -> T + Sync) {
        let (x, out) = (self.0, self.1);
        let body = |(o, xi): (&mut [T], &[T])| wide1::<SIMD, _>(o, xi, &f);
        if x.len() >= PAR_MIN {
            out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(body);
        } else {
            body((out, x));
        }
    }
}

struct InPlace1<'a, T>(&'a mut [T]);
impl<T: Real> Loop1<T> for InPlace1<'_, T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T) -> T + Sync) {
        chunks(self.0, |o, _| wide1_self::<SIMD, _>(o, &f));
    }
}

/// Same-shape operands into `out`.
struct Into2<'a, T>(&'a [T], &'a [T], &'a mut [T]);
impl<T: Real> Loop2<T> for Into2<'_, T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T, T) -> T + Sync) {
        let (x, y, out) = (self.0, self.1, self.2);
        let body = |((o, xi), yi): ((&mut [T], &[T]), &[T])| wide2::<SIMD, _>(o, xi, yi, &f);
        if x.len() >= PAR_MIN {
            out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(y.par_chunks(CHUNK)).for_each(body);
        } else {
            body(((out, x), y));
        }
    }
}

/// Broadcasting operands (a, a_shape, b, b_shape) into `out` of `out_shape`: the output is
/// walked row by row, with the inner loop specialised for the strides that occur (both
/// contiguous, or one operand constant along the row).
struct Broadcast2<'a, T>(BinaryArgs<'a, T>, &'a mut [T]);
impl<T: Real> Loop2<T> for Broadcast2<'_, T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T, T) -> T + Sync) {
        let (a, a_shape, b, b_shape, out_shape) = self.0;
        if a_shape == out_shape && b_shape == out_shape {
            return Into2(a, b, self.1).run::<SIMD>(f);
        }
        let sa = broadcast_strides(a_shape, out_shape);
        let sb = broadcast_strides(b_shape, out_shape);
        rows(self.1, out_shape, [&sa, &sb], |o, [oa, ob], [ia, ib]| {
            let w = o.len();
            match (ia, ib) {
                (1, 1) => wide2::<SIMD, _>(o, &a[oa..oa + w], &b[ob..ob + w], &f),
                (1, 0) => {
                    let y = b[ob];
                    wide1::<SIMD, _>(o, &a[oa..oa + w], &|x| f(x, y))
                }
                (0, 1) => {
                    let x = a[oa];
                    wide1::<SIMD, _>(o, &b[ob..ob + w], &|y| f(x, y))
                }
                _ => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = f(a[oa + j * ia], b[ob + j * ib]);
                    }
                }
            }
        });
    }
}

/// In place: `buf` holds operand `k` (0 or 1) with the output's shape; the other operand is
/// broadcast to it.
struct InPlace2<'a, T> {
    buf: &'a mut [T],
    k: usize,
    other: &'a [T],
    other_shape: &'a [usize],
    out_shape: &'a [usize],
}
impl<T: Real> Loop2<T> for InPlace2<'_, T> {
    fn run<const SIMD: bool>(self, f: impl Fn(T, T) -> T + Sync) {
        // Which operand the buffer holds is decided here, once, so that each loop is
        // compiled without a per-element branch (which kept exp and GELU from vectorising).
        if self.k == 0 {
            self.over::<SIMD>(f)
        } else {
            self.over::<SIMD>(|mine, other| f(other, mine))
        }
    }
}

impl<T: Real> InPlace2<'_, T> {
    /// `buf[i] = g(buf[i], other broadcast)`.
    fn over<const SIMD: bool>(self, g: impl Fn(T, T) -> T + Sync) {
        let y = self.other;
        if self.other_shape == self.out_shape {
            return chunks(self.buf, |o, at| {
                let w = o.len();
                wide2_self::<SIMD, _>(o, &y[at..at + w], &g)
            });
        }
        let so = broadcast_strides(self.other_shape, self.out_shape);
        rows(self.buf, self.out_shape, [&so], |o, [oo], [io]| match io {
            1 => {
                let w = o.len();
                wide2_self::<SIMD, _>(o, &y[oo..oo + w], &g)
            }
            0 => {
                let b = y[oo];
                wide1_self::<SIMD, _>(o, &|v| g(v, b))
            }
            _ => {
                for (j, v) in o.iter_mut().enumerate() {
                    *v = g(*v, y[oo + j * io]);
                }
            }
        });
    }
}

fn with_unary<T: Real>(op: UnaryOp, l: impl Loop1<T>) {
    match op {
        UnaryOp::Neg => l.run::<true>(|v| -v),
        UnaryOp::Exp => l.run::<true>(|v| v.exp_fast()),
        UnaryOp::Relu => l.run::<true>(|v| if v > T::zero() { v } else { T::zero() }),
        UnaryOp::Affine(a, b) => {
            let (a, b) = (T::c(a as f64), T::c(b as f64));
            l.run::<true>(move |v| v * a + b)
        }
        UnaryOp::Gelu => l.run::<true>(gelu),
        UnaryOp::Erf => l.run::<true>(|v| v.erf()),
        UnaryOp::Sqrt => l.run::<true>(|v| v.sqrt()),
        UnaryOp::Recip => l.run::<true>(|v| T::one() / v),
        UnaryOp::Clip(lo, hi) => {
            let (lo, hi) = (T::c(lo as f64), T::c(hi as f64));
            l.run::<true>(move |v| v.max(lo).min(hi))
        }
        _ => l.run::<false>(move |v| unary_f(op, v)),
    }
}

/// `f(x, dy)` for UnaryGrad.
fn with_unary_grad<T: Real>(op: UnaryOp, l: impl Loop2<T>) {
    match op {
        UnaryOp::Gelu => l.run::<true>(gelu_grad),
        UnaryOp::Exp => l.run::<true>(|v, d| d * v.exp_fast()),
        UnaryOp::Relu => l.run::<true>(|v, d| if v > T::zero() { d } else { T::zero() }),
        UnaryOp::Affine(a, _) => {
            let a = T::c(a as f64);
            l.run::<true>(move |_, d| d * a)
        }
        UnaryOp::Clip(lo, hi) => {
            let (lo, hi) = (T::c(lo as f64), T::c(hi as f64));
            l.run::<true>(move |v, d| if v >= lo && v <= hi { d } else { T::zero() })
        }
        _ => l.run::<false>(move |v, d| unary_grad_f(op, v, d)),
    }
}

fn with_binary<T: Real>(op: BinaryOp, l: impl Loop2<T>) {
    match op {
        BinaryOp::Add => l.run::<true>(|x, y| x + y),
        BinaryOp::Sub => l.run::<true>(|x, y| x - y),
        BinaryOp::Mul => l.run::<true>(|x, y| x * y),
        BinaryOp::Div => l.run::<true>(|x, y| x / y),
        _ => l.run::<false>(move |x, y| binary_f(op, x, y)),
    }
}

pub fn unary<T: Real>(op: UnaryOp, x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    with_unary(op, Into1(x, &mut out));
    out
}

pub fn unary_grad<T: Real>(op: UnaryOp, x: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    with_unary_grad(op, Into2(x, dy, &mut out));
    out
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
    let mut out = vec![T::zero(); out_shape.iter().product()];
    with_binary(op, Broadcast2((a, a_shape, b, b_shape, out_shape), &mut out));
    out
}

type BinaryArgs<'a, T> = (&'a [T], &'a [usize], &'a [T], &'a [usize], &'a [usize]);

/// Unary, UnaryGrad or Binary in place over operand `k`'s buffer `buf`, which has the output's
/// shape; `other` is the other operand (with its shape), if any. Equal to the out-of-place
/// kernels element for element.
pub fn inplace<T: Real>(prim: &Prim, buf: &mut [T], k: usize, other: Option<(&[T], &[usize])>, out_shape: &[usize]) {
    const TWO: &str = "a two-operand primitive has two operands";
    match prim {
        Prim::Unary(op) => with_unary(*op, InPlace1(buf)),
        Prim::UnaryGrad(op) => {
            let (other, other_shape) = other.expect(TWO);
            with_unary_grad(*op, InPlace2 { buf, k, other, other_shape, out_shape })
        }
        Prim::Binary(op) => {
            let (other, other_shape) = other.expect(TWO);
            with_binary(*op, InPlace2 { buf, k, other, other_shape, out_shape })
        }
        p => unreachable!("{} has no in-place form", p.name()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place forms the executor uses equal the out-of-place kernels exactly, over
    /// either operand, with the other operand equal-shaped, broadcast along rows, constant
    /// along rows, or a scalar; on sizes below and above the parallel threshold.
    #[test]
    fn in_place_equals_out_of_place() {
        let val = |i: usize| ((i * 7919) % 997) as f32 / 331.0 - 1.4;
        for out_shape in [vec![3usize, 5, 7], vec![4, 64, 300]] {
            let n: usize = out_shape.iter().product();
            let x: Vec<f32> = (0..n).map(val).collect();
            let others: Vec<Vec<usize>> = vec![
                out_shape.clone(),
                vec![out_shape[2]],
                vec![out_shape[0], out_shape[1], 1],
                vec![],
                vec![out_shape[0], 1, out_shape[2]],
            ];
            for op in [
                UnaryOp::Gelu,
                UnaryOp::Exp,
                UnaryOp::Tanh,
                UnaryOp::Affine(0.5, -1.0),
                UnaryOp::Relu,
                UnaryOp::Clip(-0.5, 0.7),
            ] {
                let want = unary(op, &x);
                let mut buf = x.clone();
                inplace(&Prim::Unary(op), &mut buf, 0, None, &out_shape);
                assert_eq!(buf, want, "{op:?}");
                let dy: Vec<f32> = (0..n).map(|i| val(i + 11)).collect();
                let want = unary_grad(op, &x, &dy);
                for k in 0..2 {
                    let (mut buf, other) = if k == 0 { (x.clone(), &dy) } else { (dy.clone(), &x) };
                    inplace(&Prim::UnaryGrad(op), &mut buf, k, Some((other, &out_shape)), &out_shape);
                    assert_eq!(buf, want, "grad {op:?} over operand {k}");
                }
            }
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Pow, BinaryOp::Less] {
                for os in &others {
                    let m: usize = os.iter().product();
                    let y: Vec<f32> = (0..m).map(|i| val(i + 5).abs() + 0.5).collect();
                    for k in 0..2 {
                        let want = if k == 0 {
                            binary(op, &x, &out_shape, &y, os, &out_shape)
                        } else {
                            binary(op, &y, os, &x, &out_shape, &out_shape)
                        };
                        let mut buf = x.clone();
                        inplace(&Prim::Binary(op), &mut buf, k, Some((&y, os)), &out_shape);
                        for (i, (a, b)) in buf.iter().zip(&want).enumerate() {
                            assert!(
                                a == b || (a.is_nan() && b.is_nan()),
                                "{op:?} k={k} other {os:?}: element {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every op's loop (the specialised, vectorised ones included, on AVX2 when the CPU has
    /// it) agrees with the op's scalar definition, element by element, on both sides of
    /// every kink (Clip's and ReLU's bounds are hit exactly) and at sizes below and above
    /// the parallel threshold. exp and erf use polynomial approximations in f32 (tested
    /// against libm in `cpu::tests`), hence a tolerance, not equality.
    #[test]
    fn loops_match_scalar_definitions() {
        let val = |i: usize| ((i * 7919) % 997) as f32 / 100.0 - 4.98;
        let ops = [
            UnaryOp::Neg,
            UnaryOp::Exp,
            UnaryOp::Sqrt,
            UnaryOp::Recip,
            UnaryOp::Erf,
            UnaryOp::Tanh,
            UnaryOp::Sigmoid,
            UnaryOp::Relu,
            UnaryOp::Abs,
            UnaryOp::Affine(0.5, -1.0),
            UnaryOp::Clip(-1.0, 2.0),
            UnaryOp::HardSigmoid(0.2, 0.5),
            UnaryOp::Gelu,
        ];
        let close = |a: f32, b: f32| a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 2e-6 * (1.0 + b.abs());
        for n in [37usize, 3 * super::PAR_MIN + 5] {
            let mut x: Vec<f32> = (0..n).map(val).collect();
            x[..4].copy_from_slice(&[-1.0, 2.0, 0.0, -2.5]);
            let dy: Vec<f32> = (0..n).map(|i| val(i + 13)).collect();
            for op in ops {
                let xs: Vec<f32> =
                    if matches!(op, UnaryOp::Sqrt) { x.iter().map(|v| v.abs()).collect() } else { x.clone() };
                let got = unary(op, &xs);
                let grad = unary_grad(op, &xs, &dy);
                for i in 0..n {
                    let want = unary_f(op, xs[i]);
                    assert!(close(got[i], want), "{op:?}({}) = {} vs {want}", xs[i], got[i]);
                    if op.differentiable() {
                        let want = unary_grad_f(op, xs[i], dy[i]);
                        assert!(close(grad[i], want), "{op:?}'({}) = {} vs {want}", xs[i], grad[i]);
                    }
                }
            }
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Pow] {
                let y: Vec<f32> = dy.iter().map(|v| v.abs() + 0.25).collect();
                let got = binary(op, &x, &[n], &y, &[n], &[n]);
                let row = binary(op, &x, &[n], &y[..1], &[1], &[n]);
                for i in 0..n {
                    assert_eq!(got[i].to_bits(), binary_f(op, x[i], y[i]).to_bits(), "{op:?} element {i}");
                    assert_eq!(row[i].to_bits(), binary_f(op, x[i], y[0]).to_bits(), "{op:?} broadcast element {i}");
                }
            }
        }
    }
}
