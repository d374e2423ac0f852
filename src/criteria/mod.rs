//! Pruning criteria: each turns the discovered unit groups into one score per unit
//! (higher = more important). Selection (`passes/select_units.rs`) is criterion-agnostic:
//! a new criterion is a new file here and a line in [`Criterion`].
//!
//! Data-free criteria (magnitude, random, fpgm) read the weights. The others run the model
//! on calibration data through the compute engine ([`probe::Probe`]). [`run`] applies the
//! schedule: one-shot scores the dense model once; linear re-scores the masked model at
//! each of T steps and prunes to r·j/T, units pruned earlier staying pruned.

pub mod fisher;
pub mod fpgm;
pub mod gate;
pub mod grasp;
pub mod magnitude;
pub mod ntk;
pub mod probe;
pub mod random;
pub mod snip;
pub mod taylor;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::engine::gpu::Device;
use crate::error::Result;
use crate::ir::{Id, Model};
use crate::passes::select_units;
use crate::pipeline::{Context, Phase};
use crate::units::{KeepSet, UnitGroup};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    Pl,
    NtkMin,
    NtkMax,
    Hessian,
    Magnitude,
    Random,
    Taylor,
    Snip,
    Grasp,
    Fisher,
    Fpgm,
}

impl Criterion {
    pub const ALL: &'static [Criterion] = &[
        Criterion::Pl,
        Criterion::NtkMin,
        Criterion::NtkMax,
        Criterion::Hessian,
        Criterion::Magnitude,
        Criterion::Random,
        Criterion::Taylor,
        Criterion::Snip,
        Criterion::Grasp,
        Criterion::Fisher,
        Criterion::Fpgm,
    ];
    pub const NAMES: &'static [&'static str] =
        &["pl", "ntk-min", "ntk-max", "hessian", "magnitude", "random", "taylor", "snip", "grasp", "fisher", "fpgm"];

    pub fn parse(s: &str) -> Option<Criterion> {
        Criterion::NAMES.iter().position(|&n| n == s).map(|i| Criterion::ALL[i])
    }

    pub fn name(self) -> &'static str {
        Criterion::NAMES[Criterion::ALL.iter().position(|&c| c == self).expect("listed")]
    }

    /// Whether scoring runs the model on calibration data.
    pub fn needs_data(self) -> bool {
        !matches!(self, Criterion::Magnitude | Criterion::Random | Criterion::Fpgm)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Schedule {
    Oneshot,
    Linear { steps: usize },
}

/// Options of the data-driven criteria.
#[derive(Clone, Debug)]
pub struct ScoringConfig {
    /// k: output projections averaged into each unit's Gram.
    pub projections: usize,
    /// Explicit projection vectors (`--ntk-projections`).
    pub ntk_projections: Option<PathBuf>,
    /// Hutchinson probes where the Hessian trace is estimated.
    pub probes: usize,
    /// Calibration samples scored (the first N of the file).
    pub calib_samples: usize,
    pub gate: gate::GateConfig,
    pub schedule: Schedule,
}

impl Default for ScoringConfig {
    fn default() -> ScoringConfig {
        ScoringConfig {
            projections: 4,
            ntk_projections: None,
            probes: 8,
            calib_samples: 32,
            gate: gate::GateConfig::default(),
            schedule: Schedule::Oneshot,
        }
    }
}

/// What one schedule step did.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    /// Ratio pruned after this step.
    pub ratio: f64,
    pub objective: Option<String>,
    pub hessian: Option<ntk::HessianMethod>,
    pub gate: Option<gate::GateTraining>,
    /// Weights in unit slices the Grams leave out (e.g. BatchNorm scale, used non-linearly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gram_skipped: Vec<String>,
}

/// The outcome of scoring.
pub struct Scored {
    pub scores: Vec<Vec<f64>>,
    pub features: ntk::Features,
    pub steps: Vec<StepLog>,
    pub samples: usize,
}

/// Calls `f(tensor, flat element index)` for every parameter of unit `u`: its entries in
/// each of the group's slices and every tensor it owns.
pub fn unit_fold(model: &Model, g: &UnitGroup, u: usize, mut f: impl FnMut(Id, usize)) {
    for s in &g.slices {
        let v = model.value(s.tensor);
        let Some(dims) = v.shape.clone().or_else(|| v.data.as_ref().map(|d| d.dims.clone())) else { continue };
        let outer: usize = dims[..s.axis].iter().product();
        let len = dims[s.axis];
        let inner: usize = dims[s.axis + 1..].iter().product();
        for o in 0..outer {
            for i in UnitGroup::indices(s, u).filter(|&i| i < len) {
                for e in (o * len + i) * inner..(o * len + i + 1) * inner {
                    f(s.tensor, e);
                }
            }
        }
    }
    for &t in g.owned.get(u).into_iter().flatten() {
        let n = model.value(t).data.as_ref().map(|d| d.numel()).unwrap_or(0);
        for e in 0..n {
            f(t, e);
        }
    }
}

/// Σ over unit `u`'s parameters of `map[tensor][element]`.
pub fn unit_sum(model: &Model, g: &UnitGroup, u: usize, map: &BTreeMap<Id, Vec<f64>>) -> f64 {
    let mut acc = 0.0;
    unit_fold(model, g, u, |t, e| {
        if let Some(v) = map.get(&t) {
            acc += v[e];
        }
    });
    acc
}

/// Scores every unit with the configured criterion and schedule.
pub fn run(cx: &mut Context, model: &Model) -> Result<Scored> {
    let criterion = cx.config.criterion;
    let groups = cx.groups.clone();
    let selected: Vec<bool> = groups.iter().map(|g| cx.selects(g.kind)).collect();
    let sc = cx.config.scoring.clone();
    let steps = match sc.schedule {
        Schedule::Oneshot => 1,
        Schedule::Linear { steps } => steps.max(1),
    };
    let mut probe = if criterion.needs_data() {
        let device = crate::engine::gpu::select(cx.config.device)?;
        cx.device = Some(device.describe());
        let t = Instant::now();
        crate::progress::begin("calibration forward", 0);
        let p = probe::Probe::on(cx, model, sc.calib_samples.max(1), device)?;
        crate::progress::finish();
        cx.timings.push(("score: calibration forward".into(), t.elapsed().as_secs_f64()));
        cx.phases.push(Phase::new("calibration forward", &p.device.describe(), t.elapsed().as_secs_f64()));
        Some(p)
    } else {
        None
    };
    let mut forced: Vec<Vec<bool>> = groups.iter().map(|g| vec![false; g.count]).collect();
    let mut gates: Vec<Vec<f64>> = groups.iter().map(|g| vec![1.0; g.count]).collect();
    let mut features: ntk::Features = vec![None; groups.len()];
    let mut logs = Vec::new();
    let mut scores = Vec::new();
    let seed = cx.config.seed;
    for step in 1..=steps {
        let t0 = Instant::now();
        let ratio = cx.config.ratio * step as f64 / steps as f64;
        let mut log = StepLog {
            step,
            ratio,
            objective: probe.as_ref().map(|p| p.objective.describe().to_string()),
            hessian: None,
            gate: None,
            gram_skipped: Vec::new(),
        };
        let keep_now = KeepSet { keep: forced.iter().map(|f| f.iter().map(|&x| !x).collect()).collect() };
        let raw: Vec<Vec<f64>> = match criterion {
            Criterion::Magnitude | Criterion::Random | Criterion::Fpgm => {
                let masked;
                let m = if step == 1 {
                    model
                } else {
                    masked = crate::passes::rewrite_graph::masked(model, &groups, &keep_now);
                    &masked
                };
                match criterion {
                    Criterion::Magnitude => magnitude::score(&groups, m),
                    Criterion::Random => random::score(&groups, seed.wrapping_add(step as u64 - 1)),
                    _ => fpgm::score(&groups, m),
                }
            }
            Criterion::Pl | Criterion::NtkMin | Criterion::NtkMax | Criterion::Hessian => {
                let p = probe.as_ref().expect("data-driven");
                let params = p.gated(&gates);
                let proj = ntk::projections(sc.ntk_projections.as_deref(), sc.projections, p.per_sample, seed)?;
                let t = Instant::now();
                crate::progress::begin(&format!("step {step}/{steps}: NTK Grams (projections)"), proj.len());
                let (mut f, skipped, phases) = ntk::ntk_features_timed(p, &params, &proj, &selected)?;
                crate::progress::finish();
                cx.timings.push((format!("score: ntk grams + eigenvalues (step {step})"), t.elapsed().as_secs_f64()));
                cx.phases
                    .extend(phases.into_iter().map(|ph| Phase { name: format!("{} (step {step})", ph.name), ..ph }));
                log.gram_skipped = skipped;
                if matches!(criterion, Criterion::Pl | Criterion::Hessian) {
                    let t = Instant::now();
                    let name = if p.objective.zero_residual_at_dense() && step == 1 {
                        ntk::gauss_newton_traces(&mut f, p.n);
                        log.hessian = Some(ntk::HessianMethod::GaussNewton);
                        "hessian traces: gauss-newton, tr K_u / n from the grams"
                    } else {
                        crate::progress::begin(&format!("step {step}/{steps}: Hessian traces (probes)"), sc.probes);
                        ntk::hutchinson(p, &gates, sc.probes, seed.wrapping_add(step as u64), &mut f)?;
                        crate::progress::finish();
                        log.hessian = Some(ntk::HessianMethod::Hutchinson);
                        "hessian traces: hutchinson, f64"
                    };
                    cx.timings.push((format!("score: hessian traces (step {step})"), t.elapsed().as_secs_f64()));
                    let cpu = Device::Cpu.describe();
                    cx.phases.push(Phase::new(&format!("{name} (step {step})"), &cpu, t.elapsed().as_secs_f64()));
                }
                let s = match criterion {
                    Criterion::NtkMin => ntk::scores_from(&f, &groups, |u| u.lambda_min),
                    Criterion::NtkMax => ntk::scores_from(&f, &groups, |u| u.lambda_max),
                    Criterion::Hessian => ntk::scores_from(&f, &groups, |u| u.hessian),
                    _ => {
                        let t = Instant::now();
                        let sel = gate::Selection {
                            model,
                            groups: &groups,
                            selected: &selected,
                            ratio,
                            scope: cx.config.scope,
                            protect: cx.config.protect(),
                            forced: &forced,
                        };
                        crate::progress::begin(
                            &format!("step {step}/{steps}: gate training (epochs)"),
                            sc.gate.epochs + 1,
                        );
                        let (s, training) =
                            gate::train(p, &f, &sel, &sc.gate, seed.wrapping_add(step as u64), |_, _| {
                                crate::progress::tick()
                            })?;
                        crate::progress::finish();
                        cx.timings.push((format!("score: gate training (step {step})"), t.elapsed().as_secs_f64()));
                        let name = format!("gate training (step {step})");
                        cx.phases.push(Phase::new(&name, &p.device.describe(), t.elapsed().as_secs_f64()));
                        log.gate = Some(training);
                        s
                    }
                };
                features = f;
                s
            }
            Criterion::Taylor | Criterion::Snip | Criterion::Grasp | Criterion::Fisher => {
                let p = probe.as_mut().expect("data-driven");
                let signals = p.signals(sc.projections, seed);
                let t = Instant::now();
                crate::progress::begin(&format!("step {step}/{steps}: {}", criterion.name()), 0);
                let s = match criterion {
                    Criterion::Taylor => taylor::score(p, &gates, &signals)?,
                    Criterion::Fisher => fisher::score(p, &gates, &signals)?,
                    Criterion::Snip => snip::score(p, &gates, &signals)?,
                    _ => grasp::score(p, &gates, &signals)?,
                };
                cx.timings.push((format!("score: {} (step {step})", criterion.name()), t.elapsed().as_secs_f64()));
                let name = format!("{} (step {step})", criterion.name());
                cx.phases.push(Phase::new(&name, &p.device.describe(), t.elapsed().as_secs_f64()));
                crate::progress::finish();
                s
            }
        };
        // Units pruned by earlier steps rank below everything.
        let lo = raw.iter().flatten().copied().filter(|x| x.is_finite()).fold(f64::INFINITY, f64::min).min(0.0) - 1.0;
        scores = raw
            .iter()
            .enumerate()
            .map(|(g, s)| s.iter().enumerate().map(|(u, &x)| if forced[g][u] { lo } else { x }).collect())
            .collect();
        if step < steps {
            let keep =
                select_units::select(model, &groups, &scores, &selected, ratio, cx.config.scope, cx.config.protect()).0;
            for (g, k) in keep.keep.iter().enumerate() {
                for (u, &kept) in k.iter().enumerate() {
                    forced[g][u] |= !kept;
                    gates[g][u] = if forced[g][u] { 0.0 } else { 1.0 };
                }
            }
        }
        cx.timings.push((format!("score: step {step}"), t0.elapsed().as_secs_f64()));
        logs.push(log);
    }
    Ok(Scored { scores, features, steps: logs, samples: probe.as_ref().map(|p| p.n).unwrap_or(0) })
}
