"""Merge: one branch with every adapter active at its weight (the weighted sum of deltas).

With several LoRAs the UNet-side adapters are concatenated once (``cat``: exact, the weights
folded in) so each module runs one low-rank product of rank Σr instead of N; Kronecker adapters
stay separate hooks, since concatenating them would need an SVD.
"""

from __future__ import annotations

from studio.adapters.adapter import Adapter, LoraDelta
from studio.adapters.merge import merge_adapters

from .base import Composer
from .composite import COMPOSLORA_PRESETS


class MergeComposer(Composer):
    name = "merge"
    summary = "every adapter active at its weight (the sum of deltas), one UNet call per step."
    defaults = {"preset": "none"}
    presets = COMPOSLORA_PRESETS

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self.cond = ctx.encode(te_weights=ctx.te_weights())
        self.weights = ctx.unet_weights()
        loras = [a for a in ctx.adapters
                 if a.unet and all(isinstance(d, LoraDelta) for p, d in a.adapter.layers.items() if p.startswith("unet."))]
        if len(loras) >= 2:
            key = ("merge-cat", tuple((a.name, a.adapter.fingerprint(), a.unet) for a in loras))
            unet_only = [Adapter(a.name, {p: d for p, d in a.adapter.layers.items() if p.startswith("unet.")},
                                 arch=a.adapter.arch) for a in loras]
            fused, _ = ctx.cached(key, lambda: merge_adapters(unet_only, [a.unet for a in loras], method="cat",
                                                              name="merge-cat"))
            ctx.rig.attach([fused])
            self.weights = {n: w for n, w in self.weights.items() if n not in {a.name for a in loras}}
            self.weights[fused.name] = 1.0

    def predict(self, x, t, step):
        return self.ctx.cfg(*self.ctx.eps(x, t, self.cond, self.weights))
