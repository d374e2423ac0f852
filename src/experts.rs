//! Discovery of MoE experts built as separate branches combined by router weights — the
//! form the classic torch exporter produces for Switch-style layers:
//!
//! ```text
//! router = x·Wr (+ br) → Softmax(last axis) → ArgMax → GatherElements → ScatterElements
//!        → Slice[e:e+1] (expert e's gate) → Mul(gate_e, expert_e(x)) → Add chain
//! ```
//!
//! One expert unit owns its router column (and bias entry) and every tensor of its branch
//! that nothing else uses. Removing it drops the router column, renumbers the kept experts'
//! gate slices, bypasses its term of the Add chain, and lets dead-node elimination delete
//! the branch. Routing among the kept experts is unchanged: the masked reference sets the
//! removed experts' router logits to −∞, which is exactly what a smaller router computes.
//! Anything else consuming the routing probabilities makes the block unprunable, with the
//! reason recorded. Stacked-weight experts and the com.microsoft MoE op are not handled yet.

use std::collections::BTreeSet;

use crate::ir::{Id, Model, ValueKind};
use crate::units::{Role, Routing, Slice, UnitGroup, UnitKind, Unprunable};

/// Finds expert groups; returns them with the MoE blocks found but not prunable.
pub fn discover(model: &Model) -> (Vec<UnitGroup>, Vec<Unprunable>) {
    let mut groups = Vec::new();
    let mut unprunable = Vec::new();
    for op in model.ops() {
        let o = model.op(op);
        if o.op_type != "Softmax" || !o.domain.is_empty() {
            continue;
        }
        let Some(router) = router_of(model, op) else { continue };
        match block(model, op, &router) {
            Ok(g) => groups.push(g),
            Err(reason) => {
                let count = router.experts;
                if reason != NOT_MOE {
                    unprunable.push(Unprunable {
                        kind: Some(UnitKind::Experts),
                        layer: model.op(router.matmul).name.clone(),
                        count,
                        reason,
                    });
                }
            }
        }
    }
    (groups, unprunable)
}

const NOT_MOE: &str = "not an MoE router";

struct Router {
    matmul: Id,
    weight: Id,
    bias: Option<Id>,
    experts: usize,
}

/// Softmax(x·Wr + br) over the last axis, Wr a static [d, E] weight.
fn router_of(model: &Model, softmax: Id) -> Option<Router> {
    let logits = model.input(softmax, 0)?;
    let rank = model.value(logits).shape.as_ref()?.len() as i64;
    let axis = model.op(softmax).attr_i("axis", -1);
    if axis != -1 && axis != rank - 1 {
        return None;
    }
    let (p, _) = model.producer(logits)?;
    let (matmul, bias) = match model.op(p).op_type.as_str() {
        "MatMul" => (p, None),
        "Add" => {
            let ins = model.inputs(p);
            let (a, b) = (ins.first().copied().flatten()?, ins.get(1).copied().flatten()?);
            let (mm, bias) = if model.value(a).data.is_some() { (b, a) } else { (a, b) };
            let (q, _) = model.producer(mm)?;
            (model.op(q).op_type == "MatMul").then_some(())?;
            (q, Some(bias))
        }
        _ => return None,
    };
    let weight = model.input(matmul, 1)?;
    let dims = model.value(weight).data.as_ref()?.dims.clone();
    if dims.len() != 2 || dims[1] < 2 {
        return None;
    }
    if let Some(b) = bias {
        if model.value(b).data.as_ref().map(|d| d.dims.clone()) != Some(vec![dims[1]]) {
            return None;
        }
    }
    Some(Router { matmul, weight, bias, experts: dims[1] })
}

/// Ops through which routing probabilities may flow to the gate slices.
const ROUTING_OPS: &[&str] = &["ArgMax", "GatherElements", "ScatterElements", "Shape", "ConstantOfShape", "Slice"];

fn block(model: &Model, softmax: Id, router: &Router) -> Result<UnitGroup, String> {
    let e = router.experts;
    let probs = model.output(softmax, 0);
    // Forward closure of the routing tensors; the leaves must be the per-expert slices.
    let mut gates: Vec<Option<Id>> = vec![None; e];
    let mut seen = BTreeSet::new();
    let mut stack = vec![probs];
    while let Some(v) = stack.pop() {
        for (c, _) in model.consumers(v) {
            if !seen.insert(c) {
                continue;
            }
            let co = model.op(c);
            if !ROUTING_OPS.contains(&co.op_type.as_str()) {
                return Err(if gates.iter().all(Option::is_none) {
                    NOT_MOE.to_string()
                } else {
                    format!("routing weights flow into {}", co.describe())
                });
            }
            if co.op_type == "Slice" {
                let idx =
                    gate_index(model, c, e).ok_or_else(|| format!("{} is not a one-expert slice", co.describe()))?;
                if gates[idx].replace(c).is_some() {
                    return Err(format!("expert {idx} has two gate slices"));
                }
                continue;
            }
            if co.op_type == "Shape" {
                continue; // only the shape is read; it follows the expert count by itself
            }
            stack.extend(model.outputs(c));
        }
    }
    if gates.iter().any(Option::is_none) {
        return Err(if gates.iter().all(Option::is_none) {
            NOT_MOE.into()
        } else {
            "an expert has no gate slice".into()
        });
    }
    let gate_slices: Vec<Id> = gates.into_iter().flatten().collect();
    let mut gate_muls = Vec::with_capacity(e);
    let mut sum_adds = Vec::with_capacity(e);
    let mut outputs = Vec::with_capacity(e);
    for &g in &gate_slices {
        let gv = model.output(g, 0);
        let [(mul, slot)] = model.consumers(gv)[..] else { return Err("a gate weight has several uses".into()) };
        if model.op(mul).op_type != "Mul" {
            return Err(format!("a gate weight flows into {}", model.op(mul).describe()));
        }
        let y = model.input(mul, 1 - slot).ok_or("gate Mul has one input")?;
        let mv = model.output(mul, 0);
        let [(add, _)] = model.consumers(mv)[..] else { return Err("a gated expert output has several uses".into()) };
        if model.op(add).op_type != "Add" || model.is_graph_output(model.output(add, 0)) {
            return Err(format!("a gated expert output flows into {}", model.op(add).describe()));
        }
        gate_muls.push(mul);
        sum_adds.push(add);
        outputs.push(y);
    }
    let mut owned = Vec::with_capacity(e);
    for (k, &y) in outputs.iter().enumerate() {
        let weights = branch_weights(model, y, gate_muls[k]);
        if weights.is_empty() {
            return Err(format!("expert {k} owns no weights"));
        }
        owned.push(weights);
    }
    let mut slices = vec![Slice { tensor: router.weight, axis: 1, offset: 0, factor: 1, role: Role::Producer }];
    match router.bias {
        Some(b) => slices.push(Slice { tensor: b, axis: 0, offset: 0, factor: 1, role: Role::Logit }),
        None => return Err("the router has no bias (the masked reference needs one)".into()),
    }
    for s in &slices {
        let users = model.consumers(s.tensor).len();
        if users != 1 {
            return Err(format!("router parameter '{}' is shared", model.value(s.tensor).name));
        }
    }
    Ok(UnitGroup {
        kind: UnitKind::Experts,
        name: model.op(router.matmul).name.clone(),
        producers: vec![router.matmul],
        count: e,
        slices,
        shape_edits: Vec::new(),
        depthwise: Vec::new(),
        owned,
        routing: Some(Routing { gate_slices, gate_muls, sum_adds }),
    })
}

/// `Slice(x, [k], [k+1], [last axis])` with steps 1: returns k.
fn gate_index(model: &Model, slice: Id, experts: usize) -> Option<usize> {
    let ins = model.inputs(slice);
    let lit =
        |i: usize| -> Option<Vec<i64>> { Some(model.value(ins.get(i).copied().flatten()?).known()?.to_i64_vec()) };
    let (starts, ends) = (lit(1)?, lit(2)?);
    let rank = model.value(ins[0]?).shape.as_ref()?.len() as i64;
    let axes = lit(3).unwrap_or_else(|| vec![rank - 1]);
    if let Some(steps) = lit(4) {
        if steps != [1] {
            return None;
        }
    }
    let ([s], [en], [a]) = (starts.as_slice(), ends.as_slice(), axes.as_slice()) else { return None };
    let a = if *a < 0 { a + rank } else { *a };
    (a == rank - 1 && *en == s + 1 && *s >= 0 && (*s as usize) < experts).then_some(*s as usize)
}

/// Weights used only inside the sub-graph that computes `y` (stopping at values the rest
/// of the graph also uses).
fn branch_weights(model: &Model, y: Id, gate_mul: Id) -> Vec<Id> {
    let mut inside: BTreeSet<Id> = BTreeSet::from([gate_mul]);
    let mut frontier = vec![y];
    while let Some(v) = frontier.pop() {
        let Some((p, _)) = model.producer(v) else { continue };
        let exclusive = model.outputs(p).iter().all(|&o| model.consumers(o).iter().all(|(c, _)| inside.contains(c)));
        if !exclusive || !inside.insert(p) {
            continue;
        }
        frontier.extend(model.inputs(p).into_iter().flatten());
    }
    let mut weights = BTreeSet::new();
    for &op in &inside {
        for v in model.inputs(op).into_iter().flatten() {
            let val = model.value(v);
            if val.kind == ValueKind::Weight
                && model.consumers(v).iter().all(|(c, _)| inside.contains(c))
                && val.data.as_ref().is_some_and(|d| d.numel() > 1)
            {
                weights.insert(v);
            }
        }
    }
    weights.into_iter().collect()
}
