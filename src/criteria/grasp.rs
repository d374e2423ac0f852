//! `grasp`: gradient-signal preservation (Wang, Zhang & Grosse, "Picking Winning Tickets
//! Before Training by Preserving Gradient Flow", ICLR 2020). GraSP's score of a weight is
//! S = −w ⊙ (H g), g = ∇L, and the weights with the *largest* S are removed (removing them
//! reduces the gradient norm least); summed over a unit's parameters, the importance used
//! here is −S_u = Σ_{j∈u} w_j (Hg)_j. Hg by central differences of f64 gradients along g
//! (`engine::hvp`); averaged over output projections where the loss is flat at the dense
//! weights (`Probe::signals`).

use std::collections::BTreeMap;

use super::probe::{Probe, Signal};
use super::unit_fold;
use crate::engine::{gates as gating, hvp, loss, Params};
use crate::error::Result;
use crate::ir::Id;

pub fn score(probe: &Probe, gates: &[Vec<f64>], signals: &[Signal]) -> Result<Vec<Vec<f64>>> {
    let p32 = probe.gated(gates);
    let base64: Params<f64> = probe.low.engine.params(&probe.low.model);
    let p64 = gating::gated_params(&probe.low.model, &base64, &probe.groups, gates);
    let mut out: Vec<Vec<f64>> = probe.groups.iter().map(|g| vec![0.0; g.count]).collect();
    for sig in signals {
        let g: BTreeMap<Id, Vec<f64>> =
            probe.grads(&p32, sig)?.into_iter().map(|(id, v)| (id, v.into_iter().map(f64::from).collect())).collect();
        let (mut ww, mut gg) = (0.0, 0.0);
        for (id, v) in &g {
            ww += p64[id].iter().map(|x| x * x).sum::<f64>();
            gg += v.iter().map(|x| x * x).sum::<f64>();
        }
        if gg == 0.0 {
            continue;
        }
        let eps = 1e-4 * (ww / gg).sqrt().max(1e-6);
        let objective = probe.objective.clone();
        let output = probe.output;
        let seed = |o: &loss::Outputs<f64>| sig.seed(&objective, output, o);
        let hg = hvp::hvp::<f64>(&probe.low.gp, &probe.inputs, &p64, &g, eps, &seed)?;
        for (grp, o) in probe.groups.iter().zip(out.iter_mut()) {
            for (u, s) in o.iter_mut().enumerate() {
                let mut acc = 0.0;
                unit_fold(&probe.low.model, grp, u, |t, e| {
                    if let (Some(w), Some(h)) = (p64.get(&t), hg.get(&t)) {
                        acc += w[e] * h[e];
                    }
                });
                *s += acc / signals.len() as f64;
            }
        }
    }
    Ok(out)
}
