//! Structured units and their coupled parameters — the unit of pruning.
//!
//! In the spirit of Torch-Pruning's dependency groups: a [`UnitGroup`] is a set of units
//! that compete inside one structure (the filters of a conv, with every conv tied to it
//! through residual adds; the neurons of an FFN). Each unit `u` of a group owns, in every
//! coupled tensor listed in `slices`, the entries `offset + u*factor .. offset + (u+1)*factor`
//! along `axis`. Removing a unit removes exactly those entries everywhere at once.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::ir::{Id, Model};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitKind {
    Filters,
    Neurons,
    Heads,
    Experts,
}

impl UnitKind {
    pub const ALL: [UnitKind; 4] = [UnitKind::Filters, UnitKind::Neurons, UnitKind::Heads, UnitKind::Experts];

    pub fn name(self) -> &'static str {
        match self {
            UnitKind::Filters => "filters",
            UnitKind::Neurons => "neurons",
            UnitKind::Heads => "heads",
            UnitKind::Experts => "experts",
        }
    }

    pub fn parse(s: &str) -> Option<UnitKind> {
        UnitKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// How a slice relates to the unit: what the unit writes (its producer weights), what
/// travels with its channel (biases, norms, depthwise filters), and what reads it (the
/// consumer's input slice). Zeroing the `Consumer` slices is the same as gating the unit's
/// output to zero: that is the masked dense model the rewrite must reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Producer,
    Coupled,
    Consumer,
    /// A router logit (bias entry): masking sets it to −∞ so the expert is never routed to.
    Logit,
}

/// A slice of one static tensor (weight or constant) owned unit by unit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slice {
    pub tensor: Id,
    pub axis: usize,
    pub offset: usize,
    pub factor: usize,
    pub role: Role,
}

/// Where a shape literal that counts a group's channels lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShapeTarget {
    /// Element `element` of a static tensor.
    Element { tensor: Id, element: usize },
    /// A one-element input of a Concat computed from shapes (replaced by a literal).
    ConcatInput { op: Id, slot: usize },
}

/// A shape literal (a Reshape target) that counts `factor` entries per unit of the group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShapeEdit {
    pub target: ShapeTarget,
    pub factor: usize,
}

/// An integer attribute that counts a group's units (`num_heads`, `q_num_heads`,
/// `kv_num_heads` of a fused attention op): it shrinks by `factor` per pruned unit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttrEdit {
    pub op: Id,
    pub name: String,
    pub factor: usize,
}

#[derive(Clone, Debug)]
pub struct UnitGroup {
    pub kind: UnitKind,
    /// The layer, named after its first producer node.
    pub name: String,
    /// Producer ops (convs, matmuls) whose outputs are tied into this group.
    pub producers: Vec<Id>,
    pub count: usize,
    pub slices: Vec<Slice>,
    pub shape_edits: Vec<ShapeEdit>,
    /// Head-count attributes of fused attention ops.
    pub attr_edits: Vec<AttrEdit>,
    /// Depthwise convs whose `group` attribute equals the group's channel count.
    pub depthwise: Vec<Id>,
    /// Whole tensors each unit owns (an expert's sub-network), by unit.
    pub owned: Vec<Vec<Id>>,
    /// How experts are routed, for renumbering and bypassing on removal.
    pub routing: Option<Routing>,
    /// Units the group must keep whatever the selection (TopK's k for top-k experts);
    /// the rewrite refuses keep-sets below it.
    pub min_keep: usize,
    /// Graph inputs and outputs that hold the units (a KV cache of heads: the past input
    /// concatenated with the new keys, and the present output). The rewrite narrows them,
    /// which changes the model's interface.
    pub io: Vec<IoSlice>,
}

/// A graph input or output owned unit by unit along `axis`, as a [`Slice`] owns a tensor.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoSlice {
    pub value: Id,
    pub axis: usize,
    pub offset: usize,
    pub factor: usize,
}

/// The routing structure of an MoE block whose experts are separate branches combined by
/// router weights: per expert, the Slice that picks its gate weight from the routing
/// tensor, the Mul applying it to the expert's output, and the Add summing it in.
#[derive(Clone, Debug)]
pub struct Routing {
    pub gate_slices: Vec<Id>,
    pub gate_muls: Vec<Id>,
    pub sum_adds: Vec<Id>,
}

impl UnitGroup {
    /// A group of `count` units with nothing coupled yet; discovery fills in the rest with
    /// struct-update syntax.
    pub fn new(kind: UnitKind, name: String, producers: Vec<Id>, count: usize) -> UnitGroup {
        UnitGroup {
            kind,
            name,
            producers,
            count,
            slices: Vec::new(),
            shape_edits: Vec::new(),
            attr_edits: Vec::new(),
            depthwise: Vec::new(),
            owned: Vec::new(),
            routing: None,
            min_keep: 1,
            io: Vec::new(),
        }
    }

    /// Entries owned by one unit in each coupled tensor, summed (unit 0 for experts, whose
    /// sub-networks are usually alike).
    pub fn params_per_unit(&self, model: &Model) -> usize {
        let owned: usize = self
            .owned
            .first()
            .map(|ts| ts.iter().filter_map(|&t| model.value(t).data.as_ref().map(|d| d.numel())).sum())
            .unwrap_or(0);
        owned
            + self
                .slices
                .iter()
                .map(|s| {
                    let dims = &model.value(s.tensor).shape.clone().unwrap_or_default();
                    let rest: usize = dims.iter().enumerate().filter(|(i, _)| *i != s.axis).map(|(_, d)| d).product();
                    rest * s.factor
                })
                .sum::<usize>()
    }

    /// Indices along `slice.axis` owned by `unit`.
    pub fn indices(slice: &Slice, unit: usize) -> std::ops::Range<usize> {
        let start = slice.offset + unit * slice.factor;
        start..start + slice.factor
    }
}

/// Something discovery could not prove safe to prune, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Unprunable {
    pub kind: Option<UnitKind>,
    pub layer: String,
    pub count: usize,
    pub reason: String,
}

/// Which units of each group are kept (one bool per unit, by group index).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeepSet {
    pub keep: Vec<Vec<bool>>,
}

impl KeepSet {
    pub fn all(groups: &[UnitGroup]) -> KeepSet {
        KeepSet { keep: groups.iter().map(|g| vec![true; g.count]).collect() }
    }
    pub fn pruned(&self, g: usize) -> Vec<usize> {
        self.keep[g].iter().enumerate().filter(|(_, k)| !**k).map(|(i, _)| i).collect()
    }
    pub fn kept_count(&self, g: usize) -> usize {
        self.keep[g].iter().filter(|k| **k).count()
    }
    pub fn pruned_total(&self) -> usize {
        self.keep.iter().flatten().filter(|k| !**k).count()
    }
}

/// Per (tensor, axis): the segments that groups own along that axis, for index mapping
/// when several groups (concat) or several axes (a conv's in and out channels) meet.
pub fn segments_by_tensor_axis(groups: &[UnitGroup]) -> BTreeMap<(Id, usize), Vec<(usize, &Slice)>> {
    let mut m: BTreeMap<(Id, usize), Vec<(usize, &Slice)>> = BTreeMap::new();
    for (gi, g) in groups.iter().enumerate() {
        for s in &g.slices {
            m.entry((s.tensor, s.axis)).or_default().push((gi, s));
        }
    }
    m
}
