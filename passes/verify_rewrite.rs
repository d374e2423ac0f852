//! VerifyRewrite: the invariant of the rewrite, checked on every run.
//!
//! Builds the masked dense model (the dense model with every pruned unit's output gated to
//! zero, see `rewrite_graph::masked`), exports both it and the slim model, runs both with
//! tract on the calibration batch (or synthetic inputs in each input's valid range) and
//! compares every output. Where tract cannot load or run either model (com.microsoft ops),
//! both run on the plprune compute engine instead (`engine::lower`), and
//! the verification records which executor ran it; where neither can, verification fails
//! with one line naming both reasons — never a silent pass. Tolerance is float round-off:
//! |slim − masked| ≤ rtol·max|masked| + rtol·|masked| elementwise, rtol = 1e-4 for f32/f64
//! outputs and 1e-2 for f16/bf16. A mismatch is an error: the tool never writes a model that
//! does not verify.

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
            None => {
                // At the dense model's shapes: narrowed inputs are cut from them below.
                let shapes = dense
                    .inputs
                    .iter()
                    .filter_map(|&i| Some((dense.value(i).name.clone(), dense.value(i).shape.clone()?)))
                    .collect();
                crate::calib::synthetic(dense, &shapes, cx.config.seed)
            }
        };
        // A narrowed cache input gets the kept heads' entries; the reference, the whole.
        let (ref_inputs, inputs) = (batch.ordered(&reference), batch.ordered(model));
        let names: Vec<String> = model.outputs.iter().map(|&o| model.value(o).name.clone()).collect();
        let ref_bytes = onnx_io::to_bytes(&onnx_io::export(&cx.document, &reference)?)?;
        let slim_bytes = onnx_io::to_bytes(&onnx_io::export(&cx.document, model)?)?;
        let (want, got, executor) = run_pair(&ref_bytes, &slim_bytes, (&ref_inputs, &inputs), &names)?;
        let mut outputs = Vec::new();
        let mut failures = Vec::new();
        for (((name, w), (_, g)), &o) in want.iter().zip(&got).zip(&model.outputs) {
            let low = matches!(model.value(o).dtype, Some(DType::F16 | DType::BF16));
            // A narrowed cache output is compared on the kept heads' entries.
            let w = &model.interface.get(name).map_or_else(|| w.clone(), |n| n.apply(w));
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
        cx.verification = Some(Verification { samples: batch.samples, outputs, passed, executor });
        if !passed {
            return Err(Error::Verify(failures.join("; ")));
        }
        Ok(())
    }
}

type Outputs = Vec<(String, Tensor)>;
type Inputs<'a> = &'a [(String, Tensor)];

/// Runs the masked reference and the slim model on the same executor: tract when it runs
/// both, else the plprune engine, each on its own inputs (the same but for narrowed cache
/// inputs). Returns both outputs and the executor, described ("tract", or "the plprune
/// engine (tract lacks com.microsoft.Attention)").
pub fn run_pair(
    reference: &[u8],
    slim: &[u8],
    (ref_inputs, inputs): (Inputs, Inputs),
    names: &[String],
) -> Result<(Outputs, Outputs, String)> {
    // tract's support for com.microsoft ops is partial and can panic on valid models
    // (com.microsoft.Attention): models with custom-domain ops go to the engine directly.
    let gap = tract_gap(reference);
    let why = match gap {
        Some(why) => why,
        None => {
            let tract = std::panic::catch_unwind(|| {
                crate::runtime::run(reference, ref_inputs, names)
                    .and_then(|a| crate::runtime::run(slim, inputs, names).map(|b| (a, b)))
            });
            match tract {
                Ok(Ok((a, b))) => return Ok((a, b, "tract".to_string())),
                Ok(Err(e)) => format!("tract: {}", first_line(&e.to_string())),
                Err(_) => "tract panicked".to_string(),
            }
        }
    };
    let engine = run_engine(reference, ref_inputs).and_then(|a| run_engine(slim, inputs).map(|b| (a, b)));
    match engine {
        Ok((a, b)) => {
            let name = |v: Outputs| -> Outputs {
                v.into_iter().enumerate().map(|(k, (n, t))| (names.get(k).cloned().unwrap_or(n), t)).collect()
            };
            Ok((name(a), name(b), format!("the plprune engine ({why})")))
        }
        Err(e) => Err(Error::Verify(format!(
            "cannot verify the rewrite: tract cannot run the model ({why}) and neither can the plprune engine ({})",
            first_line(&e.to_string())
        ))),
    }
}

/// What tract is missing, when the model uses custom-domain ops (named `domain.Op`).
fn tract_gap(bytes: &[u8]) -> Option<String> {
    let (_, m) = onnx_io::load_bytes(bytes, std::path::Path::new("<verification>")).ok()?;
    let mut ops: Vec<String> = m
        .ops()
        .into_iter()
        .map(|o| m.op(o))
        .filter(|o| !matches!(o.domain.as_str(), "" | "ai.onnx"))
        .map(|o| format!("{}.{}", o.domain, o.op_type))
        .collect();
    ops.sort();
    ops.dedup();
    (!ops.is_empty()).then(|| format!("tract lacks {}", ops.join(", ")))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// Runs a serialized model on the plprune engine's CPU backend (f32), for the shapes of
/// `inputs`; outputs in model order.
pub fn run_engine(bytes: &[u8], inputs: &[(String, Tensor)]) -> Result<Outputs> {
    let (_, mut m) = onnx_io::load_bytes(bytes, std::path::Path::new("<verification>"))?;
    let shapes = inputs.iter().map(|(n, t)| (n.clone(), t.dims.clone())).collect();
    crate::passes::infer_shapes::infer(&mut m, &shapes)?;
    let engine = crate::engine::Engine::new(&m)?;
    let params = engine.params::<f32>(&m);
    let outs = engine.forward::<f32>(inputs, &params)?;
    Ok(outs.into_iter().map(|(name, dims, data)| (name, Tensor::from_f32(dims, &data))).collect())
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
