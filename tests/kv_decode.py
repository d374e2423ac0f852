#!/usr/bin/env python3
"""Decoding with a narrowed KV cache, checked in onnxruntime.

Usage:
  kv_decode.py SLIM MASKED REPORT.json CALIB.npz [--dense DENSE] [--steps 3]
               [--cache present:past]

SLIM    a model plprune-onnx pruned heads of, whose KV-cache inputs and outputs it narrowed
MASKED  the dense model with those heads masked (--masked-output): the reference
REPORT  the run's JSON report; its "interface" gives, per narrowed input and output, the
        axis and the dense indices kept
CALIB   the first step's inputs (the prompt and a past cache of the dense model's shape)

Runs the first step on both models (the slim one gets each narrowed input's kept entries),
then --steps decoding steps in which each model is fed its own present outputs as the next
past inputs (an output's name with the --cache prefix replaced is the input's: present_key.l0
-> past_key.l0; present.0.key -> past_key_values.0.key with --cache present:past_key_values).
The next step's other inputs: 'input_ids' is the masked model's greedy token from its first
output, 'attention_mask' grows by a column of ones, float inputs are new uniform samples of
sequence length 1. Every output of the slim model must equal the masked one's (narrowed) to
--atol, and the cache the slim model returns must have the narrowed shape.

Prints "max_diff D moved M": the largest difference over every output of every step, and
(with --dense) how far masking moved the first step's first output from the dense model's.
Exit status 0 when every step matches, 1 otherwise.
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slim")
    ap.add_argument("masked")
    ap.add_argument("report")
    ap.add_argument("calib")
    ap.add_argument("--dense")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache", default="present:past")
    ap.add_argument("--atol", type=float, default=1e-5)
    a = ap.parse_args()
    out_prefix, in_prefix = a.cache.split(":")
    interface = json.load(open(a.report))["interface"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = {k: ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for k, p in
            (("masked", a.masked), ("slim", a.slim))}
    names = [o.name for o in sess["masked"].get_outputs()]
    data = np.load(a.calib)
    feed = {i.name: data[i.name] for i in sess["masked"].get_inputs()}
    rng = np.random.default_rng(0)

    def narrow(name, x):
        n = interface.get(name)
        return np.take(x, n["kept"], axis=n["axis"]) if n else x

    worst, moved = 0.0, None
    if a.dense:
        d = ort.InferenceSession(a.dense, so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        moved = float(np.abs(d - sess["masked"].run(None, feed)[0]).max())
    feeds = {"masked": feed, "slim": {k: narrow(k, v) for k, v in feed.items()}}
    for step in range(a.steps + 1):
        outs = {k: dict(zip(names, sess[k].run(None, feeds[k]))) for k in sess}
        for n in names:
            want, got = narrow(n, outs["masked"][n]), outs["slim"][n]
            if want.shape != got.shape:
                print(f"step {step}: output {n} has shape {got.shape}, want {want.shape}")
                return 1
            worst = max(worst, float(np.abs(want.astype(np.float64) - got).max()))
        nxt = {}
        for i in sess["masked"].get_inputs():
            x = feeds["masked"][i.name]
            if i.name.startswith(in_prefix) and out_prefix + i.name[len(in_prefix):] in names:
                continue
            if i.name == "input_ids":
                nxt[i.name] = outs["masked"][names[0]][:, -1].argmax(-1)[:, None].astype(x.dtype)
            elif i.name == "attention_mask":
                nxt[i.name] = np.concatenate([x, np.ones((x.shape[0], 1), x.dtype)], axis=1)
            else:
                nxt[i.name] = rng.uniform(-1, 1, (x.shape[0], 1) + x.shape[2:]).astype(x.dtype)
        feeds = {k: dict(nxt) for k in sess}
        for n in names:
            if n.startswith(out_prefix):
                for k in sess:
                    feeds[k][in_prefix + n[len(out_prefix):]] = outs[k][n]
    print(f"max_diff {worst:.3e} moved {moved if moved is not None else float('nan'):.3e}")
    return 0 if worst <= a.atol else 1


if __name__ == "__main__":
    sys.exit(main())
