//! Writing models with ONNX external data (`--external-data`, automatic above protobuf's
//! 2 GB): the pair OUT.onnx + OUT.onnx.data passes onnx.checker, offsets are aligned, the
//! tool reads it back and prunes it end to end; the automatic decision; the pair is
//! replaced whole and a failed save leaves nothing behind. The > 2 GB case itself writes
//! 2.4 GB and is #[ignore]d (run: cargo test --test external_data -- --ignored).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use common::*;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{
    GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use plprune_onnx::onnx_io::{self, ExternalData, PROTOBUF_LIMIT};
use plprune_onnx::rng::Rng;

fn value_info(name: &str, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    use onnx_protobuf::tensor_shape_proto::{dimension::Value as D, Dimension};
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = Dimension::new();
        dim.value = Some(match d {
            Ok(v) => D::DimValue(*v),
            Err(p) => D::DimParam(p.to_string()),
        });
        shape.dim.push(dim);
    }
    let mut tt = onnx_protobuf::type_proto::Tensor::new();
    tt.elem_type = 1; // float
    tt.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(onnx_protobuf::type_proto::Value::TensorType(tt));
    let mut vi = ValueInfoProto::new();
    vi.name = name.into();
    vi.type_ = Some(ty).into();
    vi
}

fn tensor(name: &str, dims: &[usize], rng: &mut Rng) -> TensorProto {
    let n: usize = dims.iter().product();
    let scale = 1.0 / (dims[0] as f64).sqrt();
    let mut t = TensorProto::new();
    t.name = name.into();
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.data_type = 1;
    t.raw_data = (0..n).flat_map(|_| (((rng.next_f64() * 2.0 - 1.0) * scale) as f32).to_le_bytes()).collect();
    t
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = vec![output.into()];
    n
}

/// x[N, 256] → MatMul 1024 → Add → Relu → MatMul 1024 → Add → Relu → MatMul 10 → y:
/// 5.3 MB of weights, two prunable neuron layers.
fn mlp() -> ModelProto {
    let mut rng = Rng::new(6);
    let mut g = GraphProto::new();
    g.name = "mlp".into();
    g.initializer = vec![
        tensor("w1", &[256, 1024], &mut rng),
        tensor("b1", &[1024], &mut rng),
        tensor("w2", &[1024, 1024], &mut rng),
        tensor("b2", &[1024], &mut rng),
        tensor("w3", &[1024, 10], &mut rng),
    ];
    g.node = vec![
        node("MatMul", "mm1", &["x", "w1"], "h1"),
        node("Add", "add1", &["h1", "b1"], "a1"),
        node("Relu", "relu1", &["a1"], "r1"),
        node("MatMul", "mm2", &["r1", "w2"], "h2"),
        node("Add", "add2", &["h2", "b2"], "a2"),
        node("Relu", "relu2", &["a2"], "r2"),
        node("MatMul", "mm3", &["r2", "w3"], "y"),
    ];
    g.input = vec![value_info("x", &[Err("N"), Ok(256)])];
    g.output = vec![value_info("y", &[Err("N"), Ok(10)])];
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.producer_name = "plprune-onnx tests".into();
    let mut op = OperatorSetIdProto::new();
    op.version = 17;
    m.opset_import = vec![op];
    m.graph = Some(g).into();
    m
}

/// (location, offset, length) of every tensor stored externally.
fn external_entries(path: &Path) -> Vec<(String, String, u64, u64)> {
    let m = ModelProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
    let g = m.graph.get_or_default();
    g.initializer
        .iter()
        .filter(|t| t.data_location.enum_value() == Ok(DataLocation::EXTERNAL))
        .map(|t| {
            let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone()).unwrap();
            assert!(t.raw_data.is_empty(), "{}: external and inline data", t.name);
            (t.name.clone(), get("location"), get("offset").parse().unwrap(), get("length").parse().unwrap())
        })
        .collect()
}

/// Checks the layout of a written pair: the location is the data file beside the model,
/// offsets aligned (4096 for tensors ≥ 1 MiB, else 64), tensors inside the file and not
/// overlapping, every tensor of at least `threshold` bytes external, smaller ones inline.
fn check_layout(model: &Path, threshold: u64) -> usize {
    let data = onnx_io::data_path(model);
    let size = std::fs::metadata(&data).unwrap().len();
    let mut entries = external_entries(model);
    entries.sort_by_key(|e| e.2);
    let mut end = 0;
    for (name, loc, off, len) in &entries {
        assert_eq!(loc, data.file_name().unwrap().to_str().unwrap(), "{name}");
        let align = if *len >= 1 << 20 { 4096 } else { 64 };
        assert_eq!(off % align, 0, "{name}: offset {off} not aligned to {align}");
        assert!(
            *off >= end && off + len <= size,
            "{name}: [{off}, {}) overlaps or leaves the file ({size})",
            off + len
        );
        assert!(*len >= threshold, "{name}: {len} bytes below the threshold went external");
        end = off + len;
    }
    let m = ModelProto::parse_from_bytes(&std::fs::read(model).unwrap()).unwrap();
    for t in &m.graph.get_or_default().initializer {
        if t.data_location.enum_value() != Ok(DataLocation::EXTERNAL) {
            assert!((t.raw_data.len() as u64) < threshold, "{}: {} bytes stayed inline", t.name, t.raw_data.len());
        }
    }
    entries.len()
}

/// onnx.checker on the file (the path form, which resolves external data).
fn onnx_checker(path: &Path) {
    let code = "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True)";
    let out = Command::new("python3").args(["-c", code]).arg(path).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("onnx.checker rejects {}: {}", path.display(), String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(std::env::var("CI").is_err(), "python3 with onnx is required under CI: {e}");
            eprintln!("note: python3 not found; skipping onnx.checker on {}", path.display());
        }
    }
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = out_dir(name);
    for e in std::fs::read_dir(&d).unwrap() {
        let _ = std::fs::remove_file(e.unwrap().path());
    }
    d
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

#[test]
fn external_data_model_round_trips_and_prunes_end_to_end() {
    let dir = fresh_dir("external-e2e");
    let src = dir.join("mlp.onnx");
    let ext = ExternalData { force: true, threshold: 1024, ..ExternalData::default() };
    let saved = onnx_io::save(&src, mlp(), &ext).unwrap();
    assert_eq!(saved.external_tensors, 5);
    let (data, data_len) = saved.data.clone().unwrap();
    assert_eq!(data, dir.join("mlp.onnx.data"));
    assert!(data_len > 5_000_000 && std::fs::metadata(&data).unwrap().len() == data_len);
    assert!(saved.model_bytes < 4096, "the model file holds no weights: {} bytes", saved.model_bytes);
    assert_eq!(check_layout(&src, 1024), 5);
    onnx_checker(&src);
    // Read back: the same tensors as the inline model.
    let (_, back) = onnx_io::load(&src).unwrap();
    let (_, inline) = onnx_io::load_bytes(&mlp().write_to_bytes().unwrap(), &dir.join("inline.onnx")).unwrap();
    for name in ["w1", "b1", "w2", "b2", "w3"] {
        let a = back.value(back.value_id(name).unwrap()).data.as_ref().unwrap();
        let b = inline.value(inline.value_id(name).unwrap()).data.as_ref().unwrap();
        assert!(a.bytes == b.bytes && a.dims == b.dims, "{name} differs after the round trip");
    }

    // Prune it: the output pair is external too (threshold 8 KiB: biases stay inline).
    let slim = dir.join("slim.onnx");
    let masked = dir.join("masked.onnx");
    let report = dir.join("r.json");
    let out = Command::cargo_bin("plprune-onnx")
        .unwrap()
        .args([src.to_str().unwrap(), "--criterion", "magnitude", "--ratio", "0.5", "--input-shape", "x=2,256"])
        .args(["--external-data", "--external-data-threshold", "8192"])
        .args(["-o", slim.to_str().unwrap(), "--masked-output", masked.to_str().unwrap()])
        .args(["--report", report.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("+ {} (", dir.join("slim.onnx.data").display())), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["verification"]["passed"], true);
    let n = &r["kinds"]["neurons"];
    let (ub, ua) = (n["units"]["before"].as_u64().unwrap(), n["units"]["after"].as_u64().unwrap());
    let (pb, pa) = (n["parameters"]["before"].as_f64().unwrap(), n["parameters"]["after"].as_f64().unwrap());
    assert!(ub == 2048 && ua < ub && (pa / pb - 0.5).abs() < 0.02, "units {ub} -> {ua}, parameters {pb} -> {pa}");
    assert_eq!(check_layout(&slim, 8192), 3, "w1, w2, w3 external; b1, b2 inline");
    assert!(std::fs::metadata(dir.join("slim.onnx.data")).unwrap().len() < data_len * 3 / 4);
    onnx_checker(&slim);
    ort_check(&slim, &masked, None, 2);
    assert_eq!(
        files_in(&dir),
        ["masked.onnx", "masked.onnx.data", "mlp.onnx", "mlp.onnx.data", "r.json", "slim.onnx", "slim.onnx.data"]
    );
    // And the tool reads its own output back.
    let inspected =
        Command::cargo_bin("plprune-onnx").unwrap().args(["inspect", "--json"]).arg(&slim).output().unwrap();
    let i: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(i["kinds"]["neurons"]["units"]["before"].as_u64(), Some(ua));
}

#[test]
fn external_data_is_chosen_above_the_protobuf_limit() {
    let d = ExternalData::default();
    assert_eq!(d.limit, PROTOBUF_LIMIT);
    assert_eq!(PROTOBUF_LIMIT, 2_147_483_647);
    assert!(!d.decide(PROTOBUF_LIMIT));
    assert!(d.decide(PROTOBUF_LIMIT + 1));
    assert!(d.decide(5 << 30));
    assert!(ExternalData { force: true, ..d }.decide(0));

    // The automatic path end to end, with the limit scaled down to the test model.
    let dir = fresh_dir("external-auto");
    let out = dir.join("m.onnx");
    let small_limit = ExternalData { limit: 1_000_000, ..d };
    let saved = onnx_io::save(&out, mlp(), &small_limit).unwrap();
    assert!(saved.data.is_some() && saved.external_tensors == 5, "{saved:?}");
    check_layout(&out, 1024);
    // Under the limit: one self-contained file, byte-identical to a plain serialization.
    let out2 = dir.join("inline.onnx");
    let saved = onnx_io::save(&out2, mlp(), &d).unwrap();
    assert!(saved.data.is_none() && saved.external_tensors == 0);
    assert!(std::fs::read(&out2).unwrap() == mlp().write_to_bytes().unwrap());
    assert_eq!(files_in(&dir), ["inline.onnx", "m.onnx", "m.onnx.data"]);
}

#[test]
fn the_pair_is_replaced_whole_and_a_failed_save_leaves_nothing() {
    let dir = fresh_dir("external-atomic");
    let out = dir.join("m.onnx");
    let ext = ExternalData { force: true, threshold: 1024, ..ExternalData::default() };
    onnx_io::save(&out, mlp(), &ext).unwrap();
    let first = std::fs::read(dir.join("m.onnx.data")).unwrap();
    // A second model (other weights) replaces both files.
    let mut other = mlp();
    other.graph.mut_or_insert_default().initializer[2].raw_data.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    onnx_io::save(&out, other, &ext).unwrap();
    let second = std::fs::read(dir.join("m.onnx.data")).unwrap();
    assert!(first != second && first.len() == second.len());
    let (_, m) = onnx_io::load(&out).unwrap();
    let w2 = m.value(m.value_id("w2").unwrap()).data.as_ref().unwrap();
    let (off, len) = external_entries(&out).into_iter().find(|e| e.0 == "w2").map(|e| (e.2, e.3)).unwrap();
    assert!(w2.bytes[..] == second[off as usize..(off + len) as usize]);
    assert_eq!(files_in(&dir), ["m.onnx", "m.onnx.data"], "no temporary files remain");

    // A save that fails half-way (a tensor still pointing at external data) writes nothing.
    let bad_path = dir.join("bad.onnx");
    let mut bad = mlp();
    let t = &mut bad.graph.mut_or_insert_default().initializer[3];
    t.data_location = DataLocation::EXTERNAL.into();
    let e = onnx_io::save(&bad_path, bad, &ext).unwrap_err();
    assert!(e.to_string().contains("'b2'"), "{e}");
    assert_eq!(files_in(&dir), ["m.onnx", "m.onnx.data"], "a failed save leaves no files");
}

/// A model of 2.4 GB of weights: above protobuf's limit, so `save` must choose external
/// data by itself and never serialize the inline model. Ignored by default (writes 2.4 GB,
/// needs ~5 GB of memory; 14 s here): cargo test --test external_data -- --ignored
#[test]
#[ignore = "writes 2.4 GB; run with --ignored"]
fn a_model_above_2gb_is_written_with_external_data() {
    let dir = fresh_dir("external-2gb");
    let mut g = GraphProto::new();
    g.name = "big".into();
    let n = 200 << 20; // 200 Mi floats = 800 MiB per tensor
    for i in 0..3 {
        let mut t = TensorProto::new();
        t.name = format!("w{i}");
        t.dims = vec![n as i64];
        t.data_type = 1;
        t.raw_data = vec![i as u8 + 1; n * 4];
        g.initializer.push(t);
        g.node.push(node("Identity", &format!("id{i}"), &[&format!("w{i}")], &format!("y{i}")));
        g.output.push(value_info(&format!("y{i}"), &[Ok(n as i64)]));
    }
    let mut m = mlp();
    m.graph = Some(g).into();
    let out = dir.join("big.onnx");
    let saved = onnx_io::save(&out, m, &ExternalData::default()).unwrap();
    assert_eq!(saved.external_tensors, 3);
    assert!(saved.model_bytes < 4096);
    let data_len = std::fs::metadata(dir.join("big.onnx.data")).unwrap().len();
    assert!(data_len >= 3 * n as u64 * 4 && data_len > PROTOBUF_LIMIT, "{data_len}");
    check_layout(&out, 1024);
    let (_, back) = onnx_io::load(&out).unwrap();
    let w2 = back.value(back.value_id("w2").unwrap()).data.as_ref().unwrap();
    assert!(w2.bytes.len() == n * 4 && w2.bytes.iter().all(|&b| b == 3));
    drop(back);
    onnx_checker(&out);
    std::fs::remove_file(dir.join("big.onnx.data")).unwrap(); // 2.4 GB of scratch
}
