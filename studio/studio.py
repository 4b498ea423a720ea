"""``Studio``: the one API behind the app, the CLI and scripts.

Load a base (the bundled toy model, a folder or hub id, or an existing pipeline), keep an
adapter library for it, and generate with any composition method. Every image carries the full
recipe in its PNG metadata and can be reproduced from it.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .adapters.activation import AdapterRig
from .adapters.adapter import Adapter
from .adapters.library import AdapterLibrary
from .base import (
    build_tiny_pipeline, detect_arch, load_pipeline, make_scheduler,
    model_hash, module_shapes, pick_device, resolve_sampler, sampler_label,
)
from .errors import GenerationError, ModelLoadError
from .guidance import default_cfg
from .method_pick import MethodPick, suggest_method
from .schema import Limits, check_method_params, check_request, check_weights, finite, whole
from .metadata import AdapterUse, Recipe, attach, read_recipe
from .prompts import format_tag, parse_prompt
from .sampling import AdapterWeight, ComposeContext, StepCallback, decode_all, denoise, initial_latents

AdapterSpec = Union[str, tuple, Adapter, AdapterWeight]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    recipes: list[Recipe]
    report: dict = field(default_factory=dict)


class Studio:
    """A base pipeline, its adapter library, and generation with composition methods."""

    def __init__(self, pipe, model_id: str, arch: str | None = None, note: str | None = None,
                 source: str | Path | None = None):
        self.pipe = pipe
        self.model_id = model_id
        self.source = source  # the file or folder loaded, for the A1111 ``Model hash``
        self._model_hash: str | None = None
        self.arch = arch or detect_arch(pipe)
        self.note = note  # shown by the app, e.g. "placeholder model"
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
            model = getattr(pipe, comp, None)
            if model is not None:
                model.requires_grad_(False).eval()
        self.adapters = AdapterLibrary(module_shapes(pipe), self.arch)
        self._lock = threading.RLock()  # one generation owns the UNet's adapter hooks at a time
        self._composer_cache: dict = {}  # e.g. LEGO merges, keyed by a hash of their inputs
        self.limits: Limits = Limits.from_env()  # resource bounds (README "Limits and bad input")

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | None = None, device=None, dtype=None) -> "Studio":
        """The bundled toy model (no argument), or an SD1.x/2.x/SDXL folder, file or hub id.

        ``"tiny-random-sd1"`` / ``"tiny-random-sdxl"`` build random-weight pipelines (seed 0) for
        tests and demos; they are never used in place of a missing toy model.
        """
        if source is None:
            return cls._load_toy(device, dtype)
        if str(source) in ("tiny-random-sd1", "tiny-random-sdxl"):
            arch = str(source).rsplit("-", 1)[1]
            pipe = build_tiny_pipeline(arch).to(device or pick_device()[0])
            return cls(pipe, str(source), arch=arch, note="random weights: a test model, images are noise")
        pipe = load_pipeline(source, device, dtype)
        from .toyworld.paths import is_toy_world

        arch = "toy" if is_toy_world(source) else None  # a toy world loaded by path (e.g. one being rebuilt)
        return cls(pipe, str(source), arch=arch, source=source if Path(str(source)).exists() else None)

    @classmethod
    def _load_toy(cls, device=None, dtype=None) -> "Studio":
        """The bundled toy model, or a ModelLoadError naming the fix (never a random model in its place)."""
        from .resources import TOY_MODEL_FIX, toy_model_dir

        default_device, _ = pick_device()
        device = device or default_device
        folder = toy_model_dir()
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled toy model is missing (looked in {folder}); {TOY_MODEL_FIX}")
        try:
            pipe = load_pipeline(folder, device, dtype or torch.float32)
        except Exception as e:  # corrupt or partial folder
            raise ModelLoadError(f"the bundled toy model in {folder} is corrupt ({e}); {TOY_MODEL_FIX}") from e
        return cls(pipe, "toy-sd", arch="toy", source=folder)

    @classmethod
    def from_pipeline(cls, pipe, model_id: str | None = None) -> "Studio":
        """Wrap an existing StableDiffusionPipeline / StableDiffusionXLPipeline (no weight copy)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise ModelLoadError(f"{type(pipe).__name__} is not supported; pass a StableDiffusionPipeline or StableDiffusionXLPipeline")
        name = model_id or getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or type(pipe).__name__
        return cls(pipe, str(name))

    @property
    def model_hash(self) -> str:
        """A1111's 10-hex ``Model hash`` of the base (computed once, on first use)."""
        if self._model_hash is None:
            self._model_hash = model_hash(self.pipe, self.source)
        return self._model_hash

    @property
    def default_guidance(self) -> float:
        """7.5 for real models; 3 for the toy model, whose colours drift at high guidance (README)."""
        return default_cfg(self.arch)

    def default_guidance_for(self, method: str) -> float:
        """The CFG scale a run of ``method`` gets when none is given (``studio.guidance``)."""
        return default_cfg(self.arch, method)

    def suggest_method(self, prompt: str, adapters: Sequence[str] = ()) -> MethodPick | None:
        """The composition method suggested for the library adapters tagged in ``prompt`` or named in
        ``adapters``, by their concept kinds (``studio.method_pick``: measured on the toy world only)."""
        _, tags = parse_prompt(prompt)
        names = dict.fromkeys(n for n in [*(t.name for t in tags), *adapters] if n in self.adapters)
        return suggest_method(self.arch, [self.adapters.get(n).concept_kind for n in names])

    @property
    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompt: str, adapters: Sequence[AdapterSpec] = (), **kwargs) -> list[Image.Image]:
        """Images for a prompt; ``<lora:name:weight>`` tags in it select library adapters."""
        return self.run(prompt, adapters, **kwargs).images

    def run(
        self,
        prompt: str,
        adapters: Sequence[AdapterSpec] = (),
        method: str = "merge",
        method_params: dict | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int = -1,
        negative_prompt: str | None = None,
        num_images: int = 1,
        sampler: str | None = None,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: bool = True,
        on_image: Callable[[int, Image.Image, Recipe], None] | None = None,
        batch_size: int | None = None,
        seeds: Sequence[int] | None = None,
    ) -> GenerationResult:
        """Like ``generate``, also returning each image's recipe and the composer's report.

        ``steps``, ``guidance``, ``sampler`` and ``negative_prompt`` left as None take the value of a
        preset named in ``method_params`` (``preset=paper``, ``preset=notebook``), else the studio's
        defaults (25, 7.5 / 3 on the toy model, ddim, none); adapters given without a weight take the
        preset's LoRA weight. The report's ``from_preset`` lists the values that came from the preset.
        ``on_image(i, image, recipe)`` is called as each image is finished, so a caller that is
        stopped mid-batch (``GenerationCancelled``) still has the images done before.

        The ``num_images`` images go through every UNet call together, ``batch_size`` at a time
        (None: ``auto_batch_size``); each keeps its own seed (``seed + i``) and equals the image a
        one-image request with that seed gives (within float rounding, tested). ``seeds`` gives
        every image's seed explicitly instead (``num_images`` is then its length).
        """
        from composers import make_composer

        limits = self.limits.for_model(self.default_size)  # validation boundary: refuse before any work
        if isinstance(adapters, (str, Adapter, AdapterWeight)) or not isinstance(adapters, Sequence):
            raise GenerationError(f"adapters must be a list (of names, (name, weight) pairs or Adapters), got "
                                  f"{type(adapters).__name__}; write e.g. adapters=[\"{adapters}\"]"[:300])
        method_params = check_method_params(method_params)
        if not isinstance(method, str):
            raise GenerationError(f"method must be a method name, got {method!r}"[:200])
        composer = make_composer(method, method_params)
        preset = composer.named_preset()
        run = preset.run_settings() if preset is not None else {}
        given = {"steps": steps, "guidance": guidance, "sampler": sampler, "negative_prompt": negative_prompt}
        from_preset = {k: run[k] for k, v in given.items() if v is None and k in run}
        steps = from_preset.get("steps", 25 if steps is None else steps)
        guidance = from_preset.get("guidance", self.default_guidance_for(method) if guidance is None else guidance)
        sampler = from_preset.get("sampler", "ddim" if sampler is None else sampler)
        negative_prompt = from_preset.get("negative_prompt", "" if negative_prompt is None else negative_prompt)
        width, height = width or self.default_size, height or self.default_size
        if seeds is not None:
            seeds = [whole(f"seeds[{i}]", s) % 2**32 for i, s in enumerate(seeds)]
            num_images = len(seeds)
        check_request(limits, prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                      width=width, height=height, seed=-1 if seed is None else seed, num_images=num_images,
                      sampler=sampler, method=method)
        _check_params(steps, guidance, width, height, num_images, batch_size)
        sampler = resolve_sampler(sampler)  # A1111 labels ("DPM++ 2M Karras") become our short names
        text, tags = parse_prompt(prompt)
        if tags and adapters:
            raise GenerationError("adapters given both as <lora:…> tags and as a list; use one or the other")
        weight = run.get("weight")
        if weight is not None and not tags and any(_weightless(a) for a in adapters):
            from_preset["weight"] = weight
        chosen = [AdapterWeight(self.adapters.get(t.name), t.unet, t.te) for t in tags] or \
            [self._resolve(a, weight if _weightless(a) else None) for a in adapters]
        check_weights(limits, [(a.name, a.unet, a.te) for a in chosen])
        names = [a.name for a in chosen]
        if len(set(names)) != len(names):
            raise GenerationError(f"adapter listed twice in {names}; give each adapter once")
        seed = secrets.randbelow(2**32) if seed is None or seed < 0 else int(seed)
        display_prompt = prompt if tags else " ".join(
            [text] + [format_tag(a.name, a.unet) if a.te == a.unet else f"<lora:{a.name}:{a.te:g}:{a.unet:g}>" for a in chosen]
        )

        images, recipes, packages = [], [], _versions()
        with self._lock, AdapterRig(self.pipe, [a.adapter for a in chosen]) as rig, torch.no_grad():
            ctx = ComposeContext(
                pipe=self.pipe, rig=rig, adapters=chosen, prompt=text, negative_prompt=negative_prompt,
                guidance=float(guidance), steps=int(steps), width=int(width), height=int(height),
                arch=self.arch, device=self.device, dtype=self.dtype, shared_cache=self._composer_cache,
            )
            with torch.enable_grad():  # composers that guide latents (CLoRA) need autograd in prepare
                composer.prepare(ctx)
            size = batch_size or auto_batch_size(self.device, int(width), int(height), self.pipe.vae_scale_factor)
            seeds = seeds or [(seed + i) % 2**32 for i in range(num_images)]
            counter = tqdm(total=num_images, desc="images", unit="image", disable=not progress or num_images == 1)
            for start in range(0, num_images, size):  # the image counter with its ETA; step bars run below it
                chunk = seeds[start:start + size]
                scheduler = make_scheduler(self.pipe, sampler)
                scheduler.set_timesteps(steps, device=self.device)
                ctx.timesteps = scheduler.timesteps
                composer.reset()
                latents = initial_latents(ctx, chunk, scheduler)
                with torch.enable_grad():
                    # ancestral / SDE noise: one generator per image, each row drawn from its own
                    generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
                    latents = denoise(ctx, composer, latents, scheduler, on_step, should_stop, progress,
                                      generator=generators[0] if len(generators) == 1 else generators)
                for image_seed, image in zip(chunk, decode_all(self.pipe, latents)):
                    recipe = Recipe(
                        prompt=display_prompt, negative_prompt=negative_prompt, steps=int(steps),
                        guidance=float(guidance), sampler=sampler, seed=image_seed, width=int(width),
                        height=int(height), model=self.model_id, arch=self.arch, method=method,
                        method_params=dict(method_params or {}), effective=composer.effective(),
                        from_preset=dict(from_preset),
                        adapters=[AdapterUse(a.name, a.unet, a.te, a.adapter.sha256, a.adapter.path, a.adapter.kind)
                                  for a in chosen],
                        version=__version__, packages=packages, model_hash=self.model_hash,
                    )
                    images.append(attach(image, recipe, sampler_label(sampler)))
                    recipes.append(recipe)
                    counter.update(1)
                    if on_image is not None:
                        on_image(len(images) - 1, images[-1], recipe)
            counter.close()
            report = composer.report()
        report["from_preset"] = dict(from_preset)
        report["batch_size"] = min(size, num_images)
        return GenerationResult(images, recipes, report)

    def merge(
        self,
        adapters: Sequence[str | Adapter],
        weights: Sequence[float] | None = None,
        method: str = "lego",
        rank: int | None = None,
        name: str = "merged",
        add: bool = True,
        **options,
    ) -> Adapter:
        """Merge adapters in weight space into one LoRA (LEGO, cat, linear, svd, ties_svd, dare_ties_svd)."""
        from .adapters.merge import merge_adapters

        sources = [a if isinstance(a, Adapter) else self.adapters.get(a) for a in adapters]
        merged = merge_adapters(sources, list(weights) if weights is not None else None, method, rank, name=name, **options)
        merged.arch = merged.arch or self.arch
        return self.adapters.add(merged) if add else merged

    def train(self, config=None, **kwargs) -> Adapter:
        """DreamBooth-train a LoRA or Kronecker adapter on this base (``training.dreambooth.TrainConfig``)
        and add it to the library."""
        from training.dreambooth import train_adapter

        return self.adapters.add(train_adapter(self, config, **kwargs))

    def reproduce(self, source: str | Path | Image.Image | Recipe, **overrides) -> GenerationResult:
        """Generate again from a studio PNG (or its recipe), loading its adapters when needed."""
        recipe = source if isinstance(source, Recipe) else read_recipe(source)
        for use in recipe.adapters:
            if use.name not in self.adapters:
                if not use.path or not Path(use.path).is_file():
                    raise GenerationError(
                        f"adapter {use.name!r} of the recipe is not loaded and its file {use.path!r} is missing; load it first"
                    )
                if Path(use.path).suffix.lower() != ".safetensors":  # a recipe never makes us open a pickle
                    raise GenerationError(f"adapter {use.name!r} of the recipe points at {use.path!r}, not a .safetensors "
                                          "file; load the adapter yourself first")
                self.adapters.load(use.path, name=use.name)
            loaded = self.adapters.get(use.name)
            if use.sha256 and loaded.sha256 and use.sha256 != loaded.sha256:
                raise GenerationError(f"adapter {use.name!r} differs from the one in the recipe (hash mismatch); load the original file")
        params = dict(
            prompt=recipe.prompt, method=recipe.method, method_params=recipe.method_params, steps=recipe.steps,
            guidance=recipe.guidance, width=recipe.width, height=recipe.height, seed=recipe.seed,
            negative_prompt=recipe.negative_prompt, sampler=recipe.sampler, num_images=1,
        )
        params.update(overrides)
        return self.run(**params)

    def _resolve(self, spec: AdapterSpec, weight: float | None = None) -> AdapterWeight:
        """An adapter with its weights; ``weight`` replaces the preferred weight of a weightless spec."""
        if isinstance(spec, AdapterWeight):
            return spec
        if isinstance(spec, Adapter):
            w = spec.weight if weight is None else weight
            return AdapterWeight(spec, w, w)
        if isinstance(spec, str):
            adapter = self.adapters.get(spec)
            w = adapter.weight if weight is None else weight
            return AdapterWeight(adapter, w, w)
        if isinstance(spec, (tuple, list)) and len(spec) in (2, 3) and isinstance(spec[0], (str, Adapter)):
            adapter = spec[0] if isinstance(spec[0], Adapter) else self.adapters.get(spec[0])
            unet = finite(f"weight of adapter {adapter.name!r}", spec[1])
            return AdapterWeight(adapter, unet, finite(f"weight of adapter {adapter.name!r}", spec[2]) if len(spec) == 3 else unet)
        raise GenerationError(f"cannot use {spec!r} as an adapter; pass a library name, (name, weight) or an Adapter"[:300])


def _weightless(spec: AdapterSpec) -> bool:
    """A library name or an Adapter: given without an explicit weight."""
    return isinstance(spec, (str, Adapter))


# Images per batch on CPU: 8 gave 3.3x the throughput of one by one on the tiny random SD1 (16: 4.4x,
# docs/performance.md); 8 keeps a request's memory modest until the sweep is redone on the rebuilt
# toy model. A GPU takes as many as fit.
CPU_BATCH_SIZE = 8
GPU_BATCH_MAX = 16


def auto_batch_size(device, width: int, height: int, vae_scale_factor: int) -> int:
    """Images per batch: ``CPU_BATCH_SIZE`` on CPU; on a GPU as many as a quarter of its free memory
    holds at a rough 160 KiB of activations per latent pixel and image (SD1.5: ~0.6 GiB at 512²,
    fp16, CFG, one branch), at most ``GPU_BATCH_MAX``."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 160 * 1024 * (width // vae_scale_factor) * (height // vae_scale_factor)
    return max(1, min(GPU_BATCH_MAX, int(free // 4 // per_image)))


def _check_params(steps, guidance, width, height, num_images, batch_size=None) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise GenerationError(f"batch_size must be a positive whole number or None (auto), got {batch_size!r}")
    if not isinstance(steps, int) or steps <= 0:
        raise GenerationError(f"steps must be a positive whole number, got {steps!r}; try 25")
    if guidance < 0:
        raise GenerationError(f"guidance must be ≥ 0, got {guidance}; 7.5 is typical (1 disables the negative prompt)")
    for label, v in (("width", width), ("height", height)):
        if v <= 0 or v % 8:
            raise GenerationError(f"{label} {v} is not a positive multiple of 8; try {max(8, round(v / 8) * 8)}")
    if num_images < 1:
        raise GenerationError(f"num_images must be ≥ 1, got {num_images}")


def _versions() -> dict:
    import diffusers, transformers  # noqa: E401

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
