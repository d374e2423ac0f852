//! Attention-head and expert patterns from many exporters, on small generated fixtures
//! (`fixtures/make_fixtures.py`): for each, discovery finds the expected unit groups and
//! the rewrite is exact — slim(x) == masked dense(x) with tract, or with the plprune engine
//! where tract lacks an op (the tool's own verification and an independent run here), the
//! masking really changes the outputs, and the written model passes `onnx.checker` (full
//! check) and matches in onnxruntime. For the fused attention and MoE ops, the engine's
//! lowering of the dense fixture is also checked against onnxruntime.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use plprune_onnx::passes::verify_rewrite::{compare, run_pair};
use plprune_onnx::tensor::Tensor;
use plprune_onnx::units::{KeepSet, ShapeTarget, UnitKind};
use plprune_onnx::{Config, Session};

fn open(name: &str, kinds: &[UnitKind], ratio: f64) -> Session {
    let config = Config {
        ratio,
        kinds: Some(kinds.to_vec()),
        verify: true,
        criterion: plprune_onnx::criteria::Criterion::Magnitude,
        ..Config::default()
    };
    let mut s = Session::open(&fixture(name), config).expect("open");
    s.analyze().expect("analyze");
    s
}

/// Group sizes of `kind`, in discovery order.
fn counts(s: &Session, kind: UnitKind) -> Vec<usize> {
    s.cx.groups.iter().filter(|g| g.kind == kind).map(|g| g.count).collect()
}

/// Applies `keep` (or the selection), then checks exactness independently of the tool's
/// verification (which ran too), that pruning mattered, and onnxruntime on the files.
fn check(mut s: Session, name: &str, tag: &str, keep: Option<KeepSet>) -> Session {
    if keep.is_none() {
        s.select().expect("select");
    }
    s.apply(keep).expect("apply (with the tool's own verification)");
    assert!(s.cx.verification.as_ref().is_some_and(|v| v.passed));
    let rep = s.report();
    assert!(rep.parameters.after < rep.parameters.before, "{name} {tag}: nothing was removed");
    let inputs = plprune_onnx::calib::synthetic(&s.model, &s.cx.input_shapes, 7).ordered(&s.model);
    let names: Vec<String> = s.model.outputs.iter().map(|&o| s.model.value(o).name.clone()).collect();
    let slim = s.model_bytes().unwrap();
    let masked = s.masked_bytes().unwrap();
    let (worst, executor) = same_outputs(&slim, &masked, &inputs, &names);
    let dense = std::fs::read(fixture(name)).unwrap();
    let moved = output_diff(&dense, &masked, &inputs, &names);
    assert!(moved > 100.0 * worst.max(1e-7), "{name} {tag}: pruning did not change the outputs ({moved})");
    let tool = &s.cx.verification.as_ref().unwrap().executor;
    assert_eq!(tool, &executor, "{name} {tag}: the tool verified with another executor");
    let dir = out_dir("patterns");
    let stem = name.trim_end_matches(".onnx");
    let (sp, mp) = (dir.join(format!("{stem}-{tag}.onnx")), dir.join(format!("{stem}-{tag}-masked.onnx")));
    std::fs::write(&sp, &slim).unwrap();
    std::fs::write(&mp, &masked).unwrap();
    ort_check_level(&sp, &mp, ort_level(name));
    s
}

/// onnxruntime's optimization level for a fixture: its extended optimizer replaces
/// DequantizeLinear(int8) + MatMul by MatMulNBits, which quantizes activations (an
/// approximation that differs between any two models), so int8 fixtures run at "basic".
fn ort_level(name: &str) -> &'static str {
    if name.starts_with("dequant") {
        "basic"
    } else {
        "all"
    }
}

/// Runs both models on one executor (tract, or the plprune engine where tract lacks an op)
/// and asserts every output agrees to round-off; returns the largest difference and the
/// executor.
fn same_outputs(a: &[u8], b: &[u8], inputs: &[(String, Tensor)], names: &[String]) -> (f64, String) {
    let (ya, yb, executor) = run_pair(a, b, (inputs, inputs), names).expect("an executor runs both models");
    assert_eq!(ya.len(), yb.len());
    let mut worst = 0.0f64;
    for ((name, x), (_, y)) in ya.iter().zip(&yb) {
        let (check, ok) = compare(name, x, y, 1e-4);
        assert!(ok, "output {name}: max |diff| {} > tolerance {}", check.max_abs_diff, check.tolerance);
        worst = worst.max(check.max_abs_diff);
    }
    (worst, executor)
}

fn output_diff(a: &[u8], b: &[u8], inputs: &[(String, Tensor)], names: &[String]) -> f64 {
    let (ya, yb, _) = run_pair(a, b, (inputs, inputs), names).expect("an executor runs both models");
    ya.iter()
        .zip(&yb)
        .flat_map(|((_, x), (_, y))| x.to_f64_vec().into_iter().zip(y.to_f64_vec()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

fn ort_available() -> bool {
    let probe = Command::new("python3").args(["-c", "import onnx, onnxruntime"]).output();
    let ok = probe.map(|o| o.status.success()).unwrap_or(false);
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("python3 with onnx and onnxruntime is required under CI (pip install onnx onnxruntime)");
    }
    if !ok {
        eprintln!("note: python3 with onnx/onnxruntime not found; skipping the onnxruntime check locally");
    }
    ok
}

/// tests/ort_check.py (onnx.checker full check, onnxruntime slim vs masked) at an
/// optimization level.
fn ort_check_level(slim: &Path, masked: &Path, level: &str) {
    if !ort_available() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ort_check.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(slim)
        .arg(masked)
        .args(["--samples", "2", "--opt-level", level])
        .output()
        .expect("run ort_check.py");
    assert!(
        out.status.success(),
        "onnxruntime check failed for {}:\n{}\n{}",
        slim.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dense fixture on the plprune engine against onnxruntime (the engine's lowering of
/// the fused ops is what verifies their rewrites): returns max |engine − ORT|.
fn engine_vs_ort(name: &str) -> Option<f64> {
    if !ort_available() {
        return None;
    }
    let s = open(name, &[UnitKind::Heads, UnitKind::Experts], 0.5);
    let inputs = plprune_onnx::calib::synthetic(&s.model, &s.cx.input_shapes, 11).ordered(&s.model);
    let dense = std::fs::read(fixture(name)).unwrap();
    let ours = plprune_onnx::passes::verify_rewrite::run_engine(&dense, &inputs).expect("engine runs the fixture");
    let dir = out_dir("patterns");
    let (xin, yout) = (dir.join(format!("{name}.x.f32")), dir.join(format!("{name}.y.f32")));
    let (_, x) = &inputs[0];
    let bytes: Vec<u8> = x.to_f64_vec().iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    std::fs::write(&xin, bytes).unwrap();
    let script = "import sys, numpy as np, onnxruntime as ort\n\
        m, xin, dims, yout = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3].split(',')], sys.argv[4]\n\
        x = np.fromfile(xin, dtype=np.float32).reshape(dims)\n\
        so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n\
        y = ort.InferenceSession(m, so, providers=['CPUExecutionProvider']).run(None, {'x': x})[0]\n\
        y.astype(np.float32).tofile(yout)\n";
    let dims: Vec<String> = x.dims.iter().map(|d| d.to_string()).collect();
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(fixture(name))
        .arg(&xin)
        .arg(dims.join(","))
        .arg(&yout)
        .output()
        .expect("run onnxruntime");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Vec<f64> =
        std::fs::read(&yout).unwrap().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect();
    let ours = ours[0].1.to_f64_vec();
    assert_eq!(ours.len(), theirs.len(), "{name}: output sizes differ");
    let dev = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("{name}: max |engine - onnxruntime| = {dev:.2e} on the dense fixture");
    Some(dev)
}

/// The value of an integer attribute of the (first) op of `op_type` in a written model.
fn attr_of(bytes: &[u8], op_type: &str, attr: &str) -> Vec<i64> {
    let (_, m) = plprune_onnx::onnx_io::load_bytes(bytes, Path::new("<test>")).unwrap();
    let mut ops: Vec<_> = m.ops().into_iter().filter(|&o| m.op(o).op_type == op_type).collect();
    ops.sort_by_key(|&o| m.op(o).name.clone());
    ops.iter().map(|&o| m.op(o).attr_i(attr, -1)).collect()
}

/// Every ratio, then a few hand-picked keep-sets (first, last, alternate units kept).
fn all_ratios_and_keep_sets(name: &str, kinds: &[UnitKind]) {
    for r in [0.25, 0.5, 0.75] {
        check(open(name, kinds, r), name, &format!("r{r}"), None);
    }
    let s = open(name, kinds, 0.5);
    for (k, pick) in [|u: usize, _n: usize| u == 0, |u: usize, n: usize| u + 1 == n, |u: usize, _n| u % 2 == 1]
        .into_iter()
        .enumerate()
    {
        let mut keep = KeepSet::all(&s.cx.groups);
        for (g, grp) in s.cx.groups.iter().enumerate() {
            if kinds.contains(&grp.kind) {
                keep.keep[g] = (0..grp.count).map(|u| pick(u, grp.count)).collect();
            }
        }
        check(open(name, kinds, 0.5), name, &format!("keep{k}"), Some(keep));
    }
}

#[test]
fn fused_qkv_gather_heads() {
    let s = open("attn_fused_qkv.onnx", &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    // A head owns D columns in each of Wq, Wk, Wv (three segments of the fused weight),
    // their biases, and D rows of Wo.
    let g = s.cx.groups.iter().find(|g| g.kind == UnitKind::Heads).unwrap();
    assert_eq!(g.params_per_unit(&s.model), 3 * 4 * 16 + 3 * 4 + 4 * 16);
    all_ratios_and_keep_sets("attn_fused_qkv.onnx", &[UnitKind::Heads]);
}

#[test]
fn fused_qkv_split_and_slice_heads() {
    let s = open("attn_fused_split.onnx", &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    all_ratios_and_keep_sets("attn_fused_split.onnx", &[UnitKind::Heads]);
}

#[test]
fn constant_head_count_and_shared_shape_vectors() {
    let s = open("attn_const_heads.onnx", &[UnitKind::Heads], 0.5);
    // Layer 0: one Constant shape vector read by Q, K and V — one edit, not three.
    assert_eq!(counts(&s, UnitKind::Heads), vec![4], "unprunable: {:?}", s.cx.unprunable);
    let g = s.cx.groups.iter().find(|g| g.kind == UnitKind::Heads).unwrap();
    assert_eq!(g.shape_edits.len(), 2, "head-count literal once, merge hidden size once: {:?}", g.shape_edits);
    // Layers 1 and 2 share a shape vector: editing it for one would break the other.
    let shared =
        s.cx.unprunable
            .iter()
            .filter(|u| u.kind == Some(UnitKind::Heads) && u.reason.contains("counts the channels of 2 layers"))
            .count();
    assert_eq!(shared, 2, "{:?}", s.cx.unprunable);
    all_ratios_and_keep_sets("attn_const_heads.onnx", &[UnitKind::Heads]);
}

#[test]
fn shapes_read_at_run_time() {
    let name = "attn_shape_reads.onnx";
    let s = open(name, &[UnitKind::Heads, UnitKind::Neurons], 0.5);
    // Layer 0 reads batch and sequence sizes from its Q/K/V projections and its merged
    // context, and the FFN's channel count for h.view(-1, h.size(-1)): all prunable.
    assert_eq!(counts(&s, UnitKind::Heads), vec![4], "unprunable: {:?}", s.cx.unprunable);
    assert_eq!(counts(&s, UnitKind::Neurons), vec![8, 8], "unprunable: {:?}", s.cx.unprunable);
    let ffn = s.cx.groups.iter().find(|g| g.name == "l0_fc1").expect("layer 0's FFN");
    assert!(
        ffn.shape_edits.iter().any(|e| matches!(e.target, ShapeTarget::ConcatInput { .. })),
        "the channel count read by Shape becomes a literal: {:?}",
        ffn.shape_edits
    );
    // Layer 1 divides the channel count by a size read at run time (Shape(x)[2] / H) to
    // get its head count: freezing it into a literal is not provably safe.
    let why: Vec<_> = s.cx.unprunable.iter().filter(|u| u.kind == Some(UnitKind::Heads)).collect();
    assert_eq!(why.len(), 1, "{why:?}");
    assert!(why[0].reason.contains("read as data by Div 'l1_q_heads'"), "{why:?}");
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    all_ratios_and_keep_sets(name, &[UnitKind::Neurons]);
    all_ratios_and_keep_sets(name, &[UnitKind::Heads, UnitKind::Neurons]);
    // The engine lowers the shape arithmetic and IsNaN (criteria need it on such models).
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn grouped_query_attention_written_out() {
    // Llama as torch.onnx exports it: K and V repeated by repeat_kv (Unsqueeze, Expand
    // behind Where(Equal(s, -1), 1, s), Reshape to Hkv·r heads computed by a Mul), rotary
    // embeddings on Q and K. A unit is one KV head with the r query heads that read it.
    let name = "attn_gqa_repeat_kv.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![2, 3], "unprunable: {:?}", s.cx.unprunable);
    assert!(s.cx.unprunable.iter().all(|u| u.kind != Some(UnitKind::Heads)), "{:?}", s.cx.unprunable);
    let (c, d) = (16, 4);
    for (g, (layer, r)) in s.cx.groups.iter().zip([(0, 2), (1, 3)]) {
        let slice = |t: &str| {
            let sl: Vec<_> =
                g.slices.iter().filter(|sl| s.model.value(sl.tensor).name == format!("l{layer}.w{t}")).collect();
            assert_eq!(sl.len(), 1, "{}: {t}: {sl:?}", g.name);
            (sl[0].axis, sl[0].factor)
        };
        // r·D columns of Wq and r·D rows of Wo, D columns of Wk and of Wv.
        assert_eq!(slice("q"), (1, r * d), "{}", g.name);
        assert_eq!(slice("k"), (1, d), "{}", g.name);
        assert_eq!(slice("v"), (1, d), "{}", g.name);
        assert_eq!(slice("o"), (0, r * d), "{}", g.name);
        assert_eq!(g.params_per_unit(&s.model), 2 * c * r * d + 2 * c * d, "{}", g.name);
        // K's and V's Expand targets count Hkv (1 per unit), their merges Hkv·r (r per
        // unit); all read from shapes at run time, frozen into literals by the rewrite.
        let mut factors: Vec<usize> = g.shape_edits.iter().map(|e| e.factor).collect();
        factors.sort();
        assert_eq!(factors, [1, 1, r, r], "{}: {:?}", g.name, g.shape_edits);
        assert!(g.shape_edits.iter().all(|e| matches!(e.target, ShapeTarget::ConcatInput { .. })));
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    // Keeping layer 0's first and layer 1's middle KV head keeps exactly their query heads.
    let s = open(name, &[UnitKind::Heads], 0.5);
    let dense = s.model.clone();
    let mut keep = KeepSet::all(&s.cx.groups);
    keep.keep[0] = vec![true, false];
    keep.keep[1] = vec![false, true, false];
    let s = check(s, name, "kv-pick", Some(keep));
    let cols = |m: &plprune_onnx::ir::Model, t: &str| {
        let v = m.value(m.value_id(t).unwrap()).data.clone().unwrap();
        (v.dims.clone(), v.to_f64_vec())
    };
    for (t, unit, width) in [("l0.wq", 0, 2 * d), ("l0.wk", 0, d), ("l1.wq", 1, 3 * d), ("l1.wv", 1, d)] {
        let ((dd, dv), (sd, sv)) = (cols(&dense, t), cols(&s.model, t));
        assert_eq!(sd, [c, width], "{t}");
        for row in 0..c {
            let want = &dv[row * dd[1] + unit * width..row * dd[1] + (unit + 1) * width];
            assert_eq!(&sv[row * width..(row + 1) * width], want, "{t} row {row}");
        }
    }
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn kv_cache_heads_narrow_the_cache() {
    // attn_gqa_kv_cache: the Llama pattern above with a KV cache. The past inputs
    // (layer 0's behind a one-input Concat) are concatenated with the new keys and values
    // into the present outputs, which repeat_kv reads. A KV head's cache entries belong to
    // its unit: the rewrite narrows the cache inputs and outputs with the heads.
    let name = "attn_gqa_kv_cache.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![2, 3], "unprunable: {:?}", s.cx.unprunable);
    assert!(s.cx.unprunable.iter().all(|u| u.kind != Some(UnitKind::Heads)), "{:?}", s.cx.unprunable);
    for (layer, g) in s.cx.groups.iter().enumerate() {
        let io: Vec<(String, usize, usize, usize)> =
            g.io.iter().map(|x| (s.model.value(x.value).name.clone(), x.axis, x.offset, x.factor)).collect();
        let mut want: Vec<(String, usize, usize, usize)> = ["past_key", "past_value", "present_key", "present_value"]
            .iter()
            .map(|p| (format!("{p}.l{layer}"), 1, 0, 1))
            .collect();
        want.sort();
        let mut io = io;
        io.sort();
        assert_eq!(io, want, "{}", g.name);
    }
    // The selection at every ratio verifies (the tool runs the masked reference on the whole
    // cache and the slim model on the kept heads' entries).
    for r in [0.25, 0.5, 0.75] {
        let mut s = open(name, &[UnitKind::Heads], r);
        s.select().expect("select");
        s.apply(None).expect("apply (with the tool's own verification)");
        assert!(s.cx.verification.as_ref().is_some_and(|v| v.passed), "ratio {r}");
    }
    // Layer 0 keeps its second KV head, layer 1 its first and third.
    let mut s = open(name, &[UnitKind::Heads], 0.5);
    let mut keep = KeepSet::all(&s.cx.groups);
    keep.keep[0] = vec![false, true];
    keep.keep[1] = vec![true, false, true];
    s.apply(Some(keep)).expect("apply");
    assert!(s.cx.verification.as_ref().is_some_and(|v| v.passed));
    let itf = &s.model.interface;
    assert_eq!(itf.len(), 8, "{itf:?}");
    for (n, dense, kept) in
        [("past_key.l0", 2, vec![1]), ("present_value.l0", 2, vec![1]), ("past_value.l1", 3, vec![0, 2])]
    {
        let nar = &itf[n];
        assert_eq!((nar.axis, nar.dense, &nar.kept), (1, dense, &kept), "{n}");
    }
    assert!(itf["past_key.l1"].input && !itf["present_key.l1"].input);
    // The written model declares the narrowed cache.
    let slim = s.model_bytes().unwrap();
    let (_, m) = plprune_onnx::onnx_io::load_bytes(&slim, Path::new("slim.onnx")).unwrap();
    let declared = |n: &str| m.value(m.value_id(n).unwrap()).declared.clone().unwrap();
    use plprune_onnx::ir::Dim;
    assert_eq!(declared("past_key.l0")[1], Dim::Fixed(1));
    assert_eq!(declared("present_value.l1")[1], Dim::Fixed(2));
    assert_eq!(declared("past_key.l0")[2], Dim::Param("past".into()));
    // onnxruntime: a prompt with a 3-token past, then 3 decoding steps, each model fed its own
    // present cache; the slim model's outputs equal the masked model's on the kept heads.
    if !ort_available() {
        return;
    }
    let dir = out_dir("patterns");
    let (sp, mp, rp, cp) =
        (dir.join("kv-slim.onnx"), dir.join("kv-masked.onnx"), dir.join("kv-report.json"), dir.join("kv-calib.npz"));
    std::fs::write(&sp, &slim).unwrap();
    std::fs::write(&mp, s.masked_bytes().unwrap()).unwrap();
    std::fs::write(&rp, s.report().to_json()).unwrap();
    let mut shapes = std::collections::BTreeMap::new();
    shapes.insert("x".to_string(), vec![2, 5, 16]);
    for (l, h) in [(0, 2), (1, 3)] {
        for t in ["key", "value"] {
            shapes.insert(format!("past_{t}.l{l}"), vec![2, h, 3, 4]);
        }
    }
    let dense = Session::open(&fixture(name), plprune_onnx::Config::default()).unwrap();
    let batch = plprune_onnx::calib::synthetic(&dense.model, &shapes, 3);
    plprune_onnx::npz::write(&cp, &batch.arrays).unwrap();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kv_decode.py"))
        .args([&sp, &mp, &rp, &cp])
        .arg("--dense")
        .arg(fixture(name))
        .output()
        .expect("run kv_decode.py");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let nums: Vec<f64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(nums[0] <= 1e-5 && nums[1] > 1e-2, "{text}");
}

#[test]
fn stacked_experts_top2() {
    let name = "moe_stacked_top2.onnx";
    let s = open(name, &[UnitKind::Experts], 0.5);
    assert_eq!(counts(&s, UnitKind::Experts), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    for g in s.cx.groups.iter().filter(|g| g.kind == UnitKind::Experts) {
        // Router column and bias entry, and the expert's slice of W1, b1, W2, b2.
        assert_eq!(g.params_per_unit(&s.model), 16 + 1 + 16 * 8 + 8 + 8 * 16 + 16, "{}", g.name);
        assert_eq!(g.min_keep, 2, "top-2 routing needs two experts");
    }
    for r in [0.25, 0.5, 0.75] {
        let s = check(open(name, &[UnitKind::Experts], r), name, &format!("r{r}"), None);
        let k = s.cx.keep.as_ref().unwrap();
        assert!(k.keep.iter().all(|g| g.iter().filter(|&&x| x).count() >= 2), "TopK k must stay <= kept experts");
    }
    let keeps: [&[bool]; 3] = [&[true, false, false, true], &[false, true, true, false], &[true, true, false, true]];
    for (i, pick) in keeps.iter().enumerate() {
        let s = open(name, &[UnitKind::Experts], 0.5);
        let mut keep = KeepSet::all(&s.cx.groups);
        for (g, grp) in s.cx.groups.iter().enumerate() {
            if grp.kind == UnitKind::Experts {
                keep.keep[g] = pick.to_vec();
            }
        }
        check(s, name, &format!("keep{i}"), Some(keep));
    }
    // Fewer kept experts than TopK's k is refused, not rewritten.
    let mut s = open(name, &[UnitKind::Experts], 0.5);
    let mut keep = KeepSet::all(&s.cx.groups);
    let g = s.cx.groups.iter().position(|g| g.kind == UnitKind::Experts).unwrap();
    keep.keep[g] = vec![true, false, false, false];
    let err = s.apply(Some(keep)).unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
}

/// The Einsum form with the down-projection stored [E, C, F] and no bias: the expert's slice
/// of it travels with the expert, and slim == masked at every ratio.
#[test]
fn stacked_experts_without_bias_and_output_axis_first() {
    let name = "moe_stacked_nobias.onnx";
    let s = open(name, &[UnitKind::Experts], 0.5);
    assert_eq!(counts(&s, UnitKind::Experts), vec![4], "unprunable: {:?}", s.cx.unprunable);
    let g = s.cx.groups.iter().find(|g| g.kind == UnitKind::Experts).unwrap();
    // Router column and bias entry, and the expert's slice of W1, b1 and W2.
    assert_eq!(g.params_per_unit(&s.model), 16 + 1 + 16 * 8 + 8 + 16 * 8, "{}", g.name);
    for r in [0.25, 0.5] {
        check(open(name, &[UnitKind::Experts], r), name, &format!("r{r}"), None);
    }
}

/// Head-count attributes follow the kept units: `attr` of each `op_type` op equals the kept
/// units of its group times `per_unit`.
fn assert_head_attrs(s: &Session, op_type: &str, attrs: &[(&str, i64)]) {
    let bytes = s.model_bytes().unwrap();
    let keep = s.cx.keep.as_ref().unwrap();
    let kept: Vec<i64> =
        s.cx.groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.kind == UnitKind::Heads)
            .map(|(i, _)| keep.kept_count(i) as i64)
            .collect();
    for &(attr, per_unit) in attrs {
        let got = attr_of(&bytes, op_type, attr);
        let want: Vec<i64> = kept.iter().map(|k| k * per_unit).collect();
        assert_eq!(got, want, "{op_type}.{attr}");
    }
}

#[test]
fn onnx_attention_op_heads_and_gqa_groups() {
    let name = "attn_onnx_op.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 2], "unprunable: {:?}", s.cx.unprunable);
    let (mha, gqa) = (&s.cx.groups[0], &s.cx.groups[1]);
    // MHA: D = 4 columns of Wq, Wk, Wv (+ biases) and 4 rows of Wo per head. GQA: one unit
    // is a KV head with its 2 query heads: 8 columns of Wq, 4 of Wk and Wv, 8 rows of Wo.
    assert_eq!(mha.params_per_unit(&s.model), 3 * (16 * 4 + 4) + 4 * 16);
    assert_eq!(gqa.params_per_unit(&s.model), (16 * 8 + 8) + 2 * (16 * 4 + 4) + 8 * 16);
    assert_eq!(
        gqa.attr_edits.iter().map(|e| (e.name.as_str(), e.factor)).collect::<Vec<_>>(),
        [("kv_num_heads", 1), ("q_num_heads", 2)]
    );
    for r in [0.25, 0.5, 0.75] {
        let s = check(open(name, &[UnitKind::Heads], r), name, &format!("r{r}"), None);
        assert_eq!(s.cx.verification.as_ref().unwrap().executor, "tract");
        assert_head_attrs(&s, "Attention", &[("kv_num_heads", 1)]);
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn onnx_attention_4d_heads() {
    let name = "attn_onnx_4d.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 2], "unprunable: {:?}", s.cx.unprunable);
    for g in &s.cx.groups {
        // The head-count literals of the Q/K/V reshapes and the merge's hidden size.
        assert_eq!(g.shape_edits.len(), 4, "{}: {:?}", g.name, g.shape_edits);
        assert!(g.attr_edits.is_empty());
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn microsoft_attention_packed_qkv_heads() {
    let name = "ms_attention.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    // D columns in each of the three blocks of the packed weight and bias, D rows of Wo.
    assert_eq!(s.cx.groups[0].params_per_unit(&s.model), 3 * (16 * 4 + 4) + 4 * 16);
    for r in [0.25, 0.5, 0.75] {
        let s = check(open(name, &[UnitKind::Heads], r), name, &format!("r{r}"), None);
        let ex = &s.cx.verification.as_ref().unwrap().executor;
        assert_eq!(ex, "the plprune engine (tract lacks com.microsoft.Attention)");
        let line = s.report().summary_text();
        assert!(line.contains("verified slim == masked dense with the plprune engine (tract lacks"), "{line}");
        assert_head_attrs(&s, "Attention", &[("num_heads", 1)]);
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn microsoft_multi_head_attention_heads() {
    let name = "ms_mha.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    // Layer 1's packed bias [3·H·D] is sliced in its three blocks.
    let packed = s.cx.groups[1].slices.iter().filter(|sl| s.model.value(sl.tensor).name == "l1.bqkv").count();
    assert_eq!(packed, 3);
    for r in [0.25, 0.5, 0.75] {
        let s = check(open(name, &[UnitKind::Heads], r), name, &format!("r{r}"), None);
        assert_head_attrs(&s, "MultiHeadAttention", &[("num_heads", 1)]);
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn microsoft_group_query_attention_kv_groups() {
    let name = "ms_gqa.onnx";
    let s = open(name, &[UnitKind::Heads], 0.5);
    // 4 query heads over 2 KV heads: 2 units (KV groups) per layer.
    assert_eq!(counts(&s, UnitKind::Heads), vec![2, 2], "unprunable: {:?}", s.cx.unprunable);
    assert_eq!(s.cx.groups[0].params_per_unit(&s.model), (16 * 16 + 16) + 2 * (16 * 8 + 8) + 16 * 16);
    for r in [0.25, 0.5] {
        let s = check(open(name, &[UnitKind::Heads], r), name, &format!("r{r}"), None);
        assert_head_attrs(&s, "GroupQueryAttention", &[("num_heads", 2), ("kv_num_heads", 1)]);
    }
    all_ratios_and_keep_sets(name, &[UnitKind::Heads]);
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn microsoft_moe_experts() {
    let name = "ms_moe.onnx";
    let s = open(name, &[UnitKind::Experts], 0.5);
    assert_eq!(counts(&s, UnitKind::Experts), vec![4, 4], "unprunable: {:?}", s.cx.unprunable);
    for g in &s.cx.groups {
        // Router column and bias entry; the expert's fc1 [8, 16] + b1 [8], fc2 [16, 8] + b2 [16].
        assert_eq!(g.params_per_unit(&s.model), 16 + 1 + 8 * 16 + 8 + 16 * 8 + 16, "{}", g.name);
        assert_eq!(g.min_keep, 2, "k = 2");
    }
    for r in [0.25, 0.5] {
        let s = check(open(name, &[UnitKind::Experts], r), name, &format!("r{r}"), None);
        let k = s.cx.keep.as_ref().unwrap();
        assert!(k.keep.iter().all(|g| g.iter().filter(|&&x| x).count() >= 2));
    }
    let keeps: [&[bool]; 3] = [&[true, false, false, true], &[false, true, true, false], &[true, true, false, true]];
    for (i, pick) in keeps.iter().enumerate() {
        let s = open(name, &[UnitKind::Experts], 0.5);
        let mut keep = KeepSet::all(&s.cx.groups);
        for g in keep.keep.iter_mut() {
            *g = pick.to_vec();
        }
        check(s, name, &format!("keep{i}"), Some(keep));
    }
    let mut s = open(name, &[UnitKind::Experts], 0.5);
    let mut keep = KeepSet::all(&s.cx.groups);
    keep.keep[0] = vec![false, false, true, false];
    let err = s.apply(Some(keep)).unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
    let dev = engine_vs_ort(name);
    assert!(dev.is_none_or(|d| d < 1e-4), "engine vs onnxruntime: {dev:?}");
}

#[test]
fn dequantized_weights_and_decomposed_layer_norm() {
    let name = "dequant_ln.onnx";
    let s = open(name, &[UnitKind::Heads, UnitKind::Neurons], 0.5);
    assert_eq!(counts(&s, UnitKind::Heads), vec![4], "unprunable: {:?}", s.cx.unprunable);
    assert_eq!(counts(&s, UnitKind::Neurons), vec![32], "unprunable: {:?}", s.cx.unprunable);
    let heads = s.cx.groups.iter().find(|g| g.kind == UnitKind::Heads).unwrap();
    let sliced: Vec<String> = heads.slices.iter().map(|sl| s.model.value(sl.tensor).name.clone()).collect();
    // The stored f16 / int8 tensors and the per-column scales (and zero points) on the
    // sliced axis; Wo's per-column scale runs along the other axis and stays whole.
    for t in ["l0.wq_f16", "l0.wq_scale", "l0.wk_q", "l0.wk_scale", "l0.wk_zp", "l0.wo_q"] {
        assert!(sliced.contains(&t.to_string()), "{t} not sliced: {sliced:?}");
    }
    assert!(!sliced.contains(&"l0.wo_scale".to_string()));
    // Per head: Wq (f16) 16·4 + scale 4 + bq 4, Wk (int8) 16·4 + scale 4 + zp 4 + bk 4,
    // Wv 16·4 + bv 4, Wo (int8) 4 rows of 16.
    assert_eq!(heads.params_per_unit(&s.model), 72 + 76 + 68 + 64);
    all_ratios_and_keep_sets(name, &[UnitKind::Heads, UnitKind::Neurons]);
}

#[test]
fn verification_without_any_executor_fails_loudly() {
    // Rotary embeddings: discovery is indifferent, the engine has no lowering for them and
    // tract is not used for com.microsoft ops, so nothing can verify the rewrite.
    let mut s = open("ms_attention.onnx", &[UnitKind::Heads], 0.5);
    for op in s.model.ops() {
        if s.model.op(op).op_type == "Attention" {
            s.model.op_mut(op).set_attr("do_rotary", plprune_onnx::ir::Attr::Int(1));
        }
    }
    s.select().unwrap();
    let err = s.apply(None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, plprune_onnx::Error::Verify(_)), "{msg}");
    assert!(msg.contains("cannot verify") && msg.contains("tract lacks com.microsoft.Attention"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert_eq!(err.exit_code(), 3);
}

#[test]
fn per_head_inputs_and_sparse_mixer_stay_unprunable() {
    let config = |kind| Config {
        kinds: Some(vec![kind]),
        criterion: plprune_onnx::criteria::Criterion::Magnitude,
        input_shapes: [("x".to_string(), vec![2, 5, 16])].into_iter().collect(),
        ..Config::default()
    };
    // A per-head additive mask [1, H, S, T] on layer 0's Attention: its heads cannot be
    // removed without slicing it, so they stay whole; layer 1 is unaffected.
    let mut s = Session::open(&fixture("attn_onnx_op.onnx"), config(UnitKind::Heads)).unwrap();
    let mut mask = plprune_onnx::ir::Value::new("head_mask", plprune_onnx::ir::ValueKind::Weight);
    mask.set_data(Tensor::from_f32(vec![1, 4, 5, 5], &[0.0; 100]));
    let mask = s.model.add_value(mask);
    let att = s.model.ops().into_iter().find(|&o| s.model.op(o).name == "l0_attention").unwrap();
    s.model.replace_input(att, 3, mask);
    s.analyze().unwrap();
    assert_eq!(counts(&s, UnitKind::Heads), vec![2], "{:?}", s.cx.unprunable);
    let why: Vec<&str> = s.cx.unprunable.iter().map(|u| u.reason.as_str()).collect();
    assert!(why.iter().any(|r| r.contains("'head_mask' has one slice per head")), "{why:?}");
    // Sparse-mixer routing depends on every expert's logit.
    let mut s = Session::open(&fixture("ms_moe.onnx"), config(UnitKind::Experts)).unwrap();
    let moe = s.model.ops().into_iter().find(|&o| s.model.op(o).name == "l1_moe").unwrap();
    s.model.op_mut(moe).set_attr("use_sparse_mixer", plprune_onnx::ir::Attr::Int(1));
    s.analyze().unwrap();
    assert_eq!(counts(&s, UnitKind::Experts), vec![4]);
    let blocked = s.cx.unprunable.iter().find(|u| u.layer == "l1_moe").expect("l1_moe listed");
    assert!(blocked.reason.contains("sparse-mixer"), "{}", blocked.reason);
    assert_eq!(blocked.count, 4);
}
