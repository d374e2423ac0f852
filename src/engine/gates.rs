//! Unit gates: the masked model and ∂L/∂gate per unit.
//!
//! A gate g_u multiplies unit u's output (filter channel, neuron activation, head context,
//! expert output). That is the same as scaling the unit's `Role::Consumer` slices (the
//! input slices of the weights that read the unit) by g_u — exactly what the rewrite's
//! masked model zeroes — so running "with a gate vector" is running with scaled weights, and
//! ∂L/∂g_u = Σ over the unit's consumer slices of W⁰ ⊙ (other gates) ⊙ ∂L/∂W, from ordinary
//! weight gradients. When several groups gate the same tensor (different axes, or concat
//! segments), the factors multiply.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cpu::Real;
use super::Params;
use crate::ir::{Id, Model};
use crate::units::{Role, UnitGroup};

/// One gating factor on a tensor: the group, the slice, and the scale per element.
struct Factor {
    group: usize,
    slice: usize,
    scale: Vec<f64>,
}

/// (outer, len, inner) of `dims` around `axis`.
fn split(dims: &[usize], axis: usize) -> (usize, usize, usize) {
    (dims[..axis].iter().product(), dims[axis], dims[axis + 1..].iter().product())
}

/// Per consumer tensor, its gating factors.
fn factors(model: &Model, groups: &[UnitGroup], gates: &[Vec<f64>]) -> BTreeMap<Id, Vec<Factor>> {
    let mut out: BTreeMap<Id, Vec<Factor>> = BTreeMap::new();
    for (gi, g) in groups.iter().enumerate() {
        for (si, s) in g.slices.iter().enumerate() {
            if s.role != Role::Consumer {
                continue;
            }
            let Some(dims) = model.value(s.tensor).shape.clone() else { continue };
            let numel: usize = dims.iter().product();
            let mut scale = vec![1.0; numel];
            let (outer, len, inner) = split(&dims, s.axis);
            for u in 0..g.count {
                let gate = gates.get(gi).and_then(|v| v.get(u)).copied().unwrap_or(1.0);
                for o in 0..outer {
                    for i in UnitGroup::indices(s, u) {
                        if i < len {
                            let st = (o * len + i) * inner;
                            scale[st..st + inner].iter_mut().for_each(|x| *x *= gate);
                        }
                    }
                }
            }
            out.entry(s.tensor).or_default().push(Factor { group: gi, slice: si, scale });
        }
    }
    out
}

/// The weights of the gated (masked) model: consumer slices scaled by their unit's gate.
pub fn gated_params<T: Real>(model: &Model, base: &Params<T>, groups: &[UnitGroup], gates: &[Vec<f64>]) -> Params<T> {
    let mut p = base.clone();
    for (id, fs) in factors(model, groups, gates) {
        let Some(w) = base.get(&id) else { continue };
        let mut v: Vec<T> = w.as_ref().clone();
        for f in &fs {
            for (x, &s) in v.iter_mut().zip(&f.scale) {
                *x = *x * T::c(s);
            }
        }
        p.insert(id, Arc::new(v));
    }
    p
}

/// The consumer tensors whose gradients `gate_gradients` needs.
pub fn gated_tensors(groups: &[UnitGroup]) -> Vec<Id> {
    let mut v: Vec<Id> =
        groups.iter().flat_map(|g| g.slices.iter()).filter(|s| s.role == Role::Consumer).map(|s| s.tensor).collect();
    v.sort();
    v.dedup();
    v
}

/// ∂L/∂g for every unit of every group, from the gradients `grads` of the loss w.r.t. the
/// gated weights (as `GradProgram::run` returns them for `gated_params`), and the ungated
/// weights `base`.
pub fn gate_gradients<T: Real>(
    model: &Model,
    base: &Params<T>,
    groups: &[UnitGroup],
    gates: &[Vec<f64>],
    grads: &BTreeMap<Id, Vec<T>>,
) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = groups.iter().map(|g| vec![0.0; g.count]).collect();
    for (id, fs) in factors(model, groups, gates) {
        let (Some(w), Some(dw)) = (base.get(&id), grads.get(&id)) else { continue };
        let dims = model.value(id).shape.clone().unwrap_or_default();
        for (k, f) in fs.iter().enumerate() {
            let s = &groups[f.group].slices[f.slice];
            let (outer, len, inner) = split(&dims, s.axis);
            for u in 0..groups[f.group].count {
                let mut acc = 0.0;
                for o in 0..outer {
                    for i in UnitGroup::indices(s, u) {
                        if i >= len {
                            continue;
                        }
                        let st = (o * len + i) * inner;
                        for e in st..st + inner {
                            let others: f64 =
                                fs.iter().enumerate().filter(|(j, _)| *j != k).map(|(_, g)| g.scale[e]).product();
                            acc += w[e].to_f64c() * others * dw[e].to_f64c();
                        }
                    }
                }
                out[f.group][u] += acc;
            }
        }
    }
    out
}
