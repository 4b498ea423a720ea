"""Time one 64x64 toy-world image with 25 DDIM steps (guidance 7.5) on CPU. Bar: <= 1 s.

    python bench/toyworld.py [--runs 7] [--threads N]

Prints the median of several runs and, as a same-run baseline, the time of the bare UNet calls
(50 forwards at batch 2) so the pipeline's overhead shows as a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--model", default=None, help="toy pipeline folder (default assets/models/toy-sd)")
    args = ap.parse_args(argv)

    import torch

    from studio.toyworld.check import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    pipe = load_pipeline(args.model)
    load_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    pipe("a red circle", num_inference_steps=args.steps, guidance_scale=7.5, generator=g)  # warm-up
    times = []
    for i in range(args.runs):
        g = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        pipe("a red circle on the left and a blue square on the right", num_inference_steps=args.steps,
             guidance_scale=7.5, generator=g)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)

    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        ids = tok(["", "a red circle"], padding="max_length", max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        emb = te(ids)[0]
        side = pipe.unet.config.sample_size
        x = torch.randn(2, pipe.unet.config.in_channels, side, side)
        base = []
        for _ in range(3):
            t = time.perf_counter()
            for s in range(args.steps):
                unet(x, 999 - 40 * s, encoder_hidden_states=emb)
            base.append(time.perf_counter() - t)
    base_med = statistics.median(base)
    print(f"load {load_s:.2f} s; torch threads {torch.get_num_threads()}")
    print(f"bare UNet calls ({args.steps} x batch 2): {base_med * 1000:.0f} ms (baseline)")
    print(f"one 64x64 image, {args.steps} DDIM steps, guidance 7.5: median {med * 1000:.0f} ms of {args.runs} "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}); {med / base_med:.2f}x baseline")
    ok = med <= 1.0
    print(f"bar <= 1 s: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
