//! The intermediate representation every pass works on: a bipartite petgraph `StableGraph`
//! of operator nodes and value nodes.
//!
//! Edges run value → op (the edge weight is the op's input slot) and op → value (the output
//! slot). A value has at most one producer; graph inputs and weights have none. Every value
//! answers "is this a weight, a constant or dynamic?" through [`ValueKind`]. The IR knows
//! nothing of protobuf: `origin` fields are plain indices that only the exporter interprets,
//! so whatever a pass does not touch is written back exactly as it was read.
//!
//! `StableGraph` keeps indices valid across removals, and every iteration the passes do is
//! in index order (the order of the source file), so outputs are deterministic.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use petgraph::stable_graph::{NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::tensor::{DType, Tensor};

pub type Id = NodeIndex<u32>;

/// Input slots at or above this number are implicit: outer-scope values read by a
/// sub-graph (If/Loop/Scan bodies). They exist for analysis only and are never exported.
pub const IMPLICIT_SLOT: usize = 1 << 20;

/// An attribute value, decoded. Sub-graphs (If/Loop/Scan bodies) are kept opaque.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    String(Vec<u8>),
    Strings(Vec<Vec<u8>>),
    Tensor(Tensor),
    /// Anything else (graphs, sparse tensors, types): carried through untouched.
    Opaque,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub attrs: Vec<(String, Attr)>,
    /// Index of the NodeProto this op came from (None for ops a pass created).
    pub origin: Option<usize>,
}

impl Op {
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
    pub fn attr_i(&self, name: &str, default: i64) -> i64 {
        match self.attr(name) {
            Some(Attr::Int(i)) => *i,
            _ => default,
        }
    }
    pub fn attr_f(&self, name: &str, default: f32) -> f32 {
        match self.attr(name) {
            Some(Attr::Float(f)) => *f,
            _ => default,
        }
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }
    pub fn attr_str(&self, name: &str) -> Option<&str> {
        match self.attr(name) {
            Some(Attr::String(s)) => std::str::from_utf8(s).ok(),
            _ => None,
        }
    }
    pub fn set_attr(&mut self, name: &str, value: Attr) {
        match self.attrs.iter_mut().find(|(n, _)| n == name) {
            Some((_, a)) => *a = value,
            None => self.attrs.push((name.to_string(), value)),
        }
    }
    /// "Conv '/layer1/Conv'" — how errors and reports name a node.
    pub fn describe(&self) -> String {
        format!("{} '{}'", self.op_type, self.name)
    }
}

/// What a value is, from the point of view of pruning and of the compute engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ValueKind {
    /// A graph input fed at run time.
    Input,
    /// A trainable parameter: an initializer that is not also a graph input.
    Weight,
    /// A constant: the output of a Constant node, or a value folded from constants.
    Constant,
    /// Computed at run time from inputs.
    Dynamic,
}

/// A dimension as declared in the file (graph inputs/outputs, value_info).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Param(String),
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub kind: ValueKind,
    /// Element type, when known (declared, from data, or inferred).
    pub dtype: Option<DType>,
    /// Shape as declared in the file, when it was.
    pub declared: Option<Vec<Dim>>,
    /// Concrete shape for the current input shapes (set by InferShapes).
    pub shape: Option<Vec<usize>>,
    /// Data of weights and Constant-node outputs.
    pub data: Option<Tensor>,
    /// Value known at compile time because it was folded from constants (shape subgraphs).
    pub folded: Option<Tensor>,
    /// Set when a pass changed `data`; the exporter rewrites only these tensors.
    pub data_modified: bool,
}

impl Value {
    pub fn new(name: &str, kind: ValueKind) -> Value {
        Value {
            name: name.to_string(),
            kind,
            dtype: None,
            declared: None,
            shape: None,
            data: None,
            folded: None,
            data_modified: false,
        }
    }

    /// Compile-time contents: stored data or a folded value.
    pub fn known(&self) -> Option<&Tensor> {
        self.data.as_ref().or(self.folded.as_ref())
    }

    pub fn is_static(&self) -> bool {
        matches!(self.kind, ValueKind::Weight | ValueKind::Constant)
    }

    pub fn set_data(&mut self, t: Tensor) {
        self.shape = Some(t.dims.clone());
        self.dtype = Some(t.dtype);
        self.data = Some(t);
        self.data_modified = true;
    }
}

#[derive(Clone, Debug)]
pub enum Element {
    Op(Op),
    Value(Value),
}

/// The model: graph plus its interface. Opset imports and everything else the IR does not
/// model stay with the source document in `onnx_io`.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub graph: StableGraph<Element, usize>,
    pub inputs: Vec<Id>,
    pub outputs: Vec<Id>,
    /// Opset version per domain ("" = ai.onnx).
    pub opsets: BTreeMap<String, i64>,
    names: HashMap<String, Id>,
    /// Graph inputs and outputs whose extent the rewrite narrowed (a KV cache that holds
    /// pruned heads), by name: what the slim model reads and writes of the dense one's.
    pub interface: BTreeMap<String, Narrowed>,
}

/// A graph input or output of the slim model that keeps only some entries of the dense
/// model's along one axis.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Narrowed {
    pub axis: usize,
    /// The dense model's extent on that axis.
    pub dense: usize,
    /// The dense indices kept, in order.
    pub kept: Vec<usize>,
    /// A graph input (else an output).
    pub input: bool,
}

impl Narrowed {
    /// `t` as the slim model sees it: narrowed when it has the dense extent on the axis
    /// (so applying it twice is harmless), else unchanged.
    pub fn apply(&self, t: &Tensor) -> Tensor {
        if t.dims.get(self.axis) == Some(&self.dense) {
            t.take(self.axis, &self.kept)
        } else {
            t.clone()
        }
    }
}

impl Model {
    pub fn add_value(&mut self, v: Value) -> Id {
        let name = v.name.clone();
        let id = self.graph.add_node(Element::Value(v));
        if !name.is_empty() {
            self.names.insert(name, id);
        }
        id
    }

    /// Adds an op wired to existing input values (None = omitted optional input) and
    /// existing output values.
    pub fn add_op(&mut self, op: Op, inputs: &[Option<Id>], outputs: &[Id]) -> Id {
        let id = self.graph.add_node(Element::Op(op));
        for (slot, v) in inputs.iter().enumerate() {
            if let Some(v) = v {
                self.graph.add_edge(*v, id, slot);
            }
        }
        for (slot, v) in outputs.iter().enumerate() {
            self.graph.add_edge(id, *v, slot);
        }
        id
    }

    pub fn value_id(&self, name: &str) -> Option<Id> {
        self.names.get(name).copied().filter(|id| self.graph.contains_node(*id))
    }

    pub fn op(&self, id: Id) -> &Op {
        match &self.graph[id] {
            Element::Op(o) => o,
            Element::Value(v) => panic!("node {} is a value, not an op", v.name),
        }
    }
    pub fn op_mut(&mut self, id: Id) -> &mut Op {
        match &mut self.graph[id] {
            Element::Op(o) => o,
            Element::Value(v) => panic!("node {} is a value, not an op", v.name),
        }
    }
    pub fn value(&self, id: Id) -> &Value {
        match &self.graph[id] {
            Element::Value(v) => v,
            Element::Op(o) => panic!("node {} is an op, not a value", o.name),
        }
    }
    pub fn value_mut(&mut self, id: Id) -> &mut Value {
        match &mut self.graph[id] {
            Element::Value(v) => v,
            Element::Op(o) => panic!("node {} is an op, not a value", o.name),
        }
    }
    pub fn is_op(&self, id: Id) -> bool {
        matches!(self.graph[id], Element::Op(_))
    }

    /// All ops, in index (file) order.
    pub fn ops(&self) -> Vec<Id> {
        let mut v: Vec<Id> = self.graph.node_indices().filter(|&i| self.is_op(i)).collect();
        v.sort();
        v
    }
    /// All values, in index order.
    pub fn values(&self) -> Vec<Id> {
        let mut v: Vec<Id> = self.graph.node_indices().filter(|&i| !self.is_op(i)).collect();
        v.sort();
        v
    }

    /// An op's inputs by slot; None where an optional input is omitted.
    pub fn inputs(&self, op: Id) -> Vec<Option<Id>> {
        let mut slots: Vec<(usize, Id)> = self
            .graph
            .edges_directed(op, Direction::Incoming)
            .filter(|e| *e.weight() < IMPLICIT_SLOT)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        slots.sort();
        let n = slots.last().map(|(s, _)| s + 1).unwrap_or(0);
        let mut out = vec![None; n];
        for (s, v) in slots {
            out[s] = Some(v);
        }
        out
    }
    /// The value at input `slot` of `op`, if present.
    pub fn input(&self, op: Id, slot: usize) -> Option<Id> {
        self.inputs(op).get(slot).copied().flatten()
    }
    /// An op's outputs by slot.
    pub fn outputs(&self, op: Id) -> Vec<Id> {
        let mut slots: Vec<(usize, Id)> =
            self.graph.edges_directed(op, Direction::Outgoing).map(|e| (*e.weight(), e.target())).collect();
        slots.sort();
        slots.into_iter().map(|(_, v)| v).collect()
    }
    pub fn output(&self, op: Id, slot: usize) -> Id {
        self.outputs(op)[slot]
    }
    /// The op producing `value`, with its output slot.
    pub fn producer(&self, value: Id) -> Option<(Id, usize)> {
        self.graph.edges_directed(value, Direction::Incoming).next().map(|e| (e.source(), *e.weight()))
    }
    /// The ops consuming `value` and the slots they read it at, in index order.
    pub fn consumers(&self, value: Id) -> Vec<(Id, usize)> {
        let mut v: Vec<(Id, usize)> =
            self.graph.edges_directed(value, Direction::Outgoing).map(|e| (e.target(), *e.weight())).collect();
        v.sort();
        v
    }
    pub fn is_graph_output(&self, value: Id) -> bool {
        self.outputs.contains(&value)
    }

    /// Ops in a topological order; among ready ops the smallest index goes first, so the
    /// order is the file's order whenever the file was sorted.
    pub fn topo_order(&self) -> Result<Vec<Id>, String> {
        let ops = self.ops();
        let mut pending: HashMap<Id, usize> = HashMap::new();
        let mut ready = BTreeSet::new();
        for &op in &ops {
            let n = self.inputs(op).iter().flatten().filter(|&&v| self.producer(v).is_some()).count();
            if n == 0 {
                ready.insert(op);
            } else {
                pending.insert(op, n);
            }
        }
        let mut order = Vec::with_capacity(ops.len());
        while let Some(op) = ready.pop_first() {
            order.push(op);
            for v in self.outputs(op) {
                for (c, _) in self.consumers(v) {
                    if let Some(n) = pending.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            pending.remove(&c);
                            ready.insert(c);
                        }
                    }
                }
            }
        }
        if !pending.is_empty() {
            let mut stuck: Vec<Id> = pending.keys().copied().collect();
            stuck.sort();
            return Err(format!("the graph has a cycle through {}", self.op(stuck[0]).describe()));
        }
        Ok(order)
    }

    /// Rewires input `slot` of `op` to read `value` instead.
    pub fn replace_input(&mut self, op: Id, slot: usize, value: Id) {
        let old: Vec<_> = self
            .graph
            .edges_directed(op, Direction::Incoming)
            .filter(|e| *e.weight() == slot)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.graph.remove_edge(e);
        }
        self.graph.add_edge(value, op, slot);
    }

    /// Removes an op and the values only it produced.
    pub fn remove_op(&mut self, op: Id) {
        for v in self.outputs(op) {
            let name = self.value(v).name.clone();
            self.graph.remove_node(v);
            self.names.remove(&name);
        }
        self.graph.remove_node(op);
    }

    /// Removes a value that nothing produces or consumes any more.
    pub fn remove_value(&mut self, v: Id) {
        let name = self.value(v).name.clone();
        self.graph.remove_node(v);
        self.names.remove(&name);
    }

    /// Structural checks run after every pass in debug and test builds: edge kinds,
    /// single producers, unique names, inputs present.
    pub fn validate(&self) -> Result<(), String> {
        for id in self.graph.node_indices() {
            match &self.graph[id] {
                Element::Op(op) => {
                    for e in self.graph.edges_directed(id, Direction::Incoming) {
                        if self.is_op(e.source()) {
                            return Err(format!("{} has an op as input", op.describe()));
                        }
                    }
                    let mut seen = BTreeSet::new();
                    for e in self.graph.edges_directed(id, Direction::Outgoing) {
                        if !seen.insert(*e.weight()) {
                            return Err(format!("{} has two values at output slot {}", op.describe(), e.weight()));
                        }
                    }
                }
                Element::Value(v) => {
                    if self.graph.edges_directed(id, Direction::Incoming).count() > 1 {
                        return Err(format!("value '{}' has more than one producer", v.name));
                    }
                    if !v.name.is_empty() && self.names.get(&v.name) != Some(&id) {
                        return Err(format!("value '{}' is not registered under its name", v.name));
                    }
                    if let (Some(d), Some(s)) = (&v.data, &v.shape) {
                        if &d.dims != s {
                            return Err(format!("value '{}' has data {:?} but shape {:?}", v.name, d.dims, s));
                        }
                    }
                }
            }
        }
        for &o in &self.outputs {
            if !self.graph.contains_node(o) {
                return Err("a graph output was removed".into());
            }
        }
        self.topo_order()?;
        Ok(())
    }

    /// Number of elements over all weights (what "parameters" means in reports).
    pub fn parameter_count(&self) -> usize {
        self.values()
            .into_iter()
            .map(|v| self.value(v))
            .filter(|v| v.kind == ValueKind::Weight)
            .map(|v| v.data.as_ref().map(|d| d.numel()).unwrap_or(0))
            .sum()
    }
}
