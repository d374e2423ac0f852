//! The pass manager: a `Pass` is a named step over the IR, pipelines are literal lists of
//! passes, and the IR is validated after every pass in debug and test builds, with the
//! pass's name in the error (as rustc's MIR pass manager does).
//!
//! Phases, in order (see `prune_pipeline`):
//! 1. `InferShapes` — concrete shapes for the chosen input shapes; folds shape subgraphs.
//! 2. `DiscoverUnits` — coupled unit groups (filters, neurons), and what is unprunable.
//! 3. `ScoreUnits` — one score per unit from the chosen criterion.
//! 4. `SelectUnits` — keep-set from scores, ratio, scope and per-layer protection.
//!    `MeasureConditioning` — with `--ntk-condition`, the model-level NTK condition number
//!    before and after pruning (no-op otherwise).
//! 5. `RecoverWeights` — with `--recover lsq`, a ridge least-squares refit of the weights
//!    that read pruned units, on calibration activations (no-op otherwise).
//! 6. `RewriteGraph` — slices every coupled tensor, reroutes experts; keeps the dense model.
//! 7. `EliminateDeadNodes` — removes what the rewrite left unused (pruned expert branches).
//! 8. `InferShapes` again — the slim graph must be consistent; declared dims follow.
//! 9. `VerifyRewrite` — slim(x) == masked dense(x) on real inputs, run by tract (or, for
//!    ops tract lacks, by the plprune engine).
//! 10. `DistillWeights` — with `--distill-steps N`, label-free fine-tuning of the slim
//!     model's weights towards the dense model's outputs (no-op otherwise).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::criteria::Criterion;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::onnx_io::Document;
use crate::units::{KeepSet, UnitGroup, UnitKind, Unprunable};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Global,
    Layer,
}

/// Validated options for one run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Fraction of the selected unit kinds' parameters to remove, in [0, 1).
    pub ratio: f64,
    /// Kinds to prune; None = every kind found.
    pub kinds: Option<Vec<UnitKind>>,
    pub criterion: Criterion,
    pub seed: u64,
    pub min_keep: usize,
    /// Layers of filters and neurons keep a multiple of this many units (`--round-to`).
    pub round_to: usize,
    /// The largest fraction of its units a layer may lose (`--max-layer-ratio`; 1 = no cap).
    pub max_layer_ratio: f64,
    pub scope: Scope,
    /// Input shapes given with --input-shape (override everything else).
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    pub calib: Option<PathBuf>,
    /// Samples used by the verification run.
    pub verify_samples: usize,
    pub verify: bool,
    /// Options of the data-driven criteria (projections, probes, gate, schedule).
    pub scoring: crate::criteria::ScoringConfig,
    /// Backend of the compute engine.
    pub device: crate::engine::DeviceChoice,
    /// Refit of the pruned blocks' consumer weights (`--recover`), and its ridge.
    pub recover: crate::passes::recover_weights::Recover,
    pub recover_ridge: f64,
    /// Calibration samples the refit is fit on (at most; the rest of the file evaluates).
    pub recover_samples: usize,
    /// `--distill-steps`: Adam steps of label-free fine-tuning of the slim model towards the
    /// dense outputs (0 = none), with their learning rate and minibatch size.
    pub distill_steps: usize,
    pub distill_lr: f64,
    pub distill_batch: usize,
    pub distill_augment: f64,
    /// `--distill-hidden`: the distillation loss also matches shared LayerNorm outputs.
    pub distill_hidden: bool,
    /// `--distill-hidden-weight`: weight of each hidden-state term in the distillation loss
    /// relative to one model output's (1 = every term alike).
    pub distill_hidden_weight: f64,
    /// Measure the model-level NTK condition number before and after pruning.
    pub ntk_condition: bool,
}

impl Config {
    /// The per-layer limits of the selection (`--min-keep`, `--round-to`, `--max-layer-ratio`).
    pub fn protect(&self) -> crate::passes::select_units::Protect {
        crate::passes::select_units::Protect {
            min_keep: self.min_keep,
            round_to: self.round_to,
            max_layer_ratio: self.max_layer_ratio,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            ratio: 0.5,
            kinds: None,
            criterion: Criterion::Pl,
            seed: 0,
            min_keep: 1,
            round_to: 1,
            max_layer_ratio: 1.0,
            scope: Scope::Global,
            input_shapes: BTreeMap::new(),
            calib: None,
            verify_samples: 2,
            verify: true,
            scoring: crate::criteria::ScoringConfig::default(),
            device: crate::engine::DeviceChoice::Auto,
            recover: crate::passes::recover_weights::Recover::None,
            recover_ridge: 1e-2,
            recover_samples: 128,
            distill_steps: 0,
            distill_lr: 1e-4,
            distill_batch: 16,
            distill_augment: 0.3,
            distill_hidden: false,
            distill_hidden_weight: 1.0,
            ntk_condition: false,
        }
    }
}

/// Result of the verification run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Verification {
    pub samples: usize,
    pub outputs: Vec<OutputCheck>,
    pub passed: bool,
    /// What ran both models: "tract", or the plprune engine with the reason tract could not.
    pub executor: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct OutputCheck {
    pub name: String,
    pub max_abs_diff: f64,
    pub max_abs_reference: f64,
    pub tolerance: f64,
}

/// One timed phase of the scoring, and the device it ran on (`Device::describe`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Phase {
    pub name: String,
    pub device: String,
    pub seconds: f64,
}

impl Phase {
    pub fn new(name: &str, device: &str, seconds: f64) -> Phase {
        Phase { name: name.to_string(), device: device.to_string(), seconds }
    }
}

/// State shared by the passes of one run.
pub struct Context {
    pub config: Config,
    pub document: Document,
    /// Concrete shape of every graph input, as shape inference used it.
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    /// Calibration / verification inputs, by graph input name.
    pub inputs: Option<crate::calib::Batch>,
    /// Op types without an inference rule (opaque placeholders), with a node each.
    pub opaque_ops: BTreeMap<String, String>,
    pub groups: Vec<UnitGroup>,
    pub unprunable: Vec<Unprunable>,
    /// One score per unit, by group (higher = more important).
    pub scores: Vec<Vec<f64>>,
    /// Per-unit NTK features and Hessian traces, where the criterion computed them.
    pub features: crate::criteria::ntk::Features,
    /// One entry per schedule step (objective, Hessian method, gate training curve).
    pub score_steps: Vec<crate::criteria::StepLog>,
    /// Calibration samples the criterion scored on (0 for data-free criteria).
    pub scored_samples: usize,
    /// The compute device, described, once one was chosen.
    pub device: Option<String>,
    pub keep: Option<KeepSet>,
    /// The model as it was before the rewrite (the masked reference is built from it).
    pub dense: Option<Model>,
    /// What `--recover` refit, and fidelity with and without it.
    pub recovery: Option<crate::passes::recover_weights::RecoveryReport>,
    /// The dense model before any refit: DistillWeights' teacher (kept only when it runs).
    pub original: Option<Model>,
    /// What `--distill-steps` trained, and fidelity before and after.
    pub distillation: Option<crate::passes::distill_weights::DistillReport>,
    /// `--ntk-condition`: the model-level NTK spectrum before and after pruning.
    pub conditioning: Option<crate::passes::measure_conditioning::Conditioning>,
    pub verification: Option<Verification>,
    pub timings: Vec<(String, f64)>,
    /// The scoring's phases in order, each with its device.
    pub phases: Vec<Phase>,
    pub warnings: Vec<String>,
}

impl Context {
    pub fn new(config: Config, document: Document) -> Context {
        Context {
            config,
            document,
            input_shapes: BTreeMap::new(),
            inputs: None,
            opaque_ops: BTreeMap::new(),
            groups: Vec::new(),
            unprunable: Vec::new(),
            scores: Vec::new(),
            features: Vec::new(),
            score_steps: Vec::new(),
            scored_samples: 0,
            device: None,
            keep: None,
            dense: None,
            recovery: None,
            original: None,
            distillation: None,
            conditioning: None,
            verification: None,
            timings: Vec::new(),
            phases: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn warn(&mut self, msg: impl Into<String>) {
        self.warnings.push(msg.into());
    }

    /// Whether `kind` is among the kinds the user asked to prune.
    pub fn selects(&self, kind: UnitKind) -> bool {
        self.config.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()>;
}

/// Runs passes in order, timing each and validating the IR after each.
pub fn run_passes(passes: &[&dyn Pass], cx: &mut Context, model: &mut Model) -> Result<()> {
    for pass in passes {
        let t = Instant::now();
        pass.run(cx, model).map_err(|e| match e {
            Error::Other(msg) => Error::Pass { pass: pass.name().to_string(), msg },
            e => e,
        })?;
        cx.timings.push((pass.name().to_string(), t.elapsed().as_secs_f64()));
        if cfg!(any(debug_assertions, test)) {
            model.validate().map_err(|msg| Error::Pass { pass: pass.name().to_string(), msg })?;
        }
    }
    Ok(())
}

use crate::passes::{
    discover_units::DiscoverUnits, distill_weights::DistillWeights, eliminate_dead_nodes::EliminateDeadNodes,
    infer_shapes::InferShapes, measure_conditioning::MeasureConditioning, recover_weights::RecoverWeights,
    rewrite_graph::RewriteGraph, score_units::ScoreUnits, select_units::SelectUnits, verify_rewrite::VerifyRewrite,
};

/// Import-side analysis: what `inspect` runs.
pub fn analysis_passes() -> Vec<&'static dyn Pass> {
    vec![&InferShapes, &DiscoverUnits]
}

/// Scoring and selection.
pub fn selection_passes() -> Vec<&'static dyn Pass> {
    vec![&ScoreUnits, &SelectUnits, &MeasureConditioning]
}

/// Recovery (a no-op unless `--recover`), rewrite, clean-up, (unless disabled in tests)
/// verification, and distillation (a no-op unless `--distill-steps`).
pub fn rewrite_passes(verify: bool) -> Vec<&'static dyn Pass> {
    let mut p: Vec<&'static dyn Pass> = vec![&RecoverWeights, &RewriteGraph, &EliminateDeadNodes, &InferShapes];
    if verify {
        p.push(&VerifyRewrite);
    }
    p.push(&DistillWeights);
    p
}
