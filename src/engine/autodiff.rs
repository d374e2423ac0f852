//! Reverse-mode differentiation of a lowered program, written back in the same primitives.
//!
//! `differentiate` appends the backward instructions to the program: a seed slot per
//! output receives dL/d(output), and every requested slot (weights, inputs) gets a gradient
//! slot. Only instructions on a path from a requested slot to an output are differentiated;
//! index paths (ArgMax, TopK indices, comparisons, casts to integers) have zero derivative
//! and carry none. Broadcasting is undone by summing (`Program::sum_to`). A primitive with
//! no derivative rule on a differentiated path is an error naming its node.

use std::collections::BTreeMap;

use super::program::{BinaryOp, Prim, Program, ReduceOp, RowOp, Slot, SlotKind, UnaryOp};
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Grad {
    /// Instructions `0..n_forward` are the forward pass; the rest are backward.
    pub n_forward: usize,
    /// One cotangent input per differentiated output, in the order given.
    pub seeds: Vec<Slot>,
    /// Requested slot → its gradient slot (absent when the outputs do not depend on it).
    pub grads: BTreeMap<Slot, Slot>,
    /// Forward instruction index → the gradient slot of its output.
    pub out_grads: BTreeMap<usize, Slot>,
}

fn matmul_shape(p: &Program, a: Slot, b: Slot, ta: bool, tb: bool) -> Vec<usize> {
    let (sa, sb) = (p.shape(a), p.shape(b));
    let (ra, rb) = (sa.len(), sb.len());
    let m = if ta { sa[ra - 1] } else { sa[ra - 2] };
    let n = if tb { sb[rb - 2] } else { sb[rb - 1] };
    let mut s = super::program::broadcast_shapes(&sa[..ra - 2], &sb[..rb - 2]).unwrap_or_default();
    s.push(m);
    s.push(n);
    s
}

/// Appends the backward program of `outputs` with respect to `wrt`.
pub fn differentiate(p: &mut Program, outputs: &[Slot], wrt: &[Slot]) -> Result<Grad> {
    let n_forward = p.instrs.len();
    let mut req = vec![false; p.slots.len()];
    for &w in wrt {
        req[w] = true;
    }
    for ins in &p.instrs {
        if ins.stop_grad {
            continue;
        }
        let carries = match &ins.prim {
            Prim::Unary(op) => op.differentiable(),
            Prim::Binary(op) => !matches!(
                op,
                BinaryOp::Equal
                    | BinaryOp::Less
                    | BinaryOp::Greater
                    | BinaryOp::LessEq
                    | BinaryOp::GreaterEq
                    | BinaryOp::And
                    | BinaryOp::Or
                    | BinaryOp::Xor
            ),
            Prim::ArgMax { .. } | Prim::TopKIndices { .. } => false,
            _ => true,
        };
        if carries && ins.ins.iter().any(|&s| req[s]) {
            req[ins.out] = true;
        }
    }
    let mut grads: BTreeMap<Slot, Slot> = BTreeMap::new();
    let mut seeds = Vec::new();
    for (k, &o) in outputs.iter().enumerate() {
        let s = p.add_slot(p.shape(o).to_vec(), SlotKind::Input(format!("seed:{k}")), format!("seed:{k}"));
        seeds.push(s);
        if req[o] {
            accumulate(p, &mut grads, o, s, "seed");
        }
    }
    let mut out_grads = BTreeMap::new();
    for i in (0..n_forward).rev() {
        let ins = p.instrs[i].clone();
        if ins.stop_grad || !req[ins.out] {
            continue;
        }
        let Some(&g) = grads.get(&ins.out) else { continue };
        out_grads.insert(i, g);
        let n = ins.node.as_str();
        let r = |k: usize| req[ins.ins[k]];
        let x = |k: usize| ins.ins[k];
        let sx = |p: &Program, k: usize| p.shape(ins.ins[k]).to_vec();
        let unsupported = || {
            Error::Other(format!(
                "engine: no derivative for {} ({:?}) in node '{}'",
                ins.prim.name(),
                ins.prim,
                ins.node
            ))
        };
        let mut contrib: Vec<(Slot, Slot)> = Vec::new();
        match &ins.prim {
            Prim::Unary(op) => {
                if op.differentiable() && r(0) {
                    let s = sx(p, 0);
                    let d = if *op == UnaryOp::Exp {
                        // dy · eˣ from the forward's output, which backward keeps anyway when
                        // it is softmax's numerator: no second exp, and x need not be kept.
                        p.push(Prim::Binary(BinaryOp::Mul), vec![ins.out, g], s, n)
                    } else {
                        p.push(Prim::UnaryGrad(*op), vec![x(0), g], s, n)
                    };
                    contrib.push((x(0), d));
                }
            }
            Prim::Binary(op) => {
                let (a, b) = (x(0), x(1));
                let (sa, sb) = (sx(p, 0), sx(p, 1));
                match op {
                    BinaryOp::Add | BinaryOp::Sub => {
                        if r(0) {
                            contrib.push((a, p.sum_to(g, &sa, n)));
                        }
                        if r(1) {
                            let t = p.sum_to(g, &sb, n);
                            let t = if *op == BinaryOp::Sub { p.unary(UnaryOp::Neg, t, n) } else { t };
                            contrib.push((b, t));
                        }
                    }
                    BinaryOp::Mul => {
                        if r(0) {
                            let t = p.binary(BinaryOp::Mul, g, b, n);
                            contrib.push((a, p.sum_to(t, &sa, n)));
                        }
                        if r(1) {
                            let t = p.binary(BinaryOp::Mul, g, a, n);
                            contrib.push((b, p.sum_to(t, &sb, n)));
                        }
                    }
                    BinaryOp::Div => {
                        if r(0) {
                            let t = p.binary(BinaryOp::Div, g, b, n);
                            contrib.push((a, p.sum_to(t, &sa, n)));
                        }
                        if r(1) {
                            let q = p.binary(BinaryOp::Div, ins.out, b, n);
                            let t = p.binary(BinaryOp::Mul, g, q, n);
                            let t = p.sum_to(t, &sb, n);
                            contrib.push((b, p.unary(UnaryOp::Neg, t, n)));
                        }
                    }
                    BinaryOp::Pow => {
                        if r(0) {
                            let d = p.binary(BinaryOp::PowGrad, a, b, n);
                            let t = p.binary(BinaryOp::Mul, g, d, n);
                            contrib.push((a, p.sum_to(t, &sa, n)));
                        }
                        if r(1) {
                            let l = p.unary(UnaryOp::Log, a, n);
                            let q = p.binary(BinaryOp::Mul, ins.out, l, n);
                            let t = p.binary(BinaryOp::Mul, g, q, n);
                            contrib.push((b, p.sum_to(t, &sb, n)));
                        }
                    }
                    _ => return Err(unsupported()),
                }
            }
            Prim::Where => {
                let zero = p.scalar(0.0);
                for (k, first) in [(1, true), (2, false)] {
                    if r(k) {
                        let os = p.shape(ins.out).to_vec();
                        let ins3 = if first { vec![x(0), g, zero] } else { vec![x(0), zero, g] };
                        let t = p.push(Prim::Where, ins3, os, n);
                        let s = sx(p, k);
                        contrib.push((x(k), p.sum_to(t, &s, n)));
                    }
                }
            }
            Prim::Reduce { op, axes } => {
                let s = sx(p, 0);
                let count: usize = axes.iter().map(|&a| s[a]).product();
                let t = match op {
                    ReduceOp::Sum => p.push(Prim::Broadcast, vec![g], s, n),
                    ReduceOp::Mean => {
                        // Scaled before it is broadcast: the same values, one pass over the
                        // reduced shape instead of the input's.
                        let t = p.unary(UnaryOp::Affine(1.0 / count as f32, 0.0), g, n);
                        p.push(Prim::Broadcast, vec![t], s, n)
                    }
                    ReduceOp::Max | ReduceOp::Min => {
                        let mask = p.binary(BinaryOp::Equal, x(0), ins.out, n);
                        p.binary(BinaryOp::Mul, mask, g, n)
                    }
                };
                contrib.push((x(0), t));
            }
            Prim::Broadcast => {
                let s = sx(p, 0);
                contrib.push((x(0), p.sum_to(g, &s, n)));
            }
            Prim::MatMul { ta, tb } => {
                let (a, b, ta, tb) = (x(0), x(1), *ta, *tb);
                if r(0) {
                    let (l, rr, fa, fb) = if !ta { (g, b, false, !tb) } else { (b, g, tb, true) };
                    let s = matmul_shape(p, l, rr, fa, fb);
                    let t = p.push(Prim::MatMul { ta: fa, tb: fb }, vec![l, rr], s, n);
                    let sa = sx(p, 0);
                    contrib.push((a, p.sum_to(t, &sa, n)));
                }
                if r(1) {
                    let (l, rr, fa, fb) = if !tb { (a, g, !ta, false) } else { (g, a, true, ta) };
                    let s = matmul_shape(p, l, rr, fa, fb);
                    let t = p.push(Prim::MatMul { ta: fa, tb: fb }, vec![l, rr], s, n);
                    let sb = sx(p, 1);
                    contrib.push((b, p.sum_to(t, &sb, n)));
                }
            }
            Prim::Copy => {
                let s = sx(p, 0);
                contrib.push((x(0), p.reshape(g, s, n)));
            }
            Prim::Transpose { perm } => {
                let mut inv = vec![0; perm.len()];
                for (i, &q) in perm.iter().enumerate() {
                    inv[q] = i;
                }
                let s = sx(p, 0);
                contrib.push((x(0), p.push(Prim::Transpose { perm: inv }, vec![g], s, n)));
            }
            Prim::Slice { starts, steps } => {
                let s = sx(p, 0);
                let prim = Prim::Embed { starts: starts.clone(), steps: steps.clone(), fill: 0.0 };
                contrib.push((x(0), p.push(prim, vec![g], s, n)));
            }
            Prim::Embed { starts, steps, .. } => {
                let s = sx(p, 0);
                let prim = Prim::Slice { starts: starts.clone(), steps: steps.clone() };
                contrib.push((x(0), p.push(prim, vec![g], s, n)));
            }
            Prim::Concat { axis } => {
                let mut off = 0;
                for k in 0..ins.ins.len() {
                    let s = sx(p, k);
                    if r(k) {
                        let mut st = vec![0; s.len()];
                        st[*axis] = off;
                        let prim = Prim::Slice { starts: st, steps: vec![1; s.len()] };
                        contrib.push((x(k), p.push(prim, vec![g], s.clone(), n)));
                    }
                    off += s[*axis];
                }
            }
            Prim::Gather { axis } => {
                if r(0) {
                    let s = sx(p, 0);
                    contrib.push((x(0), p.push(Prim::GatherGrad { axis: *axis }, vec![x(1), g], s, n)));
                }
            }
            Prim::GatherElements { axis } => {
                if r(0) {
                    let s = sx(p, 0);
                    let zero = p.scalar(0.0);
                    let z = p.push(Prim::Broadcast, vec![zero], s.clone(), n);
                    let prim = Prim::ScatterElements { axis: *axis, add: true };
                    contrib.push((x(0), p.push(prim, vec![z, x(1), g], s, n)));
                }
            }
            Prim::ScatterElements { axis, add } => {
                if r(0) {
                    if *add {
                        contrib.push((x(0), g));
                    } else {
                        let su = sx(p, 2);
                        let zero = p.scalar(0.0);
                        let z = p.push(Prim::Broadcast, vec![zero], su, n);
                        let s = sx(p, 0);
                        let prim = Prim::ScatterElements { axis: *axis, add: false };
                        contrib.push((x(0), p.push(prim, vec![g, x(1), z], s, n)));
                    }
                }
                if r(2) {
                    let s = sx(p, 1);
                    contrib.push((x(2), p.push(Prim::GatherElements { axis: *axis }, vec![g, x(1)], s, n)));
                }
            }
            Prim::ArgMax { .. } | Prim::TopKIndices { .. } => {}
            Prim::Im2Col(w) => {
                let s = sx(p, 0);
                contrib.push((x(0), p.push(Prim::Col2Im(w.clone()), vec![g], s, n)));
            }
            Prim::Col2Im(w) => {
                let s = sx(p, 0);
                contrib.push((x(0), p.push(Prim::Im2Col(w.clone()), vec![g], s, n)));
            }
            Prim::Pool(kind, w) => {
                let s = sx(p, 0);
                contrib.push((x(0), p.push(Prim::PoolGrad(*kind, w.clone()), vec![x(0), g], s, n)));
            }
            Prim::Rows(op) => {
                if r(0) {
                    // Softmax's derivative reads its output, Normalize's its input.
                    let a = if *op == RowOp::Softmax { ins.out } else { x(0) };
                    let s = sx(p, 0);
                    contrib.push((x(0), p.push(Prim::RowsGrad(*op), vec![a, g], s, n)));
                }
            }
            Prim::UnaryGrad(_) | Prim::GatherGrad { .. } | Prim::PoolGrad(..) | Prim::RowsGrad(_) => {
                if ins.ins.iter().any(|&s| req[s]) {
                    return Err(unsupported());
                }
            }
        }
        for (s, t) in contrib {
            if req[s] {
                accumulate(p, &mut grads, s, t, n);
            }
        }
    }
    let grads = wrt.iter().filter_map(|w| grads.get(w).map(|g| (*w, *g))).collect();
    Ok(Grad { n_forward, seeds, grads, out_grads })
}

fn accumulate(p: &mut Program, grads: &mut BTreeMap<Slot, Slot>, s: Slot, g: Slot, node: &str) {
    let g = match grads.get(&s) {
        Some(&prev) => p.binary(BinaryOp::Add, prev, g, node),
        None => g,
    };
    grads.insert(s, g);
}
