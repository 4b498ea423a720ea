"""Attach adapters to a pipeline for one generation and switch their weights cheaply.

``AdapterRig`` finds the target modules once, adds one forward hook per module, and keeps the
active weights in a single dict that every hook reads. Switching adapters between UNet calls is
then a dict assignment, not a walk over the model. Leaving the ``with`` block removes every hook,
so nothing stays active in shared model state after a generation.

Trained token embeddings (pivotal tuning) ride on the same switch as the text-encoder weights: one
hook per text encoder on its token-embedding table overwrites the rows of the trigger's token id
with the stored vector while the adapter's text-encoder weight is > 0 (on or off; not scaled).

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
        embeddings = self._embedding_plan(adapters)
        for comp, entries in embeddings.items():
            module = getattr(self.pipe, comp).get_input_embeddings()
            self._handles.append(module.register_forward_hook(_make_embedding_hook(entries, self._te_w)))
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

    def _embedding_plan(self, adapters: list[Adapter]) -> dict[str, list[tuple[str, int, torch.Tensor]]]:
        """Per text encoder: (adapter, token id, vector) for every stored embedding, all checked first."""
        plan: dict[str, list[tuple[str, int, torch.Tensor]]] = defaultdict(list)
        for adapter in adapters:
            for token, per_comp in adapter.embeddings.items():
                for comp, vec in per_comp.items():
                    encoder = getattr(self.pipe, comp, None)
                    if encoder is None:
                        raise AdapterMismatchError(
                            f"adapter {adapter.name!r} has a token embedding for {comp}, which this base model does not "
                            "have; use an adapter made for this architecture"
                        )
                    table = encoder.get_input_embeddings()
                    vec = vec.reshape(-1, vec.shape[-1]) if vec.dim() != 2 else vec
                    if vec.shape[0] != 1:
                        raise AdapterMismatchError(
                            f"adapter {adapter.name!r} stores {vec.shape[0]} vectors for {token!r}; only single-vector "
                            "token embeddings are supported"
                        )
                    if vec.shape[1] != table.embedding_dim:
                        raise AdapterMismatchError(
                            f"adapter {adapter.name!r} has a {vec.shape[1]}-wide embedding for {token!r} but {comp} "
                            f"embeds tokens in {table.embedding_dim} dimensions; use an adapter made for this base model"
                        )
                    tokenizer = getattr(self.pipe, "tokenizer" if comp == "text_encoder" else "tokenizer_2")
                    tid = single_token_id(tokenizer, token, owner=f"adapter {adapter.name!r}")
                    ref = table.weight
                    plan[comp].append((adapter.name, tid, vec[0].detach().to(device=ref.device, dtype=ref.dtype)))
        return plan

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


def single_token_id(tokenizer, word: str, owner: str = "the trigger") -> int:
    """The one token id ``word`` encodes to; an error naming the word if the tokenizer splits it."""
    pieces = tokenizer.tokenize(word)
    if len(pieces) != 1:
        raise AdapterMismatchError(
            f"{owner}: the token embedding's word {word!r} tokenizes into {len(pieces)} tokens {pieces}; a trained "
            "token embedding needs a word that is a single token (e.g. 'sks')"
        )
    return int(tokenizer.convert_tokens_to_ids(pieces[0]))


def _make_embedding_hook(entries: list[tuple[str, int, torch.Tensor]], weights: dict[str, float]):
    """Overwrite the embedding of each active adapter's token (several adapters on one token: their mean)."""
    by_token: dict[int, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for name, tid, vec in entries:
        by_token[tid].append((name, vec))

    def hook(module: torch.nn.Module, args, output):
        if not weights:
            return output
        ids = args[0]
        for tid, group in by_token.items():
            active = [vec for name, vec in group if weights.get(name, 0.0) > 0]
            if not active:
                continue
            vec = active[0] if len(active) == 1 else torch.stack(active).mean(0)
            output = torch.where((ids == tid).unsqueeze(-1), vec.to(output.dtype), output)
        return output

    return hook


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
