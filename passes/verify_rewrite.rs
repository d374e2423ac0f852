//! VerifyRewrite: the invariant of the rewrite, checked on every run.
//!
//! Builds the masked dense model (the dense model with every pruned unit's output gated to
//! zero, see `rewrite_graph::masked`), exports both it and the slim model, runs both with
//! tract on the calibration batch (or synthetic inputs in each input's valid range) and
//! compares every output. Tolerance is float round-off: |slim − masked| ≤ rtol·max|masked|
//! + rtol·|masked| elementwise, rtol = 1e-4 for f32/f64 outputs and 1e-2 for f16/bf16. A
//! mismatch is an error: the tool never writes a model that does not verify.

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::onnx_io;
use crate::passes::rewrite_graph::masked;
use crate::pipeline::{Context, OutputCheck, Pass, Verification};
use crate::tensor::{DType, Tensor};

pub struct VerifyRewrite;

impl Pass for VerifyRewrite {
    fn name(&self) -> &'static str {
        "VerifyRewrite"
    }

    fn run(&self, cx: &mut Context, model: &mut Model) -> Result<()> {
        let dense = cx.dense.as_ref().ok_or_else(|| Error::Other("no dense snapshot to verify against".into()))?;
        let keep = cx.keep.as_ref().ok_or_else(|| Error::Other("no selection".into()))?;
        let reference = masked(dense, &cx.groups, keep);
        let batch = match &cx.inputs {
            Some(b) => b.take(cx.config.verify_samples),
            None => crate::calib::synthetic(model, &cx.input_shapes, cx.config.seed),
        };
        let inputs = batch.ordered(model);
        let names: Vec<String> = model.outputs.iter().map(|&o| model.value(o).name.clone()).collect();
        let ref_bytes = onnx_io::to_bytes(&onnx_io::export(&cx.document, &reference)?)?;
        let slim_bytes = onnx_io::to_bytes(&onnx_io::export(&cx.document, model)?)?;
        let want = crate::runtime::run(&ref_bytes, &inputs, &names)?;
        let got = crate::runtime::run(&slim_bytes, &inputs, &names)?;
        let mut outputs = Vec::new();
        let mut failures = Vec::new();
        for (((name, w), (_, g)), &o) in want.iter().zip(&got).zip(&model.outputs) {
            let low = matches!(model.value(o).dtype, Some(DType::F16 | DType::BF16));
            let check = compare(name, w, g, if low { 1e-2 } else { 1e-4 });
            if !check.1 {
                failures.push(format!(
                    "output '{}' differs by {:.3e} (tolerance {:.3e})",
                    name, check.0.max_abs_diff, check.0.tolerance
                ));
            }
            outputs.push(check.0);
        }
        let passed = failures.is_empty();
        cx.verification = Some(Verification { samples: batch.samples, outputs, passed });
        if !passed {
            return Err(Error::Verify(failures.join("; ")));
        }
        Ok(())
    }
}

/// Compares two outputs; returns the summary and whether it is within tolerance.
pub fn compare(name: &str, want: &Tensor, got: &Tensor, rtol: f64) -> (OutputCheck, bool) {
    let w = want.to_f64_vec();
    let g = got.to_f64_vec();
    let max_ref = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = rtol * max_ref.max(1e-6);
    let mut max_diff = 0.0f64;
    let mut ok = want.dims == got.dims;
    for (a, b) in w.iter().zip(&g) {
        let d = (a - b).abs();
        if d.is_nan() || d > tol + rtol * a.abs() {
            ok = false;
        }
        if d.is_nan() {
            max_diff = f64::INFINITY;
        } else {
            max_diff = max_diff.max(d);
        }
    }
    (OutputCheck { name: name.to_string(), max_abs_diff: max_diff, max_abs_reference: max_ref, tolerance: tol }, ok)
}
