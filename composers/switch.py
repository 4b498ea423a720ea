"""Switch: one adapter active per step, cycling every ``tau`` steps (Zhong et al. 2024, spec §1.3).

The active index at step k is ``switch_index(k, tau, N)``: 0 at k = 0, then ⌊(k−1)/τ⌋ mod N, so
the first adapter runs τ+1 steps and every later slot τ. Adapters are ordered by kind in the
released combination order (character, clothing, style, background, object; unknown kinds last,
stable) unless ``order="given"``. One UNet call per step; with τ ≥ steps (or one adapter) this is
plain generation with the first adapter.

``te_mode``: ``"reference"`` (default, released code) encodes once with only the first adapter's
text-encoder weights; ``"per_lora"`` uses the active adapter's own text-encoder weights at each
step (helps when the adapters' text-encoder LoRAs carry their concepts; not the paper's computation).
"""

from __future__ import annotations

import torch

from studio.errors import GenerationError
from studio.sampling import AdapterWeight, ComposeContext

from .base import Composer
from .composite import COMPOSLORA_PRESETS, branch_conditioning

# ComposLoRA's combination order (spec cmlora.md §1): the released code switches in this order.
KIND_ORDER = ("character", "clothing", "style", "background", "object")


def switch_index(k: int, tau: int, n: int) -> int:
    """The active adapter at step k (0-based) when switching every tau steps among n."""
    return 0 if k == 0 else ((k - 1) // tau) % n


def kind_order(adapters: list[AdapterWeight], order: tuple[str, ...] = KIND_ORDER) -> list[AdapterWeight]:
    """Adapters in combination order of their kinds (unknown kinds last); stable within a kind."""
    rank = {k: i for i, k in enumerate(order)}
    return sorted(adapters, key=lambda a: rank.get(a.adapter.concept_kind, len(rank)))


class SwitchComposer(Composer):
    name = "switch"
    summary = ("one adapter per step, switching every tau steps in combination order (character, clothing, "
               "style, background, object); te_mode=reference (default) encodes once with the first adapter's "
               "text encoder, as released.")
    defaults = {"tau": 5, "order": "kind", "te_mode": "reference", "preset": "none"}
    presets = COMPOSLORA_PRESETS
    min_adapters = 1  # one adapter: plain generation with it

    def prepare(self, ctx: ComposeContext) -> None:
        super().prepare(ctx)
        p = self.params
        if p["tau"] < 1:
            raise GenerationError(f"tau must be ≥ 1, got {p['tau']}; 5 is the reference value")
        if p["order"] not in ("kind", "given"):
            raise GenerationError(f"order {p['order']!r} is not valid; choose kind or given")
        self.order = kind_order(ctx.adapters) if p["order"] == "kind" else list(ctx.adapters)
        if p["te_mode"] not in ("reference", "per_lora"):
            raise GenerationError(f"te_mode {p['te_mode']!r} is not valid; choose reference or per_lora")
        if p["te_mode"] == "reference":
            first = self.order[0]
            cond = ctx.encode(te_weights={first.name: first.te})
            self.conds = [cond] * len(self.order)
        else:
            conds = dict(zip([a.name for a in ctx.adapters], branch_conditioning(ctx, p["te_mode"])))
            self.conds = [conds[a.name] for a in self.order]
        self.active: list[str] = []

    def reset(self) -> None:
        self.active = []

    def predict(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        i = switch_index(step, self.params["tau"], len(self.order))
        a = self.order[i]
        self.active.append(a.name)
        return self.ctx.cfg(*self.ctx.eps(x, t, self.conds[i], {a.name: a.unet}))

    def effective(self) -> dict:
        return {**super().effective(), "tau": self.params["tau"], "order": [a.name for a in getattr(self, "order", [])]}

    def report(self) -> dict:
        return {**super().report(), "order": [a.name for a in self.order], "active_per_step": self.active}
