//! GPU twins of the CPU primitive kernels, on device buffers, one function per primitive
//! (or per step of one): elementwise (unary and its derivative, binary and Where with
//! broadcasting), reductions, batched matmul, layout (strided copy for transpose / slice /
//! broadcast, strided write for embed / concat), index (gather and its adjoint,
//! gather/scatter elements, argmax, top-k indices) and window (im2col, col2im, pooling and
//! its gradient) kernels. Each packs its shape data into the `params` layout its shader's
//! header documents. Ranks above 8 are an error. Index kernels cannot fail on the device:
//! an out-of-range index sets a flag ([`Flag`]) that the caller reads back and reports.

use super::{grid, GpuContext};
use crate::engine::program::{broadcast_strides, strides, BinaryOp, PoolKind, ReduceOp, RowOp, UnaryOp, Window};
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
        UnaryOp::Gelu => (18, 0.0, 0.0),
        UnaryOp::IsNaN => (19, 0.0, 0.0),
        UnaryOp::IsInf(pos, neg) => (20, pos as u8 as f32, neg as u8 as f32),
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

/// Workgroups per dispatch dimension (the WebGPU default limit).
const MAX_GROUPS: usize = 65_535;

/// Which matmul kernel runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatMulKernel {
    /// 16×16 tiles in workgroup memory (matmul.wgsl), the grid split into dispatches of at
    /// most this many workgroups per dimension.
    Tiled { max_groups: usize },
    /// 64×64 tiles, a 4×4 block of the output per invocation in registers
    /// (matmul_blocked.wgsl); grid split as for `Tiled`.
    Blocked { max_groups: usize },
    /// One invocation per 4×4 block of the output, no workgroup memory (matmul_small.wgsl).
    Thin,
}

/// Same contract as `cpu::matmul::matmul`. Tiles for products that fill them on hardware
/// adapters (64×64 register-blocked ones from M, N ≥ 64: on an H100, MiniLM-L6's
/// 2048-row products run at 1.2–6.7 TFLOP/s with them, and its forward + backward went from
/// 0.144 to 0.121 s); the thin kernel for products with M, N or K below 16 (depthwise and grouped
/// convolutions, matrix-vector products), where tiles would idle, and on CPU adapters
/// (lavapipe), where workgroup barriers cost more than the reuse they buy (twice as slow
/// on effnet-lite0's 1×1 convolutions).
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
    let g = MatMulGeometry::new(a_shape, b_shape, ta, tb, out_shape);
    let thin = g.m < 16 || g.n < 16 || g.k < 16 || cx.info.device_type == wgpu::DeviceType::Cpu;
    let kernel = if thin {
        MatMulKernel::Thin
    } else if g.m >= 64 && g.n >= 64 {
        MatMulKernel::Blocked { max_groups: MAX_GROUPS }
    } else {
        MatMulKernel::Tiled { max_groups: MAX_GROUPS }
    };
    matmul_with(cx, kernel, a, a_shape, b, b_shape, ta, tb, out_shape)
}

/// Sizes, strides and per-batch offsets of a batched product.
struct MatMulGeometry {
    m: usize,
    n: usize,
    k: usize,
    nb: usize,
    /// rsa, csa, rsb, csb.
    strides: [u32; 4],
    offa: Vec<u32>,
    offb: Vec<u32>,
}

impl MatMulGeometry {
    fn new(a_shape: &[usize], b_shape: &[usize], ta: bool, tb: bool, out_shape: &[usize]) -> MatMulGeometry {
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
        MatMulGeometry { m, n, k, nb, strides: [rsa as u32, csa as u32, rsb as u32, csb as u32], offa, offb }
    }

    /// The params header shared by both kernels: [M, N, K, batches, rsa, csa, rsb, csb].
    fn header(&self, batches: usize) -> Vec<u32> {
        let mut h = vec![self.m as u32, self.n as u32, self.k as u32, batches as u32];
        h.extend(self.strides);
        h
    }
}

/// [`matmul`] with the kernel chosen by the caller (tests run both on every shape).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    cx: &GpuContext,
    kernel: MatMulKernel,
    a: &wgpu::Buffer,
    a_shape: &[usize],
    b: &wgpu::Buffer,
    b_shape: &[usize],
    ta: bool,
    tb: bool,
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let g = MatMulGeometry::new(a_shape, b_shape, ta, tb, out_shape);
    let (m, n, nb) = (g.m, g.n, g.nb);
    let c = cx.empty(nb * m * n);
    match kernel {
        MatMulKernel::Thin => {
            let total = nb * m.div_ceil(4) * n.div_ceil(4);
            let (groups, width) = grid(total, 64);
            let mut meta = g.header(nb);
            meta.extend([total as u32, width, 0, 0]);
            meta.extend(&g.offa);
            meta.extend(&g.offb);
            let meta = cx.upload_u32(&meta);
            cx.dispatch("matmul_small", &[a, b, &c, &meta], groups)?;
        }
        MatMulKernel::Tiled { max_groups } | MatMulKernel::Blocked { max_groups } => {
            let (shader, tile) = match kernel {
                MatMulKernel::Blocked { .. } => ("matmul_blocked", 64),
                _ => ("matmul", 16),
            };
            let (tiles_x, tiles_y) = (n.div_ceil(tile), m.div_ceil(tile));
            let max_groups = max_groups.max(1);
            for z0 in (0..nb).step_by(max_groups) {
                let nz = (nb - z0).min(max_groups);
                for y0 in (0..tiles_y).step_by(max_groups) {
                    for x0 in (0..tiles_x).step_by(max_groups) {
                        let mut meta = g.header(nz);
                        meta.extend([z0 as u32, x0 as u32, y0 as u32, 0]);
                        meta.extend(&g.offa[z0..z0 + nz]);
                        meta.extend(&g.offb[z0..z0 + nz]);
                        let meta = cx.upload_u32(&meta);
                        let gx = (tiles_x - x0).min(max_groups) as u32;
                        let gy = (tiles_y - y0).min(max_groups) as u32;
                        cx.dispatch(shader, &[a, b, &c, &meta], (gx, gy, nz as u32))?;
                    }
                }
            }
        }
    }
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
    let code = reduce_code(op).0;
    let (groups, width) = grid(rows, 64);
    let meta = cx.upload_u32(&[rows as u32, len as u32, code, width]);
    cx.dispatch("reduce_rows", &[x, &y, &meta], groups)?;
    Ok(y)
}

fn i32s(v: &[isize]) -> Result<Vec<u32>> {
    if v.len() > MAX_RANK {
        return Err(Error::Other(format!("gpu kernels support rank ≤ {MAX_RANK}, got {}", v.len())));
    }
    let mut o: Vec<u32> = v.iter().map(|&x| x as i32 as u32).collect();
    o.resize(MAX_RANK, 0);
    Ok(o)
}

/// A row-wise op over the last axis of `shape` (`ins` = [x]), or its derivative
/// (`ins` = [a, dy], see `Prim::RowsGrad`): one kernel, rows.wgsl, for all four.
pub fn rows(cx: &GpuContext, op: RowOp, ins: &[&wgpu::Buffer], n: usize, shape: &[usize]) -> Result<wgpu::Buffer> {
    let y = cx.empty(n);
    let len = shape.last().copied().unwrap_or(1);
    if len == 0 || n == 0 {
        return Ok(y);
    }
    let rows = n / len;
    let (code, eps) = match op {
        RowOp::Normalize(eps) => (0, eps),
        RowOp::Softmax => (1, 0.0f32),
    };
    // The derivatives are ops 2 and 3; the forward ops bind their input as dy too, unread.
    let (code, dy) = if ins.len() == 2 { (code + 2, ins[1]) } else { (code, ins[0]) };
    let (groups, width) = grid(rows, 64);
    let meta = cx.upload_u32(&[rows as u32, len as u32, code, width, eps.to_bits()]);
    cx.dispatch("rows", &[ins[0], dy, &y, &meta], groups)?;
    Ok(y)
}

/// dy · f'(x), elementwise.
pub fn unary_grad(cx: &GpuContext, op: UnaryOp, x: &wgpu::Buffer, dy: &wgpu::Buffer, n: usize) -> Result<wgpu::Buffer> {
    let dx = cx.empty(n);
    let (code, a, b) = unary_code(op);
    let (groups, width) = grid(n, 256);
    let meta = cx.upload_u32(&[n as u32, code, a.to_bits(), b.to_bits(), width]);
    cx.dispatch("unary_grad", &[x, dy, &dx, &meta], groups)?;
    Ok(dx)
}

/// cond != 0 ? a : b, each operand broadcast to `out_shape`.
pub fn where_(
    cx: &GpuContext,
    c: (&wgpu::Buffer, &[usize]),
    a: (&wgpu::Buffer, &[usize]),
    b: (&wgpu::Buffer, &[usize]),
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let n: usize = out_shape.iter().product();
    let y = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let mut meta = vec![n as u32, out_shape.len() as u32, width, 0];
    meta.extend(pad8(out_shape)?);
    for s in [c.1, a.1, b.1] {
        meta.extend(pad8(&broadcast_strides(s, out_shape))?);
    }
    let meta = cx.upload_u32(&meta);
    cx.dispatch("where", &[c.0, a.0, b.0, &y, &meta], groups)?;
    Ok(y)
}

/// Keepdims reduction of `x` over `axes` (any set, in any order).
pub fn reduce(
    cx: &GpuContext,
    op: ReduceOp,
    x: &wgpu::Buffer,
    x_shape: &[usize],
    axes: &[usize],
) -> Result<wgpu::Buffer> {
    let mut out_shape = x_shape.to_vec();
    let mut red: Vec<usize> = axes.to_vec();
    red.sort_unstable();
    red.dedup();
    if red.iter().any(|&a| a >= x_shape.len()) {
        return Err(Error::Other(format!("gpu reduce: axes {axes:?} out of range for rank {}", x_shape.len())));
    }
    for &a in &red {
        out_shape[a] = 1;
    }
    let n: usize = out_shape.iter().product();
    let count: usize = red.iter().map(|&a| x_shape[a]).product();
    if count >= BLOCK_MIN_ROWS && red.windows(2).all(|w| w[1] == w[0] + 1) {
        let inner: usize = x_shape[red[red.len() - 1] + 1..].iter().product();
        return reduce_block(cx, op, x, count, n, inner);
    }
    let xs = strides(x_shape);
    let (code, init) = reduce_code(op);
    let inv = 1.0f32 / count.max(1) as f32;
    let y = cx.empty(n);
    let (groups, width) = grid(n, 64);
    let mut meta = vec![
        n as u32,
        x_shape.len() as u32,
        count as u32,
        code,
        width,
        init.to_bits(),
        inv.to_bits(),
        red.len() as u32,
    ];
    meta.extend(pad8(&out_shape)?);
    meta.extend(pad8(&xs)?);
    meta.extend(pad8(&red.iter().map(|&a| x_shape[a]).collect::<Vec<_>>())?);
    meta.extend(pad8(&red.iter().map(|&a| xs[a]).collect::<Vec<_>>())?);
    let meta = cx.upload_u32(&meta);
    cx.dispatch("reduce", &[x, &y, &meta], groups)?;
    Ok(y)
}

/// The shaders' op code (0 sum, 1 mean, 2 max, 3 min) and the fold's initial value.
fn reduce_code(op: ReduceOp) -> (u32, f32) {
    match op {
        ReduceOp::Sum => (0, 0.0),
        ReduceOp::Mean => (1, 0.0),
        ReduceOp::Max => (2, f32::NEG_INFINITY),
        ReduceOp::Min => (3, f32::INFINITY),
    }
}

/// Reductions over one block of adjacent axes of at least this many elements take two
/// passes ([`reduce_block`]).
const BLOCK_MIN_ROWS: usize = 256;

/// Splits of [`reduce_block`]'s first pass (fewer than [`BLOCK_MIN_ROWS`], so the second
/// pass is one plain reduction).
const BLOCK_SPLITS: usize = 64;

/// A reduction over one block of adjacent axes of `x`, viewed as [outer, rows, inner] with
/// `cols` = outer · inner outputs: partial results over row ranges (reduce_block.wgsl,
/// every output × split in parallel), then their reduction (reduce.wgsl). On an H100,
/// MiniLM-L6's bias gradients (leading axes) took ~1 ms each in one pass (each
/// instruction waited for), and its forward + backward went from 0.121–0.126 s to
/// 0.117 s; EfficientNet-lite0's per-channel sums over H × W took up to 5.5 ms each.
fn reduce_block(
    cx: &GpuContext,
    op: ReduceOp,
    x: &wgpu::Buffer,
    rows: usize,
    cols: usize,
    inner: usize,
) -> Result<wgpu::Buffer> {
    let splits = rows.div_ceil(rows.div_ceil(BLOCK_SPLITS));
    let per = rows.div_ceil(splits);
    let (code, init) = reduce_code(op);
    // Means are scaled in the first pass, so the second sums.
    let second = if op == ReduceOp::Mean { ReduceOp::Sum } else { op };
    let partial = cx.empty(splits * cols);
    let (groups, width) = grid(splits * cols, 64);
    let inv = 1.0f32 / rows as f32;
    let meta = cx.upload_u32(&[
        rows as u32,
        cols as u32,
        splits as u32,
        code,
        per as u32,
        width,
        init.to_bits(),
        inv.to_bits(),
        inner.max(1) as u32,
    ]);
    cx.dispatch("reduce_block", &[x, &partial, &meta], groups)?;
    reduce(cx, second, &partial, &[splits, cols], &[0])
}

/// Expand: `x` broadcast to `out_shape`.
pub fn broadcast(cx: &GpuContext, x: &wgpu::Buffer, x_shape: &[usize], out_shape: &[usize]) -> Result<wgpu::Buffer> {
    let st: Vec<isize> = broadcast_strides(x_shape, out_shape).into_iter().map(|v| v as isize).collect();
    strided_copy(cx, x, 0, &st, out_shape)
}

/// Output element i along each axis reads x at start + i·step.
pub fn slice(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    x_shape: &[usize],
    starts: &[usize],
    steps: &[isize],
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let xs = strides(x_shape);
    let base: isize = starts.iter().zip(&xs).map(|(&s, &t)| (s * t) as isize).sum();
    let st: Vec<isize> = steps.iter().zip(&xs).map(|(&p, &t)| p * t as isize).collect();
    strided_copy(cx, x, base, &st, out_shape)
}

/// y[0..n] = value.
pub fn fill(cx: &GpuContext, y: &wgpu::Buffer, n: usize, value: f32) -> Result<()> {
    let (groups, width) = grid(n, 256);
    let meta = cx.upload_u32(&[n as u32, value.to_bits(), width]);
    cx.dispatch("fill", &[y, &meta], groups)
}

/// y[base + Σ idx_k · st_k] = x[idx] for every idx of `x_shape`; the rest of y is kept.
pub fn strided_write(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    x_shape: &[usize],
    y: &wgpu::Buffer,
    base: isize,
    st: &[isize],
) -> Result<()> {
    let n: usize = x_shape.iter().product();
    if n == 0 {
        return Ok(());
    }
    let (groups, width) = grid(n, 256);
    let mut meta = vec![n as u32, x_shape.len() as u32, width, base as i32 as u32];
    meta.extend(pad8(x_shape)?);
    meta.extend(i32s(st)?);
    let meta = cx.upload_u32(&meta);
    cx.dispatch("strided_write", &[x, y, &meta], groups)
}

/// The adjoint of slice: `fill` everywhere except start + i·step, which receives x[i].
pub fn embed(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    x_shape: &[usize],
    starts: &[usize],
    steps: &[isize],
    value: f32,
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let n: usize = out_shape.iter().product();
    let y = cx.empty(n);
    fill(cx, &y, n, value)?;
    let os = strides(out_shape);
    let base: isize = starts.iter().zip(&os).map(|(&s, &t)| (s * t) as isize).sum();
    let st: Vec<isize> = steps.iter().zip(&os).map(|(&p, &t)| p * t as isize).collect();
    strided_write(cx, x, x_shape, &y, base, &st)?;
    Ok(y)
}

/// Concatenation along `axis`: one strided write per part.
pub fn concat(
    cx: &GpuContext,
    parts: &[(&wgpu::Buffer, &[usize])],
    axis: usize,
    out_shape: &[usize],
) -> Result<wgpu::Buffer> {
    let y = cx.empty(out_shape.iter().product());
    let os: Vec<isize> = strides(out_shape).into_iter().map(|v| v as isize).collect();
    let mut off = 0;
    for (x, s) in parts {
        strided_write(cx, x, s, &y, off * os[axis], &os)?;
        off += s[axis] as isize;
    }
    Ok(y)
}

/// Where an index kernel records an out-of-range index: `flags[at]` becomes non-zero.
/// `flags` is a zero-initialised buffer of u32 (e.g. `cx.empty(n)`).
#[derive(Clone, Copy)]
pub struct Flag<'a> {
    pub flags: &'a wgpu::Buffer,
    pub at: usize,
}

/// (outer, len, inner) around `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// Gather along `axis` with `n_idx` indices (any index shape, flattened).
pub fn gather(
    cx: &GpuContext,
    data: &wgpu::Buffer,
    d_shape: &[usize],
    idx: &wgpu::Buffer,
    n_idx: usize,
    axis: usize,
    flag: Flag,
) -> Result<wgpu::Buffer> {
    let (outer, len, inner) = split(d_shape, axis);
    let n = outer * n_idx * inner;
    let y = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let meta = cx.upload_u32(&[n as u32, len as u32, n_idx as u32, inner as u32, width, flag.at as u32]);
    cx.dispatch("gather", &[data, idx, &y, flag.flags, &meta], groups)?;
    Ok(y)
}

/// The adjoint of gather: zeros of `d_shape` with dy added at the gathered rows, duplicates
/// summed in index order.
pub fn gather_grad(
    cx: &GpuContext,
    idx: &wgpu::Buffer,
    n_idx: usize,
    dy: &wgpu::Buffer,
    d_shape: &[usize],
    axis: usize,
    flag: Flag,
) -> Result<wgpu::Buffer> {
    let (outer, len, inner) = split(d_shape, axis);
    let dx = cx.empty(outer * len * inner);
    fill(cx, &dx, outer * len * inner, 0.0)?;
    let links = cx.empty(3 * n_idx);
    let (groups, width) = grid(n_idx, 64);
    let meta = cx.upload_u32(&[n_idx as u32, len as u32, width, flag.at as u32]);
    cx.dispatch("gather_grad_links", &[idx, &links, flag.flags, &meta], groups)?;
    let n = outer * n_idx * inner;
    let (groups, width) = grid(n, 256);
    let meta = cx.upload_u32(&[n as u32, len as u32, n_idx as u32, inner as u32, width]);
    cx.dispatch("gather_grad", &[dy, &links, &dx, &meta], groups)?;
    Ok(dx)
}

/// out[i] = data at i's multi-index with the `axis` coordinate replaced by idx[i].
pub fn gather_elements(
    cx: &GpuContext,
    data: &wgpu::Buffer,
    d_shape: &[usize],
    idx: &wgpu::Buffer,
    idx_shape: &[usize],
    axis: usize,
    flag: Flag,
) -> Result<wgpu::Buffer> {
    let n: usize = idx_shape.iter().product();
    let y = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let mut meta =
        vec![n as u32, idx_shape.len() as u32, axis as u32, d_shape[axis] as u32, width, flag.at as u32, 0, 0];
    meta.extend(pad8(idx_shape)?);
    meta.extend(pad8(&strides(d_shape))?);
    let meta = cx.upload_u32(&meta);
    cx.dispatch("gather_elements", &[data, idx, &y, flag.flags, &meta], groups)?;
    Ok(y)
}

/// out = data, then out[idx element's multi-index with axis coordinate idx[i]] = upd[i]
/// (or += with `add`), in index order.
#[allow(clippy::too_many_arguments)]
pub fn scatter_elements(
    cx: &GpuContext,
    data: &wgpu::Buffer,
    d_shape: &[usize],
    idx: &wgpu::Buffer,
    idx_shape: &[usize],
    upd: &wgpu::Buffer,
    axis: usize,
    add: bool,
    flag: Flag,
) -> Result<wgpu::Buffer> {
    let n: usize = d_shape.iter().product();
    if idx_shape.len() != d_shape.len() {
        return Err(Error::Other(format!(
            "gpu scatter_elements: indices of rank {} for data of rank {}",
            idx_shape.len(),
            d_shape.len()
        )));
    }
    let y = cx.empty(n);
    let (groups, width) = grid(n, 256);
    let mut meta = vec![n as u32, d_shape.len() as u32, axis as u32, add as u32, width, flag.at as u32, 0, 0];
    meta.extend(pad8(d_shape)?);
    meta.extend(pad8(idx_shape)?);
    meta.extend(pad8(&strides(idx_shape))?);
    let meta = cx.upload_u32(&meta);
    cx.dispatch("scatter_elements", &[data, idx, upd, &y, flag.flags, &meta], groups)?;
    Ok(y)
}

/// Indices (as floats) of the maximum (or minimum) along `axis`, keepdims.
pub fn argmax(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    shape: &[usize],
    axis: usize,
    select_last: bool,
    min: bool,
) -> Result<wgpu::Buffer> {
    let (outer, len, inner) = split(shape, axis);
    let n = outer * inner;
    let y = cx.empty(n);
    let (groups, width) = grid(n, 64);
    let meta = cx.upload_u32(&[n as u32, len as u32, inner as u32, width, select_last as u32, min as u32]);
    cx.dispatch("argmax", &[x, &y, &meta], groups)?;
    Ok(y)
}

/// Indices (as floats) of the k largest (or smallest) along `axis`, sorted, ties by index.
pub fn topk_indices(
    cx: &GpuContext,
    x: &wgpu::Buffer,
    shape: &[usize],
    axis: usize,
    k: usize,
    largest: bool,
) -> Result<wgpu::Buffer> {
    let (outer, len, inner) = split(shape, axis);
    if k > len {
        return Err(Error::Other(format!("gpu topk: k = {k} exceeds the axis length {len}")));
    }
    let n = outer * len * inner;
    let y = cx.empty(outer * k * inner);
    let (groups, width) = grid(n, 64);
    let meta = cx.upload_u32(&[n as u32, len as u32, inner as u32, k as u32, largest as u32, width]);
    cx.dispatch("topk_indices", &[x, &y, &meta], groups)?;
    Ok(y)
}

/// The window header shared by im2col, col2im, pool and pool_grad, for `n` invocations.
fn window_params(w: &Window, n: usize, width: u32) -> Vec<u32> {
    let mut p = vec![n as u32];
    p.extend(w.input.iter().map(|&v| v as u32));
    p.extend(w.kernel.iter().chain(&w.stride).chain(&w.dilation).chain(&w.pad).chain(&w.output).map(|&v| v as u32));
    p.push(width);
    p
}

/// x [N, C, H, W] → columns [C·kh·kw, N, OH·OW].
pub fn im2col(cx: &GpuContext, x: &wgpu::Buffer, w: &Window) -> Result<wgpu::Buffer> {
    let [n, c, _, _] = w.input;
    let total = c * w.kernel[0] * w.kernel[1] * n * w.output[0] * w.output[1];
    let y = cx.empty(total);
    let (groups, width) = grid(total, 256);
    let meta = cx.upload_u32(&window_params(w, total, width));
    cx.dispatch("im2col", &[x, &y, &meta], groups)?;
    Ok(y)
}

/// Columns [C·kh·kw, N, OH·OW] → x [N, C, H, W], overlaps summed.
pub fn col2im(cx: &GpuContext, cols: &wgpu::Buffer, w: &Window) -> Result<wgpu::Buffer> {
    let total: usize = w.input.iter().product();
    let y = cx.empty(total);
    let (groups, width) = grid(total, 256);
    let meta = cx.upload_u32(&window_params(w, total, width));
    cx.dispatch("col2im", &[cols, &y, &meta], groups)?;
    Ok(y)
}

fn pool_code(kind: PoolKind) -> [u32; 2] {
    match kind {
        PoolKind::Max => [0, 0],
        PoolKind::Avg { count_pad } => [1, count_pad as u32],
    }
}

/// Max or average pooling: x [N, C, H, W] → [N, C, OH, OW].
pub fn pool(cx: &GpuContext, kind: PoolKind, x: &wgpu::Buffer, w: &Window) -> Result<wgpu::Buffer> {
    let total = w.input[0] * w.input[1] * w.output[0] * w.output[1];
    let y = cx.empty(total);
    let (groups, width) = grid(total, 256);
    let mut meta = window_params(w, total, width);
    meta.extend(pool_code(kind));
    meta.push(f32::NEG_INFINITY.to_bits());
    let meta = cx.upload_u32(&meta);
    cx.dispatch("pool", &[x, &y, &meta], groups)?;
    Ok(y)
}

/// The gradient of pooling w.r.t. its input x, from dy.
pub fn pool_grad(
    cx: &GpuContext,
    kind: PoolKind,
    x: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    w: &Window,
) -> Result<wgpu::Buffer> {
    let total: usize = w.input.iter().product();
    let y = cx.empty(total);
    let (groups, width) = grid(total, 256);
    let mut meta = window_params(w, total, width);
    meta.extend(pool_code(kind));
    let meta = cx.upload_u32(&meta);
    cx.dispatch("pool_grad", &[x, dy, &y, &meta], groups)?;
    Ok(y)
}
