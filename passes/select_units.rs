//! SelectUnits: turns scores into a keep-set, whatever the criterion.
//!
//! The ratio r is the fraction of the selected unit kinds' parameters that is removed (the
//! paper's definition). Accounting is exact: removing a unit deletes `factor` entries along
//! one axis of each coupled tensor, times the *current* extent of that tensor's other axes,
//! so a conv weight losing both input and output channels is not counted twice. Units are
//! removed lowest score first until the removed count reaches r·P; with `--scope global`
//! the ranking spans all layers, with `--scope layer` each layer loses r of its own
//! parameters. Every layer keeps at least `min_keep` units (the protecting strategy).
//! Ties are broken by layer and unit index, so the result is deterministic.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Result;
use crate::ir::{Id, Model};
use crate::pipeline::{Context, Pass, Scope};
use crate::units::{KeepSet, UnitGroup};

pub struct SelectUnits;

impl Pass for SelectUnits {
    fn name(&self) -> &'static str {
        "SelectUnits"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let selected: Vec<bool> = cx.groups.iter().map(|g| cx.selects(g.kind)).collect();
        let keep =
            select(model, &cx.groups, &cx.scores, &selected, cx.config.ratio, cx.config.scope, cx.config.min_keep);
        cx.keep = Some(keep);
        Ok(())
    }
}

/// Exact removed-parameter bookkeeping over a set of groups.
struct Ledger {
    kept: BTreeMap<Id, Vec<usize>>,
}

impl Ledger {
    fn new(model: &Model, groups: &[&UnitGroup]) -> (Ledger, usize) {
        let tensors: BTreeSet<Id> = groups.iter().flat_map(|g| g.slices.iter().map(|s| s.tensor)).collect();
        let mut kept = BTreeMap::new();
        let mut total = 0;
        for t in tensors {
            let dims = model.value(t).data.as_ref().map(|d| d.dims.clone()).unwrap_or_default();
            total += dims.iter().product::<usize>();
            kept.insert(t, dims);
        }
        (Ledger { kept }, total)
    }

    /// Removes one unit's entries; returns how many parameters that deleted.
    fn remove(&mut self, g: &UnitGroup) -> usize {
        let mut removed = 0;
        for s in &g.slices {
            let dims = self.kept.get_mut(&s.tensor).expect("tensor registered");
            let rest: usize = dims.iter().enumerate().filter(|(i, _)| *i != s.axis).map(|(_, d)| d).product();
            removed += rest * s.factor;
            dims[s.axis] = dims[s.axis].saturating_sub(s.factor);
        }
        removed
    }
}

/// Chooses the units to keep. Groups with `selected[g] == false` keep everything.
pub fn select(
    model: &Model,
    groups: &[UnitGroup],
    scores: &[Vec<f64>],
    selected: &[bool],
    ratio: f64,
    scope: Scope,
    min_keep: usize,
) -> KeepSet {
    let mut keep = KeepSet::all(groups);
    let chosen: Vec<usize> = (0..groups.len()).filter(|&g| selected[g]).collect();
    let batches: Vec<Vec<usize>> = match scope {
        Scope::Global => vec![chosen],
        Scope::Layer => chosen.into_iter().map(|g| vec![g]).collect(),
    };
    for batch in batches {
        let refs: Vec<&UnitGroup> = batch.iter().map(|&g| &groups[g]).collect();
        let (mut ledger, total) = Ledger::new(model, &refs);
        let target = ratio * total as f64;
        let mut order: Vec<(f64, usize, usize)> =
            batch.iter().flat_map(|&g| (0..groups[g].count).map(move |u| (scores[g][u], g, u))).collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut removed = 0usize;
        for (_, g, u) in order {
            if removed as f64 >= target {
                break;
            }
            if keep.kept_count(g) <= min_keep {
                continue;
            }
            keep.keep[g][u] = false;
            removed += ledger.remove(&groups[g]);
        }
    }
    keep
}
