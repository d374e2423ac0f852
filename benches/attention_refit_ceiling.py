"""How far can a least-squares refit bring back a MiniLM-L6 attention block that keeps only a
few heads? Measures the block's relative output error (attention output before the residual
Add, real tokens only) on calibration sentences 224-256 after a ridge refit fit on sentences
0-224, for:

  a) Wo alone on the kept heads' contexts (what `--recover lsq` does);
  b) V and O of each kept head together: the head's output is P_h X (Wv_h Wo_h), linear in the
     product M_h, so M_h is refit as a full d x d matrix ("full rank", which the model's head
     size cannot hold), and as a rank-d_h matrix (alternating per head, reduced-rank
     regression), which it can.

The block's input X is the dense model's (exact for layer 0; for later layers it is the best
case, since the pruned model's X also carries the earlier layers' error).

Usage: python3 benches/attention_refit_ceiling.py LAYER KEPT_HEADS   e.g.  0 6   or  1 3,10
(needs onnx, onnxruntime, numpy; ../shared/models/minilm-l6)
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
M = os.path.join(HERE, "..", "..", "shared", "models", "minilm-l6")
D, DH, FIT = 384, 32, 224


def main():
    layer = int(sys.argv[1])
    keep = [int(h) for h in sys.argv[2].split(",")]
    m = onnx.load(os.path.join(M, "model.onnx"))
    w = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    pre = f"/bert/encoder/layer.{layer}/attention/"
    x_name = ("/bert/embeddings/LayerNorm/LayerNormalization_output_0" if layer == 0
              else f"/bert/encoder/layer.{layer - 1}/output/LayerNorm/LayerNormalization_output_0")
    names = [x_name, pre + "self/Softmax_output_0", pre + "self/Reshape_3_output_0",
             pre + "output/dense/MatMul_output_0"]
    for n in m.graph.node:
        if n.name == pre + "output/dense/MatMul":
            wo = w[n.input[1]]
        if n.name == pre + "self/value/MatMul":
            wv = w[n.input[1]]
    for name in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    data = dict(np.load(os.path.join(M, "calib.npz")))
    x, probs, ctx, y = sess.run(names, data)
    n, seq = data["attention_mask"].shape
    live = data["attention_mask"].reshape(-1).astype(bool)
    fit_rows = np.repeat(np.arange(n) < FIT, seq) & live
    eval_rows = np.repeat(np.arange(n) >= FIT, seq) & live
    target = y.reshape(-1, D).astype(np.float64)
    ones = np.ones((target.shape[0], 1))

    def rel(pred, rows):
        return np.linalg.norm(pred[rows] - target[rows]) / np.linalg.norm(target[rows])

    def ridge(a, b, lam, w0):
        g = a.T @ a
        reg = lam * np.mean(np.diag(g))
        return np.linalg.solve(g + reg * np.eye(g.shape[0]), a.T @ b + reg * w0)

    cols = np.concatenate([np.arange(h * DH, (h + 1) * DH) for h in keep])
    a = np.hstack([ctx.reshape(-1, D)[:, cols], ones]).astype(np.float64)
    w0 = np.vstack([wo[cols], np.zeros((1, D))])
    print(f"layer {layer}, kept heads {keep}: held-out block error")
    print(f"  masked, no refit              {rel(a @ w0, eval_rows):.3f}")
    for lam in (0.01, 0.1):
        wa = ridge(a[fit_rows], target[fit_rows], lam, w0)
        print(f"  a) Wo refit, ridge {lam:<4}       {rel(a @ wa, eval_rows):.3f}")
    px = [np.einsum("bqk,bkc->bqc", probs[:, h], x).reshape(-1, D) for h in keep]
    b = np.hstack(px + [ones]).astype(np.float64)
    m0 = np.vstack([wv[:, h * DH:(h + 1) * DH] @ wo[h * DH:(h + 1) * DH] for h in keep] + [np.zeros((1, D))])
    for lam in (0.01, 0.1):
        mb = ridge(b[fit_rows], target[fit_rows], lam, m0)
        mr = m0.copy()
        for _ in range(6):
            for i in range(len(keep)):
                blk = slice(i * D, (i + 1) * D)
                rest = target - (b @ mr - b[:, blk] @ mr[blk])
                ah = b[fit_rows][:, blk]
                mh = ridge(ah, rest[fit_rows], lam, mr[blk])
                _, _, vt = np.linalg.svd(ah @ mh, full_matrices=False)
                mr[blk] = mh @ vt[:DH].T @ vt[:DH]
            mr[-1] = (target - b[:, :-1] @ mr[:-1])[fit_rows].mean(0)
        print(f"  b) V+O full rank, ridge {lam:<4}  {rel(b @ mb, eval_rows):.3f}")
        print(f"  b) V+O rank {DH}, ridge {lam:<4}    {rel(b @ mr, eval_rows):.3f}")


if __name__ == "__main__":
    main()
