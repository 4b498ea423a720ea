"""LoRA-LEGO: merge the adapters in weight space once (rank-wise clustering), then generate like
Merge with the single merged adapter. The merge is cached per Studio by a hash of the sources,
weights, rank and options, so a batch or a re-run pays for it once.
"""

from __future__ import annotations

import hashlib
import json

from studio.adapters.merge import merge_adapters

from .base import Composer


class LegoComposer(Composer):
    name = "lego"
    # magnitude: "" = LEGO's own reweighting (members' mean norm); "sum" keeps each cluster at the
    # sum of its members (closer to Merge's strength when sources share directions); "none"
    defaults = {"rank": 0, "seed": 0, "reweight": True, "quotas": "", "magnitude": "", "merge_method": "lego"}
    min_adapters = 1

    def prepare(self, ctx) -> None:
        super().prepare(ctx)
        p = self.params
        options = {"reweight": bool(p["reweight"])} if p["merge_method"] == "lego" else {}
        if p["magnitude"] and p["merge_method"] == "lego":
            options["magnitude"] = str(p["magnitude"])
        if p["quotas"] and p["merge_method"] == "lego":
            options["quotas"] = "equal" if p["quotas"] == "equal" else [int(q) for q in str(p["quotas"]).split(",")]
        key = hashlib.sha256(json.dumps(
            [[a.name, a.adapter.fingerprint(), a.unet] for a in ctx.adapters] + [p], sort_keys=True, default=str,
        ).encode()).hexdigest()
        merged, hit = ctx.cached(("lego", key), lambda: merge_adapters(
            [a.adapter for a in ctx.adapters], [a.unet for a in ctx.adapters], method=p["merge_method"],
            rank=int(p["rank"]) or None, seed=int(p["seed"]), name=f"lego-{key[:8]}", **options,
        ))
        ctx.counters.cache_hits += hit
        self.merged = merged
        ctx.rig.attach([merged])
        self.cond = ctx.encode(te_weights=ctx.te_weights())  # text-encoder adapters stay runtime-weighted
        self.weights = {merged.name: 1.0}

    def predict(self, x, t, step):
        return self.ctx.cfg(*self.ctx.eps(x, t, self.cond, self.weights))

    def report(self) -> dict:
        return super().report() | {"merged_rank": max((d.rank for d in self.merged.layers.values()), default=0)}
