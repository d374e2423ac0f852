//! The invariant of the rewrite on the four shared real models: for every input,
//! slim(x) == dense(x with the pruned units gated to zero), to float round-off — checked
//! here independently of the tool's own verification (tract in-process, then onnx.checker
//! and onnxruntime on the written files), at ratios 0.25, 0.5 and 0.75.

mod common;

use common::*;
use plprune_onnx::units::UnitKind;
use plprune_onnx::{Config, Session};

struct Case {
    name: &'static str,
    model: &'static str,
    calib: &'static str,
    kind: UnitKind,
    samples: usize,
}

fn run_case(c: &Case, ratio: f64) {
    let config = Config {
        ratio,
        kinds: Some(vec![c.kind]),
        calib: Some(shared(c.calib)),
        verify_samples: c.samples,
        verify: false, // checked below, independently
        ..Config::default()
    };
    let mut s = Session::open(&shared(c.model), config).expect("open");
    s.analyze().expect("analyze");
    let groups = s.cx.groups.iter().filter(|g| g.kind == c.kind).count();
    assert!(groups > 0, "{}: no {} groups found", c.name, c.kind.name());
    s.select().expect("select");
    s.apply(None).expect("apply");
    let report = s.report();
    let k = &report.kinds[&c.kind];
    let removed = 1.0 - k.parameters.after as f64 / k.parameters.before as f64;
    // Exact accounting stops at the first unit that reaches the target; protection
    // (one unit per layer) can only keep it from getting there at extreme ratios.
    assert!(removed >= ratio * 0.95, "{} r={ratio}: removed only {removed:.3} of {} parameters", c.name, c.kind.name());
    assert!(removed < ratio + 0.1, "{} r={ratio}: removed {removed:.3}, far above the ratio", c.name);
    assert!(report.parameters.after < report.parameters.before);

    let batch = s.cx.inputs.as_ref().unwrap().take(c.samples);
    let inputs = inputs_of(&batch, &s);
    let names: Vec<String> = s.model.outputs.iter().map(|&o| s.model.value(o).name.clone()).collect();
    let slim = s.model_bytes().unwrap();
    let masked = s.masked_bytes().unwrap();
    let worst = assert_same_outputs(&slim, &masked, &inputs, &names, 1e-4);
    // The masking must matter, or this test proves nothing.
    let dense = std::fs::read(shared(c.model)).unwrap();
    let moved = max_output_diff(&dense, &masked, &inputs, &names);
    assert!(moved > 100.0 * worst.max(1e-7), "{} r={ratio}: pruning did not change the outputs ({moved})", c.name);

    let dir = out_dir("exactness");
    let (sp, mp) = (dir.join(format!("{}-{ratio}.onnx", c.name)), dir.join(format!("{}-{ratio}-masked.onnx", c.name)));
    std::fs::write(&sp, &slim).unwrap();
    std::fs::write(&mp, &masked).unwrap();
    ort_check(&sp, &mp, Some(&shared(c.calib)), c.samples);
}

const EFFNET: Case = Case {
    name: "effnet",
    model: "effnet-lite0/model.onnx",
    calib: "effnet-lite0/calib.npz",
    kind: UnitKind::Filters,
    samples: 2,
};
const VGG: Case = Case {
    name: "vgg",
    model: "digits/vgg_bn.onnx",
    calib: "digits/img_test.npz",
    kind: UnitKind::Filters,
    samples: 16,
};
const MINILM: Case = Case {
    name: "minilm",
    model: "minilm-l6/model.onnx",
    calib: "minilm-l6/calib.npz",
    kind: UnitKind::Neurons,
    samples: 2,
};
const MOE: Case = Case {
    name: "moe",
    model: "digits/moe_transformer.onnx",
    calib: "digits/test.npz",
    kind: UnitKind::Neurons,
    samples: 16,
};

#[test]
fn effnet_filters_all_ratios() {
    for r in [0.25, 0.5, 0.75] {
        run_case(&EFFNET, r);
    }
}

#[test]
fn vgg_filters_all_ratios() {
    for r in [0.25, 0.5, 0.75] {
        run_case(&VGG, r);
    }
}

#[test]
fn minilm_neurons_all_ratios() {
    for r in [0.25, 0.5, 0.75] {
        run_case(&MINILM, r);
    }
}

#[test]
fn moe_expert_neurons_all_ratios() {
    for r in [0.25, 0.5, 0.75] {
        run_case(&MOE, r);
    }
}
