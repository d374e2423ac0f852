//! InferShapes: concrete shapes and dtypes for every value, for one concrete input shape.
//!
//! Input shapes come from `--input-shape`, else from the calibration batch, else from the
//! declared shapes with symbolic dimensions set to a default (batch 1, other 8, with a
//! warning). Ops are visited in topological order and their rules (`crate::ops`) fold small
//! constant values, so shape subgraphs (Shape → Gather → Unsqueeze → Concat → Reshape)
//! resolve to literal shapes. An op without a rule is opaque: its outputs stay unknown and
//! the op is listed, never an error. A rule that finds inconsistent inputs is an error
//! naming the node. Running it again after a rewrite re-checks the slim graph, and declared
//! fixed dimensions (value_info, outputs) that the rewrite changed follow the new shapes.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::ir::{Dim, Id, Model, ValueKind};
use crate::ops::{self, Fact, OpCtx, FOLD_LIMIT};
use crate::pipeline::{Context, Pass};

pub struct InferShapes;

impl Pass for InferShapes {
    fn name(&self) -> &'static str {
        "InferShapes"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        if cx.input_shapes.is_empty() {
            cx.input_shapes = resolve_input_shapes(cx, model)?;
        }
        // Symbolic sizes set to defaults can contradict each other (a decoder's mask length is
        // the past plus the new tokens): say so with the error.
        let defaulted = cx.warnings.iter().any(|w| w.starts_with(DEFAULTED));
        let opaque = infer(model, &cx.input_shapes).map_err(|e| match e {
            Error::Node { node, op, mut msg, .. } => {
                if defaulted {
                    msg.push_str(&format!(
                        " ({DEFAULTED}; where they must agree with each other, give them with --input-shape \
                         NAME=d0,d1,…)"
                    ));
                }
                Error::Node { path: cx.document.path.clone(), node, op, msg }
            }
            e => e,
        })?;
        cx.opaque_ops.extend(opaque);
        if let Some(dense) = &cx.dense {
            update_declared(model, dense);
        }
        Ok(())
    }
}

const DEFAULTED: &str = "symbolic input dimensions set to 1 (the first) and 8 (any other)";

/// Declared fixed dimensions that equalled the dense shape follow the slim shape.
pub fn update_declared(model: &mut Model, dense: &Model) {
    for v in model.values() {
        let val = model.value(v);
        let (Some(decl), Some(new), Some(old)) =
            (val.declared.clone(), val.shape.clone(), dense_shape(dense, model, v))
        else {
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

/// Picks the concrete shape of each graph input.
fn resolve_input_shapes(cx: &mut Context, model: &Model) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut shapes = BTreeMap::new();
    let mut defaulted = Vec::new();
    for &i in &model.inputs {
        let v = model.value(i);
        if let Some(s) = cx.config.input_shapes.get(&v.name) {
            shapes.insert(v.name.clone(), s.clone());
            continue;
        }
        if let Some(t) = cx.inputs.as_ref().and_then(|b| b.arrays.get(&v.name)) {
            shapes.insert(v.name.clone(), t.dims.clone());
            continue;
        }
        let declared = v.declared.clone().ok_or_else(|| {
            Error::Option(format!(
                "input '{}' has no declared shape: give it with --input-shape {}=d0,d1,…",
                v.name, v.name
            ))
        })?;
        let s: Vec<usize> = declared
            .iter()
            .enumerate()
            .map(|(k, d)| match d {
                Dim::Fixed(x) if *x > 0 => *x as usize,
                _ => {
                    defaulted.push(v.name.clone());
                    if k == 0 {
                        1
                    } else {
                        8
                    }
                }
            })
            .collect();
        shapes.insert(v.name.clone(), s);
    }
    for name in cx.config.input_shapes.keys() {
        if !shapes.contains_key(name) {
            return Err(Error::Option(format!("--input-shape names '{name}', which is not an input of the model")));
        }
    }
    defaulted.dedup();
    if !defaulted.is_empty() {
        let shown: Vec<String> = defaulted
            .iter()
            .map(|n| {
                let dims: Vec<String> = shapes[n].iter().map(|d| d.to_string()).collect();
                format!("{n} [{}]", dims.join(", "))
            })
            .collect();
        cx.warn(format!("{DEFAULTED}: {}; use --input-shape NAME=d0,d1,… to choose", shown.join(", ")));
    }
    Ok(shapes)
}

/// Infers every value's shape; returns the opaque op types (with one node name each).
pub fn infer(model: &mut Model, input_shapes: &BTreeMap<String, Vec<usize>>) -> Result<BTreeMap<String, String>> {
    for &i in &model.inputs.clone() {
        let v = model.value_mut(i);
        v.shape = input_shapes.get(&v.name).cloned();
    }
    let mut opaque = BTreeMap::new();
    let order = model.topo_order().map_err(Error::Other)?;
    for op_id in order {
        let op = model.op(op_id).clone();
        let inputs: Vec<Option<Fact>> = model
            .inputs(op_id)
            .iter()
            .map(|v| {
                v.map(|v| {
                    let val = model.value(v);
                    Fact {
                        dtype: val.dtype,
                        shape: val.shape.clone(),
                        value: val.known().filter(|t| t.numel() <= FOLD_LIMIT).cloned(),
                    }
                })
            })
            .collect();
        let outs = model.outputs(op_id);
        if op.op_type == "Constant" && op.domain.is_empty() {
            continue; // data was set at import
        }
        let domain = if op.domain == "ai.onnx" { "" } else { op.domain.as_str() };
        let Some(rule) = ops::rule(domain, &op.op_type) else {
            opaque
                .entry(format!("{}{}", if domain.is_empty() { "" } else { "com." }, op.op_type))
                .or_insert(op.name.clone());
            for v in outs {
                let val = model.value_mut(v);
                val.shape = None;
                val.folded = None;
            }
            continue;
        };
        let opset = model.opsets.get(domain).copied().unwrap_or(if domain.is_empty() { 17 } else { 1 });
        let facts = rule(&OpCtx { op: &op, inputs: &inputs, opset }).map_err(|msg| Error::Node {
            path: Default::default(),
            node: op.name.clone(),
            op: op.op_type.clone(),
            msg,
        })?;
        for (v, f) in outs.into_iter().zip(facts) {
            let val = model.value_mut(v);
            if f.dtype.is_some() {
                val.dtype = f.dtype;
            }
            val.shape = f.shape;
            if val.kind != ValueKind::Weight {
                val.folded = f.value;
            }
        }
    }
    Ok(opaque)
}

/// The dense shape of the value named like `v`, if it existed before the rewrite.
fn dense_shape<'a>(dense: &'a Model, model: &Model, v: Id) -> Option<&'a Vec<usize>> {
    let id = dense.value_id(&model.value(v).name)?;
    dense.value(id).shape.as_ref()
}
