//! The JSON report (`--report`) and the text that `inspect` and a pruning run print.
//!
//! Schema (stable; fields are only ever added): `tool`, `version`, `input`, `options`,
//! `input_shapes`, `parameters` {before, after}, `kinds` (per unit kind: groups, units and
//! parameters before/after), `groups` (per layer: kind, layer, units before/after,
//! parameters per unit, pruned unit indices, scores), `unprunable` (layer, kind, count,
//! reason), `opaque_ops`, `verification`, `warnings`, `scoring` (criterion, schedule,
//! samples, projections, probes, and per schedule step the objective, the Hessian-trace
//! method and the gate's training curve), `device`, `timings_s` (per pass and scoring
//! phase), `phases` (each scoring phase in order: name, the device it ran on, seconds;
//! the seconds here and `timings_s` are the only values that differ between two identical
//! runs). Each group also lists
//! `units`: index, score, kept, and `features` {lambda_min, lambda_max, kappa, entropy,
//! trace_k, hessian, hessian_se} where the criterion computed them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use crate::ir::{Id, Model};
use crate::pipeline::{Context, Verification};
use crate::units::{UnitKind, Unprunable};

#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub input: String,
    pub options: Options,
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    pub parameters: BeforeAfter,
    pub kinds: BTreeMap<UnitKind, KindSummary>,
    pub groups: Vec<GroupReport>,
    pub unprunable: Vec<Unprunable>,
    pub opaque_ops: BTreeMap<String, String>,
    pub verification: Option<Verification>,
    pub warnings: Vec<String>,
    /// How units were scored (absent for `inspect`).
    pub scoring: Option<ScoringReport>,
    /// The compute device the criterion ran on.
    pub device: Option<String>,
    /// `--recover lsq`: the refit layers and fidelity to the dense model without and with it.
    pub recovery: Option<crate::passes::recover_weights::RecoveryReport>,
    /// `--distill-steps`: what was trained and fidelity to the dense model before and after.
    pub distillation: Option<crate::passes::distill_weights::DistillReport>,
    /// `--ntk-condition`: model-level NTK spectrum before and after pruning.
    pub ntk_condition: Option<crate::passes::measure_conditioning::Conditioning>,
    pub timings_s: BTreeMap<String, f64>,
    /// The scoring's phases in order: name, device, seconds.
    pub phases: Vec<crate::pipeline::Phase>,
    /// Graph inputs and outputs the rewrite narrowed (KV caches of pruned heads), by name:
    /// the slim model's interface differs from the dense one's there.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub interface: BTreeMap<String, crate::ir::Narrowed>,
}

#[derive(Serialize)]
pub struct Options {
    pub ratio: f64,
    pub criterion: &'static str,
    pub seed: u64,
    pub scope: crate::pipeline::Scope,
    pub min_keep: usize,
    pub round_to: usize,
    pub max_layer_ratio: f64,
    pub units: Option<Vec<UnitKind>>,
    pub calib: Option<String>,
}

#[derive(Serialize, Clone, Copy, Default)]
pub struct BeforeAfter {
    pub before: usize,
    pub after: usize,
}

#[derive(Serialize, Default)]
pub struct KindSummary {
    pub groups: usize,
    pub units: BeforeAfter,
    pub parameters: BeforeAfter,
}

#[derive(Serialize)]
pub struct GroupReport {
    pub kind: UnitKind,
    pub layer: String,
    pub units_before: usize,
    pub units_after: usize,
    pub params_per_unit: usize,
    pub pruned: Vec<usize>,
    /// Graph inputs and outputs that hold the units (KV caches), narrowed with them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cache: Vec<String>,
    pub scores: Vec<f64>,
    /// Per unit: index, score, kept or pruned, and the NTK/Hessian features where the
    /// criterion computed them.
    pub units: Vec<UnitReport>,
}

#[derive(Serialize)]
pub struct UnitReport {
    pub index: usize,
    pub score: Option<f64>,
    pub kept: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<crate::criteria::ntk::UnitFeatures>,
}

/// How units were scored.
#[derive(Serialize)]
pub struct ScoringReport {
    pub criterion: &'static str,
    pub schedule: crate::criteria::Schedule,
    /// Calibration samples scored on (0 for data-free criteria).
    pub samples: usize,
    pub projections: usize,
    pub probes: usize,
    /// Per schedule step: objective, Hessian method, the gate's training curve.
    pub steps: Vec<crate::criteria::StepLog>,
}

impl Report {
    pub fn build(cx: &Context, model: &Model) -> Report {
        let dense = cx.dense.as_ref().unwrap_or(model);
        let mut kinds: BTreeMap<UnitKind, KindSummary> = BTreeMap::new();
        let mut tensors: BTreeMap<UnitKind, BTreeSet<Id>> = BTreeMap::new();
        let mut groups = Vec::new();
        for (g, group) in cx.groups.iter().enumerate() {
            // A group whose producers the rewrite deleted (neurons of a removed expert) kept none.
            let alive = group.producers.iter().any(|&p| model.graph.contains_node(p));
            let kept = if alive { cx.keep.as_ref().map(|k| k.kept_count(g)).unwrap_or(group.count) } else { 0 };
            let k = kinds.entry(group.kind).or_default();
            k.groups += 1;
            k.units.before += group.count;
            k.units.after += kept;
            tensors
                .entry(group.kind)
                .or_default()
                .extend(group.slices.iter().map(|s| s.tensor).chain(group.owned.iter().flatten().copied()));
            groups.push(GroupReport {
                kind: group.kind,
                layer: group.name.clone(),
                units_before: group.count,
                cache: {
                    let mut c: Vec<String> = group.io.iter().map(|s| dense.value(s.value).name.clone()).collect();
                    c.dedup();
                    c
                },
                units_after: kept,
                params_per_unit: group.params_per_unit(dense),
                pruned: cx.keep.as_ref().map(|k| k.pruned(g)).unwrap_or_default(),
                scores: cx.scores.get(g).cloned().unwrap_or_default(),
                units: (0..group.count)
                    .map(|u| UnitReport {
                        index: u,
                        score: cx.scores.get(g).and_then(|s| s.get(u)).copied(),
                        kept: cx.keep.as_ref().is_none_or(|k| k.keep[g][u]),
                        features: cx.features.get(g).and_then(|f| f.as_ref()).map(|f| f[u].clone()),
                    })
                    .collect(),
            });
        }
        for (kind, ts) in tensors {
            let count = |m: &Model| -> usize {
                ts.iter()
                    .filter(|&&t| m.graph.contains_node(t))
                    .filter_map(|&t| m.value(t).data.as_ref().map(|d| d.numel()))
                    .sum()
            };
            let k = kinds.entry(kind).or_default();
            k.parameters = BeforeAfter { before: count(dense), after: count(model) };
        }
        let c = &cx.config;
        Report {
            tool: "plprune-onnx",
            version: env!("CARGO_PKG_VERSION"),
            input: cx.document.path.display().to_string(),
            options: Options {
                ratio: c.ratio,
                criterion: c.criterion.name(),
                seed: c.seed,
                scope: c.scope,
                min_keep: c.min_keep,
                round_to: c.round_to,
                max_layer_ratio: c.max_layer_ratio,
                units: c.kinds.clone(),
                calib: c.calib.as_ref().map(|p| p.display().to_string()),
            },
            input_shapes: cx.input_shapes.clone(),
            parameters: BeforeAfter { before: dense.parameter_count(), after: model.parameter_count() },
            kinds,
            groups,
            unprunable: cx.unprunable.clone(),
            opaque_ops: cx.opaque_ops.clone(),
            verification: cx.verification.clone(),
            warnings: cx.warnings.clone(),
            scoring: (!cx.scores.is_empty()).then(|| ScoringReport {
                criterion: c.criterion.name(),
                schedule: c.scoring.schedule,
                samples: cx.scored_samples,
                projections: c.scoring.projections,
                probes: c.scoring.probes,
                steps: cx.score_steps.clone(),
            }),
            device: cx.device.clone(),
            recovery: cx.recovery.clone(),
            distillation: cx.distillation.clone(),
            ntk_condition: cx.conditioning.clone(),
            timings_s: cx.timings.iter().fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(k.clone()).or_insert(0.0) += v;
                m
            }),
            phases: cx.phases.clone(),
            interface: model.interface.clone(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The table `inspect` prints.
    pub fn inspect_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{}: {} parameters", self.input, human(self.parameters.before));
        let _ = writeln!(s, "\n{:<8} {:>6} {:>11}  layer", "kind", "units", "params/unit");
        for g in &self.groups {
            let cache = if g.cache.is_empty() { String::new() } else { format!(" (cache: {})", g.cache.join(", ")) };
            let _ =
                writeln!(s, "{:<8} {:>6} {:>11}  {}{cache}", g.kind.name(), g.units_before, g.params_per_unit, g.layer);
        }
        for (k, v) in &self.kinds {
            let _ = writeln!(
                s,
                "total {:<8} {} groups, {} units, {} parameters",
                k.name(),
                v.groups,
                v.units.before,
                human(v.parameters.before)
            );
        }
        if !self.unprunable.is_empty() {
            let _ = writeln!(s, "\nnot prunable:");
            for u in &self.unprunable {
                let kind = u.kind.map(|k| k.name()).unwrap_or("-");
                let _ = writeln!(s, "  {:<8} {:>6}  {}: {}", kind, u.count, u.layer, u.reason);
            }
        }
        if !self.opaque_ops.is_empty() {
            let ops: Vec<&str> = self.opaque_ops.keys().map(String::as_str).collect();
            let _ = writeln!(s, "\nops without a rule (treated as opaque): {}", ops.join(", "));
        }
        s
    }

    /// The summary a pruning run prints.
    pub fn summary_text(&self) -> String {
        let mut s = String::new();
        if let Some(sc) = &self.scoring {
            let _ = write!(s, "scored   criterion {}", sc.criterion);
            if sc.samples > 0 {
                let _ = write!(s, " on {} calibration samples", sc.samples);
            }
            if let Some(d) = &self.device {
                let _ = write!(s, ", device {d}");
            }
            if let Some(obj) = sc.steps.first().and_then(|st| st.objective.as_ref()) {
                let _ = write!(s, ", objective {obj}");
            }
            let _ = writeln!(s);
            for st in &sc.steps {
                if let Some(g) = &st.gate {
                    if let Some(b) = g.curve.get(g.best_epoch) {
                        let held = |v: Option<f64>| v.map(|v| format!(", held-out {v:.4}")).unwrap_or_default();
                        let _ = writeln!(
                            s,
                            "gate     step {}: loss {:.4}{} ranking by λ_min alone -> {:.4}{} trained gate \
                             (epoch {}), {} units decided differently",
                            st.step,
                            g.lambda_min_loss,
                            held(g.lambda_min_val_loss),
                            b.loss,
                            held(b.val_loss),
                            g.best_epoch,
                            g.differs_from_lambda_min
                        );
                    }
                }
            }
        }
        let selected = |k: &UnitKind| self.options.units.as_ref().is_none_or(|u| u.contains(k));
        for (k, v) in self.kinds.iter().filter(|(k, _)| selected(k)) {
            let _ = writeln!(
                s,
                "{:<8} {:>3} groups  units {:>6} -> {:<6} parameters {:>9} -> {:<9} ({:+.1}%)",
                k.name(),
                v.groups,
                v.units.before,
                v.units.after,
                human(v.parameters.before),
                human(v.parameters.after),
                pct(v.parameters.before, v.parameters.after)
            );
        }
        if !self.interface.is_empty() {
            let inputs = self.interface.values().filter(|n| n.input).count();
            let mut sizes: BTreeMap<(usize, usize), usize> = BTreeMap::new();
            for n in self.interface.values().filter(|n| n.input) {
                *sizes.entry((n.dense, n.kept.len())).or_default() += 1;
            }
            let sizes: Vec<String> = sizes.iter().map(|((d, k), c)| format!("{d} -> {k} in {c}")).collect();
            let _ = writeln!(
                s,
                "cache    {inputs} inputs and {} outputs narrowed (entries kept: {}); the runtime must size its \
                 cache from the slim model (report: interface)",
                self.interface.len() - inputs,
                sizes.join(", ")
            );
        }
        let p = self.parameters;
        let _ = writeln!(
            s,
            "model    parameters {} -> {} ({:+.1}%)",
            human(p.before),
            human(p.after),
            pct(p.before, p.after)
        );
        if let Some(c) = &self.ntk_condition {
            let k = |s: &crate::passes::measure_conditioning::Spectrum| match s.kappa {
                Some(k) => format!("{k:.3e}"),
                None => format!("inf (λ_min {:.2e})", s.lambda_min),
            };
            let _ = writeln!(
                s,
                "ntk      model-level condition number {} -> {} on {} samples (λ_max {:.3e} -> {:.3e})",
                k(&c.before),
                k(&c.after),
                c.samples,
                c.before.lambda_max,
                c.after.lambda_max
            );
        }
        if let Some(r) = &self.recovery {
            let held = if r.eval_held_out { "held-out" } else { "calibration" };
            let _ = writeln!(
                s,
                "recovered {} consumer weights by ridge least squares on {} samples ({} skipped; forwards on {})",
                r.layers.len(),
                r.samples,
                r.skipped.len(),
                r.device
            );
            let re: Vec<_> = r.layers.iter().filter_map(|l| l.rearranged.as_ref()).collect();
            if r.method == crate::passes::recover_weights::Recover::Obs {
                let _ = writeln!(
                    s,
                    "re-chose kept units by OBS before the refits: {} units swapped in {} of {} layers ({} left as selected)",
                    re.iter().map(|x| x.swapped).sum::<usize>(),
                    re.iter().filter(|x| x.swapped > 0).count(),
                    re.len(),
                    re.iter().filter(|x| x.skipped.is_some()).count()
                );
            }
            fidelity_lines(&mut s, &r.fidelity, r.eval_samples, held);
            if !r.eval_held_out {
                not_held_out(&mut s);
            }
        }
        if let Some(v) = &self.verification {
            let worst = v.outputs.iter().map(|o| o.max_abs_diff).fold(0.0f64, f64::max);
            let with = if v.executor == "tract" { String::new() } else { format!(" with {}", v.executor) };
            let _ = writeln!(
                s,
                "verified slim == masked dense{with} on {} samples ({} outputs, max abs diff {:.2e}){}",
                v.samples,
                v.outputs.len(),
                worst,
                if self.distillation.is_some() { ", before distillation" } else { "" }
            );
        }
        if let Some(r) = &self.distillation {
            let held = if r.eval_held_out { "held-out" } else { "calibration" };
            let _ = writeln!(
                s,
                "distilled {} weight tensors ({} parameters) for {} steps of {} samples from {} calibration samples, loss {:.4} -> {:.4} (on {})",
                r.tensors, r.parameters, r.steps, r.batch, r.samples, r.loss_first, r.loss_last, r.device
            );
            if !r.hidden.is_empty() {
                let _ = writeln!(s, "  the loss also matched {} hidden states (LayerNorm outputs)", r.hidden.len());
            }
            fidelity_lines(&mut s, &r.fidelity, r.eval_samples, held);
            if !r.eval_held_out {
                not_held_out(&mut s);
            }
        }
        s
    }
}

/// Says that fidelity was measured on samples the fit saw: with few samples a refit can
/// reproduce them almost exactly (EfficientNet-lite0's 24 images: cosine 1.0000) and still
/// lose on new inputs.
fn not_held_out(s: &mut String) {
    let _ = writeln!(
        s,
        "  (the fit used those samples, so this is optimistic: for a held-out measure, give a --calib file with more samples than --calib-samples, or lower --calib-samples)"
    );
}

fn pct(before: usize, after: usize) -> f64 {
    if before == 0 {
        0.0
    } else {
        (after as f64 - before as f64) * 100.0 / before as f64
    }
}

/// 4630000 -> "4.63M"
pub fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// One line per output: fidelity to the dense model before and after a recovery step.
fn fidelity_lines(s: &mut String, fidelity: &[crate::passes::recover_weights::Fidelity], samples: usize, held: &str) {
    for f in fidelity {
        let top1 = match (f.top1_before, f.top1_after) {
            (Some(b), Some(a)) => format!(", top-1 agreement {b:.4} -> {a:.4}"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "fidelity {}: cosine to dense {:.4} -> {:.4}, relative error {:.4} -> {:.4}{top1} ({samples} {held} samples)",
            f.output, f.cosine_before, f.cosine_after, f.rel_err_before, f.rel_err_after
        );
    }
}
