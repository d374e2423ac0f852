//! The calibration probe shared by every data-driven criterion: the model lowered by the
//! compute engine for the calibration batch, its gradient program over every tensor a
//! unit touches, the dense outputs, and the objective the gradients are taken of.
//!
//! Objective (docs/method.md, "Loss on calibration data"): the scored output is the
//! model's first output. When it is logits (`[n, C]`, C ≥ 2, produced by Gemm, MatMul or
//! Add), the loss is cross-entropy against the labels of the calibration file if it has
//! any, else against the dense model's own argmax (hard pseudo-labels, so gradients are not
//! zero at the dense weights). Any other output (embeddings, hidden states, feature maps)
//! gets 0.5·mean (f − f_dense)², whose gradient *is* zero at the dense weights: there the
//! first-order criteria (taylor, snip, grasp, fisher) take their gradients of the NTK
//! projections s_j(x) = ⟨r_j, f(x)⟩/√dim f instead (see [`Probe::signals`]), so no criterion
//! is degenerate.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::super::engine::gpu::Device;
use super::super::engine::{gates, loss, Engine, GradProgram, Params};
use crate::calib::Batch;
use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::pipeline::Context;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::units::UnitGroup;

/// What gradients are taken of.
#[derive(Clone, Debug)]
pub enum Objective {
    /// Mean cross-entropy of the logits against labels (`pseudo`: the dense argmax).
    CrossEntropy { labels: Vec<usize>, pseudo: bool },
    /// 0.5 · mean (f − target)², target the dense output.
    MseToDense { target: Vec<f64> },
}

impl Objective {
    pub fn describe(&self) -> &'static str {
        match self {
            Objective::CrossEntropy { pseudo: false, .. } => "cross-entropy (labels)",
            Objective::CrossEntropy { pseudo: true, .. } => "cross-entropy (dense argmax pseudo-labels)",
            Objective::MseToDense { .. } => "mse to the dense output",
        }
    }

    /// Zero residual at the dense weights (the Hessian is then the Gauss-Newton matrix).
    pub fn zero_residual_at_dense(&self) -> bool {
        matches!(self, Objective::MseToDense { .. })
    }

    /// The objective restricted to sample `s` of a batch whose samples hold `per` values.
    fn sample(&self, s: usize, per: usize) -> Objective {
        match self {
            Objective::CrossEntropy { labels, pseudo } => {
                Objective::CrossEntropy { labels: vec![labels[s]], pseudo: *pseudo }
            }
            Objective::MseToDense { target } => {
                Objective::MseToDense { target: target[s * per..(s + 1) * per].to_vec() }
            }
        }
    }
}

/// A scalar function of the outputs whose gradient a criterion uses.
#[derive(Clone, Debug)]
pub enum Signal {
    Loss,
    /// Σ over samples of ⟨r, f(x)⟩/√dim f on the scored output.
    Projection(Vec<f64>),
}

impl Signal {
    /// The seed function of this signal: `objective` for the loss, else the projection.
    pub fn seed<T: crate::engine::cpu::Real>(
        &self,
        objective: &Objective,
        output: usize,
        outs: &loss::Outputs<T>,
    ) -> Result<(f64, Vec<Vec<T>>)> {
        match self {
            Signal::Loss => Probe::seed(objective, output, outs),
            Signal::Projection(r) => loss::projection(outs, output, r),
        }
    }
}

/// A model lowered for one batch size, with its gradient program.
pub struct Lowering {
    pub model: Model,
    pub engine: Engine,
    pub gp: GradProgram,
}

impl Lowering {
    fn new(model: &Model, shapes: &BTreeMap<String, Vec<usize>>, wrt: &[Id], criterion: &str) -> Result<Lowering> {
        let mut m = model.clone();
        crate::passes::infer_shapes::infer(&mut m, shapes)?;
        let engine = Engine::new(&m).map_err(|e| {
            Error::Other(format!(
                "criterion '{criterion}' runs the model on the compute engine, which cannot lower it: {e} \
                 (--criterion magnitude or random need no engine)"
            ))
        })?;
        let gp = engine.grad_program(wrt)?;
        Ok(Lowering { model: m, engine, gp })
    }
}

pub struct Probe {
    pub low: Lowering,
    pub inputs: Vec<(String, Tensor)>,
    pub batch: Batch,
    pub n: usize,
    /// Index of the scored output, and the values per sample it holds.
    pub output: usize,
    pub per_sample: usize,
    pub objective: Objective,
    /// Dense (ungated) weights in f32, every weight the program reads.
    pub base: Params<f32>,
    /// Tensors units touch (slices and owned tensors).
    pub unit_tensors: Vec<Id>,
    pub groups: Vec<UnitGroup>,
    /// Held-out calibration samples (the next n of the file, when it has them) and their
    /// objective: the gate's epochs are chosen on these.
    pub val: Option<(Vec<(String, Tensor)>, Objective)>,
    /// The backend the forward and backward passes run on (f64 finite-difference HVPs
    /// always run on the CPU).
    pub device: Device,
    /// Lazily lowered batch-1 program for per-sample criteria.
    single: Option<Lowering>,
    name: String,
}

impl Probe {
    /// Sets up the probe on (at most) `n` calibration samples; without `--calib`, `n`
    /// synthetic samples and a warning that scores depend on data.
    pub fn new(cx: &mut Context, model: &Model, n: usize) -> Result<Probe> {
        Probe::on(cx, model, n, Device::Cpu)
    }

    /// [`Probe::new`] with the passes on `device`.
    pub fn on(cx: &mut Context, model: &Model, n: usize, device: Device) -> Result<Probe> {
        let criterion = cx.config.criterion.name();
        let mut val_batch = None;
        let batch = match cx.inputs.as_ref() {
            Some(b) => {
                if b.samples >= 2 * n {
                    val_batch = Some(b.range(n, 2 * n));
                }
                b.take(n)
            }
            None => {
                cx.warn(format!(
                    "criterion '{criterion}' scored on {n} synthetic inputs (no --calib): scores depend on data; \
                     pass --calib data.npz for meaningful ones"
                ));
                let mut shapes = cx.input_shapes.clone();
                shapes.values_mut().for_each(|d| {
                    if let Some(b) = d.first_mut() {
                        *b = n;
                    }
                });
                crate::calib::synthetic(model, &shapes, cx.config.seed ^ 0x5EED)
            }
        };
        let n = batch.samples;
        let shapes: BTreeMap<String, Vec<usize>> =
            batch.arrays.iter().map(|(k, t)| (k.clone(), t.dims.clone())).collect();
        let mut unit_tensors: BTreeSet<Id> = BTreeSet::new();
        for g in &cx.groups {
            unit_tensors.extend(g.slices.iter().map(|s| s.tensor));
            unit_tensors.extend(g.owned.iter().flatten().copied());
        }
        let unit_tensors: Vec<Id> = unit_tensors.into_iter().collect();
        let low = Lowering::new(model, &shapes, &unit_tensors, criterion)?;
        let base: Params<f32> = low.engine.params(&low.model);
        let inputs = batch.ordered(&low.model);
        let dense = low.engine.forward_on(&device, &inputs, &base)?;
        let (oname, oshape, oval) = dense.first().ok_or_else(|| Error::Other("the model has no outputs".into()))?;
        let per_sample = oval.len() / n.max(1);
        let logits = is_logits(model, oname, oshape);
        let objective = objective_for(&batch, logits, oshape, oval, n);
        let val = match val_batch {
            Some(vb) => {
                let vin = vb.ordered(&low.model);
                let vout = low.engine.forward_on(&device, &vin, &base)?;
                let obj = objective_for(&vb, logits, &vout[0].1, &vout[0].2, n);
                Some((vin, obj))
            }
            None => None,
        };
        Ok(Probe {
            low,
            inputs,
            batch,
            n,
            output: 0,
            per_sample,
            objective,
            base,
            unit_tensors,
            groups: cx.groups.clone(),
            val,
            device,
            single: None,
            name: criterion.to_string(),
        })
    }

    /// The objective's value at `gates` on the held-out samples (None without any).
    pub fn val_loss(&self, gates: &[Vec<f64>]) -> Result<Option<f64>> {
        let Some((inputs, obj)) = &self.val else { return Ok(None) };
        let outs = self.low.engine.forward_on(&self.device, inputs, &self.gated(gates))?;
        Ok(Some(Probe::seed(obj, self.output, &outs)?.0))
    }
}

/// Whether output `name` of shape `shape` is class logits: `[n, C]`, C ≥ 2, made by a
/// Gemm, MatMul or Add.
pub fn is_logits(model: &Model, name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && shape[1] >= 2
        && model
            .value_id(name)
            .and_then(|v| model.producer(v))
            .is_some_and(|(op, _)| matches!(model.op(op).op_type.as_str(), "Gemm" | "MatMul" | "Add"))
}

/// Cross-entropy against the labels (or the dense argmax) for logits; else MSE to dense.
fn objective_for(batch: &Batch, logits: bool, oshape: &[usize], oval: &[f32], n: usize) -> Objective {
    let labels: Option<Vec<usize>> =
        batch.labels.as_ref().map(|l| l.to_i64_vec().into_iter().map(|v| v.max(0) as usize).collect());
    if logits {
        match labels {
            Some(labels) => Objective::CrossEntropy { labels, pseudo: false },
            None => {
                let c = oshape[1];
                let labels = (0..n)
                    .map(|s| {
                        let row = &oval[s * c..(s + 1) * c];
                        (0..c).fold(0, |b, j| if row[j] > row[b] { j } else { b })
                    })
                    .collect();
                Objective::CrossEntropy { labels, pseudo: true }
            }
        }
    } else {
        Objective::MseToDense { target: oval.iter().map(|&v| v as f64).collect() }
    }
}

impl Probe {
    /// The loss seed of `objective` on the scored output.
    pub fn seed<T: crate::engine::cpu::Real>(
        objective: &Objective,
        output: usize,
        outs: &loss::Outputs<T>,
    ) -> Result<(f64, Vec<Vec<T>>)> {
        match objective {
            Objective::CrossEntropy { labels, .. } => loss::cross_entropy(outs, output, labels),
            Objective::MseToDense { target } => loss::mse(outs, output, target),
        }
    }

    /// The weights with unit gates applied (gate 1 everywhere = the dense weights).
    pub fn gated(&self, gates: &[Vec<f64>]) -> Params<f32> {
        gates::gated_params(&self.low.model, &self.base, &self.groups, gates)
    }

    /// Loss and ∂L/∂gate per unit at `gates` (the masked model when gates are 0/1).
    pub fn gate_gradients(&self, gates: &[Vec<f64>]) -> Result<(f64, Vec<Vec<f64>>)> {
        let params = self.gated(gates);
        let seed = |o: &loss::Outputs<f32>| Probe::seed(&self.objective, self.output, o);
        let (loss, grads) = match &self.device {
            // ∂L/∂gate needs the gradients of the gated (consumer) tensors only: the
            // backward skips the other unit tensors' weight-gradient products.
            Device::Cpu => {
                let gp = &self.low.gp;
                let slots: BTreeMap<Id, usize> = gates::gated_tensors(&self.groups)
                    .into_iter()
                    .filter_map(|t| gp.wrt.get(&t).and_then(|s| gp.grad.grads.get(s)).map(|&g| (t, g)))
                    .collect();
                let want: HashSet<usize> = slots.values().copied().collect();
                let fwd = gp.forward::<f32>(&self.inputs, &params, &want)?;
                let (loss, arena) = gp.backward(&fwd, seed)?;
                let grads = slots.iter().filter_map(|(&t, &g)| arena.get(g).map(|v| (t, v.to_vec()))).collect();
                (loss, grads)
            }
            Device::Gpu(_) => {
                let run = self.low.gp.run_on(&self.device, &self.inputs, &params, seed, &HashSet::new())?;
                (run.loss, run.grads)
            }
        };
        let g = gates::gate_gradients(&self.low.model, &self.base, &self.groups, gates, &grads);
        Ok((loss, g))
    }

    /// The gradient signals of the first-order criteria: the loss where it is not flat at
    /// the dense weights, else `k` Gaussian projections of the output (seeded).
    pub fn signals(&self, k: usize, seed: u64) -> Vec<Signal> {
        match self.objective {
            Objective::CrossEntropy { .. } => vec![Signal::Loss],
            Objective::MseToDense { .. } => {
                gaussian_projections(k, self.per_sample, seed).into_iter().map(Signal::Projection).collect()
            }
        }
    }

    /// Batch gradients of `signal` w.r.t. every unit tensor, at `params`.
    pub fn grads(&self, params: &Params<f32>, signal: &Signal) -> Result<BTreeMap<Id, Vec<f32>>> {
        let run = self.low.gp.run_on(
            &self.device,
            &self.inputs,
            params,
            |o| signal.seed(&self.objective, self.output, o),
            &HashSet::new(),
        )?;
        Ok(run.grads)
    }

    /// ∂signal/∂gate per unit for each sample separately (batch-1 runs of the same model).
    pub fn per_sample_gate_gradients(&mut self, gates: &[Vec<f64>], signal: &Signal) -> Result<Vec<Vec<Vec<f64>>>> {
        if self.single.is_none() {
            let shapes: BTreeMap<String, Vec<usize>> = self
                .batch
                .arrays
                .iter()
                .map(|(k, t)| {
                    let mut d = t.dims.clone();
                    d[0] = 1;
                    (k.clone(), d)
                })
                .collect();
            self.single = Some(Lowering::new(&self.low.model, &shapes, &self.unit_tensors, &self.name)?);
        }
        let one = self.single.as_ref().expect("lowered");
        let params = self.gated(gates);
        let mut out = Vec::with_capacity(self.n);
        for s in 0..self.n {
            let inputs: Vec<(String, Tensor)> = self.inputs.iter().map(|(k, t)| (k.clone(), t.take(0, &[s]))).collect();
            let obj = self.objective.sample(s, self.per_sample);
            let run = one.gp.run_on(
                &self.device,
                &inputs,
                &params,
                |o| signal.seed(&obj, self.output, o),
                &HashSet::new(),
            )?;
            out.push(gates::gate_gradients(&one.model, &self.base, &self.groups, gates, &run.grads));
        }
        Ok(out)
    }
}

/// `k` vectors of `dim` standard normal values (Box–Muller on the crate's SplitMix64).
pub fn gaussian_projections(k: usize, dim: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::new(seed ^ 0x0123_4567_89AB_CDEF);
    (0..k)
        .map(|_| {
            (0..dim)
                .map(|_| {
                    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
                    let u2 = rng.next_f64();
                    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
                })
                .collect()
        })
        .collect()
}
