//! Attention-head and expert patterns from many exporters, on small generated fixtures
//! (`fixtures/make_fixtures.py`): for each, discovery finds the expected unit groups and
//! the rewrite is exact — slim(x) == masked dense(x) with tract (the tool's own
//! verification and an independent run here), the masking really changes the outputs, and
//! the written model passes `onnx.checker` (full check) and matches in onnxruntime.

mod common;

use common::*;
use plprune_onnx::units::{KeepSet, UnitKind};
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
    let worst = assert_same_outputs(&slim, &masked, &inputs, &names, 1e-4);
    let dense = std::fs::read(fixture(name)).unwrap();
    let moved = max_output_diff(&dense, &masked, &inputs, &names);
    assert!(moved > 100.0 * worst.max(1e-7), "{name} {tag}: pruning did not change the outputs ({moved})");
    let dir = out_dir("patterns");
    let stem = name.trim_end_matches(".onnx");
    let (sp, mp) = (dir.join(format!("{stem}-{tag}.onnx")), dir.join(format!("{stem}-{tag}-masked.onnx")));
    std::fs::write(&sp, &slim).unwrap();
    std::fs::write(&mp, &masked).unwrap();
    ort_check(&sp, &mp, None, 2);
    s
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
