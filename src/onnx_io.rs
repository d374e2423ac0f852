//! Import and export: the only module that knows protobuf types.
//!
//! Import decodes a `ModelProto` (onnx-protobuf, which keeps unknown fields) into the IR:
//! initializers in `raw_data`, typed fields or external files; weights held in Constant
//! nodes; declared types and dynamic dimensions. The source document is kept whole.
//!
//! Export starts from a clone of the source document and changes only what the passes
//! changed: nodes are re-emitted from their original `NodeProto` with new inputs, outputs
//! and changed attributes; modified tensors are re-encoded as `raw_data`; declared fixed
//! dimensions that a rewrite changed are updated in place. IR version, opsets, producer,
//! metadata, doc strings, names, dynamic axes and unknown fields pass through untouched.
//! Tensors stored as external data are written inline (the output lives elsewhere, so the
//! relative locations would no longer resolve).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataLocation;
use onnx_protobuf::{AttributeProto, GraphProto, Message, ModelProto, NodeProto, TensorProto, ValueInfoProto};

use crate::error::{Error, Result};
use crate::ir::{Attr, Dim, Id, Model, Op, Value, ValueKind, IMPLICIT_SLOT};
use crate::tensor::{DType, Tensor};

/// The file as read, kept so that export can write back everything the IR does not model.
#[derive(Clone)]
pub struct Document {
    pub proto: ModelProto,
    pub path: PathBuf,
}

/// Reads and imports a model file.
pub fn load(path: &Path) -> Result<(Document, Model)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_bytes(&bytes, path)
}

/// Imports a model from bytes; `path` names it in errors and anchors external data.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<(Document, Model)> {
    check_group_nesting(bytes).map_err(|msg| Error::Parse { path: path.to_path_buf(), msg })?;
    let proto = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| Error::Parse { path: path.to_path_buf(), msg: format!("protobuf decoding failed ({e})") })?;
    let doc = Document { proto, path: path.to_path_buf() };
    let model = import(&doc)?;
    Ok((doc, model))
}

/// Deepest nesting of protobuf groups accepted in one message. ONNX uses no groups at all;
/// the limit only exists because protobuf 3.4 skips unknown groups by unbounded recursion,
/// so a few kilobytes of nested group tags overflow the stack (found by fuzzing).
pub const MAX_GROUP_NESTING: usize = 64;

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= ((x & 0x7f) as u64) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Scans the wire format without recursion (an explicit work list) for nested groups the
/// protobuf parser would recurse into. Every length-delimited field is scanned as if it
/// were a message (the parser descends into those that are; which ones it cannot know
/// without the schema), down to protobuf's own message nesting limit of 100; a region
/// stops being scanned at its first byte that is not valid wire format. Conservative: a
/// bytes field holding 64 nested group tags is refused too.
fn check_group_nesting(bytes: &[u8]) -> Result<(), String> {
    let mut work: Vec<(usize, usize, usize)> = vec![(0, bytes.len(), 0)];
    while let Some((start, end, depth)) = work.pop() {
        let mut pos = start;
        let mut groups = 0usize;
        while pos < end {
            let Some((tag, n)) = varint(&bytes[pos..end]) else { break };
            pos += n;
            if tag >> 3 == 0 {
                break;
            }
            let rest = end - pos;
            match tag & 7 {
                0 => match varint(&bytes[pos..end]) {
                    Some((_, n)) => pos += n,
                    None => break,
                },
                1 if rest >= 8 => pos += 8,
                5 if rest >= 4 => pos += 4,
                2 => {
                    let Some((len, n)) = varint(&bytes[pos..end]) else { break };
                    pos += n;
                    let Some(len) = usize::try_from(len).ok().filter(|&l| l <= end - pos) else { break };
                    if depth < 100 && len > 0 {
                        work.push((pos, pos + len, depth + 1));
                    }
                    pos += len;
                }
                3 => {
                    groups += 1;
                    if groups > MAX_GROUP_NESTING {
                        return Err(format!(
                            "protobuf groups nested more than {MAX_GROUP_NESTING} deep at byte {pos} (ONNX uses no groups)"
                        ));
                    }
                }
                4 if groups > 0 => groups -= 1,
                _ => break,
            }
        }
    }
    Ok(())
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn import(doc: &Document) -> Result<Model> {
    let path = &doc.path;
    let proto = &doc.proto;
    let parse_err = |msg: String| Error::Parse { path: path.clone(), msg };
    if proto.ir_version <= 0 || proto.graph.is_none() {
        return Err(parse_err("no ir_version or no graph: this is not an ONNX model file".into()));
    }
    let graph = proto.graph.get_or_default();
    if graph.node.is_empty() {
        return Err(parse_err("the graph has no nodes".into()));
    }
    let mut model = Model::default();
    for o in &proto.opset_import {
        let domain = if o.domain == "ai.onnx" { String::new() } else { o.domain.clone() };
        model.opsets.insert(domain, o.version);
    }
    let base = base_dir(path);

    // Initializers: weights (floating point) or constants (integers, e.g. shape vectors).
    let init_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    for t in &graph.initializer {
        if t.name.is_empty() {
            return Err(parse_err("an initializer has no name".into()));
        }
        if model.value_id(&t.name).is_some() {
            return Err(Error::Tensor { path: path.clone(), name: t.name.clone(), msg: "defined twice".into() });
        }
        let data = decode_tensor(t, &base, path)?;
        let kind = match &data {
            Some(d) if d.dtype.is_float() => ValueKind::Weight,
            _ => ValueKind::Constant,
        };
        let mut v = Value::new(&t.name, kind);
        if let Some(d) = data {
            v.dtype = Some(d.dtype);
            v.shape = Some(d.dims.clone());
            v.data = Some(d);
        }
        model.add_value(v);
    }
    for i in &graph.input {
        if init_names.contains(i.name.as_str()) {
            continue; // IR < 4 lists initializers as inputs too; they stay weights.
        }
        let mut v = Value::new(&i.name, ValueKind::Input);
        apply_declared(&mut v, i);
        let id = model.add_value(v);
        model.inputs.push(id);
    }

    // Nodes. Values may be referenced before they are produced (unsorted files), so
    // references create placeholders that the producer later claims.
    let mut produced: HashSet<Id> = HashSet::new();
    for (index, node) in graph.node.iter().enumerate() {
        let node_err =
            |msg: String| Error::Node { path: path.clone(), node: node.name.clone(), op: node.op_type.clone(), msg };
        let mut attrs = Vec::with_capacity(node.attribute.len());
        let mut captured: Vec<String> = Vec::new();
        for a in &node.attribute {
            attrs.push((a.name.clone(), decode_attr(a, &base, path).map_err(&node_err)?));
            collect_captures(a, &mut captured);
        }
        let mut op = Op {
            name: node.name.clone(),
            op_type: node.op_type.clone(),
            domain: if node.domain == "ai.onnx" { String::new() } else { node.domain.clone() },
            attrs,
            origin: Some(index),
        };
        let mut inputs = Vec::with_capacity(node.input.len());
        for name in &node.input {
            inputs.push(if name.is_empty() { None } else { Some(value_or_placeholder(&mut model, name)) });
        }
        let mut outputs = Vec::with_capacity(node.output.len());
        for name in &node.output {
            let id = if name.is_empty() {
                model.add_value(Value::new("", ValueKind::Dynamic))
            } else {
                value_or_placeholder(&mut model, name)
            };
            if !name.is_empty() && (!produced.insert(id) || model.value(id).kind != ValueKind::Dynamic) {
                return Err(node_err(format!("output '{name}' is already defined elsewhere in the graph")));
            }
            outputs.push(id);
        }
        // Constant nodes: their tensor becomes the output value's data.
        if op.op_type == "Constant" && op.domain.is_empty() {
            let t = constant_node_tensor(node, &base, path).map_err(node_err)?;
            if let (Some(t), Some(&out)) = (t, outputs.first()) {
                let v = model.value_mut(out);
                v.kind = if t.dtype.is_float() && t.numel() > 1 { ValueKind::Weight } else { ValueKind::Constant };
                v.dtype = Some(t.dtype);
                v.shape = Some(t.dims.clone());
                v.data = Some(t);
                for (_, a) in op.attrs.iter_mut() {
                    *a = Attr::Opaque; // the data lives in the value, once
                }
            }
        }
        let id = model.add_op(op, &inputs, &outputs);
        let mut seen = HashSet::new();
        for (k, name) in captured.iter().enumerate() {
            if let Some(v) = model.value_id(name) {
                if seen.insert(v) {
                    model.graph.add_edge(v, id, IMPLICIT_SLOT + k);
                }
            }
        }
    }
    // Every referenced value must come from somewhere.
    for v in model.values() {
        let val = model.value(v);
        if val.kind == ValueKind::Dynamic && model.producer(v).is_none() && !val.name.is_empty() {
            let (c, _) = model
                .consumers(v)
                .first()
                .copied()
                .ok_or_else(|| parse_err(format!("dangling value '{}'", val.name)))?;
            let op = model.op(c);
            return Err(Error::Node {
                path: path.clone(),
                node: op.name.clone(),
                op: op.op_type.clone(),
                msg: format!("input '{}' is not produced by any node, nor a graph input or initializer", val.name),
            });
        }
    }
    for o in &graph.output {
        let id = model
            .value_id(&o.name)
            .ok_or_else(|| parse_err(format!("graph output '{}' is not produced by any node", o.name)))?;
        apply_declared(model.value_mut(id), o);
        model.outputs.push(id);
    }
    for vi in &graph.value_info {
        if let Some(id) = model.value_id(&vi.name) {
            apply_declared(model.value_mut(id), vi);
        }
    }
    model.topo_order().map_err(parse_err)?;
    Ok(model)
}

fn value_or_placeholder(model: &mut Model, name: &str) -> Id {
    match model.value_id(name) {
        Some(id) => id,
        None => model.add_value(Value::new(name, ValueKind::Dynamic)),
    }
}

/// Names a sub-graph attribute reads from the enclosing scope.
fn collect_captures(a: &AttributeProto, out: &mut Vec<String>) {
    fn walk(g: &GraphProto, out: &mut Vec<String>) {
        let mut local: HashSet<&str> = HashSet::new();
        local.extend(g.input.iter().map(|i| i.name.as_str()));
        local.extend(g.initializer.iter().map(|i| i.name.as_str()));
        for n in &g.node {
            local.extend(n.output.iter().map(String::as_str));
        }
        for n in &g.node {
            for i in &n.input {
                if !i.is_empty() && !local.contains(i.as_str()) {
                    out.push(i.clone());
                }
            }
            for a in &n.attribute {
                collect_captures(a, out);
            }
        }
    }
    if let Some(g) = a.g.as_ref() {
        walk(g, out);
    }
    for g in &a.graphs {
        walk(g, out);
    }
}

fn apply_declared(v: &mut Value, vi: &ValueInfoProto) {
    let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = vi.type_.as_ref().and_then(|t| t.value.as_ref())
    else {
        return;
    };
    if let Some(dt) = DType::from_onnx(tt.elem_type) {
        v.dtype.get_or_insert(dt);
    }
    if let Some(shape) = tt.shape.as_ref() {
        use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
        v.declared = Some(
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(D::DimValue(x)) => Dim::Fixed(*x),
                    Some(D::DimParam(p)) => Dim::Param(p.clone()),
                    _ => Dim::Unknown,
                })
                .collect(),
        );
    }
}

fn decode_attr(a: &AttributeProto, base: &Path, path: &Path) -> Result<Attr, String> {
    Ok(match a.type_.enum_value() {
        Ok(AttributeType::INT) => Attr::Int(a.i),
        Ok(AttributeType::FLOAT) => Attr::Float(a.f),
        Ok(AttributeType::INTS) => Attr::Ints(a.ints.clone()),
        Ok(AttributeType::FLOATS) => Attr::Floats(a.floats.clone()),
        Ok(AttributeType::STRING) => Attr::String(a.s.clone()),
        Ok(AttributeType::STRINGS) => Attr::Strings(a.strings.clone()),
        Ok(AttributeType::TENSOR) => match a.t.as_ref() {
            Some(t) => match decode_tensor(t, base, path).map_err(|e| format!("attribute '{}': {e}", a.name))? {
                Some(t) => Attr::Tensor(t),
                None => Attr::Opaque,
            },
            None => return Err(format!("attribute '{}' is a tensor attribute without a tensor", a.name)),
        },
        _ => Attr::Opaque,
    })
}

fn constant_node_tensor(node: &NodeProto, base: &Path, path: &Path) -> Result<Option<Tensor>, String> {
    let Some(a) = node.attribute.first() else {
        return Err("Constant node has no value attribute".into());
    };
    Ok(match a.name.as_str() {
        "value" => match a.t.as_ref() {
            Some(t) => decode_tensor(t, base, path).map_err(|e| e.to_string())?,
            None => return Err("Constant 'value' attribute holds no tensor".into()),
        },
        "value_float" => Some(Tensor::from_f32(vec![], &[a.f])),
        "value_floats" => Some(Tensor::from_f32(vec![a.floats.len()], &a.floats)),
        "value_int" => Some(Tensor::scalar_i64(a.i)),
        "value_ints" => Some(Tensor::from_i64(vec![a.ints.len()], &a.ints)),
        _ => None, // sparse or string constants stay opaque
    })
}

/// Decodes a TensorProto from any of its encodings. Ok(None) for element types the IR
/// does not represent (strings, 4-bit and 8-bit floats): those stay opaque.
pub fn decode_tensor(t: &TensorProto, base: &Path, path: &Path) -> Result<Option<Tensor>> {
    let err = |msg: String| Error::Tensor { path: path.to_path_buf(), name: t.name.clone(), msg };
    let Some(dtype) = DType::from_onnx(t.data_type) else {
        return Ok(None);
    };
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d} in {:?}", t.dims)));
        }
        dims.push(d as usize);
    }
    let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| err("size overflows".into()))?;
    let nbytes = numel.checked_mul(dtype.size()).ok_or_else(|| err("size overflows".into()))?;
    let external = t.data_location.enum_value() == Ok(DataLocation::EXTERNAL);
    let bytes: Vec<u8> = if external {
        read_external(t, base, nbytes).map_err(err)?
    } else if !t.raw_data.is_empty() || numel == 0 {
        t.raw_data.clone()
    } else {
        // The element count of the typed field must match before anything is allocated:
        // the dims come from the file and may claim terabytes.
        let have = match dtype {
            DType::F32 => t.float_data.len(),
            DType::F64 => t.double_data.len(),
            DType::I64 => t.int64_data.len(),
            DType::U64 | DType::U32 => t.uint64_data.len(),
            _ => t.int32_data.len(),
        };
        if have != numel {
            return Err(err(format!("{} {:?} needs {numel} elements, the file holds {have}", dtype, dims)));
        }
        let mut b = Vec::with_capacity(nbytes);
        match dtype {
            DType::F32 => t.float_data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
            DType::F64 => t.double_data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
            DType::I64 => t.int64_data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
            DType::U64 => t.uint64_data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
            DType::U32 => t.uint64_data.iter().for_each(|x| b.extend_from_slice(&(*x as u32).to_le_bytes())),
            // int32_data carries every type of 32 bits or fewer, f16/bf16 as bit patterns.
            DType::I32 => t.int32_data.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes())),
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => {
                t.int32_data.iter().for_each(|x| b.extend_from_slice(&(*x as u16).to_le_bytes()))
            }
            DType::I8 | DType::U8 | DType::Bool => t.int32_data.iter().for_each(|x| b.push(*x as u8)),
        }
        b
    };
    if bytes.len() != nbytes {
        return Err(err(format!("{} {:?} needs {nbytes} bytes of data, the file holds {}", dtype, dims, bytes.len())));
    }
    Ok(Some(Tensor { dtype, dims, bytes }))
}

fn read_external(t: &TensorProto, base: &Path, nbytes: usize) -> Result<Vec<u8>, String> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key.as_str() {
            "location" => location = Some(kv.value.clone()),
            "offset" => offset = kv.value.parse().map_err(|_| format!("bad external offset '{}'", kv.value))?,
            "length" => {
                length = Some(kv.value.parse::<usize>().map_err(|_| format!("bad external length '{}'", kv.value))?)
            }
            _ => {}
        }
    }
    let location = location.ok_or("external data without a location")?;
    let rel = Path::new(&location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("external data location '{location}' must be a relative path inside the model's folder"));
    }
    let file = base.join(rel);
    if let Some(l) = length {
        if l != nbytes {
            return Err(format!("external data length {l} does not match the tensor's {nbytes} bytes"));
        }
    }
    let mut f = std::fs::File::open(&file).map_err(|e| format!("external data file {}: {e}", file.display()))?;
    let size = f.metadata().map_err(|e| format!("external data file {}: {e}", file.display()))?.len();
    if offset.checked_add(nbytes as u64).is_none_or(|end| end > size) {
        return Err(format!(
            "external data file {} ({size} bytes) is too short for offset {offset} + {nbytes} bytes",
            file.display()
        ));
    }
    f.seek(SeekFrom::Start(offset)).map_err(|e| format!("external data file {}: {e}", file.display()))?;
    let mut buf = vec![0u8; nbytes];
    f.read_exact(&mut buf).map_err(|e| {
        format!("external data file {} is too short for offset {offset} + {nbytes} bytes: {e}", file.display())
    })?;
    Ok(buf)
}

/// Encodes a tensor as raw_data.
pub fn encode_tensor(t: &Tensor, name: &str) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.to_string();
    p.dims = t.dims.iter().map(|&d| d as i64).collect();
    p.data_type = t.dtype.onnx();
    p.raw_data = t.bytes.clone();
    p
}

fn encode_attr(name: &str, a: &Attr) -> Option<AttributeProto> {
    let mut p = AttributeProto::new();
    p.name = name.to_string();
    let ty = match a {
        Attr::Int(i) => {
            p.i = *i;
            AttributeType::INT
        }
        Attr::Float(f) => {
            p.f = *f;
            AttributeType::FLOAT
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AttributeType::INTS
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            AttributeType::FLOATS
        }
        Attr::String(s) => {
            p.s = s.clone();
            AttributeType::STRING
        }
        Attr::Strings(s) => {
            p.strings = s.clone();
            AttributeType::STRINGS
        }
        Attr::Tensor(t) => {
            p.t = Some(encode_tensor(t, "")).into();
            AttributeType::TENSOR
        }
        Attr::Opaque => return None,
    };
    p.type_ = ty.into();
    Some(p)
}

/// Inlines external data of an unmodified tensor so the written model is self-contained.
fn inline(t: &TensorProto, base: &Path, path: &Path) -> Result<TensorProto> {
    if t.data_location.enum_value() != Ok(DataLocation::EXTERNAL) {
        return Ok(t.clone());
    }
    let mut out = t.clone();
    let data = decode_tensor(t, base, path)?.ok_or_else(|| Error::Tensor {
        path: path.to_path_buf(),
        name: t.name.clone(),
        msg: "external data of an unsupported type".into(),
    })?;
    out.raw_data = data.bytes;
    out.external_data.clear();
    out.data_location = DataLocation::DEFAULT.into();
    Ok(out)
}

/// Builds the output document: the source with the IR's changes applied.
pub fn export(doc: &Document, model: &Model) -> Result<ModelProto> {
    let base = base_dir(&doc.path);
    let mut proto = doc.proto.clone();
    let src = doc.proto.graph.get_or_default();
    let graph = proto.graph.mut_or_insert_default();

    // Nodes, in topological order (the source order where the source was sorted).
    let order = model.topo_order().map_err(Error::Other)?;
    let mut nodes = Vec::with_capacity(order.len());
    for op_id in order {
        let op = model.op(op_id);
        let mut node = match op.origin {
            Some(i) => src.node[i].clone(),
            None => {
                let mut n = NodeProto::new();
                n.op_type = op.op_type.clone();
                n.domain = op.domain.clone();
                n
            }
        };
        node.name = op.name.clone();
        node.input = model
            .inputs(op_id)
            .into_iter()
            .map(|v| v.map(|v| model.value(v).name.clone()).unwrap_or_default())
            .collect();
        while node.input.last().is_some_and(|s| s.is_empty()) && op.origin.is_none() {
            node.input.pop();
        }
        node.output = model.outputs(op_id).into_iter().map(|v| model.value(v).name.clone()).collect();
        let is_constant = op.op_type == "Constant" && op.domain.is_empty();
        if is_constant {
            let out = model.value(model.output(op_id, 0));
            if let (true, Some(t)) = (out.data_modified, &out.data) {
                let mut a = AttributeProto::new();
                a.name = "value".into();
                a.type_ = AttributeType::TENSOR.into();
                a.t = Some(encode_tensor(t, "")).into();
                node.attribute = vec![a];
            } else {
                for a in node.attribute.iter_mut() {
                    if let Some(t) = a.t.as_mut() {
                        *t = inline(t, &base, &doc.path)?;
                    }
                }
            }
        } else {
            // Re-encode only attributes whose decoded value changed; keep the rest verbatim.
            let mut seen = HashSet::new();
            for a in node.attribute.iter_mut() {
                seen.insert(a.name.clone());
                let original = decode_attr(a, &base, &doc.path).unwrap_or(Attr::Opaque);
                if let Some(now) = op.attr(&a.name) {
                    if *now != original {
                        if let Some(enc) = encode_attr(&a.name, now) {
                            *a = enc;
                        }
                    }
                }
            }
            node.attribute.retain(|a| op.attr(&a.name).is_some());
            for (name, a) in &op.attrs {
                if !seen.contains(name) {
                    if let Some(enc) = encode_attr(name, a) {
                        node.attribute.push(enc);
                    }
                }
            }
        }
        nodes.push(node);
    }
    graph.node = nodes;

    // Initializers: source order; modified ones re-encoded; removed ones dropped; new
    // static values a pass created appended.
    let mut written = HashSet::new();
    let mut inits = Vec::with_capacity(src.initializer.len());
    for t in &src.initializer {
        let Some(id) = model.value_id(&t.name) else {
            continue;
        };
        let v = model.value(id);
        if model.producer(id).is_some() {
            continue;
        }
        written.insert(id);
        inits.push(match (&v.data, v.data_modified) {
            (Some(d), true) => {
                let mut p = encode_tensor(d, &t.name);
                p.doc_string = t.doc_string.clone();
                p.metadata_props = t.metadata_props.clone();
                p
            }
            _ => inline(t, &base, &doc.path)?,
        });
    }
    for id in model.values() {
        let v = model.value(id);
        if !written.contains(&id) && v.is_static() && model.producer(id).is_none() {
            if let Some(d) = &v.data {
                inits.push(encode_tensor(d, &v.name));
            }
        }
    }
    let live_inits: HashSet<String> = inits.iter().map(|t| t.name.clone()).collect();
    graph.initializer = inits;

    // Declared types: drop entries for removed values, update fixed dims that changed.
    let by_name: HashMap<&str, Id> = model.values().into_iter().map(|id| (model.value(id).name.as_str(), id)).collect();
    let update = |vi: &mut ValueInfoProto| -> bool {
        let Some(&id) = by_name.get(vi.name.as_str()) else {
            return false;
        };
        if let Some(declared) = &model.value(id).declared {
            set_declared_dims(vi, declared);
        }
        true
    };
    graph.input.retain_mut(|vi| {
        let keep = update(vi);
        keep && (model.inputs.iter().any(|&i| model.value(i).name == vi.name) || live_inits.contains(&vi.name))
    });
    graph.output.retain_mut(|vi| update(vi));
    graph.value_info.retain_mut(|vi| update(vi));
    Ok(proto)
}

fn set_declared_dims(vi: &mut ValueInfoProto, declared: &[Dim]) {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
    let Some(onnx_protobuf::type_proto::Value::TensorType(tt)) = vi.type_.as_mut().and_then(|t| t.value.as_mut())
    else {
        return;
    };
    let Some(shape) = tt.shape.as_mut() else {
        return;
    };
    if shape.dim.len() != declared.len() {
        return;
    }
    for (d, want) in shape.dim.iter_mut().zip(declared) {
        if let (Some(D::DimValue(x)), Dim::Fixed(w)) = (&d.value, want) {
            if x != w {
                d.value = Some(D::DimValue(*w));
            }
        }
    }
}

/// Serializes a document.
pub fn to_bytes(proto: &ModelProto) -> Result<Vec<u8>> {
    proto.write_to_bytes().map_err(|e| Error::Other(format!("cannot encode the model: {e}")))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed into
/// place once complete: a reader never sees a half-written file, and a killed process
/// leaves no output behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", path.file_name().and_then(|n| n.to_str()).unwrap_or("out")))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// The same model without `value_info` hints. Executors such as tract take those hints as
/// constraints, and symbolic dimensions in them conflict with concrete input shapes.
pub fn strip_value_info(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut proto = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| Error::Other(format!("cannot decode a model the tool wrote: {e}")))?;
    proto.graph.mut_or_insert_default().value_info.clear();
    to_bytes(&proto)
}

/// The protobuf size limit: a serialized `ModelProto` above 2 GiB cannot be read back by
/// protobuf implementations (onnx, onnxruntime), so larger models keep their tensors in an
/// external data file.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// How `save` places tensor data: inline, or in `OUT.data` beside the model (the ONNX
/// external-data convention: `location`, `offset`, `length` per tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExternalData {
    /// Always write external data (`--external-data`).
    pub force: bool,
    /// Tensors of at least this many bytes go to the data file; smaller ones stay inline
    /// (onnx's `convert_model_to_external_data` default is 1024).
    pub threshold: usize,
    /// Serialized model sizes above which external data is used even when not forced.
    pub limit: u64,
}

impl Default for ExternalData {
    fn default() -> ExternalData {
        ExternalData { force: false, threshold: 1024, limit: PROTOBUF_LIMIT }
    }
}

impl ExternalData {
    /// Whether a model whose inline serialization takes `inline_size` bytes is written with
    /// external data.
    pub fn decide(&self, inline_size: u64) -> bool {
        self.force || inline_size > self.limit
    }
}

/// Offsets in the data file are multiples of this for tensors of at least 1 MiB (pages,
/// so a reader can map them), and of [`SMALL_ALIGN`] below.
pub const PAGE_ALIGN: u64 = 4096;
pub const SMALL_ALIGN: u64 = 64;

/// What [`save`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    /// Size of the model file.
    pub model_bytes: u64,
    /// The data file and its size, when external data was written.
    pub data: Option<(PathBuf, u64)>,
    /// Tensors moved to the data file.
    pub external_tensors: usize,
}

/// The data file of a model written to `path`: `path` + ".data", in the same folder.
pub fn data_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "model.onnx".into());
    name.push(".data");
    path.with_file_name(name)
}

/// Sum of the tensor payloads in a model; with the node and graph overhead a lower bound
/// of its serialized size that costs nothing to compute (compared with `compute_size`,
/// which walks every field).
fn tensor_payload(proto: &ModelProto) -> u64 {
    let t = |t: &TensorProto| -> u64 {
        t.raw_data.len() as u64
            + 4 * (t.float_data.len() + t.int32_data.len()) as u64
            + 8 * (t.double_data.len() + t.int64_data.len() + t.uint64_data.len()) as u64
    };
    let g = proto.graph.get_or_default();
    g.initializer.iter().map(t).sum::<u64>()
        + g.node.iter().flat_map(|n| n.attribute.iter()).filter_map(|a| a.t.as_ref()).map(t).sum::<u64>()
}

/// Writes a model to `path`, with its large tensors in `path.data` when `ext` says so
/// (forced, or the model would exceed the protobuf limit). The inline model is never
/// serialized when external data is used, so no protobuf above 2 GiB is built.
///
/// Both files are written to temporary files in the target folder and synced first; then
/// any previous model at `path` is removed, the data file renamed into place, and the
/// model last. A reader therefore finds no model, or a complete model whose data file is
/// complete and matches it, never a model beside half-written or stale data.
pub fn save(path: &Path, mut proto: ModelProto, ext: &ExternalData) -> Result<Saved> {
    let size = tensor_payload(&proto).max(if ext.force { 0 } else { proto.compute_size() });
    if !ext.decide(size) {
        let bytes = to_bytes(&proto)?;
        write_atomic(path, &bytes)?;
        return Ok(Saved { model_bytes: bytes.len() as u64, data: None, external_tensors: 0 });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let data = data_path(path);
    let location = data.file_name().and_then(|n| n.to_str()).map(str::to_string).ok_or_else(|| {
        Error::Option(format!("{}: the output file name must be valid UTF-8 for external data", path.display()))
    })?;
    let temp = |p: &Path| {
        tempfile::Builder::new()
            .prefix(&format!(".{}.", p.file_name().and_then(|n| n.to_str()).unwrap_or("out")))
            .suffix(".tmp")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))
    };
    let mut data_tmp = temp(&data)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, data_tmp.as_file_mut());
    let mut offset = 0u64;
    let mut moved = 0usize;
    let mut move_out = |t: &mut TensorProto| -> Result<()> {
        if t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) {
            return Err(Error::Other(format!("tensor '{}' still refers to external data when saving", t.name)));
        }
        let bytes = if !t.raw_data.is_empty() {
            std::mem::take(&mut t.raw_data)
        } else {
            match decode_tensor(t, Path::new(""), path)? {
                Some(d) if !d.bytes.is_empty() => d.bytes,
                _ => return Ok(()), // strings and exotic types stay inline
            }
        };
        if bytes.len() < ext.threshold {
            t.raw_data = bytes;
            t.float_data.clear();
            t.int32_data.clear();
            t.int64_data.clear();
            t.double_data.clear();
            t.uint64_data.clear();
            return Ok(());
        }
        let align = if bytes.len() >= 1 << 20 { PAGE_ALIGN } else { SMALL_ALIGN };
        let pad = offset.next_multiple_of(align) - offset;
        w.write_all(&vec![0u8; pad as usize]).map_err(|e| Error::io(&data, e))?;
        offset += pad;
        w.write_all(&bytes).map_err(|e| Error::io(&data, e))?;
        let entry = |k: &str, v: String| {
            let mut e = onnx_protobuf::StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            e
        };
        t.external_data = vec![
            entry("location", location.clone()),
            entry("offset", offset.to_string()),
            entry("length", bytes.len().to_string()),
        ];
        t.data_location = DataLocation::EXTERNAL.into();
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.double_data.clear();
        t.uint64_data.clear();
        offset += bytes.len() as u64;
        moved += 1;
        Ok(())
    };
    let graph = proto.graph.mut_or_insert_default();
    for t in graph.initializer.iter_mut() {
        move_out(t)?;
    }
    for n in graph.node.iter_mut() {
        for a in n.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                move_out(t)?;
            }
        }
    }
    w.flush().map_err(|e| Error::io(&data, e))?;
    drop(w);
    data_tmp.as_file().sync_all().map_err(|e| Error::io(&data, e))?;
    let bytes = to_bytes(&proto)?;
    if bytes.len() as u64 > PROTOBUF_LIMIT {
        return Err(Error::Other(format!(
            "{}: the model is {} bytes even with its tensors in {location}",
            path.display(),
            bytes.len()
        )));
    }
    let mut model_tmp = temp(path)?;
    model_tmp.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    model_tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // Commit: old model out of the way, then the data, then the model.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    data_tmp.persist(&data).map_err(|e| Error::io(&data, e.error))?;
    model_tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all(); // make the renames durable where the platform allows
    }
    Ok(Saved { model_bytes: bytes.len() as u64, data: Some((data, offset)), external_tensors: moved })
}
