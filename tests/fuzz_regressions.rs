//! Regression tests for what fuzzing found (fuzz/, `cargo +nightly fuzz run load` and
//! `discover_rewrite`). Every crash input is committed under fuzz/regressions/<target>/ and
//! replayed here through the same harness the fuzz targets run (fuzz/fuzz_targets/
//! common.rs): each must now end in Ok or a typed, one-line error naming the file, never a
//! panic, an overflow or a huge allocation. Inline cases below pin the individual fixes.

#[path = "../fuzz/fuzz_targets/common.rs"]
mod fuzz_common;

use std::path::{Path, PathBuf};

use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{GraphProto, Message, ModelProto, NodeProto, StringStringEntryProto, TensorProto};
use plprune_onnx::onnx_io;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Errors of the loader on a regression input are one line and name the file.
fn check_load_error(bytes: &[u8], name: &str) {
    if let Err(e) = onnx_io::load_bytes(bytes, Path::new(fuzz_common::FUZZ_PATH)) {
        let msg = e.to_string();
        assert!(msg.contains("fuzz.onnx") && !msg.contains('\n'), "{name}: {msg}");
    }
}

#[test]
fn load_regressions_end_in_ok_or_a_clear_error() {
    for p in inputs("load") {
        let bytes = std::fs::read(&p).unwrap();
        let name = p.display().to_string();
        check_load_error(&bytes, &name);
        fuzz_common::load_and_infer(&bytes);
    }
}

#[test]
fn discover_rewrite_regressions_end_in_ok_or_a_clear_error() {
    for p in inputs("discover_rewrite") {
        let bytes = std::fs::read(&p).unwrap();
        check_load_error(&bytes, &p.display().to_string());
        fuzz_common::discover_and_rewrite(&bytes);
    }
}

/// The unmutated seeds (the fixtures) go through the whole harness: a fix must not turn
/// valid models into errors, and the harness really reaches the rewrite.
#[test]
fn seed_fixtures_still_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/load");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.strip_prefix("seed-").is_some_and(|s| !s.contains('-')) {
            let bytes = std::fs::read(&p).unwrap();
            onnx_io::load_bytes(&bytes, Path::new(fuzz_common::FUZZ_PATH)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(fuzz_common::load_and_infer(&bytes), "{name}: shape inference failed");
            assert!(fuzz_common::discover_and_rewrite(&bytes), "{name}: the rewrite failed");
            n += 1;
        }
    }
    assert!(n >= 8, "{n} plain seeds");
}

fn model_with(t: TensorProto) -> Vec<u8> {
    let mut g = GraphProto::new();
    let mut n = NodeProto::new();
    n.op_type = "Identity".into();
    n.input = vec![t.name.clone()];
    n.output = vec!["y".into()];
    g.node = vec![n];
    g.initializer = vec![t];
    let mut vi = onnx_protobuf::ValueInfoProto::new();
    vi.name = "y".into();
    g.output = vec![vi];
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.graph = Some(g).into();
    m.write_to_bytes().unwrap()
}

/// A tensor whose dims claim 2^40 floats but whose float_data holds one: an error before
/// any allocation (it used to reserve 4 TiB and abort).
#[test]
fn typed_data_with_lying_dims_is_an_error_not_an_allocation() {
    let mut t = TensorProto::new();
    t.name = "w".into();
    t.data_type = 1;
    t.dims = vec![1 << 40];
    t.float_data = vec![1.0];
    let e = onnx_io::load_bytes(&model_with(t), Path::new("lying.onnx")).err().unwrap().to_string();
    assert!(e.contains("lying.onnx") && e.contains("'w'") && e.contains("the file holds 1"), "{e}");
}

/// External data claiming 4 TiB from a 16-byte file: an error naming the file, checked
/// against the file's size before the buffer is allocated.
#[test]
fn external_data_longer_than_its_file_is_an_error_not_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let mut t = TensorProto::new();
    t.name = "w".into();
    t.data_type = 1;
    t.dims = vec![1 << 40];
    t.data_location = DataLocation::EXTERNAL.into();
    let mut loc = StringStringEntryProto::new();
    loc.key = "location".into();
    loc.value = "w.bin".into();
    t.external_data = vec![loc];
    let path = dir.path().join("m.onnx");
    let e = onnx_io::load_bytes(&model_with(t), &path).err().unwrap().to_string();
    assert!(e.contains("m.onnx") && e.contains("w.bin") && e.contains("too short"), "{e}");
}

/// Fuzzing found (discover_rewrite, 2 inputs under fuzz/regressions/discover_rewrite/):
/// nested protobuf start-group tags in an unknown field made protobuf 3.4's skip_group
/// recurse until the stack overflowed (an abort, not even a panic). 100 000 nested groups
/// of unknown field 100 — 200 KB — are now refused before decoding, with a clear error;
/// shallow groups in unknown fields still decode.
#[test]
fn deeply_nested_protobuf_groups_are_an_error_not_a_stack_overflow() {
    let tag = [0xA3u8, 0x06]; // field 100, wire type 3 (start group)
    let bytes: Vec<u8> = tag.iter().copied().cycle().take(200_000).collect();
    let e = onnx_io::load_bytes(&bytes, Path::new("groups.onnx")).err().unwrap().to_string();
    assert!(e.contains("groups.onnx") && e.contains("groups nested more than 64"), "{e}");
    for p in inputs("discover_rewrite").iter().filter(|p| p.to_string_lossy().contains("crash-")) {
        let e = onnx_io::load_bytes(&std::fs::read(p).unwrap(), Path::new("c.onnx")).err().unwrap().to_string();
        assert!(e.contains("groups nested"), "{}: {e}", p.display());
    }
    // Two nested groups (start, start, end, end) in an unknown field of a real model: fine.
    let mut ok = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ffn_gelu.onnx")).unwrap();
    ok.extend_from_slice(&[0xA3, 0x06, 0xA3, 0x06, 0xA4, 0x06, 0xA4, 0x06]);
    onnx_io::load_bytes(&ok, Path::new("ok.onnx")).unwrap();
}
