"""The composer protocol: a noise predictor over several adapters, k-diffusion style.

A composer is built per generation with its parameters, ``prepare``d once with the
``ComposeContext`` (adapters, prompts, UNet call), ``reset`` before each image, then asked for
``guide`` (optional latent update) and ``predict`` (CFG-combined noise) at every step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from studio.errors import GenerationError
from studio.sampling import ComposeContext


class Composer:
    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}  # every parameter with its default
    min_adapters: ClassVar[int] = 0

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise GenerationError(f"method {self.name!r} has no parameter {', '.join(unknown)}; valid: {valid}")
        self.params = {**self.defaults, **{k: _coerce(k, self.defaults[k], v) for k, v in params.items()}}
        self.ctx: ComposeContext | None = None

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
            "unet_calls": c.unet_calls,
            "shallow_calls": c.shallow_calls,
            "cache_hits": c.cache_hits,
            "seconds": round(c.seconds, 4),
        }


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
