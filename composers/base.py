"""The composer protocol: a noise predictor over several adapters, k-diffusion style.

A composer is built per generation with its parameters, ``prepare``d once with the
``ComposeContext`` (adapters, prompts, UNet call), ``reset`` before each image, then asked for
``guide`` (optional latent update) and ``predict`` (CFG-combined noise) at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from studio.errors import GenerationError
from studio.sampling import ComposeContext


RUN_KEYS = ("sampler", "steps", "guidance", "weight", "negative_prompt")


@dataclass(frozen=True)
class Preset:
    """A named recipe: composer parameters plus the run settings it was published with.

    ``Studio.run`` applies the run settings (sampler, steps, guidance, LoRA weight for adapters
    given without one, negative prompt) when the preset is named explicitly and the caller left
    that setting unset; the report and the recipe say which values came from the preset.
    ``deviation`` is set when the preset departs from the published computation (a faster variant).
    """

    description: str
    params: dict = field(default_factory=dict)
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    weight: float | None = None
    negative_prompt: str | None = None
    deviation: str | None = None

    def run_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in RUN_KEYS if getattr(self, k) is not None}


class Composer:
    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}  # every parameter with its default
    presets: ClassVar[dict[str, Preset]] = {}  # named recipes; selected by the ``preset`` parameter
    summary: ClassVar[str] = ""  # one line for the app's method help
    min_adapters: ClassVar[int] = 0

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise GenerationError(f"method {self.name!r} has no parameter {', '.join(unknown)}; valid: {valid}")
        given = {k: _coerce(k, self.defaults[k], v) for k, v in params.items()}
        self.explicit = set(given)  # parameters the caller set (the rest are defaults or the preset's)
        preset = given.get("preset", self.defaults.get("preset"))
        if "preset" in self.defaults and preset != "none" and preset not in self.presets:
            names = ([] if self.defaults["preset"] in self.presets else ["none"]) + list(self.presets)
            raise GenerationError(f"{self.name} preset must be one of {', '.join(names)}; got {preset!r}")
        from_preset = self.presets[preset].params if preset in self.presets else {}
        self.params = {**self.defaults, **from_preset, **given}
        self.ctx: ComposeContext | None = None

    def named_preset(self) -> Preset | None:
        """The preset the caller named explicitly (its run settings apply), else None."""
        return self.presets.get(self.params["preset"]) if "preset" in self.explicit else None

    def effective(self) -> dict:
        """The settings that decide this composer's computation, for the recipe (PNG, results.jsonl):
        enough to tell two runs apart. Subclasses add theirs (te_mode, schedule, ...)."""
        out: dict[str, Any] = {}
        if "preset" in self.params:
            out["preset"] = self.params["preset"]
            dev = self.presets[self.params["preset"]].deviation if self.params["preset"] in self.presets else None
            if dev:
                out["deviation"] = dev
        if "te_mode" in self.params:
            out["te_mode"] = self.params["te_mode"]
        return out

    def prepare(self, ctx: ComposeContext) -> None:
        if len(ctx.adapters) < self.min_adapters:
            raise GenerationError(
                f"method {self.name!r} needs at least {self.min_adapters} adapters, got {len(ctx.adapters)}; "
                "add adapters or use method 'merge'"
            )
        self.ctx = ctx

    def reset(self) -> None:
        """Clear per-image state (caches, schedules) before a new image."""

    def guide(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        return x

    def predict(self, x: torch.Tensor, t, step: int) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict:
        c = self.ctx.counters
        return {
            "method": self.name,
            "params": self.params,
            "effective": self.effective(),
            "unet_calls": c.unet_calls,
            "shallow_calls": c.shallow_calls,
            "cache_hits": c.cache_hits,
            "seconds": round(c.seconds, 4),
        }


def method_help(cls: type[Composer]) -> str:
    """Markdown help for a method: its summary, defaults, and presets (deviations named)."""
    lines = [f"**{cls.name}**: {cls.summary}" if cls.summary else f"**{cls.name}**"]
    for name, p in cls.presets.items():
        run = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v:g}" for k, v in p.run_settings().items())
        default = " (default)" if cls.defaults.get("preset") == name else ""
        text = f"- `preset={name}`{default}: {p.description}" + (f" Run settings: {run}." if run else "")
        if p.deviation:
            text += f" **Deviation:** {p.deviation}"
        lines.append(text)
    return "\n".join(lines)


def switch_param(method: str, params: dict, key: str, auto: bool) -> bool:
    """An on/off/auto parameter; ``auto`` takes the caller's size-dependent default."""
    v = str(params[key]).strip().lower()
    if v not in ("auto", "true", "false", "on", "off", "1", "0"):
        raise GenerationError(f"{method} {key} must be auto, on or off; got {params[key]!r}")
    return auto if v == "auto" else v in ("true", "on", "1")


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Parameters from the CLI arrive as strings; give them the default's type."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            return value.lower() in ("1", "true", "yes", "on")
        return type(default)(value)
    except ValueError:
        raise GenerationError(f"{key}={value!r} is not a {type(default).__name__} (default {default!r})") from None
