//! GPU kernels of the PL criterion's own computations (the model's passes run in
//! [`super::exec`]): per-unit Gram accumulation, batched symmetric eigenvalues, the
//! per-unit sums of Hutchinson probes, and the gate network (forward, backward, Adam).
//! Each names its CPU twin; tests/engine_gpu_pl.rs compares them on ragged shapes.
//!
//! Units address elements of a flat vector through a [`Csr`] list (unit u owns
//! `idx[offs[u]..offs[u + 1]]`), built once on the CPU in the unit's element order, so
//! both backends sum in the same order.

use super::{grid, GpuContext};
use crate::error::{Error, Result};

/// Unit → element lists, compressed: unit u owns `idx[offs[u] as usize..offs[u + 1] as usize]`.
#[derive(Clone, Debug, Default)]
pub struct Csr {
    pub offs: Vec<u32>,
    pub idx: Vec<u32>,
}

impl Csr {
    /// From one element list per unit; an error when an index does not fit in u32.
    pub fn new(lists: &[Vec<usize>]) -> Result<Csr> {
        let mut offs = Vec::with_capacity(lists.len() + 1);
        let mut idx = Vec::new();
        offs.push(0u32);
        for l in lists {
            for &e in l {
                idx.push(u32::try_from(e).map_err(|_| too_big("element index", e))?);
            }
            offs.push(u32::try_from(idx.len()).map_err(|_| too_big("unit element count", idx.len()))?);
        }
        Ok(Csr { offs, idx })
    }

    pub fn units(&self) -> usize {
        self.offs.len().saturating_sub(1)
    }

    pub fn unit(&self, u: usize) -> &[u32] {
        &self.idx[self.offs[u] as usize..self.offs[u + 1] as usize]
    }
}

fn too_big(what: &str, v: usize) -> Error {
    Error::Other(format!("gpu: {what} {v} does not fit the kernels' 32-bit indices"))
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| too_big(what, v))
}

/// K[u] += G_u G_uᵀ for every unit of `csr`, G = `g` viewed as [n, numel]; `k` holds
/// [units, n, n, 2] as double-f32 (hi, lo) pairs (see [`read_double`]), accumulated with
/// exact products, so K matches an f64 sum. CPU twin: `engine::gram::unit_gram`.
pub fn gram_units(
    cx: &GpuContext,
    g: &wgpu::Buffer,
    n: usize,
    numel: usize,
    csr: &Csr,
    k: &wgpu::Buffer,
) -> Result<()> {
    let total = csr.units() * n * n;
    if total == 0 {
        return Ok(());
    }
    let (groups, width) = grid(total, 64);
    let offs = cx.upload_u32(&csr.offs);
    let idx = cx.upload_u32(&csr.idx);
    let meta = cx.upload_u32(&[u32_of("n", n)?, u32_of("numel", numel)?, u32_of("Gram entries", total)?, width]);
    cx.dispatch("gram_units", &[g, &offs, &idx, k, &meta], groups)
}

/// `len` double-f32 values (hi, lo pairs) of `buf`, as f64.
pub fn read_double(cx: &GpuContext, buf: &wgpu::Buffer, len: usize) -> Result<Vec<f64>> {
    Ok(cx.read(buf, 2 * len)?.chunks(2).map(|c| c[0] as f64 + c[1] as f64).collect())
}

/// Largest matrix `sym_eigvals` takes.
pub const EIG_MAX_N: usize = 64;
/// Sweeps of the Jacobi kernel at most (it stops earlier once converged).
pub const EIG_MAX_SWEEPS: u32 = 16;
/// Off-diagonal stopping tolerance relative to ‖A‖_F.
pub const EIG_TOL: f32 = 1e-7;
/// Workgroup memory the Jacobi kernel declares (matrix, rotations, pairs, scratch, flags).
const EIG_WORKGROUP_BYTES: u32 = 4 * 4096 + 8 * 32 + 8 * 32 + 4 * 64 + 8;

/// Eigenvalues from [`sym_eigvals`] are accurate to about this multiple of ε_f32 · n · λ_max
/// (absolute); tests/engine_gpu_pl.rs checks 4.
pub const EIG_ABS_ERR: f64 = 4.0;

/// Whether λ_min = `lmin` from [`sym_eigvals`] is known to 1e-3 relative: above
/// 1e3 · 4 n ε_f32 · λ_max. Below that (ill-conditioned Grams) f32 Jacobi cannot resolve
/// it and callers recompute the spectrum in f64.
pub fn lambda_min_resolved(lmin: f64, lmax: f64, n: usize) -> bool {
    lmin >= 1e3 * EIG_ABS_ERR * n.max(4) as f64 * f32::EPSILON as f64 * lmax.abs()
}

/// Whether this adapter can run [`sym_eigvals`] on n × n matrices.
pub fn eig_supported(cx: &GpuContext, n: usize) -> bool {
    n <= EIG_MAX_N && cx.device.limits().max_compute_workgroup_storage_size >= EIG_WORKGROUP_BYTES
}

/// Eigenvalues, ascending, of `count` symmetric n × n matrices (`mats` row-major, the upper
/// triangle read), f32 Jacobi on the device: [count, n]. Absolute accuracy ≈ n · ε_f32 ·
/// λ_max. CPU twin: `linalg::sym_eigvals` (f64).
pub fn sym_eigvals(cx: &GpuContext, mats: &wgpu::Buffer, n: usize, count: usize) -> Result<wgpu::Buffer> {
    if !eig_supported(cx, n) {
        return Err(Error::Other(format!(
            "gpu eigenvalues: {n}×{n} matrices need n ≤ {EIG_MAX_N} and {EIG_WORKGROUP_BYTES} bytes of workgroup \
             memory (the adapter has {})",
            cx.device.limits().max_compute_workgroup_storage_size
        )));
    }
    let out = cx.empty(count * n);
    if count == 0 || n == 0 {
        return Ok(out);
    }
    let gx = count.min(65_535);
    let gy = count.div_ceil(gx);
    let meta = cx.upload_u32(&[n as u32, u32_of("matrix count", count)?, EIG_MAX_SWEEPS, EIG_TOL.to_bits(), gx as u32]);
    cx.dispatch("sym_eigvals", &[mats, &out, &meta], (gx as u32, gy as u32, 1))?;
    Ok(out)
}

/// Row `probe` of `out` ([probes, units]) = scale · Σ_{e ∈ u} z[e] (gp[e] − gm[e]) per unit.
/// CPU twin: [`unit_dots_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn unit_dots(
    cx: &GpuContext,
    z: &wgpu::Buffer,
    gp: &wgpu::Buffer,
    gm: &wgpu::Buffer,
    csr: &Csr,
    scale: f32,
    out: &wgpu::Buffer,
    probe: usize,
) -> Result<()> {
    let units = csr.units();
    if units == 0 {
        return Ok(());
    }
    let (groups, width) = grid(units, 64);
    let offs = cx.upload_u32(&csr.offs);
    let idx = cx.upload_u32(&csr.idx);
    let meta = cx.upload_u32(&[u32_of("units", units)?, scale.to_bits(), u32_of("probe", probe)?, width]);
    cx.dispatch("unit_dots", &[z, gp, gm, &offs, &idx, out, &meta], groups)
}

/// The CPU form of [`unit_dots`] (f32, same order): the per-unit sums of
/// `criteria::ntk::hutchinson` for one probe.
pub fn unit_dots_cpu(z: &[f32], gp: &[f32], gm: &[f32], csr: &Csr, scale: f32) -> Vec<f32> {
    (0..csr.units())
        .map(|u| {
            let mut acc = 0.0f32;
            for &e in csr.unit(u) {
                let e = e as usize;
                acc += z[e] * (gp[e] - gm[e]);
            }
            acc * scale
        })
        .collect()
}

/// Logits a[u] of the gate network with flat parameters `p` ([4h + 1]) on the features
/// `d` ([units, 2]). CPU twin: `criteria::gate::GateNet::forward`.
pub fn gate_forward(
    cx: &GpuContext,
    p: &wgpu::Buffer,
    d: &wgpu::Buffer,
    units: usize,
    h: usize,
) -> Result<wgpu::Buffer> {
    let a = cx.empty(units);
    if units == 0 {
        return Ok(a);
    }
    let (groups, width) = grid(units, 64);
    let meta = cx.upload_u32(&[u32_of("units", units)?, u32_of("hidden width", h)?, width]);
    cx.dispatch("gate_forward", &[p, d, &a, &meta], groups)?;
    Ok(a)
}

/// Σ_u da[u] ∂a_u/∂p ([4h + 1]). CPU twin: `criteria::gate::GateNet::backward` over units.
pub fn gate_backward(
    cx: &GpuContext,
    p: &wgpu::Buffer,
    d: &wgpu::Buffer,
    da: &wgpu::Buffer,
    units: usize,
    h: usize,
) -> Result<wgpu::Buffer> {
    let np = 4 * h + 1;
    let grad = cx.empty(np);
    let meta = cx.upload_u32(&[u32_of("units", units)?, u32_of("hidden width", h)?]);
    cx.dispatch("gate_backward", &[p, d, da, &grad, &meta], (np.div_ceil(64) as u32, 1, 1))?;
    Ok(grad)
}

/// Adam's step `t` (1-based) on `n` parameters in place (β1 0.9, β2 0.999, ε 1e-8).
/// CPU twin: `criteria::gate::Adam::step`.
#[allow(clippy::too_many_arguments)]
pub fn adam(
    cx: &GpuContext,
    p: &wgpu::Buffer,
    m: &wgpu::Buffer,
    v: &wgpu::Buffer,
    g: &wgpu::Buffer,
    n: usize,
    lr: f64,
    t: i32,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let (b1, b2) = (0.9f64, 0.999f64);
    let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let (groups, width) = grid(n, 64);
    let f = |x: f64| (x as f32).to_bits();
    let meta = cx.upload_u32(&[u32_of("parameters", n)?, width, f(lr), f(b1), f(b2), f(c1), f(c2)]);
    cx.dispatch("adam", &[p, m, v, g, &meta], groups)
}
