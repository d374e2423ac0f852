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
//! reason recorded. Stacked-weight experts routed by top-k: [`discover_stacked`]; the
//! com.microsoft `MoE` op: [`discover_ms_moe`].

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
    router_at(model, logits)
}

/// `logits = x·Wr (+ br)`, Wr a static [d, E] weight, br a static [E] bias.
fn router_at(model: &Model, logits: Id) -> Option<Router> {
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
        slices,
        owned,
        routing: Some(Routing { gate_slices, gate_muls, sum_adds }),
        ..UnitGroup::new(UnitKind::Experts, model.op(router.matmul).name.clone(), vec![router.matmul], e)
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

/// Finds MoE blocks whose experts are stacked along axis `E` of shared weights (`[E, d, h]`)
/// and routed by top-k: `TopK(x·Wr + br)` (or `TopK(Softmax(·))`). One expert unit owns its
/// router column and bias entry and its slice of every stacked tensor along the expert
/// axis. The expert axis is followed forward from the router logits through a closed set
/// of ops — Softmax over the experts, TopK, ScatterElements into zeros shaped like the
/// logits (dense gates), GatherElements, Einsum and MatMul with stacked weights,
/// elementwise ops with stacked biases, Transpose, and ReduceSum or Einsum contractions over
/// the experts — while expert *indices* (TopK's second output) may only pick stacked
/// weights (Gather on the expert axis) or scatter gates. A sum over the experts must have a
/// gate factor that is zero for every expert never routed to, so that the masked reference
/// (router logit −∞) and the smaller model agree. Expert indices come from the pruned
/// router, so they count kept experts only and nothing needs renumbering. TopK's k is the
/// group's minimum number of kept experts. Anything else leaves the block unprunable.
pub fn discover_stacked(model: &Model) -> (Vec<UnitGroup>, Vec<Unprunable>) {
    let mut groups = Vec::new();
    let mut unprunable = Vec::new();
    let mut done = BTreeSet::new();
    for op in model.ops() {
        let o = model.op(op);
        if o.op_type != "TopK" || !o.domain.is_empty() {
            continue;
        }
        let Some(mut logits) = model.input(op, 0) else { continue };
        if let Some((p, _)) = model.producer(logits) {
            if model.op(p).op_type == "Softmax" {
                logits = match model.input(p, 0) {
                    Some(v) => v,
                    None => continue,
                };
            }
        }
        let Some(router) = router_at(model, logits) else { continue };
        if !done.insert(logits) {
            continue;
        }
        match stacked(model, &router, logits) {
            Ok(g) => groups.push(g),
            Err(reason) => unprunable.push(Unprunable {
                kind: Some(UnitKind::Experts),
                layer: model.op(router.matmul).name.clone(),
                count: router.experts,
                reason,
            }),
        }
    }
    (groups, unprunable)
}

/// What the stacked-expert analysis knows about a value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tag {
    /// Holds one entry per expert along `axis`; `gated`: the entries of experts never
    /// routed to are exactly zero (in the masked reference).
    Experts { axis: usize, gated: bool },
    /// Holds expert indices (from TopK).
    Index,
    /// The shape of a value whose `axis` holds the experts.
    ShapeOf { axis: usize },
}

/// Two passes: the first finds the per-expert values the gates weigh (computed from
/// stacked weights, so not reached from the router); the stacked weights among their
/// ancestors — but not the router's, which belong to earlier layers — then seed the second,
/// which must account for everything.
fn stacked(model: &Model, router: &Router, logits: Id) -> Result<UnitGroup, String> {
    let mut wanted = Some(Vec::new());
    let _ = stacked_pass(model, router, logits, &BTreeSet::new(), &mut wanted);
    let wanted = wanted.unwrap_or_default();
    let before = ancestors(model, &[logits]);
    let mut seeds = BTreeSet::new();
    for op in ancestors(model, &wanted).difference(&before) {
        for v in model.inputs(*op).into_iter().flatten() {
            let val = model.value(v);
            if val.kind == ValueKind::Weight
                && val.data.as_ref().is_some_and(|d| d.dims.len() >= 2 && d.dims[0] == router.experts)
            {
                seeds.insert(v);
            }
        }
    }
    stacked_pass(model, router, logits, &seeds, &mut None)
}

/// Ops that `values` depend on.
fn ancestors(model: &Model, values: &[Id]) -> BTreeSet<Id> {
    let mut ops = BTreeSet::new();
    let mut stack: Vec<Id> = values.to_vec();
    while let Some(v) = stack.pop() {
        if let Some((p, _)) = model.producer(v) {
            if ops.insert(p) {
                stack.extend(model.inputs(p).into_iter().flatten());
            }
        }
    }
    ops
}

fn stacked_pass(
    model: &Model,
    router: &Router,
    logits: Id,
    seeds: &BTreeSet<Id>,
    wanted: &mut Option<Vec<Id>>,
) -> Result<UnitGroup, String> {
    use std::collections::BTreeMap;
    let e = router.experts;
    let bias = router.bias.ok_or("the router has no bias (the masked reference needs one)")?;
    let shape =
        |v: Id| model.value(v).shape.clone().ok_or_else(|| format!("shape of '{}' is unknown", model.value(v).name));
    let norm = |a: i64, rank: usize| if a < 0 { (a + rank as i64) as usize } else { a as usize };
    let mut tags: BTreeMap<Id, Tag> = BTreeMap::new();
    let rank = shape(logits)?.len();
    tags.insert(logits, Tag::Experts { axis: rank - 1, gated: false });
    let mut sliced: BTreeMap<Id, usize> = BTreeMap::new();
    let mut visited = BTreeSet::new();
    let mut min_keep = 1usize;
    let order = model.topo_order()?;
    for op in order {
        let ins = model.inputs(op);
        let mut tagged: Vec<(usize, Tag)> =
            ins.iter().enumerate().filter_map(|(s, v)| v.and_then(|v| tags.get(&v).map(|t| (s, *t)))).collect();
        if matches!(model.op(op).op_type.as_str(), "Einsum" | "MatMul" | "Add" | "Mul") {
            for (slot, v) in ins.iter().enumerate() {
                if let Some(v) = v.filter(|v| seeds.contains(v)) {
                    if !tagged.iter().any(|(s, _)| *s == slot) {
                        tags.insert(v, Tag::Experts { axis: 0, gated: false });
                        sliced.insert(v, 0);
                        tagged.push((slot, Tag::Experts { axis: 0, gated: false }));
                    }
                }
            }
        }
        if tagged.is_empty() {
            continue;
        }
        visited.insert(op);
        let o = model.op(op);
        let outs = model.outputs(op);
        let bad = || format!("expert data flows into {}", o.describe());
        let tag_of = |slot: usize| tagged.iter().find(|(s, _)| *s == slot).map(|(_, t)| *t);
        let mut slice = |t: Id, axis: usize| -> Result<(), String> {
            let val = model.value(t);
            let d = val.data.as_ref().ok_or_else(bad)?;
            if val.kind != ValueKind::Weight || d.dims.get(axis) != Some(&e) {
                return Err(format!("'{}' spans the experts but is not a stacked weight", val.name));
            }
            if sliced.insert(t, axis).is_some_and(|a| a != axis) {
                return Err(format!("'{}' is indexed by experts along two axes", val.name));
            }
            Ok(())
        };
        if !o.domain.is_empty() {
            return Err(bad());
        }
        let out_rank = outs.first().map(|&v| shape(v).map(|s| s.len())).transpose()?.unwrap_or(0);
        let new: Vec<(Id, Tag)> = match o.op_type.as_str() {
            "TopK" => {
                let Some(Tag::Experts { axis, .. }) = tag_of(0) else { return Err(bad()) };
                if tagged.len() != 1 || norm(o.attr_i("axis", -1), out_rank) != axis || o.attr_i("largest", 1) != 1 {
                    return Err(bad());
                }
                let k = ins
                    .get(1)
                    .copied()
                    .flatten()
                    .and_then(|v| model.value(v).known().map(|t| t.to_i64_vec()))
                    .and_then(|v| v.first().copied())
                    .or_else(|| o.attr("k").map(|_| o.attr_i("k", 1)))
                    .ok_or("TopK's k is not constant")?;
                min_keep = min_keep.max(k.max(1) as usize);
                vec![(outs[1], Tag::Index)]
            }
            "Softmax" => {
                let Some(Tag::Experts { axis, .. }) = tag_of(0) else { return Err(bad()) };
                if norm(o.attr_i("axis", -1), out_rank) != axis {
                    return Err("a softmax mixes the experts' entries".into());
                }
                vec![(outs[0], Tag::Experts { axis, gated: true })]
            }
            "Shape" => {
                let Some(Tag::Experts { axis, .. }) = tag_of(0) else { return Err(bad()) };
                if o.attr("start").is_some() || o.attr("end").is_some() {
                    return Err(bad());
                }
                vec![(outs[0], Tag::ShapeOf { axis })]
            }
            "ConstantOfShape" => {
                let Some(Tag::ShapeOf { axis }) = tag_of(0) else { return Err(bad()) };
                let zero = match o.attr("value") {
                    None => true,
                    Some(crate::ir::Attr::Tensor(t)) => t.to_f64_vec().iter().all(|&x| x == 0.0),
                    _ => false,
                };
                if !zero {
                    return Err(bad());
                }
                vec![(outs[0], Tag::Experts { axis, gated: true })]
            }
            "ScatterElements" => {
                let (Some(Tag::Experts { axis, gated: true }), Some(Tag::Index), None) =
                    (tag_of(0), tag_of(1), tag_of(2))
                else {
                    return Err(bad());
                };
                if norm(o.attr_i("axis", 0), out_rank) != axis || o.attr_str("reduction").is_some_and(|r| r != "none") {
                    return Err(bad());
                }
                vec![(outs[0], Tag::Experts { axis, gated: true })]
            }
            "GatherElements" => {
                let (Some(Tag::Experts { axis, .. }), Some(Tag::Index)) = (tag_of(0), tag_of(1)) else {
                    return Err(bad());
                };
                if norm(o.attr_i("axis", 0), out_rank) != axis {
                    return Err(bad());
                }
                vec![]
            }
            "Gather" => {
                let (Some(Tag::Index), None) = (tag_of(1), tag_of(0)) else { return Err(bad()) };
                let w = ins.first().copied().flatten().ok_or_else(bad)?;
                let wr = shape(w)?.len();
                slice(w, norm(o.attr_i("axis", 0), wr))?;
                vec![]
            }
            "Unsqueeze" | "Squeeze" | "Cast" | "Identity" | "Reshape" if tag_of(0) == Some(Tag::Index) => {
                if tagged.len() != 1 {
                    return Err(bad());
                }
                vec![(outs[0], Tag::Index)]
            }
            "Transpose" => {
                let Some(Tag::Experts { axis, gated }) = tag_of(0) else { return Err(bad()) };
                let perm: Vec<usize> = match o.attr_ints("perm") {
                    Some(p) => p.iter().map(|&x| x as usize).collect(),
                    None => (0..out_rank).rev().collect(),
                };
                let axis = perm.iter().position(|&p| p == axis).ok_or_else(bad)?;
                vec![(outs[0], Tag::Experts { axis, gated })]
            }
            "ReduceSum" => {
                let Some(Tag::Experts { axis, gated }) = tag_of(0) else { return Err(bad()) };
                let in_rank = shape(ins[0].ok_or_else(bad)?)?.len();
                let axes: Vec<usize> = match o.attr_ints("axes") {
                    Some(a) => a.to_vec(),
                    None => match ins.get(1).copied().flatten() {
                        Some(v) => model.value(v).known().ok_or("reduce axes are not constant")?.to_i64_vec(),
                        None => (0..in_rank as i64).collect(),
                    },
                }
                .into_iter()
                .map(|a| norm(a, in_rank))
                .collect();
                if axes.contains(&axis) {
                    if !gated {
                        return Err("sums over experts without a routing gate".into());
                    }
                    vec![]
                } else {
                    let keep = o.attr_i("keepdims", 1) != 0;
                    let axis = if keep { axis } else { axis - axes.iter().filter(|&&a| a < axis).count() };
                    vec![(outs[0], Tag::Experts { axis, gated })]
                }
            }
            "Relu" | "Gelu" | "Sigmoid" | "Tanh" | "Erf" | "Neg" | "Abs" | "Dropout" | "Identity" | "Cast" => {
                let Some(Tag::Experts { axis, gated }) = tag_of(0) else { return Err(bad()) };
                let keeps_zero = matches!(o.op_type.as_str(), "Relu" | "Neg" | "Abs" | "Identity" | "Cast" | "Dropout");
                vec![(outs[0], Tag::Experts { axis, gated: gated && keeps_zero })]
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                let mut axis = None;
                let mut gated = Vec::new();
                for (slot, t) in &tagged {
                    let Tag::Experts { axis: a, gated: g } = *t else { return Err(bad()) };
                    let r = shape(ins[*slot].ok_or_else(bad)?)?.len();
                    let a = a + out_rank - r;
                    if axis.is_some_and(|x| x != a) {
                        return Err("combines misaligned expert axes".into());
                    }
                    axis = Some(a);
                    gated.push((*slot, g));
                }
                let axis = axis.ok_or_else(bad)?;
                for (slot, v) in ins.iter().enumerate() {
                    let Some(v) = *v else { continue };
                    if tag_of(slot).is_some() {
                        continue;
                    }
                    let sh = shape(v)?;
                    let Some(local) = (axis + sh.len()).checked_sub(out_rank) else { continue };
                    if sh[local] == 1 {
                        continue;
                    }
                    if model.value(v).data.is_some() {
                        slice(v, local)?;
                    } else if let Some(w) = wanted.as_mut() {
                        w.push(v);
                    } else {
                        return Err(format!("'{}' spans the experts but is not routed", model.value(v).name));
                    }
                }
                let g = match o.op_type.as_str() {
                    "Mul" => gated.iter().any(|(_, g)| *g),
                    "Div" => gated.iter().any(|(s, g)| *s == 0 && *g),
                    _ => false,
                };
                vec![(outs[0], Tag::Experts { axis, gated: g })]
            }
            "MatMul" => {
                // Batched over the experts: the expert axis is the third from the end of
                // the output; a stacked weight [.., E, k, n] or a routed activation holds it.
                if out_rank < 3 {
                    return Err(bad());
                }
                let axis = out_rank - 3;
                let mut gated = false;
                for (slot, v) in ins.iter().enumerate() {
                    let v = v.ok_or_else(bad)?;
                    let r = shape(v)?.len();
                    let local = (axis + r).checked_sub(out_rank);
                    match tag_of(slot) {
                        Some(Tag::Experts { axis: a, gated: g }) => {
                            if Some(a) != local {
                                return Err("the experts are not a batch axis of the MatMul".into());
                            }
                            gated |= g;
                        }
                        Some(_) => return Err(bad()),
                        None => {
                            let Some(local) = local else { continue };
                            let d = shape(v)?[local];
                            if d == 1 {
                                continue;
                            }
                            if model.value(v).data.is_some() && d == e {
                                slice(v, local)?;
                            } else if let Some(w) = wanted.as_mut() {
                                w.push(v);
                            } else {
                                return Err(format!("'{}' spans the experts but is not routed", model.value(v).name));
                            }
                        }
                    }
                }
                vec![(outs[0], Tag::Experts { axis, gated })]
            }
            "Einsum" => einsum_step(model, op, &tagged, e, &mut slice, wanted)?,
            _ => return Err(bad()),
        };
        for (v, t) in new {
            if model.is_graph_output(v) {
                return Err(format!("expert data reaches graph output '{}'", model.value(v).name));
            }
            if let Tag::Experts { axis, .. } = t {
                if shape(v)?.get(axis) != Some(&e) {
                    return Err(format!("lost track of the expert axis at {}", o.describe()));
                }
            }
            tags.insert(v, t);
        }
    }
    if sliced.is_empty() {
        return Err("no stacked expert weights".into());
    }
    let mut slices = vec![
        Slice { tensor: router.weight, axis: 1, offset: 0, factor: 1, role: Role::Producer },
        Slice { tensor: bias, axis: 0, offset: 0, factor: 1, role: Role::Logit },
    ];
    for s in &slices {
        if model.consumers(s.tensor).len() != 1 {
            return Err(format!("router parameter '{}' is shared", model.value(s.tensor).name));
        }
    }
    for (&t, &axis) in &sliced {
        if let Some((c, _)) = model.consumers(t).into_iter().find(|(c, _)| !visited.contains(c)) {
            return Err(format!("stacked weight '{}' is also used by {}", model.value(t).name, model.op(c).describe()));
        }
        if model.is_graph_output(t) {
            return Err(format!("stacked weight '{}' is a graph output", model.value(t).name));
        }
        slices.push(Slice { tensor: t, axis, offset: 0, factor: 1, role: Role::Coupled });
    }
    if min_keep > e {
        return Err(format!("TopK selects {min_keep} of {e} experts"));
    }
    Ok(UnitGroup {
        slices,
        min_keep,
        ..UnitGroup::new(UnitKind::Experts, model.op(router.matmul).name.clone(), vec![router.matmul], e)
    })
}

/// Einsum with expert-tagged operands (explicit form, no ellipsis): the expert label must
/// be the same in every tagged operand; static operands holding it are stacked weights;
/// a contraction over it needs a gated factor.
fn einsum_step(
    model: &Model,
    op: Id,
    tagged: &[(usize, Tag)],
    e: usize,
    slice: &mut dyn FnMut(Id, usize) -> Result<(), String>,
    wanted: &mut Option<Vec<Id>>,
) -> Result<Vec<(Id, Tag)>, String> {
    let o = model.op(op);
    let bad = || format!("expert data flows into {} (only explicit equations are followed)", o.describe());
    let eq: String = o.attr_str("equation").ok_or_else(bad)?.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = eq.split_once("->").ok_or_else(bad)?;
    if eq.contains('.') {
        return Err(bad());
    }
    let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.chars().collect()).collect();
    let ins = model.inputs(op);
    if terms.len() != ins.len() {
        return Err(bad());
    }
    let mut label = None;
    let mut gated = false;
    for (slot, t) in tagged {
        let Tag::Experts { axis, gated: g } = *t else { return Err(bad()) };
        let l = *terms[*slot].get(axis).ok_or_else(bad)?;
        if label.is_some_and(|x| x != l) {
            return Err("the operands' expert axes carry different labels".into());
        }
        label = Some(l);
        gated |= g;
    }
    let label = label.ok_or_else(bad)?;
    for (slot, v) in ins.iter().enumerate() {
        let v = v.ok_or_else(bad)?;
        if tagged.iter().any(|(s, _)| *s == slot) {
            continue;
        }
        if let Some(pos) = terms[slot].iter().position(|&c| c == label) {
            let d = model.value(v).shape.as_ref().and_then(|s| s.get(pos).copied());
            if d == Some(1) {
                continue;
            }
            if model.value(v).data.is_some() && d == Some(e) {
                slice(v, pos)?;
            } else if let Some(w) = wanted.as_mut() {
                w.push(v);
            } else {
                return Err(format!("'{}' spans the experts but is not routed", model.value(v).name));
            }
        }
    }
    let out = model.output(op, 0);
    match rhs.chars().position(|c| c == label) {
        Some(axis) => Ok(vec![(out, Tag::Experts { axis, gated })]),
        None if gated => Ok(vec![]),
        None => Err("sums over experts without a routing gate".into()),
    }
}

/// Finds com.microsoft `MoE` ops (onnxruntime's fused expert layer: softmax over
/// `router_probs`, top-`k`, per-expert FFN `fc1 [E, F·fusion, C]`, `fc2 [E, C, F]`, optional
/// `fc3`, biases `[E, ·]`) whose router logits are `x·Wr + br` used by that op alone. One
/// expert unit owns its router column and bias entry and its slice (axis 0) of every
/// stacked weight and bias. The masked reference sets a removed expert's logit to −∞: the
/// op's softmax then gives it weight exactly 0, it is never among the top k while at least
/// k experts are kept, and the kept experts' probabilities are those of the smaller router
/// (normalized or not). `k` is the group's minimum keep; sparse-mixer routing (which
/// depends on the gaps between logits) is left unprunable.
pub fn discover_ms_moe(model: &Model) -> (Vec<UnitGroup>, Vec<Unprunable>) {
    let mut groups = Vec::new();
    let mut unprunable = Vec::new();
    for op in model.ops() {
        let o = model.op(op);
        if o.op_type != "MoE" || o.domain != "com.microsoft" {
            continue;
        }
        let experts = model
            .input(op, 2)
            .and_then(|w| model.value(w).data.as_ref().map(|d| d.dims.first().copied().unwrap_or(0)))
            .unwrap_or(0);
        match ms_moe(model, op) {
            Ok(g) => groups.push(g),
            Err(reason) => unprunable.push(Unprunable {
                kind: Some(UnitKind::Experts),
                layer: o.name.clone(),
                count: experts,
                reason,
            }),
        }
    }
    (groups, unprunable)
}

fn ms_moe(model: &Model, op: Id) -> Result<UnitGroup, String> {
    let o = model.op(op);
    if o.attr_i("use_sparse_mixer", 0) != 0 {
        return Err("sparse-mixer routing depends on every expert's logit".into());
    }
    let logits = model.input(op, 1).ok_or("no router_probs input")?;
    let router = router_at(model, logits).ok_or("router_probs is not x·Wr + br with a constant [d, E] Wr")?;
    if model.consumers(logits).len() != 1 || model.is_graph_output(logits) {
        return Err("the router logits have other uses".into());
    }
    let bias = router.bias.ok_or("the router has no bias (the masked reference needs one)")?;
    let e = router.experts;
    let mut slices = vec![
        Slice { tensor: router.weight, axis: 1, offset: 0, factor: 1, role: Role::Producer },
        Slice { tensor: bias, axis: 0, offset: 0, factor: 1, role: Role::Logit },
    ];
    for s in &slices {
        if model.consumers(s.tensor).len() != 1 || model.is_graph_output(s.tensor) {
            return Err(format!("router parameter '{}' is shared", model.value(s.tensor).name));
        }
    }
    let mut stacked = 0;
    for (slot, v) in model.inputs(op).into_iter().enumerate().skip(2) {
        let Some(v) = v else { continue };
        let val = model.value(v);
        let Some(d) = val.data.as_ref() else {
            return Err(format!("expert parameter '{}' (input {slot}) is not a stored weight", val.name));
        };
        if slot > 7 {
            return Err(format!("input {slot} ('{}', quantization data) is not handled", val.name));
        }
        if d.dims.first() != Some(&e) {
            return Err(format!("'{}' of shape {:?} is not stacked over {e} experts", val.name, d.dims));
        }
        if model.consumers(v).len() != 1 || model.is_graph_output(v) {
            return Err(format!("stacked weight '{}' is shared", val.name));
        }
        slices.push(Slice { tensor: v, axis: 0, offset: 0, factor: 1, role: Role::Coupled });
        stacked += 1;
    }
    if stacked == 0 {
        return Err("no stacked expert weights".into());
    }
    let k = o.attr_i("k", 1);
    if k < 1 || k as usize > e {
        return Err(format!("k = {k} for {e} experts"));
    }
    Ok(UnitGroup {
        slices,
        min_keep: k as usize,
        ..UnitGroup::new(UnitKind::Experts, o.name.clone(), vec![router.matmul], e)
    })
}
