#!/usr/bin/env python3
"""Independent check of a pruned model with onnx + onnxruntime.

Usage:
  ort_check.py SLIM MASKED [--calib FILE.npz] [--samples N]
               [--rtol 1e-4] [--atol 1e-4] [--seed 0] [--opt-level all]

SLIM   the physically pruned model written by plprune-onnx
MASKED the dense model with the pruned units masked to zero (the reference)

Steps:
  1. onnx.checker.check_model(onnx.load(SLIM), full_check=True)
  2. one batch of inputs: the first N samples (axis 0) of each model input in the calib
     .npz (keys are input names; other keys are ignored), or synthetic inputs made from
     each input's declared type: symbolic dims -> N (default 2) for the first dim and 8
     for the others; floats uniform in [-1, 1]; integer inputs all ones when the name
     contains 'mask', otherwise random integers in [0, 2).
  3. run both with onnxruntime (CPUExecutionProvider, intra_op_num_threads=2) and
     compare every output: |slim - masked| <= atol * max(1, max|masked|) + rtol * |masked|.
     --opt-level basic|extended|all picks onnxruntime's graph optimization level (default
     all). Extended fuses DequantizeLinear(int8) + MatMul into MatMulNBits, which
     approximates (it quantizes activations), so two equal models can differ there.
     Also prints the parameter count of both models (initializer elements plus the
     elements of floating-point Constant-node tensors).

Exit status: 0 when the checker and every comparison pass, 1 on any failure (an
unexpected exception also ends with status 1 and its traceback), 2 on usage errors.
"""

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto

FLOAT_TYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
}
INT_TYPES = {
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
}
FLOAT_ELEM_TYPES = set(FLOAT_TYPES) | {TensorProto.BFLOAT16}

DEFAULT_CALIB_SAMPLES = 32
DEFAULT_SYNTHETIC_BATCH = 2
OTHER_SYMBOLIC_DIM = 8


def usage_error(parser, msg):
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="ort_check.py",
        description="Check a pruned (SLIM) ONNX model against its masked dense reference "
        "(MASKED) with the onnx checker and onnxruntime.",
    )
    p.add_argument("slim", metavar="SLIM", help="pruned model (.onnx)")
    p.add_argument("masked", metavar="MASKED", help="masked dense reference model (.onnx)")
    p.add_argument("--calib", metavar="FILE.npz", help="inputs, keys named after the model inputs")
    p.add_argument("--samples", type=int, default=None,
                   help=f"number of samples (default: {DEFAULT_CALIB_SAMPLES} with --calib, "
                   f"batch {DEFAULT_SYNTHETIC_BATCH} for synthetic inputs)")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt-level", choices=["basic", "extended", "all"], default="all",
                   help="onnxruntime graph optimization level (default all)")
    args = p.parse_args(argv)  # exits 2 on bad arguments
    for label, path in (("SLIM", args.slim), ("MASKED", args.masked), ("--calib", args.calib)):
        if path is not None and not os.path.isfile(path):
            usage_error(p, f"{label}: no such file: {path}")
    if args.samples is not None and args.samples < 1:
        usage_error(p, "--samples must be at least 1")
    if not (args.rtol >= 0 and args.atol >= 0):
        usage_error(p, "--rtol and --atol must be non-negative")
    return args


# ----------------------------------------------------------------------------- parameters


def _tensor_elements(t):
    n = 1
    for d in t.dims:
        n *= d
    return n


def _graph_params(graph):
    total = 0
    for t in graph.initializer:
        total += _tensor_elements(t)
    for st in graph.sparse_initializer:
        total += _tensor_elements(st.values)
    for node in graph.node:
        for a in node.attribute:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                if a.name == "value" and a.t.data_type in FLOAT_ELEM_TYPES:
                    total += _tensor_elements(a.t)
                elif a.name == "sparse_value" and a.sparse_tensor.values.data_type in FLOAT_ELEM_TYPES:
                    total += _tensor_elements(a.sparse_tensor.values)
                elif a.name == "value_float":
                    total += 1
                elif a.name == "value_floats":
                    total += len(a.floats)
            # subgraphs (If / Loop / Scan bodies)
            if a.type == onnx.AttributeProto.GRAPH:
                total += _graph_params(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    total += _graph_params(g)
    return total


def count_params(path):
    # Only the dims are needed: do not read external data.
    return _graph_params(onnx.load(path, load_external_data=False).graph)


# ----------------------------------------------------------------------------- inputs


def graph_inputs(model):
    """Real inputs of the main graph (older exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def np_dtype(vi):
    elem = vi.type.tensor_type.elem_type
    if elem in FLOAT_TYPES:
        return np.dtype(FLOAT_TYPES[elem])
    if elem in INT_TYPES:
        return np.dtype(INT_TYPES[elem])
    if elem == TensorProto.BOOL:
        return np.dtype(np.bool_)
    raise ValueError(
        f"input {vi.name!r}: unsupported element type "
        f"{TensorProto.DataType.Name(elem) if elem else 'unset (not a tensor?)'}"
    )


def synthetic_inputs(inputs, batch, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            raise ValueError(f"input {vi.name!r}: no tensor shape declared; use --calib")
        shape = []
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:  # symbolic or unknown
                shape.append(batch if k == 0 else OTHER_SYMBOLIC_DIM)
        dt = np_dtype(vi)
        if dt.kind == "f":
            arr = rng.uniform(-1.0, 1.0, size=shape).astype(dt)
        elif dt.kind in "iu":
            if "mask" in vi.name.lower():
                arr = np.ones(shape, dtype=dt)
            else:
                arr = rng.integers(0, 2, size=shape).astype(dt)
        else:  # bool
            arr = np.ones(shape, dtype=dt)
        feeds[vi.name] = arr
    return feeds


def calib_inputs(inputs, calib_path, n):
    feeds = {}
    with np.load(calib_path) as data:
        missing = [vi.name for vi in inputs if vi.name not in data.files]
        if missing:
            raise KeyError(
                f"{calib_path}: no array for model input(s) {missing} "
                f"(the file holds {sorted(data.files)})"
            )
        for vi in inputs:
            arr = data[vi.name]
            if arr.ndim == 0:
                raise ValueError(f"{calib_path}: {vi.name!r} is a scalar, need a batch axis")
            arr = arr[:n]
            dt = np_dtype(vi)
            if arr.dtype != dt:
                print(f"note: casting calib {vi.name!r} from {arr.dtype} to {dt}")
                arr = arr.astype(dt)
            feeds[vi.name] = np.ascontiguousarray(arr)
    return feeds


# ----------------------------------------------------------------------------- running


OPT_LEVEL = "all"


def make_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[OPT_LEVEL]
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_model(label, path, feeds):
    try:
        sess = make_session(path)
        names = [o.name for o in sess.get_outputs()]
        needed = [i.name for i in sess.get_inputs()]
        missing = [n for n in needed if n not in feeds]
        if missing:
            raise KeyError(f"{label} needs input(s) {missing} that the other model does not have")
        outs = sess.run(names, {n: feeds[n] for n in needed})
    except Exception:
        print(f"FAIL: onnxruntime could not run {label} ({path}):", file=sys.stderr)
        raise
    return dict(zip(names, outs)), names


def compare(name, a, b, rtol, atol):
    """a = SLIM output, b = MASKED output. Returns (ok, message)."""
    if a.shape != b.shape:
        return False, f"shape {list(a.shape)} (SLIM) != {list(b.shape)} (MASKED)"
    if a.dtype != b.dtype:
        return False, f"dtype {a.dtype} (SLIM) != {b.dtype} (MASKED)"
    if a.size == 0:
        return True, f"shape {list(a.shape)} empty"
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if not np.array_equal(nan_a, nan_b):
        return False, (f"shape {list(a.shape)}: NaN in different places "
                       f"(SLIM {int(nan_a.sum())}, MASKED {int(nan_b.sum())})")
    ok_vals = ~nan_a
    a64, b64 = a64[ok_vals], b64[ok_vals]
    if a64.size == 0:
        return True, f"shape {list(a.shape)}: all NaN in both"
    inf_b = np.isinf(b64) | np.isinf(a64)
    if not np.array_equal(a64[inf_b], b64[inf_b]):
        return False, f"shape {list(a.shape)}: infinities differ"
    a64, b64 = a64[~inf_b], b64[~inf_b]
    if a64.size == 0:
        return True, f"shape {list(a.shape)}: all infinite, equal"
    diff = np.abs(a64 - b64)
    max_b = float(np.max(np.abs(b64)))
    tol = atol * max(1.0, max_b) + rtol * np.abs(b64)
    bad = diff > tol
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, diff / np.where(tol > 0, tol, 1.0), np.where(diff > 0, np.inf, 0.0))
    worst = float(np.max(ratio))
    msg = (f"shape {list(a.shape)} max_abs_diff {float(diff.max()):.3e} max|masked| {max_b:.3e} "
           f"worst diff/tol {worst:.3f}")
    if bad.any():
        msg += f" ({int(bad.sum())}/{bad.size} elements out of tolerance)"
    return not bad.any(), msg


def main(argv):
    sys.stdout.reconfigure(line_buffering=True)  # keep stdout and stderr in order
    args = parse_args(argv)
    global OPT_LEVEL
    OPT_LEVEL = args.opt_level
    ok = True

    # (i) structural validity of the pruned model
    slim_model = onnx.load(args.slim)
    try:
        if slim_model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(slim_model, full_check=True)
        else:  # over protobuf's 2 GB limit: let the checker read the file itself
            onnx.checker.check_model(args.slim, full_check=True)
        print(f"checker: PASS ({args.slim})")
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        print(f"checker: FAIL ({args.slim}): {type(e).__name__}: {e}")
        ok = False

    # parameter counts
    p_slim, p_masked = count_params(args.slim), count_params(args.masked)
    ratio = f" ({100.0 * p_slim / p_masked:.2f}% of MASKED)" if p_masked else ""
    print(f"params: SLIM {p_slim}  MASKED {p_masked}{ratio}")

    # (ii) inputs, from the SLIM model's interface
    inputs = graph_inputs(slim_model)
    del slim_model
    def interface(vis):
        return sorted((i.name, TensorProto.DataType.Name(i.type.tensor_type.elem_type))
                      for i in vis)

    slim_iface = interface(inputs)
    masked_iface = interface(graph_inputs(onnx.load(args.masked, load_external_data=False)))
    if slim_iface != masked_iface:
        print(f"inputs: FAIL: SLIM inputs {slim_iface} != MASKED inputs {masked_iface}")
        print("RESULT: FAIL: the two models do not have the same inputs")
        return 1
    if args.calib:
        n = args.samples if args.samples is not None else DEFAULT_CALIB_SAMPLES
        feeds = calib_inputs(inputs, args.calib, n)
        source = f"calib {args.calib}"
    else:
        n = args.samples if args.samples is not None else DEFAULT_SYNTHETIC_BATCH
        feeds = synthetic_inputs(inputs, n, args.seed)
        source = f"synthetic, seed {args.seed}"
    desc = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in feeds.items())
    print(f"inputs ({source}): {desc}")

    # (iii) run both and compare every output
    slim_out, slim_names = run_model("SLIM", args.slim, feeds)
    masked_out, masked_names = run_model("MASKED", args.masked, feeds)
    names = masked_names + [n for n in slim_names if n not in masked_out]
    for name in names:
        if name not in slim_out:
            print(f"output {name}: FAIL (missing from SLIM)")
            ok = False
            continue
        if name not in masked_out:
            print(f"output {name}: FAIL (not an output of MASKED)")
            ok = False
            continue
        good, msg = compare(name, slim_out[name], masked_out[name], args.rtol, args.atol)
        print(f"output {name}: {msg} {'PASS' if good else 'FAIL'}")
        ok = ok and good

    if ok:
        print(f"RESULT: PASS (rtol {args.rtol:g}, atol {args.atol:g})")
        return 0
    print(f"RESULT: FAIL: {args.slim} does not pass against {args.masked} "
          f"(rtol {args.rtol:g}, atol {args.atol:g}); see the FAIL lines above")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
