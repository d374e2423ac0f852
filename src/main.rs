//! The `plprune-onnx` command: parses arguments into a validated [`Config`], runs the
//! library, prints results on stdout and one error line on stderr.
//!
//! Exit codes: 0 success; 1 internal failure; 2 bad input (model, calibration file or
//! option); 3 the rewrite did not verify (nothing was written).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use plprune_onnx::criteria::gate::GateConfig;
use plprune_onnx::criteria::{Criterion, Schedule, ScoringConfig};
use plprune_onnx::engine::DeviceChoice;
use plprune_onnx::passes::recover_weights::Recover;
use plprune_onnx::progress::Progress;
use plprune_onnx::units::UnitKind;
use plprune_onnx::{onnx_io, plots, progress, Config, Error, Result, Scope, Session};

const EXAMPLES: &str = "\
Examples:
  plprune-onnx model.onnx --ratio 0.5 --calib calib.npz -o slim.onnx
  plprune-onnx model.onnx --ratio 0.5 --criterion magnitude -o slim.onnx
  plprune-onnx model.onnx --ratio 0.75 --calib calib.npz --schedule linear --steps 3 --report r.json -o slim.onnx
  plprune-onnx model.onnx --ratio 0.25 --units filters --report report.json -o slim.onnx
  plprune-onnx model.onnx --ratio 0.5 --calib calib.npz --plots plots/ -o slim.onnx
  plprune-onnx big.onnx --ratio 0.5 --criterion magnitude --external-data -o slim.onnx   (writes slim.onnx + slim.onnx.data)
  plprune-onnx bert.onnx --ratio 0.5 --calib calib.npz --units neurons -o slim.onnx
  plprune-onnx inspect model.onnx
  plprune-onnx diff model.onnx slim.onnx

Progress bars go to stderr when it is a terminal (not with --quiet); results go to stdout.

Exit codes: 0 ok, 1 internal error, 2 bad model/data/option, 3 rewrite failed verification
(nothing is written).";

#[derive(Parser)]
#[command(
    name = "plprune-onnx",
    version,
    about = "Structured pruning of ONNX models guided by the PL condition: scores conv filters, FFN neurons, attention heads and MoE experts on calibration data, removes the least important and writes a physically smaller, verified model",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    prune: PruneArgs,
}

#[derive(Subcommand)]
enum Command {
    /// List the unit groups found in a model, and what cannot be pruned and why.
    Inspect(InspectArgs),
    /// Compare two models: units per layer, parameters, FLOPs, reshaped tensors, nodes.
    Diff(DiffArgs),
}

#[derive(Args)]
struct DiffArgs {
    /// The first model (usually the source).
    a: PathBuf,
    /// The second model (usually the pruned one).
    b: PathBuf,
    /// Concrete shape of an input, e.g. --input-shape input_ids=1,128 (repeatable).
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    input_shape: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// The ONNX model.
    input: PathBuf,
    /// Concrete shape of an input, e.g. --input-shape input_ids=1,128 (repeatable).
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    input_shape: Vec<String>,
    /// Print the analysis as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PruneArgs {
    /// The ONNX model to prune.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the pruned model.
    #[arg(short, long, required_unless_present = "dry_run")]
    output: Option<PathBuf>,
    /// Fraction of the selected units' parameters to remove, in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    /// Unit kinds to prune, comma separated: filters,neurons (default: every kind found).
    #[arg(long, value_delimiter = ',')]
    units: Option<Vec<String>>,
    /// Importance criterion: pl (the paper's: NTK features + Hessian-trace penalty + trained
    /// gate), ntk-min, ntk-max, hessian, magnitude, random, taylor, snip, grasp, fisher, fpgm.
    #[arg(long, default_value = "pl")]
    criterion: String,
    /// Calibration data (.npz, one array per model input, optional 'labels').
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration samples the criterion scores on (the first N).
    #[arg(long, default_value_t = 32)]
    calib_samples: usize,
    /// oneshot (score once) or linear (re-score the masked model at each of --steps steps).
    #[arg(long, default_value = "oneshot")]
    schedule: String,
    /// Steps of the linear schedule.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Output projections k averaged into each unit's NTK Gram.
    #[arg(long, default_value_t = 4)]
    projections: usize,
    /// Load the projection vectors from an .npz (key 'projections', [k, output shape...]).
    #[arg(long)]
    ntk_projections: Option<PathBuf>,
    /// Hutchinson probes, where the Hessian trace is estimated.
    #[arg(long, default_value_t = 8)]
    probes: usize,
    /// Weight α of the Hessian-trace penalty in the gate's loss.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Gate objective: relative (L_S and Σ m·h each divided by its value at the λ_min
    /// ranking, so α weighs relative changes) or raw (in their own units, as the paper
    /// writes it; the Hessian term usually dominates then).
    #[arg(long, default_value = "relative", value_parser = ["relative", "raw"])]
    gate_objective: String,
    /// Gate training: epochs, learning rate (Adam), hidden width.
    #[arg(long, default_value_t = 20)]
    gate_epochs: usize,
    #[arg(long, default_value_t = 0.05)]
    gate_lr: f64,
    #[arg(long, default_value_t = 16)]
    gate_hidden: usize,
    /// Compute backend: auto (a hardware GPU when present, else CPU), cpu, or gpu (any wgpu
    /// adapter, software included).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Recovery after pruning: none; lsq (ridge least-squares refit of the weights that
    /// read pruned units, on calibration activations, so each block reproduces the dense
    /// block's output; needs the compute engine); or obs (lsq, after re-choosing in each
    /// layer which units stay, as many as the criterion kept, by greedy Optimal Brain
    /// Surgeon on the same least-squares problem).
    #[arg(long, default_value = "none")]
    recover: String,
    /// Ridge of --recover lsq, relative to the mean diagonal of the activations' Gram.
    #[arg(long, default_value_t = 1e-2)]
    ridge: f64,
    /// Calibration samples --recover lsq fits on (at most; the next --calib-samples of the
    /// file measure fidelity before and after).
    #[arg(long, default_value_t = 128)]
    recover_samples: usize,
    /// Label-free fine-tuning after the rewrite: Adam steps that train the slim model's
    /// weights (embedding tables excepted) towards the dense model's outputs on the
    /// calibration samples --recover fits on; 0 = none. Runs after --recover lsq when both
    /// are given.
    #[arg(long, default_value_t = 0)]
    distill_steps: usize,
    /// Peak learning rate of --distill-steps (linear warm-up, cosine decay).
    #[arg(long, default_value_t = 1e-4)]
    distill_lr: f64,
    /// Calibration samples per --distill-steps minibatch.
    #[arg(long, default_value_t = 16)]
    distill_batch: usize,
    /// Augmentation of the --distill-steps minibatches, so the student learns the dense
    /// model around the calibration samples instead of memorising them: the share of
    /// tokens replaced by other calibration tokens (token-id inputs), or the largest weight
    /// with which float inputs are mixed with another sample. 0 = none.
    #[arg(long, default_value_t = 0.3)]
    distill_augment: f64,
    /// Also match the dense model's hidden states in --distill-steps: every
    /// LayerNormalization output the slim model shares with the dense one by name and shape
    /// (a transformer's residual stream after each block) joins the outputs in the loss.
    #[arg(long)]
    distill_hidden: bool,
    /// Weight of each hidden-state term of --distill-hidden in the loss, relative to one
    /// model output's (default 1: every term alike; MiniLM-L6 has 12 LayerNorm outputs and
    /// 2 model outputs, so 1/6 weighs the hidden states and the outputs equally in all).
    #[arg(long)]
    distill_hidden_weight: Option<f64>,
    /// Also measure the model-level NTK condition number on the calibration set before and
    /// after pruning (two extra Gram passes over every unit).
    #[arg(long)]
    ntk_condition: bool,
    /// Seed for every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Units every group keeps at least.
    #[arg(long, default_value_t = 1)]
    min_keep: usize,
    /// Layers of filters and neurons keep a multiple of N units (runtimes' vector width: 8
    /// for onnxruntime's x86 convolutions).
    #[arg(long, default_value_t = 1, value_name = "N")]
    round_to: usize,
    /// The largest fraction of its units any layer may lose, in (0, 1]: caps global ranking
    /// so no layer is cut to a sliver (1 = no cap; the run warns when the caps keep a kind
    /// short of --ratio)
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    max_layer_ratio: f64,
    /// Rank units across all layers (global) or within each layer (layer).
    #[arg(long, default_value = "global")]
    scope: String,
    /// Write a JSON report of the run.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the masked dense model (pruned units gated to zero) too, as a reference.
    #[arg(long)]
    masked_output: Option<PathBuf>,
    /// Concrete shape of an input, e.g. --input-shape input_ids=1,128 (repeatable).
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    input_shape: Vec<String>,
    /// Samples of the calibration batch the verification runs on.
    #[arg(long, default_value_t = 2)]
    verify_samples: usize,
    /// Write SVG plots into this folder: per unit kind, heatmaps (layer × unit) of the score
    /// and of every feature, pruned units crossed out; the gate's training curves.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Write tensors of at least --external-data-threshold bytes to OUT.data beside the
    /// model (ONNX external data). Automatic when the model would exceed protobuf's 2 GB.
    #[arg(long)]
    external_data: bool,
    /// Smallest tensor, in bytes, that goes to the external data file.
    #[arg(long, default_value_t = 1024, value_name = "BYTES")]
    external_data_threshold: usize,
    /// Do everything but write the model.
    #[arg(long)]
    dry_run: bool,
    /// Skip the verification run (for debugging the tool itself).
    #[arg(long, hide = true)]
    no_verify: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> ExitCode {
    // Mesa's device-select layer prints noise on stderr without a session bus.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect(a)) => inspect(a),
        Some(Command::Diff(a)) => diff(a),
        None => prune(cli.prune),
    };
    if plprune_onnx::engine::cpu::profile::enabled() {
        plprune_onnx::engine::cpu::profile::report();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn parse_input_shapes(items: &[String]) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut m = BTreeMap::new();
    for it in items {
        let (name, dims) =
            it.split_once('=').ok_or_else(|| Error::Option(format!("--input-shape '{it}' is not NAME=D0,D1,…")))?;
        let dims: Vec<usize> = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>().ok().filter(|&x| x > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Option(format!("--input-shape '{it}': dimensions must be positive integers")))?;
        m.insert(name.to_string(), dims);
    }
    Ok(m)
}

fn config(a: &PruneArgs) -> Result<Config> {
    if !(0.0..1.0).contains(&a.ratio) {
        return Err(Error::Option(format!("--ratio {} is outside [0, 1)", a.ratio)));
    }
    if a.min_keep == 0 {
        return Err(Error::Option("--min-keep must be at least 1".into()));
    }
    if a.round_to == 0 {
        return Err(Error::Option("--round-to must be at least 1".into()));
    }
    if !(a.max_layer_ratio > 0.0 && a.max_layer_ratio <= 1.0) {
        return Err(Error::Option(format!("--max-layer-ratio {} is outside (0, 1]", a.max_layer_ratio)));
    }
    if a.verify_samples == 0 {
        return Err(Error::Option("--verify-samples must be at least 1".into()));
    }
    let criterion = Criterion::parse(&a.criterion).ok_or_else(|| {
        Error::Option(format!("unknown --criterion '{}' (known: {})", a.criterion, Criterion::NAMES.join(", ")))
    })?;
    let schedule = match a.schedule.as_str() {
        "oneshot" => Schedule::Oneshot,
        "linear" if a.steps >= 1 => Schedule::Linear { steps: a.steps },
        "linear" => return Err(Error::Option("--steps must be at least 1".into())),
        s => return Err(Error::Option(format!("unknown --schedule '{s}' (oneshot or linear)"))),
    };
    if a.calib_samples == 0 || a.projections == 0 || a.probes == 0 {
        return Err(Error::Option("--calib-samples, --projections and --probes must be at least 1".into()));
    }
    let bad_alpha = !a.alpha.is_finite() || a.alpha < 0.0;
    let bad_lr = !a.gate_lr.is_finite() || a.gate_lr <= 0.0;
    if bad_alpha || bad_lr || a.gate_hidden == 0 {
        return Err(Error::Option("--alpha must be ≥ 0, --gate-lr > 0 and --gate-hidden ≥ 1".into()));
    }
    let recover = Recover::parse(&a.recover)
        .ok_or_else(|| Error::Option(format!("unknown --recover '{}' (none, lsq or obs)", a.recover)))?;
    if !a.ridge.is_finite() || a.ridge <= 0.0 {
        return Err(Error::Option(format!("--ridge must be > 0, got {}", a.ridge)));
    }
    let bad_aug = !(0.0..1.0).contains(&a.distill_augment);
    if a.distill_steps > 0 && (!a.distill_lr.is_finite() || a.distill_lr <= 0.0 || a.distill_batch == 0 || bad_aug) {
        return Err(Error::Option(format!(
            "--distill-lr must be > 0, --distill-batch ≥ 1 and --distill-augment in [0, 1), got {}, {} and {}",
            a.distill_lr, a.distill_batch, a.distill_augment
        )));
    }
    if a.distill_hidden && a.distill_steps == 0 {
        return Err(Error::Option(
            "--distill-hidden shapes the loss of --distill-steps; give --distill-steps N".into(),
        ));
    }
    if let Some(w) = a.distill_hidden_weight {
        if !a.distill_hidden {
            return Err(Error::Option(
                "--distill-hidden-weight weighs the terms of --distill-hidden; give it too".into(),
            ));
        }
        if !w.is_finite() || w < 0.0 {
            return Err(Error::Option(format!("--distill-hidden-weight must be a number ≥ 0, got {w}")));
        }
    }
    // Checked before any work: without data the refit and the distillation would fail only
    // after scoring.
    if a.calib.is_none() && (recover != Recover::None || a.distill_steps > 0) {
        let what = if recover != Recover::None { format!("--recover {}", a.recover) } else { "--distill-steps".into() };
        return Err(Error::Option(format!(
            "{what} fits the pruned model to the dense one on calibration data; give --calib FILE.npz"
        )));
    }
    let device = DeviceChoice::parse(&a.device)
        .ok_or_else(|| Error::Option(format!("unknown --device '{}' (auto, cpu or gpu)", a.device)))?;
    let scope = match a.scope.as_str() {
        "global" => Scope::Global,
        "layer" => Scope::Layer,
        s => return Err(Error::Option(format!("unknown --scope '{s}' (global or layer)"))),
    };
    let kinds = match &a.units {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|s| {
                    UnitKind::parse(s.trim()).ok_or_else(|| {
                        Error::Option(format!("unknown unit kind '{s}' (known: filters, neurons, heads, experts)"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    Ok(Config {
        ratio: a.ratio,
        kinds,
        criterion,
        seed: a.seed,
        min_keep: a.min_keep,
        round_to: a.round_to,
        max_layer_ratio: a.max_layer_ratio,
        scope,
        input_shapes: parse_input_shapes(&a.input_shape)?,
        calib: a.calib.clone(),
        verify_samples: a.verify_samples,
        verify: !a.no_verify,
        scoring: ScoringConfig {
            projections: a.projections,
            ntk_projections: a.ntk_projections.clone(),
            probes: a.probes,
            calib_samples: a.calib_samples,
            gate: GateConfig {
                hidden: a.gate_hidden,
                epochs: a.gate_epochs,
                lr: a.gate_lr,
                alpha: a.alpha,
                relative: a.gate_objective == "relative",
            },
            schedule,
        },
        device,
        recover,
        recover_ridge: a.ridge,
        recover_samples: a.recover_samples,
        distill_steps: a.distill_steps,
        distill_lr: a.distill_lr,
        distill_batch: a.distill_batch,
        distill_augment: a.distill_augment,
        distill_hidden: a.distill_hidden,
        distill_hidden_weight: a.distill_hidden_weight.unwrap_or(1.0),
        ntk_condition: a.ntk_condition,
    })
}

/// True when `a` and `b` name the same file (b may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.canonicalize().ok()?,
            _ => std::env::current_dir().ok()?,
        };
        Some(parent.join(p.file_name()?))
    };
    matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}

fn prune(a: PruneArgs) -> Result<()> {
    let input = a.input.clone().ok_or_else(|| Error::Option("no input model given".into()))?;
    let config = config(&a)?;
    let data_files: Vec<PathBuf> =
        [&a.output, &a.masked_output].into_iter().flatten().map(|p| onnx_io::data_path(p)).collect();
    for out in [&a.output, &a.report, &a.masked_output].into_iter().flatten().chain(&data_files) {
        if same_file(&input, out) {
            return Err(Error::Option(format!("{} would overwrite the input model", out.display())));
        }
    }
    if a.external_data_threshold == 0 {
        return Err(Error::Option("--external-data-threshold must be at least 1 byte".into()));
    }
    let mut session = Session::open(&input, config)?;
    let bars = Arc::new(progress::Bars::stderr(a.quiet));
    let installed = progress::install(bars.clone());
    let ran = session.run();
    bars.finish();
    drop(installed);
    ran?;
    let report = session.report();
    for w in &report.warnings {
        if !a.quiet {
            eprintln!("warning: {w}");
        }
    }
    if let Some(r) = &a.report {
        onnx_io::write_atomic(r, report.to_json().as_bytes())?;
    }
    let ext = onnx_io::ExternalData {
        force: a.external_data,
        threshold: a.external_data_threshold,
        ..onnx_io::ExternalData::default()
    };
    if let Some(m) = &a.masked_output {
        let dense = session.cx.dense.as_ref().ok_or_else(|| Error::Other("nothing was applied".into()))?;
        let keep = session.cx.keep.as_ref().ok_or_else(|| Error::Other("nothing was selected".into()))?;
        let masked = plprune_onnx::passes::rewrite_graph::masked(dense, &session.cx.groups, keep);
        onnx_io::save(m, onnx_io::export(&session.cx.document, &masked)?, &ext)?;
    }
    let proto = onnx_io::export(&session.cx.document, &session.model)?;
    if !a.quiet {
        print!("{}", report.summary_text());
    }
    if let Some(dir) = &a.plots {
        let written = plots::write_all(dir, &report)?;
        if !a.quiet {
            println!("plots    {} SVG files in {}", written.len(), dir.display());
        }
    }
    match (&a.output, a.dry_run) {
        (Some(out), false) => {
            let saved = onnx_io::save(out, proto, &ext)?;
            if !a.quiet {
                print!("wrote {} ({:.1} MB)", out.display(), saved.model_bytes as f64 / 1e6);
                if let Some((data, n)) = &saved.data {
                    print!(" + {} ({:.1} MB, {} tensors)", data.display(), *n as f64 / 1e6, saved.external_tensors);
                }
                println!();
            }
        }
        _ => {
            if !a.quiet {
                println!("dry run: nothing written");
            }
        }
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let config = Config { input_shapes: parse_input_shapes(&a.input_shape)?, ..Config::default() };
    let mut session = Session::open(&a.input, config)?;
    session.analyze()?;
    let report = session.report();
    if a.json {
        println!("{}", report.to_json());
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", report.inspect_text());
    }
    Ok(())
}

fn diff(a: DiffArgs) -> Result<()> {
    let config = Config { input_shapes: parse_input_shapes(&a.input_shape)?, ..Config::default() };
    let mut sa = Session::open(&a.a, config.clone())?;
    sa.analyze()?;
    // B is analysed for the same input shapes as A, so FLOPs compare like for like.
    let mut shapes = config.input_shapes.clone();
    for (k, v) in &sa.cx.input_shapes {
        shapes.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let mut sb = Session::open(&a.b, Config { input_shapes: BTreeMap::new(), ..config })?;
    let b_inputs: Vec<String> = sb.model.inputs.iter().map(|&i| sb.model.value(i).name.clone()).collect();
    sb.cx.config.input_shapes = shapes.into_iter().filter(|(k, _)| b_inputs.contains(k)).collect();
    sb.analyze()?;
    let d = plprune_onnx::diff::Diff::build(&sa, &sb);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d).map_err(|e| Error::Other(e.to_string()))?);
    } else {
        print!("{}", d.to_text());
    }
    Ok(())
}
