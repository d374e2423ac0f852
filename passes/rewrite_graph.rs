//! RewriteGraph: removes the pruned units physically.
//!
//! For every (tensor, axis) that some group owns, the entries of pruned units are dropped
//! with one index map built from all groups that meet there (concat offsets, a conv's input
//! and output channels belonging to different groups). Then the dependent attributes and
//! shape constants follow: depthwise convs get `group` = their new channel count, every
//! Reshape literal that counts a group's channels shrinks by `factor` per pruned unit, and
//! so do the head-count attributes of fused attention ops (`num_heads`, `q_num_heads`,
//! `kv_num_heads`).
//! Removed experts are bypassed in their Add chain and the kept ones renumbered; a keep-set
//! below a group's `min_keep` (TopK's k for top-k experts) is refused. Shapes
//! are re-inferred after dead-node elimination (InferShapes, which also updates declared
//! fixed dimensions). The dense model is kept in the context: the verification builds the
//! masked reference from it.

use crate::error::{Error, Result};
use std::collections::BTreeMap;

use crate::ir::{Attr, Id, Model, Narrowed, Value, ValueKind};
use crate::pipeline::{Context, Pass};
use crate::units::{segments_by_tensor_axis, KeepSet, Role, Routing, ShapeTarget, UnitGroup};

pub struct RewriteGraph;

impl Pass for RewriteGraph {
    fn name(&self) -> &'static str {
        "RewriteGraph"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let keep = cx.keep.clone().ok_or_else(|| Error::Other("no selection to apply".into()))?;
        cx.dense = Some(model.clone());
        rewrite(model, &cx.groups, &keep)?;
        // Narrowed inputs (KV caches) have their new extent from now on.
        for (name, n) in &model.interface {
            if let Some(dims) = cx.input_shapes.get_mut(name) {
                dims[n.axis] = n.kept.len();
            }
        }
        Ok(())
    }
}

/// Applies a keep-set to the model in place.
pub fn rewrite(model: &mut Model, groups: &[UnitGroup], keep: &KeepSet) -> Result<()> {
    for (g, group) in groups.iter().enumerate() {
        if keep.kept_count(g) < group.min_keep.max(1) {
            return Err(Error::Option(format!(
                "{} '{}' must keep at least {} of its {} units, the keep-set keeps {}",
                group.kind.name(),
                group.name,
                group.min_keep.max(1),
                group.count,
                keep.kept_count(g)
            )));
        }
    }
    for ((tensor, axis), owners) in segments_by_tensor_axis(groups) {
        let data =
            model.value(tensor).data.clone().ok_or_else(|| {
                Error::Other(format!("parameter '{}' has no data to slice", model.value(tensor).name))
            })?;
        let spans = owners.iter().map(|(g, s)| (*g, s.offset, s.factor));
        if let Some(idx) = kept_indices(data.dims[axis], spans, keep, &model.value(tensor).name)? {
            model.value_mut(tensor).set_data(data.take(axis, &idx));
        }
    }
    model.interface = narrowed_interface(model, groups, keep)?;
    for (g, group) in groups.iter().enumerate() {
        let pruned = keep.pruned(g).len() as i64;
        if pruned == 0 {
            continue;
        }
        for e in &group.shape_edits {
            let (tensor, element) = match e.target {
                ShapeTarget::Element { tensor, element } => (tensor, element),
                ShapeTarget::ConcatInput { op, slot } => (literal_input(model, op, slot)?, 0),
            };
            let v = model.value(tensor);
            let mut vals = v.data.as_ref().map(|t| t.to_i64_vec()).unwrap_or_default();
            let dt = v.data.as_ref().map(|t| (t.dtype, t.dims.clone()));
            let (Some(x), Some((dtype, dims))) = (vals.get_mut(element), dt) else {
                return Err(Error::Other(format!("shape constant '{}' has no element {element}", v.name)));
            };
            *x -= pruned * e.factor as i64;
            let t = crate::tensor::Tensor::from_i64_as(dtype, dims, &vals);
            model.value_mut(tensor).set_data(t);
        }
        for e in &group.attr_edits {
            let o = model.op(e.op);
            let old = o.attr_i(&e.name, 0);
            let new = old - pruned * e.factor as i64;
            if o.attr(&e.name).is_none() || new < 1 {
                return Err(Error::Node {
                    path: std::path::PathBuf::from("<model>"),
                    node: o.name.clone(),
                    op: o.op_type.clone(),
                    msg: format!("attribute {} = {old} cannot lose {} units", e.name, pruned * e.factor as i64),
                });
            }
            model.op_mut(e.op).set_attr(&e.name, Attr::Int(new));
        }
        if let Some(r) = &group.routing {
            reroute(model, r, &keep.keep[g])?;
        }
        for &op in &group.depthwise {
            let w = model.input(op, 1).ok_or_else(|| Error::Other("depthwise conv lost its weight".into()))?;
            let channels = model.value(w).data.as_ref().map(|d| d.dims[0]).unwrap_or(0);
            model.op_mut(op).set_attr("group", Attr::Int(channels as i64));
        }
    }
    Ok(())
}

/// The indices of an axis of extent `n` that survive, when groups own it in `spans`
/// (group, offset, entries per unit); None when nothing is dropped.
fn kept_indices(
    n: usize,
    spans: impl Iterator<Item = (usize, usize, usize)>,
    keep: &KeepSet,
    name: &str,
) -> Result<Option<Vec<usize>>> {
    let mut dropped = vec![false; n];
    for (g, offset, factor) in spans {
        for u in keep.pruned(g) {
            let r = offset + u * factor..offset + (u + 1) * factor;
            if r.end > n {
                return Err(Error::Other(format!("unit slice out of range in '{name}'")));
            }
            dropped[r].iter_mut().for_each(|d| *d = true);
        }
    }
    Ok(dropped.contains(&true).then(|| (0..n).filter(|&i| !dropped[i]).collect()))
}

/// The graph inputs and outputs (KV caches) that lose the pruned units' entries, with the
/// dense indices each keeps.
fn narrowed_interface(model: &Model, groups: &[UnitGroup], keep: &KeepSet) -> Result<BTreeMap<String, Narrowed>> {
    let mut owners: BTreeMap<(Id, usize), Vec<(usize, usize, usize)>> = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        for s in &group.io {
            owners.entry((s.value, s.axis)).or_default().push((g, s.offset, s.factor));
        }
    }
    let mut out = BTreeMap::new();
    for ((v, axis), spans) in owners {
        let val = model.value(v);
        let n = val
            .shape
            .as_ref()
            .and_then(|d| d.get(axis).copied())
            .ok_or_else(|| Error::Other(format!("the shape of '{}' is unknown on axis {axis}", val.name)))?;
        let Some(kept) = kept_indices(n, spans.into_iter(), keep, &val.name)? else {
            continue;
        };
        if out.contains_key(&val.name) {
            return Err(Error::Other(format!("'{}' would be narrowed along two axes", val.name)));
        }
        out.insert(val.name.clone(), Narrowed { axis, dense: n, kept, input: model.inputs.contains(&v) });
    }
    Ok(out)
}

/// Expert removal: kept experts' gate slices are renumbered to their rank among the kept,
/// removed experts' terms are bypassed in the Add chain (their branches then die).
fn reroute(model: &mut Model, r: &Routing, keep: &[bool]) -> Result<()> {
    let mut rank = 0i64;
    for (e, &kept) in keep.iter().enumerate() {
        let slice = r.gate_slices[e];
        if kept {
            for (slot, value) in [(1usize, rank), (2, rank + 1)] {
                let v = literal_input(model, slice, slot)?;
                let t = model.value(v).data.clone().ok_or_else(|| Error::Other("gate index vanished".into()))?;
                model.value_mut(v).set_data(crate::tensor::Tensor::from_i64_as(t.dtype, t.dims.clone(), &[value]));
            }
            rank += 1;
            continue;
        }
        // Add(a, gated_e) -> a: consumers of the sum read the other term directly. The Add
        // is looked up now, not at discovery: an earlier bypass may have moved the term.
        let term = model.output(r.gate_muls[e], 0);
        let add = match model.consumers(term)[..] {
            [(add, _)] if model.op(add).op_type == "Add" => add,
            _ => return Err(Error::Other(format!("expert {e}'s gated output no longer feeds one Add"))),
        };
        let other = model
            .inputs(add)
            .into_iter()
            .flatten()
            .find(|&v| v != term)
            .ok_or_else(|| Error::Other(format!("{} has no other term", model.op(add).describe())))?;
        let sum = model.output(add, 0);
        for (c, slot) in model.consumers(sum) {
            model.replace_input(c, slot, other);
        }
        model.remove_op(add);
    }
    Ok(())
}

/// Makes input `slot` of `op` a static literal holding its current (folded) value, so a
/// shape computed from a pruned dimension can be rewritten; returns the literal's value id.
fn literal_input(model: &mut Model, op: Id, slot: usize) -> Result<Id> {
    let v = model.input(op, slot).ok_or_else(|| Error::Other("shape input vanished".into()))?;
    if model.value(v).data.is_some() && model.producer(v).is_none() && model.consumers(v).len() == 1 {
        return Ok(v);
    }
    let t = model.value(v).known().cloned().ok_or_else(|| {
        Error::Other(format!("shape input '{}' of {} is not known", model.value(v).name, model.op(op).describe()))
    })?;
    let mut name = format!("{}_pruned_{slot}", model.op(op).name);
    while model.value_id(&name).is_some() {
        name.push('_');
    }
    let mut nv = Value::new(&name, ValueKind::Constant);
    nv.set_data(t);
    let id = model.add_value(nv);
    model.replace_input(op, slot, id);
    Ok(id)
}

/// The masked dense model: the dense model with every pruned unit's consumer slice zeroed,
/// which gates the unit's output to zero (for experts: the router logit set to −∞, so the
/// expert is never routed to and its gate weight is zero). The slim model must compute the
/// same function.
pub fn masked(dense: &Model, groups: &[UnitGroup], keep: &KeepSet) -> Model {
    let mut m = dense.clone();
    for (g, group) in groups.iter().enumerate() {
        let pruned = keep.pruned(g);
        if pruned.is_empty() {
            continue;
        }
        for s in group.slices.iter().filter(|s| matches!(s.role, Role::Consumer | Role::Logit)) {
            let Some(mut t) = m.value(s.tensor).data.clone() else {
                continue;
            };
            let idx: Vec<usize> = pruned.iter().flat_map(|&u| UnitGroup::indices(s, u)).collect();
            if s.role == Role::Logit {
                t.fill_along(s.axis, &idx, -1e30);
            } else {
                t.zero_along(s.axis, &idx);
            }
            m.value_mut(s.tensor).set_data(t);
        }
    }
    m
}
