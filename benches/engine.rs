//! Speed of the engine: one batched forward + backward (w.r.t. the unit parameters:
//! the tensors heads and FFN neurons slice, as ntk_ref.py defines them) of MiniLM-L6 on a 32 × 64 calibration batch, seeded with
//! s = Σ_a ⟨r, f(x_a)⟩/sqrt(dim f) — the same phase as `ntk_ref.py --bench fwdbwd`. Prints
//! the median time, matmul GFLOP/s, and the ratio to PyTorch (same phase, same run) when a
//! reference Python exists ($PLPRUNE_REF_PYTHON, ./.venv-ref or ../shared/bench/.venv-ref;
//! it runs with our thread count); otherwise absolute times only. A benchmark, never a test.
//! `--device gpu`: our WGSL backend on the first wgpu adapter, against PyTorch on CUDA
//! (benches/ntk_ref_device.py); `--random-weights`: the reference with random weights, for
//! a machine where ../shared/models/minilm-l6/model.onnx was made by benches/onnx_skeleton.py.
//! Run: cargo bench --bench engine [-- --n 32 --reps 3 --no-torch --device gpu]

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use plprune_onnx::engine::program::Prim;
use plprune_onnx::engine::{loss, Engine, Params};
use plprune_onnx::{Config, Session};

#[path = "common/reference.rs"]
mod reference;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let n = arg("--n", 32);
    let reps = arg("--reps", 3);
    let target = reference::Target::from_args();
    let device = target.device();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("../shared/models/minilm-l6/model.onnx");
    let calib = root.join("../shared/models/minilm-l6/calib.npz");
    let config = Config { calib: Some(calib), verify: false, ..Config::default() };
    let mut s = Session::open(&model, config).expect("open MiniLM");
    let batch = s.cx.inputs.as_ref().expect("calibration").take(n);
    for (k, t) in &batch.arrays {
        s.cx.config.input_shapes.insert(k.clone(), t.dims.clone());
    }
    s.analyze().expect("analyze");
    let inputs = batch.ordered(&s.model);
    let t0 = Instant::now();
    let engine = Engine::new(&s.model).expect("lower");
    let params: Params<f32> = engine.params(&s.model);
    // The unit parameters, as the reference defines them: the tensors units slice (Wq, Wk, Wv
    // and their biases, Wo; W1, b1, W2). LayerNorms, the other biases and the embedding
    // tables are held fixed.
    let wrt: Vec<_> =
        s.cx.groups
            .iter()
            .flat_map(|g| g.slices.iter().map(|sl| sl.tensor).chain(g.owned.iter().flatten().copied()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
    let gp = engine.grad_program(&wrt).expect("differentiate");
    let setup = t0.elapsed().as_secs_f64();
    let out = &gp.lowered.program.slots[gp.lowered.outputs[0].1];
    let dim: usize = out.shape[1..].iter().product();
    let r: Vec<f64> = (0..dim).map(|i| ((i * 7919) % 1000) as f64 / 500.0 - 1.0).collect();
    let flops: f64 = gp
        .lowered
        .program
        .instrs
        .iter()
        .filter_map(|i| match &i.prim {
            Prim::MatMul { ta, .. } => {
                let prog = &gp.lowered.program;
                let a = prog.shape(i.ins[0]);
                let k = if *ta { a[a.len() - 2] } else { a[a.len() - 1] };
                Some(2.0 * prog.slots[i.out].numel() as f64 * k as f64)
            }
            _ => None,
        })
        .sum();
    let keep = HashSet::new();
    let mut times = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        let run = gp.run_on(&device, &inputs, &params, |o| loss::projection(o, 0, &r), &keep).expect("run");
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(run.grads.len());
        if rep > 0 {
            times.push(dt);
        }
    }
    if plprune_onnx::engine::cpu::profile::enabled() {
        plprune_onnx::engine::cpu::profile::report();
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    println!("engine ({}, f32): MiniLM-L6 forward+backward, batch {n} x 64", device.describe());
    println!("  lowering + autodiff: {setup:.3} s; {} instructions", gp.lowered.program.instrs.len());
    println!(
        "  median of {reps}: {med:.4} s  (runs {times:.4?}); matmul work {:.1} GFLOP -> {:.1} GFLOP/s",
        flops / 1e9,
        flops / 1e9 / med
    );
    match target.python(root) {
        _ if std::env::args().any(|s| s == "--no-torch") => println!("  PyTorch not run (--no-torch)"),
        Some(py) => {
            let args: Vec<String> = ["--n", &n.to_string(), "--bench", "fwdbwd", "--no-flops", "--reps", &reps.to_string()]
                .map(String::from)
                .to_vec();
            match target.run(&py, root, &args) {
                Ok(text) => {
                    let line = text.lines().find_map(|l| l.strip_prefix("BENCH ")).unwrap_or("");
                    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                    match v["phases"]["fwdbwd"]["median_s"].as_f64() {
                        Some(t) => println!(
                            "  PyTorch ({}; same machine, this run): {t:.4} s -> ratio engine/PyTorch {:.2}x",
                            target.describe_reference(),
                            med / t
                        ),
                        None => println!("  PyTorch output not understood:\n{text}"),
                    }
                }
                Err(e) => println!("  PyTorch reference failed: {e}"),
            }
        }
        None => println!(
            "  no reference Python: PyTorch not measured (see ../shared/bench/README.md; its recorded 2-core figure for this phase is 0.57 s, not comparable across machines)"
        ),
    }
}
