//! The CPU engine's forward pass matches tract on the four shared real models and on the
//! fixtures (rtol 1e-4 relative to each output's largest magnitude), for a small
//! calibration batch. Assumes ../shared/models is beside the checkout.

mod common;

use common::*;
use plprune_onnx::engine::Engine;
use plprune_onnx::tensor::Tensor;
use plprune_onnx::{Config, Session};

/// Opens a model with `n` samples of its calibration file and runs the analysis passes for
/// that batch shape. Returns the session and the inputs.
pub fn prepared(model: &std::path::Path, calib: &std::path::Path, n: usize) -> (Session, Vec<(String, Tensor)>) {
    let config = Config { calib: Some(calib.to_path_buf()), verify: false, ..Config::default() };
    let mut s = Session::open(model, config).expect("open");
    let batch = s.cx.inputs.as_ref().unwrap().take(n);
    for (k, t) in &batch.arrays {
        s.cx.config.input_shapes.insert(k.clone(), t.dims.clone());
    }
    s.analyze().expect("analyze");
    let inputs = batch.ordered(&s.model);
    (s, inputs)
}

fn check(model: &std::path::Path, calib: &std::path::Path, n: usize, rtol: f64) {
    let (s, inputs) = prepared(model, calib, n);
    let engine = Engine::new(&s.model).expect("lower");
    let params = engine.params::<f32>(&s.model);
    let ours = engine.forward::<f32>(&inputs, &params).expect("engine forward");
    let names: Vec<String> = ours.iter().map(|(n, _, _)| n.clone()).collect();
    let bytes = std::fs::read(model).unwrap();
    let theirs = plprune_onnx::runtime::run(&bytes, &inputs, &names).expect("tract");
    for ((name, shape, y), (_, t)) in ours.iter().zip(&theirs) {
        assert_eq!(shape, &t.dims, "{name}: shape");
        let r = t.to_f64_vec();
        let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let worst = y.iter().zip(&r).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        eprintln!("{}: {name}: max |diff| {worst:.3e}, max |ref| {scale:.3e}", model.display());
        assert!(worst <= rtol * scale, "{name}: max |diff| {worst} > {rtol} × {scale}");
    }
}

#[test]
fn forward_matches_tract_on_ffn_gelu_fixture() {
    let (m, c) = (fixture("ffn_gelu.onnx"), shared("digits/train.npz"));
    let _ = c;
    let (s, _) = {
        let config = Config { verify: false, ..Config::default() };
        let mut s = Session::open(&m, config).expect("open");
        s.analyze().expect("analyze");
        (s, ())
    };
    let batch = plprune_onnx::calib::synthetic(&s.model, &s.cx.input_shapes, 7);
    let inputs = batch.ordered(&s.model);
    let engine = Engine::new(&s.model).expect("lower");
    let params = engine.params::<f32>(&s.model);
    let ours = engine.forward::<f32>(&inputs, &params).expect("forward");
    let names: Vec<String> = ours.iter().map(|(n, _, _)| n.clone()).collect();
    let theirs = plprune_onnx::runtime::run(&std::fs::read(&m).unwrap(), &inputs, &names).expect("tract");
    for ((name, _, y), (_, t)) in ours.iter().zip(&theirs) {
        let r = t.to_f64_vec();
        let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let worst = y.iter().zip(&r).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-4 * scale, "{name}: {worst} vs {scale}");
    }
}

#[test]
fn forward_matches_tract_on_vgg_bn() {
    check(&shared("digits/vgg_bn.onnx"), &shared("digits/img_test.npz"), 8, 1e-4);
}

#[test]
fn forward_matches_tract_on_moe_transformer() {
    check(&shared("digits/moe_transformer.onnx"), &shared("digits/test.npz"), 8, 1e-4);
}

#[test]
fn forward_matches_tract_on_minilm() {
    check(&shared("minilm-l6/model.onnx"), &shared("minilm-l6/calib.npz"), 2, 1e-4);
}

#[test]
fn forward_matches_tract_on_effnet_lite0() {
    check(&shared("effnet-lite0/model.onnx"), &shared("effnet-lite0/calib.npz"), 2, 1e-4);
}

#[test]
fn unsupported_op_is_an_error_naming_the_node() {
    use plprune_onnx::ir::{Model, Op, Value, ValueKind};
    let mut m = Model::default();
    let mut x = Value::new("x", ValueKind::Input);
    x.shape = Some(vec![2, 3]);
    x.dtype = Some(plprune_onnx::tensor::DType::F32);
    let x = m.add_value(x);
    let mut y = Value::new("y", ValueKind::Dynamic);
    y.shape = Some(vec![2, 3]);
    let y = m.add_value(y);
    let op = Op { name: "weird".into(), op_type: "Hardmax".into(), domain: String::new(), attrs: vec![], origin: None };
    m.add_op(op, &[Some(x)], &[y]);
    m.inputs.push(x);
    m.outputs.push(y);
    let err = Engine::new(&m).err().expect("lowering fails").to_string();
    assert!(err.contains("weird") && err.contains("Hardmax"), "{err}");
}

/// MiniLM-L6's exported GELU (Div √2 → Erf → Add 1 → Mul x → Mul 0.5) is lowered to one
/// fused primitive per layer, and nothing of the five-op chain is left; the forward test
/// above checks the fused form computes the same function as tract.
#[test]
fn minilm_erf_gelu_chains_are_fused() {
    use plprune_onnx::engine::program::{Prim, UnaryOp};
    let (s, _) = prepared(&shared("minilm-l6/model.onnx"), &shared("minilm-l6/calib.npz"), 1);
    let engine = Engine::new(&s.model).expect("lower");
    let count = |u: UnaryOp| engine.lowered.program.instrs.iter().filter(|i| i.prim == Prim::Unary(u)).count();
    assert_eq!(count(UnaryOp::Gelu), 6, "one fused GELU per encoder layer");
    assert_eq!(count(UnaryOp::Erf), 0, "no Erf left over");
}
