//! Criteria compared on the shared models (issue 4's evidence table): every criterion prunes
//! the same unit kind at the same ratio, the pruned model is run by tract on held-out data,
//! and one table is printed: fidelity, parameters, scoring time, and for `pl` how its trained
//! gate's selection differs from ranking by λ_min alone.
//!
//! - digits/vgg_bn: 50% of filters; test accuracy on digits/img_test.npz (540 samples).
//! - digits/moe_transformer: 50% of FFN neurons; test accuracy on digits/test.npz.
//! - minilm-l6: 50% of FFN neurons; mean cosine of sentence_embedding to the dense model's
//!   on the first 128 sentences of minilm-l6/heldout.npz.
//!
//! No recovery (fine-tuning) anywhere. Run:
//!   cargo bench --bench criteria [-- --models vgg,moe,minilm --criteria pl,magnitude --ratio 0.5 --n 32]

use std::path::{Path, PathBuf};
use std::time::Instant;

use plprune_onnx::criteria::Criterion;
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
    kind: UnitKind,
    /// Output index evaluated, and whether it is logits (accuracy) or an embedding (cosine).
    output: usize,
    logits: bool,
    test_samples: usize,
}

const CASES: &[Case] = &[
    Case {
        key: "vgg",
        model: "digits/vgg_bn.onnx",
        calib: "digits/img_train.npz",
        test: "digits/img_test.npz",
        kind: UnitKind::Filters,
        output: 0,
        logits: true,
        test_samples: 540,
    },
    Case {
        key: "moe",
        model: "digits/moe_transformer.onnx",
        calib: "digits/train.npz",
        test: "digits/test.npz",
        kind: UnitKind::Neurons,
        output: 0,
        logits: true,
        test_samples: 540,
    },
    Case {
        key: "minilm",
        model: "minilm-l6/model.onnx",
        calib: "minilm-l6/calib.npz",
        test: "minilm-l6/heldout.npz",
        kind: UnitKind::Neurons,
        output: 1,
        logits: false,
        test_samples: 128,
    },
];

fn outputs(bytes: &[u8], inputs: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    runtime::run(bytes, inputs, &[]).expect("tract runs the model")
}

/// Accuracy against labels, or mean cosine to `dense`.
fn fidelity(case: &Case, out: &Tensor, labels: Option<&[i64]>, dense: &Tensor) -> f64 {
    let v = out.to_f64_vec();
    let n = out.dims[0];
    let c = v.len() / n;
    if case.logits {
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
    let ratio: f64 = arg("--ratio").and_then(|r| r.parse().ok()).unwrap_or(0.5);
    let n: usize = arg("--n").and_then(|r| r.parse().ok()).unwrap_or(32);
    println!("| model | kind | criterion | fidelity | kind params | model params | scoring s | note |");
    println!("|---|---|---|---|---|---|---|---|");
    for case in CASES.iter().filter(|c| models.split(',').any(|m| m == c.key)) {
        let model: PathBuf = root.join(case.model);
        let dense_session = Session::open(&model, Config::default()).expect("open");
        let test = calib::load(&root.join(case.test), &dense_session.model).expect("test data").take(case.test_samples);
        let inputs = test.ordered(&dense_session.model);
        let labels = test.labels.as_ref().map(|l| l.to_i64_vec());
        let dense_bytes = std::fs::read(&model).expect("read");
        let dense_out = outputs(&dense_bytes, &inputs).swap_remove(case.output).1;
        let dense_fid = fidelity(case, &dense_out, labels.as_deref(), &dense_out);
        let metric = if case.logits { "test accuracy" } else { "mean cosine to dense" };
        println!("| {} | {} | dense | {dense_fid:.4} ({metric}) | | | | |", case.key, case.kind.name());
        let mut lambda_min_keep = None;
        let mut pl_keep = None;
        for &criterion in &criteria {
            let config = Config {
                ratio,
                kinds: Some(vec![case.kind]),
                criterion,
                calib: Some(root.join(case.calib)),
                verify: false,
                scoring: plprune_onnx::criteria::ScoringConfig { calib_samples: n, ..Default::default() },
                ..Config::default()
            };
            let mut s = Session::open(&model, config).expect("open");
            let t = Instant::now();
            s.analyze().expect("analyze");
            s.select().expect("score and select");
            let secs = t.elapsed().as_secs_f64();
            s.apply(None).expect("rewrite");
            let report = s.report();
            let bytes = s.model_bytes().expect("serialize");
            let out = outputs(&bytes, &inputs).swap_remove(case.output).1;
            let fid = fidelity(case, &out, labels.as_deref(), &dense_out);
            let k = &report.kinds[&case.kind];
            let mut note = String::new();
            if let Some(g) = report.scoring.as_ref().and_then(|sc| sc.steps.first()).and_then(|st| st.gate.as_ref()) {
                let best = &g.curve[g.best_epoch];
                note = format!(
                    "gate: L_total {:.4} -> {:.4} (epoch {}), {} units differ from λ_min ranking",
                    g.curve[0].total, best.total, g.best_epoch, g.differs_from_lambda_min
                );
            }
            let keep = s.cx.keep.clone();
            match criterion {
                Criterion::NtkMin => lambda_min_keep = keep,
                Criterion::Pl => pl_keep = keep,
                _ => {}
            }
            println!(
                "| {} | {} | {} | {fid:.4} | {} -> {} | {} -> {} | {secs:.1} | {note} |",
                case.key,
                case.kind.name(),
                criterion.name(),
                k.parameters.before,
                k.parameters.after,
                report.parameters.before,
                report.parameters.after,
            );
        }
        if let (Some(a), Some(b)) = (&lambda_min_keep, &pl_keep) {
            let differ: usize = a.keep.iter().flatten().zip(b.keep.iter().flatten()).filter(|(x, y)| x != y).count();
            println!(
                "| {} | {} | pl vs ntk-min | {differ} units decided differently | | | | |",
                case.key,
                case.kind.name()
            );
        }
    }
}
