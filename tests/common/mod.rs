//! Shared helpers for the integration tests: paths to the shared real models, an
//! independent tract run of two serialized models, and the onnxruntime/onnx.checker check.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use plprune_onnx::calib::Batch;
use plprune_onnx::passes::verify_rewrite::compare;
use plprune_onnx::tensor::Tensor;

pub fn shared(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models").join(rel);
    assert!(p.exists(), "{} is missing: the tests need ../shared/models beside the checkout", p.display());
    p
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A scratch folder under target/ for models the tests write (kept for inspection).
pub fn out_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs both models with tract on `inputs` and asserts every output agrees to round-off.
/// Returns the largest absolute difference seen.
pub fn assert_same_outputs(a: &[u8], b: &[u8], inputs: &[(String, Tensor)], names: &[String], rtol: f64) -> f64 {
    let ya = plprune_onnx::runtime::run(a, inputs, names).expect("tract runs model a");
    let yb = plprune_onnx::runtime::run(b, inputs, names).expect("tract runs model b");
    assert_eq!(ya.len(), yb.len());
    let mut worst = 0.0f64;
    for ((name, x), (_, y)) in ya.iter().zip(&yb) {
        let (check, ok) = compare(name, x, y, rtol);
        assert!(
            ok,
            "output {name}: max |diff| {} > tolerance {} (max |ref| {})",
            check.max_abs_diff, check.tolerance, check.max_abs_reference
        );
        worst = worst.max(check.max_abs_diff);
    }
    worst
}

/// Largest absolute difference between the outputs of two models.
pub fn max_output_diff(a: &[u8], b: &[u8], inputs: &[(String, Tensor)], names: &[String]) -> f64 {
    let ya = plprune_onnx::runtime::run(a, inputs, names).expect("tract runs model a");
    let yb = plprune_onnx::runtime::run(b, inputs, names).expect("tract runs model b");
    ya.iter()
        .zip(&yb)
        .flat_map(|((_, x), (_, y))| x.to_f64_vec().into_iter().zip(y.to_f64_vec()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

pub fn inputs_of(batch: &Batch, session: &plprune_onnx::Session) -> Vec<(String, Tensor)> {
    batch.ordered(&session.model)
}

/// Checks a written slim model with onnx.checker (full_check) and compares it with the
/// masked reference in onnxruntime (tests/ort_check.py). Without python/onnxruntime the
/// check is skipped locally with a note, and fails under CI=true.
pub fn ort_check(slim: &Path, masked: &Path, calib: Option<&Path>, samples: usize) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_check.py");
    let probe = Command::new("python3").args(["-c", "import onnx, onnxruntime"]).output();
    let available = probe.map(|o| o.status.success()).unwrap_or(false);
    if !available {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("python3 with onnx and onnxruntime is required under CI (pip install onnx onnxruntime)");
        }
        eprintln!("note: python3 with onnx/onnxruntime not found; skipping the onnxruntime check locally");
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(slim).arg(masked).args(["--samples", &samples.to_string()]);
    if let Some(c) = calib {
        cmd.arg("--calib").arg(c);
    }
    let out = cmd.output().expect("run ort_check.py");
    assert!(
        out.status.success(),
        "onnxruntime check failed for {}:\n{}\n{}",
        slim.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
