//! Per-unit Gram matrices formed layer by layer from one batched forward/backward equal
//! those from explicit per-sample gradients (one sample at a time, full weight gradients
//! restricted to the unit's slices); and gate gradients equal finite differences of the
//! loss in the gate.

mod engine_util;

use std::collections::HashSet;

use engine_util::*;
use plprune_onnx::engine::{gates, gram, loss, Engine, Params};
use plprune_onnx::units::UnitGroup;

fn check_grams(model: &std::path::Path, calib: &std::path::Path, n: usize) {
    let (s, inputs, _) = prepared(model, Some(calib), n);
    let groups = s.cx.groups.clone();
    assert!(!groups.is_empty());
    let engine = Engine::new(&s.model).unwrap();
    let params: Params<f64> = engine.params(&s.model);
    let gp = engine.grad_program(&engine.all_params()).unwrap();
    let dim: usize = engine.lowered.program.shape(engine.lowered.outputs[0].1)[1..].iter().product();
    let r = rand_vec(dim, 3);
    let g = gram::grams::<f64>(&gp, &s.model, &inputs, &params, &groups, 0, &r).expect("grams");
    eprintln!("skipped weights: {:?}", g.skipped);

    // Explicit: one sample at a time.
    let (s1, _, _) = prepared(model, Some(calib), 1);
    let e1 = Engine::new(&s1.model).unwrap();
    let p1: Params<f64> = e1.params(&s1.model);
    let gp1 = e1.grad_program(&e1.all_params()).unwrap();
    let mut per: Vec<std::collections::BTreeMap<_, Vec<f64>>> = Vec::new();
    for smp in 0..n {
        let one: Vec<_> = inputs.iter().map(|(k, t)| (k.clone(), t.take(0, &[smp]))).collect();
        let run = gp1.run::<f64>(&one, &p1, |o| loss::projection(o, 0, &r), &HashSet::new()).unwrap();
        per.push(run.grads);
    }
    let skipped: HashSet<String> = g.skipped.iter().cloned().collect();
    let mut compared = 0;
    let mut nonzero = 0;
    for (gi, grp) in groups.iter().enumerate() {
        for u in 0..grp.count {
            let mut k = vec![0.0; n * n];
            for sl in &grp.slices {
                let name = &s.model.value(sl.tensor).name;
                if skipped.contains(name) {
                    continue;
                }
                let dims = s.model.value(sl.tensor).shape.clone().unwrap();
                let outer: usize = dims[..sl.axis].iter().product();
                let len = dims[sl.axis];
                let inner: usize = dims[sl.axis + 1..].iter().product();
                // The same weight in the batch-1 model has the same name.
                let id1 = s1.model.value_id(name).unwrap();
                for a in 0..n {
                    for b in 0..n {
                        let (ga, gb) = (&per[a][&id1], &per[b][&id1]);
                        let mut acc = 0.0;
                        for o in 0..outer {
                            for i in UnitGroup::indices(sl, u) {
                                for e in (o * len + i) * inner..(o * len + i + 1) * inner {
                                    acc += ga[e] * gb[e];
                                }
                            }
                        }
                        k[a * n + b] += acc;
                    }
                }
            }
            let ours = &g.k[gi][u];
            let scale = k.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
            for (x, y) in ours.iter().zip(&k) {
                assert!((x - y).abs() <= 1e-8 * scale, "group {} unit {u}: {x} vs {y}", grp.name);
            }
            // Dead ReLU units have a zero Gram in both computations; most units must not.
            nonzero += (scale > 1e-12) as usize;
            compared += 1;
        }
    }
    eprintln!("{}: {compared} units compared, {nonzero} with a non-zero Gram", model.display());
    assert!(nonzero * 2 > compared, "most Grams are zero");
}

#[test]
fn grams_match_per_sample_gradients_on_moe_transformer() {
    check_grams(&shared("digits/moe_transformer.onnx"), &shared("digits/test.npz"), 3);
}

#[test]
fn grams_match_per_sample_gradients_on_vgg_bn() {
    check_grams(&shared("digits/vgg_bn.onnx"), &shared("digits/img_test.npz"), 3);
}

#[test]
fn gate_gradients_match_finite_differences() {
    let (s, inputs, labels) = prepared(&shared("digits/moe_transformer.onnx"), Some(&shared("digits/test.npz")), 4);
    let y = labels.unwrap();
    let groups = s.cx.groups.clone();
    let engine = Engine::new(&s.model).unwrap();
    let base: Params<f64> = engine.params(&s.model);
    let gv: Vec<Vec<f64>> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| rand_vec(g.count, 40 + i as u64).iter().map(|r| 1.0 + 0.3 * r).collect())
        .collect();
    let gp = engine.grad_program(&gates::gated_tensors(&groups)).unwrap();
    let gated = gates::gated_params(&s.model, &base, &groups, &gv);
    let run = gp.run::<f64>(&inputs, &gated, |o| loss::cross_entropy(o, 0, &y), &HashSet::new()).unwrap();
    let dg = gates::gate_gradients(&s.model, &base, &groups, &gv, &run.grads);
    let loss_at = |g: &Vec<Vec<f64>>| {
        let p = gates::gated_params(&s.model, &base, &groups, g);
        loss::cross_entropy(&engine.forward::<f64>(&inputs, &p).unwrap(), 0, &y).unwrap().0
    };
    let mut checked = 0;
    for (gi, grp) in groups.iter().enumerate() {
        for u in 0..grp.count.min(3) {
            let h = 1e-6;
            let mut gp_ = gv.clone();
            gp_[gi][u] += h;
            let lp = loss_at(&gp_);
            gp_[gi][u] -= 2.0 * h;
            let lm = loss_at(&gp_);
            let fd = (lp - lm) / (2.0 * h);
            assert!((fd - dg[gi][u]).abs() <= 1e-6 + 1e-5 * fd.abs(), "{} unit {u}: {} vs {fd}", grp.name, dg[gi][u]);
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} gates checked");
}
