//! `magnitude`: the root-mean-square of a unit's parameters — every entry the rewrite would
//! delete with it (producer slice, bias, norm entries, consumer slice).
//!
//! This is the L2 norm of the lottery-ticket / Li et al. (ICLR 2017, "Pruning Filters for
//! Efficient ConvNets") family, divided by the square root of the unit's parameter count so
//! that units of different sizes compare fairly when ranked globally across layers.

use crate::ir::Model;
use crate::units::UnitGroup;

pub fn score(groups: &[UnitGroup], model: &Model) -> Vec<Vec<f64>> {
    groups
        .iter()
        .map(|g| {
            let n = g.params_per_unit(model).max(1) as f64;
            (0..g.count)
                .map(|u| {
                    let ss: f64 = g
                        .slices
                        .iter()
                        .filter_map(|s| {
                            let t = model.value(s.tensor).data.as_ref()?;
                            let idx: Vec<usize> = UnitGroup::indices(s, u).collect();
                            Some(t.sum_sq_along(s.axis, &idx))
                        })
                        .sum();
                    let owned: f64 = g
                        .owned
                        .get(u)
                        .into_iter()
                        .flatten()
                        .filter_map(|&t| model.value(t).data.as_ref())
                        .map(|d| d.to_f64_vec().iter().map(|x| x * x).sum::<f64>())
                        .sum();
                    ((ss + owned) / n).sqrt()
                })
                .collect()
        })
        .collect()
}
