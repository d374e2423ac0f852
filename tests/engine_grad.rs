//! Reverse-mode gradients of the CPU engine against central finite differences in f64, on
//! the fixtures and the digits models, at a few random coordinates of every weight.

mod engine_util;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use engine_util::*;
use plprune_onnx::engine::{loss, Engine, Params};

enum Loss {
    /// Cross-entropy of output 0 against labels.
    Labels(Vec<usize>),
    /// MSE of output 0 to a fixed random target.
    Mse(Vec<f64>),
}

fn eval(l: &Loss, outs: &loss::Outputs<f64>) -> (f64, Vec<Vec<f64>>) {
    match l {
        Loss::Labels(y) => loss::cross_entropy(outs, 0, y).unwrap(),
        Loss::Mse(t) => loss::mse(outs, 0, t).unwrap(),
    }
}

/// Checks `coords` coordinates of every weight; returns the number checked.
fn check_fd(model: &std::path::Path, calib: Option<&std::path::Path>, n: usize, coords: usize) -> usize {
    let (s, inputs, labels) = prepared(model, calib, n);
    let engine = Engine::new(&s.model).expect("lower");
    let params: Params<f64> = engine.params(&s.model);
    let gp = engine.grad_program(&engine.all_params()).expect("differentiate");
    let out0 = engine.forward::<f64>(&inputs, &params).unwrap();
    let l = match labels {
        Some(y) => Loss::Labels(y),
        None => Loss::Mse(rand_vec(out0[0].2.len(), 5)),
    };
    let run = gp.run::<f64>(&inputs, &params, |o| Ok(eval(&l, o)), &HashSet::new()).expect("run");
    let loss_at = |p: &Params<f64>| eval(&l, &engine.forward::<f64>(&inputs, p).unwrap()).0;
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (k, (&id, g)) in run.grads.iter().enumerate() {
        let w = &params[&id];
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let picks = rand_vec(coords, 100 + k as u64);
        for r in picks {
            let i = (((r + 1.0) / 2.0) * w.len() as f64) as usize % w.len();
            let h = 1e-5 * w[i].abs().max(1e-2);
            let mut pp: Params<f64> = params.clone();
            let mut wp = w.as_ref().clone();
            wp[i] += h;
            pp.insert(id, Arc::new(wp.clone()));
            let lp = loss_at(&pp);
            wp[i] -= 2.0 * h;
            pp.insert(id, Arc::new(wp));
            let lm = loss_at(&pp);
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[i]).abs();
            let tol = 1e-5 * gmax.max(1e-3) + 1e-4 * fd.abs();
            let name = &s.model.value(id).name;
            assert!(
                err <= tol,
                "{}: weight {name}[{i}]: analytic {} vs finite difference {fd} (tol {tol})",
                model.display(),
                g[i]
            );
            worst = worst.max(err / gmax.max(1e-3));
            checked += 1;
        }
    }
    eprintln!("{}: {checked} coordinates, worst error / max|grad| {worst:.2e}", model.display());
    checked
}

#[test]
fn gradients_match_finite_differences_on_ffn_gelu() {
    assert!(check_fd(&fixture("ffn_gelu.onnx"), None, 3, 4) > 10);
}

#[test]
fn gradients_match_finite_differences_on_conv_bn_residual() {
    assert!(check_fd(&fixture("conv_bn_residual.onnx"), None, 2, 4) > 10);
}

#[test]
fn gradients_match_finite_differences_on_vgg_bn() {
    assert!(check_fd(&shared("digits/vgg_bn.onnx"), Some(&shared("digits/img_test.npz")), 4, 3) > 10);
}

#[test]
fn gradients_match_finite_differences_on_moe_transformer() {
    assert!(check_fd(&shared("digits/moe_transformer.onnx"), Some(&shared("digits/test.npz")), 4, 3) > 10);
}

#[test]
fn f32_and_f64_gradients_agree() {
    let (s, inputs, labels) = prepared(&shared("digits/vgg_bn.onnx"), Some(&shared("digits/img_test.npz")), 4);
    let y = labels.unwrap();
    let engine = Engine::new(&s.model).unwrap();
    let gp = engine.grad_program(&engine.all_params()).unwrap();
    let g32 = gp
        .run::<f32>(&inputs, &engine.params(&s.model), |o| loss::cross_entropy(o, 0, &y), &HashSet::new())
        .unwrap()
        .grads;
    let g64 = gp
        .run::<f64>(&inputs, &engine.params(&s.model), |o| loss::cross_entropy(o, 0, &y), &HashSet::new())
        .unwrap()
        .grads;
    let _: &BTreeMap<_, _> = &g32;
    for (id, a) in &g32 {
        let b = &g64[id];
        let m = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let d = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max);
        assert!(d <= 1e-3 * m, "{}: f32 vs f64 gradient differ by {d} (max {m})", s.model.value(*id).name);
    }
}
