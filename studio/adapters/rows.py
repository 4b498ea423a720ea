"""Different adapters on different rows of one batched UNet call.

Composers that run one UNet pass per adapter (CLoRA's branches, CMLoRA's shallow passes) can run
them as one call of stacked rows instead: on small UNets the per-call overhead dominates, so one
call of 2N rows costs far less than N calls of 2. Forward hooks add ``w · delta(x[rows])`` to each
group's own rows, which is what the sequential calls through ``AdapterRig`` compute; the rig's own
UNet adapters must be off for the call. Hooks live only inside ``active()``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from .adapter import Adapter


class RowAdapters:
    """``groups[k]`` = the (adapter, weight) pairs acting on rows ``[k·rows, (k+1)·rows)``."""

    def __init__(self, unet: torch.nn.Module, groups: Sequence[Sequence[tuple[Adapter, float]]], rows: int = 2):
        self.rows = rows
        self.total = rows * len(groups)
        plan: dict[str, list] = defaultdict(list)
        for k, group in enumerate(groups):
            for adapter, weight in group:
                if not weight:
                    continue
                for path, delta in adapter.layers.items():
                    if path.startswith("unet."):
                        plan[path[len("unet."):]].append((k, float(weight), delta))
        self.plan = []
        for name, entries in plan.items():
            module = unet.get_submodule(name)
            ref = module.weight
            self.plan.append((module, [
                (slice(k * rows, (k + 1) * rows), w, d.to(device=ref.device, dtype=ref.dtype),
                 torch.arange(k * rows, (k + 1) * rows, device=ref.device))
                for k, w, d in entries
            ]))

    def _hook(self, entries):
        def hook(module, args, output):
            x = args[0]
            if x.shape[0] != self.total:
                raise RuntimeError(f"batched call expected {self.total} rows at an adapter layer, got {x.shape[0]}")
            for rows, w, delta, index in entries:
                output = output.index_add(0, index, w * delta.forward(x[rows], module))
            return output

        return hook

    @contextmanager
    def active(self):
        handles = [m.register_forward_hook(self._hook(entries)) for m, entries in self.plan]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# Below this many latent pixels (32×32, a 256² SD image) a UNet call is dominated by per-call
# overhead, so batching branches pays; above it batching saves little and holds N branches'
# activations at once.
BATCH_BELOW_LATENT_PIXELS = 32 * 32


def batching_pays(height: int, width: int, vae_scale_factor: int) -> bool:
    """Whether composers batch their per-adapter passes by default (``auto``) at this size."""
    return (height // vae_scale_factor) * (width // vae_scale_factor) < BATCH_BELOW_LATENT_PIXELS
