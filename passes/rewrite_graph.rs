//! RewriteGraph: removes the pruned units physically.
//!
//! For every (tensor, axis) that some group owns, the entries of pruned units are dropped
//! with one index map built from all groups that meet there (concat offsets, a conv's input
//! and output channels belonging to different groups). Then the dependent attributes and
//! shape constants follow: depthwise convs get `group` = their new channel count, and every
//! Reshape literal that counts a group's channels shrinks by `factor` per pruned unit.
//! Shapes are re-inferred and declared fixed dimensions that changed are updated, so the
//! exported `value_info` stays valid. The dense model is kept in the context: the
//! verification builds the masked reference from it.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ir::{Attr, Dim, Id, Model};
use crate::pipeline::{Context, Pass};
use crate::units::{segments_by_tensor_axis, KeepSet, Role, UnitGroup};

pub struct RewriteGraph;

impl Pass for RewriteGraph {
    fn name(&self) -> &'static str {
        "RewriteGraph"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let keep = cx.keep.clone().ok_or_else(|| Error::Other("no selection to apply".into()))?;
        cx.dense = Some(model.clone());
        rewrite(model, &cx.groups, &keep)?;
        let dense_shapes: BTreeMap<Id, Vec<usize>> =
            model.values().into_iter().filter_map(|v| model.value(v).shape.clone().map(|s| (v, s))).collect();
        crate::passes::infer_shapes::infer(model, &cx.input_shapes)?;
        update_declared(model, &dense_shapes);
        Ok(())
    }
}

/// Applies a keep-set to the model in place.
pub fn rewrite(model: &mut Model, groups: &[UnitGroup], keep: &KeepSet) -> Result<()> {
    for ((tensor, axis), owners) in segments_by_tensor_axis(groups) {
        let data =
            model.value(tensor).data.clone().ok_or_else(|| {
                Error::Other(format!("parameter '{}' has no data to slice", model.value(tensor).name))
            })?;
        let n = data.dims[axis];
        let mut dropped = vec![false; n];
        for (g, s) in owners {
            for u in keep.pruned(g) {
                for i in UnitGroup::indices(s, u) {
                    if i >= n {
                        return Err(Error::Other(format!("unit slice out of range in '{}'", model.value(tensor).name)));
                    }
                    dropped[i] = true;
                }
            }
        }
        if dropped.iter().any(|&d| d) {
            let idx: Vec<usize> = (0..n).filter(|&i| !dropped[i]).collect();
            model.value_mut(tensor).set_data(data.take(axis, &idx));
        }
    }
    for (g, group) in groups.iter().enumerate() {
        let pruned = keep.pruned(g).len() as i64;
        if pruned == 0 {
            continue;
        }
        for e in &group.shape_edits {
            let v = model.value(e.tensor);
            let mut vals = v.data.as_ref().map(|t| t.to_i64_vec()).unwrap_or_default();
            let dt = v.data.as_ref().map(|t| (t.dtype, t.dims.clone()));
            let (Some(x), Some((dtype, dims))) = (vals.get_mut(e.element), dt) else {
                return Err(Error::Other(format!("shape constant '{}' has no element {}", v.name, e.element)));
            };
            *x -= pruned * e.factor as i64;
            let t = crate::tensor::Tensor::from_i64_as(dtype, dims, &vals);
            model.value_mut(e.tensor).set_data(t);
        }
        for &op in &group.depthwise {
            let w = model.input(op, 1).ok_or_else(|| Error::Other("depthwise conv lost its weight".into()))?;
            let channels = model.value(w).data.as_ref().map(|d| d.dims[0]).unwrap_or(0);
            model.op_mut(op).set_attr("group", Attr::Int(channels as i64));
        }
    }
    Ok(())
}

/// Declared fixed dimensions that equalled the dense shape follow the slim shape.
fn update_declared(model: &mut Model, dense: &BTreeMap<Id, Vec<usize>>) {
    for v in model.values() {
        let val = model.value(v);
        let (Some(decl), Some(new), Some(old)) = (val.declared.clone(), val.shape.clone(), dense.get(&v)) else {
            continue;
        };
        if decl.len() != new.len() || old.len() != new.len() {
            continue;
        }
        let updated: Vec<Dim> = decl
            .iter()
            .enumerate()
            .map(|(k, d)| match d {
                Dim::Fixed(x) if *x as usize == old[k] && new[k] != old[k] => Dim::Fixed(new[k] as i64),
                d => d.clone(),
            })
            .collect();
        model.value_mut(v).declared = Some(updated);
    }
}

/// The masked dense model: the dense model with every pruned unit's consumer slice zeroed,
/// which gates the unit's output to zero. The slim model must compute the same function.
pub fn masked(dense: &Model, groups: &[UnitGroup], keep: &KeepSet) -> Model {
    let mut m = dense.clone();
    for (g, group) in groups.iter().enumerate() {
        let pruned = keep.pruned(g);
        if pruned.is_empty() {
            continue;
        }
        for s in group.slices.iter().filter(|s| s.role == Role::Consumer) {
            let Some(mut t) = m.value(s.tensor).data.clone() else {
                continue;
            };
            let idx: Vec<usize> = pruned.iter().flat_map(|&u| UnitGroup::indices(s, u)).collect();
            t.zero_along(s.axis, &idx);
            m.value_mut(s.tensor).set_data(t);
        }
    }
    m
}
