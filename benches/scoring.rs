//! Speed of the PL feature phase on the CPU backend (issue 4, "Speed"): per-unit NTK Grams
//! (k projections), their eigenvalues and the Hessian traces of MiniLM-L6's 72 heads and
//! 9,216 FFN neurons on n calibration samples, through the library calls the pipeline
//! makes (`Probe`, `ntk::ntk_features_timed`, `ntk::gauss_newton_traces`), against the
//! PyTorch reference `../shared/bench/ntk_ref.py` (`--bench gram,eig,hutch`) run by this
//! bench in the same run, so the ratio is taken under the same machine load.
//!
//! The comparable phases: ours forward + backward + per-sample gradients + Grams vs the
//! reference's per-sample gradients (vmap) + Grams; eigenvalues vs eigenvalues; our exact
//! Gauss-Newton traces (tr K_u / n, zero residual at the dense weights) vs its Hutchinson
//! (8 probes, double backward) — the trace each implementation computes for this loss.
//!
//! Cross-check (unless `--no-check`): the reference also writes its features with its own
//! projection vectors; we load them (`ntk::projections`, as `--ntk-projections` does) and
//! print the largest relative difference of λ_max and tr K_u per unit kind (both include
//! padded positions; units: heads 49,248 parameters, neurons 769).
//!
//! The reference's Python is `$PLPRUNE_REF_PYTHON`, else `.venv-ref/bin/python` in this
//! checkout, in ../main, or in ../shared/bench (see ../shared/bench/README.md); it runs
//! with our thread count. Without one, only our absolute times are printed. A benchmark,
//! never a test. `--device gpu`: the phases on our WGSL backend (first wgpu adapter),
//! against the reference on CUDA (benches/ntk_ref_device.py); `--random-weights` as in
//! benches/engine.rs.
//!
//! Run: cargo bench --bench scoring [-- --n 32 --k 4 --reps 3 --ref-reps 3 --no-check --no-torch --device gpu]

use std::path::Path;
use std::time::Instant;

use plprune_onnx::criteria::ntk::{self, Features};
use plprune_onnx::criteria::probe::Probe;
use plprune_onnx::units::UnitKind;
use plprune_onnx::{Config, Session};

#[path = "common/reference.rs"]
mod reference;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Our timed phases, in seconds.
#[derive(Default, Clone)]
struct Ours {
    forward: f64,
    backward: f64,
    grams: f64,
    eig: f64,
    hessian: f64,
    /// CPU seconds of the whole feature phase (both threads).
    cpu: f64,
    /// Share of the machine's CPU time other processes used meanwhile (> ~0.05: contaminated).
    other: f64,
}

impl Ours {
    fn gram_phase(&self) -> f64 {
        self.forward + self.backward + self.grams
    }
    fn total(&self) -> f64 {
        self.gram_phase() + self.eig + self.hessian
    }
}

/// CPU seconds (user + system) this process has used so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}

/// Busy and total CPU seconds of the whole machine so far (Linux; zeros elsewhere), from
/// /proc/stat as ntk_ref.py's CpuMon reads it.
fn machine_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return (0.0, 0.0) };
    let v: Vec<f64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return (0.0, 0.0);
    }
    ((v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / 100.0, v.iter().sum::<f64>() / 100.0)
}

fn run_ours(probe: &Probe, proj: &[Vec<f64>], scored: &[bool]) -> (Ours, Features) {
    let c0 = cpu_seconds();
    let (b0, t0) = machine_seconds();
    let (mut f, skipped, phases) = ntk::ntk_features_timed(probe, &probe.base, proj, scored).expect("features");
    assert!(skipped.is_empty(), "weights left out of the Grams: {skipped:?}");
    let t = Instant::now();
    ntk::gauss_newton_traces(&mut f, probe.n);
    let hessian = t.elapsed().as_secs_f64();
    let mut o = Ours { hessian, ..Ours::default() };
    for ph in phases {
        let slot = match ph.name.as_str() {
            "ntk: forward" => &mut o.forward,
            n if n.starts_with("ntk: backward") => &mut o.backward,
            "ntk: per-sample gradients + grams" => &mut o.grams,
            // The GPU backend runs the three in one pass (activations stay on the device).
            n if n.starts_with("ntk: forward, backward, per-sample gradients + grams") => &mut o.grams,
            "eigenvalues" => &mut o.eig,
            n => panic!("unexpected phase {n}"),
        };
        *slot += ph.seconds;
    }
    o.cpu = cpu_seconds() - c0;
    let (b1, t1) = machine_seconds();
    o.other = ((b1 - b0) - o.cpu).max(0.0) / (t1 - t0).max(1e-9);
    (o, f)
}

/// Per kind, unit features in the reference's order: (layer, unit) over the kind's groups
/// in model order.
fn by_kind(s: &Session, f: &Features, kind: UnitKind, get: impl Fn(&ntk::UnitFeatures) -> f64) -> Vec<f64> {
    s.cx.groups
        .iter()
        .zip(f)
        .filter(|(g, _)| g.kind == kind)
        .flat_map(|(_, fs)| fs.as_ref().expect("scored").iter().map(&get))
        .collect()
}

fn rel_diffs(ours: &[f64], theirs: &[f64]) -> (f64, f64) {
    assert_eq!(ours.len(), theirs.len(), "unit counts differ");
    let mut d: Vec<f64> =
        ours.iter().zip(theirs).map(|(a, b)| (a - b).abs() / a.abs().max(b.abs()).max(1e-300)).collect();
    let max = d.iter().copied().fold(0.0, f64::max);
    d.sort_by(f64::total_cmp);
    (max, d[d.len() / 2])
}

/// One gate-training step's gradients (`Probe::gate_gradients`: forward, backward for the
/// gated consumer tensors only) against what it computed before (`GradProgram::run`: every
/// unit tensor's weight gradient), alternating, at a 50% mask.
fn gate_step(probe: &Probe, reps: usize) {
    let gates: Vec<Vec<f64>> = probe.groups.iter().map(|g| (0..g.count).map(|u| (u % 2) as f64).collect()).collect();
    let (mut now, mut before) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let (l1, _) = probe.gate_gradients(&gates).expect("gate gradients");
        now.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let params = probe.gated(&gates);
        let seed = |o: &plprune_onnx::engine::loss::Outputs<f32>| Probe::seed(&probe.objective, probe.output, o);
        let run = probe.low.gp.run::<f32>(&probe.inputs, &params, seed, &Default::default()).expect("run");
        let g = plprune_onnx::engine::gates::gate_gradients(
            &probe.low.model,
            &probe.base,
            &probe.groups,
            &gates,
            &run.grads,
        );
        before.push(t.elapsed().as_secs_f64());
        assert_eq!(l1, run.loss);
        std::hint::black_box(g);
    }
    let (a, b) = (median(now), median(before));
    println!("  gate step (loss + ∂L/∂gate, 50% mask), median of {reps}: {a:.3} s; with every weight gradient (before): {b:.3} s -> {:.2}x", a / b);
}

fn main() {
    let n = arg("--n", 32);
    let k = arg("--k", 4);
    let reps = arg("--reps", 3).max(1);
    let ref_reps = arg("--ref-reps", 3).max(1);
    let target = reference::Target::from_args();
    let device = target.device();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("../shared/models/minilm-l6/model.onnx");
    let calib = root.join("../shared/models/minilm-l6/calib.npz");
    let config = Config {
        calib: Some(calib),
        verify: false,
        kinds: Some(vec![UnitKind::Heads, UnitKind::Neurons]),
        ..Config::default()
    };
    let mut s = Session::open(&model_path, config).expect("open MiniLM");
    s.analyze().expect("analyze");
    let model = s.model.clone();
    let t = Instant::now();
    let probe = Probe::on(&mut s.cx, &model, n, device.clone()).expect("probe");
    let setup = t.elapsed().as_secs_f64();
    let scored: Vec<bool> = s.cx.groups.iter().map(|g| s.cx.selects(g.kind)).collect();
    let units: usize = s.cx.groups.iter().zip(&scored).filter(|(_, &x)| x).map(|(g, _)| g.count).sum();
    let proj = ntk::projections(None, k, probe.per_sample, 0).expect("projections");

    let mut runs = Vec::new();
    for _ in 0..reps {
        runs.push(run_ours(&probe, &proj, &scored).0);
    }
    if plprune_onnx::engine::cpu::profile::enabled() {
        plprune_onnx::engine::cpu::profile::report();
    }
    let med = |f: fn(&Ours) -> f64| median(runs.iter().map(f).collect());
    let ours = Ours {
        forward: med(|o| o.forward),
        backward: med(|o| o.backward),
        grams: med(|o| o.grams),
        eig: med(|o| o.eig),
        hessian: med(|o| o.hessian),
        cpu: med(|o| o.cpu),
        other: med(|o| o.other),
    };
    let total = med(Ours::total);
    let gram_phase = med(Ours::gram_phase);
    println!(
        "scoring ({}, f32 engine, {} Grams): MiniLM-L6 heads+neurons, {units} units, n = {n}, k = {k}",
        device.describe(),
        if target.gpu { "compensated f32" } else { "f64" }
    );
    println!("  setup (lowering, autodiff, calibration forward; not compared): {setup:.2} s");
    println!("  ours, median of {reps}:");
    println!("    forward (once)                      {:8.3} s", ours.forward);
    println!("    backward ({k} projections)             {:8.3} s", ours.backward);
    println!("    per-sample gradients + Grams        {:8.3} s", ours.grams);
    println!("    = Grams phase                       {gram_phase:8.3} s");
    println!("    eigenvalues                         {:8.3} s", ours.eig);
    println!("    Hessian traces (Gauss-Newton)       {:8.3} s", ours.hessian);
    println!("    total                               {total:8.3} s   (runs {:.2?})", {
        runs.iter().map(Ours::total).collect::<Vec<_>>()
    });
    println!("    CPU time of the phase (all threads) {:8.3} s", ours.cpu);
    println!(
        "    other processes' CPU share during our runs: {:.2?}",
        runs.iter().map(|o| (o.other * 100.0).round() / 100.0).collect::<Vec<_>>()
    );

    if flag("--gate") {
        gate_step(&probe, reps);
    }

    if flag("--no-torch") {
        println!("  PyTorch not run (--no-torch)");
        return;
    }
    let Some(py) = target.python(root) else {
        println!("  no .venv-ref (set PLPRUNE_REF_PYTHON): PyTorch not measured; absolute times only");
        return;
    };
    let args: Vec<String> = ["--n", &n.to_string(), "--projections", &k.to_string(), "--probes", "8"]
        .into_iter()
        .map(String::from)
        .chain(["--bench", "gram,eig,hutch", "--no-flops", "--reps", &ref_reps.to_string()].map(String::from))
        .collect();
    match target.run(&py, root, &args) {
        Ok(text) => {
            let line = text.lines().find_map(|l| l.strip_prefix("BENCH ")).unwrap_or("");
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let ph = |name: &str, key: &str| v["phases"][name][key].as_f64();
            match (ph("gram", "median_s"), ph("eig", "median_s"), ph("hutch", "median_s")) {
                (Some(g), Some(e), Some(h)) => {
                    let (psg, gr) = (ph("gram", "psg_median_s"), ph("gram", "gram_median_s"));
                    let other: Vec<f64> = ["gram", "eig", "hutch"]
                        .iter()
                        .flat_map(|p| v["phases"][p]["other_cpu_share"].as_array().cloned().unwrap_or_default())
                        .filter_map(|x| x.as_f64())
                        .collect();
                    println!(
                        "  PyTorch reference ({}, {}), median of {ref_reps}, same run:",
                        py.display(),
                        target.describe_reference()
                    );
                    println!(
                        "    per-sample grads + Grams            {g:8.3} s   (vmap grads {:.3} s, Grams {:.3} s)",
                        psg.unwrap_or(f64::NAN),
                        gr.unwrap_or(f64::NAN)
                    );
                    println!("    eigenvalues                         {e:8.3} s");
                    println!("    Hessian traces (Hutchinson, 8)      {h:8.3} s");
                    println!("    total                               {:8.3} s", g + e + h);
                    println!(
                        "    other processes' CPU share during the reference's runs: {:.2?}",
                        other.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>()
                    );
                    println!("  ratio ours/PyTorch:");
                    println!("    Grams phase  {:.3}x", gram_phase / g);
                    println!("    eigenvalues  {:.3}x", ours.eig / e);
                    println!("    Hessian      {:.5}x", ours.hessian / h);
                    println!("    total        {:.3}x   (target <= 0.5x)", total / (g + e + h));
                }
                _ => println!("  PyTorch output not understood:\n{text}"),
            }
        }
        Err(e) => println!("  PyTorch reference failed: {e}"),
    }

    if flag("--no-check") {
        return;
    }
    if target.random_weights {
        println!("  cross-check skipped: the reference's random weights are not ours");
        return;
    }
    let out = std::env::temp_dir().join(format!("plprune-scoring-ref-{}.npz", std::process::id()));
    let args: Vec<String> =
        ["--n", &n.to_string(), "--projections", &k.to_string(), "--probes", "0", "--no-checks", "--out"]
            .into_iter()
            .map(String::from)
            .chain([out.to_string_lossy().to_string()])
            .collect();
    if let Err(e) = target.run(&py, root, &args) {
        println!("  cross-check: the reference failed: {e}");
        return;
    }
    let keys = ["head_lmax", "head_trace", "head_lmin", "neuron_lmax", "neuron_trace", "neuron_lmin"];
    let arrays = plprune_onnx::npz::read_keys(&out, &keys).expect("reference features");
    let proj = ntk::projections(Some(&out), k, probe.per_sample, 0).expect("reference projections");
    let (_, f) = run_ours(&probe, &proj, &scored);
    let _ = std::fs::remove_file(&out);
    println!("  cross-check with the reference's projections (relative |ours − PyTorch|, max / median over units):");
    for (kind, key) in [(UnitKind::Heads, "head"), (UnitKind::Neurons, "neuron")] {
        let theirs = |what: &str| arrays[&format!("{key}_{what}")].to_f64_vec();
        let rows = [
            ("λ_max", by_kind(&s, &f, kind, |u| u.lambda_max), theirs("lmax")),
            ("tr K", by_kind(&s, &f, kind, |u| u.trace_k), theirs("trace")),
            ("λ_min", by_kind(&s, &f, kind, |u| u.lambda_min), theirs("lmin")),
        ];
        for (what, a, b) in rows {
            let (max, med) = rel_diffs(&a, &b);
            println!("    {:<8} {what:<6} {max:.2e} / {med:.2e}   ({} units)", kind.name(), a.len());
        }
    }
}
