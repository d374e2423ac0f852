//! The GPU executor runs whole programs like the CPU backend: a hand-built program using
//! every primitive, the forward pass of the four shared models, and the gradients of every
//! weight of the two digits models (outputs within rtol 1e-4 of each output's largest
//! magnitude, plus a small atol). Runs on any wgpu adapter, software Vulkan (lavapipe)
//! included, so batches stay small; without an adapter it prints a note, and fails under
//! CI=true. Assumes ../shared/models is beside the checkout.

mod engine_util;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use engine_util::*;
use plprune_onnx::engine::gpu::{Device, GpuContext};
use plprune_onnx::engine::lower::Lowered;
use plprune_onnx::engine::program::{
    BinaryOp, PoolKind, Prim, Program, ReduceOp, RowOp, Slot, SlotKind, UnaryOp, Window,
};
use plprune_onnx::engine::{loss, Engine, Params};
use plprune_onnx::tensor::Tensor;

fn device() -> Option<Device> {
    std::env::set_var("NODEVICE_SELECT", "1");
    match GpuContext::new(true).expect("wgpu") {
        Some(c) => Some(Device::Gpu(Arc::new(c))),
        None if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("CI: no wgpu adapter found (apt install mesa-vulkan-drivers libvulkan1)")
        }
        None => {
            eprintln!("note: no wgpu adapter; GPU executor tests skipped locally");
            None
        }
    }
}

/// max |gpu − cpu| ≤ rtol · max |cpu| + atol.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], rtol: f64, atol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut worst = 0.0f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g == c || (g.is_nan() && c.is_nan()) {
            continue;
        }
        let d = (g as f64 - c as f64).abs();
        assert!(d <= rtol * scale + atol, "{what}: element {i}: gpu {g} vs cpu {c} (max |cpu| {scale:.3e})");
        worst = worst.max(d);
    }
    eprintln!("{what}: max |diff| {worst:.3e}, max |cpu| {scale:.3e}");
}

fn f32s(n: usize, seed: u64) -> Vec<f32> {
    rand_vec(n, seed).into_iter().map(|v| (2.0 * v) as f32).collect()
}

/// A program using every primitive, with one output per instruction.
fn every_primitive() -> (Lowered, Vec<(String, Tensor)>) {
    let mut p = Program::default();
    let x = p.add_slot(vec![2, 3, 6, 5], SlotKind::Input("x".into()), "x");
    let idx = p.add_slot(vec![4], SlotKind::Input("idx".into()), "idx");
    let eidx = p.add_slot(vec![2, 2, 6, 5], SlotKind::Input("eidx".into()), "eidx");
    let n = "op";
    let mut outs: Vec<Slot> = Vec::new();
    let w =
        Window { kernel: [3, 2], stride: [2, 1], dilation: [1, 2], pad: [1, 1], input: [2, 3, 6, 5], output: [3, 5] };
    let mut push = |p: &mut Program, prim: Prim, ins: Vec<Slot>, shape: Vec<usize>| {
        let s = p.push(prim, ins, shape, n);
        outs.push(s);
        s
    };
    let e = push(&mut p, Prim::Unary(UnaryOp::Tanh), vec![x], vec![2, 3, 6, 5]);
    push(&mut p, Prim::UnaryGrad(UnaryOp::Sigmoid), vec![x, e], vec![2, 3, 6, 5]);
    let half = p.constant(vec![5], vec![0.5, -1.0, 2.0, 0.0, 3.0]);
    let m = push(&mut p, Prim::Binary(BinaryOp::Greater), vec![x, half], vec![2, 3, 6, 5]);
    push(&mut p, Prim::Where, vec![m, x, half], vec![2, 3, 6, 5]);
    push(&mut p, Prim::Reduce { op: ReduceOp::Max, axes: vec![0, 2] }, vec![x], vec![1, 3, 1, 5]);
    push(&mut p, Prim::Broadcast, vec![half], vec![2, 4, 5]);
    push(&mut p, Prim::MatMul { ta: false, tb: true }, vec![x, x], vec![2, 3, 6, 6]);
    push(&mut p, Prim::Copy, vec![x], vec![6, 30]);
    push(&mut p, Prim::Transpose { perm: vec![3, 1, 0, 2] }, vec![x], vec![5, 3, 2, 6]);
    let sl =
        push(&mut p, Prim::Slice { starts: vec![1, 2, 0, 4], steps: vec![1, -1, 2, -2] }, vec![x], vec![1, 3, 3, 3]);
    push(
        &mut p,
        Prim::Embed { starts: vec![1, 2, 0, 4], steps: vec![1, -1, 2, -2], fill: 0.25 },
        vec![sl],
        vec![2, 3, 6, 5],
    );
    push(&mut p, Prim::Concat { axis: 1 }, vec![x, e, x], vec![2, 9, 6, 5]);
    let g = push(&mut p, Prim::Gather { axis: 2 }, vec![x, idx], vec![2, 3, 4, 5]);
    push(&mut p, Prim::GatherGrad { axis: 2 }, vec![idx, g], vec![2, 3, 6, 5]);
    push(&mut p, Prim::GatherElements { axis: 1 }, vec![x, eidx], vec![2, 2, 6, 5]);
    let upd = p.constant(vec![2, 2, 6, 5], (0..120).map(|i| i as f64).collect());
    push(&mut p, Prim::ScatterElements { axis: 1, add: true }, vec![x, eidx, upd], vec![2, 3, 6, 5]);
    push(&mut p, Prim::ScatterElements { axis: 1, add: false }, vec![x, eidx, upd], vec![2, 3, 6, 5]);
    push(&mut p, Prim::ArgMax { axis: 2, select_last: true, min: false }, vec![x], vec![2, 3, 1, 5]);
    push(&mut p, Prim::TopKIndices { axis: 3, k: 2, largest: false }, vec![x], vec![2, 3, 6, 2]);
    let cols = push(&mut p, Prim::Im2Col(w.clone()), vec![x], vec![18, 2, 15]);
    push(&mut p, Prim::Col2Im(w.clone()), vec![cols], vec![2, 3, 6, 5]);
    let avg = PoolKind::Avg { count_pad: false };
    let pool = push(&mut p, Prim::Pool(avg, w.clone()), vec![x], vec![2, 3, 3, 5]);
    push(&mut p, Prim::PoolGrad(avg, w.clone()), vec![x, pool], vec![2, 3, 6, 5]);
    let mx = push(&mut p, Prim::Pool(PoolKind::Max, w.clone()), vec![x], vec![2, 3, 3, 5]);
    push(&mut p, Prim::PoolGrad(PoolKind::Max, w.clone()), vec![x, mx], vec![2, 3, 6, 5]);
    // Row-wise ops over rows of 5 (not a multiple of anything the kernels tile by).
    for op in [RowOp::Normalize(1e-3), RowOp::Softmax] {
        let y = push(&mut p, Prim::Rows(op), vec![x], vec![2, 3, 6, 5]);
        let a = if op == RowOp::Softmax { y } else { x };
        push(&mut p, Prim::RowsGrad(op), vec![a, e], vec![2, 3, 6, 5]);
    }
    let outputs = outs.iter().enumerate().map(|(k, &s)| (format!("out{k}:{}", p.instrs[k].prim.name()), s)).collect();
    let inputs: BTreeMap<String, Slot> = [("x".to_string(), x), ("idx".into(), idx), ("eidx".into(), eidx)].into();
    let lowered = Lowered { program: p, inputs, outputs, params: BTreeMap::new(), values: BTreeMap::new() };
    let xs: Vec<f32> = f32s(180, 1).into_iter().map(|v| (v * 4.0).round() / 4.0).collect();
    let ev: Vec<i64> = rand_vec(120, 2).into_iter().map(|v| ((v + 1.0) * 3.0) as i64 % 3 - 1).collect();
    let inputs = vec![
        ("x".to_string(), Tensor::from_f32(vec![2, 3, 6, 5], &xs)),
        ("idx".to_string(), Tensor::from_i64(vec![4], &[5, -1, 0, 5])),
        ("eidx".to_string(), Tensor::from_i64(vec![2, 2, 6, 5], &ev)),
    ];
    (lowered, inputs)
}

#[test]
fn every_primitive_runs_on_the_gpu_like_on_the_cpu() {
    let Some(dev) = device() else { return };
    let (lowered, inputs) = every_primitive();
    let engine = Engine { lowered };
    let cpu = engine.forward::<f32>(&inputs, &Params::new()).expect("cpu");
    let gpu = engine.forward_on(&dev, &inputs, &Params::new()).expect("gpu");
    let mut names: Vec<&str> = Vec::new();
    for ((name, shape, c), (gname, gshape, g)) in cpu.iter().zip(&gpu) {
        assert_eq!((name, shape), (gname, gshape));
        assert_close(name, g, c, 1e-5, 1e-6);
        names.push(name.split(':').nth(1).unwrap());
    }
    // Every variant of `Prim` is covered.
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 24, "{names:?}");
    // The CPU device is the CPU backend.
    let again = engine.forward_on(&Device::Cpu, &inputs, &Params::new()).unwrap();
    assert!(again.iter().zip(&cpu).all(|(a, b)| a.2 == b.2));
}

#[test]
fn an_out_of_range_index_on_the_gpu_is_an_error_naming_the_node() {
    let Some(dev) = device() else { return };
    let (lowered, mut inputs) = every_primitive();
    inputs[1].1 = Tensor::from_i64(vec![4], &[0, 6, 1, 2]);
    let engine = Engine { lowered };
    let cpu = engine.forward::<f32>(&inputs, &Params::new()).expect_err("cpu fails").to_string();
    let gpu = engine.forward_on(&dev, &inputs, &Params::new()).expect_err("gpu fails").to_string();
    eprintln!("cpu: {cpu}\ngpu: {gpu}");
    assert!(gpu.contains("gather") && gpu.contains("'op'") && gpu.contains("out of range"), "{gpu}");
}

fn forward_matches(model: &Path, calib: &Path, n: usize) {
    let Some(dev) = device() else { return };
    let (s, inputs, _) = prepared(model, Some(calib), n);
    let engine = Engine::new(&s.model).expect("lower");
    let params = engine.params::<f32>(&s.model);
    let t = std::time::Instant::now();
    let cpu = engine.forward::<f32>(&inputs, &params).expect("cpu forward");
    let tc = t.elapsed();
    let t = std::time::Instant::now();
    let gpu = engine.forward_on(&dev, &inputs, &params).expect("gpu forward");
    let tg = t.elapsed();
    eprintln!("{}: {} instructions, cpu {tc:.2?}, gpu {tg:.2?}", model.display(), engine.lowered.program.instrs.len());
    assert_eq!(cpu.len(), gpu.len());
    for ((name, shape, c), (_, gshape, g)) in cpu.iter().zip(&gpu) {
        assert_eq!(shape, gshape, "{name}: shape");
        assert_close(&format!("{}: {name}", model.display()), g, c, 1e-4, 1e-5);
    }
}

#[test]
fn forward_on_gpu_matches_cpu_on_vgg_bn() {
    forward_matches(&shared("digits/vgg_bn.onnx"), &shared("digits/img_train.npz"), 8);
}

#[test]
fn forward_on_gpu_matches_cpu_on_moe_transformer() {
    forward_matches(&shared("digits/moe_transformer.onnx"), &shared("digits/train.npz"), 8);
}

#[test]
fn forward_on_gpu_matches_cpu_on_minilm() {
    forward_matches(&shared("minilm-l6/model.onnx"), &shared("minilm-l6/calib.npz"), 1);
}

#[test]
fn forward_on_gpu_matches_cpu_on_effnet_lite0() {
    forward_matches(&shared("effnet-lite0/model.onnx"), &shared("effnet-lite0/calib.npz"), 1);
}

/// Cross-entropy on labels (or MSE to a fixed target): the gradients of every weight, the
/// outputs, the loss and a few kept slots agree between the backends.
fn gradients_match(model: &Path, calib: &Path, n: usize) {
    let Some(dev) = device() else { return };
    let (s, inputs, labels) = prepared(model, Some(calib), n);
    let engine = Engine::new(&s.model).expect("lower");
    let params: Params<f32> = engine.params(&s.model);
    let gp = engine.grad_program(&engine.all_params()).expect("differentiate");
    let n_out = engine.forward::<f32>(&inputs, &params).unwrap()[0].2.len();
    let target = rand_vec(n_out, 5);
    let seed = |o: &loss::Outputs<f32>| match &labels {
        Some(y) => loss::cross_entropy(o, 0, y),
        None => loss::mse(o, 0, &target),
    };
    // Keep a few output gradients, as the Gram computation does.
    let keep: HashSet<Slot> = gp.grad.out_grads.values().copied().step_by(7).take(6).collect();
    let t = std::time::Instant::now();
    let cpu = gp.run::<f32>(&inputs, &params, seed, &keep).expect("cpu run");
    let tc = t.elapsed();
    let t = std::time::Instant::now();
    let gpu = gp.run_on(&dev, &inputs, &params, seed, &keep).expect("gpu run");
    let tg = t.elapsed();
    eprintln!(
        "{}: {} instructions, {} weights, cpu {tc:.2?}, gpu {tg:.2?}",
        model.display(),
        gp.lowered.program.instrs.len(),
        cpu.grads.len()
    );
    assert!((cpu.loss - gpu.loss).abs() <= 1e-4 * cpu.loss.abs() + 1e-6, "loss {} vs {}", gpu.loss, cpu.loss);
    for ((name, _, c), (_, _, g)) in cpu.outputs.iter().zip(&gpu.outputs) {
        assert_close(&format!("output {name}"), g, c, 1e-4, 1e-5);
    }
    assert_eq!(cpu.grads.len(), gpu.grads.len());
    for (id, c) in &cpu.grads {
        let name = &s.model.value(*id).name;
        assert_close(&format!("grad {name}"), &gpu.grads[id], c, 1e-4, 1e-7);
    }
    for &k in &keep {
        let c = cpu.arena.get(k).expect("kept on the cpu");
        let g = gpu.arena.get(k).expect("kept on the gpu");
        assert_close(&format!("kept slot {k}"), g, c, 1e-4, 1e-7);
    }
}

#[test]
fn gradients_on_gpu_match_cpu_on_vgg_bn() {
    gradients_match(&shared("digits/vgg_bn.onnx"), &shared("digits/img_train.npz"), 8);
}

#[test]
fn gradients_on_gpu_match_cpu_on_moe_transformer() {
    gradients_match(&shared("digits/moe_transformer.onnx"), &shared("digits/train.npz"), 8);
}

#[test]
fn weights_are_cached_per_arc_and_never_stale() {
    let Some(dev) = device() else { return };
    let (s, inputs, _) = prepared(&shared("digits/moe_transformer.onnx"), Some(&shared("digits/train.npz")), 2);
    let engine = Engine::new(&s.model).expect("lower");
    let params = engine.params::<f32>(&s.model);
    let first = engine.forward_on(&dev, &inputs, &params).unwrap();
    // New Arcs with other values must not hit the cached buffers of the old ones.
    let scaled: Params<f32> =
        params.iter().map(|(&id, w)| (id, Arc::new(w.iter().map(|v| v * 0.9).collect::<Vec<f32>>()))).collect();
    let cpu = engine.forward::<f32>(&inputs, &scaled).unwrap();
    let gpu = engine.forward_on(&dev, &inputs, &scaled).unwrap();
    assert_close("scaled weights", &gpu[0].2, &cpu[0].2, 1e-4, 1e-5);
    let again = engine.forward_on(&dev, &inputs, &params).unwrap();
    assert_eq!(first[0].2, again[0].2, "the same weights give the same outputs");
}
