//! MeasureConditioning (`--ntk-condition`): the model-level NTK condition number on the
//! calibration set, before and after pruning (../shared/docs/method.md, Diagnostics; the
//! paper's Figure 3 claim is that pruning by the PL criterion lowers it).
//!
//! The model-level NTK here is the one of the prunable parameters: K = Σ_u K_u over every
//! unit of every discovered group (each K_u averaged over the k output projections, as the
//! criteria form them), so it is the NTK of all parameters the units own; parameters no unit
//! owns (embeddings, LayerNorms, the last classifier) are left out, and this says so in the
//! report. Before: at the dense weights, all units. After: at the masked weights (pruned
//! units gated to zero), the kept units only. Runs after SelectUnits, for any criterion,
//! on the CPU backend; it costs two Gram passes over every unit.

use serde::Serialize;

use crate::criteria::ntk;
use crate::criteria::probe::Probe;
use crate::engine::gram;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::pipeline::{Context, Pass};

pub struct MeasureConditioning;

#[derive(Clone, Debug, Serialize)]
pub struct Spectrum {
    pub lambda_min: f64,
    pub lambda_max: f64,
    /// λ_max / λ_min; null when λ_min ≤ 0 (rank-deficient at this n).
    pub kappa: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Conditioning {
    pub samples: usize,
    pub projections: usize,
    /// Which parameters K covers.
    pub parameters: &'static str,
    pub before: Spectrum,
    pub after: Spectrum,
}

impl Pass for MeasureConditioning {
    fn name(&self) -> &'static str {
        "MeasureConditioning"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        if !cx.config.ntk_condition {
            return Ok(());
        }
        let keep = cx.keep.clone().ok_or_else(|| Error::Other("no selection to measure".into()))?;
        let n = cx.config.scoring.calib_samples;
        let probe = Probe::new(cx, model, n)?;
        let sc = &cx.config.scoring;
        let proj = ntk::projections(sc.ntk_projections.as_deref(), sc.projections, probe.per_sample, cx.config.seed)?;
        let dense_gates: Vec<Vec<f64>> = probe.groups.iter().map(|g| vec![1.0; g.count]).collect();
        let masked_gates: Vec<Vec<f64>> =
            keep.keep.iter().map(|k| k.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect()).collect();
        let before = model_gram(&probe, &dense_gates, &proj)?;
        let after = model_gram(&probe, &masked_gates, &proj)?;
        cx.conditioning = Some(Conditioning {
            samples: probe.n,
            projections: proj.len(),
            parameters: "every parameter some unit owns (units of all discovered groups)",
            before: spectrum(&before, probe.n),
            after: spectrum(&after, probe.n),
        });
        Ok(())
    }
}

/// Σ over units with a non-zero gate of K_u (projection-averaged), at the gated weights.
fn model_gram(probe: &Probe, gates: &[Vec<f64>], proj: &[Vec<f64>]) -> Result<Vec<f64>> {
    let n = probe.n;
    let params = probe.gated(gates);
    let mut k = vec![0.0; n * n];
    for r in proj {
        let gr = gram::grams_on(
            &probe.device,
            &probe.low.gp,
            &probe.low.model,
            &probe.inputs,
            &params,
            &probe.groups,
            probe.output,
            r,
        )?;
        for (g, units) in gr.k.iter().enumerate() {
            for (u, ku) in units.iter().enumerate() {
                if gates[g][u] != 0.0 {
                    k.iter_mut().zip(ku).for_each(|(x, y)| *x += y / proj.len() as f64);
                }
            }
        }
    }
    Ok(k)
}

fn spectrum(k: &[f64], n: usize) -> Spectrum {
    let eig = crate::linalg::sym_eigvals(k, n);
    let (lmin, lmax) = (eig.first().copied().unwrap_or(0.0), eig.last().copied().unwrap_or(0.0));
    Spectrum { lambda_min: lmin, lambda_max: lmax, kappa: (lmin > 0.0).then(|| lmax / lmin) }
}
