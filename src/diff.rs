//! `plprune-onnx diff A B`: what changed between two models — usually a pruned model and
//! its source, but any two ONNX files work.
//!
//! Both models are analysed with the same pipeline `inspect` uses (shapes for one input
//! shape, unit discovery). Unit groups are matched by kind and layer name (the name of the
//! group's first producer node, which pruning keeps). FLOPs count the multiply-adds of
//! Conv, ConvTranspose, MatMul, Gemm and Einsum as 2 per MAC, for the analysed input
//! shape; elementwise ops are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use crate::ir::{Id, Model};
use crate::report::human;
use crate::Session;

#[derive(Serialize)]
pub struct Diff {
    pub a: String,
    pub b: String,
    pub input_shapes: BTreeMap<String, Vec<usize>>,
    pub parameters: Change,
    pub flops: Change,
    /// Per unit kind: units and parameters (exactly as `inspect` counts them).
    pub kinds: BTreeMap<crate::units::UnitKind, KindChange>,
    pub groups: Vec<GroupChange>,
    pub tensors_reshaped: Vec<TensorChange>,
    pub tensors_removed: Vec<String>,
    pub tensors_added: Vec<String>,
    pub nodes_removed: Vec<String>,
    pub nodes_added: Vec<String>,
}

#[derive(Serialize, Clone, Copy, Default)]
pub struct Change {
    pub a: u64,
    pub b: u64,
}

#[derive(Serialize, Default)]
pub struct KindChange {
    pub units: Change,
    pub parameters: Change,
}

#[derive(Serialize)]
pub struct GroupChange {
    pub kind: crate::units::UnitKind,
    pub layer: String,
    pub units_a: Option<usize>,
    pub units_b: Option<usize>,
    pub params_a: u64,
    pub params_b: u64,
}

#[derive(Serialize)]
pub struct TensorChange {
    pub name: String,
    pub shape_a: Vec<usize>,
    pub shape_b: Vec<usize>,
}

/// FLOPs (2 per multiply-add) of the compute-heavy ops, from inferred shapes.
pub fn flops(model: &Model) -> u64 {
    let shape = |v: Option<Id>| v.and_then(|v| model.value(v).shape.clone());
    let mut total = 0u64;
    for op in model.ops() {
        let o = model.op(op);
        let ins = model.inputs(op);
        let out = model.outputs(op).first().and_then(|&v| model.value(v).shape.clone());
        let Some(out) = out else { continue };
        let out_n: u64 = out.iter().map(|&d| d as u64).product();
        let macs = match o.op_type.as_str() {
            "Conv" | "ConvTranspose" => match shape(ins.get(1).copied().flatten()) {
                // out elements × (weight elements per output channel)
                Some(w) if w.len() >= 3 => {
                    let per: u64 = w[1..].iter().map(|&d| d as u64).product();
                    if o.op_type == "Conv" {
                        out_n * per
                    } else {
                        let x = shape(ins.first().copied().flatten()).unwrap_or_default();
                        x.iter().map(|&d| d as u64).product::<u64>() * w[1..].iter().map(|&d| d as u64).product::<u64>()
                    }
                }
                _ => 0,
            },
            "MatMul" | "Gemm" => {
                let a = shape(ins.first().copied().flatten()).unwrap_or_default();
                let k = if o.op_type == "Gemm" && o.attr_i("transA", 0) != 0 { a.first() } else { a.last() };
                out_n * k.copied().unwrap_or(0) as u64
            }
            "Einsum" => {
                // Product of every label's extent = MACs for a contraction.
                let eq = o.attr_str("equation").unwrap_or("").replace(' ', "");
                let lhs = eq.split("->").next().unwrap_or("");
                let mut sizes: BTreeMap<char, u64> = BTreeMap::new();
                for (term, v) in lhs.split(',').zip(&ins) {
                    if let Some(s) = shape(*v) {
                        for (c, d) in
                            term.chars().filter(|c| c.is_alphabetic()).zip(s.iter().rev().take(term.len()).rev())
                        {
                            sizes.insert(c, *d as u64);
                        }
                    }
                }
                sizes.values().product()
            }
            _ => 0,
        };
        total += 2 * macs;
    }
    total
}

impl Diff {
    pub fn build(a: &Session, b: &Session) -> Diff {
        let (ra, rb) = (a.report(), b.report());
        let mut groups: BTreeMap<(crate::units::UnitKind, String), GroupChange> = BTreeMap::new();
        for (r, is_a) in [(&ra, true), (&rb, false)] {
            for g in &r.groups {
                let e = groups.entry((g.kind, g.layer.clone())).or_insert(GroupChange {
                    kind: g.kind,
                    layer: g.layer.clone(),
                    units_a: None,
                    units_b: None,
                    params_a: 0,
                    params_b: 0,
                });
                let params = (g.units_before * g.params_per_unit) as u64;
                if is_a {
                    e.units_a = Some(g.units_before);
                    e.params_a = params;
                } else {
                    e.units_b = Some(g.units_before);
                    e.params_b = params;
                }
            }
        }
        // Keep the source's layer order (file order), then anything only in B.
        let mut ordered = Vec::new();
        for g in ra.groups.iter().chain(&rb.groups) {
            if let Some(x) = groups.remove(&(g.kind, g.layer.clone())) {
                ordered.push(x);
            }
        }
        let weights = |m: &Model| -> BTreeMap<String, Vec<usize>> {
            m.values()
                .into_iter()
                .map(|v| m.value(v))
                .filter(|v| v.data.is_some())
                .map(|v| (v.name.clone(), v.data.as_ref().map(|d| d.dims.clone()).unwrap_or_default()))
                .collect()
        };
        let (wa, wb) = (weights(&a.model), weights(&b.model));
        let tensors_reshaped = wa
            .iter()
            .filter_map(|(n, sa)| {
                let sb = wb.get(n)?;
                (sa != sb).then(|| TensorChange { name: n.clone(), shape_a: sa.clone(), shape_b: sb.clone() })
            })
            .collect();
        let nodes = |m: &Model| -> BTreeSet<String> {
            m.ops().into_iter().map(|o| format!("{} ({})", m.op(o).name, m.op(o).op_type)).collect()
        };
        let (na, nb) = (nodes(&a.model), nodes(&b.model));
        let mut kinds: BTreeMap<crate::units::UnitKind, KindChange> = BTreeMap::new();
        for (r, is_a) in [(&ra, true), (&rb, false)] {
            for (k, v) in &r.kinds {
                let e = kinds.entry(*k).or_default();
                let (u, p) = (v.units.before as u64, v.parameters.before as u64);
                if is_a {
                    (e.units.a, e.parameters.a) = (u, p);
                } else {
                    (e.units.b, e.parameters.b) = (u, p);
                }
            }
        }
        Diff {
            kinds,
            a: ra.input.clone(),
            b: rb.input.clone(),
            input_shapes: a.cx.input_shapes.clone(),
            parameters: Change { a: a.model.parameter_count() as u64, b: b.model.parameter_count() as u64 },
            flops: Change { a: flops(&a.model), b: flops(&b.model) },
            groups: ordered,
            tensors_removed: wa.keys().filter(|n| !wb.contains_key(*n)).cloned().collect(),
            tensors_added: wb.keys().filter(|n| !wa.contains_key(*n)).cloned().collect(),
            tensors_reshaped,
            nodes_removed: na.difference(&nb).cloned().collect(),
            nodes_added: nb.difference(&na).cloned().collect(),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "A: {}\nB: {}", self.a, self.b);
        let shapes: Vec<String> = self.input_shapes.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        let _ = writeln!(s, "input shapes: {}\n", shapes.join(" "));
        let _ =
            writeln!(s, "{:<8} {:>7} {:>7} {:>10} {:>10}  layer", "kind", "units A", "units B", "params A", "params B");
        let opt = |x: Option<usize>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        for g in &self.groups {
            let _ = writeln!(
                s,
                "{:<8} {:>7} {:>7} {:>10} {:>10}  {}",
                g.kind.name(),
                opt(g.units_a),
                opt(g.units_b),
                human(g.params_a as usize),
                human(g.params_b as usize),
                g.layer
            );
        }
        for (k, c) in &self.kinds {
            let _ = writeln!(
                s,
                "{:<8} {:>7} {:>7} {:>10} {:>10}  (total)",
                k.name(),
                c.units.a,
                c.units.b,
                human(c.parameters.a as usize),
                human(c.parameters.b as usize)
            );
        }
        let pct = |c: Change| if c.a == 0 { 0.0 } else { (c.b as f64 - c.a as f64) * 100.0 / c.a as f64 };
        let _ = writeln!(
            s,
            "\nparameters {} -> {} ({:+.1}%)",
            human(self.parameters.a as usize),
            human(self.parameters.b as usize),
            pct(self.parameters)
        );
        let _ = writeln!(
            s,
            "FLOPs      {:.3} G -> {:.3} G ({:+.1}%)",
            self.flops.a as f64 / 1e9,
            self.flops.b as f64 / 1e9,
            pct(self.flops)
        );
        let _ = writeln!(s, "\ntensors reshaped: {}", self.tensors_reshaped.len());
        for t in &self.tensors_reshaped {
            let _ = writeln!(s, "  {:<60} {:?} -> {:?}", t.name, t.shape_a, t.shape_b);
        }
        for (title, list) in [
            ("tensors removed", &self.tensors_removed),
            ("tensors added", &self.tensors_added),
            ("nodes removed", &self.nodes_removed),
            ("nodes added", &self.nodes_added),
        ] {
            let _ = writeln!(s, "{title}: {}", list.len());
            for n in list {
                let _ = writeln!(s, "  {n}");
            }
        }
        s
    }
}
