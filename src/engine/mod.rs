//! The compute engine: forward, reverse-mode gradients, per-sample Gram matrices, gate
//! gradients and Hessian-vector products of a model on a calibration batch.
//!
//! Phases: [`lower`] turns the shape-inferred IR into a straight-line [`program::Program`]
//! of primitives for one batch shape; [`autodiff`] appends its backward program in the same
//! primitives; a backend runs them — [`cpu`] (native, generic over f32/f64) or [`gpu`]
//! (WGSL compute shaders from `shaders/`, through wgpu). On top: [`gates`] (the masked model
//! and ∂L/∂gate per unit), [`gram`] (per-unit NTK Gram matrices from per-sample pieces,
//! layer by layer) and [`hvp`] (Hessian-vector products). Assumes `Session::analyze` ran.

pub mod autodiff;
pub mod cpu;
pub mod gates;
pub mod gpu;
pub mod gram;
pub mod hvp;
pub mod loss;
pub mod lower;
pub mod program;
pub mod syrk;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use cpu::{Arena, Real};
use lower::Lowered;
use program::Slot;

use crate::error::{Error, Result};
use crate::ir::{Id, Model};
use crate::tensor::Tensor;

/// Which backend runs the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A real (hardware) GPU adapter when present, else the CPU.
    Auto,
    Cpu,
    /// wgpu, software adapters included.
    Gpu,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<DeviceChoice> {
        match s {
            "auto" => Some(DeviceChoice::Auto),
            "cpu" => Some(DeviceChoice::Cpu),
            "gpu" => Some(DeviceChoice::Gpu),
            _ => None,
        }
    }
}

/// A lowered model plus its weights in the compute type.
pub struct Engine {
    pub lowered: Lowered,
}

/// Graph outputs in model order: (name, shape, data).
pub type Outputs<T> = Vec<(String, Vec<usize>, Vec<T>)>;

/// Weights by IR value id, in the compute type, shared with every run.
pub type Params<T> = BTreeMap<Id, Arc<Vec<T>>>;

/// Result of a forward (and optionally backward) run on the CPU.
pub struct Run<T> {
    /// Graph outputs in model order: (name, shape, data).
    pub outputs: Vec<(String, Vec<usize>, Vec<T>)>,
    /// Gradient of the loss w.r.t. each requested weight.
    pub grads: BTreeMap<Id, Vec<T>>,
    /// The loss value the seed function reported.
    pub loss: f64,
    /// The arena, holding the slots asked to be kept.
    pub arena: Arena<T>,
}

/// A forward program with its backward appended.
pub struct GradProgram {
    pub lowered: Lowered,
    pub grad: autodiff::Grad,
    /// Requested weights: value id → slot.
    pub wrt: BTreeMap<Id, Slot>,
}

impl Engine {
    /// Lowers `model` (shape-inferred for the batch shape it will run on).
    pub fn new(model: &Model) -> Result<Engine> {
        Ok(Engine { lowered: lower::lower(model)? })
    }

    /// The model's weights (those the program reads) converted to `T`.
    pub fn params<T: Real>(&self, model: &Model) -> Params<T> {
        self.lowered
            .params
            .keys()
            .map(|&id| {
                let t = model.value(id).data.as_ref().expect("weights have data");
                (id, Arc::new(tensor_to::<T>(t)))
            })
            .collect()
    }

    /// Forward only, on the CPU.
    pub fn forward<T: Real>(&self, inputs: &[(String, Tensor)], params: &Params<T>) -> Result<Outputs<T>> {
        let p = &self.lowered.program;
        let mut arena = Arena::new(p);
        feed(&self.lowered, &mut arena, inputs, params)?;
        let keep: HashSet<Slot> = self.lowered.outputs.iter().map(|(_, s)| *s).collect();
        let frees = cpu::plan_frees(p, 0..p.instrs.len(), &keep);
        arena.run(p, 0..p.instrs.len(), &frees)?;
        collect_outputs(&self.lowered, &arena)
    }

    /// Forward only, on the CPU, keeping the slots in `keep` (activations a caller reads).
    pub fn forward_keep<T: Real>(
        &self,
        inputs: &[(String, Tensor)],
        params: &Params<T>,
        keep: &HashSet<Slot>,
    ) -> Result<Arena<T>> {
        let p = &self.lowered.program;
        let mut arena = Arena::new(p);
        feed(&self.lowered, &mut arena, inputs, params)?;
        let frees = cpu::plan_frees(p, 0..p.instrs.len(), keep);
        arena.run(p, 0..p.instrs.len(), &frees)?;
        Ok(arena)
    }

    /// Builds the backward program for the gradient of the outputs w.r.t. `wrt` (weights).
    pub fn grad_program(&self, wrt: &[Id]) -> Result<GradProgram> {
        let mut lowered = self.lowered.clone();
        let wrt: BTreeMap<Id, Slot> = wrt.iter().filter_map(|id| lowered.params.get(id).map(|s| (*id, *s))).collect();
        let outs: Vec<Slot> = lowered.outputs.iter().map(|(_, s)| *s).collect();
        let slots: Vec<Slot> = wrt.values().copied().collect();
        let grad = autodiff::differentiate(&mut lowered.program, &outs, &slots)?;
        Ok(GradProgram { lowered, grad, wrt })
    }

    /// Every weight the program reads.
    pub fn all_params(&self) -> Vec<Id> {
        self.lowered.params.keys().copied().collect()
    }
}

impl GradProgram {
    /// Stores the seed's cotangents (one per differentiated output, each of its output's
    /// size) as the backward program's starting values.
    fn set_cotangents<T: Real>(&self, arena: &mut Arena<T>, cot: Vec<Vec<T>>) -> Result<()> {
        self.check_cotangents(&cot)?;
        for (&s, c) in self.grad.seeds.iter().zip(cot) {
            arena.set(s, c);
        }
        Ok(())
    }

    /// Checks that the seed gave one cotangent per differentiated output, each of its
    /// output's size.
    pub(crate) fn check_cotangents<T>(&self, cot: &[Vec<T>]) -> Result<()> {
        let p = &self.lowered.program;
        if cot.len() != self.grad.seeds.len() {
            return Err(Error::Other(format!(
                "engine: {} cotangents for {} outputs",
                cot.len(),
                self.grad.seeds.len()
            )));
        }
        for (&s, c) in self.grad.seeds.iter().zip(cot) {
            if c.len() != p.slots[s].numel() {
                return Err(Error::Other(format!(
                    "engine: cotangent of {} values for an output of {}",
                    c.len(),
                    p.slots[s].numel()
                )));
            }
        }
        Ok(())
    }

    /// Forward, then `seed(outputs)` → (loss, dL/d(output) per output), then backward.
    /// Slots in `keep` survive in the returned arena.
    pub fn run<T: Real>(
        &self,
        inputs: &[(String, Tensor)],
        params: &Params<T>,
        seed: impl FnOnce(&[(String, Vec<usize>, Vec<T>)]) -> Result<(f64, Vec<Vec<T>>)>,
        keep: &HashSet<Slot>,
    ) -> Result<Run<T>> {
        let p = &self.lowered.program;
        let nf = self.grad.n_forward;
        let mut arena = Arena::new(p);
        feed(&self.lowered, &mut arena, inputs, params)?;
        let mut keep_all = keep.clone();
        keep_all.extend(self.lowered.outputs.iter().map(|(_, s)| *s));
        keep_all.extend(self.grad.grads.values().copied());
        let frees = cpu::plan_frees(p, 0..p.instrs.len(), &keep_all);
        arena.run(p, 0..nf, &frees)?;
        let outputs = collect_outputs(&self.lowered, &arena)?;
        let (loss, cot) = seed(&outputs)?;
        self.set_cotangents(&mut arena, cot)?;
        arena.run(p, nf..p.instrs.len(), &frees)?;
        let mut grads = BTreeMap::new();
        for (&id, &s) in &self.wrt {
            let g = match self.grad.grads.get(&s) {
                Some(&gs) => arena.get(gs).map(|v| v.to_vec()).unwrap_or_default(),
                None => vec![T::zero(); p.slots[s].numel()],
            };
            grads.insert(id, g);
        }
        Ok(Run { outputs, grads, loss, arena })
    }
}

/// The forward half of a [`GradProgram`] run, kept for several backward passes from
/// different seeds (the NTK projections): the activations they read are computed once.
pub struct Forward<T> {
    /// Graph outputs in model order: (name, shape, data).
    pub outputs: Vec<(String, Vec<usize>, Vec<T>)>,
    arena: Arena<T>,
    /// The backward instructions that depend on the seed and that the wanted slots
    /// depend on, in program order.
    needed: Vec<usize>,
    frees: Vec<Vec<Slot>>,
}

impl GradProgram {
    /// The forward pass for [`GradProgram::backward`] passes that need only the slots in
    /// `want` (forward activations and backward gradients, e.g. the output gradients of
    /// the instructions reading the weights). The backward instructions that `want` does not
    /// depend on — the weight-gradient products among them, unless asked for — are never run.
    pub fn forward<T: Real>(
        &self,
        inputs: &[(String, Tensor)],
        params: &Params<T>,
        want: &HashSet<Slot>,
    ) -> Result<Forward<T>> {
        let p = &self.lowered.program;
        let nf = self.grad.n_forward;
        let mut live: HashSet<Slot> = want.clone();
        let mut needed = Vec::new();
        for i in (nf..p.instrs.len()).rev() {
            if live.contains(&p.instrs[i].out) {
                needed.push(i);
                live.extend(p.instrs[i].ins.iter().copied());
            }
        }
        needed.reverse();
        // Backward instructions that do not depend on the seed (transposed weights,
        // softmax and normalisation terms, ...) run once, here, for every backward pass.
        let mut seeded: HashSet<Slot> = self.grad.seeds.iter().copied().collect();
        let (mut once, mut per_seed) = (Vec::new(), Vec::new());
        for i in needed {
            let ins = &p.instrs[i];
            if ins.ins.iter().any(|s| seeded.contains(s)) {
                seeded.insert(ins.out);
                per_seed.push(i);
            } else {
                once.push(i);
            }
        }
        let mut keep = want.clone();
        keep.extend(self.lowered.outputs.iter().map(|(_, s)| *s));
        let order: Vec<usize> = (0..nf).chain(once.iter().copied()).chain(per_seed.iter().copied()).collect();
        let frees = cpu::plan_frees(p, order.iter().copied(), &keep);
        let mut arena = Arena::new(p);
        feed(&self.lowered, &mut arena, inputs, params)?;
        arena.run(p, 0..nf, &frees)?;
        let outputs = collect_outputs(&self.lowered, &arena)?;
        for &i in &once {
            arena.run(p, i..i + 1, &frees)?;
        }
        Ok(Forward { outputs, arena, needed: per_seed, frees })
    }

    /// One backward pass from `seed(outputs)` after [`GradProgram::forward`], on a copy of
    /// its arena (buffers shared, not copied): returns the loss and an arena holding the
    /// wanted slots.
    pub fn backward<T: Real>(
        &self,
        fwd: &Forward<T>,
        seed: impl FnOnce(&[(String, Vec<usize>, Vec<T>)]) -> Result<(f64, Vec<Vec<T>>)>,
    ) -> Result<(f64, Arena<T>)> {
        let p = &self.lowered.program;
        let (loss, cot) = seed(&fwd.outputs)?;
        let mut arena = Arena { bufs: fwd.arena.bufs.clone() };
        self.set_cotangents(&mut arena, cot)?;
        for &i in &fwd.needed {
            arena.run(p, i..i + 1, &fwd.frees)?;
        }
        Ok((loss, arena))
    }
}

pub fn tensor_to<T: Real>(t: &Tensor) -> Vec<T> {
    if t.dtype == crate::tensor::DType::F32 {
        t.bytes.chunks_exact(4).map(|b| T::c(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)).collect()
    } else {
        t.to_f64_vec().into_iter().map(T::c).collect()
    }
}

fn feed<T: Real>(l: &Lowered, arena: &mut Arena<T>, inputs: &[(String, Tensor)], params: &Params<T>) -> Result<()> {
    for (name, &slot) in &l.inputs {
        let t = inputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Other(format!("engine: no data for input '{name}'")))?;
        let want = l.program.shape(slot);
        if t.dims != want {
            return Err(Error::Other(format!(
                "engine: input '{name}' has shape {:?}, the program was built for {want:?}",
                t.dims
            )));
        }
        if !t.dtype.is_float() && t.to_i64_vec().iter().any(|&v| v.unsigned_abs() > 1 << 24) {
            return Err(Error::Other(format!("engine: integer input '{name}' has values beyond 2^24")));
        }
        arena.set(slot, tensor_to::<T>(t));
    }
    for (id, &slot) in &l.params {
        let v = params.get(id).ok_or_else(|| Error::Other(format!("engine: no value for weight slot {slot}")))?;
        if v.len() != l.program.slots[slot].numel() {
            return Err(Error::Other(format!(
                "engine: weight '{}' has {} values, expected {}",
                l.program.slots[slot].name,
                v.len(),
                l.program.slots[slot].numel()
            )));
        }
        arena.set_shared(slot, v.clone());
    }
    Ok(())
}

fn collect_outputs<T: Real>(l: &Lowered, arena: &Arena<T>) -> Result<Outputs<T>> {
    l.outputs
        .iter()
        .map(|(name, s)| {
            let shape = l.program.shape(*s).to_vec();
            let data = match arena.get(*s) {
                Some(d) => d.to_vec(),
                None => match &l.program.slots[*s].kind {
                    program::SlotKind::Const(d) => d.iter().map(|&x| T::c(x)).collect(),
                    _ => return Err(Error::Other(format!("engine: output '{name}' was not computed"))),
                },
            };
            Ok((name.clone(), shape, data))
        })
        .collect()
}
