//! DiscoverUnits: finds the coupled unit groups of conv filters and FFN neurons.
//!
//! Channel propagation, in the spirit of Torch-Pruning's dependency graph. Every Conv
//! (group 1), Gemm and MatMul with a constant 2-D weight *seeds* a channel space: its
//! output channels. The pass then walks the graph in topological order, carrying on each
//! activation a layout (which axis holds the channels, and which segment of it belongs to
//! which space, with how many entries per channel) through ops that treat channels
//! independently: activations, BatchNorm, pools, Pad, depthwise convs, flattening
//! reshapes, transposes, concats (offsets) and elementwise ops with broadcast constants.
//! Two spaces meeting in an elementwise op (a residual Add, x·sigmoid(x)) are tied: they
//! are pruned together or not at all. A space ends at its consumers: the input slice of
//! a Conv, Gemm or MatMul weight.
//!
//! Anything that cannot be proven channel-separable — a graph output, LayerNorm or
//! Softmax over the channel axis, a reshape that splits channels, an op without a rule,
//! a weight shared with a node outside the group — makes the space unprunable, and the
//! reason is recorded for `inspect`. A reshape that splits a projection's channels into
//! (heads, head_dim) turns its space into a space of attention heads, each owning head_dim
//! channels; the attention matmuls tie Q, K and V heads, and the merge reshape hands them to
//! the output projection's rows. Grouped-query attention written out (transformers'
//! `repeat_kv`: K and V go through Unsqueeze → Expand → Reshape, each KV head repeated `r`
//! times) meets Q at the scores MatMul with `r` entries per KV head: the query heads are
//! coarsened into groups of `r`, so a unit is one KV head and its query heads. A fused QKV
//! projection (`[.., 3·H·D]`, reshaped to `[.., 3, H, D]`, or cut by Split/Slice into Q, K
//! and V) is first *partitioned* into its parts, so a head owns D columns in each of the
//! three blocks of the fused weight (one slice per block); Gather, Split and Slice along
//! other axes carry the heads through. Every literal that counts a group's channels
//! (Reshape and Expand targets, Split sizes, Slice bounds) becomes a shape edit, and must be
//! read by that group's ops only. MoE experts are matched separately (`crate::experts`).
//! Assumes InferShapes ran (shapes are concrete).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::Result;
use crate::ir::{Id, Model, IMPLICIT_SLOT};
use crate::pipeline::{Context, Pass};
use crate::units::{AttrEdit, IoSlice, Role, ShapeEdit, ShapeTarget, Slice, UnitGroup, UnitKind, Unprunable};

pub struct DiscoverUnits;

impl Pass for DiscoverUnits {
    fn name(&self) -> &'static str {
        "DiscoverUnits"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let (mut groups, mut unprunable) = discover(model);
        let (experts, blocked) = crate::experts::discover(model);
        groups.extend(experts);
        unprunable.extend(blocked);
        let (experts, blocked) = crate::experts::discover_stacked(model);
        groups.extend(experts);
        unprunable.extend(blocked);
        let (experts, blocked) = crate::experts::discover_ms_moe(model);
        groups.extend(experts);
        unprunable.extend(blocked);
        cx.groups = groups;
        cx.unprunable = unprunable;
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Seg {
    space: usize,
    offset: usize,
    factor: usize,
}

#[derive(Clone, Debug, PartialEq)]
struct Layout {
    axis: usize,
    segs: Vec<Seg>,
}

struct Space {
    kind: UnitKind,
    channels: usize,
    producer: Id,
    reasons: Vec<String>,
}

struct Analysis<'m> {
    model: &'m Model,
    spaces: Vec<Space>,
    parent: Vec<usize>,
    layouts: HashMap<Id, Layout>,
    slices: Vec<(usize, Slice)>,
    shape_edits: Vec<(usize, ShapeEdit)>,
    /// The Reshape each shape edit was recorded for (same order as `shape_edits`).
    shape_readers: Vec<Id>,
    /// Concat inputs computed from a `Shape` read of a space's channel count: each must be
    /// one of the space's shape edits (replaced by the new count), or the space is blocked.
    shape_reads: Vec<(usize, ShapeTarget, Id)>,
    /// Head-count attributes of fused attention ops, by space.
    attr_edits: Vec<(usize, AttrEdit)>,
    depthwise: Vec<(usize, Id)>,
    /// (tensor, op) pairs accounted for by some slice.
    users: BTreeSet<(Id, Id)>,
    /// Graph inputs and outputs that hold channels (KV caches), by space.
    io: Vec<(usize, IoSlice)>,
    /// Concatenations of a cache input that are graph outputs (present caches).
    cache_outputs: BTreeSet<Id>,
}

type Step = std::result::Result<(), String>;

/// Runs the analysis and returns the prunable groups and what is not prunable.
pub fn discover(model: &Model) -> (Vec<UnitGroup>, Vec<Unprunable>) {
    let mut a = Analysis {
        model,
        spaces: Vec::new(),
        parent: Vec::new(),
        layouts: HashMap::new(),
        slices: Vec::new(),
        shape_edits: Vec::new(),
        shape_readers: Vec::new(),
        shape_reads: Vec::new(),
        attr_edits: Vec::new(),
        depthwise: Vec::new(),
        users: BTreeSet::new(),
        io: Vec::new(),
        cache_outputs: BTreeSet::new(),
    };
    let order = model.topo_order().unwrap_or_default();
    for op in order {
        let laid: Vec<(usize, Layout)> = model
            .inputs(op)
            .iter()
            .enumerate()
            .filter_map(|(slot, v)| v.and_then(|v| a.layouts.get(&v).map(|l| (slot, l.clone()))))
            .collect();
        // Sub-graphs reading a channel space make it unprunable.
        for (v, slot) in implicit_inputs(model, op) {
            if let Some(l) = a.layouts.get(&v).cloned() {
                a.block(&l, format!("read by a sub-graph of {} (slot {slot})", model.op(op).describe()));
            }
        }
        if let Err(reason) = a.visit(op, &laid) {
            let why = format!("flows into {}: {reason}", model.op(op).describe());
            for (_, l) in &laid {
                a.block(l, why.clone());
            }
            for out in model.outputs(op) {
                if let Some(l) = a.layouts.remove(&out) {
                    a.block(&l, why.clone());
                }
            }
        }
    }
    a.finish()
}

fn implicit_inputs(model: &Model, op: Id) -> Vec<(Id, usize)> {
    use petgraph::visit::EdgeRef;
    model
        .graph
        .edges_directed(op, petgraph::Direction::Incoming)
        .filter(|e| *e.weight() >= IMPLICIT_SLOT)
        .map(|e| (e.source(), *e.weight() - IMPLICIT_SLOT))
        .collect()
}

const UNARY: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Erf",
    "Gelu",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "Mish",
    "Exp",
    "Log",
    "Abs",
    "Neg",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Identity",
    "Dropout",
    "Cast",
    "Clip",
    "Not",
    "IsNaN",
    "IsInf",
    "ThresholdedRelu",
    "Shrink",
    "Swish",
    "QuickGelu",
];
const BINARY: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Mod",
    "PRelu",
    "Where",
    "Sum",
    "Mean",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "BitShift",
];
const POOLS: &[&str] = &["MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"];
const REDUCE: &[&str] = &[
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

impl<'m> Analysis<'m> {
    fn find(&mut self, s: usize) -> usize {
        let mut r = s;
        while self.parent[r] != r {
            r = self.parent[r];
        }
        self.parent[s] = r;
        r
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.parent[hi] = lo;
            let moved = std::mem::take(&mut self.spaces[hi].reasons);
            self.spaces[lo].reasons.extend(moved);
        }
    }

    fn block(&mut self, l: &Layout, reason: String) {
        for s in &l.segs {
            let r = self.find(s.space);
            if !self.spaces[r].reasons.contains(&reason) {
                self.spaces[r].reasons.push(reason.clone());
            }
        }
    }

    fn shape(&self, v: Id) -> std::result::Result<Vec<usize>, String> {
        self.model.value(v).shape.clone().ok_or_else(|| format!("shape of '{}' is unknown", self.model.value(v).name))
    }

    /// Dims of a constant operand: a stored tensor, or a weight behind a dequantize chain.
    fn static_dims(&self, v: Option<Id>) -> Option<Vec<usize>> {
        let v = v?;
        let val = self.model.value(v);
        match &val.data {
            Some(d) => Some(d.dims.clone()),
            None => self.dequant_parts(v, 0).and_then(|_| val.shape.clone()),
        }
    }

    /// The stored tensors behind a dequantized weight `v` — Cast (f16 → f32), Mul by a
    /// constant scale, DequantizeLinear with zero points 0 (per tensor or per axis) — each
    /// with the op that reads it and its axis lining up with `axis` of `v`; tensors that
    /// broadcast along `axis` are left out. Zeroing a part's slice zeroes the weight's slice
    /// exactly (so masking works through the chain). None when `v` is not such a chain or
    /// an intermediate value has other uses.
    fn dequant_parts(&self, v: Id, axis: usize) -> Option<Vec<(Id, Id, usize)>> {
        let model = self.model;
        let val = model.value(v);
        if val.data.is_some() {
            return None;
        }
        let rank = val.shape.as_ref()?.len();
        let (p, _) = model.producer(v)?;
        if model.consumers(v).len() != 1 || model.is_graph_output(v) {
            return None;
        }
        let o = model.op(p);
        if !o.domain.is_empty() && o.domain != "ai.onnx" {
            return None;
        }
        let ins = model.inputs(p);
        let part = |t: Id, local: usize| -> Option<Vec<(Id, Id, usize)>> {
            if model.value(t).data.is_some() {
                Some(vec![(t, p, local)])
            } else {
                self.dequant_parts(t, local)
            }
        };
        match o.op_type.as_str() {
            "Cast" | "Identity" => {
                let x = ins.first().copied().flatten()?;
                if model.value(x).shape.as_ref()?.len() != rank {
                    return None;
                }
                part(x, axis)
            }
            "Mul" => {
                let mut parts = Vec::new();
                for x in ins.iter().copied() {
                    let x = x?;
                    let sh = model.value(x).shape.clone()?;
                    let Some(local) = (axis + sh.len()).checked_sub(rank) else {
                        // Broadcasts along `axis`: must still be constant.
                        model.value(x).known()?;
                        continue;
                    };
                    if sh[local] == 1 {
                        model.value(x).known()?;
                        continue;
                    }
                    parts.extend(part(x, local)?);
                }
                Some(parts)
            }
            "DequantizeLinear" => {
                if o.attr_i("block_size", 0) != 0 {
                    return None;
                }
                let x = ins.first().copied().flatten()?;
                let scale = ins.get(1).copied().flatten()?;
                let zp = ins.get(2).copied().flatten();
                let xd = model.value(x).data.as_ref()?;
                let sd = model.value(scale).data.as_ref()?;
                if let Some(z) = zp {
                    if model.value(z).data.as_ref()?.to_f64_vec().iter().any(|&q| q != 0.0) {
                        return None; // a zeroed quantized entry would not dequantize to 0
                    }
                }
                let mut parts = vec![(x, p, axis)];
                let dq_axis = o.attr_i("axis", 1);
                let dq_axis = if dq_axis < 0 { dq_axis + xd.dims.len() as i64 } else { dq_axis };
                if sd.numel() > 1 && dq_axis == axis as i64 {
                    parts.push((scale, p, 0));
                    parts.extend(zp.map(|z| (z, p, 0)));
                }
                Some(parts)
            }
            _ => None,
        }
    }

    fn set_layout(&mut self, v: Id, l: Layout) {
        if self.model.is_graph_output(v) {
            if self.cache_outputs.contains(&v) {
                for s in &l.segs {
                    self.io.push((s.space, IoSlice { value: v, axis: l.axis, offset: s.offset, factor: s.factor }));
                }
            } else {
                let name = self.model.value(v).name.clone();
                self.block(&l, format!("reaches graph output '{name}'"));
                return;
            }
        }
        if let Some(old) = self.layouts.get(&v).cloned() {
            if old != l {
                self.block(&old, "conflicting channel layouts".into());
                self.block(&l, "conflicting channel layouts".into());
            }
            return;
        }
        self.layouts.insert(v, l);
    }

    fn new_space(&mut self, kind: UnitKind, channels: usize, producer: Id) -> usize {
        self.spaces.push(Space { kind, channels, producer, reasons: Vec::new() });
        self.parent.push(self.spaces.len() - 1);
        self.spaces.len() - 1
    }

    /// Records `tensor`'s `axis` as owned by the layout's segments. The tensor's extent on
    /// that axis must equal the activation's extent on the layout axis.
    fn add_slices(&mut self, l: &Layout, extent: usize, tensor: Id, axis: usize, role: Role, op: Id) -> Step {
        if self.model.value(tensor).data.is_none() {
            if let Some(parts) = self.dequant_parts(tensor, axis) {
                let dims = self.model.value(tensor).shape.clone().unwrap_or_default();
                if dims.get(axis) != Some(&extent) {
                    return Err(format!(
                        "parameter '{}' has shape {dims:?}, expected {extent} along axis {axis}",
                        self.model.value(tensor).name
                    ));
                }
                self.users.insert((tensor, op));
                for (t, reader, ax) in parts {
                    self.add_slices(l, extent, t, ax, role, reader)?;
                }
                return Ok(());
            }
        }
        let dims = self.static_dims(Some(tensor)).ok_or("a coupled parameter is not constant")?;
        if dims.get(axis) != Some(&extent) {
            return Err(format!(
                "parameter '{}' has shape {dims:?}, expected {extent} along axis {axis}",
                self.model.value(tensor).name
            ));
        }
        for s in &l.segs {
            self.slices.push((s.space, Slice { tensor, axis, offset: s.offset, factor: s.factor, role }));
        }
        self.users.insert((tensor, op));
        Ok(())
    }

    fn seed(&mut self, op: Id, kind: UnitKind, channels: usize, out: Id, axis: usize, params: &[(Id, usize)]) {
        let s = self.new_space(kind, channels, op);
        let l = Layout { axis, segs: vec![Seg { space: s, offset: 0, factor: 1 }] };
        for &(t, ax) in params {
            if let Err(e) = self.add_slices(&l, channels, t, ax, Role::Producer, op) {
                self.block(&l, e);
            }
        }
        self.set_layout(out, l);
    }

    fn visit(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let o = model.op(op);
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        let in_l = |slot: usize| laid.iter().find(|(s, _)| *s == slot).map(|(_, l)| l.clone());
        let t = o.op_type.as_str();
        if o.domain == "com.microsoft" {
            match t {
                "Attention" => return self.visit_packed_attention(op, laid),
                "MultiHeadAttention" | "GroupQueryAttention" => return self.visit_attention(op, laid),
                _ => {}
            }
        }
        if !o.domain.is_empty() && o.domain != "ai.onnx" {
            return if laid.is_empty() { Ok(()) } else { Err(format!("custom-domain op '{}'", o.domain)) };
        }
        match t {
            "Conv" => self.visit_conv(op, laid),
            "Gemm" => {
                let (a, b, c) =
                    (ins.first().copied().flatten(), ins.get(1).copied().flatten(), ins.get(2).copied().flatten());
                let (ta, tb) = (o.attr_i("transA", 0), o.attr_i("transB", 0));
                let bd = self.static_dims(b).filter(|d| d.len() == 2);
                if in_l(1).is_some() || in_l(2).is_some() {
                    return Err("channels reach a Gemm's weight or bias input".into());
                }
                if let Some(l) = in_l(0) {
                    let (Some(b), Some(_)) = (b, &bd) else {
                        return Err("Gemm weight is not constant".into());
                    };
                    if ta != 0 || l.axis != 1 {
                        return Err("channels are not the Gemm's input features".into());
                    }
                    let ext = self.shape(a.ok_or("missing input")?)?[1];
                    self.add_slices(&l, ext, b, if tb != 0 { 1 } else { 0 }, Role::Consumer, op)?;
                }
                if let (Some(b), Some(bd), 0) = (b, bd, ta) {
                    let n = if tb != 0 { bd[0] } else { bd[1] };
                    let mut params = vec![(b, if tb != 0 { 0 } else { 1 })];
                    if let Some(cd) = self.static_dims(c) {
                        match cd.as_slice() {
                            [x] if *x == n => params.push((c.unwrap(), 0)),
                            [_, x] if *x == n => params.push((c.unwrap(), 1)),
                            _ => {}
                        }
                    } else if c.is_some() {
                        return Ok(()); // dynamic bias: no seed
                    }
                    self.seed(op, UnitKind::Neurons, n, outs[0], 1, &params);
                }
                Ok(())
            }
            "MatMul" => {
                let (a, b) = (ins.first().copied().flatten(), ins.get(1).copied().flatten());
                let bd = self.static_dims(b);
                let a_static = a.is_some_and(|a| model.value(a).data.is_some());
                if !laid.is_empty() && bd.is_none() && !a_static {
                    return self.visit_batched_matmul(op, laid);
                }
                if in_l(1).is_some() {
                    return Err("channels are the right operand of a MatMul".into());
                }
                if let Some(l) = in_l(0) {
                    let (Some(b), Some(bd)) = (b, &bd) else {
                        return Err("MatMul of two activations mixes channels".into());
                    };
                    let ash = self.shape(a.ok_or("missing input")?)?;
                    if bd.len() != 2 || l.axis + 1 != ash.len() {
                        return Err("channels are not the MatMul's contracted axis".into());
                    }
                    self.add_slices(&l, ash[l.axis], b, 0, Role::Consumer, op)?;
                }
                if let (Some(b), Some(bd)) = (b, bd) {
                    if bd.len() == 2 && self.model.value(a.ok_or("missing input")?).data.is_none() {
                        let rank = self.shape(outs[0])?.len();
                        self.seed(op, UnitKind::Neurons, bd[1], outs[0], rank - 1, &[(b, 1)]);
                    }
                }
                Ok(())
            }
            "BatchNormalization" | "InstanceNormalization" => {
                for slot in 1..ins.len() {
                    if in_l(slot).is_some() {
                        return Err("channels reach a normalization parameter".into());
                    }
                }
                let Some(l) = in_l(0) else { return Ok(()) };
                if l.axis != 1 {
                    return Err("normalization is not over the channel axis".into());
                }
                let ext = self.shape(ins[0].ok_or("missing input")?)?[1];
                for p in ins.iter().skip(1).flatten() {
                    self.add_slices(&l, ext, *p, 0, Role::Coupled, op)?;
                }
                if let Some(extra) = outs.get(1..) {
                    if extra.iter().any(|&v| !model.consumers(v).is_empty()) {
                        return Err("training-mode statistics outputs are used".into());
                    }
                }
                self.set_layout(outs[0], l);
                Ok(())
            }
            _ if laid.is_empty() => Ok(()),
            _ if UNARY.contains(&t) => {
                if laid.iter().any(|(s, _)| *s != 0) {
                    return Err("channels reach a parameter input".into());
                }
                if outs.len() > 1 && outs[1..].iter().any(|&v| !model.consumers(v).is_empty()) {
                    return Err("a secondary output is used".into());
                }
                self.set_layout(outs[0], laid[0].1.clone());
                Ok(())
            }
            _ if POOLS.contains(&t) => {
                let l = in_l(0).ok_or("channels reach a pool parameter")?;
                if l.axis != 1 {
                    return Err("pooling over the channel axis".into());
                }
                if outs.len() > 1 && !model.consumers(outs[1]).is_empty() {
                    return Err("MaxPool indices (which encode channels) are used".into());
                }
                self.set_layout(outs[0], l);
                Ok(())
            }
            "Pad" => {
                let l = in_l(0).ok_or("channels reach Pad's parameters")?;
                let rank = self.shape(ins[0].ok_or("missing input")?)?.len();
                let pads: Vec<i64> = match o.attr_ints("pads") {
                    Some(p) => p.to_vec(),
                    None => ins
                        .get(1)
                        .copied()
                        .flatten()
                        .and_then(|v| model.value(v).known().map(|t| t.to_i64_vec()))
                        .ok_or("pads are not constant")?,
                };
                let axes: Vec<usize> = match ins.get(3).copied().flatten() {
                    Some(v) => {
                        let t = model.value(v).known().ok_or("Pad axes are not constant")?;
                        t.to_i64_vec()
                            .iter()
                            .map(|&a| if a < 0 { (a + rank as i64) as usize } else { a as usize })
                            .collect()
                    }
                    None => (0..rank).collect(),
                };
                let n = axes.len();
                if let Some(i) = axes.iter().position(|&a| a == l.axis) {
                    if pads.get(i).copied().unwrap_or(0) != 0 || pads.get(i + n).copied().unwrap_or(0) != 0 {
                        return Err("Pad pads the channel axis".into());
                    }
                }
                self.set_layout(outs[0], l);
                Ok(())
            }
            _ if BINARY.contains(&t) => self.visit_elementwise(op, laid),
            "Flatten" | "Reshape" => self.visit_reshape(op, laid),
            "Transpose" => {
                let l = in_l(0).ok_or("missing input")?;
                let rank = self.shape(ins[0].ok_or("missing input")?)?.len();
                let perm: Vec<usize> = match o.attr_ints("perm") {
                    Some(p) => p.iter().map(|&x| x as usize).collect(),
                    None => (0..rank).rev().collect(),
                };
                let axis = perm.iter().position(|&p| p == l.axis).ok_or("bad Transpose perm")?;
                self.set_layout(outs[0], Layout { axis, ..l });
                Ok(())
            }
            "Squeeze" | "Unsqueeze" => {
                let l = in_l(0).ok_or("channels reach the axes input")?;
                let ish = self.shape(ins[0].ok_or("missing input")?)?;
                let osh = self.shape(outs[0])?;
                // Map by position among non-unit dims: the channel axis has extent > 1 when
                // it matters, and squeezing/unsqueezing only moves unit dims.
                if ish[l.axis] == 1 {
                    return Err("channel axis of extent 1".into());
                }
                let k = ish[..l.axis].iter().filter(|&&d| d != 1).count();
                let axis = osh
                    .iter()
                    .enumerate()
                    .filter(|(_, &d)| d != 1)
                    .nth(k)
                    .map(|(i, _)| i)
                    .ok_or("cannot follow the channel axis")?;
                self.set_layout(outs[0], Layout { axis, ..l });
                Ok(())
            }
            "Concat" => self.visit_concat(op, laid),
            "Split" | "Slice" => self.visit_split(op, laid),
            "Gather" => {
                if in_l(1).is_some() {
                    return Err("channels are used as gather indices".into());
                }
                let l = in_l(0).ok_or("missing input")?;
                let rank = self.shape(ins[0].ok_or("missing input")?)?.len() as i64;
                let mut axis = o.attr_i("axis", 0);
                if axis < 0 {
                    axis += rank;
                }
                let axis = usize::try_from(axis).map_err(|_| "bad Gather axis")?;
                if axis == l.axis {
                    return Err("gathers along the channel axis".into());
                }
                let ir = self.shape(ins.get(1).copied().flatten().ok_or("Gather without indices")?)?.len();
                let new_axis = if axis < l.axis { l.axis - 1 + ir } else { l.axis };
                if self.shape(outs[0])?.get(new_axis) != self.shape(ins[0].ok_or("missing input")?)?.get(l.axis) {
                    return Err("cannot follow the channel axis".into());
                }
                self.set_layout(outs[0], Layout { axis: new_axis, ..l });
                Ok(())
            }
            "Softmax" | "LogSoftmax" | "Hardmax" | "LayerNormalization" => {
                let l = in_l(0).ok_or("channels reach a parameter input")?;
                let rank = self.shape(ins[0].ok_or("missing input")?)?.len() as i64;
                let opset = model.opsets.get("").copied().unwrap_or(17);
                let default = if t == "LayerNormalization" || opset >= 13 { -1 } else { 1 };
                let mut axis = o.attr_i("axis", default);
                if axis < 0 {
                    axis += rank;
                }
                let covers =
                    if t == "LayerNormalization" || opset < 13 { l.axis as i64 >= axis } else { l.axis as i64 == axis };
                if covers {
                    return Err("normalizes across the channel axis".into());
                }
                self.set_layout(outs[0], l);
                Ok(())
            }
            _ if REDUCE.contains(&t) => {
                let l = in_l(0).ok_or("channels reach the axes input")?;
                let ish = self.shape(ins[0].ok_or("missing input")?)?;
                let osh = self.shape(outs[0])?;
                let keep = o.attr_i("keepdims", 1) != 0;
                let mut axes: Vec<i64> = match o.attr_ints("axes") {
                    Some(a) => a.to_vec(),
                    None => match ins.get(1).copied().flatten() {
                        Some(v) => model.value(v).known().ok_or("reduce axes are not constant")?.to_i64_vec(),
                        None => vec![],
                    },
                };
                if axes.is_empty() {
                    if o.attr_i("noop_with_empty_axes", 0) != 0 {
                        self.set_layout(outs[0], l);
                        return Ok(());
                    }
                    axes = (0..ish.len() as i64).collect();
                }
                let axes: Vec<usize> =
                    axes.iter().map(|&a| if a < 0 { (a + ish.len() as i64) as usize } else { a as usize }).collect();
                if axes.contains(&l.axis) {
                    return Err("reduces over the channel axis".into());
                }
                let axis = if keep { l.axis } else { l.axis - axes.iter().filter(|&&a| a < l.axis).count() };
                if osh.get(axis) != ish.get(l.axis) {
                    return Err("cannot follow the channel axis".into());
                }
                self.set_layout(outs[0], Layout { axis, ..l });
                Ok(())
            }
            "Attention" => self.visit_attention(op, laid),
            "Expand" => self.visit_expand(op, laid),
            "Shape" => self.visit_shape(op, laid),
            "Size" => Err("the channel count is read as data".into()),
            _ => Err(format!("{t} is not known to keep channels separate")),
        }
    }

    fn visit_conv(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let o = model.op(op);
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        if laid.iter().any(|(s, _)| *s != 0) {
            return Err("channels reach a Conv's weight or bias".into());
        }
        let w = ins.get(1).copied().flatten();
        let b = ins.get(2).copied().flatten();
        let group = o.attr_i("group", 1).max(1) as usize;
        let Some(wd) = self.static_dims(w).filter(|d| d.len() >= 3) else {
            return if laid.is_empty() { Ok(()) } else { Err("Conv weight is not constant".into()) };
        };
        let w = w.unwrap();
        let bias_static = b.is_some_and(|b| model.value(b).data.is_some());
        if b.is_some() && !bias_static {
            return if laid.is_empty() { Ok(()) } else { Err("Conv bias is not constant".into()) };
        }
        let cin = match ins[0] {
            Some(x) => self.shape(x)?.get(1).copied().ok_or("Conv input has no channel axis")?,
            None => return Err("Conv without input".into()),
        };
        let depthwise = group > 1 && group == cin && wd[0] == group && wd[1] == 1;
        if let Some((_, l)) = laid.first() {
            if l.axis != 1 {
                return Err("channels are not the Conv's channel axis".into());
            }
            if group == 1 {
                self.add_slices(l, cin, w, 1, Role::Consumer, op)?;
            } else if depthwise {
                self.add_slices(l, cin, w, 0, Role::Coupled, op)?;
                if let Some(b) = b {
                    self.add_slices(l, cin, b, 0, Role::Coupled, op)?;
                }
                for s in &l.segs {
                    self.depthwise.push((s.space, op));
                }
                if l.segs.len() != 1 || l.segs[0].offset != 0 || l.segs[0].factor != 1 {
                    return Err("depthwise conv over a concatenation".into());
                }
                self.set_layout(outs[0], l.clone());
                return Ok(());
            } else {
                return Err(format!("grouped convolution (group = {group})"));
            }
        }
        if group == 1 {
            let mut params = vec![(w, 0)];
            if let Some(b) = b {
                params.push((b, 0));
            }
            self.seed(op, UnitKind::Filters, wd[0], outs[0], 1, &params);
        }
        Ok(())
    }

    fn visit_elementwise(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        let osh = self.shape(outs[0])?;
        let rank = osh.len();
        let mut out_axis = None;
        let mut first: Option<Layout> = None;
        for (slot, l) in laid {
            let v = ins[*slot].ok_or("missing input")?;
            let r = self.shape(v)?.len();
            let ax = l.axis + rank - r;
            match (&out_axis, &first) {
                (None, _) => {
                    out_axis = Some(ax);
                    first = Some(l.clone());
                }
                (Some(a), Some(f)) => {
                    if *a != ax || f.segs.len() != l.segs.len() {
                        return Err("combines activations whose channel axes differ".into());
                    }
                    for (x, y) in f.segs.iter().zip(&l.segs) {
                        if x.offset != y.offset || x.factor != y.factor {
                            return Err("combines differently laid-out channels".into());
                        }
                        let (cx, cy) = (self.find(x.space), self.find(y.space));
                        if self.spaces[cx].channels != self.spaces[cy].channels {
                            return Err("combines channel groups of different sizes".into());
                        }
                    }
                    let pairs: Vec<(usize, usize)> =
                        f.segs.iter().zip(&l.segs).map(|(x, y)| (x.space, y.space)).collect();
                    for (x, y) in pairs {
                        self.union(x, y);
                    }
                }
                _ => unreachable!(),
            }
        }
        let (ax, l) = (out_axis.ok_or("no channels")?, first.ok_or("no channels")?);
        let extent = osh[ax];
        for (slot, v) in ins.iter().enumerate() {
            let Some(v) = *v else { continue };
            if laid.iter().any(|(s, _)| *s == slot) {
                continue;
            }
            let sh = self.shape(v)?;
            let Some(local) = (ax + sh.len()).checked_sub(rank) else {
                continue;
            };
            if sh[local] == 1 {
                continue;
            }
            if sh[local] != extent {
                return Err("broadcast mismatch".into());
            }
            if model.value(v).data.is_some() {
                self.add_slices(&l, extent, v, local, Role::Coupled, op)?;
            } else {
                return Err(format!(
                    "combined with '{}', which spans the same channels but belongs to no unit group",
                    model.value(v).name
                ));
            }
        }
        self.set_layout(outs[0], Layout { axis: ax, segs: l.segs });
        Ok(())
    }

    /// `Shape` of a channel-carrying tensor. Exporters read batch and sequence sizes this way
    /// (`Shape → Gather(0)`, `Shape → Slice(:-1)`), which pruning leaves alone, and
    /// sometimes the channel count itself to rebuild a shape (`x.view(-1, x.size(-1))`).
    /// The read is followed through Gather and Slice with constant indices, Squeeze,
    /// Unsqueeze, Cast, Identity, and Mul or Div of a one-element value by a literal (the
    /// `Hkv · r` heads of transformers' `repeat_kv`): paths that drop the channel axis end
    /// there; a path that carries the channel count may only end as a one-element input of
    /// a Concat, which must then become one of the group's shape edits (checked in
    /// `finish`, since the Reshape reading it comes later).
    fn visit_shape(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let o = model.op(op);
        let l = laid.first().map(|(_, l)| l.clone()).ok_or("missing input")?;
        let x = model.inputs(op).first().copied().flatten().ok_or("missing input")?;
        let rank = self.shape(x)?.len() as i64;
        let clamp = |a: i64| (if a < 0 { a + rank } else { a }).clamp(0, rank) as usize;
        let (start, end) = (clamp(o.attr_i("start", 0)), clamp(o.attr_i("end", rank)));
        if !(start..end).contains(&l.axis) {
            return Ok(());
        }
        // (value, positions of its elements that hold the channel count)
        let mut work = vec![(model.output(op, 0), vec![l.axis - start])];
        while let Some((v, pos)) = work.pop() {
            if model.is_graph_output(v) {
                return Err("the channel count is read as data (a graph output)".into());
            }
            for (c, slot) in model.consumers(v) {
                let co = model.op(c);
                let cins = model.inputs(c);
                let out = model.output(c, 0);
                let konst = |i: usize| {
                    cins.get(i).copied().flatten().and_then(|v| model.value(v).known().map(|t| t.to_i64_vec()))
                };
                let len = model.value(v).shape.as_ref().map(|s| s.iter().product::<usize>()).unwrap_or(1) as i64;
                let literal_scalar = |i: usize| {
                    cins.get(i).copied().flatten().and_then(|v| model.value(v).data.as_ref()).filter(|t| t.numel() == 1)
                };
                let picked = |idx: &[i64]| -> Vec<usize> {
                    idx.iter()
                        .enumerate()
                        .filter(|(_, &i)| pos.contains(&((if i < 0 { i + len } else { i }) as usize)))
                        .map(|(k, _)| k)
                        .collect()
                };
                let next: Vec<usize> = match (co.op_type.as_str(), slot) {
                    ("Gather", 0) if co.attr_i("axis", 0) == 0 => {
                        picked(&konst(1).ok_or("a shape is gathered at computed indices")?)
                    }
                    ("Slice", 0) => {
                        let (starts, ends) = (konst(1), konst(2));
                        let (Some([b]), Some([e])) = (starts.as_deref(), ends.as_deref()) else {
                            return Err("a shape is sliced at computed bounds".into());
                        };
                        let step = konst(4).and_then(|s| s.first().copied()).unwrap_or(1);
                        if step != 1 || konst(3).is_some_and(|a| a != [0] && a != [-1]) {
                            return Err("a shape is sliced with steps".into());
                        }
                        let norm = |a: i64| (if a < 0 { a + len } else { a }).clamp(0, len);
                        picked(&(norm(*b)..norm(*e)).collect::<Vec<_>>())
                    }
                    ("Squeeze" | "Unsqueeze" | "Cast" | "Identity", 0) => pos.clone(),
                    // repeat_kv's head count `Hkv · r` (or a count divided by a literal):
                    // the one-element result is frozen by the shape edit that must end the
                    // path, which is exact because the other operand is a literal, not a
                    // size read at run time.
                    ("Mul", 0 | 1) | ("Div", 0) if len == 1 && literal_scalar(slot ^ 1).is_some() => pos.clone(),
                    ("Concat", _) if len == 1 => {
                        for s in &l.segs {
                            self.shape_reads.push((s.space, ShapeTarget::ConcatInput { op: c, slot }, op));
                        }
                        vec![]
                    }
                    _ => return Err(format!("the channel count is read as data by {}", co.describe())),
                };
                if !next.is_empty() {
                    work.push((out, next));
                }
            }
        }
        Ok(())
    }

    /// For an op whose data input (slot 0) alone carries channels (Reshape, Expand): its
    /// layout and the input and output shapes.
    fn data_in_out(
        &self,
        op: Id,
        laid: &[(usize, Layout)],
    ) -> std::result::Result<(Layout, Vec<usize>, Vec<usize>), String> {
        let model = self.model;
        if laid.iter().any(|(s, _)| *s != 0) {
            return Err("the channel count is read as a shape".into());
        }
        let ish = self.shape(model.inputs(op)[0].ok_or("missing input")?)?;
        Ok((laid[0].1.clone(), ish, self.shape(model.outputs(op)[0])?))
    }

    /// Expand that leaves the channel axis alone: transformers' `repeat_kv` broadcasts each
    /// KV head along a new axis (`[B, Hkv, 1, S, D] → [B, Hkv, r, S, D]`) before a Reshape
    /// merges the copies into `Hkv·r` heads. The target's element for the channel axis is 1
    /// (nothing to edit) or the channel extent, which becomes a shape edit like a Reshape's.
    fn visit_expand(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let (ins, outs) = (model.inputs(op), model.outputs(op));
        let (l, ish, osh) = self.data_in_out(op, laid)?;
        let axis = (l.axis + osh.len()).checked_sub(ish.len()).ok_or("Expand lowers the rank")?;
        if osh.get(axis) != ish.get(l.axis) {
            return Err("broadcasts the channel axis".into());
        }
        let shape_v = ins.get(1).copied().flatten().ok_or("Expand without a shape")?;
        let target = model.value(shape_v).known().ok_or("Expand target is not known")?.to_i64_vec();
        if let Some(i) = (axis + target.len()).checked_sub(osh.len()) {
            match target[i] {
                1 => {}
                n if n == ish[l.axis] as i64 => {
                    let target =
                        shape_source(model, shape_v, i).ok_or("the channel count is hard-coded in a computed shape")?;
                    for s in &l.segs {
                        self.shape_edits.push((s.space, ShapeEdit { target: target.clone(), factor: s.factor }));
                        self.shape_readers.push(op);
                    }
                }
                n => return Err(format!("Expand target {n} does not match the channel axis")),
            }
        }
        self.set_layout(outs[0], Layout { axis, ..l });
        Ok(())
    }

    fn visit_reshape(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let (ins, outs) = (model.inputs(op), model.outputs(op));
        let (l, ish, osh) = self.data_in_out(op, laid)?;
        let outer: usize = ish[..l.axis].iter().product();
        let inner_in: usize = ish[l.axis + 1..].iter().product();
        let c = ish[l.axis];
        // Find the output axis k whose leading product equals `outer` and whose extent
        // holds each channel as a contiguous block.
        let mut k = None;
        let mut acc = 1usize;
        for (i, &d) in osh.iter().enumerate() {
            if acc == outer && d > 0 {
                let inner_out: usize = osh[i + 1..].iter().product();
                if inner_out > 0 && inner_in.is_multiple_of(inner_out) && d == c * (inner_in / inner_out) {
                    k = Some((i, inner_in / inner_out));
                    break;
                }
            }
            acc *= d;
        }
        let nl = match k {
            Some((axis, m)) => Layout {
                axis,
                segs: l
                    .segs
                    .iter()
                    .map(|s| Seg { space: s.space, offset: s.offset * m, factor: s.factor * m })
                    .collect(),
            },
            None => self.split_heads(&l, &ish, &osh)?,
        };
        let axis = nl.axis;
        if model.op(op).op_type == "Reshape" {
            let shape_v = ins.get(1).copied().flatten().ok_or("Reshape without a shape")?;
            let target = model.value(shape_v).known().ok_or("Reshape target is not known")?.to_i64_vec();
            let lit = *target.get(axis).ok_or("Reshape target too short")?;
            if lit > 0 {
                let target =
                    shape_source(model, shape_v, axis).ok_or("the channel count is hard-coded in a computed shape")?;
                for s in &nl.segs {
                    self.shape_edits.push((s.space, ShapeEdit { target: target.clone(), factor: s.factor }));
                    self.shape_readers.push(op);
                }
            }
        }
        self.set_layout(outs[0], nl);
        Ok(())
    }

    /// A reshape that splits the channel axis into (heads, head_dim): the space becomes a
    /// space of heads, each owning `head_dim` consecutive channels of every coupled tensor.
    fn split_heads(&mut self, l: &Layout, ish: &[usize], osh: &[usize]) -> std::result::Result<Layout, String> {
        let [seg] = l.segs.as_slice() else { return Err("splits a concatenation of channel groups".into()) };
        if seg.offset != 0 {
            return Err("splits part of the channel axis".into());
        }
        let outer: usize = ish[..l.axis].iter().product();
        let inner_in: usize = ish[l.axis + 1..].iter().product();
        let c = ish[l.axis];
        let mut acc = 1usize;
        for (k, &d) in osh.iter().enumerate() {
            let inner_out: usize = osh[k + 1..].iter().product();
            if acc == outer
                && d > 1
                && inner_in > 0
                && inner_out.is_multiple_of(inner_in)
                && d * inner_out == c * inner_in
            {
                // (parts, heads, head_dim): a fused projection (QKV) split into its parts and
                // each part into heads.
                if let Some(&h) = osh.get(k + 1) {
                    let rest: usize = osh[k + 2..].iter().product();
                    if h > 1 && rest.is_multiple_of(inner_in) && rest / inner_in > 1 {
                        return self.split_fused_heads(seg, c, d, h, rest / inner_in, k + 1);
                    }
                }
                let per_head = inner_out / inner_in; // channels per head
                if !per_head.is_multiple_of(seg.factor) {
                    return Err("head size does not align with the channel groups".into());
                }
                let q = per_head / seg.factor;
                let root = self.find(seg.space);
                if !self.spaces[root].channels.is_multiple_of(q) || self.spaces[root].channels / q != d {
                    return Err("head split does not match the channel count".into());
                }
                self.coarsen(root, q);
                return Ok(Layout { axis: k, segs: vec![Seg { space: seg.space, offset: 0, factor: 1 }] });
            }
            acc *= d;
        }
        Err("splits or moves the channel axis".into())
    }

    /// A reshape of a fused projection's `c` channels into (`parts`, `heads`, `head_dim`)
    /// (Q, K and V stacked, e.g. `[B, S, 3·H·D] → [B, S, 3, H, D]`): the space is first
    /// partitioned into its parts, then coarsened into heads, so that head `h` owns channels
    /// `p·H·D + h·D .. p·H·D + (h+1)·D` of every part `p`. The heads ride on `head_axis`.
    fn split_fused_heads(
        &mut self,
        seg: &Seg,
        c: usize,
        parts: usize,
        heads: usize,
        head_dim: usize,
        head_axis: usize,
    ) -> std::result::Result<Layout, String> {
        if !head_dim.is_multiple_of(seg.factor) {
            return Err("head size does not align with the channel groups".into());
        }
        let q = head_dim / seg.factor;
        let root = self.find(seg.space);
        if self.spaces[root].channels * seg.factor != c || self.spaces[root].channels != parts * heads * q {
            return Err("fused head split does not match the channel count".into());
        }
        self.partition(root, parts)?;
        let root = self.find(seg.space);
        self.coarsen(root, q);
        Ok(Layout { axis: head_axis, segs: vec![Seg { space: seg.space, offset: 0, factor: 1 }] })
    }

    /// Splits a space (and its tied spaces) into `n` equal consecutive parts that travel
    /// separately (a fused QKV output cut into Q, K and V): unit `u` of the result owns
    /// channel `u` of every part, so each slice, layout segment and shape edit of the space
    /// is replicated once per part (the parts then become separate segments, as a concat's
    /// inputs are).
    fn partition(&mut self, root: usize, n: usize) -> Step {
        let members: Vec<usize> = (0..self.spaces.len()).filter(|&s| self.find(s) == root).collect();
        let ch = self.spaces[root].channels;
        if n < 2 || !ch.is_multiple_of(n) || members.iter().any(|&m| self.spaces[m].channels != ch) {
            return Err(format!("cannot cut {ch} channels into {n} equal parts"));
        }
        if self.depthwise.iter().any(|(s, _)| members.contains(s)) {
            return Err("a depthwise conv filters channels that are cut into parts".into());
        }
        let per = ch / n;
        for &m in &members {
            self.spaces[m].channels = per;
        }
        let old = std::mem::take(&mut self.slices);
        for (s, sl) in old {
            if members.contains(&s) {
                for p in 0..n {
                    self.slices.push((s, Slice { offset: sl.offset + p * per * sl.factor, ..sl.clone() }));
                }
            } else {
                self.slices.push((s, sl));
            }
        }
        for (s, e) in self.shape_edits.iter_mut() {
            if members.contains(s) {
                e.factor *= n;
            }
        }
        for (s, e) in self.attr_edits.iter_mut() {
            if members.contains(s) {
                e.factor *= n;
            }
        }
        for l in self.layouts.values_mut() {
            if !l.segs.iter().any(|s| members.contains(&s.space)) {
                continue;
            }
            l.segs = l
                .segs
                .iter()
                .flat_map(|s| {
                    if members.contains(&s.space) {
                        (0..n).map(|p| Seg { offset: s.offset + p * per * s.factor, ..s.clone() }).collect()
                    } else {
                        vec![s.clone()]
                    }
                })
                .collect();
        }
        Ok(())
    }

    /// Split or Slice. Along another axis the channels pass through unchanged. Along the
    /// channel axis each output keeps the channel groups lying wholly inside its range; a
    /// single space cut into `n` equal parts (a fused QKV output split into Q, K and V) is
    /// first partitioned, so that each unit owns one channel of every part.
    fn visit_split(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let o = model.op(op);
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        if laid.iter().any(|(s, _)| *s != 0) {
            return Err("channels reach a parameter input".into());
        }
        let x = ins.first().copied().flatten().ok_or("missing input")?;
        let ish = self.shape(x)?;
        let mut l = laid[0].1.clone();
        let c = ish[l.axis];
        let rank = ish.len() as i64;
        let norm = |a: i64| if a < 0 { a + rank } else { a };
        // The range of the channel axis each output reads.
        let mut ranges = Vec::with_capacity(outs.len());
        let mut off = 0;
        for &out in &outs {
            let osh = self.shape(out)?;
            if osh.len() != ish.len() {
                return Err("changes the rank".into());
            }
            let len = osh[l.axis];
            let start = if len == c {
                0
            } else if o.op_type == "Split" {
                if norm(o.attr_i("axis", 0)) != l.axis as i64 {
                    return Err("cannot follow the channel axis".into());
                }
                off
            } else {
                slice_start(model, op, l.axis, c)?
            };
            off += len;
            ranges.push((start, start + len));
        }
        let extent = |a: &mut Self, s: &Seg| {
            let r = a.find(s.space);
            a.spaces[r].channels * s.factor
        };
        let mut straddles = false;
        for s in &l.segs {
            let e = extent(self, s);
            straddles |=
                ranges.iter().any(|&(a, b)| !(a <= s.offset && s.offset + e <= b) && s.offset < b && a < s.offset + e);
        }
        if straddles {
            let cut = Err("cuts through a channel group".to_string());
            let [seg] = l.segs.as_slice() else { return cut };
            let len = ranges[0].1 - ranges[0].0;
            let root = self.find(seg.space);
            if seg.offset != 0
                || self.spaces[root].channels * seg.factor != c
                || len == 0
                || c % len != 0
                || ranges.iter().any(|&(a, b)| b - a != len || a % len != 0)
            {
                return cut;
            }
            self.partition(root, c / len)?;
            l = self.layouts.get(&x).cloned().ok_or("the channels' layout was lost")?;
        }
        // Entries (per unit, by space) of the channel axis inside [a, b).
        let count = |me: &mut Self, a: usize, b: usize| -> BTreeMap<usize, usize> {
            let mut m = BTreeMap::new();
            for s in &l.segs {
                if a <= s.offset && s.offset + extent(me, s) <= b {
                    *m.entry(me.find(s.space)).or_insert(0) += s.factor;
                }
            }
            m
        };
        for (k, &out) in outs.iter().enumerate() {
            let (a, b) = ranges[k];
            let mut segs = Vec::new();
            for s in &l.segs {
                if a <= s.offset && s.offset + extent(self, s) <= b {
                    segs.push(Seg { offset: s.offset - a, ..s.clone() });
                }
            }
            if (a, b) != (0, c) {
                // The literals that delimit the range shrink with the units inside (Split
                // sizes) or below (Slice starts and ends).
                if o.op_type == "Split" {
                    if o.attr_ints("split").is_some() {
                        return Err("Split sizes are an attribute".into());
                    }
                    if let Some(sizes) = ins.get(1).copied().flatten() {
                        let per = count(self, a, b);
                        self.edit_literal(op, sizes, k, per)?;
                    }
                } else {
                    let i = slice_axis_index(model, op, l.axis)?;
                    let (starts, ends) = (ins.get(1).copied().flatten(), ins.get(2).copied().flatten());
                    let (Some(starts), Some(ends)) = (starts, ends) else {
                        return Err("Slice bounds are attributes".into());
                    };
                    let lit = |v: Id| model.value(v).known().and_then(|t| t.to_i64_vec().get(i).copied());
                    let (s0, e0) = (lit(starts).ok_or("Slice start unknown")?, lit(ends).ok_or("Slice end unknown")?);
                    if s0 < 0 || e0 < 0 {
                        return Err("Slice bounds count from the end of the channel axis".into());
                    }
                    if a > 0 {
                        let per = count(self, 0, a);
                        self.edit_literal(op, starts, i, per)?;
                    }
                    if (e0 as usize) < c {
                        let per = count(self, 0, b);
                        self.edit_literal(op, ends, i, per)?;
                    }
                }
            }
            if !segs.is_empty() {
                self.set_layout(out, Layout { axis: l.axis, segs });
            }
        }
        Ok(())
    }

    /// Records that element `element` of the integer vector `v` (read by `op`) counts
    /// `factor` entries per unit of each space in `per`.
    fn edit_literal(&mut self, op: Id, v: Id, element: usize, per: BTreeMap<usize, usize>) -> Step {
        if per.is_empty() {
            return Ok(());
        }
        let target = shape_source(self.model, v, element).ok_or("a channel count is computed, not a literal")?;
        for (space, factor) in per {
            self.shape_edits.push((space, ShapeEdit { target: target.clone(), factor }));
            self.shape_readers.push(op);
        }
        Ok(())
    }

    /// An attention op that splits its Q, K and V inputs into heads itself: ONNX
    /// `Attention` (3-D inputs with `q_num_heads`/`kv_num_heads`, or 4-D `[B, H, S, D]`
    /// inputs whose heads come from a reshape), com.microsoft `MultiHeadAttention` and
    /// `GroupQueryAttention`. One unit is one KV head with the `r = Hq / Hkv` query heads that
    /// read it (a head when `r = 1`): the Q space is coarsened to `r·D` channels per unit, K
    /// and V to `D` (`Dv`), and the three are tied. The output carries the units (`r·Dv`
    /// channels each) to the output projection. Head-count attributes become attribute
    /// edits; a packed bias input is sliced in its three blocks. Inputs that hold one entry
    /// per head (KV caches, per-head attention biases, head sinks) or used cache outputs
    /// make the heads unprunable.
    fn visit_attention(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        if laid.is_empty() {
            return Ok(());
        }
        let model = self.model;
        let o = model.op(op);
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        let in_l = |slot: usize| laid.iter().find(|(s, _)| *s == slot).map(|(_, l)| l.clone());
        // (cache inputs, per-head bias inputs, per-head vectors, packed bias)
        let (caches, biases, per_head, packed): (&[usize], &[usize], &[usize], Option<usize>) =
            match (o.domain.as_str(), o.op_type.as_str()) {
                ("com.microsoft", "MultiHeadAttention") => (&[6, 7, 8, 9], &[5], &[], Some(3)),
                ("com.microsoft", "GroupQueryAttention") => (&[3, 4, 12, 13], &[10], &[11], None),
                _ => (&[4, 5], &[3], &[], None),
            };
        if laid.iter().any(|(s, _)| *s > 2) {
            return Err("channels reach an attention mask, bias or cache input".into());
        }
        for &slot in caches {
            if ins.get(slot).copied().flatten().is_some() {
                return Err("a KV-cache input holds the heads".into());
            }
        }
        for &slot in per_head {
            if let Some(v) = ins.get(slot).copied().flatten() {
                return Err(format!("'{}' holds one entry per head", model.value(v).name));
            }
        }
        for &slot in biases {
            if let Some(v) = ins.get(slot).copied().flatten() {
                let sh = self.shape(v)?;
                if sh.len() >= 3 && sh[sh.len() - 3] > 1 {
                    return Err(format!("'{}' has one slice per head", model.value(v).name));
                }
            }
        }
        for &v in outs.iter().skip(1) {
            if !model.consumers(v).is_empty() || model.is_graph_output(v) {
                return Err(format!("output '{}' (a KV cache or QK product) is used", model.value(v).name));
            }
        }
        let mut qkv = Vec::with_capacity(3);
        for slot in 0..3 {
            let v = ins.get(slot).copied().flatten().ok_or("packed QKV (no separate key and value inputs)")?;
            let l = in_l(slot)
                .ok_or_else(|| format!("'{}' spans the heads but belongs to no unit group", model.value(v).name))?;
            qkv.push((v, self.shape(v)?, l));
        }
        let rank = qkv[0].1.len();
        if qkv.iter().any(|(_, s, _)| s.len() != rank) || !(rank == 3 || (rank == 4 && o.domain.is_empty())) {
            return Err("Q, K and V are not all [B, S, H·D] (or all [B, H, S, D])".into());
        }
        let attr = |name: &str| -> std::result::Result<usize, String> {
            match o.attr(name) {
                Some(_) if o.attr_i(name, 0) > 0 => Ok(o.attr_i(name, 0) as usize),
                _ => Err(format!("attribute {name} is missing or not positive")),
            }
        };
        let (hq, hkv) = if rank == 4 {
            (qkv[0].1[1], qkv[1].1[1])
        } else if o.domain.is_empty() {
            (attr("q_num_heads")?, attr("kv_num_heads")?)
        } else if o.op_type == "MultiHeadAttention" {
            (attr("num_heads")?, attr("num_heads")?)
        } else {
            (attr("num_heads")?, attr("kv_num_heads")?)
        };
        if hkv == 0 || hq % hkv != 0 {
            return Err(format!("{hq} query heads do not group over {hkv} KV heads"));
        }
        let r = hq / hkv;
        let axis = if rank == 3 { 2 } else { 1 };
        let heads_of = |i: usize| if i == 0 { hq } else { hkv };
        // Entries of each input's layout axis per unit.
        let mut per = Vec::with_capacity(3);
        for (i, (_, sh, _)) in qkv.iter().enumerate() {
            let h = heads_of(i);
            if sh[axis] % h != 0 {
                return Err(format!("{} entries do not split into {h} heads", sh[axis]));
            }
            let heads_per_unit = if i == 0 { r } else { 1 };
            let unit = if rank == 3 { (sh[axis] / h) * heads_per_unit } else { heads_per_unit };
            per.push(unit);
        }
        let (dq, dv) = (qkv[0].1[axis] / hq, qkv[2].1[axis] / hkv);
        let mut coarsen: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, (_, sh, l)) in qkv.iter().enumerate() {
            let [seg] = l.segs.as_slice() else {
                return Err("heads of several layers meet in one attention input".into());
            };
            let root = self.find(seg.space);
            if l.axis != axis || seg.offset != 0 || self.spaces[root].channels * seg.factor != sh[axis] {
                return Err("the heads do not line up with the projection's channels".into());
            }
            if per[i] % seg.factor != 0 {
                return Err("head size does not align with the channel groups".into());
            }
            let q = per[i] / seg.factor;
            if !self.spaces[root].channels.is_multiple_of(q) || self.spaces[root].channels / q != hkv {
                return Err("head split does not match the channel count".into());
            }
            if coarsen.insert(root, q).is_some_and(|old| old != q) {
                return Err("one projection feeds Q, K or V with different head sizes".into());
            }
        }
        for (&root, &q) in &coarsen {
            self.coarsen(root, q);
        }
        let spaces: Vec<usize> = qkv.iter().map(|(_, _, l)| l.segs[0].space).collect();
        self.union(spaces[0], spaces[1]);
        self.union(spaces[0], spaces[2]);
        let space = spaces[0];
        if let Some(slot) = packed {
            if let Some(b) = ins.get(slot).copied().flatten() {
                let dims = self.static_dims(Some(b)).ok_or("the packed bias is not constant")?;
                if dims != [hq * dq * 2 + hkv * dv] || r != 1 || self.model.value(b).data.is_none() {
                    return Err(format!("packed bias of shape {dims:?} does not match the heads"));
                }
                for (offset, factor) in [(0, dq), (hq * dq, dq), (2 * hq * dq, dv)] {
                    self.slices.push((space, Slice { tensor: b, axis: 0, offset, factor, role: Role::Coupled }));
                }
                self.users.insert((b, op));
            }
        }
        if rank == 3 {
            let names: &[(&str, usize)] = match (o.domain.as_str(), o.op_type.as_str()) {
                ("com.microsoft", "MultiHeadAttention") => &[("num_heads", 1)],
                ("com.microsoft", _) => &[("num_heads", r), ("kv_num_heads", 1)],
                _ => &[("q_num_heads", r), ("kv_num_heads", 1)],
            };
            for &(name, factor) in names {
                self.attr_edits.push((space, AttrEdit { op, name: name.to_string(), factor }));
            }
        }
        let factor = if rank == 3 { r * dv } else { r };
        self.set_layout(outs[0], Layout { axis, segs: vec![Seg { space, offset: 0, factor }] });
        Ok(())
    }

    /// com.microsoft `Attention`: the Q, K and V projections are inside the op (packed
    /// weight `[C, 3·H·D]`, bias `[3·H·D]`), so the op seeds a space of `num_heads` heads,
    /// each owning `D` columns of each of the three blocks (and of the bias); channels
    /// arriving on its input are consumed by the weight's rows, like a MatMul's.
    fn visit_packed_attention(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let o = model.op(op);
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        if laid.iter().any(|(s, _)| *s != 0) {
            return Err("channels reach the weights, bias, mask or cache of an attention op".into());
        }
        let w = ins.get(1).copied().flatten().ok_or("missing weights")?;
        let wd = self.static_dims(Some(w)).filter(|d| d.len() == 2).ok_or("the packed QKV weight is not constant")?;
        if let Some((_, l)) = laid.first() {
            let x = ins[0].ok_or("missing input")?;
            if l.axis + 1 != self.shape(x)?.len() {
                return Err("channels are not the attention input's features".into());
            }
            self.add_slices(l, wd[0], w, 0, Role::Consumer, op)?;
        }
        let heads = o.attr_i("num_heads", 0).max(0) as usize;
        if heads == 0 || wd[1] % (3 * heads) != 0 {
            return Err(format!("packed weight {wd:?} does not split into 3 blocks of {heads} heads"));
        }
        let d = wd[1] / (3 * heads);
        let s = self.new_space(UnitKind::Heads, heads, op);
        let l = Layout { axis: 2, segs: vec![Seg { space: s, offset: 0, factor: d }] };
        let mut reasons = Vec::new();
        if o.attr("qkv_hidden_sizes").is_some() {
            reasons.push("the qkv_hidden_sizes attribute is not rewritten".to_string());
        }
        if ins.get(4).copied().flatten().is_some() || outs.iter().skip(1).any(|&v| !model.consumers(v).is_empty()) {
            reasons.push("a KV cache (past/present) holds the heads".to_string());
        }
        if let Some(v) = ins.get(5).copied().flatten() {
            let sh = self.shape(v)?;
            if sh.len() >= 3 && sh[sh.len() - 3] > 1 {
                reasons.push(format!("'{}' has one slice per head", model.value(v).name));
            }
        }
        let block = |a: &mut Self, t: Id, axis: usize, role: Role| -> Step {
            let dims = a.static_dims(Some(t)).ok_or("a packed parameter is not constant")?;
            if dims.get(axis) != Some(&(3 * heads * d)) {
                return Err(format!("packed parameter of shape {dims:?} does not hold 3 blocks of {heads} heads"));
            }
            for p in 0..3 {
                let seg = Layout { axis: l.axis, segs: vec![Seg { space: s, offset: p * heads * d, factor: d }] };
                a.add_slices(&seg, 3 * heads * d, t, axis, role, op)?;
            }
            Ok(())
        };
        if let Err(e) = block(self, w, 1, Role::Producer) {
            reasons.push(e);
        }
        if let Some(b) = ins.get(2).copied().flatten() {
            if let Err(e) = block(self, b, 0, Role::Coupled) {
                reasons.push(e);
            }
        }
        self.spaces[s].reasons.extend(reasons);
        self.attr_edits.push((s, AttrEdit { op, name: "num_heads".into(), factor: 1 }));
        self.set_layout(outs[0], l);
        Ok(())
    }

    /// Groups `q` consecutive units of a space (and its tied spaces) into one head.
    fn coarsen(&mut self, root: usize, q: usize) {
        if q == 1 && self.spaces[root].kind == UnitKind::Heads {
            return;
        }
        let members: Vec<usize> = (0..self.spaces.len()).filter(|&s| self.find(s) == root).collect();
        for &m in &members {
            self.spaces[m].channels /= q;
            self.spaces[m].kind = UnitKind::Heads;
        }
        for (s, sl) in self.slices.iter_mut() {
            if members.contains(s) {
                sl.factor *= q;
            }
        }
        for (s, e) in self.shape_edits.iter_mut() {
            if members.contains(s) {
                e.factor *= q;
            }
        }
        for (s, e) in self.attr_edits.iter_mut() {
            if members.contains(s) {
                e.factor *= q;
            }
        }
        for l in self.layouts.values_mut() {
            for seg in l.segs.iter_mut() {
                if members.contains(&seg.space) {
                    seg.factor *= q;
                }
            }
        }
    }

    /// MatMul of two activations (attention scores, context): channels may ride on a batch
    /// axis (the head axis) of either operand; both operands' heads are tied. When one
    /// operand's units own `r` times as many entries of that axis as the other's (grouped-
    /// query attention written out: each KV head repeated `r` times by `repeat_kv`), the
    /// finer operand's heads are first coarsened into groups of `r`, so that a unit is one
    /// KV head with the `r` query heads that read it.
    fn visit_batched_matmul(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let ins = model.inputs(op);
        let out = model.outputs(op)[0];
        let ro = self.shape(out)?.len();
        if let [(sa, la), (sb, lb)] = laid {
            // The output axis of a batch (not row or contracted) axis of an operand.
            let batch_axis = |a: &Self, slot: usize, l: &Layout| -> Option<usize> {
                let r = a.shape(ins[slot]?).ok()?.len();
                (r >= 3 && l.axis + 2 < r && r <= ro).then(|| l.axis + ro - r)
            };
            if let (Some(x), Some(y)) = (batch_axis(self, *sa, la), batch_axis(self, *sb, lb)) {
                if x == y {
                    self.group_repeated_heads(la, lb);
                }
            }
        }
        // Coarsening rewrote the stored layouts: read them again.
        let laid: Vec<(usize, Layout)> = laid
            .iter()
            .map(|(slot, l)| {
                let now = ins[*slot].and_then(|v| self.layouts.get(&v).cloned());
                (*slot, now.unwrap_or_else(|| l.clone()))
            })
            .collect();
        let laid = laid.as_slice();
        let mut target: Option<(usize, Layout)> = None;
        for (slot, l) in laid {
            let v = ins[*slot].ok_or("missing input")?;
            let r = self.shape(v)?.len();
            if r < 3 || l.axis + 2 >= r {
                return Err("channels are a contracted or row axis of a MatMul of two activations".into());
            }
            let ax = l.axis + ro - r;
            match &target {
                None => target = Some((ax, l.clone())),
                Some((a, f)) => {
                    if *a != ax || f.segs.len() != l.segs.len() {
                        return Err("heads of the two operands do not line up".into());
                    }
                    let pairs: Vec<(usize, usize)> =
                        f.segs.iter().zip(&l.segs).map(|(x, y)| (x.space, y.space)).collect();
                    for ((x, y), (sx, sy)) in f.segs.iter().zip(&l.segs).zip(pairs) {
                        let (rx, ry) = (self.find(sx), self.find(sy));
                        if x.offset != y.offset
                            || x.factor != y.factor
                            || self.spaces[rx].channels != self.spaces[ry].channels
                        {
                            return Err("heads of the two operands do not line up".into());
                        }
                        self.union(sx, sy);
                    }
                }
            }
        }
        let (ax, l) = target.ok_or("no channels")?;
        // An operand without heads must broadcast over the head axis.
        for (slot, v) in ins.iter().enumerate() {
            let Some(v) = *v else { continue };
            if laid.iter().any(|(s, _)| *s == slot) {
                continue;
            }
            let sh = self.shape(v)?;
            if let Some(local) = (ax + sh.len()).checked_sub(ro) {
                if sh[local] != 1 {
                    return Err(format!("'{}' spans the heads but belongs to no unit group", model.value(v).name));
                }
            }
        }
        self.set_layout(out, Layout { axis: ax, segs: l.segs });
        Ok(())
    }

    /// Two single-space layouts of the same axis whose units own `f` and `r·f` entries of
    /// it, with `r` times as many units on the finer side: coarsens the finer space by `r`.
    /// Entry `j` of one operand meets entry `j` of the other, so unit `u` of both then covers
    /// entries `u·r·f .. (u+1)·r·f`. Anything else is left for the caller to reject.
    fn group_repeated_heads(&mut self, a: &Layout, b: &Layout) {
        let ([x], [y]) = (a.segs.as_slice(), b.segs.as_slice()) else { return };
        if x.offset != y.offset || x.factor == y.factor {
            return;
        }
        let (fine, coarse) = if x.factor < y.factor { (x, y) } else { (y, x) };
        if coarse.factor % fine.factor != 0 {
            return;
        }
        let r = coarse.factor / fine.factor;
        let (rf, rc) = (self.find(fine.space), self.find(coarse.space));
        if rf != rc && self.spaces[rf].channels == r * self.spaces[rc].channels {
            self.coarsen(rf, r);
        }
    }

    fn visit_concat(&mut self, op: Id, laid: &[(usize, Layout)]) -> Step {
        let model = self.model;
        let ins = model.inputs(op);
        let outs = model.outputs(op);
        let osh = self.shape(outs[0])?;
        let mut axis = model.op(op).attr_i("axis", 0);
        if axis < 0 {
            axis += osh.len() as i64;
        }
        let axis = axis as usize;
        if laid.iter().any(|(_, l)| l.axis != axis) {
            return self.visit_elementwise_like_concat(op, laid, axis);
        }
        let mut segs = Vec::new();
        let mut offset = 0;
        for (slot, v) in ins.iter().enumerate() {
            let v = v.ok_or("missing input")?;
            let ext = self.shape(v)?[axis];
            if let Some((_, l)) = laid.iter().find(|(s, _)| *s == slot) {
                segs.extend(l.segs.iter().map(|s| Seg { space: s.space, offset: s.offset + offset, factor: s.factor }));
            }
            offset += ext;
        }
        self.set_layout(outs[0], Layout { axis, segs });
        Ok(())
    }

    /// Concat along another axis: every input must carry the same channels. A graph input
    /// among them, when the channels are attention heads, is a cache (a KV cache's past
    /// keys or values, concatenated with the new ones along the sequence): it takes the
    /// heads' layout and becomes part of the group's interface, and so does the
    /// concatenation when it is a graph output (the present cache).
    fn visit_elementwise_like_concat(&mut self, op: Id, laid: &[(usize, Layout)], axis: usize) -> Step {
        let model = self.model;
        let ins = model.inputs(op);
        let n = ins.iter().flatten().count();
        if laid.is_empty() || laid.iter().any(|(_, l)| l.axis == axis) {
            return Err("concatenates channels with other data".into());
        }
        let mut laid = laid.to_vec();
        if laid.len() != n {
            // Only a cache of attention heads may join the interface; anything else joined
            // with an input along another axis stays blocked.
            let heads = laid.iter().flat_map(|(_, l)| &l.segs).all(|s| {
                let r = self.find(s.space);
                self.spaces[r].kind == UnitKind::Heads
            });
            if !heads {
                return Err("concatenates channels with other data".into());
            }
            let (slot0, l) = laid[0].clone();
            let rank = self.shape(ins[slot0].ok_or("missing input")?)?.len();
            for (slot, v) in ins.iter().enumerate() {
                let Some(v) = *v else { continue };
                if laid.iter().any(|(s, _)| *s == slot) {
                    continue;
                }
                let name = &model.value(v).name;
                if self.shape(v)?.len() != rank {
                    return Err(format!("concatenates channels with graph input '{name}' of another rank"));
                }
                self.cache_input(v, &l)?;
                laid.push((slot, l.clone()));
            }
            let out = model.output(op, 0);
            if model.is_graph_output(out) {
                self.cache_outputs.insert(out);
            }
        }
        self.visit_elementwise(op, &laid)
    }

    /// `v`, a graph input (a cache) or a copy of one (one-input Concat or Identity, as
    /// transformers' DynamicCache writes when it is filled), holds the channels of layout
    /// `l`: the graph input is owned unit by unit like a parameter, and every other reader
    /// of it and its copies must be a Shape read of other axes.
    fn cache_input(&mut self, v: Id, l: &Layout) -> Step {
        let model = self.model;
        let mut chain = vec![v];
        let mut cur = v;
        while !model.inputs.contains(&cur) {
            let other = || format!("concatenates channels with other data ('{}')", model.value(v).name);
            let (p, _) = model.producer(cur).ok_or_else(other)?;
            let ins: Vec<Id> = model.inputs(p).into_iter().flatten().collect();
            if !(matches!(model.op(p).op_type.as_str(), "Concat" | "Identity") && ins.len() == 1) {
                return Err(other());
            }
            cur = ins[0];
            chain.push(cur);
        }
        let name = model.value(cur).name.clone();
        for &x in &chain {
            if let Some(old) = self.layouts.get(&x) {
                if old != l {
                    return Err(format!("cache input '{name}' holds two channel layouts"));
                }
                continue;
            }
            if model.is_graph_output(x) {
                return Err(format!("cache input '{name}' is also a graph output"));
            }
            self.layouts.insert(x, l.clone());
            for (c, _) in model.consumers(x) {
                match model.op(c).op_type.as_str() {
                    "Concat" | "Identity" => {}
                    "Shape" => self.visit_shape(c, &[(0, l.clone())])?,
                    _ => return Err(format!("cache input '{name}' is also read by {}", model.op(c).describe())),
                }
            }
        }
        for s in &l.segs {
            self.io.push((s.space, IoSlice { value: cur, axis: l.axis, offset: s.offset, factor: s.factor }));
        }
        Ok(())
    }

    fn finish(mut self) -> (Vec<UnitGroup>, Vec<Unprunable>) {
        let model = self.model;
        let n = self.spaces.len();
        let roots: Vec<usize> = (0..n).map(|s| self.find(s)).collect();
        // Parameters shared with ops outside the accounting make the group unprunable.
        let mut sliced: BTreeMap<Id, BTreeSet<usize>> = BTreeMap::new();
        for (s, sl) in &self.slices {
            sliced.entry(sl.tensor).or_default().insert(roots[*s]);
        }
        for (&t, rs) in &sliced {
            for (c, _) in model.consumers(t) {
                if !self.users.contains(&(t, c)) {
                    let why = format!("parameter '{}' is also used by {}", model.value(t).name, model.op(c).describe());
                    for &r in rs {
                        self.spaces[r].reasons.push(why.clone());
                    }
                }
            }
            if model.is_graph_output(t) {
                for &r in rs {
                    self.spaces[r].reasons.push(format!("parameter '{}' is a graph output", model.value(t).name));
                }
            }
        }
        // Overlapping claims on the same tensor axis by different groups.
        // Per (tensor, axis): the spaces claiming it, with the range [start, end) each claims.
        type Claims = BTreeMap<(Id, usize), Vec<(usize, usize, usize)>>;
        let mut claims: Claims = BTreeMap::new();
        for (s, sl) in &self.slices {
            let r = roots[*s];
            let span = (sl.offset, sl.offset + sl.factor * self.spaces[r].channels);
            let e = claims.entry((sl.tensor, sl.axis)).or_default();
            if !e.contains(&(r, span.0, span.1)) {
                e.push((r, span.0, span.1));
            }
        }
        for ((t, _), cl) in &claims {
            for i in 0..cl.len() {
                for j in i + 1..cl.len() {
                    let (a, b) = (cl[i], cl[j]);
                    if a.1 < b.2 && b.1 < a.2 {
                        let why = format!("parameter '{}' is claimed twice", model.value(*t).name);
                        self.spaces[a.0].reasons.push(why.clone());
                        self.spaces[b.0].reasons.push(why);
                    }
                }
            }
        }
        // A shape literal the rewrite edits must be read by this group's Reshapes only: a
        // constant shared with another layer or another use would be edited for both.
        let mut by_target: BTreeMap<ShapeTarget, (BTreeSet<usize>, BTreeSet<Id>)> = BTreeMap::new();
        for ((s, e), &reader) in self.shape_edits.iter().zip(&self.shape_readers) {
            let ent = by_target.entry(e.target.clone()).or_default();
            ent.0.insert(roots[*s]);
            ent.1.insert(reader);
        }
        for (target, (rs, readers)) in &by_target {
            let (start, name) = match target {
                ShapeTarget::Element { tensor, .. } => (*tensor, model.value(*tensor).name.clone()),
                ShapeTarget::ConcatInput { op, .. } => (model.output(*op, 0), model.op(*op).name.clone()),
            };
            let why = if rs.len() > 1 {
                Some(format!("shape constant '{name}' counts the channels of {} layers", rs.len()))
            } else {
                if shape_read_only_by(model, start, readers) {
                    None
                } else {
                    Some(format!("shape constant '{name}' is also read outside the layer"))
                }
            };
            if let Some(why) = why {
                for &r in rs {
                    self.spaces[r].reasons.push(why.clone());
                }
            }
        }
        for (s, target, shape_op) in &self.shape_reads {
            let r = roots[*s];
            if !self.shape_edits.iter().any(|(e, edit)| roots[*e] == r && edit.target == *target) {
                let why = format!("the channel count is read as data by {}", model.op(*shape_op).describe());
                self.spaces[r].reasons.push(why);
            }
        }
        let mut groups = Vec::new();
        let mut unprunable = Vec::new();
        for r in 0..n {
            if roots[r] != r {
                continue;
            }
            let members: Vec<usize> = (0..n).filter(|&s| roots[s] == r).collect();
            let sp = &self.spaces[r];
            // Node names are optional in ONNX: an unnamed producer is named by its output.
            let producer_name = match model.op(sp.producer).name.as_str() {
                "" => format!(
                    "{} producing {}",
                    model.op(sp.producer).op_type,
                    model.value(model.output(sp.producer, 0)).name
                ),
                n => n.to_string(),
            };
            let name = if members.len() > 1 {
                format!("{producer_name} (+{} tied)", members.len() - 1)
            } else {
                producer_name
            };
            if let Some(reason) = sp.reasons.first() {
                unprunable.push(Unprunable {
                    kind: Some(sp.kind),
                    layer: name,
                    count: sp.channels,
                    reason: reason.clone(),
                });
                continue;
            }
            let mut slices: Vec<Slice> =
                self.slices.iter().filter(|(s, _)| roots[*s] == r).map(|(_, sl)| sl.clone()).collect();
            slices.sort();
            slices.dedup();
            let mut shape_edits: Vec<ShapeEdit> =
                self.shape_edits.iter().filter(|(s, _)| roots[*s] == r).map(|(_, e)| e.clone()).collect();
            shape_edits.sort();
            shape_edits.dedup();
            let mut attr_edits: Vec<AttrEdit> =
                self.attr_edits.iter().filter(|(s, _)| roots[*s] == r).map(|(_, e)| e.clone()).collect();
            attr_edits.sort();
            attr_edits.dedup();
            let mut depthwise: Vec<Id> =
                self.depthwise.iter().filter(|(s, _)| roots[*s] == r).map(|(_, o)| *o).collect();
            depthwise.sort();
            depthwise.dedup();
            let producers = members.iter().map(|&m| self.spaces[m].producer).collect();
            let mut io: Vec<IoSlice> = self.io.iter().filter(|(s, _)| roots[*s] == r).map(|(_, e)| e.clone()).collect();
            io.sort();
            io.dedup();
            groups.push(UnitGroup {
                slices,
                shape_edits,
                attr_edits,
                depthwise,
                io,
                ..UnitGroup::new(sp.kind, name, producers, sp.channels)
            });
        }
        (groups, unprunable)
    }
}

/// Follows element `element` of a shape vector back to where it can be rewritten: a
/// literal in a static tensor (through Concat, Unsqueeze, Cast, Identity), or, when a
/// Concat assembles it from a computed scalar (e.g. `Shape(x)[2]`, the hidden size), that
/// Concat input, which the rewrite replaces by a literal.
pub fn shape_source(model: &Model, v: Id, element: usize) -> Option<ShapeTarget> {
    let val = model.value(v);
    if val.data.is_some() {
        return Some(ShapeTarget::Element { tensor: v, element });
    }
    let (p, _) = model.producer(v)?;
    let op = model.op(p);
    let ins = model.inputs(p);
    match op.op_type.as_str() {
        "Concat" => {
            let mut off = 0;
            for (slot, i) in ins.iter().enumerate() {
                let i = (*i)?;
                let n = model.value(i).shape.as_ref()?.iter().product::<usize>();
                if element < off + n {
                    return shape_source(model, i, element - off).or_else(|| {
                        let known = model.value(i).known().is_some();
                        (n == 1 && known).then_some(ShapeTarget::ConcatInput { op: p, slot })
                    });
                }
                off += n;
            }
            None
        }
        "Unsqueeze" | "Cast" | "Identity" | "Squeeze" | "Reshape" => {
            shape_source(model, ins.first().copied().flatten()?, element)
        }
        "Where" => shape_source(model, minus_one_guard(model, p)?, element),
        _ => None,
    }
}

/// The shape vector `s` of `Where(Equal(s, -1), ones, s)`, the guard torch.onnx writes
/// before an Expand (a -1 of a view target becomes 1, which broadcasts). Every element that
/// is not -1 passes through unchanged, so a positive channel count read through the guard
/// can be edited at `s`. None when `where_op` is not that guard.
fn minus_one_guard(model: &Model, where_op: Id) -> Option<Id> {
    let ins = model.inputs(where_op);
    let (cond, s) = (ins.first().copied().flatten()?, ins.get(2).copied().flatten()?);
    let (eq, _) = model.producer(cond)?;
    if model.op(eq).op_type != "Equal" || model.value(model.output(where_op, 0)).shape != model.value(s).shape {
        return None;
    }
    let [Some(a), Some(b)] = model.inputs(eq)[..] else { return None };
    let other = if a == s {
        b
    } else if b == s {
        a
    } else {
        return None;
    };
    let minus_one = model.value(other).known()?.to_i64_vec();
    (!minus_one.is_empty() && minus_one.iter().all(|&x| x == -1)).then_some(s)
}

/// Whether shape vector `v` is read only by `readers` (at a non-data slot), directly or
/// through Concat, Unsqueeze, Squeeze, Cast, Identity, Reshape and the -1 guard
/// `Where(Equal(s, -1), ones, s)` (see [`minus_one_guard`]). `Shape` of it reads only its
/// length, which no edit changes.
/// A Reshape that takes `v` as its target without being a reader makes the answer no.
fn shape_read_only_by(model: &Model, v: Id, readers: &BTreeSet<Id>) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        if model.is_graph_output(v) {
            return false;
        }
        for (c, slot) in model.consumers(v) {
            if slot >= 1 && readers.contains(&c) {
                continue;
            }
            match model.op(c).op_type.as_str() {
                // A Reshape that takes `v` as its target and is not one of the group's
                // readers would be changed by the edit too: its output is not a shape.
                "Reshape" if slot >= 1 => return false,
                "Reshape" | "Concat" | "Unsqueeze" | "Squeeze" | "Cast" | "Identity" => stack.extend(model.outputs(c)),
                "Shape" => {}
                "Where" if slot == 2 && minus_one_guard(model, c) == Some(v) => stack.extend(model.outputs(c)),
                // The guard's comparison: its result only selects inside guards of `v`.
                "Equal"
                    if model
                        .consumers(model.output(c, 0))
                        .iter()
                        .all(|&(w, slot)| slot == 0 && minus_one_guard(model, w) == Some(v))
                        && !model.is_graph_output(model.output(c, 0)) => {}
                _ => return false,
            }
        }
    }
    true
}

/// Position of `axis` in a Slice's axes (its `starts`/`ends` element).
fn slice_axis_index(model: &Model, op: Id, axis: usize) -> std::result::Result<usize, String> {
    let ins = model.inputs(op);
    let rank = model.value(ins[0].ok_or("missing input")?).shape.as_ref().map(|s| s.len()).unwrap_or(0) as i64;
    let axes = match ins.get(3).copied().flatten() {
        Some(v) => model.value(v).known().ok_or("Slice axes are not constant")?.to_i64_vec(),
        None => match model.op(op).attr_ints("axes") {
            Some(a) => a.to_vec(),
            None => {
                let n = match ins.get(1).copied().flatten() {
                    Some(v) => model.value(v).shape.as_ref().and_then(|s| s.first().copied()).unwrap_or(0),
                    None => model.op(op).attr_ints("starts").map(|s| s.len()).unwrap_or(0),
                };
                (0..n as i64).collect()
            }
        },
    };
    axes.iter()
        .position(|&a| (if a < 0 { a + rank } else { a }) == axis as i64)
        .ok_or_else(|| "slices the channel axis in an unknown way".to_string())
}

/// Start of a step-1 Slice along `axis` (of extent `c`), from its constant inputs (opset
/// 10+) or attributes (older opsets), clamped like ONNX does.
fn slice_start(model: &Model, op: Id, axis: usize, c: usize) -> std::result::Result<usize, String> {
    let o = model.op(op);
    let ins = model.inputs(op);
    let lit =
        |i: usize| -> Option<Vec<i64>> { Some(model.value(ins.get(i).copied().flatten()?).known()?.to_i64_vec()) };
    let (starts, steps) = if ins.len() > 1 {
        (lit(1).ok_or("Slice starts are not constant")?, lit(4))
    } else {
        (o.attr_ints("starts").ok_or("Slice without starts")?.to_vec(), None)
    };
    let i = slice_axis_index(model, op, axis)?;
    if steps.and_then(|s| s.get(i).copied()).unwrap_or(1) != 1 {
        return Err("strided slice of the channel axis".into());
    }
    let s = *starts.get(i).ok_or("Slice starts too short")?;
    let s = if s < 0 { s + c as i64 } else { s };
    Ok(s.clamp(0, c as i64) as usize)
}
