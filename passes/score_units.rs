//! ScoreUnits: one importance score per unit from the configured criterion and schedule
//! (`crate::criteria::run`). Scores are checked for shape and finiteness here, so selection can
//! trust them.

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::pipeline::{Context, Pass};

pub struct ScoreUnits;

impl Pass for ScoreUnits {
    fn name(&self) -> &'static str {
        "ScoreUnits"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let scored = crate::criteria::run(cx, model)?;
        let scores = scored.scores;
        cx.features = scored.features;
        cx.score_steps = scored.steps;
        cx.scored_samples = scored.samples;
        if scores.len() != cx.groups.len() {
            return Err(Error::Other(format!("{} score rows for {} groups", scores.len(), cx.groups.len())));
        }
        for (g, s) in cx.groups.iter().zip(&scores) {
            if s.len() != g.count || s.iter().any(|x| !x.is_finite()) {
                return Err(Error::Other(format!("criterion gave invalid scores for layer {}", g.name)));
            }
        }
        cx.scores = scores;
        Ok(())
    }
}
