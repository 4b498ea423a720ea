"""The one denoising loop, and the context every composer predicts noise through.

A generation: encode prompts per branch (``ComposeContext.encode``), draw latents from a fresh
per-image generator, then at every step ask the composer for an optional latent update
(``guide``) and a CFG-combined noise prediction (``predict``), step the scheduler, decode.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .adapters.activation import AdapterRig
from .adapters.adapter import Adapter
from .errors import GenerationError


class GenerationCancelled(GenerationError):
    """The user pressed Stop; no image is returned for the interrupted generation."""


@dataclass
class Conditioning:
    """Text conditioning for one branch, batched as [uncond, cond]."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds, time_ids

    def rows(self, images: int) -> "Conditioning":
        """The same conditioning for ``images`` latents at once: [uncond × images; cond × images],
        the row order of ``torch.cat([x, x])`` on a batch of images (``x.chunk(2)`` splits it)."""
        if images == 1:
            return self
        added = None if self.added is None else {k: v.repeat_interleave(images, 0) for k, v in self.added.items()}
        return Conditioning(self.embeds.repeat_interleave(images, 0), added)


@dataclass
class AdapterWeight:
    """One adapter in a generation, with its UNet and text-encoder weights."""

    adapter: Adapter
    unet: float = 1.0
    te: float = 1.0

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass
class Counters:
    unet_calls: int = 0  # full UNet forwards (one per branch per step per image; uncond+cond batched)
    shallow_calls: int = 0  # partial UNet forwards (feature caching)
    cache_hits: int = 0
    text_encodes: int = 0
    seconds: float = 0.0


@dataclass
class ComposeContext:
    """What a composer may use: the pipeline, the adapters with weights, and the UNet call."""

    pipe: object
    rig: AdapterRig
    adapters: list[AdapterWeight]
    prompt: str
    negative_prompt: str
    guidance: float
    steps: int
    width: int
    height: int
    arch: str
    device: torch.device
    dtype: torch.dtype
    timesteps: torch.Tensor | None = None
    scheduler: object | None = None  # set by ``denoise``; composers that guide latents scale inputs with it
    counters: Counters = field(default_factory=Counters)
    shared_cache: dict = field(default_factory=dict)  # owned by the Studio: survives across calls
    _cond_cache: dict = field(default_factory=dict)

    def encode(self, prompt: str | None = None, te_weights: dict[str, float] | None = None) -> Conditioning:
        """Encode [negative, prompt] with these text-encoder adapter weights (cached)."""
        prompt = self.prompt if prompt is None else prompt
        key = (prompt, tuple(sorted((te_weights or {}).items())))
        if key in self._cond_cache:
            return self._cond_cache[key]
        self.rig.set(text=te_weights or {})
        pipe, neg = self.pipe, self.negative_prompt or None
        with torch.no_grad():
            if self.arch == "sdxl":
                pe, npe, pooled, npooled = pipe.encode_prompt(
                    prompt, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=True, negative_prompt=neg,
                )
                time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]],
                                        device=self.device, dtype=pe.dtype)
                added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": time_ids.repeat(2, 1)}
                cond = Conditioning(torch.cat([npe, pe]), added)
            else:
                pe, npe = pipe.encode_prompt(prompt, self.device, 1, True, negative_prompt=neg)
                cond = Conditioning(torch.cat([npe, pe]))
        self.rig.set(text={})
        self.counters.text_encodes += 1
        self._cond_cache[key] = cond
        return cond

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional half runs: guidance > 1, as in diffusers' pipelines (and so the
        released ComposLoRA/CMLoRA code); at guidance ≤ 1 the prediction is the conditional one."""
        return self.guidance > 1.0

    def eps(self, x: torch.Tensor, t, cond: Conditioning, weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet call on [x, x] with these UNet adapter weights: (eps_uncond, eps_cond).

        ``x`` may hold several images (rows); each gets the same conditioning. At guidance ≤ 1
        only the conditional rows run and (eps_cond, eps_cond) comes back, so ``cfg`` returns
        eps_cond exactly, as the released pipelines do."""
        images = x.shape[0]
        cond = cond.rows(images)
        rows = slice(None) if self.uses_cfg else slice(images, 2 * images)
        added = cond.added if cond.added is None or self.uses_cfg else {k: v[rows] for k, v in cond.added.items()}
        self.rig.set(unet=weights)
        try:
            out = self.pipe.unet(
                (torch.cat([x, x]) if self.uses_cfg else x).to(self.dtype), t,
                encoder_hidden_states=cond.embeds[rows], added_cond_kwargs=added, return_dict=False,
            )[0]
        finally:
            self.rig.set(unet={})
        self.counters.unet_calls += images
        if not self.uses_cfg:
            return out, out
        eu, ec = out.chunk(2)
        return eu, ec

    def cfg(self, eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> torch.Tensor:
        return eps_uncond + self.guidance * (eps_cond - eps_uncond)

    def cached(self, key, make: Callable[[], object], keep: int = 8) -> tuple[object, bool]:
        """A value kept by the Studio across calls (e.g. a merged adapter): (value, was_cached)."""
        if key in self.shared_cache:
            return self.shared_cache[key], True
        value = self.shared_cache[key] = make()
        while len(self.shared_cache) > keep:
            self.shared_cache.pop(next(iter(self.shared_cache)))
        return value, False

    def unet_weights(self) -> dict[str, float]:
        return {a.name: a.unet for a in self.adapters}

    def te_weights(self) -> dict[str, float]:
        return {a.name: a.te for a in self.adapters}


StepCallback = Callable[[int, int, torch.Tensor], None]


def initial_latents(ctx: ComposeContext, seed: int | Sequence[int], scheduler) -> torch.Tensor:
    """Noise from a fresh CPU generator per image (device-independent): one row per seed, each
    row what that seed alone gives, so a batch of images starts where its serial twins do."""
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    factor = ctx.pipe.vae_scale_factor
    shape = (1, ctx.pipe.unet.config.in_channels, ctx.height // factor, ctx.width // factor)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
                       for s in seeds])
    return (noise * scheduler.init_noise_sigma).to(ctx.device)


def denoise(
    ctx: ComposeContext,
    composer,
    latents: torch.Tensor,
    scheduler,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The loop: guide, predict, step. Latents are kept in fp32 between steps.

    ``generator`` feeds the noise of ancestral / SDE samplers (Euler a, DPM++ 2M SDE), so those
    images are reproducible from the seed too.
    """
    start = time.perf_counter()
    timesteps = scheduler.timesteps
    ctx.scheduler = scheduler
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(tqdm(timesteps, desc=composer.name, disable=not progress, leave=False)):
        if should_stop is not None and should_stop():
            raise GenerationCancelled("generation stopped by the user")
        latents = composer.guide(latents, t, i)
        with torch.no_grad():
            x_in = scheduler.scale_model_input(latents, t)
            eps = composer.predict(x_in, t, i)
            latents = scheduler.step(eps.float(), t, latents, return_dict=False, **step_kwargs)[0]
        if on_step is not None:
            for row in latents.split(1):  # one call per image, as serial generation makes
                on_step(i, len(timesteps), row)
    ctx.counters.seconds += time.perf_counter() - start
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """Latents to a PIL image with the VAE (upcast when the VAE asks for it in fp16)."""
    return decode_all(pipe, latents)[0]


@torch.no_grad()
def decode_all(pipe, latents: torch.Tensor) -> list:
    """A batch of latents to PIL images, one VAE call (upcast when the VAE asks for it in fp16)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def latent_preview(latents: torch.Tensor):
    """A cheap RGB preview of latents (no VAE): the first three channels, normalised."""
    from PIL import Image

    z = latents[0, :3].float()
    z = (z - z.amin()) / (z.amax() - z.amin() + 1e-6)
    arr = (z.permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")
    return Image.fromarray(arr).resize((latents.shape[-1] * 8, latents.shape[-2] * 8))
