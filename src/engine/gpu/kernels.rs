//! GPU twins of the CPU primitive kernels, on device buffers: unary, binary with
//! broadcasting, batched matmul, strided copy (transpose / slice / broadcast) and
//! trailing-axis reductions. Each packs its shape data into the `params` layout its shader's
//! header documents. Ranks above 8 are an error.

use super::{grid, GpuContext};
use crate::engine::program::{broadcast_strides, strides, BinaryOp, ReduceOp, UnaryOp};
use crate::error::{Error, Result};

const MAX_RANK: usize = 8;

fn unary_code(op: UnaryOp) -> (u32, f32, f32) {
    match op {
        UnaryOp::Neg => (0, 0.0, 0.0),
        UnaryOp::Exp => (1, 0.0, 0.0),
        UnaryOp::Log => (2, 0.0, 0.0),
        UnaryOp::Sqrt => (3, 0.0, 0.0),
        UnaryOp::Recip => (4, 0.0, 0.0),
        UnaryOp::Erf => (5, 0.0, 0.0),
        UnaryOp::Tanh => (6, 0.0, 0.0),
        UnaryOp::Sigmoid => (7, 0.0, 0.0),
        UnaryOp::Relu => (8, 0.0, 0.0),
        UnaryOp::Abs => (9, 0.0, 0.0),
        UnaryOp::Floor => (10, 0.0, 0.0),
        UnaryOp::Ceil => (11, 0.0, 0.0),
        UnaryOp::Trunc => (12, 0.0, 0.0),
        UnaryOp::NonZero => (13, 0.0, 0.0),
        UnaryOp::Not => (14, 0.0, 0.0),
        UnaryOp::Affine(a, b) => (15, a, b),
        UnaryOp::Clip(a, b) => (16, a, b),
        UnaryOp::HardSigmoid(a, b) => (17, a, b),
    }
}

fn binary_code(op: BinaryOp) -> u32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Pow => 4,
        BinaryOp::Max => 5,
        BinaryOp::Min => 6,
        BinaryOp::Equal => 7,
        BinaryOp::Less => 8,
        BinaryOp::Greater => 9,
        BinaryOp::LessEq => 10,
        BinaryOp::GreaterEq => 11,
        BinaryOp::And => 12,
        BinaryOp::Or => 13,
        BinaryOp::Xor => 14,
        BinaryOp::PowGrad => 15,
    }
}

fn pad8(v: &[usize]) -> Result<Vec<u32>> {
    if v.len() > MAX_RANK {
        return Err(Error::Other(format!("gpu kernels support rank ≤ {MAX_RANK}, got {}", v.len())));
    }
    let mut o: Vec<u32> = v.iter().map(|&x| x as u32).collect();
    o.resize(MAX_RANK, 0);
    Ok(o)
}

pub fn unary(cx: &GpuContext, op: UnaryOp, x: &wgpu::Buffer, n: usize) -> Result<wgpu::Buffer> {
    let y = cx.empty(n);
    let (code, a, b) = unary_code(op);
    let (groups, width) = grid(n, 256);
    let meta = cx.upload_u32(&[n as u32, code, a.to_bits(), b.to_bits(), width]);
    cx.dispatch("unary", &[x, &y, &meta], groups)?;
    Ok(y)
}

pub fn binary(
    cx: &GpuContext,
    op: BinaryOp,
    a: &wgpu::Buffer,
    a_shape: &[usize],
    b: &wgpu::Buffer,
    b_shape: &[usize],
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let n: usize = out_shape.iter().product();
    let c = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let mut meta = vec![n as u32, binary_code(op), out_shape.len() as u32, width];
    meta.extend(pad8(out_shape)?);
    meta.extend(pad8(&broadcast_strides(a_shape, out_shape))?);
    meta.extend(pad8(&broadcast_strides(b_shape, out_shape))?);
    let meta = cx.upload_u32(&meta);
    cx.dispatch("binary", &[a, b, &c, &meta], groups)?;
    Ok(c)
}

/// Same contract as `cpu::matmul::matmul`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    cx: &GpuContext,
    a: &wgpu::Buffer,
    a_shape: &[usize],
    b: &wgpu::Buffer,
    b_shape: &[usize],
    ta: bool,
    tb: bool,
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let (ra, rb, ro) = (a_shape.len(), b_shape.len(), out_shape.len());
    let (m, k) = if ta { (a_shape[ra - 1], a_shape[ra - 2]) } else { (a_shape[ra - 2], a_shape[ra - 1]) };
    let n = if tb { b_shape[rb - 2] } else { b_shape[rb - 1] };
    let batch = &out_shape[..ro - 2];
    let nb: usize = batch.iter().product();
    let sa = broadcast_strides(&a_shape[..ra - 2], batch);
    let sb = broadcast_strides(&b_shape[..rb - 2], batch);
    let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
    let (rsb, csb) = if tb { (1, k) } else { (n, 1) };
    let mut offa = Vec::with_capacity(nb);
    let mut offb = Vec::with_capacity(nb);
    for bi in 0..nb {
        let (mut oa, mut ob, mut rem) = (0, 0, bi);
        for ax in (0..batch.len()).rev() {
            let i = rem % batch[ax];
            rem /= batch[ax];
            oa += i * sa[ax];
            ob += i * sb[ax];
        }
        offa.push((oa * m * k) as u32);
        offb.push((ob * k * n) as u32);
    }
    let mut meta = vec![m as u32, n as u32, k as u32, nb as u32, rsa as u32, csa as u32, rsb as u32, csb as u32];
    meta.extend(offa);
    meta.extend(offb);
    let c = cx.empty(nb * m * n);
    let meta = cx.upload_u32(&meta);
    if nb > 65_535 {
        return Err(Error::Other(format!("gpu matmul: {nb} batch elements exceed one dispatch")));
    }
    cx.dispatch(
        "matmul",
        &[a, b, &c, &meta],
        (n.div_ceil(16).max(1) as u32, m.div_ceil(16).max(1) as u32, nb.max(1) as u32),
    )?;
    Ok(c)
}

/// y[idx] = x[base + Σ idx_k · st_k] (transpose, slice, broadcast).
pub fn strided_copy(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    base: isize,
    st: &[isize],
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let n: usize = out_shape.iter().product();
    let y = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let mut meta: Vec<i32> = vec![n as i32, out_shape.len() as i32, width as i32, base as i32];
    meta.extend(pad8(out_shape)?.into_iter().map(|v| v as i32));
    let mut s: Vec<i32> = st.iter().map(|&v| v as i32).collect();
    s.resize(MAX_RANK, 0);
    meta.extend(s);
    let meta: Vec<u32> = meta.into_iter().map(|v| v as u32).collect();
    let meta = cx.upload_u32(&meta);
    cx.dispatch("strided_copy", &[x, &y, &meta], groups)?;
    Ok(y)
}

pub fn transpose(cx: &GpuContext, x: &wgpu::Buffer, x_shape: &[usize], perm: &[usize]) -> Result<wgpu::Buffer> {
    let xs = strides(x_shape);
    let out: Vec<usize> = perm.iter().map(|&p| x_shape[p]).collect();
    let st: Vec<isize> = perm.iter().map(|&p| xs[p] as isize).collect();
    strided_copy(cx, x, 0, &st, &out)
}

/// Reduction over contiguous rows of `len` (trailing axes).
pub fn reduce_rows(cx: &GpuContext, op: ReduceOp, x: &wgpu::Buffer, rows: usize, len: usize) -> Result<wgpu::Buffer> {
    let y = cx.empty(rows);
    let code = match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
    };
    let (groups, width) = grid(rows, 64);
    let meta = cx.upload_u32(&[rows as u32, len as u32, code, width]);
    cx.dispatch("reduce_rows", &[x, &y, &meta], groups)?;
    Ok(y)
}
