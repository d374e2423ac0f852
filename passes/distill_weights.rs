//! DistillWeights (`--distill-steps N`): label-free fine-tuning of the slim model's weights
//! towards the dense model's outputs on the calibration inputs (knowledge distillation with
//! the dense model as teacher; no labels are read).
//!
//! `--recover lsq` is closed form and layer-wise: it cannot move the weights that feed the
//! kept units (Q, K, V, the up-projections) or undo what the softmax does with a changed
//! input. This pass does, by gradient descent through the whole slim model on the compute
//! engine: for N steps of Adam on minibatches of `--distill-batch` calibration samples it
//! minimises, per float output o of the model,
//!
//! L = Σ_o c_o Σ_r w_r ‖f_o(x_r) − f_o^dense(x_r)‖² / Σ_r w_r ‖f_o^dense(x_r)‖²  /  Σ_o c_o,
//!
//! with c_o = 1 for the model's outputs and `--distill-hidden-weight` for the hidden states
//! `--distill-hidden` adds, rows r the samples (or, for a sequence output [n, L, …], the tokens, padding
//! positions of `attention_mask` weighted 0). The learning rate warms up linearly over the
//! first tenth of the steps and decays to zero on a cosine.
//!
//! Runs after the rewrite and its verification, on the slim model: the structure is final
//! (and verified equal to the masked dense model) before any weight moves, and each step
//! costs what the slim model costs. Every float weight the outputs depend on is trained
//! except embedding tables (the data input of a Gather), which the calibration tokens would
//! only partly cover. The teacher is the dense model as imported, before any `--recover`
//! refit. It fits on the samples `--recover lsq` fits on (the first `--recover-samples`)
//! and reports fidelity before and after on the next `--calib-samples` of the file, held
//! out from the fit, when it has them. Forwards and backwards run on the `--device`
//! backend; the Adam update runs on the CPU. Same seed → same minibatches → same weights.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::calib::Batch;
use crate::engine::Params;
use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::passes::recover_weights::{fidelities, fit_and_eval, lowered, narrow_outputs, outputs_in_chunks, Fidelity};
use crate::pipeline::{Context, Pass};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

pub struct DistillWeights;

/// What the fine-tuning did, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct DistillReport {
    /// The backend the forwards and backwards ran on.
    pub device: String,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// `--distill-augment`: share of tokens replaced, or largest mixing weight of float inputs.
    pub augment: f64,
    /// Calibration samples the minibatches were drawn from.
    pub samples: usize,
    /// Samples fidelity was measured on, and whether they are held out from the fit.
    pub eval_samples: usize,
    pub eval_held_out: bool,
    /// `--distill-hidden`: the hidden states (LayerNorm outputs) the loss also matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    /// `--distill-hidden-weight`: each hidden state's weight in the loss against an output's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_weight: Option<f64>,
    /// Weight tensors trained, and their parameters.
    pub tensors: usize,
    pub parameters: usize,
    /// Weights left as they are, with the reason.
    pub frozen: Vec<String>,
    /// The distillation loss, mean over the first and over the last tenth of the steps.
    pub loss_first: f64,
    pub loss_last: f64,
    /// The mean loss of each tenth of the steps, in order (the training curve).
    pub loss_by_tenth: Vec<f64>,
    /// Per model output: the slim model against the dense one, before and after.
    pub fidelity: Vec<Fidelity>,
}

impl Pass for DistillWeights {
    fn name(&self) -> &'static str {
        "DistillWeights"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let steps = cx.config.distill_steps;
        if steps == 0 {
            return Ok(());
        }
        let teacher = cx.original.clone().ok_or_else(|| Error::Other("no dense snapshot to distill from".into()))?;
        let batch = cx.inputs.clone().ok_or_else(|| Error::Other("--distill-steps needs calibration inputs".into()))?;
        let (fit, eval, held_out) = fit_and_eval(cx, &batch);
        let b = cx.config.distill_batch.clamp(1, fit.samples.max(1));
        let device = crate::engine::gpu::select(cx.config.device)?;
        let dense_eval = narrow_outputs(model, outputs_in_chunks(&teacher, &device, &eval, b)?);
        let before = outputs_in_chunks(model, &device, &eval, b)?;
        for (name, shape, _) in &dense_eval {
            if shape.first() != Some(&eval.samples) {
                return Err(Error::Other(format!(
                    "distillation needs every output to have a leading sample axis; '{name}' has shape {shape:?}"
                )));
            }
        }
        // With hidden-state targets, both models also output the residual stream after every
        // LayerNormalization (same name and shape in both), and the loss matches those too.
        let (teacher_h, student_h) = if cx.config.distill_hidden {
            with_hidden_outputs(&teacher, model)
        } else {
            (teacher.clone(), model.clone())
        };
        let hidden: Vec<String> =
            student_h.outputs[model.outputs.len()..].iter().map(|&v| student_h.value(v).name.clone()).collect();
        let coef: Vec<f64> = (0..student_h.outputs.len())
            .map(|o| if o < model.outputs.len() { 1.0 } else { cx.config.distill_hidden_weight })
            .collect();
        if cx.config.distill_hidden && hidden.is_empty() {
            cx.warn("--distill-hidden: no LayerNormalization output is shared by the dense and the slim model; the loss matches the outputs only");
        }
        // The teacher runs on every (augmented) minibatch.
        let (tm, tengine, _) = lowered(&teacher_h, &fit.take(b))?;
        let tparams: Params<f32> = tengine.params(&tm);
        let rate = cx.config.distill_augment;
        let pools = token_pools(&tm, &fit);

        // The student, lowered for minibatches of b samples, differentiated w.r.t. the
        // trainable weights.
        let (sm, engine, _) = lowered(&student_h, &fit.take(b))?;
        let (train, frozen) = trainable(&sm, &engine.all_params());
        if train.is_empty() {
            return Err(Error::Other("distillation found no float weight to train".into()));
        }
        let prog = engine.grad_program(&train)?;
        let mut params: Params<f32> = engine.params(&sm);
        let mut adam: BTreeMap<Id, (Vec<f32>, Vec<f32>)> =
            train.iter().map(|&id| (id, (vec![0.0; params[&id].len()], vec![0.0; params[&id].len()]))).collect();
        let lr = cx.config.distill_lr;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let warmup = (steps / 10).max(1);
        let mut order = Order::new(fit.samples, cx.config.seed);
        let mut losses = Vec::with_capacity(steps);
        crate::progress::begin("distillation", steps);
        for step in 0..steps {
            let idx = order.next(b);
            let mut mb = fit.select(&idx);
            if rate > 0.0 {
                augment(&mut mb, &pools, rate, &mut order.rng);
            }
            let inputs = mb.ordered(&sm);
            let dense = narrow_outputs(&sm, tengine.forward_on(&device, &mb.ordered(&tm), &tparams)?);
            let weights: Vec<Vec<f32>> = dense.iter().map(|(_, shape, _)| row_weights(&mb, shape)).collect();
            let targets: Vec<Vec<f32>> = dense.into_iter().map(|(_, _, d)| d).collect();
            let run = prog.run_on(
                &device,
                &inputs,
                &params,
                |outs| Ok(loss_and_cotangents(outs, &targets, &weights, &coef)),
                &HashSet::new(),
            )?;
            if !run.loss.is_finite() {
                return Err(Error::Other(format!(
                    "distillation diverged at step {} (loss {}); lower --distill-lr",
                    step + 1,
                    run.loss
                )));
            }
            losses.push(run.loss);
            let t = (step + 1) as f64;
            let step_lr = lr * schedule(step, steps, warmup);
            let (c1, c2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
            for (id, g) in &run.grads {
                let (m, v) = adam.get_mut(id).expect("trained weights have moments");
                let w = Arc::make_mut(params.get_mut(id).expect("trained weights are params"));
                for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = *g as f64;
                    *m = (b1 * *m as f64 + (1.0 - b1) * g) as f32;
                    *v = (b2 * *v as f64 + (1.0 - b2) * g * g) as f32;
                    let upd = step_lr * (*m as f64 / c1) / ((*v as f64 / c2).sqrt() + eps);
                    *w = (*w as f64 - upd) as f32;
                }
            }
            crate::progress::tick();
        }
        crate::progress::finish();

        let mut parameters = 0;
        for &id in &train {
            let w = &params[&id];
            parameters += w.len();
            let dims = model.value(id).data.as_ref().expect("trained weights have data").dims.clone();
            model.value_mut(id).set_data(Tensor::from_f32(dims, w));
        }
        let after = outputs_in_chunks(model, &device, &eval, b)?;
        let fidelity = fidelities(model, &dense_eval, &before, &after);
        let tenth = (steps / 10).max(1);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        cx.distillation = Some(DistillReport {
            device: device.describe(),
            steps,
            batch: b,
            lr,
            augment: rate,
            hidden_weight: (!hidden.is_empty()).then_some(cx.config.distill_hidden_weight),
            hidden,
            samples: fit.samples,
            eval_samples: eval.samples,
            eval_held_out: held_out,
            tensors: train.len(),
            parameters,
            frozen,
            loss_first: mean(&losses[..tenth]),
            loss_last: mean(&losses[steps - tenth..]),
            loss_by_tenth: (0..10.min(steps))
                .map(|k| mean(&losses[k * steps / 10.min(steps)..(k + 1) * steps / 10.min(steps)]))
                .collect(),
            fidelity,
        });
        Ok(())
    }
}

/// Copies of `teacher` and `student` whose outputs also include every LayerNormalization
/// output the two share by name and shape (the residual stream of a transformer whose
/// heads and neurons were pruned).
fn with_hidden_outputs(teacher: &Model, student: &Model) -> (Model, Model) {
    let (mut t, mut s) = (teacher.clone(), student.clone());
    let by_name: BTreeMap<String, Id> = teacher
        .topo_order()
        .unwrap_or_default()
        .into_iter()
        .filter(|&op| teacher.op(op).op_type == "LayerNormalization")
        .map(|op| teacher.output(op, 0))
        .map(|v| (teacher.value(v).name.clone(), v))
        .collect();
    for op in student.topo_order().unwrap_or_default() {
        if student.op(op).op_type != "LayerNormalization" {
            continue;
        }
        let v = student.output(op, 0);
        let name = &student.value(v).name;
        if let Some(&tv) = by_name.get(name) {
            let same = teacher.value(tv).shape == student.value(v).shape;
            if same && !s.outputs.contains(&v) && !t.outputs.contains(&tv) {
                s.outputs.push(v);
                t.outputs.push(tv);
            }
        }
    }
    (t, s)
}

/// The float weights to train, and the others with the reason.
fn trainable(model: &Model, params: &[Id]) -> (Vec<Id>, Vec<String>) {
    let mut train = Vec::new();
    let mut frozen = Vec::new();
    for &id in params {
        let v = model.value(id);
        let name = &v.name;
        if v.data.as_ref().map(|t| t.dtype) != Some(DType::F32) {
            if v.data.as_ref().is_some_and(|t| t.dtype.is_float()) {
                frozen.push(format!("{name}: not f32"));
            }
            continue;
        }
        if model.consumers(id).iter().any(|&(op, slot)| slot == 0 && model.op(op).op_type == "Gather") {
            frozen.push(format!("{name}: embedding table"));
            continue;
        }
        train.push(id);
    }
    (train, frozen)
}

/// The learning-rate factor at `step`: linear warm-up, then a cosine to zero.
fn schedule(step: usize, steps: usize, warmup: usize) -> f64 {
    if step < warmup {
        return (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

/// Minibatch sample order: successive seeded permutations of the fit samples.
struct Order {
    rng: Rng,
    n: usize,
    perm: Vec<usize>,
}

impl Order {
    fn new(n: usize, seed: u64) -> Order {
        Order { rng: Rng::new(seed ^ 0xD157_1111), n, perm: Vec::new() }
    }

    fn next(&mut self, b: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(b);
        while out.len() < b {
            if self.perm.is_empty() {
                self.perm = (0..self.n).collect();
                for i in (1..self.n).rev() {
                    let j = self.rng.below(i as u64 + 1) as usize;
                    self.perm.swap(i, j);
                }
                self.perm.reverse();
            }
            out.push(self.perm.pop().expect("refilled"));
        }
        out
    }
}

/// Token inputs (integer inputs read as Gather indices: token ids, token types) and the
/// values they take on the calibration samples inside each sequence (not on padding, not
/// at the first or last real position, where tokenizers put [CLS] and [SEP]).
fn token_pools(model: &Model, batch: &Batch) -> BTreeMap<String, Vec<i64>> {
    let mut pools = BTreeMap::new();
    for &i in &model.inputs {
        let v = model.value(i);
        let Some(t) = batch.arrays.get(&v.name) else { continue };
        let gathered = model.consumers(i).iter().any(|&(op, slot)| slot == 1 && model.op(op).op_type == "Gather");
        if t.dtype.is_float() || !gathered || t.dims.len() != 2 {
            continue;
        }
        let vals = t.to_i64_vec();
        let pool: Vec<i64> = interior(batch, &t.dims).into_iter().map(|k| vals[k]).collect();
        if !pool.is_empty() {
            pools.insert(v.name.clone(), pool);
        }
    }
    pools
}

/// Flat indices of the positions of [n, L] token inputs that augmentation may change: those
/// with attention_mask = 1 (all, without one) except each sequence's first and last.
fn interior(batch: &Batch, dims: &[usize]) -> Vec<usize> {
    let (n, l) = (dims[0], dims[1]);
    let mask = batch.arrays.get("attention_mask").filter(|m| m.dims == dims);
    let mut out = Vec::new();
    for s in 0..n {
        let real: Vec<usize> =
            (0..l).filter(|&p| mask.is_none_or(|m| m.get_f64(s * l + p) != 0.0)).map(|p| s * l + p).collect();
        if real.len() > 2 {
            out.extend_from_slice(&real[1..real.len() - 1]);
        }
    }
    out
}

/// Label-free augmentation of a minibatch, so that the student learns the teacher's function
/// around the calibration samples rather than memorising them: a share `rate` of each
/// sequence's interior tokens is replaced by tokens drawn from the calibration samples
/// (token inputs), and float inputs are mixed with another sample of the minibatch,
/// x ← (1 − a)·x + a·x', a uniform in [0, rate).
fn augment(batch: &mut Batch, pools: &BTreeMap<String, Vec<i64>>, rate: f64, rng: &mut Rng) {
    let n = batch.samples;
    let names: Vec<String> = batch.arrays.keys().cloned().collect();
    for name in names {
        let t = &batch.arrays[&name];
        if let Some(pool) = pools.get(&name) {
            let mut vals = t.to_i64_vec();
            for k in interior(batch, &t.dims) {
                if rng.next_f64() < rate {
                    vals[k] = pool[rng.below(pool.len() as u64) as usize];
                }
            }
            let t = Tensor::from_i64_as(t.dtype, t.dims.clone(), &vals);
            batch.arrays.insert(name, t);
        } else if t.dtype.is_float() && n > 1 {
            let x = t.to_f64_vec();
            let per = x.len() / n;
            let mut y = x.clone();
            for s in 0..n {
                let other = (s + 1 + rng.below(n as u64 - 1) as usize) % n;
                let a = rate * rng.next_f64();
                for k in 0..per {
                    y[s * per + k] = (1.0 - a) * x[s * per + k] + a * x[other * per + k];
                }
            }
            let t = Tensor::from_f64_as(t.dtype, t.dims.clone(), &y);
            batch.arrays.insert(name, t);
        }
    }
}

/// Weight per element of a minibatch output of `shape` (leading axis = the minibatch's
/// samples): 0 on padding positions of a sequence output, 1 elsewhere.
fn row_weights(batch: &Batch, shape: &[usize]) -> Vec<f32> {
    let per_sample: usize = shape[1..].iter().product();
    let mut w = vec![1.0f32; batch.samples * per_sample];
    if let Some(mask) = batch.arrays.get("attention_mask") {
        if shape.len() >= 3 && mask.dims.len() == 2 && mask.dims[1] == shape[1] {
            let per_token: usize = shape[2..].iter().product();
            for (t, chunk) in w.chunks_mut(per_token).enumerate() {
                if mask.get_f64(t) == 0.0 {
                    chunk.fill(0.0);
                }
            }
        }
    }
    w
}

/// The distillation loss of a minibatch and its cotangent per output; output o's relative
/// error counts with weight `coef[o]`.
fn loss_and_cotangents(
    outs: &[(String, Vec<usize>, Vec<f32>)],
    targets: &[Vec<f32>],
    weights: &[Vec<f32>],
    coef: &[f64],
) -> (f64, Vec<Vec<f32>>) {
    let total: f64 = coef.iter().sum::<f64>().max(1e-30);
    let mut loss = 0.0;
    let mut cots = Vec::with_capacity(outs.len());
    for ((((_, _, y), t), w), c_o) in outs.iter().zip(targets).zip(weights).zip(coef) {
        let k = c_o / total;
        let norm: f64 = t.iter().zip(w).map(|(t, w)| *w as f64 * (*t as f64).powi(2)).sum::<f64>().max(1e-30);
        let mut c = Vec::with_capacity(y.len());
        for ((y, t), w) in y.iter().zip(t).zip(w) {
            let d = (*y - *t) as f64;
            loss += k * *w as f64 * d * d / norm;
            c.push((2.0 * k * *w as f64 * d / norm) as f32);
        }
        cots.push(c);
    }
    (loss, cots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minibatches_cover_every_sample_once_per_epoch() {
        let mut o = Order::new(10, 3);
        let mut seen: Vec<usize> = (0..5).flat_map(|_| o.next(2)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let again: Vec<usize> = (0..5).flat_map(|_| Order::new(10, 3).next(2)).collect();
        assert_eq!(again.len(), 10);
        assert_eq!(Order::new(10, 3).next(4), Order::new(10, 3).next(4));
        assert_ne!(Order::new(10, 3).next(10), Order::new(10, 4).next(10));
    }

    #[test]
    fn cotangent_is_the_gradient_of_the_loss() {
        let outs = vec![("y".to_string(), vec![2, 3], vec![0.5f32, -1.0, 2.0, 0.25, 0.0, 1.5])];
        let t = vec![vec![0.4f32, -0.8, 1.0, 0.5, 0.1, 1.0]];
        let w = vec![vec![1.0f32, 1.0, 1.0, 0.0, 0.0, 0.0]];
        let (l0, c) = loss_and_cotangents(&outs, &t, &w, &[1.0]);
        for i in 0..6 {
            let mut o = outs.clone();
            o[0].2[i] += 1e-3;
            let (l1, _) = loss_and_cotangents(&o, &t, &w, &[1.0]);
            assert!(((l1 - l0) / 1e-3 - c[0][i] as f64).abs() < 1e-2, "element {i}");
        }
        assert_eq!(&c[0][3..], &[0.0, 0.0, 0.0]);
    }

    #[test]
    fn output_weights_scale_each_term_of_the_loss() {
        // Two outputs with relative errors 0.25 and 1: alike they average to 0.625; with
        // the second weighted 1/3 the loss is (0.25 + 1/3) / (4/3) = 0.4375, and its
        // cotangent shrinks by the same factor against the first's.
        let outs = vec![("a".to_string(), vec![1, 1], vec![1.0f32]), ("h".to_string(), vec![1, 1], vec![0.0f32])];
        let t = vec![vec![2.0f32], vec![1.0f32]];
        let w = vec![vec![1.0f32], vec![1.0f32]];
        let (alike, ca) = loss_and_cotangents(&outs, &t, &w, &[1.0, 1.0]);
        assert!((alike - 0.625).abs() < 1e-12, "{alike}");
        let (weighted, cw) = loss_and_cotangents(&outs, &t, &w, &[1.0, 1.0 / 3.0]);
        assert!((weighted - 0.4375).abs() < 1e-9, "{weighted}");
        let ratio = |c: &[Vec<f32>]| c[1][0] / c[0][0];
        assert!((ratio(&cw) / ratio(&ca) - 1.0 / 3.0).abs() < 1e-6);
        let (only_outputs, c0) = loss_and_cotangents(&outs, &t, &w, &[1.0, 0.0]);
        assert!((only_outputs - 0.25).abs() < 1e-12 && c0[1][0] == 0.0);
    }

    #[test]
    fn augmentation_replaces_only_interior_tokens_from_the_pool_and_mixes_float_inputs() {
        let ids = Tensor::from_i64_as(DType::I64, vec![2, 6], &[101, 5, 6, 7, 102, 0, 101, 8, 102, 0, 0, 0]);
        let mask = Tensor::from_i64_as(DType::I64, vec![2, 6], &[1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]);
        let x = Tensor::from_f64_as(DType::F32, vec![2, 2], &[0.0, 1.0, 10.0, 20.0]);
        let arrays = [("input_ids", ids), ("attention_mask", mask.clone()), ("x", x)];
        let mut batch =
            Batch { arrays: arrays.into_iter().map(|(k, t)| (k.to_string(), t)).collect(), labels: None, samples: 2 };
        assert_eq!(interior(&batch, &[2, 6]), vec![1, 2, 3, 7]);
        let pools: BTreeMap<String, Vec<i64>> = [("input_ids".to_string(), vec![900, 901])].into_iter().collect();
        augment(&mut batch, &pools, 0.999_999, &mut Rng::new(1));
        let got = batch.arrays["input_ids"].to_i64_vec();
        for (k, (&g, w)) in got.iter().zip([101, 5, 6, 7, 102, 0, 101, 8, 102, 0, 0, 0]).enumerate() {
            if [1, 2, 3, 7].contains(&k) {
                assert!(g == 900 || g == 901, "interior token {k} not replaced: {g}");
            } else {
                assert_eq!(g, w, "position {k} must stay");
            }
        }
        assert_eq!(batch.arrays["attention_mask"].to_i64_vec(), mask.to_i64_vec());
        let y = batch.arrays["x"].to_f64_vec();
        // Each sample moved toward the other, by less than `rate`.
        assert!(y[0] > 0.0 && y[0] < 10.0 && y[1] > 1.0 && y[1] < 20.0, "{y:?}");
        assert!(y[2] < 10.0 && y[2] > 0.0 && y[3] < 20.0 && y[3] > 1.0, "{y:?}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!(schedule(0, 100, 10) < schedule(9, 100, 10));
        assert_eq!(schedule(9, 100, 10), 1.0);
        assert!(schedule(99, 100, 10) < 1e-3);
        assert!(schedule(50, 100, 10) < schedule(20, 100, 10));
    }
}
