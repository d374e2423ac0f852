//! Criteria compared on the shared models (issues 4 and 7): every criterion prunes the same
//! unit kinds at each ratio, without and with `--recover lsq` (or `obs`); the pruned model is run by
//! tract on held-out data, and one table is printed: unit kinds, parameters, FLOPs (for the
//! held-out batch shape), fidelity, time, and for `pl` how its trained gate's selection
//! differs from ranking by λ_min alone.
//!
//! - vgg: digits/vgg_bn filters; test accuracy on digits/img_test.npz (540 samples).
//! - moe: digits/moe_transformer FFN neurons; test accuracy on digits/test.npz.
//! - moe-experts: the same model's experts (8 in 2 blocks), the same metric.
//! - minilm: minilm-l6 FFN neurons; mean cosine of sentence_embedding to the dense model's
//!   on the first 128 sentences of minilm-l6/heldout.npz.
//! - minilm-hn: minilm-l6 heads and FFN neurons, the same metric.
//! - effnet: effnet-lite0 filters; top-1 agreement with the dense model and mean KL(dense ‖
//!   pruned) of the softmax on effnet-lite0/heldout.npz (24 images).
//!
//! Run (defaults: every model, every criterion, ratio 0.5, no recovery):
//!   cargo bench --bench criteria [-- --models vgg,moe,moe-experts,minilm,minilm-hn,effnet
//!       --criteria pl,magnitude --ratios 0.25,0.5,0.75 --recover none,lsq,obs --n 32
//!       --ridge 0.1 --ntk-condition --distill-steps 200 --distill-lr 1e-3 --distill-hidden
//!       --alpha 0.1 --gate-objective raw --round-to 8 --max-layer-ratio 0.8 --latency]
//! (`--alpha` is pl's Hessian-penalty weight, `--round-to` the per-layer multiple of kept
//! filters and neurons and `--max-layer-ratio` the largest share of its units a layer may
//! lose, as on the command line; defaults 1.)
//! (`--recover` also takes `lsq+distill`, `obs+distill` and `none+distill`: the refit or none, then
//! `--distill-steps` Adam steps of label-free distillation towards the dense model.)
//! (`--ntk-condition` adds the model-level NTK condition number before -> after pruning to
//! each row's note.)
//! (`--latency` adds a column: onnxruntime's speed-up of the pruned model over the dense one
//! at batch 1 and 32, 2 threads, measured in the same run by `benches/ort_latency.py` on the
//! held-out data (`--latency-reps`, default 10). Rows of the same criterion and ratio have the
//! same architecture, so the first recovery mode's measurement stands for the others.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use plprune_onnx::criteria::Criterion;
use plprune_onnx::passes::recover_weights::Recover;
use plprune_onnx::tensor::Tensor;
use plprune_onnx::units::UnitKind;
use plprune_onnx::{calib, runtime, Config, Session};

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).cloned()
}

struct Case {
    key: &'static str,
    model: &'static str,
    calib: &'static str,
    test: &'static str,
    kinds: &'static [UnitKind],
    /// Output index evaluated, and how: accuracy against labels, cosine to dense, or
    /// top-1 agreement with dense (KL in the note).
    output: usize,
    metric: Metric,
    test_samples: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    Accuracy,
    Cosine,
    Agreement,
}

const CASES: &[Case] = &[
    Case {
        key: "vgg",
        model: "digits/vgg_bn.onnx",
        calib: "digits/img_train.npz",
        test: "digits/img_test.npz",
        kinds: &[UnitKind::Filters],
        output: 0,
        metric: Metric::Accuracy,
        test_samples: 540,
    },
    Case {
        key: "moe",
        model: "digits/moe_transformer.onnx",
        calib: "digits/train.npz",
        test: "digits/test.npz",
        kinds: &[UnitKind::Neurons],
        output: 0,
        metric: Metric::Accuracy,
        test_samples: 540,
    },
    Case {
        key: "moe-experts",
        model: "digits/moe_transformer.onnx",
        calib: "digits/train.npz",
        test: "digits/test.npz",
        kinds: &[UnitKind::Experts],
        output: 0,
        metric: Metric::Accuracy,
        test_samples: 540,
    },
    Case {
        key: "minilm",
        model: "minilm-l6/model.onnx",
        calib: "minilm-l6/calib.npz",
        test: "minilm-l6/heldout.npz",
        kinds: &[UnitKind::Neurons],
        output: 1,
        metric: Metric::Cosine,
        test_samples: 128,
    },
    Case {
        key: "minilm-hn",
        model: "minilm-l6/model.onnx",
        calib: "minilm-l6/calib.npz",
        test: "minilm-l6/heldout.npz",
        kinds: &[UnitKind::Heads, UnitKind::Neurons],
        output: 1,
        metric: Metric::Cosine,
        test_samples: 128,
    },
    Case {
        key: "effnet",
        model: "effnet-lite0/model.onnx",
        calib: "effnet-lite0/calib.npz",
        test: "effnet-lite0/heldout.npz",
        kinds: &[UnitKind::Filters],
        output: 0,
        metric: Metric::Agreement,
        test_samples: 24,
    },
];

fn outputs(bytes: &[u8], inputs: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    runtime::run(bytes, inputs, &[]).expect("tract runs the model")
}

/// Mean KL(softmax(dense) ‖ softmax(out)) over samples.
fn mean_kl(out: &Tensor, dense: &Tensor) -> f64 {
    let (v, d) = (out.to_f64_vec(), dense.to_f64_vec());
    let n = out.dims[0];
    let c = v.len() / n;
    let logsm = |row: &[f64]| -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z = row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        row.iter().map(|x| x - z).collect()
    };
    (0..n)
        .map(|s| {
            let (p, q) = (logsm(&d[s * c..(s + 1) * c]), logsm(&v[s * c..(s + 1) * c]));
            p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum::<f64>()
        })
        .sum::<f64>()
        / n as f64
}

/// Accuracy against labels, mean cosine to `dense`, or top-1 agreement with `dense`.
fn fidelity(case: &Case, out: &Tensor, labels: Option<&[i64]>, dense: &Tensor) -> f64 {
    let v = out.to_f64_vec();
    let n = out.dims[0];
    let c = v.len() / n;
    let argmax = |row: &[f64]| (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
    if case.metric == Metric::Agreement {
        let d = dense.to_f64_vec();
        let same = (0..n).filter(|&s| argmax(&v[s * c..(s + 1) * c]) == argmax(&d[s * c..(s + 1) * c])).count();
        return same as f64 / n as f64;
    }
    if case.metric == Metric::Accuracy {
        let labels = labels.expect("labels in the test file");
        let hits = (0..n)
            .filter(|&s| {
                let row = &v[s * c..(s + 1) * c];
                let am = (0..c).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                am as i64 == labels[s]
            })
            .count();
        hits as f64 / n as f64
    } else {
        let d = dense.to_f64_vec();
        (0..n)
            .map(|s| {
                let (a, b) = (&v[s * c..(s + 1) * c], &d[s * c..(s + 1) * c]);
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
                dot / (na * nb).max(1e-30)
            })
            .sum::<f64>()
            / n as f64
    }
}

fn main() {
    std::env::set_var("NODEVICE_SELECT", "1");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    let models = arg("--models").unwrap_or_else(|| "vgg,moe,minilm".into());
    let criteria: Vec<Criterion> = match arg("--criteria") {
        Some(list) => list.split(',').map(|c| Criterion::parse(c).expect("known criterion")).collect(),
        None => Criterion::ALL.to_vec(),
    };
    let ratios: Vec<f64> = arg("--ratios")
        .or_else(|| arg("--ratio"))
        .unwrap_or_else(|| "0.5".into())
        .split(',')
        .map(|r| r.parse().expect("ratio"))
        .collect();
    // `lsq+distill`: the refit, then `--distill-steps` of label-free distillation.
    let recovers: Vec<(Recover, bool)> = arg("--recover")
        .unwrap_or_else(|| "none".into())
        .split(',')
        .map(|r| match r.strip_suffix("+distill") {
            Some(base) => (Recover::parse(base).expect("none, lsq, obs, or one of them +distill"), true),
            None => (Recover::parse(r).expect("none, lsq, obs, or one of them +distill"), false),
        })
        .collect();
    let distill_steps: usize = arg("--distill-steps").map(|r| r.parse().expect("distill steps")).unwrap_or(200);
    let distill_lr: f64 = arg("--distill-lr").map(|r| r.parse().expect("distill lr")).unwrap_or(1e-3);
    let distill_hidden = std::env::args().any(|a| a == "--distill-hidden");
    let hidden = if distill_hidden { " (hidden)" } else { "" };
    let alpha: f64 = arg("--alpha").map(|r| r.parse().expect("alpha")).unwrap_or(1.0);
    // `--gate-objective raw`: pl's L_total in the paper's units, as on the command line.
    let relative = match arg("--gate-objective").as_deref() {
        None | Some("relative") => true,
        Some("raw") => false,
        Some(o) => panic!("--gate-objective is relative or raw, not {o}"),
    };
    let n: usize = arg("--n").and_then(|r| r.parse().ok()).unwrap_or(32);
    let ridge: f64 = arg("--ridge").map(|r| r.parse().expect("ridge")).unwrap_or(Config::default().recover_ridge);
    let ntk_condition = std::env::args().any(|a| a == "--ntk-condition");
    let round_to: usize = arg("--round-to").map(|r| r.parse().expect("round-to")).unwrap_or(1);
    let max_layer_ratio: f64 = arg("--max-layer-ratio").map(|r| r.parse().expect("max-layer-ratio")).unwrap_or(1.0);
    let latency = std::env::args().any(|a| a == "--latency");
    let latency_reps: usize = arg("--latency-reps").map(|r| r.parse().expect("latency reps")).unwrap_or(10);
    let (lat_head, lat_rule) = if latency { (" ORT speed-up b1 / b32 |", "---|") } else { ("", "") };
    println!(
        "| model | kinds | ratio | criterion | recover | fidelity | kinds' params | model params | FLOPs | time s |{lat_head} note |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|{lat_rule}---|");
    for case in CASES.iter().filter(|c| models.split(',').any(|m| m == c.key)) {
        let model: PathBuf = root.join(case.model);
        let kinds = case.kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("+");
        let dense_session = Session::open(&model, Config::default()).expect("open");
        let test = calib::load(&root.join(case.test), &dense_session.model).expect("test data").take(case.test_samples);
        let inputs = test.ordered(&dense_session.model);
        let labels = test.labels.as_ref().map(|l| l.to_i64_vec());
        let dense_bytes = std::fs::read(&model).expect("read");
        let dense_out = outputs(&dense_bytes, &inputs).swap_remove(case.output).1;
        let dense_fid = fidelity(case, &dense_out, labels.as_deref(), &dense_out);
        let shapes: std::collections::BTreeMap<String, Vec<usize>> =
            test.arrays.iter().map(|(k, t)| (k.clone(), t.dims.clone())).collect();
        let flops_of = |bytes: &[u8]| -> f64 {
            let (_, mut m) = plprune_onnx::onnx_io::load_bytes(bytes, Path::new("<bench>")).expect("import");
            plprune_onnx::passes::infer_shapes::infer(&mut m, &shapes).expect("shapes");
            plprune_onnx::diff::flops(&m) as f64
        };
        let dense_flops = flops_of(&dense_bytes);
        let metric = match case.metric {
            Metric::Accuracy => "test accuracy",
            Metric::Cosine => "mean cosine to dense",
            Metric::Agreement => "top-1 agreement with dense",
        };
        let lat_dense = if latency { " 1 / 1 |" } else { "" };
        println!(
            "| {} | {kinds} | 0 | dense | | {dense_fid:.4} ({metric}) | | | {:.3} G | |{lat_dense} |",
            case.key,
            dense_flops / 1e9
        );
        for &ratio in &ratios {
            let mut lambda_min_keep = None;
            let mut pl_keep = None;
            for &criterion in &criteria {
                // The selection does not depend on the recovery: it is scored once per
                // criterion and ratio, and the later recovery modes reuse its keep-set (their
                // time includes the scoring time of the first). With --ntk-condition every
                // row scores, since the condition number is measured in the selection passes.
                let mut scored: Option<(plprune_onnx::units::KeepSet, f64)> = None;
                let mut speedup: Option<String> = None;
                for &(recover, distill) in &recovers {
                    let config = Config {
                        ratio,
                        kinds: Some(case.kinds.to_vec()),
                        criterion,
                        calib: Some(root.join(case.calib)),
                        verify: false,
                        scoring: plprune_onnx::criteria::ScoringConfig {
                            calib_samples: n,
                            gate: plprune_onnx::criteria::gate::GateConfig { alpha, relative, ..Default::default() },
                            ..Default::default()
                        },
                        recover,
                        round_to,
                        max_layer_ratio,
                        recover_ridge: ridge,
                        ntk_condition,
                        distill_steps: if distill { distill_steps } else { 0 },
                        distill_lr,
                        distill_hidden,
                        ..Config::default()
                    };
                    let mut s = Session::open(&model, config).expect("open");
                    let t = Instant::now();
                    s.analyze().expect("analyze");
                    let reused = match &scored {
                        Some((keep, score_secs)) if !ntk_condition => {
                            s.apply(Some(keep.clone())).expect("rewrite");
                            Some(*score_secs)
                        }
                        _ => {
                            s.select().expect("score and select");
                            scored = s.cx.keep.clone().map(|k| (k, t.elapsed().as_secs_f64()));
                            s.apply(None).expect("rewrite");
                            None
                        }
                    };
                    let secs = t.elapsed().as_secs_f64() + reused.unwrap_or(0.0);
                    let report = s.report();
                    let bytes = s.model_bytes().expect("serialize");
                    let out = outputs(&bytes, &inputs).swap_remove(case.output).1;
                    let fid = fidelity(case, &out, labels.as_deref(), &dense_out);
                    let (kb, ka) = case
                        .kinds
                        .iter()
                        .filter_map(|k| report.kinds.get(k))
                        .fold((0, 0), |(b, a), k| (b + k.parameters.before, a + k.parameters.after));
                    let mut note = String::new();
                    if case.metric == Metric::Agreement {
                        note = format!("KL {:.4}; ", mean_kl(&out, &dense_out));
                    }
                    if reused.is_some() {
                        note += "selection of the row above; ";
                    }
                    if let Some(r) = &report.recovery {
                        let swapped: usize =
                            r.layers.iter().filter_map(|l| l.rearranged.as_ref()).map(|x| x.swapped).sum();
                        if r.method == Recover::Obs {
                            note += &format!("obs re-chose {swapped} units; ");
                        }
                    }
                    if let Some(d) = &report.distillation {
                        note += &format!("distill loss {:.4} -> {:.4}; ", d.loss_first, d.loss_last);
                    }
                    if let Some(c) = &report.ntk_condition {
                        let k = |s: &plprune_onnx::passes::measure_conditioning::Spectrum| {
                            s.kappa.map_or("inf".to_string(), |k| format!("{k:.3e}"))
                        };
                        note += &format!("NTK κ {} -> {}; ", k(&c.before), k(&c.after));
                    }
                    if let Some(g) =
                        report.scoring.as_ref().and_then(|sc| sc.steps.first()).and_then(|st| st.gate.as_ref())
                    {
                        let best = &g.curve[g.best_epoch];
                        note += &format!(
                            "gate: L_total {:.4} -> {:.4} (epoch {}), {} units differ from λ_min ranking",
                            g.curve[0].total, best.total, g.best_epoch, g.differs_from_lambda_min
                        );
                    }
                    if latency && speedup.is_none() {
                        speedup = Some(ort_speedup(&model, &bytes, &root.join(case.test), latency_reps));
                    }
                    let lat = speedup.as_ref().map(|x| format!(" {x} |")).unwrap_or_default();
                    let note = note.trim_end_matches("; ");
                    let keep = s.cx.keep.clone();
                    match criterion {
                        Criterion::NtkMin => lambda_min_keep = keep,
                        Criterion::Pl => pl_keep = keep,
                        _ => {}
                    }
                    println!(
                        "| {} | {kinds} | {ratio} | {} | {} | {fid:.4} | {kb} -> {ka} | {} -> {} | {:.3} G | {secs:.1} |{lat} {note} |",
                        case.key,
                        match criterion {
                            Criterion::Pl if alpha != 1.0 => format!("pl (α {alpha})"),
                            c => c.name().to_string(),
                        } + if criterion == Criterion::Pl && !relative { ", raw objective" } else { "" }
                            + &if round_to > 1 { format!(", round-to {round_to}") } else { String::new() }
                            + &if max_layer_ratio < 1.0 {
                                format!(", max-layer-ratio {max_layer_ratio}")
                            } else {
                                String::new()
                            },
                        match (recover, distill) {
                            (Recover::Lsq, false) => "lsq".to_string(),
                            (Recover::Obs, false) => "obs".to_string(),
                            (Recover::Lsq, true) => format!("lsq + distill {distill_steps}{hidden}"),
                            (Recover::Obs, true) => format!("obs + distill {distill_steps}{hidden}"),
                            (_, true) => format!("distill {distill_steps}{hidden}"),
                            _ => String::new(),
                        },
                        report.parameters.before,
                        report.parameters.after,
                        flops_of(&bytes) / 1e9,
                    );
                }
            }
            if let (Some(a), Some(b)) = (&lambda_min_keep, &pl_keep) {
                let differ: usize =
                    a.keep.iter().flatten().zip(b.keep.iter().flatten()).filter(|(x, y)| x != y).count();
                println!(
                    "| {} | {kinds} | {ratio} | pl vs ntk-min | | {differ} units decided differently | | | | |{} |",
                    case.key,
                    if latency { " |" } else { "" }
                );
            }
        }
    }
}

/// onnxruntime's speed-up of `pruned` over the dense model at batch 1 and 32 ("1.23× / 1.87×"),
/// both measured in one run of benches/ort_latency.py (2 threads, run alternately), or why not.
fn ort_speedup(dense: &Path, pruned: &[u8], data: &Path, reps: usize) -> String {
    let file = std::env::temp_dir().join(format!("plprune-bench-{}.onnx", std::process::id()));
    if let Err(e) = std::fs::write(&file, pruned) {
        return format!("not measured ({e})");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ort_latency.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(dense)
        .arg(&file)
        .arg("--calib")
        .arg(data)
        .args(["--batches", "1", "32", "--threads", "2", "--reps", &reps.to_string(), "--json"])
        .output();
    let _ = std::fs::remove_file(&file);
    let o = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => return format!("not measured ({})", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")),
        Err(e) => return format!("not measured (python3: {e})"),
    };
    let text = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = text.lines().last().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
    let at = |b: u64| {
        v["rows"].as_array().and_then(|r| r.iter().find(|x| x["batch"].as_u64() == Some(b)))?["speedup"].as_f64()
    };
    match (at(1), at(32)) {
        (Some(a), Some(b)) => format!("{a:.2}× / {b:.2}×"),
        _ => "not measured (ort_latency.py output not understood)".to_string(),
    }
}
