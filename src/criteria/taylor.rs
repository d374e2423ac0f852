//! `taylor`: first-order Taylor importance of a unit's gate, E_x |∂L(x)/∂ξ_u| with ξ_u a
//! multiplicative gate on the unit's output (Michel, Levy & Neubig, "Are Sixteen Heads
//! Really Better than One?", NeurIPS 2019; Molchanov et al., CVPR 2019, for filters).
//! The expectation is over calibration samples (one batch-1 backward each) and, where the
//! loss is flat at the dense weights, over the output projections (`Probe::signals`).

use super::probe::{Probe, Signal};
use crate::error::Result;

pub fn score(probe: &mut Probe, gates: &[Vec<f64>], signals: &[Signal]) -> Result<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<f64>> = probe.groups.iter().map(|g| vec![0.0; g.count]).collect();
    let w = 1.0 / (signals.len() * probe.n).max(1) as f64;
    for sig in signals {
        for per in probe.per_sample_gate_gradients(gates, sig)? {
            for (o, p) in out.iter_mut().zip(per) {
                o.iter_mut().zip(p).for_each(|(a, b)| *a += w * b.abs());
            }
        }
    }
    Ok(out)
}
