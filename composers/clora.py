"""CLoRA: contrastive test-time composition of LoRAs (Meral et al., ICCV 2025; spec: shared/specs/clora.md).

Branches share one latent: branch 0 is the base model with the plain prompt, branch k+1 has
adapter k active and its trigger inserted before its own concept word. Each step:

1. ``guide`` (updating steps only): NT-Xent (tau 0.5) over min-max-normalised cross-attention maps
   of the concept tokens in every branch pulls each concept's maps together across branches and
   pushes different concepts apart; z <- z - step_size · dL/dz, repeated ``inner_iterations`` times
   at the iterative steps.
2. ``predict``: masks from the maps (token > alpha · max), uncovered pixels to the base branch,
   uncond and cond noise fused by the masks separately, CFG once.

Memory: the loss couples all branches, but no two branch graphs are alive together. The maps are
computed without a graph, dL/dmaps is taken on them, then each branch is re-run with a graph and
back-propagated alone (a vector-Jacobian product); the sum of the per-branch VJPs is dL/dz exactly.
Graph passes stop right after the last captured layer (nothing later feeds the loss), which also
cuts their cost. ``backprop="joint"`` keeps all graphs at once (fewer forwards, N× the memory):
one graph pass of all branches and one backward per update, no graph-free pass; ``auto`` (the
default) picks it below 32×32 latents, where graphs are a few MiB and per-call overhead dominates.
The latent and the loss are fp32; the UNet runs in its own dtype.

Presets (``preset``; spec §1.4): ``spec`` (default) is the published schedule: updates with step
size 20 on the first T/2 steps plus K = 20 inner iterations at steps {0, 10, 20} of 50, scaled to T.
``notebook`` is the official demo as a whole recipe (100 DDIM steps, CFG 10, negative "nsfw"; its
seed 53 is not applied, the seed stays per job). ``fast`` is a named **deviation**: no inner
iterations (25 latent updates instead of 85 at T = 50, ≈ 70 % fewer), which is what brings CLoRA
near issue 6's bound of 6× plain generation; the published schedule cost ≈ 12× plain on the toy
model before the joint pass (``backprop``; ≈ 2.2× faster since) and costs ≈ 11.6× on SD1.5 at
256², N = 2, T = 4 (spec §1.5 predicts 15–17× at T = 50; docs/performance.md). A preset named explicitly
also applies its run settings (steps, guidance, sampler, negative prompt) that the caller left unset.

Style adapters (``style``: names of composed adapters, comma-separated): no branch of their own,
active in every LoRA branch at their weights (the base branch stays adapter-free, spec §1.1), with
their text-encoder weights in those branches' encodings when ``use_text_encoder_lora``; the
released code's ``style_lora``. They need no trigger or concept word.

Background adapters (``background``: names of composed concept adapters, comma-separated, or ``auto``
for every one whose kind is "background"; off by default) are a named **deviation**: their branch's mask is the cells no other adapter's mask covers
(the base branch's share), not their own thresholded map. A background word attends evenly, so its
map covers every cell and the paper's fusion averages the background branch into every object. Every
object's branch also keeps the background's trigger and runs the background adapter at
``background_in_objects`` × its UNet weight (``auto``: 0.5 beside one object, off beside more), so the cells
of an object's mask around the object draw the background, not a pale box.

Cost options:

- ``backprop`` (default ``auto``: ``joint`` below 32×32 latents, else ``branchwise``): joint runs
  one graph pass of all branches per update (one batched call with ``batch_branches``) and one
  backward; in the last round at a step that pass runs on to the end for the step's noise
  prediction, the layers after the last captured one without a graph. Toy model, T = 25, N = 2:
  42 backwards instead of 126 and no graph-free maps passes, ≈ 2.2× faster than branchwise, for
  ≈ 3× its peak memory (13 against 4.7 MiB). The latents are the same (tested within 1e-5).
- ``batch_branches`` (default ``auto``: on below 32×32 latents): the passes (noise prediction + maps, the maps that
  feed the loss are the ones of the step's prediction pass) run all N branches as one UNet call
  of 2N rows, each branch's adapters hooked onto its own rows (``studio.adapters.rows``). The spec's
  pitfall 2 forbids this for diffusers/PEFT, which cannot switch adapters per row; our hooks can,
  and the result equals the sequential calls to float rounding. It saves per-call overhead on
  small models (toy, T = 25, N = 2: 4.4× plain instead of 5.3×); on large UNets it saves little and
  holds N branches' activations at once, so ``auto`` turns it off there (the peak-memory target).
  Branchwise graph passes stay one branch at a time.
- ``grad_checkpoint`` (default ``auto``: ``fine`` from 32×32 latents, else ``off``): graph passes
  recompute blocks in backward instead of keeping their insides. ``fine`` picks the ResNet,
  transformer and resampling blocks finer than the maps' level (SD1.5: the 32×32 and 16×16 blocks
  at 256²), where activations are large for their compute; ``all`` adds the coarse ones (≈ 10 MiB
  less for 3–11 % more time); a block holding a captured layer is never recomputed. The gradient
  is unchanged (tested).
- ``split_rows`` (default ``auto``: on from 32×32 latents): a graph pass runs the uncond and cond
  rows one at a time; the map is the mean of the two rows' maps, so the gradient is the mean of
  two row VJPs (exact). It halves a branch's graph.

On sd15 at 256², N = 2, T = 4 (CPU, in-use heap; docs/performance.md), with ``preset=fast``:
5.5–5.85× plain generation and 1.36× Composite's peak memory with these options; ``grad_checkpoint=all`` 6.05–6.1× / 1.28×,
``off`` 5.0–5.4× / 2.08×.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from studio.adapters.rows import RowAdapters
from studio.attention import (
    AttentionCapture,
    assign_background,
    background_takes_free_cells,
    block_levels,
    capture_spec,
    morphology,
    threshold_masks,
)
from studio.errors import GenerationError
from studio.prompts import BranchPrompts, branch_prompts
from studio.sampling import AdapterWeight, ComposeContext, Conditioning

from .base import Composer, Preset, switch_param
from .composite import branch_rows

# The spec's presets (§1.4) plus ``fast``. A preset's schedule is given for its own step count and
# scaled to T. ``spec`` (the default) is the spec's "ours (default preset)" column, the published
# schedule; ``notebook`` the official demo; ``fast`` is ``spec`` without the inner iterations, a
# named deviation (see the module docstring).
_SPEC = dict(steps=50, guidance=7.5, latent_update=True, step_size=20.0, max_iter_to_alter=25,
             iterative_steps=(0, 10, 20), inner_iterations=20, tau=0.5, mask_threshold=0.4,
             apply_mask_after=0, negative_prompt="nsfw")
PRESETS: dict[str, dict] = {
    "fast": {**_SPEC, "iterative_steps": ()},
    "spec": _SPEC,
    "notebook": dict(steps=100, guidance=10.0, latent_update=True, step_size=20.0, max_iter_to_alter=50,
                     iterative_steps=(0, 10, 20), inner_iterations=20, tau=0.5, mask_threshold=0.4,
                     apply_mask_after=0, negative_prompt="nsfw", seed=53),
}


def nt_xent(emb: torch.Tensor, labels: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """NT-Xent / InfoNCE over cosine similarities (pytorch-metric-learning's semantics).

    Positives: all ordered pairs (a, p), a != p, with the same label; the negatives of anchor a are
    all embeddings with another label. Mean over positive pairs; 0 (no gradient) if there are none.
    """
    e = F.normalize(emb, dim=1)
    s = e @ e.t() / tau
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos = same & ~eye
    if not pos.any():
        return emb.sum() * 0.0
    a, p = pos.nonzero(as_tuple=True)
    negs = s[a].masked_fill(same[a], float("-inf"))  # (P, M): each pair's anchor row, negatives only
    logits = torch.cat([s[a, p][:, None], negs], dim=1)
    return (torch.logsumexp(logits, dim=1) - s[a, p]).mean()


def master(x: torch.Tensor) -> torch.Tensor:
    """The latent / loss precision: fp32, or fp64 when the input already is (gradient checks)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min() + 1e-8)


@dataclass
class _Branch:
    label: str
    unet: dict[str, float]
    cond: Conditioning


@dataclass
class _Pass:
    eps: tuple[torch.Tensor, torch.Tensor] | None  # (uncond, cond), detached; None for a truncated pass
    maps: torch.Tensor  # (images, h, w, tokens) fp32


# From this many latent pixels (32×32, a 256² SD image) ``auto`` turns activation checkpointing on and
# branch batching off: below it a branch's activations are a few MiB and per-call overhead dominates.
CHECKPOINT_MIN_LATENT = 32 * 32
CHECKPOINT_TYPES = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")


def checkpoint_blocks(unet, layers: tuple[str, ...], below_level: int | None = None) -> list[torch.nn.Module]:
    """The UNet's ResNet, transformer and resampling blocks to recompute in backward.

    Never a block holding one of ``layers`` (its capture must run once). With ``below_level``, only
    blocks finer than that level: there activations are large for their compute, while at the maps'
    level and coarser they are small and recomputing them costs time for little memory.
    """
    levels = block_levels(unet)

    def level(name: str) -> int:  # "down_blocks.0.resnets.1" -> level of "down_blocks.0"
        parts = name.split(".")
        return levels.get(".".join(parts[:2]), levels.get(parts[0], 0))

    return [m for n, m in unet.named_modules()
            if type(m).__name__ in CHECKPOINT_TYPES and not any(l.startswith(n + ".") for l in layers)
            and (below_level is None or level(n) < below_level)]


@contextmanager
def _checkpointed(blocks: list[torch.nn.Module]):
    """Activation checkpointing on these blocks for the duration (their ``forward`` wrapped)."""
    saved = [b.__dict__.get("forward") for b in blocks]
    for b in blocks:
        b.forward = partial(checkpoint, b.forward, use_reentrant=False)
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


FAST_DEVIATION = ("no inner iterations at the iterative steps: ≈ 70 % fewer latent updates than the published "
                  "schedule (25 instead of 85 at T = 50), for ≈ 5–6× plain generation instead of ≈ 12–15×.")


def _name_list(raw) -> list[str]:
    """Adapter names from a parameter given as "a, b" or as a list."""
    return [s.strip() for s in (raw.split(",") if isinstance(raw, str) else (raw or [])) if s and s.strip()]


BACKGROUND_DEVIATION = ("background adapters take the cells no other mask covers, not their own map's "
                        "(the paper averages them into every object)")
BACKGROUND_IN_OBJECTS_DEVIATION = ("and every object's branch keeps the background's trigger and runs its adapter at "
                                   "background_in_objects × its UNet weight, so an object's mask cells draw the background")


def _preset(name: str, description: str, deviation: str | None = None) -> Preset:
    t = PRESETS[name]
    return Preset(description, sampler="ddim", steps=t["steps"], guidance=t["guidance"], weight=1.0,
                  negative_prompt=t["negative_prompt"], deviation=deviation)


class CLoRAComposer(Composer):
    name = "clora"
    summary = ("base branch + one per adapter; contrastive latent update on cross-attention maps, mask-weighted "
               "fusion (Meral et al. 2025). The default preset is the published schedule; style=NAME applies a "
               "style adapter in every LoRA branch.")
    presets = {
        "spec": _preset("spec", "the published schedule: step size 20 on the first T/2 steps, 20 inner iterations "
                                "at steps {0, 10, 20} of 50 (scaled to T), mask threshold 0.4."),
        "notebook": _preset("notebook", "the official demo notebook: 100 DDIM steps, CFG 10, negative 'nsfw', 50 "
                                        "updating steps with 20 inner iterations at {0, 10, 20} (its seed 53 is "
                                        "not applied)."),
        "fast": _preset("fast", "the published schedule without the inner iterations.", FAST_DEVIATION),
    }
    min_adapters = 1
    defaults = {
        "preset": "spec",  # "spec" (published schedule), "notebook" (official demo) or "fast" (deviation): scaled to T
        "style": "",  # adapters applied in every LoRA branch (comma-separated names), as the released style_lora
        "background": "",  # deviation: these adapters' branches take the cells no other mask covers (names, or
        # "auto": every adapter of kind background)
        "background_in_objects": "auto",  # with background: the fraction of its UNet weight each background
        # adapter has in every object's branch, which also keeps its trigger; auto: 0.5 beside one object, off
        # beside more; off: neither (session 29's fusion)
        "latent_update": True,
        "step_size": 20.0,  # eta in z <- z - eta * dL/dz
        "max_iter_to_alter": -1,  # update on steps < this; -1: the preset's, scaled to T (T/2)
        "iterative_steps": "auto",  # steps with inner iterations: "auto" (preset's, scaled), "0,10,20", "none"
        "inner_iterations": -1,  # K extra updates at each iterative step; -1: the preset's 20, scaled to T
        "tau": 0.5,
        "mask_threshold": 0.4,  # mask = map > alpha * max(map)
        "apply_mask_after": 0,  # before this step every mask is all ones (plain average)
        "mask_morphology": "none",  # none / erode / dilate / open / close (3x3), on LoRA masks
        "attention_source": "both",  # "both" CFG halves (CLoRA code) or "cond" only
        "attention_factor": 0,  # image pixels per map cell; 0 = auto (32, or 16 for tiny latents)
        "refresh_after_update": False,  # re-run the branches on the updated latent for fusion
        "backprop": "auto",  # "branchwise" (one graph alive), "joint" (all N graphs) or auto (joint below 32x32 latents)
        "batch_branches": "auto",  # graph-free passes of all branches as one batched UNet call: auto (latents < 32x32), on, off
        "grad_checkpoint": "auto",  # graph passes recompute blocks in backward: auto (fine from 32x32 latents), fine, all, off
        "split_rows": "auto",  # graph passes one CFG row at a time (half the graph memory): auto (latents >= 32x32), on, off
        "grad_clip": 0.0,  # > 0: cap the norm of dL/dz
        "use_text_encoder_lora": True,  # encode each branch with its adapter's text-encoder weights
        "prompts": None,  # expert override: [base prompt, one per adapter]
        "token_indices": None,  # expert override: [branch][concept] -> token positions (BOS = 0)
        "mask_indices": None,  # expert override: [branch] -> token positions for its mask
    }

    # ---- setup ---------------------------------------------------------------------------
    def prepare(self, ctx: ComposeContext) -> None:
        super().prepare(ctx)
        p = self.params
        for key, allowed in (("backprop", ("auto", "branchwise", "joint")),):
            if p[key] not in allowed:
                raise GenerationError(f"clora {key} must be one of {', '.join(allowed)}; got {p[key]!r}")
        morphology(torch.zeros(1, 3, 3, dtype=torch.bool), p["mask_morphology"])  # rejects unknown ops now
        self.styles, self.concepts = self._split_styles(ctx)
        self.background_rows = self._background_rows()
        self.background_in_objects = self._background_in_objects()
        self.plan = self._plan(ctx)
        n = len(self.concepts) + 1
        groups = [sum(len(self.plan.tokens[b][g]) for b in range(n)) for g in range(n - 1)]
        for a, count in zip(self.concepts, groups):
            if count < 2:
                raise GenerationError(
                    f"concept of adapter {a.name!r} has {count} attention map(s) across branches; CLoRA needs at "
                    "least 2 (list its tokens in two or more branch prompts)"
                )
        def te(adapters) -> dict[str, float]:
            return {a.name: a.te for a in adapters if p["use_text_encoder_lora"]
                    and any(c.startswith("text_encoder") for c in a.adapter.components())}

        extras = [self._branch_extras(i) for i in range(len(self.concepts))]
        self.branches = [_Branch("base", {}, ctx.encode(self.plan.prompts[0], {}))]
        for a, more, prompt in zip(self.concepts, extras, self.plan.prompts[1:]):
            self.branches.append(_Branch(a.name, {a.name: a.unet, **{x.name: x.unet for x in more}},
                                         ctx.encode(prompt, te([a] + more))))
        keys = self.branches[0].cond.embeds.shape[1]
        for b, groups_b in enumerate(self.plan.tokens):
            for toks in groups_b + [self.plan.mask_tokens[b]]:
                if any(t < 0 or t >= keys for t in toks):
                    raise GenerationError(f"token index out of range 0..{keys - 1} in branch {b}; check token_indices")
        unet = ctx.pipe.unet
        self.spec = capture_spec(unet, ctx.pipe.vae_scale_factor, ctx.height, ctx.width, p["attention_factor"])
        self.capture = AttentionCapture(unet, self.spec, p["attention_source"])
        scale = ctx.pipe.vae_scale_factor
        large = (ctx.height // scale) * (ctx.width // scale) >= CHECKPOINT_MIN_LATENT
        self.row_groups = [[]] + [[(a.adapter, a.unet)] + [(x.adapter, x.unet) for x in more]
                                  for a, more in zip(self.concepts, extras)]
        self.batch_branches = switch_param(self.name, p, "batch_branches", not large)
        self._row_adapters: dict[int, RowAdapters] = {}  # per rows per branch (2 × images)
        self.ckpt_blocks = self._checkpoint_blocks(unet, large)
        self.split_rows = switch_param(self.name, p, "split_rows", large)
        self.large = large
        self.max_iter, self.iterative, self.inner = self._schedule(ctx.steps)
        self.stats = dict(latent_updates=0, grad_forwards=0, backward_passes=0, skipped_updates=0, batched_calls=0)
        self.reset()

    def _checkpoint_blocks(self, unet, large: bool) -> list[torch.nn.Module]:
        """``grad_checkpoint``: fine / all, or on (= fine) / off / auto (fine on large latents)."""
        mode = str(self.params["grad_checkpoint"]).strip().lower()
        if mode not in ("fine", "all"):
            try:
                mode = "fine" if switch_param(self.name, self.params, "grad_checkpoint", large) else "off"
            except GenerationError:
                raise GenerationError(f"clora grad_checkpoint must be auto, fine, all or off; "
                                      f"got {self.params['grad_checkpoint']!r}") from None
        if mode == "off":
            return []
        return checkpoint_blocks(unet, self.spec.layers, self.spec.level if mode == "fine" else None)

    def _split_styles(self, ctx: ComposeContext) -> tuple[list, list]:
        """(style adapters, concept adapters) from the ``style`` parameter; at least one concept."""
        names = _name_list(self.params["style"])
        known = {a.name for a in ctx.adapters}
        if missing := [s for s in names if s not in known]:
            raise GenerationError(f"clora style adapter(s) {', '.join(missing)} are not among the composed adapters "
                                  f"({', '.join(sorted(known))}); add them to the generation")
        styles = [a for a in ctx.adapters if a.name in names]
        concepts = [a for a in ctx.adapters if a.name not in names]
        if not concepts:
            raise GenerationError("clora needs at least one concept adapter besides the style adapters")
        return styles, concepts

    def _branch_extras(self, row: int) -> list[AdapterWeight]:
        """Adapters active in concept branch ``row`` besides its own: the styles, and in an object's
        branch the background adapters at ``background_in_objects`` × their UNet weight."""
        extras = list(self.styles)
        if self.background_in_objects is not None and row not in self.background_rows:
            extras += [replace(self.concepts[r], unet=self.concepts[r].unet * self.background_in_objects)
                       for r in self.background_rows]
        return extras

    def _background_in_objects(self) -> float | None:
        """``background_in_objects`` as a UNet weight fraction, or None ("off", or no background adapter).

        Part of the background deviation. An object's mask covers whole map cells (4 × 4 on the toy
        world), more than the object; drawn by a branch without the background, those cells showed a
        pale box around every object (session 32). With the background's words and adapter in the
        object's branch they draw the background. ``auto`` (docs/benchmark.md "Session 33"): beside
        one object half the weight. On selection seeds more weight left fewer boxes around the
        crescent (10, 7, 4, 1 of 24 at 0.25, 0.5, 0.75, 1; the words alone leave them all), but at
        full weight the sky adapter melts a plus on the sky (1 of 24 held, 22 at 0.5). Beside two
        objects it is off: the plus suffered, and the words alone, ahead on selection seeds, lost
        the plus on the evaluation seeds."""
        raw = self.params["background_in_objects"]
        word = raw.strip().lower() if isinstance(raw, str) else None
        if not self.background_rows or word in ("off", "none"):
            return None
        if word == "auto":
            return 0.5 if len(self.concepts) - len(self.background_rows) == 1 else None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = -1.0
        if not 0.0 <= value <= 2.0:
            raise GenerationError(f"clora background_in_objects must be auto, off or a weight fraction from 0 to 2; "
                                  f"got {raw!r}")
        return value

    def _background_rows(self) -> list[int]:
        """Rows (among the concept branches) of the ``background`` adapters.

        A deviation from the paper, off by default: a background adapter's word attends evenly over the
        image, so its thresholded map covers every cell and the paper's fusion averages its branch into
        every object (on the toy world the sky's mask holds 16 of 16 cells beside the crescent's 4). Here
        such a branch takes the cells that no other adapter's mask covers, the base branch's share."""
        raw = self.params["background"]
        if isinstance(raw, str) and raw.strip().lower() == "auto":
            return [i for i, a in enumerate(self.concepts) if a.adapter.concept_kind == "background"]
        rows = {a.name: i for i, a in enumerate(self.concepts)}
        names = _name_list(raw)
        if missing := [s for s in names if s not in rows]:
            known = ", ".join(sorted(rows)) or "none"
            raise GenerationError(f"clora background adapter(s) {', '.join(missing)} are not among the composed "
                                  f"concept adapters ({known}); add them to the generation, and not as a style")
        return sorted(rows[s] for s in names)

    def _plan(self, ctx: ComposeContext) -> BranchPrompts:
        p = self.params
        prompts, indices = _json(p["prompts"]), _json(p["token_indices"])
        n = len(self.concepts) + 1
        if indices is not None:
            if prompts is None:
                prompts = self._auto_plan(ctx).prompts
            if len(prompts) != n or len(indices) != n or any(len(g) != n - 1 for g in indices):
                raise GenerationError(
                    f"prompts and token_indices need {n} entries (base + one per adapter), each with {n - 1} concept lists"
                )
            masks = _json(p["mask_indices"]) or [[]] + [list(indices[b][b - 1]) for b in range(1, n)]
            if len(masks) != n:
                raise GenerationError(f"mask_indices needs {n} entries (base first); got {len(masks)}")
            return BranchPrompts([str(s) for s in prompts], [[[int(t) for t in g] for g in b] for b in indices],
                                 [[int(t) for t in m] for m in masks])
        if prompts is not None:
            raise GenerationError("explicit clora prompts need explicit token_indices too; pass both or neither")
        return self._auto_plan(ctx)

    def _auto_plan(self, ctx: ComposeContext) -> BranchPrompts:
        for a in self.concepts:
            for field in ("trigger", "concept"):
                if not (getattr(a.adapter, field) or "").strip():
                    raise GenerationError(
                        f"adapter {a.name!r} has no {field} word, which CLoRA needs; set it in the library "
                        f"(adapters.load(path, trigger='sks', concept='dog') or adapter.{field} = ...)"
                    )
        concepts = [(a.name, a.adapter.trigger.strip(), a.adapter.concept.strip()) for a in self.concepts]
        shared = frozenset(self.background_rows) if self.background_in_objects is not None else frozenset()
        return branch_prompts(ctx.prompt, concepts, ctx.pipe.tokenizer, shared=shared)

    def _schedule(self, steps: int) -> tuple[int, set[int], int]:
        """(max_iter_to_alter, iterative steps, inner iterations K) for this step count.

        Auto values are the preset's scaled by T / preset steps, K included (at least 1), so the
        optimisation effort per trajectory stays in proportion: T = 50 gives the spec's 25,
        {0, 10, 20} and 20; T = 4 gives 2, {0, 1} and 2.
        """
        p, preset = self.params, PRESETS[self.params["preset"]]
        scale = steps / preset["steps"]
        max_iter = int(p["max_iter_to_alter"])
        if max_iter < 0:
            max_iter = round(preset["max_iter_to_alter"] * scale)
        it = p["iterative_steps"]
        if isinstance(it, str):
            if it.strip().lower() == "auto":
                it = [round(s * scale) for s in preset["iterative_steps"]]
            elif it.strip().lower() in ("", "none"):
                it = []
            else:
                try:
                    it = [int(s) for s in it.replace(" ", "").split(",") if s]
                except ValueError:
                    raise GenerationError(f"iterative_steps {it!r} is not a list of steps; write e.g. '0,10,20'") from None
        k = int(p["inner_iterations"])
        if k < 0:
            k = max(1, round(preset["inner_iterations"] * scale))
        return max_iter, {int(s) for s in it if int(s) < max_iter}, k

    def reset(self) -> None:
        self._cache: tuple[int, list[_Pass]] | None = None
        self.history = {"losses": [], "heatmaps": [], "masks": []}
        self.final_masks: torch.Tensor | None = None
        self.last_maps: list[torch.Tensor] | None = None

    # ---- UNet passes ---------------------------------------------------------------------
    def _scale(self, z: torch.Tensor, t) -> torch.Tensor:
        sched = self.ctx.scheduler
        return z if sched is None else sched.scale_model_input(z, t)

    def _pass(self, x_in: torch.Tensor, t, b: int, truncate: bool) -> _Pass:
        """One CFG forward of branch b on every image with capture; ``truncate`` stops after the maps."""
        ctx, br, images = self.ctx, self.branches[b], x_in.shape[0]
        cond = br.cond.rows(images)
        out = None
        ctx.rig.set(unet=br.unet)
        try:
            with self.capture.record(truncate, images=images, tail_grad=False) as rec:
                out = ctx.pipe.unet(
                    torch.cat([x_in, x_in]).to(ctx.dtype), t, encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=cond.added, return_dict=False,
                )[0]
        finally:
            ctx.rig.set(unet={})
        if truncate:
            ctx.counters.shallow_calls += images
            eps = None
        else:
            ctx.counters.unet_calls += images
            eu, ec = out.detach().chunk(2)
            eps = (eu, ec)
        return _Pass(eps, rec.image_maps()[0])

    def _batched(self, x_in: torch.Tensor, t, truncate: bool) -> list[_Pass]:
        """All branches as one UNet call of 2N rows per image (per-row adapters); same results as ``_pass`` each."""
        ctx, n, images = self.ctx, len(self.branches), x_in.shape[0]
        rows = 2 * images
        if rows not in self._row_adapters:
            self._row_adapters[rows] = RowAdapters(ctx.pipe.unet, self.row_groups, rows)
        embeds, added = branch_rows([br.cond for br in self.branches], images)
        out = None
        ctx.rig.set(unet={})
        with self._row_adapters[rows].active(), \
                self.capture.record(truncate, groups=n, images=images, tail_grad=False) as rec:
            out = ctx.pipe.unet(
                torch.cat([x_in, x_in]).to(ctx.dtype).repeat(n, *[1] * (x_in.dim() - 1)), t,
                encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False,
            )[0]
        maps = rec.image_maps()
        self.stats["batched_calls"] += 1
        if truncate:
            ctx.counters.shallow_calls += n * images
            return [_Pass(None, maps[b]) for b in range(n)]
        ctx.counters.unet_calls += n * images
        eps = out.detach().chunk(n)
        return [_Pass(tuple(e.chunk(2)), maps[b]) for b, e in enumerate(eps)]

    def _all(self, x_in: torch.Tensor, t, truncate: bool) -> list[_Pass]:
        if self.batch_branches:
            return self._batched(x_in, t, truncate)
        return [self._pass(x_in, t, b, truncate) for b in range(len(self.branches))]

    # ---- loss ----------------------------------------------------------------------------
    def loss(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """NT-Xent over min-max-normalised concept-token maps of every branch (fp32), summed over
        images: ``maps[b]`` is ``(h, w, tokens)`` or ``(images, h, w, tokens)``."""
        return self.image_losses(maps).sum()

    def image_losses(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The NT-Xent loss of every image, ``(images,)``; images are independent, so the gradient
        of their sum with respect to one image's latent is that image's own gradient."""
        maps = [m if m.dim() == 4 else m[None] for m in maps]
        return torch.stack([self._image_loss([m[i] for m in maps]) for i in range(maps[0].shape[0])])

    def _image_loss(self, maps: list[torch.Tensor]) -> torch.Tensor:
        emb, labels = [], []
        for b, groups in enumerate(self.plan.tokens):
            for g, toks in enumerate(groups):
                for tok in toks:
                    emb.append(minmax(maps[b][:, :, tok].flatten()))
                    labels.append(g)
        if not emb:
            return torch.zeros((), device=maps[0].device)
        return nt_xent(torch.stack(emb), torch.tensor(labels, device=maps[0].device), self.params["tau"])

    def latent_grad(self, z: torch.Tensor, t, full: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[_Pass]]:
        """(loss per image, dL/dz, the passes at z) for the fp32 latents z (one row per image) at t.

        Branchwise: maps without a graph, dL/dmaps, then one VJP per branch (one graph alive).
        Joint (``backprop``; auto below 32×32 latents): one graph pass of all branches (one batched
        call with ``batch_branches``) and one backward, no graph-free pass.
        ``full`` makes the passes complete UNet calls whose eps feed the step's prediction; in a
        joint graph pass the layers after the last captured one then run graph-free.
        """
        z = master(z)
        n, images = len(self.branches), z.shape[0]
        if self.params["backprop"] == "joint" or (self.params["backprop"] == "auto" and not self.large):
            zz = z.clone().requires_grad_(True)
            with torch.enable_grad():
                passes = self._all(self._scale(zz, t), t, truncate=not full)
                losses = self.image_losses([ps.maps for ps in passes])
                loss = losses.sum()
                grad = torch.autograd.grad(loss, zz)[0] if loss.requires_grad else torch.zeros_like(z)
            self.stats["grad_forwards"] += n * images
            self.stats["backward_passes"] += images
            return losses.detach(), grad, [_Pass(ps.eps, ps.maps.detach()) for ps in passes]
        with torch.no_grad():
            passes = self._all(self._scale(z, t), t, truncate=not full)
        leaves = [master(ps.maps).requires_grad_(True) for ps in passes]
        with torch.enable_grad():
            losses = self.image_losses(leaves)
            loss = losses.sum()
            gmaps = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * n
        grad = torch.zeros_like(z)
        for b, g in enumerate(gmaps):
            if g is None or not torch.any(g):
                continue
            grad += self._vjp(z, t, b, g)
            self.stats["grad_forwards"] += images
            self.stats["backward_passes"] += images
        return losses.detach(), grad, passes

    def _vjp(self, z: torch.Tensor, t, b: int, gmap: torch.Tensor) -> torch.Tensor:
        """(dmaps_b/dz)ᵀ · gmap: branch b's truncated pass with a graph, back-propagated at once.

        The branch's adapters stay set through the backward, which recomputes the checkpointed
        blocks (``grad_checkpoint``): the graph then holds only their inputs, not their insides.
        ``z`` and ``gmap`` hold one row per image; all images run in one graph pass.
        """
        ctx, br, images = self.ctx, self.branches[b], z.shape[0]
        cond = br.cond.rows(images)
        # halves of the [uncond, cond] pair whose maps feed the loss, run together or one at a time
        halves = [1] if self.capture.source == "cond" else [0, 1]
        groups = [halves] if not self.split_rows else [[h] for h in halves]
        grad = torch.zeros_like(z)
        ctx.rig.set(unet=br.unet)
        try:
            for group in groups:
                zz = z.clone().requires_grad_(True)
                sel = slice(group[0] * images, (group[-1] + 1) * images)
                added = None if cond.added is None else {k: v[sel] for k, v in cond.added.items()}
                with torch.enable_grad(), _checkpointed(self.ckpt_blocks):
                    x_in = self._scale(zz, t).to(ctx.dtype)
                    with self.capture.record(True, images=images, halves=len(group)) as rec:
                        ctx.pipe.unet(
                            torch.cat([x_in] * len(group)), t,
                            encoder_hidden_states=cond.embeds[sel], added_cond_kwargs=added, return_dict=False,
                        )
                    # the map is a mean over halves: each half-group's share of it
                    share = len(group) / len(halves)
                    grad += share * torch.autograd.grad(rec.image_maps()[0], zz, grad_outputs=gmap)[0]
            ctx.counters.shallow_calls += images
            return grad
        finally:
            ctx.rig.set(unet={})

    # ---- protocol ------------------------------------------------------------------------
    def updates_at(self, step: int) -> bool:
        p = self.params
        return bool(p["latent_update"]) and step < self.max_iter

    def guide(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        """Contrastive latent update(s) at this step; the last pass's eps and maps feed ``predict``."""
        if not self.updates_at(step):
            return x
        p = self.params
        z = master(x)
        rounds = 1 + (self.inner if step in self.iterative else 0)
        for r in range(rounds):
            losses, grad, passes = self.latent_grad(z, t, full=(r == rounds - 1))
            per_image = grad.flatten(1)
            if p["grad_clip"] > 0:  # per image, as each image's own update
                norm = per_image.norm(dim=1)
                clip = torch.where(norm > p["grad_clip"], p["grad_clip"] / norm, torch.ones_like(norm))
                grad = grad * clip.view(-1, *[1] * (grad.dim() - 1))
            finite = torch.isfinite(per_image).all(dim=1)
            step_size = float(p["step_size"]) * finite.to(z.dtype).view(-1, *[1] * (z.dim() - 1))
            z = z - step_size * torch.nan_to_num(grad)
            self.stats["latent_updates"] += int(finite.sum())
            self.stats["skipped_updates"] += int((~finite).sum())
            self.history["losses"].append((step, float(losses[-1])))  # the last image's, as for one image
        self._cache = (step, passes)
        return z.to(x.dtype)

    def predict(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == step and not self.params["refresh_after_update"]:
            passes = self._cache[1]
        else:
            passes = self._all(x, t, truncate=False)
        self._cache = None
        maps = [ps.maps for ps in passes]  # (images, h, w, tokens) per branch
        images, n = x.shape[0], len(passes)
        masks = torch.stack([self.masks([m[i] for m in maps], step) for i in range(images)])  # (images, N, h, w)
        self._record([m[-1] for m in maps], masks[-1])
        lat = F.interpolate(masks.flatten(0, 1).float()[:, None], size=x.shape[-2:], mode="nearest")
        lat = lat.view(images, n, 1, *x.shape[-2:])  # (images, N, 1, h, w)
        self.final_masks = lat[-1]
        den = lat.sum(1)
        eu = sum(lat[:, b] * ps.eps[0].float() for b, ps in enumerate(passes)) / den
        ec = sum(lat[:, b] * ps.eps[1].float() for b, ps in enumerate(passes)) / den
        return self.ctx.cfg(eu, ec)

    def masks(self, maps: list[torch.Tensor], step: int) -> torch.Tensor:
        """Binary (N, h, w) masks at map resolution; branch 0 (base) takes the uncovered pixels."""
        n, (h, w) = len(maps), maps[0].shape[:2]
        if step < int(self.params["apply_mask_after"]):
            return torch.ones(n, h, w, dtype=torch.bool, device=maps[0].device)
        lora = threshold_masks(torch.stack(maps[1:]), self.plan.mask_tokens[1:], float(self.params["mask_threshold"]))
        lora = morphology(lora, self.params["mask_morphology"])
        if self.background_rows:
            lora = background_takes_free_cells(lora, self.background_rows)
        return assign_background(lora)

    def _record(self, maps: list[torch.Tensor], masks: torch.Tensor) -> None:
        heat = np.stack([
            np.stack([m[:, :, toks].mean(-1).float().cpu().numpy() for toks in groups])
            for m, groups in zip(maps, self.plan.tokens)
        ]).astype(np.float16)  # (N, G, h, w)
        self.history["heatmaps"].append(heat)
        self.history["masks"].append(masks.cpu().numpy())
        self.last_maps = maps

    def effective(self) -> dict:
        out = super().effective()
        out["te_mode"] = "per_branch" if self.params["use_text_encoder_lora"] else "none"
        out["style"] = [s.name for s in getattr(self, "styles", [])]
        if rows := getattr(self, "background_rows", []):
            out["background"] = [self.concepts[r].name for r in rows]
            out["deviation"] = "; ".join(filter(None, [out.get("deviation"), BACKGROUND_DEVIATION]))
            if (share := getattr(self, "background_in_objects", None)) is not None:
                out["background_in_objects"] = share
                out["deviation"] += "; " + BACKGROUND_IN_OBJECTS_DEVIATION
        if hasattr(self, "max_iter"):
            out["schedule"] = {"max_iter_to_alter": self.max_iter, "iterative_steps": sorted(self.iterative),
                               "inner_iterations": self.inner, "step_size": float(self.params["step_size"]),
                               "latent_update": bool(self.params["latent_update"])}
        return out

    def report(self) -> dict:
        rep = super().report()
        labels = [br.label for br in self.branches]
        concepts = labels[1:]
        rep.update(self.stats)
        rep["full_forwards"] = rep["unet_calls"]
        rep["truncated_forwards"] = rep["shallow_calls"]
        last_heat = self.history["heatmaps"][-1] if self.history["heatmaps"] else None
        last_mask = self.history["masks"][-1] if self.history["masks"] else None
        rep["masks"] = {} if last_mask is None else {lab: last_mask[b] for b, lab in enumerate(labels)}
        rep["heatmaps"] = {} if last_heat is None else {
            f"{lab}: {c}": last_heat[b, g] for b, lab in enumerate(labels) for g, c in enumerate(concepts)
        }
        rep["clora"] = {
            "prompts": self.plan.prompts,
            "token_indices": self.plan.tokens,
            "mask_indices": self.plan.mask_tokens,
            "capture_layers": list(self.spec.layers),
            "attention_size": list(self.spec.size),
            "attention_factor": self.spec.factor,
            "max_iter_to_alter": self.max_iter,
            "iterative_steps": sorted(self.iterative),
            "inner_iterations": self.inner,
            "final_latent_masks": self.final_masks,
        }
        rep["history"] = {  # per step, last image: (N, G, h, w) heatmaps, (N, h, w) masks, losses per update
            "heatmaps": self.history["heatmaps"],
            "masks": self.history["masks"],
            "losses": self.history["losses"],
        }
        return rep


def _json(value):
    """Expert overrides arrive from the CLI as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise GenerationError(f"cannot read {value[:40]!r} as JSON; write e.g. [[[2], [5]], [[2, 3], [6]]]") from None
    return value
