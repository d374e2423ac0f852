//! Per-unit NTK Gram matrices K_u = J_u J_uᵀ from per-sample pieces, layer by layer.
//!
//! One forward of the batch, then per output projection s(x) = ⟨r, f(x)⟩ / sqrt(dim f) one
//! backward that computes only what the Grams read (samples are independent — no
//! train-mode batch statistics in any supported model — so the batch backward holds every
//! sample's output gradient; the weight-gradient products are never run). For each weight
//! that a unit slice touches, the per-sample gradient is rebuilt from the kept activation
//! and output gradient of the instruction that reads it:
//! - matmul with the weight on the right (MatMul/Gemm): G_s = A_sᵀ·dC_s, rows of A
//!   sample-major (the leading axis of every activation is the sample axis);
//! - matmul with the weight on the left over im2col columns (Conv): G_s = dC_s·cols_sᵀ;
//! - broadcast Add/Mul (biases, LayerNorm/BatchNorm shifts): G_s = Σ over the sample's
//!   positions of dY_s (times the other operand for Mul).
//!
//! CPU path: a 2-D weight read once by a matmul, sliced along either axis (the MatMul/Gemm
//! weights of transformers and MLPs), is a [`Product`]: per block of units and sample, one
//! small GEMM writes the block's rows of G_s with the unit axis outermost, and the units'
//! Grams are taken right away from those contiguous rows — no per-sample gradient of the
//! whole weight is ever stored. Other weights (biases, convs, shared weights) get their
//! per-sample gradients [n × |W|] for one weight at a time, transposed so that the sliced
//! axis is outermost. Layout ops between the weight and its reader (Gemm's transB, a conv
//! weight's reshape) are undone with an index map computed by running them on an iota.
//! Grams are summed in f64 from exact products (`syrk.rs`, upper triangle, mirrored at the
//! end). A weight used any other way (BatchNorm scale, mean, variance) is listed in
//! `skipped` and left out of K_u.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use rayon::prelude::*;

use super::cpu::{self, Real};
use super::program::{BinaryOp, Prim, Program, Slot, SlotKind};
use super::{GradProgram, Params};
use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::tensor::Tensor;
use crate::units::UnitGroup;

#[derive(Clone, Debug)]
enum UseKind {
    /// ins[1] of a MatMul is the derived weight; A = ins[0] is [R, K].
    Right { a: Slot, tb: bool },
    /// ins[0] of a MatMul is the derived weight [g, O, CK]; B = cols [g, CK, n·L].
    Left { b: Slot },
    /// Binary Add/Mul with the other operand `other` (None for Add).
    Elementwise { other: Option<Slot> },
}

#[derive(Clone, Debug)]
struct Use {
    param: Id,
    /// The layout chain's last slot (the operand the instruction reads).
    derived: Slot,
    /// derived element → param element.
    map: Vec<usize>,
    instr: usize,
    kind: UseKind,
}

/// Per-unit Gram matrices: `k[group][unit]` is n×n row-major.
#[derive(Clone, Debug)]
pub struct Grams {
    pub n: usize,
    pub k: Vec<Vec<Vec<f64>>>,
    /// Weights in unit slices whose per-sample gradients the engine cannot form.
    pub skipped: Vec<String>,
}

/// Runs `layout` instructions (Copy/Transpose chain from a weight) on an iota of the
/// weight, giving for each derived element the weight element it holds.
fn index_map(p: &Program, param: Slot, chain: &[usize]) -> Vec<usize> {
    let mut arena: cpu::Arena<f64> = cpu::Arena::new(p);
    let n = p.slots[param].numel();
    arena.set(param, (0..n).map(|i| i as f64).collect());
    for &i in chain {
        let out = cpu::exec(p, &p.instrs[i], &arena.bufs).expect("layout op on iota");
        arena.set(p.instrs[i].out, out);
    }
    let last = chain.last().map(|&i| p.instrs[i].out).unwrap_or(param);
    arena.get(last).expect("computed").iter().map(|&v| v as usize).collect()
}

fn find_uses(gp: &GradProgram, params: &[Id], n: usize, skipped: &mut Vec<String>) -> Vec<Use> {
    let p = &gp.lowered.program;
    let nf = gp.grad.n_forward;
    let mut readers: BTreeMap<Slot, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, ins) in p.instrs[..nf].iter().enumerate() {
        for (k, &s) in ins.ins.iter().enumerate() {
            readers.entry(s).or_default().push((i, k));
        }
    }
    let mut uses = Vec::new();
    for &id in params {
        let Some(&ps) = gp.lowered.params.get(&id) else { continue };
        let mut ok = true;
        // Depth-first over layout chains.
        let mut stack: Vec<(Slot, Vec<usize>)> = vec![(ps, vec![])];
        while let Some((s, chain)) = stack.pop() {
            for &(i, k) in readers.get(&s).map(|v| v.as_slice()).unwrap_or(&[]) {
                let ins = &p.instrs[i];
                let mk = |kind| Use { param: id, derived: s, map: vec![], instr: i, kind };
                match &ins.prim {
                    Prim::Copy | Prim::Transpose { .. } => {
                        let mut c = chain.clone();
                        c.push(i);
                        stack.push((ins.out, c));
                        continue;
                    }
                    Prim::MatMul { ta: false, tb }
                        if k == 1
                            && p.shape(ins.ins[0]).len() == 2
                            && p.shape(s).len() == 2
                            && p.shape(ins.ins[0])[0].is_multiple_of(n) =>
                    {
                        let mut u = mk(UseKind::Right { a: ins.ins[0], tb: *tb });
                        u.map = index_map(p, ps, &chain);
                        uses.push(u);
                        continue;
                    }
                    Prim::MatMul { ta: false, tb: false }
                        if k == 0
                            && p.shape(s).len() == 3
                            && p.shape(ins.ins[1]).len() == 3
                            && p.shape(ins.ins[1])[2].is_multiple_of(n)
                            && p.shape(s)[0] == p.shape(ins.ins[1])[0] =>
                    {
                        let mut u = mk(UseKind::Left { b: ins.ins[1] });
                        u.map = index_map(p, ps, &chain);
                        uses.push(u);
                        continue;
                    }
                    Prim::Binary(op @ (BinaryOp::Add | BinaryOp::Mul)) => {
                        let out = p.shape(ins.out);
                        let other = ins.ins[1 - k];
                        let fits = out.first() == Some(&n) && (p.shape(s).len() < out.len() || p.shape(s)[0] == 1);
                        if fits {
                            let o = if *op == BinaryOp::Mul { Some(other) } else { None };
                            let mut u = mk(UseKind::Elementwise { other: o });
                            u.map = index_map(p, ps, &chain);
                            uses.push(u);
                            continue;
                        }
                    }
                    _ => {}
                }
                ok = false;
            }
        }
        if !ok {
            skipped.push(p.slots[ps].name.clone());
            uses.retain(|u| u.param != id);
        }
    }
    uses
}

/// The slots `gram` needs kept through the run.
fn kept(gp: &GradProgram, uses: &[Use]) -> HashSet<Slot> {
    let mut k = HashSet::new();
    for u in uses {
        if let Some(&g) = gp.grad.out_grads.get(&u.instr) {
            k.insert(g);
        }
        match u.kind {
            UseKind::Right { a, .. } => {
                k.insert(a);
            }
            UseKind::Left { b } => {
                k.insert(b);
            }
            UseKind::Elementwise { other: Some(o) } => {
                k.insert(o);
            }
            UseKind::Elementwise { other: None } => {}
        }
    }
    k
}

fn slot_data<'a, T: Real>(p: &Program, arena: &'a cpu::Arena<T>, s: Slot, tmp: &'a mut Option<Vec<T>>) -> &'a [T] {
    if let Some(d) = arena.get(s) {
        return d;
    }
    if let SlotKind::Const(d) = &p.slots[s].kind {
        *tmp = Some(d.iter().map(|&x| T::c(x)).collect());
        return tmp.as_deref().expect("set");
    }
    &[]
}

/// Per-sample gradients of one use, in derived-operand layout: [n × |derived|].
fn per_sample<T: Real>(p: &Program, arena: &cpu::Arena<T>, u: &Use, dc: &[T], n: usize) -> Vec<T> {
    let ds = p.shape(u.derived).to_vec();
    let dn: usize = ds.iter().product();
    let mut g = vec![T::zero(); n * dn];
    match &u.kind {
        UseKind::Right { a, tb } => {
            let ash = p.shape(*a);
            let (r, kk) = (ash[0] / n, ash[1]);
            let a = arena.get(*a).expect("kept");
            let nn = dc.len() / ash[0];
            g.par_chunks_mut(dn).enumerate().for_each(|(s, gs)| {
                let (pa, pd) = (&a[s * r * kk..], &dc[s * r * nn..]);
                // SAFETY: A_s is r×kk, dC_s is r×nn, G_s is kk×nn (or nn×kk), all in bounds.
                unsafe {
                    if !tb {
                        T::gemm(
                            kk,
                            r,
                            nn,
                            pa.as_ptr(),
                            1,
                            kk as isize,
                            pd.as_ptr(),
                            nn as isize,
                            1,
                            gs.as_mut_ptr(),
                            nn as isize,
                            1,
                        );
                    } else {
                        T::gemm(
                            nn,
                            r,
                            kk,
                            pd.as_ptr(),
                            1,
                            nn as isize,
                            pa.as_ptr(),
                            kk as isize,
                            1,
                            gs.as_mut_ptr(),
                            kk as isize,
                            1,
                        );
                    }
                }
            });
        }
        UseKind::Left { b } => {
            let bs = p.shape(*b);
            let (gr, ck, nl) = (bs[0], bs[1], bs[2]);
            let l = nl / n;
            let o = ds[1];
            let cols = arena.get(*b).expect("kept");
            g.par_chunks_mut(dn).enumerate().for_each(|(s, gs)| {
                for gi in 0..gr {
                    let pd = &dc[gi * o * nl + s * l..];
                    let pc = &cols[gi * ck * nl + s * l..];
                    // SAFETY: dC block o×l (row stride nl), cols block ck×l read transposed.
                    unsafe {
                        T::gemm(
                            o,
                            l,
                            ck,
                            pd.as_ptr(),
                            nl as isize,
                            1,
                            pc.as_ptr(),
                            1,
                            nl as isize,
                            gs[gi * o * ck..].as_mut_ptr(),
                            ck as isize,
                            1,
                        );
                    }
                }
            });
        }
        UseKind::Elementwise { other } => {
            let ins = &p.instrs[u.instr];
            let ys = p.shape(ins.out).to_vec();
            let mut tmp = None;
            let prod: Vec<T> = match other {
                Some(o) => {
                    let od = slot_data(p, arena, *o, &mut tmp);
                    cpu::elementwise::binary(BinaryOp::Mul, dc, &ys, od, p.shape(*o), &ys)
                }
                None => dc.to_vec(),
            };
            // Sum each sample's block down to the derived shape.
            let off = ys.len() - ds.len();
            let axes: Vec<usize> = (1..ys.len()).filter(|&i| ys[i] != 1 && (i < off || ds[i - off] == 1)).collect();
            let red = if axes.is_empty() {
                prod
            } else {
                cpu::reduce::reduce(super::program::ReduceOp::Sum, &prod, &ys, &axes)
            };
            debug_assert_eq!(red.len(), n * dn);
            g = red;
        }
    }
    g
}

/// Per-unit Gram matrices of the projection s(x) = ⟨r, f_k(x)⟩/sqrt(dim f) over the batch,
/// for every unit of every group (all of its slices). `gp` must differentiate (at least)
/// every weight that appears in a slice.
pub fn grams<T: Real>(
    gp: &GradProgram,
    model: &Model,
    inputs: &[(String, Tensor)],
    params: &Params<T>,
    groups: &[UnitGroup],
    output: usize,
    r: &[f64],
) -> Result<Grams> {
    grams_mean(gp, model, inputs, params, groups, output, &[r.to_vec()], &mut GramTimes::default(), || {})
}

/// Seconds spent in each part of [`grams_mean`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GramTimes {
    /// The forward pass (once).
    pub forward: f64,
    /// The backward passes (one per projection, output gradients only).
    pub backward: f64,
    /// Per-sample gradients and their per-unit Grams.
    pub grams: f64,
}

/// K_u = (1/k) Σ_j J_{u,j} J_{u,j}ᵀ over the k projections `rs`, on the CPU: one forward,
/// then per projection one backward that computes only the output gradients of the
/// instructions reading unit weights (no weight-gradient products), and the Grams from
/// them. `tick` runs after each projection.
#[allow(clippy::too_many_arguments)]
pub fn grams_mean<T: Real>(
    gp: &GradProgram,
    model: &Model,
    inputs: &[(String, Tensor)],
    params: &Params<T>,
    groups: &[UnitGroup],
    output: usize,
    rs: &[Vec<f64>],
    times: &mut GramTimes,
    mut tick: impl FnMut(),
) -> Result<Grams> {
    let p = &gp.lowered.program;
    let (_, os) = gp.lowered.outputs.get(output).ok_or_else(|| Error::Other(format!("no output {output}")))?;
    let n = p.shape(*os).first().copied().unwrap_or(1);
    let mut skipped = Vec::new();
    let tensors = gram_tensors(gp, groups);
    let uses = find_uses(gp, &tensors, n, &mut skipped);
    let want = kept(gp, &uses);
    let t = Instant::now();
    let fwd = gp.forward::<T>(inputs, params, &want)?;
    times.forward += t.elapsed().as_secs_f64();
    let mut k: Vec<Vec<Vec<f64>>> = groups.iter().map(|g| vec![vec![0.0; n * n]; g.count]).collect();
    let alpha = 1.0 / rs.len().max(1) as f64;
    for r in rs {
        let t = Instant::now();
        let (_, arena) = gp.backward(&fwd, |outs| super::loss::projection(outs, output, r))?;
        times.backward += t.elapsed().as_secs_f64();
        let t = Instant::now();
        accumulate(gp, model, groups, &tensors, &uses, &arena, n, alpha, &mut k)?;
        times.grams += t.elapsed().as_secs_f64();
        tick();
    }
    k.par_iter_mut().flatten().for_each(|ku| super::syrk::mirror_upper(ku, n));
    Ok(Grams { n, k, skipped })
}

/// [`grams`] in f32 on `device`. On the CPU, exactly [`grams`]. On a GPU everything runs
/// there: the forward and backward, the per-sample products from the kept activations and
/// output gradients (batched matmuls, transposes, reductions), the re-layout to the
/// weight's own order (a gather) in f32, and the per-unit Gram accumulation
/// (`gram_units.wgsl`) in double-f32 (exact products, compensated sums: as accurate as the
/// CPU's f64 sum, which λ_min of ill-conditioned Grams needs); only the finished Grams are
/// read back.
#[allow(clippy::too_many_arguments)]
pub fn grams_on(
    device: &super::gpu::Device,
    gp: &GradProgram,
    model: &Model,
    inputs: &[(String, Tensor)],
    params: &Params<f32>,
    groups: &[UnitGroup],
    output: usize,
    r: &[f64],
) -> Result<Grams> {
    match device {
        super::gpu::Device::Cpu => grams(gp, model, inputs, params, groups, output, r),
        super::gpu::Device::Gpu(cx) => grams_gpu(cx, gp, model, inputs, params, groups, output, r),
    }
}

/// The flat indices, in the weight's own layout, of unit `u`'s entries in slice `sl` of a
/// tensor of shape `dims` (outer blocks ascending, then the unit's indices in order).
pub fn slice_indices(dims: &[usize], sl: &crate::units::Slice, u: usize) -> Vec<usize> {
    let outer: usize = dims[..sl.axis].iter().product();
    let len = dims[sl.axis];
    let inner: usize = dims[sl.axis + 1..].iter().product();
    let mut idx = Vec::new();
    for o in 0..outer {
        for i in UnitGroup::indices(sl, u).filter(|&i| i < len) {
            idx.extend((o * len + i) * inner..(o * len + i + 1) * inner);
        }
    }
    idx
}

/// G_u G_uᵀ (n × n, f64) for the per-sample gradients `gw` ([n, numel]) restricted to the
/// elements `idx`: the CPU twin of `gram_units.wgsl`.
pub fn unit_gram(gw: &[f64], n: usize, numel: usize, idx: &[usize]) -> Vec<f64> {
    let m = idx.len();
    let sub: Vec<f64> = (0..n).flat_map(|s| idx.iter().map(move |&e| (s, e))).map(|(s, e)| gw[s * numel + e]).collect();
    let mut out = vec![0.0f64; n * n];
    if m == 0 || n == 0 {
        return out;
    }
    // SAFETY: sub is n×m; out is n×n.
    unsafe {
        f64::gemm(n, m, n, sub.as_ptr(), m as isize, 1, sub.as_ptr(), 1, m as isize, out.as_mut_ptr(), n as isize, 1);
    }
    out
}

/// Per-sample gradients of one use on the device, in derived-operand layout: [n × |derived|]
/// (the GPU twin of [`per_sample`]).
fn per_sample_gpu(
    cx: &super::gpu::GpuContext,
    p: &Program,
    bufs: &BTreeMap<Slot, wgpu::Buffer>,
    u: &Use,
    dc: &wgpu::Buffer,
    n: usize,
) -> Result<wgpu::Buffer> {
    use super::gpu::kernels;
    let get = |s: Slot| bufs.get(&s).ok_or_else(|| Error::Other(format!("engine (gpu): slot {s} was not kept")));
    let ds = p.shape(u.derived).to_vec();
    match &u.kind {
        UseKind::Right { a, tb } => {
            let ash = p.shape(*a);
            let (r, kk) = (ash[0] / n, ash[1]);
            let nn = p.slots[p.instrs[u.instr].out].numel() / ash[0];
            let ab = get(*a)?;
            if !tb {
                kernels::matmul(cx, ab, &[n, r, kk], dc, &[n, r, nn], true, false, &[n, kk, nn])
            } else {
                kernels::matmul(cx, dc, &[n, r, nn], ab, &[n, r, kk], true, false, &[n, nn, kk])
            }
        }
        UseKind::Left { b } => {
            let bs = p.shape(*b);
            let (gr, ck, nl) = (bs[0], bs[1], bs[2]);
            let l = nl / n;
            let o = ds[1];
            let dct = kernels::transpose(cx, dc, &[gr, o, n, l], &[2, 0, 1, 3])?;
            let colst = kernels::transpose(cx, get(*b)?, &[gr, ck, n, l], &[2, 0, 1, 3])?;
            kernels::matmul(cx, &dct, &[n, gr, o, l], &colst, &[n, gr, ck, l], false, true, &[n, gr, o, ck])
        }
        UseKind::Elementwise { other } => {
            let ins = &p.instrs[u.instr];
            let ys = p.shape(ins.out).to_vec();
            let prod = match other {
                Some(o) => kernels::binary(cx, BinaryOp::Mul, dc, &ys, get(*o)?, p.shape(*o), &ys)?,
                None => dc.clone(),
            };
            let off = ys.len() - ds.len();
            let axes: Vec<usize> = (1..ys.len()).filter(|&i| ys[i] != 1 && (i < off || ds[i - off] == 1)).collect();
            if axes.is_empty() {
                Ok(prod)
            } else {
                kernels::reduce(cx, super::program::ReduceOp::Sum, &prod, &ys, &axes)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn grams_gpu(
    cx: &super::gpu::GpuContext,
    gp: &GradProgram,
    model: &Model,
    inputs: &[(String, Tensor)],
    params: &Params<f32>,
    groups: &[UnitGroup],
    output: usize,
    r: &[f64],
) -> Result<Grams> {
    use super::gpu::{kernels, pl};
    let p = &gp.lowered.program;
    let (_, os) = gp.lowered.outputs.get(output).ok_or_else(|| Error::Other(format!("no output {output}")))?;
    let n = p.shape(*os).first().copied().unwrap_or(1);
    let mut skipped = Vec::new();
    let tensors = gram_tensors(gp, groups);
    let uses = find_uses(gp, &tensors, n, &mut skipped);
    let keep = kept(gp, &uses);
    let (_, bufs) = gp.run_device(cx, inputs, params, |outs| super::loss::projection(outs, output, r), &keep)?;
    let kbufs: Vec<wgpu::Buffer> = groups.iter().map(|g| cx.empty(2 * g.count * n * n)).collect();
    let flags = cx.empty(1);
    for &t in &tensors {
        let numel = p.slots[gp.lowered.params[&t]].numel();
        let mut gw: Option<wgpu::Buffer> = None;
        for u in uses.iter().filter(|u| u.param == t) {
            let Some(&gs) = gp.grad.out_grads.get(&u.instr) else { continue };
            let dc = bufs.get(&gs).ok_or_else(|| Error::Other("engine: output gradient was not kept".into()))?;
            let g = per_sample_gpu(cx, p, &bufs, u, dc, n)?;
            let dn = u.map.len();
            if dn != numel || dn >= 1 << 24 {
                return Err(Error::Other(format!(
                    "engine (gpu): per-sample gradients of '{}': a layout chain of {dn} elements for a weight of \
                     {numel} (the GPU Gram path needs a bijection under 2^24 elements)",
                    p.slots[gp.lowered.params[&t]].name
                )));
            }
            let g = if u.map.iter().enumerate().all(|(j, &m)| j == m) {
                g
            } else {
                let mut inv = vec![0.0f32; numel];
                for (j, &m) in u.map.iter().enumerate() {
                    inv[m] = j as f32;
                }
                let flag = kernels::Flag { flags: &flags, at: 0 };
                kernels::gather(cx, &g, &[n, dn], &cx.upload(&inv), numel, 1, flag)?
            };
            gw = Some(match gw {
                None => g,
                Some(prev) => {
                    let sh = [n * numel];
                    kernels::binary(cx, BinaryOp::Add, &prev, &sh, &g, &sh, &sh)?
                }
            });
        }
        let Some(gw) = gw else { continue };
        let dims = model.value(t).shape.clone().unwrap_or_default();
        for (gi, g) in groups.iter().enumerate() {
            for sl in g.slices.iter().filter(|s| s.tensor == t) {
                let lists: Vec<Vec<usize>> = (0..g.count).map(|u| slice_indices(&dims, sl, u)).collect();
                pl::gram_units(cx, &gw, n, numel, &pl::Csr::new(&lists)?, &kbufs[gi])?;
            }
        }
    }
    let mut k = Vec::with_capacity(groups.len());
    for (g, kb) in groups.iter().zip(&kbufs) {
        let data = pl::read_double(cx, kb, g.count * n * n)?;
        k.push(data.chunks(n * n).map(|c| c.to_vec()).collect());
    }
    Ok(Grams { n, k, skipped })
}

/// The weights in unit slices that `gp` differentiates, sorted.
fn gram_tensors(gp: &GradProgram, groups: &[UnitGroup]) -> Vec<Id> {
    let mut tensors: Vec<Id> = groups.iter().flat_map(|g| g.slices.iter().map(|s| s.tensor)).collect();
    tensors.sort();
    tensors.dedup();
    tensors.into_iter().filter(|t| gp.wrt.contains_key(t)).collect()
}

/// A weight whose per-sample gradient is one product per sample, X_sᵀ·Y_s, with X_s
/// (r × a) and Y_s (r × b) the sample's rows of two kept slots (an activation and an output
/// gradient), X's features running along the sliced axis of the weight: the product's rows
/// are then the units' entries, contiguous.
struct Product {
    x: Slot,
    y: Slot,
    r: usize,
    a: usize,
    b: usize,
}

/// The [`Product`] form of use `u` for slices along `axis` of a weight of shape `dims`: a
/// matmul reading the 2-D weight on the right, directly or transposed.
fn product(gp: &GradProgram, u: &Use, dims: &[usize], axis: usize, n: usize) -> Option<Product> {
    let p = &gp.lowered.program;
    let UseKind::Right { a, tb } = u.kind else { return None };
    let ds = p.shape(u.derived);
    if dims.len() != 2 || ds.len() != 2 || axis > 1 {
        return None;
    }
    let same = ds == dims && u.map.iter().enumerate().all(|(j, &m)| j == m);
    let transposed = !same
        && ds == [dims[1], dims[0]]
        && u.map.iter().enumerate().all(|(j, &m)| m == (j % ds[1]) * ds[0] + j / ds[1]);
    if !same && !transposed {
        return None;
    }
    let dc = *gp.grad.out_grads.get(&u.instr)?;
    // The derived operand's axis that the slice runs along: without transB its rows are
    // A's features, with transB its columns are.
    let daxis = if same { axis } else { 1 - axis };
    let (x, y) = if (daxis == 0) != tb { (a, dc) } else { (dc, a) };
    let rows = p.shape(a)[0];
    if !rows.is_multiple_of(n) || !p.slots[x].numel().is_multiple_of(rows) || !p.slots[y].numel().is_multiple_of(rows) {
        return None;
    }
    Some(Product { x, y, r: rows / n, a: p.slots[x].numel() / rows, b: p.slots[y].numel() / rows })
}

/// The rows (indices along the sliced axis, below `len`) of unit `u`.
fn unit_rows(sl: &crate::units::Slice, u: usize, len: usize) -> std::ops::Range<usize> {
    let r = UnitGroup::indices(sl, u);
    r.start.min(len)..r.end.min(len)
}

/// Per-sample elements of a fused block (64 KB of f32 per sample, 2 MB at n = 32): large
/// enough that the per-sample GEMMs amortise matrixmultiply's packing of Y_s, small enough
/// that a block's products stay in cache while their Grams are taken.
const BLOCK_ELEMS: usize = 16384;

/// Grams of the units of slice `sl` from a [`Product`]: blocks of whole units (in
/// parallel); per block, each sample's rows of X_sᵀ·Y_s (one small GEMM), then each unit's
/// Gram from its contiguous rows. No per-sample gradient of the whole weight is stored.
#[allow(clippy::too_many_arguments)]
fn grams_of_product<T: Real>(
    arena: &cpu::Arena<T>,
    pr: &Product,
    n: usize,
    sl: &crate::units::Slice,
    alpha: f64,
    k: &mut [Vec<f64>],
) -> Result<()> {
    let x = arena.get(pr.x).ok_or_else(|| Error::Other("engine: an activation was not kept".into()))?;
    let y = arena.get(pr.y).ok_or_else(|| Error::Other("engine: an output gradient was not kept".into()))?;
    let factor = sl.factor.max(1);
    let mut units_per_block = (BLOCK_ELEMS / (factor * pr.b).max(1)).max(1);
    // Whole GEMM row panels (8 rows) where a block spans several.
    if units_per_block * factor >= 16 {
        units_per_block = (units_per_block * factor / 8 * 8).div_ceil(factor);
    }
    k.par_chunks_mut(units_per_block).enumerate().for_each_init(
        || (Vec::<T>::new(), Vec::<f64>::new()),
        |(buf, wide), (bi, ks)| {
            let u0 = bi * units_per_block;
            let lo = unit_rows(sl, u0, pr.a).start;
            let hi = unit_rows(sl, u0 + ks.len() - 1, pr.a).end;
            if hi <= lo {
                return;
            }
            let rows = hi - lo;
            // Every element is written by the GEMMs below (β = 0).
            buf.resize(n * rows * pr.b, T::zero());
            for (s, bs) in buf.chunks_mut(rows * pr.b).enumerate() {
                // SAFETY: X_s is r×a (row stride a) from row s·r, read transposed from column lo
                // for `rows` columns (lo + rows ≤ a); Y_s is r×b; bs is rows×b.
                unsafe {
                    T::gemm(
                        rows,
                        pr.r,
                        pr.b,
                        x[s * pr.r * pr.a + lo..].as_ptr(),
                        1,
                        pr.a as isize,
                        y[s * pr.r * pr.b..].as_ptr(),
                        pr.b as isize,
                        1,
                        bs.as_mut_ptr(),
                        pr.b as isize,
                        1,
                    );
                }
            }
            for (j, ku) in ks.iter_mut().enumerate() {
                let rg = unit_rows(sl, u0 + j, pr.a);
                if !rg.is_empty() {
                    gram_rows(buf, n, rows * pr.b, (rg.start - lo) * pr.b, rg.len() * pr.b, alpha, ku, wide);
                }
            }
        },
    );
    Ok(())
}

/// Per-sample gradients of weight `dims` summed over its uses, in axis-front layout: per
/// sample, the weight transposed so that `axis` is the outermost (a unit's entries are then
/// contiguous). For the uses that are not one [`Product`].
#[allow(clippy::too_many_arguments)]
fn axis_front<T: Real>(
    gp: &GradProgram,
    arena: &cpu::Arena<T>,
    uses: &[&Use],
    dims: &[usize],
    axis: usize,
    numel: usize,
    n: usize,
) -> Result<Vec<T>> {
    let p = &gp.lowered.program;
    let outer: usize = dims[..axis].iter().product();
    let len = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let mut f = vec![T::zero(); n * numel];
    for u in uses {
        let Some(&gs) = gp.grad.out_grads.get(&u.instr) else { continue };
        let dc = arena.get(gs).ok_or_else(|| Error::Other("engine: output gradient was not kept".into()))?;
        let g = per_sample(p, arena, u, dc, n);
        let dn = u.map.len();
        let to: Vec<usize> = u
            .map
            .iter()
            .map(|&e| {
                let (o, i, q) = (e / (len * inner), (e / inner) % len, e % inner);
                (i * outer + o) * inner + q
            })
            .collect();
        f.par_chunks_mut(numel).zip(g.par_chunks(dn)).for_each(|(fs, gs)| {
            for (&d, &v) in to.iter().zip(gs) {
                fs[d] += v;
            }
        });
    }
    Ok(f)
}

/// K += alpha · X Xᵀ (upper triangle, f64) with X_s = data[s·stride + off ..][..m]: the T
/// values are widened to f64 in column chunks (`x` is scratch), so products are exact and
/// sums f64 (λ_min of ill-conditioned Grams needs it); [`super::syrk::syrk_upper`] per chunk.
#[allow(clippy::too_many_arguments)]
fn gram_rows<T: Real>(
    data: &[T],
    n: usize,
    stride: usize,
    off: usize,
    m: usize,
    alpha: f64,
    k: &mut [f64],
    x: &mut Vec<f64>,
) {
    // 64 KB of f64 per chunk: the rows of a tile stay in L1, the chunk in L2.
    let ch = (8192 / n.max(1)).clamp(16, 1024);
    x.resize(n * ch.min(m), 0.0);
    let mut c0 = 0;
    while c0 < m {
        let w = ch.min(m - c0);
        for (s, xs) in x.chunks_mut(w).take(n).enumerate() {
            let src = &data[s * stride + off + c0..][..w];
            xs.iter_mut().zip(src).for_each(|(d, &v)| *d = v.to_f64c());
        }
        super::syrk::syrk_upper(&x[..n * w], n, w, alpha, k);
        c0 += w;
    }
}

/// Adds alpha × this run's per-unit Grams to `k`, weight by weight.
#[allow(clippy::too_many_arguments)]
fn accumulate<T: Real>(
    gp: &GradProgram,
    model: &Model,
    groups: &[UnitGroup],
    tensors: &[Id],
    uses: &[Use],
    arena: &cpu::Arena<T>,
    n: usize,
    alpha: f64,
    k: &mut [Vec<Vec<f64>>],
) -> Result<()> {
    let p = &gp.lowered.program;
    for &t in tensors {
        let tu: Vec<&Use> = uses.iter().filter(|u| u.param == t && gp.grad.out_grads.contains_key(&u.instr)).collect();
        if tu.is_empty() {
            continue;
        }
        let numel = p.slots[gp.lowered.params[&t]].numel();
        let dims = model.value(t).shape.clone().unwrap_or_default();
        // Axis-front per-sample gradients for the general path, per axis, made on first need.
        let mut front: BTreeMap<usize, Vec<T>> = BTreeMap::new();
        for (gi, g) in groups.iter().enumerate() {
            for sl in g.slices.iter().filter(|s| s.tensor == t) {
                let fused = if tu.len() == 1 { product(gp, tu[0], &dims, sl.axis, n) } else { None };
                if let Some(pr) = fused {
                    grams_of_product(arena, &pr, n, sl, alpha, &mut k[gi])?;
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = front.entry(sl.axis) {
                    e.insert(axis_front(gp, arena, &tu, &dims, sl.axis, numel, n)?);
                }
                let f = &front[&sl.axis];
                let len = dims[sl.axis];
                let row = numel / len.max(1);
                k[gi].par_iter_mut().enumerate().for_each_init(Vec::new, |x, (u, ku)| {
                    let rg = unit_rows(sl, u, len);
                    if !rg.is_empty() {
                        gram_rows(f, n, numel, rg.start * row, rg.len() * row, alpha, ku, x);
                    }
                });
            }
        }
    }
    Ok(())
}
