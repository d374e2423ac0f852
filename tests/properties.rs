//! Property tests of the rewrite: any keep-set (at least one unit per group) gives a
//! consistent slim model equal to the masked dense one; keeping everything changes
//! nothing; import → export → import is lossless.

mod common;

use common::*;
use plprune_onnx::ir::Model;
use plprune_onnx::rng::Rng;
use plprune_onnx::units::KeepSet;
use plprune_onnx::{onnx_io, Config, Session};
use proptest::prelude::*;

fn session(path: &std::path::Path) -> Session {
    let mut s = Session::open(path, Config { verify: false, ..Config::default() }).unwrap();
    s.analyze().unwrap();
    s
}

fn random_keep(s: &Session, seed: u64) -> KeepSet {
    let mut rng = Rng::new(seed);
    let mut keep = KeepSet::all(&s.cx.groups);
    for k in keep.keep.iter_mut() {
        let p = rng.next_f64();
        for x in k.iter_mut() {
            *x = rng.next_f64() > p;
        }
        if !k.iter().any(|&x| x) {
            let i = rng.below(k.len() as u64) as usize;
            k[i] = true;
        }
    }
    keep
}

fn check_random_keep(path: &std::path::Path, seed: u64) {
    let mut s = session(path);
    let keep = random_keep(&s, seed);
    s.apply(Some(keep.clone())).unwrap();
    // Shapes: every sliced tensor that is still there (a removed expert's are not) lost at
    // least the pruned entries.
    for (g, group) in s.cx.groups.iter().enumerate() {
        for sl in group.slices.iter().filter(|sl| s.model.graph.contains_node(sl.tensor)) {
            let dense = s.cx.dense.as_ref().unwrap().value(sl.tensor).data.as_ref().unwrap().dims[sl.axis];
            let now = s.model.value(sl.tensor).data.as_ref().unwrap().dims[sl.axis];
            assert!(now <= dense - keep.pruned(g).len() * sl.factor);
        }
    }
    s.model.validate().unwrap();
    let inputs = plprune_onnx::calib::synthetic(&s.model, &s.cx.input_shapes, seed).ordered(&s.model);
    let names: Vec<String> = s.model.outputs.iter().map(|&o| s.model.value(o).name.clone()).collect();
    assert_same_outputs(&s.model_bytes().unwrap(), &s.masked_bytes().unwrap(), &inputs, &names, 1e-4);
}

proptest! {
    // A fixed seed: CI explores the same 12 keep-sets on every run (failures found by
    // earlier random runs are replayed from properties.proptest-regressions).
    #![proptest_config(ProptestConfig {
        cases: 12,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_2026),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_keep_sets_on_vgg(seed in any::<u64>()) {
        check_random_keep(&shared("digits/vgg_bn.onnx"), seed);
    }

    #[test]
    fn random_keep_sets_on_moe_heads_experts_neurons(seed in any::<u64>()) {
        check_random_keep(&shared("digits/moe_transformer.onnx"), seed);
    }

    #[test]
    fn random_keep_sets_on_conv_fixture(seed in any::<u64>()) {
        check_random_keep(&fixture("conv_bn_residual.onnx"), seed);
    }

    #[test]
    fn random_keep_sets_on_ffn_fixture(seed in any::<u64>()) {
        check_random_keep(&fixture("ffn_gelu.onnx"), seed);
    }
}

#[test]
fn keep_all_changes_nothing() {
    for path in [shared("digits/vgg_bn.onnx"), fixture("conv_bn_residual.onnx"), fixture("ffn_gelu.onnx")] {
        let mut s = session(&path);
        let before = s.model_bytes().unwrap();
        let keep = KeepSet::all(&s.cx.groups);
        s.apply(Some(keep)).unwrap();
        assert!(s.model_bytes().unwrap() == before, "{}: keep-all changed the model", path.display());
    }
}

fn summary(m: &Model) -> Vec<String> {
    let mut v: Vec<String> = m
        .values()
        .into_iter()
        .map(|id| {
            let x = m.value(id);
            format!("{} {:?} {:?} {:?}", x.name, x.kind, x.dtype, x.data.as_ref().map(|d| (&d.dims, d.bytes.len())))
        })
        .collect();
    v.extend(m.ops().into_iter().map(|o| format!("{} {}", m.op(o).op_type, m.op(o).name)));
    v
}

#[test]
fn import_export_round_trip_is_lossless() {
    for path in [
        shared("digits/vgg_bn.onnx"),
        shared("digits/moe_transformer.onnx"),
        fixture("conv_bn_residual.onnx"),
        fixture("dtypes.onnx"),
        fixture("ffn_f16.onnx"),
        fixture("external_data.onnx"),
    ] {
        let (doc, model) = onnx_io::load(&path).unwrap();
        let proto = onnx_io::export(&doc, &model).unwrap();
        let bytes = onnx_io::to_bytes(&proto).unwrap();
        // Everything but inlined external data is the source, field for field.
        if !path.ends_with("external_data.onnx") {
            assert!(bytes == onnx_io::to_bytes(&doc.proto).unwrap(), "{}: export changed the file", path.display());
        }
        let (_, again) = onnx_io::load_bytes(&bytes, &path).unwrap();
        assert_eq!(summary(&model), summary(&again), "{}", path.display());
    }
}

#[test]
fn typed_fields_external_data_and_raw_data_decode_alike() {
    let (_, typed) = onnx_io::load(&fixture("dtypes.onnx")).unwrap();
    let (_, ext) = onnx_io::load(&fixture("external_data.onnx")).unwrap();
    for name in ["fc2.weight", "fc2.bias", "fc1.weight"] {
        let a = typed.value(typed.value_id(name).unwrap()).data.clone().unwrap();
        let b = ext.value(ext.value_id(name).unwrap()).data.clone().unwrap();
        assert_eq!(a, b, "{name}");
    }
}
