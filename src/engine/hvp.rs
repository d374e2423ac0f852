//! Hessian-vector products of a loss w.r.t. weights, by central differences of gradients:
//! H·v ≈ (∇L(w + εv) − ∇L(w − εv)) / 2ε. Run in f64 (the CPU backend is generic), the
//! truncation error is O(ε²‖∂³L‖) and round-off O(1e-16/ε); ε defaults to 1e-4 relative to
//! the weights' scale. Checked against an exact Hessian in tests/engine_hvp.rs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::cpu::Real;
use super::loss::Outputs;
use super::{GradProgram, Params};
use crate::error::Result;
use crate::ir::Id;
use crate::tensor::Tensor;

pub type Seed<'a, T> = &'a dyn Fn(&Outputs<T>) -> Result<(f64, Vec<Vec<T>>)>;

/// H·v for the weights in `v` (others held fixed); `eps` is the step along v.
pub fn hvp<T: Real>(
    gp: &GradProgram,
    inputs: &[(String, Tensor)],
    params: &Params<T>,
    v: &BTreeMap<Id, Vec<T>>,
    eps: f64,
    seed: Seed<T>,
) -> Result<BTreeMap<Id, Vec<T>>> {
    let shifted = |sign: f64| -> Params<T> {
        let mut p = params.clone();
        for (id, dv) in v {
            if let Some(w) = params.get(id) {
                let nw: Vec<T> = w.iter().zip(dv).map(|(&a, &d)| a + T::c(sign * eps) * d).collect();
                p.insert(*id, Arc::new(nw));
            }
        }
        p
    };
    let keep = HashSet::new();
    let plus = gp.run(inputs, &shifted(1.0), |o| seed(o), &keep)?;
    let minus = gp.run(inputs, &shifted(-1.0), |o| seed(o), &keep)?;
    let inv = T::c(0.5 / eps);
    Ok(v.keys()
        .filter_map(|id| {
            let (a, b) = (plus.grads.get(id)?, minus.grads.get(id)?);
            Some((*id, a.iter().zip(b).map(|(&x, &y)| (x - y) * inv).collect()))
        })
        .collect())
}
