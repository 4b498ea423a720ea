"""Composite: one UNet branch per adapter (that adapter alone), halves averaged, CFG once.

At every step each adapter i runs alone at its weight on the [uncond; cond] batch; the uncond and
cond predictions are averaged separately and CFG is applied once (Zhong et al. 2024, spec §1.4).
By linearity this equals the mean of the per-adapter CFG outputs. N UNet calls per step.

``te_mode``: ``"reference"`` (default, the released code) encodes the prompt once with every
text-encoder adapter active; ``"per_lora"`` encodes it for each branch with that adapter's own
text-encoder weights. ``per_lora`` helps when adapters were trained with text-encoder LoRAs that
clash (each branch then sees the text its adapter was trained with, e.g. two character LoRAs
re-binding the same trigger); it is not the papers' computation (it moved Composite's final
latents by 26 % on the toy model). With one adapter, Composite is plain generation with it (== Merge).
At guidance ≤ 1 only the conditional half runs, as in the released diffusers pipeline.

``batch`` (default ``auto``: on below 32×32 latents): the N branches run as one UNet call, each
adapter on its own rows (``studio.adapters.rows``; images × branches when a request draws several
images at once). Same numbers to float rounding; on small UNets it saves the per-call overhead.

``preset=paper`` / ``paper-reality``: ComposLoRA's published run settings (spec §1.1).
"""

from __future__ import annotations

import torch

from studio.adapters.rows import RowAdapters, batching_pays
from studio.errors import GenerationError
from studio.sampling import ComposeContext, Conditioning

from .base import Composer, Preset, switch_param

TE_MODES = ("reference", "per_lora")

# ComposLoRA's published settings (Zhong et al. 2024; spec cmlora.md §1.1): DPM-Solver++, global
# LoRA scale 0.8 (UNet and text encoder), 200 steps / CFG 10 for the anime set, 100 / 7 for realistic.
COMPOSLORA_PRESETS: dict[str, Preset] = {
    "paper": Preset("ComposLoRA's anime setting (Counterfeit-V2.5).", sampler="dpm++2m", steps=200,
                    guidance=10.0, weight=0.8),
    "paper-reality": Preset("ComposLoRA's realistic setting (Realistic Vision 5.1).", sampler="dpm++2m",
                            steps=100, guidance=7.0, weight=0.8),
}


def branch_conditioning(ctx: ComposeContext, te_mode: str) -> list[Conditioning]:
    """One text conditioning per adapter (in ``ctx.adapters`` order) for this ``te_mode``."""
    if te_mode not in TE_MODES:
        raise GenerationError(f"te_mode {te_mode!r} is not valid; choose one of {', '.join(TE_MODES)}")
    if te_mode == "reference":
        cond = ctx.encode(te_weights=ctx.te_weights())
        return [cond] * len(ctx.adapters)
    out = []
    for a in ctx.adapters:
        has_te = any(c.startswith("text_encoder") for c in a.adapter.components())
        out.append(ctx.encode(te_weights={a.name: a.te} if has_te else {}))
    return out


def branch_rows(conds: list[Conditioning], images: int) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for one call of every branch on its own ``2 · images`` rows (branch-major)."""
    per = [c.rows(images) for c in conds]
    added = None if per[0].added is None else {k: torch.cat([c.added[k] for c in per]) for k in per[0].added}
    return torch.cat([c.embeds for c in per]), added


def mix(ctx: ComposeContext, outs: list[tuple[torch.Tensor, torch.Tensor]], shares: list[float]) -> torch.Tensor:
    """Convex mix of per-branch (uncond, cond) predictions, then CFG once."""
    eu = sum(s * u for s, (u, _) in zip(shares, outs))
    ec = sum(s * c for s, (_, c) in zip(shares, outs))
    return ctx.cfg(eu, ec)


class CompositeComposer(Composer):
    name = "composite"
    summary = ("one branch per adapter, uncond/cond halves averaged, CFG once (Zhong et al. 2024); "
               "te_mode=reference (default) encodes the prompt once with every text-encoder adapter, as released.")
    defaults = {"te_mode": "reference", "preset": "none", "batch": "auto"}
    presets = COMPOSLORA_PRESETS
    min_adapters = 1  # one adapter: plain generation with it

    def prepare(self, ctx: ComposeContext) -> None:
        super().prepare(ctx)
        self.conds = branch_conditioning(ctx, self.params["te_mode"])
        self.weights = [{a.name: a.unet} for a in ctx.adapters]
        self.batch = len(ctx.adapters) > 1 and switch_param(
            self.name, self.params, "batch", batching_pays(ctx.height, ctx.width, ctx.pipe.vae_scale_factor))
        self._row_adapters: dict[int, RowAdapters] = {}

    def predict(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        ctx = self.ctx
        outs = self._batched(x, t) if self.batch and ctx.uses_cfg else [ctx.eps(x, t, c, w) for c, w in zip(self.conds, self.weights)]
        n = len(outs)
        return mix(ctx, outs, [1.0 / n] * n)

    def _batched(self, x: torch.Tensor, t) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every branch in one UNet call: branch i's adapter on its own [x; x] rows."""
        ctx, n, images = self.ctx, len(self.conds), x.shape[0]
        rows = 2 * images
        if rows not in self._row_adapters:
            self._row_adapters[rows] = RowAdapters(ctx.pipe.unet, [[(a.adapter, a.unet)] for a in ctx.adapters], rows)
        embeds, added = branch_rows(self.conds, images)
        sample = torch.cat([x, x]).to(ctx.dtype).repeat(n, *[1] * (x.dim() - 1))
        ctx.rig.set(unet={})
        with self._row_adapters[rows].active():
            out = ctx.pipe.unet(sample, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
        ctx.counters.unet_calls += n * images
        return [tuple(o.chunk(2)) for o in out.chunk(n)]
