//! `--ntk-condition`: the model-level NTK spectrum before and after pruning, by running the
//! binary on digits/vgg_bn. Pruning nothing leaves it exactly as it was; pruning half of the
//! filters changes it, and the reported κ is λ_max/λ_min of a positive definite Gram;
//! `--plots` draws exactly those two numbers.

mod common;

use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use common::*;
use serde_json::Value;

fn condition(ratio: &str, name: &str) -> Value {
    let dir = out_dir("diagnostics");
    let report = dir.join(format!("{name}.json"));
    let out = Command::cargo_bin("plprune-onnx")
        .unwrap()
        .args([
            shared("digits/vgg_bn.onnx").to_str().unwrap(),
            "--criterion",
            "magnitude",
            "--ratio",
            ratio,
            "--calib",
            shared("digits/img_train.npz").to_str().unwrap(),
            "--calib-samples",
            "16",
            "--ntk-condition",
            "--dry-run",
            "--report",
            report.to_str().unwrap(),
            "--plots",
            dir.join(format!("{name}-plots")).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("model-level condition number"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    r["ntk_condition"].clone()
}

#[test]
fn ntk_condition_before_and_after_pruning() {
    let same = condition("0", "keep-all");
    assert_eq!(same["samples"], 16);
    assert_eq!(same["before"], same["after"], "nothing pruned, yet the NTK changed: {same}");
    let c = condition("0.5", "half");
    for side in ["before", "after"] {
        let s = &c[side];
        let (lmin, lmax) = (s["lambda_min"].as_f64().unwrap(), s["lambda_max"].as_f64().unwrap());
        assert!(lmin > 0.0 && lmax >= lmin, "{side}: {s}");
        let kappa = s["kappa"].as_f64().unwrap();
        assert!((kappa - lmax / lmin).abs() <= 1e-9 * kappa, "{side}: {s}");
    }
    assert_eq!(c["before"], same["before"], "the dense spectrum does not depend on the ratio");
    assert_ne!(c["after"], c["before"], "pruning half of the filters left the NTK unchanged: {c}");
    // --plots draws the two condition numbers the report holds.
    let svg = std::fs::read_to_string(out_dir("diagnostics").join("half-plots/ntk-condition.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    let bars: Vec<f64> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("bar"))
        .map(|n| n.attribute("data-kappa").unwrap().parse().unwrap())
        .collect();
    let want = [c["before"]["kappa"].as_f64().unwrap(), c["after"]["kappa"].as_f64().unwrap()];
    assert_eq!(bars.len(), 2, "{svg}");
    for (got, want) in bars.iter().zip(want) {
        assert!((got - want).abs() <= 1e-12 * want, "bar {got} vs report {want}");
    }
}
