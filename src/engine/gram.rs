//! Per-unit NTK Gram matrices K_u = J_u J_uᵀ from per-sample pieces, layer by layer.
//!
//! One forward and one backward of the batch with the projection seed s(x) = ⟨r, f(x)⟩ /
//! sqrt(dim f) (samples are independent — no train-mode batch statistics in any supported
//! model — so the batch backward holds every sample's output gradient). For each weight
//! that a unit slice touches, the per-sample gradient is rebuilt from the kept activation
//! and output gradient of the instruction that reads it:
//! - matmul with the weight on the right (MatMul/Gemm): G_s = A_sᵀ·dC_s, rows of A
//!   sample-major (the leading axis of every activation is the sample axis);
//! - matmul with the weight on the left over im2col columns (Conv): G_s = dC_s·cols_sᵀ;
//! - broadcast Add/Mul (biases, LayerNorm/BatchNorm shifts): G_s = Σ over the sample's
//!   positions of dY_s (times the other operand for Mul).
//!
//! Layout ops between the weight and that instruction (Gemm's transB, a conv weight's
//! reshape) are undone with an index map computed by running them on an iota. Only one
//! weight's per-sample gradients [n × |W|] exist at a time. A weight used any other way
//! (BatchNorm scale, mean, variance) is listed in `skipped` and left out of K_u.

use std::collections::{BTreeMap, HashSet};

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
                        if k == 1 && p.shape(ins.ins[0]).len() == 2 && p.shape(s).len() == 2 =>
                    {
                        if p.shape(ins.ins[0])[0] % n == 0 {
                            let mut u = mk(UseKind::Right { a: ins.ins[0], tb: *tb });
                            u.map = index_map(p, ps, &chain);
                            uses.push(u);
                            continue;
                        }
                    }
                    Prim::MatMul { ta: false, tb: false }
                        if k == 0 && p.shape(s).len() == 3 && p.shape(ins.ins[1]).len() == 3 =>
                    {
                        if p.shape(ins.ins[1])[2] % n == 0 && p.shape(s)[0] == p.shape(ins.ins[1])[0] {
                            let mut u = mk(UseKind::Left { b: ins.ins[1] });
                            u.map = index_map(p, ps, &chain);
                            uses.push(u);
                            continue;
                        }
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
    grams_with(gp, model, groups, output, |keep| {
        gp.run::<T>(inputs, params, |outs| super::loss::projection(outs, output, r), keep)
    })
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

fn grams_with<T: Real>(
    gp: &GradProgram,
    model: &Model,
    groups: &[UnitGroup],
    output: usize,
    run: impl FnOnce(&HashSet<Slot>) -> Result<super::Run<T>>,
) -> Result<Grams> {
    let p = &gp.lowered.program;
    let (_, os) = gp.lowered.outputs.get(output).ok_or_else(|| Error::Other(format!("no output {output}")))?;
    let n = p.shape(*os).first().copied().unwrap_or(1);
    let mut skipped = Vec::new();
    let tensors = gram_tensors(gp, groups);
    let uses = find_uses(gp, &tensors, n, &mut skipped);
    let keep = kept(gp, &uses);
    let run = run(&keep)?;
    let mut k: Vec<Vec<Vec<f64>>> = groups.iter().map(|g| vec![vec![0.0; n * n]; g.count]).collect();
    for &t in &tensors {
        let tu: Vec<&Use> = uses.iter().filter(|u| u.param == t).collect();
        if tu.is_empty() {
            continue;
        }
        let numel = p.slots[gp.lowered.params[&t]].numel();
        // Per-sample gradient of the whole weight, in its own layout.
        let mut gw = vec![0.0f64; n * numel];
        for u in tu {
            let Some(&gs) = gp.grad.out_grads.get(&u.instr) else { continue };
            let dc = run.arena.get(gs).ok_or_else(|| Error::Other("engine: output gradient was not kept".into()))?;
            let g = per_sample(p, &run.arena, u, dc, n);
            let dn = u.map.len();
            for s in 0..n {
                for (j, &pi) in u.map.iter().enumerate() {
                    gw[s * numel + pi] += g[s * dn + j].to_f64c();
                }
            }
        }
        let dims = model.value(t).shape.clone().unwrap_or_default();
        for (gi, g) in groups.iter().enumerate() {
            for sl in g.slices.iter().filter(|s| s.tensor == t) {
                k[gi].par_iter_mut().enumerate().for_each(|(u, ku)| {
                    let out = unit_gram(&gw, n, numel, &slice_indices(&dims, sl, u));
                    for (a, b) in ku.iter_mut().zip(out) {
                        *a += b;
                    }
                });
            }
        }
    }
    Ok(Grams { n, k, skipped })
}
