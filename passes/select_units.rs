//! SelectUnits: turns scores into a keep-set, whatever the criterion.
//!
//! The ratio r is the fraction of each selected unit kind's parameters that is removed
//! (the paper's definition: filters lose r of the filter parameters, neurons r of theirs). Accounting is exact: removing a unit deletes `factor` entries along
//! one axis of each coupled tensor, times the *current* extent of that tensor's other axes,
//! so a conv weight losing both input and output channels is not counted twice. Units are
//! removed lowest score first until the removed count reaches r·P; with `--scope global`
//! the ranking spans all layers of a kind, with `--scope layer` each layer loses r of its
//! own parameters. Every layer keeps at least `min_keep` units (the protecting strategy),
//! and with `max_layer_ratio` F < 1 (`--max-layer-ratio`) loses at most F of its units, so a
//! global ranking cannot cut a layer down to a sliver (Torch-Pruning's `max_pruning_ratio`).
//! When these limits stop a kind short of r, the run warns with what was reached.
//! Ties are broken by layer and unit index, so the result is deterministic.
//!
//! With `round_to` N > 1 (`--round-to`), every layer of filters or neurons keeps a multiple
//! of N units (or all of them): layers lose blocks — their lowest-scored kept units down to
//! the next multiple of N — and the block of lowest mean score goes first. Runtimes' fast
//! paths want channel counts in multiples of their vector width: onnxruntime's NCHWc
//! convolutions on x86 take channels in blocks of 8 (16 with AVX-512) and fall back to a
//! slower path otherwise, which can leave a pruned CNN slower than the dense one. Heads
//! (whole blocks of head_dim channels) and experts are not rounded.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Result;
use crate::ir::{Id, Model};
use crate::pipeline::{Context, Pass, Scope};
use crate::units::{KeepSet, UnitGroup, UnitKind};

pub struct SelectUnits;

impl Pass for SelectUnits {
    fn name(&self) -> &'static str {
        "SelectUnits"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let selected: Vec<bool> = cx.groups.iter().map(|g| cx.selects(g.kind)).collect();
        let (keep, short) =
            select(model, &cx.groups, &cx.scores, &selected, cx.config.ratio, cx.config.scope, cx.config.protect());
        for s in short {
            cx.warn(format!(
                "{}: the per-layer limits (--min-keep {}, --max-layer-ratio {}{}{}) let only {:.1}% of the \
                 parameters be removed, not the {:.1}% asked",
                s.kind.name(),
                cx.config.min_keep,
                cx.config.max_layer_ratio,
                if s.routed { ", the k experts of a top-k router" } else { "" },
                if cx.config.scope == Scope::Layer { format!(", in layer {}", s.layer) } else { String::new() },
                100.0 * s.reached,
                100.0 * cx.config.ratio,
            ));
        }
        if cx.config.round_to == 1 {
            if let Some(w) = unaligned_filters(&cx.groups, &selected, &keep) {
                cx.warn(w);
            }
        }
        cx.keep = Some(keep);
        Ok(())
    }
}

/// Runtimes' vector width for conv channels (onnxruntime's NCHWc blocks on x86 with AVX2).
const CHANNEL_BLOCK: usize = 8;

/// The warning for pruned filter layers left with a channel count off the multiples of 8
/// they had (None when there are none).
fn unaligned_filters(groups: &[UnitGroup], selected: &[bool], keep: &KeepSet) -> Option<String> {
    let pruned: Vec<usize> = (0..groups.len())
        .filter(|&g| selected[g] && groups[g].kind == UnitKind::Filters && keep.kept_count(g) < groups[g].count)
        .collect();
    let off = pruned
        .iter()
        .filter(|&&g| {
            groups[g].count.is_multiple_of(CHANNEL_BLOCK) && !keep.kept_count(g).is_multiple_of(CHANNEL_BLOCK)
        })
        .count();
    (off > 0).then(|| {
        format!(
            "{off} of {} pruned filter layers keep a channel count that is not a multiple of {CHANNEL_BLOCK}: \
             onnxruntime's fast x86 convolutions (NCHWc) need multiples of {CHANNEL_BLOCK}, and without them a \
             pruned CNN can run slower than the dense one; --round-to {CHANNEL_BLOCK} keeps every layer aligned",
            pruned.len()
        )
    })
}

/// Exact parameter bookkeeping: the current extent of every coupled tensor.
struct Ledger {
    kept: BTreeMap<Id, Vec<usize>>,
}

impl Ledger {
    fn new(model: &Model, groups: &[UnitGroup]) -> Ledger {
        let mut kept = BTreeMap::new();
        let tensors =
            groups.iter().flat_map(|g| g.slices.iter().map(|s| s.tensor).chain(g.owned.iter().flatten().copied()));
        for t in tensors {
            kept.entry(t).or_insert_with(|| model.value(t).data.as_ref().map(|d| d.dims.clone()).unwrap_or_default());
        }
        Ledger { kept }
    }

    /// Current number of entries over `tensors`.
    fn size(&self, tensors: &BTreeSet<Id>) -> usize {
        tensors.iter().map(|t| self.kept[t].iter().product::<usize>()).sum()
    }

    /// Removes one unit's entries (and whatever whole tensors it owns).
    fn remove(&mut self, g: &UnitGroup, unit: usize) {
        for t in g.owned.get(unit).into_iter().flatten() {
            if let Some(d) = self.kept.get_mut(t).and_then(|d| d.first_mut()) {
                *d = 0;
            }
        }
        for s in &g.slices {
            let dims = self.kept.get_mut(&s.tensor).expect("tensor registered");
            dims[s.axis] = dims[s.axis].saturating_sub(s.factor);
        }
    }
}

/// The per-layer limits of a selection (from `Config::protect`, which holds the defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Protect {
    /// Units every layer keeps at least (`--min-keep`).
    pub min_keep: usize,
    /// Layers of filters and neurons keep a multiple of this many units (`--round-to`).
    pub round_to: usize,
    /// The largest fraction of its units a layer may lose (`--max-layer-ratio`; 1 = no cap).
    pub max_layer_ratio: f64,
}

impl Protect {
    /// Units layer `g` keeps at least.
    fn floor(&self, g: &UnitGroup) -> usize {
        // Units it may lose: ⌊F · count⌋, with a margin for F·count landing just below an
        // integer in floating point.
        let may_lose = ((self.max_layer_ratio * g.count as f64) + 1e-9).floor() as usize;
        self.min_keep.max(g.min_keep).max(g.count.saturating_sub(may_lose))
    }
}

/// A batch of layers (a kind under `--scope global`, one layer under `--scope layer`) whose
/// per-layer limits stopped it short of the ratio.
#[derive(Clone, Debug, PartialEq)]
pub struct Shortfall {
    pub kind: UnitKind,
    /// The first layer of the batch (its name, for `--scope layer`).
    pub layer: String,
    /// The fraction of the batch's parameters removed.
    pub reached: f64,
    /// Whether a group of the batch must keep more than one unit by itself (the k experts
    /// of a top-k router).
    pub routed: bool,
}

/// Chooses the units to keep (groups with `selected[g] == false` keep everything), and
/// lists the batches whose per-layer limits stopped them short of the ratio.
pub fn select(
    model: &Model,
    groups: &[UnitGroup],
    scores: &[Vec<f64>],
    selected: &[bool],
    ratio: f64,
    scope: Scope,
    protect: Protect,
) -> (KeepSet, Vec<Shortfall>) {
    let mut keep = KeepSet::all(groups);
    let chosen: Vec<usize> = (0..groups.len()).filter(|&g| selected[g]).collect();
    let batches: Vec<Vec<usize>> = match scope {
        Scope::Global => {
            let mut by_kind: BTreeMap<UnitKind, Vec<usize>> = BTreeMap::new();
            for g in chosen {
                by_kind.entry(groups[g].kind).or_default().push(g);
            }
            by_kind.into_values().collect()
        }
        Scope::Layer => chosen.into_iter().map(|g| vec![g]).collect(),
    };
    // One ledger for all batches, advanced jointly: a tensor shared by two kinds (a conv
    // feeding a Gemm) shrinks for both, so each step serves the batch furthest from its
    // target, and every batch ends at its own ratio.
    let mut ledger = Ledger::new(model, groups);
    struct Batch {
        tensors: BTreeSet<Id>,
        total: usize,
        /// Per group of the batch: its units, lowest score first, and how many are removed.
        ranked: Vec<(usize, Vec<usize>, usize)>,
        done: bool,
    }
    let mut state: Vec<Batch> = batches
        .into_iter()
        .map(|batch| {
            let tensors: BTreeSet<Id> = batch
                .iter()
                .flat_map(|&g| {
                    groups[g].slices.iter().map(|s| s.tensor).chain(groups[g].owned.iter().flatten().copied())
                })
                .collect();
            let total = ledger.size(&tensors);
            let ranked = batch
                .iter()
                .map(|&g| {
                    let mut units: Vec<usize> = (0..groups[g].count).collect();
                    units.sort_by(|&a, &b| scores[g][a].total_cmp(&scores[g][b]).then(a.cmp(&b)));
                    (g, units, 0)
                })
                .collect();
            Batch { tensors, total, ranked, done: false }
        })
        .collect();
    loop {
        // The unfinished batch with the smallest removed fraction goes next.
        let mut best: Option<(f64, usize)> = None;
        for (b, st) in state.iter().enumerate() {
            let removed = (st.total - ledger.size(&st.tensors)) as f64 / st.total.max(1) as f64;
            if !st.done && removed < ratio && best.is_none_or(|(r, _)| removed < r) {
                best = Some((removed, b));
            }
        }
        let Some((_, b)) = best else { break };
        // The batch's next removal: of every layer's next block (its lowest-scored kept
        // unit, or with `round_to` N the units down to the next multiple of N), the one of
        // lowest mean score; layers at their `min_keep` are done. With N = 1 this is the
        // batch's lowest-scored unit, ties broken by layer and unit index.
        let mut pick: Option<(f64, usize, usize)> = None;
        for (i, (g, units, removed)) in state[b].ranked.iter().enumerate() {
            let g = *g;
            let kept = keep.kept_count(g);
            let n = match groups[g].kind {
                UnitKind::Filters | UnitKind::Neurons => protect.round_to.max(1),
                _ => 1,
            };
            let step = match kept % n {
                0 => n,
                r => r,
            };
            if kept < step + protect.floor(&groups[g]) {
                continue;
            }
            let block = &units[*removed..*removed + step];
            let cost = block.iter().map(|&u| scores[g][u]).sum::<f64>() / step as f64;
            if pick.is_none_or(|(c, _, _)| cost.total_cmp(&c).is_lt()) {
                pick = Some((cost, i, step));
            }
        }
        let Some((_, i, step)) = pick else {
            state[b].done = true;
            continue;
        };
        let (g, units, removed) = &mut state[b].ranked[i];
        for &u in &units[*removed..*removed + step] {
            keep.keep[*g][u] = false;
            ledger.remove(&groups[*g], u);
        }
        *removed += step;
    }
    // A batch is short when its limits ended it (`done`) below the ratio by more than its
    // largest unit: the last removal may stop just under r·P.
    let short = state
        .iter()
        .filter(|st| st.done)
        .filter_map(|st| {
            let reached = (st.total - ledger.size(&st.tensors)) as f64 / st.total.max(1) as f64;
            let unit = st
                .ranked
                .iter()
                .map(|(g, _, _)| groups[*g].params_per_unit(model) as f64 / st.total.max(1) as f64)
                .fold(0.0, f64::max);
            let first = &groups[st.ranked.first()?.0];
            (reached + unit < ratio).then(|| {
                let (kind, layer) = (first.kind, first.name.clone());
                let routed = st.ranked.iter().any(|(g, _, _)| groups[*g].min_keep > 1);
                Shortfall { kind, layer, reached, routed }
            })
        })
        .collect();
    (keep, short)
}
