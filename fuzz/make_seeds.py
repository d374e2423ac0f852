#!/usr/bin/env python3
"""Writes the seed corpus of both fuzz targets: every small fixture, plus mutations of them
that reach the error paths (truncated bytes, lying dims, negative/huge attributes, a
dangling input). Deterministic; run from fuzz/: python3 make_seeds.py"""
import os
import onnx
from onnx import helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
seeds = {}
for name in sorted(os.listdir(FIX)):
    if not name.endswith(".onnx") or name.startswith("external"):
        continue
    raw = open(os.path.join(FIX, name), "rb").read()
    stem = name[:-5]
    seeds[stem] = raw
    seeds[stem + "-trunc"] = raw[: len(raw) * 3 // 5]
    m = onnx.load_from_string(raw)
    g = m.graph
    if g.initializer:
        t = g.initializer[0]
        if t.dims:
            t.dims[0] = t.dims[0] * (1 << 20)  # dims no longer match the data
        seeds[stem + "-bigdim"] = m.SerializeToString()
    m = onnx.load_from_string(raw)
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[0] = -a.ints[0] - 3
            if a.type == onnx.AttributeProto.INT:
                a.i = (1 << 40) if a.i >= 0 else -(1 << 40)
    seeds[stem + "-attrs"] = m.SerializeToString()
    m = onnx.load_from_string(raw)
    if len(m.graph.node) > 1:
        m.graph.node[-1].input[0] = "nowhere"
        seeds[stem + "-dangling"] = m.SerializeToString()
    m = onnx.load_from_string(raw)
    for vi in list(m.graph.input):
        for d in vi.type.tensor_type.shape.dim:
            d.dim_value = 1 << 31
    seeds[stem + "-hugeinput"] = m.SerializeToString()

for target in ["load", "discover_rewrite"]:
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for k, v in seeds.items():
        with open(os.path.join(d, "seed-" + k), "wb") as f:
            f.write(v)
print(len(seeds), "seeds per target")
