//! Lowering: a shape-inferred IR `Model` → a straight-line [`Program`] of primitives for one
//! concrete batch shape.
//!
//! Assumes `passes::infer_shapes` ran, so every live value has a concrete `shape` and small
//! constant subgraphs (Shape → Gather → Concat → Reshape, Range, ConstantOfShape) are folded
//! into `Value::folded`. Any op whose outputs are all known at compile time becomes a
//! constant slot, which is how shape subgraphs disappear from the program. Only ops that
//! feed a graph output are lowered. Weights become `Param` slots (the engine can replace
//! them: gates, perturbations); composite ops (LayerNorm, BatchNorm, Softmax, Gelu, Gemm,
//! Conv as im2col + matmul) are expanded into primitives here, so autodiff and kernels
//! never see them. An op without a rule is an `Error::Node` naming it.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::program::{BinaryOp, PoolKind, Prim, Program, ReduceOp, RowOp, Slot, SlotKind, UnaryOp, Window};
use crate::error::{Error, Result};
use crate::ir::{Id, Model, Op, ValueKind};
use crate::tensor::Tensor;

/// A lowered forward program and how it connects to the model.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub program: Program,
    /// Graph input name → slot.
    pub inputs: BTreeMap<String, Slot>,
    /// Graph outputs in model order: (name, slot).
    pub outputs: Vec<(String, Slot)>,
    /// Weight value id → slot.
    pub params: BTreeMap<Id, Slot>,
    /// IR value id → slot, for every lowered value (for per-layer lookups and debugging).
    pub values: BTreeMap<Id, Slot>,
}

struct Cx<'a> {
    model: &'a Model,
    p: Program,
    map: BTreeMap<Id, Slot>,
    params: BTreeMap<Id, Slot>,
    inputs: BTreeMap<String, Slot>,
}

fn node_err(op: &Op, msg: impl Into<String>) -> Error {
    Error::Node {
        path: Path::new("<model>").to_path_buf(),
        node: op.name.clone(),
        op: op.op_type.clone(),
        msg: msg.into(),
    }
}

fn tensor_f64(t: &Tensor) -> Vec<f64> {
    t.to_f64_vec()
}

/// Lowers the ops that the graph outputs depend on.
pub fn lower(model: &Model) -> Result<Lowered> {
    let order = model.topo_order().map_err(Error::Other)?;
    // Liveness: ops that some graph output depends on.
    let mut live: HashSet<Id> = HashSet::new();
    let mut stack: Vec<Id> = model.outputs.clone();
    let mut seen: HashSet<Id> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if model.value(v).known().is_some() && model.value(v).kind != ValueKind::Weight {
            continue;
        }
        if let Some((op, _)) = model.producer(v) {
            if live.insert(op) {
                stack.extend(model.inputs(op).into_iter().flatten());
            }
        }
    }
    let (gelus, fused_away) = erf_gelu_chains(model, &live);
    let mut cx =
        Cx { model, p: Program::default(), map: BTreeMap::new(), params: BTreeMap::new(), inputs: BTreeMap::new() };
    for &i in &model.inputs {
        let v = model.value(i);
        let shape = v.shape.clone().ok_or_else(|| Error::Other(format!("input '{}' has no concrete shape", v.name)))?;
        let s = cx.p.add_slot(shape, SlotKind::Input(v.name.clone()), v.name.clone());
        cx.map.insert(i, s);
        cx.inputs.insert(v.name.clone(), s);
    }
    for op_id in order {
        if !live.contains(&op_id) {
            continue;
        }
        let outs = model.outputs(op_id);
        if outs.iter().all(|&o| model.value(o).known().is_some()) {
            for o in outs {
                let t = model.value(o).known().expect("checked");
                let s = cx.p.constant(t.dims.clone(), tensor_f64(t));
                cx.map.insert(o, s);
            }
            continue;
        }
        if fused_away.contains(&op_id) {
            continue;
        }
        if let Some(&x) = gelus.get(&op_id) {
            let xs = cx.slot(x)?;
            let name = model.op(op_id).name.clone();
            let y = cx.p.unary(UnaryOp::Gelu, xs, &name);
            cx.set(op_id, 0, y);
            continue;
        }
        lower_op(&mut cx, op_id)?;
    }
    let mut outputs = Vec::new();
    for &o in &model.outputs {
        let s = cx.slot(o)?;
        outputs.push((model.value(o).name.clone(), s));
    }
    Ok(Lowered { program: cx.p, inputs: cx.inputs, outputs, params: cx.params, values: cx.map })
}

/// The exact GELU as exporters write it, x·0.5·(1 + erf(x/√2)): Div(x, √2) or Mul(x, 1/√2)
/// → Erf → Add 1 → Mul by x → Mul by 0.5 (or 0.5 applied to x first). Returns, for the op
/// that ends each such chain, the chain's input x, and the set of the chain's other ops;
/// only chains whose intermediate values have one reader and are not graph outputs qualify,
/// so nothing else can observe the values that fusion removes.
fn erf_gelu_chains(model: &Model, live: &HashSet<Id>) -> (BTreeMap<Id, Id>, HashSet<Id>) {
    let scalar = |v: Option<Id>| -> Option<f64> {
        let t = model.value(v?).known()?;
        let d = t.to_f64_vec();
        (d.len() == 1).then(|| d[0])
    };
    let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() <= 1e-4 * b.abs());
    // The single live consumer of an op's only output, if that output is private.
    let sole = |op: Id| -> Option<(Id, usize)> {
        let outs = model.outputs(op);
        if outs.len() != 1 || model.is_graph_output(outs[0]) {
            return None;
        }
        match model.consumers(outs[0]).as_slice() {
            [(c, k)] if live.contains(c) => Some((*c, *k)),
            _ => None,
        }
    };
    let is = |op: Id, t: &str| model.op(op).op_type == t && matches!(model.op(op).domain.as_str(), "" | "ai.onnx");
    // The other operand of a binary op reached through input slot k.
    let other = |op: Id, k: usize| model.input(op, 1 - k);
    let mut ends = BTreeMap::new();
    let mut inner = HashSet::new();
    for &erf in live {
        if !is(erf, "Erf") {
            continue;
        }
        let chain = (|| -> Option<(Id, Id, [Id; 4])> {
            let (scale, _) = model.producer(model.input(erf, 0)?)?;
            let x = model.input(scale, 0)?;
            let sc = scalar(model.input(scale, 1));
            let ok = (is(scale, "Div") && near(sc, std::f64::consts::SQRT_2))
                || (is(scale, "Mul") && near(sc, std::f64::consts::FRAC_1_SQRT_2));
            if !ok || sole(scale)?.0 != erf {
                return None;
            }
            let (add, k) = sole(erf)?;
            if !is(add, "Add") || !near(scalar(other(add, k)), 1.0) {
                return None;
            }
            let (m1, k1) = sole(add)?;
            if !is(m1, "Mul") {
                return None;
            }
            let o1 = other(m1, k1)?;
            if o1 == x {
                // (x · (1 + erf)) · 0.5
                let (m2, k2) = sole(m1)?;
                (is(m2, "Mul") && near(scalar(other(m2, k2)), 0.5)).then_some((m2, x, [scale, erf, add, m1]))
            } else {
                // (0.5 · x) · (1 + erf), where 0.5 · x has no other reader than m1
                let (half, _) = model.producer(o1)?;
                let hx = [model.input(half, 0)?, model.input(half, 1)?];
                let ok = is(half, "Mul")
                    && sole(half)?.0 == m1
                    && ((hx[0] == x && near(scalar(Some(hx[1])), 0.5))
                        || (hx[1] == x && near(scalar(Some(hx[0])), 0.5)));
                ok.then_some((m1, x, [scale, erf, add, half]))
            }
        })();
        if let Some((end, x, ops)) = chain {
            ends.insert(end, x);
            inner.extend(ops);
        }
    }
    (ends, inner)
}

impl<'a> Cx<'a> {
    /// The slot of a value, creating Param/Const slots for static values on first use.
    fn slot(&mut self, v: Id) -> Result<Slot> {
        if let Some(&s) = self.map.get(&v) {
            return Ok(s);
        }
        let val = self.model.value(v);
        let s = if let (ValueKind::Weight, Some(t)) = (val.kind, val.data.as_ref()) {
            let s = self.p.add_slot(t.dims.clone(), SlotKind::Param(v), val.name.clone());
            self.params.insert(v, s);
            s
        } else if let Some(t) = val.known() {
            let s = self.p.constant(t.dims.clone(), tensor_f64(t));
            self.p.slots[s].name = val.name.clone();
            s
        } else {
            return Err(Error::Other(format!("value '{}' is used before it is computed", val.name)));
        };
        self.map.insert(v, s);
        Ok(s)
    }

    fn input(&mut self, op: Id, slot: usize) -> Result<Slot> {
        let o = self.model.op(op);
        let v = self.model.input(op, slot).ok_or_else(|| node_err(o, format!("input {slot} is missing")))?;
        self.slot(v)
    }

    fn opt_input(&mut self, op: Id, slot: usize) -> Result<Option<Slot>> {
        match self.model.input(op, slot) {
            Some(v) => Ok(Some(self.slot(v)?)),
            None => Ok(None),
        }
    }

    /// Compile-time integers of an input (axes, pads, starts...).
    fn ints(&self, op: Id, slot: usize) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.model.input(op, slot) else { return Ok(None) };
        match self.model.value(v).known() {
            Some(t) => Ok(Some(t.to_i64_vec())),
            None => Err(node_err(self.model.op(op), format!("input {slot} must be known at compile time"))),
        }
    }

    fn floats(&self, op: Id, slot: usize) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.model.input(op, slot) else { return Ok(None) };
        match self.model.value(v).known() {
            Some(t) => Ok(Some(t.to_f64_vec())),
            None => Err(node_err(self.model.op(op), format!("input {slot} must be known at compile time"))),
        }
    }

    fn out_shape(&self, op: Id, slot: usize) -> Result<Vec<usize>> {
        let v = self.model.output(op, slot);
        self.model
            .value(v)
            .shape
            .clone()
            .ok_or_else(|| node_err(self.model.op(op), format!("output {slot} has no inferred shape")))
    }

    fn set(&mut self, op: Id, slot: usize, s: Slot) {
        let v = self.model.output(op, slot);
        self.map.insert(v, s);
    }

    fn shape(&self, s: Slot) -> Vec<usize> {
        self.p.shape(s).to_vec()
    }
}

fn norm_axis(axis: i64, rank: usize, op: &Op) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank.max(1) {
        return Err(node_err(op, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

fn lower_op(cx: &mut Cx, id: Id) -> Result<()> {
    let op = cx.model.op(id).clone();
    let name = op.name.clone();
    let n = name.as_str();
    let opset = cx.model.opsets.get("").copied().or_else(|| cx.model.opsets.get("ai.onnx").copied()).unwrap_or(17);
    if op.domain == "com.microsoft" {
        return lower_microsoft(cx, id, &op);
    }
    if !matches!(op.domain.as_str(), "" | "ai.onnx") {
        return Err(node_err(&op, format!("the compute engine does not support ops of domain '{}'", op.domain)));
    }
    let t = op.op_type.as_str();
    let unary = |u: UnaryOp| Some(u);
    let un = match t {
        "Neg" => unary(UnaryOp::Neg),
        "Exp" => unary(UnaryOp::Exp),
        "Log" => unary(UnaryOp::Log),
        "Sqrt" => unary(UnaryOp::Sqrt),
        "Reciprocal" => unary(UnaryOp::Recip),
        "Erf" => unary(UnaryOp::Erf),
        "Tanh" => unary(UnaryOp::Tanh),
        "Sigmoid" => unary(UnaryOp::Sigmoid),
        "Relu" => unary(UnaryOp::Relu),
        "Abs" => unary(UnaryOp::Abs),
        "Floor" => unary(UnaryOp::Floor),
        "Ceil" => unary(UnaryOp::Ceil),
        "Not" => unary(UnaryOp::Not),
        "IsNaN" => unary(UnaryOp::IsNaN),
        "IsInf" => unary(UnaryOp::IsInf(op.attr_i("detect_positive", 1) != 0, op.attr_i("detect_negative", 1) != 0)),
        "HardSigmoid" => unary(UnaryOp::HardSigmoid(op.attr_f("alpha", 0.2), op.attr_f("beta", 0.5))),
        _ => None,
    };
    if let Some(u) = un {
        let x = cx.input(id, 0)?;
        let y = cx.p.unary(u, x, n);
        cx.set(id, 0, y);
        return Ok(());
    }
    let bin = match t {
        "Add" | "Sum" => Some(BinaryOp::Add),
        "Sub" => Some(BinaryOp::Sub),
        "Mul" => Some(BinaryOp::Mul),
        "Div" => Some(BinaryOp::Div),
        "Pow" => Some(BinaryOp::Pow),
        "Max" => Some(BinaryOp::Max),
        "Min" => Some(BinaryOp::Min),
        "Equal" => Some(BinaryOp::Equal),
        "Less" => Some(BinaryOp::Less),
        "Greater" => Some(BinaryOp::Greater),
        "LessOrEqual" => Some(BinaryOp::LessEq),
        "GreaterOrEqual" => Some(BinaryOp::GreaterEq),
        "And" => Some(BinaryOp::And),
        "Or" => Some(BinaryOp::Or),
        "Xor" => Some(BinaryOp::Xor),
        _ => None,
    };
    if let Some(b) = bin {
        let nin = cx.model.inputs(id).len();
        let mut acc = cx.input(id, 0)?;
        for k in 1..nin.max(2) {
            let x = cx.input(id, k)?;
            acc = cx.p.binary(b, acc, x, n);
        }
        let int_out = cx.model.value(cx.model.output(id, 0)).dtype.is_some_and(|d| !d.is_float());
        if b == BinaryOp::Div && int_out {
            acc = cx.p.unary(UnaryOp::Trunc, acc, n);
        }
        let want = cx.out_shape(id, 0)?;
        let acc = cx.p.reshape(acc, want, n);
        cx.set(id, 0, acc);
        return Ok(());
    }
    match t {
        "Identity" | "Dropout" | "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => {
            if t == "Dropout"
                && cx.model.outputs(id).len() > 1
                && !cx.model.consumers(cx.model.output(id, 1)).is_empty()
            {
                return Err(node_err(&op, "the Dropout mask output is not supported"));
            }
            let x = cx.input(id, 0)?;
            let s = cx.out_shape(id, 0)?;
            let y = cx.p.push(Prim::Copy, vec![x], s, n);
            cx.set(id, 0, y);
        }
        "Cast" => {
            let x = cx.input(id, 0)?;
            let to = crate::tensor::DType::from_onnx(op.attr_i("to", 1) as i32);
            let from = cx.model.input(id, 0).and_then(|v| cx.model.value(v).dtype);
            let y = match (from, to) {
                (_, Some(crate::tensor::DType::Bool)) => cx.p.unary(UnaryOp::NonZero, x, n),
                (Some(f), Some(d)) if f.is_float() && !d.is_float() => cx.p.unary(UnaryOp::Trunc, x, n),
                _ => {
                    let s = cx.shape(x);
                    cx.p.push(Prim::Copy, vec![x], s, n)
                }
            };
            cx.set(id, 0, y);
        }
        "Clip" => {
            let x = cx.input(id, 0)?;
            let (lo, hi) = if opset >= 11 {
                let lo = cx.floats(id, 1)?.map(|v| v[0]).unwrap_or(f64::NEG_INFINITY);
                let hi = cx.floats(id, 2)?.map(|v| v[0]).unwrap_or(f64::INFINITY);
                (lo, hi)
            } else {
                (op.attr_f("min", f32::NEG_INFINITY) as f64, op.attr_f("max", f32::INFINITY) as f64)
            };
            let y = cx.p.unary(UnaryOp::Clip(lo as f32, hi as f32), x, n);
            cx.set(id, 0, y);
        }
        "HardSwish" => {
            let x = cx.input(id, 0)?;
            let h = cx.p.unary(UnaryOp::HardSigmoid(1.0 / 6.0, 0.5), x, n);
            let y = cx.p.binary(BinaryOp::Mul, x, h, n);
            cx.set(id, 0, y);
        }
        "Gelu" => {
            let x = cx.input(id, 0)?;
            let y = if op.attr_str("approximate") == Some("tanh") {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let x2 = cx.p.binary(BinaryOp::Mul, x, x, n);
                let x3 = cx.p.binary(BinaryOp::Mul, x2, x, n);
                let c = cx.p.unary(UnaryOp::Affine(0.044715, 0.0), x3, n);
                let inner = cx.p.binary(BinaryOp::Add, x, c, n);
                let s = cx.p.unary(UnaryOp::Affine((2.0 / std::f64::consts::PI).sqrt() as f32, 0.0), inner, n);
                let th = cx.p.unary(UnaryOp::Tanh, s, n);
                let h = cx.p.unary(UnaryOp::Affine(0.5, 0.5), th, n);
                cx.p.binary(BinaryOp::Mul, x, h, n)
            } else {
                cx.p.unary(UnaryOp::Gelu, x, n)
            };
            cx.set(id, 0, y);
        }
        "Where" => {
            let c = cx.input(id, 0)?;
            let a = cx.input(id, 1)?;
            let b = cx.input(id, 2)?;
            let s = cx.out_shape(id, 0)?;
            let y = cx.p.push(Prim::Where, vec![c, a, b], s, n);
            cx.set(id, 0, y);
        }
        "Expand" => {
            let x = cx.input(id, 0)?;
            let s = cx.out_shape(id, 0)?;
            let y = if cx.shape(x) == s { x } else { cx.p.push(Prim::Broadcast, vec![x], s, n) };
            cx.set(id, 0, y);
        }
        "ConstantOfShape" => {
            let s = cx.out_shape(id, 0)?;
            let v = match op.attr("value") {
                Some(crate::ir::Attr::Tensor(t)) if t.numel() == 1 => t.get_f64(0),
                _ => 0.0,
            };
            let c = cx.p.scalar(v);
            let y = cx.p.push(Prim::Broadcast, vec![c], s, n);
            cx.set(id, 0, y);
        }
        "Shape" => {
            let x = cx.input(id, 0)?;
            let dims: Vec<f64> = cx.shape(x).iter().map(|&d| d as f64).collect();
            let r = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let st = clampi(op.attr_i("start", 0));
            let en = clampi(op.attr_i("end", r));
            let d = dims[st..en.max(st)].to_vec();
            let y = cx.p.constant(vec![d.len()], d);
            cx.set(id, 0, y);
        }
        "Softmax" | "LogSoftmax" => {
            let x = cx.input(id, 0)?;
            let r = cx.shape(x).len();
            let axes: Vec<usize> = if opset >= 13 {
                vec![norm_axis(op.attr_i("axis", -1), r, &op)?]
            } else {
                (norm_axis(op.attr_i("axis", 1), r, &op)?..r).collect()
            };
            let y = softmax(&mut cx.p, x, &axes, t == "LogSoftmax", n);
            cx.set(id, 0, y);
        }
        "LayerNormalization" => {
            let x = cx.input(id, 0)?;
            let scale = cx.input(id, 1)?;
            let bias = cx.opt_input(id, 2)?;
            let r = cx.shape(x).len();
            let a = norm_axis(op.attr_i("axis", -1), r, &op)?;
            let axes: Vec<usize> = (a..r).collect();
            let eps = op.attr_f("epsilon", 1e-5);
            let outs = cx.model.outputs(id).len();
            let y = if outs == 1 && axes == [r - 1] {
                // Over the last axis, without the optional mean / inv-std outputs: one fused
                // row-wise primitive.
                let s = cx.shape(x).to_vec();
                cx.p.push(Prim::Rows(RowOp::Normalize(eps)), vec![x], s, n)
            } else {
                let (y, mean, inv) = layer_norm(&mut cx.p, x, &axes, eps, n);
                if outs > 1 {
                    cx.set(id, 1, mean);
                }
                if outs > 2 {
                    cx.set(id, 2, inv);
                }
                y
            };
            let mut y = cx.p.binary(BinaryOp::Mul, y, scale, n);
            if let Some(b) = bias {
                y = cx.p.binary(BinaryOp::Add, y, b, n);
            }
            cx.set(id, 0, y);
        }
        "BatchNormalization" => {
            if op.attr_i("training_mode", 0) != 0 {
                return Err(node_err(&op, "training-mode BatchNormalization is not supported"));
            }
            let x = cx.input(id, 0)?;
            let xs = cx.shape(x);
            let c = xs.get(1).copied().unwrap_or(1);
            let mut pshape = vec![c];
            pshape.extend(std::iter::repeat_n(1, xs.len().saturating_sub(2)));
            let eps = op.attr_f("epsilon", 1e-5);
            let scale = cx.input(id, 1)?;
            let bias = cx.input(id, 2)?;
            let mean = cx.input(id, 3)?;
            let var = cx.input(id, 4)?;
            let ve = cx.p.unary(UnaryOp::Affine(1.0, eps), var, n);
            let sd = cx.p.unary(UnaryOp::Sqrt, ve, n);
            let inv = cx.p.unary(UnaryOp::Recip, sd, n);
            let a = cx.p.binary(BinaryOp::Mul, scale, inv, n);
            let a = cx.p.reshape(a, pshape.clone(), n);
            let m = cx.p.reshape(mean, pshape.clone(), n);
            let b = cx.p.reshape(bias, pshape, n);
            let d = cx.p.binary(BinaryOp::Sub, x, m, n);
            let y = cx.p.binary(BinaryOp::Mul, d, a, n);
            let y = cx.p.binary(BinaryOp::Add, y, b, n);
            cx.set(id, 0, y);
        }
        "MatMul" => {
            let a = cx.input(id, 0)?;
            let b = cx.input(id, 1)?;
            let want = cx.out_shape(id, 0)?;
            let y = matmul(&mut cx.p, a, b, false, false, n);
            let y = cx.p.reshape(y, want, n);
            cx.set(id, 0, y);
        }
        "Gemm" => {
            let a = cx.input(id, 0)?;
            let b = cx.input(id, 1)?;
            let ta = op.attr_i("transA", 0) != 0;
            let tb = op.attr_i("transB", 0) != 0;
            let mut y = matmul(&mut cx.p, a, b, ta, tb, n);
            let alpha = op.attr_f("alpha", 1.0);
            if alpha != 1.0 {
                y = cx.p.unary(UnaryOp::Affine(alpha, 0.0), y, n);
            }
            if let Some(c) = cx.opt_input(id, 2)? {
                let beta = op.attr_f("beta", 1.0);
                let c = if beta != 1.0 { cx.p.unary(UnaryOp::Affine(beta, 0.0), c, n) } else { c };
                y = cx.p.binary(BinaryOp::Add, y, c, n);
            }
            cx.set(id, 0, y);
        }
        "Conv" => {
            let y = conv(cx, id, &op)?;
            cx.set(id, 0, y);
        }
        "MaxPool" | "AveragePool" => {
            if cx.model.outputs(id).len() > 1 && !cx.model.consumers(cx.model.output(id, 1)).is_empty() {
                return Err(node_err(&op, "the MaxPool indices output is not supported"));
            }
            let x = cx.input(id, 0)?;
            let xs = cx.shape(x);
            let ys = cx.out_shape(id, 0)?;
            let kernel = op.attr_ints("kernel_shape").ok_or_else(|| node_err(&op, "kernel_shape is missing"))?.to_vec();
            let (x4, w) = window(&op, &xs, &ys, &kernel)?;
            let xin = cx.p.reshape(x, x4.to_vec(), n);
            let kind = if t == "MaxPool" {
                PoolKind::Max
            } else {
                PoolKind::Avg { count_pad: op.attr_i("count_include_pad", 0) != 0 }
            };
            let y = cx.p.push(Prim::Pool(kind, w.clone()), vec![xin], vec![x4[0], x4[1], w.output[0], w.output[1]], n);
            let y = cx.p.reshape(y, ys, n);
            cx.set(id, 0, y);
        }
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let x = cx.input(id, 0)?;
            let r = cx.shape(x).len();
            let rop = if t == "GlobalAveragePool" { ReduceOp::Mean } else { ReduceOp::Max };
            let y = reduce(&mut cx.p, rop, x, &(2..r).collect::<Vec<_>>(), n);
            cx.set(id, 0, y);
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceL2" | "ReduceSumSquare" => {
            let x = cx.input(id, 0)?;
            let r = cx.shape(x).len();
            let axes_in =
                if op.attr_ints("axes").is_some() { op.attr_ints("axes").map(|a| a.to_vec()) } else { cx.ints(id, 1)? };
            let axes: Vec<usize> = match axes_in {
                Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(a, r, &op)).collect::<Result<_>>()?,
                _ if op.attr_i("noop_with_empty_axes", 0) != 0 => vec![],
                _ => (0..r).collect(),
            };
            let want = cx.out_shape(id, 0)?;
            let y = match t {
                "ReduceMean" => reduce(&mut cx.p, ReduceOp::Mean, x, &axes, n),
                "ReduceSum" => reduce(&mut cx.p, ReduceOp::Sum, x, &axes, n),
                "ReduceMax" => reduce(&mut cx.p, ReduceOp::Max, x, &axes, n),
                "ReduceMin" => reduce(&mut cx.p, ReduceOp::Min, x, &axes, n),
                _ => {
                    let sq = cx.p.binary(BinaryOp::Mul, x, x, n);
                    let s = reduce(&mut cx.p, ReduceOp::Sum, sq, &axes, n);
                    if t == "ReduceL2" {
                        cx.p.unary(UnaryOp::Sqrt, s, n)
                    } else {
                        s
                    }
                }
            };
            let y = cx.p.reshape(y, want, n);
            cx.set(id, 0, y);
        }
        "Transpose" => {
            let x = cx.input(id, 0)?;
            let r = cx.shape(x).len();
            let perm: Vec<usize> = match op.attr_ints("perm") {
                Some(p) => p.iter().map(|&a| a as usize).collect(),
                None => (0..r).rev().collect(),
            };
            let s = cx.out_shape(id, 0)?;
            let y = cx.p.push(Prim::Transpose { perm }, vec![x], s, n);
            cx.set(id, 0, y);
        }
        "Concat" => {
            let ins: Vec<Slot> = (0..cx.model.inputs(id).len()).map(|k| cx.input(id, k)).collect::<Result<_>>()?;
            let r = cx.shape(ins[0]).len();
            let axis = norm_axis(op.attr_i("axis", 0), r, &op)?;
            let s = cx.out_shape(id, 0)?;
            let ins: Vec<Slot> = ins.into_iter().filter(|&i| cx.p.shape(i)[axis] > 0).collect();
            let y = cx.p.push(Prim::Concat { axis }, ins, s, n);
            cx.set(id, 0, y);
        }
        "Slice" => {
            let x = cx.input(id, 0)?;
            let xs = cx.shape(x);
            let r = xs.len();
            let (starts, ends, axes, steps) = if opset >= 10 {
                (
                    cx.ints(id, 1)?.unwrap_or_default(),
                    cx.ints(id, 2)?.unwrap_or_default(),
                    cx.ints(id, 3)?,
                    cx.ints(id, 4)?,
                )
            } else {
                let g = |k: &str| op.attr_ints(k).map(|v| v.to_vec());
                (g("starts").unwrap_or_default(), g("ends").unwrap_or_default(), g("axes"), None)
            };
            let _ = ends;
            let axes: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| norm_axis(a, r, &op)).collect::<Result<_>>()?,
                None => (0..starts.len()).collect(),
            };
            let steps = steps.unwrap_or_else(|| vec![1; axes.len()]);
            let mut st = vec![0usize; r];
            let mut sp = vec![1isize; r];
            for (k, &a) in axes.iter().enumerate() {
                let d = xs[a] as i64;
                let step = steps[k];
                if step == 0 {
                    return Err(node_err(&op, "a Slice step is 0"));
                }
                let mut s0 = starts[k];
                if s0 < 0 {
                    s0 += d;
                }
                s0 = if step > 0 { s0.clamp(0, d) } else { s0.clamp(0, d - 1) };
                st[a] = s0 as usize;
                sp[a] = step as isize;
            }
            let s = cx.out_shape(id, 0)?;
            let y = cx.p.push(Prim::Slice { starts: st, steps: sp }, vec![x], s, n);
            cx.set(id, 0, y);
        }
        "Split" => {
            let x = cx.input(id, 0)?;
            let r = cx.shape(x).len();
            let axis = norm_axis(op.attr_i("axis", 0), r, &op)?;
            let mut off = 0;
            for k in 0..cx.model.outputs(id).len() {
                let s = cx.out_shape(id, k)?;
                let mut st = vec![0; r];
                st[axis] = off;
                off += s[axis];
                let y = cx.p.push(Prim::Slice { starts: st, steps: vec![1; r] }, vec![x], s, n);
                cx.set(id, k, y);
            }
        }
        "Pad" => {
            let x = cx.input(id, 0)?;
            let xs = cx.shape(x);
            let r = xs.len();
            let mode = op.attr_str("mode").unwrap_or("constant");
            if mode != "constant" {
                return Err(node_err(&op, format!("Pad mode '{mode}' is not supported (only constant)")));
            }
            let (pads, value, axes) = if opset >= 11 {
                (cx.ints(id, 1)?.unwrap_or_default(), cx.floats(id, 2)?.map(|v| v[0]).unwrap_or(0.0), cx.ints(id, 3)?)
            } else {
                (op.attr_ints("pads").unwrap_or(&[]).to_vec(), op.attr_f("value", 0.0) as f64, None)
            };
            let axes: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| norm_axis(a, r, &op)).collect::<Result<_>>()?,
                None => (0..r).collect(),
            };
            if pads.len() != 2 * axes.len() {
                return Err(node_err(&op, format!("pads has {} values for {} axes", pads.len(), axes.len())));
            }
            let mut begin = vec![0i64; r];
            let mut end = vec![0i64; r];
            for (k, &a) in axes.iter().enumerate() {
                begin[a] = pads[k];
                end[a] = pads[k + axes.len()];
            }
            let mut cur = x;
            if begin.iter().chain(&end).any(|&p| p < 0) {
                let st: Vec<usize> = begin.iter().map(|&b| (-b).max(0) as usize).collect();
                let sh: Vec<usize> =
                    (0..r).map(|i| (xs[i] as i64 + begin[i].min(0) + end[i].min(0)).max(0) as usize).collect();
                cur = cx.p.push(Prim::Slice { starts: st, steps: vec![1; r] }, vec![cur], sh, n);
            }
            let s = cx.out_shape(id, 0)?;
            let st: Vec<usize> = begin.iter().map(|&b| b.max(0) as usize).collect();
            let y = cx.p.push(Prim::Embed { starts: st, steps: vec![1; r], fill: value as f32 }, vec![cur], s, n);
            cx.set(id, 0, y);
        }
        "Gather" | "GatherElements" => {
            let d = cx.input(id, 0)?;
            let i = cx.input(id, 1)?;
            let axis = norm_axis(op.attr_i("axis", 0), cx.shape(d).len(), &op)?;
            let s = cx.out_shape(id, 0)?;
            let prim = if op.op_type == "Gather" { Prim::Gather { axis } } else { Prim::GatherElements { axis } };
            let y = cx.p.push(prim, vec![d, i], s, n);
            cx.set(id, 0, y);
        }
        "ScatterElements" => {
            let d = cx.input(id, 0)?;
            let i = cx.input(id, 1)?;
            let u = cx.input(id, 2)?;
            let axis = norm_axis(op.attr_i("axis", 0), cx.shape(d).len(), &op)?;
            let add = match op.attr_str("reduction").unwrap_or("none") {
                "none" => false,
                "add" => true,
                other => return Err(node_err(&op, format!("ScatterElements reduction '{other}' is not supported"))),
            };
            let s = cx.shape(d);
            let y = cx.p.push(Prim::ScatterElements { axis, add }, vec![d, i, u], s, n);
            cx.set(id, 0, y);
        }
        "ArgMax" | "ArgMin" => {
            let x = cx.input(id, 0)?;
            let mut s = cx.shape(x);
            let axis = norm_axis(op.attr_i("axis", 0), s.len(), &op)?;
            s[axis] = 1;
            let y = cx.p.push(
                Prim::ArgMax { axis, select_last: op.attr_i("select_last_index", 0) != 0, min: t == "ArgMin" },
                vec![x],
                s,
                n,
            );
            let want = cx.out_shape(id, 0)?;
            let y = cx.p.reshape(y, want, n);
            cx.set(id, 0, y);
        }
        "TopK" => {
            let x = cx.input(id, 0)?;
            let mut s = cx.shape(x);
            let axis = norm_axis(op.attr_i("axis", -1), s.len(), &op)?;
            let k = match cx.ints(id, 1)? {
                Some(v) if v.len() == 1 && v[0] >= 0 => v[0] as usize,
                _ => op.attr_i("k", -1).max(0) as usize,
            };
            s[axis] = k;
            let idx =
                cx.p.push(Prim::TopKIndices { axis, k, largest: op.attr_i("largest", 1) != 0 }, vec![x], s.clone(), n);
            let vals = cx.p.push(Prim::GatherElements { axis }, vec![x, idx], s, n);
            cx.set(id, 0, vals);
            if cx.model.outputs(id).len() > 1 {
                cx.set(id, 1, idx);
            }
        }
        "Einsum" => {
            let eq = op.attr_str("equation").ok_or_else(|| node_err(&op, "equation is missing"))?.replace(' ', "");
            let ins: Vec<Slot> = (0..cx.model.inputs(id).len()).map(|k| cx.input(id, k)).collect::<Result<_>>()?;
            let want = cx.out_shape(id, 0)?;
            let y = einsum(&mut cx.p, &eq, &ins, n).map_err(|m| node_err(&op, m))?;
            let y = cx.p.reshape(y, want, n);
            cx.set(id, 0, y);
        }
        "Attention" => lower_onnx_attention(cx, id, &op)?,
        "DequantizeLinear" => {
            let x = cx.input(id, 0)?;
            let scale = cx.input(id, 1)?;
            let zp = cx.opt_input(id, 2)?;
            let xs = cx.shape(x);
            if op.attr_i("block_size", 0) != 0 {
                return Err(node_err(&op, "blocked DequantizeLinear is not supported"));
            }
            // Per-axis parameters are 1-D along `axis`: reshape them to broadcast there.
            let per_axis = |cx: &mut Cx, t: Slot| -> Result<Slot> {
                if cx.p.shape(t).iter().product::<usize>() <= 1 {
                    return Ok(t);
                }
                let a = norm_axis(op.attr_i("axis", 1), xs.len(), &op)?;
                let mut sh = vec![1; xs.len()];
                sh[a] = xs[a];
                Ok(cx.p.reshape(t, sh, n))
            };
            let scale = per_axis(cx, scale)?;
            let mut y = x;
            if let Some(z) = zp {
                let z = per_axis(cx, z)?;
                y = cx.p.binary(BinaryOp::Sub, y, z, n);
            }
            let y = cx.p.binary(BinaryOp::Mul, y, scale, n);
            cx.set(id, 0, y);
        }
        _ => {
            return Err(node_err(&op, format!("the compute engine has no lowering for {}", op.op_type)));
        }
    }
    Ok(())
}

/// Reduction keeping the reduced axes (size 1).
pub fn reduce(p: &mut Program, op: ReduceOp, x: Slot, axes: &[usize], node: &str) -> Slot {
    let mut s = p.shape(x).to_vec();
    for &a in axes {
        s[a] = 1;
    }
    p.push(Prim::Reduce { op, axes: axes.to_vec() }, vec![x], s, node)
}

fn softmax(p: &mut Program, x: Slot, axes: &[usize], log: bool, n: &str) -> Slot {
    let r = p.shape(x).len();
    if !log && axes == [r.wrapping_sub(1)] {
        // Over the last axis (attention, routers): one fused row-wise primitive.
        let s = p.shape(x).to_vec();
        return p.push(Prim::Rows(RowOp::Softmax), vec![x], s, n);
    }
    let m = reduce(p, ReduceOp::Max, x, axes, n);
    // The max only stabilises: the result does not depend on it.
    p.instrs.last_mut().expect("just pushed").stop_grad = true;
    let d = p.binary(BinaryOp::Sub, x, m, n);
    let e = p.unary(UnaryOp::Exp, d, n);
    let s = reduce(p, ReduceOp::Sum, e, axes, n);
    if log {
        let l = p.unary(UnaryOp::Log, s, n);
        p.binary(BinaryOp::Sub, d, l, n)
    } else {
        p.binary(BinaryOp::Div, e, s, n)
    }
}

/// Normalises over `axes`: returns (normalised x, mean, 1/std).
fn layer_norm(p: &mut Program, x: Slot, axes: &[usize], eps: f32, n: &str) -> (Slot, Slot, Slot) {
    let mean = reduce(p, ReduceOp::Mean, x, axes, n);
    let d = p.binary(BinaryOp::Sub, x, mean, n);
    let sq = p.binary(BinaryOp::Mul, d, d, n);
    let var = reduce(p, ReduceOp::Mean, sq, axes, n);
    let ve = p.unary(UnaryOp::Affine(1.0, eps), var, n);
    let sd = p.unary(UnaryOp::Sqrt, ve, n);
    let inv = p.unary(UnaryOp::Recip, sd, n);
    (p.binary(BinaryOp::Mul, d, inv, n), mean, inv)
}

/// ONNX MatMul semantics (1-D operands promoted, batch dims broadcast) with optional
/// transposes of the last two axes. A 2-D right operand folds the left operand's batch
/// into its rows, so the weight gradient is one GEMM.
pub fn matmul(p: &mut Program, a: Slot, b: Slot, ta: bool, tb: bool, n: &str) -> Slot {
    let mut a_s = p.shape(a).to_vec();
    let mut b_s = p.shape(b).to_vec();
    let (mut a, mut b) = (a, b);
    let a1 = a_s.len() == 1;
    let b1 = b_s.len() == 1;
    if a1 {
        a_s.insert(0, 1);
        a = p.reshape(a, a_s.clone(), n);
    }
    if b1 {
        b_s.push(1);
        b = p.reshape(b, b_s.clone(), n);
    }
    let (m, k) = if ta { (a_s[a_s.len() - 1], a_s[a_s.len() - 2]) } else { (a_s[a_s.len() - 2], a_s[a_s.len() - 1]) };
    let nn = if tb { b_s[b_s.len() - 2] } else { b_s[b_s.len() - 1] };
    let _ = k;
    let y = if b_s.len() == 2 && a_s.len() > 2 && !ta {
        let rows: usize = a_s[..a_s.len() - 1].iter().product();
        let a2 = p.reshape(a, vec![rows, a_s[a_s.len() - 1]], n);
        let y = p.push(Prim::MatMul { ta, tb }, vec![a2, b], vec![rows, nn], n);
        let mut ys = a_s[..a_s.len() - 1].to_vec();
        ys.push(nn);
        p.reshape(y, ys, n)
    } else {
        let batch = super::program::broadcast_shapes(&a_s[..a_s.len() - 2], &b_s[..b_s.len() - 2]).unwrap_or_default();
        let mut ys = batch;
        ys.push(m);
        ys.push(nn);
        p.push(Prim::MatMul { ta, tb }, vec![a, b], ys, n)
    };
    let mut ys = p.shape(y).to_vec();
    if b1 {
        ys.pop();
    }
    if a1 {
        let l = ys.len();
        ys.remove(l - if b1 { 1 } else { 2 });
    }
    p.reshape(y, ys, n)
}

/// Window geometry of a conv or pool, as 2-D (1-D ops get H = 1). Returns the 4-D input
/// shape and the window.
pub(crate) fn window(op: &Op, xs: &[usize], ys: &[usize], kernel: &[i64]) -> Result<([usize; 4], Window)> {
    let sr = xs.len().saturating_sub(2);
    if !(1..=2).contains(&sr) || kernel.len() != sr {
        return Err(node_err(op, format!("only 1-D and 2-D windows are supported (input rank {})", xs.len())));
    }
    let get = |name: &str, default: i64| -> Vec<i64> {
        op.attr_ints(name).map(|v| v.to_vec()).unwrap_or_else(|| vec![default; sr])
    };
    let strides = get("strides", 1);
    let dil = get("dilations", 1);
    let auto = op.attr_str("auto_pad").unwrap_or("NOTSET");
    let mut pads = op.attr_ints("pads").map(|v| v.to_vec()).unwrap_or_else(|| vec![0; 2 * sr]);
    if auto == "SAME_UPPER" || auto == "SAME_LOWER" {
        for i in 0..sr {
            let total = ((ys[2 + i] as i64 - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - xs[2 + i] as i64).max(0);
            let small = total / 2;
            pads[i] = if auto == "SAME_UPPER" { small } else { total - small };
        }
    } else if auto == "VALID" {
        pads = vec![0; 2 * sr];
    }
    let lift = |v: &[i64], d: usize| -> [usize; 2] {
        if sr == 1 {
            [d, v[0] as usize]
        } else {
            [v[0] as usize, v[1] as usize]
        }
    };
    let x4 = if sr == 1 { [xs[0], xs[1], 1, xs[2]] } else { [xs[0], xs[1], xs[2], xs[3]] };
    let out = if sr == 1 { [1, ys[2]] } else { [ys[2], ys[3]] };
    Ok((
        x4,
        Window {
            kernel: lift(kernel, 1),
            stride: lift(&strides, 1),
            dilation: lift(&dil, 1),
            pad: lift(&pads[..sr], 0),
            input: x4,
            output: out,
        },
    ))
}

/// Conv as im2col + (grouped) matmul: cols [g, C/g·kh·kw, N·L] and W [g, O/g, C/g·kh·kw]
/// give [g, O/g, N·L], transposed to [N, O, OH, OW].
fn conv(cx: &mut Cx, id: Id, op: &Op) -> Result<Slot> {
    let n = op.name.as_str();
    let x = cx.input(id, 0)?;
    let w = cx.input(id, 1)?;
    let b = cx.opt_input(id, 2)?;
    let xs = cx.shape(x);
    let ws = cx.shape(w);
    let ys = cx.out_shape(id, 0)?;
    let kernel: Vec<i64> = ws[2..].iter().map(|&d| d as i64).collect();
    let (x4, win) = window(op, &xs, &ys, &kernel)?;
    let g = op.attr_i("group", 1).max(1) as usize;
    let (nb, c) = (x4[0], x4[1]);
    let o = ws[0];
    if c % g != 0 || !o.is_multiple_of(g) || ws[1] != c / g {
        return Err(node_err(op, format!("weight {ws:?} does not match {c} input channels in {g} groups")));
    }
    let l = win.output[0] * win.output[1];
    let ck = (c / g) * win.kernel[0] * win.kernel[1];
    let xin = cx.p.reshape(x, x4.to_vec(), n);
    let cols = cx.p.push(Prim::Im2Col(win.clone()), vec![xin], vec![c * win.kernel[0] * win.kernel[1], nb, l], n);
    let cols = cx.p.reshape(cols, vec![g, ck, nb * l], n);
    let w3 = cx.p.reshape(w, vec![g, o / g, ck], n);
    let y = cx.p.push(Prim::MatMul { ta: false, tb: false }, vec![w3, cols], vec![g, o / g, nb * l], n);
    let y = cx.p.reshape(y, vec![o, nb, win.output[0], win.output[1]], n);
    let mut y =
        cx.p.push(Prim::Transpose { perm: vec![1, 0, 2, 3] }, vec![y], vec![nb, o, win.output[0], win.output[1]], n);
    if let Some(b) = b {
        let b3 = cx.p.reshape(b, vec![o, 1, 1], n);
        y = cx.p.binary(BinaryOp::Add, y, b3, n);
    }
    Ok(cx.p.reshape(y, ys, n))
}

/// Einsum with one or two operands, lowered to transposes, reductions and one batched
/// matmul: letters are batch (both operands and output), contracted (both, not output),
/// or free (one operand and output); letters in one operand only and not in the output are
/// summed first. No ellipsis, no repeated letters within an operand.
fn einsum(p: &mut Program, eq: &str, ins: &[Slot], n: &str) -> std::result::Result<Slot, String> {
    let (lhs, out) = eq.split_once("->").ok_or("only explicit einsum equations ('...->...') are supported")?;
    let terms: Vec<Vec<char>> = lhs.split(',').map(|s| s.chars().collect()).collect();
    let out: Vec<char> = out.chars().collect();
    if terms.len() != ins.len() || terms.is_empty() || terms.len() > 2 || eq.contains('.') {
        return Err(format!("einsum '{eq}' is not supported (one or two operands, no ellipsis)"));
    }
    let mut dims: BTreeMap<char, usize> = BTreeMap::new();
    for (t, &s) in terms.iter().zip(ins) {
        let sh = p.shape(s).to_vec();
        if sh.len() != t.len() {
            return Err(format!("operand rank {} does not match '{}'", sh.len(), t.iter().collect::<String>()));
        }
        let mut u = t.clone();
        u.sort();
        u.dedup();
        if u.len() != t.len() {
            return Err("repeated letters within an operand are not supported".into());
        }
        for (c, d) in t.iter().zip(sh) {
            dims.insert(*c, d);
        }
    }
    // Sum letters that appear in one operand only and not in the output.
    let mut ops: Vec<(Slot, Vec<char>)> = Vec::new();
    for (k, t) in terms.iter().enumerate() {
        let other: Vec<char> = terms.iter().enumerate().filter(|(j, _)| *j != k).flat_map(|(_, t)| t.clone()).collect();
        let axes: Vec<usize> = (0..t.len()).filter(|&i| !out.contains(&t[i]) && !other.contains(&t[i])).collect();
        let mut s = ins[k];
        let mut letters = t.clone();
        if !axes.is_empty() {
            s = reduce(p, ReduceOp::Sum, s, &axes, n);
            letters = t.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, c)| *c).collect();
            let sh: Vec<usize> = letters.iter().map(|c| dims[c]).collect();
            s = p.reshape(s, sh, n);
        }
        ops.push((s, letters));
    }
    let permute = |p: &mut Program, s: Slot, from: &[char], to: &[char]| -> Slot {
        let perm: Vec<usize> = to.iter().map(|c| from.iter().position(|x| x == c).expect("letter")).collect();
        if perm.iter().enumerate().all(|(i, &q)| i == q) {
            return s;
        }
        let sh: Vec<usize> = to.iter().map(|c| dims[c]).collect();
        p.push(Prim::Transpose { perm }, vec![s], sh, n)
    };
    if ops.len() == 1 {
        let (s, l) = &ops[0];
        return Ok(permute(p, *s, l, &out));
    }
    let (a, la) = ops[0].clone();
    let (b, lb) = ops[1].clone();
    let batch: Vec<char> = la.iter().filter(|c| lb.contains(c) && out.contains(c)).copied().collect();
    let contr: Vec<char> = la.iter().filter(|c| lb.contains(c) && !out.contains(c)).copied().collect();
    let fa: Vec<char> = la.iter().filter(|c| !lb.contains(c)).copied().collect();
    let fb: Vec<char> = lb.iter().filter(|c| !la.contains(c)).copied().collect();
    let prod = |cs: &[char]| cs.iter().map(|c| dims[c]).product::<usize>();
    let (bb, m, k, nn) = (prod(&batch), prod(&fa), prod(&contr), prod(&fb));
    let a_order: Vec<char> = batch.iter().chain(&fa).chain(&contr).copied().collect();
    let b_order: Vec<char> = batch.iter().chain(&contr).chain(&fb).copied().collect();
    let a2 = permute(p, a, &la, &a_order);
    let a2 = p.reshape(a2, vec![bb, m, k], n);
    let b2 = permute(p, b, &lb, &b_order);
    let b2 = p.reshape(b2, vec![bb, k, nn], n);
    let y = p.push(Prim::MatMul { ta: false, tb: false }, vec![a2, b2], vec![bb, m, nn], n);
    let y_order: Vec<char> = batch.iter().chain(&fa).chain(&fb).copied().collect();
    let y = p.reshape(y, y_order.iter().map(|c| dims[c]).collect(), n);
    if y_order.len() != out.len() {
        return Err(format!("einsum '{eq}': output letters do not match the operands"));
    }
    Ok(permute(p, y, &y_order, &out))
}

/// Errors unless the optional inputs `slots` of `op` are all omitted and its outputs after
/// the first are unused (caches, QK products: not lowered).
fn only_main_io(cx: &Cx, id: Id, op: &Op, slots: std::ops::Range<usize>) -> Result<()> {
    for slot in slots {
        if cx.model.input(id, slot).is_some() {
            return Err(node_err(op, format!("input {slot} (mask, bias, cache or position data) is not supported")));
        }
    }
    for v in cx.model.outputs(id).into_iter().skip(1) {
        if !cx.model.consumers(v).is_empty() || cx.model.is_graph_output(v) {
            return Err(node_err(
                op,
                format!("output '{}' (cache or QK product) is not supported", cx.model.value(v).name),
            ));
        }
    }
    Ok(())
}

/// `[B, S, H·D]` → `[B, H, S, D]`.
fn to_heads(p: &mut Program, x: Slot, heads: usize, n: &str) -> Slot {
    let s = p.shape(x).to_vec();
    let d = s[2] / heads.max(1);
    let x4 = p.reshape(x, vec![s[0], s[1], heads, d], n);
    p.push(Prim::Transpose { perm: vec![0, 2, 1, 3] }, vec![x4], vec![s[0], heads, s[1], d], n)
}

/// `[B, H, S, D]` → `[B, S, H·D]`.
fn from_heads(p: &mut Program, y: Slot, n: &str) -> Slot {
    let s = p.shape(y).to_vec();
    let t = p.push(Prim::Transpose { perm: vec![0, 2, 1, 3] }, vec![y], vec![s[0], s[2], s[1], s[3]], n);
    p.reshape(t, vec![s[0], s[2], s[1] * s[3]], n)
}

/// softmax(q·kᵀ·scale (+ causal mask))·v for q `[B, Hq, S, D]`, k `[B, Hkv, T, D]`, v
/// `[B, Hkv, T, Dv]`; query head h reads KV head ⌊h / (Hq/Hkv)⌋ (grouped-query attention).
/// With `causal = Some(offset)`, query i sees keys j ≤ i + offset (the others get −1e30,
/// whose exp is exactly 0).
fn sdpa(p: &mut Program, q: Slot, k: Slot, v: Slot, scale: f64, causal: Option<usize>, n: &str) -> Slot {
    let (qs, ks, vs) = (p.shape(q).to_vec(), p.shape(k).to_vec(), p.shape(v).to_vec());
    let (b, hq, s, d) = (qs[0], qs[1], qs[2], qs[3]);
    let (hkv, t, dv) = (ks[1], ks[2], vs[3]);
    let r = hq / hkv.max(1);
    let qg = p.reshape(q, vec![b, hkv, r * s, d], n);
    let sc = matmul(p, qg, k, false, true, n);
    let sc = p.unary(UnaryOp::Affine(scale as f32, 0.0), sc, n);
    let mut sc = p.reshape(sc, vec![b, hkv, r, s, t], n);
    if let Some(off) = causal {
        let m: Vec<f64> = (0..s).flat_map(|i| (0..t).map(move |j| if j <= i + off { 0.0 } else { -1e30 })).collect();
        let mask = p.constant(vec![s, t], m);
        sc = p.binary(BinaryOp::Add, sc, mask, n);
    }
    let pr = softmax(p, sc, &[4], false, n);
    let pr = p.reshape(pr, vec![b, hkv, r * s, t], n);
    let y = matmul(p, pr, v, false, false, n);
    p.reshape(y, vec![b, hq, s, dv], n)
}

fn heads_attr(op: &Op, name: &str) -> Result<usize> {
    match op.attr_i(name, 0) {
        h if h > 0 => Ok(h as usize),
        _ => Err(node_err(op, format!("attribute {name} is missing or not positive"))),
    }
}

fn attention_scale(op: &Op, head_size: usize) -> f64 {
    match op.attr("scale") {
        Some(_) if op.attr_f("scale", 0.0) != 0.0 => op.attr_f("scale", 0.0) as f64,
        _ => 1.0 / (head_size.max(1) as f64).sqrt(),
    }
}

/// ONNX `Attention` (opset 23) without mask, cache or softcap: 3-D inputs split into heads
/// by `q_num_heads`/`kv_num_heads`, or 4-D `[B, H, S, D]` inputs; `is_causal` is the
/// upper-left aligned lower-triangular mask.
fn lower_onnx_attention(cx: &mut Cx, id: Id, op: &Op) -> Result<()> {
    let n = op.name.as_str();
    only_main_io(cx, id, op, 3..8)?;
    if op.attr_f("softcap", 0.0) != 0.0 {
        return Err(node_err(op, "softcap is not supported"));
    }
    let (q, k, v) = (cx.input(id, 0)?, cx.input(id, 1)?, cx.input(id, 2)?);
    let three = cx.shape(q).len() == 3;
    let (q, k, v) = if three {
        let (hq, hkv) = (heads_attr(op, "q_num_heads")?, heads_attr(op, "kv_num_heads")?);
        (to_heads(&mut cx.p, q, hq, n), to_heads(&mut cx.p, k, hkv, n), to_heads(&mut cx.p, v, hkv, n))
    } else {
        (q, k, v)
    };
    let d = cx.shape(q)[3];
    let causal = (op.attr_i("is_causal", 0) != 0).then_some(0);
    let mut y = sdpa(&mut cx.p, q, k, v, attention_scale(op, d), causal, n);
    if three {
        y = from_heads(&mut cx.p, y, n);
    }
    let want = cx.out_shape(id, 0)?;
    let y = cx.p.reshape(y, want, n);
    cx.set(id, 0, y);
    Ok(())
}

/// `[.., c]` → the last-axis range `start .. start + len`.
fn last_axis_slice(p: &mut Program, x: Slot, start: usize, len: usize, n: &str) -> Slot {
    let mut sh = p.shape(x).to_vec();
    let r = sh.len();
    let mut starts = vec![0; r];
    starts[r - 1] = start;
    sh[r - 1] = len;
    p.push(Prim::Slice { starts, steps: vec![1; r] }, vec![x], sh, n)
}

/// com.microsoft ops, as onnxruntime's ContribOperators.md defines them, in their plain
/// forms: `Attention` (packed QKV projection inside the op; no mask, cache or rotary),
/// `MultiHeadAttention` (separate 3-D Q/K/V, optional packed bias), `GroupQueryAttention`
/// (prompt without cache or padding: seqlens_k must be known and equal to T − 1) and
/// `MoE` (softmax over the router logits, top-k, optional renormalisation, per-expert
/// FFN with relu/gelu (tanh form)/silu/identity, weighted sum).
fn lower_microsoft(cx: &mut Cx, id: Id, op: &Op) -> Result<()> {
    let n = op.name.as_str();
    let y = match op.op_type.as_str() {
        "Attention" => {
            only_main_io(cx, id, op, 3..8)?;
            if op.attr_i("do_rotary", 0) != 0 {
                return Err(node_err(op, "rotary embeddings are not supported"));
            }
            let heads = heads_attr(op, "num_heads")?;
            let x = cx.input(id, 0)?;
            let w = cx.input(id, 1)?;
            let total = cx.shape(w)[1];
            let sizes: Vec<usize> = match op.attr_ints("qkv_hidden_sizes") {
                Some(h) => h.iter().map(|&v| v.max(0) as usize).collect(),
                None => vec![total / 3; 3],
            };
            let mut qkv = matmul(&mut cx.p, x, w, false, false, n);
            if let Some(b) = cx.opt_input(id, 2)? {
                qkv = cx.p.binary(BinaryOp::Add, qkv, b, n);
            }
            let q = last_axis_slice(&mut cx.p, qkv, 0, sizes[0], n);
            let k = last_axis_slice(&mut cx.p, qkv, sizes[0], sizes[1], n);
            let v = last_axis_slice(&mut cx.p, qkv, sizes[0] + sizes[1], sizes[2], n);
            let (q, k, v) =
                (to_heads(&mut cx.p, q, heads, n), to_heads(&mut cx.p, k, heads, n), to_heads(&mut cx.p, v, heads, n));
            let (s, t) = (cx.shape(q)[2], cx.shape(k)[2]);
            let causal = (op.attr_i("unidirectional", 0) != 0).then_some(t - s.min(t));
            let y = sdpa(&mut cx.p, q, k, v, attention_scale(op, sizes[0] / heads), causal, n);
            from_heads(&mut cx.p, y, n)
        }
        "MultiHeadAttention" => {
            only_main_io(cx, id, op, 4..10)?;
            let heads = heads_attr(op, "num_heads")?;
            let (mut q, mut k, mut v) = (cx.input(id, 0)?, cx.input(id, 1)?, cx.input(id, 2)?);
            if [q, k, v].iter().any(|&x| cx.shape(x).len() != 3) {
                return Err(node_err(op, "only separate 3-D query, key and value are supported"));
            }
            if let Some(b) = cx.opt_input(id, 3)? {
                let (hq, hk, hv) = (cx.shape(q)[2], cx.shape(k)[2], cx.shape(v)[2]);
                let bq = last_axis_slice(&mut cx.p, b, 0, hq, n);
                let bk = last_axis_slice(&mut cx.p, b, hq, hk, n);
                let bv = last_axis_slice(&mut cx.p, b, hq + hk, hv, n);
                q = cx.p.binary(BinaryOp::Add, q, bq, n);
                k = cx.p.binary(BinaryOp::Add, k, bk, n);
                v = cx.p.binary(BinaryOp::Add, v, bv, n);
            }
            let (q, k, v) =
                (to_heads(&mut cx.p, q, heads, n), to_heads(&mut cx.p, k, heads, n), to_heads(&mut cx.p, v, heads, n));
            let (s, t, d) = (cx.shape(q)[2], cx.shape(k)[2], cx.shape(q)[3]);
            let causal = (op.attr_i("unidirectional", 0) != 0).then_some(t - s.min(t));
            let y = sdpa(&mut cx.p, q, k, v, attention_scale(op, d), causal, n);
            from_heads(&mut cx.p, y, n)
        }
        "GroupQueryAttention" => {
            for slot in [3, 4] {
                if cx.model.input(id, slot).is_some() {
                    return Err(node_err(op, "a KV cache (past_key/past_value) is not supported"));
                }
            }
            only_main_io(cx, id, op, 7..16)?;
            if op.attr_i("do_rotary", 0) != 0
                || op.attr_f("softcap", 0.0) != 0.0
                || op.attr_i("local_window_size", -1) != -1
                || op.attr_i("smooth_softmax", 0) != 0
            {
                return Err(node_err(op, "rotary, softcap, local windows and smooth softmax are not supported"));
            }
            let (hq, hkv) = (heads_attr(op, "num_heads")?, heads_attr(op, "kv_num_heads")?);
            let (q, k, v) = (cx.input(id, 0)?, cx.input(id, 1)?, cx.input(id, 2)?);
            let t = cx.shape(k).get(1).copied().unwrap_or(0);
            let lens = cx.ints(id, 5)?.unwrap_or_default();
            let total = cx.ints(id, 6)?.unwrap_or_default();
            if lens.iter().any(|&l| l != t as i64 - 1) || total != [t as i64] {
                return Err(node_err(
                    op,
                    format!("seqlens_k {lens:?} / total_sequence_length {total:?} mean padding or a cache (only T − 1 = {} is supported)", t as i64 - 1),
                ));
            }
            let (q, k, v) =
                (to_heads(&mut cx.p, q, hq, n), to_heads(&mut cx.p, k, hkv, n), to_heads(&mut cx.p, v, hkv, n));
            let (s, d) = (cx.shape(q)[2], cx.shape(q)[3]);
            let causal = (op.attr_i("causal", 1) != 0).then_some(t - s.min(t));
            let y = sdpa(&mut cx.p, q, k, v, attention_scale(op, d), causal, n);
            from_heads(&mut cx.p, y, n)
        }
        "MoE" => lower_ms_moe(cx, id, op)?,
        other => return Err(node_err(op, format!("the compute engine has no lowering for com.microsoft {other}"))),
    };
    let want = cx.out_shape(id, 0)?;
    let y = cx.p.reshape(y, want, n);
    cx.set(id, 0, y);
    Ok(())
}

fn lower_ms_moe(cx: &mut Cx, id: Id, op: &Op) -> Result<Slot> {
    let n = op.name.as_str();
    if op.attr_i("use_sparse_mixer", 0) != 0 || cx.model.input(id, 6).is_some() || cx.model.inputs(id).len() > 8 {
        return Err(node_err(op, "sparse mixer, fc3 and quantized experts are not supported"));
    }
    let x = cx.input(id, 0)?;
    let logits = cx.input(id, 1)?;
    let w1 = cx.input(id, 2)?;
    let b1 = cx.opt_input(id, 3)?;
    let w2 = cx.input(id, 4)?;
    let b2 = cx.opt_input(id, 5)?;
    let xs = cx.shape(x);
    let c = *xs.last().ok_or_else(|| node_err(op, "input has rank 0"))?;
    let tokens: usize = xs[..xs.len() - 1].iter().product();
    let (e, f) = (cx.shape(w1)[0], cx.shape(w1)[1]);
    let x2 = cx.p.reshape(x, vec![1, tokens, c], n);
    let lg = cx.p.reshape(logits, vec![tokens, e], n);
    // Routing: dense gates [tokens, E], zero outside each token's top k.
    let probs = softmax(&mut cx.p, lg, &[1], false, n);
    let k = op.attr_i("k", 1).clamp(1, e as i64) as usize;
    let idx = cx.p.push(Prim::TopKIndices { axis: 1, k, largest: true }, vec![probs], vec![tokens, k], n);
    let mut top = cx.p.push(Prim::GatherElements { axis: 1 }, vec![probs, idx], vec![tokens, k], n);
    if op.attr_i("normalize_routing_weights", 0) != 0 {
        let sum = reduce(&mut cx.p, ReduceOp::Sum, top, &[1], n);
        top = cx.p.binary(BinaryOp::Div, top, sum, n);
    }
    let zero = cx.p.scalar(0.0);
    let zeros = cx.p.push(Prim::Broadcast, vec![zero], vec![tokens, e], n);
    let gates = cx.p.push(Prim::ScatterElements { axis: 1, add: false }, vec![zeros, idx, top], vec![tokens, e], n);
    // Every expert on every token: [E, tokens, F] then [E, tokens, C].
    let mut h = matmul(&mut cx.p, x2, w1, false, true, n);
    if let Some(b) = b1 {
        let b = cx.p.reshape(b, vec![e, 1, f], n);
        h = cx.p.binary(BinaryOp::Add, h, b, n);
    }
    let h = match op.attr_str("activation_type").unwrap_or("relu") {
        "relu" => cx.p.unary(UnaryOp::Relu, h, n),
        "gelu" => {
            // onnxruntime's MoE kernel uses the tanh approximation (checked against it in
            // tests/patterns.rs): 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))).
            let h2 = cx.p.binary(BinaryOp::Mul, h, h, n);
            let h3 = cx.p.binary(BinaryOp::Mul, h2, h, n);
            let c = cx.p.unary(UnaryOp::Affine(0.044715, 0.0), h3, n);
            let inner = cx.p.binary(BinaryOp::Add, h, c, n);
            let sc = cx.p.unary(UnaryOp::Affine((2.0 / std::f64::consts::PI).sqrt() as f32, 0.0), inner, n);
            let th = cx.p.unary(UnaryOp::Tanh, sc, n);
            let half = cx.p.unary(UnaryOp::Affine(0.5, 0.5), th, n);
            cx.p.binary(BinaryOp::Mul, h, half, n)
        }
        "silu" => {
            let sg = cx.p.unary(UnaryOp::Sigmoid, h, n);
            cx.p.binary(BinaryOp::Mul, h, sg, n)
        }
        "identity" => h,
        other => return Err(node_err(op, format!("activation_type '{other}' is not supported"))),
    };
    let mut o = matmul(&mut cx.p, h, w2, false, true, n);
    if let Some(b) = b2 {
        let b = cx.p.reshape(b, vec![e, 1, c], n);
        o = cx.p.binary(BinaryOp::Add, o, b, n);
    }
    let gt = cx.p.push(Prim::Transpose { perm: vec![1, 0] }, vec![gates], vec![e, tokens], n);
    let gt = cx.p.reshape(gt, vec![e, tokens, 1], n);
    let weighted = cx.p.binary(BinaryOp::Mul, o, gt, n);
    let y = reduce(&mut cx.p, ReduceOp::Sum, weighted, &[0], n);
    Ok(cx.p.reshape(y, xs, n))
}
