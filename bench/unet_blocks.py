"""Per top-level UNet block: share of forward time and activations saved for backward.

Why CLoRA's ``grad_checkpoint=fine`` recomputes only the blocks finer than the attention maps:
on SD1.5 at 256² the fine blocks hold most of the saved activations for a small share of the
time. One CFG row with a graph to the latent, UNet weights frozen (as in a CLoRA graph pass);
weights saved by linear layers are not counted (they are not new memory).

    OMP_NUM_THREADS=1 .venv/bin/python bench/unet_blocks.py --size 256 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compose import build_sd15_random  # noqa: E402
from studio.attention import block_levels  # noqa: E402


def profile(unet, size: int, repeats: int) -> dict[str, tuple[float, int]]:
    """Block name -> (mean forward seconds, saved-tensor bytes) for one row with a graph."""
    blocks = {name: unet.get_submodule(name) for name in block_levels(unet)}
    seconds = dict.fromkeys(blocks, 0.0)
    saved = dict.fromkeys(blocks, 0)
    current: list[str | None] = [None]
    weights = {p.data_ptr() for p in unet.parameters()}

    def pre(name):
        def hook(module, args):
            current[0] = name
            seconds[name] -= time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, out):
            seconds[name] += time.perf_counter()
            current[0] = None
        return hook

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current[0] is not None and t.data_ptr() not in weights:
            saved[current[0]] += t.numel() * t.element_size()
        return t

    handles = [h for n, b in blocks.items() for h in (b.register_forward_pre_hook(pre(n)), b.register_forward_hook(post(n)))]
    latent = size // 8
    emb = torch.randn(1, 77, unet.config.cross_attention_dim)
    try:
        for _ in range(repeats):
            x = torch.randn(1, unet.config.in_channels, latent, latent, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(x, 500, encoder_hidden_states=emb)
    finally:
        for h in handles:
            h.remove()
    return {n: (seconds[n] / repeats, saved[n] // repeats) for n in blocks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    unet = build_sd15_random().unet.requires_grad_(False)
    levels = block_levels(unet)
    rows = profile(unet, args.size, args.repeats)
    total = sum(s for s, _ in rows.values())
    print(f"SD1.5 UNet, {args.size}², one row with a graph; forward {total:.2f} s")
    print("| block | level | forward share | saved MiB |\n|---|---|---|---|")
    for name, (secs, nbytes) in rows.items():
        print(f"| {name} | {levels[name]} | {100 * secs / total:.1f} % | {nbytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
