//! `snip`: connection sensitivity summed over the unit, |Σ_{j∈u} w_j ∂L/∂w_j| (Lee, Ajanthan
//! & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019;
//! the structured form sums the saliencies of every parameter the unit removes, which is
//! the first-order change of L when the whole unit is removed). Batch gradient on the
//! calibration set; averaged over output projections where the loss is flat at the dense
//! weights (`Probe::signals`).

use super::probe::{Probe, Signal};
use super::unit_fold;
use crate::error::Result;

pub fn score(probe: &Probe, gates: &[Vec<f64>], signals: &[Signal]) -> Result<Vec<Vec<f64>>> {
    let params = probe.gated(gates);
    let mut out: Vec<Vec<f64>> = probe.groups.iter().map(|g| vec![0.0; g.count]).collect();
    for sig in signals {
        let grads = probe.grads(&params, sig)?;
        for (g, o) in probe.groups.iter().zip(out.iter_mut()) {
            for (u, s) in o.iter_mut().enumerate() {
                let mut acc = 0.0;
                unit_fold(&probe.low.model, g, u, |t, e| {
                    if let (Some(w), Some(d)) = (params.get(&t), grads.get(&t)) {
                        acc += w[e] as f64 * d[e] as f64;
                    }
                });
                *s += acc.abs() / signals.len() as f64;
            }
        }
    }
    Ok(out)
}
