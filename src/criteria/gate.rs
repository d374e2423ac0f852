//! `pl`: the paper's criterion — a gating network over per-unit NTK features, trained with
//! a Hessian-trace penalty (Chen et al., ICLR 2023, "PL regularization implemented as
//! structured pruning"; docs/method.md "Gating network and mask").
//!
//! Per unit kind, FN_v: 2 → hidden (tanh) → 1 maps the standardised features
//! d_i = (z(log λ_min), z(ρ)) to a logit a_i; g = softmax over the kind's units; the mask
//! m = TopK(g) is what `select_units::select` makes of the scores (ratio as parameters,
//! global or per layer, at least `min_keep` per layer — the protecting strategy). v is
//! trained on L_total = L_S(m ⊙ w) + α Σ_i m_i² h_i, forward with the hard mask, backward
//! straight-through (∂L/∂g_i := ∂L/∂m_i, our choice), Adam.
//!
//! Our choices where the paper is silent (README, "Method choices"): FN starts fitted to
//! z(log λ_min) (so epoch 0 ranks approximately as λ_min alone does); training keeps the
//! epoch with the lowest L_total, measured on held-out calibration samples (the n samples
//! after the scored ones) when the file has them — choosing on the scored samples
//! themselves overfits a 32-sample batch; hidden width 16, 20 epochs, learning rate 0.05,
//! α = 1.

use serde::Serialize;

use super::ntk::Features;
use super::probe::Probe;
use crate::engine::gpu::{kernels, pl, Device, GpuContext};
use crate::error::Result;
use crate::ir::Model;
use crate::passes::select_units;
use crate::pipeline::Scope;
use crate::rng::Rng;
use crate::units::{UnitGroup, UnitKind};

#[derive(Clone, Debug)]
pub struct GateConfig {
    pub hidden: usize,
    pub epochs: usize,
    pub lr: f64,
    pub alpha: f64,
    /// L_total's terms relative to their values at the λ_min ranking (`--gate-objective
    /// relative`, the default), else in their own units (`raw`).
    pub relative: bool,
}

impl Default for GateConfig {
    fn default() -> GateConfig {
        GateConfig { hidden: 16, epochs: 20, lr: 0.05, alpha: 1.0, relative: true }
    }
}

/// One epoch of gate training.
#[derive(Clone, Debug, Serialize)]
pub struct Epoch {
    /// L_S(m ⊙ w) on the calibration batch.
    pub loss: f64,
    /// Σ m_i h_i over the scored units.
    pub penalty: f64,
    pub total: f64,
    /// L_S on the held-out calibration samples, when the file has them (epochs are chosen
    /// by L_total with val_loss in place of loss then, else by `total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub pruned: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct GateTraining {
    pub curve: Vec<Epoch>,
    /// The epoch whose mask was kept (0 = the initialisation fitted to λ_min).
    pub best_epoch: usize,
    /// Units whose keep/prune decision differs from ranking by λ_min alone.
    pub differs_from_lambda_min: usize,
    /// The objective (L_S, and on held-out samples) of the mask that ranking by λ_min alone gives.
    pub lambda_min_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda_min_val_loss: Option<f64>,
    /// L_total = loss / loss_scale + α · penalty / penalty_scale: with the relative
    /// objective the scales are the λ_min ranking's L_S and Σ m·|h| (1 and 1 with `raw`).
    pub loss_scale: f64,
    pub penalty_scale: f64,
}

/// 2 → hidden → 1 with tanh, parameters flat: [w1 (h×2), b1 (h), w2 (h), b2] (the CPU
/// twin of `gate_forward.wgsl` / `gate_backward.wgsl`).
#[derive(Clone, Debug)]
pub struct GateNet {
    pub h: usize,
    pub p: Vec<f64>,
}

impl GateNet {
    pub fn new(h: usize, rng: &mut Rng) -> GateNet {
        let mut p: Vec<f64> = (0..4 * h + 1).map(|_| (rng.next_f64() - 0.5) * 0.5).collect();
        p[4 * h] = 0.0;
        GateNet { h, p }
    }

    /// Logit and hidden activations.
    pub fn forward(&self, d: [f64; 2]) -> (f64, Vec<f64>) {
        let h = self.h;
        let act: Vec<f64> =
            (0..h).map(|j| (self.p[2 * j] * d[0] + self.p[2 * j + 1] * d[1] + self.p[2 * h + j]).tanh()).collect();
        let a = (0..h).map(|j| self.p[3 * h + j] * act[j]).sum::<f64>() + self.p[4 * h];
        (a, act)
    }

    /// Adds ∂a/∂p · da to `grad`.
    pub fn backward(&self, d: [f64; 2], act: &[f64], da: f64, grad: &mut [f64]) {
        let h = self.h;
        for j in 0..h {
            grad[3 * h + j] += da * act[j];
            let dz = da * self.p[3 * h + j] * (1.0 - act[j] * act[j]);
            grad[2 * j] += dz * d[0];
            grad[2 * j + 1] += dz * d[1];
            grad[2 * h + j] += dz;
        }
        grad[4 * h] += da;
    }

    /// Σ_u da[u] ∂a(pts[u])/∂p, summed over units in order.
    pub fn grad(&self, pts: &[[f64; 2]], da: &[f64]) -> Vec<f64> {
        let mut grad = vec![0.0; self.p.len()];
        for (x, &g) in pts.iter().zip(da) {
            let (_, act) = self.forward(*x);
            self.backward(*x, &act, g, &mut grad);
        }
        grad
    }
}

/// Adam (β1 0.9, β2 0.999, ε 1e-8): the CPU twin of `adam.wgsl`.
#[derive(Clone, Debug)]
pub struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    lr: f64,
}

impl Adam {
    pub fn new(n: usize, lr: f64) -> Adam {
        Adam { m: vec![0.0; n], v: vec![0.0; n], t: 0, lr }
    }

    pub fn step(&mut self, p: &mut [f64], g: &[f64]) {
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        for i in 0..p.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = self.m[i] / (1.0 - b1.powi(self.t));
            let vh = self.v[i] / (1.0 - b2.powi(self.t));
            p[i] -= self.lr * mh / (vh.sqrt() + 1e-8);
        }
    }
}

/// One gate network on the GPU: its parameters and Adam moments in device buffers (f32),
/// the features of its units uploaded once.
pub struct GpuGateNet<'a> {
    cx: &'a GpuContext,
    h: usize,
    units: usize,
    p: wgpu::Buffer,
    m: wgpu::Buffer,
    v: wgpu::Buffer,
    d: wgpu::Buffer,
    t: i32,
    lr: f64,
}

impl<'a> GpuGateNet<'a> {
    /// `net`'s parameters on the device, for the units with features `pts`.
    pub fn new(cx: &'a GpuContext, net: &GateNet, pts: &[[f64; 2]]) -> GpuGateNet<'a> {
        let p: Vec<f32> = net.p.iter().map(|&x| x as f32).collect();
        let d: Vec<f32> = pts.iter().flatten().map(|&x| x as f32).collect();
        let np = p.len();
        GpuGateNet {
            cx,
            h: net.h,
            units: pts.len(),
            p: cx.upload(&p),
            m: cx.empty(np),
            v: cx.empty(np),
            d: cx.upload(&d),
            t: 0,
            lr: 0.0,
        }
    }

    /// A fresh Adam optimiser (zero moments) with learning rate `lr`.
    pub fn reset_adam(&mut self, lr: f64) -> Result<()> {
        let np = 4 * self.h + 1;
        kernels::fill(self.cx, &self.m, np, 0.0)?;
        kernels::fill(self.cx, &self.v, np, 0.0)?;
        self.t = 0;
        self.lr = lr;
        Ok(())
    }

    /// The logits of every unit (`gate_forward.wgsl`).
    pub fn logits(&self) -> Result<Vec<f64>> {
        let a = pl::gate_forward(self.cx, &self.p, &self.d, self.units, self.h)?;
        Ok(self.cx.read(&a, self.units)?.into_iter().map(|x| x as f64).collect())
    }

    /// One Adam step on Σ_u da[u] ∂a_u/∂p (`gate_backward.wgsl`, `adam.wgsl`).
    pub fn step(&mut self, da: &[f64]) -> Result<()> {
        self.t += 1;
        let da: Vec<f32> = da.iter().map(|&x| x as f32).collect();
        let g = pl::gate_backward(self.cx, &self.p, &self.d, &self.cx.upload(&da), self.units, self.h)?;
        pl::adam(self.cx, &self.p, &self.m, &self.v, &g, 4 * self.h + 1, self.lr, self.t)
    }

    /// The parameters, read back.
    pub fn params(&self) -> Result<Vec<f64>> {
        Ok(self.cx.read(&self.p, 4 * self.h + 1)?.into_iter().map(|x| x as f64).collect())
    }
}

/// The networks of every unit kind, on the CPU (f64) or the GPU (f32).
enum Nets<'a> {
    Cpu { nets: Vec<GateNet>, opts: Vec<Adam>, pts: Vec<Vec<[f64; 2]>> },
    Gpu(Vec<GpuGateNet<'a>>),
}

impl Nets<'_> {
    fn reset_adam(&mut self, lr: f64) -> Result<()> {
        match self {
            Nets::Cpu { nets, opts, .. } => *opts = nets.iter().map(|n| Adam::new(n.p.len(), lr)).collect(),
            Nets::Gpu(g) => g.iter_mut().try_for_each(|n| n.reset_adam(lr))?,
        }
        Ok(())
    }

    /// Logits of kind `k`'s units, in order.
    fn logits(&self, k: usize) -> Result<Vec<f64>> {
        match self {
            Nets::Cpu { nets, pts, .. } => Ok(pts[k].iter().map(|x| nets[k].forward(*x).0).collect()),
            Nets::Gpu(g) => g[k].logits(),
        }
    }

    fn step(&mut self, k: usize, da: &[f64]) -> Result<()> {
        match self {
            Nets::Cpu { nets, opts, pts } => {
                let grad = nets[k].grad(&pts[k], da);
                opts[k].step(&mut nets[k].p, &grad);
                Ok(())
            }
            Nets::Gpu(g) => g[k].step(da),
        }
    }
}

fn zscore(x: &[f64]) -> Vec<f64> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sd = (x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    x.iter().map(|v| if sd > 0.0 { (v - mean) / sd } else { 0.0 }).collect()
}

/// What the gate needs to know about the selection it imitates.
pub struct Selection<'a> {
    pub model: &'a Model,
    pub groups: &'a [UnitGroup],
    pub selected: &'a [bool],
    pub ratio: f64,
    pub scope: Scope,
    pub protect: select_units::Protect,
    /// Units already pruned by earlier schedule steps (gate 0, excluded from training).
    pub forced: &'a [Vec<bool>],
}

impl Selection<'_> {
    /// Scores with forced units below everything, and the mask `select` makes of them.
    fn mask(&self, a: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let lo = a.iter().flatten().copied().fold(f64::INFINITY, f64::min).min(0.0) - 1.0;
        let scores: Vec<Vec<f64>> = a
            .iter()
            .enumerate()
            .map(|(g, s)| s.iter().enumerate().map(|(u, &x)| if self.forced[g][u] { lo } else { x }).collect())
            .collect();
        let keep =
            select_units::select(self.model, self.groups, &scores, self.selected, self.ratio, self.scope, self.protect)
                .0;
        let gates = keep.keep.iter().map(|k| k.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect()).collect();
        (scores, gates)
    }
}

/// Trains one gate network per unit kind and returns the scores (the best epoch's logits,
/// forced units lowest) and the training record.
pub fn train(
    probe: &Probe,
    features: &Features,
    sel: &Selection,
    cfg: &GateConfig,
    seed: u64,
    mut progress: impl FnMut(usize, &Epoch),
) -> Result<(Vec<Vec<f64>>, GateTraining)> {
    let groups = sel.groups;
    // Active units per kind and their standardised features.
    let mut kinds: Vec<UnitKind> = Vec::new();
    for (g, grp) in groups.iter().enumerate() {
        if sel.selected[g] && features[g].is_some() && !kinds.contains(&grp.kind) {
            kinds.push(grp.kind);
        }
    }
    let mut d: Vec<Vec<[f64; 2]>> = groups.iter().map(|g| vec![[0.0; 2]; g.count]).collect();
    for &kind in &kinds {
        let units: Vec<(usize, usize)> = (0..groups.len())
            .filter(|&g| groups[g].kind == kind && sel.selected[g] && features[g].is_some())
            .flat_map(|g| (0..groups[g].count).filter(move |&u| !sel.forced[g][u]).map(move |u| (g, u)))
            .collect();
        let lmax = units.iter().map(|&(g, u)| features[g].as_ref().unwrap()[u].lambda_max).fold(0.0, f64::max);
        let floor = (lmax * 1e-12).max(f64::MIN_POSITIVE);
        let ll: Vec<f64> =
            units.iter().map(|&(g, u)| (features[g].as_ref().unwrap()[u].lambda_min.max(floor)).ln()).collect();
        let rr: Vec<f64> = units.iter().map(|&(g, u)| features[g].as_ref().unwrap()[u].entropy).collect();
        for ((&(g, u), l), r) in units.iter().zip(zscore(&ll)).zip(zscore(&rr)) {
            d[g][u] = [l, r];
        }
    }
    let kind_of = |g: usize| kinds.iter().position(|&k| k == groups[g].kind);
    let active =
        |g: usize, u: usize| sel.selected[g] && features[g].is_some() && !sel.forced[g][u] && kind_of(g).is_some();
    let h = |g: usize, u: usize| features[g].as_ref().map(|f| f[u].hessian).unwrap_or(0.0);

    // Each kind's active units, in group and unit order, and their features.
    let members: Vec<Vec<(usize, usize)>> = (0..kinds.len())
        .map(|ki| {
            (0..groups.len())
                .filter(|&g| kind_of(g) == Some(ki))
                .flat_map(|g| (0..groups[g].count).filter(move |&u| active(g, u)).map(move |u| (g, u)))
                .collect()
        })
        .collect();
    let pts: Vec<Vec<[f64; 2]>> = members.iter().map(|m| m.iter().map(|&(g, u)| d[g][u]).collect()).collect();
    let mut rng = Rng::new(seed ^ 0x6A7E);
    let init: Vec<GateNet> = kinds.iter().map(|_| GateNet::new(cfg.hidden, &mut rng)).collect();
    let mut nets = match &probe.device {
        Device::Cpu => Nets::Cpu { nets: init, opts: Vec::new(), pts: pts.clone() },
        Device::Gpu(cx) => Nets::Gpu(init.iter().zip(&pts).map(|(n, p)| GpuGateNet::new(cx, n, p)).collect()),
    };
    // Start from ranking by λ_min: fit a ≈ z(log λ_min) by regression on the features.
    nets.reset_adam(0.02)?;
    for (ki, p) in pts.iter().enumerate() {
        for _ in 0..300 {
            let a = nets.logits(ki)?;
            let da: Vec<f64> = a.iter().zip(p).map(|(a, x)| 2.0 * (a - x[0]) / p.len().max(1) as f64).collect();
            nets.step(ki, &da)?;
        }
    }
    let logits = |nets: &Nets| -> Result<Vec<Vec<f64>>> {
        let mut out: Vec<Vec<f64>> = groups.iter().map(|g| vec![0.0; g.count]).collect();
        for (ki, m) in members.iter().enumerate() {
            for (&(g, u), a) in m.iter().zip(nets.logits(ki)?) {
                out[g][u] = a;
            }
        }
        Ok(out)
    };
    nets.reset_adam(cfg.lr)?;
    let mut curve = Vec::new();
    let mut best: Option<(f64, usize, Vec<Vec<f64>>)> = None;
    // The mask of ranking by λ_min alone, for comparison.
    let lm: Vec<Vec<f64>> = (0..groups.len())
        .map(|g| (0..groups[g].count).map(|u| features[g].as_ref().map(|f| f[u].lambda_min).unwrap_or(0.0)).collect())
        .collect();
    let (_, lm_mask) = sel.mask(&lm);
    let (lambda_min_loss, _) = probe.gate_gradients(&lm_mask)?;
    let lambda_min_val_loss = probe.val_loss(&lm_mask)?;
    let penalty_with = |m: &[Vec<f64>], f: &dyn Fn(f64) -> f64| -> f64 {
        m.iter()
            .enumerate()
            .flat_map(|(g, mg)| mg.iter().enumerate().map(move |(u, &x)| (g, u, x)))
            .filter(|&(g, u, _)| active(g, u))
            .map(|(g, u, x)| x * x * f(h(g, u)))
            .sum()
    };
    let penalty_of = |m: &[Vec<f64>]| penalty_with(m, &|x| x);
    // The two terms of L_total are in unrelated units (a distillation loss ~1e-2, a sum of
    // Hessian traces ~1e2 on MiniLM): measured relative to the λ_min ranking's values, α = 1
    // weighs a 1% change of either equally. Raw, the penalty alone decides.
    let positive = |x: f64| if x.is_finite() && x > 0.0 { x } else { 1.0 };
    let (loss_scale, val_scale, penalty_scale) = if cfg.relative {
        (
            positive(lambda_min_loss),
            positive(lambda_min_val_loss.unwrap_or(lambda_min_loss)),
            // Σ m·|h|: Hutchinson estimates of small traces can be negative.
            positive(penalty_with(&lm_mask, &|x: f64| x.abs())),
        )
    } else {
        (1.0, 1.0, 1.0)
    };
    let mut best_mask: Option<Vec<Vec<f64>>> = None;
    for epoch in 0..=cfg.epochs {
        let a = logits(&nets)?;
        let (scores, m) = sel.mask(&a);
        let (ls, dm) = probe.gate_gradients(&m)?;
        let penalty = penalty_of(&m);
        let total = ls / loss_scale + cfg.alpha * penalty / penalty_scale;
        let val_loss = probe.val_loss(&m)?;
        let pruned = m.iter().flatten().filter(|&&x| x == 0.0).count();
        let e = Epoch { loss: ls, penalty, total, val_loss, pruned };
        progress(epoch, &e);
        curve.push(e);
        let key = val_loss.map(|v| v / val_scale + cfg.alpha * penalty / penalty_scale).unwrap_or(total);
        if best.as_ref().is_none_or(|b| key < b.0) {
            best = Some((key, epoch, scores));
            best_mask = Some(m.clone());
        }
        if epoch == cfg.epochs {
            break;
        }
        // Straight-through: ∂L/∂g_i := ∂L/∂m_i; then softmax and the networks.
        for (ki, units) in members.iter().enumerate() {
            if units.is_empty() {
                continue;
            }
            let mx = units.iter().map(|&(g, u)| a[g][u]).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = units.iter().map(|&(g, u)| (a[g][u] - mx).exp()).sum();
            let gs: Vec<f64> = units.iter().map(|&(g, u)| (a[g][u] - mx).exp() / z).collect();
            let dg: Vec<f64> = units
                .iter()
                .map(|&(g, u)| dm[g][u] / loss_scale + 2.0 * cfg.alpha * m[g][u] * h(g, u) / penalty_scale)
                .collect();
            let dot: f64 = gs.iter().zip(&dg).map(|(x, y)| x * y).sum();
            let da: Vec<f64> = gs.iter().zip(&dg).map(|(g, d)| g * (d - dot)).collect();
            nets.step(ki, &da)?;
        }
    }
    let (_, best_epoch, scores) = best.expect("at least one epoch");
    let differs = best_mask
        .map(|b| lm_mask.iter().flatten().zip(b.iter().flatten()).filter(|(x, y)| x != y).count())
        .unwrap_or(0);
    Ok((
        scores,
        GateTraining {
            curve,
            best_epoch,
            differs_from_lambda_min: differs,
            lambda_min_loss,
            lambda_min_val_loss,
            loss_scale,
            penalty_scale,
        },
    ))
}
