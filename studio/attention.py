"""Capture cross-attention maps on chosen UNet layers only, and turn maps into masks.

Only the ``attn2`` (cross-attention) layers at one resolution get an explicit-probability
processor, and only for the duration of one UNet call (``AttentionCapture.record``); every other
layer keeps its SDPA processor and nothing stays swapped in shared model state. The processor
calls ``attn.to_q/to_k/to_v/to_out`` so adapter hooks on those linears still apply.

Resolution is named by ``factor``: image pixels per map cell. The CLoRA paper uses 32 (16×16
maps at 512², i.e. ``down_blocks.2`` and ``up_blocks.1`` of SD1.5). ``choose_factor`` picks it
automatically: 32 when that gives maps of at least 4 cells a side, otherwise the next finer level
that has cross-attention (16 → 4×4 maps on the 64×64 toy model and tiny pipelines, whose 8×8
latents leave only 2×2 maps at 1/32).

Maps are ``(h, w, tokens)`` with ``h = H / factor`` and ``w = W / factor`` (rows first, as the
UNet flattens its feature maps), so non-square images are not transposed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import GenerationError

MIN_MAP_SIDE = 4  # auto resolution: the coarsest level whose maps have at least this many cells a side
MAX_AUTO_FACTOR = 32  # the paper's H/32


class StopForward(Exception):
    """Raised after the last captured layer when only the maps are wanted (truncated forward)."""


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[str, ...]  # Attention module names, e.g. "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    size: tuple[int, int]  # (h, w) of the maps
    factor: int  # image pixels per map cell
    level: int = 0  # the layers' downsampling level (0: latent resolution)


def block_levels(unet) -> dict[str, int]:
    """Each top-level block of a diffusers UNet2DConditionModel ("down_blocks.0", "mid_block",
    "up_blocks.3") -> its downsampling level.

    Level 0 is the latent resolution; each down block with a downsampler adds one; the mid block
    sits at the deepest level; each up block with an upsampler removes one.
    """
    levels: dict[str, int] = {}
    level = 0
    for i, block in enumerate(unet.down_blocks):
        levels[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None):
            level += 1
    if getattr(unet, "mid_block", None) is not None:
        levels["mid_block"] = level
    for i, block in enumerate(unet.up_blocks):
        levels[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None):
            level -= 1
    return levels


def cross_attention_levels(unet) -> dict[str, int]:
    """Every cross-attention module of a diffusers UNet2DConditionModel -> its block's level."""
    from diffusers.models.attention_processor import Attention

    return {f"{prefix}.{n}": level for prefix, level in block_levels(unet).items()
            for n, m in unet.get_submodule(prefix).named_modules()
            if isinstance(m, Attention) and m.is_cross_attention and n.endswith("attn2")}


def available_factors(unet, vae_scale: int) -> list[int]:
    """The map resolutions (pixels per cell) at which this UNet has cross-attention layers."""
    return sorted({vae_scale * 2**lv for lv in cross_attention_levels(unet).values()})


def choose_factor(unet, vae_scale: int, height: int, width: int) -> int:
    """Auto resolution: 1/32 (the paper) if maps get ≥ 4 cells a side, else the next finer level."""
    usable = [f for f in available_factors(unet, vae_scale)
              if f <= MAX_AUTO_FACTOR and height % f == 0 and width % f == 0]
    if not usable:
        raise GenerationError(
            f"{width}x{height} gives no cross-attention layer at 1/{MAX_AUTO_FACTOR} or finer; "
            f"use a size that is a multiple of {MAX_AUTO_FACTOR}"
        )
    good = [f for f in usable if min(height, width) // f >= MIN_MAP_SIDE]
    return max(good) if good else min(usable)


def capture_spec(unet, vae_scale: int, height: int, width: int, factor: int = 0) -> CaptureSpec:
    """The layers and map size for capturing at ``factor`` (0 = ``choose_factor``)."""
    factor = int(factor) or choose_factor(unet, vae_scale, height, width)
    have = available_factors(unet, vae_scale)
    if factor not in have:
        raise GenerationError(
            f"this model has no cross-attention layer at attention_factor={factor} ({width}x{height} -> "
            f"{width / factor:g}x{height / factor:g} maps); choose one of {have} or 0 for auto"
        )
    if height % factor or width % factor:
        raise GenerationError(
            f"size {width}x{height} is not a multiple of attention_factor={factor}; use multiples of {factor}"
        )
    level = int(math.log2(factor // vae_scale))
    layers = tuple(n for n, lv in cross_attention_levels(unet).items() if lv == level)
    return CaptureSpec(layers, (height // factor, width // factor), factor, level)


class _Recorder:
    """Running mean of attention probabilities over (layer, batch half, head) rows, per branch.

    A batched call holds ``groups`` branches of [uncond, cond] rows each (branch-major); each
    branch gets its own map. With ``images`` > 1 a branch's rows are [uncond × images; cond ×
    images] (``halves`` = 1: one half only) and every image gets its own map (``image_maps``).
    """

    def __init__(self, capture: "AttentionCapture", truncate: bool, groups: int = 1, images: int = 1, halves: int = 2,
                 tail_grad: bool = True):
        self.capture, self.truncate, self.groups = capture, truncate, groups
        self.images, self.halves, self.tail_grad = images, halves, tail_grad
        self.total: torch.Tensor | None = None
        self.rows = 0
        self.calls = 0

    def add(self, probs: torch.Tensor, heads: int) -> None:
        batch = probs.shape[0] // heads
        if self.images == 1 and self.halves == 2 and batch % self.groups == 0:
            halves = batch // self.groups  # [uncond, cond] pairs, or one row when a call ran one half
        elif batch == self.groups * self.images * self.halves:
            halves = self.halves
        else:
            raise RuntimeError(f"capture saw a batch of {batch}, not {self.groups} branches × {self.images} images")
        p = probs.reshape(self.groups, halves, self.images, heads, *probs.shape[1:])
        if self.capture.source == "cond":
            p = p[:, p.shape[1] // 2:]
        s = p.to(torch.promote_types(p.dtype, torch.float32)).sum(dim=(1, 3))  # fp32 (fp64 stays)
        self.total = s if self.total is None else self.total + s
        self.rows += p.shape[1] * p.shape[3]
        self.calls += 1
        if self.calls == len(self.capture.spec.layers):
            if self.truncate:
                raise StopForward
            if not self.tail_grad and torch.is_grad_enabled():
                # nothing after the last captured layer feeds the maps: the rest of the call (the
                # noise prediction) runs without recording a graph; ``record`` restores the mode
                torch.set_grad_enabled(False)

    def maps(self) -> torch.Tensor:
        """``(h, w, tokens)``; ``(groups, h, w, tokens)`` for a batched call of several branches."""
        out = self.image_maps()[:, 0]
        return out[0] if self.groups == 1 else out

    def image_maps(self) -> torch.Tensor:
        """``(groups, images, h, w, tokens)``: one map per branch and image."""
        if self.calls != len(self.capture.spec.layers):
            raise RuntimeError(f"captured {self.calls} of {len(self.capture.spec.layers)} cross-attention layers")
        h, w = self.capture.spec.size
        return (self.total / self.rows).reshape(self.groups, self.images, h, w, -1)


class CaptureProcessor:
    """Diffusers' plain ``AttnProcessor`` with the softmax probabilities handed to a recorder."""

    def __init__(self, recorder: _Recorder, expected_queries: int):
        self.recorder = recorder
        self.expected_queries = expected_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if hidden_states.shape[1] != self.expected_queries:
            raise RuntimeError(f"capture layer saw {hidden_states.shape[1]} queries, expected {self.expected_queries}")
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        # before the layer's output: a truncated call stops here, a graph-free tail starts here
        self.recorder.add(probs, attn.heads)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class AttentionCapture:
    """Captures the aggregated cross-attention map of one UNet call on ``spec.layers``.

    ``source``: "both" averages the uncond and cond halves of the CFG batch (the CLoRA code),
    "cond" uses the cond half only (Attend-and-Excite).
    """

    def __init__(self, unet, spec: CaptureSpec, source: str = "both"):
        if source not in ("both", "cond"):
            raise GenerationError(f"attention_source must be 'both' or 'cond', got {source!r}")
        self.unet, self.spec, self.source = unet, spec, source
        self.modules = [unet.get_submodule(n) for n in spec.layers]

    @contextmanager
    def record(self, truncate: bool = False, groups: int = 1, images: int = 1, halves: int = 2,
               tail_grad: bool = True):
        """Swap in capture processors for one call; ``truncate`` stops the UNet after the last one.

        Yields the recorder; ``recorder.maps()`` is the ``(h, w, tokens)`` map (fp32, with a graph
        when grad is enabled), or one per branch when the call batches ``groups`` branches. A
        truncated call's ``StopForward`` is swallowed here. ``tail_grad=False``: in a call with
        grad enabled, the layers after the last captured one run graph-free (the maps keep their
        graph, the output has none), which saves the tail's graph when only the maps are
        differentiated.
        """
        rec = _Recorder(self, truncate, groups, images, halves, tail_grad)
        h, w = self.spec.size
        saved = [m.processor for m in self.modules]
        grad_mode = torch.is_grad_enabled()  # a graph-free tail switches it off mid-call
        for m in self.modules:
            m.set_processor(CaptureProcessor(rec, h * w))
        try:
            yield rec
        except StopForward:
            pass
        finally:
            torch.set_grad_enabled(grad_mode)
            for m, p in zip(self.modules, saved):
                m.set_processor(p)


def threshold_masks(maps: torch.Tensor, token_sets: list[list[int]], alpha: float) -> torch.Tensor:
    """One binary mask per token set: on where any of its tokens exceeds alpha · its own max.

    ``maps``: (n, h, w, tokens), one map per set. An empty token set gives an all-off mask.
    """
    n, h, w, _ = maps.shape
    out = torch.zeros(n, h, w, dtype=torch.bool, device=maps.device)
    for i, toks in enumerate(token_sets):
        for t in toks:
            m = maps[i, :, :, t]
            out[i] |= m > alpha * m.max()
    return out


def morphology(masks: torch.Tensor, op: str) -> torch.Tensor:
    """3×3 max-pool erode / dilate / open / close on binary (n, h, w) masks; "none" leaves them."""
    if op in ("", "none"):
        return masks
    x = masks.float()[:, None]
    dil = lambda m: F.max_pool2d(m, 3, 1, 1)  # noqa: E731
    ero = lambda m: 1 - F.max_pool2d(1 - m, 3, 1, 1)  # noqa: E731
    ops = {"dilate": lambda m: dil(m), "erode": lambda m: ero(m),
           "open": lambda m: dil(ero(m)), "close": lambda m: ero(dil(m))}
    if op not in ops:
        raise GenerationError(f"mask_morphology must be one of none, {', '.join(ops)}; got {op!r}")
    return ops[op](x)[:, 0] > 0.5


def background_takes_free_cells(lora_masks: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The masks with each of ``rows`` replaced by the cells no other row's mask covers (all cells when
    every row is one of ``rows``). (n, h, w) -> (n, h, w)."""
    others = [i for i in range(lora_masks.shape[0]) if i not in rows]
    free = ~lora_masks[others].any(dim=0) if others else torch.ones_like(lora_masks[0])
    out = lora_masks.clone()
    out[rows] = free
    return out


def assign_background(lora_masks: torch.Tensor) -> torch.Tensor:
    """Prepend the base branch's mask: on exactly where no LoRA mask is on. (n, h, w) -> (n+1, h, w)."""
    base = ~lora_masks.any(dim=0, keepdim=True)
    return torch.cat([base, lora_masks])
