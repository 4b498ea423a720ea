"""Attach adapters to a pipeline for one generation and switch their weights cheaply.

``AdapterRig`` finds the target modules once, adds one forward hook per module, and keeps the
active weights in a single dict that every hook reads. Switching adapters between UNet calls is
then a dict assignment, not a walk over the model. Leaving the ``with`` block removes every hook,
so nothing stays active in shared model state after a generation.

Why hooks and not PEFT's ``set_adapters``: one mechanism serves LoRA and Kronecker (LoKr)
adapters from every file format (diffusers cannot load LoKr), the base weights are never copied
or modified, and per-step switching costs nothing.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import AdapterMismatchError
from .adapter import Adapter, LayerDelta


class AdapterRig:
    """Hooks for a set of adapters on one pipeline; weights per adapter and per component."""

    def __init__(self, pipe, adapters: list[Adapter]):
        self.pipe = pipe
        self.adapters: dict[str, Adapter] = {}
        self._initial = list(adapters)
        self._unet_w: dict[str, float] = {}
        self._te_w: dict[str, float] = {}
        self._handles: list = []

    def __enter__(self) -> "AdapterRig":
        self.attach(self._initial)
        return self

    def attach(self, adapters: list[Adapter]) -> None:
        """Hook adapters onto their modules (all checked before any hook exists); live until exit."""
        plan: dict[str, list[tuple[str, LayerDelta]]] = defaultdict(list)
        for adapter in adapters:
            for path, delta in adapter.layers.items():
                plan[path].append((adapter.name, delta))
        modules = {path: self._module(path, entries) for path, entries in plan.items()}
        for path, entries in plan.items():
            module = modules[path]
            ref = module.weight
            moved = [(n, d.to(device=ref.device, dtype=ref.dtype)) for n, d in entries]
            weights = self._unet_w if path.startswith("unet.") else self._te_w
            self._handles.append(module.register_forward_hook(_make_hook(moved, weights)))
        self.adapters.update({a.name: a for a in adapters})

    def _module(self, path: str, entries: list[tuple[str, LayerDelta]]) -> torch.nn.Module:
        """The module an adapter targets; a clear error (before any hook exists) if the base lacks it."""
        comp, name = path.split(".", 1)
        owner = entries[0][0]
        try:
            module = getattr(self.pipe, comp).get_submodule(name)
        except AttributeError:
            raise AdapterMismatchError(
                f"adapter {owner!r} targets {path}, which this base model does not have; use an adapter made for this architecture"
            ) from None
        for adapter_name, delta in entries:
            if tuple(delta.weight_shape) != tuple(module.weight.shape):
                raise AdapterMismatchError(
                    f"adapter {adapter_name!r} has shape {tuple(delta.weight_shape)} at {path} but the base has "
                    f"{tuple(module.weight.shape)}; use an adapter made for this base model"
                )
        return module

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unet_w.clear()
        self._te_w.clear()

    def set(self, unet: dict[str, float] | None = None, text: dict[str, float] | None = None) -> None:
        """Make exactly these adapters active at these weights (others off)."""
        for target, new in ((self._unet_w, unet), (self._te_w, text)):
            target.clear()
            if new:
                target.update({n: float(w) for n, w in new.items() if w})

    @property
    def active(self) -> dict[str, dict[str, float]]:
        return {"unet": dict(self._unet_w), "text": dict(self._te_w)}


def _make_hook(entries: list[tuple[str, LayerDelta]], weights: dict[str, float]):
    def hook(module: torch.nn.Module, args, output):
        if not weights:
            return output
        x = args[0]
        for name, delta in entries:
            w = weights.get(name)
            if w:
                output = output + w * delta.forward(x, module)
        return output

    return hook
