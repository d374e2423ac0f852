//! plprune-onnx: structured pruning of exported ONNX models, guided by the
//! Polyak-Łojasiewicz condition (Chen et al., ICLR 2023).
//!
//! The program is a compiler pass pipeline (see [`pipeline`]): ONNX file → import
//! ([`onnx_io`]) → IR ([`ir`], a petgraph `StableGraph`) → passes (infer shapes → discover
//! units → score → select → rewrite → eliminate dead nodes → verify) → export. Data flows
//! one way; only `onnx_io` knows protobuf types. Passes live in `passes/`, one file each.
//! [`Session`] is the library entry point the CLI and the tests use.

pub mod calib;
pub mod criteria;
pub mod diff;
pub mod engine;
pub mod error;
pub mod experts;
pub mod ir;
pub mod linalg;
pub mod npz;
pub mod onnx_io;
pub mod ops;
pub mod passes;
pub mod pipeline;
pub mod plots;
pub mod progress;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod tensor;
pub mod units;

pub use error::{Error, Result};
pub use pipeline::{Config, Scope};

use std::path::Path;

use ir::Model;
use pipeline::{run_passes, Context};
use units::KeepSet;

/// One model going through the pipeline: load, analyse, select, apply.
pub struct Session {
    pub cx: Context,
    pub model: Model,
    /// The model file, for messages.
    pub path: std::path::PathBuf,
}

impl Session {
    /// Loads the model (and the calibration file, validated against it).
    pub fn open(path: &Path, config: Config) -> Result<Session> {
        let (doc, model) = onnx_io::load(path)?;
        let mut cx = Context::new(config, doc);
        if let Some(c) = cx.config.calib.clone() {
            cx.inputs = Some(calib::load(&c, &model)?);
        }
        Ok(Session { cx, model, path: path.to_path_buf() })
    }

    /// Shape inference and unit discovery.
    pub fn analyze(&mut self) -> Result<()> {
        run_passes(&pipeline::analysis_passes(), &mut self.cx, &mut self.model)
    }

    /// Scores units with the configured criterion and selects the keep-set.
    pub fn select(&mut self) -> Result<()> {
        run_passes(&pipeline::selection_passes(), &mut self.cx, &mut self.model)
    }

    /// Rewrites the graph for `keep` (or the selection), then verifies it if configured.
    pub fn apply(&mut self, keep: Option<KeepSet>) -> Result<()> {
        if let Some(k) = keep {
            self.cx.keep = Some(k);
        }
        let verify = self.cx.config.verify;
        run_passes(&pipeline::rewrite_passes(verify), &mut self.cx, &mut self.model)
    }

    /// An error when pruning was asked for (ratio > 0) but no unit group of the selected
    /// kinds was found: writing the model back unchanged would look like success to a
    /// pipeline. The message names the first layers that were rejected and why.
    pub fn check_prunable(&self) -> Result<()> {
        if self.cx.config.ratio <= 0.0 || self.cx.groups.iter().any(|g| self.cx.selects(g.kind)) {
            return Ok(());
        }
        let asked = match &self.cx.config.kinds {
            Some(k) => format!("no {} can be removed", k.iter().map(|k| k.name()).collect::<Vec<_>>().join(" or ")),
            None => "no filters, neurons, heads or experts can be removed".to_string(),
        };
        let mut found: Vec<String> = Vec::new();
        for kind in crate::units::UnitKind::ALL {
            let n = self.cx.groups.iter().filter(|g| g.kind == kind).count();
            if n > 0 {
                found.push(format!("{n} layer(s) of {}", kind.name()));
            }
        }
        let mut msg = asked;
        if !found.is_empty() {
            msg += &format!(" (prunable: {}; see --units)", found.join(", "));
        }
        let rejected: Vec<_> =
            self.cx.unprunable.iter().filter(|u| u.kind.is_none_or(|k| self.cx.selects(k))).collect();
        if let Some(u) = rejected.first() {
            let kind = u.kind.map(|k| k.name()).unwrap_or("units");
            msg += &format!(
                "; {} candidate layer(s) rejected, e.g. {kind} of '{}': {}",
                rejected.len(),
                u.layer,
                u.reason
            );
        }
        msg += &format!(" (`plprune-onnx inspect {}` lists every layer and why)", self.path.display());
        Err(Error::NothingToPrune { path: self.path.clone(), msg })
    }

    /// All of it: analyse, select, rewrite, verify.
    pub fn run(&mut self) -> Result<()> {
        self.analyze()?;
        self.check_prunable()?;
        self.select()?;
        self.apply(None)
    }

    /// The current model, serialized.
    pub fn model_bytes(&self) -> Result<Vec<u8>> {
        onnx_io::to_bytes(&onnx_io::export(&self.cx.document, &self.model)?)
    }

    /// The masked dense reference for the applied keep-set, serialized.
    pub fn masked_bytes(&self) -> Result<Vec<u8>> {
        let dense = self.cx.dense.as_ref().ok_or_else(|| Error::Other("nothing was applied yet".into()))?;
        let keep = self.cx.keep.as_ref().ok_or_else(|| Error::Other("nothing was selected yet".into()))?;
        let m = passes::rewrite_graph::masked(dense, &self.cx.groups, keep);
        onnx_io::to_bytes(&onnx_io::export(&self.cx.document, &m)?)
    }

    pub fn report(&self) -> report::Report {
        report::Report::build(&self.cx, &self.model)
    }
}
