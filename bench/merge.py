"""Benchmark the weight-space merges on three SD1.5-shaped rank-8 LoRAs (random weights, CPU).

Prints, per method, the median wall time over ``--runs`` merges and the relative ΔW error
against ``cat`` (the exact sum) at k = r, summed over all modules:
    err = sqrt(Σ_modules ‖ΔW_method − ΔW_cat‖²) / sqrt(Σ_modules ‖ΔW_cat‖²)

    .venv/bin/python bench/merge.py [--runs 5] [--rank 8] [--methods lego,svd,...] [--threads N]

Note: LEGO with its default magnitude="mean" *averages* clusters, so its error against the summed
``cat`` is large by design; the lego(sum) and lego(fit) rows measure how well the clustered
rank-k adapter can reproduce the sum.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.adapters.adapter import Adapter, LoraDelta  # noqa: E402
from studio.adapters.merge import merge_adapters  # noqa: E402


def sd15_attention_shapes() -> dict[str, tuple[int, int]]:
    """The 128 attention projections of the SD1.5 UNet (out, in), diffusers naming."""
    shapes: dict[str, tuple[int, int]] = {}
    blocks = [(f"down_blocks.{i}.attentions.{j}", d) for i, d in enumerate((320, 640, 1280)) for j in range(2)]
    blocks += [("mid_block.attentions.0", 1280)]
    blocks += [(f"up_blocks.{i}.attentions.{j}", d) for i, d in zip((1, 2, 3), (1280, 640, 320)) for j in range(3)]
    for prefix, d in blocks:
        for attn, ctx in (("attn1", d), ("attn2", 768)):
            base = f"unet.{prefix}.transformer_blocks.0.{attn}"
            shapes[f"{base}.to_q"] = (d, d)
            shapes[f"{base}.to_k"] = (d, ctx)
            shapes[f"{base}.to_v"] = (d, ctx)
            shapes[f"{base}.to_out.0"] = (d, d)
    return shapes


def random_lora(name: str, rank: int, seed: int, alpha: float | None) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        path: LoraDelta(torch.randn(rank, n, generator=g) / math.sqrt(n), torch.randn(m, rank, generator=g) * 0.05, alpha)
        for path, (m, n) in sd15_attention_shapes().items()
    }
    return Adapter(name, layers, arch="sd1", sha256=f"{seed:064x}")


def rel_error(merged: Adapter, ref: Adapter) -> float:
    num = den = 0.0
    for path, d in ref.layers.items():
        r = d.delta()
        m = merged.layers[path].delta() if path in merged.layers else torch.zeros_like(r)
        num += float((m - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den)


CONFIGS = {
    "cat": ("cat", {}),
    "lego": ("lego", {}),
    "lego(sum)": ("lego", {"magnitude": "sum", "reweight": False}),
    "lego(fit)": ("lego", {"fit": True}),
    "linear": ("linear", {}),
    "svd": ("svd", {}),
    "ties_svd": ("ties_svd", {}),
    "dare_ties_svd": ("dare_ties_svd", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--methods", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    adapters = [random_lora(f"lora{i}", args.rank, seed=i, alpha=args.rank / 2) for i in range(3)]
    weights = [1.0, 0.8, 0.6]
    ref = merge_adapters(adapters, weights, "cat")
    print(f"3 SD1.5-shaped rank-{args.rank} LoRAs, {len(ref.layers)} modules, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.runs} runs")
    print(f"{'method':<15}{'median s':>10}{'rel ΔW err vs cat':>20}")
    for label in args.methods.split(","):
        method, opts = CONFIGS[label]
        rank = None if method in ("cat", "linear") else args.rank
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            merged = merge_adapters(adapters, weights, method, rank, **opts)
            times.append(time.perf_counter() - t0)
        print(f"{label:<15}{statistics.median(times):>10.3f}{rel_error(merged, ref):>20.4f}")


if __name__ == "__main__":
    main()
