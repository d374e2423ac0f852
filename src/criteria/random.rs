//! `random`: uniform random scores from the seed — the baseline every criterion must beat.

use crate::rng::Rng;
use crate::units::UnitGroup;

pub fn score(groups: &[UnitGroup], seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::new(seed);
    groups.iter().map(|g| (0..g.count).map(|_| rng.next_f64()).collect()).collect()
}
