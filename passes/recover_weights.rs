//! RecoverWeights (`--recover lsq`): a label-free least-squares refit of the weights that
//! read pruned units, so each pruned block reproduces the dense block's output on
//! calibration activations (../shared/docs/method.md, Recovery; the layer-wise
//! reconstruction of Kwon et al. 2022's mask tuning, solved in closed form).
//!
//! For every consumer of pruned units — a MatMul or Gemm weight (Wo for heads, the
//! down-projection for neurons, a Gemm after a flatten for filters) or a dense Conv
//! (groups = 1) — with input activations A (rows = samples × positions, columns = input
//! features, unfolded by im2col for a conv) and weight W:
//!
//! W'_kept = argmin ‖A_m,kept W' − A_d W‖² + λ ‖W' − W_kept‖²,  λ = ridge · mean diag(AᵀA),
//!
//! where A_d are the dense model's activations and A_m the masked model's, with every
//! refit made so far applied (consumers are refit in topological order, so each layer
//! corrects what the layers before it still get wrong). The ridge pulls toward the original
//! weights, which keeps under-determined refits (few rows, e.g. a Gemm after a flatten)
//! sane. Only the kept rows change: the pruned ones are removed by RewriteGraph, so the
//! verification (slim == masked) still holds, now for the recovered weights.
//!
//! Runs before RewriteGraph, on the calibration samples the criterion scored; fidelity to
//! the dense model with and without the refit is measured on the next samples of the file
//! when it has them (else on the same ones) and reported. Consumers it cannot refit
//! (grouped convs, weights read by several ops) are listed with the reason and left as
//! they are. When whole experts of a top-1 MoE block are pruned, each kept expert's
//! down-projection is refit towards the block's dense combined output on the tokens routed
//! to it in the masked model (those of removed experts included); stacked experts (one
//! [E, F, C] weight, any top-k) are refit together the same way ([`stacked_experts`]).
//!
//! The forwards that collect the activations run on the backend `--device` picks (the
//! WGSL kernels on a GPU); the Grams AᵀA and the solves run on the CPU in f64.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::engine::cpu::{self, Arena, Real};
use crate::engine::gpu::Device;
use crate::engine::program::Window;
use crate::engine::{Engine, Outputs, Params};
use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::pipeline::{Context, Pass};
use crate::tensor::Tensor;
use crate::units::{KeepSet, Role, UnitGroup, UnitKind};

#[path = "recover_weights/stacked_experts.rs"]
mod stacked_experts;

pub struct RecoverWeights;

/// Recovery methods (`--recover`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Recover {
    None,
    Lsq,
    /// lsq, after re-choosing within each layer which units stay (see [`choose_units`]).
    Obs,
}

impl Recover {
    pub fn parse(s: &str) -> Option<Recover> {
        match s {
            "none" => Some(Recover::None),
            "lsq" => Some(Recover::Lsq),
            "obs" => Some(Recover::Obs),
            _ => None,
        }
    }
}

/// What the refit did, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    pub method: Recover,
    /// The backend the forwards ran on (the solves run on the CPU in f64).
    pub device: String,
    pub ridge: f64,
    /// Calibration samples the refit was fit on.
    pub samples: usize,
    /// Samples fidelity was measured on, and whether they are held out from the fit.
    pub eval_samples: usize,
    pub eval_held_out: bool,
    pub layers: Vec<RefitLayer>,
    pub skipped: Vec<String>,
    /// Per model output: the pruned model against the dense one, without and with the refit.
    pub fidelity: Vec<Fidelity>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RefitLayer {
    pub node: String,
    pub weight: String,
    pub inputs: usize,
    pub kept_inputs: usize,
    /// Whether the consumer's bias was refit too.
    pub bias: bool,
    /// The residual stream the consumer's output is added to, when the refit also made up
    /// for its drift (the target is then the dense sum, not the dense consumer output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual: Option<String>,
    /// Rows left out of the fit as padding (attention_mask = 0).
    pub padding_rows: usize,
    /// Rows left out because the consumer's output is scaled by 0 there (tokens routed to
    /// other experts); the other rows are weighted by that scale.
    pub unrouted_rows: usize,
    /// The value whose dense rows the refit reproduces, when it is not the consumer's own
    /// output: an MoE block's combined output (experts pruned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub rows: usize,
    /// ‖A_m W_masked − A_d W‖ / ‖A_d W‖ on the fit rows, before and after the refit.
    pub rel_err_before: f64,
    pub rel_err_after: f64,
    /// `--recover obs`: the group whose kept units were re-chosen before this refit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rearranged: Option<Rearranged>,
}

/// A group whose kept units `--recover obs` re-chose (as many as the criterion kept).
#[derive(Clone, Debug, Serialize)]
pub struct Rearranged {
    pub group: String,
    /// Units kept now that the criterion had pruned (as many kept ones went).
    pub swapped: usize,
    /// Relative error on the last quarter of the rows of the refit fit on the first three
    /// quarters, on the criterion's units and on the re-chosen ones; the re-chosen units
    /// are kept only when they do better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out: Option<[f64; 2]>,
    /// Why the group was left as the criterion chose, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Fidelity {
    pub output: String,
    /// Mean over samples of the cosine between the sample's output and the dense one.
    pub cosine_before: f64,
    pub cosine_after: f64,
    /// ‖f − f_dense‖ / ‖f_dense‖ over the evaluation samples.
    pub rel_err_before: f64,
    pub rel_err_after: f64,
    /// For logits ([n, C] from Gemm/MatMul/Add): the share of samples whose argmax equals the dense one.
    pub top1_before: Option<f64>,
    pub top1_after: Option<f64>,
}

/// How a consumer's weight maps to a matrix Wm [features, outputs] and its input
/// activation to rows of features.
#[derive(Clone, Debug)]
enum Layout {
    /// MatMul(X, W) or Gemm(X, W): W [K, N].
    RowsIn,
    /// Gemm(X, W, transB = 1): W [N, K].
    ColsIn,
    /// Conv(X, W), groups = 1: W [N, C, kh, kw]; X unfolded by `window`.
    Conv(Window),
}

#[derive(Clone, Debug)]
struct Consumer {
    op: Id,
    weight: Id,
    x: Id,
    layout: Layout,
    /// Pruned input channels (along the weight's input axis).
    pruned: Vec<bool>,
    /// The consumer's bias [outputs] (Gemm/Conv input 2, or the Add after a MatMul), refit
    /// with the weights: it absorbs the mean contribution of the removed units.
    bias: Option<Id>,
    /// The residual stream added to the consumer's (biased) output, when it feeds an Add
    /// with an activation of its own shape: the refit then also absorbs the residual's
    /// drift (see [`refit`]).
    residual: Option<Id>,
    /// A per-row factor [.., 1] the consumer's (biased) output is multiplied by before it is
    /// used (an expert's routing weight): the fit weighs each row by it, so tokens routed
    /// elsewhere (factor 0) do not count.
    row_scale: Option<Id>,
    /// For an expert's down-projection when whole experts are pruned: the MoE block's
    /// combined output, whose dense rows the expert reproduces on the tokens routed to it
    /// (including those its pruned siblings received in the dense model).
    combined: Option<Id>,
}

impl Pass for RecoverWeights {
    fn name(&self) -> &'static str {
        "RecoverWeights"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        // DistillWeights' teacher: the dense model before any refit.
        if cx.config.distill_steps > 0 {
            cx.original = Some(model.clone());
        }
        if cx.config.recover == Recover::None {
            return Ok(());
        }
        let mut keep = cx.keep.clone().ok_or_else(|| Error::Other("no selection to recover from".into()))?;
        if keep.pruned_total() == 0 {
            return Ok(());
        }
        let batch = cx.inputs.clone().ok_or_else(|| Error::Other("--recover needs calibration inputs".into()))?;
        let (fit, eval, held_out) = fit_and_eval(cx, &batch);
        let ridge = cx.config.recover_ridge;
        let (consumers, stacked, mut skipped) = consumers(model, &cx.groups, &keep);
        // The forwards that give the activations run on the chosen backend; the
        // least-squares solves, small and in f64, on the CPU.
        let device = crate::engine::gpu::select(cx.config.device)?;
        // Both references before the refit changes `model`'s weights.
        let dense = dense_outputs(model, &device, &eval)?;
        let before = masked_outputs(model, &device, &cx.groups, &keep, &eval)?;
        let mut layers = Vec::new();
        if !consumers.is_empty() || !stacked.is_empty() {
            let rearrange = cx.config.recover == Recover::Obs;
            if let Some(why) = too_few_to_check(fit.samples).filter(|_| rearrange) {
                cx.warn(format!("--recover obs: {why}; no units are re-chosen and the refit is --recover lsq's"));
            }
            let todo = Todo { consumers: &consumers, stacked: &stacked };
            layers = refit(model, &device, &cx.groups, &mut keep, &fit, todo, ridge, rearrange, &mut skipped)?;
        } else {
            skipped.push("no consumer of pruned units can be refit".into());
        }
        let after = masked_outputs(model, &device, &cx.groups, &keep, &eval)?;
        let fidelity = fidelities(model, &dense, &before, &after);
        // --recover obs may have re-chosen units: the rewrite removes the new selection.
        cx.keep = Some(keep);
        cx.recovery = Some(RecoveryReport {
            method: cx.config.recover,
            device: device.describe(),
            ridge,
            samples: fit.samples,
            eval_samples: eval.samples,
            eval_held_out: held_out,
            layers,
            skipped,
            fidelity,
        });
        Ok(())
    }
}

/// The calibration samples a refit (or a distillation) fits on — up to --recover-samples —
/// and those fidelity is measured on: the next --calib-samples of the file when it has
/// them (held out, true), else the first ones.
pub(crate) fn fit_and_eval(
    cx: &Context,
    batch: &crate::calib::Batch,
) -> (crate::calib::Batch, crate::calib::Batch, bool) {
    let m = cx.config.scoring.calib_samples.max(1);
    let n = cx.config.recover_samples.min(batch.samples.saturating_sub(m)).max(m.min(batch.samples));
    let fit = batch.take(n);
    if batch.samples > n {
        (fit, batch.range(n, (n + m).min(batch.samples)), true)
    } else {
        (fit, batch.take(m), false)
    }
}

/// The model's outputs on `batch`, run `chunk` samples at a time on `device` and joined
/// along the leading (sample) axis.
pub(crate) fn outputs_in_chunks(
    model: &Model,
    device: &Device,
    batch: &crate::calib::Batch,
    chunk: usize,
) -> Result<Outputs<f32>> {
    let mut all: Outputs<f32> = Vec::new();
    for start in (0..batch.samples).step_by(chunk.max(1)) {
        let part = dense_outputs(model, device, &batch.range(start, start + chunk))?;
        if all.is_empty() {
            all = part;
            continue;
        }
        for ((_, shape, d), (name, s, p)) in all.iter_mut().zip(part) {
            if shape.is_empty() || s.is_empty() || shape[1..] != s[1..] {
                return Err(Error::Other(format!("output '{name}' has no leading sample axis ({s:?})")));
            }
            shape[0] += s[0];
            d.extend(p);
        }
    }
    Ok(all)
}

/// The dense model's outputs as the slim `model` writes them: a narrowed output (a KV
/// cache of pruned heads) keeps the kept heads' entries.
pub(crate) fn narrow_outputs(model: &Model, outs: Outputs<f32>) -> Outputs<f32> {
    if model.interface.is_empty() {
        return outs;
    }
    outs.into_iter()
        .map(|(name, shape, d)| match model.interface.get(&name) {
            Some(n) => {
                let t = n.apply(&Tensor::from_f32(shape, &d));
                (name, t.dims.clone(), t.to_f32_vec())
            }
            None => (name, shape, d),
        })
        .collect()
}

/// The consumers of pruned units that can be refit, in topological order, the stacked
/// expert blocks, and the others with the reason.
fn consumers(
    model: &Model,
    groups: &[UnitGroup],
    keep: &KeepSet,
) -> (Vec<Consumer>, Vec<stacked_experts::Block>, Vec<String>) {
    let mut pruned: BTreeMap<(Id, usize), BTreeSet<usize>> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut experts: Vec<Consumer> = Vec::new();
    let mut stacked = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let p = keep.pruned(g);
        if p.is_empty() {
            continue;
        }
        if group.kind == UnitKind::Experts {
            match &group.routing {
                Some(r) => experts.extend(expert_refits(model, group, r, &p, &mut skipped)),
                None => match stacked_experts::find(model, groups, g) {
                    Ok(b) => stacked.push(b),
                    Err(why) => skipped.push(format!("experts '{}': {why}", group.name)),
                },
            }
            continue;
        }
        for s in group.slices.iter().filter(|s| s.role == Role::Consumer) {
            let e = pruned.entry((s.tensor, s.axis)).or_default();
            for &u in &p {
                e.extend(UnitGroup::indices(s, u));
            }
        }
    }
    let order: BTreeMap<Id, usize> =
        model.topo_order().unwrap_or_default().into_iter().enumerate().map(|(i, op)| (op, i)).collect();
    let mut out = Vec::new();
    for ((w, axis), idx) in pruned {
        let wv = model.value(w);
        let readers = model.consumers(w);
        let Some(data) = wv.data.as_ref() else { continue };
        if readers.len() != 1 {
            skipped.push(format!("'{}': read by {} ops", wv.name, readers.len()));
            continue;
        }
        let (op, slot) = readers[0];
        let o = model.op(op);
        let Some(x) = model.input(op, 0) else { continue };
        let xs = model.value(x).shape.clone().unwrap_or_default();
        let layout = match (o.op_type.as_str(), slot, data.rank(), axis) {
            ("MatMul", 1, 2, 0) => Some(Layout::RowsIn),
            ("Gemm", 1, 2, a) if o.attr_i("transA", 0) == 0 => {
                let tb = o.attr_i("transB", 0) != 0;
                match (tb, a) {
                    (false, 0) => Some(Layout::RowsIn),
                    (true, 1) => Some(Layout::ColsIn),
                    _ => None,
                }
            }
            ("Conv", 1, 4, 1) if o.attr_i("group", 1) == 1 && xs.len() == 4 => {
                let ys = model.value(model.output(op, 0)).shape.clone().unwrap_or_default();
                let kernel: Vec<i64> = data.dims[2..].iter().map(|&d| d as i64).collect();
                crate::engine::lower::window(o, &xs, &ys, &kernel).ok().map(|(_, w)| Layout::Conv(w))
            }
            _ => None,
        };
        let Some(layout) = layout else {
            skipped.push(format!("'{}' ({} {}): not a dense MatMul/Gemm/Conv weight", wv.name, o.op_type, o.name));
            continue;
        };
        let mut mask = vec![false; data.dims[axis]];
        for i in idx {
            if i < mask.len() {
                mask[i] = true;
            }
        }
        let nout = match &layout {
            Layout::RowsIn => data.dims[1],
            _ => data.dims[0],
        };
        let bias = bias_of(model, op, nout);
        let dense_rows = !matches!(layout, Layout::Conv(_));
        let residual = if dense_rows { residual_of(model, op, bias) } else { None };
        let row_scale = if dense_rows && residual.is_none() { row_scale_of(model, op, bias) } else { None };
        out.push(Consumer { op, weight: w, x, layout, pruned: mask, bias, residual, row_scale, combined: None });
    }
    // A kept expert whose neurons are pruned too is one refit, towards the combined output.
    for e in experts {
        match out.iter_mut().find(|c| c.weight == e.weight) {
            Some(c) => {
                c.combined = e.combined;
                c.residual = e.residual;
                c.row_scale = e.row_scale;
            }
            None => out.push(e),
        }
    }
    out.sort_by_key(|c| order.get(&c.op).copied().unwrap_or(usize::MAX));
    stacked.sort_by_key(|b| order.get(&b.op).copied().unwrap_or(usize::MAX));
    (out, stacked, skipped)
}

/// The down-projections of the kept experts of an MoE block whose experts `pruned` are
/// removed (top-1 routing, separate branches): each is refit on the tokens routed to it in
/// the masked model, weighted by its routing weight, towards the dense block's combined
/// output, so the kept experts take over the tokens the removed ones served.
fn expert_refits(
    model: &Model,
    group: &UnitGroup,
    r: &crate::units::Routing,
    pruned: &[usize],
    skipped: &mut Vec<String>,
) -> Vec<Consumer> {
    // The combined output: the sum Add no other sum Add reads.
    let outs: Vec<Id> = r.sum_adds.iter().map(|&a| model.output(a, 0)).collect();
    let last =
        r.sum_adds.iter().zip(&outs).find(|(_, &y)| !model.consumers(y).iter().any(|(c, _)| r.sum_adds.contains(c)));
    let Some((_, &combined)) = last else {
        skipped.push(format!("experts '{}': no combined output found", group.name));
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in (0..group.count).filter(|e| !pruned.contains(e)) {
        let (mul, gate) = (r.gate_muls[e], model.output(r.gate_slices[e], 0));
        let y = (0..2).filter_map(|k| model.input(mul, k)).find(|&v| v != gate);
        let found = y.and_then(|y| {
            // y = MatMul(x, W) (+ b), or Gemm(x, W, b).
            let (p, _) = model.producer(y)?;
            let op = if model.op(p).op_type == "Add" {
                let k = (0..2).find(|&k| model.input(p, k).is_some_and(|v| !model.value(v).is_static()))?;
                model.producer(model.input(p, k)?)?.0
            } else {
                p
            };
            let w = model.input(op, 1)?;
            let data = model.value(w).data.as_ref()?;
            let o = model.op(op);
            let (layout, axis) = match (o.op_type.as_str(), data.rank(), o.attr_i("transA", 0), o.attr_i("transB", 0)) {
                ("MatMul", 2, _, _) | ("Gemm", 2, 0, 0) => (Layout::RowsIn, 0),
                ("Gemm", 2, 0, _) => (Layout::ColsIn, 1),
                _ => return None,
            };
            (model.consumers(w).len() == 1).then_some(())?;
            let nout = data.dims[1 - axis];
            let bias = bias_of(model, op, nout);
            (biased_output(model, op, bias) == Some(y)).then_some(())?;
            let pruned = vec![false; data.dims[axis]];
            let residual = residual_after(model, combined);
            Some(Consumer {
                op,
                weight: w,
                x: model.input(op, 0)?,
                layout,
                pruned,
                bias,
                residual,
                row_scale: Some(gate),
                combined: Some(combined),
            })
        });
        match found {
            Some(c) => out.push(c),
            None => skipped.push(format!("expert {e} of '{}': its output is not a MatMul/Gemm's", group.name)),
        }
    }
    out
}

/// The bias added to consumer `op`'s output: a 1-D weight of `nout` entries, read by this
/// op only — input 2 of Gemm/Conv, or the other operand of the Add that alone reads a
/// MatMul's output.
fn bias_of(model: &Model, op: Id, nout: usize) -> Option<Id> {
    let own = |v: Id| -> bool {
        let val = model.value(v);
        val.kind == crate::ir::ValueKind::Weight
            && val.data.as_ref().is_some_and(|d| d.dims == [nout] && d.dtype.is_float())
            && model.consumers(v).len() == 1
    };
    let o = model.op(op);
    match o.op_type.as_str() {
        "Gemm" | "Conv" => model.input(op, 2).filter(|&b| own(b)),
        "MatMul" => {
            let y = model.output(op, 0);
            match model.consumers(y).as_slice() {
                [(add, k)] if model.op(*add).op_type == "Add" => model.input(*add, 1 - k).filter(|&b| own(b)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The other operand R of the residual Add that alone reads consumer `op`'s output (after
/// the MatMul's bias Add): an activation of the Add's own shape, not a weight.
fn residual_of(model: &Model, op: Id, bias: Option<Id>) -> Option<Id> {
    residual_after(model, biased_output(model, op, bias)?)
}

/// The other operand R of the residual Add that alone reads `y`: an activation of the
/// Add's own shape, not a weight.
fn residual_after(model: &Model, y: Id) -> Option<Id> {
    let [(add, k)] = model.consumers(y)[..] else { return None };
    if model.op(add).op_type != "Add" {
        return None;
    }
    let r = model.input(add, 1 - k)?;
    let (rv, yv) = (model.value(r), model.value(y));
    let same = rv.shape.is_some() && rv.shape == yv.shape && rv.shape == model.value(model.output(add, 0)).shape;
    (same && !rv.is_static()).then_some(r)
}

/// The consumer's output after its bias Add (a MatMul's) or the op itself.
fn biased_output(model: &Model, op: Id, bias: Option<Id>) -> Option<Id> {
    let y = model.output(op, 0);
    if model.op(op).op_type == "MatMul" && bias.is_some() {
        let [(add, _)] = model.consumers(y)[..] else { return None };
        return Some(model.output(add, 0));
    }
    Some(y)
}

/// The other operand S of the Mul that alone reads consumer `op`'s (biased) output, when S
/// is an activation of the output's shape with a last dimension of 1 (one factor per row).
fn row_scale_of(model: &Model, op: Id, bias: Option<Id>) -> Option<Id> {
    let y = biased_output(model, op, bias)?;
    let [(mul, k)] = model.consumers(y)[..] else { return None };
    if model.op(mul).op_type != "Mul" {
        return None;
    }
    let sv = model.value(model.input(mul, 1 - k)?);
    let (ss, ys) = (sv.shape.as_ref()?, model.value(y).shape.as_ref()?);
    let fits = ss.len() == ys.len() && ss.last() == Some(&1) && ss[..ss.len() - 1] == ys[..ys.len() - 1];
    (fits && !sv.is_static()).then(|| model.input(mul, 1 - k)).flatten()
}

/// A model with the batch's shapes, its engine, and the batch's inputs in model order.
pub(crate) type Lowered = (Model, Engine, Vec<(String, Tensor)>);

/// A model lowered for `batch`'s shapes.
pub(crate) fn lowered(model: &Model, batch: &crate::calib::Batch) -> Result<Lowered> {
    let batch = batch.for_model(model);
    let shapes: BTreeMap<String, Vec<usize>> = batch.arrays.iter().map(|(k, t)| (k.clone(), t.dims.clone())).collect();
    let mut m = model.clone();
    crate::passes::infer_shapes::infer(&mut m, &shapes)?;
    let engine = Engine::new(&m).map_err(|e| {
        Error::Other(format!("--recover lsq runs the model on the compute engine, which cannot lower it: {e}"))
    })?;
    let inputs = batch.ordered(&m);
    Ok((m, engine, inputs))
}

/// Runs `engine` on `device` with `params`, keeping `keep` (value ids) and the outputs.
fn run_keep(
    engine: &Engine,
    device: &Device,
    inputs: &[(String, Tensor)],
    params: &Params<f32>,
    keep: &[Id],
) -> Result<(Arena<f32>, BTreeMap<Id, usize>)> {
    let slots: BTreeMap<Id, usize> =
        keep.iter().filter_map(|v| engine.lowered.values.get(v).map(|&s| (*v, s))).collect();
    let k: HashSet<usize> = slots.values().copied().collect();
    let arena = engine.forward_keep_on(device, inputs, params, &k)?;
    Ok((arena, slots))
}

fn dense_outputs(model: &Model, device: &Device, batch: &crate::calib::Batch) -> Result<Outputs<f32>> {
    let (m, engine, inputs) = lowered(model, batch)?;
    engine.forward_on(device, &inputs, &engine.params(&m))
}

fn masked_outputs(
    model: &Model,
    device: &Device,
    groups: &[UnitGroup],
    keep: &KeepSet,
    batch: &crate::calib::Batch,
) -> Result<Outputs<f32>> {
    let masked = crate::passes::rewrite_graph::masked(model, groups, keep);
    let (m, engine, inputs) = lowered(&masked, batch)?;
    engine.forward_on(device, &inputs, &engine.params(&m))
}

/// Activation `x` as a row-major [rows, features] matrix in f64, features in the order of
/// the weight matrix's rows.
/// Rows of A a refit uses at most: the least-squares problem is features × features, so more
/// rows add little, while a conv on a large feature map unfolds to millions of rows (128
/// images at 112 × 112 are 1.6M rows per input feature).
const MAX_ROWS: usize = 1 << 16;

/// Activation `x` as a row-major [rows, features] matrix in f64, features in the order of
/// the weight matrix's rows, rows in sample order; the same ones for the dense target and
/// the masked fit. At most about [`MAX_ROWS`] rows: the first ones of a matrix input; for a
/// conv, an even share of every sample's output positions (a strided subset, its phase
/// shifted from sample to sample), so that a large early feature map's rows still come from
/// every calibration image instead of the first few.
fn activation_rows(layout: &Layout, x: &[f32], x_shape: &[usize], features: usize) -> (Vec<f64>, usize) {
    match layout {
        Layout::RowsIn | Layout::ColsIn => {
            let rows = (x.len() / features.max(1)).min(MAX_ROWS);
            (x[..rows * features].iter().map(|&v| v as f64).collect(), rows)
        }
        Layout::Conv(w) => {
            let n = x_shape[0];
            let per_sample: usize = x_shape[1..].iter().product();
            let positions = w.output[0] * w.output[1];
            let stride = (n * positions).div_ceil(MAX_ROWS).max(1);
            let mut win = w.clone();
            win.input = [1, x_shape[1], x_shape[2], x_shape[3]];
            let mut a = Vec::new();
            for b in 0..n {
                let xs: Vec<f64> = x[b * per_sample..(b + 1) * per_sample].iter().map(|&v| v as f64).collect();
                // im2col gives [C·kh·kw, L]; the picked columns become rows.
                let cols = cpu::window::im2col(&xs, &win);
                for p in (0..positions).filter(|p| (p + b) % stride == 0) {
                    a.extend((0..features).map(|f| cols[f * positions + p]));
                }
            }
            let rows = a.len() / features.max(1);
            (a, rows)
        }
    }
}

/// The weight as Wm [features, outputs] (f64), and features per input channel.
fn weight_matrix(layout: &Layout, w: &Tensor) -> (Vec<f64>, usize, usize, usize) {
    let d = w.to_f64_vec();
    match layout {
        Layout::RowsIn => (d, w.dims[0], w.dims[1], 1),
        // W [N, K] (Gemm transB) or [N, C, kh, kw] (conv): Wm is its transpose.
        Layout::ColsIn | Layout::Conv(_) => {
            let (nout, f) = (w.dims[0], w.dims[1..].iter().product());
            let per = if matches!(layout, Layout::Conv(_)) { w.dims[2] * w.dims[3] } else { 1 };
            (transpose(&d, nout, f), f, nout, per)
        }
    }
}

/// Writes Wm [features, outputs] back into the weight's own layout and dtype.
fn store_weight(layout: &Layout, w: &Tensor, m: &[f64]) -> Tensor {
    let d = match layout {
        Layout::RowsIn => m.to_vec(),
        Layout::ColsIn | Layout::Conv(_) => transpose(m, w.dims[1..].iter().product(), w.dims[0]),
    };
    Tensor::from_f64_as(w.dtype, w.dims.clone(), &d)
}

/// The transpose [cols, rows] of a row-major [rows, cols] matrix.
fn transpose(d: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; d.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = d[r * cols + c];
        }
    }
    t
}

/// C [m, n] = Aᵀ B for row-major A [r, m], B [r, n].
fn at_b(a: &[f64], b: &[f64], r: usize, m: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    if r * m * n == 0 {
        return c;
    }
    // SAFETY: the strides describe A [r, m] and B [r, n] row-major inside their slices.
    unsafe {
        f64::gemm(m, r, n, a.as_ptr(), 1, m as isize, b.as_ptr(), n as isize, 1, c.as_mut_ptr(), n as isize, 1);
    }
    c
}

/// C [r, n] = A B for row-major A [r, k], B [k, n].
fn a_b(a: &[f64], b: &[f64], r: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; r * n];
    if r * k * n == 0 {
        return c;
    }
    // SAFETY: as above, A [r, k] and B [k, n] row-major.
    unsafe {
        f64::gemm(r, k, n, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, c.as_mut_ptr(), n as isize, 1);
    }
    c
}

/// For activations [n, L, F] of a batch whose `attention_mask` input is [n, L], which of
/// the first `rows` rows are real tokens (None: no such mask, or every row is live).
fn padding_rows(batch: &crate::calib::Batch, x_shape: &[usize], rows: usize) -> Option<Vec<bool>> {
    let m = batch.arrays.get("attention_mask")?;
    if x_shape.len() != 3 || m.dims.len() != 2 || m.dims[..] != x_shape[..2] {
        return None;
    }
    let live: Vec<bool> = m.to_f64_vec().iter().take(rows).map(|&v| v != 0.0).collect();
    (live.len() == rows && live.iter().any(|&l| !l) && live.iter().any(|&l| l)).then_some(live)
}

/// What a refit works through: the matrix consumers and the stacked expert blocks, each in
/// topological order.
#[derive(Clone, Copy)]
struct Todo<'a> {
    consumers: &'a [Consumer],
    stacked: &'a [stacked_experts::Block],
}

#[allow(clippy::too_many_arguments)]
fn refit(
    model: &mut Model,
    device: &Device,
    groups: &[UnitGroup],
    keep: &mut KeepSet,
    fit: &crate::calib::Batch,
    todo: Todo,
    ridge: f64,
    rearrange: bool,
    skipped: &mut Vec<String>,
) -> Result<Vec<RefitLayer>> {
    let consumers = todo.consumers;
    let mut xs: Vec<Id> = consumers.iter().flat_map(|c| [Some(c.x), c.residual, c.combined]).flatten().collect();
    xs.extend(todo.stacked.iter().flat_map(|b| [Some(b.combined), b.residual]).flatten());
    let (dm, engine, inputs) = lowered(model, fit)?;
    let (arena, slots) = run_keep(&engine, device, &inputs, &engine.params(&dm), &xs)?;
    let kept_value = |arena: &Arena<f32>, slots: &BTreeMap<Id, usize>, v: Id| -> Result<(Vec<f32>, Vec<usize>)> {
        let s = slots.get(&v).copied().ok_or_else(|| Error::Other("consumer input was not lowered".into()))?;
        let x = arena.get(s).ok_or_else(|| Error::Other("consumer input was not kept".into()))?;
        Ok((x.to_vec(), engine.lowered.program.shape(s).to_vec()))
    };
    // Dense targets A_d W (+ R_d) per consumer.
    let mut targets = Vec::new();
    for c in consumers {
        let w = model.value(c.weight).data.clone().expect("consumers have data");
        let (wm, f, nout, _) = weight_matrix(&c.layout, &w);
        let (x, shape) = kept_value(&arena, &slots, c.x)?;
        let (a, rows) = activation_rows(&c.layout, &x, &shape, f);
        let mut t = match c.combined {
            // The dense block output.
            Some(y) => {
                let (yd, _) = kept_value(&arena, &slots, y)?;
                yd[..rows * nout].iter().map(|&v| v as f64).collect()
            }
            None => a_b(&a, &wm, rows, f, nout),
        };
        if let Some(r) = c.residual {
            let (rd, _) = kept_value(&arena, &slots, r)?;
            t.iter_mut().zip(&rd).for_each(|(t, r)| *t += *r as f64);
        }
        targets.push(t);
    }
    // Dense block outputs (+ R_d) of the stacked expert blocks.
    let mut stacked_targets = Vec::new();
    for b in todo.stacked {
        let (mut t, _) = kept_value(&arena, &slots, b.combined)?;
        if let Some(r) = b.residual {
            let (rd, _) = kept_value(&arena, &slots, r)?;
            t.iter_mut().zip(&rd).for_each(|(t, r)| *t += *r);
        }
        stacked_targets.push(t.into_iter().map(|v| v as f64).collect::<Vec<f64>>());
    }
    drop(arena);
    let run = Runner { engine: &engine, device, inputs: &inputs, groups, fit };
    let mut layers = Vec::new();
    let shortfall = too_few_to_check(fit.samples);
    let order: BTreeMap<Id, usize> =
        model.topo_order().unwrap_or_default().into_iter().enumerate().map(|(i, op)| (op, i)).collect();
    let position = |op: Id| order.get(&op).copied().unwrap_or(usize::MAX);
    // Stacked blocks are refit in turn with the consumers, each when the model before it is.
    let mut next_stacked = 0;
    let mut refit_stacked = |model: &mut Model, keep: &KeepSet, until: usize, layers: &mut Vec<RefitLayer>| {
        while let Some(b) = todo.stacked.get(next_stacked).filter(|b| position(b.op) < until) {
            match stacked_experts::refit(&run, model, keep, b, &stacked_targets[next_stacked], ridge)? {
                Ok(layer) => layers.push(layer),
                Err(why) => skipped.push(format!("experts '{}': {why}", groups[b.group].name)),
            }
            next_stacked += 1;
        }
        Ok::<(), Error>(())
    };
    for (c, target) in consumers.iter().zip(targets) {
        refit_stacked(model, keep, position(c.op), &mut layers)?;
        let mut c = c.clone();
        // --recover obs: first re-choose which units of the group feeding this consumer stay
        // (as many as the criterion kept), on the activations with all of them alive.
        let mut rearranged = None;
        // The problem with every unit of the group alive holds the masked model's rows too
        // (a unit's features depend on that unit alone, and the residual and routing come
        // from before the group), so the refit reuses it on the features that stay.
        let mut reuse = None;
        if let (true, Some(why)) = (rearrange, &shortfall) {
            if let Some((g, _)) = sole_group(&c, groups, keep) {
                let (group, skipped) = (groups[g].name.clone(), Some(why.clone()));
                rearranged = Some(Rearranged { group, swapped: 0, held_out: None, skipped });
            }
        } else if rearrange {
            if let Some((g, slice)) = sole_group(&c, groups, keep) {
                let mut all = keep.clone();
                all.keep[g] = vec![true; groups[g].count];
                let p = run.problem(model, &all, &c, &target)?;
                let units: Vec<Vec<usize>> = (0..groups[g].count)
                    .map(|u| UnitGroup::indices(slice, u).flat_map(|ch| ch * p.per..(ch + 1) * p.per).collect())
                    .collect();
                let bias = c.bias.and_then(|b| model.value(b).data.clone());
                // Chosen on the first three quarters of the rows (in sample order, so the
                // last quarter's samples are unseen), kept only if the refit then fits the
                // last quarter better than on the criterion's units: with few calibration
                // samples the search can overfit.
                let split = p.rows - p.rows / 4;
                let (fit_r, val_r) = (0..split, split..p.rows);
                let outcome =
                    choose_units(&p, fit_r.clone(), &c.pruned, bias.as_ref(), &units, keep.kept_count(g), ridge)
                        .and_then(|alive| {
                            let mut pruned = c.pruned.clone();
                            for (u, chs) in (0..groups[g].count).map(|u| (u, UnitGroup::indices(slice, u))) {
                                for ch in chs {
                                    pruned[ch] = !alive[u];
                                }
                            }
                            let err = |pr: &[bool]| {
                                let cols: Vec<usize> = (0..p.f).filter(|&j| !pr[j / p.per]).collect();
                                held_out_error(&p, &cols, bias.as_ref(), fit_r.clone(), val_r.clone(), ridge)
                            };
                            let (before, after) = (err(&c.pruned)?, err(&pruned)?);
                            Ok((alive, pruned, [before, after]))
                        });
                let name = groups[g].name.clone();
                rearranged = Some(match outcome {
                    Ok((alive, _, held_out)) if alive == keep.keep[g] => {
                        Rearranged { group: name, swapped: 0, held_out: Some(held_out), skipped: None }
                    }
                    Ok((alive, pruned, held_out)) if held_out[1] < held_out[0] => {
                        let swapped = alive.iter().zip(&keep.keep[g]).filter(|(a, k)| **a && !**k).count();
                        c.pruned = pruned;
                        keep.keep[g] = alive;
                        Rearranged { group: name, swapped, held_out: Some(held_out), skipped: None }
                    }
                    Ok((_, _, held_out)) => Rearranged {
                        group: name,
                        swapped: 0,
                        held_out: Some(held_out),
                        skipped: Some("the criterion's units fit the held-out rows as well or better".into()),
                    },
                    Err(e) => Rearranged { group: name, swapped: 0, held_out: None, skipped: Some(e) },
                });
                reuse = Some(p);
            }
        }
        let p = match reuse {
            Some(p) => p,
            None => run.problem(model, keep, &c, &target)?,
        };
        let (f, nout, per, rows, padding_rows, unrouted) = (p.f, p.nout, p.per, p.rows, p.padding_rows, p.unrouted);
        let (mut wm, w) = (p.wm.clone(), p.w.clone());
        let kept: Vec<usize> = (0..f).filter(|&j| !c.pruned[j / per]).collect();
        let bias = c.bias.and_then(|b| model.value(b).data.clone());
        let (ak, target, wk, fk) = design(&p, &kept, bias.as_ref(), 0..rows);
        let norm = target.iter().map(|v| v * v).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
        let err = |wk: &[f64]| -> f64 {
            if rows == 0 {
                return 0.0;
            }
            let y = a_b(&ak, wk, rows, fk, nout);
            y.iter().zip(&target).map(|(p, q)| (p - q) * (p - q)).sum::<f64>().sqrt() / norm
        };
        let before = err(&wk);
        let (mut g, mut b) = normal_equations(&ak, &target, &wk, rows, fk, nout, ridge);
        let solved = crate::linalg::cholesky_solve(&mut g, &mut b, fk, nout);
        let (new_wk, after) = match solved {
            Ok(()) => {
                let e = err(&b);
                if e < before {
                    (b, e)
                } else {
                    (wk, before)
                }
            }
            Err(_) => (wk, before),
        };
        for (i, &j) in kept.iter().enumerate() {
            wm[j * nout..(j + 1) * nout].copy_from_slice(&new_wk[i * nout..(i + 1) * nout]);
        }
        let t = store_weight(&c.layout, &w, &wm);
        model.value_mut(c.weight).set_data(t);
        if let (Some(b), Some(old)) = (c.bias, &bias) {
            let nbv = &new_wk[kept.len() * nout..];
            model.value_mut(b).set_data(Tensor::from_f64_as(old.dtype, old.dims.clone(), nbv));
        }
        layers.push(RefitLayer {
            node: model.op(c.op).name.clone(),
            weight: model.value(c.weight).name.clone(),
            inputs: c.pruned.len(),
            kept_inputs: c.pruned.iter().filter(|p| !**p).count(),
            bias: bias.is_some(),
            residual: c.residual.map(|r| model.value(r).name.clone()),
            padding_rows,
            unrouted_rows: unrouted,
            target: c.combined.map(|y| model.value(y).name.clone()),
            rows,
            rel_err_before: before,
            rel_err_after: after,
            rearranged,
        });
    }
    refit_stacked(model, keep, usize::MAX, &mut layers)?;
    Ok(layers)
}

/// One consumer's least-squares problem on the masked model's activations.
struct Problem {
    /// Activations [rows, f] (every input feature, pruned ones included) and the target
    /// [rows, nout], with the residual drift and the routing scale already applied.
    a: Vec<f64>,
    target: Vec<f64>,
    /// Row weights (|routing weight|), applied to A's and the target's rows by [`design`].
    row_w: Option<Vec<f64>>,
    rows: usize,
    /// The weight as Wm [f, nout], its tensor, and input features per channel.
    wm: Vec<f64>,
    w: Tensor,
    f: usize,
    nout: usize,
    per: usize,
    padding_rows: usize,
    unrouted: usize,
}

/// What the forwards of one refit share.
struct Runner<'a> {
    engine: &'a Engine,
    device: &'a Device,
    inputs: &'a [(String, Tensor)],
    groups: &'a [UnitGroup],
    fit: &'a crate::calib::Batch,
}

impl Runner<'_> {
    /// Runs `model` masked by `keep` and builds consumer `c`'s problem towards `target`
    /// (the dense A_d W (+ R_d), or the dense block output).
    fn problem(&self, model: &Model, keep: &KeepSet, c: &Consumer, target: &[f64]) -> Result<Problem> {
        let masked = crate::passes::rewrite_graph::masked(model, self.groups, keep);
        let params: Params<f32> = self.engine.params(&masked);
        let keep_ids: Vec<Id> = std::iter::once(c.x).chain(c.residual).chain(c.row_scale).collect();
        let (arena, slots) = run_keep(self.engine, self.device, self.inputs, &params, &keep_ids)?;
        let kept_value = |v: Id| -> Result<(Vec<f32>, Vec<usize>)> {
            let s = slots.get(&v).copied().ok_or_else(|| Error::Other("consumer input was not lowered".into()))?;
            let x = arena.get(s).ok_or_else(|| Error::Other("consumer input was not kept".into()))?;
            Ok((x.to_vec(), self.engine.lowered.program.shape(s).to_vec()))
        };
        let (x, shape) = kept_value(c.x)?;
        let w = model.value(c.weight).data.clone().expect("consumers have data");
        let (wm, f, nout, per) = weight_matrix(&c.layout, &w);
        let (a, rows) = activation_rows(&c.layout, &x, &shape, f);
        let mut target = target.to_vec();
        // With the residual stream R in the target (A_d W + R_d − R_m), the refit output
        // also makes up for what the layers before still get wrong in R.
        if let Some(r) = c.residual {
            let (rm, _) = kept_value(r)?;
            target.iter_mut().zip(&rm).for_each(|(t, r)| *t -= *r as f64);
        }
        // Weighted rows: scale A's and the target's rows by |S| (the masked model's routing).
        let scale = c.row_scale.map(kept_value).transpose()?.map(|(v, _)| v);
        drop(arena);
        if let (Some(sc), Some(_)) = (&scale, c.combined) {
            // The block output is s · (A W' + b') on this expert's tokens: fit A W' + b' to
            // the dense output / s there (rows are weighted by |s| in `design`; the bias is
            // subtracted here because the fit adds the dense bias to every target row).
            let b = c.bias.and_then(|b| model.value(b).data.as_ref().map(|d| d.to_f64_vec())).unwrap_or_default();
            for (row, &s) in target.chunks_mut(nout).zip(sc.iter()) {
                if s != 0.0 {
                    row.iter_mut().for_each(|t| *t /= s as f64);
                }
                row.iter_mut().zip(&b).for_each(|(t, b)| *t -= b);
            }
        }
        // Padded positions (attention_mask = 0) do not reach a pooled output: fit the rest.
        let mut scale = scale;
        let (a, target, rows, padding_rows) = match padding_rows(self.fit, &shape, rows) {
            Some(live) => {
                let pick = |d: &[f64], w: usize| -> Vec<f64> {
                    d.chunks(w).zip(&live).filter(|(_, &l)| l).flat_map(|(r, _)| r.iter().copied()).collect()
                };
                if let Some(sc) = scale.as_mut() {
                    let mut it = live.iter();
                    sc.retain(|_| it.next().copied().unwrap_or(false));
                }
                let k = live.iter().filter(|&&l| l).count();
                (pick(&a, f), pick(&target, nout), k, rows - k)
            }
            None => (a, target, rows, 0),
        };
        let (a, target, rows, row_w, unrouted) = match scale {
            Some(sc) => {
                let live: Vec<usize> = (0..rows).filter(|&r| sc.get(r).is_some_and(|&v| v != 0.0)).collect();
                let pick = |d: &[f64], w: usize| -> Vec<f64> {
                    live.iter().flat_map(|&r| d[r * w..(r + 1) * w].iter().copied()).collect()
                };
                let row_w: Vec<f64> = live.iter().map(|&r| sc[r].abs() as f64).collect();
                (pick(&a, f), pick(&target, nout), live.len(), Some(row_w), rows - live.len())
            }
            None => (a, target, rows, None, 0),
        };
        Ok(Problem { a, target, row_w, rows, wm, w, f, nout, per, padding_rows, unrouted })
    }
}

/// The design matrix of a fit on input features `cols` (+ a column of ones with a bias),
/// its target (+ the dense bias) and the starting weights W0 (rows `cols` of Wm, + the
/// bias), with `row_w` applied, on rows `range` of the problem: (A, T, W0, columns).
fn design(
    p: &Problem,
    cols: &[usize],
    bias: Option<&Tensor>,
    range: std::ops::Range<usize>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, usize) {
    let (rows, f, nout) = (range.len(), p.f, p.nout);
    // With a bias, a column of ones joins A and the bias joins W as its last row; the
    // dense target then includes the dense bias.
    let nb = usize::from(bias.is_some());
    let fk = cols.len() + nb;
    let mut ak: Vec<f64> = Vec::with_capacity(rows * fk);
    for r in range.clone() {
        ak.extend(cols.iter().map(|&j| p.a[r * f + j]));
        ak.extend(std::iter::repeat_n(1.0, nb));
    }
    let mut wk: Vec<f64> = cols.iter().flat_map(|&j| p.wm[j * nout..(j + 1) * nout].to_vec()).collect();
    let mut target = p.target[range.start * nout..range.end * nout].to_vec();
    if let Some(b) = bias {
        let bv = b.to_f64_vec();
        wk.extend_from_slice(&bv);
        for row in target.chunks_mut(nout) {
            for (t, x) in row.iter_mut().zip(&bv) {
                *t += x;
            }
        }
    }
    if let Some(w) = &p.row_w {
        for ((ar, tr), &wr) in ak.chunks_mut(fk).zip(target.chunks_mut(nout)).zip(&w[range]) {
            ar.iter_mut().for_each(|x| *x *= wr);
            tr.iter_mut().for_each(|x| *x *= wr);
        }
    }
    (ak, target, wk, fk)
}

/// Relative error on rows `val` of the ridge refit on features `cols` fit on rows `fit`.
fn held_out_error(
    p: &Problem,
    cols: &[usize],
    bias: Option<&Tensor>,
    fit: std::ops::Range<usize>,
    val: std::ops::Range<usize>,
    ridge: f64,
) -> std::result::Result<f64, String> {
    if fit.is_empty() || val.is_empty() {
        return Err("too few rows to hold some out".into());
    }
    let (ak, t, w0, fk) = design(p, cols, bias, fit.clone());
    let (mut g, mut b) = normal_equations(&ak, &t, &w0, fit.len(), fk, p.nout, ridge);
    drop(ak);
    crate::linalg::cholesky_solve(&mut g, &mut b, fk, p.nout)?;
    let (av, tv, _, _) = design(p, cols, bias, val.clone());
    let y = a_b(&av, &b, val.len(), fk, p.nout);
    let e: f64 = y.iter().zip(&tv).map(|(p, q)| (p - q) * (p - q)).sum();
    Ok((e / tv.iter().map(|v| v * v).sum::<f64>().max(f64::MIN_POSITIVE)).sqrt())
}

/// The ridge normal equations (AᵀA + λI) W = AᵀT + λ W0, λ = ridge · mean diag(AᵀA).
fn normal_equations(
    ak: &[f64],
    target: &[f64],
    w0: &[f64],
    rows: usize,
    fk: usize,
    nout: usize,
    ridge: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut g = at_b(ak, ak, rows, fk, fk);
    let mut b = at_b(ak, target, rows, fk, nout);
    let mean_diag = (0..fk).map(|i| g[i * fk + i]).sum::<f64>() / fk.max(1) as f64;
    let lambda = (ridge * mean_diag).max(1e-12);
    for i in 0..fk {
        g[i * fk + i] += lambda;
    }
    for (bv, wv) in b.iter_mut().zip(w0) {
        *bv += lambda * wv;
    }
    (g, b)
}

/// Largest design (input features + bias) `--recover obs` re-chooses units on: its greedy
/// search keeps the inverse Gram, features² f64 values (128 MiB at this size).
const MAX_REARRANGE_FEATURES: usize = 4096;

/// `--recover obs` re-chooses units only when the last quarter of the refit's samples, on
/// which each re-choice must beat the criterion's to be kept, holds at least this many.
/// With fewer the check cannot tell a better choice from one that fits a few samples by
/// chance: EfficientNet-lite0's 24 calibration images leave 6, and every re-choice they let
/// through made the model worse on held-out images (fisher, 50% of filters: top-1 agreement
/// 0.750 with lsq, 0.625 with obs). vgg_bn and MiniLM at the default 128 refit samples
/// (32 to check on) gain from obs.
const MIN_CHECK_SAMPLES: usize = 16;

/// Why `--recover obs` cannot check re-choices on `samples` refit samples, if it cannot.
fn too_few_to_check(samples: usize) -> Option<String> {
    (samples / 4 < MIN_CHECK_SAMPLES).then(|| {
        format!(
            "{samples} refit samples leave {} to check a re-choice on (needs {MIN_CHECK_SAMPLES}, from {} samples)",
            samples / 4,
            4 * MIN_CHECK_SAMPLES
        )
    })
}

/// The one unit group (not experts) whose pruned units consumer `c` reads, with its slice on
/// c's weight, when that weight is the group's only consumer: re-choosing its units then
/// changes no other refit's inputs.
fn sole_group<'g>(c: &Consumer, groups: &'g [UnitGroup], keep: &KeepSet) -> Option<(usize, &'g crate::units::Slice)> {
    let mut found = None;
    for (g, group) in groups.iter().enumerate() {
        let mine: Vec<&crate::units::Slice> =
            group.slices.iter().filter(|s| s.role == Role::Consumer && s.tensor == c.weight).collect();
        if mine.is_empty() || keep.pruned(g).is_empty() {
            continue;
        }
        let consumers = group.slices.iter().filter(|s| s.role == Role::Consumer).count();
        if found.is_some() || group.kind == UnitKind::Experts || mine.len() != 1 || consumers != 1 {
            return None;
        }
        found = Some((g, mine[0]));
    }
    found
}

/// `--recover obs`: which units of a group stay, `keep_n` of them, chosen by greedy
/// Optimal Brain Surgeon on the refit's own least-squares problem (Kwon et al. 2022's mask
/// rearrangement; the structured OBS of Frantar & Alistarh's OBC and Kurtic et al.'s
/// ZipLM). `p` holds the activations with every unit of the group alive and `units` the
/// input features of each unit; the other kept features (and the bias) always stay.
///
/// With H = AᵀA + λI (the refit's ridge) and W = H⁻¹(AᵀT + λW0) the refit on all features,
/// removing unit u's features I and refitting the rest raises the squared error by
/// tr(W_Iᵀ [H⁻¹]_II⁻¹ W_I); the cheapest unit goes, then W and H⁻¹ are updated in closed
/// form (W −= H⁻¹_:I [H⁻¹]_II⁻¹ W_I, H⁻¹ −= H⁻¹_:I [H⁻¹]_II⁻¹ H⁻¹_I:) until `keep_n`
/// remain. Ties go to the lower index, so the choice is deterministic.
fn choose_units(
    p: &Problem,
    range: std::ops::Range<usize>,
    pruned: &[bool],
    bias: Option<&Tensor>,
    units: &[Vec<usize>],
    keep_n: usize,
    ridge: f64,
) -> std::result::Result<Vec<bool>, String> {
    let in_units: BTreeSet<usize> = units.iter().flatten().copied().collect();
    let cols: Vec<usize> = (0..p.f).filter(|&j| in_units.contains(&j) || !pruned[j / p.per]).collect();
    let pos: BTreeMap<usize, usize> = cols.iter().enumerate().map(|(i, &j)| (j, i)).collect();
    let rows = range.len();
    let (ak, target, w0, fk) = design(p, &cols, bias, range);
    if fk > MAX_REARRANGE_FEATURES {
        return Err(format!("{fk} input features (at most {MAX_REARRANGE_FEATURES})"));
    }
    if rows == 0 {
        return Err("no rows to fit".into());
    }
    let nout = p.nout;
    let (mut g, b) = normal_equations(&ak, &target, &w0, rows, fk, nout, ridge);
    // H⁻¹ = (L⁻¹)ᵀ L⁻¹ from the Cholesky factor, then W = H⁻¹ B.
    let li = crate::linalg::cholesky_inverse_factor(&mut g, fk)?;
    let mut hi = at_b(&li, &li, fk, fk, fk);
    drop(li);
    let mut w = a_b(&hi, &b, fk, fk, nout);
    let idx: Vec<Vec<usize>> = units.iter().map(|u| u.iter().map(|j| pos[j]).collect()).collect();
    let mut alive = vec![true; units.len()];
    let mut left = units.len();
    // [H⁻¹]_II⁻¹ W_I and [H⁻¹]_II⁻¹ H⁻¹_I: for unit u (k = |I| rows each).
    let solve_ii = |hi: &[f64], rows: &[usize], rhs: &mut [f64], width: usize| -> std::result::Result<(), String> {
        let k = rows.len();
        let mut s: Vec<f64> = rows.iter().flat_map(|&a| rows.iter().map(move |&b| hi[a * fk + b])).collect();
        crate::linalg::cholesky_solve(&mut s, rhs, k, width)
    };
    while left > keep_n {
        let mut best: Option<(usize, f64)> = None;
        for (u, rows) in idx.iter().enumerate().filter(|(u, _)| alive[*u]) {
            // A unit whose block of H⁻¹ is not positive definite is kept (cost +∞).
            let cost = if let [r] = rows[..] {
                let d = hi[r * fk + r];
                let wr = &w[r * nout..(r + 1) * nout];
                if d > 0.0 {
                    wr.iter().map(|v| v * v).sum::<f64>() / d
                } else {
                    f64::INFINITY
                }
            } else {
                let wi: Vec<f64> = rows.iter().flat_map(|&r| w[r * nout..(r + 1) * nout].iter().copied()).collect();
                let mut x = wi.clone();
                match solve_ii(&hi, rows, &mut x, nout) {
                    Ok(()) => wi.iter().zip(&x).map(|(a, b)| a * b).sum::<f64>(),
                    Err(_) => f64::INFINITY,
                }
            };
            if cost.is_finite() && best.is_none_or(|(_, bc)| cost < bc) {
                best = Some((u, cost));
            }
        }
        let Some((u, _)) = best else {
            return Err("no unit can be removed with a finite cost".into());
        };
        let rows = &idx[u];
        let k = rows.len();
        // X = [H⁻¹]_II⁻¹ [W_I | H⁻¹_I:], then W −= H⁻¹_:I X_W and H⁻¹ −= H⁻¹_:I X_H.
        let width = nout + fk;
        let mut x = vec![0.0; k * width];
        for (i, &r) in rows.iter().enumerate() {
            x[i * width..i * width + nout].copy_from_slice(&w[r * nout..(r + 1) * nout]);
            x[i * width + nout..(i + 1) * width].copy_from_slice(&hi[r * fk..(r + 1) * fk]);
        }
        solve_ii(&hi, rows, &mut x, width)?;
        let col: Vec<f64> =
            (0..fk).flat_map(|a| rows.iter().map(move |&r| (a, r))).map(|(a, r)| hi[a * fk + r]).collect();
        for a in 0..fk {
            let ca = &col[a * k..(a + 1) * k];
            if ca.iter().all(|v| *v == 0.0) {
                continue;
            }
            let (wa, ha) = (&mut w[a * nout..(a + 1) * nout], &mut hi[a * fk..(a + 1) * fk]);
            for (i, &cv) in ca.iter().enumerate() {
                let xr = &x[i * width..(i + 1) * width];
                wa.iter_mut().zip(&xr[..nout]).for_each(|(t, v)| *t -= cv * v);
                ha.iter_mut().zip(&xr[nout..]).for_each(|(t, v)| *t -= cv * v);
            }
        }
        for &r in rows {
            w[r * nout..(r + 1) * nout].iter_mut().for_each(|v| *v = 0.0);
        }
        alive[u] = false;
        left -= 1;
    }
    Ok(alive)
}

/// Fidelity of each model output (`before` and `after` a recovery step, against `dense`).
pub(crate) fn fidelities(
    model: &Model,
    dense: &[(String, Vec<usize>, Vec<f32>)],
    before: &[(String, Vec<usize>, Vec<f32>)],
    after: &[(String, Vec<usize>, Vec<f32>)],
) -> Vec<Fidelity> {
    dense
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, shape, d), ((_, _, b), (_, _, a)))| {
            let logits = crate::criteria::probe::is_logits(model, name, shape);
            fidelity(name, shape, logits, d, b, a)
        })
        .collect()
}

fn fidelity(name: &str, shape: &[usize], logits: bool, dense: &[f32], before: &[f32], after: &[f32]) -> Fidelity {
    let n = shape.first().copied().unwrap_or(1).max(1);
    let per = dense.len() / n;
    let cos = |x: &[f32]| -> f64 {
        (0..n)
            .map(|s| {
                let (a, b) = (&dense[s * per..(s + 1) * per], &x[s * per..(s + 1) * per]);
                let dot: f64 = a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum();
                let na: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
                if na * nb > 0.0 {
                    dot / (na * nb)
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / n as f64
    };
    let rel = |x: &[f32]| -> f64 {
        let e: f64 = dense.iter().zip(x).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum();
        let d: f64 = dense.iter().map(|p| (*p as f64).powi(2)).sum();
        (e / d.max(f64::MIN_POSITIVE)).sqrt()
    };
    let argmax =
        |v: &[f32]| -> usize { v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best }) };
    let top1 = |x: &[f32]| -> Option<f64> {
        logits.then(|| {
            (0..n).filter(|&s| argmax(&dense[s * per..(s + 1) * per]) == argmax(&x[s * per..(s + 1) * per])).count()
                as f64
                / n as f64
        })
    };
    Fidelity {
        output: name.to_string(),
        cosine_before: cos(before),
        cosine_after: cos(after),
        rel_err_before: rel(before),
        rel_err_after: rel(after),
        top1_before: top1(before),
        top1_after: top1(after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::lcg;
    use crate::tensor::DType;

    /// A problem with activations `a` [rows, f] and target T = A Wt, starting from weights w0.
    fn problem(a: Vec<f64>, rows: usize, f: usize, wt: &[f64], w0: &[f64], nout: usize) -> Problem {
        let target = a_b(&a, wt, rows, f, nout);
        let w = Tensor::from_f64_as(DType::F32, vec![f, nout], w0);
        Problem { a, target, row_w: None, rows, wm: w0.to_vec(), w, f, nout, per: 1, padding_rows: 0, unrouted: 0 }
    }

    /// Relative error of the least-squares refit on `cols` alone.
    fn refit_error(p: &Problem, cols: &[usize]) -> f64 {
        let (ak, t, w0, fk) = design(p, cols, None, 0..p.rows);
        let (mut g, mut b) = normal_equations(&ak, &t, &w0, p.rows, fk, p.nout, 1e-9);
        crate::linalg::cholesky_solve(&mut g, &mut b, fk, p.nout).unwrap();
        let y = a_b(&ak, &b, p.rows, fk, p.nout);
        let e: f64 = y.iter().zip(&t).map(|(p, q)| (p - q) * (p - q)).sum();
        (e / t.iter().map(|v| v * v).sum::<f64>()).sqrt()
    }

    #[test]
    fn obs_keeps_a_spanning_set_and_drops_what_the_target_does_not_use() {
        // x3 = x0 + x1 and x4 = 2·x2 are redundant, x5 is independent but unused by the
        // target T = 0.3·x0 + x3 − x4; the largest weights are on x5 (a magnitude criterion
        // would keep it). Keeping 3 of 6, only a set spanning x0, x1, x2 fits T exactly.
        let (rows, f, nout) = (200, 6, 2);
        let mut r = lcg(3);
        let mut a = vec![0.0; rows * f];
        for i in 0..rows {
            let (x0, x1, x2, x5) = (r(), r(), r(), r());
            a[i * f..(i + 1) * f].copy_from_slice(&[x0, x1, x2, x0 + x1, 2.0 * x2, x5]);
        }
        let wt = [0.3, -0.2, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, -1.0, 0.7, 0.0, 0.0];
        let w0 = [0.3, -0.2, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, -1.0, 0.7, 9.0, 9.0];
        let p = problem(a, rows, f, &wt, &w0, nout);
        let units: Vec<Vec<usize>> = (0..f).map(|j| vec![j]).collect();
        let alive = choose_units(&p, 0..rows, &[false; 6], None, &units, 3, 1e-9).unwrap();
        assert_eq!(alive.iter().filter(|a| **a).count(), 3, "{alive:?}");
        assert!(!alive[5], "kept the unused feature: {alive:?}");
        let kept: Vec<usize> = (0..f).filter(|&j| alive[j]).collect();
        assert!(refit_error(&p, &kept) < 1e-6, "{kept:?} does not span the target");
        // A choice that does not span it (x0, x3, x5) leaves a large error: the test can fail.
        assert!(refit_error(&p, &[0, 3, 5]) > 0.1);
    }

    #[test]
    fn obs_removes_whole_multi_feature_units_and_respects_fixed_features() {
        // Four units of two features each plus a fixed (already kept, not a candidate)
        // feature 8 and a pruned feature 9 that must not be used. Unit 2 carries noise the
        // target ignores; unit 3 duplicates unit 0 (scaled). Keeping 2 of 4: unit 1 and one
        // of units 0 / 3 stay, and the refit on them (with feature 8) is exact.
        let (rows, f, nout) = (300, 10, 3);
        let mut r = lcg(11);
        let mut a = vec![0.0; rows * f];
        for i in 0..rows {
            let v: Vec<f64> = (0..8).map(|_| r()).collect();
            a[i * f..(i + 1) * f].copy_from_slice(&[
                v[0],
                v[1],
                v[2],
                v[3],
                v[4],
                v[5],
                3.0 * v[0],
                3.0 * v[1],
                v[6],
                v[7],
            ]);
        }
        let mut wt = vec![0.0; f * nout];
        for (j, row) in [
            (0, [1.0, 0.5, 0.0]),
            (1, [0.0, 1.0, -1.0]),
            (2, [0.4, 0.0, 0.3]),
            (3, [-0.6, 0.2, 1.0]),
            (8, [0.5, 0.5, 0.5]),
        ] {
            wt[j * nout..(j + 1) * nout].copy_from_slice(&row);
        }
        let mut w0 = wt.clone();
        w0[4 * nout] = 5.0; // unit 2: large weights, no use in the target
        w0[5 * nout + 1] = -5.0;
        let p = problem(a, rows, f, &wt, &w0, nout);
        let units: Vec<Vec<usize>> = (0..4).map(|u| vec![2 * u, 2 * u + 1]).collect();
        let mut pruned = vec![false; f];
        pruned[9] = true;
        let alive = choose_units(&p, 0..rows, &pruned, None, &units, 2, 1e-9).unwrap();
        assert!(alive[1] && !alive[2], "{alive:?}");
        assert!(alive[0] != alive[3], "{alive:?}");
        let mut kept: Vec<usize> = units.iter().zip(&alive).filter(|(_, a)| **a).flat_map(|(u, _)| u.clone()).collect();
        kept.push(8);
        assert!(refit_error(&p, &kept) < 1e-6, "{kept:?}");
        assert!(refit_error(&p, &[0, 1, 4, 5, 8]) > 0.1, "dropping unit 1 must cost");
    }

    #[test]
    fn conv_rows_come_from_every_sample_when_the_budget_is_short() {
        // 1 × 1 conv over 3 one-channel 160 × 160 maps: 76,800 positions > MAX_ROWS, so every
        // second position of each sample is taken, the phase shifting by one per sample.
        // Each value encodes its sample and position.
        let (n, h) = (3usize, 160usize);
        let l = h * h;
        let win = |n: usize| Window {
            kernel: [1, 1],
            stride: [1, 1],
            dilation: [1, 1],
            pad: [0, 0],
            input: [n, 1, h, h],
            output: [h, h],
        };
        let x: Vec<f32> = (0..n * l).map(|i| i as f32).collect();
        let (a, rows) = activation_rows(&Layout::Conv(win(n)), &x, &[n, 1, h, h], 1);
        assert_eq!(rows, n * l / 2);
        assert!(rows <= MAX_ROWS);
        let picked: Vec<(usize, usize)> = a.iter().map(|&v| (v as usize / l, v as usize % l)).collect();
        for b in 0..n {
            let mine: Vec<usize> = picked.iter().filter(|(s, _)| *s == b).map(|(_, p)| *p).collect();
            assert_eq!(mine.len(), l / 2, "sample {b}");
            assert!(mine.iter().all(|p| (p + b) % 2 == 0), "sample {b}: wrong phase");
        }
        assert!(picked.windows(2).all(|w| w[0] < w[1]), "rows are not in sample order");
        // Within the budget: every position of every sample, as im2col orders them.
        let (a, rows) = activation_rows(&Layout::Conv(win(2)), &x[..2 * l], &[2, 1, h, h], 1);
        assert_eq!(rows, 2 * l);
        assert!(a.iter().enumerate().all(|(i, &v)| v == i as f64));
    }
}
