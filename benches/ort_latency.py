#!/usr/bin/env python3
"""Inference latency of pruned models against their dense source in onnxruntime, as ratios
measured in the same run (a benchmark, never a test).

    python3 benches/ort_latency.py DENSE.onnx PRUNED.onnx [PRUNED2.onnx ...] \
        --calib data.npz [--batches 1 32] [--threads 2] [--reps 20] [--json]

Inputs come from the calibration file (its first b samples; arrays named like the model's
inputs). Each model gets its own session (intra-op threads = --threads, inter-op 1,
default graph optimisations); after warm-up runs, dense and pruned run alternately and the
median of --reps runs of each is reported per batch size, with the speed-up dense / pruned.
With --json the last line is one JSON object with every measurement (the criteria benchmark
reads it).
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feeds(sess, data, b):
    out = {}
    for i in sess.get_inputs():
        if i.name not in data:
            raise SystemExit(f"calibration file has no array '{i.name}'")
        a = data[i.name]
        if a.shape[0] < b:
            reps = -(-b // a.shape[0])
            a = np.concatenate([a] * reps)
        out[i.name] = a[:b]
    return out


def medians_ms(a, fa, b, fb, reps):
    """Median latency of two sessions, run alternately (a, b, a, b, ...) after warm-up, so
    that the host's load changes hit both alike."""
    for _ in range(3):
        a.run(None, fa)
        b.run(None, fb)
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        a.run(None, fa)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b.run(None, fb)
        tb.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dense")
    ap.add_argument("pruned", nargs="+")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    data = dict(np.load(a.calib))
    dense = session(a.dense, a.threads)
    print(f"onnxruntime {ort.__version__}, {a.threads} threads, median of {a.reps}")
    print(f"{'model':<40} {'batch':>5} {'ms':>10} {'dense ms':>10} {'speed-up':>9}")
    rows = []
    for b in a.batches:
        fd = feeds(dense, data, b)
        for p in a.pruned:
            s = session(p, a.threads)
            d_ms, p_ms = medians_ms(dense, fd, s, feeds(s, data, b), a.reps)
            print(f"{p[-40:]:<40} {b:>5} {p_ms:>10.2f} {d_ms:>10.2f} {d_ms / p_ms:>8.2f}x")
            rows.append({"model": p, "batch": b, "ms": p_ms, "dense_ms": d_ms, "speedup": d_ms / p_ms})
    if a.json:
        print(json.dumps({"onnxruntime": ort.__version__, "threads": a.threads, "reps": a.reps, "rows": rows}))


if __name__ == "__main__":
    main()
