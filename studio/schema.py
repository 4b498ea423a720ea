"""Typed schemas and bounds for everything that comes from outside (PNG recipes, suites, method
parameters, CLI/API arguments).

Why one module: each face (CLI, app, eval runner, scripts) must refuse the same bad input with the
same one-line message (field, bad value, allowed range, fix) *before* any model work starts.
Bounds default to values that suit the loaded model and are overridden by environment variables
(``STUDIO_MAX_*``) or by assigning ``Studio.limits``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import GenerationError, StudioError


class RecipeError(StudioError):
    """A PNG's ``lora_studio`` recipe is malformed, oversized or unsafe to follow."""


class LimitError(GenerationError):
    """A request is over a resource bound; the message names the bound and its override."""


# ---------------------------------------------------------------------------------------------
# Resource bounds
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """Resource bounds of one request or file. ``None`` for ``max_side``/``max_work``: derived from the
    model's native size (4× its side, at least 256; work = 16 native images × 250 steps)."""

    max_side: int | None = None  # largest image side in pixels
    max_steps: int = 500  # denoising steps of one image
    max_images: int = 64  # images per request
    max_work: int | None = None  # width × height × steps × images of one request
    max_weight: float = 20.0  # |adapter weight|
    max_guidance: float = 100.0  # CFG scale
    max_prompt_chars: int = 10_000
    max_adapters: int = 32  # adapters in one request / recipe
    max_recipe_bytes: int = 1_000_000  # a PNG's text chunks (the recipe and the infotext)
    max_png_pixels: int = 64_000_000  # decoded pixels of a PNG read for its recipe
    max_adapter_tensors: int = 100_000  # tensors in one adapter file
    max_adapter_bytes: int = 8 * 2**30  # bytes of one adapter file
    max_jobs: int = 100_000  # jobs of one evaluation suite
    max_suite_bytes: int = 1_000_000  # size of a suite YAML file
    max_yaml_aliases: int = 1_000  # YAML aliases (*name) in one suite: bounds alias bombs

    @classmethod
    def from_env(cls, **overrides) -> "Limits":
        """Defaults, then ``STUDIO_MAX_<FIELD>`` environment variables, then ``overrides``."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(env_name(f.name))
            if raw is None:
                continue
            kind = float if f.name in ("max_weight", "max_guidance") else int
            try:
                value = kind(float(raw)) if kind is int else kind(raw)
            except ValueError:
                raise StudioError(f"{env_name(f.name)}={raw!r} is not a number; unset it or give e.g. "
                                  f"{env_name(f.name)}={getattr(cls, f.name) or 1024}") from None
            if not math.isfinite(value) or value <= 0:
                raise StudioError(f"{env_name(f.name)}={raw!r} must be a positive finite number; unset it or fix it")
            values[f.name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def for_model(self, native_side: int) -> "Limits":
        """Fill the model-derived bounds from the model's native image side."""
        side = self.max_side or max(256, 4 * int(native_side))
        work = self.max_work or 16 * int(native_side) ** 2 * 250
        return replace(self, max_side=side, max_work=work)


def env_name(field_name: str) -> str:
    """The environment variable that overrides a bound: ``max_side`` -> ``STUDIO_MAX_SIDE``."""
    return f"STUDIO_{field_name.upper()}"


def _over(what: str, value, bound: str, limit, fix: str) -> LimitError:
    return LimitError(f"{what} {value} is over the bound of {limit}; {fix}, or raise the bound with "
                      f"{env_name(bound)}=N (or Studio.limits)")


# ---------------------------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------------------------
def finite(name: str, value, lo: float | None = None, hi: float | None = None, fix: str = "") -> float:
    """``value`` as a finite float in [lo, hi], or a GenerationError naming the field and range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars, numeric strings from forms
        except (TypeError, ValueError):
            raise GenerationError(f"{name} must be a number, got {_show(value)}{'; ' + fix if fix else ''}") from None
    value = float(value)
    if not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value}{'; ' + fix if fix else ''}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"from {lo:g} to {hi:g}" if lo is not None and hi is not None else (f"≥ {lo:g}" if lo is not None else f"≤ {hi:g}")
        raise GenerationError(f"{name} {value:g} is out of range (allowed: {rng}){'; ' + fix if fix else ''}")
    return value


def whole(name: str, value, lo: int | None = None, fix: str = "") -> int:
    """``value`` as an int (not a bool, not a fractional float) ≥ lo."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name} must be a whole number, got {_show(value)}{'; ' + fix if fix else ''}")
    if lo is not None and value < lo:
        raise GenerationError(f"{name} must be ≥ {lo}, got {value}{'; ' + fix if fix else ''}")
    return value


def _show(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------------------------------------
# Method parameters: small JSON-like values with finite numbers
# ---------------------------------------------------------------------------------------------
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_method_params(params, where: str = "method_params") -> dict:
    """A dict of ``name: value``; values are None, bools, finite numbers (|x| ≤ 1e6), strings
    (≤ 1000 chars), or lists/dicts of those (≤ 256 items, nested at most three deep: CLoRA's
    token_indices is a list of groups of lists of positions)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise GenerationError(f"{where} must be a mapping of name: value, got {type(params).__name__} {_show(params)}; "
                              "write e.g. {\"tau\": 3}")
    for key, value in params.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise GenerationError(f"{where} has a bad parameter name {_show(key)}; names are identifiers like tau or preset")
        _check_value(f"{where}.{key}", value, 0)
    return dict(params)


def _check_value(name: str, value, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        finite(name, value, -1e6, 1e6)
        return
    if isinstance(value, str):
        if len(value) > 1000:
            raise GenerationError(f"{name} is a string of {len(value)} characters (at most 1000); shorten it")
        try:
            number = float(value)  # CLI values arrive as text: "nan" and "inf" are refused like the numbers
        except ValueError:
            return
        finite(name, number, -1e6, 1e6)
        return
    if depth >= 3:
        raise GenerationError(f"{name} is nested too deeply; parameters are numbers, strings or short lists")
    if isinstance(value, (list, tuple)):
        if len(value) > 256:
            raise GenerationError(f"{name} has {len(value)} items (at most 256); shorten it")
        for i, v in enumerate(value):
            _check_value(f"{name}[{i}]", v, depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > 256:
            raise GenerationError(f"{name} has {len(value)} entries (at most 256); shorten it")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 64:
                raise GenerationError(f"{name} has a bad key {_show(k)}; keys are short names")
            _check_value(f"{name}.{k}", v, depth + 1)
        return
    raise GenerationError(f"{name} has a value of type {type(value).__name__} ({_show(value)}); "
                          "use a number, a string, true/false or a list")


# ---------------------------------------------------------------------------------------------
# A generation request (the validation boundary of Studio.run)
# ---------------------------------------------------------------------------------------------
def check_request(limits: Limits, *, prompt, negative_prompt, steps, guidance, width, height, seed,
                  num_images, sampler, method) -> None:
    """Refuse a request before any work: types, finiteness, ranges and resource bounds."""
    if not isinstance(prompt, str):
        raise GenerationError(f"prompt must be text, got {type(prompt).__name__} {_show(prompt)}")
    if len(prompt) > limits.max_prompt_chars:
        raise _over("prompt of", f"{len(prompt)} characters", "max_prompt_chars", limits.max_prompt_chars, "shorten it")
    if not isinstance(negative_prompt, str):
        raise GenerationError(f"negative_prompt must be text, got {type(negative_prompt).__name__} {_show(negative_prompt)}")
    if len(negative_prompt) > limits.max_prompt_chars:
        raise _over("negative prompt of", f"{len(negative_prompt)} characters", "max_prompt_chars",
                    limits.max_prompt_chars, "shorten it")
    if not isinstance(method, str):
        raise GenerationError(f"method must be a method name, got {_show(method)}")
    if not isinstance(sampler, str):
        raise GenerationError(f"sampler must be a sampler name, got {_show(sampler)}")
    steps = whole("steps", steps, 1, "try 25")
    finite("guidance", guidance, 0, limits.max_guidance, "7.5 is typical (1 disables the negative prompt)")
    whole("seed", seed, None, "give a whole number, or -1 for a random seed")
    if abs(seed) >= 2**63:
        raise GenerationError(f"seed {seed} is too large (|seed| < 2^63); seeds are taken modulo 2^32, give one below 4294967296")
    for label, v in (("width", width), ("height", height)):
        v = whole(label, v, None)
        if v <= 0 or v % 8:
            raise GenerationError(f"{label} {v} is not a positive multiple of 8; try {max(8, round(v / 8) * 8)}")
        if v > limits.max_side:
            raise _over(label, v, "max_side", limits.max_side, f"pick a side ≤ {limits.max_side}")
    num_images = whole("num_images", num_images, 1)
    if steps > limits.max_steps:
        raise _over("steps", steps, "max_steps", limits.max_steps, "25-50 steps are typical")
    if num_images > limits.max_images:
        raise _over("num_images", num_images, "max_images", limits.max_images, "generate in smaller batches")
    work = width * height * steps * num_images
    if work > limits.max_work:
        raise _over(f"the work of this request ({width}×{height} px × {steps} steps × {num_images} images =",
                    f"{work:.3g})", "max_work", f"{limits.max_work:.3g}", "lower the size, steps or image count")


def check_weights(limits: Limits, weights: list[tuple[str, float, float]]) -> None:
    """Adapter weights (name, unet, te): finite and within ``max_weight``; at most ``max_adapters``."""
    if len(weights) > limits.max_adapters:
        raise _over("the number of adapters", len(weights), "max_adapters", limits.max_adapters, "use fewer adapters")
    for name, unet, te in weights:
        for which, w in (("weight", unet), ("text-encoder weight", te)):
            finite(f"{which} of adapter {name!r}", w, -limits.max_weight, limits.max_weight,
                   "weights between -2 and 2 are typical, e.g. <lora:NAME:0.8>")


# ---------------------------------------------------------------------------------------------
# The PNG recipe
# ---------------------------------------------------------------------------------------------
_Text = Field(max_length=10_000)
_Short = Field(max_length=512)
_SAFE_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?$")
AUTO_MODELS = ("toy-sd", "tiny-random-sd1", "tiny-random-sdxl")  # built-in models a recipe may name


def recipe_model_problem(model: str) -> str | None:
    """Why a model named in a recipe must not be loaded automatically (None: it may be): only the
    built-in models, an existing local folder/file, or a plain hub id ``owner/name``."""
    if model in AUTO_MODELS or (os.path.exists(model) and not model.startswith("-")):
        return None
    if _SAFE_MODEL.match(model) and ".." not in model:
        return None
    return f"model {_show(model)} is neither a local model nor a plain hub id"


def _finite_float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError("must be a finite number")
    return float(v)


class AdapterUseModel(BaseModel):
    """One adapter of a recipe."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=200)
    weight: float
    te_weight: float
    sha256: str | None = Field(default=None, max_length=128)
    path: Any = None  # a file path: any str, non-UTF-8 names (surrogate escapes) included
    type: str = Field(default="lora", max_length=32)

    _w = field_validator("weight", "te_weight", mode="before")(classmethod(lambda cls, v: _finite_float(v)))

    @field_validator("path", mode="plain")
    @classmethod
    def _path(cls, v):
        if v is not None and (not isinstance(v, str) or len(v) > 4096):
            raise ValueError("must be a file path (text of at most 4096 characters) or null")
        return v


class RecipeModel(BaseModel):
    """The ``lora_studio`` JSON chunk, validated field by field."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str = _Text
    negative_prompt: str = _Text
    steps: int = Field(ge=1)
    guidance: float
    sampler: str = Field(max_length=64)
    seed: int = Field(ge=0, lt=2**63)
    width: int = Field(ge=8)
    height: int = Field(ge=8)
    model: str = _Short
    arch: str = Field(max_length=32)
    method: str = Field(max_length=64)
    method_params: dict = Field(default_factory=dict)
    effective: dict = Field(default_factory=dict)
    from_preset: dict = Field(default_factory=dict)
    adapters: list[AdapterUseModel] = Field(default_factory=list, max_length=32)
    generator_device: str = Field(default="cpu", max_length=32)
    version: str = Field(default="", max_length=64)
    packages: dict[str, str] = Field(default_factory=dict)
    model_hash: str = Field(default="", max_length=64)
    schema_: int = Field(default=1, alias="schema", ge=1)

    _g = field_validator("guidance", mode="before")(classmethod(lambda cls, v: _finite_float(v)))


def parse_recipe_json(text, where: str = "the PNG", schema_version: int = 1, limits: Limits | None = None) -> dict:
    """The validated recipe fields as a dict (for ``metadata.Recipe``), or a RecipeError naming the field."""
    import json

    limits = limits or Limits.from_env()
    fix = "the image's recipe is damaged or was not written by the studio; regenerate it or use --prompt"
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        raise RecipeError(f"{where}: the lora_studio recipe is not text; {fix}")
    if len(text) > limits.max_recipe_bytes:
        raise RecipeError(f"{where}: the lora_studio recipe is {len(text)} characters, over the bound of "
                          f"{limits.max_recipe_bytes} ({env_name('max_recipe_bytes')}); {fix}")
    try:
        data = json.loads(text, parse_constant=lambda c: float(c))
    except (ValueError, RecursionError) as e:
        raise RecipeError(f"{where}: the lora_studio recipe is not valid JSON ({str(e).splitlines()[0][:80]}); {fix}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the lora_studio recipe is a JSON {type(data).__name__}, not an object; {fix}")
    if isinstance(data.get("schema"), int) and not isinstance(data.get("schema"), bool) and data["schema"] > schema_version:
        raise RecipeError(f"{where}: the recipe has schema {data['schema']}, newer than this studio's {schema_version}; "
                          "upgrade lora-composition-studio")
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: bad recipe: {_pydantic_line(e)}; {fix}") from None
    try:
        check_method_params(model.method_params, "method_params")
    except GenerationError as e:
        raise RecipeError(f"{where}: bad recipe: {e}") from None
    if model.steps > limits.max_steps:
        raise RecipeError(f"{where}: bad recipe: steps {model.steps} is over the bound of {limits.max_steps} "
                          f"({env_name('max_steps')}); {fix}")
    side = limits.max_side or 16384
    for label in ("width", "height"):
        if getattr(model, label) > side or getattr(model, label) % 8:
            raise RecipeError(f"{where}: bad recipe: {label} {getattr(model, label)} is not a multiple of 8 up to {side} "
                              f"({env_name('max_side')}); {fix}")
    if any(ord(c) < 32 for c in model.model + model.prompt + model.negative_prompt + model.sampler + model.method):
        raise RecipeError(f"{where}: bad recipe: a text field holds control characters; {fix}")
    out = model.model_dump(by_alias=True)
    return out


def _pydantic_line(e: ValidationError) -> str:
    """The first error of a pydantic ValidationError as ``field: problem (got value)``."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "recipe"
    msg = err.get("msg", "invalid").replace("Value error, ", "")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    if err.get("type") == "missing":
        return f"{loc} is missing"
    return f"{loc}: {msg} (got {_show(err.get('input'), 40)})"


# ---------------------------------------------------------------------------------------------
# Suites: the scalar fields of an evaluation YAML
# ---------------------------------------------------------------------------------------------
class SuiteScalars(BaseModel):
    """Types and ranges of a suite's top-level scalars; lists are checked by ``evaluation.load_suite``."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str | int | None = Field(default=None)
    model: str = Field(default="toy", max_length=512)
    scorer: str = Field(default="toy", max_length=512)
    device: str | None = Field(default=None, max_length=64)
    steps: int = Field(default=25, ge=1)
    guidance: float = 7.5
    sampler: str = Field(default="ddim", max_length=64)
    size: int | list[int] = 64
    negative_prompt: str | None = Field(default="", max_length=10_000)
    base_seed: int = Field(default=0, ge=0, lt=2**63)
    samples: int = Field(default=1, ge=1)
    oracle: str | bool = "auto"
    grids: bool = True
    report: bool = True

    _g = field_validator("guidance", mode="before")(classmethod(lambda cls, v: _finite_float(v)))

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        sides = [v, v] if isinstance(v, int) else v
        if len(sides) != 2 or any(s <= 0 or s % 8 for s in sides):
            raise ValueError(f"size must be a positive multiple of 8 or [width, height] of those, got {_show(v)}")
        return v


def check_suite_scalars(data: dict, where: str, limits: Limits) -> SuiteScalars:
    """Validate a suite's scalar fields; a StudioError names the field, the value and the fix."""
    try:
        s = SuiteScalars.model_validate(data)
    except ValidationError as e:
        raise StudioError(f"{where}: {_pydantic_line(e)}; fix that key of the suite") from None
    if s.steps > limits.max_steps:
        raise StudioError(f"{where}: steps {s.steps} is over the bound of {limits.max_steps}; lower it or raise "
                          f"{env_name('max_steps')}")
    if not 0 <= s.guidance <= limits.max_guidance:
        raise StudioError(f"{where}: guidance {s.guidance:g} is out of range (0 to {limits.max_guidance:g}); 7.5 is typical")
    if s.samples > limits.max_jobs:
        raise StudioError(f"{where}: samples {s.samples} is over the bound of {limits.max_jobs} jobs; lower it or raise "
                          f"{env_name('max_jobs')}")
    return s
