//! `fpgm`: filter pruning via geometric median (He et al., CVPR 2019). A unit close to the
//! geometric median of its layer is redundant — the others can represent it — so a unit's
//! importance is the sum of Euclidean distances from its producer weights (the slices that
//! compute it: conv filter, FFN up-projection column, a head's Q/K/V columns) to those of
//! every other unit in the layer. Defined in the paper for conv filters; applied here to
//! every unit kind through its producer slices (all slices for units without any).

use rayon::prelude::*;

use crate::ir::Model;
use crate::units::{Role, UnitGroup};

pub fn score(groups: &[UnitGroup], model: &Model) -> Vec<Vec<f64>> {
    groups
        .iter()
        .map(|g| {
            let producers: Vec<_> = g.slices.iter().filter(|s| s.role == Role::Producer).cloned().collect();
            let slices = if producers.is_empty() { g.slices.clone() } else { producers };
            let vecs: Vec<Vec<f64>> = (0..g.count)
                .map(|u| {
                    let mut v = Vec::new();
                    for s in &slices {
                        if let Some(t) = model.value(s.tensor).data.as_ref() {
                            let idx: Vec<usize> = UnitGroup::indices(s, u).collect();
                            v.extend(t.take(s.axis, &idx).to_f64_vec());
                        }
                    }
                    for t in g.owned.get(u).into_iter().flatten() {
                        if let Some(d) = model.value(*t).data.as_ref() {
                            v.extend(d.to_f64_vec());
                        }
                    }
                    v
                })
                .collect();
            (0..g.count)
                .into_par_iter()
                .map(|u| {
                    (0..g.count)
                        .filter(|&o| o != u)
                        .map(|o| vecs[u].iter().zip(&vecs[o]).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt())
                        .sum()
                })
                .collect()
        })
        .collect()
}
