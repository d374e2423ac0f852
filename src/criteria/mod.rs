//! Pruning criteria: each turns the discovered unit groups into one score per unit
//! (higher = more important). Selection (`passes/select_units.rs`) is criterion-agnostic:
//! a new criterion is a new file here and a line in [`Criterion`].

pub mod magnitude;
pub mod random;

use crate::error::Result;
use crate::ir::Model;
use crate::pipeline::Context;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    Magnitude,
    Random,
}

impl Criterion {
    pub const NAMES: &'static [&'static str] = &["magnitude", "random"];

    pub fn parse(s: &str) -> Option<Criterion> {
        match s {
            "magnitude" => Some(Criterion::Magnitude),
            "random" => Some(Criterion::Random),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Criterion::Magnitude => "magnitude",
            Criterion::Random => "random",
        }
    }

    /// One score per unit, by group.
    pub fn score(self, cx: &Context, model: &Model) -> Result<Vec<Vec<f64>>> {
        Ok(match self {
            Criterion::Magnitude => magnitude::score(&cx.groups, model),
            Criterion::Random => random::score(&cx.groups, cx.config.seed),
        })
    }
}
