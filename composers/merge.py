"""Merge: one branch with every adapter active at its weight (the weighted sum of deltas)."""

from __future__ import annotations

from .base import Composer


class MergeComposer(Composer):
    name = "merge"

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        self.cond = ctx.encode(te_weights=ctx.te_weights())
        self.weights = ctx.unet_weights()

    def predict(self, x, t, step):
        return self.ctx.cfg(*self.ctx.eps(x, t, self.cond, self.weights))
