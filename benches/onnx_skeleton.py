"""An ONNX model's graph without its weights, and the weights drawn again, for machines a
model cannot be copied to (the device machine takes 64 MiB per call; MiniLM-L6 is 90 MB).
Speed does not depend on the weights' values; GPU-vs-CPU agreement checks on such a model
compare the two backends on the same (random) weights.

    python3 benches/onnx_skeleton.py strip model.onnx skeleton.onnx
        every float initializer of more than 256 elements keeps its name, type and dims
        and loses its data (a few KB remain for MiniLM-L6)
    python3 benches/onnx_skeleton.py fill skeleton.onnx model.onnx [--seed 0]
        those initializers are drawn again: 1-D LayerNorm scales 1, other 1-D 0, the rest
        normal with standard deviation 0.02 (BERT's initialisation), seeded
"""
import argparse

import numpy as np
import onnx
from onnx import numpy_helper

LIMIT = 256


def is_float(t):
    return t.data_type == onnx.TensorProto.FLOAT


def numel(t):
    return int(np.prod(t.dims)) if len(t.dims) else 1


def strip(src, dst):
    m = onnx.load(src)
    n = 0
    for t in m.graph.initializer:
        if is_float(t) and numel(t) > LIMIT:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.doc_string = "plprune-skeleton"
            n += 1
    onnx.save(m, dst)
    print(f"{src}: {n} initializers stripped -> {dst}")


def fill(src, dst, seed):
    m = onnx.load(src)
    rng = np.random.default_rng(seed)
    n = 0
    for t in m.graph.initializer:
        if t.doc_string != "plprune-skeleton":
            continue
        dims = tuple(t.dims)
        if len(dims) == 1:
            v = np.ones(dims, np.float32) if "LayerNorm.weight" in t.name else np.zeros(dims, np.float32)
        else:
            v = (rng.standard_normal(dims) * 0.02).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(v, t.name))
        n += 1
    onnx.save(m, dst)
    print(f"{src}: {n} initializers drawn (seed {seed}) -> {dst}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["strip", "fill"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    strip(a.src, a.dst) if a.mode == "strip" else fill(a.src, a.dst, a.seed)


if __name__ == "__main__":
    main()
