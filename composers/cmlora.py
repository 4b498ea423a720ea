"""CMLoRA: Composite with dominant weighting, frequency-ordered rotation and a feature cache.

Zou et al., "Cached Multi-LoRA Composition", ICLR 2025; decisions in shared/specs/cmlora.md §1.5, §2.

- **Order** (``order``): ``"kind"`` (default) puts high-frequency kinds first in combination
  order (character, clothing, style, object, others) and background (low frequency) last;
  ``"freq"`` (experimental) generates a short image with each adapter alone, scores its FFT
  high-frequency content (``frequency_score``) and puts the lowest-scoring adapter last as the
  low-frequency set; ``"given"`` keeps the caller's order, all high-frequency.
- **Dominant weighting**: one adapter per step gets share ``coeff/(coeff+N−1)``, the others
  ``1/(coeff+N−1)`` each (``dominant_coeff``, default N − 0.5); halves mixed, CFG once.
- **Rotation**: at each refresh event after step 0 the dominant advances through the candidates:
  the high-frequency set before ``late_start`` (a fraction of T), the full order minus its first
  adapter from then on; everything when there is no low-frequency adapter.
- **Cache** (``cache="auto"``, default: on, off under ``reference_compat``): one deep-feature slot per adapter (the input of the last
  up block, ``studio.unet_cache``). Step 0 fills every slot with full passes; at each later event
  the newly dominant adapter refreshes its slot with a full pass; every other call is a shallow
  pass on its slot. ``cache="off"`` (or ``interval=1``) runs N full passes per step: the released
  code's behaviour. Events: ``interval=0`` the non-uniform schedule, ``c ≥ 1`` every c steps.
  Caching is the paper's method but not the released computation (spec C1), so the report names it.
- **Reference** (``reference_compat=True``): the released code's computation: the late phase starts
  after step 120 (its ``i <= 120``: step 121 is the first late step) and, unless ``cache`` is set,
  no features are reused (C1). ``preset=paper`` adds the scripts' run settings (DPM-Solver++,
  220 steps, CFG 8.5, LoRA scale 1.0).
- **Text** (``te_mode``): ``reference`` (default) encodes once with every text-encoder adapter, as
  the released code; ``per_lora`` gives each branch its own adapter's text encoder.
- **Batching** (``batch``, default ``auto``: on below 32×32 latents): a step's full passes run as
  one UNet call and its shallow passes as another, each adapter on its own rows
  (``studio.adapters.rows``). Same numbers (to float rounding) and call counts; on small UNets,
  where per-call overhead dominates, it is what brings CMLoRA near the cost of one adapter.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from studio.adapters.rows import RowAdapters, batching_pays
from studio.errors import GenerationError
from studio.sampling import ComposeContext, Counters, decode, initial_latents
from studio.unet_cache import full_pass, shallow_pass

from .base import Composer, Preset, switch_param
from .composite import branch_conditioning, branch_rows, mix

HIGH_KINDS = ("character", "clothing", "style", "object")  # combination order; background is low
LOW_KINDS = ("background",)
REFERENCE_LATE_START = 121  # the released code's ``i <= 120`` early phase: step 121 is the first late step


# ---- pure schedules (unit-tested) --------------------------------------------------------------
def refresh_events(T: int, interval: int = 0) -> list[int]:
    """Refresh steps: non-uniform (interval 0: every 2 steps, then 3 from ⌊.375T⌋, 2 from ⌊.875T⌋) or every c."""
    if T < 1:
        raise GenerationError(f"steps must be ≥ 1, got {T}")
    if interval < 0:
        raise GenerationError(f"interval must be 0 (non-uniform) or a positive step count, got {interval}")
    if interval >= 1:
        return list(range(0, T, interval))
    b1, b2 = math.floor(0.375 * T), math.floor(0.875 * T)
    return sorted(set(range(0, b1, 2)) | set(range(b1, b2, 3)) | set(range(b2, T, 2)))


def shares(n: int, coeff: float | None = None) -> tuple[float, float]:
    """(dominant share, each other share); convex, default coeff N − 0.5 (0.6/0.4 at N = 2)."""
    coeff = n - 0.5 if coeff is None else float(coeff)
    if coeff <= 0:
        raise GenerationError(f"dominant_coeff must be > 0, got {coeff}; 1 gives equal weights")
    total = coeff + n - 1
    return coeff / total, 1.0 / total


def decayed_shares(T: int, n: int, coeff: float | None, decay: float, events: list[int]) -> list[tuple[float, float]]:
    """Per-step (dominant, other) shares when the coefficient drops by ``decay`` at every refresh
    event after step 0, never below 1 (equal weights): the "decaying dominant weight" the released
    code meant (spec C4: there it is computed once and has no effect). ``decay = 0``: constant."""
    if decay < 0:
        raise GenerationError(f"dominant_decay must be ≥ 0, got {decay}; 0 keeps the weights constant")
    c0 = n - 0.5 if coeff is None else float(coeff)
    event_set, k, out = set(events), -1, []
    for step in range(T):
        k += step in event_set
        out.append(shares(n, max(min(1.0, c0), c0 - decay * max(k, 0))))
    return out


def dominant_schedule(T: int, n: int, n_high: int, late_start: int, events: list[int]) -> list[int]:
    """Dominant position (in execution order: high-frequency first) for every step 0..T−1.

    Starts at position 0 of the active candidate list and advances at each event after step 0.
    """
    if n_high <= 0 or n_high >= n:
        early = late = list(range(n))
    else:
        early, late = list(range(n_high)), list(range(1, n))
    event_set, advanced, out = set(events), 0, []
    for k in range(T):
        if k > 0 and k in event_set:
            advanced += 1
        cands = early if k < late_start else late
        out.append(cands[advanced % len(cands)])
    return out


def frequency_score(image, cutoff: float | None = None) -> float:
    """High-frequency content of an image (spec §1.5a): mean normalised log-spectrum ring ≥ cutoff.

    Cutoff defaults to 72·min(H, W)/512 (72 px at 512). Raises if no ring lies beyond it.
    """
    arr = np.asarray(image, dtype=np.float64)
    gray = arr.mean(axis=2) if arr.ndim == 3 else arr
    h, w = gray.shape
    cutoff = 72.0 * min(h, w) / 512 if cutoff is None else float(cutoff)
    spec = np.log(np.abs(np.fft.fftshift(np.fft.fft2(gray))) + 1e-8)
    yy, xx = np.indices(gray.shape)
    r = np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(int)
    profile = np.bincount(r.ravel(), spec.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    peak = profile.max()
    profile = profile / (peak if peak > 0 else np.abs(profile).max())
    tail = profile[int(math.ceil(cutoff)):]
    if tail.size == 0:
        raise GenerationError(f"frequency cutoff {cutoff:g} is beyond the image's maximum radius {len(profile) - 1}")
    return float(tail.mean())


def kind_partition(kinds: list[str | None]) -> tuple[list[int], list[int]]:
    """(high, low) index lists: high in combination order (unknown kinds last), background low."""
    rank = {k: i for i, k in enumerate(HIGH_KINDS)}
    high = sorted((i for i, k in enumerate(kinds) if k not in LOW_KINDS), key=lambda i: rank.get(kinds[i], len(rank)))
    low = [i for i, k in enumerate(kinds) if k in LOW_KINDS]
    return high, low


# ---- the composer ------------------------------------------------------------------------------
class CMLoRAComposer(Composer):
    name = "cmlora"
    summary = ("Composite with dominant weighting, frequency-ordered rotation and a deep-feature cache "
               "(Zou et al. 2025). cache=on by default reuses features, which the released code never does "
               "(a faster deviation, spec C1); reference_compat=true gives the released computation.")
    presets = {
        "paper": Preset("the released CMLoRA scripts: reference_compat (late phase after step 120, no "
                        "feature reuse).", params={"reference_compat": True}, sampler="dpm++2m", steps=220,
                        guidance=8.5, weight=1.0),
    }
    defaults = {
        "preset": "none",
        "cache": "auto",  # on | off | auto (on; off under reference_compat)
        "interval": 0,  # 0: non-uniform events; c ≥ 1: every c steps (c = 1 never reuses)
        "dominant_coeff": None,  # None: N − 0.5; 1: equal weights
        "batch": "auto",  # on | off | auto (on below 32x32 latents): shallow/full passes of all adapters in one call
        "dominant_decay": 0.0,  # experimental: coefficient − decay at each refresh event (floor 1)
        "order": "kind",  # kind | freq | given
        "late_start": 0.6,  # fraction of T where the late rotation phase starts
        "reference_compat": False,  # the released code: late phase from step 121, cache off unless set
        "te_mode": "reference",  # reference (all text-encoder adapters, released) | per_lora
        "profile_steps": 10,  # order=freq: steps of each single-adapter profiling image
        "profile_seed": 0,
    }
    min_adapters = 1  # one adapter: plain generation with it (with cache off)

    def prepare(self, ctx: ComposeContext) -> None:
        super().prepare(ctx)
        p = self.params
        if p["cache"] not in ("on", "off", "auto"):
            raise GenerationError(f"cache {p['cache']!r} is not valid; choose on, off or auto")
        if p["cache"] == "auto":
            p["cache"] = "off" if p["reference_compat"] else "on"
        if p["order"] not in ("kind", "freq", "given"):
            raise GenerationError(f"order {p['order']!r} is not valid; choose kind, freq or given")
        if not 0.0 <= float(p["late_start"]) <= 1.0:
            raise GenerationError(f"late_start {p['late_start']} is a fraction of the steps; give a value in [0, 1]")
        coeff = p["dominant_coeff"]
        try:
            coeff = None if coeff in (None, "", "none", "None") else float(coeff)
        except ValueError:
            raise GenerationError(f"dominant_coeff {coeff!r} is not a number; 1 gives equal weights") from None
        p["dominant_coeff"] = coeff
        n = len(ctx.adapters)
        self.pi_dom, self.pi_other = shares(n, coeff)
        try:
            p["dominant_decay"] = float(p["dominant_decay"])
        except ValueError:
            raise GenerationError(f"dominant_decay {p['dominant_decay']!r} is not a number; 0 keeps weights constant") from None
        decayed_shares(1, n, coeff, p["dominant_decay"], [0])  # validates the decay
        refresh_events(1, int(p["interval"]))  # validates interval

        conds = branch_conditioning(ctx, p["te_mode"])
        self.scores: dict[str, float] | None = None
        if p["order"] == "kind":
            high, low = kind_partition([a.adapter.concept_kind for a in ctx.adapters])
        elif p["order"] == "given" or n == 1:
            high, low = list(range(n)), []
        else:
            self.scores, self.profile_counters = self._profile(ctx, conds)
            ranked = sorted(range(n), key=lambda i: -self.scores[ctx.adapters[i].name])
            high, low = ranked[:-1], ranked[-1:]
        self.exec = high + low
        self.n_high = len(high)
        self.adapters = [ctx.adapters[i] for i in self.exec]
        self.conds = [conds[i] for i in self.exec]
        self.caching = p["cache"] == "on" and int(p["interval"]) != 1
        self.batch = switch_param(self.name, p, "batch", batching_pays(ctx.height, ctx.width, ctx.pipe.vae_scale_factor))
        self._row_adapters: dict[tuple, RowAdapters] = {}
        self.reset()

    def reset(self) -> None:
        ctx, p = self.ctx, self.params
        T = len(ctx.timesteps) if ctx.timesteps is not None else ctx.steps
        self.events = refresh_events(T, int(p["interval"]))
        self.event_set = set(self.events)
        self.late_start = REFERENCE_LATE_START if p["reference_compat"] else round(float(p["late_start"]) * T)
        self.dominant = dominant_schedule(T, len(self.adapters), self.n_high, self.late_start, self.events)
        self.step_shares = decayed_shares(T, len(self.adapters), p["dominant_coeff"], p["dominant_decay"], self.events)
        self.slots: list[torch.Tensor | None] = [None] * len(self.adapters)
        self.log: list[tuple[int, str, str | None, int, int]] = []  # step, dominant, refreshed, full, shallow

    def predict(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        if self.caching and self.batch:
            return self._predict_batched(x, t, step)
        ctx = self.ctx
        dom = self.dominant[step]
        outs, full, shallow, refreshed = [], 0, 0, None
        for i, (a, cond) in enumerate(zip(self.adapters, self.conds)):
            weights = {a.name: a.unet}
            if not self.caching:
                outs.append(ctx.eps(x, t, cond, weights))
                full += 1
                continue
            need_full = self.slots[i] is None or step == 0 or (step in self.event_set and i == dom)
            ctx.rig.set(unet=weights)
            try:
                xx = torch.cat([x, x]).to(ctx.dtype)
                rc = cond.rows(x.shape[0])
                if need_full:
                    out, self.slots[i] = full_pass(ctx.pipe.unet, xx, t, rc.embeds, rc.added)
                else:
                    out = shallow_pass(ctx.pipe.unet, xx, t, rc.embeds, self.slots[i], rc.added)
            finally:
                ctx.rig.set(unet={})
            if need_full:
                ctx.counters.unet_calls += x.shape[0]
                full += 1
                refreshed = a.name if step > 0 else refreshed
            else:
                ctx.counters.shallow_calls += x.shape[0]
                ctx.counters.cache_hits += x.shape[0]
                shallow += 1
            outs.append(out.chunk(2))
        self.log.append((step, self.adapters[dom].name, refreshed, full, shallow))
        pi_dom, pi_other = self.step_shares[step]
        sh = [pi_dom if i == dom else pi_other for i in range(len(outs))]
        return mix(ctx, outs, sh)

    def _predict_batched(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        """``predict`` with the step's full passes as one UNet call and its shallow passes as
        another, each adapter on its own rows (``RowAdapters``): the same numbers, fewer calls."""
        ctx, n = self.ctx, len(self.adapters)
        dom = self.dominant[step]
        full = [i for i in range(n) if self.slots[i] is None or step == 0 or (step in self.event_set and i == dom)]
        shallow = [i for i in range(n) if i not in full]
        xx = torch.cat([x, x]).to(ctx.dtype)
        rows = xx.shape[0]
        outs: list = [None] * n
        for idx, is_full in ((full, True), (shallow, False)):
            if not idx:
                continue
            key = (tuple(idx), rows)
            if key not in self._row_adapters:
                self._row_adapters[key] = RowAdapters(
                    ctx.pipe.unet, [[(self.adapters[i].adapter, self.adapters[i].unet)] for i in idx], rows)
            embeds, added = branch_rows([self.conds[i] for i in idx], x.shape[0])
            sample = xx.repeat(len(idx), *[1] * (xx.dim() - 1))
            ctx.rig.set(unet={})
            with self._row_adapters[key].active():
                if is_full:
                    out, h = full_pass(ctx.pipe.unet, sample, t, embeds, added)
                else:
                    cached = torch.cat([self.slots[i] for i in idx])
                    out = shallow_pass(ctx.pipe.unet, sample, t, embeds, cached, added)
            for j, i in enumerate(idx):
                outs[i] = out[j * rows:(j + 1) * rows].chunk(2)
                if is_full:
                    self.slots[i] = h[j * rows:(j + 1) * rows]
        ctx.counters.unet_calls += len(full) * x.shape[0]
        ctx.counters.shallow_calls += len(shallow) * x.shape[0]
        ctx.counters.cache_hits += len(shallow) * x.shape[0]
        refreshed = self.adapters[dom].name if step > 0 and dom in full else None
        self.log.append((step, self.adapters[dom].name, refreshed, len(full), len(shallow)))
        pi_dom, pi_other = self.step_shares[step]
        return mix(ctx, outs, [pi_dom if i == dom else pi_other for i in range(n)])

    @torch.no_grad()
    def _profile(self, ctx: ComposeContext, conds) -> tuple[dict[str, float], Counters]:
        """Frequency score of a short single-adapter image per adapter (own counters, not the run's)."""
        from studio.base import make_scheduler

        saved, ctx.counters = ctx.counters, Counters()
        try:
            scores = {}
            for a, cond in zip(ctx.adapters, conds):
                sched = make_scheduler(ctx.pipe, "ddim")
                sched.set_timesteps(int(self.params["profile_steps"]), device=ctx.device)
                z = initial_latents(ctx, int(self.params["profile_seed"]), sched)
                for t in sched.timesteps:
                    eps = ctx.cfg(*ctx.eps(sched.scale_model_input(z, t), t, cond, {a.name: a.unet}))
                    z = sched.step(eps.float(), t, z, return_dict=False)[0]
                scores[a.name] = frequency_score(decode(ctx.pipe, z))
            return scores, ctx.counters
        finally:
            ctx.counters = saved

    def effective(self) -> dict:
        out = {**super().effective(), "cache": self.params["cache"], "interval": int(self.params["interval"]),
               "late_start": getattr(self, "late_start", None), "reference_compat": bool(self.params["reference_compat"]),
               "order": [a.name for a in getattr(self, "adapters", [])]}
        if getattr(self, "caching", False):
            out["deviation"] = "cache=on reuses deep features; the released code never does (spec C1)"
        return out

    def report(self) -> dict:
        rep = {
            **super().report(),
            "order": [a.name for a in self.adapters],
            "low_frequency": [a.name for a in self.adapters[self.n_high:]] if self.n_high < len(self.adapters) else [],
            "shares": {"dominant": round(self.pi_dom, 4), "other": round(self.pi_other, 4)},
            "final_shares": {"dominant": round(self.step_shares[-1][0], 4), "other": round(self.step_shares[-1][1], 4)},
            "caching": self.caching,
            "refresh_events": len(self.events),
            "late_start": self.late_start,
            "events": [[s, d, r] for s, d, r, _, _ in self.log if s in self.event_set],
        }
        if self.scores is not None:
            rep["frequency_scores"] = {k: round(v, 4) for k, v in self.scores.items()}
            rep["profile_unet_calls"] = self.profile_counters.unet_calls
        return rep
