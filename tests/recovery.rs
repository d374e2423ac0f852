//! `--recover lsq` on real models, by running the binary: the refit lowers every refit
//! layer's reconstruction error, raises held-out fidelity to the dense model, changes the
//! written weights (so the test could fail), and the recovered slim model still equals its
//! masked reference (verified by the tool with tract, and by onnxruntime here).

mod common;

use std::path::Path;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use common::*;
use serde_json::Value;

fn run(args: &[&str]) -> String {
    let out = Command::cargo_bin("plprune-onnx").unwrap().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `--criterion magnitude --ratio 0.5 --recover lsq` on `units`, written to `out` with a
/// JSON `report`; `extra` options go before the output. Returns stdout.
fn magnitude_lsq(model: &Path, calib: &Path, units: &str, extra: &[&str], out: &Path, report: &Path) -> String {
    let mut a = vec![
        model.to_str().unwrap(),
        "--criterion",
        "magnitude",
        "--units",
        units,
        "--ratio",
        "0.5",
        "--calib",
        calib.to_str().unwrap(),
        "--recover",
        "lsq",
    ];
    a.extend(extra);
    a.extend(["-o", out.to_str().unwrap(), "--report", report.to_str().unwrap()]);
    run(&a)
}

#[test]
fn lsq_recovery_on_vgg_filters() {
    let dir = out_dir("recovery-vgg");
    let model = shared("digits/vgg_bn.onnx");
    let calib = shared("digits/img_train.npz");
    let (plain, rec) = (dir.join("plain.onnx"), dir.join("rec.onnx"));
    let (masked, report) = (dir.join("rec-masked.onnx"), dir.join("rec.json"));
    let common = ["--criterion", "taylor", "--ratio", "0.5", "--units", "filters", "--calib", calib.to_str().unwrap()];
    let mut a = vec![model.to_str().unwrap()];
    a.extend(common);
    let mut b = a.clone();
    a.extend(["-o", plain.to_str().unwrap()]);
    run(&a);
    b.extend([
        "--recover",
        "lsq",
        "-o",
        rec.to_str().unwrap(),
        "--masked-output",
        masked.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let stdout = run(&b);
    assert!(stdout.contains("recovered"), "{stdout}");
    assert!(stdout.contains("verified slim == masked dense"), "{stdout}");
    // Same selection, different weights.
    let (pa, pb) = (std::fs::read(&plain).unwrap(), std::fs::read(&rec).unwrap());
    assert_eq!(pa.len(), pb.len(), "same units removed: same tensor sizes");
    assert!(pa != pb, "--recover lsq left the weights unchanged");

    let r = json(&report);
    let rec = &r["recovery"];
    let layers = rec["layers"].as_array().unwrap();
    assert!(!layers.is_empty(), "no layer refit: {rec}");
    for l in layers {
        let (b, a) = (l["rel_err_before"].as_f64().unwrap(), l["rel_err_after"].as_f64().unwrap());
        assert!(a <= b, "refit made {} worse: {b} -> {a}", l["node"]);
        assert!(l["kept_inputs"].as_u64() < l["inputs"].as_u64(), "{l}");
    }
    assert!(layers.iter().any(|l| l["rel_err_after"].as_f64() < Some(0.5 * l["rel_err_before"].as_f64().unwrap())));
    assert_eq!(rec["eval_held_out"], Value::Bool(true), "img_train.npz has more samples than the fit uses");
    let f = &rec["fidelity"][0];
    assert_eq!(f["output"], "logits");
    let (cb, ca) = (f["cosine_before"].as_f64().unwrap(), f["cosine_after"].as_f64().unwrap());
    assert!(ca > cb, "held-out cosine to dense did not improve: {cb} -> {ca}");
    assert!(f["top1_after"].as_f64().unwrap() >= f["top1_before"].as_f64().unwrap(), "{f}");
    // The reported fidelity is what the written models compute: cosines of the dense model
    // against the unrecovered and the recovered slim model, run by tract on the same
    // held-out samples (the 32 after the 128 the refit used).
    let session = plprune_onnx::Session::open(&model, plprune_onnx::Config::default()).unwrap();
    let batch = plprune_onnx::calib::load(&calib, &session.model).unwrap();
    let (fit, m) = (rec["samples"].as_u64().unwrap() as usize, rec["eval_samples"].as_u64().unwrap() as usize);
    let inputs = batch.range(fit, fit + m).ordered(&session.model);
    let names = vec!["logits".to_string()];
    let logits = |bytes: &[u8]| plprune_onnx::runtime::run(bytes, &inputs, &names).unwrap()[0].1.to_f64_vec();
    let dense = logits(&std::fs::read(&model).unwrap());
    let cosine = |y: &[f64]| -> f64 {
        let c = y.len() / m;
        (0..m)
            .map(|s| {
                let (a, b) = (&dense[s * c..(s + 1) * c], &y[s * c..(s + 1) * c]);
                let dot: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum();
                dot / (a.iter().map(|p| p * p).sum::<f64>().sqrt() * b.iter().map(|q| q * q).sum::<f64>().sqrt())
            })
            .sum::<f64>()
            / m as f64
    };
    let (tb, ta) = (cosine(&logits(&pa)), cosine(&logits(&pb)));
    assert!((tb - cb).abs() < 1e-4, "reported cosine before {cb}, tract says {tb}");
    assert!((ta - ca).abs() < 1e-4, "reported cosine after {ca}, tract says {ta}");
    ort_check(&dir.join("rec.onnx"), &masked, Some(&calib), 4);
}

#[test]
fn lsq_recovery_refits_minilm_heads_and_neurons_with_biases() {
    let dir = out_dir("recovery-minilm");
    let model = shared("minilm-l6/model.onnx");
    let calib = shared("minilm-l6/calib.npz");
    let (out, report) = (dir.join("m.onnx"), dir.join("m.json"));
    run(&[
        model.to_str().unwrap(),
        "--criterion",
        "magnitude",
        "--scope",
        "layer",
        "--ratio",
        "0.5",
        "--calib",
        calib.to_str().unwrap(),
        "--recover",
        "lsq",
        "--recover-samples",
        "16",
        "--calib-samples",
        "8",
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let r = json(&report);
    let layers = r["recovery"]["layers"].as_array().unwrap();
    // Wo of every attention block and the down-projection of every FFN, each with its bias.
    assert_eq!(layers.len(), 12, "{layers:?}");
    assert!(layers.iter().all(|l| l["bias"] == Value::Bool(true)), "{layers:?}");
    assert!(layers.iter().all(|l| l["rel_err_after"].as_f64() < l["rel_err_before"].as_f64()), "{layers:?}");
    // Both add into the residual stream, so each refit also makes up for its drift; padded
    // positions (attention_mask = 0) are left out of the fit.
    for l in layers {
        assert!(l["residual"].as_str().is_some_and(|r| !r.is_empty()), "{l}");
    }
    let mask = plprune_onnx::npz::read(&calib).unwrap().remove("attention_mask").unwrap();
    let live = mask.to_f64_vec()[..16 * 64].iter().filter(|&&m| m != 0.0).count();
    assert!(live > 0 && live < 16 * 64);
    for l in layers {
        assert_eq!(l["rows"].as_u64(), Some(live as u64), "{l}");
        assert_eq!(l["padding_rows"].as_u64(), Some((16 * 64 - live) as u64), "{l}");
    }
    // Fit on 16 samples only (to keep the test fast), the refit does not generalise on
    // MiniLM (measured: held-out cosine goes down; with the default 128 samples it goes
    // up), so only that fidelity is reported, not that it improves.
    for f in r["recovery"]["fidelity"].as_array().unwrap() {
        for k in ["cosine_before", "cosine_after"] {
            assert!(f[k].as_f64().is_some_and(|c| (-1.0..=1.0).contains(&c)), "{f}");
        }
        assert!(f["top1_before"].is_null(), "embeddings are not logits: {f}");
    }
}

#[test]
fn lsq_recovery_fits_each_expert_on_the_tokens_routed_to_it() {
    let dir = out_dir("recovery-moe");
    let model = shared("digits/moe_transformer.onnx");
    let calib = shared("digits/train.npz");
    let (out, report) = (dir.join("m.onnx"), dir.join("m.json"));
    magnitude_lsq(&model, &calib, "neurons", &["--recover-samples", "32", "--calib-samples", "16"], &out, &report);
    let r = json(&report);
    let layers = r["recovery"]["layers"].as_array().unwrap();
    // fc2 of the 4 experts in each of the 2 blocks, each scaled by its routing weight.
    assert_eq!(layers.len(), 8, "{layers:?}");
    let rows = |l: &Value| l["rows"].as_u64().unwrap();
    let total = rows(&layers[0]) + layers[0]["unrouted_rows"].as_u64().unwrap();
    for block in ["blocks.0", "blocks.1"] {
        let experts: Vec<&Value> = layers.iter().filter(|l| l["node"].as_str().unwrap().contains(block)).collect();
        assert_eq!(experts.len(), 4);
        // Top-1 routing: every token is fit by exactly one expert of the block.
        assert_eq!(experts.iter().map(|l| rows(l)).sum::<u64>(), total, "{experts:?}");
        for l in experts {
            assert_eq!(rows(l) + l["unrouted_rows"].as_u64().unwrap(), total, "{l}");
            assert!(l["residual"].is_null(), "{l}");
            assert!(l["rel_err_after"].as_f64() <= l["rel_err_before"].as_f64(), "{l}");
        }
    }
    assert!(layers.iter().any(|l| l["rel_err_after"].as_f64() < l["rel_err_before"].as_f64()), "{layers:?}");
}

/// `--device gpu`: the refit's forwards run on the WGSL backend (software Vulkan in CI) and
/// give the refit the CPU backend gives, to f32 round-off. Fails under CI=true when no
/// wgpu adapter is found; skipped with a note locally.
#[test]
fn lsq_recovery_on_the_gpu_backend_matches_the_cpu_backend() {
    std::env::set_var("NODEVICE_SELECT", "1");
    if plprune_onnx::engine::gpu::GpuContext::new(true).expect("wgpu").is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "CI: no wgpu adapter found (apt install mesa-vulkan-drivers libvulkan1)"
        );
        eprintln!("note: no wgpu adapter; the GPU recovery test is skipped locally");
        return;
    }
    let dir = out_dir("recovery-gpu");
    let model = shared("digits/vgg_bn.onnx");
    let calib = shared("digits/img_train.npz");
    let reports: Vec<Value> = ["cpu", "gpu"]
        .iter()
        .map(|dev| {
            let (out, report) = (dir.join(format!("{dev}.onnx")), dir.join(format!("{dev}.json")));
            let stdout =
                magnitude_lsq(&model, &calib, "filters", &["--recover-samples", "64", "--device", dev], &out, &report);
            assert!(stdout.contains(&format!("forwards on {dev}")), "{stdout}");
            json(&report)
        })
        .collect();
    let (c, g) = (&reports[0]["recovery"], &reports[1]["recovery"]);
    assert!(c["device"].as_str().unwrap().starts_with("cpu"), "{}", c["device"]);
    assert!(g["device"].as_str().unwrap().starts_with("gpu"), "{}", g["device"]);
    let (lc, lg) = (c["layers"].as_array().unwrap(), g["layers"].as_array().unwrap());
    assert!(!lc.is_empty());
    assert_eq!(lc.len(), lg.len());
    for (a, b) in lc.iter().zip(lg) {
        assert_eq!(a["node"], b["node"]);
        assert_eq!(a["rows"], b["rows"]);
        for k in ["rel_err_before", "rel_err_after"] {
            let (x, y) = (a[k].as_f64().unwrap(), b[k].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * (1.0 + x), "{k} of {}: cpu {x}, gpu {y}", a["node"]);
        }
        assert!(b["rel_err_after"].as_f64() < b["rel_err_before"].as_f64(), "{b}");
    }
    let (fc, fg) = (&c["fidelity"][0], &g["fidelity"][0]);
    for k in ["cosine_before", "cosine_after", "rel_err_after"] {
        let (x, y) = (fc[k].as_f64().unwrap(), fg[k].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-4, "{k}: cpu {x}, gpu {y}");
    }
    assert!(fg["cosine_after"].as_f64() > fg["cosine_before"].as_f64(), "{fg}");
}

/// Whole experts pruned: each kept expert's down-projection is refit towards the MoE
/// block's dense combined output on the tokens routed to it in the masked model, so the
/// kept experts take over the tokens of the removed ones.
#[test]
fn lsq_recovery_refits_kept_experts_to_the_combined_output_when_experts_are_pruned() {
    let dir = out_dir("recovery-experts");
    let model = shared("digits/moe_transformer.onnx");
    let calib = shared("digits/train.npz");
    let (out, report) = (dir.join("e.onnx"), dir.join("e.json"));
    let stdout = magnitude_lsq(&model, &calib, "experts", &[], &out, &report);
    assert!(stdout.contains("verified slim == masked dense"), "{stdout}");
    let r = json(&report);
    let rec = &r["recovery"];
    assert_eq!(rec["skipped"].as_array().unwrap().len(), 0, "{rec}");
    let layers = rec["layers"].as_array().unwrap();
    // 8 experts in 2 blocks, half removed: one refit per kept expert.
    assert_eq!(layers.len(), 4, "{layers:?}");
    let rows = |l: &Value| l["rows"].as_u64().unwrap();
    let total = rows(&layers[0]) + layers[0]["unrouted_rows"].as_u64().unwrap();
    for block in ["blocks.0", "blocks.1"] {
        let kept: Vec<&Value> = layers.iter().filter(|l| l["node"].as_str().unwrap().contains(block)).collect();
        assert!(!kept.is_empty(), "every block keeps an expert");
        // Every token is served by exactly one kept expert (those of removed ones included).
        assert_eq!(kept.iter().map(|l| rows(l)).sum::<u64>(), total, "{kept:?}");
        for l in kept {
            let target = l["target"].as_str().unwrap();
            assert!(target.starts_with(&format!("/{block}/ffn/Add")), "the block's combined output: {l}");
            assert!(!l["residual"].is_null(), "the block output joins the residual stream: {l}");
            assert!(l["rel_err_after"].as_f64() < l["rel_err_before"].as_f64(), "{l}");
        }
    }
    let f = &rec["fidelity"][0];
    let (cb, ca) = (f["cosine_before"].as_f64().unwrap(), f["cosine_after"].as_f64().unwrap());
    assert!(ca > cb + 0.02, "held-out cosine to dense: {cb} -> {ca}");
    assert!(f["top1_after"].as_f64() >= f["top1_before"].as_f64(), "{f}");
}
