//! `fisher`: the empirical Fisher information of a unit's mask variable, Σ_x (∂L(x)/∂ξ_u)²
//! (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers", NeurIPS 2022,
//! Eq. 5, with the diagonal approximation used for ranking). Summed over calibration
//! samples (batch-1 backwards), averaged over the output projections where the loss is
//! flat at the dense weights (`Probe::signals`).

use super::probe::{Probe, Signal};
use crate::error::Result;

pub fn score(probe: &mut Probe, gates: &[Vec<f64>], signals: &[Signal]) -> Result<Vec<Vec<f64>>> {
    let mut out: Vec<Vec<f64>> = probe.groups.iter().map(|g| vec![0.0; g.count]).collect();
    let w = 1.0 / signals.len().max(1) as f64;
    for sig in signals {
        for per in probe.per_sample_gate_gradients(gates, sig)? {
            for (o, p) in out.iter_mut().zip(per) {
                o.iter_mut().zip(p).for_each(|(a, b)| *a += w * b * b);
            }
        }
    }
    Ok(out)
}
