//! The command line, run as a user runs it: the must-show on effnet-lite0, `inspect`
//! agreeing with the pruned model, and every error path with its message and exit code.

mod common;

use std::path::Path;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use common::*;
use serde_json::Value;

fn bin() -> Command {
    Command::cargo_bin("plprune-onnx").unwrap()
}

fn run_ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "plprune-onnx {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects failure with `code`; returns stderr.
fn run_err(args: &[&str], code: i32) -> String {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "plprune-onnx {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error expected, got:\n{err}");
    err
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn effnet_quarter_prune_and_inspect_agree() {
    let dir = out_dir("cli");
    let model = shared("effnet-lite0/model.onnx");
    let out = dir.join("e.onnx");
    let report = dir.join("e.json");
    let masked = dir.join("e-masked.onnx");
    // The rewrite is the point here; the criterion is magnitude so the test stays fast
    // (pl on effnet is in the criteria benchmark).
    let stdout = run_ok(&[
        model.to_str().unwrap(),
        "--criterion",
        "magnitude",
        "--ratio",
        "0.25",
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--masked-output",
        masked.to_str().unwrap(),
    ]);
    assert!(stdout.contains("filters") && stdout.contains("verified"), "{stdout}");
    let r = json(&report);
    let f = &r["kinds"]["filters"];
    let (before, after) = (f["parameters"]["before"].as_u64().unwrap(), f["parameters"]["after"].as_u64().unwrap());
    assert!((after as f64) <= 0.8 * before as f64, "conv-filter parameters {before} -> {after}: less than 20% removed");
    assert_eq!(r["verification"]["passed"], true);

    // inspect on the pruned model finds the same groups with the new sizes.
    let inspected: Value = serde_json::from_str(&run_ok(&["inspect", out.to_str().unwrap(), "--json"])).unwrap();
    let fi = &inspected["kinds"]["filters"];
    assert_eq!(fi["units"]["before"], f["units"]["after"]);
    assert_eq!(fi["parameters"]["before"], f["parameters"]["after"]);
    assert_eq!(fi["groups"], f["groups"]);

    // diff agrees with inspect, layer by layer and in total.
    let d: Value =
        serde_json::from_str(&run_ok(&["diff", model.to_str().unwrap(), out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(d["kinds"]["filters"]["units"]["b"], fi["units"]["before"]);
    assert_eq!(d["kinds"]["filters"]["parameters"]["b"], fi["parameters"]["before"]);
    assert_eq!(d["kinds"]["filters"]["parameters"]["a"], f["parameters"]["before"]);
    let inspected_layers: Vec<(String, u64)> = inspected["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["layer"].as_str().unwrap().to_string(), g["units_before"].as_u64().unwrap()))
        .collect();
    for (layer, units) in &inspected_layers {
        let row = d["groups"].as_array().unwrap().iter().find(|g| g["layer"] == layer.as_str()).unwrap();
        assert_eq!(row["units_b"].as_u64(), Some(*units), "{layer}");
    }
    assert!(d["flops"]["b"].as_u64().unwrap() < d["flops"]["a"].as_u64().unwrap());
    assert!(!d["tensors_reshaped"].as_array().unwrap().is_empty());
    let text = run_ok(&["diff", model.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(text.contains("FLOPs") && text.contains("/_conv_head/Conv"), "{text}");
    ort_check(&out, &masked, Some(&shared("effnet-lite0/calib.npz")), 2);
}

#[test]
fn inspect_lists_groups_and_reasons() {
    let text = run_ok(&["inspect", shared("digits/vgg_bn.onnx").to_str().unwrap()]);
    assert!(text.contains("filters") && text.contains("/f/f.0/Conv"), "{text}");
    assert!(text.contains("neurons") && text.contains("/c/c.1/Gemm"), "{text}");
    // The classifier's outputs are the logits: not prunable, with the reason.
    assert!(text.contains("reaches graph output 'logits'"), "{text}");
}

#[test]
fn same_command_twice_gives_identical_bytes() {
    let dir = out_dir("cli-determinism");
    let model = shared("digits/vgg_bn.onnx");
    let mut outs = Vec::new();
    for i in 0..2 {
        let o = dir.join(format!("v{i}.onnx"));
        let r = dir.join(format!("v{i}.json"));
        run_ok(&[
            model.to_str().unwrap(),
            "--criterion",
            "random",
            "--seed",
            "7",
            "--ratio",
            "0.5",
            "-o",
            o.to_str().unwrap(),
            "--report",
            r.to_str().unwrap(),
        ]);
        let mut rep = json(&r);
        rep.as_object_mut().unwrap().remove("timings_s");
        outs.push((std::fs::read(&o).unwrap(), rep));
    }
    assert!(outs[0].0 == outs[1].0, "models differ between identical runs");
    assert_eq!(outs[0].1, outs[1].1, "reports differ between identical runs");
}

/// Issue 4's must-show: the PL criterion on vgg_bn writes a slim model and a report with
/// every unit's features; the same command twice gives identical bytes. Issue 6: the same
/// runs write `--plots`, checked against the report (plots_match_report), byte-identical
/// between the runs, and stderr stays empty (no progress bars when it is not a terminal).
#[test]
fn pl_criterion_on_vgg_with_report() {
    let dir = out_dir("cli-pl");
    let model = shared("digits/vgg_bn.onnx");
    let calib = shared("digits/img_train.npz");
    let mut outs = Vec::new();
    let mut plot_sets = Vec::new();
    for i in 0..2 {
        let o = dir.join(format!("v{i}.onnx"));
        let r = dir.join(format!("r{i}.json"));
        let plots = dir.join(format!("plots{i}"));
        let _ = std::fs::remove_dir_all(&plots);
        let out = bin()
            .args([
                model.to_str().unwrap(),
                "--criterion",
                "pl",
                "--ratio",
                "0.5",
                "--calib",
                calib.to_str().unwrap(),
                "--device",
                "cpu",
                "-o",
                o.to_str().unwrap(),
                "--report",
                r.to_str().unwrap(),
                "--plots",
                plots.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stdout}\n{stderr}");
        // stderr is not a terminal: no progress bars, only warnings (here the one about
        // conv channel counts off the multiples of 8, without --round-to).
        assert!(
            stderr.lines().all(|l| l.starts_with("warning: ")),
            "stderr is not a terminal: no progress bars expected, got:\n{stderr}"
        );
        assert!(stderr.contains("--round-to 8 keeps every layer aligned"), "{stderr}");
        assert!(stdout.contains("criterion pl on 32 calibration samples, device cpu"), "{stdout}");
        assert!(stdout.contains(&format!("SVG files in {}", plots.display())), "{stdout}");
        let mut rep = json(&r);
        plots_match_report(&plots, &rep);
        rep.as_object_mut().unwrap().remove("timings_s");
        // Phase times differ between runs; their names and devices must not.
        for ph in rep["phases"].as_array_mut().expect("phases").iter_mut() {
            let secs = ph.as_object_mut().unwrap().remove("seconds").and_then(|v| v.as_f64());
            assert!(secs.is_some_and(|x| x.is_finite() && x >= 0.0), "{ph}");
        }
        outs.push((std::fs::read(&o).unwrap(), rep));
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&plots)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        plot_sets.push(files);
    }
    assert!(plot_sets[0] == plot_sets[1], "plots differ between identical pl runs");
    assert!(outs[0].0 == outs[1].0, "models differ between identical pl runs");
    assert_eq!(outs[0].1, outs[1].1, "reports differ between identical pl runs");
    let rep = &outs[0].1;
    assert_eq!(rep["device"].as_str().map(|d| d.starts_with("cpu")), Some(true));
    // Every scoring phase, in order, with the device it ran on (all on the CPU here);
    // vgg's logits give a cross-entropy objective, so the traces are Hutchinson's.
    let phases: Vec<(&str, &str)> = rep["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["device"].as_str().unwrap()))
        .collect();
    let names: Vec<&str> = phases.iter().map(|p| p.0).collect();
    assert_eq!(
        names,
        [
            "calibration forward",
            "ntk: forward (step 1)",
            "ntk: backward (4 projections) (step 1)",
            "ntk: per-sample gradients + grams (step 1)",
            "eigenvalues (step 1)",
            "hessian traces: hutchinson, f64 (step 1)",
            "gate training (step 1)",
        ]
    );
    assert!(phases.iter().all(|p| p.1.starts_with("cpu")), "{phases:?}");
    let steps = rep["scoring"]["steps"].as_array().unwrap();
    assert!(steps[0]["gate"]["curve"].as_array().unwrap().len() == 21, "{}", steps[0]);
    let mut n = 0;
    for g in rep["groups"].as_array().unwrap().iter().filter(|g| g["kind"] == "filters") {
        for u in g["units"].as_array().unwrap() {
            let f = &u["features"];
            assert!(f["lambda_min"].as_f64().unwrap() >= 0.0 && f["hessian"].is_number(), "{u}");
            assert!(u["score"].is_number() && u["kept"].is_boolean(), "{u}");
            n += 1;
        }
    }
    assert_eq!(n, 320);
    let before = rep["kinds"]["filters"]["parameters"]["before"].as_f64().unwrap();
    let after = rep["kinds"]["filters"]["parameters"]["after"].as_f64().unwrap();
    assert!((after / before - 0.5).abs() < 0.03, "{after} / {before}");
}

#[test]
fn help_shows_examples_exit_codes_and_new_options() {
    let help = run_ok(&["--help"]);
    for want in [
        "Exit codes: 0 ok, 1 internal error, 2 bad model/data/option, 3 rewrite failed verification",
        "--plots plots/",
        "--external-data -o slim.onnx",
        "--external-data-threshold <BYTES>",
        "--plots <DIR>",
        "Progress bars go to stderr",
    ] {
        assert!(help.contains(want), "--help lacks '{want}':\n{help}");
    }
}

#[test]
fn error_paths_are_one_line_and_nonzero() {
    let dir = out_dir("cli-errors");
    let vgg = shared("digits/vgg_bn.onnx");
    let vggs = vgg.to_str().unwrap();
    let out = dir.join("x.onnx");
    let outs = out.to_str().unwrap();

    let e = run_err(&["/nonexistent/model.onnx", "-o", outs], 2);
    assert!(e.contains("/nonexistent/model.onnx"), "{e}");

    let not_onnx = dir.join("not.onnx");
    std::fs::write(&not_onnx, b"this is a text file, not a model").unwrap();
    let e = run_err(&[not_onnx.to_str().unwrap(), "-o", outs], 2);
    assert!(e.contains("not.onnx") && e.contains("not a valid ONNX model"), "{e}");

    let bytes = std::fs::read(&vgg).unwrap();
    let truncated = dir.join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = run_err(&[truncated.to_str().unwrap(), "-o", outs], 2);
    assert!(e.contains("truncated.onnx"), "{e}");

    let e = run_err(&[vggs, "--ratio", "1.0", "-o", outs], 2);
    assert!(e.contains("--ratio"), "{e}");
    let e = run_err(&[vggs, "--ratio=-0.1", "-o", outs], 2);
    assert!(e.contains("--ratio"), "{e}");
    let e = run_err(&[vggs, "-o", vggs], 2);
    assert!(e.contains("overwrite the input"), "{e}");
    let e = run_err(&[vggs, "--external-data-threshold", "0", "-o", outs], 2);
    assert!(e.contains("--external-data-threshold"), "{e}");
    let e = run_err(&[vggs, "--criterion", "nope", "-o", outs], 2);
    assert!(e.contains("unknown --criterion 'nope'"), "{e}");
    let e = run_err(&[vggs, "--units", "filters,bogus", "-o", outs], 2);
    assert!(e.contains("bogus"), "{e}");
    let e = run_err(&[vggs, "--round-to", "0", "-o", outs], 2);
    assert!(e.contains("--round-to"), "{e}");
    for bad in ["0", "1.5", "NaN"] {
        let e = run_err(&[vggs, "--max-layer-ratio", bad, "-o", outs], 2);
        assert!(e.contains(&format!("--max-layer-ratio {bad} is outside (0, 1]")), "{e}");
    }
    // Nothing of the asked-for kinds can be pruned: an error, not an unchanged model.
    let e = run_err(&[vggs, "--units", "heads", "--criterion", "magnitude", "-o", outs], 2);
    assert!(e.contains("nothing to prune: no heads can be removed") && e.contains("of filters"), "{e}");
    let e = run_err(&[shared("minilm-l6/model.onnx").to_str().unwrap(), "--units", "filters", "-o", outs], 2);
    assert!(e.contains("model.onnx: nothing to prune") && e.contains("inspect"), "{e}");
    let e = run_err(&[vggs, "--distill-hidden", "-o", outs], 2);
    assert!(e.contains("--distill-hidden") && e.contains("--distill-steps"), "{e}");
    let e = run_err(&[vggs, "--distill-steps", "1", "--distill-hidden-weight", "0.5", "-o", outs], 2);
    assert!(e.contains("--distill-hidden-weight weighs the terms of --distill-hidden"), "{e}");
    let e = run_err(&[vggs, "--distill-steps", "1", "--distill-hidden", "--distill-hidden-weight=-1", "-o", outs], 2);
    assert!(e.contains("--distill-hidden-weight must be a number ≥ 0, got -1"), "{e}");
    // Recovery without calibration data: refused before any scoring.
    let e = run_err(&[vggs, "--criterion", "magnitude", "--recover", "lsq", "-o", outs], 2);
    assert!(e.contains("--recover lsq") && e.contains("--calib"), "{e}");
    let e = run_err(&[vggs, "--criterion", "magnitude", "--distill-steps", "5", "-o", outs], 2);
    assert!(e.contains("--distill-steps") && e.contains("--calib"), "{e}");

    // Calibration data of the wrong model: missing input, wrong dtype, wrong shape.
    let e = run_err(&[vggs, "--calib", shared("minilm-l6/calib.npz").to_str().unwrap(), "-o", outs], 2);
    assert!(e.contains("calib.npz") && e.contains("no array for model input 'x'"), "{e}");
    let mut arrays = std::collections::BTreeMap::new();
    arrays.insert(
        "x".to_string(),
        plprune_onnx::tensor::Tensor::from_f64_as(plprune_onnx::tensor::DType::F64, vec![2, 1, 8, 8], &[0.0; 128]),
    );
    let wrong_dtype = dir.join("f64.npz");
    plprune_onnx::npz::write(&wrong_dtype, &arrays).unwrap();
    let e = run_err(&[vggs, "--calib", wrong_dtype.to_str().unwrap(), "-o", outs], 2);
    assert!(e.contains("f64.npz") && e.contains("float64") && e.contains("float32"), "{e}");
    let e = run_err(&[vggs, "--calib", shared("digits/train.npz").to_str().unwrap(), "-o", outs], 2);
    assert!(e.contains("train.npz") && e.contains("rank"), "{e}");
    assert!(!out.exists(), "a failed run must not write output");
}

#[test]
fn killed_runs_leave_no_partial_output() {
    let dir = out_dir("cli-kill");
    let model = shared("minilm-l6/model.onnx");
    let reference = dir.join("ref.onnx");
    let args = |o: &str| {
        vec![
            model.to_str().unwrap().to_string(),
            "--criterion".into(),
            "magnitude".into(),
            "--ratio".into(),
            "0.5".into(),
            "-q".into(),
            "-o".into(),
            o.to_string(),
        ]
    };
    run_ok(&args(reference.to_str().unwrap()).iter().map(String::as_str).collect::<Vec<_>>());
    let want = std::fs::read(&reference).unwrap();
    for (i, ms) in [50u64, 400, 900, 1500, 2500].into_iter().enumerate() {
        let out = dir.join(format!("k{i}.onnx"));
        let _ = std::fs::remove_file(&out);
        let mut child = bin().args(args(out.to_str().unwrap())).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = child.kill();
        let _ = child.wait();
        // Either nothing at the output path, or the complete model: never a prefix.
        if let Ok(got) = std::fs::read(&out) {
            assert!(got == want, "killed after {ms} ms: {} holds a partial model", out.display());
        }
    }
}

#[test]
fn missing_external_data_is_a_clear_error() {
    let dir = out_dir("cli-external");
    let model = dir.join("external_data.onnx");
    std::fs::copy(fixture("external_data.onnx"), &model).unwrap();
    let _ = std::fs::remove_file(dir.join("external_data.onnx.data"));
    let e = run_err(&[model.to_str().unwrap(), "-o", dir.join("o.onnx").to_str().unwrap()], 2);
    assert!(e.contains("external_data.onnx") && e.contains("external data file"), "{e}");
    std::fs::copy(fixture("external_data.onnx.data"), dir.join("external_data.onnx.data")).unwrap();
    run_ok(&[model.to_str().unwrap(), "--ratio", "0.5", "-o", dir.join("o.onnx").to_str().unwrap()]);
}

/// Checks the SVGs of `--plots` against the report they were drawn from: every heatmap has
/// one row per layer of its kind, one cell per unit, a cross on exactly the pruned units
/// and a colour bar whose range is the range of the plotted values; the gate's curve has
/// one point per epoch in each series and marks the chosen epoch.
fn plots_match_report(dir: &Path, rep: &Value) {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    let features = ["hessian", "kappa", "lambda_max", "lambda_min", "rho", "score", "trace_k"];
    // Plots exist exactly for the kinds with scored units (on vgg: filters, and the one
    // prunable classifier layer's neurons), and for each schedule step with a gate.
    let scored_kinds: std::collections::BTreeSet<&str> = rep["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["units"].as_array().unwrap().iter().any(|u| u["score"].is_number()))
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert!(scored_kinds.contains("filters"), "{scored_kinds:?}");
    // A feature gets a plot where some unit of the kind has a value for it.
    let has = |k: &str, f: &str| {
        let groups = rep["groups"].as_array().unwrap().iter().filter(|g| g["kind"] == k);
        groups.flat_map(|g| g["units"].as_array().unwrap()).any(|u| {
            let v = if f == "score" { &u["score"] } else { &u["features"][feature_key(f)] };
            v.is_number()
        })
    };
    let mut want: Vec<String> = scored_kinds
        .iter()
        .flat_map(|k| features.iter().filter(|f| has(k, f)).map(move |f| format!("{k}-{f}.svg")))
        .collect();
    assert!(want.len() >= 13, "{want:?}");
    want.push("gate-step1.svg".into());
    want.sort();
    assert_eq!(names, want);
    for kind in scored_kinds {
        heatmaps_match_report(dir, rep, kind, &features);
    }
    gate_curve_matches_report(dir, rep);
}

fn heatmaps_match_report(dir: &Path, rep: &Value, kind: &str, features: &[&str]) {
    let groups: Vec<&Value> = rep["groups"].as_array().unwrap().iter().filter(|g| g["kind"] == kind).collect();
    for &f in features {
        let file = format!("{kind}-{f}.svg");
        if !dir.join(&file).exists() {
            continue; // no unit has this feature (checked by the file list above)
        }
        let text = std::fs::read_to_string(dir.join(&file)).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{file} is not XML: {e}"));
        let class = |n: &roxmltree::Node, c: &str| n.attribute("class").is_some_and(|v| v.split(' ').any(|x| x == c));
        let rows: Vec<roxmltree::Node> = doc.descendants().filter(|n| class(n, "row")).collect();
        assert_eq!(rows.len(), groups.len(), "{file}: one row per layer");
        let mut values = Vec::new();
        for (row, g) in rows.iter().zip(&groups) {
            let layer = g["layer"].as_str().unwrap();
            assert_eq!(row.attribute("data-layer"), Some(layer), "{file}");
            let label = row.descendants().find(|n| class(n, "layer")).unwrap().text().unwrap();
            assert_eq!(label, layer, "{file}: the axis label is the layer name");
            let cells: Vec<roxmltree::Node> = row.descendants().filter(|n| class(n, "cell")).collect();
            assert_eq!(cells.len() as u64, g["units_before"].as_u64().unwrap(), "{file} {layer}: one cell per unit");
            assert!(cells.iter().all(|c| c.attribute("data-units") == Some("1")));
            let pruned: Vec<usize> =
                g["pruned"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as usize).collect();
            let marks = row.descendants().filter(|n| class(n, "pruned")).count();
            assert_eq!(marks, pruned.len(), "{file} {layer}: one cross per pruned unit");
            // The crossed cells are the pruned units (cells are in unit order).
            let crossed: Vec<usize> = cells
                .iter()
                .enumerate()
                .filter(|(_, c)| c.attribute("data-pruned") == Some("1"))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(crossed, pruned, "{file} {layer}");
            for u in g["units"].as_array().unwrap() {
                let v = if f == "score" { &u["score"] } else { &u["features"][feature_key(f)] };
                if let Some(v) = v.as_f64() {
                    values.push(v);
                }
            }
        }
        let bar = doc.descendants().find(|n| class(n, "colorbar")).unwrap_or_else(|| panic!("{file}: no colour bar"));
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let close = |a: &str, b: f64| {
            let a: f64 = a.parse().unwrap();
            (a - b).abs() <= 1e-3 * b.abs().max(1e-9)
        };
        assert!(
            close(bar.attribute("data-min").unwrap(), lo),
            "{file}: colour bar min {:?} vs {lo}",
            bar.attribute("data-min")
        );
        assert!(
            close(bar.attribute("data-max").unwrap(), hi),
            "{file}: colour bar max {:?} vs {hi}",
            bar.attribute("data-max")
        );
        let log = bar.attribute("data-log") == Some("true");
        let min_pos = values.iter().copied().filter(|&v| v > 0.0).fold(f64::INFINITY, f64::min);
        let want_log = lo >= 0.0 && min_pos.is_finite() && hi / min_pos >= 100.0;
        assert_eq!(log, want_log, "{file}: log scale iff values ≥ 0 whose positive part spans two decades");
        let title =
            doc.root_element().children().find(|n| n.has_tag_name("title")).unwrap().text().unwrap().to_string();
        assert_eq!(title.contains("log10"), log, "{file}: {title}");
        assert!(title.contains("one cell per unit"), "{title}");
    }
}

fn gate_curve_matches_report(dir: &Path, rep: &Value) {
    let gate = &rep["scoring"]["steps"][0]["gate"];
    let epochs = gate["curve"].as_array().unwrap().len();
    let text = std::fs::read_to_string(dir.join("gate-step1.svg")).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap();
    let series: Vec<(String, usize)> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("series"))
        .map(|n| (n.attribute("data-name").unwrap().to_string(), n.attribute("points").unwrap().split(' ').count()))
        .collect();
    let has_val = gate["curve"][0]["val_loss"].is_number();
    let mut want = vec!["loss (calibration)", "penalty", "total"];
    if has_val {
        want.insert(1, "held-out loss");
    }
    assert_eq!(series.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(), want);
    assert!(series.iter().all(|s| s.1 == epochs), "{series:?} vs {epochs} epochs");
    let best: Vec<&str> = doc.descendants().filter_map(|n| n.attribute("data-epoch")).collect();
    let b = gate["best_epoch"].as_u64().unwrap().to_string();
    assert!(!best.is_empty() && best.iter().all(|e| *e == b), "{best:?} vs {b}");
}

/// The report's key of a plotted feature.
fn feature_key(f: &str) -> &str {
    if f == "rho" {
        "entropy"
    } else {
        f
    }
}

#[test]
fn kv_cache_is_shown_by_inspect_and_narrowed_by_a_run() {
    let model = fixture("attn_gqa_kv_cache.onnx");
    let model = model.to_str().unwrap();
    let text = run_ok(&["inspect", model]);
    for l in 0..2 {
        let want = format!("(cache: past_key.l{l}, past_value.l{l}, present_key.l{l}, present_value.l{l})");
        assert!(text.contains(&want), "{text}");
    }
    let dir = out_dir("cli");
    let (out, rep) = (dir.join("kv.onnx"), dir.join("kv.json"));
    let args = ["--ratio", "0.5", "--units", "heads", "--criterion", "magnitude", "-o", out.to_str().unwrap()];
    let stdout = run_ok(&[&[model][..], &args[..], &["--report", rep.to_str().unwrap()]].concat());
    assert!(stdout.contains("cache    4 inputs and 4 outputs narrowed"), "{stdout}");
    let r = json(&rep);
    let itf = r["interface"].as_object().unwrap();
    assert_eq!(itf.len(), 8, "{itf:?}");
    let heads: Vec<&Value> = r["groups"].as_array().unwrap().iter().filter(|g| g["kind"] == "heads").collect();
    for (l, g) in heads.iter().enumerate() {
        for t in ["past_key", "present_value"] {
            let n = &itf[&format!("{t}.l{l}")];
            assert_eq!(n["kept"].as_array().unwrap().len() as u64, g["units_after"].as_u64().unwrap(), "{n}");
            assert_eq!(n["dense"], g["units_before"], "{n}");
        }
    }
}
